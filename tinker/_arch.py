"""The architecture descriptors, as the C engine defines them (csrc/model/arch.c, `_C.architectures()`).

Every tensor name, shape, LoRA target and PEFT module name the Python side uses comes from here: the
loader (`_models`), checkpoints (`_checkpoints`), export (`_export`) and restore (`_restore`) keep no
tables of their own. Adding an architecture is one table in arch.c.

A descriptor is a plain dict: name, hf_model_type, hf_class, gguf_name, flags ({config key: bool}),
hf_config (JSON text), tensors (role, per_layer, shape, when, gguf, hf, gguf_rope_rows) and lora
(name, role, trained_by, peft, per_layer, in, out). Name patterns hold "%d" for the layer.
"""

from __future__ import annotations

import re
from functools import lru_cache

from . import _C

ARCHS: dict[str, dict] = _C.architectures()
NAMES: tuple[str, ...] = tuple(ARCHS)
FORMATS = ("hf", "gguf")  # the name patterns each tensor has


def get(name: str) -> dict:
    return ARCHS[name]


def by_key(key: str, value) -> dict | None:
    """The descriptor whose `key` (hf_model_type, gguf_name) is `value`, or None."""
    return next((a for a in ARCHS.values() if isinstance(value, str) and a[key] == value), None)


# ---- tensors ---------------------------------------------------------------------------------------


def tensor(arch: str, role: str) -> dict | None:
    return next((t for t in ARCHS[arch]["tensors"] if t["role"] == role), None)


def tensor_name(arch: str, fmt: str, role: str, layer: int) -> str:
    """The file name of a tensor ("model.layers.3.self_attn.q_proj.weight", "blk.3.attn_q.weight")."""
    pattern = tensor(arch, role)[fmt]
    return pattern % layer if layer >= 0 else pattern


@lru_cache(maxsize=None)
def _name_index(arch: str, fmt: str) -> tuple[dict, dict]:
    """({model-wide name: role}, {(layer prefix, suffix): role}) of one architecture's names in one format."""
    model, layer = {}, {}
    for t in ARCHS[arch]["tensors"]:
        pattern = t[fmt]
        if pattern is None:
            continue
        if t["per_layer"]:
            prefix, suffix = pattern.split("%d")
            layer[(prefix, suffix)] = t["role"]
        else:
            model[pattern] = t["role"]
    return model, layer


def role_of(arch: str, fmt: str, name: str) -> tuple[str, int] | None:
    """(role, layer) of a file's tensor name (layer -1 for model-wide tensors), or None when the
    architecture has no tensor of that name."""
    model, layer = _name_index(arch, fmt)
    if name in model:
        return model[name], -1
    for (prefix, suffix), role in layer.items():
        if name.startswith(prefix) and name.endswith(suffix) and len(name) > len(prefix) + len(suffix):
            index = name[len(prefix):len(name) - len(suffix)]
            if index.isdigit() and index.isascii():
                return role, int(index)
    return None


def used(t: dict, config: dict) -> bool:
    """Whether a configuration uses the tensor (arch.c's tk_arch_used, on the engine config dict)."""
    when = t["when"]
    if when in ("always", "optional"):
        return True
    if when == "untied":
        return not config["tied_embeddings"]
    return bool(config[when])  # qkv_bias, qk_norm: the config key of the same name


def required_roles(arch: str, config: dict) -> list[tuple[str, int]]:
    """(role, layer) of every tensor the config needs, model-wide first (layer -1)."""
    needed = [t for t in ARCHS[arch]["tensors"] if t["when"] != "optional" and used(t, config)]
    return ([(t["role"], -1) for t in needed if not t["per_layer"]] +
            [(t["role"], layer) for layer in range(config["n_layers"]) for t in needed if t["per_layer"]])


def tensor_ranks(arch: str) -> list[int]:
    """The numbers of dimensions the architecture's tensors have, ascending."""
    return sorted({len(t["shape"]) for t in ARCHS[arch]["tensors"]})


# ---- LoRA targets and PEFT names ----------------------------------------------------------------------


def lora_target(arch: str, name: str) -> dict | None:
    return next((t for t in ARCHS[arch]["lora"] if t["name"] == name), None)


def peft_module(arch: str, target: str, layer: int) -> str:
    """The PEFT module a LoRA target wraps ("model.layers.3.self_attn.q_proj", "lm_head")."""
    pattern = lora_target(arch, target)["peft"]
    return pattern % layer if layer >= 0 else pattern


@lru_cache(maxsize=None)
def _peft_patterns(arch: str | None) -> tuple[tuple[re.Pattern, str], ...]:
    """(module regex, target name) of one architecture, or of all (a PEFT module names one target whatever
    the model: checked here)."""
    seen: dict[str, str] = {}
    for a in [ARCHS[arch]] if arch else ARCHS.values():
        for t in a["lora"]:
            if seen.setdefault(t["peft"], t["name"]) != t["name"]:
                raise AssertionError(f"PEFT module {t['peft']!r} is LoRA target {seen[t['peft']]!r} in one "
                                     f"architecture and {t['name']!r} in another")
    return tuple((re.compile(re.escape(p).replace("%d", r"(\d+)"), re.ASCII), name) for p, name in seen.items())


def target_of_peft_module(module: str, arch: str | None = None) -> tuple[str, int] | None:
    """(target, layer) of a PEFT module name (layer -1 for a model-wide one, the unembedding) in the given
    architecture or, without one, in any; None when the engine trains no such module."""
    for regex, name in _peft_patterns(arch):
        m = regex.fullmatch(module)
        if m:
            return name, int(m.group(1)) if m.groups() else -1
    return None


def trained_by(target: str, arch: str | None = None) -> str:
    """The LoRA config flag (train_attn / train_mlp / train_unembed) that trains a target in the given
    architecture or, without one, in every architecture that has it (they agree: checked here)."""
    archs = [ARCHS[arch]] if arch else ARCHS.values()
    flags = {t["trained_by"] for a in archs for t in a["lora"] if t["name"] == target}
    if len(flags) != 1:
        raise KeyError(f"LoRA target {target!r} is trained by {sorted(flags) or 'no flag'}")
    return flags.pop()


def peft_target_modules(arch: str, train_attn: bool, train_mlp: bool, train_unembed: bool) -> list[str]:
    """adapter_config.json's target_modules: the leaf names of the trained modules, in the table's order."""
    flags = {"train_attn": train_attn, "train_mlp": train_mlp, "train_unembed": train_unembed}
    return [t["peft"].rsplit(".", 1)[-1] for t in ARCHS[arch]["lora"] if flags[t["trained_by"]]]
