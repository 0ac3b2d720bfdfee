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
import re
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
    # the getting-started guide's style: no .result(); it keeps working, with 0.38's FutureWarning at
    # each use of the future as the client (the SDK's words)
    with pytest.warns(FutureWarning) as record:
        tc = sc.create_lora_training_client(base_model=tiny_llama, rank=2, seed=0)
        loss = tc.forward_backward([datum()], "cross_entropy").result().metrics["loss:sum"]
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        assert tc.model_id == tc.result().model_id and tc.get_info().lora_rank == 2
        sampler = tc.save_weights_and_get_sampling_client()
        assert len(sampler.sample(prompt(), 1, PARAMS).result().sequences[0].tokens) == 3
    messages = [str(w.message) for w in record]
    using = ("Using the future as the {0} is deprecated; call .result() on it, or await it, to get the {0} "
             "first")
    assert messages == [using.format("TrainingClient")] * 2 + [
        "Reading `.model_id` from the future returned by a client-creation method is deprecated and will stop "
        "working in a future tinker SDK version. Call .result() on the future, or await it, to get the client first.",
        using.format("TrainingClient"), using.format("TrainingClient"), using.format("SamplingClient")]
    assert all(w.filename == __file__ for w in record)  # each points at the caller's line
    # 0.38's own style (the client first) warns about nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        client = tc.result()
        client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        assert client.save_weights_and_get_sampling_client().result().sample(prompt(), 1, PARAMS).result()
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


def test_sampling_client_telemetry_hooks(sc, tiny_llama):
    future = sc.create_sampling_client(base_model=tiny_llama)
    sampler = future.result()
    assert sampler.get_telemetry() is None
    assert sampler.on_queue_state_change("paused_capacity", "busy") is None  # nothing queues here
    with pytest.warns(FutureWarning, match="Using the future as the SamplingClient is deprecated"):
        assert future.get_telemetry() is None


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
    with pytest.warns(tinker.ExperimentalWarning, match="RestClient.search_sessions is experimental"):
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


# ---- AdminClient (0.38) -----------------------------------------------------------------------------


def test_admin_client(tiny_llama):
    import datetime

    import pydantic

    from tinker.lib.public_interfaces.rest_client import UnsupportedOperationError

    admin = tinker.AdminClient()
    assert isinstance(tinker.AdminClient(base_url="https://example.invalid", api_key="tml-x"), tinker.AdminClient)
    with pytest.raises(ValueError, match="not both"):
        tinker.AdminClient(tinker.ServiceClient(), api_key="tml-x")
    empty = admin.get_current_checkpoint_storage_usage().result()
    assert isinstance(empty, types.CurrentCheckpointStorageUsageResponse) and empty.data == []

    service = tinker.ServiceClient(project_id="p1")
    tc = service.create_lora_training_client(tiny_llama, rank=2).result()
    tc.save_state("s").result()
    tc.save_weights_for_sampler("w").result()

    async def usage_of(project_id=None):
        return await admin.get_current_checkpoint_storage_usage(project_id)

    usage = asyncio.run(usage_of())
    (item,) = usage.data
    assert item.project_id == "p1" and item.checkpoint_count == 2 and item.size_bytes > 0
    assert item.size_gigabytes == pytest.approx(item.size_bytes / 1e9)
    assert item.estimated_monthly_cost_usd is None and usage.effective_rate_usd_per_gigabyte_month is None
    assert asyncio.run(usage_of("p1")) == usage and asyncio.run(usage_of("p2")).data == []

    # Billing and the audit log mean nothing here: the future says so, as a BadRequestError.
    billing = admin.get_billing_usage("2026-07-13T00:00:00Z", datetime.datetime(2026, 7, 14, tzinfo=datetime.UTC))
    assert isinstance(billing, tinker.APIFuture)
    with pytest.raises(UnsupportedOperationError, match="get_billing_usage does not apply to the local engine"):
        billing.result()
    with pytest.raises(pydantic.ValidationError):  # as the SDK's request model checks them, at the call
        admin.get_billing_usage("last week", "today")

    async def audit():
        return await admin.get_audit_log(event_type="checkpoints", day=datetime.date(2025, 1, 15))

    with pytest.raises(tinker.BadRequestError, match="get_audit_log does not apply") as err:
        asyncio.run(audit())
    assert isinstance(err.value, NotImplementedError)

    # The deprecated twins warn and give the same.
    with pytest.warns(FutureWarning, match=r"^DEPRECATED: AdminClient.get_current_checkpoint_storage_usage_async"):
        assert asyncio.run(admin.get_current_checkpoint_storage_usage_async("p1")) == usage
    with pytest.warns(FutureWarning, match=r"^DEPRECATED: AdminClient.get_billing_usage_async\(\) is deprecated"):
        with pytest.raises(UnsupportedOperationError):
            asyncio.run(admin.get_billing_usage_async("2026-07-13T00:00:00Z", "2026-07-14T00:00:00Z"))
    # RestClient's admin methods moved to AdminClient in 0.38: they still answer, deprecated.
    rest = tinker.RestClient()
    with pytest.warns(FutureWarning, match=r"Use AdminClient.get_current_checkpoint_storage_usage\(\) instead"):
        assert rest.get_current_checkpoint_storage_usage().result() == usage
    with pytest.warns(FutureWarning, match=r"Use AdminClient.get_audit_log\(\) instead"):
        with pytest.raises(UnsupportedOperationError):
            rest.get_audit_log().result()


# ---- 0.38's deprecations ----------------------------------------------------------------------------

_REMOVED = "is deprecated and will be removed in a future tinker SDK version."
# Every deprecation 0.38 gives on a method this project also has (PEP 702's __deprecated__ holds the
# message the call warns with), as the SDK words them.
_DEPRECATED = {
    **{(cls, f"{m}_async"): f"DEPRECATED: {cls}.{m}_async() {_REMOVED} Use `await {cls}.{m}(...)` instead; {m}() "
       f"returns an APIFuture that can be awaited."
       for cls, methods in {
           "RestClient": [
               "get_training_run", "get_training_run_by_tinker_path", "list_training_runs", "list_checkpoints",
               "get_external_weights_urls", "delete_checkpoint", "delete_checkpoint_from_tinker_path", "copy_weights",
               "publish_checkpoint_from_tinker_path", "unpublish_checkpoint_from_tinker_path",
               "set_checkpoint_ttl_from_tinker_path", "list_user_checkpoints", "get_session", "list_sessions",
               "assign_session_project", "export_session_trace", "get_sampler"],
           "SamplingClient": ["sample", "compute_logprobs"],
           "AdminClient": ["get_audit_log", "get_billing_usage", "get_current_checkpoint_storage_usage"]}.items()
       for m in methods},
    **{(cls, f"{m}_async"): f"DEPRECATED: {cls}.{m}_async() {_REMOVED} Use `await {cls}.{m}(...)` instead; it returns "
       f"a future of the client that can be awaited."
       for cls, m in [("ServiceClient", "create_lora_training_client"), ("ServiceClient", "create_sampling_client"),
                      ("ServiceClient", "create_training_client_from_state"),
                      ("ServiceClient", "create_training_client_from_state_with_optimizer"),
                      ("TrainingClient", "create_sampling_client"),
                      ("TrainingClient", "save_weights_and_get_sampling_client")]},
    **{("TrainingClient", f"{m}_async"): f"DEPRECATED: TrainingClient.{m}_async() {_REMOVED} Use "
       f"TrainingClient.{m}(...) instead: it returns an APIFuture that can be awaited "
       f"(`await TrainingClient.{m}(...)`)."
       for m in ["save_state", "save_weights_for_sampler", "save_weights_external"]},
    ("TrainingClient", "get_info_async"): f"DEPRECATED: TrainingClient.get_info_async() {_REMOVED} Use "
    "TrainingClient.get_info() instead; it answers from the client without a request.",
    ("SamplingClient", "get_base_model_async"): f"DEPRECATED: SamplingClient.get_base_model_async() {_REMOVED} Use "
    "SamplingClient.get_base_model() instead; it answers from the client without a request.",
    ("TrainingClient", "forward_async"): f"DEPRECATED: TrainingClient.forward_async() {_REMOVED} Use "
    "TrainingClient.forward(...) instead: it returns an APIFuture at once. Submit the requests that follow before "
    "waiting: `fwd_future = client.forward(...); ...; await fwd_future` (or `fwd_future.result()`).",
    ("TrainingClient", "optim_step_async"): f"DEPRECATED: TrainingClient.optim_step_async() {_REMOVED} Use "
    "TrainingClient.optim_step(...) instead: it returns an APIFuture at once. Submit it right after forward_backward, "
    "then wait for both: `fwd_bwd_future = client.forward_backward(...); optim_future = client.optim_step(...); "
    "await fwd_bwd_future; await optim_future` (or `.result()` on each).",
    **{("TrainingClient", f"{m}_async"): f"DEPRECATED: TrainingClient.{m}_async() {_REMOVED} Use "
       f"TrainingClient.{m}(...) instead: it returns an APIFuture at once. Submit the optimizer step before "
       f"waiting: `fwd_bwd_future = client.{m}(...); optim_future = client.optim_step(...); await fwd_bwd_future; "
       f"await optim_future` (or `.result()` on each)." for m in ["forward_backward", "forward_backward_custom"]},
    **{("TrainingClient", m): "DEPRECATED: TrainingClient.load_state*() is deprecated and will NOT be supported in "
       "future tinker SDK versions. Migrate now: create a new training client from the checkpoint with "
       "ServiceClient.create_training_client_from_state() or "
       "ServiceClient.create_training_client_from_state_with_optimizer()."
       for m in ["load_state", "load_state_async", "load_state_with_optimizer", "load_state_with_optimizer_async"]},
    ("ServiceClient", "create_rest_client"): f"DEPRECATED: ServiceClient.create_rest_client() {_REMOVED} Construct "
    "tinker.RestClient() directly instead; it takes the same base_url and api_key and needs no ServiceClient.",
    ("ServiceClient", "get_server_capabilities"): f"DEPRECATED: ServiceClient.get_server_capabilities() {_REMOVED} "
    "Use tinker.RestClient().get_server_capabilities() instead; it returns an APIFuture: call .result() on it, or "
    "await it. RestClient needs no ServiceClient.",
    ("ServiceClient", "get_server_capabilities_async"): f"DEPRECATED: ServiceClient.get_server_capabilities_async() "
    f"{_REMOVED} Use `await tinker.RestClient().get_server_capabilities()` instead; RestClient needs no ServiceClient.",
    **{("RestClient", m): f"DEPRECATED: RestClient.{m}() {_REMOVED} Use AdminClient.{m}() instead; AdminClient is "
       f"constructed the same way as RestClient."
       for m in ["get_audit_log", "get_billing_usage", "get_current_checkpoint_storage_usage"]},
    **{("RestClient", f"{m}_async"): f"DEPRECATED: RestClient.{m}_async() {_REMOVED} Use `await AdminClient.{m}(...)` "
       f"instead; AdminClient is constructed the same way as RestClient, and {m}() returns an APIFuture that can be "
       f"awaited." for m in ["get_audit_log", "get_billing_usage", "get_current_checkpoint_storage_usage"]},
}


def test_every_0_38_deprecation_is_marked_with_the_sdks_words():
    marked = {}
    for cls in (tinker.ServiceClient, tinker.TrainingClient, tinker.SamplingClient, tinker.RestClient,
                tinker.AdminClient):
        for name, member in vars(cls).items():
            if getattr(member, "__deprecated__", None) is not None:
                marked[cls.__name__, name] = member.__deprecated__
    # (PEP 702's marker also carries the SDK's one ExperimentalWarning, on search_sessions)
    assert marked == {**_DEPRECATED, ("RestClient", "search_sessions"): "RestClient.search_sessions is experimental: "
                      "it may change or be removed in any release without a deprecation period."}
    # and nothing else: the calls 0.38 recommends are not marked
    assert not hasattr(tinker.TrainingClient.forward_backward, "__deprecated__")
    assert not hasattr(tinker.SamplingClient.sample, "__deprecated__")


def test_deprecated_calls_warn_and_keep_working(sc, tiny_llama):
    tc = sc.create_lora_training_client(tiny_llama, rank=2, seed=0).result()

    def warns(key):
        return pytest.warns(FutureWarning, match=f"^{re.escape(_DEPRECATED[key])}$")

    async def train():
        with warns(("TrainingClient", "forward_backward_async")):
            fwd_bwd = await tc.forward_backward_async([datum()], "cross_entropy")  # still 2 awaits
        with warns(("TrainingClient", "optim_step_async")):
            optim = await tc.optim_step_async(types.AdamParams(learning_rate=1e-2))
        return (await fwd_bwd).metrics["loss:sum"], await optim

    loss, _ = asyncio.run(train())
    assert loss > 0
    path = tc.save_state("s").result().path
    with warns(("TrainingClient", "load_state")):
        assert tc.load_state(path).result().path == path
    with warns(("ServiceClient", "create_rest_client")) as record:
        rest = sc.create_rest_client()
    assert isinstance(rest, tinker.RestClient) and record[0].filename == __file__  # the caller's line
    with warns(("RestClient", "list_checkpoints_async")):
        assert [c.tinker_path for c in asyncio.run(rest.list_checkpoints_async(tc.model_id)).checkpoints] == [path]
    with warns(("ServiceClient", "get_server_capabilities")):
        assert sc.get_server_capabilities().supported_models
    sampler = tc.save_weights_and_get_sampling_client().result()
    with warns(("SamplingClient", "sample_async")):
        response = asyncio.run(sampler.sample_async(prompt(), 1, PARAMS))
    assert response.sequences[0].tokens == sampler.sample(prompt(), 1, PARAMS).result().sequences[0].tokens
    with warns(("ServiceClient", "create_sampling_client_async")):
        assert isinstance(asyncio.run(sc.create_sampling_client_async(base_model=tiny_llama)), tinker.SamplingClient)
    with pytest.warns(FutureWarning, match=re.escape(
            "ServiceClient ignores unsupported arguments: retries, timeout. Passing them will be an error in a "
            "future version of the Tinker SDK.")):
        tinker.ServiceClient(timeout=3, retries=2)
    # Making a training client from a checkpoint loads it without a load_state warning of its own.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed = sc.create_training_client_from_state_with_optimizer(path).result()
        assert resumed.get_info().lora_rank == 2
        sc.copy_weights(path).result()  # (through a RestClient, without create_rest_client's warning)
