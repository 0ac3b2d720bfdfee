"""The futures machinery: awaiting through the C completion queue (loop.add_reader on the wake fd)
from many coroutines, threads and event loops; blocking waits; timeouts, cancellation, Ctrl-C;
and steady memory over many requests."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import os
import signal
import sys
import threading
import time
import tracemalloc
from dataclasses import dataclass

import numpy as np
import pytest

import tinker
from tinker import types
from tinker._futures import completions
from tinker._models import DEFAULT_MODEL



@pytest.fixture(scope="module")
def service():
    return tinker.ServiceClient()


def datum(tokens, weights=None) -> types.Datum:
    tokens = list(tokens)
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:],
                                       "weights": weights if weights is not None else [1.0] * (len(tokens) - 1)})


def batch(rng, n=4, length=24, vocab=200):
    return [datum(rng.integers(0, vocab, size=length)) for _ in range(n)]


def long_batch(n=2, length=512):
    """SmolLM2 forward_backward of n x length tokens: a few seconds of engine work."""
    rng = np.random.default_rng(0)
    return [datum(rng.integers(0, 49152, size=length)) for _ in range(n)]


def no_waiters_left():
    return not completions._loop_waiters and not completions._loop_counts


def test_api_future_is_a_subscriptable_generic():
    @dataclass
    class Pending:  # as the cookbook's supervised/train.py declares it, evaluated at class creation
        future: tinker.APIFuture[tinker.ForwardBackwardOutput]

    from tinker.lib.public_interfaces import APIFuture

    assert APIFuture is tinker.APIFuture and Pending.__annotations__


def test_results_are_cached_and_awaitable_twice(service, tiny_llama):
    tc = service.create_lora_training_client(tiny_llama, rank=2, seed=0)
    fut = tc.forward_backward(batch(np.random.default_rng(0)), "cross_entropy")
    first = fut.result()
    assert fut.result() is first

    async def twice():
        return await fut, await fut.result_async()

    assert asyncio.run(twice()) == (first, first)


def test_a_dropped_training_future_still_runs(service, tiny_llama):
    """forward_backward's future dropped unread (as `tc.forward_backward(...); tc.optim_step(...)` code does):
    the gradients still count; only sample / compute_logprobs futures are cancelled when dropped."""
    data = batch(np.random.default_rng(1))
    results = []
    for drop in (False, True):
        tc = service.create_lora_training_client(tiny_llama, rank=2, seed=0)
        fut = tc.forward_backward(data, "cross_entropy")
        if drop:
            del fut
            gc.collect()
        else:
            assert fut.result().metrics["loss:sum"] > 0
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        results.append(tc.forward(data, "cross_entropy").result().metrics["loss:sum"])
    before = service.create_lora_training_client(tiny_llama, rank=2, seed=0).forward(data, "cross_entropy")
    assert results[0] == results[1] != before.result().metrics["loss:sum"]


def test_submission_returns_before_the_work_is_done(service):
    tc = service.create_lora_training_client(DEFAULT_MODEL, rank=4, seed=0)
    start = time.perf_counter()
    fb = tc.forward_backward(long_batch(), "cross_entropy")
    opt = tc.optim_step(types.AdamParams())
    submitted = time.perf_counter() - start
    assert not fb.done() and not opt.done()  # the caller is free to prepare the next batch now
    fb.result()
    assert opt.result().metrics["step:max"] == 1
    assert submitted < (time.perf_counter() - start) / 2


def test_many_coroutines_sampling_at_once(service):
    sc = service.create_sampling_client(base_model=DEFAULT_MODEL)
    rng = np.random.default_rng(1)
    prompts = [types.ModelInput.from_ints(rng.integers(0, 49152, size=int(rng.integers(2, 12))).tolist())
               for _ in range(64)]
    params = types.SamplingParams(max_tokens=4, temperature=0.0)

    async def all_at_once():
        return await asyncio.gather(*(sc.sample_async(p, 1, params) for p in prompts))

    together = asyncio.run(all_at_once())
    for prompt, response in zip(prompts[:8], together[:8]):
        assert sc.sample(prompt, 1, params).result().sequences[0].tokens == response.sequences[0].tokens
    assert no_waiters_left()


def test_threads_and_event_loops_at_once(service, tiny_llama):
    """Eight threads: half block on .result(), half run their own event loop with asyncio.run."""
    rng = np.random.default_rng(2)
    data = [batch(rng) for _ in range(8)]
    expected = []
    for d in data:
        tc = service.create_lora_training_client(tiny_llama, rank=2, seed=1)
        expected.append(tc.forward_backward(d, "cross_entropy").result().metrics["loss:sum"])

    def blocking(i):
        tc = service.create_lora_training_client(tiny_llama, rank=2, seed=1)
        return tc.forward_backward(data[i], "cross_entropy").result().metrics["loss:sum"]

    def with_loop(i):
        async def run():
            tc = await service.create_lora_training_client_async(tiny_llama, rank=2, seed=1)
            fut = await tc.forward_backward_async(data[i], "cross_entropy")
            return (await fut).metrics["loss:sum"]

        return asyncio.run(run())

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        jobs = [pool.submit(blocking if i % 2 else with_loop, i) for i in range(8)]
        got = [j.result(timeout=120) for j in jobs]
    assert got == expected
    assert no_waiters_left()


def test_asyncio_run_again_and_again(service, tiny_llama):
    tc = service.create_lora_training_client(tiny_llama, rank=2, seed=0)
    sc = service.create_sampling_client(base_model=tiny_llama)
    rng = np.random.default_rng(3)

    async def step():
        fut = await tc.forward_backward_async(batch(rng, n=2), "cross_entropy")
        await (await tc.optim_step_async(types.AdamParams(learning_rate=1e-3)))
        sample = await sc.sample_async(types.ModelInput.from_ints([1, 2, 3]), 2, types.SamplingParams(max_tokens=3))
        return (await fut).metrics["loss:sum"], sample

    for _ in range(20):
        loss, sample = asyncio.run(step())
        assert np.isfinite(loss) and len(sample.sequences) == 2
    assert no_waiters_left()


def test_sync_calls_inside_a_running_loop(service, tiny_llama):
    """Jupyter runs cells inside a running loop: blocking calls and awaits both work there."""
    tc = service.create_lora_training_client(tiny_llama, rank=2, seed=0)
    sc = tc.save_weights_and_get_sampling_client()
    rng = np.random.default_rng(4)

    async def cell():
        loss = tc.forward_backward(batch(rng), "cross_entropy").result().metrics["loss:sum"]
        tokens = sc.sample(types.ModelInput.from_ints([5, 6]), 1, types.SamplingParams(max_tokens=2, stop=[])).result()
        awaited = await tc.forward(batch(rng), "cross_entropy")
        return loss, tokens, awaited

    loss, tokens, awaited = asyncio.run(cell())
    assert np.isfinite(loss) and len(tokens.sequences[0].tokens) == 2 and awaited.metrics["loss:sum"] > 0


def test_timeouts(service):
    tc = service.create_lora_training_client(DEFAULT_MODEL, rank=4, seed=0)
    fut = tc.forward_backward(long_batch(), "cross_entropy")
    with pytest.raises(TimeoutError):
        fut.result(timeout=0.01)

    async def await_briefly():
        with pytest.raises(asyncio.TimeoutError):
            await fut.result_async(timeout=0.01)

    asyncio.run(await_briefly())
    assert fut.result().metrics["loss:sum"] > 0  # still completes, result intact
    assert no_waiters_left()


def test_cancelling_an_awaiting_task(service):
    tc = service.create_lora_training_client(DEFAULT_MODEL, rank=4, seed=0)
    fut = tc.forward_backward(long_batch(), "cross_entropy")

    async def cancel_it():
        task = asyncio.ensure_future(fut.result_async())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await fut  # the request itself was not cancelled

    assert asyncio.run(cancel_it()).metrics["loss:sum"] > 0
    assert no_waiters_left()


def test_ctrl_c_while_waiting(service):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are delivered to the main thread")
    tc = service.create_lora_training_client(DEFAULT_MODEL, rank=4, seed=0)
    fut = tc.forward_backward(long_batch(n=3), "cross_entropy")
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            fut.result()
    finally:
        timer.join()
    assert fut.result().metrics["loss:sum"] > 0  # the engine kept going
    assert tc.forward(long_batch(n=1, length=16), "cross_entropy").result().metrics["loss:sum"] > 0


def test_sample_futures_are_stdlib_futures(service, tiny_llama):
    sc = service.create_sampling_client(base_model=tiny_llama)
    futures = [sc.sample(types.ModelInput.from_ints([1, i]), 1, types.SamplingParams(max_tokens=2, stop=[]))
               for i in range(6)]
    called = []
    futures[0].add_done_callback(lambda f: called.append(f))
    done, pending = concurrent.futures.wait(futures, timeout=60)
    assert len(done) == 6 and not pending
    assert called == [futures[0]]
    assert all(len(f.result().sequences[0].tokens) == 2 for f in futures)


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def test_memory_steady_over_many_requests(service, tiny_llama):
    tc = service.create_lora_training_client(tiny_llama, rank=2, seed=0)
    sc = service.create_sampling_client(base_model=tiny_llama)
    rng = np.random.default_rng(5)
    data = batch(rng, n=2, length=16)
    prompt = types.ModelInput.from_ints([3, 4, 5])
    params = types.SamplingParams(max_tokens=2)

    async def some_async(n):
        for _ in range(n):
            await (await tc.forward_async(data, "cross_entropy"))
            await sc.sample_async(prompt, 1, params)

    def round_trip(n):
        for _ in range(n):
            tc.forward(data, "cross_entropy").result()
            sc.sample(prompt, 1, params).result()
        asyncio.run(some_async(n))

    round_trip(100)  # warm-up: scratch buffers, caches
    gc.collect()
    tracemalloc.start()
    before_py, before_rss, before_objects = tracemalloc.get_traced_memory()[0], _rss_kb(), len(gc.get_objects())
    refs_before = sys.getrefcount(data[0])
    round_trip(250)  # 250 x (2 sync + 2 async) = 1,000 requests
    gc.collect()
    grown_py = tracemalloc.get_traced_memory()[0] - before_py
    tracemalloc.stop()
    assert grown_py < 256 * 1024, f"Python heap grew by {grown_py} bytes over 1,000 requests"
    grown_rss = _rss_kb() - before_rss
    assert grown_rss < 16 * 1024, f"resident memory grew by {grown_rss} KB over 1,000 requests"
    grown_objects = len(gc.get_objects()) - before_objects
    assert grown_objects < 500, f"{grown_objects} more live objects after 1,000 requests"
    refs_after = sys.getrefcount(data[0])  # (outside the assert: pytest's rewriting holds a reference)
    assert refs_after == refs_before
    assert no_waiters_left() and not completions._thread_waiters


def test_engine_failures_map_to_tinker_exceptions():
    from tinker._futures import engine_error

    bad = engine_error(ValueError("datum 0: target_tokens has shape (3,)"))
    assert isinstance(bad, tinker.BadRequestError) and "datum 0" in str(bad)
    failed = engine_error(MemoryError("cannot allocate 4 GB of activations"))
    assert isinstance(failed, tinker.RequestFailedError) and isinstance(failed, tinker.TinkerError)
    assert failed.category == types.RequestErrorCategory.Server and "4 GB" in failed.message


def test_custom_loss_without_torch_says_what_to_install(service, tiny_llama, monkeypatch):
    tc = service.create_lora_training_client(tiny_llama, rank=2, seed=0)
    data = batch(np.random.default_rng(6), n=1)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(ImportError, match="pip install torch"):
        tc.forward_backward_custom(data, lambda d, lp: (None, {}))
    assert tc.forward(data, "cross_entropy").result().metrics["loss:sum"] > 0
