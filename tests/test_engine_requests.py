"""The engine's request machinery: ids, ordering, blocking waits, the completion queue and its
wake fd, validation at submission, Ctrl-C while waiting, shutdown with queued work."""

from __future__ import annotations

import gc
import os
import select
import signal
import threading
import time

import numpy as np
import pytest

from tinker import _C
from tinker._engine import get_engine
from tinker._exceptions import BadRequestError


def submit(model, seqs, engine=None, notify=False):
    tokens = np.concatenate([np.asarray(s, dtype=np.int32) for s in seqs])
    lens = np.array([len(s) for s in seqs], dtype=np.int32)
    return (engine or get_engine()).forward(model.handle, tokens, lens, notify=notify)


def test_ids_are_given_at_submission_in_order(smollm2):
    reqs = [submit(smollm2, [[1, 2, 3]]) for _ in range(5)]
    ids = [r.id for r in reqs]
    assert ids == sorted(ids) and len(set(ids)) == 5
    for r in reqs:
        r.result()


def test_result_is_a_zero_copy_float32_buffer(smollm2):
    req = submit(smollm2, [[1, 2, 3], [4, 5]])
    view = req.result()
    assert view.format == "f" and view.shape == (5, smollm2.vocab_size) and view.readonly
    arr = np.asarray(view)
    del req, view
    gc.collect()
    assert np.isfinite(arr).all()  # the exported buffer keeps the logits alive


def test_wait_with_timeout_and_done(smollm2):
    req = submit(smollm2, [list(range(1, 400))] * 4)
    assert req.wait(0) in (False, True)
    assert req.wait(None) is True and req.done()
    assert req.wait(0) is True


def test_completion_queue_wakes_the_fd_and_drains_in_order(smollm2):
    engine = get_engine()
    engine.drain()
    reqs = [submit(smollm2, [[7, 8, 9]], notify=True) for _ in range(4)]
    plain = submit(smollm2, [[7, 8, 9]])  # not a notify request: never shows up in drain()
    got = []
    deadline = time.monotonic() + 30
    while len(got) < 4 and time.monotonic() < deadline:
        readable, _, _ = select.select([engine.wake_fd()], [], [], 5)
        if readable:
            got += engine.drain()
    assert got == [r.id for r in reqs]
    plain.result()
    assert engine.drain() == []


@pytest.mark.parametrize(
    "tokens, lens, match",
    [
        ([1, 2, 49152], [3], "sequence 0, position 2: token id 49152 is outside the vocabulary"),
        ([1, -5], [2], "token id -5"),
        ([1, 2, 3], [2], "add up to 2, but 3 tokens"),
        ([1, 2, 3], [4], "add up to more than"),
        ([1, 2], [2, 0], "sequence 1 is empty"),
        ([], [], "no sequences"),
    ],
)
def test_bad_forward_input_raises_at_submission(smollm2, tokens, lens, match):
    with pytest.raises(ValueError, match=match):
        get_engine().forward(smollm2.handle, np.array(tokens, np.int32), np.array(lens, np.int32))
    assert np.isfinite(smollm2.forward_logits([[1, 2]])[0]).all()  # still serving


def test_wrong_buffer_types_raise_type_error(smollm2):
    with pytest.raises(TypeError, match="int32"):
        get_engine().forward(smollm2.handle, np.array([1, 2], np.int64), np.array([2], np.int32))
    with pytest.raises(TypeError):
        get_engine().forward("not a model", np.array([1], np.int32), np.array([1], np.int32))


def test_loaded_model_wraps_bad_ids_in_tinker_errors(smollm2):
    with pytest.raises(BadRequestError, match="sequence 1 has token id 99999"):
        smollm2.forward_logits([[1], [2, 99999]])
    with pytest.raises(BadRequestError, match="longer than|context length"):
        smollm2.forward_logits([[1] * (smollm2.max_context_length + 1)])


def test_many_threads_submitting_at_once_get_their_own_results(smollm2):
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, smollm2.vocab_size, size=int(n)) for n in rng.integers(1, 40, size=16)]
    expected = [smollm2.forward_logits([s])[0] for s in seqs]
    results = [None] * len(seqs)

    def run(i):
        results[i] = smollm2.forward_logits([seqs[i]])[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(seqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(got, want)


def test_ctrl_c_interrupts_a_blocking_wait(smollm2):
    req = submit(smollm2, [list(range(1, 500))] * 6)  # a few seconds of work
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    started = time.monotonic()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        req.result()
    assert time.monotonic() - started < 2.0
    assert req.result().shape[0] == 6 * 499  # the request itself ran to the end


def test_shutdown_fails_queued_requests_cleanly(smollm2):
    engine = _C.Engine(n_threads=1)
    reqs = [submit(smollm2, [list(range(1, 200))], engine=engine) for _ in range(6)]
    del engine  # finishes the running request, fails the queued ones
    gc.collect()
    outcomes = []
    for r in reqs:
        try:
            r.result()
            outcomes.append("ok")
        except ValueError as e:
            assert "shut down" in str(e)
            outcomes.append("failed")
    # FIFO: whatever ran before the shutdown succeeded, everything after failed
    assert outcomes == sorted(outcomes, key=lambda o: o == "failed") and "failed" in outcomes


def test_engine_threads_default_to_the_usable_cpus():
    assert get_engine().threads == len(os.sched_getaffinity(0))
    assert _C.Engine(n_threads=3).threads == 3


def test_token_byte_table_is_validated(smollm2):
    """The table behind stop-string matching: wrong sizes or oversized tokens are refused cleanly."""
    with pytest.raises(ValueError, match="token 0: its bytes must have a length from 0 to 1024"):
        smollm2.handle.set_token_bytes([b"x" * 2000] + [b"a"] * (smollm2.vocab_size - 1))
    with pytest.raises(ValueError, match="token byte table has 3 tokens"):
        smollm2.handle.set_token_bytes([b"a", b"b", b"c"])
    with pytest.raises(TypeError, match="expected bytes"):
        smollm2.handle.set_token_bytes(["not bytes"] * smollm2.vocab_size)
