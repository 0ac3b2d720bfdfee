"""Qwen3-MoE, Qwen3-VL and Qwen3-VL-MoE on other configs, config files and images than the one of each that
test_qwen3_moe.py / test_qwen3_vl.py use (issue #14), each against transformers 5.25 in float32 (eager).

Configs (tiny random checkpoints, tiny_models), with values the real family uses scaled down: head_dim 32 / 64 with
the real [24, 20, 20] M-RoPE sections scaled ([6, 5, 5], [12, 10, 10]), rope_theta 5e6 / 1e7, rms_norm_eps 1e-5,
one kv head / as many as query heads, tied embeddings (Qwen3-VL-2B/4B), 3 deepstack taps at [1, 2, 3] of depth 4
(the 30B's [8, 16, 24] of 27) and unsorted taps, a 48 x 48 learned position grid (num_position_embeddings 2304, as
real) and a 10 x 10 one, vision head widths 16 / 36 / 72 (72 as the 8B/30B towers), every vision activation the
engine accepts; MoE top-1 / top-2 / top-8 of 16, norm_topk_prob false (Qwen3-MoE: raw top-k probabilities;
Qwen3-VL-MoE: renormalised regardless, as transformers does), decoder_sparse_step 2 with mlp_only_layers, and
expert widths with 2 * moe_intermediate_size == hidden_size or moe_intermediate_size == hidden_size, where one fused
expert tensor has the same shape in both orientations (read from the layer's other fused tensor, below).
Config files: the 4.57-era hub form (rope_theta + rope_scaling in text_config), and keys left out or set otherwise
(rope theta, mrope_section, mrope_interleaved, head_dim, num_key_value_heads, the top-level tie flag): the engine
reads what transformers' config classes make of them.
Images: tiny (upscaled), aspect ratios up to the limit of 200 and past it, 1 x N strips, L / LA / P / P with
transparency / RGBA / RGB with a tRNS colour / 1-bit / 16-bit grey / 16-bit RGB(A) PNGs, grey / CMYK / progressive
JPEGs, a JPEG whose EXIF orientation says "rotate" (transformers' image processor, given the decoded image, does not
rotate it, and neither does the engine: the token count is the stored size's, as the cookbook computes it), the real
Qwen3-VL pixel bounds (65536 to 16777216 pixels).
Inputs: several images in one prompt, the same image twice, an image first / last / alone, 300 text tokens after
and before an image (M-RoPE positions past the image), text-only and image sequences in one batch (logits, and
LoRA gradients for a tied Qwen3-VL and a top-1 Qwen3-VL-MoE with dense layers between); greedy sampling after
images on two other M-RoPE layouts equals transformers' generate.

Tolerances: logits |diff| <= 1e-3 * max(1, |logit|) (reached ~1e-5); pixel values exactly equal; LoRA gradients
||g - g_ref|| / ||g_ref|| <= 1e-3 per tensor, logprobs 1e-4. MoE inputs are checked to be routed clearly by the
reference (top-k probability gap > 1e-5 at every token and sparse layer, 100 times the engine's difference from
transformers there; top-8 of 16 experts has gaps of ~2e-5). What the engine does not run is refused at load with
a ModelLoadError naming the config key.
"""

from __future__ import annotations

import io
import json
import shutil
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
from test_qwen3_moe import MoeLoraReference, random_values, relative_errors  # noqa: E402
from test_qwen3_moe import routing_gap as text_routing_gap  # noqa: E402
from test_qwen3_vl import image_bytes, make_image, write_hub_layout  # noqa: E402

import tinker  # noqa: E402
from tinker import _images, _multimodal, types  # noqa: E402
from tinker._engine import load_model  # noqa: E402
from tinker._exceptions import ModelLoadError  # noqa: E402

LOGIT_TOL = 1e-3
GRAD_RTOL = 1e-3
LP_ATOL = 1e-4
ROUTING_GAP = 1e-5  # k-th vs (k+1)-th router probability: 100 x the engine's ~1e-7 difference from transformers'
IMAGE, VS, VE = (tm.VL_TOKENS[k] for k in ("image_token_id", "vision_start_token_id", "vision_end_token_id"))
REAL_PIXELS = (65536, 16777216)  # Qwen3-VL's preprocessor_config.json


# ---- references ------------------------------------------------------------------------------------------------


def hf_inputs(tokens, images: list[bytes], pixels=tm.VL_PIXELS) -> dict:
    from PIL import Image

    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64)).reshape(1, -1)
    out = {"input_ids": ids, "mm_token_type_ids": (ids == IMAGE).int(), "attention_mask": torch.ones_like(ids)}
    if images:
        processed = tm.vl_image_processor(*pixels)(images=[Image.open(io.BytesIO(b)) for b in images],
                                                   return_tensors="pt")  # fmt: skip
        out.update(pixel_values=processed["pixel_values"], image_grid_thw=processed["image_grid_thw"])
    return out


@torch.no_grad()
def hf_logits(ref, tokens, images, pixels=tm.VL_PIXELS) -> np.ndarray:
    return ref(**hf_inputs(tokens, images, pixels), use_cache=False).logits[0].double().numpy()


@torch.no_grad()
def vl_routing_gap(ref, tokens, images, pixels=tm.VL_PIXELS) -> float:
    out = ref(**hf_inputs(tokens, images, pixels), use_cache=False, output_router_logits=True)
    k = ref.config.text_config.num_experts_per_tok
    probs = [torch.softmax(x.float(), -1).sort(-1, descending=True).values for x in out.router_logits]
    return min(float((p[:, k - 1] - p[:, k]).min()) if k < p.shape[-1] else 1.0 for p in probs)


def assert_logits_close(got, want, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    err = np.abs(got.astype(np.float64) - want)
    rel = err / np.maximum(1.0, np.abs(want))
    assert rel.max() <= LOGIT_TOL, f"{what}: worst logit error {rel.max():.3g} * max(1, |logit|)"


def prompt(*parts) -> types.ModelInput:
    return types.ModelInput(chunks=[
        types.EncodedTextChunk(tokens=[int(t) for t in p]) if isinstance(p, (list, tuple, np.ndarray))
        else types.ImageChunk(data=p, format="png" if p.startswith(b"\x89PNG") else "jpeg") for p in parts])


def images_of(mi: types.ModelInput) -> list[bytes]:
    return [c.data for c in mi.chunks if isinstance(c, types.ImageChunk)]


def image_prompts(tag: int = 0) -> list[tuple[str, types.ModelInput]]:
    """Prompts with images in the places and numbers a chat puts them, and long text around them."""
    a, b, c = image_bytes(70, 45, 1 + tag), image_bytes(33, 130, 2 + tag, "jpeg"), image_bytes(300, 40, 3 + tag)
    text = list(np.random.default_rng(tag).integers(0, 300, 300))
    return [
        ("one", prompt([5, 6, VS], a, [VE, 7, 8, 9, 10, 11])),
        ("three", prompt([12, VS], a, [VE, 40, VS], b, [VE, 41, VS], c, [VE, 99, 98])),
        ("same image twice", prompt([5, VS], a, [VE, VS], a, [VE, 7])),
        ("first", prompt(b, [VE, 1, 2, 3])),
        ("last", prompt([17, 18, VS], a)),
        ("alone", prompt(c)),
        ("300 tokens after", prompt([5, VS], b, [VE, *text])),
        ("300 tokens before", prompt([*text, VS], a, [VE, 5, 6])),
    ]


def check_vl_logits(model, ref, cases, pixels=tm.VL_PIXELS, text_lengths=(1, 40)) -> None:
    """The engine's logits of the cases and of text sequences, packed in one batch, vs transformers'."""
    rng = np.random.default_rng(7)
    texts = [rng.integers(0, 300, n) for n in text_lengths]
    inputs = [_multimodal.engine_input(model, mi, name) for name, mi in cases]
    got = model.forward_logits(inputs + texts)
    for (name, mi), ei, logits in zip(cases, inputs, got):
        assert_logits_close(logits, hf_logits(ref, ei.tokens, images_of(mi), pixels), name)
    for seq, logits in zip(texts, got[len(cases):]):
        assert_logits_close(logits, hf_logits(ref, seq, []), f"text of {len(seq)}")


# ---- Qwen3-VL (dense) configs ----------------------------------------------------------------------------------

VL_CONFIGS = {
    # Qwen3-VL-2B/4B-like: tied embeddings, head_dim 32 with [24, 20, 20] scaled, theta 5e6, 3 taps of depth 4
    "tied-hd32-theta5e6-3taps": dict(tied=True, head_dim=32, mrope_section=(6, 5, 5), rope_theta=5e6,
                                     vision=dict(depth=4, deepstack_visual_indexes=[1, 2, 3])),
    "hd64-kv1-eps1e-5": dict(head_dim=64, mrope_section=(12, 10, 10), kv_heads=1, rms_norm_eps=1e-5,
                             max_positions=4096),
    "kv4-48x48-grid-gelu": dict(kv_heads=4, vision=dict(num_position_embeddings=2304, hidden_act="gelu")),
    "vision-hd72-quick-gelu": dict(vision=dict(hidden_size=144, num_heads=2, intermediate_size=96,
                                               hidden_act="quick_gelu", num_position_embeddings=100)),
    "vision-hd36-unsorted-taps-gelu-new": dict(vision=dict(hidden_size=72, num_heads=2, depth=4, hidden_act="gelu_new",
                                                           deepstack_visual_indexes=[3, 1])),
    "vision-4-heads-no-taps-gelu-fast": dict(vision=dict(hidden_size=64, num_heads=4, intermediate_size=128,
                                                         hidden_act="gelu_fast", deepstack_visual_indexes=[])),
}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """torch's own threads and the engine's pool on the same (few) cores slow both down tenfold here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("qwen3_configs")


@pytest.mark.parametrize("name", list(VL_CONFIGS))
def test_vl_config_logits_match_transformers(root, name):
    path, ref = tm.make_vl_checkpoint(root / f"vl-{name}", seed=3, **VL_CONFIGS[name])
    model = load_model(str(path))
    check_vl_logits(model, ref, image_prompts())


def test_vl_real_pixel_bounds_and_large_grids(root):
    """Qwen3-VL's own processor bounds (at least 64 tokens an image) and the real 48 x 48 position grid,
    interpolated down and up (grids of 16 to 74 patches a side)."""
    path, ref = tm.make_vl_checkpoint(root / "vl-real-pixels", seed=4, pixels=REAL_PIXELS,
                                      vision=dict(num_position_embeddings=2304))  # fmt: skip
    model = load_model(str(path))
    cases = [("wide", prompt([5, VS], image_bytes(1200, 200, 3), [VE, 6, 7])),
             ("tall", prompt([5, VS], image_bytes(90, 700, 4), [VE, 6, 7])),
             ("tiny", prompt([5, VS], image_bytes(10, 10, 5, "jpeg"), [VE, 6, 7]))]
    check_vl_logits(model, ref, cases, REAL_PIXELS)
    assert [_multimodal.engine_input(model, mi, n).n_image_tokens for n, mi in cases] == [228, 66, 64]


@pytest.mark.parametrize("name", ["tied-hd32-theta5e6-3taps", "hd64-kv1-eps1e-5"])
def test_vl_config_greedy_sampling_equals_generate(root, name):
    """Decoding after images (each generated token at its index + the rope delta) on other M-RoPE sections."""
    path, ref = tm.make_vl_checkpoint(root / f"vl-greedy-{name}", seed=3, **VL_CONFIGS[name])
    model = load_model(str(path))
    client = tinker.ServiceClient().create_sampling_client(base_model=str(path)).result()
    params = types.SamplingParams(max_tokens=10, temperature=0.0, stop=[])
    for case, mi in image_prompts()[:3] + image_prompts()[6:7]:
        inputs = hf_inputs(_multimodal.engine_input(model, mi, case).tokens, images_of(mi))
        with torch.no_grad():
            out = ref.generate(**inputs, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
        want = out[0, inputs["input_ids"].shape[1]:].tolist()
        assert client.sample(mi, 1, params).result().sequences[0].tokens == want, case


# ---- Qwen3-VL-MoE configs ----------------------------------------------------------------------------------------

VLMOE_CONFIGS = {
    "top1": dict(experts_per_token=1),
    "top8-of-16": dict(experts=16, experts_per_token=8),
    "norm-topk-false": dict(norm_topk_prob=False),  # transformers' Qwen3-VL-MoE router renormalises anyway
    "sparse-step2-mlp-only": dict(layers=4, sparse_step=2, mlp_only_layers=[3]),
    "tied-hd32-kv1": dict(tied=True, head_dim=32, mrope_section=(6, 5, 5), kv_heads=1, rope_theta=5e6),
}


def moe_cases(model, ref, cases, pixels=tm.VL_PIXELS):
    for name, mi in cases:
        tokens = _multimodal.engine_input(model, mi, name).tokens
        gap = vl_routing_gap(ref, tokens, images_of(mi), pixels)
        assert gap > ROUTING_GAP, f"{name}: the reference's routing has a near-tie ({gap:.2g}); pick other inputs"
    return cases


@pytest.mark.parametrize("name", list(VLMOE_CONFIGS))
def test_vlmoe_config_logits_match_transformers(root, name):
    path, ref = tm.make_vl_checkpoint(root / f"vlmoe-{name}", "qwen3vlmoe", seed=5, **VLMOE_CONFIGS[name])
    model = load_model(str(path))
    assert model.config["norm_topk_prob"] == 1
    check_vl_logits(model, ref, moe_cases(model, ref, image_prompts()[:6]))


@pytest.mark.parametrize("width", [32, 64])  # 2 * 32 == hidden: gate_up_proj square; 64 == hidden: down_proj
def test_vlmoe_hub_layout_with_a_square_expert_tensor(root, width):
    """The hub's expert layout ([E, D, 2I] / [E, I, D], x @ W[e]) where one tensor has the same shape in both
    orientations: the layer's other fused tensor tells the file's orientation. (transformers 5.25's own loader
    decides each tensor by its shape alone and reads the square one untransposed: it loads these files wrongly;
    the reference here is the model the file was written from.)"""
    path, ref = tm.make_vl_checkpoint(root / f"vlmoe-I{width}", "qwen3vlmoe", seed=5, layers=3, mlp_only_layers=[1],
                                      expert_intermediate=width)  # fmt: skip
    hub = write_hub_layout(path, ref, root / f"vlmoe-I{width}-hub")
    cases = image_prompts()[:2]
    for directory in (path, hub):
        model = load_model(str(directory))
        check_vl_logits(model, ref, moe_cases(model, ref, cases), text_lengths=(9,))


# ---- Qwen3-MoE (text) configs ----------------------------------------------------------------------------------

MOE_CONFIGS = {
    "top1": dict(experts_per_token=1),
    "top1-no-renorm": dict(experts_per_token=1, norm_topk_prob=False),
    "top8-of-16-no-renorm": dict(experts=16, experts_per_token=8, norm_topk_prob=False),
    "step2-mlp-only-tied": dict(layers=4, sparse_step=2, mlp_only_layers=[3], tied=True),
    "hd64-kv1-eps1e-5-theta1e7": dict(head_dim=64, kv_heads=1, rms_norm_eps=1e-5, rope_theta=1e7),
    "kv4-all-dense": dict(kv_heads=4, mlp_only_layers=[0, 1]),
}


def clear_sequences(ref, lengths, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        for _ in range(100):
            seq = rng.integers(0, 320, n)
            if not any(tm.moe_layer(ref.config, i) for i in range(ref.config.num_hidden_layers)) or \
                    text_routing_gap(ref, seq) > ROUTING_GAP:
                break
        else:
            raise AssertionError(f"no sequence of {n} tokens routed clearly")
        out.append(seq)
    return out


@pytest.mark.parametrize("name", list(MOE_CONFIGS))
def test_moe_config_logits_match_transformers(root, name):
    path, ref = tm.make_hf_checkpoint(root / f"moe-{name}", "qwen3moe", seed=6, vocab=320, **MOE_CONFIGS[name])
    model = load_model(str(path))
    seqs = clear_sequences(ref, (1, 9, 70), 1)
    for seq, logits in zip(seqs, model.forward_logits(seqs)):
        assert_logits_close(logits, tm.reference_logits(ref, seq).astype(np.float64), f"{name}, {len(seq)} tokens")


@pytest.mark.parametrize("width", [32, 64])
def test_moe_fused_layouts_with_a_square_expert_tensor(root, width):
    """Qwen3-MoE's fused expert tensors in both orientations, with a square one (as the VL-MoE test)."""
    from safetensors.torch import save_file

    path, ref = tm.make_hf_checkpoint(root / f"moe-I{width}", "qwen3moe", seed=6, vocab=320, layers=3,
                                      mlp_only_layers=[1], expert_intermediate=width)  # fmt: skip
    seqs = clear_sequences(ref, (1, 30), 2)
    for transposed in (False, True):
        directory = root / f"moe-I{width}-fused-{transposed}"
        directory.mkdir()
        shutil.copyfile(path / "config.json", directory / "config.json")
        state = {k: v.detach().contiguous() for k, v in ref.state_dict().items()}  # [E, 2I, D] / [E, D, I]
        if transposed:
            state = {k: v.transpose(1, 2).contiguous() if ".mlp.experts." in k else v for k, v in state.items()}
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        for seq, logits in zip(seqs, load_model(str(directory)).forward_logits(seqs)):
            assert_logits_close(logits, tm.reference_logits(ref, seq).astype(np.float64),
                                f"transposed={transposed}, {len(seq)} tokens")


# ---- config files: what transformers' config classes make of them ---------------------------------------------


def _text(c):
    return c["text_config"]


def _hub_form(c):
    """As the hub's (transformers 4.57) config.json: rope_theta + rope_scaling, the vision model_type qwen3_vl."""
    rope = _text(c).pop("rope_parameters")
    _text(c).update(rope_theta=rope["rope_theta"], rope_scaling={
        "mrope_interleaved": True, "mrope_section": rope["mrope_section"], "rope_type": "default"})
    c["vision_config"].pop("rope_parameters", None)
    c["vision_config"]["model_type"] = "qwen3_vl"


CONFIG_EDITS = {
    # name: (edit of config.json, checkpoint arguments)
    "hub-4.57-form": (_hub_form, dict(rope_theta=5e6)),
    "hub-4.57-form-moe": (_hub_form, dict(arch="qwen3vlmoe", rope_theta=5e6)),
    "no-rope-theta": (lambda c: _text(c)["rope_parameters"].pop("rope_theta"), {}),  # Qwen3VLTextConfig: 5e5
    "no-rope-theta-moe": (lambda c: _text(c)["rope_parameters"].pop("rope_theta"), dict(arch="qwen3vlmoe")),
    "no-rope-keys": (lambda c: _text(c).pop("rope_parameters"), {}),  # theta 5e5, sections [24, 20, 20]
    "mrope-interleaved-false": (lambda c: _text(c)["rope_parameters"].update(mrope_interleaved=False), {}),
    "no-mrope-interleaved": (lambda c: _text(c)["rope_parameters"].pop("mrope_interleaved"), {}),
    "real-sections-at-head-dim-16": (lambda c: _text(c)["rope_parameters"].update(mrope_section=[24, 20, 20]), {}),
    "zero-sections": (lambda c: _text(c)["rope_parameters"].update(mrope_section=[0, 0, 0]), {}),
    "no-head-dim": (lambda c: _text(c).pop("head_dim"), dict(head_dim=128)),  # Qwen3VLTextConfig: 128
    "no-kv-heads": (lambda c: _text(c).pop("num_key_value_heads"), dict(heads=64, kv_heads=32)),  # 32
    "no-kv-heads-moe": (lambda c: _text(c).pop("num_key_value_heads"), dict(arch="qwen3vlmoe", heads=32,
                                                                            kv_heads=16)),  # 16
    "text-tie-without-top-level": (lambda c: (c.pop("tie_word_embeddings"), _text(c).update(tie_word_embeddings=True)),
                                   {}),  # the top-level flag governs: absent, untied
}  # fmt: skip


@pytest.mark.parametrize("name", list(CONFIG_EDITS))
def test_config_files_read_as_transformers_reads_them(root, name):
    """The checkpoint's config.json edited; the reference is transformers' from_pretrained of the edited files."""
    from transformers import AutoModelForImageTextToText

    edit, kwargs = CONFIG_EDITS[name]
    kwargs = dict(kwargs)
    arch = kwargs.pop("arch", "qwen3vl")
    path, _ = tm.make_vl_checkpoint(root / f"cfg-{name}", arch, seed=8, **kwargs)
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))
    ref = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    if arch == "qwen3vlmoe":
        ref.config._experts_implementation = ref.config.text_config._experts_implementation = "eager"
    model = load_model(str(path))
    cases = image_prompts(5)[:2]
    if arch == "qwen3vlmoe":
        moe_cases(model, ref, cases)
    else:
        cases += image_prompts(5)[6:7]  # (300 tokens after an image)
    check_vl_logits(model, ref, cases, text_lengths=(12,))


# ---- refused clearly ---------------------------------------------------------------------------------------------


def _edit_copy(source, directory, edit):
    shutil.copytree(source, directory)
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


REFUSED = {
    "text attention_bias": ("qwen3vl", lambda c: _text(c).update(attention_bias=True), r"attention_bias"),
    "vision hidden_act silu": ("qwen3vl", lambda c: c["vision_config"].update(hidden_act="silu"),
                               r"vision_config: hidden_act 'silu' is not supported"),
    "non-square position grid": ("qwen3vl", lambda c: c["vision_config"].update(num_position_embeddings=60),
                                 r"num_position_embeddings 60 is not a square"),
    "deepstack tap past the depth": ("qwen3vl", lambda c: c["vision_config"].update(deepstack_visual_indexes=[0, 3]),
                                     r"deepstack_visual_indexes must be distinct block indices from 0 to 2"),
    "out_hidden_size": ("qwen3vl", lambda c: c["vision_config"].update(out_hidden_size=32),
                        r"out_hidden_size 32 must equal the language model's hidden_size 64"),
    "rope yarn": ("qwen3vl", lambda c: _text(c)["rope_parameters"].update(rope_type="yarn", factor=2.0),
                  r"rope scaling type 'yarn' is not supported"),
    "shared expert (VL-MoE)": ("qwen3vlmoe", lambda c: _text(c).update(shared_expert_intermediate_size=96),
                               r"shared_expert_intermediate_size is 96 .*no shared expert"),
    "shared expert (MoE)": ("qwen3moe", lambda c: c.update(shared_expert_intermediate_size=96),
                            r"shared_expert_intermediate_size is 96 .*no shared expert"),
    "n_shared_experts (MoE)": ("qwen3moe", lambda c: c.update(n_shared_experts=1),
                               r"n_shared_experts is 1 .*no shared expert"),
}  # fmt: skip


@pytest.fixture(scope="module")
def plain(root):
    """One unedited checkpoint per architecture (for the refusals)."""
    return {"qwen3vl": tm.make_vl_checkpoint(root / "plain-vl", seed=1)[0],
            "qwen3vlmoe": tm.make_vl_checkpoint(root / "plain-vlmoe", "qwen3vlmoe", seed=1)[0],
            "qwen3moe": tm.make_hf_checkpoint(root / "plain-moe", "qwen3moe", seed=1, vocab=320)[0]}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_configs_are_refused_naming_the_key(root, plain, case):
    arch, edit, match = REFUSED[case]
    directory = _edit_copy(plain[arch], root / f"refused-{case.replace(' ', '_')}", edit)
    with pytest.raises(ModelLoadError, match=match):
        load_model(str(directory))


def test_shared_expert_tensors_are_refused(root, plain):
    """A Qwen2-MoE-style shared expert's weights in a Qwen3-MoE file: refused by name, not ignored."""
    from safetensors.torch import load_file, save_file

    directory = root / "shared-expert-tensor"
    shutil.copytree(plain["qwen3moe"], directory)
    state = load_file(str(directory / "model.safetensors"))
    state["model.layers.0.mlp.shared_expert.gate_proj.weight"] = torch.zeros(96, 64)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"'model\.layers\.0\.mlp\.shared_expert\.gate_proj\.weight' is not part"):
        load_model(str(directory))


# ---- images --------------------------------------------------------------------------------------------------------


def _png(image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **kwargs)
    return buf.getvalue()


def _jpeg(image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


def _png16(values: np.ndarray) -> bytes:
    """A 16-bit RGB or RGBA PNG (Pillow cannot write one) of uint16 [H, W, 3 or 4] values."""
    h, w, c = values.shape
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def image_zoo() -> dict[str, bytes]:
    from PIL import Image

    rgb = make_image(70, 45, 1)
    alpha = np.asarray(make_image(70, 45, 4, "RGBA")).copy()
    alpha[..., 3] = np.linspace(0, 255, 70)[None, :].astype(np.uint8)
    palette = rgb.convert("P")
    exif = rgb.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees to display
    wide16 = np.asarray(rgb).astype(np.uint16) * 257 + np.arange(3, dtype=np.uint16) * 50
    return {
        "tiny 5x5 (upscaled)": _png(make_image(5, 5, 2)),
        "1x1": _png(make_image(1, 1, 2)),
        "1x150 strip": _png(make_image(1, 150, 2)),
        "aspect 200 (600x3)": _png(make_image(600, 3, 2)),
        "aspect 133 (2000x15)": _png(make_image(2000, 15, 2)),
        "L": _png(rgb.convert("L")),
        "LA": _png(make_image(70, 45, 3, "LA")),
        "P": _png(palette),
        "P with a transparent index": _png(palette, transparency=5),
        "RGBA with varying alpha": _png(Image.fromarray(alpha, "RGBA")),
        "RGB with a tRNS colour": _png(rgb, transparency=(10, 20, 30)),
        "L with a tRNS value": _png(rgb.convert("L"), transparency=7),
        "1-bit": _png(rgb.convert("1")),
        "16-bit grey": _png(Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257 + 3)),
        "16-bit RGB": _png16(wide16),
        "16-bit RGBA": _png16(np.concatenate([wide16, np.full((45, 70, 1), 40000, np.uint16)], -1)),
        "JPEG grey": _jpeg(rgb.convert("L")),
        "JPEG CMYK": _jpeg(rgb.convert("CMYK")),
        "JPEG progressive 4:4:4": _jpeg(rgb, progressive=True, subsampling=0),
        "JPEG EXIF orientation 6": _jpeg(rgb, exif=exif),
        "PNG EXIF orientation 6": _png(rgb, exif=exif),
    }


@pytest.mark.parametrize("pixels", [tm.VL_PIXELS, REAL_PIXELS], ids=["test-bounds", "real-bounds"])
def test_pixel_values_equal_the_hf_processor_for_every_kind_of_image(pixels):
    from PIL import Image

    proc = {"patch": 16, "temporal_patch": 2, "merge": 2, "min_pixels": pixels[0], "max_pixels": pixels[1],
            "rescale_factor": 1 / 255, "do_resize": True, "do_rescale": True, "do_normalize": True,
            "do_convert_rgb": True, "resample": 3, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}  # fmt: skip
    hf = tm.vl_image_processor(*pixels)
    for name, data in image_zoo().items():
        mine = _images.preprocess(data, proc, name)
        opened = Image.open(io.BytesIO(data))
        want = hf(images=[opened], return_tensors="np")
        assert np.array_equal(mine.pixel_values, want["pixel_values"]), name
        assert list(mine.grid) == want["image_grid_thw"][0].tolist(), name
        # the token count of the stored size, which the cookbook's image_to_chunk computes (EXIF not applied)
        count = hf.get_number_of_image_patches(opened.height, opened.width, {}) // 4
        assert _images.token_count(opened.height, opened.width, proc) == count == mine.n_patches // 4, name


def test_aspect_ratio_past_200_is_refused_as_transformers_refuses_it(plain):
    from PIL import Image

    data = _png(make_image(601, 3, 2))
    with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
        tm.vl_image_processor()(images=[Image.open(io.BytesIO(data))])
    sampler = tinker.ServiceClient().create_sampling_client(base_model=str(plain["qwen3vl"])).result()
    with pytest.raises(tinker.BadRequestError, match=r"601 x 3 pixels; its aspect ratio 200\.3 is above the 200"):
        sampler.compute_logprobs(prompt([5, VS], data, [VE, 6])).result()


@pytest.mark.parametrize("name", ["RGBA with varying alpha", "P with a transparent index", "16-bit RGBA",
                                  "JPEG EXIF orientation 6", "JPEG CMYK", "1x150 strip"])
def test_logits_with_unusual_images_match_transformers(plain, name):
    """The zoo's awkward images through the whole model (a tiny Qwen3-VL) vs transformers on its processor's
    pixel values."""
    from transformers import AutoModelForImageTextToText

    path = plain["qwen3vl"]
    ref = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    model = load_model(str(path))
    check_vl_logits(model, ref, [(name, prompt([5, VS], image_zoo()[name], [VE, 6, 7]))], text_lengths=())


# ---- LoRA gradients on other configs, text-only and image datums in one batch -----------------------------------


def datum_for(model, mi: types.ModelInput, seed: int):
    ei = _multimodal.engine_input(model, mi, "datum")
    tokens = np.asarray(getattr(ei, "tokens", ei))
    rng = np.random.default_rng(seed)
    targets = np.concatenate([tokens[1:], [rng.integers(0, 300)]]).astype(np.int64)
    weights = rng.uniform(0.5, 1.5, len(tokens)).astype(np.float32)
    targets[tokens == IMAGE], weights[tokens == IMAGE] = 0, 0.0
    return types.Datum(model_input=mi, loss_fn_inputs={"target_tokens": targets, "weights": weights}), tokens


def reference_loss(model, data, tokens_list):
    logprobs, total = [], 0.0
    for datum, tokens in zip(data, tokens_list):
        logits = model(**hf_inputs(tokens, images_of(datum.model_input)), use_cache=False).logits[0].float()
        target = torch.from_numpy(datum.loss_fn_inputs["target_tokens"].to_numpy()).long()
        weights = torch.from_numpy(datum.loss_fn_inputs["weights"].to_numpy())
        lp = torch.log_softmax(logits, -1).gather(1, target[:, None])[:, 0]
        loss = -(lp * weights).sum()
        loss.backward()
        total += float(loss.detach())
        logprobs.append(lp.detach().numpy())
    return logprobs, total


def mixed_batch(model, tag: int):
    cases = image_prompts(tag)
    inputs = [cases[0][1], prompt(list(range(20, 50))), cases[1][1], cases[3][1], prompt([7, 8, 9])]
    return [datum_for(model, mi, seed) for seed, mi in enumerate(inputs)]


def check_training(client, reference_model, batch, want_grads):
    data, tokens = zip(*batch)
    out = client.forward_backward(list(data), "cross_entropy").result()
    want_lp, want_loss = reference_loss(reference_model, data, tokens)
    for got, want in zip(out.loss_fn_outputs, want_lp):
        assert np.abs(got["logprobs"].to_numpy() - want).max() <= LP_ATOL
    assert abs(out.metrics["loss:sum"] - want_loss) <= 1e-4 * max(1.0, abs(want_loss))
    errors = relative_errors(client._adapter.gradients(), want_grads())
    bad = {k: e for k, e in errors.items() if not e <= GRAD_RTOL}
    assert not bad, f"gradients differ (relative): {sorted(bad.items())[:6]}"


def test_lora_gradients_tied_vl_mixed_batch_match_peft(root):
    """Qwen3-VL-2B-like (tied embeddings: the unembed adapter on the output projection only, head_dim 32, theta
    5e6, 3 taps), a batch of image and text-only datums, vs peft."""
    path, ref = tm.make_vl_checkpoint(root / "lora-vl", seed=9, **VL_CONFIGS["tied-hd32-theta5e6-3taps"])
    model = load_model(str(path))
    client = tinker.ServiceClient().create_lora_training_client(base_model=str(path), rank=4).result()
    values = rt.random_adapter_values({k: v.shape for k, v in client._adapter.parameters().items()}, seed=12)
    client._adapter.set_parameters(values)
    peft_model = rt.peft_model(ref, 4)
    rt.load_adapter_values(peft_model, values)
    rt.zero_gradients(peft_model)
    check_training(client, peft_model, mixed_batch(model, 1), lambda: rt.peft_gradients(peft_model))


def test_lora_gradients_vlmoe_top1_sparse_step2_mixed_batch_match_reference(root):
    """Qwen3-VL-MoE with top-1 routing and decoder_sparse_step 2 (dense layers between), a batch of image and
    text-only datums, vs the hand-written shared-outer expert LoRA reference of test_qwen3_moe."""
    path, ref = tm.make_vl_checkpoint(root / "lora-vlmoe", "qwen3vlmoe", seed=10, layers=4, sparse_step=2,
                                      experts_per_token=1)  # fmt: skip
    model = load_model(str(path))
    client = tinker.ServiceClient().create_lora_training_client(base_model=str(path), rank=4).result()
    reference = MoeLoraReference(ref, 4, (True, True, True))
    shapes = {k: v.shape for k, v in client._adapter.parameters().items()}
    assert shapes == {k: tuple(p.shape) for k, p in reference.params.items()}
    values = random_values(shapes, 4, 13)
    client._adapter.set_parameters(values)
    reference.load(values)
    batch = mixed_batch(model, 2)
    for datum, tokens in batch:
        gap = vl_routing_gap(reference.model, tokens, images_of(datum.model_input))
        assert gap > ROUTING_GAP, f"the reference's routing has a near-tie ({gap:.2g})"
    check_training(client, reference.model, batch, reference.gradients)
