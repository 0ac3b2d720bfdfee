"""The process-wide engine and the base models loaded into it.

One C engine per process (a worker thread plus its compute threads) and one
loaded copy of each base model, shared by every client that names it
(DESIGN.md §4). `load_model(name)` resolves, loads and caches; the returned
LoadedModel runs forward passes and hands out its tokenizer.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from functools import cached_property

import numpy as np

from . import _C
from ._exceptions import BadRequestError, InvalidArgumentError, ModelLoadError
from ._models import ModelSpec, model_spec, resolve_model

_lock = threading.Lock()
_load_lock = threading.Lock()  # held while a model loads (rare): one copy per model
_engine: _C.Engine | None = None
_models: dict[str, "LoadedModel"] = {}


def token_ids(values, vocab_size: int, what: str, shape_what: str | None = None) -> np.ndarray:
    """`values` as the engine's int32 token ids, each checked against [0, vocab_size) at the width the
    caller gave it (so 2**32 + 5 is refused, not read as 5) and reported as given; `what` names the
    sequence in a bad id's message, `shape_what` (default `what`) in a bad shape's."""
    try:
        ids = np.asarray(values)
    except (OverflowError, ValueError, TypeError):
        ids = np.asarray(values, dtype=object)
    if ids.dtype == object and ids.ndim == 1 and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                                     for v in ids):
        for j, v in enumerate(ids):  # Python ints beyond 64 bits
            if not 0 <= v < vocab_size:
                raise BadRequestError(f"{what}, position {j}: token id {int(v)} is outside the vocabulary "
                                      f"[0, {vocab_size})")
        return ids.astype(np.int32)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise BadRequestError(f"{shape_what or what} must be a non-empty sequence of token ids, got shape "
                              f"{ids.shape} and dtype {ids.dtype}")
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise BadRequestError(f"{what}, position {j}: token id {int(ids[j])} is outside the vocabulary "
                              f"[0, {vocab_size})")
    return ids.astype(np.int32)


INT32_MAX = 2**31 - 1


def int_arg(name: str, value, lo: int, hi: int) -> int:
    """`value` as a Python int, checked to be an integer in [lo, hi] at the width the caller gave it (so the
    engine's C ints never see a narrowed value); the message names the parameter, the value and the range."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise BadRequestError(f"{name} must be an integer from {lo} to {hi}, got {value!r} "
                              f"({type(value).__name__})")
    if not lo <= value <= hi:
        raise BadRequestError(f"{name} is {int(value)}; it must be an integer from {lo} to {hi}")
    return int(value)


def bool_arg(name: str, value) -> bool:
    """A flag, read as the SDK's pydantic models read it ('no', 'false', 0 are False), never by truthiness
    (which would read 'no' as True); anything else is refused with the parameter's name."""
    import pydantic

    try:
        return pydantic.TypeAdapter(bool).validate_python(value)
    except pydantic.ValidationError:
        raise BadRequestError(f"{name} must be True or False, got {value!r:.100}") from None


def string_map_arg(name: str, value) -> dict[str, str] | None:
    """A dict of str to str (user_metadata), or None; anything else is refused with the parameter's name (it
    would be written into the checkpoint store, whose records it would damage)."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise InvalidArgumentError(f"{name} must be a dict of str to str (or None), got {value!r:.200}")
    return dict(value)


def optional_str_arg(name: str, value) -> str | None:
    """A string or None (a project id, a display name)."""
    if value is not None and not isinstance(value, str):
        raise InvalidArgumentError(f"{name} must be a str or None, got {value!r:.200} ({type(value).__name__})")
    return value


def seed_arg(name: str, value) -> int:
    """A seed: any integer that fits 64 bits (signed or unsigned), as the engine's 64-bit seed."""
    return int_arg(name, value, -(2**63), 2**64 - 1) & (2**64 - 1)


_DEVICES = ("auto", "cpu", "cuda", "devsim")


def cuda_status() -> str:
    """What CUDA can do here, in a sentence: the GPUs visible to this build, or why there are none."""
    probe = _C.cuda_probe()
    if not probe["devices"]:
        return probe["reason"]
    return "visible: " + ", ".join(f"{d['name']} (compute {d['capability'][0]}.{d['capability'][1]}, "
                                   f"{d['memory'] / 2**30:.0f} GiB)" for d in probe["devices"])


# The CUDA backend's ops and the engine on it have run only on tests/cuda_emu (a CPU emulation of CUDA): until
# they pass tests/ops and tests/test_cuda_engine.py on a real GPU (issue #15), auto stays on the CPU and the GPU
# is used only when asked for (TINKER_DEVICE=cuda).
CUDA_VERIFIED_ON_A_GPU = False


def requested_device() -> str:
    """$TINKER_DEVICE, checked: auto (the default), cpu, cuda or devsim."""
    device = os.environ.get("TINKER_DEVICE", "auto").strip().lower() or "auto"
    if device not in _DEVICES:
        raise BadRequestError(f"TINKER_DEVICE={device!r} is not a device: use one of {', '.join(_DEVICES)}")
    return device


def engine_device(requested: str) -> str:
    """The device the engine is made for, as it names it: cpu; cuda (GPU 0; the engine refuses it, saying why,
    where this build or machine cannot run it); auto: cuda where a GPU is visible and the CUDA backend is verified
    (CUDA_VERIFIED_ON_A_GPU), else cpu; devsim, the CPU backend behind device pointers that the host cannot read
    (a check for tests that model code reaches device memory only through the backend)."""
    if requested == "auto":
        return "cuda" if CUDA_VERIFIED_ON_A_GPU and _C.cuda_probe()["devices"] else "cpu"
    return requested


def device_description(engine: _C.Engine) -> str:
    """The engine's device in words: 'cpu', or 'cuda (<GPU name>)'."""
    if engine.device != "cuda":
        return engine.device
    devices = _C.cuda_probe()["devices"]
    return f"cuda ({devices[0]['name']})" if devices else "cuda"


def make_engine(requested: str) -> _C.Engine:
    device = engine_device(requested)
    try:
        return _C.Engine(device=device)
    except ValueError as e:
        if device != "cuda":
            raise
        if requested == "auto":  # a visible GPU this engine cannot use: say so and run on the CPU
            logging.getLogger("tinker").warning("tinker: not using the GPU (%s); running on the CPU", e)
            return _C.Engine(device="cpu")
        raise BadRequestError(f"TINKER_DEVICE=cuda: {e} (CUDA here: {cuda_status()}); unset TINKER_DEVICE (or set "
                              f"it to cpu) to run on the CPU") from None


def get_engine() -> _C.Engine:
    global _engine
    with _lock:
        if _engine is None:
            _engine = make_engine(requested_device())
            logging.getLogger("tinker").info("tinker engine: device %s, %d threads (CUDA: %s)",
                                             device_description(_engine), _engine.threads, cuda_status())
        return _engine


class LoadedModel:
    """A base model in the engine, with its config and (lazily) its tokenizer."""

    def __init__(self, spec: ModelSpec, handle: _C.Model):
        self.spec = spec
        self.handle = handle
        self.name = spec.source.name

    @property
    def config(self) -> dict:
        return self.spec.config

    @property
    def vocab_size(self) -> int:
        return self.spec.config["vocab_size"]

    @property
    def max_context_length(self) -> int:
        return self.spec.config["max_context"]

    @cached_property
    def tokenizer(self):
        from ._tokenizer import build_gguf_tokenizer, load_hf_tokenizer

        if self.spec.gguf_metadata is not None:
            return build_gguf_tokenizer(self.spec.gguf_metadata, name_or_path=self.name)
        return load_hf_tokenizer(str(self.spec.source.path))

    @cached_property
    def vision_tower(self):
        """The vision tower (vision-language models; tinker._vision), its weights read on first use."""
        from ._vision import VisionTower

        if self.spec.vision is None:
            raise BadRequestError(f"{self.name!r} is a text-only model: it has no vision tower")
        return VisionTower(self)

    @cached_property
    def feature_cache(self):
        """Image features by content hash (tinker._multimodal)."""
        from ._multimodal import FeatureCache

        return FeatureCache()

    @cached_property
    def _token_bytes_published(self) -> bool:
        from ._tokenizer import token_bytes

        self.handle.set_token_bytes(token_bytes(self.tokenizer, self.vocab_size))
        return True

    def publish_token_bytes(self) -> None:
        """Hands the engine each token's bytes (once), for matching stop strings while sampling."""
        self._token_bytes_published  # noqa: B018 - computed once, on first use

    def submit_forward(self, sequences, notify: bool = False, adapter=None) -> _C.Request:
        """Queues a forward pass over token sequences of any lengths (packed, no padding), through a
        LoRA adapter's handle when one is given. A sequence may be a tinker._multimodal.EngineInput (a
        vision-language model's tokens with images)."""
        from ._multimodal import EngineInput, pack

        mm = pack(list(sequences))
        sequences = [s.tokens if isinstance(s, EngineInput) else s for s in sequences]
        seqs = []
        for i, s in enumerate(sequences):
            try:
                seqs.append(np.asarray(s, dtype=np.int64).reshape(-1))
            except (OverflowError, ValueError, TypeError):
                raise BadRequestError(f"forward: sequence {i} must hold integer token ids in [0, {self.vocab_size}), "
                                      f"got {s!r:.200}") from None
        if not seqs:
            raise BadRequestError("forward: no sequences given")
        for i, s in enumerate(seqs):
            if s.size and (s.min() < 0 or s.max() >= self.vocab_size):
                bad = int(s[(s < 0) | (s >= self.vocab_size)][0])
                raise BadRequestError(f"forward: sequence {i} has token id {bad}, outside the vocabulary "
                                      f"[0, {self.vocab_size}) of {self.name}")
        tokens = np.concatenate(seqs).astype(np.int32)
        lens = np.array([s.size for s in seqs], dtype=np.int32)
        try:
            return get_engine().forward(self.handle, tokens, lens, notify=notify, adapter=adapter, mm=mm)
        except ValueError as e:
            raise BadRequestError(str(e)) from e

    def forward_logits(self, sequences, adapter=None) -> list[np.ndarray]:
        """Logits [len_i, V] (float32) at every position of each sequence."""
        request = self.submit_forward(sequences, adapter=adapter)
        logits = np.asarray(request.result())  # [T, V], a view of the engine's buffer
        bounds = np.cumsum([0] + [len(getattr(s, "tokens", s)) for s in sequences])
        return [logits[bounds[i]:bounds[i + 1]] for i in range(len(sequences))]


def load_model(name: str) -> LoadedModel:
    """The loaded base model for `name`, loading it on first use. Names that resolve to the same
    files share one loaded copy; concurrent first uses load it once."""
    source = resolve_model(name)
    key = f"{source.kind}:{source.path}"
    with _load_lock:
        if key not in _models:
            _models[key] = _load(name, source)
        return _models[key]


def _env_mib(name: str, meaning: str) -> int | None:
    """$name as bytes (the variable is in MiB, a number >= 0), or None when unset or not a size (with a warning)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        mb = float(raw)
        if not 0 <= mb < 2**40:
            raise ValueError
    except ValueError:
        logging.getLogger("tinker").warning("%s=%r is not a size in MiB (a number >= 0; %s): using the default",
                                            name, raw, meaning)
        return None
    return int(mb * 2**20)


def prefix_cache_limit() -> int | None:
    """The bound in bytes of each model's prompt-prefix cache from $TINKER_PREFIX_CACHE_MB (MiB; 0 disables it), or
    None for the engine's default (256 MiB). Sample requests whose prompts start with the same tokens under the
    same weights reuse those tokens' keys and values (csrc/model/prefix_cache.h)."""
    return _env_mib("TINKER_PREFIX_CACHE_MB", "0 turns the prefix cache off")


def kv_cache_limit() -> int | None:
    """The bytes of keys and values each model's sampling may hold at once from $TINKER_KV_CACHE_MB (MiB), or None
    for the engine's default (3/4 of the memory available once the model has loaded, at most half of the
    machine's). Requests past it wait for running ones to finish; one past it alone is refused with a message
    (csrc/model/generate.h)."""
    limit = _env_mib("TINKER_KV_CACHE_MB", "0 means the default")
    return limit or None


def _load(name: str, source) -> LoadedModel:
    spec = model_spec(source)
    try:
        handle = get_engine().load_model(spec.config, spec.paths, spec.tensors).result()
    except (OSError, ValueError, OverflowError, MemoryError) as e:
        where = str(spec.source.path)
        raise ModelLoadError(str(e) if where in str(e) else f"cannot load {name!r} ({where}): {e}") from e
    limit = prefix_cache_limit()
    if limit is not None:
        handle.set_prefix_cache_limit(limit)
    kv_limit = kv_cache_limit()
    if kv_limit is not None:
        handle.set_kv_cache_limit(kv_limit)
    return LoadedModel(spec, handle)
