"""ServiceClient: the entry point. It creates training and sampling clients on local base models.

Tinker's service arguments (api_key, base_url, default_headers_overrides) are accepted and have no
effect: everything runs in this process and needs no key. All clients on one base model share one
loaded copy of it.

The client factories return at once with a future of the client, which also works as the client
itself (0.38; see tinker._futures.ClientFuture). The work (loading the model, reading a checkpoint)
runs on a worker thread, so awaiting the future does not block an event loop, and what fails there
(an unknown model, a missing checkpoint) is raised by `.result()` / `await`, as the service's errors
are. Malformed arguments (no model named, a model_path that is not a tinker:// path) still raise at
the call, as the SDK's own argument checks do.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import uuid
import warnings
from typing import Any, Literal, Mapping

from ... import _checkpoints as ckpt
from ... import _deprecation as deprecation
from ..._engine import device_description, get_engine, load_model, optional_str_arg, string_map_arg
from ..._exceptions import BadRequestError, InvalidArgumentError
from ..._futures import APIFuture, DoneFuture, background_work_done, in_background
from ..._models import available_models
from ..._restore import saved_config
from ..._training import LoraAdapter
from ...types import AdamOptimizerConfig, GetServerCapabilitiesResponse, OptimizerConfigBase, SupportedModel
from .custom_loss import LossHandle, make_handle
from .sampling_client import BackcompatSamplingClientFuture, SamplingClient, check_model_path
from .training_client import BackcompatTrainingClientFuture, TrainingClient

SessionFinish = Literal["success", "errored", "interrupted"]

# Session id -> how its ServiceClient was closed, for this process's sessions (search_sessions
# reports them as active until closed).
session_status: dict[str, SessionFinish | None] = {}


def server_capabilities() -> GetServerCapabilitiesResponse:
    """The base models that load here (no downloads), with their context lengths: all of them can be
    trained and sampled; supports_images marks the vision-language ones (Qwen3-VL), is_moe the mixtures of
    experts; device, the device the engine runs them on."""
    models = [SupportedModel(model_name=m.name, max_context_length=m.max_context, trainable=True, sampleable=True,
                             supports_images=m.images, is_moe=m.moe)
              for m in available_models()]  # fmt: skip
    return GetServerCapabilitiesResponse(supported_models=models, device=device_description(get_engine()))


class ServiceClient:
    """Creates TrainingClients and SamplingClients. `ServiceClient()` needs no arguments; use it as
    a context manager (`with tinker.ServiceClient() as sc:`) or call `close()` when done."""

    def __init__(self, user_metadata: dict[str, str] | None = None, project_id: str | None = None, *,
                 display_name: str | None = None, base_url: str | None = None, api_key: str | None = None,
                 default_headers_overrides: Mapping[str, str] | None = None, **kwargs: Any):
        if kwargs:
            warnings.warn(deprecation.unknown_service_arguments(kwargs), FutureWarning, stacklevel=2)
        self.user_metadata = string_map_arg("user_metadata", user_metadata) or {}
        project_id = optional_str_arg("project_id", project_id)
        self.project_id = project_id if project_id is not None else (os.environ.get("TINKER_PROJECT_ID") or None)
        self.display_name = optional_str_arg("display_name", display_name)
        self.session_id = str(uuid.uuid4())
        self._training_ids = itertools.count()
        self._closed = False
        self._lock = threading.Lock()
        session_status[self.session_id] = None

    def __repr__(self) -> str:
        return f"ServiceClient(session_id={self.session_id!r})"

    # ---- session lifetime ----------------------------------------------------------------

    def __enter__(self) -> "ServiceClient":
        self._check_open()
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        if exc_type is None:
            status = "success"
        elif issubclass(exc_type, Exception):
            status = "errored"
        else:  # KeyboardInterrupt, SystemExit
            status = "interrupted"
        self.close(status).result()

    def close(self, status: SessionFinish = "success", detail: str | None = None) -> APIFuture[None]:
        """Finishes the session: no new clients can be created from it. The future completes once
        the checkpoints queued so far are written. Clients made earlier keep working (they hold
        nothing the session owns here). Closing twice is harmless."""
        with self._lock:
            if not self._closed:
                self._closed = True
                session_status[self.session_id] = status
        return background_work_done()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("ServiceClient is closed")

    def get_console_url(self) -> str:
        """Where this machine's runs and checkpoints are: a file:// URL of the local store's runs
        directory (there is no web console)."""
        return (ckpt.store_root() / "runs").as_uri()

    # ---- capabilities ------------------------------------------------------------------

    @deprecation.GET_SERVER_CAPABILITIES
    def get_server_capabilities(self) -> GetServerCapabilitiesResponse:
        """The base models that load here (no downloads), with their context lengths."""
        return server_capabilities()

    @deprecation.GET_SERVER_CAPABILITIES_ASYNC
    async def get_server_capabilities_async(self) -> GetServerCapabilitiesResponse:
        return await asyncio.to_thread(server_capabilities)

    # ---- training ----------------------------------------------------------------------

    def _new_training_client(self, seq_id: int, base_model: str, rank, seed, train_mlp, train_attn, train_unembed,
                             user_metadata, optimizer) -> TrainingClient:
        user_metadata = string_map_arg("user_metadata", user_metadata)
        model = load_model(base_model)
        adapter = LoraAdapter(model, rank=rank, seed=seed, train_mlp=train_mlp, train_attn=train_attn,
                              train_unembed=train_unembed)
        return TrainingClient(self, seq_id, f"{self.session_id}:train:{seq_id}", adapter=adapter,
                              base_model=base_model, user_metadata={**self.user_metadata, **(user_metadata or {})},
                              optimizer=optimizer)

    def create_lora_training_client(self, base_model: str, rank: int = 32, seed: int | None = None,
                                    train_mlp: bool = True, train_attn: bool = True, train_unembed: bool = True,
                                    user_metadata: dict[str, str] | None = None, optimizer=None
                                    ) -> BackcompatTrainingClientFuture:
        """A future of a TrainingClient for a new LoRA adapter (alpha 32; A random from `seed`, B zero)
        on `base_model`, which is loaded on first use: `.result()` or `await` it. `optimizer` (fixed for
        the client's life): AdamOptimizerConfig(), the default."""
        self._check_open()
        optimizer = _check_optimizer(optimizer)
        if not (train_mlp or train_attn or train_unembed):
            raise BadRequestError("at least one of train_mlp, train_attn, train_unembed must be True")
        seq_id = next(self._training_ids)  # ids in call order, whatever order the loads finish in
        return BackcompatTrainingClientFuture(in_background(
            self._new_training_client, seq_id, base_model, rank, seed, train_mlp, train_attn, train_unembed,
            user_metadata, optimizer))

    @deprecation.client_factory_twin("ServiceClient", "create_lora_training_client")
    async def create_lora_training_client_async(self, base_model: str, rank: int = 32, seed: int | None = None,
                                                train_mlp: bool = True, train_attn: bool = True,
                                                train_unembed: bool = True,
                                                user_metadata: dict[str, str] | None = None,
                                                optimizer=None) -> TrainingClient:
        return await self.create_lora_training_client(base_model, rank, seed, train_mlp, train_attn, train_unembed,
                                                      user_metadata, optimizer)

    # ---- sampling ----------------------------------------------------------------------

    def create_sampling_client(self, model_path: str | None = None, base_model: str | None = None,
                               retry_config=None, record_stability_info: bool = False
                               ) -> BackcompatSamplingClientFuture:
        """A future of a sampler on `base_model`'s own weights, or on the weights saved at a
        tinker:// `model_path`: `.result()` or `await` it."""
        self._check_open()
        if model_path is None and base_model is None:
            raise InvalidArgumentError("Either model_path or base_model must be provided")
        if model_path is not None:
            check_model_path(model_path)
            return BackcompatSamplingClientFuture(in_background(
                lambda: SamplingClient._for_path(self, model_path)._recording(record_stability_info)))
        return BackcompatSamplingClientFuture(in_background(
            lambda: SamplingClient._for_base(self, base_model)._recording(record_stability_info)))

    @deprecation.client_factory_twin("ServiceClient", "create_sampling_client")
    async def create_sampling_client_async(self, model_path: str | None = None, base_model: str | None = None,
                                           retry_config=None, record_stability_info: bool = False) -> SamplingClient:
        return await self.create_sampling_client(model_path, base_model, retry_config, record_stability_info)

    # ---- custom losses -----------------------------------------------------------------

    def create_custom_loss(self, fn, input_ranks) -> "APIFuture[LossHandle]":
        """A LossHandle for TrainingClient.forward_backward_custom. `fn(logprobs, *inputs)` runs once per
        datum (the losses are summed): `logprobs` are the datum's target logprobs, the other parameters
        the loss_fn_inputs keys of the same names; it returns (scalar loss, {"custom/<name>:sum" or
        ":mean": scalar}). `input_ranks` gives each parameter's rank (0 scalar, 1 [T], 2 [T, K]).
        Here the loss always runs in this process."""
        try:
            return DoneFuture(make_handle(fn, input_ranks, self.session_id))
        except (TypeError, ValueError) as e:
            return DoneFuture(error=e)

    # ---- from saved state ----------------------------------------------------------------

    def _from_state(self, seq_id: int, path: str, base_model: str | None, user_metadata,
                    with_optimizer: bool, optimizer=None) -> TrainingClient:
        config = saved_config(path)
        base = base_model or config.base_model
        if base is None:
            raise BadRequestError(f"{path}: the adapter does not name its base model; pass base_model=")
        client = self._new_training_client(seq_id, base, config.rank, None, config.train_mlp, config.train_attn,
                                           config.train_unembed, user_metadata, optimizer)
        client._load(path, with_optimizer).result()
        return client

    def _submit_from_state(self, path, base_model, user_metadata, with_optimizer,
                           optimizer=None) -> BackcompatTrainingClientFuture:
        self._check_open()
        optimizer = _check_optimizer(optimizer)
        seq_id = next(self._training_ids)
        return BackcompatTrainingClientFuture(in_background(self._from_state, seq_id, path, base_model,
                                                            user_metadata, with_optimizer, optimizer))

    def create_training_client_from_state(self, path: str, base_model: str | None = None,
                                          user_metadata: dict[str, str] | None = None,
                                          weights_access_token: str | None = None,
                                          optimizer=None) -> BackcompatTrainingClientFuture:
        """A future of a new training client with the LoRA config and weights saved at `path` (a
        tinker:// path, or a PEFT adapter directory); the optimizer (`optimizer`, AdamW by default)
        starts afresh."""
        return self._submit_from_state(path, base_model, user_metadata, with_optimizer=False, optimizer=optimizer)

    @deprecation.client_factory_twin("ServiceClient", "create_training_client_from_state")
    async def create_training_client_from_state_async(self, path: str, base_model: str | None = None,
                                                      user_metadata: dict[str, str] | None = None,
                                                      weights_access_token: str | None = None,
                                                      optimizer=None) -> TrainingClient:
        return await self._submit_from_state(path, base_model, user_metadata, with_optimizer=False,
                                             optimizer=optimizer)

    def create_training_client_from_state_with_optimizer(self, path: str, base_model: str | None = None,
                                                         user_metadata: dict[str, str] | None = None,
                                                         weights_access_token: str | None = None
                                                         ) -> BackcompatTrainingClientFuture:
        """As create_training_client_from_state, also restoring the Adam moments and step (resuming)."""
        return self._submit_from_state(path, base_model, user_metadata, with_optimizer=True)

    @deprecation.client_factory_twin("ServiceClient", "create_training_client_from_state_with_optimizer")
    async def create_training_client_from_state_with_optimizer_async(
            self, path: str, base_model: str | None = None, user_metadata: dict[str, str] | None = None,
            weights_access_token: str | None = None) -> TrainingClient:
        return await self._submit_from_state(path, base_model, user_metadata, with_optimizer=True)

    # ---- checkpoints -------------------------------------------------------------------------

    def copy_weights(self, path: str, *, ttl_seconds: int | None = None,
                     weights_access_token: str | None = None) -> APIFuture[str]:
        """Copies a checkpoint into a new training run (in a new session) of this client's project;
        the future gives the copy's tinker:// path."""
        from .rest_client import RestClient

        return RestClient(self).copy_weights(path, self.project_id, ttl_seconds=ttl_seconds,
                                             weights_access_token=weights_access_token)

    @deprecation.CREATE_REST_CLIENT
    def create_rest_client(self):
        """A RestClient over the local checkpoint store: list, inspect and delete runs and checkpoints."""
        from .rest_client import RestClient

        return RestClient(self)

    def get_telemetry(self):
        return None


def _check_optimizer(optimizer):
    """AdamOptimizerConfig (the default) runs here; Dimuon's update rule is not public, so it cannot."""
    if optimizer is None:
        return AdamOptimizerConfig()
    if isinstance(optimizer, dict):
        optimizer = OptimizerConfigBase(**optimizer)
    family = getattr(optimizer, "type", None)
    if not isinstance(optimizer, OptimizerConfigBase) or family is None:
        raise BadRequestError(f"optimizer must be an optimizer config such as tinker.AdamOptimizerConfig(), got "
                              f"{optimizer!r}")
    if family == "adamw":
        return AdamOptimizerConfig()
    if family == "dimuon":
        raise BadRequestError(
            "the Dimuon optimizer is not available in this local engine: Tinker's public documentation names its "
            "hyperparameters (learning_rate, beta1, grad_clip_norm) but not its update rule (the matrix-sign "
            "iteration and its iteration count, the normalization epsilon, the row/column preconditioners and "
            "their damping), so it cannot be reproduced; use AdamOptimizerConfig()")
    raise BadRequestError(f"unknown optimizer type {family!r}; this engine has 'adamw' (AdamOptimizerConfig)")


__all__ = ["ServiceClient"]
