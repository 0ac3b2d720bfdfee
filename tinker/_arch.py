"""The architecture descriptors, as the C engine defines them (csrc/model/arch.c, `_C.architectures()`).

Every tensor name, shape, LoRA target and PEFT module name the Python side uses comes from here: the
loader (`_models`), checkpoints (`_checkpoints`), export (`_export`) and restore (`_restore`) keep no
tables of their own. Adding an architecture is one table in arch.c.

A descriptor is a plain dict: name, hf_model_type, hf_class, gguf_name (None: no GGUF form), flags ({config
key: bool}), hf_config (JSON text), tensors (role, per_layer, shape, when, gguf, hf, gguf_rope_rows,
per_expert), lora (name, role, trained_by, peft, per_layer, in, out, per_expert, a_per_expert, b_per_expert),
fused (hf, roles) and vision (name, scope "model" / "block" / "deepstack", hf, shape: the vision tower's tensors
of a vision-language model, which tinker._vision runs). Name patterns hold "%d" for the layer; the Hugging Face name of an expert tensor (per_expert, shape
[E, ...]) holds a second "%d", the expert: those files store one 2-D tensor per expert, GGUF one 3-D tensor per
layer, and a fused form ([E, n * rows, cols], n roles stacked along dimension 1) one 3-D tensor for n roles.
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


def tensor_name(arch: str, fmt: str, role: str, layer: int, expert: int | None = None) -> str:
    """The file name of a tensor ("model.layers.3.self_attn.q_proj.weight", "blk.3.attn_q.weight"); a Hugging
    Face expert tensor's name also needs the expert ("model.layers.3.mlp.experts.5.gate_proj.weight")."""
    pattern = tensor(arch, role)[fmt]
    if layer < 0:
        return pattern
    return pattern % (layer, expert) if pattern.count("%d") == 2 else pattern % layer


def _index(text: str) -> int | None:
    return int(text) if text.isdigit() and text.isascii() else None


def _match(pattern: str, name: str) -> tuple[int, ...] | None:
    """The integers that fill the %d's of `pattern` to give `name`, or None."""
    pieces = pattern.split("%d")
    head, tail = pieces[0], pieces[-1]
    if not (name.startswith(head) and name.endswith(tail)) or len(name) <= len(head) + len(tail):
        return None
    rest, values = name[len(head):len(name) - len(tail)], []
    for piece in pieces[1:-1]:  # a middle piece ends each number but the last
        cut = rest.find(piece)
        if cut <= 0 or _index(rest[:cut]) is None:
            return None
        values.append(_index(rest[:cut]))
        rest = rest[cut + len(piece):]
    if _index(rest) is None:
        return None
    return (*values, _index(rest))


@lru_cache(maxsize=None)
def _name_index(arch: str, fmt: str) -> tuple[dict, tuple]:
    """({model-wide name: role}, ((pattern, role), ...) of the per-layer ones) of one architecture's names in
    one format."""
    model, layer = {}, []
    for t in ARCHS[arch]["tensors"]:
        pattern = t[fmt]
        if pattern is None:
            continue
        if t["per_layer"]:
            layer.append((pattern, t["role"]))
        else:
            model[pattern] = t["role"]
    return model, tuple(layer)


def locate(arch: str, fmt: str, name: str) -> tuple[str, int, int] | None:
    """(role, layer, expert) of a file's tensor name (layer -1 for model-wide tensors; expert -1 unless the
    name is one expert's slice), or None when the architecture has no tensor of that name."""
    model, layer = _name_index(arch, fmt)
    if name in model:
        return model[name], -1, -1
    for pattern, role in layer:
        found = _match(pattern, name)
        if found is not None:
            return role, found[0], found[1] if len(found) > 1 else -1
    return None


def role_of(arch: str, fmt: str, name: str) -> tuple[str, int] | None:
    """(role, layer) of a file's tensor name (layer -1 for model-wide tensors), or None when the
    architecture has no tensor of that name."""
    found = locate(arch, fmt, name)
    return None if found is None else found[:2]


def fused_of(arch: str, name: str) -> tuple[tuple[str, ...], int] | None:
    """(roles, layer) of a Hugging Face fused expert tensor's name, or None."""
    for f in ARCHS[arch]["fused"]:
        found = _match(f["hf"], name)
        if found is not None:
            return tuple(f["roles"]), found[0]
    return None


def layer_is_moe(config: dict, layer: int) -> bool:
    """Whether layer `layer`'s MLP is the mixture of experts (weights.c's tk_model_layer_is_moe)."""
    if not config.get("moe") or config.get("n_experts", 0) <= 0:
        return False
    step = config.get("decoder_sparse_step", 1)
    return layer not in config.get("mlp_only_layers", ()) and step > 0 and (layer + 1) % step == 0


def used(t: dict, config: dict, layer: int = -1) -> bool:
    """Whether a configuration uses the tensor in a layer, or (layer -1) in some layer (arch.c's
    tk_arch_used, on the engine config dict)."""
    when = t["when"]
    if when in ("always", "optional"):
        return True
    if when == "untied":
        return not config["tied_embeddings"]
    if when in ("dense_mlp", "moe"):
        layers = [layer] if layer >= 0 else range(config["n_layers"])
        return any(layer_is_moe(config, l) == (when == "moe") for l in layers)
    return bool(config[when])  # qkv_bias, qk_norm: the config key of the same name


def required_roles(arch: str, config: dict) -> list[tuple[str, int]]:
    """(role, layer) of every tensor the config needs, model-wide first (layer -1)."""
    needed = [t for t in ARCHS[arch]["tensors"] if t["when"] != "optional"]
    return ([(t["role"], -1) for t in needed if not t["per_layer"] and used(t, config)] +
            [(t["role"], layer) for layer in range(config["n_layers"]) for t in needed
             if t["per_layer"] and used(t, config, layer)])


_LETTERS = {"D": "d_model", "H": "n_heads", "Hkv": "n_kv_heads", "Dh": "head_dim", "F": "d_ff", "V": "vocab_size",
            "E": "n_experts", "Fe": "d_ff_expert"}  # arch.h's shape letters: engine config keys


def shape_of(arch: str, role: str, config: dict) -> tuple[int, ...]:
    """A tensor's shape for an engine config (arch.c's tk_arch_shape: products and quotients of letters)."""
    dims = []
    for expr in tensor(arch, role)["shape"]:
        terms = re.split(r"([*/])", expr)
        value = 1
        for op, term in zip(["*", *terms[1::2]], terms[0::2]):
            x = int(term) if term.isdigit() else int(config.get(_LETTERS[term], 0))
            value = value * x if op == "*" else value // x
        dims.append(value)
    return tuple(dims)


def tensor_ranks(arch: str) -> list[int]:
    """The numbers of dimensions the architecture's tensors have, ascending."""
    return sorted({len(t["shape"]) for t in ARCHS[arch]["tensors"]})


# ---- vision towers -------------------------------------------------------------------------------------


def has_vision(arch: str) -> bool:
    """Whether the architecture reads images (a vision tower before its language model)."""
    return bool(ARCHS[arch]["flags"].get("vision"))


def vision_tensor(arch: str, name: str) -> dict | None:
    return next((t for t in ARCHS[arch]["vision"] if t["name"] == name), None)


def vision_tensor_name(arch: str, name: str, index: int = -1) -> str:
    """The file name of a vision tower tensor; `index` is the block or deepstack merger where the name has one."""
    pattern = vision_tensor(arch, name)["hf"]
    return pattern % index if "%d" in pattern else pattern


def locate_vision(arch: str, name: str) -> tuple[str, int] | None:
    """(vision tensor name, block or deepstack index, -1 for model-wide) of a file's tensor name, or None."""
    for t in ARCHS[arch]["vision"]:
        if "%d" not in t["hf"]:
            if t["hf"] == name:
                return t["name"], -1
            continue
        found = _match(t["hf"], name)
        if found is not None:
            return t["name"], found[0]
    return None


def vision_shape(arch: str, name: str, letters: dict[str, int]) -> tuple[int, ...]:
    """A vision tensor's shape from its expression ("3*Dv,Dv") and the vision config's letters (arch.h)."""
    dims = []
    for expr in vision_tensor(arch, name)["shape"].split(","):
        value = 1
        for term in expr.split("*"):
            value *= int(term) if term.isdigit() else int(letters[term])
        dims.append(value)
    return tuple(dims)


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


@lru_cache(maxsize=None)
def _expert_peft_patterns(arch: str | None) -> tuple[tuple[re.Pattern, str], ...]:
    """(module regex with groups layer and expert, target name) of the per-expert PEFT modules of the experts'
    LoRA targets: each expert's own nn.Linear in transformers 4.x ("model.layers.%d.mlp.experts.%d.gate_proj",
    its Hugging Face tensor name without ".weight"), where PEFT puts an independent pair per expert."""
    out = []
    for a in [ARCHS[arch]] if arch else ARCHS.values():
        for t in a["lora"]:
            if not t["per_expert"]:
                continue
            module = tensor(a["name"], t["role"])["hf"].removesuffix(".weight")
            out.append((re.compile(re.escape(module).replace("%d", r"(\d+)"), re.ASCII), t["name"]))
    return tuple(out)


def target_of_expert_peft_module(module: str, arch: str | None = None) -> tuple[str, int, int] | None:
    """(target, layer, expert) of a per-expert PEFT module name ("model.layers.3.mlp.experts.5.down_proj" ->
    ("exp_down", 3, 5)), or None."""
    for regex, name in _expert_peft_patterns(arch):
        m = regex.fullmatch(module)
        if m:
            return name, int(m.group(1)), int(m.group(2))
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
