"""LoRA gradients, logprobs and loss values of the engine equal peft + torch autograd in float32.

For each of the five Tinker losses (reference/tinker-api.md §6.6; ppo and cispo also with explicit
clip thresholds, and per-token thresholds), every LoRA tensor's gradient after
`LoraAdapter.forward_backward` is compared with peft's (tests/reference_training.py) on the same
base weights, the same adapter values and the same token ids:

- gradients: ‖g − g_ref‖ / ‖g_ref‖ <= 1e-4 per tensor;
- logprobs of the targets: |lp − lp_ref| <= 1e-4 (absolute) at every token;
- loss:sum: equals the documented formula evaluated (float64) on the reference's logprobs within
  1e-5 relative + Σ|∂loss/∂lp| · 2e-5 (what logprob differences of float32 size can move it), and
  on the engine's own logprobs within 1e-5 · (|loss| + Σ|per-token term|) (float32 summation).

Models: the default SmolLM2-135M (GGUF, tied embeddings; transformers loads the same GGUF and holds
its dequantised weights) with short sequences and a few parametrisations, and tiny random Llama
(untied, tied, and a Q8_0 GGUF with llama.cpp's permuted q/k rows), Qwen2 (q/k/v biases) and Qwen3
(q/k norms, head_dim != hidden / heads) checkpoints with a broad sweep of ranks (1, 8, 32),
train_attn / train_mlp / train_unembed combinations and losses, on batches of mixed lengths.

A fresh adapter has B = 0, which makes every lora_A gradient exactly zero; the comparisons set random
non-zero A and B (modest, so the model stays sane) through set_parameters and copy the same values
into peft. Sampler logprobs sit near the learner's, so ratios fall inside and outside every clip
range, but never within 1% of a clip threshold (where the PPO gradient jumps and a float32
difference could flip a token to the other side).

The float32 reference has rounding errors of its own. On the tiny models they are ~1e-6 per tensor
(against the same peft model in float64, reference_training.to_float64), far below the bounds. On
SmolLM2 (30 layers, hidden values up to ~25000 at position 0 and at some other tokens) they are
typically 2e-5 .. 1e-4 per gradient tensor and 1e-5 .. 5e-5 on logprobs, but reach 1.4e-3 and 4e-4
on a batch whose tokens trigger several such activations (the [N, 3] test's first datum; the
engine's position-0 logprobs there move by 1e-3 with the sequence length alone, torch's by 4e-4).
So on SmolLM2 the engine is compared with peft in float64 (the exact result), with the bounds above
or F32_NOISE_FACTOR = 4 times float32 peft's own largest error on the batch, whichever is larger:
no worse than a few times torch's float32 rounding. The tiny models carry the strict 1e-4 bounds.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("gguf")

import reference_training as rt  # noqa: E402  (tests/ is on sys.path under pytest's rootdir conftest)
import tiny_models as tm  # noqa: E402

from tinker import _training  # noqa: E402
from tinker._engine import load_model  # noqa: E402

LP_ATOL = 1e-4  # learner logprobs vs the reference, absolute
GRAD_RTOL = 1e-4  # ‖g − g_ref‖ / ‖g_ref‖ per tensor
LOSS_RTOL = 1e-5  # loss:sum vs the formula on the reference logprobs, relative ...
LOSS_LP_ATOL = 2e-5  # ... plus this times Σ|∂loss/∂lp|
SELF_RTOL = 1e-5  # loss:sum vs the formula on the engine's own logprobs, times (|loss| + Σ|term|)
F32_NOISE_FACTOR = 4  # SmolLM2: bounds >= this times float32 peft's own error (module docstring)
CLIP_MARGIN = 0.01  # |log ratio − log threshold| >= this for every token

# loss id -> (loss_fn, loss_fn_config)
LOSSES = {
    "cross_entropy": ("cross_entropy", None),
    "importance_sampling": ("importance_sampling", None),
    "ppo": ("ppo", None),  # defaults 0.8 / 1.2
    "ppo_0.9_1.1": ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
    "cispo": ("cispo", None),  # defaults 0.0 / 4.0
    "cispo_0.8_1.2": ("cispo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
    "dro": ("dro", {"beta": 0.5}),
}
CLIP_THRESHOLDS = (0.8, 1.2, 0.9, 1.1, 4.0)  # every positive threshold used above

# flags id -> (train_attn, train_mlp, train_unembed)
FLAGS = {
    "all": (True, True, True),
    "attn": (True, False, False),
    "mlp": (False, True, False),
    "unembed": (False, False, True),
    "attn_mlp": (True, True, False),
    "mlp_unembed": (False, True, True),
}

# ---- data -------------------------------------------------------------------------------------------


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def random_datum_inputs(rng, tokens, vocab: int, k: int | None = None) -> dict:
    """target_tokens (random ids incl. the extremes), weights (random, ~30% zero, a few negative)
    and advantages (both signs, ~20% zero) of the target's shape. Sampler logprobs come later."""
    n = len(tokens)
    shape = (n,) if k is None else (n, k)
    targets = rng.integers(0, vocab, size=shape, dtype=np.int64)
    targets.reshape(-1)[: min(2, targets.size)] = (0, vocab - 1)[: min(2, targets.size)]
    weights = rng.uniform(-0.5, 2.0, size=shape) * (rng.random(shape) > 0.3)
    advantages = rng.standard_normal(shape) * (rng.random(shape) > 0.2)
    return {"target_tokens": targets, "weights": weights.astype(np.float32),
            "advantages": advantages.astype(np.float32)}  # fmt: skip


def log_ratios(rng, shape, thresholds=CLIP_THRESHOLDS) -> np.ndarray:
    """log(learner / sampler) per token: mostly N(0, 0.3²) (inside and just outside [0.8, 1.2]), one
    token in five spread over [−2.5, 2.5] (beyond cispo's 4.0), never within CLIP_MARGIN of a threshold."""
    d = np.where(rng.random(shape) < 0.8, rng.normal(0.0, 0.3, shape), rng.uniform(-2.5, 2.5, shape))
    for t in np.log(np.asarray(thresholds, dtype=np.float64)):
        near = np.abs(d - t) < CLIP_MARGIN
        d[near] = t + np.where(d[near] >= t, CLIP_MARGIN, -CLIP_MARGIN) * 2.5
    return d


def attach_sampler_logprobs(rng, data, learner_logprobs, thresholds=CLIP_THRESHOLDS) -> None:
    """Sets each datum's "logprobs" (sampler) = learner logprob − a log ratio from log_ratios()."""
    for (_, inputs), lp in zip(data, learner_logprobs):
        d = log_ratios(rng, lp.shape, thresholds)
        sampler = (lp.astype(np.float64) - d).astype(np.float32)
        inputs["logprobs"] = sampler


# ---- comparisons ----------------------------------------------------------------------------------


def _kind(name: str) -> str:
    """"layers.3.q.lora_A" -> "q.lora_A" (for summaries)."""
    parts = name.split(".")
    return ".".join(parts[2:]) if parts[0] == "layers" else name


def gradient_errors(got: dict, want: dict) -> dict[str, float]:
    errs = {}
    for name, ref in want.items():
        g = np.asarray(got[name], dtype=np.float64)
        ref = np.asarray(ref, dtype=np.float64)
        denom = np.linalg.norm(ref)
        diff = np.linalg.norm(g - ref)
        errs[name] = float(diff / denom) if denom > 0 else (0.0 if diff == 0 else float("inf"))
        if not np.isfinite(g).all():
            errs[name] = float("inf")
    return errs


def _diagnose(name: str, got, want, rtol: float) -> str:
    """A hint for a gradient that differs: a constant factor, or q/k rows in llama.cpp's permuted order."""
    g, w = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    ww = float((w * w).sum())
    if ww == 0:
        return ""
    c = float((g * w).sum()) / ww
    if np.linalg.norm(g - c * w) <= rtol * np.sqrt(ww) and abs(c - 1) > rtol:
        return f"; ≈ {c:.6g} × the reference"
    if name.endswith((".q.lora_B", ".k.lora_B")):
        for rows in range(1, g.shape[0] + 1):  # any head count whose rows split evenly in halves
            if g.shape[0] % (2 * rows) or rows > 64:
                continue
            for f in (tm.permute_qk, tm.unpermute_qk):
                if np.linalg.norm(f(g, rows) - w) <= rtol * np.sqrt(ww):
                    return f"; equal after {f.__name__} with {rows} heads (GGUF q/k row order)"
    return ""


def assert_gradients_close(got: dict, want: dict, what: str, rtol: float | dict = GRAD_RTOL) -> None:
    """‖g − g_ref‖ / ‖g_ref‖ <= rtol (one number, or per tensor name) for every LoRA tensor."""
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    assert not missing and not extra, f"{what}: gradient names differ: missing {missing}, unexpected {extra}"
    for name in want:
        assert np.shape(got[name]) == np.shape(want[name]), (
            f"{what}: {name} gradient shape {np.shape(got[name])}, expected {np.shape(want[name])}")
    errs = gradient_errors(got, want)
    tol = rtol if isinstance(rtol, dict) else dict.fromkeys(want, rtol)
    bad = {k: e for k, e in errs.items() if not e <= tol[k]}
    if not bad:
        return
    by_kind: dict[str, list[float]] = {}
    for k, e in errs.items():
        by_kind.setdefault(_kind(k), []).append(e)
    summary = ", ".join(f"{kind} max {max(v):.2e}" for kind, v in sorted(by_kind.items()))
    worst = sorted(bad, key=bad.get, reverse=True)[:8]
    detail = "; ".join(f"{k}: {bad[k]:.2e} (‖g‖ {np.linalg.norm(got[k]):.4g}, "
                       f"‖g_ref‖ {np.linalg.norm(want[k]):.4g}, allowed {tol[k]:.2e}"
                       f"{_diagnose(k, got[k], want[k], tol[k])})" for k in worst)  # fmt: skip
    raise AssertionError(f"{what}: {len(bad)} of {len(errs)} LoRA gradients differ from peft by more than "
                         f"allowed (relative, per tensor). Worst: {detail}. Per kind: {summary}")  # fmt: skip


def assert_logprobs_close(got, want, data, what: str, atol: float = LP_ATOL) -> None:
    """|lp − lp_ref| <= atol at every target."""
    assert len(got) == len(want), f"{what}: {len(got)} logprob arrays for {len(want)} datums"
    for i, (g, w, (_, inputs)) in enumerate(zip(got, want, data)):
        g = np.asarray(g)
        shape = np.shape(inputs["target_tokens"])
        assert g.shape == shape, f"{what}: datum {i} logprobs shape {g.shape}, target_tokens shape {shape}"
        err = np.abs(g.astype(np.float64) - np.asarray(w, dtype=np.float64))
        bad = ~(err <= atol)
        if bad.any():
            j = np.unravel_index(np.argmax(np.where(np.isnan(err), np.inf, err)), err.shape)
            raise AssertionError(f"{what}: datum {i} (length {shape[0]}): {int(bad.sum())} of {bad.size} logprobs "
                                 f"differ from peft by more than {atol:.3g}; worst at {tuple(map(int, j))}: got "
                                 f"{g[j]:.7g}, expected {w[j]:.7g} (|diff| {err[j]:.3g})")


def assert_loss_close(loss, engine_logprobs, reference_logprobs, data, loss_fn, config, what: str,
                      lp_error: float = LOSS_LP_ATOL) -> None:  # fmt: skip
    """loss:sum vs the formula on the reference logprobs, within LOSS_RTOL · |loss| + Σ |∂loss/∂lp| · lp_error
    (the logprob error to expect), and vs the formula on the engine's own logprobs (float32 summation)."""
    loss = float(loss)
    ref_value = rt.reference_loss_value(reference_logprobs, data, loss_fn, config)
    _, dl = rt.loss_lp_gradients(reference_logprobs, data, loss_fn, config)
    mass = lp_error * float(sum(np.abs(g).sum() for g in dl))
    bound = LOSS_RTOL * abs(ref_value) + mass + 1e-7
    assert abs(loss - ref_value) <= bound, (
        f"{what}: loss:sum {loss:.9g}, the {loss_fn} formula on peft's logprobs gives {ref_value:.9g} "
        f"(|diff| {abs(loss - ref_value):.3g} > {bound:.3g})")
    own_value = rt.reference_loss_value(engine_logprobs, data, loss_fn, config)
    terms, _ = rt.loss_lp_gradients(engine_logprobs, data, loss_fn, config)
    own_bound = SELF_RTOL * (abs(own_value) + float(sum(np.abs(t).sum() for t in terms))) + 1e-7
    assert abs(loss - own_value) <= own_bound, (
        f"{what}: loss:sum {loss:.9g}, the {loss_fn} formula on the engine's own logprobs gives {own_value:.9g} "
        f"(|diff| {abs(loss - own_value):.3g} > {own_bound:.3g})")


# ---- models and set-ups ----------------------------------------------------------------------------

TINY = {
    "llama": ("llama", dict(seed=31)),
    "llama_tied": ("llama", dict(seed=32, tied=True)),
    "qwen2": ("qwen2", dict(seed=33)),
    "qwen3": ("qwen3", dict(seed=34)),
    "llama_gguf_q8": ("llama", dict(seed=31, gguf="Q8_0")),  # q/k rows permuted in the file
}
TINY_LENGTHS = [(1, 57, 200, 23), (300, 5, 96), (130, 1, 2, 64, 33)]
TINY_GAIN = 0.3
SMOL_GAIN = 0.1  # at 0.3 the float32 reference's own gradient error on SmolLM2 reaches ~2e-4


@dataclass
class Model:
    name: str
    path: Path
    reference: object  # float32 transformers model with the engine's weights

    @cached_property
    def engine(self):
        return load_model(str(self.path))


@dataclass
class Setup:
    """One adapter configuration on one model: the values, the peft model holding them, and data."""

    model: Model
    rank: int
    flags: tuple[bool, bool, bool]
    gain: float
    seed: int
    shapes: dict = field(init=False)
    values: dict = field(init=False)

    def __post_init__(self):
        self.shapes = rt.expected_tensor_shapes(self.model.reference.config, self.rank, *self.flags)
        self.values = rt.random_adapter_values(self.shapes, self.seed, gain=self.gain)

    @cached_property
    def peft(self):
        pm = rt.peft_model(self.model.reference, self.rank, *self.flags)
        rt.load_adapter_values(pm, self.values)
        return pm

    def adapter(self, seed: int = 0):
        train_attn, train_mlp, train_unembed = self.flags
        adapter = _training.LoraAdapter(self.model.engine, rank=self.rank, seed=seed, train_mlp=train_mlp,
                                        train_attn=train_attn, train_unembed=train_unembed)  # fmt: skip
        params = adapter.parameters()
        assert {k: tuple(np.shape(v)) for k, v in params.items()} == self.shapes, (
            f"{self.model.name}: adapter tensors {sorted(params)[:4]}... do not match peft's names/shapes")
        adapter.set_parameters({k: v.copy() for k, v in self.values.items()})
        return adapter

    def learner_logprobs(self, data) -> list[np.ndarray]:
        with torch.no_grad():
            lps, _ = rt.reference_forward_backward(self.peft, data, "cross_entropy", backward=False)
        return lps

    def make_data(self, lengths, k: int | None = None, seed: int = 0, prefix_tokens=None):
        rng = np.random.default_rng(_seed(self.model.name, self.rank, self.flags, tuple(lengths), k, seed))
        vocab = self.model.reference.config.vocab_size
        data = []
        for i, n in enumerate(lengths):
            if prefix_tokens is not None and i == 0:
                tokens = list(map(int, prefix_tokens))
            else:
                tokens = rng.integers(0, vocab, size=n).tolist()
            inputs = random_datum_inputs(rng, tokens, vocab, k)
            if prefix_tokens is not None and i == 0 and k is None:
                inputs["target_tokens"][:-1] = tokens[1:]  # real text: the next tokens
            data.append((tokens, inputs))
        attach_sampler_logprobs(rng, data, self.learner_logprobs(data))
        return data

    @cached_property
    def peft64(self):
        return rt.to_float64(self.peft)

    def reference(self, data, loss_fn, config, float64: bool = False):
        model = self.peft64 if float64 else self.peft
        rt.zero_gradients(model)
        lps, loss = rt.reference_forward_backward(model, data, loss_fn, config)
        return lps, loss, rt.peft_gradients(model)


def _make_tiny(root: Path, name: str) -> Model:
    arch, kwargs = TINY[name]
    kwargs = dict(kwargs)
    gguf_type = kwargs.pop("gguf", None)
    seed, tied = kwargs.pop("seed"), kwargs.pop("tied", False)
    model = tm.make_hf_model(arch, seed=seed, tied=tied, **kwargs)
    if tied:  # an N(0, 1) embedding as the output projection gives logits of std ~8: use a tamer one
        tm.randomize_(model, seed, embed_std=0.3)
    if gguf_type:
        path, reference = tm.write_gguf(root / f"{name}.gguf", model, arch, gguf_type)
        return Model(name, path, reference.eval())
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.save_pretrained(root / name, safe_serialization=True)
    return Model(name, root / name, model.eval())


class Tiny:
    def __init__(self, root: Path):
        self.root = root
        self.models: dict[str, Model] = {}
        self.setups: dict[tuple, Setup] = {}
        self.data: dict[tuple, list] = {}

    def model(self, name: str) -> Model:
        if name not in self.models:
            self.models[name] = _make_tiny(self.root, name)
        return self.models[name]

    def setup(self, name: str, rank: int, flags: str) -> Setup:
        key = (name, rank, flags)
        if key not in self.setups:
            self.setups[key] = Setup(self.model(name), rank, FLAGS[flags], TINY_GAIN, _seed(*key))
        return self.setups[key]

    def batch(self, name: str, rank: int, flags: str):
        key = (name, rank, flags)
        if key not in self.data:
            lengths = TINY_LENGTHS[_seed(*key) % len(TINY_LENGTHS)]
            self.data[key] = self.setup(name, rank, flags).make_data(lengths)
        return self.data[key]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    return Tiny(tmp_path_factory.mktemp("training_models"))


def check_against_peft(setup: Setup, data, loss_id: str, what: str, float64: bool = False) -> None:
    """forward_backward's logprobs, loss:sum and gradients vs peft's. With float64, the reference is
    peft in float64 (the exact values), and the bounds grow to F32_NOISE_FACTOR times float32 peft's
    own largest error on the batch where that is larger (see the module docstring)."""
    loss_fn, config = LOSSES[loss_id]
    adapter = setup.adapter()
    result = adapter.forward_backward(data, loss_fn=loss_fn, loss_fn_config=config)
    ref_lps, _, ref_grads = setup.reference(data, loss_fn, config)
    rtol, lp_atol, lp_error = GRAD_RTOL, LP_ATOL, LOSS_LP_ATOL
    if float64:  # the exact values; float32 peft's own error sizes the bounds where it is larger
        lps32, grads32 = ref_lps, ref_grads
        ref_lps, _, ref_grads = setup.reference(data, loss_fn, config, float64=True)
        grad_noise = max(gradient_errors(grads32, ref_grads).values())
        lp_noise = max(float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(lps32, ref_lps))
        rtol = max(GRAD_RTOL, F32_NOISE_FACTOR * grad_noise)
        lp_atol = lp_error = max(LP_ATOL, F32_NOISE_FACTOR * lp_noise)
        what += (f" (vs peft in float64; float32 peft's own error: gradients {grad_noise:.2e}, "
                 f"logprobs {lp_noise:.2e})")
    assert "loss:sum" in result.metrics, f"{what}: metrics {sorted(result.metrics)} have no loss:sum"
    assert_logprobs_close(result.logprobs, ref_lps, data, what, lp_atol)
    assert_loss_close(result.metrics["loss:sum"], result.logprobs, ref_lps, data, loss_fn, config, what, lp_error)
    assert_gradients_close(adapter.gradients(), ref_grads, what, rtol)


# ---- tiny models: the broad sweep ----------------------------------------------------------------------

SWEEP = [(1, "all"), (8, "all"), (32, "all"), (8, "attn"), (8, "mlp"), (1, "unembed"), (32, "attn_mlp"),
         (8, "mlp_unembed")]  # fmt: skip


@pytest.mark.parametrize("loss_id", list(LOSSES))
@pytest.mark.parametrize("rank,flags", SWEEP, ids=[f"r{r}-{f}" for r, f in SWEEP])
@pytest.mark.parametrize("model_name", list(TINY))
def test_tiny_gradients_equal_peft(tiny, model_name, rank, flags, loss_id):
    setup = tiny.setup(model_name, rank, flags)
    data = tiny.batch(model_name, rank, flags)
    check_against_peft(setup, data, loss_id, f"{model_name}, rank {rank}, {flags}, {loss_id}")


def test_rl_data_covers_both_sides_of_every_clip_threshold(tiny):
    """The sweep's sampler logprobs put ratios inside and outside each clip range, away from the edges."""
    for key in [("llama", 8, "all"), ("qwen3", 32, "all")]:
        setup = tiny.setup(*key)
        data = tiny.batch(*key)
        lp = np.concatenate([np.ravel(x) for x in setup.learner_logprobs(data)])
        s = np.concatenate([np.ravel(inputs["logprobs"]) for _, inputs in data])
        log_r = lp.astype(np.float64) - s
        for t in CLIP_THRESHOLDS:
            below, above = (log_r < np.log(t)).mean(), (log_r > np.log(t)).mean()
            assert below > 0.02 and above > 0.002, f"{key}: ratios below/above {t}: {below:.3f} / {above:.3f}"
            assert np.abs(log_r - np.log(t)).min() > 0.5 * CLIP_MARGIN, f"{key}: a ratio sits on threshold {t}"
        inside = ((log_r > np.log(0.8)) & (log_r < np.log(1.2))).mean()
        assert 0.2 < inside < 0.8, f"{key}: {inside:.2f} of the ratios inside [0.8, 1.2]"


@pytest.mark.parametrize("loss_id", ["cross_entropy", "importance_sampling"])
@pytest.mark.parametrize("model_name", ["llama", "qwen3", "llama_tied"])
def test_multi_target_losses_equal_peft(tiny, model_name, loss_id):
    """[N, K] target_tokens (and weights / advantages / logprobs of that shape): K logprobs per position."""
    setup = tiny.setup(model_name, 8, "all")
    data = setup.make_data((40, 1, 150), k=3)
    check_against_peft(setup, data, loss_id, f"{model_name}, [N, 3] targets, {loss_id}")


@pytest.mark.parametrize("loss_fn", ["ppo", "cispo"])
def test_per_token_clip_thresholds_equal_peft(tiny, loss_fn):
    """clip_low_threshold / clip_high_threshold given per token in loss_fn_inputs override the config."""
    setup = tiny.setup("qwen2", 8, "all")
    data = setup.make_data((90, 1, 33), seed=1)
    rng = np.random.default_rng(_seed("per-token", loss_fn))
    learner = setup.learner_logprobs(data)
    for (_, inputs), lp in zip(data, learner):
        log_r = lp.astype(np.float64) - inputs["logprobs"]
        lo = rng.uniform(0.6, 0.95, lp.shape)
        hi = rng.uniform(1.05, 1.6, lp.shape)
        for bound in (lo, hi):  # keep every ratio CLIP_MARGIN away from its own thresholds
            near = np.abs(log_r - np.log(bound)) < CLIP_MARGIN
            bound[near] *= np.exp(np.where(log_r[near] >= np.log(bound[near]), -2.5, 2.5) * CLIP_MARGIN)
        inputs["clip_low_threshold"] = lo.astype(np.float32)
        inputs["clip_high_threshold"] = hi.astype(np.float32)
    config = {"clip_low_threshold": 0.1, "clip_high_threshold": 10.0}  # overridden everywhere
    adapter = setup.adapter()
    result = adapter.forward_backward(data, loss_fn=loss_fn, loss_fn_config=config)
    ref_lps, _, ref_grads = setup.reference(data, loss_fn, config)
    what = f"qwen2, per-token clip thresholds, {loss_fn}"
    assert_logprobs_close(result.logprobs, ref_lps, data, what)
    assert_loss_close(result.metrics["loss:sum"], result.logprobs, ref_lps, data, loss_fn, config, what)
    assert_gradients_close(adapter.gradients(), ref_grads, what)


def test_gradients_accumulate_over_forward_backward_calls(tiny):
    """Two forward_backward calls (different data and losses) leave the sum of both gradients."""
    setup = tiny.setup("qwen3", 8, "all")
    first = setup.make_data((70, 1, 12), seed=2)
    second = setup.make_data((3, 120), seed=3)
    adapter = setup.adapter()
    adapter.forward_backward(first, loss_fn="cross_entropy")
    adapter.forward_backward(second, loss_fn="ppo", loss_fn_config=None)
    rt.zero_gradients(setup.peft)
    rt.reference_forward_backward(setup.peft, first, "cross_entropy")
    rt.reference_forward_backward(setup.peft, second, "ppo")  # accumulates into .grad
    assert_gradients_close(adapter.gradients(), rt.peft_gradients(setup.peft),
                           "qwen3, cross_entropy then ppo, accumulated")  # fmt: skip


def test_forward_leaves_gradients_untouched(tiny):
    """forward() returns the same logprobs and loss as forward_backward and never touches gradients."""
    setup = tiny.setup("llama", 8, "all")
    data = setup.make_data((64, 1, 130), seed=4)
    other = setup.make_data((17, 200), seed=5)
    fresh = setup.adapter()
    fresh.forward(data, loss_fn="dro", loss_fn_config={"beta": 0.5})
    assert all(not np.any(g) for g in fresh.gradients().values()), "forward() on a fresh adapter left gradients"

    adapter = setup.adapter()
    fb = adapter.forward_backward(data, loss_fn="dro", loss_fn_config={"beta": 0.5})
    grads = adapter.gradients()
    fwd_other = adapter.forward(other, loss_fn="ppo")
    fwd = adapter.forward(data, loss_fn="dro", loss_fn_config={"beta": 0.5})
    after = adapter.gradients()
    for name in grads:
        assert np.array_equal(after[name], grads[name]), f"forward() changed the gradient of {name}"
    for i, (a, b) in enumerate(zip(fwd.logprobs, fb.logprobs)):
        assert np.shape(a) == np.shape(b)
        assert np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))) <= 1e-5, (
            f"datum {i}: forward() and forward_backward() logprobs differ")
    terms, _ = rt.loss_lp_gradients(fb.logprobs, data, "dro", {"beta": 0.5})
    bound = SELF_RTOL * (abs(fb.metrics["loss:sum"]) + sum(np.abs(t).sum() for t in terms))
    assert abs(fwd.metrics["loss:sum"] - fb.metrics["loss:sum"]) <= bound, (
        f"forward() loss:sum {fwd.metrics['loss:sum']} != forward_backward()'s {fb.metrics['loss:sum']}")
    ref_lps, _ = rt.reference_forward_backward(setup.peft, other, "ppo", None, backward=False)
    assert_logprobs_close(fwd_other.logprobs, ref_lps, other, "llama, forward() logprobs")
    assert_loss_close(fwd_other.metrics["loss:sum"], fwd_other.logprobs, ref_lps, other, "ppo", None,
                      "llama, forward() ppo loss")  # fmt: skip


@pytest.mark.parametrize("model_name", ["llama_tied", "qwen2"])
def test_fresh_adapter(tiny, model_name):
    """A fresh adapter: peft's names and shapes, B = 0 (the model is unchanged), A seeded and non-zero,
    no gradients; its first forward_backward gives zero lora_A gradients and peft's lora_B gradients."""
    setup = tiny.setup(model_name, 8, "all")
    model = setup.model
    adapter = _training.LoraAdapter(model.engine, rank=8, seed=7)
    assert adapter.rank == 8 and adapter.alpha == 32 and adapter.scale == pytest.approx(4.0)
    params = adapter.parameters()
    assert {k: tuple(np.shape(v)) for k, v in params.items()} == setup.shapes
    assert {k: tuple(np.shape(v)) for k, v in adapter.gradients().items()} == setup.shapes
    assert all(not np.any(g) for g in adapter.gradients().values()), "a fresh adapter has non-zero gradients"
    for name, value in params.items():
        assert np.asarray(value).dtype == np.float32, f"{name}: dtype {np.asarray(value).dtype}"
        if name.endswith("lora_B"):
            assert not np.any(value), f"{name} of a fresh adapter is not zero"
        else:
            assert np.isfinite(value).all() and np.count_nonzero(value) > 0.9 * value.size, f"{name} is not random"
    same = _training.LoraAdapter(model.engine, rank=8, seed=7).parameters()
    other = _training.LoraAdapter(model.engine, rank=8, seed=8).parameters()
    for name in params:
        assert np.array_equal(same[name], params[name]), f"{name}: the same seed gave different values"
        if name.endswith("lora_A"):
            assert not np.array_equal(other[name], params[name]), f"{name}: seeds 7 and 8 gave the same values"

    data = setup.make_data((33, 1, 80), seed=6)
    with torch.no_grad():
        base_lps = [rt.datum_logprobs(model.reference, t, i["target_tokens"]).numpy() for t, i in data]
    result = adapter.forward_backward(data, loss_fn="importance_sampling")
    assert_logprobs_close(result.logprobs, base_lps, data, f"{model_name}, fresh adapter vs the base model")
    pm = rt.peft_model(model.reference, 8)
    rt.load_adapter_values(pm, params)
    rt.reference_forward_backward(pm, data, "importance_sampling")
    ref = rt.peft_gradients(pm)
    got = adapter.gradients()
    for name in ref:
        if name.endswith("lora_A"):
            assert not np.any(ref[name]) and not np.any(got[name]), f"{name}: non-zero gradient with B = 0"
    only_b = [k for k in ref if k.endswith("lora_B")]
    assert_gradients_close({k: got[k] for k in only_b}, {k: ref[k] for k in only_b}, f"{model_name}, fresh adapter")


# ---- the default model: SmolLM2-135M --------------------------------------------------------------------

# (rank, flags, loss ids): one adapter per set-up; the broad sweep is on the tiny models
SMOL_CASES = [(8, "all", list(LOSSES)), (1, "attn", ["cross_entropy", "ppo"]),
              (32, "mlp_unembed", ["cispo", "dro"])]  # fmt: skip
SMOL_PARAMS = [(r, f, loss) for r, f, losses in SMOL_CASES for loss in losses]


class Smol:
    """The SmolLM2 reference and one set-up at a time (each peft copy is 0.5 GB)."""

    def __init__(self, engine, reference):
        self.model = Model("smollm2", Path(), reference)
        self.model.__dict__["engine"] = engine
        self.current: tuple | None = None
        self.setup_: Setup | None = None
        self.batch_ = None

    def setup(self, rank: int, flags: str) -> Setup:
        if self.current != (rank, flags):
            self.setup_ = self.batch_ = None
            self.setup_ = Setup(self.model, rank, FLAGS[flags], SMOL_GAIN, _seed("smollm2", rank, flags))
            self.current = (rank, flags)
        return self.setup_

    def chat_tokens(self) -> list[int]:
        tok = self.model.engine.tokenizer
        return list(tok.encode("The capital of France is Paris. The capital of Italy is Rome, and the "
                               "capital of Spain is"))  # fmt: skip

    def batch(self, rank: int, flags: str):
        setup = self.setup(rank, flags)
        if self.batch_ is None:
            chat = self.chat_tokens()
            self.batch_ = setup.make_data((len(chat), 1, 17, 60), prefix_tokens=chat)
        return self.batch_


@pytest.fixture(scope="module")
def smol(smollm2, smollm2_gguf_path) -> Smol:
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf_path.parent), gguf_file=smollm2_gguf_path.name, dtype=torch.float32)
    assert reference.config.tie_word_embeddings
    assert reference.lm_head.weight.data_ptr() == reference.model.embed_tokens.weight.data_ptr()
    return Smol(smollm2, reference.eval())


@pytest.mark.parametrize("rank,flags,loss_id", SMOL_PARAMS, ids=[f"r{r}-{f}-{loss}" for r, f, loss in SMOL_PARAMS])
def test_smollm2_gradients_equal_peft(smol, rank, flags, loss_id):
    setup = smol.setup(rank, flags)
    data = smol.batch(rank, flags)
    check_against_peft(setup, data, loss_id, f"SmolLM2, rank {rank}, {flags}, {loss_id}", float64=True)


def test_smollm2_multi_target_cross_entropy(smol):
    setup = smol.setup(8, "all")
    data = setup.make_data((25, 1, 9), k=3, seed=1)
    check_against_peft(setup, data, "cross_entropy", "SmolLM2, [N, 3] targets, cross_entropy", float64=True)
