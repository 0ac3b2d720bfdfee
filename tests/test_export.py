"""Merged Hugging Face export: transformers, on the exported directory, computes what the engine
computes through the adapter.

Adapters are trained through the public API (two AdamW steps at lr 1e-2 on random tokens, so every
LoRA B is far from zero), saved with save_weights_for_sampler and exported. Tolerances:
|Δlogit| <= 1e-4 · max(1, |logit|) on the tiny models (float32 summation order and one rounding of
each merged weight) and 1e-3 on SmolLM2 (large hidden states, as in test_forward_smollm2.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tinker  # noqa: E402
from tinker import types  # noqa: E402
from tinker._engine import load_model  # noqa: E402
from tinker._export import export_adapter, export_merged  # noqa: E402
from tinker._models import DEFAULT_MODEL  # noqa: E402

from tiny_models import make_hf_checkpoint, shard_files  # noqa: E402

CASES = {
    "llama": dict(arch="llama"),
    "llama-tied": dict(arch="llama", tied=True),
    "qwen2-bf16-sharded": dict(arch="qwen2", dtype=torch.bfloat16, max_shard_size=200_000),
    "qwen3-tied": dict(arch="qwen3", tied=True),
}


@dataclass
class Trained:
    base: Path
    client: tinker.TrainingClient
    path: str  # tinker:// sampler checkpoint


@pytest.fixture(scope="module", autouse=True)
def store(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("store")
        mp.setenv("TINKER_HOME", str(root))
        yield root


@pytest.fixture(scope="module")
def service():
    return tinker.ServiceClient()


def datum(tokens) -> types.Datum:
    tokens = [int(t) for t in tokens]
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})


def train(service, base_model: str, vocab: int, lr: float = 1e-2, steps: int = 2):
    tc = service.create_lora_training_client(base_model, rank=4, seed=0)
    rng = np.random.default_rng(0)
    data = [datum(rng.integers(0, vocab, size=17)) for _ in range(4)]
    for _ in range(steps):
        tc.forward_backward(data, "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=lr))
    return tc, tc.save_weights_for_sampler("x").result().path


@pytest.fixture(scope="module")
def trained(service, tmp_path_factory):
    cache = {}

    def get(case: str) -> Trained:
        if case not in cache:
            base, _ = make_hf_checkpoint(tmp_path_factory.mktemp(case), **CASES[case])
            tc, path = train(service, str(base), vocab=512)
            cache[case] = Trained(base, tc, path)
        return cache[case]

    return get


def engine_logits(tc, seqs) -> list[np.ndarray]:
    """Our engine's logits through the client's current adapter weights."""
    model = tc._adapter.model
    return [x.copy() for x in model.forward_logits(seqs, adapter=tc._adapter.snapshot().handle)]


def hf_model(directory, dtype=None):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=dtype or torch.float32, attn_implementation="eager").eval()


def hf_logits(model, seqs) -> list[np.ndarray]:
    with torch.no_grad():
        return [model(torch.tensor(np.asarray(s, dtype=np.int64))[None]).logits[0].float().numpy() for s in seqs]


def max_rel_err(ours, theirs) -> float:
    return max(float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b)))) for a, b in zip(ours, theirs))


def safetensors_names(directory) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(Path(directory) / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


# ---- (a) tiny checkpoints of each architecture -----------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_merged_logits_equal_engine(trained, tmp_path, case):
    t = trained(case)
    if case.startswith("qwen2"):
        assert len(shard_files(t.base)) > 1  # the base is sharded bf16
    out = export_merged(t.path, tmp_path / "merged")
    seqs = [np.random.default_rng(i).integers(0, 512, size=n) for i, n in enumerate((24, 5))]
    ours = engine_logits(t.client, seqs)
    model = hf_model(out)
    err = max_rel_err(ours, hf_logits(model, seqs))
    assert err <= 1e-4, f"{case}: relative logit error {err:.2e}"

    # the adapter matters: the merged model is not the base model
    base = load_model(str(t.base)).forward_logits(seqs)
    assert max_rel_err(ours, base) > 1e-2

    config = json.loads((out / "config.json").read_text())
    tied = CASES[case].get("tied", False)
    # the trained unembedding adapter changes the output projection only: a tied base is untied
    assert config["tie_word_embeddings"] is False and "lm_head.weight" in safetensors_names(out)
    if tied:
        base_model = hf_model(t.base)
        torch.testing.assert_close(model.model.embed_tokens.weight, base_model.model.embed_tokens.weight,
                                   rtol=0, atol=0)
        assert not torch.equal(model.lm_head.weight, base_model.lm_head.weight)


def test_fresh_adapter_keeps_tied_base(service, trained, tmp_path):
    base = trained("llama-tied").base
    tc = service.create_lora_training_client(str(base), rank=4, seed=1)
    out = export_merged(tc.save_weights_for_sampler("fresh").result().path, tmp_path / "merged")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in safetensors_names(out)
    merged, original = hf_model(out).state_dict(), hf_model(base).state_dict()
    assert merged.keys() == original.keys()
    for key in merged:
        assert torch.equal(merged[key], original[key]), key  # B = 0: the base, bit for bit


@pytest.mark.parametrize("dtype,torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_half_precision_export_rounds_like_torch(trained, tmp_path, dtype, torch_dtype):
    t = trained("llama")
    full = hf_model(export_merged(t.path, tmp_path / "f32")).state_dict()
    out = export_merged(t.path, tmp_path / dtype, dtype=dtype)
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == dtype
    half = hf_model(out, dtype=torch_dtype).state_dict()
    for key in full:
        assert half[key].dtype == torch_dtype
        assert torch.equal(half[key], full[key].to(torch_dtype)), key


# ---- (c) the PEFT adapter ------------------------------------------------------------------------------


def test_exported_adapter_loads_in_peft_and_equals_merged(trained, tmp_path):
    peft = pytest.importorskip("peft")
    t = trained("llama")
    adapter_dir = export_adapter(t.path, tmp_path / "adapter")
    assert sorted(p.name for p in adapter_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    merged = hf_model(export_merged(t.path, tmp_path / "merged"))
    model = peft.PeftModel.from_pretrained(hf_model(t.base), str(adapter_dir)).eval()
    seqs = [np.random.default_rng(3).integers(0, 512, size=20)]
    err = max_rel_err(hf_logits(model, seqs), hf_logits(merged, seqs))
    assert err <= 1e-4, err
    # peft's own merge gives the same weights
    merged_by_peft = model.merge_and_unload().state_dict()
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(merged_by_peft[key], value, rtol=1e-6, atol=1e-6)
    # and the PEFT directory is itself a source: the same merged checkpoint
    again = hf_model(export_merged(adapter_dir, tmp_path / "from_peft_dir", base_model=str(t.base))).state_dict()
    for key, value in merged.state_dict().items():
        assert torch.equal(again[key], value), key


# ---- (b) the default model (Q4_1 GGUF) -------------------------------------------------------------


def test_smollm2_merged_logits_and_tokenizer(service, smollm2, tmp_path):
    tc, path = train(service, DEFAULT_MODEL, vocab=smollm2.vocab_size, lr=1e-3)
    out = export_merged(path, tmp_path / "smollm2-merged")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is False
    assert (config["rope_theta"], config["max_position_embeddings"], config["eos_token_id"]) == (100000.0, 8192, 2)

    tok = smollm2.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=False)
    seqs = [tok.encode(prompt), np.random.default_rng(0).integers(0, smollm2.vocab_size, size=64)]
    ours = engine_logits(tc, seqs)
    model = hf_model(out)
    err = max_rel_err(ours, hf_logits(model, seqs))
    assert err <= 1e-3, f"relative logit error {err:.2e}"
    assert max_rel_err(ours, smollm2.forward_logits(seqs)) > 1e-2  # the adapter matters
    del model

    exported = transformers.AutoTokenizer.from_pretrained(str(out))
    texts = ["Hello world! 123", "The capital of France is", "<|im_start|>user\nhi<|im_end|>\n",
             "  spaces\tand\nnewlines  ", "émojis 🤗 and ünïcode, 3.14159", prompt]
    for text in texts:
        assert exported.encode(text) == tok.encode(text), text
        assert exported.decode(tok.encode(text)) == tok.decode(tok.encode(text)), text
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert exported.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(messages, tokenize=False)
    assert (exported.bos_token, exported.eos_token) == (tok.bos_token, tok.eos_token)


def test_smollm2_fresh_adapter_export_equals_transformers_gguf_loader(service, smollm2_gguf_path, tmp_path):
    """B = 0: the export is the base model, and it holds what transformers' own GGUF loader makes of the
    file (dequantised weights, q/k rows un-permuted, tied embeddings)."""
    tc = service.create_lora_training_client(DEFAULT_MODEL, rank=2, seed=0)
    out = export_merged(tc.save_weights_for_sampler("fresh").result().path, tmp_path / "smollm2-base")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    ours = hf_model(out).state_dict()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf_path.parent), gguf_file=smollm2_gguf_path.name, dtype=torch.float32).state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)


# ---- (d) errors ------------------------------------------------------------------------------------------


def test_bad_sources(tmp_path):
    with pytest.raises(tinker.BadRequestError, match="not a valid tinker:// checkpoint path"):
        export_merged("tinker://", tmp_path / "out")
    with pytest.raises(tinker.NotFoundError, match="not found"):
        export_merged("tinker://no-such-run/sampler_weights/x", tmp_path / "out")
    with pytest.raises(tinker.BadRequestError, match="neither a tinker:// checkpoint path nor a PEFT adapter"):
        export_merged(tmp_path / "nothing-here", tmp_path / "out")
    with pytest.raises(tinker.BadRequestError, match="neither"):
        export_adapter(str(tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_base_models_and_options(trained, tmp_path):
    t = trained("llama")
    adapter_dir = export_adapter(t.path, tmp_path / "adapter")
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "base_model_name_or_path": "no-such-org/no-such-model"}))
    with pytest.raises(tinker.BadRequestError, match="Cannot find base model 'no-such-org/no-such-model'"):
        export_merged(adapter_dir, tmp_path / "out")
    with pytest.raises(tinker.BadRequestError, match="has shape .*trained on another model"):
        export_merged(t.path, tmp_path / "out", base_model=str(trained("qwen3-tied").base))
    with pytest.raises(tinker.BadRequestError, match="dtype must be one of"):
        export_merged(t.path, tmp_path / "out", dtype="int8")
    with pytest.raises(tinker.BadRequestError, match="would replace"):
        export_merged(t.path, t.base, overwrite=True)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".tmp-*"))


def test_existing_directory_needs_overwrite(trained, tmp_path):
    t = trained("llama")
    out = tmp_path / "out"
    out.mkdir()
    export_adapter(t.path, out)  # an empty directory is fine
    with pytest.raises(tinker.ConflictError, match="already exists and is not empty"):
        export_adapter(t.path, out)
    with pytest.raises(tinker.ConflictError, match="overwrite=True"):
        export_merged(t.path, out)
    (out / "stale.txt").write_text("old")
    assert export_merged(t.path, out, overwrite=True) == out
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".tmp-*"))
