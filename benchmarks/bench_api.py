"""What the public API costs on top of the engine: the same forward_backward + optim_step through
TrainingClient (Datum conversion, packing, futures) and straight through the engine layer
(tinker._training.LoraAdapter), and awaiting many sample_async calls at once against waiting on
them one by one.

    python benchmarks/bench_api.py
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

import tinker
from tinker import types
from tinker._models import DEFAULT_MODEL


def datums(rng, n, length, vocab=49152):
    out = []
    for _ in range(n):
        tokens = rng.integers(0, vocab, size=length + 1).tolist()
        out.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                               loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * length}))
    return out


def best_of(fn, repeat=5):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def training_overhead(service, n, length):
    rng = np.random.default_rng(0)
    data = datums(rng, n, length)
    raw = [(d.model_input.to_ints(), {k: v.to_numpy() for k, v in d.loss_fn_inputs.items()}) for d in data]
    tc = service.create_lora_training_client(DEFAULT_MODEL, rank=32, seed=0)
    adapter = tc._adapter
    adam = types.AdamParams(learning_rate=1e-5)

    def api():
        fb = tc.forward_backward(data, "cross_entropy")
        opt = tc.optim_step(adam)
        fb.result(), opt.result()

    def engine():
        adapter.forward_backward(raw, "cross_entropy")
        adapter.optim_step(learning_rate=1e-5)

    api(), engine()  # warm-up
    t_api, t_engine = best_of(api), best_of(engine)
    prep = best_of(lambda: datums(rng, n, length))
    print(f"  {n} x {length} tokens: API {t_api * 1e3:7.1f} ms, engine layer {t_engine * 1e3:7.1f} ms "
          f"-> API overhead {100 * (t_api / t_engine - 1):+.1f}% (building the Datums themselves: {prep * 1e3:.1f} ms)")


def concurrency(service, n=64):
    sc = service.create_sampling_client(base_model=DEFAULT_MODEL)
    rng = np.random.default_rng(1)
    prompts = [types.ModelInput.from_ints(rng.integers(0, 49152, size=16).tolist()) for _ in range(n)]
    params = types.SamplingParams(max_tokens=16, temperature=1.0)

    async def together():
        await asyncio.gather(*(sc.sample_async(p, 1, params) for p in prompts))

    def one_by_one():
        for p in prompts:
            sc.sample(p, 1, params).result()

    asyncio.run(together())
    t_together = best_of(lambda: asyncio.run(together()), repeat=2)
    t_serial = best_of(one_by_one, repeat=1)
    tokens = n * 16
    print(f"  {n} x sample_async(max_tokens=16) gathered: {tokens / t_together:6.0f} tok/s; one by one: "
          f"{tokens / t_serial:6.0f} tok/s ({t_serial / t_together:.1f}x from batching concurrent requests)")


def main():
    service = tinker.ServiceClient()
    print(f"API overhead, {DEFAULT_MODEL}, LoRA rank 32 (best of 5):")
    training_overhead(service, 8, 128)
    training_overhead(service, 32, 16)
    print("Concurrent sampling through the API:")
    concurrency(service)


if __name__ == "__main__":
    main()
