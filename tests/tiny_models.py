"""Tiny random-weight checkpoints of each supported architecture, for tests.

`make_hf_checkpoint(dir, arch, ...)` builds a small transformers model (llama, qwen2, qwen3 or qwen3moe)
with ALL weights randomised at a scale that makes the network clearly non-linear (matrices
N(0, 1.2²/fan_in), i.e. std 0.15 at fan-in 64; norm weights 1 + N(0, 0.1²); biases N(0, 0.1²);
HF's own init, std 0.02 with unit norm weights, is nearly linear and would hide bugs), saves it as a Hugging Face
safetensors checkpoint (optionally sharded, in f32 / bf16 / f16) and returns the float32 reference
model that holds exactly the saved values.

`write_gguf(path, hf_model, arch, tensor_type)` writes the same model as a GGUF file the way
llama.cpp's convert_hf_to_gguf would (metadata keys, tensor names, the llama q/k row permutation,
rope_freqs for llama3 rope scaling, F32 norms and biases) with the 2-D weights stored in
`tensor_type`, and returns the float32 reference model whose weights are the dequantised values,
so that an exact engine agrees with it up to float32 summation order.

The K-quants (Q4_K, Q5_K, Q6_K) are not quantisable by the `gguf` package (0.19); this module has
a simple quantiser for them (`quantize`). The reference is always `gguf.quants.dequantize` of the
bytes actually written, so the quantiser only has to be plausible, not bit-identical to ggml's.

Dims (defaults): hidden 64, 2 layers, 4 query heads, 2 kv heads (GQA), head_dim 16 (qwen3: 32,
explicit and != hidden/heads, as in real Qwen3), intermediate 128, vocab 512, 1024 positions.
qwen3moe (Qwen3-MoE, engine name; transformers' model_type qwen3_moe) adds 8 experts of width 96 (2 x 96 !=
hidden, so a fused layout's orientation is unambiguous; a multiple of 32 for the block formats), 2 per token,
norm_topk_prob, decoder_sparse_step 1 and mlp_only_layers (dense layers) as keyword arguments; its router
weights get their own scale (`router_std`), so top-k gaps are clear of float32 noise.
Every 2-D weight has rows a multiple of 32 (all block formats); pass hidden=256,
intermediate=512 etc. for K-quants (256-element blocks).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch

ARCHS = ("llama", "qwen2", "qwen3", "qwen3moe")
VL_ARCHS = ("qwen3vl", "qwen3vlmoe")  # vision-language models (make_vl_model)
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe",
               "qwen3vl": "qwen3_vl", "qwen3vlmoe": "qwen3_vl_moe"}  # transformers'

# default hyperparameters per architecture (overridable through make_hf_model's keyword arguments)
_DEFAULTS = {
    "llama": dict(rope_theta=10000.0, rms_norm_eps=1e-5, head_dim=None),
    "qwen2": dict(rope_theta=1000000.0, rms_norm_eps=1e-6, head_dim=None),
    "qwen3": dict(rope_theta=1000000.0, rms_norm_eps=1e-6, head_dim=32),
    "qwen3moe": dict(rope_theta=10000.0, rms_norm_eps=1e-6, head_dim=32),
}
MOE_DEFAULTS = dict(experts=8, experts_per_token=2, expert_intermediate=96, norm_topk_prob=True, sparse_step=1,
                    mlp_only_layers=())  # fmt: skip

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # fmt: skip
LINEAR_ROPE = {"rope_type": "linear", "factor": 4.0}


# ---- Hugging Face models ----------------------------------------------------------------------


def tiny_config(arch: str, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                head_dim: int | None = None, intermediate: int = 128, vocab: int = 512,
                max_positions: int = 1024, rope_theta: float | None = None, rope_scaling: dict | None = None,
                rms_norm_eps: float | None = None, tied: bool = False, **moe):  # fmt: skip
    """A transformers config for a tiny `arch` model (eager attention; qwen3moe: eager experts too, and
    the MOE_DEFAULTS keys as keyword arguments)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    d = _DEFAULTS[arch]
    head_dim = head_dim or d["head_dim"] or hidden // heads
    rope = {"rope_type": "default", **(rope_scaling or {})}
    rope["rope_theta"] = float(rope_theta if rope_theta is not None else d["rope_theta"])
    kwargs = dict(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, intermediate_size=intermediate, vocab_size=vocab, max_position_embeddings=max_positions,
        rms_norm_eps=float(rms_norm_eps if rms_norm_eps is not None else d["rms_norm_eps"]),
        rope_parameters=rope, tie_word_embeddings=tied, hidden_act="silu",
        bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )  # fmt: skip
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "qwen3moe": Qwen3MoeConfig}[arch]
    if arch == "qwen2":
        kwargs.update(use_sliding_window=False)
    if moe and arch != "qwen3moe":
        raise ValueError(f"{arch} has no experts: unexpected {sorted(moe)}")
    if arch == "qwen3moe":
        unknown = set(moe) - set(MOE_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown qwen3moe settings {sorted(unknown)}")
        m = {**MOE_DEFAULTS, **moe}
        kwargs.update(num_experts=m["experts"], num_experts_per_tok=m["experts_per_token"],
                      moe_intermediate_size=m["expert_intermediate"], norm_topk_prob=m["norm_topk_prob"],
                      decoder_sparse_step=m["sparse_step"], mlp_only_layers=list(m["mlp_only_layers"]),
                      use_sliding_window=False)  # fmt: skip
    config = cls(**kwargs)
    config._attn_implementation = "eager"
    if arch == "qwen3moe":
        config._experts_implementation = "eager"  # the per-expert loop: float32 exactly as written
    return config


@torch.no_grad()
def randomize_(model, seed: int = 0, *, matrix_gain: float = 1.2, embed_std: float = 1.0,
               norm_std: float = 0.1, bias_std: float = 0.1, router_std: float = 0.3):  # fmt: skip
    """Overwrites every parameter: matrices N(0, (matrix_gain / sqrt(fan_in))²) (0.15 at fan-in 64),
    embeddings N(0, embed_std²), norm weights 1 + N(0, norm_std²), biases N(0, bias_std²), MoE routers
    N(0, router_std²) (router logits of std ~2.4 at hidden 64: clear top-k gaps, unsaturated softmax).
    Deterministic in `seed`."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if name.endswith("mlp.gate.weight"):  # the router (transformers' name)
            value = router_std * noise
        elif name.endswith(".bias"):  # (a vision LayerNorm's bias too)
            value = bias_std * noise
        elif "norm" in name:
            value = 1.0 + norm_std * noise
        elif "embed_tokens" in name:
            value = embed_std * noise
        elif "patch_embed" in name:  # a Conv3d [out, C, T, P, P]: its fan-in is C T P P
            value = matrix_gain / math.sqrt(p[0].numel()) * noise
        else:
            value = matrix_gain / math.sqrt(p.shape[-1]) * noise
        p.copy_(value.to(p.dtype))
    return model


# ---- vision-language models (Qwen3-VL) ---------------------------------------------------------------------

VL_TOKENS = {"image_token_id": 300, "video_token_id": 301, "vision_start_token_id": 302, "vision_end_token_id": 303}
VL_VISION = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, temporal_patch_size=2,
                 spatial_merge_size=2, in_channels=3, num_position_embeddings=64, deepstack_visual_indexes=[0, 2],
                 hidden_act="gelu_pytorch_tanh")  # fmt: skip
# The image processor's pixel bounds for tests: 4 to 36 merged tokens (32 x 32 pixels each)
VL_PIXELS = (4 * 32 * 32, 36 * 32 * 32)


def tiny_vl_config(arch: str = "qwen3vl", *, hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                   head_dim: int = 16, intermediate: int = 128, vocab: int = 320, max_positions: int = 1024,
                   rope_theta: float = 10000.0, mrope_section=(4, 2, 2), tied: bool = False, vision: dict | None = None,
                   **unused):  # fmt: skip
    """A transformers Qwen3-VL config (reference/qwen3-moe-vl.md 4.2): text hidden 64, head_dim 16 (8 rotary
    frequencies: T at 0, 3, 6, 7, H at 1, 4, W at 2, 5), vision depth 3 of width 32 with deepstack taps after
    blocks 0 and 2, an 8 x 8 learned position grid (interpolated for every image), special ids 300-303.
    qwen3vlmoe (Qwen3-VL-MoE) adds MOE_DEFAULTS' experts (8 of width 96, top 2; 2 x 96 != hidden, so the fused
    layouts' orientation is unambiguous; mlp_only_layers and the other MOE_DEFAULTS keys as keyword arguments)."""
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

    if arch not in VL_ARCHS:
        raise ValueError(f"arch must be one of {VL_ARCHS}, got {arch!r}")
    moe = {k: unused.pop(k) for k in list(unused) if k in MOE_DEFAULTS}
    if moe and arch != "qwen3vlmoe":
        raise ValueError(f"{arch} has no experts: unexpected {sorted(moe)}")
    unknown = set(unused) - {"rope_scaling", "rms_norm_eps"}
    if unknown or unused.get("rope_scaling"):
        raise ValueError(f"unsupported settings for {arch}: {sorted(unused)}")
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                rms_norm_eps=float(unused.get("rms_norm_eps") or 1e-6), max_position_embeddings=max_positions,
                rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta),
                                 "mrope_section": list(mrope_section), "mrope_interleaved": True})  # fmt: skip
    cls = Qwen3VLConfig
    if arch == "qwen3vlmoe":
        m = {**MOE_DEFAULTS, **moe}
        text.update(num_experts=m["experts"], num_experts_per_tok=m["experts_per_token"],
                    moe_intermediate_size=m["expert_intermediate"], norm_topk_prob=m["norm_topk_prob"],
                    decoder_sparse_step=m["sparse_step"], mlp_only_layers=list(m["mlp_only_layers"]))  # fmt: skip
        cls = Qwen3VLMoeConfig
    config = cls(text_config=text, vision_config={**VL_VISION, "out_hidden_size": hidden, **(vision or {})},
                 tie_word_embeddings=tied, **VL_TOKENS)
    config._attn_implementation = "eager"
    if arch == "qwen3vlmoe":
        config._experts_implementation = config.text_config._experts_implementation = "eager"
    return config


def make_vl_model(arch: str = "qwen3vl", *, seed: int = 0, **config_kwargs):
    """A tiny float32 transformers Qwen3-VL (vision tower included) with randomised weights, in eval mode."""
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

    config = tiny_vl_config(arch, **config_kwargs)
    torch.manual_seed(seed)
    cls = Qwen3VLMoeForConditionalGeneration if arch == "qwen3vlmoe" else Qwen3VLForConditionalGeneration
    model = cls._from_config(config, dtype=torch.float32, attn_implementation="eager")
    randomize_(model, seed)
    return model.eval()


def vl_image_processor(min_pixels: int = VL_PIXELS[0], max_pixels: int = VL_PIXELS[1]):
    """The Qwen2-VL image processor transformers runs for Qwen3-VL (its Pillow backend: torchvision is not a
    dependency here), with the tiny model's patch sizes and test-sized pixel bounds."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=VL_VISION["patch_size"], merge_size=VL_VISION["spatial_merge_size"],
                                    temporal_patch_size=VL_VISION["temporal_patch_size"], image_mean=[0.5] * 3,
                                    image_std=[0.5] * 3, size={"shortest_edge": min_pixels,
                                                               "longest_edge": max_pixels})  # fmt: skip


def make_vl_checkpoint(directory, arch: str = "qwen3vl", *, dtype: torch.dtype = torch.float32, seed: int = 0,
                       processor: bool = True, pixels: tuple[int, int] = VL_PIXELS, **config_kwargs):  # fmt: skip
    """Saves a tiny random Qwen3-VL checkpoint (config.json + model.safetensors, and the image processor's
    preprocessor_config.json with the (min, max) `pixels` bounds unless processor=False) under `directory`; returns
    (path, float32 reference)."""
    from transformers.utils import logging as hf_logging

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = make_vl_model(arch, seed=seed, **config_kwargs)
    hf_logging.disable_progress_bar()
    model.to(dtype).save_pretrained(directory, safe_serialization=True)
    if processor:
        vl_image_processor(*pixels).save_pretrained(directory)
    if dtype != torch.float32:
        model = type(model).from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
        if arch == "qwen3vlmoe":
            model.config._experts_implementation = model.config.text_config._experts_implementation = "eager"
    return directory, model.eval()


def make_hf_model(arch: str, *, seed: int = 0, **config_kwargs):
    """A tiny float32 transformers CausalLM of `arch` (a vision-language model for VL_ARCHS) with randomised
    weights, in eval mode."""
    from transformers import AutoModelForCausalLM

    if arch in VL_ARCHS:
        return make_vl_model(arch, seed=seed, **config_kwargs)

    config = tiny_config(arch, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    randomize_(model, seed)
    if config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.eval()


def make_hf_checkpoint(directory, arch: str, *, rope_scaling: dict | None = None, tied: bool = False,
                       max_shard_size: int | str | None = None, dtype: torch.dtype = torch.float32, seed: int = 0,
                       **config_kwargs):  # fmt: skip
    """Saves a tiny random `arch` checkpoint (config.json + safetensors, sharded with an index when
    `max_shard_size` is small) in `dtype` under `directory`.

    Returns (path, reference): the reference is a float32 model holding exactly the saved values
    (for bf16/f16 the rounded weights, widened exactly to float32)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    model = make_hf_model(arch, seed=seed, rope_scaling=rope_scaling, tied=tied, **config_kwargs)
    model.to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    hf_logging.disable_progress_bar()  # tests print nothing
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    if dtype == torch.float32:
        return directory, model.eval()
    # Reload rather than cast back: bf16/f16 -> f32 is exact for the weights, but model.to(dtype) also
    # rounded the rotary inv_freq buffer, which a freshly loaded model recomputes in float32.
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
    if arch == "qwen3moe":
        reference.config._experts_implementation = "eager"
    return directory, reference.eval()


def shard_files(directory) -> list[Path]:
    return sorted(Path(directory).glob("*.safetensors"))


# ---- GGUF -------------------------------------------------------------------------------------


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: per head, rows (i, i + hd/2) become adjacent."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of permute_qk (transformers' _reverse_permute_weights)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(config) -> np.ndarray:
    """The `rope_freqs.weight` tensor convert_hf_to_gguf writes for llama3 rope scaling."""
    rope = config.rope_parameters
    base = rope["rope_theta"]
    dim = config.head_dim
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_ctx = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _qtype(t):
    from gguf import GGMLQuantizationType as QT

    return t if isinstance(t, QT) else QT[t]


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins per block -> the 12-byte K_SCALE layout of Q4_K/Q5_K."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return out


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _quantize_q45_k(x: np.ndarray, bits: int) -> np.ndarray:
    nmax = (1 << bits) - 1
    b = x.reshape(-1, 8, 32).astype(np.float32)
    lo, hi = np.minimum(b.min(-1), 0), np.maximum(b.max(-1), 0)
    scale, mins = (hi - lo) / nmax, -lo
    d = (scale.max(-1) / 63).astype(np.float16)
    dmin = (mins.max(-1) / 63).astype(np.float16)
    df, dminf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.rint(scale / np.where(df > 0, df, 1)), 0, 63)
    mn = np.clip(np.rint(mins / np.where(dminf > 0, dminf, 1)), 0, 63)
    eff_scale, eff_min = (df * sc)[..., None], (dminf * mn)[..., None]
    q = np.clip(np.rint((b + eff_min) / np.where(eff_scale > 0, eff_scale, 1)), 0, nmax).astype(np.uint8)
    low = q & 0x0F
    qs = (low[:, 0::2, :] | (low[:, 1::2, :] << 4)).reshape(-1, 128)
    parts = [_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, mn)]
    if bits == 5:
        high = (q >> 4) & 1  # [nb, 8 sub-blocks, 32]
        qh = np.zeros((q.shape[0], 32), dtype=np.uint8)
        for j in range(8):
            qh |= high[:, j, :] << j
        parts.append(qh)
    parts.append(qs)
    return np.concatenate(parts, axis=1)


def _quantize_q6_k(x: np.ndarray) -> np.ndarray:
    b = x.reshape(-1, 16, 16).astype(np.float32)
    scale = np.abs(b).max(-1) / 32
    d = (scale.max(-1) / 127).astype(np.float16)
    df = d.astype(np.float32)[:, None]
    sc = np.clip(np.rint(scale / np.where(df > 0, df, 1)), -128, 127)
    eff = (df * sc)[..., None]
    q = (np.clip(np.rint(b / np.where(eff > 0, eff, 1)), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 128)
    ql = (q[:, :, :64] & 0x0F) | ((q[:, :, 64:] & 0x0F) << 4)  # [nb, 2, 64]
    qh = np.zeros((q.shape[0], 2, 32), dtype=np.uint8)
    for s in range(4):
        qh |= ((q[:, :, s * 32:(s + 1) * 32] >> 4) & 3) << (2 * s)
    return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.astype(np.int8).view(np.uint8),
                           _f16_bytes(d)], axis=1)  # fmt: skip


def quantize(data: np.ndarray, qtype) -> np.ndarray:
    """gguf.quants.quantize, plus simple Q4_K / Q5_K / Q6_K quantisers. Returns the GGUF bytes
    (uint8, byte shape) or, for F32/F16, the float array."""
    from gguf import GGMLQuantizationType as QT
    from gguf import quants

    qtype = _qtype(qtype)
    data = np.ascontiguousarray(data, dtype=np.float32)
    k = {QT.Q4_K: lambda b: _quantize_q45_k(b, 4), QT.Q5_K: lambda b: _quantize_q45_k(b, 5), QT.Q6_K: _quantize_q6_k}
    if qtype in k:
        if data.shape[-1] % 256:
            raise ValueError(f"{qtype.name} needs rows of a multiple of 256 elements, got {data.shape}")
        blocks = k[qtype](data.reshape(-1, 256))
        return blocks.reshape(*data.shape[:-1], data.shape[-1] // 256 * blocks.shape[-1])
    return quants.quantize(data, qtype)


def dequantize(qdata: np.ndarray, qtype) -> np.ndarray:
    from gguf import quants

    return np.asarray(quants.dequantize(qdata, _qtype(qtype)), dtype=np.float32)


def _hf_to_gguf_names(arch: str, config, tied: bool | None = None) -> dict[str, str]:
    """transformers state-dict name -> GGUF name of every tensor (qwen3moe: its 2-D and 1-D tensors; the
    experts' 3-D parameters are _moe_expert_tensors')."""
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not (config.tie_word_embeddings if tied is None else tied):
        names["lm_head.weight"] = "output.weight"
    per_layer = {
        "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }  # fmt: skip
    if arch == "qwen2":
        per_layer.update({"self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
                          "self_attn.v_proj.bias": "attn_v.bias"})  # fmt: skip
    if arch in ("qwen3", "qwen3moe"):
        per_layer.update({"self_attn.q_norm.weight": "attn_q_norm.weight",
                          "self_attn.k_norm.weight": "attn_k_norm.weight"})  # fmt: skip
    dense_only = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
    for i in range(config.num_hidden_layers):
        sparse = arch == "qwen3moe" and moe_layer(config, i)
        for hf, gg in per_layer.items():
            if not (sparse and hf in dense_only):
                names[f"model.layers.{i}.{hf}"] = f"blk.{i}.{gg}"
        if sparse:
            names[f"model.layers.{i}.mlp.gate.weight"] = f"blk.{i}.ffn_gate_inp.weight"
    return names


_GGUF_LAYOUT = {"qwen3vl": "qwen3", "qwen3vlmoe": "qwen3moe"}  # a VL model's language model: its GGUF tensors


def _in_vl(name: str) -> str:
    """A text model's tensor name as a Qwen3-VL model has it (its language model under model.language_model)."""
    return name.replace("model.", "model.language_model.", 1) if name.startswith("model.") else name


def gguf_names(arch: str, config) -> dict[str, str]:
    """transformers name -> GGUF name of a model's 2-D and 1-D tensors (experts: _moe_expert_tensors), as llama.cpp's
    converter writes them; a vision-language model's GGUF is its language model alone (Qwen3VLTextModel)."""
    if arch not in VL_ARCHS:
        return _hf_to_gguf_names(arch, config)
    names = _hf_to_gguf_names(_GGUF_LAYOUT[arch], config.text_config, bool(config.tie_word_embeddings))
    return {_in_vl(k): v for k, v in names.items()}


def moe_layer(config, layer: int) -> bool:
    """Whether a Qwen3-MoE layer's MLP is the experts (transformers' rule)."""
    return (layer not in config.mlp_only_layers and config.num_experts > 0
            and (layer + 1) % config.decoder_sparse_step == 0)


def _moe_expert_tensors(config, state) -> list[tuple]:
    """(gguf name, transformers name, [E, rows, cols] values, rows of that parameter's dimension 1) of each
    sparse layer's experts as llama.cpp writes them: ffn_gate_exps / ffn_up_exps [E, I, H] (the two halves of
    transformers' gate_up_proj [E, 2I, H]) and ffn_down_exps [E, H, I]."""
    out, half = [], config.moe_intermediate_size
    for i in range(config.num_hidden_layers):
        if not moe_layer(config, i):
            continue
        gate_up = f"model.layers.{i}.mlp.experts.gate_up_proj"
        down = f"model.layers.{i}.mlp.experts.down_proj"
        values = state[gate_up].detach().to(torch.float32).numpy()
        out.append((f"blk.{i}.ffn_gate_exps.weight", gate_up, values[:, :half], slice(0, half)))
        out.append((f"blk.{i}.ffn_up_exps.weight", gate_up, values[:, half:], slice(half, 2 * half)))
        out.append((f"blk.{i}.ffn_down_exps.weight", down, state[down].detach().to(torch.float32).numpy(),
                    slice(None)))
    return out


def _byte_level_tokens(vocab: int) -> tuple[list[str], list[str]]:
    """(tokens, merges) of a small byte-level BPE vocabulary of `vocab` tokens (GPT-2's byte-to-character
    map for the 256 bytes, one merge "Ġ t", then filler tokens)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    chars = {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}
    tokens = [chars[b] for b in range(256)] + ["Ġt"]
    tokens += [f"<filler_{i}>" for i in range(len(tokens), vocab)]
    if len(tokens) != vocab:
        raise ValueError(f"a byte-level vocabulary needs at least 257 tokens, not {vocab}")
    return tokens, ["Ġ t"]


# Chat and vision special tokens of the tiny VL checkpoints' tokenizer (Qwen's names; the vision ids are VL_TOKENS')
VL_SPECIAL_TOKENS = {"<|image_pad|>": 300, "<|video_pad|>": 301, "<|vision_start|>": 302, "<|vision_end|>": 303,
                     "<|im_start|>": 304, "<|im_end|>": 305, "<|endoftext|>": 306}


def write_vl_tokenizer(directory, vocab: int = 320) -> None:
    """Writes a byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json, loaded by AutoTokenizer) of
    `vocab` tokens into a tiny VL checkpoint: _byte_level_tokens' vocabulary with VL_SPECIAL_TOKENS at their ids,
    <|im_end|> as EOS. Text is encoded byte by byte (plus one merge), so any string round-trips."""
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens, merges = _byte_level_tokens(vocab)
    for name, at in VL_SPECIAL_TOKENS.items():
        tokens[at] = name
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split()) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in VL_SPECIAL_TOKENS])
    directory = Path(directory)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "add_bos_token": False, "model_max_length": 1024}))


def write_gguf(path, hf_model, arch: str | None = None, tensor_type="F32", byte_tokenizer: bool = False):
    """Writes `hf_model` as a GGUF file like convert_hf_to_gguf + llama-quantize would; with byte_tokenizer, also
    a byte-level BPE tokenizer (tokenizer.ggml.model gpt2) of the model's vocabulary size, for the exporter.

    tensor_type: a ggml type name ("F32", "F16", "BF16", "Q8_0", "Q4_1", "Q4_K", ...) or
    GGMLQuantizationType for every 2-D weight, or a callable (gguf_name, shape) -> type for a mix.
    1-D tensors (norms, biases, rope_freqs) are always F32.

    Returns (path, reference): a float32 copy of hf_model whose weights are the dequantised GGUF
    values (q/k un-permuted again for llama)."""
    import gguf

    path = Path(path)
    config = hf_model.config
    arch = arch or next((a for a, t in MODEL_TYPES.items() if t == config.model_type), config.model_type)
    if arch not in ARCHS + VL_ARCHS or MODEL_TYPES[arch] != config.model_type:
        raise ValueError(f"arch {arch!r} does not match the model's model_type {config.model_type!r}")
    # a vision-language model's GGUF is its language model alone (llama.cpp's Qwen3VLTextModel): Qwen3's or
    # Qwen3-MoE's tensors from model.language_model, M-RoPE's sections and the deepstack count as metadata
    vl = arch in VL_ARCHS
    layout = _GGUF_LAYOUT.get(arch, arch)  # the tensors' names and forms
    text = config.text_config if vl else config
    choose = tensor_type if callable(tensor_type) else (lambda name, shape: tensor_type)
    heads, kv_heads, head_dim = text.num_attention_heads, text.num_key_value_heads, text.head_dim
    hidden = text.hidden_size
    rope = text.rope_parameters

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(text.max_position_embeddings)
    w.add_embedding_length(hidden)
    w.add_block_count(text.num_hidden_layers)
    w.add_feed_forward_length(text.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(float(text.rms_norm_eps))
    w.add_vocab_size(text.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if vl:
        w.add_rope_dimension_sections(list(rope["mrope_section"]) + [0] * (4 - len(rope["mrope_section"])))
        w.add_num_deepstack_layers(len(config.vision_config.deepstack_visual_indexes))
    if byte_tokenizer:
        tokens, merges = _byte_level_tokens(text.vocab_size)
        if vl:  # the special tokens at the ids the checkpoint's config gives (images need them)
            for name, at in VL_SPECIAL_TOKENS.items():
                tokens[at] = name
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_merges(merges)
        w.add_eos_token_id(text.vocab_size - 1)
    if layout == "qwen3moe":  # as convert_hf_to_gguf's Qwen3MoeModel writes them
        w.add_expert_count(text.num_experts)
        w.add_expert_used_count(text.num_experts_per_tok)
        w.add_expert_feed_forward_length(text.moe_intermediate_size)
        w.add_expert_weights_norm(bool(text.norm_topk_prob))
    rope_type = rope.get("rope_type", "default")
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(text))
    elif rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} is not supported here")

    reference = copy.deepcopy(hf_model).to(torch.float32).eval()
    ref_params = dict(reference.named_parameters())
    names = gguf_names(arch, config)
    full_state = hf_model.state_dict()
    text_state = {k.replace("model.language_model.", "model.", 1): v for k, v in full_state.items()}
    experts = [(g, _in_vl(h) if vl else h, d, r) for g, h, d, r in _moe_expert_tensors(text, text_state)] \
        if layout == "qwen3moe" else []  # fmt: skip
    state = {k: v for k, v in full_state.items() if k in names}
    missing = set(names) - set(state)
    extra = {k for k in full_state if k not in names and not k.endswith("inv_freq")} - {e[1] for e in experts}
    extra = {k for k in extra if not k.startswith("model.visual.")}  # (the mmproj file's)
    if config.tie_word_embeddings:
        extra.discard("lm_head.weight")
    if missing or extra:
        raise ValueError(f"tensor name mismatch: missing {sorted(missing)}, unexpected {sorted(extra)}")
    with torch.no_grad():
        for hf_name, gguf_name in names.items():
            data = state[hf_name].detach().to(torch.float32).numpy()
            permute_heads = 0
            if arch == "llama" and ".self_attn.q_proj." in hf_name:
                permute_heads = heads
            elif arch == "llama" and ".self_attn.k_proj." in hf_name:
                permute_heads = kv_heads
            if permute_heads:
                data = permute_qk(data, permute_heads)
            if data.ndim == 1:
                w.add_tensor(gguf_name, np.ascontiguousarray(data, dtype=np.float32))
                continue
            qtype = _qtype(choose(gguf_name, data.shape))
            qdata = quantize(data, qtype)
            w.add_tensor(gguf_name, qdata, raw_dtype=qtype)
            values = dequantize(qdata, qtype).reshape(data.shape)
            if permute_heads:
                values = unpermute_qk(values, permute_heads)
            ref_params[hf_name].copy_(torch.from_numpy(np.ascontiguousarray(values)))
        for gguf_name, hf_name, data, rows in experts:  # 3-D [E, rows, cols]; each expert's rows whole blocks
            qtype = _qtype(choose(gguf_name, data.shape))
            qdata = quantize(data, qtype)
            w.add_tensor(gguf_name, qdata, raw_dtype=qtype)
            values = dequantize(qdata, qtype).reshape(data.shape)
            ref_params[hf_name][:, rows].copy_(torch.from_numpy(np.ascontiguousarray(values)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, reference


def kquant_mix(name: str, shape) -> str:
    """A Q4_K_M-like mix: attn_v / ffn_down / token_embd Q6_K, output and gate Q5_K, the rest Q4_K
    (falls back to Q8_0 where a row is not a multiple of 256 elements)."""
    if shape[-1] % 256:
        return "Q8_0"
    if any(k in name for k in ("attn_v", "ffn_down", "token_embd")):
        return "Q6_K"
    if any(k in name for k in ("output.weight", "ffn_gate")):
        return "Q5_K"
    return "Q4_K"


def smollm2_mix(name: str, shape) -> str:
    """The types of the default SmolLM2 GGUF: token_embd Q8_0, other weights Q4_1."""
    return "Q8_0" if name == "token_embd.weight" else "Q4_1"


# ---- reference forward ------------------------------------------------------------------------


@torch.no_grad()
def reference_logits(model, tokens) -> np.ndarray:
    """transformers float32 logits [len, V] of one sequence."""
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64)).reshape(1, -1)
    return model(input_ids=ids, use_cache=False).logits[0].to(torch.float32).numpy()


def expected_engine_config(config) -> dict:
    """The engine config keys (tinker._models) a checkpoint with this transformers config must yield (of the
    language model, for a vision-language config)."""
    vision = config.model_type in ("qwen3_vl", "qwen3_vl_moe")
    tied = config.tie_word_embeddings
    if vision:
        config = config.text_config
    rope = config.rope_parameters
    moe = config.model_type in ("qwen3_moe", "qwen3_vl_moe_text")
    out = {
        "n_layers": config.num_hidden_layers, "d_model": config.hidden_size,
        "n_heads": config.num_attention_heads, "n_kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim, "d_ff": config.intermediate_size, "vocab_size": config.vocab_size,
        "max_context": config.max_position_embeddings, "rms_eps": config.rms_norm_eps,
        "tied_embeddings": int(bool(tied)),
        "qkv_bias": int(config.model_type == "qwen2"),
        "qk_norm": int(config.model_type in ("qwen3", "qwen3_moe", "qwen3_vl_text", "qwen3_vl_moe_text")),
        "moe": int(moe), "vision": int(vision), "rope_theta": float(rope["rope_theta"]),
    }  # fmt: skip
    if vision:
        out.update(mrope_section=list(rope["mrope_section"]))
    if moe:
        out.update(n_experts=config.num_experts, n_experts_used=config.num_experts_per_tok,
                   d_ff_expert=config.moe_intermediate_size,
                   norm_topk_prob=int(bool(config.norm_topk_prob) or vision),  # (Qwen3-VL-MoE always renormalises)
                   moe_layers=[i for i in range(config.num_hidden_layers) if moe_layer(config, i)])  # fmt: skip
    kind = rope.get("rope_type", "default")
    if kind == "default":
        out["rope_scaling"] = 0
    elif kind == "linear":
        out.update(rope_scaling=1, rope_factor=float(rope["factor"]))
    elif kind == "llama3":
        out.update(rope_scaling=2, rope_factor=float(rope["factor"]),
                   rope_low_freq_factor=float(rope["low_freq_factor"]),
                   rope_high_freq_factor=float(rope["high_freq_factor"]),
                   rope_original_context=int(rope["original_max_position_embeddings"]))  # fmt: skip
    return out


def write_mmproj(path, vl_model, tensor_type="F32"):
    """Writes a Qwen3-VL model's vision tower as llama.cpp's mmproj GGUF, as convert_hf_to_gguf's
    Qwen3VLVisionModel does: architecture clip, projector qwen3vl_merger, the clip.vision keys, the descriptor's
    gguf names (v.blk.N.*, mm.0 / mm.2, v.post_ln; a deepstack merger under the block it taps), the Conv3d patch
    embedding as its two temporal halves v.patch_embd.weight and .weight.1. Tensors of 2 or more dimensions in
    tensor_type, vectors F32. Returns (path, reference): a float32 copy of vl_model whose vision weights are the
    file's (dequantised) values."""
    import gguf

    from tinker import _arch  # (the descriptor's vision names: the Hugging Face and GGUF columns)

    path = Path(path)
    config, v = vl_model.config, vl_model.config.vision_config
    arch = next(a for a, t in MODEL_TYPES.items() if t == config.model_type)
    deep = list(v.deepstack_visual_indexes)
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type("qwen3vl_merger")
    w.add_vision_image_size(int(math.isqrt(v.num_position_embeddings) * v.patch_size))
    w.add_vision_patch_size(v.patch_size)
    w.add_vision_embedding_length(v.hidden_size)
    w.add_vision_feed_forward_length(v.intermediate_size)
    w.add_vision_block_count(v.depth)
    w.add_vision_head_count(v.num_heads)
    w.add_vision_projection_dim(config.text_config.hidden_size)
    w.add_vision_image_mean([0.5, 0.5, 0.5])
    w.add_vision_image_std([0.5, 0.5, 0.5])
    w.add_vision_min_pixels(VL_PIXELS[0])
    w.add_vision_max_pixels(VL_PIXELS[1])
    w.add_vision_spatial_merge_size(v.spatial_merge_size)
    w.add_vision_use_gelu(True)
    w.add_vision_attention_layernorm_eps(float(config.text_config.rms_norm_eps))
    w.add_vision_is_deepstack_layers([i in deep for i in range(v.depth)])
    reference = copy.deepcopy(vl_model).to(torch.float32).eval()
    ref_params = dict(reference.named_parameters())
    state = vl_model.state_dict()

    def put(name: str, data: np.ndarray) -> np.ndarray:
        """Writes one tensor; returns the values the file holds. The patch halves (4-D) stay float: llama.cpp
        quantises matrices only."""
        if data.ndim == 1:
            w.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
            return data
        float_types = ("F32", "F16", "BF16")
        qtype = _qtype(tensor_type if data.ndim == 2 or tensor_type in float_types else "F16")
        qdata = quantize(np.ascontiguousarray(data), qtype)
        w.add_tensor(name, qdata, raw_dtype=qtype)
        return dequantize(qdata, qtype).reshape(data.shape)

    with torch.no_grad():
        for t in _arch.get(arch)["vision"]:
            slots = {"model": [(-1, None)], "block": [(i, i) for i in range(v.depth)],
                     "deepstack": list(enumerate(deep))}[t["scope"]]  # fmt: skip
            for index, slot in slots:
                hf = t["hf"] % index if index >= 0 else t["hf"]
                name = t["gguf"] % slot if slot is not None else t["gguf"]
                data = state[hf].detach().to(torch.float32).numpy()
                if t["name"] == "patch_embed":  # [Dv, C, Tp, P, P] -> two [Dv, C, P, P]
                    values = np.stack([put(name + suffix, data[:, :, k]) for k, suffix in enumerate(("", ".1"))], 2)
                else:
                    values = put(name, data)
                ref_params[hf].copy_(torch.from_numpy(np.ascontiguousarray(values)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, reference
