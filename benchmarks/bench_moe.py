"""Qwen3-MoE throughput on the CPU: ours beside transformers in the same run, on a random medium config.

    python benchmarks/bench_moe.py [--layers 8] [--experts 64] [--top-k 8] [--prompt 256] [--decode 32]

Builds a Qwen3MoeConfig with transformers (d_model 1024, 16 heads of 64, 4 kv heads, --experts experts of width
--expert-width, top --top-k, norm_topk_prob, vocabulary 16384), random weights (the routers scaled so routing is
not uniform), saves it as --dtype safetensors in a temporary directory and loads it in both engines. Prints:
- prefill: one forward over a --prompt-token sequence, all logits (tokens/s), ours vs transformers;
- decode: greedy generation of --decode tokens after a 16-token prompt, batch 1 (tokens/s, prefill excluded),
  ours (SamplingClient's sampler) vs transformers' generate with its KV cache;
  transformers is run with torch on every core and on one, its default experts implementation and the eager
  loop (each between two runs of ours), and the ratio is against the fastest of those settings;
- LoRA training: forward_backward (cross entropy, rank 16, attention + experts + unembed) on 4 x 128 tokens,
  tokens/s (ours only: transformers 5 keeps experts fused, where a PEFT LoRA is not Tinker's layout).
Medians of --reps runs after a warm-up; transformers in float32, eager attention. The machine's load is printed:
on a shared machine the numbers are only comparable within one run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from bench_forward import median_seconds  # (the script's folder is on sys.path)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or platform.machine()


def build_checkpoint(directory: Path, args) -> None:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=16384, hidden_size=1024, intermediate_size=2048,
                            moe_intermediate_size=args.expert_width, num_hidden_layers=args.layers,
                            num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_experts=args.experts,
                            num_experts_per_tok=args.top_k, norm_topk_prob=True, decoder_sparse_step=1,
                            mlp_only_layers=[], max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.no_grad():
        model = Qwen3MoeForCausalLM(config).to(torch.float32)
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.1)  # routers: clear preferences, not a uniform spread
    model.to(getattr(torch, args.dtype)).save_pretrained(str(directory), safe_serialization=True)


def prefill_ours(args, ours, reps: int) -> float:
    from tinker._engine import get_engine

    ids = np.random.default_rng(1).integers(0, 16384, size=args.prompt).astype(np.int32)
    lens = np.array([args.prompt], dtype=np.int32)
    return args.prompt / median_seconds(lambda: get_engine().forward(ours.handle, ids, lens).result(), reps)


def prefill_hf(args, hf, reps: int) -> float:
    import torch

    x = torch.from_numpy(np.random.default_rng(1).integers(0, 16384, size=args.prompt))[None]
    with torch.inference_mode():
        return args.prompt / median_seconds(lambda: hf(input_ids=x, use_cache=False), reps)


PROMPT = np.random.default_rng(2).integers(0, 16384, size=16).tolist()


def decode_ours(args, ours, reps: int) -> float:
    """Tokens/s of the decoding steps: (prompt + n tokens) - (prompt + 1 token), prefill and first token out."""
    from tinker._sampling import sample

    one = median_seconds(lambda: sample(ours, PROMPT, 1, max_tokens=1, temperature=0.0, stop=[]), reps)
    full = median_seconds(lambda: sample(ours, PROMPT, 1, max_tokens=args.decode, temperature=0.0, stop=[]), reps)
    return (args.decode - 1) / (full - one)


def decode_hf(args, hf, reps: int) -> float:
    import torch

    x = torch.tensor([PROMPT])
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        one = median_seconds(lambda: hf.generate(x, max_new_tokens=1, min_new_tokens=1, **kwargs), reps)
        full = median_seconds(lambda: hf.generate(x, max_new_tokens=args.decode, min_new_tokens=args.decode,
                                                  **kwargs), reps)  # fmt: skip
    return (args.decode - 1) / (full - one)


def training(ours, reps: int) -> float:
    from tinker._training import LoraAdapter

    adapter = LoraAdapter(ours, rank=16, seed=0)
    rng = np.random.default_rng(3)
    data = [(rng.integers(0, 16384, size=128).tolist(),
             {"target_tokens": rng.integers(0, 16384, size=128), "weights": np.ones(128, np.float32)})
            for _ in range(4)]  # fmt: skip
    return 4 * 128 / median_seconds(lambda: adapter.forward_backward(data), reps)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--expert-width", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["prefill", "decode", "training"])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="of the saved checkpoint (ours reads it as stored; transformers computes in float32)")
    args = parser.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from tinker._engine import load_model

    hf_logging.set_verbosity_error()
    torch.set_num_threads(os.cpu_count())
    load = os.getloadavg()[0]
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores (load average {load:.1f} at start: other work shares them)")
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}")
    print(f"Qwen3-MoE: d_model 1024, {args.layers} layers, {args.experts} experts of width {args.expert_width}, "
          f"top {args.top_k}, vocabulary 16384, {args.dtype} checkpoint\n")
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(Path(tmp), args)
        ours = load_model(tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager").eval()
        default_impl = getattr(hf.config, "_experts_implementation", None) or "eager"
        # transformers' settings: torch on every core and on one (its OpenMP threads spin, and on a loaded
        # machine one thread can be the faster), its default experts implementation and the eager loop; the
        # ratio is against the fastest of them, measured between our runs
        configs = [(threads, impl) for threads in sorted({os.cpu_count(), 1}, reverse=True)
                   for impl in dict.fromkeys([default_impl, "eager"])]  # fmt: skip
        cases = [(name, ours_fn, hf_fn) for name, ours_fn, hf_fn in
                 [(f"prefill {args.prompt} tokens", prefill_ours, prefill_hf),
                  (f"decode {args.decode} tokens, batch 1", decode_ours, decode_hf)]
                 if name.split()[0] not in args.skip]  # fmt: skip
        print(f"{'case':>30} {'ours tok/s':>11} {'transformers tok/s (threads, experts)':>40} {'ratio':>6}")
        for name, ours_fn, hf_fn in cases:
            ours_runs, peers = [], {}
            for threads, impl in configs:
                ours_runs.append(ours_fn(args, ours, args.reps))
                torch.set_num_threads(threads)
                hf.config._experts_implementation = impl
                peers[(threads, impl)] = hf_fn(args, hf, args.reps)
            torch.set_num_threads(os.cpu_count())
            mine = statistics.median(ours_runs)
            best = max(peers, key=peers.get)
            listed = ", ".join(f"{v:.1f} ({t}, {i})" for (t, i), v in peers.items())
            print(f"{name:>30} {mine:11.1f} {listed:>40} {mine / peers[best]:5.2f}x")
        if "training" not in args.skip:
            print(f"\nLoRA forward_backward (rank 16, 4 x 128 tokens): {training(ours, args.reps):.1f} tokens/s (ours)")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
