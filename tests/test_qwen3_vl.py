"""Qwen3-VL (transformers' Qwen3VLForConditionalGeneration) with image inputs, on a tiny random checkpoint.

The model (tiny_models.make_vl_checkpoint, float32, eager attention): language model hidden 64, 4 layers, 4 heads
of 16 (8 rotary frequencies: M-RoPE sections [4, 2, 2], interleaved), vocab 320 with the image / video / vision
start / vision end ids 300-303; vision tower depth 3, width 32, 2 heads, patch 16, temporal patch 2, 2x2 merge,
an 8 x 8 learned position grid (interpolated), deepstack taps after blocks 0 and 2; its preprocessor_config.json
(transformers' Qwen2VLImageProcessorPil: torchvision is not installed, and Pillow is what the engine decodes
with) bounds images to 4..36 merged tokens. Test images are deterministic (gradient + noise), PNG and JPEG, odd
sizes (upscaled, downscaled, rounded half to even).

What is checked, with the tolerances:
- preprocessing: the engine's pixel values equal the transformers image processor's exactly (np.array_equal, in
  float32), its grid and token count too, for PNG and JPEG, RGB / RGBA / L / P images of several sizes;
- the vision tower (the engine's, csrc/model/vision.c) vs transformers' get_image_features: merged features and
  deepstack features within 1e-4 absolute (reached ~5e-6);
- M-RoPE positions equal transformers' get_rope_index, the rope delta too;
- logits of text and of text-with-image inputs vs transformers: |diff| <= 1e-3 * max(1, |logit|) (reached ~1e-5);
  public-API logprobs (SamplingClient.compute_logprobs) within 2e-3 absolute;
- LoRA gradients on the language model with images in the input (forward_backward through the public
  TrainingClient) vs peft on the same weights: per tensor ||g - g_ref|| / ||g_ref|| <= 1e-3, logprobs 1e-4;
- greedy sampling with an image in the prompt equals transformers' generate (base model, and with an adapter);
  prompts with the same tokens but different images, sampled together, do not share a prefill;
- bad input gives a tinker.BadRequestError with a clear message and nothing queued: bytes that are neither PNG
  nor JPEG, a truncated image, an image past the decoder's pixel budget or of aspect ratio over 200, an
  expected_tokens that disagrees ("Expected N tokens, got M from image", Tinker's wording), an image chunk to a
  text-only model, a datum whose loss_fn_inputs ignore the image positions, a remote asset pointer.

Qwen3-VL-MoE (Qwen3VLMoeForConditionalGeneration; 3 layers, layer 1 dense, 8 experts of width 96, top 2, the
same vision tower), from transformers 5.25's save_pretrained (experts fused [E, 2I, D] / [E, D, I]) and from the
hub's layout ([E, D, 2I] / [E, I, D], used as x @ W[e]; the loader gathers those matrices column by column):
image logits vs transformers (1e-3 * max(1, |logit|)) for both layouts; LoRA gradients with images in Tinker's
shared-outer expert layout vs test_qwen3_moe's hand-written reference (1e-3 relative); greedy sampling with an
image vs generate. Inputs are checked to be routed clearly by the reference (top-k gap > 1e-4 at every token and
sparse layer), so float32 noise cannot flip an expert choice.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
PIL = pytest.importorskip("PIL")

import reference_training as rt  # noqa: E402
import tiny_models as tm  # noqa: E402

import tinker  # noqa: E402
from tinker import _images, _multimodal, types  # noqa: E402
from tinker._engine import load_model  # noqa: E402
from test_api_clients import PIG_LATIN, process_example  # noqa: E402

LOGIT_TOL = 1e-3
API_LP_TOL = 2e-3
FEATURE_TOL = 1e-4
GRAD_RTOL = 1e-3
LP_ATOL = 1e-4
IMAGE, VS, VE = tm.VL_TOKENS["image_token_id"], tm.VL_TOKENS["vision_start_token_id"], tm.VL_TOKENS[
    "vision_end_token_id"]
SIZES = [(70, 45), (200, 90), (33, 130), (64, 64), (500, 400)]  # (width, height)


# ---- images --------------------------------------------------------------------------------------------------------


def make_image(width: int, height: int, seed: int, mode: str = "RGB"):
    """A deterministic test image: a colour gradient plus noise (so resizing and JPEG both matter)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256,
                     np.full_like(x, 200)], axis=-1)  # fmt: skip
    pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGBA").convert(mode)


def encode(image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, {"png": "PNG", "jpeg": "JPEG"}[fmt], **({"quality": 90} if fmt == "jpeg" else {}))
    return buf.getvalue()


def image_bytes(width: int, height: int, seed: int = 0, fmt: str = "png") -> bytes:
    return encode(make_image(width, height, seed), fmt)


# ---- the model -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    """(checkpoint path, float32 transformers reference, the engine's loaded model)."""
    path, ref = tm.make_vl_checkpoint(tmp_path_factory.mktemp("qwen3_vl") / "tiny", seed=3)
    return path, ref, load_model(str(path))


def hf_inputs(tokens: np.ndarray, images: list[bytes]) -> dict:
    """transformers' inputs for token ids with image placeholders and the images' bytes, in order."""
    from PIL import Image

    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64)).reshape(1, -1)
    out = {"input_ids": ids, "mm_token_type_ids": (ids == IMAGE).int(), "attention_mask": torch.ones_like(ids)}
    if images:
        processed = tm.vl_image_processor()(images=[Image.open(io.BytesIO(b)) for b in images], return_tensors="pt")
        out.update(pixel_values=processed["pixel_values"], image_grid_thw=processed["image_grid_thw"])
    return out


@torch.no_grad()
def hf_logits(ref, tokens, images) -> np.ndarray:
    return ref(**hf_inputs(tokens, images), use_cache=False).logits[0].double().numpy()


def prompt(*parts) -> types.ModelInput:
    """A ModelInput from token lists and image bytes, in order."""
    chunks = [types.EncodedTextChunk(tokens=list(p)) if isinstance(p, (list, tuple))
              else types.ImageChunk(data=p, format="png" if p.startswith(b"\x89PNG") else "jpeg") for p in parts]
    return types.ModelInput(chunks=chunks)


def images_of(model_input: types.ModelInput) -> list[bytes]:
    return [c.data for c in model_input.chunks if isinstance(c, types.ImageChunk)]


def assert_logits_close(got, want, tol: float, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    err = np.abs(got.astype(np.float64) - want)
    bound = tol * np.maximum(1.0, np.abs(want))
    assert (err <= bound).all(), f"{what}: worst logit error {err.max():.3g} (bound {tol:g} * max(1, |logit|))"


# ---- preprocessing -------------------------------------------------------------------------------------------------


def test_checkpoint_layout_and_config(vl):
    path, ref, model = vl
    from tinker._models import read_safetensors_header

    keys = read_safetensors_header(path / "model.safetensors")
    assert any(k.startswith("model.visual.blocks.2.") for k in keys)
    assert any(k.startswith("model.language_model.layers.3.") for k in keys)
    assert model.spec.arch == "qwen3vl" and model.config["mrope_section"] == [4, 2, 2]
    assert model.handle.config["mrope_section"] == [4, 2, 2]
    proc = model.spec.vision["processor"]
    assert (proc["min_pixels"], proc["max_pixels"]) == tm.VL_PIXELS  # read from preprocessor_config.json
    assert model.spec.vision["image_token_id"] == IMAGE


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
@pytest.mark.parametrize("size", SIZES)
def test_pixel_values_equal_the_hf_processor(vl, size, fmt):
    from PIL import Image

    proc = vl[2].spec.vision["processor"]
    hf = tm.vl_image_processor()
    for mode in ["RGB", "L"] + (["RGBA", "P"] if fmt == "png" else []):
        data = encode(make_image(*size, seed=sum(size), mode=mode), fmt)
        mine = _images.preprocess(data, proc, "test image")
        want = hf(images=[Image.open(io.BytesIO(data))], return_tensors="np")
        assert mine.pixel_values.dtype == np.float32 == want["pixel_values"].dtype
        assert np.array_equal(mine.pixel_values, want["pixel_values"]), (size, fmt, mode)
        assert list(mine.grid) == want["image_grid_thw"][0].tolist()
        count = hf.get_number_of_image_patches(size[1], size[0], {}) // 4
        assert _images.token_count(size[1], size[0], proc) == count == mine.n_patches // 4


def test_smart_resize_rounds_half_to_even():
    """The reference table of reference/qwen3-moe-vl.md 2.4 with Qwen3-VL's bounds (patch 16, merge 2)."""
    proc = {"patch": 16, "merge": 2, "min_pixels": 65536, "max_pixels": 16777216}
    table = {(224, 224): 64, (150, 224): 70, (400, 300): 108, (1024, 768): 768, (1920, 1080): 2040, (10, 10): 64,
             (8000, 8000): 16384}  # (width, height): tokens  # fmt: skip
    for (w, h), tokens in table.items():
        assert _images.token_count(h, w, proc) == tokens, (w, h)


def test_vision_tower_matches_transformers(vl):
    _, ref, model = vl
    for size in SIZES[:3]:
        patches = _images.preprocess(image_bytes(*size), model.spec.vision["processor"], "x")
        embeds, deep = model.vision_tower.features(patches.pixel_values, patches.grid)
        with torch.no_grad():
            out = ref.model.get_image_features(torch.from_numpy(patches.pixel_values), torch.tensor([patches.grid]))
        want = out.pooler_output[0].numpy()
        want_deep = np.stack([f[0].numpy() for f in out.deepstack_features])
        assert embeds.shape == want.shape and deep.shape == want_deep.shape
        assert np.abs(embeds - want).max() <= FEATURE_TOL and np.abs(deep - want_deep).max() <= FEATURE_TOL


def test_vision_request_of_several_images_equals_each_alone(vl):
    """The engine's tower takes images packed back to back (attention within each image only)."""
    from tinker._engine import get_engine

    _, _, model = vl
    proc = model.spec.vision["processor"]
    patches = [_images.preprocess(image_bytes(*size, seed=9), proc, "x") for size in SIZES[:3]]
    model.vision_tower.features(patches[0].pixel_values, patches[0].grid)  # loads the tower
    alone = [model.vision_tower.features(p.pixel_values, p.grid) for p in patches]
    pixels = np.concatenate([p.pixel_values for p in patches])
    grids = np.asarray([p.grid for p in patches], dtype=np.int32)
    out = np.asarray(get_engine().vision(model.handle, pixels, grids).result())
    blocks = 1 + len(model.spec.vision["config"]["deepstack"])
    out = out.reshape(blocks, -1, out.shape[-1])
    at = 0
    for embeds, deep in alone:
        n = embeds.shape[0]
        assert np.allclose(out[0, at:at + n], embeds, atol=1e-5) and np.allclose(out[1:, at:at + n], deep, atol=1e-5)
        at += n
    assert at == out.shape[1]
    with pytest.raises(ValueError, match="pixel values"):
        get_engine().vision(model.handle, pixels[:-1], grids)
    with pytest.raises(ValueError, match="grid"):
        get_engine().vision(model.handle, pixels, np.asarray([[1, 3, 4]], dtype=np.int32))


# ---- logits and logprobs -------------------------------------------------------------------------------------------


def inputs_with_images():
    """(name, ModelInput): one image mid-prompt, two images (PNG and JPEG), an image first, an image last."""
    a, b = image_bytes(70, 45, 1), image_bytes(33, 130, 2, "jpeg")
    return [
        ("one", prompt([5, 6, VS], a, [VE, 7, 8, 9, 10, 11])),
        ("two", prompt([12, VS], a, [VE, 40, 41, VS], b, [VE, 99, 98, 97])),
        ("first", prompt(b, [VE, 1, 2, 3])),
        ("last", prompt([17, 18, VS], a)),
    ]


def test_positions_equal_get_rope_index(vl):
    _, ref, model = vl
    for name, mi in inputs_with_images():
        ei = _multimodal.engine_input(model, mi, name)
        hf = hf_inputs(ei.tokens, images_of(mi))
        pos, delta = ref.model.get_rope_index(hf["input_ids"], hf["mm_token_type_ids"], hf["image_grid_thw"])
        assert np.array_equal(ei.positions.T, pos[:, 0].numpy()), name
        assert ei.rope_delta == int(delta[0, 0]), name


def test_text_logits_match_transformers(vl):
    _, ref, model = vl
    seqs = [np.random.default_rng(n).integers(0, 300, n) for n in (1, 9, 40)]
    for seq, logits in zip(seqs, model.forward_logits(seqs)):
        assert_logits_close(logits, hf_logits(ref, seq, []), LOGIT_TOL, f"text, length {len(seq)}")


def test_image_logits_match_transformers(vl):
    _, ref, model = vl
    cases = inputs_with_images()
    engine_inputs = [_multimodal.engine_input(model, mi, name) for name, mi in cases]
    got = model.forward_logits(engine_inputs + [np.arange(5, 30)])  # one packed batch, a text sequence too
    for (name, mi), ei, logits in zip(cases, engine_inputs, got):
        assert_logits_close(logits, hf_logits(ref, ei.tokens, images_of(mi)), LOGIT_TOL, name)
    assert_logits_close(got[-1], hf_logits(ref, np.arange(5, 30), []), LOGIT_TOL, "text beside images")


def test_public_api_logprobs_match_transformers(vl):
    path, ref, model = vl
    client = tinker.ServiceClient().create_sampling_client(base_model=str(path)).result()
    for name, mi in inputs_with_images() + [("text", prompt([3, 4, 5, 6, 7]))]:
        got = client.compute_logprobs(mi).result()
        tokens = _multimodal.engine_input(model, mi, name)
        tokens = getattr(tokens, "tokens", np.asarray(tokens))
        lp = torch.log_softmax(torch.from_numpy(hf_logits(ref, tokens, images_of(mi))), -1).numpy()
        want = [lp[i - 1, tokens[i]] for i in range(1, len(tokens))]
        assert got[0] is None and len(got) == len(tokens), name
        err = np.abs(np.asarray(got[1:], dtype=np.float64) - want).max()
        assert err <= API_LP_TOL, f"{name}: logprobs differ from transformers by {err:.3g}"


def test_image_features_are_cached_by_content(vl, monkeypatch):
    _, _, model = vl
    calls = []
    original = type(model.vision_tower).features
    monkeypatch.setattr(type(model.vision_tower), "features",
                        lambda self, *a: calls.append(1) or original(self, *a))
    data = image_bytes(90, 91, seed=77)
    first = _multimodal.engine_input(model, prompt([1], data), "a")
    second = _multimodal.engine_input(model, prompt([2, 3], data, [4]), "b")
    assert len(calls) == 1 and np.array_equal(first.embeds, second.embeds)


def test_asset_pointer_reads_local_files(vl, tmp_path):
    path, _, model = vl
    data = image_bytes(70, 45, 1)
    (tmp_path / "cat image.png").write_bytes(data)
    inline = prompt([5, VS], data, [VE, 6, 7])
    for location in (str(tmp_path / "cat image.png"), (tmp_path / "cat image.png").as_uri()):
        pointer = types.ModelInput(chunks=[inline.chunks[0], types.ImageAssetPointerChunk(format="png",
                                                                                           location=location),
                                           inline.chunks[2]])  # fmt: skip
        a = _multimodal.engine_input(model, pointer, "pointer")
        b = _multimodal.engine_input(model, inline, "inline")
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.embeds, b.embeds)
    remote = types.ModelInput(chunks=[types.ImageAssetPointerChunk(format="png", location="https://x.org/a.png")])
    with pytest.raises(tinker.BadRequestError, match="only local files"):
        _multimodal.engine_input(model, remote, "prompt")


# ---- training ------------------------------------------------------------------------------------------------------


def datum_for(model, mi: types.ModelInput, seed: int):
    """A cross-entropy Datum over the whole input: targets the next token (0 at image positions, weight 0 there,
    as the cookbook writes them), random weights elsewhere."""
    ei = _multimodal.engine_input(model, mi, "datum")
    tokens = getattr(ei, "tokens", np.asarray(ei))
    n = len(tokens)
    rng = np.random.default_rng(seed)
    targets = np.concatenate([tokens[1:], [rng.integers(0, 300)]]).astype(np.int64)
    weights = rng.uniform(0.5, 1.5, n).astype(np.float32)
    image = tokens == IMAGE
    targets[image], weights[image] = 0, 0.0
    return types.Datum(model_input=mi, loss_fn_inputs={"target_tokens": targets, "weights": weights}), tokens


def test_lora_gradients_with_images_match_peft(vl):
    path, ref, model = vl
    rank = 4
    service = tinker.ServiceClient()
    client = service.create_lora_training_client(base_model=str(path), rank=rank).result()
    adapter = client._adapter
    values = rt.random_adapter_values({k: v.shape for k, v in adapter.parameters().items()}, seed=11)
    adapter.set_parameters(values)
    peft_model = rt.peft_model(ref, rank)
    rt.load_adapter_values(peft_model, values)
    cases = inputs_with_images()
    data, tokens = zip(*[datum_for(model, mi, seed) for seed, (_, mi) in enumerate(cases)])
    text, text_tokens = datum_for(model, prompt(list(range(20, 44))), 9)
    data, tokens = list(data) + [text], list(tokens) + [text_tokens]
    out = client.forward_backward(data, "cross_entropy").result()
    rt.zero_gradients(peft_model)
    want_lp, want_loss, _ = reference_gradients_of(peft_model, data, tokens)
    want_grads = rt.peft_gradients(peft_model)
    for got, want in zip(out.loss_fn_outputs, want_lp):
        assert np.abs(got["logprobs"].to_numpy() - want).max() <= LP_ATOL
    assert abs(out.metrics["loss:sum"] - want_loss) <= 1e-4 * max(1.0, abs(want_loss))
    grads = adapter.gradients()
    assert set(grads) == set(want_grads)
    for name, g in grads.items():
        ref_g = want_grads[name]
        rel = np.linalg.norm(g - ref_g) / max(np.linalg.norm(ref_g), 1e-30)
        assert rel <= GRAD_RTOL, f"{name}: relative gradient error {rel:.3g}"


def test_trained_adapter_round_trips_through_the_store(vl, store, tmp_path):
    """Training on image datums, then: the sampler checkpoint scores an image prompt like the live adapter (and
    unlike the base model), its exported adapter directory (PEFT names under model.language_model) resumes
    training with the same parameters, and a merged export of a vision-language base is refused clearly."""
    from tinker._exceptions import BadRequestError
    from tinker._export import export_adapter, export_merged

    path, _, model = vl
    service = tinker.ServiceClient()
    tc = service.create_lora_training_client(str(path), rank=4, seed=3).result()
    data = [datum_for(model, mi, seed)[0] for seed, (_, mi) in enumerate(inputs_with_images()[:2])]
    tc.forward_backward(data, "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    sampler_path = tc.save_weights_for_sampler("vl").result().path
    mi = inputs_with_images()[0][1]
    live = tc.save_weights_and_get_sampling_client().compute_logprobs(mi).result()
    saved = service.create_sampling_client(model_path=sampler_path).compute_logprobs(mi).result()
    base = service.create_sampling_client(base_model=str(path)).compute_logprobs(mi).result()
    assert saved == live and saved != base
    directory = export_adapter(sampler_path, tmp_path / "adapter")
    resumed = service.create_training_client_from_state(str(directory), base_model=str(path)).result()
    params = tc._adapter.parameters()
    assert all(np.array_equal(resumed._adapter.parameters()[k], v) for k, v in params.items())
    with pytest.raises(BadRequestError, match="vision-language"):
        export_merged(sampler_path, tmp_path / "merged")


def test_a_datum_must_count_the_image_positions(vl):
    path, _, model = vl
    client = tinker.ServiceClient().create_lora_training_client(base_model=str(path), rank=2).result()
    mi = prompt([5, VS], image_bytes(70, 45, 1), [VE, 6, 7])
    text_only = 5  # what a caller who forgot the image's positions would count
    datum = types.Datum(model_input=mi, loss_fn_inputs={"target_tokens": np.zeros(text_only, np.int64),
                                                        "weights": np.ones(text_only, np.float32)})  # fmt: skip
    before = client._adapter.gradients()
    with pytest.raises(tinker.BadRequestError, match=r"target_tokens has shape \(5,\).*image"):
        client.forward_backward([datum], "cross_entropy").result()
    after = client._adapter.gradients()
    assert all(np.array_equal(before[k], after[k]) for k in before)  # nothing half-done
    n = _multimodal.engine_input(model, mi, "x").tokens.size
    with_image = mi.chunks[1].model_copy(update={"expected_tokens": n - 5})
    assert types.ModelInput(chunks=[mi.chunks[0], with_image, mi.chunks[2]]).length == n


# ---- sampling ------------------------------------------------------------------------------------------------------


@torch.no_grad()
def hf_greedy(model, tokens, images, n: int) -> list[int]:
    inputs = hf_inputs(tokens, images)
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@torch.no_grad()
def hf_greedy_full(model, tokens, images, n: int) -> list[int]:
    """Greedy decoding by full forward passes (each new token's positions from get_rope_index, as a training
    pass over the finished sequence sees them)."""
    tokens, out = list(tokens), []
    for _ in range(n):
        out.append(int(np.argmax(hf_logits(model, tokens + out, images)[-1])))
    return out


def test_greedy_sampling_with_an_image_equals_generate(vl):
    """Prompts that end in text: transformers' generate. A prompt that ends with its image: generate moves each
    position axis on by 1 from the image's last token (GenerationMixin's position update), while a forward
    pass over the same tokens (get_rope_index, which training and compute_logprobs see) puts text after an image
    at its largest position + 1 on every axis; the engine decodes as that forward pass, so the sampler's
    logprobs are the trainer's: compared with greedy full forward passes."""
    path, ref, model = vl
    service = tinker.ServiceClient()
    client = service.create_sampling_client(base_model=str(path)).result()
    params = types.SamplingParams(max_tokens=16, temperature=0.0, stop=[])
    for name, mi in inputs_with_images():
        tokens = _multimodal.engine_input(model, mi, name).tokens
        got = client.sample(mi, 1, params).result().sequences[0].tokens
        if name == "last":
            assert got == hf_greedy_full(ref, tokens, images_of(mi), 16), name
        else:
            assert got == hf_greedy(ref, tokens, images_of(mi), 16), name
    # with a trained-looking adapter: the sampler snapshot's weights in peft
    trainer = service.create_lora_training_client(base_model=str(path), rank=4).result()
    values = rt.random_adapter_values({k: v.shape for k, v in trainer._adapter.parameters().items()}, seed=5, gain=1.0)
    trainer._adapter.set_parameters(values)
    sampler = trainer.save_weights_and_get_sampling_client()
    peft_model = rt.peft_model(ref, 4)
    rt.load_adapter_values(peft_model, values)
    name, mi = inputs_with_images()[1]
    tokens = _multimodal.engine_input(model, mi, name).tokens
    assert sampler.sample(mi, 1, params).result().sequences[0].tokens == hf_greedy(peft_model, tokens,
                                                                                    images_of(mi), 16)


def test_same_tokens_different_images_sampled_together(vl):
    """Two prompts whose token ids agree (same image sizes) but whose images differ are prefilled apart."""
    path, _, model = vl
    client = tinker.ServiceClient().create_sampling_client(base_model=str(path)).result()
    params = types.SamplingParams(max_tokens=8, temperature=0.0, stop=[])
    prompts = [prompt([5, VS], image_bytes(70, 45, seed), [VE, 6]) for seed in (21, 22)]
    alone = [client.sample(p, 1, params, include_prompt_logprobs=True).result() for p in prompts]
    together = [f.result() for f in [client.sample(p, 1, params, include_prompt_logprobs=True) for p in prompts]]
    for a, b in zip(alone, together):
        assert a.sequences[0].tokens == b.sequences[0].tokens
        assert np.allclose(a.prompt_logprobs[1:], b.prompt_logprobs[1:], atol=1e-5)
    assert alone[0].prompt_logprobs[-1] != alone[1].prompt_logprobs[-1]


def test_prefix_cache_sampling_skips_prompts_with_images(vl):
    """The prefix cache (csrc/model/prefix_cache.h) never serves nor stores a prompt with images (its keys and
    values depend on the image features and M-RoPE positions, not only its token ids); text prompts on a
    vision-language model use it. A cohort that prefills an image prompt beside a text prompt resumed after its
    cached prefix gives each what it gets alone (the packed positions: the image prompt's own, the text prompt's
    counted on from its cached rows)."""
    from tinker._engine import get_engine
    from tinker._sampling import submit_sample

    path, _, model = vl
    text = [20 + i % 40 for i in range(40)]  # 2 whole blocks of 16
    image = _multimodal.engine_input(model, prompt(text + [VS], image_bytes(70, 45, 3), [VE, 6]), "image")
    first, second = text + [7, 8, 9], text + [9, 8]

    def submit(p):
        return submit_sample(model, p, max_tokens=6, temperature=0.0, stop=[])

    def run(pending):
        raw = pending._request.result()
        seq = pending.result().sequences[0]
        return raw["cached_tokens"], seq.tokens, seq.logprobs

    model.handle.set_prefix_cache_limit(0)
    want = [run(submit(p)) for p in (image, second)]
    model.handle.set_prefix_cache_limit(256 << 20)
    blocks = model.handle.prefix_cache_stats()["blocks"]
    assert run(submit(image)) == want[0] and model.handle.prefix_cache_stats()["blocks"] == blocks  # not stored
    assert run(submit(first))[0] == 0  # text: stored ...
    assert model.handle.prefix_cache_stats()["blocks"] == blocks + 2
    assert run(submit(image)) == want[0]  # ... but never served to the image prompt with the same leading tokens
    # one cohort: the image prompt prefilled whole beside the text prompt resumed after its 32 cached tokens
    blocker = get_engine().forward(model.handle, np.tile(np.arange(1, 60, dtype=np.int32), 40),
                                   np.full(40, 59, dtype=np.int32))
    pending = [submit(image), submit(second)]
    blocker.result()
    got = [run(p) for p in pending]
    assert pending[0]._request.result()["group"][:2] == (2, 2)
    assert [g[0] for g in got] == [0, 32]
    # decoding two sequences a step multiplies this float32 model's weights by 2 rows at once (sgemm), one
    # alone by 1 (a streamed dot product): the last bits of the logits differ (not the prefill's doing)
    for g, w in zip(got, want):
        assert g[1] == w[1] and np.allclose(g[2], w[2], rtol=0, atol=1e-5)


# ---- bad input -----------------------------------------------------------------------------------------------------


def _png_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose header then claims another size (CRC fixed): a decompression bomb's header."""
    data = bytearray(image_bytes(8, 8))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17]))
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


BAD_IMAGES = {
    "gif": (b"GIF89a" + b"\x00" * 40, r"neither PNG nor JPEG"),
    "empty": (b"", r"neither PNG nor JPEG"),
    "truncated png": (image_bytes(70, 45)[:200], r"truncated or corrupt"),
    "truncated jpeg": (image_bytes(70, 45, fmt="jpeg")[:300], r"truncated or corrupt"),
    "pixel budget": (_png_claiming(10000, 10000), r"10000 x 10000 pixels; images of more than \d+ pixels are "
                                                  r"refused"),
    "far past the budget": (_png_claiming(30000, 30000), r"images of more than \d+ pixels are refused"),
    "aspect ratio": (image_bytes(4000, 10), r"aspect ratio .* above the 200"),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_images_are_refused_clearly(vl, case):
    path, _, model = vl
    data, match = BAD_IMAGES[case]
    mi = prompt([5, VS], data, [VE, 6])
    sampler = tinker.ServiceClient().create_sampling_client(base_model=str(path)).result()
    with pytest.raises(tinker.BadRequestError, match=match):
        sampler.compute_logprobs(mi).result()
    with pytest.raises(tinker.BadRequestError, match=r"chunk 1: .*" + match):
        sampler.sample(mi, 1, types.SamplingParams(max_tokens=2)).result()


def test_expected_tokens_must_agree(vl):
    path, _, model = vl
    data = image_bytes(70, 45, 1)
    n = _multimodal.engine_input(model, prompt(data), "x").tokens.size
    sampler = tinker.ServiceClient().create_sampling_client(base_model=str(path)).result()
    right = types.ImageChunk(data=data, format="png", expected_tokens=n)
    assert len(sampler.compute_logprobs(types.ModelInput(chunks=[right])).result()) == n
    wrong = types.ImageChunk(data=data, format="png", expected_tokens=n + 3)
    with pytest.raises(tinker.BadRequestError, match=f"Expected {n + 3} tokens, got {n} from image"):
        sampler.compute_logprobs(types.ModelInput(chunks=[wrong])).result()


def test_image_to_a_text_only_model(tmp_path):
    path, _ = tm.make_hf_checkpoint(tmp_path / "qwen3", "qwen3", vocab=320)
    service = tinker.ServiceClient()
    mi = prompt([5, 6], image_bytes(70, 45), [7])
    sampler = service.create_sampling_client(base_model=str(path)).result()
    with pytest.raises(tinker.BadRequestError, match="text-only model"):
        sampler.sample(mi, 1, types.SamplingParams(max_tokens=2)).result()
    trainer = service.create_lora_training_client(base_model=str(path), rank=2).result()
    datum = types.Datum(model_input=mi, loss_fn_inputs={"target_tokens": np.zeros(3, np.int64),
                                                        "weights": np.ones(3, np.float32)})  # fmt: skip
    with pytest.raises(tinker.BadRequestError, match="datum 0: .*text-only model"):
        trainer.forward_backward([datum], "cross_entropy").result()


# ---- Qwen3-VL-MoE ------------------------------------------------------------------------------------------------


def moe_routing_gap(model, tokens, images) -> float:
    """The smallest gap between the k-th and (k+1)-th router probability over tokens and sparse layers."""
    with torch.no_grad():
        out = model(**hf_inputs(tokens, images), use_cache=False, output_router_logits=True)
    k = model.config.text_config.num_experts_per_tok
    gaps = []
    for logits in out.router_logits:
        p = torch.softmax(logits.float(), dim=-1).sort(dim=-1, descending=True).values
        gaps.append(float((p[:, k - 1] - p[:, k]).min()))
    return min(gaps)


def write_hub_layout(source, reference, directory):
    """The reference's weights with the experts as the hub's Qwen3-VL-MoE files hold them: gate_up_proj
    [E, D, 2I], down_proj [E, I, D] (used as x @ W[e]); transformers 5.25's save_pretrained writes [E, 2I, D] /
    [E, D, I] instead."""
    import shutil

    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copyfile(source / name, directory / name)
    state = {k: v.detach().contiguous() for k, v in reference.state_dict().items()}
    state = {k: v.transpose(1, 2).contiguous() if ".mlp.experts." in k else v for k, v in state.items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


@pytest.fixture(scope="module")
def vlmoe(tmp_path_factory):
    """(checkpoint path, hub-layout path, float32 reference, engine model): 3 layers, layer 1 dense."""
    root = tmp_path_factory.mktemp("qwen3_vl_moe")
    path, ref = tm.make_vl_checkpoint(root / "tiny", "qwen3vlmoe", seed=5, layers=3, mlp_only_layers=[1])
    return path, write_hub_layout(path, ref, root / "hub"), ref, load_model(str(path))


def moe_cases(model, ref):
    """The image inputs, each checked to be routed clearly (so float32 noise cannot flip an expert choice)."""
    cases = []
    for name, mi in inputs_with_images():
        tokens = _multimodal.engine_input(model, mi, name).tokens
        gap = moe_routing_gap(ref, tokens, images_of(mi))
        assert gap > 1e-4, f"{name}: the reference's routing has a near-tie ({gap:.2g}); pick other inputs"
        cases.append((name, mi, tokens))
    return cases


def test_moe_checkpoint_layouts(vlmoe):
    path, hub, ref, model = vlmoe
    from tinker._models import read_safetensors_header

    saved, hubs = (read_safetensors_header(p / "model.safetensors") for p in (path, hub))
    key = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    assert saved[key][1] == [8, 192, 64] and hubs[key][1] == [8, 64, 192]
    assert model.config["moe"] == 1 and model.config["norm_topk_prob"] == 1 and model.handle.config["moe_layers"] == [
        0, 2]


def test_moe_image_logits_match_transformers(vlmoe):
    path, hub, ref, model = vlmoe
    cases = moe_cases(model, ref)
    hub_model = load_model(str(hub))
    for engine, layout in ((model, "saved [E, 2I, D]"), (hub_model, "hub [E, D, 2I]")):
        inputs = [_multimodal.engine_input(engine, mi, name) for name, mi, _ in cases]
        for (name, mi, tokens), logits in zip(cases, engine.forward_logits(inputs)):
            assert_logits_close(logits, hf_logits(ref, tokens, images_of(mi)), LOGIT_TOL, f"{layout}: {name}")


def test_moe_lora_gradients_with_images_match_reference(vlmoe):
    """Tinker's shared-outer expert LoRA and the attention / dense-layer / unembed LoRA vs the hand-written torch
    reference of test_qwen3_moe (each MLP's forward carrying the LoRA terms)."""
    from test_qwen3_moe import MoeLoraReference, random_values, relative_errors

    path, _, ref, model = vlmoe
    rank = 4
    client = tinker.ServiceClient().create_lora_training_client(base_model=str(path), rank=rank).result()
    adapter = client._adapter
    reference = MoeLoraReference(ref, rank, (True, True, True))
    shapes = {k: v.shape for k, v in adapter.parameters().items()}
    assert shapes == {k: tuple(p.shape) for k, p in reference.params.items()}
    values = random_values(shapes, rank, 17)
    adapter.set_parameters(values)
    reference.load(values)
    cases = moe_cases(model, reference.model)
    data, tokens = zip(*[datum_for(model, mi, seed) for seed, (_, mi, _) in enumerate(cases)])
    out = client.forward_backward(list(data), "cross_entropy").result()
    reference.zero_grad()
    want_lp, want_loss, _ = reference_gradients_of(reference.model, data, tokens)
    for got, want in zip(out.loss_fn_outputs, want_lp):
        assert np.abs(got["logprobs"].to_numpy() - want).max() <= LP_ATOL
    assert abs(out.metrics["loss:sum"] - want_loss) <= 1e-4 * max(1.0, abs(want_loss))
    errors = relative_errors(adapter.gradients(), reference.gradients())
    bad = {k: e for k, e in errors.items() if not e <= GRAD_RTOL}
    assert not bad, f"gradients differ (relative): {sorted(bad.items())[:6]}"
    assert any(k.endswith("exp_down.lora_A") and np.linalg.norm(v) > 0 for k, v in adapter.gradients().items())


def reference_gradients_of(model, data, tokens_list):
    """Per-datum logprobs and the summed weighted cross-entropy of a torch model, its backward run."""
    logprobs, total = [], 0.0
    for datum, tokens in zip(data, tokens_list):
        out = model(**hf_inputs(tokens, images_of(datum.model_input)), use_cache=False)
        lp_all = torch.log_softmax(out.logits[0].float(), -1)
        target = torch.from_numpy(datum.loss_fn_inputs["target_tokens"].to_numpy()).long()
        weights = torch.from_numpy(datum.loss_fn_inputs["weights"].to_numpy())
        lp = lp_all.gather(1, target[:, None])[:, 0]
        loss = -(lp * weights).sum()
        loss.backward()
        total += float(loss.detach())
        logprobs.append(lp.detach().numpy())
    return logprobs, total, None


def test_moe_greedy_sampling_with_an_image(vlmoe):
    path, _, ref, model = vlmoe
    client = tinker.ServiceClient().create_sampling_client(base_model=str(path)).result()
    params = types.SamplingParams(max_tokens=12, temperature=0.0, stop=[])
    name, mi, tokens = moe_cases(model, ref)[1]
    want = hf_greedy(ref, tokens, images_of(mi), 12)
    assert moe_routing_gap(ref, list(tokens) + want, images_of(mi)) > 1e-4, "a near-tie in the continuation"
    assert client.sample(mi, 1, params).result().sequences[0].tokens == want


# ---- the guide's vision snippet and training loop on the tiny Qwen3-VL-MoE -----------------------------------------


def guide_checkpoint(vlmoe, directory):
    """The tiny Qwen3-VL-MoE with a tokenizer (tiny_models.write_vl_tokenizer: the guide's code tokenizes its chat
    strings itself), the weights linked, not copied."""
    import shutil

    path = vlmoe[0]
    directory.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copyfile(path / name, directory / name)
    (directory / "model.safetensors").symlink_to(path / "model.safetensors")
    tm.write_vl_tokenizer(directory)
    return directory


def test_the_guides_vision_snippet_and_training_loop_run_on_the_tiny_vl_moe(vlmoe, tmp_path):
    """Tinker's getting-started code, the vision snippet included, as written there but for the model path (and
    the image read from a local file instead of the web, and a seeded adapter): the training loop (the guide's supervised datums, the
    image datum built the cookbook's way: image positions weight 0) lowers the loss, and the trained adapter's
    greedy answer to the image question is the answer it was trained on."""
    base_model = str(guide_checkpoint(vlmoe, tmp_path / "Qwen3-VL-30B-A3B-Instruct-tiny"))
    image_path = tmp_path / "chess.png"
    image_path.write_bytes(image_bytes(96, 64, seed=11))
    answer = "A chess board."

    # -- from the guide --
    service_client = tinker.ServiceClient()
    training_client = service_client.create_lora_training_client(base_model=base_model, rank=32,
                                                                 seed=0)  # (the guide's is random: 1 in 15 seeds misses a letter)
    tokenizer = training_client.get_tokenizer()

    image_data = image_path.read_bytes()
    model_input = tinker.ModelInput(chunks=[
        tinker.types.EncodedTextChunk(tokens=tokenizer.encode("<|im_start|>user\n<|vision_start|>")),
        tinker.types.ImageChunk(data=image_data, format="png"),
        tinker.types.EncodedTextChunk(
            tokens=tokenizer.encode("<|vision_end|>What is this?<|im_end|>\n<|im_start|>assistant\n")),
    ])  # fmt: skip

    examples = PIG_LATIN[:2]  # the guide's examples and process_example (test_api_clients holds them verbatim)
    processed_examples = [process_example(ex, tokenizer) for ex in examples]
    # -- the image datum, as the cookbook's supervised code builds one (image positions: target 0, weight 0) --
    grid = tm.vl_image_processor().get_number_of_image_patches(64, 96, {})
    n_image = grid // tm.VL_VISION["spatial_merge_size"] ** 2
    chunks = [c.model_copy(update={"expected_tokens": n_image}) if isinstance(c, types.ImageChunk) else c
              for c in model_input.chunks]
    completion = tokenizer.encode(answer + "<|im_end|>")
    text_before, text_after = chunks[0].tokens, chunks[2].tokens + completion
    full = types.ModelInput(chunks=[chunks[0], chunks[1], types.EncodedTextChunk(tokens=text_after[:-1])])
    targets = text_before[1:] + [0] * n_image + text_after
    weights = [0] * (len(text_before) - 1 + n_image + len(chunks[2].tokens)) + [1] * len(completion)
    assert full.length == len(targets) == len(weights)
    processed_examples.append(types.Datum(model_input=full, loss_fn_inputs=dict(weights=weights,
                                                                                target_tokens=targets)))

    # -- the guide's training loop --
    losses = []
    for _ in range(30):
        fwdbwd_future = training_client.forward_backward(processed_examples, "cross_entropy")
        optim_future = training_client.optim_step(types.AdamParams(learning_rate=1e-2))
        fwdbwd_result = fwdbwd_future.result()
        optim_future.result()
        logprobs = np.concatenate([output["logprobs"].tolist() for output in fwdbwd_result.loss_fn_outputs])
        w = np.concatenate([example.loss_fn_inputs["weights"].tolist() for example in processed_examples])
        losses.append(-np.dot(logprobs, w) / w.sum())
    assert losses[-1] < 0.2 * losses[0], f"the loss did not fall: {losses}"

    # -- the guide's sampling, with the vision snippet's prompt --
    sampling_client = training_client.save_weights_and_get_sampling_client()
    params = types.SamplingParams(max_tokens=20, temperature=0.0, stop=["<|im_end|>"])
    result = sampling_client.sample(prompt=model_input, sampling_params=params, num_samples=2).result()
    for seq in result.sequences:
        assert tokenizer.decode(seq.tokens) == answer + "<|im_end|>" and seq.stop_reason == "stop"
    logprobs = sampling_client.compute_logprobs(full).result()
    assert len(logprobs) == full.length and logprobs[0] is None
