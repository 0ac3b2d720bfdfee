"""Exporting trained weights for other tools: a merged Hugging Face checkpoint, or the PEFT adapter.

`export_merged(source, dir)` folds a LoRA adapter (a tinker:// checkpoint or any PEFT LoRA
directory) into its base model and writes a standard checkpoint directory (config.json,
model.safetensors, generation config and tokenizer files) that
`transformers.AutoModelForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)`
load as they are.

Base weights are read exactly as the engine reads them: the same tensor list (`model_spec`), the
same decoder (`_C.dequantize`, for GGUF blocks and safetensors F32/F16/BF16 alike) and the same
un-permutation of llama.cpp's q/k rows, so the merged model computes what the engine computes
through the adapter. For a GGUF base the config.json is written from the engine config and the
tokenizer rebuilt from the GGUF metadata; a Hugging Face base keeps its own config and tokenizer.

Merge: W' = W + (32 / r) · B @ A (the engine's B is scaled for alpha 32, see read_peft_dir), in
float64, then rounded once. The engine's unembedding adapter changes the output projection only,
so a tied base whose adapter has a non-zero unembedding delta is untied: lm_head = embed + delta,
embed unchanged, tie_word_embeddings false.

Mixture-of-experts models (Qwen3-MoE): the experts' LoRA tensors are Tinker's shared-outer layout,
3-D with the expert first and a size-1 expert axis on the factor all experts share (gate and up:
A [1, r, H], B [E, I, r]; down: A [E, r, I], B [1, H, r]); expert e's delta is (32 / r) · B_e @ A_e
with the shared factor broadcast, merged into that expert's own weights. The experts are written
under transformers' per-expert names (one gate/up/down weight per expert, from the descriptor), which
transformers 4.x and 5.x both load, whatever layout the base stored them in (fused 3-D, GGUF); the
router is not adapted and is copied as it is.

Output is written into a hidden temporary directory beside the target and renamed into place, so
a killed export leaves no half-written checkpoint under the target name.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
import uuid
from pathlib import Path

import numpy as np

from . import _C
from . import _arch
from . import _checkpoints as ckpt
from ._exceptions import BadRequestError, ConflictError
from ._models import ModelSpec, model_spec, resolve_model

__all__ = ["export_merged", "export_adapter"]

log = logging.getLogger("tinker")

_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}  # output dtype -> safetensors code
# files of a Hugging Face checkpoint directory that travel with the merged weights
_COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                 "chat_template.json")  # fmt: skip


def _hf_name(arch: str, role: str, layer: int, expert: int = -1) -> str:
    return _arch.tensor_name(arch, "hf", role, layer, expert if expert >= 0 else None)


# ---- the adapter ----------------------------------------------------------------------------------


def _adapter(source) -> tuple[str | None, int, dict[str, np.ndarray], Path]:
    """(base model, rank, engine-named LoRA tensors, directory) of a tinker:// path or PEFT directory."""
    if isinstance(source, str) and source.startswith("tinker://"):
        try:
            run_id, kind, name = ckpt.parse_path(source)
        except ValueError as e:
            raise BadRequestError(f"{source!r} is not a valid tinker:// checkpoint path: {e}") from None
        loaded = ckpt.load_checkpoint(source)  # verifies every file against the manifest
        manifest = loaded.manifest
        directory = ckpt.checkpoint_dir(run_id, kind, name)
        return manifest["base_model"], int(manifest["lora_rank"]), loaded.params, directory
    directory = Path(source).expanduser() if isinstance(source, (str, os.PathLike)) else None
    if directory is None or not (directory / ckpt.ADAPTER_CONFIG).is_file():
        raise BadRequestError(f"{source!r} is neither a tinker:// checkpoint path nor a PEFT adapter directory "
                              f"(with {ckpt.ADAPTER_CONFIG} and {ckpt.ADAPTER_WEIGHTS})")
    peft = ckpt.read_peft_dir(directory)  # B rescaled to the engine's alpha 32
    return peft.base_model, peft.rank, peft.params, directory


def _expert_pairs(key: tuple[str, int], a: np.ndarray, b: np.ndarray, rank: int, where: str,
                  name: str) -> dict[tuple[str, int, int], tuple]:
    """{(role, layer, e): (A_e, B_e)} of one expert target's 3-D factors (shared-outer: one of them has a size-1
    expert axis, broadcast to every expert)."""
    experts = max(a.shape[0], b.shape[0])
    if a.ndim != 3 or b.ndim != 3 or a.shape[1] != rank or b.shape[2] != rank or \
            {a.shape[0], b.shape[0]} - {1, experts}:
        raise BadRequestError(f"{where}: LoRA tensors of {name} have shapes A {a.shape}, B {b.shape}; expected "
                              f"[experts or 1, {rank}, in] and [experts or 1, out, {rank}] for rank {rank}")
    return {(*key, e): (a[e if a.shape[0] > 1 else 0], b[e if b.shape[0] > 1 else 0]) for e in range(experts)}


def _deltas(arch: str, params: dict[str, np.ndarray], rank: int, where: str) -> dict[tuple[str, int, int], tuple]:
    """{(role, layer, expert): (A, B)} of the adapter, keyed by the base tensor each target adapts (the
    unembedding's is ("lm_head", -1, -1); expert -1 but for the experts' own weights)."""
    pairs: dict[tuple[str, int], dict] = {}
    per_expert = set()
    for name, value in params.items():
        target, layer, ab = ckpt.split_engine_name(name)
        found = _arch.lora_target(arch, target)
        if found is None:
            raise BadRequestError(f"{where}: the adapter has LoRA tensor {name!r}, which the {arch} architecture "
                                  f"does not train")
        pairs.setdefault((found["role"], layer), {})[ab] = value
        if found["per_expert"]:
            per_expert.add((found["role"], layer))
    out = {}
    for key, pair in pairs.items():
        a, b = pair.get("lora_A"), pair.get("lora_B")
        if a is None or b is None:
            name = _hf_name(arch, *key, 0) if key in per_expert else _hf_name(arch, *key)
            raise BadRequestError(f"{where}: the adapter has only one of lora_A / lora_B for {name}")
        if key in per_expert:
            out.update(_expert_pairs(key, a, b, rank, where, f"the experts of layer {key[1]} ({key[0]})"))
            continue
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise BadRequestError(f"{where}: LoRA tensors of {_hf_name(arch, *key)} have shapes A {a.shape}, B "
                                  f"{b.shape}; expected [{rank}, in] and [out, {rank}] for rank {rank}")
        out[(*key, -1)] = (a, b)
    return out


# ---- base weights -----------------------------------------------------------------------------------


def _read_tensor(spec: ModelSpec, entry: tuple) -> np.ndarray:
    """One base tensor in float32, HF row order: decoded and un-permuted as the engine's loader does."""
    name, _role, _layer, file, offset, nbytes, ggml_type, shape, interleaved, _expert, col_stride = entry
    with open(spec.paths[file], "rb") as f:
        f.seek(offset)
        data = f.read(nbytes)
    if len(data) != nbytes:
        raise BadRequestError(f"{spec.paths[file]}: tensor {name!r} lies past the end of the file (truncated?)")
    if col_stride:  # stored transposed: element (r, c) at c * col_stride + r (a float type: one element each)
        rows, cols = shape
        span = np.frombuffer(_C.dequantize(ggml_type, data, (cols - 1) * col_stride + rows), dtype=np.float32)
        padded = np.concatenate([span, np.zeros(col_stride - rows, np.float32)])
        return np.ascontiguousarray(padded.reshape(cols, col_stride)[:, :rows].T)
    values = np.frombuffer(_C.dequantize(ggml_type, data, math.prod(shape)), dtype=np.float32).reshape(shape)
    if interleaved:  # llama.cpp stores each head's rotate_half partners (i, i + hd/2) as adjacent rows
        hd = spec.config["head_dim"]
        values = values.reshape(-1, hd // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    return values


def _merged(base: np.ndarray, delta: tuple | None, scale: float) -> np.ndarray:
    if delta is None:
        return base
    a, b = delta
    return (base.astype(np.float64) + scale * (b.astype(np.float64) @ a.astype(np.float64))).astype(np.float32)


# ---- config, tokenizer ------------------------------------------------------------------------------


def _token_id(meta: dict, key: str):
    value = meta.get(f"tokenizer.ggml.{key}_token_id")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _gguf_hf_config(spec: ModelSpec, tied: bool, dtype: str) -> dict:
    """A config.json (LlamaConfig, Qwen2Config, ...: the architecture descriptor's class, model_type and extra
    keys) equivalent to the engine's config of a GGUF."""
    c, meta, arch = spec.config, spec.gguf_metadata, _arch.get(spec.arch)

    def f32(value) -> float:  # the shortest decimal of the float32 the engine uses (1e-05, not 9.99999974e-06)
        return float(str(np.float32(value)))

    rope_scaling = {"rope_type": "linear", "factor": f32(c["rope_factor"])} if c["rope_scaling"] == 1 else None
    cfg = {
        "architectures": [arch["hf_class"]], "model_type": arch["hf_model_type"], "hidden_act": "silu",
        "hidden_size": c["d_model"], "intermediate_size": c["d_ff"], "num_hidden_layers": c["n_layers"],
        "num_attention_heads": c["n_heads"], "num_key_value_heads": c["n_kv_heads"], "head_dim": c["head_dim"],
        "rms_norm_eps": f32(c["rms_eps"]), "rope_theta": f32(c["rope_theta"]), "rope_scaling": rope_scaling,
        "max_position_embeddings": c["max_context"], "vocab_size": c["vocab_size"], "tie_word_embeddings": tied,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, "torch_dtype": dtype,
        "bos_token_id": _token_id(meta, "bos"), "eos_token_id": _token_id(meta, "eos"),
        "pad_token_id": _token_id(meta, "padding"),
    }  # fmt: skip
    for key, value in json.loads(arch["hf_config"]).items():  # "$n_layers": that engine config value
        cfg[key] = c[value[1:]] if isinstance(value, str) and value.startswith("$") else value
    if c.get("moe"):  # llama.cpp's qwen3moe metadata: every layer with a router is sparse
        cfg.update(num_experts=c["n_experts"], num_experts_per_tok=c["n_experts_used"],
                   moe_intermediate_size=c["d_ff_expert"], norm_topk_prob=bool(c["norm_topk_prob"]),
                   decoder_sparse_step=c["decoder_sparse_step"], mlp_only_layers=list(c["mlp_only_layers"]),
                   output_router_logits=False, router_aux_loss_coef=0.001)  # fmt: skip
    return cfg


def _write_metadata(spec: ModelSpec, directory: Path, tied: bool, dtype: str) -> None:
    """config.json, generation_config.json and the tokenizer files."""
    if spec.gguf_metadata is None:
        for name in _COPIED_FILES:
            if (spec.source.path / name).is_file():
                shutil.copyfile(spec.source.path / name, directory / name)
        config = json.loads((spec.source.path / "config.json").read_text())
        config["tie_word_embeddings"] = tied
        for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]:
            config[key] = dtype
    else:
        from ._tokenizer import build_gguf_tokenizer

        config = _gguf_hf_config(spec, tied, dtype)
        generation = {k: config[k] for k in ("bos_token_id", "pad_token_id") if config[k] is not None}
        if spec.eos_token_ids:
            generation["eos_token_id"] = spec.eos_token_ids[0] if len(spec.eos_token_ids) == 1 else spec.eos_token_ids
        (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        try:
            tokenizer = build_gguf_tokenizer(spec.gguf_metadata, name_or_path=spec.source.name)
        except ValueError as e:
            raise BadRequestError(f"{spec.source.path}: cannot rebuild the tokenizer for export: {e}") from None
        tokenizer.save_pretrained(str(directory))
        # transformers 5 names the class TokenizersBackend; PreTrainedTokenizerFast loads in 4.x and 5.x alike
        tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
        tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
        (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


# ---- safetensors writing ----------------------------------------------------------------------------


def _encode(values: np.ndarray, dtype: str, name: str) -> bytes:
    if dtype == "float32":
        return np.ascontiguousarray(values, dtype="<f4").tobytes()
    if dtype == "float16":
        half = values.astype("<f2")
        if np.isinf(half).any() and np.isfinite(values).all():
            raise BadRequestError(f"tensor {name!r} has values beyond float16's range (|x| > 65504); export in "
                                  f"bfloat16 or float32")
        return half.tobytes()
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")  # round to nearest even
    rounded[np.isnan(values)] = 0x7FC0
    return rounded.tobytes()


def _write_safetensors(path: Path, entries: list[tuple], dtype: str) -> None:
    """Streams [(name, shape, make_values)] into one safetensors file, one tensor in memory at a time."""
    code, size = _DTYPES[dtype], np.dtype(np.float32 if dtype == "float32" else np.float16).itemsize
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in entries:
        end = offset + math.prod(shape) * size
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape, make in entries:
            values = make()
            assert values.shape == tuple(shape), (name, values.shape, shape)
            f.write(_encode(values, dtype, name))
        f.flush()
        os.fsync(f.fileno())


# ---- writing a directory atomically -----------------------------------------------------------------


def _prepare_target(output_dir, overwrite: bool, sources: list[Path]) -> Path:
    final = Path(output_dir).expanduser().absolute()
    for source in sources:
        source = source.resolve()
        if final.resolve() == source or final.resolve() in source.parents:
            raise BadRequestError(f"output directory {final} would replace {source}, which the export reads; "
                                  f"choose another directory")
    if final.exists() and not final.is_dir():
        raise BadRequestError(f"output directory {final} exists and is not a directory")
    if final.is_dir() and any(final.iterdir()) and not overwrite:
        raise ConflictError(f"output directory {final} already exists and is not empty; pass overwrite=True to "
                            f"replace it or choose another directory")
    return final


def _write_dir(final: Path, overwrite: bool, fill) -> Path:
    """Calls fill(tmp) on a hidden temporary directory beside `final`, then renames it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-export-{final.name}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        fill(tmp)
        ckpt._fsync_dir(tmp)
        if final.is_dir() and not any(final.iterdir()):
            final.rmdir()
        if final.exists():
            if not overwrite:  # appeared while we were writing
                raise ConflictError(f"output directory {final} already exists and is not empty; pass overwrite=True")
            ckpt._replace_dir(tmp, final)
        else:
            os.rename(tmp, final)
        ckpt._fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ---- public -----------------------------------------------------------------------------------------


def export_merged(source, output_dir, *, base_model: str | None = None, dtype: str = "float32",
                  overwrite: bool = False) -> Path:
    """Merges the LoRA adapter at `source` (a tinker:// checkpoint path or a PEFT adapter directory)
    into its base model (`base_model`, else the one the checkpoint names) and writes a Hugging Face
    checkpoint directory at `output_dir` in `dtype` ("float32", "bfloat16" or "float16").
    Refuses to replace a non-empty directory unless `overwrite`. Returns the directory."""
    if dtype not in _DTYPES:
        raise BadRequestError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    named_base, rank, params, adapter_dir = _adapter(source)
    base_model = base_model or named_base
    if not base_model:
        raise BadRequestError(f"{source}: the adapter does not name its base model (base_model_name_or_path); "
                              f"pass base_model=")
    spec = model_spec(resolve_model(base_model))  # ModelLoadError (a BadRequestError) when not found
    if _arch.has_vision(spec.arch):  # (a GGUF of one, with or without its mmproj, too)
        raise BadRequestError(f"{base_model!r} is a vision-language model ({spec.arch}); a merged export of it (the "
                              f"vision tower copied beside the merged language model) is not supported yet: export "
                              f"the adapter itself (export_adapter)")
    final = _prepare_target(output_dir, overwrite, [adapter_dir, spec.source.path])
    where = f"adapter {source} on base model {base_model!r}"

    base = {(t[1], t[2], t[9]): t for t in spec.tensors}  # (role, layer, expert)
    if ("rope_freqs", -1, -1) in base:
        raise BadRequestError(f"{spec.source.path}: a GGUF with a rope_freqs tensor (llama3 rope scaling) has no "
                              f"exact Hugging Face config; export from the original Hugging Face checkpoint instead")
    arch = spec.arch
    deltas = _deltas(arch, params, rank, where)
    tied = bool(spec.config["tied_embeddings"])
    unembed = deltas.get(("lm_head", -1, -1))
    if tied and unembed is not None and not np.any(unembed[1]):
        del deltas[("lm_head", -1, -1)]  # a zero output delta: the model stays tied
    untie = tied and ("lm_head", -1, -1) in deltas
    for key, (a, b) in deltas.items():
        target = base.get(("embed", -1, -1) if key == ("lm_head", -1, -1) and tied else key)
        if target is None:
            raise BadRequestError(f"{where}: the adapter changes {_hf_name(arch, *key)}, which the base model lacks "
                                  f"(was the adapter trained on another model?)")
        if tuple(target[7]) != (b.shape[0], a.shape[1]):
            raise BadRequestError(f"{where}: the LoRA delta of {_hf_name(arch, *key)} has shape "
                                  f"{(b.shape[0], a.shape[1])}, but the base tensor {target[0]!r} has shape "
                                  f"{tuple(target[7])} (was the adapter trained on another model?)")

    scale = ckpt.LORA_ALPHA / rank
    entries = []
    for key, t in base.items():
        entries.append((_hf_name(arch, *key), tuple(t[7]),
                        lambda t=t, d=deltas.get(key): _merged(_read_tensor(spec, t), d, scale)))
    if untie:
        embed = base[("embed", -1, -1)]
        entries.append((_hf_name(arch, "lm_head", -1), tuple(embed[7]),
                        lambda: _merged(_read_tensor(spec, embed), deltas[("lm_head", -1, -1)], scale)))

    def fill(tmp: Path):
        _write_safetensors(tmp / "model.safetensors", entries, dtype)
        _write_metadata(spec, tmp, tied and not untie, dtype)

    log.info("exporting %s merged into %s to %s (%s)", source, base_model, final, dtype)
    return _write_dir(final, overwrite, fill)


def export_adapter(source, output_dir, *, overwrite: bool = False) -> Path:
    """Copies the PEFT adapter of `source` (adapter_config.json + adapter_model.safetensors) to
    `output_dir`, for `peft.PeftModel.from_pretrained(model, output_dir)`. Returns the directory."""
    _base, _rank, _params, directory = _adapter(source)  # validates (and for tinker://, verifies) the adapter
    final = _prepare_target(output_dir, overwrite, [directory])

    def fill(tmp: Path):
        for name in (ckpt.ADAPTER_CONFIG, ckpt.ADAPTER_WEIGHTS):
            shutil.copyfile(directory / name, tmp / name)

    return _write_dir(final, overwrite, fill)
