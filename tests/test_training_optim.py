"""The engine's AdamW step equals torch.optim.AdamW (+ clip_grad_norm_ over all LoRA tensors).

Tinker documents its optimizer as identical to torch.optim.AdamW (decoupled weight decay, bias
correction), with global-norm clipping when grad_clip_norm > 0 and hyperparameters that may change
on every step (reference/tinker-api.md §6.4, DESIGN.md §5). The gradients are real ones, from a
forward_backward on a tiny Qwen2 checkpoint with random non-zero A and B; torch gets exactly the
engine's accumulated gradients (LoraAdapter.gradients()) and the engine's parameters before each step.

Tolerances, per tensor: ‖x − x_torch‖ / ‖x_torch‖ <= 1e-6 for the parameters after the step and
both moments (LoraAdapter.optimizer_state()); the update itself (after − before) within 1e-4, which
is what float32 rounding of the parameters allows at these learning rates. The global gradient
norm is kept above 10 so that torch's clip coefficient max_norm / (norm + 1e-6) and
max_norm / norm agree to 1e-7.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import reference_training as rt  # noqa: E402  (tests/ is on sys.path under pytest's rootdir conftest)
import tiny_models as tm  # noqa: E402

from tinker import _training  # noqa: E402
from tinker._engine import load_model  # noqa: E402

PARAM_RTOL = 1e-6
MOMENT_RTOL = 1e-6
UPDATE_RTOL = 1e-4
RANK = 8


def rel_err(got, want) -> float:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return float("inf")
    denom = np.linalg.norm(want)
    diff = np.linalg.norm(got - want)
    if not np.isfinite(got).all():
        return float("inf")
    return float(diff / denom) if denom > 0 else (0.0 if diff == 0 else float("inf"))


def assert_tensors_close(got: dict, want: dict, rtol: float, what: str) -> None:
    assert set(got) == set(want), (f"{what}: names differ: missing {sorted(set(want) - set(got))[:4]}, "
                                   f"unexpected {sorted(set(got) - set(want))[:4]}")  # fmt: skip
    errs = {k: rel_err(got[k], want[k]) for k in want}
    bad = {k: e for k, e in errs.items() if not e <= rtol}
    if bad:
        worst = sorted(bad, key=bad.get, reverse=True)[:6]
        raise AssertionError(f"{what}: {len(bad)} of {len(errs)} tensors differ from torch by more than {rtol:g} "
                             f"relative: " + ", ".join(f"{k} {bad[k]:.2e}" for k in worst))  # fmt: skip


def global_norm(grads: dict) -> float:
    return float(np.sqrt(sum(np.sum(np.asarray(g, dtype=np.float64) ** 2) for g in grads.values())))


class Fixture:
    def __init__(self, root):
        model = tm.make_hf_model("qwen2", seed=41)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model.save_pretrained(root / "qwen2", safe_serialization=True)
        self.engine = load_model(str(root / "qwen2"))
        self.shapes = rt.expected_tensor_shapes(model.config, RANK)
        self.values = rt.random_adapter_values(self.shapes, seed=42)
        rng = np.random.default_rng(43)
        vocab = model.config.vocab_size
        self.data = []
        for n in (80, 1, 150, 31):
            tokens = rng.integers(0, vocab, size=n).tolist()
            targets = rng.integers(0, vocab, size=n, dtype=np.int64)
            # weights of a few units: a global gradient norm well above 10 (see the module docstring)
            weights = (rng.uniform(0.5, 3.0, size=n) * (rng.random(n) > 0.2)).astype(np.float32)
            self.data.append((tokens, {"target_tokens": targets, "weights": weights}))

    def adapter(self, values=None):
        adapter = _training.LoraAdapter(self.engine, rank=RANK, seed=0)
        adapter.set_parameters({k: v.copy() for k, v in (values or self.values).items()})
        return adapter

    def gradients(self, adapter) -> dict:
        adapter.forward_backward(self.data, loss_fn="cross_entropy")
        grads = adapter.gradients()
        norm = global_norm(grads)
        assert norm > 10, f"the test's gradient norm {norm:.3g} is too small for the clip comparison"
        return grads


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Fixture:
    return Fixture(tmp_path_factory.mktemp("optim_model"))


def step_and_compare(adapter, torch_opt: rt.TorchAdamW | None, grads: dict, hparams: dict, what: str,
                     expected_step: int):  # fmt: skip
    """One engine step and one torch step from the engine's current parameters and gradients."""
    before = adapter.parameters()
    metrics = adapter.optim_step(**hparams)
    after = adapter.parameters()
    want, torch_opt = rt.torch_adamw_step(before, grads, torch_opt, hparams)
    assert_tensors_close(after, want, PARAM_RTOL, f"{what}: parameters after the step")
    assert_tensors_close({k: after[k] - before[k] for k in after}, {k: want[k] - before[k] for k in want},
                         UPDATE_RTOL, f"{what}: the update (after − before)")  # fmt: skip
    state, want_state = adapter.optimizer_state(), torch_opt.state()
    assert int(state["step"]) == expected_step, f"{what}: optimizer step {state['step']}, expected {expected_step}"
    assert_tensors_close(state["exp_avg"], want_state["exp_avg"], MOMENT_RTOL, f"{what}: exp_avg")
    assert_tensors_close(state["exp_avg_sq"], want_state["exp_avg_sq"], MOMENT_RTOL, f"{what}: exp_avg_sq")
    return metrics, torch_opt


def assert_gradients_cleared(adapter, what: str) -> None:
    grads = adapter.gradients()
    nonzero = [k for k, g in grads.items() if np.any(g)]
    assert not nonzero, f"{what}: optim_step left non-zero gradients in {nonzero[:4]} ({len(nonzero)} tensors)"


def test_adamw_step_with_weight_decay_and_clipping_equals_torch(fx):
    adapter = fx.adapter()
    grads = fx.gradients(adapter)
    clip = 0.25 * global_norm(grads)  # clipping active
    hparams = dict(learning_rate=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_clip_norm=clip)
    step_and_compare(adapter, None, grads, hparams, "AdamW, weight decay 0.1, clipped to 1/4 of the norm", 1)
    assert_gradients_cleared(adapter, "after one step")


def test_adam_without_momentum_decay_or_clipping_equals_torch(fx):
    adapter = fx.adapter()
    grads = fx.gradients(adapter)
    hparams = dict(learning_rate=1e-3, beta1=0.0, beta2=0.0, eps=1e-12, weight_decay=0.0, grad_clip_norm=0.0)
    step_and_compare(adapter, None, grads, hparams, "beta1 = beta2 = 0, no weight decay, no clipping", 1)


def test_default_hyperparameters_equal_torch(fx):
    """optim_step() with no arguments is AdamParams' defaults: lr 1e-4, betas (0.9, 0.95), eps 1e-12."""
    adapter = fx.adapter()
    grads = fx.gradients(adapter)
    before = adapter.parameters()
    adapter.optim_step()
    want, _ = rt.torch_adamw_step(before, grads, None, dict(rt.ADAM_DEFAULTS))
    assert_tensors_close(adapter.parameters(), want, PARAM_RTOL, "default hyperparameters")


@pytest.mark.parametrize("factor", [2.0, 0.1], ids=["clip-above-norm", "clip-below-norm"])
def test_clip_threshold_above_and_below_the_norm(fx, factor):
    adapter = fx.adapter()
    grads = fx.gradients(adapter)
    hparams = dict(learning_rate=2e-3, beta1=0.9, beta2=0.99, eps=1e-10, weight_decay=0.01,
                   grad_clip_norm=factor * global_norm(grads))  # fmt: skip
    step_and_compare(adapter, None, grads, hparams, f"grad_clip_norm = {factor} × the gradient norm", 1)
    if factor > 1:  # a threshold above the norm changes nothing: the same as no clipping
        unclipped = fx.adapter()
        assert global_norm(fx.gradients(unclipped)) > 0
        unclipped.optim_step(**{**hparams, "grad_clip_norm": 0.0})
        assert_tensors_close(adapter.parameters(), unclipped.parameters(), PARAM_RTOL,
                             "clip threshold above the norm vs no clipping")  # fmt: skip


def test_hyperparameters_change_every_step(fx):
    """Three steps, each with its own hyperparameters (torch's bias correction uses the current
    betas with the step count); the moments carry over between steps."""
    schedule = [
        dict(learning_rate=1e-3, beta1=0.9, beta2=0.95, eps=1e-12, weight_decay=0.0, grad_clip_norm=0.0),
        dict(learning_rate=5e-3, beta1=0.5, beta2=0.99, eps=1e-8, weight_decay=0.1, grad_clip_norm=1e6),
        dict(learning_rate=2e-3, beta1=0.8, beta2=0.9, eps=1e-6, weight_decay=0.02, grad_clip_norm=None),
    ]
    adapter = fx.adapter()
    torch_opt = None
    for i, hparams in enumerate(schedule, start=1):
        grads = fx.gradients(adapter)  # at the current (already stepped) parameters
        if hparams["grad_clip_norm"] is None:
            hparams = {**hparams, "grad_clip_norm": 0.3 * global_norm(grads)}
        _, torch_opt = step_and_compare(adapter, torch_opt, grads, hparams, f"step {i} of 3 ({hparams})", i)
        assert_gradients_cleared(adapter, f"after step {i}")


def test_optim_step_clears_gradients(fx):
    """After optim_step the gradients are zero, and the next forward_backward starts from zero:
    it equals a forward_backward on a fresh adapter holding the stepped parameters."""
    adapter = fx.adapter()
    fx.gradients(adapter)
    adapter.optim_step(learning_rate=1e-2)
    assert_gradients_cleared(adapter, "after optim_step")
    stepped = adapter.parameters()
    assert any(not np.array_equal(stepped[k], fx.values[k]) for k in stepped), "optim_step changed nothing"
    again = fx.gradients(adapter)
    fresh = fx.adapter(stepped)
    assert_tensors_close(again, fx.gradients(fresh), 1e-6, "gradients after a step vs a fresh adapter")


def test_grad_norm_metric_is_the_global_norm_before_clipping(fx):
    """optim_step's metrics report the global gradient norm before clipping (what clip_grad_norm_ returns)."""
    adapter = fx.adapter()
    grads = fx.gradients(adapter)
    norm = global_norm(grads)
    metrics = adapter.optim_step(learning_rate=1e-3, grad_clip_norm=0.5 * norm)
    assert isinstance(metrics, dict)
    keys = [k for k in metrics if k.startswith("grad_norm")]
    if not keys:
        pytest.skip(f"optim_step reports no grad_norm metric (metrics: {sorted(metrics)})")
    for k in keys:
        assert float(metrics[k]) == pytest.approx(norm, rel=1e-5), f"metrics[{k!r}] {metrics[k]}, global norm {norm}"
