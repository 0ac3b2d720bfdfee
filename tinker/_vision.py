"""The vision tower of a vision-language model (Qwen3-VL), run by the engine (csrc/model/vision.c).

Tinker adapts the language model only, so the tower never needs gradients: it runs once per image, before the
language-model request is made, and its outputs go back to the engine as the image tokens' embeddings and
deepstack features (csrc/model/mm.h). Its weights load into the engine on the first image (a text-only use of a
vision-language model never reads them), from the checkpoint's safetensors through the architecture
descriptor's vision tensor names; csrc/model/vision.h states the math.
"""

from __future__ import annotations

import threading

import numpy as np

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


def _sources(vision: dict) -> tuple[list[str], list[tuple]]:
    """(paths, (name, index, file, offset, nbytes, type, shape) per tensor) for the engine's load_vision."""
    paths: list[str] = []
    sources = []
    for (name, index), (path, dtype, shape, offset, nbytes) in sorted(vision["tensors"].items()):
        if path not in paths:
            paths.append(path)
        sources.append((name, index, paths.index(path), offset, nbytes, _TYPES[dtype], list(shape)))
    return paths, sources


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
            paths, sources = _sources(self.model.spec.vision)
            try:
                get_engine().load_vision(self.model.handle, _engine_config(self.model.spec.vision), paths,
                                         sources).result()
            except (OSError, ValueError) as e:
                raise BadRequestError(f"{self.model.name!r}: cannot load the vision tower: {e}") from e
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
