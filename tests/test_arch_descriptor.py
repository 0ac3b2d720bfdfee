"""The architecture descriptors (csrc/model/arch.c, read through tinker._arch) are the one source of names.

1. Round trips per architecture: every Hugging Face and GGUF tensor name maps to its role and layer and
   back; every PEFT module name maps to its LoRA target and back, through the checkpoint key functions too.
2. Against independent references: a tiny transformers model of each architecture has exactly the
   descriptor's HF names with the shapes its expressions give for the engine config; the GGUF names agree
   with the test suite's own llama.cpp-style writer (tiny_models); peft wraps exactly the descriptor's
   PEFT modules, and its adapter keys map to the engine's LoRA tensor names.
3. The loader, checkpoints and export use the descriptors: no copy of a tensor name, PEFT module or
   architecture class remains in tinker/ or csrc/ outside the descriptor (grep).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tinker import _C, _arch
from tinker import _checkpoints as ckpt
from tinker import _models

ROOT = Path(__file__).resolve().parent.parent
LAYERS = (0, 1, 7, 123)
ARCHS = list(_arch.NAMES)


def evaluate(expr: str, config: dict) -> int:
    """A shape expression's value (arch.h: products and quotients of config letters and integers)."""
    letters = {"D": config["d_model"], "H": config["n_heads"], "Hkv": config["n_kv_heads"], "Dh": config["head_dim"],
               "F": config["d_ff"], "V": config["vocab_size"], "E": config.get("n_experts", 0),
               "Fe": config.get("d_ff_expert", 0)}  # fmt: skip
    terms = re.split(r"([*/])", expr)
    value = int(terms[0]) if terms[0].isdigit() else letters[terms[0]]
    for op, term in zip(terms[1::2], terms[2::2]):
        x = int(term) if term.isdigit() else letters[term]
        value = value * x if op == "*" else value // x
    return value


def test_the_engine_lists_the_architectures_the_loader_accepts():
    assert tuple(_C.architectures()) == _models._SUPPORTED_ARCHS == _arch.NAMES
    assert set(_arch.NAMES) >= {"llama", "qwen2", "qwen3", "qwen3moe", "qwen3vl"}


def _layer_and_expert(t: dict, fmt: str):
    """(layer, expert) pairs to name a tensor with: experts only where the name has their %d."""
    layers = LAYERS if t["per_layer"] else (-1,)
    experts = (0, 5, 127) if t[fmt] and t[fmt].count("%d") == 2 else (-1,)
    return [(layer, expert) for layer in layers for expert in experts]


@pytest.mark.parametrize("arch", ARCHS)
def test_tensor_names_round_trip(arch):
    d = _arch.get(arch)
    roles = [t["role"] for t in d["tensors"]]
    assert len(roles) == len(set(roles)), f"{arch}: a role appears twice"
    for fmt in _arch.FORMATS:
        seen = {}
        for t in d["tensors"]:
            if t[fmt] is None:
                continue
            assert ("%d" in t[fmt]) == t["per_layer"], (arch, fmt, t)
            # an expert tensor's Hugging Face name is one expert's (a second %d); its GGUF name the layer's 3-D one
            assert t[fmt].count("%d") == t["per_layer"] + (fmt == "hf" and t["per_expert"]), (arch, fmt, t)
            for layer, expert in _layer_and_expert(t, fmt):
                name = _arch.tensor_name(arch, fmt, t["role"], layer, expert)
                assert "%" not in name
                assert _arch.locate(arch, fmt, name) == (t["role"], layer, expert), (arch, fmt, name)
                assert _arch.role_of(arch, fmt, name) == (t["role"], layer), (arch, fmt, name)
                assert seen.setdefault(name, t["role"]) == t["role"], f"{arch}: {name} names two roles"
        # near misses are no tensor at all
        for t in d["tensors"]:
            if t[fmt] and t["per_layer"]:
                prefix, suffix = t[fmt].split("%d", 1)
                suffix = suffix.replace("%d", "3")
                for bad in (f"{prefix}x{suffix}", f"{prefix}{suffix}", f"{prefix}1.2{suffix}", f"{prefix}1{suffix}.x",
                            f"{prefix}-1{suffix}", f"{prefix}\u0663{suffix}"):
                    assert _arch.role_of(arch, fmt, bad) is None, (arch, bad)
    for f in d["fused"]:  # transformers 5.x's 3-D expert parameters: roles of one shape, named by layer
        assert f["hf"].count("%d") == 1 and len(f["roles"]) >= 1, (arch, f)
        assert len({tuple(_arch.tensor(arch, r)["shape"]) for r in f["roles"]}) == 1, (arch, f)
        assert all(_arch.tensor(arch, r)["per_expert"] for r in f["roles"]), (arch, f)
        for layer in LAYERS:
            assert _arch.fused_of(arch, f["hf"] % layer) == (tuple(f["roles"]), layer)
            assert _arch.locate(arch, "hf", f["hf"] % layer) is None


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_targets_round_trip(arch):
    d = _arch.get(arch)
    names = [t["name"] for t in d["lora"]]
    experts = ["exp_gate", "exp_up", "exp_down"] if d["flags"]["moe"] else []
    assert names == ["q", "k", "v", "o", "gate", "up", "down", *experts, "unembed"]  # lora.c's TK_LORA_* order
    for t in d["lora"]:
        base = _arch.tensor(arch, t["role"])
        assert base is not None and base["per_layer"] == t["per_layer"], (arch, t)
        assert (t["out"], t["in"]) == tuple(base["shape"][-2:]), (arch, t)  # [out, in] of the adapted tensor
        assert t["trained_by"] in ("train_attn", "train_mlp", "train_unembed")
        assert t["per_expert"] == base["per_expert"], (arch, t)
        if t["per_expert"]:
            # Tinker's shared-outer layout: the factor touching the model width is shared, the other per expert
            touches_width = "A" if t["in"] == "D" else "B"
            assert (t["a_per_expert"], t["b_per_expert"]) == (touches_width == "B", touches_width == "A"), (arch, t)
            assert t["peft"].rsplit(".", 1)[-1] in ("w1", "w2", "w3"), (arch, t)  # Tinker's module names
            continue
        assert not t["a_per_expert"] and not t["b_per_expert"], (arch, t)
        # PEFT wraps the module whose weight is the adapted tensor
        assert base["hf"] == t["peft"] + ".weight", (arch, t)
        for layer in LAYERS if t["per_layer"] else (-1,):
            module = _arch.peft_module(arch, t["name"], layer)
            assert _arch.target_of_peft_module(module, arch) == (t["name"], layer)
            assert _arch.target_of_peft_module(module) == (t["name"], layer)
            for ab in ("lora_A", "lora_B"):
                engine = f"layers.{layer}.{t['name']}.{ab}" if layer >= 0 else f"{t['name']}.{ab}"
                key = ckpt.peft_key(engine, arch)
                assert key == f"base_model.model.{module}.{ab}.weight"
                assert ckpt.engine_name(key, arch) == ckpt.engine_name(key) == engine
    assert ckpt.engine_name("base_model.model.model.layers.0.mlp.gate.lora_A.weight") is None  # the router
    tinker_experts = ["w1", "w3", "w2"] if experts else []
    assert _arch.peft_target_modules(arch, True, True, True) == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", *tinker_experts, "lm_head"]
    assert _arch.peft_target_modules(arch, False, True, False) == ["gate_proj", "up_proj", "down_proj",
                                                                  *tinker_experts]


@pytest.mark.parametrize("arch", ARCHS)
def test_descriptor_matches_transformers_and_the_gguf_writer(arch):
    pytest.importorskip("torch")
    tm = pytest.importorskip("tiny_models")
    kwargs = {"layers": 3, "mlp_only_layers": [1]} if arch == "qwen3moe" else {}  # a dense layer among experts
    model = tm.make_hf_model(arch, seed=0, **kwargs)
    config = tm.expected_engine_config(model.config)
    config["mlp_only_layers"] = list(getattr(model.config, "mlp_only_layers", []))
    config["decoder_sparse_step"] = getattr(model.config, "decoder_sparse_step", 1)
    d = _arch.get(arch)
    assert (d["hf_model_type"], d["hf_class"]) == (model.config.model_type, type(model).__name__)
    assert {k: config[k] for k in d["flags"]} == {k: int(v) for k, v in d["flags"].items()}
    state = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    expected = {(t["role"], layer) for t in d["tensors"] if t["when"] != "optional"
                for layer in (range(config["n_layers"]) if t["per_layer"] else (-1,)) if _arch.used(t, config, layer)}
    found, vision_found = {}, set()
    gguf_names = tm.gguf_names(arch, model.config) if d["gguf_name"] else {}
    if d["flags"]["vision"]:  # the vision tower's tensors, with the shapes the descriptor's expressions give
        v = model.config.vision_config
        letters = {"Dv": v.hidden_size, "Fv": v.intermediate_size, "C": v.in_channels, "Tp": v.temporal_patch_size,
                   "P": v.patch_size, "Np": v.num_position_embeddings, "S": v.spatial_merge_size,
                   "O": v.out_hidden_size}  # fmt: skip
        for name in [n for n in state if _arch.locate_vision(arch, n)]:
            vname, index = _arch.locate_vision(arch, name)
            assert _arch.vision_tensor_name(arch, vname, index) == name
            assert state.pop(name) == _arch.vision_shape(arch, vname, letters), (arch, name)
            vision_found.add((vname, index))
        counts = {"model": [-1], "block": range(v.depth), "deepstack": range(len(v.deepstack_visual_indexes))}
        assert vision_found == {(t["name"], i) for t in d["vision"] for i in counts[t["scope"]]}
    for name, shape in state.items():
        fused = _arch.fused_of(arch, name)
        if fused is not None:  # transformers 5.x holds the experts as 3-D [E, n rows, cols] parameters
            roles, layer = fused
            per_role = [tuple(evaluate(e, config) for e in _arch.tensor(arch, r)["shape"]) for r in roles]
            assert shape == (per_role[0][0], sum(p[1] for p in per_role), per_role[0][2]), (arch, name, shape)
            found.update({(r, layer): name for r in roles})
            continue
        role = _arch.role_of(arch, "hf", name)
        assert role is not None, f"{arch}: transformers tensor {name} is not in the descriptor"
        t = _arch.tensor(arch, role[0])
        assert shape == tuple(evaluate(e, config) for e in t["shape"]), (arch, name, shape, t["shape"])
        if d["gguf_name"]:
            assert _arch.tensor_name(arch, "gguf", *role) == gguf_names[name]
        else:
            assert all(t["gguf"] is None for t in d["tensors"]), f"{arch} has no GGUF form but GGUF names"
        found[role] = name
    assert set(found) == expected


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_wraps_the_descriptor_modules(arch):
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    tm = pytest.importorskip("tiny_models")
    kwargs = {"layers": 3, "mlp_only_layers": [1]} if arch == "qwen3moe" else {}
    model = tm.make_hf_model(arch, seed=0, **kwargs)
    d = _arch.get(arch)
    # PEFT wraps nn.Linear modules: the experts' 3-D parameters (Tinker's w1 / w2 / w3) are not among them
    modules = [m for t in d["lora"] if not t["per_expert"] for m in [t["peft"].rsplit(".", 1)[-1]]]
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=modules))
    keys = list(peft.get_peft_model_state_dict(wrapped, save_embedding_layers=False))
    # On a Qwen3-MoE model peft 0.21 turns gate_proj / up_proj / down_proj into its own adapter of the 3-D experts
    # ("mlp.experts.base_layer" keys: one adapter over gate|up, not Tinker's layout, which test_qwen3_moe.py
    # checks) and then wraps no dense MLP module at all: only attention and lm_head are peft's to compare here
    # (the dense MLP's names round-trip in test_lora_targets_round_trip).
    keys = [k for k in keys if ".mlp.experts." not in k]
    engine = {ckpt.engine_name(k, arch) for k in keys}
    assert None not in engine, [k for k in keys if ckpt.engine_name(k, arch) is None]
    config = {**tm.expected_engine_config(model.config), "mlp_only_layers": list(kwargs.get("mlp_only_layers", []))}
    layers = getattr(model.config, "text_config", model.config).num_hidden_layers  # (a VL model's language model)
    per_layer = [t for t in d["lora"] if t["per_layer"] and not t["per_expert"]
                 and not (d["flags"]["moe"] and t["trained_by"] == "train_mlp")]
    assert engine == {f"layers.{l}.{t['name']}.{ab}" for l in range(layers) for t in per_layer
                      if _arch.used(_arch.tensor(arch, t["role"]), config, l) for ab in ("lora_A", "lora_B")} \
        | {"unembed.lora_A", "unembed.lora_B"}


def test_export_config_extras_are_json():
    for d in _arch.ARCHS.values():
        extras = json.loads(d["hf_config"])
        assert isinstance(extras, dict), d["name"]


# ---- no stray copies ---------------------------------------------------------------------------------


def _fragments() -> set[str]:
    """Name pieces only the descriptor should spell: tensor names without their layer prefix, PEFT module
    paths, architecture classes."""
    out = set()
    for d in _arch.ARCHS.values():
        out.add(d["hf_class"])
        for t in d["tensors"]:
            for fmt in _arch.FORMATS:
                if t[fmt]:
                    out.add(t[fmt].split("%d.")[-1])
        for t in d["lora"]:
            if t["per_layer"]:
                out.add(t["peft"].split("%d.")[-1])
        for f in d["fused"]:
            out.add(f["hf"].split("%d.")[-1])
    return out


def test_no_stray_copies_of_the_names():
    fragments = _fragments()
    assert {"self_attn.q_proj.weight", "attn_q.weight", "token_embd.weight", "lm_head.weight", "mlp.down_proj",
            "LlamaForCausalLM"} <= fragments
    sources = [p for p in (ROOT / "tinker").rglob("*.py") if p.name != "_arch.py"]
    sources += [p for p in (ROOT / "csrc").rglob("*.[ch]") if p.name not in ("arch.c", "arch.h")]
    stray = [f"{p.relative_to(ROOT)}: {f}" for p in sources for f in fragments if f in p.read_text()]
    assert not stray, "names outside the architecture descriptor:\n" + "\n".join(stray)
    # the C role and LoRA target names live in arch.c only (as string literals: comments may cite them)
    for p in sources:
        if p.suffix in (".c", ".h"):
            text = re.sub(r"/\*.*?\*/", "", p.read_text(), flags=re.S)
            for word in ("embed", "final_norm", "q_bias", "mlp_norm", "gate", "down", "unembed"):
                assert f'"{word}"' not in text, f"{p.relative_to(ROOT)} spells the name {word!r}"


def test_the_python_side_keeps_no_name_tables():
    for module in ("_models", "_checkpoints", "_export", "_restore"):
        text = (ROOT / "tinker" / f"{module}.py").read_text()
        for table in ("_HF_LAYER", "_HF_GLOBAL", "_GGUF_LAYER", "_GGUF_GLOBAL", "_MODULES", "_ATTN", "_MLP",
                      "_HF_ARCHITECTURES", "_ROLE_GLOBAL", "_ROLE_LAYER"):
            assert not re.search(rf"\b{table}\b", text), f"tinker/{module}.py still has {table}"
        if module != "_restore":
            assert "_arch." in text, f"tinker/{module}.py does not use the descriptors"
