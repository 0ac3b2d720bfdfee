"""Sampling on the engine: Tinker's SamplingParams over a KV-cache generator.

A sample request prefills its prompt once, then decodes its num_samples sequences together; requests
queued at the same time on the same model and adapter are batched into the same decode steps, so
throughput grows with the number of requests in flight (the engine does the batching). The matched
stop token or string is kept at the end of `tokens`; EOS stops unless `stop=[]` (no stop at all, as
in Tinker 0.33+); stop_reason is "stop" or
"length"; every generated token's logprob under the temperature-scaled distribution is returned.

Beyond Tinker's SamplingParams: min_p and repetition / presence / frequency penalties (Tinker's own
SamplingParams ignores unknown fields, so code using them stays portable).
"""

from __future__ import annotations

import concurrent.futures
import secrets
from dataclasses import dataclass

import numpy as np

from ._engine import INT32_MAX, LoadedModel, bool_arg, get_engine, int_arg, seed_arg, token_ids
from ._exceptions import BadRequestError
from ._multimodal import EngineInput


@dataclass
class SampledSequence:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: str  # "stop" | "length"
    topk_ids: np.ndarray | None = None       # [n, k] int32: the top k of each token's distribution
    topk_logprobs: np.ndarray | None = None  # [n, k] float32


@dataclass
class SampleResult:
    sequences: list[SampledSequence]
    prompt_logprobs: list | None = None
    topk_prompt_logprobs: list | None = None


def _stops(model: LoadedModel, stop) -> tuple[list[int], list[bytes]]:
    ids, strings = [], []
    if stop is not None and not isinstance(stop, str) and len(stop) == 0:
        return [], []  # stop=[]: no stop at all, EOS included
    if stop is None:
        pass
    elif isinstance(stop, str):
        strings = [stop]
    else:
        items = list(stop)
        if all(isinstance(s, str) for s in items):
            strings = items
        elif all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in items):
            ids = [int(s) for s in token_ids(items, model.vocab_size, "stop")]
        else:
            raise BadRequestError("stop must be a string, a list of strings or a list of token ids")
    if any(s == "" for s in strings):
        raise BadRequestError("stop strings must not be empty")
    for i, s in enumerate(strings):
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate such as '\ud800'
            raise BadRequestError(f"stop, position {i}: {s!r:.100} is not valid text ({e.reason} at {e.start})") from None
    for eos in model.spec.eos_token_ids:  # the checkpoint's own EOS, tokenizer or not
        if eos < model.vocab_size and eos not in ids:
            ids.append(eos)
    return ids, [s.encode("utf-8") for s in strings]


def _sequence(tokens, logprobs, stopped, topk_ids=None, topk_logprobs=None) -> SampledSequence:
    seq = SampledSequence(tokens, logprobs, "stop" if stopped else "length")
    if topk_ids is not None:
        n = len(tokens)
        seq.topk_ids = np.asarray(topk_ids, dtype=np.int32).reshape(n, -1)
        seq.topk_logprobs = np.asarray(topk_logprobs, dtype=np.float32).reshape(n, -1)
    return seq


class PendingSample:
    """A queued sample request: result() waits and unpacks it."""

    def __init__(self, request):
        self._request = request
        self._result: SampleResult | None = None

    def result(self) -> SampleResult:
        if self._result is None:
            try:
                raw = self._request.result()
            except ValueError as e:
                raise BadRequestError(str(e)) from e
            except InterruptedError as e:  # the engine's TK_ERR_CANCELLED
                raise concurrent.futures.CancelledError(str(e)) from e
            seqs = [_sequence(*item) for item in raw["sequences"]]
            prompt_lp = raw["prompt_logprobs"]
            if prompt_lp is not None:
                prompt_lp = [None] + prompt_lp[1:]
            topk = None
            if raw["topk_ids"] is not None:
                topk = [None] + [list(zip(ids, lps)) for ids, lps in zip(raw["topk_ids"][1:], raw["topk_logprobs"][1:])]
            self._result = SampleResult(seqs, prompt_lp, topk)
        return self._result


def submit_sample(model: LoadedModel, prompt, num_samples: int = 1, max_tokens: int | None = 16,
                  temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0, min_p: float = 0.0,
                  seed: int | None = None, stop=None, include_prompt_logprobs: bool = False,
                  topk_prompt_logprobs: int = 0, repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
                  frequency_penalty: float = 0.0, adapter=None, notify: bool = False,
                  topk_sample_logprobs: int = 0) -> PendingSample:
    mm = None
    if isinstance(prompt, EngineInput):  # a vision-language model's prompt with images (tinker._multimodal)
        mm = prompt.mm(with_delta=True)
        prompt = prompt.tokens
    if hasattr(prompt, "__len__") and len(prompt) == 0:
        raise BadRequestError("the prompt is empty; it needs at least one token")
    ids = token_ids(prompt, model.vocab_size, "prompt")
    if max_tokens is None:  # Tinker's default: generate up to the context length
        max_tokens = model.max_context_length - int(ids.size)
    # integers at full width, with the engine's ranges (generate.c check_params holds the same)
    num_samples = int_arg("num_samples", num_samples, 1, 256)
    max_tokens = int_arg("max_tokens", max_tokens, 0, INT32_MAX)
    top_k = int_arg("top_k", top_k, -1, INT32_MAX)
    topk_prompt_logprobs = int_arg("topk_prompt_logprobs", topk_prompt_logprobs, 0, 1000)
    topk_sample_logprobs = int_arg("topk_sample_logprobs", topk_sample_logprobs, 0, 1000)
    seed = secrets.randbits(63) if seed is None else seed_arg("seed", seed)
    include_prompt_logprobs = bool_arg("include_prompt_logprobs", include_prompt_logprobs)
    stop_ids, stop_strings = _stops(model, stop)
    if stop_strings:
        try:
            model.publish_token_bytes()
        except OSError as e:  # a checkpoint without tokenizer files: stop strings need the tokens' text
            raise BadRequestError(f"stop strings need the model's tokenizer: {e}; pass stop token ids instead") from e
    try:
        request = get_engine().sample(
            model.handle, ids, num_samples=num_samples, max_tokens=max_tokens,
            temperature=float(temperature), top_k=-1 if top_k == 0 else top_k, top_p=float(top_p),
            min_p=float(min_p), repetition_penalty=float(repetition_penalty),
            presence_penalty=float(presence_penalty), frequency_penalty=float(frequency_penalty), seed=seed,
            stop_ids=np.array(stop_ids, dtype=np.int32), stop_strings=stop_strings,
            prompt_logprobs=include_prompt_logprobs, topk_prompt_logprobs=topk_prompt_logprobs,
            adapter=None if adapter is None else adapter.handle, notify=notify,
            topk_sample_logprobs=topk_sample_logprobs, mm=mm)
    except (ValueError, OverflowError) as e:
        raise BadRequestError(str(e)) from e
    return PendingSample(request)


def sample(model: LoadedModel, prompt, num_samples: int = 1, **params) -> SampleResult:
    return submit_sample(model, prompt, num_samples, **params).result()
