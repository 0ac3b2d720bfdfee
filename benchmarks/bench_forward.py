"""Forward-pass throughput on the default model, beside torch + transformers in the same run.

    python benchmarks/bench_forward.py [--lengths 128 512] [--reps 5]

Prints the machine's measured matmul peak (the engine's GEMM path, sgemm_peak.py, and numpy's BLAS), then for each
prompt length: tokens/s of our engine and of transformers (float32, the same GGUF dequantised by
transformers, torch using every core), their ratio, and the GFLOP/s our forward reaches as a
fraction of the measured peak. Medians of --reps runs after one warm-up.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np


def median_seconds(fn, reps: int) -> float:
    fn()  # warm-up: page faults, lazy allocations, BLAS buffers
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_flops(cfg: dict, T: int) -> float:
    """Multiply-adds x 2 of one forward over a T-token sequence (all logits)."""
    D, F, V, Dh = cfg["d_model"], cfg["d_ff"], cfg["vocab_size"], cfg["head_dim"]
    H, Hkv, L = cfg["n_heads"], cfg["n_kv_heads"], cfg["n_layers"]
    per_token = L * (D * (H + 2 * Hkv) * Dh + H * Dh * D + 3 * D * F) + V * D
    attention = L * H * Dh * 2 * T * (T + 1) / 2  # q.k and p.v over the causal half
    return 2 * (per_token * T + attention)


def measure_peak(reps: int) -> dict:
    from sgemm_peak import time_matmul

    peak = {}
    for M, N, K in [(2048, 2048, 2048), (512, 3072, 576)]:
        seconds = time_matmul(M, N, K, reps)
        peak[f"engine matmul {M}x{N}x{K}"] = 2 * M * N * K / seconds / 1e9
    a = np.random.rand(2048, 2048).astype(np.float32)
    seconds = median_seconds(lambda: a @ a, reps)
    peak["numpy sgemm 2048^3"] = 2 * 2048**3 / seconds / 1e9
    return peak


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    import torch
    import transformers

    from tinker._engine import load_model
    from tinker._models import DEFAULT_MODEL, _default_gguf_path

    torch.set_num_threads(os.cpu_count())
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}")
    peak = measure_peak(args.reps)
    for name, gflops in peak.items():
        print(f"peak  {name:32s} {gflops:7.1f} GFLOP/s")
    best_peak = max(peak.values())

    ours = load_model(DEFAULT_MODEL)
    path = _default_gguf_path()
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    print(f"\n{'prompt':>7} {'ours tok/s':>11} {'torch tok/s':>12} {'ratio':>6} {'ours GFLOP/s':>13} {'of peak':>8}")
    for T in args.lengths:
        ids = np.random.default_rng(T).integers(0, ours.vocab_size, size=T)
        ours_s = median_seconds(lambda: ours.forward_logits([ids]), args.reps)
        x = torch.tensor(ids)[None]
        with torch.inference_mode():
            torch_s = median_seconds(lambda: ref(x).logits, args.reps)
        gflops = forward_flops(ours.config, T) / ours_s / 1e9
        print(f"{T:7d} {T / ours_s:11.1f} {T / torch_s:12.1f} {torch_s / ours_s:5.2f}x {gflops:13.1f} "
              f"{gflops / best_peak:7.0%}")


if __name__ == "__main__":
    main()
