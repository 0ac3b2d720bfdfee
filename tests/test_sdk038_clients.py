"""SDK 0.38's client surface, written as its docstrings and docs write it: client factories return a
future of the client that also works as the client; sample() and compute_logprobs() return an
awaitable APIFuture that is also a concurrent.futures.Future; APIFuture.future()/coroutine();
ServiceClient as a context manager with close(), its new arguments and copy_weights; a standalone
tinker.RestClient whose methods can be awaited, with get_server_capabilities, copy_weights,
storage usage and session search; user_metadata kept on checkpoints."""

from __future__ import annotations

import asyncio
import concurrent.futures
import pickle
import warnings

import pytest

import tinker
from tinker import types
from tinker._models import DEFAULT_MODEL
from tinker.lib.public_interfaces import AwaitableConcurrentFuture

pytestmark = pytest.mark.usefixtures("store")  # each test gets its own checkpoint store

PARAMS = types.SamplingParams(max_tokens=3, temperature=0.0)


def datum(seed: int = 0) -> types.Datum:
    tokens = [(seed * 7 + i) % 500 + 1 for i in range(10)]
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 9})


def prompt() -> types.ModelInput:
    return types.ModelInput.from_ints([5, 6, 7])


@pytest.fixture
def sc():
    return tinker.ServiceClient()


# ---- client factories ------------------------------------------------------------------------------


def test_training_client_future_every_way(sc, tiny_llama):
    future = sc.create_lora_training_client(base_model=tiny_llama, rank=2, seed=0)
    assert isinstance(future, tinker.APIFuture) and isinstance(future, tinker.TrainingClient)
    assert isinstance(future, tinker.BackcompatTrainingClientFuture)
    tc = future.result()
    assert type(tc) is tinker.TrainingClient and not isinstance(tc, tinker.APIFuture)
    assert future.result(timeout=60) is tc and future.future().result() is tc
    assert repr(future) == repr(tc)

    async def awaited():
        return await future, await future.result_async(), await future.coroutine()

    assert asyncio.run(awaited()) == (tc, tc, tc)


def test_client_future_used_directly_as_the_client(sc, tiny_llama):
    # the getting-started guide's style: no .result(); it must keep working, without warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tc = sc.create_lora_training_client(base_model=tiny_llama, rank=2, seed=0)
        loss = tc.forward_backward([datum()], "cross_entropy").result().metrics["loss:sum"]
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        assert tc.model_id == tc.result().model_id and tc.get_info().lora_rank == 2
        sampler = tc.save_weights_and_get_sampling_client()
        assert len(sampler.sample(prompt(), 1, PARAMS).result().sequences[0].tokens) == 3
    assert tc.forward([datum()], "cross_entropy").result().metrics["loss:sum"] < loss
    # state written through the future is the client's own
    tc.some_attribute = 5
    assert tc.result().some_attribute == 5


def test_async_twins_take_one_await(sc, tiny_llama):
    async def main():
        tc = await sc.create_lora_training_client_async(tiny_llama, rank=2)
        assert type(tc) is tinker.TrainingClient
        sampler = await tc.save_weights_and_get_sampling_client_async()
        assert type(sampler) is tinker.SamplingClient
        base = await sc.create_sampling_client_async(base_model=tiny_llama)
        assert type(base) is tinker.SamplingClient
        fut = await tc.forward_backward_async([datum()], "cross_entropy")  # training calls: two awaits
        assert (await fut).metrics["loss:sum"] > 0

    asyncio.run(main())


def test_0_38_async_style(sc, tiny_llama):
    # the 0.38 docs: `await` the factories and sample(); sample_async is deprecated
    async def main():
        tc = await sc.create_lora_training_client(base_model=tiny_llama, rank=2, seed=1)
        await tc.forward_backward([datum()], "cross_entropy")
        await tc.optim_step(types.AdamParams(learning_rate=1e-2))
        sampler = await tc.save_weights_and_get_sampling_client()
        response = await sampler.sample(prompt(), 2, PARAMS)
        logprobs = await sampler.compute_logprobs(prompt())
        task = asyncio.create_task(sampler.sample(prompt(), 1, PARAMS).coroutine())
        return response, logprobs, await task

    response, logprobs, tasked = asyncio.run(main())
    assert len(response.sequences) == 2 and logprobs[0] is None and len(logprobs) == 3
    assert tasked.sequences[0].tokens == response.sequences[0].tokens  # greedy


def test_sampling_client_factories(sc, tiny_llama):
    tc = sc.create_lora_training_client(tiny_llama, rank=2, seed=0).result()
    tc.forward_backward([datum()], "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=1e-2))
    path = tc.save_weights_for_sampler("s").result().path
    expected = tc.save_weights_and_get_sampling_client().result().compute_logprobs(prompt()).result()
    for future in (sc.create_sampling_client(model_path=path), tc.create_sampling_client(path)):
        assert isinstance(future, tinker.BackcompatSamplingClientFuture) and isinstance(future, tinker.APIFuture)
        client = future.result()
        assert type(client) is tinker.SamplingClient
        assert client.compute_logprobs(prompt()).result() == expected
        assert asyncio.run(future.result_async()) is client
    base = sc.create_sampling_client(base_model=tiny_llama)
    assert base.get_base_model() == tiny_llama  # used directly
    assert base.compute_logprobs(prompt()).result() != expected
    # a client future pickles as its client, as SamplingClients do for worker processes
    copy = pickle.loads(pickle.dumps(tc.save_weights_and_get_sampling_client()))
    assert type(copy) is tinker.SamplingClient and copy.compute_logprobs(prompt()).result() == expected


def test_training_clients_from_state(sc, tiny_llama):
    tc = sc.create_lora_training_client(tiny_llama, rank=2, seed=0).result()
    tc.forward_backward([datum()], "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=1e-2))
    path = tc.save_state("w").result().path
    expected = tc.forward([datum(1)], "cross_entropy").result().metrics["loss:sum"]
    for future in (sc.create_training_client_from_state(path),
                   sc.create_training_client_from_state_with_optimizer(path)):
        assert isinstance(future, tinker.BackcompatTrainingClientFuture)
        resumed = future.result()
        assert resumed.forward([datum(1)], "cross_entropy").result().metrics["loss:sum"] == expected

    async def main():
        return await sc.create_training_client_from_state_with_optimizer(path)

    assert type(asyncio.run(main())) is tinker.TrainingClient


def test_creation_errors_come_through_the_future(sc, tiny_llama):
    future = sc.create_lora_training_client(base_model="no-such/model")
    with pytest.raises(tinker.BadRequestError, match="Cannot find base model"):
        future.result()

    async def awaited():
        await future

    with pytest.raises(tinker.BadRequestError, match="Cannot find base model"):
        asyncio.run(awaited())
    with pytest.raises(tinker.BadRequestError, match="Cannot find base model"):
        future.forward_backward([datum()], "cross_entropy").result()  # used as the client
    assert "failed" in repr(future)
    with pytest.raises(tinker.NotFoundError):
        sc.create_training_client_from_state("tinker://nobody:train:0/weights/x").result()
    with pytest.raises(tinker.NotFoundError):
        sc.create_sampling_client(model_path="tinker://nobody:train:0/sampler_weights/x").result()
    with pytest.raises(tinker.BadRequestError, match="rank"):
        sc.create_lora_training_client(tiny_llama, rank=0).result()
    # malformed arguments still raise at the call, as the SDK's own checks do
    with pytest.raises(ValueError, match="Either model_path or base_model"):
        sc.create_sampling_client()
    with pytest.raises(ValueError, match="tinker://"):
        sc.create_sampling_client(model_path="/not/a/tinker/path")


def test_save_weights_and_get_sampling_client_kind(sc, tiny_llama):
    tc = sc.create_lora_training_client(tiny_llama, rank=2).result()
    assert type(tc.save_weights_and_get_sampling_client(kind="snapshot").result()) is tinker.SamplingClient
    # "inflight" promises these weights or newer; a snapshot taken here is exactly these weights
    assert type(tc.save_weights_and_get_sampling_client(kind="inflight").result()) is tinker.SamplingClient
    with pytest.raises(ValueError, match="kind"):
        tc.save_weights_and_get_sampling_client(kind="live")


# ---- futures ------------------------------------------------------------------------------------------


def test_sample_returns_an_awaitable_stdlib_future(sc, tiny_llama):
    sampler = sc.create_sampling_client(base_model=tiny_llama).result()
    futures = [sampler.sample(prompt(), 1, PARAMS), sampler.compute_logprobs(prompt())]
    for future in futures:
        assert isinstance(future, tinker.APIFuture) and isinstance(future, concurrent.futures.Future)
        assert future.future() is future
    done, _ = concurrent.futures.wait(futures, timeout=60)
    assert len(done) == 2
    response = futures[0].result()

    async def main():
        return (await futures[0], await futures[0].result_async(timeout=30), await futures[1].coroutine())

    again, timed, logprobs = asyncio.run(main())
    assert again is response and timed is response and logprobs == futures[1].result()
    failed = sampler.sample(prompt(), 0, PARAMS)
    with pytest.raises(tinker.BadRequestError, match="num_samples"):
        asyncio.run(failed.result_async())


def test_api_future_future_and_coroutine(sc, tiny_llama):
    tc = sc.create_lora_training_client(tiny_llama, rank=2).result()
    fut = tc.forward_backward([datum()], "cross_entropy")
    stdlib = fut.future()
    assert isinstance(stdlib, concurrent.futures.Future)
    assert stdlib.result(timeout=60).metrics == fut.result().metrics

    async def main():
        return await asyncio.create_task(tc.forward([datum()], "cross_entropy").coroutine())

    assert asyncio.run(main()).metrics["loss:sum"] > 0
    failed = tc.forward_backward([datum()], "no_such_loss")
    with pytest.raises(tinker.BadRequestError):
        failed.future().result(timeout=5)


def test_awaitable_concurrent_future():
    plain: concurrent.futures.Future = concurrent.futures.Future()
    wrapped = AwaitableConcurrentFuture(plain)
    assert isinstance(wrapped, tinker.APIFuture) and wrapped.future() is plain
    with pytest.raises(TimeoutError):
        wrapped.result(timeout=0.01)
    plain.set_result(7)
    assert wrapped.result() == 7 and asyncio.run(wrapped.coroutine()) == 7


# ---- ServiceClient ---------------------------------------------------------------------------------


def test_service_client_context_manager_and_close(tiny_llama):
    with tinker.ServiceClient() as service:
        tc = service.create_lora_training_client(tiny_llama, rank=2).result()
        pending = tc.save_state("at-exit")
    assert pending.result().path.endswith("/weights/at-exit")  # close waited for it
    with pytest.raises(RuntimeError, match="closed"):
        service.create_lora_training_client(tiny_llama, rank=2)
    assert tc.forward([datum()], "cross_entropy").result().metrics["loss:sum"] > 0  # clients keep working
    other = tinker.ServiceClient()
    assert other.close("success", detail="done").result() is None
    assert other.close("errored").result() is None  # closing twice is harmless
    with pytest.raises(ZeroDivisionError):
        with tinker.ServiceClient() as failing:
            1 / 0
    with pytest.raises(RuntimeError):
        failing.create_sampling_client(base_model=tiny_llama)


def test_service_client_arguments(monkeypatch):
    monkeypatch.setenv("TINKER_PROJECT_ID", "proj-env")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        client = tinker.ServiceClient(display_name="nightly run", base_url="https://example.invalid",
                                      api_key="tml-x", default_headers_overrides={"X-A": "b"},
                                      user_metadata={"k": "v"})
    assert client.project_id == "proj-env" and client.display_name == "nightly run"
    assert tinker.ServiceClient(project_id="explicit").project_id == "explicit"
    with pytest.warns(FutureWarning, match="timeout"):
        tinker.ServiceClient(timeout=3)


def test_console_urls(sc, tiny_llama, store):
    assert sc.get_console_url().startswith("file://")
    tc = sc.create_lora_training_client(tiny_llama, rank=2).result()
    saved = tc.save_state("c").result()
    assert tc.get_console_url() == (store / "runs" / tc.model_id).as_uri()
    assert saved.get_console_url() == (store / "runs" / tc.model_id / "weights" / "c").as_uri()
    assert saved.get_playground_url().startswith("file://")


# ---- RestClient ---------------------------------------------------------------------------------------


def test_rest_client_standalone_and_awaitable(sc, tiny_llama):
    tc = sc.create_lora_training_client(tiny_llama, rank=2).result()
    path = tc.save_state("a", user_metadata={"step": "1"}).result().path
    sampler_path = tc.save_weights_for_sampler("b", user_metadata={"kind": "eval"}).result().path
    rest = tinker.RestClient(base_url="https://example.invalid", api_key="tml-x")
    assert isinstance(tinker.RestClient(), tinker.lib.public_interfaces.RestClient)
    listed = rest.list_checkpoints(tc.model_id).result()
    metadata = {c.tinker_path: c.user_metadata for c in listed.checkpoints}
    assert metadata == {path: {"step": "1"}, sampler_path: {"kind": "eval"}}

    async def main():
        return (await rest.list_checkpoints(tc.model_id), await rest.get_training_run(tc.model_id),
                await rest.get_weights_info_by_tinker_path(path), await rest.whoami(),
                await rest.get_server_capabilities())

    awaited, run, info, me, caps = asyncio.run(main())
    assert [c.tinker_path for c in awaited.checkpoints] == [c.tinker_path for c in listed.checkpoints]
    assert run.training_run_id == tc.model_id and info.lora_rank == 2 and me.org_urn
    model = [m for m in caps.supported_models if m.model_name == DEFAULT_MODEL]
    assert model and model[0].trainable and model[0].sampleable
    with pytest.raises(tinker.NotFoundError):
        asyncio.run(rest.get_training_run("nobody:train:0").result_async())


def test_copy_weights(sc, tiny_llama):
    tc = sc.create_lora_training_client(tiny_llama, rank=2, seed=0).result()
    tc.forward_backward([datum()], "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=1e-2))
    path = tc.save_weights_for_sampler("w").result().path
    copied = tinker.RestClient().copy_weights(path, "archive", ttl_seconds=3600).result()
    assert copied != path and copied.endswith("/sampler_weights/w")
    expected = sc.create_sampling_client(model_path=path).result().compute_logprobs(prompt()).result()
    assert sc.create_sampling_client(model_path=copied).result().compute_logprobs(prompt()).result() == expected
    copy_run = types.ParsedCheckpointTinkerPath.from_tinker_path(copied).training_run_id
    checkpoint = tinker.RestClient().list_checkpoints(copy_run).result().checkpoints[0]
    assert checkpoint.expires_at is not None
    via_service = tinker.ServiceClient(project_id="p").copy_weights(path).result()
    assert via_service.endswith("/sampler_weights/w") and via_service not in (path, copied)
    with pytest.raises(tinker.NotFoundError):
        tinker.RestClient().copy_weights("tinker://nobody:train:0/weights/x").result()


def test_storage_usage_and_session_search(tiny_llama):
    rest = tinker.RestClient()
    assert rest.get_current_checkpoint_storage_usage().result().data == []
    nightly = tinker.ServiceClient(display_name="Nightly RL run", user_metadata={"team": "a"}, project_id="p1")
    other = tinker.ServiceClient(display_name="sweep", project_id="p2")
    for service in (nightly, other):
        service.create_lora_training_client(tiny_llama, rank=2).result().save_state("s").result()
    other.close("errored").result()

    usage = rest.get_current_checkpoint_storage_usage().result()
    assert sum(item.checkpoint_count for item in usage.data) == 2 and all(item.size_bytes > 0 for item in usage.data)
    assert [i.project_id for i in rest.get_current_checkpoint_storage_usage("p1").result().data] == ["p1"]

    def ids(**filters):
        return [s.session_id for s in rest.search_sessions(types.SessionSearchRequest(**filters)).result().sessions]

    assert set(ids()) == {nightly.session_id, other.session_id}
    assert ids(display_name="rl nightly") == [nightly.session_id]
    assert ids(user_metadata={"team": "a"}) == [nightly.session_id]
    assert ids(project_ids=["p2"]) == [other.session_id]
    assert ids(statuses=[types.ActiveSessionStatusQuery()]) == [nightly.session_id]
    assert ids(statuses=[types.ClientFinishedSessionStatusQuery(reasons=["errored"])]) == [other.session_id]
    first = rest.search_sessions(types.SessionSearchRequest(limit=1)).result()
    assert len(first.sessions) == 1 and first.next_cursor is not None
    second = rest.search_sessions(types.SessionSearchRequest(limit=1, cursor=first.next_cursor)).result()
    assert {first.sessions[0].session_id, second.sessions[0].session_id} == {nightly.session_id, other.session_id}
    assert second.next_cursor is None
    summary = first.sessions[0]
    assert summary.checkpoints_count == 1 and summary.checkpoint_storage_bytes > 0
    session = rest.get_session(nightly.session_id).result()
    assert session.display_name == "Nightly RL run" and session.user_metadata == {"team": "a"}


def test_validation_at_use_not_construction(sc, tiny_llama):
    # 0.38 constructs these; what the engine cannot run is refused when used, through the future
    tc = sc.create_lora_training_client(tiny_llama, rank=2).result()
    tc.forward_backward([datum()], "cross_entropy")
    with pytest.raises(tinker.BadRequestError, match="betas"):
        tc.optim_step(types.AdamParams(beta2=1.0)).result()
    sampler = sc.create_sampling_client(base_model=tiny_llama).result()
    greedy = sampler.sample(prompt(), 1, types.SamplingParams(max_tokens=3, temperature=0.0)).result()
    top_p_zero = sampler.sample(prompt(), 1, types.SamplingParams(max_tokens=3, top_p=0.0, seed=1)).result()
    assert top_p_zero.sequences[0].tokens == greedy.sequences[0].tokens  # nucleus of nothing: the top token
    assert len(sampler.sample(prompt(), 1, types.SamplingParams(max_tokens=3, top_p=1.5)).result()
               .sequences[0].tokens) == 3
    with pytest.raises(tinker.BadRequestError, match="temperature"):
        sampler.sample(prompt(), 1, types.SamplingParams(max_tokens=3, temperature=-1.0)).result()
