"""Qwen3-VL and Qwen3-VL-MoE from GGUF, the form the guide's own model ships in quantized (Qwen3-VL-30B-A3B-Instruct
Q4_K_M): llama.cpp's converter writes the language model (architecture qwen3vl / qwen3vlmoe: Qwen3's / Qwen3-MoE's
tensors, M-RoPE's sections in 'rope.dimension_sections') and, to a separate mmproj-*.gguf, the vision tower (clip
metadata, v.* / mm.* tensors, the Conv3d patch embedding as two temporal halves). The engine reads the tower from
the mmproj file beside the model; without one the model takes text only.

Each tiny transformers checkpoint is written both ways (tiny_models.write_gguf and write_mmproj follow
convert_hf_to_gguf's Qwen3VLTextModel / Qwen3VLMoeTextModel / Qwen3VLVisionModel). Tolerances: logits within
1e-3 * max(1, |logit|) of transformers on the files' (dequantised) weights, as for the Hugging Face form
(test_qwen3_vl.py); the GGUF and Hugging Face forms of the same float32 weights give the same engine config, the
same image features (1e-6) and the same training loss and gradients within float32 summation noise (1e-5).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import tiny_models as tm  # noqa: E402

import test_qwen3_vl as vl  # noqa: E402
import tinker  # noqa: E402
from tinker import _multimodal, types  # noqa: E402
from tinker._engine import load_model  # noqa: E402
from tinker._exceptions import ModelLoadError  # noqa: E402
from tinker._models import model_spec, resolve_model  # noqa: E402
from tinker._training import LoraAdapter  # noqa: E402

LOGIT_TOL = 1e-3


@pytest.fixture(scope="module", params=tm.VL_ARCHS)
def forms(request, tmp_path_factory):
    """(arch, Hugging Face checkpoint path, GGUF path with an F32 mmproj beside it, float32 transformers reference)
    of one tiny model."""
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    kwargs = {"layers": 4, "mlp_only_layers": [1]} if arch == "qwen3vlmoe" else {}  # a dense layer among experts
    path, ref = tm.make_vl_checkpoint(root / "hf", arch, seed=5, **kwargs)
    (root / "gguf").mkdir()
    gguf_path, _ = tm.write_gguf(root / "gguf" / "model.gguf", ref, arch, byte_tokenizer=True)
    tm.write_mmproj(root / "gguf" / "mmproj-model-F32.gguf", ref)
    return arch, path, gguf_path, ref


def text_only(forms, tmp_path):
    """The GGUF alone in a directory of its own (no mmproj beside it)."""
    alone = tmp_path / "alone.gguf"
    alone.write_bytes(forms[2].read_bytes())
    return alone


@torch.no_grad()
def hf_text_logits(ref, tokens) -> np.ndarray:
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64)).reshape(1, -1)
    return ref(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0].double().numpy()


def assert_logits_close(got, want, what: str) -> None:
    err = np.abs(np.asarray(got, np.float64) - want)
    bound = LOGIT_TOL * np.maximum(1.0, np.abs(want))
    assert (err <= bound).all(), f"{what}: worst logit error {err.max():.3g}"


SEQS = [np.random.default_rng(n).integers(0, 300, n) for n in (1, 9, 40)]


def test_the_gguf_loads_as_the_same_model(forms):
    arch, path, gguf_path, _ = forms
    hf, gg = load_model(str(path)), load_model(str(gguf_path))
    assert gg.spec.arch == arch and gg.spec.source.kind == "gguf"
    keys = ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "rope_theta",
            "mrope_section", "tied_embeddings", "n_experts", "n_experts_used", "d_ff_expert", "norm_topk_prob",
            "mlp_only_layers")  # fmt: skip
    assert {k: gg.config.get(k) for k in keys} == {k: hf.config.get(k) for k in keys}
    assert gg.config["rms_eps"] == pytest.approx(hf.config["rms_eps"], rel=1e-6)  # (a float32 in GGUF)
    for key in ("config", "processor", "image_token_id", "vision_start_token_id", "vision_end_token_id"):
        assert gg.spec.vision[key] == hf.spec.vision[key], key


def test_the_mmproj_tower_gives_the_hugging_face_features(forms):
    _, path, gguf_path, _ = forms
    pixels = np.random.default_rng(0).standard_normal((16, 3 * 2 * 16 * 16)).astype(np.float32)
    want = load_model(str(path)).vision_tower.features(pixels, (1, 4, 4))
    got = load_model(str(gguf_path)).vision_tower.features(pixels, (1, 4, 4))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("qtype", ["F16", "Q8_0"])
def test_image_logits_match_transformers(forms, qtype, tmp_path):
    """A quantised mmproj (F16 as llama.cpp's converter writes by default; Q8_0) beside an F32 language model:
    transformers on the file's values."""
    arch, _, gguf_path, ref = forms
    (tmp_path / "model.gguf").write_bytes(gguf_path.read_bytes())
    _, ref = tm.write_mmproj(tmp_path / f"mmproj-{qtype}.gguf", ref, qtype)
    model = load_model(str(tmp_path / "model.gguf"))
    cases = vl.inputs_with_images()
    got = model.forward_logits([_multimodal.engine_input(model, mi, name) for name, mi in cases])
    for (name, mi), logits in zip(cases, got):
        tokens = _multimodal.engine_input(model, mi, name).tokens
        assert_logits_close(logits, vl.hf_logits(ref, tokens, vl.images_of(mi)), f"{arch} {qtype} mmproj, {name}")


def test_greedy_sampling_with_an_image_equals_generate(forms):
    arch, _, gguf_path, ref = forms
    client = tinker.ServiceClient().create_sampling_client(base_model=str(gguf_path)).result()
    model = load_model(str(gguf_path))
    name, mi = vl.inputs_with_images()[1]
    tokens = _multimodal.engine_input(model, mi, name).tokens
    got = client.sample(mi, 1, types.SamplingParams(max_tokens=12, temperature=0.0, stop=[])).result()
    assert got.sequences[0].tokens == vl.hf_greedy(ref, tokens, vl.images_of(mi), 12)


def test_mmproj_files_that_do_not_fit_are_refused(forms, tmp_path):
    _, _, gguf_path, ref = forms
    (tmp_path / "model.gguf").write_bytes(gguf_path.read_bytes())
    tm.write_mmproj(tmp_path / "mmproj-a.gguf", ref)
    tm.write_mmproj(tmp_path / "mmproj-b.gguf", ref)
    with pytest.raises(ModelLoadError, match="several mmproj files"):
        model_spec(resolve_model(str(tmp_path / "model.gguf")))
    (tmp_path / "mmproj-b.gguf").unlink()
    blob = bytearray((tmp_path / "mmproj-a.gguf").read_bytes())
    at = blob.find(b"qwen3vl_merger")
    blob[at:at + 14] = b"qwen2vl_merger"
    (tmp_path / "mmproj-a.gguf").write_bytes(bytes(blob))
    with pytest.raises(ModelLoadError, match="not a Qwen3-VL mmproj file"):
        model_spec(resolve_model(str(tmp_path / "model.gguf")))
    blob[at:at + 14] = b"qwen3vl_merger"
    (tmp_path / "mmproj-a.gguf").write_bytes(bytes(blob[:len(blob) // 2]))  # cut short
    with pytest.raises(ModelLoadError, match="mmproj-a.gguf"):
        model_spec(resolve_model(str(tmp_path / "model.gguf")))
    tm.write_mmproj(tmp_path / "mmproj-a.gguf", tm.make_vl_model("qwen3vl", hidden=32))  # another model's tower
    with pytest.raises(ModelLoadError, match="out_hidden_size 32 must equal the language model's hidden_size 64"):
        model_spec(resolve_model(str(tmp_path / "model.gguf")))


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_text_logits_match_transformers(forms, qtype, tmp_path):
    arch, _, gguf_path, ref = forms
    if qtype != "F32":  # the same model quantised; transformers runs on the dequantised values
        gguf_path, ref = tm.write_gguf(tmp_path / f"{qtype}.gguf", ref, arch, tensor_type=qtype, byte_tokenizer=True)
    model = load_model(str(gguf_path))
    for seq, logits in zip(SEQS, model.forward_logits(SEQS)):
        assert_logits_close(logits, hf_text_logits(ref, seq), f"{arch} {qtype}, length {len(seq)}")


def test_training_on_the_gguf_equals_the_hugging_face_form(forms):
    """One forward_backward of the same LoRA (Tinker's expert layout on Qwen3-VL-MoE) on both forms."""
    _, path, gguf_path, _ = forms
    rng = np.random.default_rng(2)
    data = [(rng.integers(0, 300, 12).tolist(), {"target_tokens": rng.integers(0, 300, 12),
                                                 "weights": np.ones(12, np.float32)}) for _ in range(2)]  # fmt: skip
    results = []
    for base in (path, gguf_path):
        adapter = LoraAdapter(load_model(str(base)), rank=4, seed=7)
        params = adapter.parameters()
        adapter.set_parameters({k: np.random.default_rng(len(k)).standard_normal(v.shape).astype(np.float32) * 0.1
                                for k, v in params.items()})  # fmt: skip
        out = adapter.forward_backward(data)
        results.append((out, adapter.gradients()))
    (out_hf, grads_hf), (out_gg, grads_gg) = results
    for lp_gg, lp_hf in zip(out_gg.logprobs, out_hf.logprobs):
        np.testing.assert_allclose(lp_gg, lp_hf, rtol=1e-5, atol=1e-6)
    assert out_gg.metrics["loss:sum"] == pytest.approx(out_hf.metrics["loss:sum"], rel=1e-5)
    assert grads_gg.keys() == grads_hf.keys()
    assert all(np.abs(g).max() > 0 for g in grads_hf.values())  # every LoRA tensor (experts' too) has a gradient
    for name in grads_hf:
        np.testing.assert_allclose(grads_gg[name], grads_hf[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_images_to_a_gguf_without_its_mmproj_say_where_the_tower_is(forms, tmp_path):
    gguf_path = text_only(forms, tmp_path)
    assert load_model(str(gguf_path)).spec.vision is None
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, format="PNG")
    mi = types.ModelInput(chunks=[types.EncodedTextChunk(tokens=[5, 6]), types.ImageChunk(data=buf.getvalue(),
                                                                                         format="png")])  # fmt: skip
    sampler = tinker.ServiceClient().create_sampling_client(base_model=str(gguf_path)).result()
    with pytest.raises(tinker.BadRequestError, match="mmproj"):
        sampler.sample(mi, 1, types.SamplingParams(max_tokens=2)).result()


def test_a_merged_export_on_the_gguf_is_refused(forms, store, tmp_path):
    """A merged Hugging Face checkpoint of a vision-language model needs its tower beside the merged language model
    (not built yet): refused with the way out, as for the Hugging Face form, with or without the mmproj."""
    from tinker._export import export_merged

    _, _, gguf_path, _ = forms
    tc = tinker.ServiceClient().create_lora_training_client(base_model=str(gguf_path), rank=2).result()
    saved = tc.save_weights_for_sampler("s").result().path
    for base in (gguf_path, text_only(forms, tmp_path)):
        with pytest.raises(tinker.BadRequestError, match="export the adapter itself"):
            export_merged(saved, tmp_path / "merged", base_model=str(base))
