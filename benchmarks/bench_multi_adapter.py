"""Sampling with many adapters and many concurrent requests on the default model, as ratios against the
single-request form of the same work (issue: many adapters, one pass).

    python benchmarks/bench_multi_adapter.py [--prompt-tokens 64] [--new-tokens 64] [--reps 3] [--shared-only]

- adapters: 8 sampling clients with 8 different LoRA adapters, 8 concurrent `sample` calls of 1 sample
  each, against one client asking for 8 samples;
- same prompt: 64 concurrent single-sample requests on one adapter with the same prompt, against one
  request for 64 samples;
- training: 4 training clients (different learning rates) each doing forward_backward on 2 x 128 tokens and
  optim_step, all submitted at once, against the same calls run one after another;
- RL step: 64 concurrent single-sample requests from a snapshot, compute_logprobs of each completion on the
  base model, then forward_backward + optim_step on the policy, submitted as an async RL loop does, against
  the same calls each awaited before the next;
- shared system prompt: 32 concurrent single-sample requests whose prompts are one 200-token system prompt
  and a different 16-token suffix each, with the prefix cache on (emptied before each run: the first
  request, or the lead pass of a cohort, prefills the system prompt and the others reuse it; and warm: the
  system prompt cached by an earlier batch) against the cache off (TINKER_PREFIX_CACHE_MB=0's runtime
  switch), generating 1 token (the prefill) and --new-tokens tokens.
Every request generates exactly --new-tokens tokens (no stop). Tokens/s are the best of --reps runs; times
the best of --reps.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def tokens_per_second(calls) -> float:
    """Runs the futures `calls()` returns and counts the tokens of every sequence."""
    start = time.perf_counter()
    results = [f.result() for f in calls()]
    n = sum(len(s.tokens) for r in results for s in r.sequences)
    return n / (time.perf_counter() - start)


def best(reps: int, calls) -> float:
    return max(tokens_per_second(calls) for _ in range(reps))


def shared_system_prompt(sc, reps: int, new_tokens_max: int):
    """The shared-system-prompt case: {new tokens: (s with the cache off, on and emptied first, on and warm)},
    and the prompt tokens the cache reused and prefilled over those runs."""
    from tinker import types
    from tinker._engine import load_model
    from tinker._models import DEFAULT_MODEL

    base = sc.create_sampling_client(base_model=DEFAULT_MODEL).result()
    model = load_model(DEFAULT_MODEL)
    rng = np.random.default_rng(1)
    system = rng.integers(100, 10000, 200).tolist()
    suffixes = [rng.integers(100, 10000, 16).tolist() for _ in range(32)]

    def timed(limit: int, warm: bool, new_tokens: int) -> float:
        """32 concurrent requests with the cache bound `limit` (0: off), emptied first; warm: the system prompt
        then cached by an earlier request."""
        times = []
        for _ in range(reps):
            model.handle.set_prefix_cache_limit(0)
            model.handle.set_prefix_cache_limit(limit)
            if warm:
                base.sample(types.ModelInput.from_ints(system + [5]), 1, types.SamplingParams(max_tokens=1)).result()
            p = types.SamplingParams(max_tokens=new_tokens, temperature=1.0, stop=[])
            start = time.perf_counter()
            [f.result() for f in [base.sample(types.ModelInput.from_ints(system + s), 1, p) for s in suffixes]]
            times.append(time.perf_counter() - start)
        return min(times)

    limit = model.handle.prefix_cache_stats()["limit"] or 256 << 20
    base.sample(types.ModelInput.from_ints(system), 1, types.SamplingParams(max_tokens=2)).result()  # warm-up
    before = model.handle.prefix_cache_stats()
    shared = {n: (timed(0, False, n), timed(limit, False, n), timed(limit, True, n)) for n in (1, new_tokens_max)}
    reuse = {k: v - before[k] for k, v in model.handle.prefix_cache_stats().items() if k.startswith("tokens")}
    model.handle.set_prefix_cache_limit(limit)
    return shared, reuse


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--shared-only", action="store_true", help="only the shared-system-prompt case")
    args = parser.parse_args()

    import tinker
    from tinker import types
    from tinker._models import DEFAULT_MODEL

    sc = tinker.ServiceClient()
    shared, reuse = shared_system_prompt(sc, args.reps, args.new_tokens)
    if args.shared_only:
        print_shared(shared, reuse)
        return
    rng = np.random.default_rng(0)
    prompt = types.ModelInput.from_ints(rng.integers(100, 10000, args.prompt_tokens).tolist())
    datum = types.Datum(model_input=types.ModelInput.from_ints(list(range(100, 132))),
                        loss_fn_inputs={"target_tokens": list(range(101, 133)), "weights": [1.0] * 32})
    samplers = []
    for i in range(8):  # 8 adapters, each trained one step so they differ
        tc = sc.create_lora_training_client(DEFAULT_MODEL, rank=32, seed=i).result()
        tc.forward_backward([datum], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-3 * (i + 1))).result()
        samplers.append(tc.save_weights_and_get_sampling_client().result())
    params = types.SamplingParams(max_tokens=args.new_tokens, temperature=1.0, stop=[])
    samplers[0].sample(prompt, 1, params).result()  # warm-up

    one_client_8 = best(args.reps, lambda: [samplers[0].sample(prompt, 8, params)])
    eight_adapters = best(args.reps, lambda: [s.sample(prompt, 1, params) for s in samplers])
    one_request_64 = best(args.reps, lambda: [samplers[0].sample(prompt, 64, params)])
    concurrent_64 = best(args.reps, lambda: [samplers[0].sample(prompt, 1, params) for _ in range(64)])

    trainers = [sc.create_lora_training_client(DEFAULT_MODEL, rank=32, seed=10 + i).result() for i in range(4)]
    batches = [[types.Datum(model_input=types.ModelInput.from_ints(rng.integers(100, 10000, 128).tolist()),
                            loss_fn_inputs={"target_tokens": rng.integers(100, 10000, 128).tolist(),
                                            "weights": [1.0] * 128}) for _ in range(2)] for _ in range(4)]

    def train_concurrently():
        fbs = [tc.forward_backward(b, "cross_entropy") for tc, b in zip(trainers, batches)]
        opts = [tc.optim_step(types.AdamParams(learning_rate=1e-4 * (i + 1))) for i, tc in enumerate(trainers)]
        [f.result() for f in fbs + opts]

    def train_one_after_another():
        for i, (tc, b) in enumerate(zip(trainers, batches)):
            tc.forward_backward(b, "cross_entropy").result()
            tc.optim_step(types.AdamParams(learning_rate=1e-4 * (i + 1))).result()

    policy = sc.create_lora_training_client(DEFAULT_MODEL, rank=32, seed=99).result()
    base = sc.create_sampling_client(base_model=DEFAULT_MODEL).result()
    rl_params = types.SamplingParams(max_tokens=args.new_tokens, temperature=1.0, stop=[])

    def rl_step(concurrent: bool):
        snapshot = policy.save_weights_and_get_sampling_client().result()
        if concurrent:
            samples = [f.result() for f in [snapshot.sample(prompt, 1, rl_params) for _ in range(64)]]
        else:
            samples = [snapshot.sample(prompt, 1, rl_params).result() for _ in range(64)]
        seqs = [prompt.to_ints() + s.sequences[0].tokens for s in samples]
        scoring = [base.compute_logprobs(types.ModelInput.from_ints(t)) for t in seqs]
        if not concurrent:
            scoring = [f.result() for f in scoring]
        data = [types.Datum(model_input=types.ModelInput.from_ints(t[:-1]),
                            loss_fn_inputs={"target_tokens": t[1:], "weights": [1.0] * (len(t) - 1)}) for t in seqs[:8]]
        fb = policy.forward_backward(data, "cross_entropy")
        if not concurrent:
            fb.result()
        opt = policy.optim_step(types.AdamParams(learning_rate=1e-5))
        if concurrent:
            scoring = [f.result() for f in scoring]
        fb.result(), opt.result()

    def best_time(fn) -> float:
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    t_train_together = best_time(train_concurrently)
    t_train_apart = best_time(train_one_after_another)
    t_rl_together = best_time(lambda: rl_step(True))
    t_rl_apart = best_time(lambda: rl_step(False))

    print(f"SmolLM2-135M, prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens per sequence")
    print(f"{'case':58s} {'tok/s':>8s} {'ratio':>6s}")
    print(f"{'one client, 8 samples':58s} {one_client_8:8.0f}")
    print(f"{'8 clients, 8 adapters, 8 concurrent 1-sample calls':58s} {eight_adapters:8.0f} "
          f"{eight_adapters / one_client_8:6.2f}")
    print(f"{'one request, 64 samples':58s} {one_request_64:8.0f}")
    print(f"{'64 concurrent 1-sample requests, same prompt, one adapter':58s} {concurrent_64:8.0f} "
          f"{concurrent_64 / one_request_64:6.2f}")
    print(f"{'case':58s} {'s':>8s} {'speedup':>7s}")
    print(f"{'4 training clients, one after another':58s} {t_train_apart:8.2f}")
    print(f"{'4 training clients, concurrently':58s} {t_train_together:8.2f} {t_train_apart / t_train_together:7.2f}")
    print(f"{'RL step, each call awaited before the next':58s} {t_rl_apart:8.2f}")
    print(f"{'RL step, submitted concurrently':58s} {t_rl_together:8.2f} {t_rl_apart / t_rl_together:7.2f}")
    print_shared(shared, reuse)


def print_shared(shared: dict, reuse: dict):
    print(f"{'32 requests: a 200-token system prompt + 16 tokens each':58s} {'s':>8s} {'speedup':>7s}")
    for new_tokens, (off, cold, warm) in shared.items():
        print(f"{f'{new_tokens} new tokens, prefix cache off':58s} {off:8.2f}")
        print(f"{f'{new_tokens} new tokens, cache on, emptied first':58s} {cold:8.2f} {off / cold:7.2f}")
        print(f"{f'{new_tokens} new tokens, cache on, system prompt cached':58s} {warm:8.2f} {off / warm:7.2f}")
    print(f"prefix cache over those runs: {reuse['tokens_reused']} prompt tokens reused, "
          f"{reuse['tokens_prefilled']} prefilled")


if __name__ == "__main__":
    main()
