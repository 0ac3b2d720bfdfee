"""Bad training input raises a clear BadRequestError naming the datum and the field, nothing is
half-applied (gradients stay as they were), and the adapter and engine keep working."""

from __future__ import annotations

import numpy as np
import pytest

from tinker._engine import load_model
from tinker._exceptions import BadRequestError
from tinker._training import LoraAdapter

torch = pytest.importorskip("torch")

from tiny_models import make_hf_checkpoint  # noqa: E402

CONTEXT = 48


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, _ = make_hf_checkpoint(tmp_path_factory.mktemp("robust") / "llama", "llama", max_positions=CONTEXT)
    return load_model(str(path))


@pytest.fixture(scope="module")
def adapter(model):
    ad = LoraAdapter(model, rank=4, seed=3)
    rng = np.random.default_rng(0)
    ad.set_parameters({k: rng.standard_normal(v.shape).astype(np.float32) * 0.05 for k, v in ad.parameters().items()})
    return ad


def datum(model, n=6, seed=0, **inputs):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, model.vocab_size, size=n + 1)
    base = {"target_tokens": ids[1:], "weights": np.ones(n, np.float32),
            "advantages": rng.standard_normal(n).astype(np.float32), "logprobs": -rng.random(n).astype(np.float32)}
    base.update(inputs)
    return (ids[:-1], {k: v for k, v in base.items() if v is not None})


def ce(model, n=6, seed=0, **inputs):
    d = datum(model, n, seed, **inputs)
    return (d[0], {k: v for k, v in d[1].items() if k in ("target_tokens", "weights") or k in inputs})


def assert_unchanged_and_working(adapter, model, grads_before):
    after = adapter.gradients()
    for name, g in grads_before.items():
        np.testing.assert_array_equal(after[name], g, err_msg=f"{name} changed by a rejected call")
    result = adapter.forward([ce(model, seed=9)])
    assert np.isfinite(result.metrics["loss:sum"])


BAD_CASES = [
    ("length mismatch", lambda m: [ce(m), (np.arange(5), {"target_tokens": np.arange(4), "weights": np.ones(4)})],
     "cross_entropy", None, r"datum 1: target_tokens has shape \(4,\), but model_input has 5 tokens"),
    ("weights shape", lambda m: [ce(m, weights=np.ones(3, np.float32))], "cross_entropy", None,
     r"datum 0: weights has shape \(3,\), but target_tokens has \(6,\)"),
    ("target too large", lambda m: [ce(m), ce(m, target_tokens=np.array([1, 2, 3, m.vocab_size, 4, 5]))],
     "cross_entropy", None, r"datum 1: target_tokens\[3\] = \d+ is outside the vocabulary"),
    ("negative target", lambda m: [ce(m, target_tokens=np.array([1, -2, 3, 4, 4, 5]))], "cross_entropy", None,
     r"datum 0: target_tokens\[1\] = -2 is outside the vocabulary"),
    ("float targets", lambda m: [ce(m, target_tokens=np.array([1.5, 2, 3, 4, 4, 5]))], "cross_entropy", None,
     r"datum 0: target_tokens must hold integer token ids"),
    ("model input token", lambda m: [(np.array([1, 2, m.vocab_size + 7]), {"target_tokens": [1, 2, 3],
                                                                         "weights": [1.0, 1.0, 1.0]})],
     "cross_entropy", None, r"sequence 0, position 2: token id \d+ is outside the vocabulary"),
    ("nan weight", lambda m: [ce(m), ce(m, weights=np.array([1, 1, np.nan, 1, 1, 1], np.float32))],
     "cross_entropy", None, r"datum 1: weights\[2\] is nan"),
    ("inf advantage", lambda m: [datum(m, advantages=np.array([1, np.inf, 1, 1, 1, 1], np.float32))],
     "importance_sampling", None, r"datum 0: advantages\[1\] is inf"),
    ("nan sampler logprob", lambda m: [datum(m, logprobs=np.full(6, np.nan, np.float32))], "ppo", None,
     r"datum 0: logprobs\[0\] is nan"),
    ("missing weights", lambda m: [(np.arange(3), {"target_tokens": [1, 2, 3]})], "cross_entropy", None,
     r"datum 0: cross_entropy needs loss_fn_inputs\['weights'\]"),
    ("missing advantages", lambda m: [ce(m)], "ppo", None, r"datum 0: ppo needs loss_fn_inputs\['advantages'\]"),
    ("unknown input key", lambda m: [ce(m, mask=np.ones(6))], "cross_entropy", None,
     r"datum 0: unknown loss_fn_inputs key\(s\) 'mask'"),
    ("unknown loss", lambda m: [ce(m)], "kl_divergence", None, r"unknown loss_fn 'kl_divergence'"),
    ("unknown config key", lambda m: [datum(m)], "ppo", {"clip_ratio": 0.2},
     r"loss_fn_config key\(s\) 'clip_ratio' are not used by 'ppo'"),
    ("config for cross_entropy", lambda m: [ce(m)], "cross_entropy", {"beta": 0.1},
     r"'beta' are not used by 'cross_entropy'"),
    ("dro without beta", lambda m: [datum(m)], "dro", None, r"'dro' needs loss_fn_config\['beta'\]"),
    ("nan config", lambda m: [datum(m)], "ppo", {"clip_low_threshold": float("nan")}, r"must be finite"),
    ("empty data", lambda m: [], "cross_entropy", None, r"No data provided"),
    ("empty model input", lambda m: [(np.array([], np.int64), {"target_tokens": [], "weights": []})],
     "cross_entropy", None, r"datum 0: model_input must be a non-empty sequence"),
    ("past the context", lambda m: [ce(m, n=CONTEXT + 1)], "cross_entropy", None,
     rf"sequence 0 has {CONTEXT + 1} tokens, more than the model's context length {CONTEXT}"),
    ("not a pair", lambda m: [42], "cross_entropy", None, r"datum 0: expected \(tokens, loss_fn_inputs\)"),
]


@pytest.mark.parametrize("name, make, loss_fn, config, match", BAD_CASES, ids=[c[0] for c in BAD_CASES])
@pytest.mark.parametrize("call", ["forward_backward", "forward"])
def test_bad_input_is_rejected_and_nothing_changes(model, adapter, name, make, loss_fn, config, match, call):
    adapter.forward_backward([ce(model, seed=1)])  # some accumulated gradient to protect
    before = adapter.gradients()
    with pytest.raises(BadRequestError, match=match):
        getattr(adapter, call)(make(model), loss_fn, config)
    assert_unchanged_and_working(adapter, model, before)
    adapter.optim_step(learning_rate=0.0)  # clears the gradients for the next case


@pytest.mark.parametrize(
    "hparams, match",
    [
        ({"learning_rate": -1e-3}, r"learning_rate is -0.001"),
        ({"learning_rate": float("nan")}, r"learning_rate is nan"),
        ({"beta1": 1.0}, r"betas are \(1, 0.95\)"),
        ({"beta2": -0.1}, r"betas"),
        ({"eps": -1.0}, r"eps"),
        ({"weight_decay": float("inf")}, r"weight_decay"),
        ({"grad_clip_norm": -1.0}, r"grad_clip_norm"),
    ],
)
def test_bad_adam_params_are_rejected(model, adapter, hparams, match):
    adapter.forward_backward([ce(model, seed=2)])
    params, before = adapter.parameters(), adapter.gradients()
    with pytest.raises(BadRequestError, match=match):
        adapter.optim_step(**hparams)
    after = adapter.parameters()
    for name in params:
        np.testing.assert_array_equal(after[name], params[name])
    assert_unchanged_and_working(adapter, model, before)
    adapter.optim_step(learning_rate=0.0)


def test_bad_adapter_settings(model, adapter):
    for rank in (0, 257, 1.5, True):
        with pytest.raises(BadRequestError, match="rank"):
            LoraAdapter(model, rank=rank)
    with pytest.raises(BadRequestError, match="at least one"):
        LoraAdapter(model, train_mlp=False, train_attn=False, train_unembed=False)
    with pytest.raises(BadRequestError, match="unknown LoRA tensor 'layers.9.q.lora_A'"):
        adapter.set_parameters({"layers.9.q.lora_A": np.zeros((4, 64), np.float32)})
    with pytest.raises(BadRequestError, match=r"must have shape \(4, 64\)"):
        adapter.set_parameters({"layers.0.q.lora_A": np.zeros((4, 63), np.float32)})
    with pytest.raises(BadRequestError, match="non-finite"):
        adapter.set_parameters({"layers.0.q.lora_A": np.full((4, 64), np.nan, np.float32)})
    assert np.isfinite(adapter.forward([ce(model)]).metrics["loss:sum"])


def test_many_adapters_share_one_base_model_independently(model):
    """Each adapter has its own gradients and optimizer state; training one leaves another untouched."""
    first, second = LoraAdapter(model, rank=2, seed=1), LoraAdapter(model, rank=8, seed=2)
    before = second.parameters()
    first.forward_backward([ce(model)])
    first.optim_step(learning_rate=1e-2)
    assert all(not g.any() for g in second.gradients().values())
    for name, value in second.parameters().items():
        np.testing.assert_array_equal(value, before[name])
    assert second.optimizer_state()["step"] == 0 and first.optimizer_state()["step"] == 1


def test_fresh_adapter_leaves_the_model_unchanged_and_a_trained_one_does_not(model):
    ad = LoraAdapter(model, rank=4, seed=5)
    seq = np.arange(1, 20) % model.vocab_size
    [base] = model.forward_logits([seq])
    [fresh] = model.forward_logits([seq], adapter=ad.handle)
    np.testing.assert_array_equal(fresh, base)  # B = 0
    assert all(not v.any() for k, v in ad.parameters().items() if k.endswith("lora_B"))
    assert all(v.any() for k, v in ad.parameters().items() if k.endswith("lora_A"))
    ad.forward_backward([ce(model, n=18)])
    ad.optim_step(learning_rate=1e-2)
    [trained] = model.forward_logits([seq], adapter=ad.handle)
    assert np.abs(trained - base).max() > 1e-4


def test_seed_fixes_the_initial_adapter(model):
    a, b, c = (LoraAdapter(model, rank=4, seed=s).parameters() for s in (11, 11, 12))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a if k.endswith("lora_A"))


def test_long_sequences_and_micro_batches_give_the_same_gradients(tmp_path_factory):
    """A batch larger than the engine's per-group token budget (2048) runs in groups of whole datums,
    and a datum at the full context length runs alone: gradients equal those of one datum at a time."""
    path, _ = make_hf_checkpoint(tmp_path_factory.mktemp("long") / "llama", "llama", max_positions=1024)
    model = load_model(str(path))
    rng = np.random.default_rng(4)
    data = [ce(model, n=n, seed=int(s)) for n, s in zip((1024, 700, 900, 5, 1024, 300), rng.integers(0, 99, 6))]
    whole, parts = LoraAdapter(model, rank=4, seed=7), LoraAdapter(model, rank=4, seed=7)
    values = {k: rng.standard_normal(v.shape).astype(np.float32) * 0.05 for k, v in whole.parameters().items()}
    whole.set_parameters(values)
    parts.set_parameters(values)
    together = whole.forward_backward(data)
    separate = [parts.forward_backward([d]) for d in data]
    assert together.metrics["loss:sum"] == pytest.approx(sum(r.metrics["loss:sum"] for r in separate), rel=1e-6)
    for got, want in zip(together.logprobs, (r.logprobs[0] for r in separate)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    g_whole, g_parts = whole.gradients(), parts.gradients()
    for name in g_whole:
        err = np.linalg.norm(g_whole[name] - g_parts[name]) / np.linalg.norm(g_parts[name])
        assert err < 1e-5, f"{name}: relative difference {err:.2e}"
