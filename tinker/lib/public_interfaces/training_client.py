"""TrainingClient: a LoRA adapter being trained on a base model in this process.

Every training operation returns an APIFuture at once. Its request id is taken at call time, and
the engine runs this client's requests strictly in that order, whether or not earlier futures
were awaited. So `forward_backward` then `optim_step`, submitted back to back, is correct and
overlaps the engine's work with the caller preparing the next batch. The `*_async` twins are
coroutines that return the same future (two awaits: queued, then done).
"""

from __future__ import annotations

from collections.abc import Mapping
import concurrent.futures
import threading
import warnings
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ... import _checkpoints as ckpt
from ... import _deprecation as deprecation
from ... import _restore as restore
from ..._engine import bool_arg, string_map_arg
from ..._exceptions import BadRequestError, InvalidArgumentError, TinkerError
from ..._multimodal import engine_input
from ..._futures import (
    APIFuture, BackgroundFuture, ClientFuture, DoneFuture, EngineFuture, background_future, forward_client_methods,
    in_background,
)
from ..._training import EXP_AVG, EXP_AVG_SQ, PARAMS, LoraAdapter, optim_metrics
from ...types import (
    AdamOptimizerConfig, AdamParams, Datum, DimuonParams, ForwardBackwardOutput, GetInfoResponse,
    LoadWeightsResponse, ModelData, OptimStepResponse, SampledProvenanceSpan, SamplingClientKind,
    SaveWeightsExternalResponse, SaveWeightsForSamplerResponse, SaveWeightsResponse, TensorData,
)  # fmt: skip
from . import custom_loss
from .custom_loss import LossHandle

if TYPE_CHECKING:
    from .sampling_client import BackcompatSamplingClientFuture, SamplingClient
    from .service_client import ServiceClient



def _engine_datum(i: int, datum, model) -> tuple:
    """(token ids, or an EngineInput when it has images; loss_fn_inputs) of one Datum, in the form the engine
    layer packs."""
    if not isinstance(datum, Datum):
        raise BadRequestError(f"datum {i}: expected a tinker.Datum, got {type(datum).__name__}")
    return engine_input(model, datum.model_input, f"datum {i}"), datum.loss_fn_inputs


def _forward_backward_output(result) -> ForwardBackwardOutput:
    outputs = [{"logprobs": TensorData.from_numpy(lp.astype(np.float32, copy=False))} for lp in result.logprobs]
    return ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", loss_fn_outputs=outputs,
                                 metrics=dict(result.metrics))


class TrainingClient:
    """Trains one LoRA adapter. Made by ServiceClient.create_lora_training_client, not directly."""

    def __init__(self, holder: "ServiceClient", model_seq_id: int, model_id: str, *, adapter: LoraAdapter,
                 base_model: str, user_metadata: dict[str, str] | None = None, optimizer=None):
        self.holder = holder
        self._optimizer = optimizer if optimizer is not None else AdamOptimizerConfig()
        # forward_backward_custom queues its backward pass from a worker thread once the user's loss has
        # run; requests made meanwhile wait for it here, so they still run after it (Tinker's order)
        self._turn = threading.Lock()
        self._custom_queued: threading.Event | None = None
        self.model_seq_id = model_seq_id
        self.model_id = model_id
        self._adapter = adapter
        self._base_model = base_model
        self._user_metadata = dict(user_metadata or {})

    def __repr__(self) -> str:
        return f"TrainingClient(model_id={self.model_id!r}, base_model={self._base_model!r}, rank={self._adapter.rank})"

    # ---- forward / backward -----------------------------------------------------------

    def _wait_turn(self) -> None:
        """Waits until a pending forward_backward_custom has queued its backward pass."""
        event = self._custom_queued
        if event is not None:
            event.wait()

    def _submit(self, data, loss_fn, loss_fn_config, backward: bool,
                ordered: bool = True) -> APIFuture[ForwardBackwardOutput]:
        if isinstance(data, (list, tuple)) and not data:
            raise InvalidArgumentError("No data provided")
        if ordered:
            self._wait_turn()
        try:
            _check_containers(data, loss_fn, loss_fn_config)
            if loss_fn == "custom":
                raise BadRequestError("loss_fn 'custom' runs a loss uploaded to Tinker's servers; here pass the "
                                      "LossHandle from create_custom_loss to forward_backward_custom")
            if loss_fn == "stable_reinforce":
                _check_provenance(data)
            model = self._adapter.model
            pending = self._adapter.submit([_engine_datum(i, d, model) for i, d in enumerate(data)], loss_fn,
                                           loss_fn_config, backward=backward, notify=True)
        except BadRequestError as e:  # rejected before queueing: the future carries it, as the service's 400 would
            return DoneFuture(error=e)
        return EngineFuture(pending._request, lambda: _forward_backward_output(pending.result()))

    def forward(self, data: list[Datum], loss_fn: str, loss_fn_config: dict[str, float] | None = None
                ) -> APIFuture[ForwardBackwardOutput]:
        """The loss and per-token logprobs under the current weights; gradients are untouched."""
        return self._submit(data, loss_fn, loss_fn_config, backward=False)

    @deprecation.train_op_twin("forward")
    async def forward_async(self, data: list[Datum], loss_fn: str, loss_fn_config: dict[str, float] | None = None
                            ) -> APIFuture[ForwardBackwardOutput]:
        return self.forward(data, loss_fn, loss_fn_config)

    def forward_backward(self, data: list[Datum], loss_fn: str, loss_fn_config: dict[str, float] | None = None
                         ) -> APIFuture[ForwardBackwardOutput]:
        """The loss (summed over tokens and datums) and its gradients, added to the adapter's."""
        return self._submit(data, loss_fn, loss_fn_config, backward=True)

    @deprecation.train_op_twin("forward_backward")
    async def forward_backward_async(self, data: list[Datum], loss_fn: str,
                                     loss_fn_config: dict[str, float] | None = None
                                     ) -> APIFuture[ForwardBackwardOutput]:
        return self.forward_backward(data, loss_fn, loss_fn_config)

    # ---- custom losses (Tinker's client-side two-pass recipe) --------------------------

    def _custom_forward_data(self, data) -> list[Datum]:
        """The first pass's datums: target_tokens and weights (zeros when absent), provenance kept."""
        if not data:
            raise InvalidArgumentError("No data provided")
        prepared = []
        for i, datum in enumerate(data):
            if not isinstance(datum, Datum):
                raise InvalidArgumentError(f"datum {i}: expected a tinker.Datum, got {type(datum).__name__}")
            targets = datum.loss_fn_inputs.get("target_tokens")
            if targets is None:
                raise InvalidArgumentError(f"datum {i}: forward_backward_custom needs loss_fn_inputs['target_tokens']")
            weights = datum.loss_fn_inputs.get("weights")
            if weights is None:
                weights = TensorData.from_numpy(np.zeros(targets.to_numpy().shape, dtype=np.float32))
            prepared.append(Datum(model_input=datum.model_input,
                                  loss_fn_inputs={"target_tokens": targets, "weights": weights}))
        return prepared

    def _custom_backward(self, data, prepared, forward: APIFuture[ForwardBackwardOutput], loss_fn
                         ) -> APIFuture[ForwardBackwardOutput]:
        """Runs the user's loss on the first pass's logprobs in torch, then queues a linear
        cross-entropy pass whose weights are minus its gradient, so the adapter gets exactly
        d(loss)/d(params). Returns the future of that pass's output."""
        import torch

        output = forward.result()
        logprobs = [torch.tensor(out["logprobs"].to_numpy(), dtype=torch.float32).requires_grad_()
                    for out in output.loss_fn_outputs]
        if isinstance(loss_fn, LossHandle):
            loss, user_metrics = custom_loss.run_handle(loss_fn, data, logprobs)
        else:
            loss, user_metrics = loss_fn(data, logprobs)
        if not isinstance(loss, torch.Tensor):
            raise ValueError(f"the custom loss must return (a torch tensor, metrics), got {type(loss).__name__}")
        loss_sum = float(loss.detach().sum())
        if not np.isfinite(loss_sum):
            raise BadRequestError(f"the custom loss is {loss_sum}; it must be finite (nothing was applied: the "
                                  f"adapter's accumulated gradients are unchanged)")
        if not loss.requires_grad:
            raise ValueError("the custom loss does not depend on the logprobs (no gradient to apply)")
        loss.backward()
        linear = []
        for i, (datum, lp) in enumerate(zip(prepared, logprobs)):
            if lp.grad is None:
                raise ValueError(f"the custom loss does not depend on the logprobs of datum {i} (no gradient)")
            grad = lp.grad.detach().numpy().astype(np.float32)
            if not np.all(np.isfinite(grad)):
                raise BadRequestError(f"the custom loss's gradient with respect to datum {i}'s logprobs is not finite "
                                      f"in float32 (largest |value| {float(np.max(np.abs(lp.grad.detach().numpy())))}); "
                                      f"nothing was applied: the adapter's accumulated gradients are unchanged")
            weights = TensorData.from_numpy(-grad)
            linear.append(Datum(model_input=datum.model_input,
                                loss_fn_inputs={"target_tokens": datum.loss_fn_inputs["target_tokens"],
                                                "weights": weights}))
        backward = self._submit(linear, "cross_entropy", None, backward=True, ordered=False)
        metrics = {k: float(v) for k, v in dict(user_metrics or {}).items()}
        return _CustomOutput(backward, loss_sum, metrics)

    def forward_backward_custom(self, data: list[Datum], loss_fn: "Callable[[list[Datum], list[Any]], tuple[Any, dict]] | LossHandle",
                                *, loss_type_input: str | None = None) -> APIFuture[ForwardBackwardOutput]:
        """Any differentiable loss of the per-token logprobs. `loss_fn(data, logprobs) -> (loss, metrics)`
        gets the data as given (every loss_fn_inputs key) and one logprobs tensor per datum, shaped
        like its target_tokens; or pass a LossHandle from ServiceClient.create_custom_loss.

        Returns at once. The forward pass is queued now; the loss runs in torch on a worker thread when
        it finishes, and the backward pass is queued after it: requests made meanwhile wait for that
        and run after it. `metrics["loss:sum"]` is the custom loss, `surrogate_loss:sum` the linear
        pass's, plus the loss's own metrics."""
        _check_loss_type_input(loss_type_input)
        try:
            import torch  # noqa: F401
        except ImportError as e:
            raise ImportError("forward_backward_custom needs torch: pip install torch") from e
        if isinstance(loss_fn, LossHandle):
            if loss_fn.session_id != self.holder.session_id:
                raise ValueError(f"LossHandle {loss_fn.name!r} was created in session {loss_fn.session_id}; it can "
                                 f"only be used by clients of that session")
            custom_loss.check_inputs(loss_fn, data)
        elif not callable(loss_fn):
            raise TypeError(f"loss_fn must be a function or a LossHandle, got {type(loss_fn).__name__}")
        try:
            _check_containers(data, "custom", None)
        except BadRequestError as e:  # as forward_backward delivers it
            return DoneFuture(error=e)
        prepared = self._custom_forward_data(data)
        with self._turn:
            self._wait_turn()
            forward = self._submit(prepared, "cross_entropy", None, backward=False, ordered=False)
            queued = threading.Event()
            self._custom_queued = queued
        result: concurrent.futures.Future = concurrent.futures.Future()
        result.set_running_or_notify_cancel()

        def run():
            try:
                backward = self._custom_backward(data, prepared, forward, loss_fn)
            except BaseException as e:  # noqa: BLE001 - delivered through the future
                queued.set()
                result.set_exception(e)
                return
            queued.set()
            try:
                result.set_result(backward.result())
            except BaseException as e:  # noqa: BLE001
                result.set_exception(e)

        threading.Thread(target=run, name="tinker-custom-loss", daemon=True).start()
        return BackgroundFuture(result)

    @deprecation.train_op_twin("forward_backward_custom")
    async def forward_backward_custom_async(self, data: list[Datum], loss_fn: Callable, *,
                                            loss_type_input: str | None = None) -> APIFuture[ForwardBackwardOutput]:
        return self.forward_backward_custom(data, loss_fn, loss_type_input=loss_type_input)

    # ---- optimizer -------------------------------------------------------------------

    def optim_step(self, optim_params: "AdamParams | DimuonParams | None" = None, *,
                   adam_params: AdamParams | None = None) -> APIFuture[OptimStepResponse]:
        """One optimizer step with the gradients accumulated since the last step, which it then clears.
        Takes the params of the client's optimizer (AdamParams for AdamW, the default), positionally or
        as `optim_params=` (or the older `adam_params=`)."""
        if optim_params is not None and adam_params is not None:
            raise ValueError("optim_step takes optim_params or adam_params, not both")
        params = optim_params if optim_params is not None else adam_params
        if params is None:
            raise TypeError("optim_step() missing its params: pass tinker.AdamParams(learning_rate=...) (or "
                            "DimuonParams for a Dimuon client)")
        self._wait_turn()
        optimizer = getattr(self._optimizer, "type", "adamw")
        if not isinstance(params, AdamParams):
            family = getattr(params, "type", type(params).__name__)
            return DoneFuture(error=BadRequestError(
                f"optim_step got {type(params).__name__} ({family!r}), but this client's optimizer is {optimizer!r}: "
                f"pass tinker.AdamParams (the optimizer is chosen at create_lora_training_client(optimizer=...))"))
        try:
            request = self._adapter.submit_optim_step(params.learning_rate, params.beta1, params.beta2, params.eps,
                                                      params.weight_decay, params.grad_clip_norm, notify=True)
        except BadRequestError as e:
            return DoneFuture(error=e)
        return EngineFuture(request, lambda: OptimStepResponse(metrics=optim_metrics(request, params.learning_rate)))

    @deprecation.train_op_twin("optim_step")
    async def optim_step_async(self, optim_params: "AdamParams | DimuonParams | None" = None, *,
                               adam_params: AdamParams | None = None) -> APIFuture[OptimStepResponse]:
        return self.optim_step(optim_params, adam_params=adam_params)

    # ---- sampling from the trained weights ---------------------------------------------

    def _sampling_client(self, snapshot) -> "SamplingClient":
        from .sampling_client import SamplingClient

        return SamplingClient._for_snapshot(self.holder, self._base_model, self._adapter, snapshot)

    def save_weights_and_get_sampling_client(self, name: str | None = None, retry_config=None,
                                             record_stability_info: bool = False,
                                             kind: SamplingClientKind = "snapshot"
                                             ) -> "BackcompatSamplingClientFuture":
        """A future of a SamplingClient on a frozen copy of the weights as of this call's place in
        the queue (`.result()` or `await` it; it also works as the client). `kind="inflight"` is
        accepted: Tinker guarantees those weights or newer, and a snapshot taken here is exactly those
        weights."""
        from .sampling_client import BackcompatSamplingClientFuture

        _warn_name(name)
        _check_kind(kind)
        self._wait_turn()
        try:
            request = self._adapter.submit_snapshot(notify=True)
        except BadRequestError as e:
            return BackcompatSamplingClientFuture(DoneFuture(error=e))
        return BackcompatSamplingClientFuture(EngineFuture(
            request, lambda: self._sampling_client(request.result())._recording(record_stability_info)))

    @deprecation.client_factory_twin("TrainingClient", "save_weights_and_get_sampling_client")
    async def save_weights_and_get_sampling_client_async(self, name: str | None = None, retry_config=None,
                                                         record_stability_info: bool = False,
                                                         kind: SamplingClientKind = "snapshot") -> "SamplingClient":
        _warn_name(name)
        return await self.save_weights_and_get_sampling_client(None, retry_config, record_stability_info, kind)

    # ---- checkpoints ---------------------------------------------------------------------

    def _run_record(self) -> dict:
        a = self._adapter
        return {"training_run_id": self.model_id, "base_model": self._base_model, "model_owner": "local",
                "is_lora": True, "lora_rank": a.rank, "train_attn": a.train_attn, "train_mlp": a.train_mlp,
                "train_unembed": a.train_unembed, "seed": a.seed, "user_metadata": self._user_metadata,
                "optimizer_config": self._optimizer.model_dump(),
                # what RestClient.get_session / search_sessions report about the session
                "session_display_name": getattr(self.holder, "display_name", None),
                "session_user_metadata": getattr(self.holder, "user_metadata", None),
                "project_id": getattr(self.holder, "project_id", None)}

    def _save(self, kind: str, name: str, ttl_seconds, overwrite: bool, response_type, user_metadata=None,
              encrypt=None):
        self._wait_turn()
        try:
            # the arguments first, then the store (fail now, before queueing)
            ttl = ckpt.check_ttl(ttl_seconds)
            metadata = string_map_arg("user_metadata", user_metadata)
            overwrite = bool_arg("overwrite", overwrite)
            ckpt.save_destination(self.model_id, kind, name, overwrite)
        except ValueError as e:
            return DoneFuture(error=BadRequestError(str(e)))
        except TinkerError as e:
            return DoneFuture(error=e)
        with_optimizer = kind == "weights"
        request = self._adapter.submit_read(PARAMS | (EXP_AVG | EXP_AVG_SQ if with_optimizer else 0), notify=True)
        run, arch = self._run_record(), self._adapter.model.spec.arch

        def write():
            params, moments, step = self._adapter.unpack_read(request, with_optimizer)
            path = ckpt.save_checkpoint(run, kind, name, params, step, moments, ttl, overwrite, arch=arch,
                                        user_metadata=metadata, encrypt=encrypt)
            return response_type(path=path)

        return background_future(request, write)

    def save_state(self, name: str, ttl_seconds: int | None = None, overwrite: bool = False,
                   user_metadata: dict[str, str] | None = None) -> APIFuture[SaveWeightsResponse]:
        """Saves the adapter, its Adam moments and step at this call's place in the queue:
        tinker://<model_id>/weights/<name>. Written even if the future is never read; `user_metadata`
        is listed back in the Checkpoint records."""
        return self._save("weights", name, ttl_seconds, overwrite, SaveWeightsResponse, user_metadata)

    @deprecation.save_twin("TrainingClient", "save_state")
    async def save_state_async(self, name: str, ttl_seconds: int | None = None, overwrite: bool = False,
                               user_metadata: dict[str, str] | None = None) -> APIFuture[SaveWeightsResponse]:
        return self.save_state(name, ttl_seconds, overwrite, user_metadata)

    def save_weights_for_sampler(self, name: str, ttl_seconds: int | None = None,
                                 user_metadata: dict[str, str] | None = None
                                 ) -> APIFuture[SaveWeightsForSamplerResponse]:
        """Saves the adapter alone (a PEFT adapter directory): tinker://<model_id>/sampler_weights/<name>.
        Saving under an existing name replaces it."""
        return self._save("sampler_weights", name, ttl_seconds, True, SaveWeightsForSamplerResponse, user_metadata)

    @deprecation.save_twin("TrainingClient", "save_weights_for_sampler")
    async def save_weights_for_sampler_async(self, name: str, ttl_seconds: int | None = None,
                                             user_metadata: dict[str, str] | None = None
                                             ) -> APIFuture[SaveWeightsForSamplerResponse]:
        return self.save_weights_for_sampler(name, ttl_seconds, user_metadata)

    def save_weights_external(self, name: str, ttl_seconds: int | None = None,
                              age_encryption_recipients: list[str] | None = None
                              ) -> APIFuture[SaveWeightsExternalResponse]:
        """Saves the adapter for use outside Tinker (a PEFT adapter directory):
        tinker://<model_id>/external_weights/<name>; RestClient.get_external_weights_urls lists its files.
        With `age_encryption_recipients` (age public keys, "age1..."), every file is age-encrypted to
        them and named `<file>.age`. Saving under an existing name replaces it."""
        try:
            encrypt = _age_encryptor(age_encryption_recipients)
        except BadRequestError as e:
            return DoneFuture(error=e)
        return self._save("external_weights", name, ttl_seconds, True, SaveWeightsExternalResponse, encrypt=encrypt)

    @deprecation.save_twin("TrainingClient", "save_weights_external")
    async def save_weights_external_async(self, name: str, ttl_seconds: int | None = None,
                                          age_encryption_recipients: list[str] | None = None
                                          ) -> APIFuture[SaveWeightsExternalResponse]:
        return self.save_weights_external(name, ttl_seconds, age_encryption_recipients)

    def _load(self, path: str, with_optimizer: bool) -> APIFuture[LoadWeightsResponse]:
        self._wait_turn()
        try:
            state = restore.adapter_state(self._adapter, path, with_optimizer)
        except ValueError as e:
            return DoneFuture(error=BadRequestError(str(e)))
        except TinkerError as e:
            return DoneFuture(error=e)
        request = self._adapter.submit_write_all(*state, notify=True)
        return EngineFuture(request, lambda: LoadWeightsResponse(path=path, model_id=self.model_id))

    @deprecation.LOAD_STATE
    def load_state(self, path: str, weights_access_token: str | None = None) -> APIFuture[LoadWeightsResponse]:
        """Loads the weights saved at `path` (a tinker:// path, or a PEFT adapter directory), at this
        call's place in the queue. The optimizer starts afresh: zero moments, step 0, no gradients."""
        return self._load(path, with_optimizer=False)

    @deprecation.LOAD_STATE
    async def load_state_async(self, path: str, weights_access_token: str | None = None
                               ) -> APIFuture[LoadWeightsResponse]:
        return self._load(path, with_optimizer=False)

    @deprecation.LOAD_STATE
    def load_state_with_optimizer(self, path: str, weights_access_token: str | None = None
                                  ) -> APIFuture[LoadWeightsResponse]:
        """Loads the weights and the Adam moments and step saved by save_state at `path`."""
        return self._load(path, with_optimizer=True)

    @deprecation.LOAD_STATE
    async def load_state_with_optimizer_async(self, path: str, weights_access_token: str | None = None
                                              ) -> APIFuture[LoadWeightsResponse]:
        return self._load(path, with_optimizer=True)

    def create_sampling_client(self, model_path: str, retry_config=None,
                               record_stability_info: bool = False) -> "BackcompatSamplingClientFuture":
        """A future of a SamplingClient on the weights saved at `model_path` (a tinker:// path or a
        PEFT adapter directory); a missing or unreadable checkpoint is the future's error."""
        from .sampling_client import BackcompatSamplingClientFuture, SamplingClient

        return BackcompatSamplingClientFuture(in_background(
            lambda: SamplingClient._for_path(self.holder, model_path)._recording(record_stability_info)))

    @deprecation.client_factory_twin("TrainingClient", "create_sampling_client")
    async def create_sampling_client_async(self, model_path: str, retry_config=None,
                                           record_stability_info: bool = False) -> "SamplingClient":
        return await self.create_sampling_client(model_path, retry_config, record_stability_info)

    # ---- information -------------------------------------------------------------------

    def get_info(self) -> GetInfoResponse:
        model = self._adapter.model
        return GetInfoResponse(
            model_data=ModelData(arch=model.spec.arch, model_name=self._base_model, tokenizer_id=self._base_model),
            model_id=self.model_id, is_lora=True, lora_rank=self._adapter.rank, model_name=self._base_model,
            optimizer_config=self._optimizer)

    @deprecation.local_answer_twin("TrainingClient", "get_info")
    async def get_info_async(self) -> GetInfoResponse:
        return self.get_info()

    def get_tokenizer(self):
        """The base model's tokenizer (a transformers PreTrainedTokenizerFast)."""
        return self._adapter.model.tokenizer

    def get_console_url(self) -> str:
        """Where this run's checkpoints are: a file:// URL of its directory in the local store (there
        is no web console; the directory appears with the first save)."""
        return ckpt.run_dir(self.model_id).as_uri()

    def get_telemetry(self):
        return None


class _CustomOutput(APIFuture[ForwardBackwardOutput]):
    """The linear pass of forward_backward_custom, reported as the custom loss: its `loss:sum` becomes
    `surrogate_loss:sum`, `loss:sum` the custom loss, and the loss's own metrics are merged in."""

    def __init__(self, inner: APIFuture[ForwardBackwardOutput], loss_sum: float, metrics: dict[str, float]):
        self._inner = inner
        self._loss_sum = loss_sum
        self._metrics = metrics

    def _merge(self, output: ForwardBackwardOutput) -> ForwardBackwardOutput:
        metrics = dict(output.metrics)
        metrics["surrogate_loss:sum"] = metrics.pop("loss:sum", 0.0)
        metrics.update(self._metrics)
        metrics["loss:sum"] = self._loss_sum
        return ForwardBackwardOutput(loss_fn_output_type=output.loss_fn_output_type,
                                     loss_fn_outputs=output.loss_fn_outputs, metrics=metrics)

    def result(self, timeout: float | None = None) -> ForwardBackwardOutput:
        return self._merge(self._inner.result(timeout))

    async def result_async(self, timeout: float | None = None) -> ForwardBackwardOutput:
        return self._merge(await self._inner.result_async(timeout))


def _check_loss_type_input(loss_type_input: str | None) -> None:
    """Deprecated in 0.38 (the SDK's words): the loss always receives logprobs."""
    if loss_type_input is None:
        return
    warnings.warn("The 'loss_type_input' parameter of forward_backward_custom() is deprecated: the loss always "
                  "receives logprobs. This parameter will be removed in a future release; remove it from your call.",
                  DeprecationWarning, stacklevel=3)
    if loss_type_input != "logprobs":
        raise ValueError(f"Unsupported loss_type_input={loss_type_input!r}. Supported values are: logprobs")


def _check_containers(data, loss_fn, loss_fn_config) -> None:
    """The call's arguments are of the kinds Tinker takes, before anything looks inside them."""
    if not isinstance(data, (list, tuple)):
        raise BadRequestError(f"data must be a list of tinker.Datum, got {type(data).__name__}"
                              + (" (wrap a single datum in a list: [datum])" if isinstance(data, Datum) else ""))
    if not isinstance(loss_fn, str):
        raise BadRequestError(f"loss_fn must be a loss name (a str such as 'cross_entropy'), got {loss_fn!r:.100}")
    if loss_fn_config is not None and not isinstance(loss_fn_config, Mapping):
        raise BadRequestError(f"loss_fn_config must be a dict of str to number (or None), got "
                              f"{type(loss_fn_config).__name__} {loss_fn_config!r:.100}")


def _check_provenance(data) -> None:
    """stable_reinforce needs provenance on every datum, and nonzero advantages only on sampled tokens
    (the rows a SampledProvenanceSpan covers)."""
    for i, datum in enumerate(data):
        spans = getattr(datum, "loss_fn_input_spans", None)
        if spans is None:
            raise BadRequestError(f"datum {i}: loss_fn='stable_reinforce' needs provenance on every datum: sample with "
                                  f"record_stability_info=True and attach the sequence_ids with "
                                  f"Datum.with_provenance(...)")
        advantages = datum.loss_fn_inputs.get("advantages")
        if advantages is None:
            continue
        values = advantages.to_numpy()
        sampled = np.zeros(values.shape[0], dtype=bool)
        at = 0
        for span in spans:
            if isinstance(span, SampledProvenanceSpan):
                sampled[at:at + span.length] = True
            at += span.length
        if at != values.shape[0]:
            raise BadRequestError(f"datum {i}: loss_fn_input_spans cover {at} rows, but its loss_fn_inputs have "
                                  f"{values.shape[0]}")
        outside = np.flatnonzero(~sampled & np.any(values.reshape(values.shape[0], -1) != 0, axis=1))
        if outside.size:
            raise BadRequestError(f"datum {i}: advantages[{int(outside[0])}] is nonzero, but that row is not a "
                                  f"sampled token (stable_reinforce trains sampled tokens only)")


def _check_kind(kind: str) -> None:
    if kind not in ("snapshot", "inflight"):
        raise InvalidArgumentError(f"kind must be 'snapshot' or 'inflight', got {kind!r}")


def _age_encryptor(recipients):
    """bytes -> age ciphertext for every recipient, or None when there are none."""
    if recipients is None:
        return None
    if isinstance(recipients, str) or not all(isinstance(r, str) for r in recipients) or not recipients:
        raise BadRequestError("age_encryption_recipients must be a non-empty list of age public keys (age1...)")
    try:
        import pyrage
    except ImportError:
        raise BadRequestError("age encryption needs the pyrage package: pip install pyrage") from None
    try:
        keys = [pyrage.x25519.Recipient.from_str(r) for r in recipients]
    except Exception as e:  # noqa: BLE001 - pyrage's RecipientError and friends
        raise BadRequestError(f"age_encryption_recipients: {e} (expected X25519 age public keys, age1...)") from None
    return lambda data: pyrage.encrypt(data, keys)


def _warn_name(name) -> None:
    if name is not None:  # the SDK's words
        warnings.warn("The 'name' parameter of save_weights_and_get_sampling_client() is deprecated and has no effect "
                      "\u2014 checkpoints are always ephemeral. This parameter will be removed in a future release. "
                      "Remove the 'name' argument from your call. If you need a persistent checkpoint, use "
                      "save_weights_for_sampler(name=...) + create_sampling_client(model_path=...) instead.",
                      DeprecationWarning, stacklevel=3)


class BackcompatTrainingClientFuture(ClientFuture[TrainingClient], TrainingClient):
    """What the TrainingClient factories return: a future of the client (`.result()`, `await`) that
    also works as the TrainingClient itself, as the factories' return value did before 0.38 (with
    0.38's FutureWarning: get the client with `.result()` or `await` first)."""


forward_client_methods(BackcompatTrainingClientFuture, TrainingClient, "TrainingClient")


__all__ = ["TrainingClient", "BackcompatTrainingClientFuture"]
