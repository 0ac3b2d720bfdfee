"""SDK 0.38's module-level names and types: exports, tinker.auth, Timeout, TensorData's pad_value and
shared arrays, the new response fields and service types."""

from __future__ import annotations

import dataclasses
import pickle
import warnings
from datetime import datetime, timezone
from types import SimpleNamespace

import numpy as np
import pytest
from pydantic import ValidationError

import tinker
from tinker import types
from tinker.lib import public_interfaces


def test_exports():
    for name in ("RestClient", "BackcompatTrainingClientFuture", "BackcompatSamplingClientFuture", "BillingError",
                 "ExperimentalWarning", "auth", "APIFuture", "ServiceClient", "TrainingClient", "SamplingClient"):
        assert name in tinker.__all__ and hasattr(tinker, name), name
    for name in ("AwaitableConcurrentFuture", "RestClient", "BackcompatTrainingClientFuture",
                 "BackcompatSamplingClientFuture", "APIFuture"):
        assert hasattr(public_interfaces, name), name
    assert tinker.RestClient.__module__ == "tinker" and tinker.BillingError.__module__ == "tinker"
    assert issubclass(tinker.BillingError, tinker.APIStatusError) and tinker.BillingError.status_code == 402
    assert issubclass(tinker.ExperimentalWarning, FutureWarning)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=tinker.ExperimentalWarning)
        warnings.warn("may change", tinker.ExperimentalWarning)
    assert issubclass(tinker.BackcompatTrainingClientFuture, tinker.TrainingClient)
    assert issubclass(tinker.BackcompatSamplingClientFuture, tinker.SamplingClient)
    assert issubclass(public_interfaces.AwaitableConcurrentFuture, tinker.APIFuture)
    try:
        raise tinker.BillingError("no billing")
    except tinker.BillingError as e:
        assert isinstance(e, tinker.TinkerError)


def test_auth(monkeypatch):
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    assert tinker.auth.tinker_has_credentials() is True  # nothing is needed locally
    assert tinker.auth.raise_if_tinker_not_accessible() is None
    assert tinker.auth.get_tinker_token() is None
    monkeypatch.setenv("TINKER_API_KEY", "tml-abc")
    assert tinker.auth.get_tinker_token() == "tml-abc"


def test_timeout_as_dict_and_equality():
    t = tinker.Timeout(10.0, connect=2.0)
    assert t.as_dict() == {"connect": 2.0, "read": 10.0, "write": 10.0, "pool": 10.0}
    assert t == tinker.Timeout(10.0, connect=2.0) and t != tinker.Timeout(10.0)
    assert t != "10"


def test_version():
    assert tinker.__version__.startswith("0.38.")


# ---- TensorData ----------------------------------------------------------------------------------------


def test_to_numpy_is_writable_and_shares_from_numpy_memory():
    source = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    td = types.TensorData.from_numpy(source)
    out = td.to_numpy()
    assert out.flags.writeable and np.shares_memory(out, source)
    out[0, 0] = 9.0  # in place, as 0.38 code does (e.g. masking advantages)
    assert source[0, 0] == 9.0 and td.data[0] == 9.0 and td.tolist()[0] == [9.0, 2.0]
    converted = types.TensorData.from_numpy(np.arange(3, dtype=np.float64))  # other dtype: a float32 copy
    assert converted.to_numpy().dtype == np.float32 and converted.to_numpy().flags.writeable
    frozen = np.arange(3, dtype=np.int64)
    frozen.flags.writeable = False
    assert types.TensorData.from_numpy(frozen).to_numpy().flags.writeable  # copied, not shared


def test_pad_value():
    sparse = types.TensorData(data=[5, 6], dtype="int64", shape=[2, 3], sparse_crow_indices=[0, 1, 2],
                              sparse_col_indices=[2, 0])
    assert sparse.tolist() == [[0, 0, 5], [6, 0, 0]]
    assert sparse.tolist(pad_value=-100) == [[-100, -100, 5], [6, -100, -100]]
    assert sparse.to_numpy(pad_value=-1).tolist() == [[-1, -1, 5], [6, -1, -1]]
    dense = types.TensorData(data=[1, 2], dtype="int64")
    assert dense.to_numpy(pad_value=7).tolist() == [1, 2]  # nothing to pad in a dense tensor
    with pytest.raises(TypeError, match="pad_value"):
        sparse.to_numpy(pad_value=0.5)
    with pytest.raises(TypeError, match="pad_value"):
        sparse.tolist(pad_value=True)


def test_pad_value_torch():
    torch = pytest.importorskip("torch")
    padded = torch.tensor([[-100, 3, -100], [4, -100, -100]])
    td = types.TensorData.from_torch_sparse(padded, pad_value=-100)
    assert td.data == [3, 4] and td.sparse_crow_indices == [0, 1, 2] and td.sparse_col_indices == [1, 0]
    assert torch.equal(td.to_torch(pad_value=-100), padded)
    assert td.to_torch().tolist() == [[0, 3, 0], [4, 0, 0]]
    flat = types.TensorData.from_torch_sparse(torch.tensor([0.0, 1.5]))  # not 2-D: stored dense
    assert flat.sparse_crow_indices is None and flat.data == [0.0, 1.5]


def test_tensor_data_edge_cases_accepted():
    assert types.TensorData(dtype="float32").to_numpy().shape == (0,)
    assert types.TensorData(data=[2.9, -2.9], dtype="int64").data == [2, -2]
    with pytest.raises(ValueError):
        types.TensorData(data=[float("inf")], dtype="int64")


# ---- responses and service types ---------------------------------------------------------------------


def test_response_fields():
    now = datetime.now(timezone.utc)
    c = types.Checkpoint(checkpoint_id="x/y", checkpoint_type="external", time=now, tinker_path="p",
                         user_metadata={"a": "b"})
    assert c.user_metadata == {"a": "b"} and types.Checkpoint(checkpoint_id="w/a", checkpoint_type="training",
                                                              time=now, tinker_path="p").user_metadata is None
    info = types.GetInfoResponse(model_data=types.ModelData(), model_id="m")
    assert info.type is None and info.optimizer_config == types.AdamOptimizerConfig()  # the SDK's default
    assert types.SaveWeightsForSamplerResponse(path="tinker://r/sampler_weights/a").type is None
    session = types.GetSessionResponse(training_run_ids=[], sampler_ids=[], display_name="n", user_metadata={"k": "v"})
    assert session.display_name == "n"
    model = types.SupportedModel(model_name="m", trainable=True, sampleable=False)
    assert model.trainable and model.sampleable is False and types.SupportedModel().trainable is None
    assert types.WhoamiResponse(user_urn="u", org_urn="o").org_urn == "o"
    entry = types.AuditLogEntry(timestamp=now, event="checkpoint_read", event_details={"who": "me"})
    assert entry.event_details == {"who": "me"} and types.AuditLogEntry(timestamp=now, event="e").event_details == {}


def test_forward_backward_input_is_frozen_and_takes_strings():
    fbi = types.ForwardBackwardInput(data=[], loss_fn="cross_entropy", loss_fn_config={"mode": "x", "beta": 0.1})
    assert fbi.loss_fn_config["mode"] == "x"
    with pytest.raises(dataclasses.FrozenInstanceError):
        fbi.loss_fn = "ppo"


def test_service_types():
    request = types.SessionSearchRequest(display_name="nightly", owner=types.AccessibleSearchOwner(),
                                         statuses=[{"type": "client_finished", "reasons": ["success"]}])
    assert request.limit == 50 and request.owner.type == "accessible"
    assert isinstance(request.statuses[0], types.ClientFinishedSessionStatusQuery)
    for bad in ({"limit": 0}, {"limit": 201}, {"display_name": ""}, {"statuses": []}, {"unknown": 1}):
        with pytest.raises(ValidationError):
            types.SessionSearchRequest(**bad)
    cursor = types.SessionSearchCursor(last_created_at=datetime.now(timezone.utc), last_session_id="s")
    assert request.model_copy(update={"cursor": cursor}).cursor.last_session_id == "s"
    summary = types.SessionSummary(session_id="s", created_at=datetime.now(timezone.utc), owner="o", project_id="p",
                                   checkpoints_count=0, status={"type": "active"})
    assert isinstance(summary.status, types.SessionActive)
    assert types.CopyWeightsResponse(tinker_path="tinker://r/weights/a").tinker_path.endswith("/a")
    usage = types.CurrentCheckpointStorageUsageResponse(
        data=[types.CurrentCheckpointStorageUsageItem(checkpoint_count=1, size_bytes=10, size_gigabytes=1e-8)])
    assert usage.effective_rate_usd_per_gigabyte_month is None
    billing = types.BillingUsageResponse(data=[{
        "bucket_start": "2026-01-01T00:00:00Z", "bucket_end": "2026-01-01T01:00:00Z",
        "event_info": {"type": "training", "token_count": 5}}])
    assert isinstance(billing.data[0].event_info, types.TrainingBillingEvent)
    assert set(types.SamplingClientKind.__args__) == {"snapshot", "inflight"}
    assert pickle.loads(pickle.dumps(request)) == request


def test_exceptions_take_the_sdks_positional_arguments():
    # the SDK's constructors, as a test double raises them: (message, response, body), (request, message), ...
    request = SimpleNamespace(method="POST", url="http://tinker/api")
    response = SimpleNamespace(status_code=400, request=request)
    e = tinker.BadRequestError("bad", response, {"detail": "x"})
    assert (e.message, e.response, e.body, e.request, e.status_code) == ("bad", response, {"detail": "x"}, request, 400)
    e = tinker.InternalServerError("boom", SimpleNamespace(status_code=503, request=request), None)
    assert e.status_code == 503 and isinstance(e, tinker.APIStatusError)
    assert tinker.APIStatusError("m", None, None).status_code == 0
    e = tinker.APIConnectionError(request, "no route")
    assert (e.request, e.message) == (request, "no route")
    assert tinker.APIConnectionError(request).message == "Connection error."
    assert tinker.APITimeoutError(request).request is request
    e = tinker.APIResponseValidationError(response, None, "schema")
    assert (e.message, e.response, e.status_code) == ("schema", response, 400)
    # the keyword forms keep working
    assert tinker.BadRequestError("m", response=None, body=None).status_code == 400
    assert tinker.APIConnectionError(message="m", request=None).message == "m"


def test_retry_config_is_the_sdks():
    # reachable after `import tinker` alone, as in the SDK; mutable, with the SDK's defaults and check
    config = tinker.lib.retry_handler.RetryConfig()
    assert (config.max_connections, config.progress_timeout, config.retry_delay_base) == (1000, 7200, 0.5)
    assert tinker.APIConnectionError in config.retryable_exceptions
    from tinker.lib.retryable_exception import RetryableException

    assert RetryableException in config.retryable_exceptions
    config.max_connections = None
    assert hash(config) == hash(tinker.lib.retry_handler.RetryConfig(max_connections=None))
    with pytest.raises(ValueError, match="max_connections must be positive"):
        tinker.lib.retry_handler.RetryConfig(max_connections=0)


def test_the_sdks_per_type_module_paths():
    from tinker.types.get_info_response import GetInfoResponse, ModelData
    from tinker.types.optimizer import AdamOptimizerConfig
    from tinker.types.sampled_sequence import SampledSequence
    from tinker.types.sampling_params import SamplingParams
    from tinker.types.tensor_data import TensorData  # a module here as well (the cookbook's rl_loop imports it)

    assert (GetInfoResponse, ModelData, AdamOptimizerConfig) == (
        types.GetInfoResponse, types.ModelData, types.AdamOptimizerConfig)
    assert (SampledSequence, SamplingParams, TensorData) == (types.SampledSequence, types.SamplingParams,
                                                             types.TensorData)
    assert types.stop_reason.StopReason is types.StopReason
    import tinker.types.provenance_spans as spans

    assert spans.PromptProvenanceSpan is tinker.PromptProvenanceSpan
    import importlib.util

    assert importlib.util.find_spec("tinker.types.audit_log_response").name == "tinker.types.audit_log_response"
