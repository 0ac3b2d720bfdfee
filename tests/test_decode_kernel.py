"""The quantized decoding kernel (csrc/backend/cpu/qmatmul.c) and the quantized weight copies it reads.

What is checked, and how:
1. y = alpha x W^T + beta y through `matmul_q` (W given as rows of Q4_0 / Q4_1 / Q8_0 blocks,
   repacked as at load) equals the float64 product with the dequantised W (`_C.dequantize`, itself
   bit-identical to gguf-py, test_io_quant.py) within 1e-5 relative, for T = 1..16 token rows, odd N
   (a partial last group of 16 rows), several K and alpha/beta, in both the SIMD path and its plain-C
   reference. "Relative" is to sum |alpha x_k w_k| + |beta y|, the scale of float32 summation error,
   so outputs that cancel to near zero are not held to an impossible bound.
2. The weights are decoded exactly: with x = the identity, y = W^T bit for bit (values compared with
   ==), including scales that are 0, -0, subnormal or the largest fp16.
3. A row's result does not depend on how many rows share the call or on the thread count (bit for
   bit): each output is summed in one fixed order, so a sequence's logits do not depend on its batch.
4. With beta = 0, y is not read (NaN in, finite out). Bad arguments raise ValueError.
5. Every model keeps its matrices in their file's types, once: the default SmolLM2 GGUF holds exactly its
   2-D tensors' bytes; tiny GGUFs of every type mix hold the layout's size (a stacked q|k|v whose sources
   differ in type keeps one part per type), and nothing else but the float32 norms and biases; safetensors
   checkpoints hold their float32 matrices and no quantized bytes. Greedy decoding through them is tested
   against transformers in test_sampling.py (tiny GGUFs) and on SmolLM2 itself.

The kernel is reached through tests/ops/qmatmul_hook.c, a test-only shared library this file compiles with
the engine's C sources (tests/native_build.py) and calls through ctypes: it is not in the shipped module.
Each op's agreement with its float64 definition on more shapes is also in test_ops_backend.py.
"""

from __future__ import annotations

import ctypes

import native_build
import numpy as np
import pytest

from tinker import _C

TYPES = {"Q4_0": (2, 18, [0]), "Q4_1": (3, 20, [0, 2]), "Q8_0": (8, 34, [0])}  # id, block bytes, fp16 offsets
TILE_BYTES = {"Q4_0": 288, "Q4_1": 320, "Q8_0": 544}  # 16 rows x 32 elements (backend/qmatrix.h)
REL_TOL = 1e-5


def random_blocks(rng, name: str, n_rows: int, K: int, extreme_scales: bool = False) -> bytes:
    """n_rows rows of K elements of `name` blocks: random quants, fp16 scales N(0, 0.05) (so negative mins
    too), or with extreme_scales also zeros, -0, subnormals and +-65504."""
    type_id, nbytes, scale_offsets = TYPES[name]
    n = n_rows * K // 32
    blocks = rng.integers(0, 256, (n, nbytes), dtype=np.uint8)
    for off in scale_offsets:
        s = (rng.standard_normal(n) * 0.05).astype(np.float16)
        if extreme_scales:
            kind = rng.integers(0, 6, n)
            subnormal = (rng.integers(1, 0x400, n) | rng.integers(0, 2, n) << 15).astype(np.uint16).view(np.float16)
            largest = np.where(rng.random(n) < 0.5, -65504.0, 65504.0).astype(np.float16)
            s[kind == 0] = 0.0
            s[kind == 1] = -0.0
            s[kind == 2] = subnormal[kind == 2]
            s[kind == 3] = largest[kind == 3]
        blocks[:, off : off + 2] = s.view(np.uint8).reshape(n, 2)
    return blocks.tobytes()


def dequantized(name: str, w: bytes, N: int, K: int) -> np.ndarray:
    return np.frombuffer(_C.dequantize(TYPES[name][0], w, N * K), np.float32).reshape(N, K)


_HOOK = None  # the test-only library, built once per module by the `hook` fixture


@pytest.fixture(scope="module")
def hook(tmp_path_factory):
    global _HOOK
    path = native_build.build(tmp_path_factory.mktemp("qmatmul_hook") / "libqmatmul_hook.so", ["qmatmul_hook.c"],
                              shared=True)  # fmt: skip
    lib = ctypes.CDLL(str(path))
    lib.tk_test_matmul_q.restype = ctypes.c_int
    lib.tk_test_matmul_q.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t,
                                     ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                     ctypes.c_float, ctypes.c_float, ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                                     ctypes.c_size_t]  # fmt: skip
    _HOOK = lib
    yield lib
    _HOOK = None


def matmul_q_raw(type_id, w, x, y, N, K, T, alpha=1.0, beta=0.0, portable=False, threads=0) -> bytes:
    """y[T, N] = alpha * x[T, K] . W^T + beta * y (float32 buffers) with W given as N rows of ggml blocks, through
    the CPU backend's quantized decode kernel (portable: its plain-C reference); ValueError on bad arguments."""
    w, x, out, err = bytes(w), bytes(x), bytearray(bytes(y)), ctypes.create_string_buffer(256)
    buf = (ctypes.c_char * len(out)).from_buffer(out) if out else None
    status = _HOOK.tk_test_matmul_q(type_id, w, len(w), x, len(x), ctypes.cast(buf, ctypes.c_void_p), len(out), N, K,
                                    T, alpha, beta, int(portable), threads, err, len(err))  # fmt: skip
    if status == 1:
        raise ValueError(err.value.decode())
    if status != 0:
        raise MemoryError(err.value.decode())
    return bytes(out)


def matmul_q(name, w, x, y, alpha=1.0, beta=0.0, portable=False, threads=0) -> np.ndarray:
    T, K = x.shape
    N = y.shape[1]
    out = matmul_q_raw(TYPES[name][0], w, np.ascontiguousarray(x, np.float32), np.ascontiguousarray(y, np.float32),
                       N, K, T, alpha, beta, portable, threads)  # fmt: skip
    return np.frombuffer(out, np.float32).reshape(T, N)


@pytest.mark.usefixtures("hook")
@pytest.mark.parametrize("portable", [False, True], ids=["simd", "portable"])
@pytest.mark.parametrize("name", list(TYPES))
def test_kernel_equals_float_matmul(name, portable):
    rng = np.random.default_rng(TYPES[name][0])
    for K in (32, 96, 576):
        for N in (1, 17, 45, 100):
            w = random_blocks(rng, name, N, K)
            W = dequantized(name, w, N, K).astype(np.float64)
            for T in range(1, 17):
                x = rng.standard_normal((T, K)).astype(np.float32)
                y0 = rng.standard_normal((T, N)).astype(np.float32)
                for alpha, beta in ((1.0, 0.0), (0.5, 1.0), (-2.0, 0.25)):
                    got = matmul_q(name, w, x, y0, alpha, beta, portable)
                    want = alpha * (x.astype(np.float64) @ W.T) + beta * y0
                    scale = abs(alpha) * (np.abs(x.astype(np.float64)) @ np.abs(W.T)) + abs(beta) * np.abs(y0)
                    err = np.abs(got - want) / np.maximum(scale, 1e-30)
                    t, n = np.unravel_index(np.argmax(err), err.shape)
                    assert err[t, n] <= REL_TOL, (
                        f"{name} K={K} N={N} T={T} alpha={alpha} beta={beta}: y[{t}, {n}] = {got[t, n]}, float64 "
                        f"{want[t, n]} (error {err[t, n]:.2e} of the summation scale > {REL_TOL:g})")


@pytest.mark.usefixtures("hook")
@pytest.mark.parametrize("portable", [False, True], ids=["simd", "portable"])
@pytest.mark.parametrize("name", list(TYPES))
def test_weights_are_decoded_exactly(name, portable):
    """x = identity (K = T = 64: eight passes of 8 rows): y = W^T, every weight bit for bit."""
    rng = np.random.default_rng(100 + TYPES[name][0])
    N, K = 45, 64
    w = random_blocks(rng, name, N, K, extreme_scales=True)
    W = dequantized(name, w, N, K)
    got = matmul_q(name, w, np.eye(K, dtype=np.float32), np.zeros((K, N), np.float32), portable=portable)
    bad = np.argwhere(got != W.T)
    assert bad.size == 0, f"{name}: {len(bad)} weights differ, first W[{bad[0][1]}, {bad[0][0]}]: " \
                          f"{got[tuple(bad[0])]} instead of {W.T[tuple(bad[0])]}"  # fmt: skip


@pytest.mark.usefixtures("hook")
@pytest.mark.parametrize("portable", [False, True], ids=["simd", "portable"])
@pytest.mark.parametrize("name", list(TYPES))
def test_rows_do_not_depend_on_the_batch_or_threads(name, portable):
    rng = np.random.default_rng(200 + TYPES[name][0])
    N, K, T = 300, 576, 13
    w = random_blocks(rng, name, N, K)
    x = rng.standard_normal((T, K)).astype(np.float32)
    zeros = np.zeros((T, N), np.float32)
    together = matmul_q(name, w, x, zeros, portable=portable, threads=2)
    alone = np.concatenate([matmul_q(name, w, x[t : t + 1], zeros[:1], portable=portable, threads=1)
                            for t in range(T)])  # fmt: skip
    assert np.array_equal(together, alone), "a row's result changed with the rows and threads beside it"


@pytest.mark.usefixtures("hook")
def test_beta_zero_does_not_read_y():
    rng = np.random.default_rng(5)
    w = random_blocks(rng, "Q4_1", 20, 64)
    for portable in (False, True):
        got = matmul_q("Q4_1", w, rng.standard_normal((3, 64)), np.full((3, 20), np.nan), portable=portable)
        assert np.isfinite(got).all()


@pytest.mark.parametrize("type_id, N, K, T, w_bytes", [
    (12, 16, 256, 1, 16 * 144),  # Q4_K: no kernel
    (1, 16, 32, 1, 16 * 64),  # F16
    (3, 16, 48, 1, 16 * 40),  # K not a multiple of 32
    (3, 16, 64, 1, 16 * 40 - 1),  # w one byte short
    (3, 0, 64, 1, 0),  # no rows
])  # fmt: skip
@pytest.mark.usefixtures("hook")
def test_bad_arguments_raise(type_id, N, K, T, w_bytes):
    with pytest.raises(ValueError):
        matmul_q_raw(type_id, bytes(w_bytes), bytes(4 * T * K), bytes(4 * T * max(N, 1)), N, K, T)
    with pytest.raises(ValueError):
        matmul_q_raw(3, bytes(16 * 40), bytes(4 * 64 - 1), bytes(4 * 16), 16, 64, 1)  # x short


# ---- every matrix kept once, in its file's type ------------------------------------------------------


def test_smollm2_keeps_its_blocks_once(smollm2, smollm2_gguf_path):
    """Every 2-D tensor of the default GGUF (Q4_1 projections, the tied Q8_0 embedding) is kept as its
    blocks, repacked: exactly its bytes (all its dimensions are multiples of 16 and tiles of 64 bytes), and
    no float32 copy beside them (only the norms are float32)."""
    tensors = _C.read_gguf(str(smollm2_gguf_path))["tensors"]
    assert {t["type_name"] for t in tensors if len(t["shape"]) == 2} == {"Q4_1", "Q8_0"}
    assert smollm2.handle.quantized_bytes == sum(t["nbytes"] for t in tensors if len(t["shape"]) == 2)
    norms = sum(t["nbytes"] for t in tensors if len(t["shape"]) == 1)
    assert smollm2.handle.weight_bytes - smollm2.handle.quantized_bytes <= norms + 64 * 1024


# bytes per block, elements per block of the row-kept types (csrc/io/quant.c)
ROW_TYPES = {"F32": (4, 1), "F16": (2, 1), "BF16": (2, 1), "Q5_0": (22, 32), "Q5_1": (24, 32), "Q4_K": (144, 256),
             "Q5_K": (176, 256), "Q6_K": (210, 256)}


def expected_matrix_bytes(config, type_of, quantized_only: bool) -> int:
    """Bytes of the resident matrices (backend/cpu/wmatmul.c) of a GGUF whose tensor `name` has type_of(name):
    each matrix is cut into parts of one type (stacked q|k|v and gate|up sources merge when their types agree),
    Q4_0 / Q4_1 / Q8_0 parts as 16-row tiles (qmatrix.h), other types as the file's rows; each part 64-byte
    aligned. With quantized_only, block-quantized parts only (not F32 / F16 / BF16)."""
    D, F, V, L = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    q_rows, kv_rows = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    matrices = [([("token_embd.weight", V)], D)]  # ([(source tensor name, rows)], cols)
    if not config.tie_word_embeddings:
        matrices.append(([("output.weight", V)], D))
    for i in range(L):
        matrices += [([(f"blk.{i}.attn_q.weight", q_rows), (f"blk.{i}.attn_k.weight", kv_rows),
                       (f"blk.{i}.attn_v.weight", kv_rows)], D),
                     ([(f"blk.{i}.attn_output.weight", D)], q_rows),
                     ([(f"blk.{i}.ffn_gate.weight", F), (f"blk.{i}.ffn_up.weight", F)], D),
                     ([(f"blk.{i}.ffn_down.weight", D)], F)]  # fmt: skip
    total = 0
    for sources, cols in matrices:
        parts = []  # [type, rows]
        for name, rows in sources:
            if parts and parts[-1][0] == type_of(name):
                parts[-1][1] += rows
            else:
                parts.append([type_of(name), rows])
        for t, rows in parts:
            if quantized_only and t in ("F32", "F16", "BF16"):
                continue
            if t in TILE_BYTES:
                nbytes = -(-rows // 16) * (cols // 32) * TILE_BYTES[t]
            else:
                block_bytes, block_elems = ROW_TYPES[t]
                nbytes = rows * cols // block_elems * block_bytes
            total += (nbytes + 63) // 64 * 64
    return total


def q_apart(name, shape) -> str:
    return "Q8_0" if "attn_q" in name else "Q4_1"


GGUF_CASES = {  # name -> (arch, make_hf_model keyword arguments, tensor type or mix)
    "llama_Q4_1": ("llama", dict(seed=1, vocab=500), "Q4_1"),  # lm_head of 500 rows: a partial group
    "qwen2_Q4_0": ("qwen2", dict(seed=2), "Q4_0"),
    "qwen3_Q8_0": ("qwen3", dict(seed=3), "Q8_0"),
    "llama_tied_smollm2_mix": ("llama", dict(seed=4, tied=True), "smollm2_mix"),
    "llama_q_apart": ("llama", dict(seed=5), q_apart),  # q Q8_0, k/v Q4_1: no fused q|k|v copy
    "llama_F16": ("llama", dict(seed=6), "F16"),
    "llama_wide_kquants": ("llama", dict(seed=7, hidden=256, intermediate=512, vocab=320), "kquant_mix"),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_tiny_gguf_matrices_keep_their_types(tmp_path, case):
    tm = pytest.importorskip("tiny_models")
    pytest.importorskip("gguf")
    from tinker._engine import load_model

    arch, kwargs, kind = GGUF_CASES[case]
    mix = {"smollm2_mix": tm.smollm2_mix, "kquant_mix": tm.kquant_mix}.get(kind, kind)
    model = tm.make_hf_model(arch, **kwargs)
    path, _ = tm.write_gguf(tmp_path / f"{case}.gguf", model, arch, mix)
    types = {t["name"]: t["type_name"] for t in _C.read_gguf(str(path))["tensors"]}
    handle = load_model(str(path)).handle
    expected = expected_matrix_bytes(model.config, types.__getitem__, quantized_only=True)
    assert handle.quantized_bytes == expected
    assert (expected > 0) == (kind != "F16")
    # everything else held is the float32 vectors (norms, biases): no float32 copy of any matrix
    matrices = expected_matrix_bytes(model.config, types.__getitem__, quantized_only=False)
    D, L = model.config.hidden_size, model.config.num_hidden_layers
    assert matrices <= handle.weight_bytes <= matrices + 4 * (L * 8 * D + 64 * L + 2 * D)


def test_safetensors_models_keep_their_float32(tmp_path):
    tm = pytest.importorskip("tiny_models")
    from tinker._engine import load_model

    path, reference = tm.make_hf_checkpoint(tmp_path / "llama", "llama", seed=8)
    handle = load_model(str(path)).handle
    assert handle.quantized_bytes == 0
    n_matrix_floats = sum(t.numel() for t in reference.state_dict().values() if t.dim() == 2)
    if reference.config.tie_word_embeddings:
        n_matrix_floats -= reference.config.vocab_size * reference.config.hidden_size
    assert 4 * n_matrix_floats <= handle.weight_bytes <= 4 * n_matrix_floats + 200_000
