"""Sample requests of different adapters (and of the base model) decode in one group, requests with the same
prompt and adapter share one prefill, and requests queued while a decode runs join it between steps and
finish as soon as their own samples do (issue: many adapters, one pass, items 1 and 2 for sampling).

Each request must get what it gets alone. Tolerance: logprobs within 1e-4 (float32 on the tiny model's
float32 weights: a matmul over 8 rows may round differently from one over 1 row, a few ulps of the logits),
tokens equal (greedy, and seeded sampling from the same distributions).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from tinker._engine import get_engine, load_model
from tinker._sampling import submit_sample
from tinker._training import LoraAdapter

PROMPTS = [[1, 5, 9, 2], [3, 3, 7], [11, 4, 6, 8, 10, 2]]


@pytest.fixture(scope="module")
def model(tiny_llama):
    return load_model(tiny_llama)


def random_adapter(model, rank, seed, **train):
    ad = LoraAdapter(model, rank=rank, seed=seed, **train)
    rng = np.random.default_rng(seed)
    ad.set_parameters({k: rng.standard_normal(v.shape).astype(np.float32) * 0.2 for k, v in ad.parameters().items()})
    return ad.snapshot()


@pytest.fixture(scope="module")
def snapshots(model):
    # different ranks, one with an unembed LoRA and one without: the LoRA terms differ per sequence
    return [random_adapter(model, 4, 1), random_adapter(model, 8, 2, train_unembed=False),
            random_adapter(model, 2, 3, train_attn=False), None]


def hold_the_worker(model):
    """A long forward queued first: the sample requests queued behind it are popped as one batch."""
    tokens = np.tile(np.arange(1, 200, dtype=np.int32), 24)
    return get_engine().forward(model.handle, tokens, np.full(24, 199, dtype=np.int32))


def run(model, requests, together: bool):
    """requests: (prompt, adapter, params) -> [(raw result, SampleResult)]"""
    blocker = hold_the_worker(model) if together else None
    pending = [submit_sample(model, prompt, adapter=adapter, **params) for prompt, adapter, params in requests]
    if blocker is not None:
        blocker.result()
    return [(p._request.result(), p.result()) for p in pending]


# A sequence decoded in a batch goes through GEMMs of another row count (another blocking, another
# float32 summation order) than alone, so its logprobs differ in the last bits; over a 1000-token
# decode the attention sums grow and a logprob near -8 was seen 1.7e-4 off (tokens all equal).
LOGPROB_TOL = dict(atol=1e-4, rtol=1e-4)


def assert_same(got, alone):
    for (raw, a), (_, b) in zip(got, alone):
        assert len(a.sequences) == len(b.sequences)
        for sa, sb in zip(a.sequences, b.sequences):
            assert sa.tokens == sb.tokens and sa.stop_reason == sb.stop_reason
            np.testing.assert_allclose(sa.logprobs, sb.logprobs, **LOGPROB_TOL)
        if b.prompt_logprobs is not None:
            np.testing.assert_allclose(np.array(a.prompt_logprobs[1:]), np.array(b.prompt_logprobs[1:]), **LOGPROB_TOL)


def test_requests_of_different_adapters_decode_together_as_they_would_alone(model, snapshots):
    requests = []
    for i, snap in enumerate(snapshots):
        for j, prompt in enumerate(PROMPTS):
            params = dict(max_tokens=6 + i + j, temperature=0.0) if (i + j) % 2 else \
                dict(max_tokens=5, temperature=1.0, seed=10 * i + j, num_samples=2)
            requests.append((prompt, snap, params))
    together = run(model, requests, together=True)
    assert together[-1][0]["group"][:2] == (len(requests), len(requests))  # one cohort: every adapter and the base
    alone = [run(model, [r], together=False)[0] for r in requests]
    assert all(raw["group"] == (1, 1, 0) for raw, _ in alone)
    assert_same(together, alone)


def test_requests_with_the_same_prompt_share_one_prefill(model, snapshots):
    prompt = PROMPTS[2]
    same = dict(max_tokens=4, temperature=1.0, include_prompt_logprobs=True, topk_prompt_logprobs=3)
    requests = [(prompt, snapshots[0], {**same, "seed": s}) for s in range(6)]
    requests += [(prompt, snapshots[1], {**same, "seed": 7}), (prompt, None, {**same, "seed": 8}),
                 (PROMPTS[0], snapshots[0], {**same, "seed": 9})]
    together = run(model, requests, together=True)
    assert together[0][0]["group"] == (len(requests), 4, 0)  # 9 requests, 4 distinct (prompt, adapter) prefills
    alone = [run(model, [r], together=False)[0] for r in requests]
    assert_same(together, alone)
    for (_, a), (_, b) in zip(together, alone):
        for top_a, top_b in zip(a.topk_prompt_logprobs[1:], b.topk_prompt_logprobs[1:]):
            assert [t for t, _ in top_a] == [t for t, _ in top_b]
            np.testing.assert_allclose([lp for _, lp in top_a], [lp for _, lp in top_b], atol=1e-4)


def test_one_admission_prefills_a_bounded_number_of_prompt_tokens(model):
    """12 distinct 1000-token prompts popped together are admitted in cohorts of at most 8192 prompt tokens (8 and
    4: one prefill pass's working memory stays bounded), each result as it is alone."""
    rng = np.random.default_rng(7)
    requests = [(list(rng.integers(1, 250, size=1000)), None, dict(max_tokens=2, temperature=0.0)) for _ in range(12)]
    got = run(model, requests, together=True)
    assert sorted(raw["group"][0] for raw, _ in got) == [4] * 4 + [8] * 8
    alone = [run(model, [r], together=False)[0] for r in requests[:2] + requests[-2:]]
    assert_same(got[:2] + got[-2:], alone)


def test_requests_queued_during_a_decode_join_it_and_finish_on_their_own(model, snapshots):
    """A long request decodes; short ones queued behind it join between its steps (continuous batching), get
    what they get alone, and finish while the long one still runs."""
    long = (PROMPTS[0], snapshots[0], dict(max_tokens=1000, temperature=1.0, seed=3, num_samples=8, stop=[]))
    short = [(PROMPTS[1], snapshots[1], dict(max_tokens=3, temperature=0.0)),
             (PROMPTS[2], None, dict(max_tokens=4, temperature=1.0, seed=5, num_samples=3)),
             (PROMPTS[1], snapshots[2], dict(max_tokens=2, temperature=0.0, include_prompt_logprobs=True))]
    for wait in (0.005, 0.02, 0.05, 0.1):  # until the long one is decoding when the short ones come (a busy machine)
        first = submit_sample(model, long[0], adapter=long[1], **long[2])
        time.sleep(wait)  # its prefill and first steps: milliseconds on the tiny model
        later = [submit_sample(model, prompt, adapter=adapter, **params) for prompt, adapter, params in short]
        got = [(p._request.result(), p.result()) for p in later]
        long_done = first._request.done()
        if all(raw["group"][2] == 1 for raw, _ in got):  # they joined the running decode
            break
        first.result()
    else:
        pytest.fail("the short requests never joined the running decode")
    assert not long_done  # they finished first: their waiters did not wait for the long one
    first.result()
    alone = [run(model, [r], together=False)[0] for r in short]
    assert_same(got, alone)
    assert_same([(None, first.result())], [run(model, [long], together=False)[0]])



@pytest.fixture
def sampler(tiny_llama):
    import tinker

    return tinker.ServiceClient().create_sampling_client(base_model=tiny_llama).result()


LONG = dict(max_tokens=1000, temperature=1.0, stop=[])


def test_cancelling_a_sample_future_stops_it_and_frees_its_slot(sampler):
    import concurrent.futures

    from tinker import types

    long = sampler.sample(types.ModelInput.from_ints(PROMPTS[0]), 64, types.SamplingParams(**LONG))
    time.sleep(0.005)
    short = sampler.sample(types.ModelInput.from_ints(PROMPTS[1]), 1, types.SamplingParams(max_tokens=3, stop=[]))
    assert long.cancel() and long.cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        long.result()
    assert len(short.result().sequences[0].tokens) == 3
    # the engine stopped it between steps (it finished cancelled, not after its 64 000 tokens)
    with pytest.raises(InterruptedError, match="cancelled"):
        long._request.result()
    assert not short.cancel()  # a finished future cannot be cancelled
    out = sampler.sample(types.ModelInput.from_ints(PROMPTS[2]), 2, types.SamplingParams(max_tokens=4)).result()
    assert [len(s.tokens) for s in out.sequences] == [4, 4]


def test_dropping_a_sample_future_unread_cancels_the_request(sampler):
    """A sample or compute_logprobs future garbage-collected while pending stops its request (nobody can read
    its result); a dropped training future still runs (tests/test_api_futures)."""
    import gc

    from tinker import types

    future = sampler.sample(types.ModelInput.from_ints(PROMPTS[0]), 64, types.SamplingParams(**LONG))
    request = future._request
    logprobs = sampler.compute_logprobs(types.ModelInput.from_ints(PROMPTS[1] * 40))
    scoring = logprobs._request
    del future, logprobs
    gc.collect()
    with pytest.raises(InterruptedError, match="cancelled"):
        request.result()
    try:  # it may have finished before the drop: then its result is simply discarded
        scoring.result()
    except InterruptedError as e:
        assert "cancelled" in str(e)
    kept = sampler.sample(types.ModelInput.from_ints(PROMPTS[1]), 1, types.SamplingParams(max_tokens=3, stop=[]))
    gc.collect()
    assert len(kept.result().sequences[0].tokens) == 3  # a held future is never cancelled by a collection


def test_cancelling_the_awaiting_task_cancels_the_request(sampler):
    import asyncio

    from tinker import types

    async def main():
        started = {}

        async def sample_long():
            future = sampler.sample(types.ModelInput.from_ints(PROMPTS[0]), 64, types.SamplingParams(**LONG))
            started["future"] = future._request
            return await future

        task = asyncio.create_task(sample_long())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(InterruptedError, match="cancelled"):
            await asyncio.to_thread(started["future"].result)
        out = await sampler.sample(types.ModelInput.from_ints(PROMPTS[1]), 1,
                                   types.SamplingParams(max_tokens=2, stop=[]))
        assert len(out.sequences[0].tokens) == 2

    asyncio.run(main())


# ---- the bound on the keys and values sampling holds at once (TINKER_KV_CACHE_MB) ----

def kv_bytes(model, prompt_len: int, num_samples: int, max_tokens: int) -> int:
    """What a request reserves: its prompt's rows and max_tokens rows per sample, keys and values of every layer."""
    c = model.config
    return 2 * c["n_layers"] * c["n_kv_heads"] * c["head_dim"] * 4 * (prompt_len + num_samples * max_tokens)


@pytest.fixture
def kv_limit(model):
    """Sets the model's limit for one test, then back to the default."""
    default = model.handle.kv_cache_limit()
    yield model.handle.set_kv_cache_limit
    model.handle.set_kv_cache_limit(0)
    assert model.handle.kv_cache_limit() == default


def test_the_default_kv_limit_leaves_room(model):
    """At most half of the machine's memory (and 3/4 of what was available once the model had loaded)."""
    import os

    assert 0 < model.handle.kv_cache_limit() <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


def test_requests_past_the_kv_limit_wait_for_room(model, kv_limit):
    """Four requests popped together, each reserving a unit of cache, under a limit of 2.5 units: admitted as two
    cohorts of two (the second once the first has finished and freed its rows), each as it is alone."""
    params = dict(max_tokens=40, temperature=1.0, seed=4, num_samples=2, stop=[])
    requests = [([7 + i, 3, 9, 2, 5], None, params) for i in range(4)]
    kv_limit(int(2.5 * kv_bytes(model, 5, 2, 40)))
    got = run(model, requests, together=True)
    assert [raw["group"][0] for raw, _ in got] == [2, 2, 2, 2]
    kv_limit(0)  # the default: all four fit
    assert [raw["group"][0] for raw, _ in run(model, requests, together=True)] == [4, 4, 4, 4]
    assert_same(got, [run(model, [r], together=False)[0] for r in requests])


def test_a_request_past_the_kv_limit_joins_a_decode_only_when_it_fits(model, kv_limit):
    """A short request queued while a long one decodes would join it (continuous batching), but the limit leaves no
    room beside the long one: it waits until the long one has finished and freed its rows, then gets its result."""
    long = dict(max_tokens=1000, temperature=1.0, seed=1, num_samples=8, stop=[])
    short = dict(max_tokens=3, temperature=0.0)
    kv_limit(kv_bytes(model, 4, 8, 1000) + kv_bytes(model, 3, 1, 3) // 2)  # the long one, and half the short one
    for wait in (0.005, 0.02, 0.05, 0.1):  # until the long one is decoding when the short one comes
        first = submit_sample(model, PROMPTS[0], **long)
        time.sleep(wait)
        later = submit_sample(model, PROMPTS[1], **short)
        running = not first._request.done()
        raw = later._request.result()
        if running:
            break
    else:
        pytest.fail("the long request was never still decoding when the short one came")
    assert first._request.done()  # it waited for the long one's rows
    assert raw["group"][2] == 0  # admitted in a session of its own, not joined
    assert_same([(raw, later.result())], [run(model, [(PROMPTS[1], None, short)], together=False)[0]])


def test_a_request_larger_than_the_kv_limit_is_refused_with_the_way_out(model, kv_limit):
    import tinker

    kv_limit(kv_bytes(model, 4, 8, 100) - 1)
    with pytest.raises(tinker.BadRequestError, match="TINKER_KV_CACHE_MB") as e:
        submit_sample(model, PROMPTS[0], max_tokens=100, num_samples=8)
    assert "num_samples or max_tokens" in str(e.value)
    submit_sample(model, PROMPTS[0], max_tokens=99, num_samples=8).result()  # one row less per sample fits


def test_kv_cache_limit_reads_tinker_kv_cache_mb(monkeypatch, caplog):
    from tinker._engine import kv_cache_limit

    monkeypatch.setenv("TINKER_KV_CACHE_MB", "512")
    assert kv_cache_limit() == 512 << 20
    monkeypatch.setenv("TINKER_KV_CACHE_MB", "0")
    assert kv_cache_limit() is None  # the default
    monkeypatch.setenv("TINKER_KV_CACHE_MB", "lots")
    assert kv_cache_limit() is None
    assert "TINKER_KV_CACHE_MB='lots' is not a size in MiB" in caplog.text
