"""TrainingClient: a LoRA adapter being trained on a base model in this process.

Every training operation returns an APIFuture at once. Its request id is taken at call time, and
the engine runs this client's requests strictly in that order, whether or not earlier futures
were awaited. So `forward_backward` then `optim_step`, submitted back to back, is correct and
overlaps the engine's work with the caller preparing the next batch. The `*_async` twins are
coroutines that return the same future (two awaits: queued, then done).
"""

from __future__ import annotations

import asyncio
import warnings
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ... import _checkpoints as ckpt
from ... import _restore as restore
from ..._exceptions import BadRequestError, TinkerError
from ..._futures import APIFuture, ClientFuture, DoneFuture, EngineFuture, background_future, in_background
from ..._training import EXP_AVG, EXP_AVG_SQ, PARAMS, LoraAdapter, optim_metrics
from ...types import (
    AdamParams, Datum, ForwardBackwardOutput, GetInfoResponse, LoadWeightsResponse, ModelData, OptimStepResponse,
    SamplingClientKind, SaveWeightsForSamplerResponse, SaveWeightsResponse, TensorData,
)  # fmt: skip

if TYPE_CHECKING:
    from .sampling_client import BackcompatSamplingClientFuture, SamplingClient
    from .service_client import ServiceClient

_CUSTOM_INPUTS = ("target_tokens", "weights")


def _engine_datum(i: int, datum) -> tuple:
    """(token ids, loss_fn_inputs) of one Datum, in the form the engine layer packs."""
    if not isinstance(datum, Datum):
        raise BadRequestError(f"datum {i}: expected a tinker.Datum, got {type(datum).__name__}")
    try:
        tokens = datum.model_input.to_ints()
    except ValueError as e:
        raise BadRequestError(f"datum {i}: {e}; this model takes text tokens only") from None
    return tokens, datum.loss_fn_inputs


def _forward_backward_output(result) -> ForwardBackwardOutput:
    outputs = [{"logprobs": TensorData.from_numpy(lp.astype(np.float32, copy=False))} for lp in result.logprobs]
    return ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", loss_fn_outputs=outputs,
                                 metrics=dict(result.metrics))


class TrainingClient:
    """Trains one LoRA adapter. Made by ServiceClient.create_lora_training_client, not directly."""

    def __init__(self, holder: "ServiceClient", model_seq_id: int, model_id: str, *, adapter: LoraAdapter,
                 base_model: str, user_metadata: dict[str, str] | None = None):
        self.holder = holder
        self.model_seq_id = model_seq_id
        self.model_id = model_id
        self._adapter = adapter
        self._base_model = base_model
        self._user_metadata = dict(user_metadata or {})

    def __repr__(self) -> str:
        return f"TrainingClient(model_id={self.model_id!r}, base_model={self._base_model!r}, rank={self._adapter.rank})"

    # ---- forward / backward -----------------------------------------------------------

    def _submit(self, data, loss_fn, loss_fn_config, backward: bool) -> APIFuture[ForwardBackwardOutput]:
        if not data:
            raise ValueError("No data provided")
        try:
            pending = self._adapter.submit([_engine_datum(i, d) for i, d in enumerate(data)], loss_fn,
                                           loss_fn_config, backward=backward, notify=True)
        except BadRequestError as e:  # rejected before queueing: the future carries it, as the service's 400 would
            return DoneFuture(error=e)
        return EngineFuture(pending._request, lambda: _forward_backward_output(pending.result()))

    def forward(self, data: list[Datum], loss_fn: str, loss_fn_config: dict[str, float] | None = None
                ) -> APIFuture[ForwardBackwardOutput]:
        """The loss and per-token logprobs under the current weights; gradients are untouched."""
        return self._submit(data, loss_fn, loss_fn_config, backward=False)

    async def forward_async(self, data: list[Datum], loss_fn: str, loss_fn_config: dict[str, float] | None = None
                            ) -> APIFuture[ForwardBackwardOutput]:
        return self.forward(data, loss_fn, loss_fn_config)

    def forward_backward(self, data: list[Datum], loss_fn: str, loss_fn_config: dict[str, float] | None = None
                         ) -> APIFuture[ForwardBackwardOutput]:
        """The loss (summed over tokens and datums) and its gradients, added to the adapter's."""
        return self._submit(data, loss_fn, loss_fn_config, backward=True)

    async def forward_backward_async(self, data: list[Datum], loss_fn: str,
                                     loss_fn_config: dict[str, float] | None = None
                                     ) -> APIFuture[ForwardBackwardOutput]:
        return self.forward_backward(data, loss_fn, loss_fn_config)

    # ---- custom losses (Tinker's client-side two-pass recipe) --------------------------

    def _custom_inputs(self, data) -> list[Datum]:
        """The datums for the first pass: target_tokens and weights only (zeros when absent)."""
        if not data:
            raise ValueError("No data provided")
        prepared = []
        for i, datum in enumerate(data):
            keys = set(datum.loss_fn_inputs)
            if "target_tokens" not in keys:
                raise ValueError(f"datum {i}: forward_backward_custom needs loss_fn_inputs['target_tokens']")
            extra = sorted(keys - set(_CUSTOM_INPUTS))
            if extra:
                raise ValueError(f"datum {i}: forward_backward_custom takes only target_tokens and weights in "
                                 f"loss_fn_inputs, got also {', '.join(map(repr, extra))}")
            inputs = dict(datum.loss_fn_inputs)
            if "weights" not in inputs:
                shape = inputs["target_tokens"].to_numpy().shape
                inputs["weights"] = TensorData.from_numpy(np.zeros(shape, dtype=np.float32))
            prepared.append(Datum(model_input=datum.model_input, loss_fn_inputs=inputs))
        return prepared

    def _custom_backward(self, data, forward_output: ForwardBackwardOutput,
                         loss_fn: Callable) -> APIFuture[ForwardBackwardOutput]:
        """Runs the user's loss on the logprobs in torch, then a linear cross-entropy pass whose
        weights are minus its gradient, so the adapter gets exactly d(loss)/d(params)."""
        try:
            import torch
        except ImportError as e:
            raise ImportError("forward_backward_custom needs torch: pip install torch") from e
        logprobs = [torch.tensor(out["logprobs"].to_numpy(), dtype=torch.float32).requires_grad_()
                    for out in forward_output.loss_fn_outputs]
        loss, user_metrics = loss_fn(data, logprobs)
        loss.backward()
        linear = []
        for i, (datum, lp) in enumerate(zip(data, logprobs)):
            if lp.grad is None:
                raise ValueError(f"the custom loss does not depend on the logprobs of datum {i} (no gradient)")
            inputs = dict(datum.loss_fn_inputs)
            inputs["weights"] = TensorData.from_numpy(-lp.grad.detach().numpy().astype(np.float32))
            linear.append(Datum(model_input=datum.model_input, loss_fn_inputs=inputs))
        backward = self.forward_backward(linear, "cross_entropy")
        metrics = {k: float(v) for k, v in dict(user_metrics or {}).items()}
        return _WithMetrics(backward, metrics)

    def forward_backward_custom(self, data: list[Datum], loss_fn: Callable[[list[Datum], list[Any]], tuple[Any, dict]],
                                *, loss_type_input: str = "logprobs") -> APIFuture[ForwardBackwardOutput]:
        """Any differentiable loss of the per-token logprobs: `loss_fn(data, logprobs) -> (loss, metrics)`.
        Blocks through the forward pass, then returns the future of the backward pass."""
        _check_loss_type_input(loss_type_input)
        prepared = self._custom_inputs(data)
        forward_output = self.forward(prepared, "cross_entropy").result()
        return self._custom_backward(prepared, forward_output, loss_fn)

    async def forward_backward_custom_async(self, data: list[Datum], loss_fn: Callable, *,
                                            loss_type_input: str = "logprobs") -> APIFuture[ForwardBackwardOutput]:
        _check_loss_type_input(loss_type_input)
        prepared = self._custom_inputs(data)
        forward_output = await self.forward(prepared, "cross_entropy")
        return self._custom_backward(prepared, forward_output, loss_fn)

    # ---- optimizer -------------------------------------------------------------------

    def optim_step(self, adam_params: AdamParams | None = None, *, optim_params: AdamParams | None = None
                   ) -> APIFuture[OptimStepResponse]:
        """One AdamW step with the gradients accumulated since the last step, which it then clears."""
        params = adam_params if adam_params is not None else optim_params
        if params is None:
            params = AdamParams()
        if not isinstance(params, AdamParams):
            return DoneFuture(error=BadRequestError(f"optim_step takes tinker.AdamParams, got {type(params).__name__}"))
        try:
            request = self._adapter.submit_optim_step(params.learning_rate, params.beta1, params.beta2, params.eps,
                                                      params.weight_decay, params.grad_clip_norm, notify=True)
        except BadRequestError as e:
            return DoneFuture(error=e)
        return EngineFuture(request, lambda: OptimStepResponse(metrics=optim_metrics(request, params.learning_rate)))

    async def optim_step_async(self, adam_params: AdamParams | None = None, *,
                               optim_params: AdamParams | None = None) -> APIFuture[OptimStepResponse]:
        return self.optim_step(adam_params, optim_params=optim_params)

    # ---- sampling from the trained weights ---------------------------------------------

    def _sampling_client(self, snapshot) -> "SamplingClient":
        from .sampling_client import SamplingClient

        return SamplingClient._for_snapshot(self.holder, self._base_model, self._adapter, snapshot)

    def save_weights_and_get_sampling_client(self, name: str | None = None, retry_config=None,
                                             kind: SamplingClientKind = "snapshot"
                                             ) -> "BackcompatSamplingClientFuture":
        """A future of a SamplingClient on a frozen copy of the weights as of this call's place in
        the queue (`.result()` or `await` it; it also works as the client). `kind` "snapshot" only:
        see _check_kind."""
        from .sampling_client import BackcompatSamplingClientFuture

        _warn_name(name)
        try:
            _check_kind(kind)
            request = self._adapter.submit_snapshot(notify=True)
        except BadRequestError as e:
            return BackcompatSamplingClientFuture(DoneFuture(error=e))
        return BackcompatSamplingClientFuture(EngineFuture(request, lambda: self._sampling_client(request.result())))

    async def save_weights_and_get_sampling_client_async(self, name: str | None = None, retry_config=None,
                                                         kind: SamplingClientKind = "snapshot") -> "SamplingClient":
        _warn_name(name)
        return await self.save_weights_and_get_sampling_client(None, retry_config, kind)

    # ---- checkpoints ---------------------------------------------------------------------

    def _run_record(self) -> dict:
        a = self._adapter
        return {"training_run_id": self.model_id, "base_model": self._base_model, "model_owner": "local",
                "is_lora": True, "lora_rank": a.rank, "train_attn": a.train_attn, "train_mlp": a.train_mlp,
                "train_unembed": a.train_unembed, "seed": a.seed, "user_metadata": self._user_metadata,
                # what RestClient.get_session / search_sessions report about the session
                "session_display_name": getattr(self.holder, "display_name", None),
                "session_user_metadata": getattr(self.holder, "user_metadata", None),
                "project_id": getattr(self.holder, "project_id", None)}

    def _save(self, kind: str, name: str, ttl_seconds, overwrite: bool, response_type, user_metadata=None):
        try:
            ckpt.save_destination(self.model_id, kind, name, overwrite)  # fail now, before queueing
            ttl = ckpt.check_ttl(ttl_seconds)
            metadata = _check_metadata(user_metadata)
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
                                        user_metadata=metadata)
            return response_type(path=path)

        return background_future(request, write)

    def save_state(self, name: str, ttl_seconds: int | None = None, overwrite: bool = False,
                   user_metadata: dict[str, str] | None = None) -> APIFuture[SaveWeightsResponse]:
        """Saves the adapter, its Adam moments and step at this call's place in the queue:
        tinker://<model_id>/weights/<name>. Written even if the future is never read; `user_metadata`
        is listed back in the Checkpoint records."""
        return self._save("weights", name, ttl_seconds, overwrite, SaveWeightsResponse, user_metadata)

    async def save_state_async(self, name: str, ttl_seconds: int | None = None, overwrite: bool = False,
                               user_metadata: dict[str, str] | None = None) -> APIFuture[SaveWeightsResponse]:
        return self.save_state(name, ttl_seconds, overwrite, user_metadata)

    def save_weights_for_sampler(self, name: str, ttl_seconds: int | None = None,
                                 user_metadata: dict[str, str] | None = None
                                 ) -> APIFuture[SaveWeightsForSamplerResponse]:
        """Saves the adapter alone (a PEFT adapter directory): tinker://<model_id>/sampler_weights/<name>.
        Saving under an existing name replaces it."""
        return self._save("sampler_weights", name, ttl_seconds, True, SaveWeightsForSamplerResponse, user_metadata)

    async def save_weights_for_sampler_async(self, name: str, ttl_seconds: int | None = None,
                                             user_metadata: dict[str, str] | None = None
                                             ) -> APIFuture[SaveWeightsForSamplerResponse]:
        return self.save_weights_for_sampler(name, ttl_seconds, user_metadata)

    def _load(self, path: str, with_optimizer: bool) -> APIFuture[LoadWeightsResponse]:
        try:
            state = restore.adapter_state(self._adapter, path, with_optimizer)
        except ValueError as e:
            return DoneFuture(error=BadRequestError(str(e)))
        except TinkerError as e:
            return DoneFuture(error=e)
        request = self._adapter.submit_write_all(*state, notify=True)
        return EngineFuture(request, lambda: LoadWeightsResponse(path=path, model_id=self.model_id))

    def load_state(self, path: str, weights_access_token: str | None = None) -> APIFuture[LoadWeightsResponse]:
        """Loads the weights saved at `path` (a tinker:// path, or a PEFT adapter directory), at this
        call's place in the queue. The optimizer starts afresh: zero moments, step 0, no gradients."""
        return self._load(path, with_optimizer=False)

    async def load_state_async(self, path: str, weights_access_token: str | None = None
                               ) -> APIFuture[LoadWeightsResponse]:
        return self.load_state(path)

    def load_state_with_optimizer(self, path: str, weights_access_token: str | None = None
                                  ) -> APIFuture[LoadWeightsResponse]:
        """Loads the weights and the Adam moments and step saved by save_state at `path`."""
        return self._load(path, with_optimizer=True)

    async def load_state_with_optimizer_async(self, path: str, weights_access_token: str | None = None
                                              ) -> APIFuture[LoadWeightsResponse]:
        return self.load_state_with_optimizer(path)

    def create_sampling_client(self, model_path: str, retry_config=None) -> "BackcompatSamplingClientFuture":
        """A future of a SamplingClient on the weights saved at `model_path` (a tinker:// path or a
        PEFT adapter directory); a missing or unreadable checkpoint is the future's error."""
        from .sampling_client import BackcompatSamplingClientFuture, SamplingClient

        return BackcompatSamplingClientFuture(in_background(SamplingClient._for_path, self.holder, model_path))

    async def create_sampling_client_async(self, model_path: str, retry_config=None) -> "SamplingClient":
        return await self.create_sampling_client(model_path, retry_config)

    # ---- information -------------------------------------------------------------------

    def get_info(self) -> GetInfoResponse:
        model = self._adapter.model
        return GetInfoResponse(
            model_data=ModelData(arch=model.spec.arch, model_name=self._base_model, tokenizer_id=self._base_model),
            model_id=self.model_id, is_lora=True, lora_rank=self._adapter.rank, model_name=self._base_model)

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


class _WithMetrics(APIFuture[ForwardBackwardOutput]):
    """A forward_backward future whose output gets the custom loss's metrics merged in."""

    def __init__(self, inner: APIFuture[ForwardBackwardOutput], metrics: dict[str, float]):
        self._inner = inner
        self._metrics = metrics

    def _merge(self, output: ForwardBackwardOutput) -> ForwardBackwardOutput:
        output.metrics.update(self._metrics)
        return output

    def result(self, timeout: float | None = None) -> ForwardBackwardOutput:
        return self._merge(self._inner.result(timeout))

    async def result_async(self, timeout: float | None = None) -> ForwardBackwardOutput:
        return self._merge(await self._inner.result_async(timeout))


def _check_loss_type_input(loss_type_input: str) -> None:
    if loss_type_input != "logprobs":
        raise ValueError(f"loss_type_input must be 'logprobs', got {loss_type_input!r}")


def _check_metadata(user_metadata) -> dict[str, str] | None:
    """A checkpoint's user_metadata: a dict of strings (ValueError otherwise), or None."""
    if user_metadata is None:
        return None
    if not isinstance(user_metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in user_metadata.items()):
        raise ValueError(f"user_metadata must be a dict of str to str, got {user_metadata!r}")
    return dict(user_metadata)


def _check_kind(kind) -> None:
    # "inflight" (weights shared with later saves) needs sampling on weights that change under a
    # live client; the local engine samples frozen snapshots only, so it says so rather than
    # quietly giving a snapshot.
    if kind == "inflight":
        raise BadRequestError('kind="inflight" is not supported by the local engine: use kind="snapshot" (the '
                              'default) and call save_weights_and_get_sampling_client() again for newer weights')
    if kind != "snapshot":
        raise BadRequestError(f'kind must be "snapshot" or "inflight", got {kind!r}')


def _warn_name(name) -> None:
    if name is not None:
        warnings.warn("save_weights_and_get_sampling_client(name=...) is deprecated and ignored: the snapshot is "
                      "ephemeral; use save_weights_for_sampler(name) for a named checkpoint",
                      DeprecationWarning, stacklevel=3)


class BackcompatTrainingClientFuture(ClientFuture[TrainingClient], TrainingClient):
    """What the TrainingClient factories return: a future of the client (`.result()`, `await`) that
    also works as the TrainingClient itself, as the factories' return value did before 0.38."""


__all__ = ["TrainingClient", "BackcompatTrainingClientFuture"]
