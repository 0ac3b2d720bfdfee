"""Forward logits of tiny random-weight models equal transformers' float32 logits.

Every supported architecture and file format is covered: Hugging Face safetensors checkpoints
(llama untied / tied / llama3 rope scaling / linear rope scaling, qwen2 with q/k/v biases, qwen3
with q/k norms and an explicit head_dim, a sharded checkpoint, bf16 and f16 storage) and GGUF files
written like llama.cpp's converter (llama with permuted q/k rows, qwen2, qwen3) in F32, F16, BF16,
Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, a K-quant mix (Q4_K / Q5_K / Q6_K), the SmolLM2 type mix, and
llama3 rope scaling through the `rope_freqs` tensor.

Tolerance (DESIGN.md §5, §9): |engine - transformers| <= 1e-3 * max(1, |logit|) elementwise, at
every position of sequences of lengths 1 to 512. The reference of a quantised GGUF is the model
holding the dequantised weights, so the comparison is exact up to float32 summation order.
A packed batch of mixed-length sequences must equal each sequence run alone to 1e-5 relative to
the position's logit scale, |diff| <= 1e-5 * max(1, max_v |logit[pos, v]|): the engine's GEMMs
sum in a different order for a short sequence alone than inside a long packed batch (a few float32
ulps of the row's largest logit, ~5e-7 relative, not bit-identical), and one elementwise bound
relative to |logit| would flag ulp noise on logits that cancel to near zero.
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
pytest.importorskip("gguf")

import tiny_models as tm  # noqa: E402  (tests/ is on sys.path under pytest's rootdir conftest)

from tinker._engine import load_model  # noqa: E402

LENGTHS = (1, 2, 17, 64, 255, 512)
REF_TOL = 1e-3  # vs transformers float32, relative to max(1, |logit|)
PACK_TOL = 1e-5  # packed batch vs one sequence alone, relative to max(1, max |logit|) of the position

# ---- the cases ---------------------------------------------------------------------------------

# name -> (arch, make_hf_checkpoint keyword arguments)
HF_CASES = {
    "llama": ("llama", dict(seed=1)),
    "llama_tied": ("llama", dict(seed=2, tied=True)),
    "llama_rope_llama3": ("llama", dict(seed=3, rope_scaling=tm.LLAMA3_ROPE, rope_theta=500000.0)),
    "llama_rope_linear": ("llama", dict(seed=4, rope_scaling=tm.LINEAR_ROPE)),
    "qwen2": ("qwen2", dict(seed=5)),
    "qwen3": ("qwen3", dict(seed=6)),
    "qwen3_sharded": ("qwen3", dict(seed=7, layers=3, max_shard_size="100KB")),
    "llama_bf16": ("llama", dict(seed=8, dtype=torch.bfloat16)),
    "qwen2_f16": ("qwen2", dict(seed=9, dtype=torch.float16)),
}

# models that only exist as GGUF: rows of 256 elements everywhere, for the K-quants
WIDE_MODELS = {
    "llama_wide": ("llama", dict(seed=11, hidden=256, heads=4, kv_heads=2, intermediate=512, vocab=320)),
    "qwen2_wide": ("qwen2", dict(seed=12, hidden=256, heads=4, kv_heads=2, intermediate=512, vocab=320)),
    "qwen3_wide": ("qwen3", dict(seed=13, hidden=256, heads=4, kv_heads=2, head_dim=128, intermediate=512,
                                 vocab=320)),
}  # fmt: skip

BLOCK_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
# name -> (base model: an HF_CASES or WIDE_MODELS key, tensor type or mix)
GGUF_CASES = {
    **{f"gguf_{arch}_{t}": (arch, t) for arch in ("llama", "qwen2", "qwen3") for t in BLOCK_TYPES},
    **{f"gguf_{arch}_kquants": (f"{arch}_wide", tm.kquant_mix) for arch in ("llama", "qwen2", "qwen3")},
    "gguf_llama_tied_smollm2_mix": ("llama_tied", tm.smollm2_mix),
    "gguf_llama_rope_llama3_Q8_0": ("llama_rope_llama3", "Q8_0"),
    "gguf_llama_rope_linear_Q8_0": ("llama_rope_linear", "Q8_0"),
}
ALL_CASES = [*HF_CASES, *GGUF_CASES]


@dataclass
class Case:
    name: str
    path: Path
    reference: object  # the float32 transformers model
    expected_config: dict
    sequences: list = field(default_factory=list)

    @cached_property
    def engine(self):
        return load_model(str(self.path))

    @cached_property
    def reference_logits(self) -> list[np.ndarray]:
        return [tm.reference_logits(self.reference, s) for s in self.sequences]


def _sequences(name: str, vocab: int) -> list[np.ndarray]:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    seqs = [rng.integers(0, vocab, size=n, dtype=np.int64) for n in LENGTHS]
    seqs[-1][:2] = (0, vocab - 1)  # the extreme ids
    return seqs


class Builder:
    """Builds each case's files once per module, on first use."""

    def __init__(self, root: Path):
        self.root = root
        self.cases: dict[str, Case] = {}
        self.bases: dict[str, object] = {}

    def base_model(self, name: str):
        if name in HF_CASES:
            return self.case(name).reference
        if name not in self.bases:
            arch, kwargs = WIDE_MODELS[name]
            self.bases[name] = tm.make_hf_model(arch, **kwargs)
        return self.bases[name]

    def case(self, name: str) -> Case:
        if name in self.cases:
            return self.cases[name]
        if name in HF_CASES:
            arch, kwargs = HF_CASES[name]
            path, reference = tm.make_hf_checkpoint(self.root / name, arch, **kwargs)
            expected = tm.expected_engine_config(reference.config)
        else:
            base, tensor_type = GGUF_CASES[name]
            model = self.base_model(base)
            path, reference = tm.write_gguf(self.root / f"{name}.gguf", model, model.config.model_type, tensor_type)
            expected = tm.expected_engine_config(reference.config)
            if reference.config.rope_parameters.get("rope_type") == "llama3":
                # GGUF carries llama3 scaling as the rope_freqs tensor, not as config keys
                for key in ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_context"):
                    expected.pop(key)
                expected["rope_scaling"] = 0
        case = Case(name, path, reference, expected, _sequences(name, reference.config.vocab_size))
        self.cases[name] = case
        return case


@pytest.fixture(scope="module")
def builder(tmp_path_factory) -> Builder:
    return Builder(tmp_path_factory.mktemp("tiny_models"))


# ---- comparison ---------------------------------------------------------------------------------


def assert_logits_close(got: np.ndarray, want: np.ndarray, tol: float, what: str, against: str,
                        per_row: bool = False) -> None:  # fmt: skip
    """|got - want| <= tol * max(1, |want|) elementwise, or with per_row, tol * max(1, max |want[pos]|)."""
    assert got.shape == want.shape, f"{what}: logits shape {got.shape}, expected {want.shape}"
    err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    scale = np.abs(want.astype(np.float64))
    if per_row:
        scale = np.broadcast_to(scale.max(axis=-1, keepdims=True), scale.shape)
    bound = tol * np.maximum(1.0, scale)
    bad = ~(err <= bound)  # NaN counts as bad
    if not bad.any():
        return
    ratio = np.where(np.isnan(err), np.inf, err / bound)
    pos, tok = np.unravel_index(np.argmax(ratio), ratio.shape)
    bad_positions = np.flatnonzero(bad.any(axis=1))
    raise AssertionError(
        f"{what}: {int(bad.sum())} of {bad.size} logits differ from {against} beyond "
        f"{tol:g}*max(1,{'max |logit| of the position' if per_row else '|logit|'}) "
        f"at {bad_positions.size} of {got.shape[0]} positions (first: {bad_positions[:8].tolist()}); "
        f"worst at position {pos}, token {tok}: got {got[pos, tok]:.6g}, expected {want[pos, tok]:.6g} "
        f"(|diff| {err[pos, tok]:.3g}, bound {bound[pos, tok]:.3g}); max |diff| {np.nanmax(err):.3g}, "
        f"max |logit| {np.abs(want).max():.3g}"
    )


# ---- tests ---------------------------------------------------------------------------------------


def test_sharded_checkpoint_has_shards(builder):
    case = builder.case("qwen3_sharded")
    assert (case.path / "model.safetensors.index.json").is_file()
    assert len(tm.shard_files(case.path)) >= 3, f"only {len(tm.shard_files(case.path))} shard(s) were written"


@pytest.mark.parametrize("case_name", ALL_CASES)
def test_config_matches_checkpoint(builder, case_name):
    case = builder.case(case_name)
    config = case.engine.config
    for key, want in case.expected_config.items():
        assert key in config, f"{case_name}: the loaded config has no {key!r} (config: {config})"
        got = config[key]
        if isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-6), f"{case_name}: config[{key!r}] = {got}, expected {want}"
        else:
            assert got == want, f"{case_name}: config[{key!r}] = {got!r}, expected {want!r}"


@pytest.mark.parametrize("case_name", ALL_CASES)
def test_logits_match_transformers(builder, case_name):
    case = builder.case(case_name)
    got = case.engine.forward_logits(case.sequences)  # one packed batch of all lengths
    assert len(got) == len(case.sequences)
    for seq, logits, want in zip(case.sequences, got, case.reference_logits):
        assert np.isfinite(want).all()
        assert_logits_close(logits, want, REF_TOL, f"{case_name}, sequence of length {len(seq)}", "transformers")


@pytest.mark.parametrize("case_name", ALL_CASES)
def test_packed_batch_equals_single_sequences(builder, case_name):
    case = builder.case(case_name)
    order = [3, 0, 5, 1, 4, 2]  # mixed lengths, not sorted
    seqs = [case.sequences[i] for i in order]
    packed = case.engine.forward_logits(seqs)
    singles = [case.engine.forward_logits([s])[0] for s in seqs]  # also: earlier results stay valid
    for seq, p, s in zip(seqs, packed, singles):
        assert_logits_close(p, s, PACK_TOL, f"{case_name}, length {len(seq)} in a packed batch of {len(seqs)}",
                            "the same sequence run alone", per_row=True)  # fmt: skip


def test_kquant_quantiser_is_plausible():
    """The helper's own K-quantiser approximates its input (else the K-quant cases test little)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 512)) * 0.1).astype(np.float32)
    for qtype, rel in (("Q4_K", 0.08), ("Q5_K", 0.04), ("Q6_K", 0.03)):
        err = np.abs(tm.dequantize(tm.quantize(x, qtype), qtype) - x).std() / x.std()
        assert err < rel, f"{qtype}: relative rms quantisation error {err:.3f} >= {rel}"
