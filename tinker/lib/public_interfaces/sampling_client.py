"""SamplingClient: generates from a base model, or from a frozen snapshot of a LoRA adapter.

As in Tinker 0.38, `sample` and `compute_logprobs` return an APIFuture (`.result()`, `await`) that is
also a `concurrent.futures.Future`, as they returned before; their `*_async` twins return the value
after a single await. Requests from many clients and coroutines
on the same model and weights are batched by the engine into shared decode steps.

A SamplingClient pickles, so it can be handed to worker processes, and `get_sampler_handle()` names
its sampler in a string for `SamplingClient.from_sampler_handle` (see there for where a handle works). A base-model client pickles as
its model name. A snapshot client pickles as its LoRA config and weights (a few MB), and the copy
in the other process loads the base model and rebuilds the snapshot there.
"""

from __future__ import annotations

import asyncio

import base64
import binascii
import itertools
import json
import threading
import uuid
import warnings
from typing import TYPE_CHECKING

import numpy as np

from ... import _deprecation as deprecation
from ..._engine import LoadedModel, bool_arg, int_arg, load_model, seed_arg
from ..._exceptions import BadRequestError, InvalidArgumentError, NotFoundError
from ..._futures import (
    ClientFuture, ConcurrentAPIFuture, EngineFuture, concurrent_future, failed_concurrent_future,
    forward_client_methods,
)
from ..._restore import sampling_adapter
from ..._multimodal import EngineInput, engine_input
from ..._sampling import PendingSample, submit_sample
from ..._training import LoraAdapter, LoraSnapshot
from ..retry_handler import RetryConfig  # noqa: F401  (imported here as in the SDK: `import tinker` reaches tinker.lib.retry_handler)
from ...types import ModelInput, PromptAltTokens, SampledSequence, SampleResponse, SamplingParams, TensorData

if TYPE_CHECKING:
    from .service_client import ServiceClient

_sampler_ids = itertools.count()


def _prompt_tokens(model, prompt) -> "list[int] | EngineInput":
    """The prompt's token ids, or (with images, on a vision-language model) its EngineInput."""
    return engine_input(model, prompt, "prompt")


def _length(prompt) -> int:
    return len(prompt.tokens) if isinstance(prompt, EngineInput) else len(prompt)


_sequence_ids = itertools.count()


def _topk_lists(ids, lps):
    return None if ids is None else [list(zip(map(int, i), map(float, lp))) for i, lp in zip(ids, lps)]


def _sample_response(pending: PendingSample, session: str, extras: dict | None = None) -> SampleResponse:
    """The public response; `extras` holds what the prompt options asked for (see _prompt_extras)."""
    raw = pending.result()
    sequences = [SampledSequence(stop_reason=s.stop_reason, tokens=s.tokens, logprobs=s.logprobs,
                                 sequence_id=f"{session}:seq:{next(_sequence_ids)}",
                                 topk_logprobs=_topk_lists(s.topk_ids, s.topk_logprobs))
                 for s in raw.sequences]
    prompt_lp, topk = raw.prompt_logprobs, raw.topk_prompt_logprobs
    extras = extras or {}
    last_n = extras.get("last_n")
    if last_n is not None:  # only the last n positions are scored
        first = len(prompt_lp) - last_n
        prompt_lp = [None] * first + prompt_lp[first:]
        topk = None if topk is None else [None] * first + topk[first:]
    target, alt = None, None
    if "logits" in extras:
        target, alt = _prompt_extras(np.asarray(extras["logits"].result()), extras)
    return SampleResponse(sequences=sequences, prompt_logprobs=prompt_lp, topk_prompt_logprobs=topk,
                          target_prompt_logprobs=target, prompt_alt_tokens=alt)


def _log_softmax(z: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """log softmax(z / temperature) in float64, shifted before it is scaled: a tiny temperature (1e-40) sends the
    other entries to -inf instead of overflowing to inf - inf = NaN."""
    z = z.astype(np.float64)
    with np.errstate(over="ignore"):
        z = (z - z.max(axis=-1, keepdims=True)) / temperature
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _prompt_extras(logits: np.ndarray, extras: dict):
    """target_prompt_logprobs and prompt_alt_tokens from the prompt's logits [P, V]: row i predicts
    prompt[i + 1], so rows 0..P-2 score positions 1..P-1."""
    target = alt = None
    rows = logits[:-1]
    if extras.get("target_ids") is not None:
        ids = extras["target_ids"]  # [P - 1, K] int64, -1 = nothing asked
        lp = _log_softmax(rows)
        picked = np.take_along_axis(lp, np.where(ids < 0, 0, ids), axis=1)
        target = TensorData.from_numpy(np.where(ids < 0, 0.0, picked).astype(np.float32))
    k = extras.get("alt_k", 0)
    if k:
        temperature = extras["temperature"]
        rng = np.random.default_rng(extras["seed"])
        lp_t = _log_softmax(rows, temperature) if temperature > 0 else _log_softmax(rows)
        if temperature > 0:
            probs = np.exp(lp_t)
            cdf = np.cumsum(probs, axis=1)
            u = rng.random((rows.shape[0], k)) * cdf[:, -1:]
            tokens = np.stack([np.searchsorted(cdf[i], u[i], side="right") for i in range(rows.shape[0])])
            tokens = np.minimum(tokens, rows.shape[1] - 1)
        else:  # greedy: every draw is the most likely token
            tokens = np.repeat(np.argmax(rows, axis=1)[:, None], k, axis=1)
        alt_lp = np.take_along_axis(lp_t, tokens, axis=1)
        alt = PromptAltTokens(tokens=TensorData.from_numpy(tokens.astype(np.int64)),
                              logprobs=TensorData.from_numpy(alt_lp.astype(np.float32)))
    return target, alt


def _target_ids(target_prompt_logprobs) -> np.ndarray:
    """target_prompt_logprobs as an array (shape and dtype are checked by the caller); ragged lists are refused."""
    value = target_prompt_logprobs
    try:
        return np.asarray(value.to_numpy() if hasattr(value, "to_numpy") else value)
    except (ValueError, TypeError):
        raise BadRequestError(f"target_prompt_logprobs must be int token ids of shape [len(prompt) - 1, K] (rows of "
                              f"equal length), got {value!r:.100}") from None


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
        # record_stability_info: sequences always carry a sequence_id here; the sampler and the trainer
        # share this process's numerics, so nothing else needs recording for stable_reinforce
        self.record_stability_info = False

    def _recording(self, record_stability_info: bool) -> "SamplingClient":
        self.record_stability_info = bool_arg("record_stability_info", record_stability_info)
        return self

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
                max_tokens=None, topk_sample_logprobs: int = 0) -> PendingSample:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if not isinstance(sampling_params, SamplingParams):
            raise BadRequestError(f"sampling_params must be a tinker.SamplingParams, got "
                                  f"{type(sampling_params).__name__}")
        p = sampling_params
        return submit_sample(
            self._model, _prompt_tokens(self._model, prompt), num_samples,
            max_tokens=p.max_tokens if max_tokens is None else max_tokens, temperature=p.temperature,
            top_k=p.top_k, top_p=_runnable_top_p(p.top_p), min_p=p.min_p, seed=p.seed, stop=p.stop,
            include_prompt_logprobs=include_prompt_logprobs, topk_prompt_logprobs=topk_prompt_logprobs,
            repetition_penalty=p.repetition_penalty, presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty, adapter=self._snapshot, notify=True,
            topk_sample_logprobs=topk_sample_logprobs)

    def _extras(self, prompt, sampling_params, include_prompt_logprobs, topk_prompt_logprobs, target_prompt_logprobs,
                prompt_alt_tokens_k, prompt_logprobs_last_n) -> dict:
        """Checks the 0.33+ prompt options; queues the prompt's logits when they need them."""
        tokens = _prompt_tokens(self._model, prompt)
        n_prompt = _length(tokens)
        extras: dict = {}
        if prompt_logprobs_last_n is not None:
            if not (bool_arg("include_prompt_logprobs", include_prompt_logprobs)
                    or int_arg("topk_prompt_logprobs", topk_prompt_logprobs, 0, 1000)):
                raise BadRequestError("prompt_logprobs_last_n needs include_prompt_logprobs=True (or "
                                      "topk_prompt_logprobs)")
            n = prompt_logprobs_last_n
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= n_prompt - 1:
                raise BadRequestError(f"prompt_logprobs_last_n must be from 1 to len(prompt) - 1 = {n_prompt - 1}, "
                                      f"got {n!r}")
            extras["last_n"] = int(n)
        if target_prompt_logprobs is not None:
            ids = _target_ids(target_prompt_logprobs)
            if ids.ndim == 1:
                ids = ids[:, None]
            if ids.ndim != 2 or ids.shape[0] != n_prompt - 1 or not np.issubdtype(ids.dtype, np.integer):
                raise BadRequestError(f"target_prompt_logprobs must be int token ids of shape [len(prompt) - 1, K] = "
                                      f"[{n_prompt - 1}, K], got {ids.dtype} {list(ids.shape)}")
            if np.any((ids < -1) | (ids >= self._model.vocab_size)):
                raise BadRequestError(f"target_prompt_logprobs holds ids outside the vocabulary [0, "
                                      f"{self._model.vocab_size}) (-1 asks for nothing)")
            extras["target_ids"] = ids.astype(np.int64)
        k = int_arg("prompt_alt_tokens_k", prompt_alt_tokens_k, 0, 1000)
        if k:
            p = sampling_params if isinstance(sampling_params, SamplingParams) else SamplingParams()
            seed = None if p.seed is None else seed_arg("seed", p.seed)  # any 64-bit seed, as sampling takes it
            extras.update(alt_k=k, temperature=float(p.temperature), seed=seed)
        if ("target_ids" in extras or k) and n_prompt < 2:
            raise BadRequestError("target_prompt_logprobs and prompt_alt_tokens_k need a prompt of 2 tokens or more")
        if "target_ids" in extras or k:
            extras["logits"] = self._model.submit_forward([tokens], adapter=None if self._snapshot is None
                                                          else self._snapshot.handle)
        return extras

    def sample(self, prompt: ModelInput, num_samples: int, sampling_params: SamplingParams,
               include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0, topk_sample_logprobs: int = 0,
               target_prompt_logprobs=None, prompt_alt_tokens_k: int = 0, prompt_logprobs_last_n: int | None = None
               ) -> ConcurrentAPIFuture[SampleResponse]:
        """num_samples completions of the prompt: `.result()` or `await` it. Each sequence's tokens end
        with the matched stop string or token (stop_reason "stop") or run to max_tokens ("length");
        logprobs are always given, and each sequence has a sequence_id. `topk_sample_logprobs=k` adds each
        generated token's top k (SampledSequence.topk_logprobs); `prompt_logprobs_last_n` scores only the
        prompt's last n tokens; `target_prompt_logprobs` ([len(prompt) - 1, K] ids) and
        `prompt_alt_tokens_k` fill the response's fields of those names."""
        try:
            extras = self._extras(prompt, sampling_params, include_prompt_logprobs, topk_prompt_logprobs,
                                  target_prompt_logprobs, prompt_alt_tokens_k, prompt_logprobs_last_n)
            pending = self._submit(prompt, num_samples, sampling_params, include_prompt_logprobs,
                                   topk_prompt_logprobs, topk_sample_logprobs=topk_sample_logprobs)
        except BadRequestError as e:
            return failed_concurrent_future(e)
        return concurrent_future(pending._request,
                                 lambda: _sample_response(pending, self.sampling_session_id, extras), cancellable=True)

    @deprecation.awaitable_twin("SamplingClient", "sample")
    async def sample_async(self, prompt: ModelInput, num_samples: int, sampling_params: SamplingParams,
                           include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0,
                           topk_sample_logprobs: int = 0, target_prompt_logprobs=None, prompt_alt_tokens_k: int = 0,
                           prompt_logprobs_last_n: int | None = None) -> SampleResponse:
        extras = self._extras(prompt, sampling_params, include_prompt_logprobs, topk_prompt_logprobs,
                              target_prompt_logprobs, prompt_alt_tokens_k, prompt_logprobs_last_n)
        pending = self._submit(prompt, num_samples, sampling_params, include_prompt_logprobs, topk_prompt_logprobs,
                               topk_sample_logprobs=topk_sample_logprobs)
        return await _cancel_when_cancelled(pending, EngineFuture(
            pending._request, lambda: _sample_response(pending, self.sampling_session_id, extras)))

    def _submit_logprobs(self, prompt, last_n) -> tuple[PendingSample, dict]:
        extras = self._extras(prompt, None, True, 0, None, 0, last_n)
        # max_tokens 0: the prompt's logprobs come from the prefill alone
        return self._submit(prompt, 1, SamplingParams(), True, 0, max_tokens=0), extras

    def _logprobs(self, pending, extras) -> list[float | None]:
        return _sample_response(pending, self.sampling_session_id, extras).prompt_logprobs

    def compute_logprobs(self, prompt: ModelInput, prompt_logprobs_last_n: int | None = None
                         ) -> ConcurrentAPIFuture[list[float | None]]:
        """log p(prompt[i] | prompt[:i]) for every position (or the last `prompt_logprobs_last_n`);
        entry 0 is None (`.result()` or `await`)."""
        try:
            pending, extras = self._submit_logprobs(prompt, prompt_logprobs_last_n)
        except BadRequestError as e:
            return failed_concurrent_future(e)
        return concurrent_future(pending._request, lambda: self._logprobs(pending, extras), cancellable=True)

    @deprecation.awaitable_twin("SamplingClient", "compute_logprobs")
    async def compute_logprobs_async(self, prompt: ModelInput, prompt_logprobs_last_n: int | None = None
                                     ) -> list[float | None]:
        pending, extras = self._submit_logprobs(prompt, prompt_logprobs_last_n)
        return await _cancel_when_cancelled(pending, EngineFuture(pending._request,
                                                                  lambda: self._logprobs(pending, extras)))

    # ---- information -------------------------------------------------------------------

    def get_tokenizer(self):
        return self._model.tokenizer

    def get_base_model(self) -> str:
        return self._base_model

    @deprecation.local_answer_twin("SamplingClient", "get_base_model")
    async def get_base_model_async(self) -> str:
        return self._base_model

    def get_telemetry(self):
        """None: a local engine sends no telemetry (as TrainingClient.get_telemetry)."""
        return None

    def on_queue_state_change(self, queue_state, queue_state_reason: str | None) -> None:
        """The SDK's hook for the server's queue state (e.g. paused for capacity); a local engine has no
        such queue, so nothing calls it and it does nothing."""

    # ---- handles (0.33+) ---------------------------------------------------------------

    def get_sampler_handle(self) -> str:
        """A string that names this client's sampler: `SamplingClient.from_sampler_handle(handle)`
        makes another client on the same weights, any number of times. It carries no credentials
        (none are used here) and no weights.

        A sampler on saved weights (a tinker:// model_path) or on a base model can be rebuilt from
        its handle in any process that sees the same checkpoint store ($TINKER_HOME). A snapshot
        from `save_weights_and_get_sampling_client()` lives in this process only: its handle keeps
        it in memory for the rest of the process (as the service keeps a session's samplers), and
        other processes get the client itself by pickling it."""
        state = {"sampling_session_id": self.sampling_session_id, "base_model": self._base_model,
                 "model_path": self._model_path, "record_stability_info": self.record_stability_info}
        if self._snapshot is not None:
            with _handles_lock:
                _handle_samplers.setdefault(self.sampling_session_id,
                                            (self._model, self._snapshot, self._lora_config))
            state["process"] = _PROCESS
        return base64.urlsafe_b64encode(json.dumps(state, separators=(",", ":")).encode()).decode()

    @staticmethod
    def from_sampler_handle(handle: str, *, api_key: str | None = None) -> "SamplingClient":
        """A new SamplingClient on the sampler that `handle` (from `get_sampler_handle`) names.
        `api_key` is accepted for the SDK's signature and not used (no credentials here)."""
        state = _handle_state(handle)
        session_id, base_model, model_path = state["sampling_session_id"], state["base_model"], state.get("model_path")
        with _handles_lock:
            live = _handle_samplers.get(session_id)
        if live is not None:  # this process's own sampler: the same weights, not a copy
            model, snapshot, lora_config = live
            client = SamplingClient(None, sampling_session_id=session_id, base_model=base_model, model=model,
                                    snapshot=snapshot, lora_config=lora_config, model_path=model_path)
        elif model_path is not None:
            client = SamplingClient._for_path(None, model_path)
            client.sampling_session_id = session_id
        elif "process" not in state:
            client = SamplingClient._for_base(None, base_model)
            client.sampling_session_id = session_id
        else:
            where = "this process" if state["process"] == _PROCESS else "the process that made the handle"
            raise NotFoundError(f"sampler {session_id} (a snapshot from save_weights_and_get_sampling_client) "
                                f"lives only in {where}'s memory; to sample from it in another process, pickle "
                                f"the SamplingClient or save the weights with save_weights_for_sampler")
        client.record_stability_info = state.get("record_stability_info", False)
        return client

    # ---- pickling ----------------------------------------------------------------------

    def __reduce__(self):
        weights = None
        if self._snapshot is not None and self._model_path is None:  # an ephemeral snapshot travels by value
            weights = (self._lora_config, self._snapshot.parameters())
        return (_rebuild_sampling_client, (self._base_model, self._model_path, weights))


# Snapshot samplers that a handle names (sampling_session_id -> model, snapshot, LoRA config): they
# stay in memory for the rest of the process, so a handle never outlives its weights.
_handle_samplers: dict[str, tuple] = {}
_handles_lock = threading.Lock()
_PROCESS = uuid.uuid4().hex  # names this process in the handles it gives out


async def _cancel_when_cancelled(pending: PendingSample, future: EngineFuture):
    """Awaits the request; a cancelled task cancels it too (its slot in the batch goes to others)."""
    try:
        return await future.result_async()
    except asyncio.CancelledError:
        pending._request.cancel()
        raise


# what each field of a sampler handle holds (get_sampler_handle writes them); the first two are required
_HANDLE_FIELDS = {"sampling_session_id": str, "base_model": str, "model_path": (str, type(None)),
                  "record_stability_info": bool, "process": str}


def _handle_state(handle) -> dict:
    """The fields of a sampler handle, each of its type: InvalidArgumentError (a ValueError, as the SDK raises)
    for anything else, a hand-made or damaged handle included."""
    try:
        state = json.loads(base64.urlsafe_b64decode(handle.encode() if isinstance(handle, str) else handle))
    except (AttributeError, TypeError, ValueError, RecursionError, binascii.Error):
        state = None
    if not (isinstance(state, dict) and {"sampling_session_id", "base_model"} <= state.keys()
            and all(isinstance(state[k], t) for k, t in _HANDLE_FIELDS.items() if k in state)):
        raise InvalidArgumentError(f"not a sampler handle (from SamplingClient.get_sampler_handle()): {handle!r:.80}")
    return state


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
    also works as the SamplingClient itself, as the factories' return value did before 0.38 (with
    0.38's FutureWarning: get the client with `.result()` or `await` first)."""

    def __reduce__(self):
        warnings.warn(deprecation.future_as_client_message("SamplingClient"), FutureWarning, stacklevel=2)
        return self.result().__reduce__()


forward_client_methods(BackcompatSamplingClientFuture, SamplingClient, "SamplingClient")


def check_model_path(model_path) -> None:
    """A sampler's model_path must be a well-formed tinker:// path (ValueError at the call, as for
    the other malformed arguments); whether it exists is the future's to report."""
    if not isinstance(model_path, str) or not model_path.startswith("tinker://"):
        raise InvalidArgumentError(f"model_path must be a tinker:// path (from save_weights_for_sampler), got "
                                   f"{model_path!r:.200}")
    from ... import _checkpoints

    _checkpoints.parse_path(model_path)


__all__ = ["SamplingClient", "BackcompatSamplingClientFuture"]
