"""LoRA training throughput on the default model, beside peft + torch doing the same work.

    python benchmarks/bench_training.py [--rank 32] [--shapes 8x128 4x512] [--steps 3]

One training step = forward_backward (cross_entropy, summed) on B sequences of T tokens, then an
AdamW optim_step, with LoRA of the given rank on q, k, v, o, gate, up, down and the output
projection (alpha 32). The peer is transformers + peft in float32 on the same GGUF weights
(dequantised by transformers), torch using every core, padding-free (all sequences have T tokens),
with torch.optim.AdamW. Prints tokens/s of both, the ratio, and the GFLOP/s our step reaches
against the machine's measured matmul peak. Medians over --steps steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def step_flops(cfg: dict, rank: int, B: int, T: int) -> float:
    """Multiply-adds x 2 of one training step: forward, the input-gradient backward (base weights are
    frozen: no weight gradients), LoRA forward + backward, attention forward + backward."""
    D, F, V, Dh = cfg["d_model"], cfg["d_ff"], cfg["vocab_size"], cfg["head_dim"]
    H, Hkv, L = cfg["n_heads"], cfg["n_kv_heads"], cfg["n_layers"]
    base = L * (D * (H + 2 * Hkv) * Dh + H * Dh * D + 3 * D * F) + V * D          # per token, one pass
    lora = rank * (L * (D * 4 + (H + 2 * Hkv) * Dh + H * Dh + 2 * F + F + D) + D + V)  # A and B of all targets
    attention = L * H * Dh * 2 * T * (T + 1) / 2                                     # q.k and p.v, causal half
    per_sequence = T * (2 * base + 3 * lora) + attention * (1 + 2.5)
    return 2 * B * per_sequence


def batch(vocab: int, B: int, T: int, seed: int):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(B, T + 1))
    return ids, rng.random((B, T)).astype(np.float32)


def median_step_seconds(step, steps: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_ours(model, rank: int, B: int, T: int, steps: int) -> float:
    from tinker._training import LoraAdapter

    adapter = LoraAdapter(model, rank=rank, seed=0)
    ids, weights = batch(model.vocab_size, B, T, 0)
    data = [(ids[b, :-1], {"target_tokens": ids[b, 1:], "weights": weights[b]}) for b in range(B)]

    def step():
        adapter.forward_backward(data)
        adapter.optim_step(learning_rate=1e-4)

    return median_step_seconds(step, steps)


def time_peft(hf_model, rank: int, vocab: int, B: int, T: int, steps: int) -> float:
    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(hf_model, LoraConfig(r=rank, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
    ids, weights = batch(vocab, B, T, 0)
    x, y, w = torch.tensor(ids[:, :-1]), torch.tensor(ids[:, 1:]), torch.tensor(weights)

    def step():
        logprobs = model(x).logits.log_softmax(-1).gather(-1, y[..., None])[..., 0]
        (-(logprobs * w).sum()).backward()
        optim.step()
        optim.zero_grad()

    seconds = median_step_seconds(step, steps)
    model.unload()  # restore the base model for the next shape
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--shapes", nargs="+", default=["8x128", "4x512"])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    import torch
    import transformers

    from sgemm_peak import time_matmul
    from tinker._engine import load_model
    from tinker._models import DEFAULT_MODEL, _default_gguf_path

    torch.set_num_threads(os.cpu_count())
    peak = max(2 * 2048**3 / time_matmul(2048, 2048, 2048, 3), 2 * 512 * 3072 * 576 / time_matmul(512, 3072, 576, 5))
    print(f"{os.cpu_count()} cores; torch {torch.__version__} ({torch.get_num_threads()} threads); measured matmul peak "
          f"{peak / 1e9:.0f} GFLOP/s; LoRA rank {args.rank} on all projections and the output")
    ours = load_model(DEFAULT_MODEL)
    path = _default_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    print(f"\n{'batch':>7} {'ours tok/s':>11} {'peft tok/s':>11} {'ratio':>6} {'ours GFLOP/s':>13} {'of peak':>8}")
    for shape in args.shapes:
        B, T = map(int, shape.split("x"))
        ours_s = time_ours(ours, args.rank, B, T, args.steps)
        peft_s = time_peft(hf, args.rank, ours.vocab_size, B, T, args.steps)
        gflops = step_flops(ours.config, args.rank, B, T) / ours_s / 1e9
        print(f"{shape:>7} {B * T / ours_s:11.1f} {B * T / peft_s:11.1f} {peft_s / ours_s:5.2f}x {gflops:13.1f} "
              f"{gflops * 1e9 / peak:7.0%}")


if __name__ == "__main__":
    main()
