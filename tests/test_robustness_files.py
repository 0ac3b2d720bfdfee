"""Robustness of model files: corrupt, truncated, mismatched or missing files give exceptions, never crashes.

Every failure must surface as a clean Python exception (ValueError / OSError straight from
`_C.read_gguf`, ModelLoadError from `load_model` / `model_spec`) whose message names the file and
says what is wrong, and the engine must keep working afterwards.

The files are tiny and written here: a 2-layer llama GGUF with gguf.GGUFWriter (F32 tensors) and a
2-layer LlamaForCausalLM checkpoint saved with transformers. Byte offsets of GGUF fields are found
by parsing the file in this module (`GGUFLayout`), never hard-coded.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from tinker import _C  # noqa: E402
from tinker._engine import load_model  # noqa: E402
from tinker._exceptions import BadRequestError, ModelLoadError  # noqa: E402
from tinker._models import model_spec, read_safetensors_header, resolve_model  # noqa: E402

# The exception types a bad file may raise; ModelLoadError is a ValueError.
CLEAN_ERRORS = (ValueError, OSError)

# tiny llama: vocab, width, heads, kv heads, MLP width, layers, context
V, D, H, HKV, F, L, CTX = 32, 16, 2, 1, 32, 2, 64
DH = D // H
TOKENS = [[1, 2, 3]]


def unique(stem: str) -> str:
    """load_model caches by name: every model that may load successfully gets a fresh name."""
    return f"{stem}-{uuid.uuid4().hex[:10]}"


def check_runs(model) -> np.ndarray:
    (logits,) = model.forward_logits(TOKENS)
    assert logits.shape == (3, model.vocab_size)
    assert np.isfinite(logits).all()
    return logits


# ==== GGUF: writing and parsing ====================================================================

GGUF_TENSOR_SHAPES = {"token_embd.weight": (V, D), "output_norm.weight": (D,)}
for _l in range(L):
    GGUF_TENSOR_SHAPES.update({
        f"blk.{_l}.attn_norm.weight": (D,), f"blk.{_l}.attn_q.weight": (H * DH, D),
        f"blk.{_l}.attn_k.weight": (HKV * DH, D), f"blk.{_l}.attn_v.weight": (HKV * DH, D),
        f"blk.{_l}.attn_output.weight": (D, H * DH), f"blk.{_l}.ffn_norm.weight": (D,),
        f"blk.{_l}.ffn_gate.weight": (F, D), f"blk.{_l}.ffn_up.weight": (F, D), f"blk.{_l}.ffn_down.weight": (D, F),
    })  # fmt: skip


def write_tiny_gguf(path: Path, *, metadata: dict | None = None, shapes: dict | None = None, drop=(),
                    endian=None) -> Path:
    """A loadable tiny llama GGUF, plus a few extra keys of each kind the corruption tests patch."""
    meta = {
        "llama.block_count": L, "llama.embedding_length": D, "llama.feed_forward_length": F,
        "llama.attention.head_count": H, "llama.attention.head_count_kv": HKV, "llama.context_length": CTX,
        "llama.vocab_size": V,
    }  # fmt: skip
    meta.update(metadata or {})
    kwargs = {} if endian is None else {"endianess": endian}
    w = gguf.GGUFWriter(str(path), "llama", **kwargs)
    w.add_custom_alignment(32)  # an explicit general.alignment for the alignment tests
    for key, value in meta.items():
        w.add_uint32(key, value)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_bool("general.flag", True)
    w.add_array("general.tags", ["alpha", "beta"])
    w.add_array("general.numbers", [1, 2, 3])
    w.add_uint32("general.key_one", 1)  # two keys of the same length: renaming one duplicates the other
    w.add_uint32("general.key_two", 2)
    rng = np.random.default_rng(0)
    all_shapes = {**GGUF_TENSOR_SHAPES, **(shapes or {})}
    for name, shape in all_shapes.items():
        if name in drop:
            continue
        data = (rng.standard_normal(shape) * 0.2).astype(np.float32)
        if name.endswith("norm.weight"):
            data += 1.0
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


@dataclass
class KV:
    key: str
    key_off: int    # the key's u64 length
    type_off: int   # u32 value type
    value_off: int  # first byte of the value (a string's u64 length, an array's u32 element type)
    type: int


@dataclass
class TensorInfo:
    name: str
    name_off: int    # u64 name length
    ndims_off: int   # u32 n_dims
    ne_off: int      # u64 ne[n_dims]
    type_off: int    # u32 ggml type
    offset_off: int  # u64 offset relative to the data section
    ne: tuple
    type: int
    offset: int


class GGUFLayout:
    """Where every field of a (valid, little-endian) GGUF lies, parsed independently of the C reader."""

    def __init__(self, data: bytes):
        self.data = data
        magic, self.version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", data, 0)
        assert magic == b"GGUF"
        pos = 24
        self.kv: dict[str, KV] = {}
        for _ in range(n_kv):
            key_off = pos
            key, pos = self._string(pos)
            (vtype,) = struct.unpack_from("<I", data, pos)
            self.kv[key] = KV(key, key_off, pos, pos + 4, vtype)
            pos = self._skip_value(pos + 4, vtype)
        self.tensors: dict[str, TensorInfo] = {}
        for _ in range(n_tensors):
            name_off = pos
            name, pos = self._string(pos)
            (n_dims,) = struct.unpack_from("<I", data, pos)
            ne = struct.unpack_from(f"<{n_dims}Q", data, pos + 4)
            type_off = pos + 4 + 8 * n_dims
            ttype, offset = struct.unpack_from("<IQ", data, type_off)
            self.tensors[name] = TensorInfo(name, name_off, pos, pos + 4, type_off, type_off + 4, ne, ttype, offset)
            pos = type_off + 12
        self.end_of_infos = pos
        self.alignment = self.value("general.alignment") if "general.alignment" in self.kv else 32
        self.data_start = pos + (-pos % self.alignment)
        assert all(t.type == 0 for t in self.tensors.values()), "the test files hold F32 tensors only"
        self.data_end = max(self.data_start + t.offset + 4 * int(np.prod(t.ne)) for t in self.tensors.values())

    def _string(self, pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", self.data, pos)
        return self.data[pos + 8:pos + 8 + n].decode(), pos + 8 + n

    def _skip_value(self, pos: int, vtype: int) -> int:
        if vtype in _SCALAR_SIZES:
            return pos + _SCALAR_SIZES[vtype]
        if vtype == 8:
            return self._string(pos)[1]
        assert vtype == 9, vtype
        elem, count = struct.unpack_from("<IQ", self.data, pos)
        pos += 12
        for _ in range(count):
            pos = self._skip_value(pos, elem)
        return pos

    def value(self, key: str):
        kv = self.kv[key]
        assert kv.type == 4, "only u32 values are read back here"
        return struct.unpack_from("<I", self.data, kv.value_off)[0]


def patched(data: bytes, offset: int, fmt: str, *values) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[bytes, GGUFLayout]:
    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    data = path.read_bytes()
    return data, GGUFLayout(data)


def write_bytes(directory: Path, stem: str, data: bytes, suffix: str = ".gguf") -> Path:
    path = directory / (unique(stem) + suffix)
    path.write_bytes(data)
    return path


def load_fails(name, *patterns: str) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model(str(name))
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in {message!r}"
    return message


def gguf_fails(path: Path, *patterns: str, exc=ValueError) -> str:
    """read_gguf and load_model both reject `path`; both messages name it and match every pattern."""
    with pytest.raises(exc) as info:
        _C.read_gguf(str(path))
    message = str(info.value)
    assert str(path) in message, message
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in {message!r}"
    with pytest.raises(ModelLoadError) as info:
        load_model(str(path))
    assert str(path) in str(info.value) and all(re.search(p, str(info.value)) for p in patterns), str(info.value)
    return message


def gguf_load_fails(path: Path, *patterns: str) -> str:
    """read_gguf accepts `path`, but loading it as a model fails naming the file and matching the patterns."""
    _C.read_gguf(str(path))
    with pytest.raises(ModelLoadError) as info:
        load_model(str(path))
    message = str(info.value)
    assert str(path) in message, message
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in {message!r}"
    return message


# ==== 1. GGUF structure ============================================================================


def test_tiny_gguf_reads_loads_and_runs(tiny_gguf, tmp_path):
    data, layout = tiny_gguf
    path = write_bytes(tmp_path, "tiny", data)
    info = _C.read_gguf(str(path))
    assert info["version"] == 3 and info["alignment"] == 32 and info["data_offset"] == layout.data_start
    by_name = {t["name"]: t for t in info["tensors"]}
    assert set(by_name) == set(GGUF_TENSOR_SHAPES)
    for name, t in layout.tensors.items():
        assert by_name[name]["shape"] == GGUF_TENSOR_SHAPES[name]
        assert by_name[name]["offset"] == layout.data_start + t.offset
    assert info["metadata"]["general.flag"] is True and info["metadata"]["general.tags"] == ["alpha", "beta"]
    check_runs(load_model(str(path)))


def test_gguf_missing_file_and_directory(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(OSError, match=re.escape(str(missing)) + ".*cannot open"):
        _C.read_gguf(str(missing))
    with pytest.raises(OSError, match=re.escape(str(tmp_path)) + ".*not a regular file"):
        _C.read_gguf(str(tmp_path))


def test_gguf_empty_file(tmp_path):
    path = write_bytes(tmp_path, "empty", b"")
    gguf_fails(path, r"truncated GGUF file: magic")


def test_gguf_bad_magic(tiny_gguf, tmp_path):
    data, _ = tiny_gguf
    gguf_fails(write_bytes(tmp_path, "magic", b"GGUX" + data[4:]), r"not a GGUF file")
    # a safetensors file (or anything else) under a .gguf name
    gguf_fails(write_bytes(tmp_path, "text", b"{\"not\": \"gguf\"}" * 4), r"not a GGUF file")


@pytest.mark.parametrize("version", [0x00000001, 0x00000004, 0x00010003])
def test_gguf_unsupported_version(tiny_gguf, tmp_path, version):
    data, _ = tiny_gguf
    path = write_bytes(tmp_path, f"v{version}", patched(data, 4, "<I", version))
    gguf_fails(path, rf"GGUF version {version} is not supported")


def test_gguf_big_endian(tiny_gguf, tmp_path):
    # a file written big-endian by gguf-py, and the little-endian file with its version byte-swapped
    path = write_tiny_gguf(tmp_path / (unique("big") + ".gguf"), endian=gguf.GGUFEndian.BIG)
    assert path.read_bytes()[4:8] == b"\x00\x00\x00\x03"
    gguf_fails(path, r"big-endian GGUF files are not supported")
    data, _ = tiny_gguf
    gguf_fails(write_bytes(tmp_path, "swapped", patched(data, 4, ">I", 3)), r"big-endian")


def test_gguf_truncated_at_every_header_byte(tiny_gguf, tmp_path):
    """Every cut through the header, metadata, tensor infos and padding, and cuts inside the data."""
    data, layout = tiny_gguf
    rng = random.Random(0)
    cuts = list(range(0, layout.data_start + 1))
    cuts += sorted(rng.sample(range(layout.data_start + 1, layout.data_end), 40)) + [layout.data_end - 1]
    path = tmp_path / "cut.gguf"  # every cut fails to load, so one name serves them all
    started = time.monotonic()
    for cut in cuts:
        path.write_bytes(data[:cut])
        try:
            _C.read_gguf(str(path))
        except ValueError as e:
            message = str(e)
        else:
            pytest.fail(f"read_gguf accepted the file cut at byte {cut} of {len(data)}")
        assert str(path) in message and re.search(r"past the end|file can hold", message), (cut, message)
        try:
            load_model(str(path))
        except ModelLoadError as e:
            assert str(e) == message, (cut, str(e), message)
        else:
            pytest.fail(f"load_model accepted the file cut at byte {cut} of {len(data)}")
    assert time.monotonic() - started < 20
    # the whole file (any trailing padding after the last tensor included) loads
    check_runs(load_model(str(write_bytes(tmp_path, "whole", data[:layout.data_end]))))


def test_gguf_tensor_offset_past_end_of_file(tiny_gguf, tmp_path):
    data, layout = tiny_gguf
    t = layout.tensors["blk.1.ffn_down.weight"]
    past = len(data) - layout.data_start + 64 * layout.alignment
    gguf_fails(write_bytes(tmp_path, "far", patched(data, t.offset_off, "<Q", past)),
               r"tensor 'blk\.1\.ffn_down\.weight' starts at byte \d+, past the end of the file")
    huge = (1 << 63) - layout.alignment
    gguf_fails(write_bytes(tmp_path, "huge", patched(data, t.offset_off, "<Q", huge)),
               r"tensor 'blk\.1\.ffn_down\.weight' starts at byte \d+, past the end of the file")
    # starts inside the file but runs past its end
    inside = (len(data) - layout.data_start - 64) // layout.alignment * layout.alignment
    gguf_fails(write_bytes(tmp_path, "straddle", patched(data, t.offset_off, "<Q", inside)),
               r"tensor 'blk\.1\.ffn_down\.weight' \(\d+ bytes at byte \d+\) runs past the end of the file")


def test_gguf_misaligned_tensor_offset(tiny_gguf, tmp_path):
    data, layout = tiny_gguf
    t = layout.tensors["blk.0.attn_v.weight"]
    path = write_bytes(tmp_path, "misaligned", patched(data, t.offset_off, "<Q", t.offset + 4))
    gguf_fails(path, r"tensor 'blk\.0\.attn_v\.weight' offset \d+ is not a multiple of the alignment 32")


@pytest.mark.parametrize("type_id, type_name", [(99, "unknown"), (10, "Q2_K"), (15, "Q8_K"), (28, "F64")])
def test_gguf_tensor_type_the_engine_cannot_decode(tiny_gguf, tmp_path, type_id, type_name):
    data, layout = tiny_gguf
    t = layout.tensors["blk.0.ffn_gate.weight"]
    path = write_bytes(tmp_path, f"type{type_id}", patched(data, t.type_off, "<I", type_id))
    info = _C.read_gguf(str(path))  # the reader indexes it (nbytes 0); only loading it fails
    (entry,) = [x for x in info["tensors"] if x["name"] == t.name]
    assert entry["type"] == type_id and entry["type_name"] == type_name and entry["nbytes"] == 0
    gguf_load_fails(path, rf"tensor 'blk\.0\.ffn_gate\.weight' has type {type_name} \(ggml id {type_id}\)",
                    r"cannot decode")


def test_gguf_tensor_type_id_above_int32(tiny_gguf, tmp_path):
    data, layout = tiny_gguf
    t = layout.tensors["blk.0.ffn_gate.weight"]
    path = write_bytes(tmp_path, "typeffff", patched(data, t.type_off, "<I", 0xFFFFFFFF))
    gguf_load_fails(path, r"blk\.0\.ffn_gate\.weight", r"4294967295|cannot decode")


def test_gguf_string_length_past_end_of_file(tiny_gguf, tmp_path):
    data, layout = tiny_gguf
    kv = layout.kv["general.architecture"]
    gguf_fails(write_bytes(tmp_path, "strlen", patched(data, kv.value_off, "<Q", 1 << 40)),
               r"metadata 'general\.architecture': string of 1099511627776 bytes runs past the end of the file")
    gguf_fails(write_bytes(tmp_path, "strmax", patched(data, kv.value_off, "<Q", (1 << 64) - 1)),
               r"metadata 'general\.architecture': string of \d+ bytes runs past the end of the file")
    # a key's length, and a tensor name's length
    key = layout.kv["general.flag"]
    gguf_fails(write_bytes(tmp_path, "keylen", patched(data, key.key_off, "<Q", 1 << 40)),
               rf"truncated GGUF file: metadata key at byte ({key.key_off}|{key.key_off + 8}) runs past the end")
    name = layout.tensors["output_norm.weight"]
    gguf_fails(write_bytes(tmp_path, "namelen", patched(data, name.name_off, "<Q", 1 << 40)),
               rf"truncated GGUF file: tensor name at byte ({name.name_off}|{name.name_off + 8}) runs past the end")


def test_gguf_tensor_name_too_long(tiny_gguf, tmp_path):
    # a 64-byte name (GGML_MAX_NAME includes the NUL): lengthen a name by eating into the next field
    data, layout = tiny_gguf
    name = layout.tensors["output_norm.weight"]
    gguf_fails(write_bytes(tmp_path, "longname", patched(data, name.name_off, "<Q", 64)),
               r"has a name of 64 bytes \(at most 63 allowed\)")


def test_gguf_array_count_past_end_of_file(tiny_gguf, tmp_path):
    data, layout = tiny_gguf
    numbers = layout.kv["general.numbers"]  # an array of integers: count * element size checked up front
    gguf_fails(write_bytes(tmp_path, "count", patched(data, numbers.value_off + 4, "<Q", 1 << 60)),
               r"metadata 'general\.numbers': array of 1152921504606846976 elements runs past the end")
    gguf_fails(write_bytes(tmp_path, "countmax", patched(data, numbers.value_off + 4, "<Q", (1 << 64) - 1)),
               r"metadata 'general\.numbers': array of \d+ elements runs past the end")
    tags = layout.kv["general.tags"]  # an array of strings: walked element by element
    gguf_fails(write_bytes(tmp_path, "strings", patched(data, tags.value_off + 4, "<Q", 1 << 40)),
               r"metadata 'general\.tags': .*(runs past the end|expected 0 or 1|unknown metadata value type)")
    gguf_fails(write_bytes(tmp_path, "elemtype", patched(data, tags.value_off, "<I", 77)),
               r"metadata 'general\.tags': .*unknown metadata value type 77")


def test_gguf_unknown_value_type(tiny_gguf, tmp_path):
    data, layout = tiny_gguf
    kv = layout.kv["general.key_one"]
    gguf_fails(write_bytes(tmp_path, "vtype", patched(data, kv.type_off, "<I", 13)),
               r"metadata 'general\.key_one': unknown metadata value type 13")


def test_gguf_nested_arrays_too_deep(tmp_path):
    # written by hand: 9 nested arrays (the reader allows 8 levels)
    key = b"general.deep"
    value = struct.pack("<I", 9)
    for _ in range(8):
        value += struct.pack("<IQ", 9, 1)
    value += struct.pack("<IQ", 4, 0)
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key + value
    gguf_fails(write_bytes(tmp_path, "deep", data), r"metadata 'general\.deep': arrays nested deeper than 8")


def test_gguf_bool_value_2(tiny_gguf, tmp_path):
    data, layout = tiny_gguf
    kv = layout.kv["general.flag"]
    assert kv.type == 7
    gguf_fails(write_bytes(tmp_path, "bool", patched(data, kv.value_off, "<B", 2)),
               r"metadata 'general\.flag': bool value is 2, expected 0 or 1")


def test_gguf_bool_array_element_2(tmp_path):
    key = b"general.bools"
    value = struct.pack("<IIQ", 9, 7, 3) + bytes([1, 0, 2])
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key + value
    gguf_fails(write_bytes(tmp_path, "bools", data), r"metadata 'general\.bools': bool array element is 2")


def test_gguf_duplicate_key(tiny_gguf, tmp_path):
    data, layout = tiny_gguf
    kv = layout.kv["general.key_two"]
    dup = patched(data, kv.key_off + 8, "<15s", b"general.key_one")
    gguf_fails(write_bytes(tmp_path, "dupkey", dup), r"metadata key 'general\.key_one' appears twice")


def test_gguf_duplicate_tensor_name(tiny_gguf, tmp_path):
    data, layout = tiny_gguf
    t = layout.tensors["blk.1.attn_k.weight"]
    dup = patched(data, t.name_off + 8, "<19s", b"blk.1.attn_q.weight")
    gguf_fails(write_bytes(tmp_path, "dupname", dup), r"tensor 'blk\.1\.attn_q\.weight' appears twice")


@pytest.mark.parametrize("n_dims", [0, 5, 0xFFFFFFFF])
def test_gguf_bad_dimension_count(tiny_gguf, tmp_path, n_dims):
    data, layout = tiny_gguf
    t = layout.tensors["blk.0.attn_output.weight"]
    path = write_bytes(tmp_path, f"ndims{n_dims}", patched(data, t.ndims_off, "<I", n_dims))
    gguf_fails(path, rf"tensor 'blk\.0\.attn_output\.weight' has {n_dims} dimensions \(expected 1 to 4\)")


@pytest.mark.parametrize("dim", [0, 1 << 41, (1 << 64) - 1])
def test_gguf_bad_dimension_size(tiny_gguf, tmp_path, dim):
    data, layout = tiny_gguf
    t = layout.tensors["blk.0.ffn_up.weight"]
    path = write_bytes(tmp_path, "dim", patched(data, t.ne_off + 8, "<Q", dim))
    gguf_fails(path, r"tensor 'blk\.0\.ffn_up\.weight' has an invalid shape \(dimension 1 is \d+\)")


def test_gguf_element_count_overflow(tiny_gguf, tmp_path):
    # each dimension is allowed (< 2^40) but the product is not: must not wrap around
    data, layout = tiny_gguf
    t = layout.tensors["blk.0.ffn_up.weight"]
    path = write_bytes(tmp_path, "product", patched(data, t.ne_off, "<QQ", 1 << 30, 1 << 30))
    gguf_fails(path, r"tensor 'blk\.0\.ffn_up\.weight' has an invalid shape")


@pytest.mark.parametrize("alignment", [0, 24, 33, 0xFFFFFFFF])
def test_gguf_alignment_not_a_power_of_two(tiny_gguf, tmp_path, alignment):
    data, layout = tiny_gguf
    kv = layout.kv["general.alignment"]
    path = write_bytes(tmp_path, f"align{alignment}", patched(data, kv.value_off, "<I", alignment))
    gguf_fails(path, rf"general\.alignment is {alignment}, expected a power of two")


def test_gguf_alignment_wrong_type(tiny_gguf, tmp_path):
    data, layout = tiny_gguf
    kv = layout.kv["general.alignment"]
    path = write_bytes(tmp_path, "aligntype", patched(data, kv.type_off, "<I", 5))  # INT32: same size
    gguf_fails(path, r"general\.alignment must be a uint32 \(got value type 5\)")


def test_gguf_huge_counts(tiny_gguf, tmp_path):
    data, _ = tiny_gguf
    for stem, offset in (("tensors", 8), ("kvs", 16)):
        path = write_bytes(tmp_path, stem, patched(data, offset, "<Q", (1 << 64) - 1))
        gguf_fails(path, r"header claims \d+ metadata entries and \d+ tensors, more than a \d+-byte file can hold")


# ==== 2. GGUF shapes and metadata that disagree with each other =====================================


def test_gguf_tensor_shape_disagrees_with_config(tmp_path):
    path = write_tiny_gguf(tmp_path / "gate.gguf", shapes={"blk.1.ffn_gate.weight": (F + 8, D)})
    gguf_load_fails(path, rf"tensor 'blk\.1\.ffn_gate\.weight' has shape \[{F + 8}, {D}\], but the config needs "
                          rf"\[{F}, {D}\]")


def test_gguf_metadata_disagrees_with_tensors(tmp_path):
    path = write_tiny_gguf(tmp_path / "width.gguf", metadata={"llama.embedding_length": 24})
    gguf_load_fails(path, rf"tensor '[\w.]+' has shape \[\d+(, \d+)?\], but the config needs \[[\d, ]*24[\d, ]*\]")
    path = write_tiny_gguf(tmp_path / "layers.gguf", metadata={"llama.block_count": 3})
    gguf_load_fails(path, r"tensor 'blk\.2\.attn_norm\.weight' is missing")
    path = write_tiny_gguf(tmp_path / "fewer_layers.gguf", metadata={"llama.block_count": 1})
    gguf_load_fails(path, r"tensor 'blk\.1\.[\w.]+' is for layer 1, but the config has 1 layers")


def test_gguf_1d_shape_mismatch_message(tmp_path):
    path = write_tiny_gguf(tmp_path / "norm.gguf", shapes={"output_norm.weight": (D + 1,)})
    gguf_load_fails(path, rf"tensor 'output_norm\.weight' has shape \[{D + 1}\], but the config needs \[{D}\]")


def test_gguf_missing_metadata_and_tensors(tmp_path):
    path = write_tiny_gguf(tmp_path / "no_down.gguf", drop={"blk.1.ffn_down.weight"})
    gguf_load_fails(path, r"tensor 'blk\.1\.ffn_down\.weight' is missing")
    path = write_tiny_gguf(tmp_path / "no_embd.gguf", drop={"token_embd.weight"})
    gguf_load_fails(path, r"tensor 'token_embd\.weight' is missing")
    path = write_tiny_gguf(tmp_path / "extra.gguf", shapes={"blk.0.mystery.weight": (D,)})
    gguf_load_fails(path, r"tensor 'blk\.0\.mystery\.weight' is not part of the llama architecture")
    path = write_tiny_gguf(tmp_path / "rank3.gguf", shapes={"output_norm.weight": (1, 1, D)})
    gguf_load_fails(path, r"tensor 'output_norm\.weight' has 3 dimensions; the model's tensors have 1 or 2")
    # a metadata key the config needs, renamed away
    data = write_tiny_gguf(tmp_path / "base.gguf").read_bytes()
    kv = GGUFLayout(data).kv["llama.feed_forward_length"]
    path = write_bytes(tmp_path, "no_ff", patched(data, kv.key_off + 8, "<6s", b"llamX."))
    load_fails(path, re.escape(str(path)) + r".*GGUF metadata has no 'llama\.feed_forward_length'")
    # an architecture the engine does not run
    kv = GGUFLayout(data).kv["general.architecture"]
    path = write_bytes(tmp_path, "arch", patched(data, kv.value_off + 8, "<5s", b"gpt2x"))
    load_fails(path, re.escape(str(path)) + r".*GGUF architecture 'gpt2x' is not supported")


@pytest.mark.parametrize("key, value", [("llama.attention.head_count", 0), ("llama.block_count", "two"),
                                        ("llama.block_count", [1, 2])])
def test_gguf_metadata_of_the_wrong_kind(tmp_path, key, value):
    path = tmp_path / (unique("kind") + ".gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    meta = {"llama.block_count": L, "llama.embedding_length": D, "llama.feed_forward_length": F,
            "llama.attention.head_count": H, "llama.attention.head_count_kv": HKV, "llama.context_length": CTX,
            "llama.vocab_size": V, key: value}  # fmt: skip
    for k, v in meta.items():
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, list):
            w.add_array(k, v)
        else:
            w.add_uint32(k, v)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tensor("token_embd.weight", np.zeros((V, D), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match=re.escape(str(path)) + ".*" + re.escape(key)):
        load_model(str(path))


# ==== 1. GGUF fuzzing ==============================================================================


def test_gguf_fuzz_header_bytes(tiny_gguf, tmp_path):
    """Random byte changes in the header region: only clean exceptions naming the file, or a model that runs."""
    data, layout = tiny_gguf
    rng = random.Random(20240611)
    unclean, outcomes, started = [], {"read_gguf ok": 0, "loaded": 0}, time.monotonic()
    for i in range(1500):
        mutated = bytearray(data)
        edits = []
        for _ in range(rng.choice((1, 1, 2, 3, 6))):
            at = rng.randrange(layout.data_start)
            if rng.random() < 0.5:
                mutated[at] ^= 1 << rng.randrange(8)
            else:
                mutated[at] = rng.choice((0x00, 0xFF, 0x7F, 0x80, 0x01, 0x02, 0x40, rng.randrange(256)))
            edits.append((at, mutated[at]))
        path = tmp_path / f"fuzz{i}.gguf"
        path.write_bytes(bytes(mutated))
        where = f"iteration {i} (edits {edits})"
        try:
            _C.read_gguf(str(path))
            outcomes["read_gguf ok"] += 1
        except CLEAN_ERRORS as e:
            if str(path) not in str(e):
                unclean.append(f"{where}: read_gguf's message does not name the file: {e}")
        except Exception as e:  # noqa: BLE001 - the point is to catch anything unclean
            unclean.append(f"{where}: read_gguf raised {type(e).__name__}: {e}")
        try:
            model = load_model(str(path))
            outcomes["loaded"] += 1
        except ModelLoadError as e:
            if str(path) not in str(e):
                unclean.append(f"{where}: load_model's message does not name the file: {e}")
            continue
        except Exception as e:  # noqa: BLE001
            unclean.append(f"{where}: load_model raised {type(e).__name__}: {e}")
            continue
        finally:
            path.unlink()
        try:  # a fuzzed model that loads must run (a fuzzed vocab or context may reject the tokens cleanly)
            (logits,) = model.forward_logits(TOKENS)
            assert logits.shape == (3, model.vocab_size), where
        except BadRequestError as e:
            assert str(e).startswith("forward:"), (where, repr(e))
    assert time.monotonic() - started < 25
    assert not unclean, "\n".join(unclean)
    assert outcomes["loaded"] > 0  # some edits (a float's low bits, a name's letter) leave a loadable model
    # the engine still works after all of that
    check_runs(load_model(str(write_bytes(tmp_path, "after-fuzz", data))))


@pytest.mark.parametrize("field", ["key", "tensor"])
def test_gguf_non_utf8_key_names_the_file(tiny_gguf, tmp_path, field):
    data, layout = tiny_gguf
    offset = layout.kv["general.flag"].key_off if field == "key" else layout.tensors["output_norm.weight"].name_off
    path = write_bytes(tmp_path, "utf8", patched(data, offset + 8 + 2, "<B", 0xFF))
    gguf_fails(path, r"UTF-8|utf-8")


def test_gguf_absurd_dimension_is_a_model_load_error(tiny_gguf, tmp_path):
    data, layout = tiny_gguf
    kv = layout.kv["llama.embedding_length"]
    path = write_bytes(tmp_path, "absurd", patched(data, kv.value_off, "<I", D + (4 << 24)))
    gguf_load_fails(path, r"tensor '[\w.]+' has shape .* but the config needs")


# ==== HF checkpoints ===============================================================================


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A tiny random LlamaForCausalLM saved by transformers, and its float32 logits for TOKENS."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L, num_attention_heads=H,
        num_key_value_heads=HKV, max_position_embeddings=CTX, tie_word_embeddings=False, rms_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float().eval()
    directory = tmp_path_factory.mktemp("hf") / "tiny-llama"
    model.save_pretrained(str(directory), safe_serialization=True)
    assert (directory / "model.safetensors").is_file() and (directory / "config.json").is_file()
    with torch.no_grad():
        logits = model(torch.tensor(TOKENS)).logits[0].numpy()
    return directory, logits


@pytest.fixture
def hf_copy(hf_checkpoint, tmp_path):
    """A fresh, writable copy of the tiny checkpoint (under a unique name: it may load)."""
    source, _ = hf_checkpoint

    def make(stem: str = "ckpt") -> Path:
        target = tmp_path / unique(stem)
        shutil.copytree(source, target)
        return target

    return make


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def edit_tensors(path: Path, edit) -> None:
    tensors = dict(safetensors_numpy.load_file(str(path)))
    edit(tensors)
    safetensors_numpy.save_file(tensors, str(path))


SHAPE_MESSAGE = re.compile(r"(?P<file>\S+): tensor '(?P<name>[^']+)' has shape \[(?P<got>[^\]]*)\], "
                           r"but the config needs \[(?P<expected>[^\]]*)\]")


def hf_expected_shape(name: str, cfg: dict) -> tuple:
    """The shape the config implies for an HF tensor name."""
    d, h, f = cfg["hidden_size"], cfg["num_attention_heads"], cfg["intermediate_size"]
    hkv, dh = cfg["num_key_value_heads"], cfg.get("head_dim") or d // h
    suffix = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
    return {
        "model.embed_tokens.weight": (cfg["vocab_size"], d), "lm_head.weight": (cfg["vocab_size"], d),
        "model.norm.weight": (d,), "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (h * dh, d), "self_attn.k_proj.weight": (hkv * dh, d),
        "self_attn.v_proj.weight": (hkv * dh, d), "self_attn.o_proj.weight": (d, h * dh),
        "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f),
    }[suffix]  # fmt: skip


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch) -> Path:
    hub = tmp_path / "hub-cache"
    hub.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    return hub


def make_hf_cache_repo(hub: Path, name: str, checkpoint: Path, *, ref: bool = True) -> Path:
    repo = hub / ("models--" + name.replace("/", "--"))
    good = repo / "snapshots" / "a1b2c3d4e5f6a1b2c3d4e5f6a1b2c3d4e5f6a1b2"
    shutil.copytree(checkpoint, good)
    # a newer snapshot whose config is unusable: refs/main must win over modification time
    decoy = repo / "snapshots" / "ffffffffffffffffffffffffffffffffffffffff"
    shutil.copytree(checkpoint, decoy)
    edit_config(decoy, model_type="gpt2")
    os.utime(decoy, (time.time() + 100, time.time() + 100))
    if ref:
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(good.name + "\n")
    return good


def test_hf_checkpoint_loads_and_matches_transformers(hf_checkpoint, hf_copy):
    _, reference = hf_checkpoint
    logits = check_runs(load_model(str(hf_copy())))
    np.testing.assert_allclose(logits, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("changes", [{"intermediate_size": F + 16}, {"num_key_value_heads": H},
                                     {"hidden_size": D + 8, "head_dim": None}, {"vocab_size": V + 1},
                                     {"head_dim": DH * 2}])
def test_hf_config_disagrees_with_tensors(hf_copy, changes):
    directory = hf_copy()
    edit_config(directory, **changes)
    message = load_fails(directory)
    match = SHAPE_MESSAGE.search(message)
    assert match, message
    assert match["file"] == str(directory / "model.safetensors"), message
    header = read_safetensors_header(directory / "model.safetensors")
    name = match["name"]
    assert name in header, message
    got = tuple(int(x) for x in match["got"].split(", "))
    expected = tuple(int(x) for x in match["expected"].split(", "))
    assert got == tuple(header[name][1]), message
    assert expected == hf_expected_shape(name, json.loads((directory / "config.json").read_text())), message
    assert got != expected


def test_hf_missing_tensor(hf_copy):
    directory = hf_copy()
    edit_tensors(directory / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    load_fails(directory, re.escape(str(directory)), r"tensor 'model\.layers\.1\.mlp\.up_proj\.weight' is missing")
    directory = hf_copy()
    edit_tensors(directory / "model.safetensors", lambda t: t.pop("lm_head.weight"))  # untied: required
    load_fails(directory, re.escape(str(directory)), r"tensor 'lm_head\.weight' is missing")


def test_hf_missing_tensor_message_names_the_files(hf_checkpoint, empty_hf_cache):
    checkpoint, _ = hf_checkpoint
    name = "tinker-tests/" + unique("missing-tensor")
    snapshot = make_hf_cache_repo(empty_hf_cache, name, checkpoint)
    edit_tensors(snapshot / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    load_fails(name, re.escape(str(snapshot)), r"model\.layers\.1\.mlp\.up_proj\.weight")


def test_hf_extra_tensors(hf_copy):
    directory = hf_copy()
    file = directory / "model.safetensors"
    edit_tensors(file, lambda t: t.update({"model.layers.0.mlp.mystery.weight": np.zeros((4,), np.float32)}))
    load_fails(directory, re.escape(str(file)), r"tensor 'model\.layers\.0\.mlp\.mystery\.weight' is not part of "
                                                r"the llama architecture")
    directory = hf_copy()
    edit_tensors(directory / "model.safetensors",
                 lambda t: t.update({"model.layers.7.mlp.up_proj.weight": np.zeros((F, D), np.float32)}))
    load_fails(directory, re.escape(str(directory)),
               r"'model\.layers\.7\.mlp\.up_proj\.weight' is for layer 7, but the config has 2 layers")


def test_hf_tied_config_with_stored_lm_head_still_loads(hf_copy, hf_checkpoint):
    # HF ignores a stored lm_head when the config ties embeddings; so must we (no crash, no error)
    directory = hf_copy()
    edit_config(directory, tie_word_embeddings=True)
    check_runs(load_model(str(directory)))


def split_into_shards(directory: Path) -> list[Path]:
    """Rewrite model.safetensors as two shards plus model.safetensors.index.json."""
    tensors = dict(safetensors_numpy.load_file(str(directory / "model.safetensors")))
    (directory / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    files, weight_map = [], {}
    for i, part in enumerate(shards):
        file = directory / f"model-{i + 1:05d}-of-00002.safetensors"
        safetensors_numpy.save_file({n: tensors[n] for n in part}, str(file))
        weight_map.update({n: file.name for n in part})
        files.append(file)
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return files


def test_hf_sharded_checkpoint(hf_copy, hf_checkpoint):
    _, reference = hf_checkpoint
    directory = hf_copy("sharded")
    split_into_shards(directory)
    np.testing.assert_allclose(check_runs(load_model(str(directory))), reference, rtol=1e-4, atol=1e-4)

    directory = hf_copy("shard-missing")
    files = split_into_shards(directory)
    files[1].unlink()
    load_fails(directory, re.escape(str(directory / "model.safetensors.index.json")),
               r"lists shard\(s\) that do not exist: model-00002-of-00002\.safetensors")

    directory = hf_copy("shard-dup")  # the same tensor in both shards
    files = split_into_shards(directory)
    for file in files:
        edit_tensors(file, lambda t: t.update({"model.norm.weight": np.ones(D, np.float32)}))
    load_fails(directory, r"model-0000[12]-of-00002\.safetensors: tensor 'model\.norm\.weight' supplies final_norm "
                          r"of layer -1 a second time")

    directory = hf_copy("index-bad")
    split_into_shards(directory)
    (directory / "model.safetensors.index.json").write_text("{ not json")
    load_fails(directory, re.escape(str(directory / "model.safetensors.index.json")), r"cannot read the shard index")


@pytest.mark.parametrize("weight_map", [[1], {"a": 1}, {"a": 1, "b": "model.safetensors"}])
def test_hf_shard_index_of_the_wrong_kind(hf_copy, weight_map):
    directory = hf_copy()
    index = directory / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    load_fails(directory, re.escape(str(index)))


# ==== 3. safetensors files and config.json =========================================================


def rewrite_header(file: Path, edit) -> None:
    raw = file.read_bytes()
    (n,) = struct.unpack_from("<Q", raw)
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def test_safetensors_header_length_larger_than_file(hf_copy):
    directory = hf_copy()
    file = directory / "model.safetensors"
    raw = file.read_bytes()
    for claimed in (len(raw), len(raw) + 1000, (1 << 64) - 1):
        file.write_bytes(struct.pack("<Q", claimed) + raw[8:])
        pattern = rf"{re.escape(str(file))}: safetensors header length {claimed} is larger than the file allows"
        with pytest.raises(ModelLoadError, match=pattern):
            read_safetensors_header(file)
        load_fails(directory, pattern)
    file.write_bytes(raw[:5])
    load_fails(directory, re.escape(str(file)) + r": not a safetensors file")
    file.write_bytes(b"")
    load_fails(directory, re.escape(str(file)) + r": not a safetensors file")


def test_safetensors_header_not_json(hf_copy):
    directory = hf_copy()
    file = directory / "model.safetensors"
    raw = bytearray(file.read_bytes())
    (n,) = struct.unpack_from("<Q", raw)
    for garbage in (b"\xff", b"{", b"]"):
        raw[8:8 + n] = garbage * n
        file.write_bytes(bytes(raw))
        load_fails(directory, re.escape(str(file)) + r": the safetensors header is not (valid JSON|a JSON object)")
    raw[8:8 + n] = b"[1, 2]".ljust(n)
    file.write_bytes(bytes(raw))
    load_fails(directory, re.escape(str(file)) + r": the safetensors header is not a JSON object")


def test_safetensors_truncated_data(hf_copy):
    directory = hf_copy()
    file = directory / "model.safetensors"
    raw = file.read_bytes()
    header = read_safetensors_header(file)
    data_start = min(offset for _, _, offset, _ in header.values())
    for cut in (len(raw) - 1, len(raw) - 100, (data_start + len(raw)) // 2, data_start + 1, data_start):
        file.write_bytes(raw[:cut])
        load_fails(directory, re.escape(str(file)) + r": tensor '[\w.]+' data \[\d+, \d+\) lies outside "
                                                     r"the file")


def test_safetensors_bad_entries(hf_copy):
    directory = hf_copy()
    file = directory / "model.safetensors"
    rewrite_header(file, lambda h: h["model.norm.weight"].update(data_offsets=[-4, 60]))
    load_fails(directory, re.escape(str(file)) + r": tensor 'model\.norm\.weight' has a malformed header entry")
    directory = hf_copy()
    file = directory / "model.safetensors"
    rewrite_header(file, lambda h: h["model.norm.weight"].pop("dtype"))
    load_fails(directory, re.escape(str(file)) + r": tensor 'model\.norm\.weight' has a malformed header entry")
    directory = hf_copy()  # data_offsets that disagree with shape x dtype: caught by the C checks
    file = directory / "model.safetensors"
    rewrite_header(file, lambda h: h["model.norm.weight"].update(
        data_offsets=[h["model.norm.weight"]["data_offsets"][0], h["model.norm.weight"]["data_offsets"][0] + 60]))
    load_fails(directory, re.escape(str(file)) + r": tensor 'model\.norm\.weight' has 60 bytes, but shape and type "
                                                 r"F32 need 64")


@pytest.mark.parametrize("entry", [{"shape": ["16"]}, {"shape": [16.0]}, {"shape": [2**70]}, {"dtype": ["F32"]}])
def test_safetensors_entry_of_the_wrong_kind(hf_copy, entry):
    directory = hf_copy()
    file = directory / "model.safetensors"
    rewrite_header(file, lambda h: h["model.norm.weight"].update(entry))
    load_fails(directory, re.escape(str(file)), r"model\.norm\.weight")


@pytest.mark.parametrize("dtype, name", [(np.float64, "F64"), (np.int8, "I8"), (np.int64, "I64")])
def test_safetensors_unsupported_dtype(hf_copy, dtype, name):
    directory = hf_copy()
    file = directory / "model.safetensors"
    edit_tensors(file, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].astype(dtype)}))
    load_fails(directory, re.escape(str(file)) + rf": tensor 'model\.norm\.weight' has dtype {name}; supported: "
                                                 r"F32, F16, BF16")


def test_config_json_missing(hf_copy):
    directory = hf_copy()
    (directory / "config.json").unlink()
    load_fails(directory, re.escape(str(directory)), r"has no config\.json")


def test_config_json_missing_message_says_so(hf_copy):
    directory = hf_copy()
    (directory / "config.json").unlink()
    message = load_fails(directory, re.escape(str(directory)))
    assert re.search(r"no config\.json|config\.json.*(missing|not found|does not exist)", message), message
    assert f"huggingface-cli download {directory}" not in message, message


@pytest.mark.parametrize("text", [b"{not json", b"", b"\xff\xfe{", b'{"model_type": "llama",}'])
def test_config_json_invalid(hf_copy, text):
    directory = hf_copy()
    (directory / "config.json").write_bytes(text)
    config = re.escape(str(directory / "config.json"))
    load_fails(directory, config + r": cannot read the model config")


@pytest.mark.parametrize("text", ["[1, 2]", '"llama"', "null", json.dumps({
    "model_type": "llama", "num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 0,
    "intermediate_size": 32, "vocab_size": 32})])
def test_config_json_of_the_wrong_kind(hf_copy, text):
    directory = hf_copy()
    (directory / "config.json").write_text(text)
    load_fails(directory, re.escape(str(directory / "config.json")))


@pytest.mark.parametrize("changes, pattern", [
    ({"model_type": "gpt2"}, r"model_type 'gpt2' is not supported \(supported: llama, qwen2, qwen3, qwen3_moe, "
                             r"qwen3_vl, qwen3_vl_moe\)"),
    ({"model_type": None}, r"model_type None is not supported"),
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu' is not supported"),
    ({"attention_bias": True}, r"attention_bias / mlp_bias checkpoints are not supported"),
    ({"num_hidden_layers": None}, r"has no 'num_hidden_layers'"),
    ({"hidden_size": "wide"}, r"hidden_size must be a positive integer .* got 'wide'"),
    ({"num_key_value_heads": 3}, r"2 query heads are not a multiple of 3 kv heads"),
])  # fmt: skip
def test_config_json_unsupported_or_invalid_fields(hf_copy, changes, pattern):
    directory = hf_copy()
    edit_config(directory, **changes)
    message = load_fails(directory, pattern)
    assert str(directory) in message, message


@pytest.mark.parametrize("changes", [
    {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
    {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}},
    {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
])  # fmt: skip
def test_config_rope_scaling_unsupported(hf_copy, changes):
    directory = hf_copy()
    edit_config(directory, **changes)
    kind = (changes.get("rope_scaling") or changes.get("rope_parameters")).get("rope_type") or "yarn"
    load_fails(directory, re.escape(str(directory / "config.json")),
               rf"rope scaling type '{kind}' is not supported \(supported: default, linear, llama3\)")


def test_config_rope_scaling_incomplete(hf_copy):
    directory = hf_copy()
    edit_config(directory, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    load_fails(directory, re.escape(str(directory / "config.json")), r"low_freq_factor must be a positive number")


def test_config_rope_scaling_legacy_type_key_is_not_ignored(hf_copy):
    directory = hf_copy()
    assert "rope_parameters" in json.loads((directory / "config.json").read_text())  # as transformers 5 saves it
    edit_config(directory, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})
    load_fails(directory, re.escape(str(directory / "config.json")), r"rope scaling type 'yarn' is not supported")


def test_safetensors_header_deeply_nested(hf_copy):
    directory = hf_copy()
    file = directory / "model.safetensors"
    raw = bytearray(file.read_bytes())
    (n,) = struct.unpack_from("<Q", raw)
    raw[8:8 + n] = b"[" * n
    file.write_bytes(bytes(raw))
    load_fails(directory, re.escape(str(file)) + r": the safetensors header is not")


def test_config_rope_scaling_message_is_not_misleading(hf_copy):
    directory = hf_copy()
    edit_config(directory, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    message = load_fails(directory, r"rope scaling type 'yarn' is not supported")
    assert "missing or invalid config field" not in message


# ==== 4. Resolution ================================================================================


def test_unknown_name_lists_what_was_searched(empty_hf_cache, tmp_path):
    name = unique("nobody") + "/no-such-model"
    with pytest.raises(ModelLoadError) as info:
        resolve_model(name)
    message = str(info.value)
    assert f"Cannot find base model {name!r}" in message
    assert "a local path" in message and "Hugging Face cache" in message
    assert str(empty_hf_cache) in message and str(tmp_path / "hf-home" / "hub") in message
    assert "never downloaded" in message and ".gguf" in message and "config.json" in message
    with pytest.raises(ModelLoadError, match=re.escape(f"Cannot find base model {name!r}")):
        load_model(name)
    for bad in ("", "   ", "no-slash-name", "./not/here", "~/not-here-either", "/abs/not/here.gguf"):
        with pytest.raises(ModelLoadError, match="Cannot find base model|non-empty"):
            load_model(bad)
    with pytest.raises(ModelLoadError, match="non-empty string"):
        load_model(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["a" * 5000, "org/" + "b" * 5000, "~no-such-user-" + "c" * 8 + "/model"])
def test_names_that_cannot_be_paths_are_not_found(empty_hf_cache, name):
    """A name too long for the file system, or '~user' of no such user, raised OSError (File name too long) or
    RuntimeError from pathlib; now it is searched for like any other name, and the message shows it shortened."""
    import tinker

    with pytest.raises(ModelLoadError, match=r"Cannot find base model .*a local path .*not usable as one") as info:
        tinker.ServiceClient().create_lora_training_client(name, rank=2).result()
    assert len(str(info.value)) < 1500


def test_hf_cache_resolves_and_loads(empty_hf_cache, hf_checkpoint):
    checkpoint, reference = hf_checkpoint
    name = "tinker-tests/" + unique("robust-llama")
    snapshot = make_hf_cache_repo(empty_hf_cache, name, checkpoint)
    source = resolve_model(name)
    assert source.kind == "hf" and source.path == snapshot.resolve()
    assert model_spec(source).config["n_layers"] == L
    np.testing.assert_allclose(check_runs(load_model(name)), reference, rtol=1e-4, atol=1e-4)


def test_hf_cache_without_ref_takes_newest_snapshot(empty_hf_cache, hf_checkpoint):
    checkpoint, _ = hf_checkpoint
    name = "tinker-tests/" + unique("no-ref")
    make_hf_cache_repo(empty_hf_cache, name, checkpoint, ref=False)
    # the newest snapshot is the gpt2 decoy, so loading must fail naming it
    with pytest.raises(ModelLoadError, match=r"ffff+/config\.json: model_type 'gpt2' is not supported"):
        load_model(name)


def test_hf_home_fallback(tmp_path, monkeypatch, hf_checkpoint):
    checkpoint, _ = hf_checkpoint
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    name = "tinker-tests/" + unique("hf-home")
    snapshot = make_hf_cache_repo(tmp_path / "home" / "hub", name, checkpoint)
    assert resolve_model(name).path == snapshot.resolve()
    check_runs(load_model(name))


def test_relative_and_home_paths(hf_copy, tiny_gguf, tmp_path, monkeypatch):
    directory = hf_copy("relative")
    monkeypatch.chdir(directory.parent)
    check_runs(load_model(directory.name))
    check_runs(load_model(os.path.join(".", directory.name)))
    data, _ = tiny_gguf
    gguf_path = write_bytes(tmp_path, "relative", data)
    check_runs(load_model(gguf_path.name))
    monkeypatch.setenv("HOME", str(tmp_path))
    home_name = "~/" + directory.name
    assert resolve_model(home_name).path == directory.resolve()
    check_runs(load_model(home_name))
    check_runs(load_model("~/" + gguf_path.name))
    # a relative path to a corrupt file names the file as given
    bad = write_bytes(tmp_path, "bad-relative", b"GGUF\x03\x00\x00\x00")
    with pytest.raises(ModelLoadError, match=re.escape(str(bad.resolve())) + ".*past the end"):
        load_model(bad.name)


# ==== 5. After all of the above, the engine still works ============================================


def test_engine_still_works_after_all_failures(hf_copy, hf_checkpoint, tmp_path):
    _, reference = hf_checkpoint
    np.testing.assert_allclose(check_runs(load_model(str(hf_copy("final")))), reference, rtol=1e-4, atol=1e-4)
    model = load_model(str(write_tiny_gguf(tmp_path / (unique("final") + ".gguf"))))
    first = check_runs(model)
    np.testing.assert_array_equal(first, check_runs(model))  # deterministic, and reusable
