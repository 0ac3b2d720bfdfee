"""The public clients on the default model: Tinker's getting-started flow (sync and async, as the
documentation writes it), await depths, ordering, custom losses, snapshots, pickling and errors."""

from __future__ import annotations

import asyncio
import concurrent.futures
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest

import tinker
from tinker import types
from tinker._models import DEFAULT_MODEL

PIG_LATIN = [
    {"input": "banana split", "output": "anana-bay plit-say"},
    {"input": "quantum physics", "output": "uantum-qay ysics-phay"},
    {"input": "donut shop", "output": "onut-day op-shay"},
    {"input": "pickle jar", "output": "ickle-pay ar-jay"},
    {"input": "space exploration", "output": "ace-spay exploration-way"},
    {"input": "rubber duck", "output": "ubber-ray uck-day"},
    {"input": "coding wizard", "output": "oding-cay izard-way"},
]


def process_example(example: dict, tokenizer) -> types.Datum:
    # verbatim from Tinker's getting-started documentation
    prompt = f"English: {example['input']}\nPig Latin:"
    prompt_tokens = tokenizer.encode(prompt, add_special_tokens=True)
    prompt_weights = [0] * len(prompt_tokens)
    completion_tokens = tokenizer.encode(f" {example['output']}\n\n", add_special_tokens=False)
    completion_weights = [1] * len(completion_tokens)
    tokens = prompt_tokens + completion_tokens
    weights = prompt_weights + completion_weights
    input_tokens = tokens[:-1]
    target_tokens = tokens[1:]
    weights = weights[1:]
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens=input_tokens),
        loss_fn_inputs=dict(weights=weights, target_tokens=target_tokens),
    )


def loss_per_token(fwdbwd_result, examples) -> float:
    logprobs = np.concatenate([output["logprobs"].tolist() for output in fwdbwd_result.loss_fn_outputs])
    weights = np.concatenate([example.loss_fn_inputs["weights"].tolist() for example in examples])
    return float(-np.dot(logprobs, weights) / weights.sum())


@pytest.fixture(scope="module")
def service():
    return tinker.ServiceClient()


@pytest.fixture(scope="module")
def tokenizer(service):
    return service.create_sampling_client(base_model=DEFAULT_MODEL).get_tokenizer()


@pytest.fixture(scope="module")
def examples(tokenizer):
    return [process_example(ex, tokenizer) for ex in PIG_LATIN]


# ---- the getting-started flow ---------------------------------------------------------------


def test_getting_started_sync(service, tokenizer, examples):
    training_client = service.create_lora_training_client(base_model=DEFAULT_MODEL)
    losses = []
    for _ in range(6):
        fwdbwd_future = training_client.forward_backward(examples, "cross_entropy")
        optim_future = training_client.optim_step(types.AdamParams(learning_rate=1e-4))
        fwdbwd_result = fwdbwd_future.result()
        optim_result = optim_future.result()
        losses.append(loss_per_token(fwdbwd_result, examples))
        assert isinstance(optim_result, types.OptimStepResponse)
        assert optim_result.metrics["step:max"] == len(losses)
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses

    sampling_client = training_client.save_weights_and_get_sampling_client()
    prompt = types.ModelInput.from_ints(tokenizer.encode("English: coffee break\nPig Latin:"))
    params = types.SamplingParams(max_tokens=20, temperature=0.0, stop=["\n"])
    future = sampling_client.sample(prompt=prompt, sampling_params=params, num_samples=8)
    assert isinstance(future, concurrent.futures.Future)
    result = future.result()
    assert len(result.sequences) == 8
    for seq in result.sequences:
        assert len(seq.logprobs) == len(seq.tokens) > 0
        text = tokenizer.decode(seq.tokens)
        assert (seq.stop_reason == "stop") == text.endswith("\n")
    assert len({tuple(s.tokens) for s in result.sequences}) == 1  # greedy: all 8 agree

    strawberry = types.ModelInput.from_ints(tokenizer.encode("How many r's are in the word strawberry?"))
    response = sampling_client.sample(prompt=strawberry, num_samples=1,
                                      sampling_params=tinker.SamplingParams(max_tokens=1),
                                      include_prompt_logprobs=True).result()
    assert response.prompt_logprobs[0] is None and len(response.prompt_logprobs) == strawberry.length
    assert all(lp < 0 for lp in response.prompt_logprobs[1:])
    response = sampling_client.sample(prompt=strawberry, num_samples=1,
                                      sampling_params=tinker.SamplingParams(max_tokens=1),
                                      include_prompt_logprobs=True, topk_prompt_logprobs=5).result()
    topk = response.topk_prompt_logprobs
    assert topk[0] is None and all(len(t) == 5 for t in topk[1:])
    assert all(t[0][1] >= t[-1][1] for t in topk[1:])
    logprobs = sampling_client.compute_logprobs(strawberry).result()
    np.testing.assert_allclose(logprobs[1:], response.prompt_logprobs[1:], atol=1e-5)


def test_getting_started_async(service, tokenizer, examples):
    async def main():
        training_client = await service.create_lora_training_client_async(base_model=DEFAULT_MODEL)
        assert isinstance(training_client, tinker.TrainingClient)
        losses = []
        for _ in range(6):
            fwdbwd_future = await training_client.forward_backward_async(examples, "cross_entropy")
            optim_future = await training_client.optim_step_async(types.AdamParams(learning_rate=1e-4))
            assert isinstance(fwdbwd_future, tinker.APIFuture) and isinstance(optim_future, tinker.APIFuture)
            fwdbwd_result = await fwdbwd_future.result_async()
            await optim_future
            losses.append(loss_per_token(fwdbwd_result, examples))
        assert losses[-1] < losses[0] - 0.05, losses
        sampling_client = await training_client.save_weights_and_get_sampling_client_async()
        assert isinstance(sampling_client, tinker.SamplingClient)
        prompt = types.ModelInput.from_ints(tokenizer.encode("English: coffee break\nPig Latin:"))
        result = await sampling_client.sample_async(prompt=prompt, num_samples=2,
                                                    sampling_params=types.SamplingParams(max_tokens=8, stop=["\n"]))
        assert isinstance(result, types.SampleResponse) and len(result.sequences) == 2
        logprobs = await sampling_client.compute_logprobs_async(prompt)
        assert logprobs[0] is None and len(logprobs) == prompt.length
        info = await training_client.get_info_async()
        assert info.lora_rank == 32 and info.model_id == training_client.model_id
        assert await sampling_client.get_base_model_async() == DEFAULT_MODEL
        capabilities = await service.get_server_capabilities_async()
        assert DEFAULT_MODEL in [m.model_name for m in capabilities.supported_models]

    asyncio.run(main())


# ---- ordering ------------------------------------------------------------------------------------


def _train_script(service, examples, burst: bool):
    """fb, fb, optim, snapshot, fb, optim, forward: one by one, or submitted as a burst."""
    tc = service.create_lora_training_client(base_model=DEFAULT_MODEL, rank=8, seed=11)
    adam = types.AdamParams(learning_rate=1e-3)
    ops = [lambda: tc.forward_backward(examples[:3], "cross_entropy"),
           lambda: tc.forward_backward(examples[3:], "cross_entropy"),
           lambda: tc.optim_step(adam),
           lambda: tc.save_weights_and_get_sampling_client(),
           lambda: tc.forward_backward(examples, "cross_entropy"),
           lambda: tc.optim_step(adam),
           lambda: tc.forward(examples, "cross_entropy")]
    if burst:
        outs = [op() for op in ops]
    else:
        outs = []
        for op in ops:
            out = op()
            if isinstance(out, tinker.APIFuture):
                out.result()
            outs.append(out)
    return [o if isinstance(o, tinker.SamplingClient) else o.result() for o in outs]


def _summary(outs, prompt):
    summary = []
    for out in outs:
        if isinstance(out, tinker.SamplingClient):
            summary.append(out.compute_logprobs(prompt).result()[1:])
        elif isinstance(out, types.ForwardBackwardOutput):
            summary.append(out.metrics["loss:sum"])
        else:
            summary.append(out.metrics["grad_norm:mean"])
    return summary


def test_burst_equals_one_by_one(service, examples):
    prompt = examples[0].model_input
    one_by_one = _summary(_train_script(service, examples, burst=False), prompt)
    burst = _summary(_train_script(service, examples, burst=True), prompt)
    assert burst == one_by_one  # bit for bit: same requests, same order


def test_async_burst_equals_one_by_one(service, examples):
    prompt = examples[0].model_input
    one_by_one = _summary(_train_script(service, examples, burst=False), prompt)

    async def burst():
        tc = await service.create_lora_training_client_async(base_model=DEFAULT_MODEL, rank=8, seed=11)
        adam = types.AdamParams(learning_rate=1e-3)
        futures = [await tc.forward_backward_async(examples[:3], "cross_entropy"),
                   await tc.forward_backward_async(examples[3:], "cross_entropy"),
                   await tc.optim_step_async(adam)]
        sampler = await tc.save_weights_and_get_sampling_client_async()
        futures += [await tc.forward_backward_async(examples, "cross_entropy"), await tc.optim_step_async(adam),
                    await tc.forward_async(examples, "cross_entropy")]
        results = await asyncio.gather(*(f.result_async() for f in futures))
        return results[:3] + [sampler] + results[3:]

    assert _summary(asyncio.run(burst()), prompt) == one_by_one


def test_forward_leaves_gradients_alone(service, examples):
    a = service.create_lora_training_client(base_model=DEFAULT_MODEL, rank=4, seed=5)
    b = service.create_lora_training_client(base_model=DEFAULT_MODEL, rank=4, seed=5)
    adam = types.AdamParams(learning_rate=1e-3)
    fa = a.forward_backward(examples, "cross_entropy")
    a.forward(examples[:2], "cross_entropy")
    oa = a.optim_step(adam)
    fb = b.forward_backward(examples, "cross_entropy")
    ob = b.optim_step(adam)
    assert fa.result().metrics == fb.result().metrics
    assert oa.result().metrics == ob.result().metrics


def test_snapshot_is_frozen(service, examples):
    tc = service.create_lora_training_client(base_model=DEFAULT_MODEL, rank=8, seed=3)
    tc.forward_backward(examples, "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=1e-2))
    sampler = tc.save_weights_and_get_sampling_client()
    prompt = examples[1].model_input
    before = sampler.compute_logprobs(prompt).result()
    for _ in range(2):
        tc.forward_backward(examples, "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    assert sampler.compute_logprobs(prompt).result() == before
    assert tc.save_weights_and_get_sampling_client().compute_logprobs(prompt).result() != before


def test_save_weights_name_is_deprecated(service):
    tc = service.create_lora_training_client(base_model=DEFAULT_MODEL, rank=1).result()
    with pytest.warns(DeprecationWarning):
        tc.save_weights_and_get_sampling_client(name="x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tc.save_weights_and_get_sampling_client()


# ---- custom losses ---------------------------------------------------------------------------------


def test_forward_backward_custom_equals_cross_entropy(service, examples):
    torch = pytest.importorskip("torch")
    data = [types.Datum(model_input=d.model_input, loss_fn_inputs={"target_tokens": d.loss_fn_inputs["target_tokens"]})
            for d in examples[:4]]
    weights = [torch.tensor(d.loss_fn_inputs["weights"].to_numpy()) for d in examples[:4]]

    def weighted_nll(batch, logprobs):
        assert len(batch) == len(logprobs) and all(lp.requires_grad for lp in logprobs)
        loss = sum(-(lp * w).sum() for lp, w in zip(logprobs, weights))
        return loss, {"custom:sum": float(loss.detach())}

    adam = types.AdamParams(learning_rate=1e-3)
    custom = service.create_lora_training_client(base_model=DEFAULT_MODEL, rank=4, seed=9)
    plain = service.create_lora_training_client(base_model=DEFAULT_MODEL, rank=4, seed=9)
    out = custom.forward_backward_custom(data, weighted_nll)
    assert isinstance(out, tinker.APIFuture)
    out = out.result()
    ref = plain.forward_backward(examples[:4], "cross_entropy").result()
    assert out.metrics["custom:sum"] == pytest.approx(ref.metrics["loss:sum"], rel=1e-5)
    step_custom = custom.optim_step(adam).result().metrics["grad_norm:mean"]
    step_plain = plain.optim_step(adam).result().metrics["grad_norm:mean"]
    assert step_custom == pytest.approx(step_plain, rel=1e-4)

    async def custom_async():
        fut = await custom.forward_backward_custom_async(data, weighted_nll)
        return await fut

    assert "custom:sum" in asyncio.run(custom_async()).metrics


def test_forward_backward_custom_passes_other_inputs_through(service, examples):
    """Since Tinker 0.33 the loss gets the data as given, extra loss_fn_inputs keys included."""
    pytest.importorskip("torch")
    tc = service.create_lora_training_client(base_model=DEFAULT_MODEL, rank=1)
    extra = types.Datum(model_input=examples[0].model_input,
                        loss_fn_inputs={**examples[0].loss_fn_inputs, "advantages": [0.5] * examples[0].model_input.length})
    seen = []

    def loss_fn(data, logprobs):
        seen.append(data)
        return sum((lp * d.loss_fn_inputs["advantages"].to_torch()).sum() for lp, d in zip(logprobs, data)), {}

    tc.forward_backward_custom([extra], loss_fn).result()
    assert seen[0][0] is extra
    with pytest.raises(ValueError, match="No data"):
        tc.forward_backward_custom([], lambda d, lp: (None, {}))


# ---- the rest of the surface ------------------------------------------------------------------------


def test_info_tokenizer_capabilities(service, tokenizer):
    tc = service.create_lora_training_client(DEFAULT_MODEL, rank=2, train_unembed=False)
    info = tc.get_info()
    assert isinstance(info, types.GetInfoResponse)
    assert (info.is_lora, info.lora_rank, info.model_name) == (True, 2, DEFAULT_MODEL)
    assert info.model_data.arch == "llama" and info.model_data.tokenizer_id == DEFAULT_MODEL
    assert tc.model_id.startswith(service.session_id + ":train:")
    assert tc.get_tokenizer() is tokenizer  # one loaded model, one tokenizer
    assert tc.get_tokenizer().encode("hello world", add_special_tokens=False) == [28120, 905]
    caps = service.get_server_capabilities()
    default = [m for m in caps.supported_models if m.model_name == DEFAULT_MODEL]
    assert default and default[0].max_context_length == 8192
    sc = service.create_sampling_client(base_model=DEFAULT_MODEL)
    assert sc.get_base_model() == DEFAULT_MODEL
    assert sc._model is tc._adapter.model  # training and sampling share one loaded copy
    assert service.get_telemetry() is None


def test_service_client_accepts_tinker_arguments():
    with pytest.warns(FutureWarning, match="ignores unsupported arguments: max_retries, timeout"):  # as 0.38 does
        client = tinker.ServiceClient(api_key="tml-xyz", base_url="https://example.invalid", timeout=3, max_retries=1,
                                      user_metadata={"recipe": "x"}, project_id="p")
    assert client.user_metadata == {"recipe": "x"}


def test_sampling_client_pickles(service, examples):
    tc = service.create_lora_training_client(base_model=DEFAULT_MODEL, rank=4, seed=2)
    tc.forward_backward(examples, "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=1e-2))
    sampler = tc.save_weights_and_get_sampling_client()
    prompt = examples[2].model_input
    expected = sampler.compute_logprobs(prompt).result()
    copy = pickle.loads(pickle.dumps(sampler))
    assert copy.compute_logprobs(prompt).result() == expected
    base = pickle.loads(pickle.dumps(service.create_sampling_client(base_model=DEFAULT_MODEL)))
    assert base.compute_logprobs(prompt).result() != expected

    # and in another process, as the cookbook's rollout executors use it
    script = ("import pickle, sys\n"
              "sampler, prompt = pickle.load(sys.stdin.buffer)\n"
              "print(repr(sampler.compute_logprobs(prompt).result()))\n")
    out = subprocess.run([sys.executable, "-c", script], input=pickle.dumps((sampler, prompt)), capture_output=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr.decode()
    assert eval(out.stdout.decode()) == expected


# ---- errors -------------------------------------------------------------------------------------------


def test_error_paths(service, examples):
    tc = service.create_lora_training_client(base_model=DEFAULT_MODEL, rank=1)
    with pytest.raises(ValueError, match="No data provided"):
        tc.forward_backward([], "cross_entropy")
    with pytest.raises(tinker.BadRequestError, match="unknown loss_fn 'mse'"):
        tc.forward_backward(examples, "mse").result()
    bad_token = types.Datum(model_input=types.ModelInput.from_ints([1, 49152]),
                            loss_fn_inputs={"target_tokens": [1, 2], "weights": [1.0, 1.0]})
    with pytest.raises(tinker.BadRequestError, match="outside the vocabulary"):
        tc.forward_backward([bad_token], "cross_entropy").result()
    short = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                        loss_fn_inputs={"target_tokens": [1, 2], "weights": [1.0, 1.0]})
    with pytest.raises(tinker.BadRequestError, match="target_tokens has shape"):
        tc.forward(examples + [short], "cross_entropy").result()
    with pytest.raises(tinker.BadRequestError, match="needs loss_fn_config"):
        tc.forward_backward(examples, "dro").result()
    with pytest.raises(tinker.BadRequestError, match="AdamParams"):
        tc.optim_step({"learning_rate": 1e-3}).result()
    with pytest.raises(ValueError):
        types.AdamParams(learning_rate=float("nan"))
    # the client still works after every error, and nothing was half-applied
    assert tc.forward_backward(examples[:1], "cross_entropy").result().metrics["loss:sum"] > 0

    with pytest.raises(ValueError, match="Either model_path or base_model"):
        service.create_sampling_client()
    with pytest.raises(ValueError, match="tinker://"):
        service.create_sampling_client(model_path="/tmp/weights")
    # 0.38: what needs the model or the files is reported by the client future
    with pytest.raises(tinker.BadRequestError) as info:
        service.create_lora_training_client(base_model="no-such/model").result()
    assert isinstance(info.value, ValueError) and "Cannot find base model" in str(info.value)
    with pytest.raises(tinker.BadRequestError, match="rank"):
        service.create_lora_training_client(base_model=DEFAULT_MODEL, rank=0).result()
    with pytest.raises(tinker.BadRequestError, match="at least one"):
        service.create_lora_training_client(base_model=DEFAULT_MODEL, train_mlp=False, train_attn=False,
                                            train_unembed=False)

    sc = service.create_sampling_client(base_model=DEFAULT_MODEL)
    params = types.SamplingParams(max_tokens=2, stop=[])
    with pytest.raises(tinker.BadRequestError, match="ModelInput"):
        sc.sample([1, 2, 3], 1, params).result()
    with pytest.raises(tinker.BadRequestError, match="vocabulary"):
        sc.sample(types.ModelInput.from_ints([5, 10 ** 6]), 1, params).result()
    with pytest.raises(tinker.BadRequestError, match="num_samples"):
        sc.sample(types.ModelInput.from_ints([5]), 0, params).result()
    with pytest.raises(tinker.BadRequestError, match="empty"):
        asyncio.run(sc.sample_async(types.ModelInput.empty(), 1, params))
    image = types.ModelInput(chunks=[types.ImageChunk(data=b"\x89PNG", format="png", expected_tokens=4)])
    with pytest.raises(tinker.BadRequestError, match="text tokens only"):
        sc.compute_logprobs(image).result()
    assert len(sc.sample(types.ModelInput.from_ints([5, 6]), 1, params).result().sequences[0].tokens) == 2


def test_capabilities_list_the_hugging_face_cache(tmp_path, monkeypatch):
    import json
    import shutil

    import tiny_models as tm

    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-llama" / "snapshots" / "abc123"
    tm.make_hf_checkpoint(snapshot, "llama", max_positions=96)
    (cache / "models--acme--tiny-llama" / "refs").mkdir()
    (cache / "models--acme--tiny-llama" / "refs" / "main").write_text("abc123")
    other = cache / "models--acme--moe" / "snapshots" / "def456"  # a config the engine cannot read (no sizes)
    other.mkdir(parents=True)
    (other / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    partial = cache / "models--acme--partial" / "snapshots" / "0"  # config only: weights not downloaded
    partial.mkdir(parents=True)
    shutil.copy(snapshot / "config.json", partial / "config.json")
    tm.make_hf_checkpoint(cache / "models--acme--tiny-moe" / "snapshots" / "1", "qwen3moe", max_positions=64)
    tm.make_vl_checkpoint(cache / "models--acme--tiny-vl" / "snapshots" / "2", "qwen3vl", max_positions=80)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))

    listed = {m.model_name: m for m in tinker.ServiceClient().get_server_capabilities().supported_models}
    models = {name: m.max_context_length for name, m in listed.items()}
    assert models["acme/tiny-llama"] == 96 and models["acme/tiny-moe"] == 64
    assert "acme/moe" not in models and "acme/partial" not in models
    assert models[DEFAULT_MODEL] == 8192
    assert models["acme/tiny-vl"] == 80
    for name, m in listed.items():  # every listed model trains and samples; the vision-language one takes images
        assert (m.trainable, m.sampleable, m.supports_images) == (True, True, name == "acme/tiny-vl"), name
    assert listed["acme/tiny-moe"].is_moe is True
    assert listed["acme/tiny-llama"].is_moe is False and listed[DEFAULT_MODEL].is_moe is False
    rest = tinker.RestClient().get_server_capabilities().result()
    assert {m.model_name: m for m in rest.supported_models} == listed
    tc = tinker.ServiceClient().create_lora_training_client("acme/tiny-llama", rank=2)
    assert tc.get_info().model_name == "acme/tiny-llama"
