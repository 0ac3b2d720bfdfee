"""The vision tower of a vision-language model (Qwen3-VL), run by the engine (csrc/model/vision.c).

Tinker adapts the language model only, so the tower never needs gradients: it runs once per image, before the
language-model request is made, and its outputs go back to the engine as the image tokens' embeddings and
deepstack features (csrc/model/mm.h). Its weights load into the engine on the first image (a text-only use of a
vision-language model never reads them), from the checkpoint's safetensors (or a GGUF's mmproj file) through the
architecture descriptor's vision tensor names; csrc/model/vision.h states the math.
"""

from __future__ import annotations

import os
import tempfile
import threading

import numpy as np

from . import _C
from ._engine import get_engine
from ._exceptions import BadRequestError

# the engine's GELU forms (backend.h enum tk_gelu) by the config's hidden_act
_ACTS = {"gelu": 0, "gelu_pytorch_tanh": 1, "gelu_new": 1, "gelu_fast": 1, "quick_gelu": 2}
_TYPES = {"F32": 0, "F16": 1, "BF16": 30}  # ggml type ids (tinker._models)
_LN_EPS = 1e-6  # the tower's LayerNorms (transformers' Qwen3-VL: eps 1e-6 everywhere)


def _engine_config(vision: dict) -> dict:
    c = vision["config"]
    return {"depth": c["depth"], "d_model": c["hidden"], "d_ff": c["intermediate"], "n_heads": c["heads"],
            "in_channels": c["in_channels"], "patch": c["patch"], "temporal_patch": c["temporal_patch"],
            "merge": c["merge"], "out": c["out_hidden"], "grid_side": c["grid_side"], "act": _ACTS[c["act"]],
            "rope_theta": c["rope_theta"], "eps": _LN_EPS, "deepstack": list(c["deepstack"])}  # fmt: skip


def _sources(vision: dict, scratch: list[str]) -> tuple[list[str], list[tuple]]:
    """(paths, (name, index, file, offset, nbytes, type, shape) per tensor) for the engine's load_vision. A tensor's
    type is a safetensors dtype or a GGUF type id; an mmproj file's patch embedding (two temporal halves) is joined
    into a float32 file of its own, whose path goes to `scratch` (the caller deletes it once loaded)."""
    paths: list[str] = []
    sources = []
    for (name, index), (path, dtype, shape, offset, nbytes) in sorted(vision["tensors"].items()):
        if dtype == "halves":
            path, offset, nbytes = _joined_halves(path, shape, offset), 0, 4 * int(np.prod(shape))
            scratch.append(path)
            dtype = 0
        if path not in paths:
            paths.append(path)
        sources.append((name, index, paths.index(path), offset, nbytes, _TYPES.get(dtype, dtype), list(shape)))
    return paths, sources


def _joined_halves(path: str, shape: tuple, halves: list[tuple]) -> str:
    """llama.cpp's mmproj splits the Conv3d patch embedding [Dv, C, Tp = 2, P, P] into two [Dv, C, P, P] tensors:
    joined back as float32 into a temporary file (the engine copies it while loading)."""
    dv, c, tp, p, _ = shape
    parts = []
    with open(path, "rb") as f:
        for ggml_type, offset, nbytes in halves:
            f.seek(offset)
            parts.append(np.frombuffer(_C.dequantize(ggml_type, f.read(nbytes), dv * c * p * p), np.float32))
    joined = np.stack([h.reshape(dv, c, p, p) for h in parts], axis=2)  # [Dv, C, Tp, P, P]
    fd, out = tempfile.mkstemp(prefix="tinker-patch-", suffix=".bin")
    with os.fdopen(fd, "wb") as f:
        f.write(np.ascontiguousarray(joined).tobytes())
    return out


class VisionTower:
    """A loaded model's vision tower; `features` runs it on one image's patches."""

    def __init__(self, model):
        self.model = model
        self.config = model.spec.vision["config"]
        self._loaded = False
        self._lock = threading.Lock()

    def _load(self) -> None:
        with self._lock:
            if self._loaded:
                return
            scratch: list[str] = []
            try:
                paths, sources = _sources(self.model.spec.vision, scratch)
                get_engine().load_vision(self.model.handle, _engine_config(self.model.spec.vision), paths,
                                         sources).result()
            except (OSError, ValueError) as e:
                raise BadRequestError(f"{self.model.name!r}: cannot load the vision tower: {e}") from e
            finally:
                for path in scratch:
                    os.unlink(path)
            self._loaded = True

    def features(self, pixel_values: np.ndarray, grid: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(embeds [tokens, O], deepstack [K, tokens, O]) of one image: pixel_values [gh gw, C Tp P P] in
        merge-block order, grid (1, gh, gw)."""
        self._load()
        pixels = np.ascontiguousarray(pixel_values, dtype=np.float32)
        grids = np.asarray([grid], dtype=np.int32)
        try:
            out = np.asarray(get_engine().vision(self.model.handle, pixels, grids).result())
        except ValueError as e:
            raise BadRequestError(str(e)) from e
        blocks = 1 + len(self.config["deepstack"])
        out = out.reshape(blocks, -1, out.shape[-1])
        return out[0].copy(), np.ascontiguousarray(out[1:])
