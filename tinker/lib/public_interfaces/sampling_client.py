"""SamplingClient: generates from a base model, or from a frozen snapshot of a LoRA adapter.

As in Tinker 0.38, `sample` and `compute_logprobs` return an APIFuture (`.result()`, `await`) that is
also a `concurrent.futures.Future`, as they returned before; their `*_async` twins return the value
after a single await. Requests from many clients and coroutines
on the same model and weights are batched by the engine into shared decode steps.

A SamplingClient pickles, so it can be handed to worker processes. A base-model client pickles as
its model name. A snapshot client pickles as its LoRA config and weights (a few MB), and the copy
in the other process loads the base model and rebuilds the snapshot there.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import numpy as np

from ..._engine import LoadedModel, load_model
from ..._exceptions import BadRequestError
from ..._futures import ClientFuture, ConcurrentAPIFuture, EngineFuture, concurrent_future, failed_concurrent_future
from ..._restore import sampling_adapter
from ..._sampling import PendingSample, submit_sample
from ..._training import LoraAdapter, LoraSnapshot
from ...types import ModelInput, SampledSequence, SampleResponse, SamplingParams

if TYPE_CHECKING:
    from .service_client import ServiceClient

_sampler_ids = itertools.count()


def _prompt_tokens(prompt) -> list[int]:
    if isinstance(prompt, ModelInput):
        try:
            return prompt.to_ints()
        except ValueError as e:
            raise BadRequestError(f"{e}; this model takes text tokens only") from None
    raise BadRequestError(f"prompt must be a tinker.ModelInput (e.g. ModelInput.from_ints(tokens)), got "
                          f"{type(prompt).__name__}")


def _sample_response(pending: PendingSample) -> SampleResponse:
    raw = pending.result()
    sequences = [SampledSequence(stop_reason=s.stop_reason, tokens=s.tokens, logprobs=s.logprobs)
                 for s in raw.sequences]
    return SampleResponse(sequences=sequences, prompt_logprobs=raw.prompt_logprobs,
                          topk_prompt_logprobs=raw.topk_prompt_logprobs)


def _runnable_top_p(top_p: float) -> float:
    """top_p as the engine takes it, in (0, 1]: the SDK accepts any value, and a nucleus of mass
    <= 0 is the most likely token alone (the smallest positive float32 keeps exactly that)."""
    return float(min(max(top_p, float(np.finfo(np.float32).tiny)), 1.0))


class SamplingClient:
    """Samples from one set of weights. Made by ServiceClient.create_sampling_client or
    TrainingClient.save_weights_and_get_sampling_client, not directly."""

    def __init__(self, holder: "ServiceClient | None", *, sampling_session_id: str, base_model: str,
                 model: LoadedModel, snapshot: LoraSnapshot | None = None, lora_config: dict | None = None,
                 model_path: str | None = None):
        self.holder = holder
        self.sampling_session_id = sampling_session_id
        self._base_model = base_model
        self._model = model
        self._snapshot = snapshot
        self._lora_config = lora_config  # rank and train_* flags of the snapshot's adapter
        self._model_path = model_path

    @classmethod
    def _for_base(cls, holder, base_model: str) -> "SamplingClient":
        return cls(holder, sampling_session_id=_new_sampler_id(holder), base_model=base_model,
                   model=load_model(base_model))

    @classmethod
    def _for_snapshot(cls, holder, base_model: str, adapter: LoraAdapter, snapshot_handle,
                      model_path: str | None = None) -> "SamplingClient":
        config = {"rank": adapter.rank, "train_attn": adapter.train_attn, "train_mlp": adapter.train_mlp,
                  "train_unembed": adapter.train_unembed}
        return cls(holder, sampling_session_id=_new_sampler_id(holder), base_model=base_model, model=adapter.model,
                   snapshot=LoraSnapshot(adapter.model, snapshot_handle), lora_config=config, model_path=model_path)

    @classmethod
    def _for_path(cls, holder, model_path: str) -> "SamplingClient":
        """A sampler on weights saved at a tinker:// path (or a PEFT adapter directory)."""
        base_model, adapter = sampling_adapter(model_path)
        return cls._for_snapshot(holder, base_model, adapter, adapter.submit_snapshot().result(), model_path)

    def __repr__(self) -> str:
        weights = "base weights" if self._snapshot is None else f"LoRA rank {self._lora_config['rank']} snapshot"
        return f"SamplingClient(base_model={self._base_model!r}, {weights})"

    # ---- sampling ------------------------------------------------------------------------

    def _submit(self, prompt, num_samples, sampling_params, include_prompt_logprobs, topk_prompt_logprobs,
                max_tokens=None) -> PendingSample:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if not isinstance(sampling_params, SamplingParams):
            raise BadRequestError(f"sampling_params must be a tinker.SamplingParams, got "
                                  f"{type(sampling_params).__name__}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
            raise BadRequestError(f"num_samples must be a positive integer, got {num_samples!r}")
        p = sampling_params
        return submit_sample(
            self._model, _prompt_tokens(prompt), int(num_samples),
            max_tokens=p.max_tokens if max_tokens is None else max_tokens, temperature=p.temperature,
            top_k=p.top_k, top_p=_runnable_top_p(p.top_p), min_p=p.min_p, seed=p.seed, stop=p.stop,
            include_prompt_logprobs=bool(include_prompt_logprobs), topk_prompt_logprobs=int(topk_prompt_logprobs),
            repetition_penalty=p.repetition_penalty, presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty, adapter=self._snapshot, notify=True)

    def sample(self, prompt: ModelInput, num_samples: int, sampling_params: SamplingParams,
               include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0
               ) -> ConcurrentAPIFuture[SampleResponse]:
        """num_samples completions of the prompt: `.result()` or `await` it. Each sequence's tokens
        end with the matched stop string or token (stop_reason "stop") or run to max_tokens
        ("length"); logprobs are always given."""
        try:
            pending = self._submit(prompt, num_samples, sampling_params, include_prompt_logprobs,
                                   topk_prompt_logprobs)
        except BadRequestError as e:
            return failed_concurrent_future(e)
        return concurrent_future(pending._request, lambda: _sample_response(pending))

    async def sample_async(self, prompt: ModelInput, num_samples: int, sampling_params: SamplingParams,
                           include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0) -> SampleResponse:
        pending = self._submit(prompt, num_samples, sampling_params, include_prompt_logprobs, topk_prompt_logprobs)
        return await EngineFuture(pending._request, lambda: _sample_response(pending)).result_async()

    def _submit_logprobs(self, prompt) -> PendingSample:
        # max_tokens 0: the prompt's logprobs come from the prefill alone
        return self._submit(prompt, 1, SamplingParams(), True, 0, max_tokens=0)

    def compute_logprobs(self, prompt: ModelInput) -> ConcurrentAPIFuture[list[float | None]]:
        """log p(prompt[i] | prompt[:i]) for every position; entry 0 is None (`.result()` or `await`)."""
        try:
            pending = self._submit_logprobs(prompt)
        except BadRequestError as e:
            return failed_concurrent_future(e)
        return concurrent_future(pending._request, lambda: pending.result().prompt_logprobs)

    async def compute_logprobs_async(self, prompt: ModelInput) -> list[float | None]:
        pending = self._submit_logprobs(prompt)
        return await EngineFuture(pending._request, lambda: pending.result().prompt_logprobs).result_async()

    # ---- information -------------------------------------------------------------------

    def get_tokenizer(self):
        return self._model.tokenizer

    def get_base_model(self) -> str:
        return self._base_model

    async def get_base_model_async(self) -> str:
        return self._base_model

    # ---- pickling ----------------------------------------------------------------------

    def __reduce__(self):
        weights = None
        if self._snapshot is not None and self._model_path is None:  # an ephemeral snapshot travels by value
            weights = (self._lora_config, self._snapshot.parameters())
        return (_rebuild_sampling_client, (self._base_model, self._model_path, weights))


def _new_sampler_id(holder) -> str:
    session = getattr(holder, "session_id", "local")
    return f"{session}:sample:{next(_sampler_ids)}"


def _rebuild_sampling_client(base_model: str, model_path: str | None, weights) -> SamplingClient:
    if weights is None:
        if model_path is not None:
            return SamplingClient._for_path(None, model_path)
        return SamplingClient._for_base(None, base_model)
    config, parameters = weights
    adapter = LoraAdapter(load_model(base_model), rank=config["rank"], seed=0, train_mlp=config["train_mlp"],
                          train_attn=config["train_attn"], train_unembed=config["train_unembed"])
    adapter.set_parameters(parameters)
    return SamplingClient._for_snapshot(None, base_model, adapter, adapter.submit_snapshot().result(), model_path)


class BackcompatSamplingClientFuture(ClientFuture[SamplingClient], SamplingClient):
    """What the SamplingClient factories return: a future of the client (`.result()`, `await`) that
    also works as the SamplingClient itself, as the factories' return value did before 0.38."""


def check_model_path(model_path) -> None:
    """A sampler's model_path must be a well-formed tinker:// path (ValueError at the call, as for
    the other malformed arguments); whether it exists is the future's to report."""
    if not isinstance(model_path, str) or not model_path.startswith("tinker://"):
        raise ValueError(f"model_path must be a tinker:// path (from save_weights_for_sampler), got {model_path!r}")
    from ... import _checkpoints

    _checkpoints.parse_path(model_path)


__all__ = ["SamplingClient", "BackcompatSamplingClientFuture"]
