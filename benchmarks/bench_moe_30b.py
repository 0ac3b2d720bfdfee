"""Qwen3-VL-30B-A3B (Tinker's guide model) at its real size on the CPU: peak memory and tokens/s of loading it, one
LoRA training step, a short sample and a sample with an image, from random-weight GGUF files typed like llama.cpp's
Q4_K_M language model and F16 mmproj.

    python benchmarks/bench_moe_30b.py [--layers 48] [--dir DIR] [--rank 32] [--seq 256] [--delete] [--json PATH]

The model files, as llama.cpp's converter lays out Qwen3-VL-30B-A3B-Instruct: the language model as a
`qwen3vlmoe` GGUF (48 layers, d_model 2048, 32 query heads and 4 kv heads of 128, q/k RMSNorm, 128 experts of
width 768, top 8 renormalised, no dense layer, vocabulary 151936, untied output, RoPE theta 5e6, interleaved
M-RoPE sections [24, 20, 20], context 262144, RMSNorm eps 1e-6; a token list with Qwen's vision tokens at their
ids, no tokenizer model: the benchmark feeds token ids) and beside it the vision tower as an F16 mmproj (27 ViT
blocks of width 1152, MLP 4304, 16 heads, patch 16, 2x2 merge, 48 x 48 learned positions, deepstack taps after
blocks 8, 16 and 24, out width 2048: 0.54 G parameters). Written once by this script with random weights into
--dir/KEY/ (default ~/.cache/tinker-bench; about 18.5 + 1.1 GB for 48 layers, streamed one tensor at a time) and
reused while their general.name matches; --layers N writes the same shape with N layers (N >= 3, the deepstack
taps' layers) to its own folder, for a quick check; --delete removes them after the run.

Tensor types follow llama.cpp's Q4_K_M recipe (llama-quant.cpp, no imatrix): Q4_K everywhere except attn_v and
ffn_down_exps in the layers use_more_bits picks (the first and last eighth and every third in between: 24 of 48)
and output.weight, which are Q6_K; the routers (ffn_gate_inp) and the norms stay F32. The blocks are written
directly: random quant bytes (4- and 6-bit values, 6-bit sub-block scales and mins, int8 Q6_K scales) with the
f16 super-block scales d (and dmin) of random sign chosen so every matrix has std 0.02 (the routers N(0, 0.05),
norms 1), which keeps activations finite through 48 layers.

Measured, each configuration in a fresh subprocess through the public API (the child reads /proc/self/status
after each phase, resets the high-water mark before it where allowed, and polls RssAnon and RssFile during it,
bench_memory.Phases): loading the base model (create_sampling_client), the LoRA training client (--rank, every
target: attention, experts, unembedding), one forward_backward of --seq tokens (cross entropy) and optim_step,
save_weights_and_get_sampling_client, then sampling from a 16-token prompt: 1 token (prefill tokens/s) and
--new tokens (decode tokens/s = (new - 1) / the difference of the two times); then 1 token after a prompt with
a 448 x 448 image (196 image positions): first with the vision tower's loading (on the first image), then with
another image (the tower's forward, the prefill of the 210-token prompt and the token).

Memory: RssAnon is what the engine allocated (the weights, copied out of the mapped file into one anonymous
block in the file's own types; LoRA state; activations); RssFile is pages of the mapped file, page cache the
kernel can reclaim (VmHWM counts both). The LoRA state is 20 bytes per parameter (float32 weights, gradients,
Adam's two moments, the sampler's snapshot): at rank 32 every target of this shape is 494 M parameters, about
9.9 GB, more than a 24 GB machine has left next to the 18.6 GB of weights. Before creating the training client
the child estimates what training adds (training_memory) and, where that exceeds MemAvailable, skips it (says
so, with the numbers) and samples from the base model, so that a machine other work shares is not driven into
the OOM killer (whose first target the child volunteers to be: oom_score_adj 1000); --rank 4 fits there.
--force-training skips the check.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_memory import GB, Phases, _fmt, _gguf_field, _subprocess, parse_or_run_helper  # noqa: E402
from bench_moe import cpu_name  # noqa: E402

# The text model of Qwen/Qwen3-VL-30B-A3B-Instruct (config.json text_config)
SHAPE = dict(n_layers=48, d_model=2048, n_heads=32, n_kv_heads=4, head_dim=128, d_ff=6144, n_experts=128,
             n_experts_used=8, d_ff_expert=768, vocab=151936, context=262144, rope_theta=5e6, rms_eps=1e-6)  # fmt: skip
WEIGHT_STD, ROUTER_STD = 0.02, 0.05
SEED = 0
FORMAT = 2  # of the written files: bump when what write_gguf / write_mmproj write changes
MROPE_SECTION = [24, 20, 20]
# Qwen/Qwen3-VL-30B-A3B-Instruct's vision_config, and its vision tokens' ids in the vocabulary
VISION = dict(depth=27, hidden=1152, intermediate=4304, heads=16, patch=16, merge=2, num_pos=2304,
              deepstack=[8, 16, 24], out=2048)  # fmt: skip
VISION_TOKENS = {151652: "<|vision_start|>", 151653: "<|vision_end|>", 151655: "<|image_pad|>"}
IMAGE_SIDE = 448
PROMPT = 16
# Memory a LoRA training step adds after loading, measured at 2, 6 and 12 layers with rank 1, 8 and 32: per
# adapter parameter 20 bytes that stay (float32 weights, gradients, Adam's two moments, the sampler's snapshot;
# forward_backward also holds a copy of the gradients while it runs, 4 bytes more), and the activation arena
# the engine keeps after a forward_backward, about 0.2 GB + 27 MB a layer per 256 tokens
LORA_BYTES = 20
ARENA_BYTES = (0.2e9, 27e6)  # (fixed, per layer) per 256 tokens
MARGIN = 0.5 * GB

# std of one value of a random block per unit of d: Q4_K y = d sc q - dmin mn with sc, mn uniform on 0..63
# (E[x^2] = 1333.5), q uniform on 0..15 (E[q^2] = 77.5), dmin = d of independent sign: 1333.5 (77.5 + 1) d^2;
# Q6_K y = d sc (q - 32) with sc uniform int8 (E[sc^2] = 5461.5), q uniform on 0..63 (E[(q-32)^2] = 341.5)
VALUE_STD = {"Q4_K": (1333.5 * 78.5) ** 0.5, "Q6_K": (5461.5 * 341.5) ** 0.5}


def shape_of(layers: int) -> dict:
    return {**SHAPE, "n_layers": layers}


def _key(c: dict) -> str:
    return f"qwen3vl-30b-a3b-L{c['n_layers']}-q4_k_m-s{SEED}-f{FORMAT}"


def _use_more_bits(i: int, n: int) -> bool:
    """llama-quant.cpp: the layers that get more bits in the *_M recipes."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensors(c: dict) -> list[tuple[str, tuple, str]]:
    """(GGUF name, shape [outermost, ..., row length], type) of every tensor, in file order."""
    D, H, Hkv, Dh, E, Fe, V, L = (c[k] for k in ("d_model", "n_heads", "n_kv_heads", "head_dim", "n_experts",
                                                  "d_ff_expert", "vocab", "n_layers"))  # fmt: skip
    out = [("token_embd.weight", (V, D), "Q4_K")]
    for i in range(L):
        more = "Q6_K" if _use_more_bits(i, L) else "Q4_K"
        blk = {"attn_norm": ((D,), "F32"), "attn_q": ((H * Dh, D), "Q4_K"), "attn_k": ((Hkv * Dh, D), "Q4_K"),
               "attn_v": ((Hkv * Dh, D), more), "attn_output": ((D, H * Dh), "Q4_K"),
               "attn_q_norm": ((Dh,), "F32"), "attn_k_norm": ((Dh,), "F32"), "ffn_norm": ((D,), "F32"),
               "ffn_gate_inp": ((E, D), "F32"), "ffn_gate_exps": ((E, Fe, D), "Q4_K"),
               "ffn_up_exps": ((E, Fe, D), "Q4_K"), "ffn_down_exps": ((E, D, Fe), more)}  # fmt: skip
        out += [(f"blk.{i}.{name}.weight", shape, t) for name, (shape, t) in blk.items()]
    return out + [("output_norm.weight", (D,), "F32"), ("output.weight", (V, D), "Q6_K")]


def _nbytes(shape: tuple, type_name: str) -> int:
    import gguf

    n = 1
    for d in shape:
        n *= d
    if type_name == "F32":
        return 4 * n
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return n // block * size


def _blocks(rng, shape: tuple, type_name: str, std: float):
    """Random K-quant bytes of a tensor, shape [..., row bytes]: every byte random, then the f16 super-block
    scales (Q4_K: d at byte 0 and dmin at 2; Q6_K: d at 208) set to +-std / VALUE_STD."""
    import gguf
    import numpy as np

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    nb = _nbytes(shape, type_name) // size
    out = rng.integers(0, 256, size=(nb, size), dtype=np.uint8)
    fields = (0, 2) if type_name == "Q4_K" else (208,)
    for at in fields:
        d = np.full(nb, std / VALUE_STD[type_name], dtype=np.float16)
        d[rng.integers(0, 2, size=nb, dtype=np.uint8).astype(bool)] *= -1
        out[:, at:at + 2] = d.view(np.uint8).reshape(nb, 2)
    return out.reshape(*shape[:-1], shape[-1] // block * size)


def write_gguf(path: Path, c: dict) -> None:
    """Writes the model to path (through path.part, renamed at the end): tensor infos first, then the data one
    tensor at a time (the largest, output.weight, is 255 MB)."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path.with_name(path.name + ".part")), "qwen3vlmoe")
    w.add_name(_key(c))
    w.add_rope_dimension_sections(MROPE_SECTION + [0])
    w.add_num_deepstack_layers(len(VISION["deepstack"]))
    w.add_token_list([VISION_TOKENS.get(i, f"<t{i}>") for i in range(c["vocab"])])
    w.add_context_length(c["context"])
    w.add_embedding_length(c["d_model"])
    w.add_block_count(c["n_layers"])
    w.add_feed_forward_length(c["d_ff"])
    w.add_head_count(c["n_heads"])
    w.add_head_count_kv(c["n_kv_heads"])
    w.add_key_length(c["head_dim"])
    w.add_value_length(c["head_dim"])
    w.add_rope_dimension_count(c["head_dim"])
    w.add_rope_freq_base(float(c["rope_theta"]))
    w.add_layer_norm_rms_eps(float(c["rms_eps"]))
    w.add_vocab_size(c["vocab"])
    w.add_expert_count(c["n_experts"])
    w.add_expert_used_count(c["n_experts_used"])
    w.add_expert_feed_forward_length(c["d_ff_expert"])
    w.add_expert_weights_norm(True)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    plan = tensors(c)
    for name, shape, type_name in plan:
        if type_name == "F32":
            w.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(shape, "F32"))
        else:
            qtype = gguf.GGMLQuantizationType[type_name]
            byte_shape = (*shape[:-1], _nbytes(shape[-1:], type_name))
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), _nbytes(shape, type_name), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(SEED)
    for name, shape, type_name in plan:
        if "ffn_gate_inp" in name:
            w.write_tensor_data((rng.standard_normal(shape, dtype=np.float32) * ROUTER_STD))
        elif type_name == "F32":
            w.write_tensor_data(np.ones(shape, dtype=np.float32))
        else:
            w.write_tensor_data(_blocks(rng, shape, type_name, WEIGHT_STD))
    w.close()
    path.with_name(path.name + ".part").replace(path)


def vision_tensors() -> list[tuple[str, tuple, str]]:
    """(GGUF name, shape, type) of the mmproj's tensors, as llama.cpp's converter names them (F16 matrices)."""
    v = VISION
    Dv, Fv, M, S2 = v["hidden"], v["intermediate"], v["out"], v["merge"] ** 2 * v["hidden"]
    out = [("v.patch_embd.weight", (Dv, 3, v["patch"], v["patch"]), "F16"),
           ("v.patch_embd.weight.1", (Dv, 3, v["patch"], v["patch"]), "F16"), ("v.patch_embd.bias", (Dv,), "F32"),
           ("v.position_embd.weight", (v["num_pos"], Dv), "F16")]  # fmt: skip
    for i in range(v["depth"]):
        out += [(f"v.blk.{i}.{n}", shape, "F16" if len(shape) == 2 else "F32") for n, shape in (
            ("ln1.weight", (Dv,)), ("ln1.bias", (Dv,)), ("attn_qkv.weight", (3 * Dv, Dv)), ("attn_qkv.bias", (3 * Dv,)),
            ("attn_out.weight", (Dv, Dv)), ("attn_out.bias", (Dv,)), ("ln2.weight", (Dv,)), ("ln2.bias", (Dv,)),
            ("ffn_up.weight", (Fv, Dv)), ("ffn_up.bias", (Fv,)), ("ffn_down.weight", (Dv, Fv)),
            ("ffn_down.bias", (Dv,)))]  # fmt: skip
    mergers = [("v.post_ln", "mm.0", "mm.2", (Dv,))] + [
        (f"v.deepstack.{i}.norm", f"v.deepstack.{i}.fc1", f"v.deepstack.{i}.fc2", (S2,)) for i in v["deepstack"]]
    for norm, fc1, fc2, norm_shape in mergers:
        out += [(f"{norm}.weight", norm_shape, "F32"), (f"{norm}.bias", norm_shape, "F32"),
                (f"{fc1}.weight", (S2, S2), "F16"), (f"{fc1}.bias", (S2,), "F32"),
                (f"{fc2}.weight", (M, S2), "F16"), (f"{fc2}.bias", (M,), "F32")]  # fmt: skip
    return out


def write_mmproj(path: Path, key: str) -> None:
    """The vision tower as llama.cpp's F16 mmproj file: random matrices of std 0.02, norms 1, biases 0."""
    import gguf
    import numpy as np

    v = VISION
    w = gguf.GGUFWriter(str(path.with_name(path.name + ".part")), "clip")
    w.add_name(key)
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type("qwen3vl_merger")
    w.add_vision_image_size(int(v["num_pos"] ** 0.5) * v["patch"])
    w.add_vision_patch_size(v["patch"])
    w.add_vision_embedding_length(v["hidden"])
    w.add_vision_feed_forward_length(v["intermediate"])
    w.add_vision_block_count(v["depth"])
    w.add_vision_head_count(v["heads"])
    w.add_vision_projection_dim(v["out"])
    w.add_vision_image_mean([0.5, 0.5, 0.5])
    w.add_vision_image_std([0.5, 0.5, 0.5])
    w.add_vision_spatial_merge_size(v["merge"])
    w.add_vision_use_gelu(True)
    w.add_vision_is_deepstack_layers([i in v["deepstack"] for i in range(v["depth"])])
    rng = np.random.default_rng(SEED + 1)
    for name, shape, type_name in vision_tensors():
        if type_name == "F16":
            w.add_tensor(name, (rng.standard_normal(shape, dtype=np.float32) * WEIGHT_STD).astype(np.float16))
        else:
            w.add_tensor(name, (np.ones if ".weight" in name else np.zeros)(shape, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    path.with_name(path.name + ".part").replace(path)


def _written(path: Path, key: str, write) -> None:
    """Reuses path when it holds this benchmark's key, else writes it."""
    if path.exists():
        if _gguf_field(path, "general.name") != key:
            sys.exit(f"{path} exists but is not this benchmark's {key} GGUF; remove it")
        print(f"reusing {path}", file=sys.stderr, flush=True)
        return
    start = time.perf_counter()
    print(f"writing {path} ...", end=" ", file=sys.stderr, flush=True)
    write(path)
    print(f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


def model_file(directory: Path, c: dict) -> Path:
    """The language model's GGUF, with the mmproj beside it, in directory/KEY/."""
    key = _key(c)
    folder = directory / key
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.gguf"
    _written(path, key, lambda p: write_gguf(p, c))
    _written(folder / "mmproj-F16.gguf", key, lambda p: write_mmproj(p, key))
    return path


def lora_params(c: dict, rank: int) -> int:
    """Parameters of a LoRA adapter on every target (Tinker's shared-outer layout on the experts)."""
    D, H, Hkv, Dh, E, Fe, V, L = (c[k] for k in ("d_model", "n_heads", "n_kv_heads", "head_dim", "n_experts",
                                                  "d_ff_expert", "vocab", "n_layers"))  # fmt: skip
    attn = (D + H * Dh) + 2 * (D + Hkv * Dh) + (H * Dh + D)
    experts = 2 * (D + E * Fe) + (E * Fe + D)
    return rank * (L * (attn + experts) + D + V)


def training_memory(c: dict, rank: int, tokens: int) -> tuple[int, float]:
    """(LoRA parameters, bytes a training step is expected to add after loading, with a margin)."""
    n = lora_params(c, rank)
    return n, LORA_BYTES * n + (ARENA_BYTES[0] + ARENA_BYTES[1] * c["n_layers"]) * tokens / 256 + MARGIN


def _meminfo() -> dict:
    with open("/proc/meminfo") as f:
        return {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in f)}


# ---- the child: one configuration, phase by phase ---------------------------------------------------------------


def child(spec: dict) -> None:
    with open("/proc/self/oom_score_adj", "w") as f:  # if memory runs out after all, this process goes first
        f.write("1000")
    phase = Phases()
    phase("python")

    import numpy as np

    import tinker
    from tinker import types

    phase("import")
    service = tinker.ServiceClient()
    sampler = service.create_sampling_client(base_model=spec["model"]).result()
    phase("load", bytes=spec["file_bytes"])

    rng = np.random.default_rng(SEED)
    T, vocab = spec["seq"], min(spec["vocab"], min(VISION_TOKENS))  # text ids: below Qwen's special tokens
    n_params, need = training_memory(spec["shape"], spec["rank"], T)
    available = _meminfo()["MemAvailable"]
    skipped = None
    if need > available and not spec["force_training"]:
        skipped = (f"training skipped: a rank-{spec['rank']} adapter on every target has {n_params / 1e6:.0f} M "
                   f"parameters; with its optimizer state, the sampler's snapshot and the activations of {T} "
                   f"tokens a training step needs about {_fmt(need)} more, and MemAvailable is {_fmt(available)} "
                   f"after loading (--force-training to try anyway)")  # fmt: skip
        print(skipped, file=sys.stderr, flush=True)
    else:
        training = service.create_lora_training_client(base_model=spec["model"], rank=spec["rank"], seed=SEED).result()
        phase("adapter", params=int(training._adapter.handle.n_params))
        ids = rng.integers(0, vocab, size=T + 1).tolist()
        datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                            loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * T})  # fmt: skip
        fb = training.forward_backward([datum], "cross_entropy").result()
        phase("fwd_bwd", tokens=T, loss_per_token=float(fb.metrics["loss:sum"]) / T)
        training.optim_step(types.AdamParams(learning_rate=1e-4)).result()
        phase("optim")
        sampler = training.save_weights_and_get_sampling_client().result()
        phase("snapshot")

    prompt = types.ModelInput.from_ints(rng.integers(0, vocab, size=PROMPT).tolist())
    for key, n in (("prefill", 1), ("sample", spec["new"])):
        params = types.SamplingParams(max_tokens=n, temperature=1.0, seed=SEED)
        out = sampler.sample(prompt=prompt, num_samples=1, sampling_params=params).result()
        phase(key, tokens=PROMPT if key == "prefill" else len(out.sequences[0].tokens))
    for key, seed in (("image_first", 1), ("image", 2)):  # the tower loads with the first image
        image = types.ImageChunk(data=_noise_png(IMAGE_SIDE, seed), format="png",
                                 expected_tokens=(IMAGE_SIDE // VISION["patch"] // VISION["merge"]) ** 2)
        prompt = types.ModelInput(chunks=[types.EncodedTextChunk(tokens=[151652]), image, types.EncodedTextChunk(
            tokens=[151653, *rng.integers(0, vocab, size=PROMPT - 2).tolist()])])  # fmt: skip
        params = types.SamplingParams(max_tokens=1, temperature=1.0, seed=SEED)
        sampler.sample(prompt=prompt, num_samples=1, sampling_params=params).result()
        phase(key, tokens=prompt.length)
    phase.close()
    print("@@result " + json.dumps({"records": phase.records, "skipped": skipped, "lora_params": n_params,
                                    "tinker": tinker.__file__}), flush=True)  # fmt: skip


def _noise_png(side: int, seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def prepare(req: dict) -> None:
    """Helper process (the parent stays small: a child's ru_maxrss starts at its parent's peak)."""
    c = req["shape"]
    path = model_file(Path(req["dir"]), c)
    types_ = {}
    for _, shape, t in tensors(c):
        types_[t] = types_.get(t, 0) + _nbytes(shape, t)
    print("@@prepared " + json.dumps({"file": str(path), "file_bytes": path.stat().st_size, "types": types_}),
          flush=True)


# ---- the parent ---------------------------------------------------------------------------------------------------

LABELS = {"python": "python start", "import": "import tinker", "load": "load the base model",
          "adapter": "LoRA training client", "fwd_bwd": "forward_backward", "optim": "optim_step",
          "snapshot": "save_weights_and_get_sampling_client", "prefill": "sample: prefill + 1 token",
          "sample": "sample: prefill + new tokens", "image_first": "image sample: tower load + 1 token",
          "image": "image sample: another image, 1 token"}  # fmt: skip


def print_report(r: dict, args) -> None:
    rec = {x["phase"]: x for x in r["records"]}
    c = r["shape"]
    print(f"\nQwen3-VL-30B-A3B shape, {c['n_layers']} layers: {r['file']} (+ mmproj-F16.gguf beside it)")
    print(f"  file {_fmt(r['file_bytes'])} (" + ", ".join(f"{t} {_fmt(b)}" for t, b in r["types"].items()) + ")")
    if r["skipped"]:
        print(f"  {r['skipped']}")
    else:
        print(f"  LoRA rank {args.rank}, every target: {rec['adapter']['params'] / 1e6:.1f} M parameters "
              f"(formula {r['lora_params'] / 1e6:.1f} M); loss/token {rec['fwd_bwd']['loss_per_token']:.3f}")
    head = ["after", "s", "cpu s", "rate", "RssAnon", "RssFile", "peak anon", "peak file", "VmHWM"]
    rows = []
    for x in r["records"]:
        if x["phase"] == "python":
            continue
        rate = ""
        if x["phase"] == "load":
            rate = f"{x['bytes'] / GB / x['seconds']:.2f} GB/s"
        elif x["phase"] in ("fwd_bwd", "prefill", "image"):
            rate = f"{x['tokens'] / x['seconds']:.1f} tok/s"
        elif x["phase"] == "sample" and x["tokens"] > 1:
            rate = f"{(x['tokens'] - 1) / (x['seconds'] - rec['prefill']['seconds']):.2f} tok/s decode"
        rows.append([LABELS[x["phase"]], f"{x['seconds']:.1f}", f"{x['cpu_seconds']:.1f}", rate, _fmt(x["RssAnon"]),
                     _fmt(x["RssFile"]), _fmt(x["peak_anon"]), _fmt(x["peak_file"]), _fmt(x["VmHWM"])])  # fmt: skip
    widths = [max(len(str(v)) for v in col) for col in zip(head, *rows, strict=True)]
    for row in [head, *rows]:
        print("  " + "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths,
                                                                                                   strict=True))))
    peak = max(x["VmHWM"] for x in r["records"])
    print(f"  process peak VmHWM {_fmt(peak)}, peak RssAnon {_fmt(max(x['peak_anon'] for x in r['records']))}"
          + ("" if all(x["phase_peak"] for x in r["records"]) else " (VmHWM could not be reset: cumulative)"))
    print(f"  (s: wall seconds of the phase; cpu s: the process's user + system seconds in it, at most "
          f"{os.cpu_count()} x s;\n   peak anon / peak file: the highest RssAnon / RssFile polled during the phase)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=SHAPE["n_layers"], help="of the written model (default 48)")
    parser.add_argument("--dir", default=os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "tinker-bench"),
                        help="where the GGUF is written and reused (default %(default)s)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--seq", type=int, default=256, help="tokens of the forward_backward")
    parser.add_argument("--new", type=int, default=16, help="tokens sampled after the %d-token prompt" % PROMPT)
    parser.add_argument("--force-training", action="store_true", help="train even where the LoRA state does not "
                        "seem to fit in MemAvailable")  # fmt: skip
    parser.add_argument("--delete", action="store_true", help="delete the GGUF after the run")
    parser.add_argument("--json", metavar="PATH", help="also write the raw numbers as JSON")
    args = parse_or_run_helper(parser, child, prepare)
    if args is None:
        return

    c = shape_of(args.layers)
    mem = _meminfo()
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} (other work shares "
          f"the machine); MemTotal {_fmt(mem['MemTotal'])}, MemAvailable {_fmt(mem['MemAvailable'])}")  # fmt: skip
    here = os.path.abspath(__file__)
    prepared = _subprocess("--prepare", {"shape": c, "dir": str(Path(args.dir).expanduser())}, "@@prepared",
                           script=here)
    spec = {"shape": c, "model": prepared["file"], "file_bytes": prepared["file_bytes"], "vocab": c["vocab"],
            "rank": args.rank, "seq": args.seq, "new": args.new, "force_training": args.force_training}  # fmt: skip
    try:
        with tempfile.TemporaryDirectory(prefix="bench-moe-30b-") as tmp:
            env = {**os.environ, "TINKER_HOME": tmp}  # nothing lands in the user's store
            out = _subprocess("--child", spec, "@@result", env, script=here)
    finally:
        if args.delete:
            for path in Path(prepared["file"]).parent.glob("*.gguf"):
                path.unlink(missing_ok=True)
            print(f"deleted {Path(prepared['file']).parent}", file=sys.stderr)
    result = {**spec, **prepared, **out}
    print_report(result, args)
    print(f"tinker: {out['tinker']}; load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
