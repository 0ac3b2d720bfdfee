"""The prefix cache for sampling (csrc/model/prefix_cache.h): sample requests whose prompts start with the same
tokens under the same weights reuse those tokens' keys and values (whole blocks of 16 tokens) instead of
prefilling them again (issue #16 item 2).

Every result must be exactly what a fresh prefill gives: tokens, logprobs and top-k logprobs are compared with
==, not a tolerance, against the same request run with the cache disabled (TINKER_PREFIX_CACHE_MB=0's runtime
switch, set_prefix_cache_limit(0)). That holds because the kernels give a row the same bits whatever rows share
its pass: the default model's Q4_1 projections and the LoRA matmuls sum each output alone in k order (tgemm),
and the attention of a resumed prefill makes the sgemm calls a whole prefill makes (attention_cached; both
checked op by op in tests/ops). A hit is seen in the request's raw result ("cached_tokens") and in the model's
counters (prefix_cache_stats()). On the default model, SmolLM2-135M (30 layers, 3 kv heads of 64), a block
holds 737,280 bytes.

Covered: reuse across requests (suffixes of 16, 9, 1 and 23 tokens after a 200-token system prompt, greedy and
seeded sampling with top-k logprobs); prompt-logprob requests (no reuse, but they fill); different adapters,
an unembedding-only adapter (shares the base model's blocks), a live adapter whose weights change (optim_step,
a state write); eviction under a 5-block bound; prompts admitted in one cohort (the lead pass); requests from
8 threads; the block tree alone in C (tests/ops/test_prefix_cache.c). Images: tests/test_qwen3_vl.py.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from tinker._engine import get_engine
from tinker._sampling import submit_sample
from tinker._training import LoraAdapter

BLOCK = 16
BLOCK_BYTES = 2 * 30 * BLOCK * 3 * 64 * 4  # keys and values of 16 tokens in 30 layers of 3 x 64 floats
DEFAULT_LIMIT = 256 << 20

rng = np.random.default_rng(2024)
SYSTEM = [int(t) for t in rng.integers(100, 40000, 200)]  # a 200-token shared prefix: 12 whole blocks
SUFFIXES = [[int(t) for t in rng.integers(100, 40000, n)] for n in (16, 9, 1, 23)]
CACHED = 192  # the whole blocks of SYSTEM a suffix starting at 200 leaves intact


@pytest.fixture
def model(smollm2):
    """The default model with an empty prefix cache at the default bound (restored after the test)."""
    smollm2.handle.set_prefix_cache_limit(0)  # drops every block
    smollm2.handle.set_prefix_cache_limit(DEFAULT_LIMIT)
    yield smollm2
    smollm2.handle.set_prefix_cache_limit(DEFAULT_LIMIT)


def stats(model) -> dict:
    return model.handle.prefix_cache_stats()


PARAMS = [dict(max_tokens=5, temperature=0.0), dict(max_tokens=4, temperature=1.0, seed=7, num_samples=2,
                                                     topk_sample_logprobs=3)]


def sample_result(pending):
    """Everything a request returned, as plain values to compare with =="""
    out = pending.result()
    seqs = [(list(s.tokens), list(s.logprobs), s.stop_reason,
             None if s.topk_ids is None else (s.topk_ids.tolist(), s.topk_logprobs.tolist())) for s in out.sequences]
    return seqs, out.prompt_logprobs, out.topk_prompt_logprobs


def sample(model, prompt, adapter=None, params=PARAMS[1]):
    """(cached_tokens, sample_result)"""
    pending = submit_sample(model, prompt, adapter=adapter, **params)
    return pending._request.result()["cached_tokens"], sample_result(pending)


def fresh(model, prompt, adapter=None, params=PARAMS[1]):
    """What the request gives with the cache disabled (a prefill of the whole prompt). Disabling it drops every
    block, so the tests take these before they fill the cache."""
    limit = stats(model)["limit"]
    model.handle.set_prefix_cache_limit(0)
    try:
        cached, result = sample(model, prompt, adapter, params)
    finally:
        model.handle.set_prefix_cache_limit(limit)
    assert cached == 0
    return result


def random_snapshot(model, seed, **train):
    ad = LoraAdapter(model, rank=8, seed=seed, **train)
    r = np.random.default_rng(seed)
    ad.set_parameters({k: r.standard_normal(v.shape).astype(np.float32) * 0.02 for k, v in ad.parameters().items()})
    return ad.snapshot()


def test_a_shared_prefix_is_reused_and_results_are_exactly_a_fresh_prefills(model):
    prompts = [SYSTEM + s for s in SUFFIXES]
    for params in PARAMS:
        want = [fresh(model, p, params=params) for p in prompts]
        s0 = stats(model)  # counters are cumulative (disabling the cache drops blocks, not counts)
        got = [sample(model, p, params=params) for p in prompts]
        # the first fills the cache; every later one reuses the system prompt's 12 blocks, the 1-token suffix too
        # (its last token is prefilled alone, through the prefill kernels, not a decoding step's)
        assert [c for c, _ in got] == [0, CACHED, CACHED, CACHED]
        assert [r for _, r in got] == want
        # the same prompt again reuses all its whole blocks but the one holding its last token
        cached, result = sample(model, prompts[3], params=params)
        assert cached == (len(prompts[3]) - 1) // BLOCK * BLOCK and result == want[3]
        s = stats(model)
        d = {k: s[k] - s0[k] for k in ("lookups", "hits", "tokens_reused", "tokens_prefilled")}
        assert d == {"lookups": 5, "hits": 4, "tokens_reused": 3 * CACHED + cached,
                     "tokens_prefilled": sum(map(len, prompts)) + len(prompts[3]) - 3 * CACHED - cached}
        # the system prompt's 12 blocks, the 13th of the 16-token suffix's prompt and the 23-token one's two
        assert s["blocks"] == 12 + 1 + 2 and s["bytes"] == s["blocks"] * BLOCK_BYTES <= s["limit"]
        assert s["block_tokens"] == BLOCK


def test_prompt_logprobs_prefill_the_whole_prompt_but_fill_the_cache(model):
    params = dict(max_tokens=3, temperature=1.0, seed=3, include_prompt_logprobs=True, topk_prompt_logprobs=4)
    prompt = SYSTEM + SUFFIXES[0]
    want = fresh(model, prompt, params=params)
    sample(model, SYSTEM + SUFFIXES[1])  # fills the cache with the system prompt
    cached, got = sample(model, prompt, params=params)
    assert cached == 0 and got == want  # every position's logits are needed: no reuse
    assert got[1][0] is None and len(got[1]) == len(prompt) and len(got[2]) == len(prompt)
    # ... but it filled the cache with its own blocks: the same prompt without prompt logprobs reuses them
    cached, _ = sample(model, prompt)
    assert cached == (len(prompt) - 1) // BLOCK * BLOCK


def test_requests_of_different_weights_never_share(model):
    snaps = [random_snapshot(model, 1), random_snapshot(model, 2)]
    unembed_only = random_snapshot(model, 3, train_attn=False, train_mlp=False)
    prompt, other = SYSTEM + SUFFIXES[0], SYSTEM + SUFFIXES[1]
    weights = [None, *snaps, unembed_only]
    want = [fresh(model, prompt, w) for w in weights]
    want_other = [fresh(model, other, w) for w in snaps]
    assert len({str(w) for w in want}) == 4  # the adapters do change the results
    assert sample(model, prompt) == (0, want[0])
    for snap, w in zip(snaps, want[1:]):  # the base model's blocks are not theirs, nor each other's
        assert sample(model, prompt, snap) == (0, w)
    for snap, w in zip(snaps, want_other):
        assert sample(model, other, snap) == (CACHED, w)
    # an adapter of the unembedding alone leaves every key and value the base model's: it shares the base's blocks
    assert sample(model, prompt, unembed_only) == ((len(prompt) - 1) // BLOCK * BLOCK, want[3])


def test_an_adapter_whose_weights_change_never_reuses_its_old_keys(model):
    """A live (training) adapter sampled directly: after its weights change (optim_step, a state write) the
    blocks cached under the old weights are not reused; a snapshot taken before keeps its own."""
    adapter = LoraAdapter(model, rank=4, seed=11)
    adapter.set_parameters({k: np.random.default_rng(4).standard_normal(v.shape).astype(np.float32) * 0.02
                            for k, v in adapter.parameters().items()})
    snap = adapter.snapshot()
    prompt, other = SYSTEM + SUFFIXES[0], SYSTEM + SUFFIXES[1]
    tokens = np.array(prompt[:40])
    datum = (tokens[:-1], {"target_tokens": tokens[1:], "weights": np.ones(len(tokens) - 1)})
    before = fresh(model, other, adapter)

    assert sample(model, prompt, adapter)[0] == 0
    assert sample(model, other, adapter) == (CACHED, before)
    assert sample(model, prompt, snap)[0] == 0  # a snapshot is other weights' identity, even with equal values
    adapter.forward_backward([datum])
    adapter.optim_step(learning_rate=0.05)
    cached, trained = sample(model, other, adapter)  # a whole prefill under the new weights
    assert cached == 0 and trained != before  # the blocks of the old weights are still cached, but not theirs
    assert sample(model, other, adapter) == ((len(other) - 1) // BLOCK * BLOCK, trained)  # cached anew
    assert sample(model, other, snap)[0] == CACHED  # the snapshot's blocks, from before the training, still serve it

    adapter.set_parameters({k: v * 0.5 for k, v in adapter.parameters().items()})  # a state write
    cached, written = sample(model, other, adapter)
    assert cached == 0 and written != trained
    assert written == fresh(model, other, adapter)


def test_eviction_under_a_tiny_bound_keeps_results_exact_and_memory_bounded(model):
    block_bytes = BLOCK_BYTES
    model.handle.set_prefix_cache_limit(5 * block_bytes)  # 80 tokens' worth
    r = np.random.default_rng(9)
    prompts = [[int(t) for t in r.integers(100, 40000, 50)] for _ in range(4)]
    want = [fresh(model, p) for p in prompts]
    seen = []
    for round_ in range(2):
        for p, w in zip(prompts, want):
            cached, got = sample(model, p)
            assert got == w
            s = stats(model)
            assert s["bytes"] <= 5 * block_bytes and s["blocks"] <= 5
            seen.append(cached)
    s = stats(model)
    assert s["blocks_evicted"] > 0
    # 3 whole blocks per prompt, 5 fit: the LRU order evicts each prompt's blocks before it comes round again
    assert seen[4:] == [0] * 4
    # the most recent prompt's blocks are still there
    assert sample(model, prompts[-1])[0] == 48
    # a bound smaller than one block caches nothing (and reuses nothing)
    model.handle.set_prefix_cache_limit(block_bytes - 1)
    assert stats(model)["blocks"] == 0
    assert sample(model, prompts[0])[0] == 0 and stats(model)["blocks"] == 0


def hold_the_worker(model):
    """A long forward queued first: the sample requests queued behind it are admitted as one cohort."""
    tokens = np.tile(np.arange(1, 200, dtype=np.int32), 12)
    return get_engine().forward(model.handle, tokens, np.full(12, 199, dtype=np.int32))


def test_prompts_admitted_together_share_their_common_prefix(model):
    """Prompts admitted in one cohort look the cache up before any of them fills it: the prefix they share is
    prefilled once (a lead pass into the cache), and the others read it from there."""
    snap = random_snapshot(model, 5)
    prompts = [SYSTEM + s for s in SUFFIXES] + [SYSTEM[:100] + [7] * 20]
    requests = [(p, None) for p in prompts] + [(p, snap) for p in prompts[:2]]
    want = [fresh(model, p, w) for p, w in requests]
    s0 = stats(model)
    blocker = hold_the_worker(model)
    pending = [submit_sample(model, p, adapter=w, **PARAMS[1]) for p, w in requests]
    blocker.result()
    raw = [p._request.result() for p in pending]
    assert raw[0]["group"][:2] == (len(requests), len(requests))  # one cohort
    got = [sample_result(p) for p in pending]
    assert got == want
    # the base model's 200-token system prompt: one lead pass (192 tokens, 12 blocks), read by the three other
    # prompts; the prompt that shares only 96 tokens of it reads 96; the snapshot's two share under their weights
    assert [r["cached_tokens"] for r in raw] == [0, CACHED, CACHED, CACHED, 96, 0, CACHED]
    # every prompt token computed once: the leaders' shared prefixes in the lead pass, the rest in the main one
    prefilled = stats(model)["tokens_prefilled"] - s0["tokens_prefilled"]
    assert prefilled == sum(len(p) for p, _ in requests) - sum(r["cached_tokens"] for r in raw)


def test_the_block_tree_in_c(tmp_path):
    """tests/ops/test_prefix_cache.c: the tree alone, over a fake backend (longest runs, keys, rows read back, LRU
    eviction of leaves, pins across a lowered bound, a failing alloc), under AddressSanitizer and UBSan."""
    import subprocess

    import native_build

    exe = tmp_path / "test_prefix_cache"
    cmd = ["gcc", *native_build.CFLAGS, *native_build.SANITIZE, "-I" + str(native_build.ROOT / "csrc"),
           str(native_build.ROOT / "csrc" / "model" / "prefix_cache.c"), str(native_build.TESTS_C / "test_prefix_cache.c"),
           "-o", str(exe)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith(" 0 failed"), proc.stdout + proc.stderr


def test_concurrent_requests_from_threads(model):
    """Requests from 8 threads at once (they may share cohorts and join running decodes): each gets exactly
    what it gets alone with the cache off, and the ones after the first cohort reuse the system prompt."""
    prompts = [SYSTEM + s for s in SUFFIXES] + [SYSTEM + [5 + i] * (3 + i) for i in range(4)]
    want = [fresh(model, p) for p in prompts]
    sample(model, SYSTEM + [7, 7, 7])  # the system prompt is cached
    got = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def worker(i):
        barrier.wait()
        got[i] = sample(model, prompts[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r for _, r in got] == want
    assert all(c >= CACHED for c, _ in got)

