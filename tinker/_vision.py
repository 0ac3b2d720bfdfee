"""The vision tower of a vision-language model (Qwen3-VL), forward only, in numpy float32.

Tinker adapts the language model only, so the tower never needs gradients: it runs once per image, before the
language-model request is made, and its outputs go to the engine as the image tokens' embeddings and deepstack
features (csrc/model/mm.h). Weights are read from the checkpoint's safetensors (F32 / F16 / BF16, widened to
float32) through the architecture descriptor's vision tensor names (csrc/model/arch.c), on first use.

The math (transformers' Qwen3VLVisionModel, read as a specification), for an image of gh x gw patches, N = gh gw
rows in merge-block order (tinker._images), Dv the tower's width, d = Dv / heads:
  1. patch embedding: x = pixels [N, C Tp P P] . W^T + b (the Conv3d with stride = kernel is this matmul);
  2. learned positions: the [side, side] table bilinearly resampled, corner-aligned, to gh x gw and added;
  3. blocks: x += proj(attention(rope(q), rope(k), v)) over LN1(x) (bidirectional, within the image), then
     x += fc2(act(fc1(LN2(x)))); LayerNorms with bias, eps 1e-6. The 2-D rotary positions rotate each head's
     d dimensions by angles [row f, col f, row f, col f] with f_i = theta^(-4 i / d), i < d / 4 (rotate_half);
  4. after block i in deepstack_visual_indexes: feature k = fc2(gelu(fc1(LN(x regrouped 4 rows at a time))));
  5. merger: fc2(gelu(fc1(LN(x) regrouped))) - the image's tokens [N / 4, O], one per 2x2 block, in order.
GELU in the mergers is the exact (erf) one; the blocks' activation is the config's (gelu_pytorch_tanh).
"""

from __future__ import annotations

import math
import threading

import numpy as np

from . import _arch
from ._exceptions import ModelLoadError

_LN_EPS = 1e-6


# ---- weights -------------------------------------------------------------------------------------------


def _read_tensor(path: str, dtype: str, shape, offset: int, nbytes: int) -> np.ndarray:
    """One safetensors tensor as float32 (BF16 widened by its bit pattern: the top half of a float32)."""
    with open(path, "rb") as f:
        f.seek(offset)
        raw = f.read(nbytes)
    if len(raw) != nbytes:
        raise ModelLoadError(f"{path}: a vision tensor's {nbytes} bytes at byte {offset} lie past the end of the file")
    if dtype == "F32":
        values = np.frombuffer(raw, dtype="<f4")
    elif dtype == "F16":
        values = np.frombuffer(raw, dtype="<f2").astype(np.float32)
    else:  # BF16
        values = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    return np.array(values, dtype=np.float32).reshape(shape)


class _Weights:
    """The tower's tensors by the descriptor's names: model-wide ones as w[name], per block b[i][name], per
    deepstack merger k[i][name]."""

    def __init__(self, arch: str, vision: dict):
        cfg = vision["config"]
        tensors = vision["tensors"]
        self.w, self.b = {}, [{} for _ in range(cfg["depth"])]
        self.k = [{} for _ in cfg["deepstack"]]
        for (name, index), (path, dtype, shape, offset, nbytes) in tensors.items():
            value = _read_tensor(path, dtype, shape, offset, nbytes)
            scope = _arch.vision_tensor(arch, name)["scope"]
            if scope == "model":
                self.w[name] = value
            else:
                (self.b if scope == "block" else self.k)[index][name] = value
        # the patch embedding as a matrix [Dv, C Tp P P]: its (c, t, y, x) order is a pixel row's
        self.w["patch_embed"] = self.w["patch_embed"].reshape(cfg["hidden"], -1)


# ---- pieces ----------------------------------------------------------------------------------------------


def _linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """x [N, in] . W^T ([out, in]) + b, float32."""
    y = x @ weight.T
    if bias is not None:
        y += bias
    return y


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """LayerNorm over the last axis (biased variance), float32 like torch's."""
    mean = x.mean(axis=-1, keepdims=True, dtype=np.float32)
    centered = x - mean
    var = (centered * centered).mean(axis=-1, keepdims=True, dtype=np.float32)
    return centered / np.sqrt(var + np.float32(_LN_EPS)) * weight + bias


def _erf(x: np.ndarray) -> np.ndarray:
    """erf in float64 to ~1.2e-7 (a Chebyshev fit of erfc, Numerical Recipes' erfcc): below float32's resolution
    of GELU's result, without scipy."""
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))))
    erfc = t * np.exp(poly)
    return np.where(x >= 0, 1.0 - erfc, erfc - 1.0)


def _gelu_erf(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    return (0.5 * x64 * (1.0 + _erf(x64 / math.sqrt(2.0)))).astype(np.float32)


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    return (0.5 * x64 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x64 + 0.044715 * x64 ** 3)))).astype(np.float32)


def _quick_gelu(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    return (x64 / (1.0 + np.exp(-1.702 * x64))).astype(np.float32)


_ACTS = {"gelu_pytorch_tanh": _gelu_tanh, "gelu_new": _gelu_tanh, "gelu_fast": _gelu_tanh, "gelu": _gelu_erf,
         "quick_gelu": _quick_gelu}


def _block_order(gh: int, gw: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each patch in merge-block order (tinker._images: block row, block col, then the block's
    patches row-major)."""
    i = np.arange(gh * gw)
    per_block = merge * merge
    block, within = i // per_block, i % per_block
    row = (block // (gw // merge)) * merge + within // merge
    col = (block % (gw // merge)) * merge + within % merge
    return row, col


def _axis_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Corner-aligned linear interpolation from `size` points onto a table axis of `side` entries: the two
    table indices [n, 2] and weights [n, 2] of each point (float32 as transformers computes them)."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    frac = src - floor
    lo = floor.astype(np.int64)
    taps = np.stack([lo, np.minimum(lo + 1, side - 1)], axis=1)
    weights = np.stack([np.float32(1) - frac, frac], axis=1).astype(np.float32)
    return taps, weights


def _position_embeddings(table: np.ndarray, row: np.ndarray, col: np.ndarray, gh: int, gw: int,
                         side: int) -> np.ndarray:
    """The learned [side * side, Dv] table resampled at each patch's (row, col) of a gh x gw grid: [N, Dv]."""
    h_taps, h_w = _axis_taps(row, gh, side)
    w_taps, w_w = _axis_taps(col, gw, side)
    out = np.zeros((row.size, table.shape[1]), dtype=np.float32)
    for a in range(2):
        for b in range(2):
            weight = (h_w[:, a] * w_w[:, b]).astype(np.float32)
            out += table[h_taps[:, a] * side + w_taps[:, b]] * weight[:, None]
    return out


def _rotary(row: np.ndarray, col: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [N, head_dim] of the 2-D rotary positions (module docstring, step 3)."""
    quarter = head_dim // 4
    exponent = np.arange(0, head_dim // 2, 2, dtype=np.float32) / np.float32(head_dim // 2)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)[:quarter]
    angles = np.concatenate([row[:, None].astype(np.float32) * inv_freq, col[:, None].astype(np.float32) * inv_freq],
                            axis=1)
    angles = np.concatenate([angles, angles], axis=1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """rotate_half RoPE of x [N, heads, d] with cos/sin [N, d]."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def _attention(qkv: np.ndarray, heads: int, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Bidirectional multi-head attention of one image's patches: qkv [N, 3 Dv] -> [N, Dv]."""
    n, width = qkv.shape[0], qkv.shape[1] // 3
    d = width // heads
    q, k, v = (qkv[:, i * width:(i + 1) * width].reshape(n, heads, d) for i in range(3))
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    out = np.empty((n, heads, d), dtype=np.float32)
    scale = np.float32(d ** -0.5)
    chunk = max(1, (1 << 22) // max(n, 1))  # query rows per pass: the score block stays ~16 MB per head
    for h in range(heads):
        kh, vh = k[:, h], v[:, h]
        for r0 in range(0, n, chunk):
            scores = (q[r0:r0 + chunk, h] @ kh.T) * scale
            scores -= scores.max(axis=1, keepdims=True)
            p = np.exp(scores)
            p /= p.sum(axis=1, keepdims=True)
            out[r0:r0 + chunk, h] = p @ vh
    return out.reshape(n, width)


def _merge(x: np.ndarray, w: dict, prefix: str, merge: int, post_norm: bool) -> np.ndarray:
    """A patch merger: LayerNorm (before regrouping, or after it for the deepstack ones), then 2x2 blocks' rows
    side by side -> fc1 -> GELU(erf) -> fc2: [N, Dv] -> [N / merge^2, O]."""
    group = merge * merge * x.shape[1]
    if post_norm:
        h = _layer_norm(x.reshape(-1, group), w[f"{prefix}_norm"], w[f"{prefix}_norm_bias"])
    else:
        h = _layer_norm(x, w[f"{prefix}_norm"], w[f"{prefix}_norm_bias"]).reshape(-1, group)
    h = _gelu_erf(_linear(h, w[f"{prefix}_fc1"], w[f"{prefix}_fc1_bias"]))
    return _linear(h, w[f"{prefix}_fc2"], w[f"{prefix}_fc2_bias"])


# ---- the tower -------------------------------------------------------------------------------------------------


class VisionTower:
    """A loaded model's vision tower; `features` runs it on one image's patches."""

    def __init__(self, arch: str, vision: dict):
        self.arch = arch
        self.spec = vision
        self.config = vision["config"]
        self._weights: _Weights | None = None
        self._lock = threading.Lock()

    def weights(self) -> _Weights:
        with self._lock:
            if self._weights is None:
                self._weights = _Weights(self.arch, self.spec)
            return self._weights

    def features(self, pixel_values: np.ndarray, grid: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(embeds [tokens, O], deepstack [K, tokens, O]) of one image: pixel_values [gh gw, C Tp P P] in
        merge-block order, grid (1, gh, gw)."""
        cfg, wts = self.config, self.weights()
        w = wts.w
        _, gh, gw = grid
        merge = cfg["merge"]
        row, col = _block_order(gh, gw, merge)
        x = _linear(np.asarray(pixel_values, dtype=np.float32), w["patch_embed"], w["patch_embed_bias"])
        x += _position_embeddings(w["pos_embed"], row, col, gh, gw, cfg["grid_side"])
        cos, sin = _rotary(row, col, cfg["hidden"] // cfg["heads"], cfg["rope_theta"])
        act = _ACTS[cfg["act"]]
        deep = []
        for i, b in enumerate(wts.b):
            h = _layer_norm(x, b["norm1"], b["norm1_bias"])
            x = x + _linear(_attention(_linear(h, b["qkv"], b["qkv_bias"]), cfg["heads"], cos, sin), b["proj"],
                            b["proj_bias"])
            h = _layer_norm(x, b["norm2"], b["norm2_bias"])
            x = x + _linear(act(_linear(h, b["fc1"], b["fc1_bias"])), b["fc2"], b["fc2_bias"])
            if i in cfg["deepstack"]:
                k = cfg["deepstack"].index(i)
                deep.append(_merge(x, wts.k[k], "deepstack", merge, post_norm=True))
        embeds = _merge(x, w, "merger", merge, post_norm=False)
        deepstack = np.stack(deep) if deep else np.zeros((0, *embeds.shape), dtype=np.float32)
        return np.ascontiguousarray(embeds, dtype=np.float32), np.ascontiguousarray(deepstack, dtype=np.float32)
