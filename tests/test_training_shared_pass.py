"""forward / forward_backward requests of several training clients on one base model share one pass over the
base weights (issue: many adapters, one pass, item 1 for training), and each client gets exactly what it gets
alone: its loss, its logprobs, and gradients only in its own adapter, in its call order.

Tolerance: relative 1e-4 (absolute 1e-6) on losses, logprobs and gradients: the tiny model's float32 matmuls
over the shared pass's taller batch may round differently from the same rows alone, a few ulps per product.
"""

from __future__ import annotations

import numpy as np
import pytest

from tinker._engine import get_engine, load_model
from tinker._exceptions import BadRequestError
from tinker._training import LoraAdapter

VOCAB_TOP = 200


@pytest.fixture(scope="module")
def model(tiny_llama):
    return load_model(tiny_llama)


ADAPTERS = {  # name: (rank, flags)
    "a": (4, {}),
    "b": (8, {"train_mlp": False}),
    "c": (2, {"train_attn": False, "train_mlp": False}),  # the unembedding only
}


def make_adapters(model):
    out = {}
    for i, (name, (rank, flags)) in enumerate(ADAPTERS.items()):
        ad = LoraAdapter(model, rank=rank, seed=i, **flags)
        rng = np.random.default_rng(i)
        ad.set_parameters({k: rng.standard_normal(v.shape).astype(np.float32) * 0.1
                           for k, v in ad.parameters().items()})
        out[name] = ad
    return out


def data(seed, n=2, length=7, rl=False):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(1, VOCAB_TOP, size=length + 1)
        inputs = {"target_tokens": ids[1:], "weights": rng.random(length).astype(np.float32)}
        if rl:
            inputs = {"target_tokens": ids[1:], "advantages": rng.standard_normal(length).astype(np.float32),
                      "logprobs": -rng.random(length).astype(np.float32) - 3}
        out.append((ids[:-1], inputs))
    return out


# (adapter, data seed, loss, config, backward)
REQUESTS = [
    ("a", 1, "cross_entropy", None, True),
    ("b", 2, "importance_sampling", None, True),
    ("a", 3, "cross_entropy", None, True),  # the same client again: its gradients accumulate in call order
    ("c", 4, "ppo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}, True),
    ("b", 5, "cross_entropy", None, True),
]


def submit(adapters, request):
    name, seed, loss, config, backward = request
    return adapters[name].submit(data(seed, rl=loss != "cross_entropy"), loss, config, backward=backward)


def hold_the_worker(model):
    """A long forward queued first: the requests queued behind it are popped as one batch."""
    tokens = np.tile(np.arange(1, 200, dtype=np.int32), 24)
    return get_engine().forward(model.handle, tokens, np.full(24, 199, dtype=np.int32))


def run(model, requests, together: bool, submit=submit):
    adapters = make_adapters(model)
    if together:
        blocker = hold_the_worker(model)
        pending = [submit(adapters, r) for r in requests]
        blocker.result()
    else:
        pending = []
        for r in requests:
            pending.append(submit(adapters, r))
            pending[-1]._request.wait()
    return adapters, pending


def outcome(p):
    try:
        return p.result(), p._request.result()[3]
    except BadRequestError as e:
        return e, None


def assert_same_results(together, alone, requests):
    (ads_t, pend_t), (ads_a, pend_a) = together, alone
    for r, pt, pa in zip(requests, pend_t, pend_a):
        rt, ra = outcome(pt)[0], outcome(pa)[0]
        if isinstance(ra, Exception):
            assert isinstance(rt, BadRequestError) and str(rt) == str(ra)
            continue
        np.testing.assert_allclose(rt.metrics["loss:sum"], ra.metrics["loss:sum"], rtol=1e-4, atol=1e-6)
        for lt, la in zip(rt.logprobs, ra.logprobs):
            np.testing.assert_allclose(lt, la, rtol=1e-4, atol=1e-6)
    for name in ADAPTERS:
        gt, ga = ads_t[name].gradients(), ads_a[name].gradients()
        assert gt.keys() == ga.keys()
        for key in gt:
            scale = max(float(np.abs(ga[key]).max()), 1e-6)
            np.testing.assert_allclose(gt[key], ga[key], rtol=1e-4, atol=1e-4 * scale, err_msg=f"{name} {key}")


def test_clients_share_a_pass_and_get_what_they_get_alone(model):
    together = run(model, REQUESTS, together=True)
    # shared passes of different clients; a client's second request starts the next pass
    assert [outcome(p)[1] for p in together[1]] == [2, 2, 3, 3, 3]
    alone = run(model, REQUESTS, together=False)
    assert [outcome(p)[1] for p in alone[1]] == [1] * len(REQUESTS)
    assert_same_results(together, alone, REQUESTS)
    # the gradients of each adapter are non-zero only where it trains
    assert not any(np.any(g) for k, g in together[0]["c"].gradients().items() if not k.startswith("unembed"))


def test_forward_only_requests_share_their_own_pass(model):
    requests = [(n, s, "cross_entropy", None, False) for n, s in (("a", 7), ("b", 8), ("c", 9))]
    requests.insert(1, ("a", 10, "cross_entropy", None, True))  # a forward_backward between them runs apart
    together = run(model, requests, together=True)
    assert [outcome(p)[1] for p in together[1]] == [1, 1, 2, 2]
    assert_same_results(together, run(model, requests, together=False), requests)


def test_a_poisoned_request_fails_alone_and_the_others_are_applied(model):
    """A request whose gradients overflow makes the shared pass fail its checks: nothing of it is kept, the
    requests run one by one, and only the poisoned one fails (its adapter's gradients as they were)."""
    poisoned = ("b", 6, "cross_entropy", None, True)
    requests = [REQUESTS[0], poisoned, REQUESTS[3], REQUESTS[1], REQUESTS[2]]  # passes: [a, b*, c], [b, a]

    def submit_poisoned(adapters, request):
        if request is poisoned:
            d = data(6)
            d[0][1]["weights"] = np.full(7, 3e38, np.float32)
            return adapters["b"].submit(d, "cross_entropy", None, backward=True)
        return submit(adapters, request)

    together = run(model, requests, together=True, submit=submit_poisoned)
    alone = run(model, requests, together=False, submit=submit_poisoned)
    results = [outcome(p) for p in together[1]]
    assert isinstance(results[1][0], BadRequestError) and "not finite" in str(results[1][0])
    assert [passes for _, passes in results] == [1, None, 1, 2, 2]  # one by one after the failed check
    assert_same_results(together, alone, requests)


def _client_steps(tc, i, steps=3):
    """One client's loop: forward_backward then optim_step, each future read only at the end."""
    from tinker import types

    futures = []
    for step in range(steps):
        batch = [types.Datum(model_input=types.ModelInput.from_ints(list(map(int, ids))),
                             loss_fn_inputs={"target_tokens": inputs["target_tokens"], "weights": inputs["weights"]})
                 for ids, inputs in data(100 * i + step)]
        futures.append(tc.forward_backward(batch, "cross_entropy"))
        futures.append(tc.optim_step(types.AdamParams(learning_rate=1e-2 * (i + 1))))
    return [f.result() for f in futures]


def _final_params(tiny_llama, mode: str) -> list[dict]:
    import asyncio
    import threading

    import tinker

    sc = tinker.ServiceClient()
    clients = [sc.create_lora_training_client(tiny_llama, rank=4, seed=i).result() for i in range(3)]
    if mode == "threads":
        threads = [threading.Thread(target=_client_steps, args=(tc, i)) for i, tc in enumerate(clients)]
        [t.start() for t in threads]
        [t.join() for t in threads]
    elif mode == "coroutines":
        async def client(tc, i):
            from tinker import types

            futures = []
            for step in range(3):  # the loop of _client_steps, yielding to the other clients between calls
                batch = [types.Datum(model_input=types.ModelInput.from_ints(list(map(int, ids))),
                                     loss_fn_inputs={"target_tokens": inputs["target_tokens"],
                                                     "weights": inputs["weights"]})
                         for ids, inputs in data(100 * i + step)]
                futures.append(tc.forward_backward(batch, "cross_entropy"))
                await asyncio.sleep(0)
                futures.append(tc.optim_step(types.AdamParams(learning_rate=1e-2 * (i + 1))))
                await asyncio.sleep(0)
            return [await f for f in futures]

        async def main():
            await asyncio.gather(*(client(tc, i) for i, tc in enumerate(clients)))

        asyncio.run(main())
    else:
        for i, tc in enumerate(clients):
            _client_steps(tc, i)
    return [tc._adapter.parameters() for tc in clients]


@pytest.mark.parametrize("mode", ["threads", "coroutines"])
def test_interleaved_clients_keep_their_own_order(tiny_llama, mode):
    """Three clients stepping at once (their requests interleave and share passes) end where each alone does.

    Tolerance 5e-5 absolute (lr 1e-2 to 3e-2, 3 steps): Adam divides by sqrt(v), so where a gradient is at the
    level of float32 rounding the last-ulp differences of a shared pass move a parameter by up to ~1e-3 lr; a
    client run out of order (another client's gradients, a step too many or too few) is off by ~lr."""
    together, alone = _final_params(tiny_llama, mode), _final_params(tiny_llama, "sequential")
    for t, a in zip(together, alone):
        for key in a:
            np.testing.assert_allclose(t[key], a[key], rtol=0, atol=5e-5, err_msg=key)
