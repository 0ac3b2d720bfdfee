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
               "F": config["d_ff"], "V": config["vocab_size"]}  # fmt: skip
    terms = re.split(r"([*/])", expr)
    value = int(terms[0]) if terms[0].isdigit() else letters[terms[0]]
    for op, term in zip(terms[1::2], terms[2::2]):
        x = int(term) if term.isdigit() else letters[term]
        value = value * x if op == "*" else value // x
    return value


def test_the_engine_lists_the_architectures_the_loader_accepts():
    assert tuple(_C.architectures()) == _models._SUPPORTED_ARCHS == _arch.NAMES
    assert set(_arch.NAMES) >= {"llama", "qwen2", "qwen3"}


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
            for layer in LAYERS if t["per_layer"] else (-1,):
                name = _arch.tensor_name(arch, fmt, t["role"], layer)
                assert "%" not in name
                assert _arch.role_of(arch, fmt, name) == (t["role"], layer), (arch, fmt, name)
                assert seen.setdefault(name, t["role"]) == t["role"], f"{arch}: {name} names two roles"
        # near misses are no tensor at all
        for t in d["tensors"]:
            if t[fmt] and t["per_layer"]:
                prefix, suffix = t[fmt].split("%d")
                for bad in (f"{prefix}x{suffix}", f"{prefix}{suffix}", f"{prefix}1.2{suffix}", f"{prefix}1{suffix}.x",
                            f"{prefix}-1{suffix}", f"{prefix}\u0663{suffix}"):
                    assert _arch.role_of(arch, fmt, bad) is None, (arch, bad)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_targets_round_trip(arch):
    d = _arch.get(arch)
    names = [t["name"] for t in d["lora"]]
    assert names == ["q", "k", "v", "o", "gate", "up", "down", "unembed"]  # lora.c's TK_LORA_* order
    for t in d["lora"]:
        base = _arch.tensor(arch, t["role"])
        assert base is not None and base["per_layer"] == t["per_layer"], (arch, t)
        assert (t["out"], t["in"]) == tuple(base["shape"][-2:]), (arch, t)  # [out, in] of the adapted tensor
        assert t["trained_by"] in ("train_attn", "train_mlp", "train_unembed")
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
    assert _arch.peft_target_modules(arch, True, True, True) == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    assert _arch.peft_target_modules(arch, False, True, False) == ["gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("arch", ARCHS)
def test_descriptor_matches_transformers_and_the_gguf_writer(arch):
    pytest.importorskip("torch")
    tm = pytest.importorskip("tiny_models")
    model = tm.make_hf_model(arch, seed=0)
    config = tm.expected_engine_config(model.config)
    d = _arch.get(arch)
    assert (d["hf_model_type"], d["hf_class"]) == (model.config.model_type, type(model).__name__)
    assert {k: config[k] for k in d["flags"]} == {k: int(v) for k, v in d["flags"].items()}
    state = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    expected = {(t["role"], layer) for t in d["tensors"] if t["when"] != "optional" and _arch.used(t, config)
                for layer in (range(config["n_layers"]) if t["per_layer"] else (-1,))}
    found = {}
    gguf_names = tm._hf_to_gguf_names(arch, model.config)
    for name, shape in state.items():
        role = _arch.role_of(arch, "hf", name)
        assert role is not None, f"{arch}: transformers tensor {name} is not in the descriptor"
        t = _arch.tensor(arch, role[0])
        assert shape == tuple(evaluate(e, config) for e in t["shape"]), (arch, name, shape, t["shape"])
        assert _arch.tensor_name(arch, "gguf", *role) == gguf_names[name]
        found[role] = name
    assert set(found) == expected


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_wraps_the_descriptor_modules(arch):
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    tm = pytest.importorskip("tiny_models")
    model = tm.make_hf_model(arch, seed=0)
    modules = _arch.peft_target_modules(arch, True, True, True)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=modules))
    keys = list(peft.get_peft_model_state_dict(wrapped, save_embedding_layers=False))
    engine = {ckpt.engine_name(k, arch) for k in keys}
    assert None not in engine, [k for k in keys if ckpt.engine_name(k, arch) is None]
    layers = model.config.num_hidden_layers
    per_layer = [t["name"] for t in _arch.get(arch)["lora"] if t["per_layer"]]
    assert engine == {f"layers.{l}.{n}.{ab}" for l in range(layers) for n in per_layer for ab in ("lora_A", "lora_B")} \
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
