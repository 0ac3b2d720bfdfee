"""0.33+ sampling surface on a tiny random Llama: sequence_id, sample-time top-k logprobs, stop=[],
prompt_logprobs_last_n, target_prompt_logprobs, prompt_alt_tokens_k, record_stability_info.

The references are the model's own logits from a separate forward pass (numpy, float64 softmax):
each generated token's top k must be the k largest entries of log_softmax(logits / T) at its
position, within 1e-4 absolute.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

import tinker
from tinker import types
from tinker._engine import load_model
from tiny_models import make_hf_checkpoint

ATOL = 1e-4


@pytest.fixture(scope="module")
def model_name(tmp_path_factory):
    path, _ = make_hf_checkpoint(tmp_path_factory.mktemp("sdk038s") / "llama", "llama", max_positions=64)
    return str(path)


@pytest.fixture(scope="module")
def service():
    return tinker.ServiceClient()


@pytest.fixture(scope="module")
def sampler(service, model_name):
    return service.create_sampling_client(base_model=model_name, record_stability_info=True)


PROMPT = types.ModelInput.from_ints([5, 17, 3, 44, 9, 12])


def log_softmax(z):
    z = z.astype(np.float64)
    return z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))


def test_sequence_ids_and_topk_sample_logprobs(sampler, model_name):
    params = types.SamplingParams(max_tokens=6, temperature=0.7, seed=4, stop=[])
    response = sampler.sample(PROMPT, 3, params, topk_sample_logprobs=5).result()
    ids = [s.sequence_id for s in response.sequences]
    assert all(isinstance(i, str) and i for i in ids) and len(set(ids)) == 3
    model = load_model(model_name)
    for seq in response.sequences:
        assert len(seq.topk_logprobs) == len(seq.tokens) == 6
        assert seq.topk_logprobs_np.token_ids.shape == (6, 5)
        full = PROMPT.to_ints() + seq.tokens
        logits = model.forward_logits([full[:-1]])[0]
        for i, (token, lp, top) in enumerate(zip(seq.tokens, seq.logprobs, seq.topk_logprobs)):
            ref = log_softmax(logits[len(PROMPT.to_ints()) - 1 + i] / 0.7)
            order = np.argsort(-ref, kind="stable")[:5]
            assert [t for t, _ in top] == order.tolist()
            np.testing.assert_allclose([v for _, v in top], ref[order], atol=ATOL)
            assert lp == pytest.approx(ref[token], abs=ATOL)  # the same distribution as the logprob
    plain = sampler.sample(PROMPT, 1, params).result().sequences[0]
    assert plain.topk_logprobs is None and plain.topk_logprobs_np is None


def test_stop_empty_list_disables_eos(sampler, model_name):
    from tinker._sampling import _stops

    model = load_model(model_name)
    eos = model.spec.eos_token_ids[0]
    assert _stops(model, []) == ([], []) and eos in _stops(model, None)[0] and eos in _stops(model, [7])[0]
    prompt = types.ModelInput.from_ints([eos, 3])
    greedy = types.SamplingParams(max_tokens=8, temperature=0.0)
    out = sampler.sample(prompt, 1, greedy.model_copy(update={"stop": []})).result().sequences[0]
    assert out.stop_reason == "length" and len(out.tokens) == 8
    with_eos = sampler.sample(prompt, 1, greedy.model_copy(update={"stop": [out.tokens[2]]})).result().sequences[0]
    assert with_eos.stop_reason == "stop" and len(with_eos.tokens) <= 3


def test_prompt_logprobs_last_n_and_compute_logprobs(sampler):
    full = sampler.compute_logprobs(PROMPT).result()
    last = sampler.compute_logprobs(PROMPT, prompt_logprobs_last_n=2).result()
    assert last[:4] == [None] * 4 and last[4:] == pytest.approx(full[4:], abs=1e-6)
    resp = sampler.sample(PROMPT, 1, types.SamplingParams(max_tokens=1), include_prompt_logprobs=True,
                          topk_prompt_logprobs=3, prompt_logprobs_last_n=3).result()
    assert resp.prompt_logprobs[:3] == [None] * 3 and resp.topk_prompt_logprobs[:3] == [None] * 3
    assert np.isnan(resp.prompt_logprobs_np[:3]).all() and resp.topk_prompt_logprobs[3] is not None
    assert asyncio.run(sampler.compute_logprobs_async(PROMPT, prompt_logprobs_last_n=1))[-1] == pytest.approx(
        full[-1], abs=1e-6)
    for bad in (0, 6, True):
        with pytest.raises(tinker.BadRequestError, match="prompt_logprobs_last_n"):
            sampler.compute_logprobs(PROMPT, prompt_logprobs_last_n=bad).result()
    with pytest.raises(tinker.BadRequestError, match="needs include_prompt_logprobs"):
        sampler.sample(PROMPT, 1, types.SamplingParams(max_tokens=1), prompt_logprobs_last_n=2).result()


def test_target_prompt_logprobs_and_alt_tokens(sampler, model_name):
    tokens = PROMPT.to_ints()
    full = sampler.compute_logprobs(PROMPT).result()
    targets = np.array([[t, 7, -1] for t in tokens[1:]], dtype=np.int64)
    resp = sampler.sample(PROMPT, 1, types.SamplingParams(max_tokens=1, temperature=0.5, seed=1),
                          target_prompt_logprobs=types.TensorData.from_numpy(targets), prompt_alt_tokens_k=4).result()
    got = resp.target_prompt_logprobs.to_numpy()
    assert got.shape == (5, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got[:, 0], full[1:], atol=ATOL)  # the prompt's own tokens
    assert (got[:, 2] == 0).all()
    logits = load_model(model_name).forward_logits([tokens])[0]
    np.testing.assert_allclose(got[:, 1], log_softmax(logits[:-1])[:, 7], atol=ATOL)
    alt = resp.prompt_alt_tokens
    assert alt.tokens.to_numpy().shape == (5, 4) and alt.logprobs.to_numpy().shape == (5, 4)
    ref = log_softmax(logits[:-1] / 0.5)
    np.testing.assert_allclose(alt.logprobs.to_numpy(), np.take_along_axis(ref, alt.tokens.to_numpy(), 1), atol=ATOL)
    with pytest.raises(tinker.BadRequestError, match="target_prompt_logprobs"):
        sampler.sample(PROMPT, 1, types.SamplingParams(max_tokens=1), target_prompt_logprobs=[[1, 2]]).result()


def test_record_stability_info_on_every_creator(service, model_name):
    tc = service.create_lora_training_client(model_name, rank=2, seed=1)
    s1 = tc.save_weights_and_get_sampling_client(record_stability_info=True, kind="inflight")
    s2 = asyncio.run(tc.save_weights_and_get_sampling_client_async(record_stability_info=True))
    path = tc.save_weights_for_sampler("sdk038").result().path
    s3 = tc.create_sampling_client(path, record_stability_info=True)
    s4 = service.create_sampling_client(model_path=path, record_stability_info=True)
    for s in (s1, s2, s3, s4):
        assert s.record_stability_info
        assert s.sample(PROMPT, 1, types.SamplingParams(max_tokens=2)).result().sequences[0].sequence_id
    with pytest.raises(ValueError, match="kind"):
        tc.save_weights_and_get_sampling_client(kind="live")


def test_sample_request_and_response_types():
    req = types.SampleRequest(prompt=PROMPT, sampling_params=types.SamplingParams(), topk_sample_logprobs=3,
                              prompt_alt_tokens_k=2, prompt_logprobs_last_n=1, record_stability_info=True)
    assert req.topk_sample_logprobs == 3
    seq = types.SampledSequence("stop", "abc:seq:1", tokens_np=np.array([4, 5], np.int32),
                                logprobs_np=np.array([-0.5, -1.0], np.float32))
    assert seq.sequence_id == "abc:seq:1" and seq.tokens == [4, 5] and seq.logprobs == [-0.5, -1.0]
    resp = types.SampleResponse(sequences=[seq], prompt_logprobs_np=np.array([np.nan, -2.0], np.float32))
    assert resp.prompt_logprobs == [None, -2.0] and resp.target_prompt_logprobs is None
    assert types.TopkLogprobs is types.TopkPromptLogprobs


# ---- sampler handles (0.33+) -------------------------------------------------------------------

GREEDY = types.SamplingParams(max_tokens=5, temperature=0.0, stop=[])


def _trained(service, model_name):
    """A training client whose adapter is far from zero (its samples differ from the base model's)."""
    tc = service.create_lora_training_client(model_name, rank=4, seed=3).result()
    tokens = [5, 17, 3, 44, 9, 12, 30, 31, 32, 33]
    d = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                    loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 9})
    for _ in range(4):
        tc.forward_backward([d], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=5e-2))
    return tc


def _same_weights(a, b):
    np.testing.assert_array_equal(a.compute_logprobs(PROMPT).result()[1:], b.compute_logprobs(PROMPT).result()[1:])
    assert a.sample(PROMPT, 1, GREEDY).result().sequences[0].tokens == \
        b.sample(PROMPT, 1, GREEDY).result().sequences[0].tokens


def test_sampler_handle_in_process(service, model_name, store):
    import gc
    import pickle

    tc = _trained(service, model_name)
    sampler = tc.save_weights_and_get_sampling_client(record_stability_info=True).result()
    base = service.create_sampling_client(base_model=model_name).result()
    frozen = sampler.compute_logprobs(PROMPT).result()
    assert not np.allclose(frozen[1:], base.compute_logprobs(PROMPT).result()[1:], atol=1e-3)

    handle = sampler.get_sampler_handle()
    assert isinstance(handle, str) and handle == sampler.get_sampler_handle()
    restored = tinker.SamplingClient.from_sampler_handle(handle)
    again = tinker.SamplingClient.from_sampler_handle(handle, api_key="tml-unused")
    assert isinstance(restored, tinker.SamplingClient) and restored is not sampler
    assert restored.record_stability_info and restored.get_base_model() == model_name
    _same_weights(restored, sampler)
    _same_weights(again, sampler)
    # Training on does not reach the snapshot the handle names, nor does dropping the original client.
    tc.forward_backward([types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                                     loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0] * 3})],
                        "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    del sampler, again
    gc.collect()
    late = tinker.SamplingClient.from_sampler_handle(handle)
    np.testing.assert_array_equal(late.compute_logprobs(PROMPT).result()[1:], frozen[1:])
    copy = pickle.loads(pickle.dumps(late))  # a client from a handle pickles like any other
    np.testing.assert_array_equal(copy.compute_logprobs(PROMPT).result()[1:], frozen[1:])
    # The future a factory returns hands out the same kind of handle.
    fut = tc.save_weights_and_get_sampling_client()
    _same_weights(tinker.SamplingClient.from_sampler_handle(fut.result().get_sampler_handle()), fut.result())

    with pytest.raises(ValueError, match="sampler handle"):
        tinker.SamplingClient.from_sampler_handle("not-a-handle")


def test_sampler_handle_in_another_process(service, model_name, store):
    import os
    import subprocess
    import sys

    tc = _trained(service, model_name)
    path = tc.save_weights_for_sampler("handle").result().path
    saved = service.create_sampling_client(model_path=path).result()
    base = service.create_sampling_client(base_model=model_name).result()
    snapshot = tc.save_weights_and_get_sampling_client().result()
    script = (
        "import json, sys, tinker\n"
        "from tinker import types\n"
        "prompt = types.ModelInput.from_ints(json.loads(sys.argv[1]))\n"
        "out = []\n"
        "for handle in sys.argv[2:4]:\n"
        "    client = tinker.SamplingClient.from_sampler_handle(handle)\n"
        "    out.append(client.compute_logprobs(prompt).result()[1:])\n"
        "try:\n"
        "    tinker.SamplingClient.from_sampler_handle(sys.argv[4])\n"
        "except tinker.NotFoundError as e:\n"
        "    out.append(str(e))\n"
        "print(json.dumps(out))\n"
    )
    handles = [saved.get_sampler_handle(), base.get_sampler_handle(), snapshot.get_sampler_handle()]
    run = subprocess.run([sys.executable, "-c", script, str(PROMPT.to_ints()), *handles], capture_output=True,
                         text=True, timeout=300, env=os.environ.copy())
    assert run.returncode == 0, run.stderr[-2000:]
    saved_lp, base_lp, error = json.loads(run.stdout.splitlines()[-1])
    np.testing.assert_allclose(saved_lp, saved.compute_logprobs(PROMPT).result()[1:], atol=1e-6)
    np.testing.assert_allclose(base_lp, base.compute_logprobs(PROMPT).result()[1:], atol=1e-6)
    assert not np.allclose(saved_lp, base_lp, atol=1e-3)
    assert "pickle" in error and "save_weights_for_sampler" in error


@pytest.mark.parametrize("params, refused", [
    (dict(top_k=-5), r"^top_k is -5; it must be an integer from -1 to \d+$"),
    (dict(max_tokens=-1), r"^max_tokens is -1; it must be an integer from 0 to \d+$"),
    (dict(temperature=float("nan")), r"temperature is nan; it must be >= 0"),
    (dict(temperature=-1.0), r"temperature is -1; it must be >= 0"),
])  # fmt: skip
def test_sampling_params_take_what_the_sdk_takes(sampler, params, refused):
    # The SDK's SamplingParams checks no range: these construct, as there, and sampling refuses them
    params = types.SamplingParams(**params)
    with pytest.raises(tinker.BadRequestError, match=refused):
        sampler.sample(types.ModelInput.from_ints([1, 2, 3]), 1, params).result()
    assert sampler.sample(types.ModelInput.from_ints([1, 2, 3]), 1, types.SamplingParams(max_tokens=1)).result()
