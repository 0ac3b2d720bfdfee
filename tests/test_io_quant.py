"""Dequantisation of ggml tensor types (csrc/io/quant.c) must be bit-identical to the reference.

The reference is the `gguf` package's numpy dequantiser (gguf/quants.py), which mirrors ggml's
dequantize_row_* arithmetic. Comparisons are on the float32 bit patterns, so -0.0 vs +0.0 or a
different NaN payload would fail. No tolerance is needed anywhere: every product in these formats
(fp16 scale x small integer sub-scale x small integer quant) is exact in float32, and the only
rounding step (`+ m`, `- dmin*mn`) is done in the same order as the reference.
"""

from __future__ import annotations

import numpy as np
import pytest

from tinker import _C

try:
    import gguf
    from gguf import GGMLQuantizationType as QT
except ImportError:  # pragma: no cover - gguf is a test dependency
    gguf = None

needs_gguf = pytest.mark.skipif(gguf is None, reason="the `gguf` package (the reference dequantiser) is not installed")

# name -> (type id, elements per block, bytes per block, byte offsets of the fp16 scale fields)
BLOCK_TYPES = {
    "Q4_0": (2, 32, 18, [0]),
    "Q4_1": (3, 32, 20, [0, 2]),  # d, m
    "Q5_0": (6, 32, 22, [0]),
    "Q5_1": (7, 32, 24, [0, 2]),  # d, m
    "Q8_0": (8, 32, 34, [0]),
    "Q4_K": (12, 256, 144, [0, 2]),  # d, dmin
    "Q5_K": (13, 256, 176, [0, 2]),  # d, dmin
    "Q6_K": (14, 256, 210, [208]),  # d (after ql, qh, scales)
}
F32, F16, BF16 = 0, 1, 30
N_BLOCKS = 4096


def ours(type_id: int, data, n: int) -> np.ndarray:
    out = np.frombuffer(_C.dequantize(type_id, data, n), dtype=np.float32)
    assert out.shape == (n,)
    return out


def assert_bits_equal(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.dtype == np.float32 and ref.dtype == np.float32
    assert got.shape == ref.shape
    diff = np.flatnonzero(got.view(np.uint32) != ref.view(np.uint32))
    if diff.size:
        i = diff[:5]
        raise AssertionError(
            f"{diff.size} of {got.size} elements differ; first at {i.tolist()}: "
            f"got {got[i].tolist()} expected {ref[i].tolist()}"
        )


def random_scales(rng: np.random.Generator, k: int) -> np.ndarray:
    """Finite fp16 scales: mostly normal*0.05 (so negative too, e.g. Q4_1 mins), plus zeros,
    -0, subnormals of both signs, large values, and the largest finite fp16."""
    s = (rng.standard_normal(k) * 0.05).astype(np.float16)
    kind = rng.integers(0, 12, k)
    s[kind == 0] = 0.0
    s[kind == 1] = -0.0
    sub_bits = rng.integers(1, 0x400, k).astype(np.uint16) | (rng.integers(0, 2, k).astype(np.uint16) << 15)
    s[kind == 2] = sub_bits.view(np.float16)[kind == 2]
    s[kind == 3] = (rng.standard_normal(k) * 1000).astype(np.float16)[kind == 3]
    s[kind == 4] = np.float16(65504.0) * rng.choice(np.array([-1, 1], np.float16), k)[kind == 4]
    assert np.isfinite(s).all()
    return s


@needs_gguf
@pytest.mark.parametrize("name", list(BLOCK_TYPES))
def test_block_types_match_gguf_reference_bit_exactly(name):
    type_id, elems, nbytes, scale_offsets = BLOCK_TYPES[name]
    rng = np.random.default_rng(1234 + type_id)
    blocks = rng.integers(0, 256, (N_BLOCKS, nbytes), dtype=np.uint8)
    for off in scale_offsets:
        blocks[:, off : off + 2] = random_scales(rng, N_BLOCKS).view(np.uint8).reshape(N_BLOCKS, 2)
    raw = blocks.tobytes()

    ref = gguf.quants.dequantize(np.frombuffer(raw, np.uint8), getattr(QT, name))
    assert_bits_equal(ours(type_id, raw, N_BLOCKS * elems), ref)


@needs_gguf
@pytest.mark.parametrize("name", list(BLOCK_TYPES))
def test_unaligned_source_buffer(name):
    """Blocks are 18, 20, 22... bytes, so fields are unaligned anyway; also start the buffer at an odd address."""
    type_id, elems, nbytes, scale_offsets = BLOCK_TYPES[name]
    rng = np.random.default_rng(99 + type_id)
    blocks = rng.integers(0, 256, (7, nbytes), dtype=np.uint8)
    for off in scale_offsets:
        blocks[:, off : off + 2] = random_scales(rng, 7).view(np.uint8).reshape(7, 2)
    buf = bytearray(b"\x00") + bytearray(blocks.tobytes())
    ref = gguf.quants.dequantize(blocks.reshape(-1), getattr(QT, name))
    assert_bits_equal(ours(type_id, memoryview(buf)[1:], 7 * elems), ref)


def test_f16_every_bit_pattern():
    """All 65536 halves: normals, subnormals, +-0, +-inf and NaNs (payload kept), against numpy's
    exact IEEE conversion."""
    halves = np.arange(1 << 16, dtype=np.uint16)
    ref = halves.view(np.float16).astype(np.float32)
    assert_bits_equal(ours(F16, halves.tobytes(), halves.size), ref)


def test_f16_special_values():
    halves = np.array([0x0000, 0x8000, 0x0001, 0x83FF, 0x0400, 0x7BFF, 0x7C00, 0xFC00, 0x7E00, 0x3C00], np.uint16)
    got = ours(F16, halves.tobytes(), halves.size)
    assert got.view(np.uint32)[0] == 0x00000000  # +0
    assert got.view(np.uint32)[1] == 0x80000000  # -0
    assert got[2] == 2.0**-24  # smallest subnormal
    assert got[3] == -(1023 * 2.0**-24)  # largest subnormal, negative
    assert got[4] == 2.0**-14  # smallest normal
    assert got[5] == 65504.0  # largest finite
    assert got[6] == np.inf and got[7] == -np.inf
    assert np.isnan(got[8])
    assert got[9] == 1.0


@needs_gguf
def test_bf16_every_bit_pattern():
    halves = np.arange(1 << 16, dtype=np.uint16)
    ref = gguf.quants.dequantize(halves.view(np.uint8), QT.BF16)
    got = ours(BF16, halves.tobytes(), halves.size)
    assert_bits_equal(got, ref)
    assert_bits_equal(got, (halves.astype(np.uint32) << 16).view(np.float32))


def test_bf16_special_values():
    halves = np.array([0x0000, 0x8000, 0x0001, 0x7F80, 0xFF80, 0x7FC0, 0x3F80, 0xC000], np.uint16)
    got = ours(BF16, halves.tobytes(), halves.size)
    assert got.view(np.uint32)[1] == 0x80000000
    assert got[2] == 2.0**-133  # subnormal in float32 too
    assert got[3] == np.inf and got[4] == -np.inf and np.isnan(got[5])
    assert got[6] == 1.0 and got[7] == -2.0


def test_f32_is_copied_verbatim():
    rng = np.random.default_rng(7)
    bits = rng.integers(0, 1 << 32, 1000, dtype=np.uint64).astype(np.uint32)  # includes NaN payloads
    assert_bits_equal(ours(F32, bits.tobytes(), bits.size), bits.view(np.float32))


def test_q4_0_nibble_order_by_hand():
    """Independent of gguf: low nibbles are elements 0..15, high nibbles 16..31 (not interleaved)."""
    block = np.float16(0.5).tobytes() + bytes((j << 4) | (15 - j) for j in range(16))
    got = ours(2, block, 32)
    expected = [0.5 * (15 - j - 8) for j in range(16)] + [0.5 * (j - 8) for j in range(16)]
    assert got.tolist() == expected


def test_q8_0_by_hand():
    qs = np.arange(-16, 16, dtype=np.int8)
    block = np.float16(-0.25).tobytes() + qs.tobytes()
    assert ours(8, block, 32).tolist() == (qs.astype(np.float32) * -0.25).tolist()


@pytest.mark.parametrize("type_id", [10, 11, 15, 99, -1, 4])
def test_unsupported_type_raises(type_id):
    with pytest.raises(ValueError):
        _C.dequantize(type_id, bytes(4096), 256)


@pytest.mark.parametrize(
    "type_id, n, nbytes",
    [
        (3, 33, 40),  # Q4_1: n not a multiple of 32
        (12, 128, 144),  # Q4_K: n not a multiple of 256
        (3, 64, 39),  # Q4_1: two blocks need 40 bytes
        (14, 256, 209),  # Q6_K: one block needs 210 bytes
        (1, 8, 15),  # F16: 8 elements need 16 bytes
        (0, 4, 15),  # F32
    ],
)
def test_bad_length_raises(type_id, n, nbytes):
    with pytest.raises(ValueError):
        _C.dequantize(type_id, bytes(nbytes), n)
