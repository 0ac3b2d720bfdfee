"""A ModelInput with images, as the engine takes it: token ids, image features and M-RoPE positions.

An image chunk stands for the run of tokens its features fill (Tinker's contract: the caller writes no image
placeholder tokens, `<|vision_start|>` / `<|vision_end|>` are ordinary text around it). Here each image chunk
becomes that many positions holding the model's image token id, whose embeddings the vision tower's merged
features replace and whose hidden states get its deepstack features after the first layers (csrc/model/mm.h).

Positions (Qwen3-VL's M-RoPE, transformers' get_rope_index): text tokens count on from the previous position
on all three axes; an image whose first token would be at position s puts merged cell (row a, column b) at
(t, h, w) = (s, s + a, s + b), and the text after it continues at s + max(rows, columns). rope_delta (the largest
position + 1 - the length) shifts every generated token's position.

`engine_input(model, model_input, what)` returns the token ids alone for text, or an EngineInput. Features are
cached per model by the image bytes' SHA-256 (and the processor settings, fixed per model), so an image seen in
many requests runs through the tower once.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from . import _images
from . import _arch
from ._exceptions import BadRequestError
from .types.model_input import EncodedTextChunk, ImageAssetPointerChunk, ImageChunk, ModelInput

_CACHE_BYTES = 256 << 20  # features kept per model (least recently used dropped first)


@dataclass
class EngineInput:
    """One sequence: tokens with image placeholders, and what the engine needs for its images."""

    tokens: np.ndarray                   # int32 [T]
    embed_rows: np.ndarray               # int32 [T]: -1 text, else the row of `embeds`
    embeds: np.ndarray                   # float32 [n, D]
    deepstack: np.ndarray                # float32 [K, n, D]
    positions: np.ndarray                # int32 [T, 3]
    rope_delta: int
    image_spans: list[tuple[int, int]] = field(default_factory=list)  # (first position, tokens) per image

    @property
    def n_image_tokens(self) -> int:
        return sum(n for _, n in self.image_spans)

    def mm(self, with_delta: bool = False) -> tuple:
        """The engine's mm= argument (csrc/python/engine.c) for this sequence alone."""
        delta = np.array([self.rope_delta], dtype=np.int32) if with_delta else None
        return (self.embeds, self.embed_rows, self.deepstack if self.deepstack.shape[0] else None, self.positions,
                delta)


@dataclass(frozen=True)
class _Features:
    embeds: np.ndarray     # [tokens, D]
    deepstack: np.ndarray  # [K, tokens, D]
    grid: tuple[int, int, int]


class FeatureCache:
    """A model's image features by content hash, least recently used dropped past _CACHE_BYTES."""

    def __init__(self):
        self._items: OrderedDict[str, _Features] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> _Features | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: str, value: _Features) -> None:
        size = value.embeds.nbytes + value.deepstack.nbytes
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._bytes += size
            while self._bytes > _CACHE_BYTES and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.embeds.nbytes + old.deepstack.nbytes


def has_images(model_input) -> bool:
    return isinstance(model_input, ModelInput) and any(
        isinstance(c, (ImageChunk, ImageAssetPointerChunk)) for c in model_input.chunks)


def _image_bytes(chunk, what: str) -> bytes:
    if isinstance(chunk, ImageChunk):
        return chunk.data
    return _images.read_pointer(chunk.location, what)


def _features(model, data: bytes, what: str) -> _Features:
    """The image's features (from the cache when this model has seen these bytes)."""
    key = hashlib.sha256(data).hexdigest()
    cache = model.feature_cache
    found = cache.get(key)
    if found is not None:
        return found
    vision = model.spec.vision
    patches = _images.preprocess(data, vision["processor"], what)
    embeds, deepstack = model.vision_tower.features(patches.pixel_values, patches.grid)
    found = _Features(embeds, deepstack, patches.grid)
    cache.put(key, found)
    return found


def _check_expected(chunk, got: int, what: str) -> None:
    """Tinker's check of the advisory expected_tokens (the service's 400 wording)."""
    if chunk.expected_tokens is not None and chunk.expected_tokens != got:
        raise BadRequestError(f"{what}: Expected {chunk.expected_tokens} tokens, got {got} from image")


def engine_input(model, model_input: ModelInput, what: str) -> list[int] | EngineInput:
    """The token ids of a text-only ModelInput, or the EngineInput of one with images (module docstring)."""
    if not isinstance(model_input, ModelInput):
        raise BadRequestError(f"{what} must be a tinker.ModelInput (e.g. ModelInput.from_ints(tokens)), got "
                              f"{type(model_input).__name__}")
    if not has_images(model_input):
        try:
            return model_input.to_ints()
        except ValueError as e:
            raise BadRequestError(f"{what}: {e}; this model takes text tokens and images only") from None
    vision = model.spec.vision
    if vision is None and _arch.has_vision(model.spec.arch):
        raise BadRequestError(f"{what}: the input has an image, but {model.name!r} is the language model of a "
                              f"{model.spec.arch} GGUF with no vision tower beside it: llama.cpp keeps the tower in a "
                              f"separate mmproj file; put that mmproj*.gguf in the model file's directory (or load "
                              f"the Hugging Face checkpoint directory)")
    if vision is None:
        raise BadRequestError(f"{what}: the input has an image, but {model.name!r} is a text-only model (it takes "
                              f"text tokens only); image chunks need a vision-language model such as Qwen3-VL")
    merge = vision["config"]["merge"]
    tokens, rows, positions, embeds, deep, spans = [], [], [], [], [], []
    at = n_rows = 0
    for j, chunk in enumerate(model_input.chunks):
        where = f"{what}, chunk {j}"
        if isinstance(chunk, EncodedTextChunk):
            n = len(chunk.tokens)
            tokens.extend(chunk.tokens)
            rows.append(np.full(n, -1, dtype=np.int32))
            positions.append(np.repeat(np.arange(at, at + n, dtype=np.int64)[:, None], 3, axis=1))
            at += n
            continue
        if not isinstance(chunk, (ImageChunk, ImageAssetPointerChunk)):
            raise BadRequestError(f"{where}: {type(chunk).__name__} is not supported by this model (text and images "
                                  f"only)")
        f = _features(model, _image_bytes(chunk, where), where)
        n = f.embeds.shape[0]
        _check_expected(chunk, n, where)
        gh, gw = f.grid[1] // merge, f.grid[2] // merge
        a, b = np.divmod(np.arange(n, dtype=np.int64), gw)
        positions.append(np.stack([np.full(n, at), at + a, at + b], axis=1))
        tokens.extend([vision["image_token_id"]] * n)
        rows.append(np.arange(n_rows, n_rows + n, dtype=np.int32))
        embeds.append(f.embeds)
        deep.append(f.deepstack)
        spans.append((len(tokens) - n, n))
        n_rows += n
        at += max(gh, gw)
    pos = np.concatenate(positions).astype(np.int32)
    length = len(tokens)
    if length == 0:
        raise BadRequestError(f"{what}: the input is empty")
    return EngineInput(
        tokens=np.asarray(tokens, dtype=np.int32), embed_rows=np.concatenate(rows),
        embeds=np.ascontiguousarray(np.concatenate(embeds), dtype=np.float32),
        deepstack=np.ascontiguousarray(np.concatenate(deep, axis=1), dtype=np.float32), positions=pos,
        rope_delta=int(pos.max()) + 1 - length, image_spans=spans)


def pack(inputs: list) -> tuple | None:
    """The engine's mm= argument for sequences packed back to back (token lists or EngineInputs), or None when
    none has an image: embedding rows renumbered into one table, text sequences' positions counted from 0."""
    images = [x for x in inputs if isinstance(x, EngineInput)]
    if not images:
        return None
    rows, positions, embeds, deep = [], [], [], []
    n_rows = 0
    for x in inputs:
        if isinstance(x, EngineInput):
            rows.append(np.where(x.embed_rows >= 0, x.embed_rows + n_rows, -1).astype(np.int32))
            positions.append(x.positions)
            embeds.append(x.embeds)
            deep.append(x.deepstack)
            n_rows += x.embeds.shape[0]
        else:
            n = len(x)
            rows.append(np.full(n, -1, dtype=np.int32))
            positions.append(np.repeat(np.arange(n, dtype=np.int32)[:, None], 3, axis=1))
    deepstack = np.ascontiguousarray(np.concatenate(deep, axis=1), dtype=np.float32)
    return (np.ascontiguousarray(np.concatenate(embeds), dtype=np.float32), np.concatenate(rows),
            deepstack if deepstack.shape[0] else None, np.ascontiguousarray(np.concatenate(positions), dtype=np.int32),
            None)
