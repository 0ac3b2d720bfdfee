"""The 0.36+ losses gspo and stable_reinforce against torch (float32) on a tiny random Llama.

gspo follows Tinker's documented GSPO-token objective (docs: tinker/losses/gspo):
    log_ratio = mean over sequence_ratio_mask != 0 of (sg(lp) - s)          (per datum)
    ratio     = exp(log_ratio + lp - sg(lp))
    loss      = -sum(min(ratio * A, clamp(ratio, lo, hi) * A))
stable_reinforce's stabilising terms are not public; here it is the importance-sampling REINFORCE
term -sum(exp(lp - s) * A), with the documented requirement of provenance on every datum.

Checks, with the engine's own logprobs as torch leaves:
- loss:sum equals the torch formula within 1e-5 relative (+1e-5 absolute);
- the LoRA gradients equal those of a cross-entropy pass whose weights are minus torch's dL/dlp
  (the chain rule below the logprobs is tested by test_training_gradients) within 1e-4 per tensor;
- forward (no backward) reports the same loss:sum and logprobs.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import tinker  # noqa: E402
from tinker import types  # noqa: E402
from tinker._engine import load_model  # noqa: E402
from tinker._training import LoraAdapter  # noqa: E402
from tiny_models import make_hf_checkpoint  # noqa: E402

GRAD_RTOL = 1e-4
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, _ = make_hf_checkpoint(tmp_path_factory.mktemp("sdk038") / "llama", "llama", max_positions=64)
    return load_model(str(path))


@pytest.fixture(scope="module")
def params(model):
    rng = np.random.default_rng(0)
    shapes = LoraAdapter(model, rank=4, seed=3).parameters()
    return {k: rng.standard_normal(v.shape).astype(np.float32) * 0.05 for k, v in shapes.items()}


def fresh(model, params) -> LoraAdapter:
    adapter = LoraAdapter(model, rank=4, seed=3)
    adapter.set_parameters(params)
    return adapter


def rl_batch(model, adapter, seed: int, shift: float):
    """Three datums (lengths 5, 9, 7): the first two tokens are prompt (mask 0, advantage 0), the
    sampler logprobs are the learner's moved by `shift` per datum plus noise."""
    rng = np.random.default_rng(seed)
    data = []
    for n in (5, 9, 7):
        ids = rng.integers(0, model.vocab_size, size=n + 1)
        data.append((ids[:-1], {"target_tokens": ids[1:], "weights": np.ones(n, np.float32)}))
    learner = adapter.forward(data, "cross_entropy").logprobs
    out = []
    for i, ((tokens, inputs), lp) in enumerate(zip(data, learner)):
        n = lp.size
        mask = np.ones(n, np.float32)
        mask[:2] = 0
        adv = rng.standard_normal(n).astype(np.float32) * mask
        s = (lp - shift * (i - 1) + rng.normal(0, 0.02, n)).astype(np.float32)
        out.append((tokens, {"target_tokens": inputs["target_tokens"], "logprobs": s, "advantages": adv,
                             "sequence_ratio_mask": mask}))
    return out


def torch_loss(loss_fn, data, logprobs, lo, hi):
    """(loss, [dL/dlp per datum]) of the documented formula on the engine's logprobs."""
    leaves = [torch.tensor(lp, dtype=torch.float32, requires_grad=True) for lp in logprobs]
    total = torch.zeros((), dtype=torch.float32)
    for (tokens, inputs), lp in zip(data, leaves):
        s = torch.tensor(inputs["logprobs"])
        A = torch.tensor(inputs["advantages"])
        if loss_fn == "gspo":
            in_ratio = torch.tensor(inputs["sequence_ratio_mask"]) != 0
            log_ratio = (lp.detach() - s)[in_ratio].mean()
            ratio = torch.exp(log_ratio + lp - lp.detach())
            total = total - torch.minimum(ratio * A, torch.clamp(ratio, lo, hi) * A).sum()
        else:
            total = total - (torch.exp(lp - s) * A).sum()
    total.backward()
    return float(total.detach()), [leaf.grad.numpy() for leaf in leaves]


def assert_grads_close(got, want):
    for name, g in want.items():
        err = np.linalg.norm(got[name] - g) / max(np.linalg.norm(g), 1e-12)
        assert err <= GRAD_RTOL, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("loss_fn,config", [
    ("gspo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
    ("gspo", None),
    ("stable_reinforce", None),
])
def test_loss_and_gradients_equal_torch(model, params, loss_fn, config):
    adapter = fresh(model, params)
    data = rl_batch(model, adapter, seed=1, shift=0.3)  # sequence log-ratios near -0.3, 0, +0.3
    result = adapter.forward_backward(data, loss_fn, config)
    lo, hi = ((config or {}).get("clip_low_threshold", 1 - 3e-4), (config or {}).get("clip_high_threshold", 1 + 4e-4))
    want_loss, dlp = torch_loss(loss_fn, data, result.logprobs, lo, hi)
    assert result.metrics["loss:sum"] == pytest.approx(want_loss, rel=LOSS_RTOL, abs=1e-5)
    if loss_fn == "gspo":  # the clip range must matter for some datum and not for another
        ratios = [np.exp(np.mean((lp - d[1]["logprobs"])[2:])) for lp, d in zip(result.logprobs, data)]
        assert any(lo <= r <= hi for r in ratios) or config is None
        assert any(not lo <= r <= hi for r in ratios)
    reference = fresh(model, params)
    linear = [(tokens, {"target_tokens": inputs["target_tokens"], "weights": -g.astype(np.float32)})
              for (tokens, inputs), g in zip(data, dlp)]
    reference.forward_backward(linear, "cross_entropy")
    assert_grads_close(adapter.gradients(), reference.gradients())
    forward = fresh(model, params).forward(data, loss_fn, config)
    assert forward.metrics["loss:sum"] == pytest.approx(result.metrics["loss:sum"], rel=1e-6, abs=1e-7)
    for a, b in zip(forward.logprobs, result.logprobs):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_gspo_ratio_uses_only_masked_tokens(model, params):
    """Changing the sampler logprobs outside the mask changes nothing."""
    adapter = fresh(model, params)
    data = rl_batch(model, adapter, seed=2, shift=0.1)
    base = adapter.forward(data, "gspo", {"clip_low_threshold": 0.5, "clip_high_threshold": 2.0}).metrics["loss:sum"]
    moved = [(t, {**i, "logprobs": np.where(i["sequence_ratio_mask"] == 0, i["logprobs"] - 5, i["logprobs"])
                  .astype(np.float32)}) for t, i in data]
    again = adapter.forward(moved, "gspo", {"clip_low_threshold": 0.5, "clip_high_threshold": 2.0})
    assert again.metrics["loss:sum"] == pytest.approx(base, rel=1e-6)


def test_gspo_input_errors(model, params):
    adapter = fresh(model, params)
    data = rl_batch(model, adapter, seed=3, shift=0.0)
    no_mask = [(t, {k: v for k, v in i.items() if k != "sequence_ratio_mask"}) for t, i in data]
    with pytest.raises(tinker.BadRequestError, match="sequence_ratio_mask"):
        adapter.forward(no_mask, "gspo")
    empty = [(t, {**i, "sequence_ratio_mask": np.zeros_like(i["sequence_ratio_mask"])}) for t, i in data]
    with pytest.raises(tinker.BadRequestError, match="datum 0: sequence_ratio_mask marks no target"):
        adapter.forward_backward(empty, "gspo")
    with pytest.raises(tinker.BadRequestError, match="unknown loss_fn 'gspo2'"):
        adapter.forward(data, "gspo2")
    with pytest.raises(tinker.BadRequestError, match="'beta'"):
        adapter.forward(data, "gspo", {"beta": 1.0})
    assert not any(np.any(g) for g in adapter.gradients().values())  # nothing was applied


# ---- through the public client: provenance ---------------------------------------------------------


@pytest.fixture(scope="module")
def training_client(model):
    service = tinker.ServiceClient()
    return service.create_lora_training_client(model.name, rank=2, seed=0)


def public_datum(n_prompt=3, n_sampled=4, advantage=1.0, seq="s:seq:0"):
    tokens = list(range(10, 10 + n_prompt + n_sampled))
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "logprobs": [-1.0] * (len(tokens) - 1),
                        "advantages": [0.0] * (n_prompt - 1) + [advantage] * n_sampled})
    return datum.with_provenance(
        model_input=[types.PromptProvenanceSpan(sequence_id=seq, length=n_prompt),
                     types.SampledProvenanceSpan(sequence_id=seq, length=n_sampled - 1)],
        loss_fn_inputs=[types.PromptProvenanceSpan(sequence_id=seq, offset=1, length=n_prompt - 1),
                        types.SampledProvenanceSpan(sequence_id=seq, length=n_sampled)])


def test_stable_reinforce_needs_provenance(training_client):
    good = public_datum()
    out = training_client.forward([good], "stable_reinforce").result()
    ref = training_client.forward([good], "importance_sampling").result()
    assert out.metrics["loss:sum"] == pytest.approx(ref.metrics["loss:sum"], rel=1e-6)
    bare = types.Datum(model_input=good.model_input, loss_fn_inputs=good.loss_fn_inputs)
    with pytest.raises(tinker.BadRequestError, match="needs provenance on every datum"):
        training_client.forward_backward([bare], "stable_reinforce").result()
    prompt_advantage = types.Datum(model_input=good.model_input,
                                   loss_fn_inputs={**good.loss_fn_inputs, "advantages": [1.0] * 6},
                                   model_input_spans=good.model_input_spans,
                                   loss_fn_input_spans=good.loss_fn_input_spans)
    with pytest.raises(tinker.BadRequestError, match=r"advantages\[0\] is nonzero"):
        training_client.forward_backward([prompt_advantage], "stable_reinforce").result()


def test_provenance_types():
    span = tinker.SampledProvenanceSpan(sequence_id="a", length=2)
    assert span.offset == 0 and types.SampledProvenanceSpan is tinker.SampledProvenanceSpan
    with pytest.raises(ValueError):
        tinker.PromptProvenanceSpan(sequence_id="", length=1)
    with pytest.raises(ValueError):
        tinker.PromptProvenanceSpan(sequence_id="a", length=-1)
    with pytest.raises(TypeError):
        tinker.PromptProvenanceSpan("a", 0, 1)  # keyword-only, as in the SDK
    d = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]), loss_fn_inputs={"target_tokens": [2, 3, 4]})
    with pytest.raises(ValueError, match="cover 2 positions but the field has 3"):
        d.with_provenance(model_input=[tinker.PromptProvenanceSpan(sequence_id="a", length=2)],
                          loss_fn_inputs=[tinker.SampledProvenanceSpan(sequence_id="a", length=3)])
    with pytest.raises(ValueError, match="pair"):
        types.Datum(model_input=d.model_input, loss_fn_inputs={}, model_input_spans=[])
    mask = types.Datum(model_input=d.model_input, loss_fn_inputs={"sequence_ratio_mask": [0, 1, 1]})
    assert mask.loss_fn_inputs["sequence_ratio_mask"].dtype == "float32"
    assert d.model_input_spans is None and d.loss_fn_input_spans is None


def test_custom_loss_name_is_clear(training_client):
    with pytest.raises(tinker.BadRequestError, match="forward_backward_custom"):
        training_client.forward([public_datum()], "custom", {"loss_id": "x"}).result()
