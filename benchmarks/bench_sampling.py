"""Sampling throughput on the default model, beside transformers' generate (and llama.cpp, where
llama-cpp-python is importable) in the same run.

    python benchmarks/bench_sampling.py [--prompt-tokens 64] [--new-tokens 64]

For num_samples 1, 8 and 64 from one prompt, and for 64 concurrent single-sample requests, prints the
time to first token (prefill + first token), decode tokens/s over all sequences, and the same for
the peers: transformers `generate` in float32 with the batch of identical prompts (its KV cache,
sampling at temperature 1), and llama.cpp (llama-cpp-python on the same GGUF, one sequence at a
time: the Python binding has no batched sampling). Every engine generates exactly --new-tokens
tokens (no stop) so the work is equal.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def ours(model, prompt, n_samples: int, new_tokens: int, concurrent: bool) -> tuple[float, float]:
    from tinker._sampling import sample, submit_sample

    common = dict(max_tokens=new_tokens, temperature=1.0, stop=[], seed=1)
    start = time.perf_counter()
    sample(model, prompt, 1, **{**common, "max_tokens": 1})
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    if concurrent:
        pending = [submit_sample(model, prompt, 1, **{**common, "seed": i}) for i in range(n_samples)]
        results = [p.result() for p in pending]
        n = sum(len(r.sequences[0].tokens) for r in results)
    else:
        result = sample(model, prompt, n_samples, **common)
        n = sum(len(s.tokens) for s in result.sequences)
    return ttft, n / (time.perf_counter() - start)


def transformers_generate(hf, prompt, n_samples: int, new_tokens: int) -> tuple[float, float]:
    import torch

    x = torch.tensor([prompt] * n_samples)
    kwargs = dict(do_sample=True, temperature=1.0, top_k=0, pad_token_id=0, eos_token_id=None,
                  min_new_tokens=new_tokens)
    with torch.inference_mode():
        start = time.perf_counter()
        hf.generate(x[:1], max_new_tokens=1, **{**kwargs, "min_new_tokens": 1})
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        out = hf.generate(x, max_new_tokens=new_tokens, **kwargs)
        elapsed = time.perf_counter() - start
    return ttft, (out.shape[1] - len(prompt)) * n_samples / elapsed


def llama_cpp(path, prompt, n_samples: int, new_tokens: int):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(path), n_ctx=len(prompt) + new_tokens + 8, n_threads=os.cpu_count(), verbose=False)
    start = time.perf_counter()
    llm.create_completion(prompt, max_tokens=1, temperature=1.0)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    n = 0
    for i in range(n_samples):
        out = llm.create_completion(prompt, max_tokens=new_tokens, temperature=1.0, seed=i, logit_bias={})
        n += out["usage"]["completion_tokens"]
    return ttft, n / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--llama-cpp-samples", type=int, default=8, help="sequences llama.cpp runs (one at a time)")
    args = parser.parse_args()

    import torch
    import transformers

    from tinker._engine import load_model
    from tinker._models import DEFAULT_MODEL, _default_gguf_path

    torch.set_num_threads(os.cpu_count())
    model = load_model(DEFAULT_MODEL)
    path = _default_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    prompt = list(np.random.default_rng(0).integers(100, model.vocab_size, size=args.prompt_tokens))
    print(f"{os.cpu_count()} cores; prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens per sequence\n")
    print(f"{'case':>22} {'ours TTFT':>10} {'ours tok/s':>11} {'hf TTFT':>8} {'hf tok/s':>9} {'ratio':>6}")
    for n, concurrent in [(1, False), (8, False), (64, False), (64, True)]:
        t_ours, r_ours = ours(model, prompt, n, args.new_tokens, concurrent)
        t_hf, r_hf = transformers_generate(hf, prompt, n, args.new_tokens)
        label = f"{n} concurrent requests" if concurrent else f"num_samples {n}"
        print(f"{label:>22} {t_ours * 1e3:8.0f}ms {r_ours:11.1f} {t_hf * 1e3:6.0f}ms {r_hf:9.1f} {r_ours / r_hf:5.2f}x")
    cpp = llama_cpp(path, prompt, args.llama_cpp_samples, args.new_tokens)
    if cpp is None:
        print("\nllama.cpp: llama-cpp-python is not importable here (pip install llama-cpp-python builds it)")
    else:
        t_ours, r_ours = ours(model, prompt, 1, args.new_tokens, False)
        print(f"\nllama.cpp, {args.llama_cpp_samples} sequences one at a time: TTFT {cpp[0] * 1e3:.0f}ms, "
              f"{cpp[1]:.1f} tok/s (ours at num_samples 1: {r_ours:.1f} tok/s, {r_ours / cpp[1]:.2f}x)")


if __name__ == "__main__":
    main()
