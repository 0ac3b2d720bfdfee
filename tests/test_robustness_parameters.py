"""Large or mistyped numbers, and wrong container types, are refused at the API with the parameter's name,
the value and what is accepted (issue: hostile input, items 6 and 7); never a raw "Python int too large to
convert to C long", "signed integer is greater than maximum" or "cannot convert float NaN to integer", and
never a value narrowed or read by truthiness ('no' as True). The same clients keep working afterwards."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest

import tinker
from tinker import types
from tinker._exceptions import InvalidArgumentError

from robustness import datum, make_clients, still_works  # noqa: E402

HUGE = [2**31, 2**63, 2**70, 10**400]
PROMPT = types.ModelInput.from_ints([1, 2, 3])



@pytest.fixture(scope="module")
def clients(tiny_llama):
    return make_clients(tiny_llama)



def sample_with(sampler, num_samples=1, params=None, **options):
    return sampler.sample(PROMPT, num_samples, params or types.SamplingParams(max_tokens=2), **options).result()


@pytest.mark.parametrize("big", HUGE)
@pytest.mark.parametrize("name, call", [
    ("max_tokens", lambda s, v: sample_with(s, params=types.SamplingParams(max_tokens=v))),
    ("top_k", lambda s, v: sample_with(s, params=types.SamplingParams(max_tokens=2, top_k=v))),
    ("seed", lambda s, v: sample_with(s, params=types.SamplingParams(max_tokens=2, seed=v if v > 2**64 else 2**64 + v))),
    ("num_samples", lambda s, v: sample_with(s, num_samples=v)),
    ("topk_prompt_logprobs", lambda s, v: sample_with(s, topk_prompt_logprobs=v)),
    ("topk_sample_logprobs", lambda s, v: sample_with(s, topk_sample_logprobs=v)),
    ("prompt_alt_tokens_k", lambda s, v: sample_with(s, prompt_alt_tokens_k=v)),
])
def test_huge_sampling_integers_name_the_parameter(clients, name, call, big):
    _, tc, sampler = clients
    shown = str(big if name != "seed" or big > 2**64 else 2**64 + big)
    with pytest.raises(tinker.BadRequestError, match=rf"^{name} is {shown}; it must be an integer from -?\d+ to \d+$"):
        call(sampler, big)
    still_works(tc, sampler)


@pytest.mark.parametrize("name, options, got", [
    ("topk_prompt_logprobs", {"topk_prompt_logprobs": float("nan")}, "nan"),
    ("topk_prompt_logprobs", {"topk_prompt_logprobs": 1.5}, "1.5"),
    ("num_samples", {"num_samples": "2"}, "'2'"),
    ("topk_sample_logprobs", {"topk_sample_logprobs": 2.0}, "2.0"),
])
def test_mistyped_sampling_integers_name_the_parameter(clients, name, options, got):
    _, tc, sampler = clients
    with pytest.raises(tinker.BadRequestError, match=rf"^{name} must be an integer from \d+ to \d+, got {got}"):
        sample_with(sampler, **options)
    still_works(tc, sampler)


@pytest.mark.parametrize("big", [2**31 + 7, 2**70])
def test_stop_token_ids_are_checked_at_full_width(clients, big):
    _, tc, sampler = clients
    with pytest.raises(tinker.BadRequestError, match=rf"stop, position 1: token id {big} is outside the vocabulary"):
        sample_with(sampler, params=types.SamplingParams(max_tokens=2, stop=[3, big]))
    still_works(tc, sampler)


def test_seeds_take_any_64_bit_integer(clients):
    _, tc, sampler = clients
    for seed in (-1, 2**63, 2**64 - 1):
        a = sample_with(sampler, params=types.SamplingParams(max_tokens=4, seed=seed)).sequences[0].tokens
        assert a == sample_with(sampler, params=types.SamplingParams(max_tokens=4, seed=seed)).sequences[0].tokens
    with pytest.raises(tinker.BadRequestError, match=r"^seed is 18446744073709551616; it must be an integer"):
        tc.holder.create_lora_training_client(tc._base_model, rank=2, seed=2**64).result()
    with pytest.raises(tinker.BadRequestError, match=r"^seed must be an integer .* got 'x' \(str\)"):
        tc.holder.create_lora_training_client(tc._base_model, rank=2, seed="x").result()


def test_training_numbers_name_the_parameter(clients):
    sc, tc, sampler = clients
    with pytest.raises(tinker.BadRequestError, match=r"^LoRA rank is 1099511627776; it must be an integer from 1 to 256"):
        sc.create_lora_training_client(tc._base_model, rank=2**40).result()
    assert sc.create_lora_training_client(tc._base_model, rank=np.int64(2)).result().get_info().lora_rank == 2
    rl = types.Datum(model_input=PROMPT, loss_fn_inputs={"target_tokens": [2, 3, 4], "advantages": [1.0] * 3,
                                                         "logprobs": [-1.0] * 3})
    with pytest.raises(tinker.BadRequestError, match=r"loss_fn_config\['clip_low_threshold'\] is 1000.*too large"):
        tc.forward_backward([rl], "ppo", {"clip_low_threshold": 10**400}).result()
    for ttl in (10**400, 2**70, 1e300, float("inf")):
        with pytest.raises(tinker.BadRequestError, match=r"^ttl_seconds is .*; it must be at most 3153600000"):
            tc.save_state("ttl", ttl_seconds=ttl).result()
    with pytest.raises(ValueError, match=r"TensorData shape holds 1180591620717411303424, which does not fit in 64"):
        types.TensorData(data=[1.0], dtype="float32", shape=[2**70])
    still_works(tc, sampler)


def test_flags_are_read_as_the_sdk_reads_them_never_by_truthiness(clients, store):
    sc, tc, sampler = clients
    # 'no' is False (pydantic's reading, the SDK's), where truthiness would have trained the MLP
    info = sc.create_lora_training_client(tc._base_model, rank=2, train_mlp="no").result()
    assert info._adapter.train_mlp is False and info._adapter.train_attn is True
    with pytest.raises(tinker.BadRequestError, match=r"^train_attn must be True or False, got 'maybe'"):
        sc.create_lora_training_client(tc._base_model, rank=2, train_attn="maybe").result()
    out = sample_with(sampler, include_prompt_logprobs="no")
    assert out.prompt_logprobs is None
    with pytest.raises(tinker.BadRequestError, match=r"^include_prompt_logprobs must be True or False, got \[1\]"):
        sample_with(sampler, include_prompt_logprobs=[1])
    tc.save_state("flag").result()
    with pytest.raises(tinker.BadRequestError, match=r"^overwrite must be True or False, got 'sure'"):
        tc.save_state("flag", overwrite="sure").result()
    with pytest.raises(tinker.ConflictError, match="already exists"):
        tc.save_state("flag", overwrite="false").result()
    still_works(tc, sampler)


def test_arguments_are_checked_before_the_store(clients, store):
    _, tc, sampler = clients
    tc.save_state("taken").result()
    with pytest.raises(tinker.BadRequestError, match=r"ttl_seconds must be a positive number"):
        tc.save_state("taken", ttl_seconds=-5).result()  # the bad argument, not the name conflict


def test_wrong_containers_in_custom_loss(clients):
    _, tc, sampler = clients
    with pytest.raises(tinker.BadRequestError, match=r"data must be a list of tinker.Datum, got Datum \(wrap a single"):
        tc.forward_backward_custom(datum(), lambda data, logprobs: (logprobs[0].sum(), {})).result()
    with pytest.raises(TypeError, match=r"loss_fn must be a function or a LossHandle, got str"):
        tc.forward_backward_custom([datum()], "cross_entropy")
    still_works(tc, sampler)


def test_prompt_options_name_what_is_wrong(clients):
    _, tc, sampler = clients
    with pytest.raises(tinker.BadRequestError, match=r"^target_prompt_logprobs must be int token ids .*equal length"):
        sample_with(sampler, target_prompt_logprobs=[[1], [2, 3]])  # ragged: numpy's own ValueError before
    # prompt_alt_tokens_k draws with the sampling seed, which takes any 64-bit integer (numpy's rng takes none < 0)
    for seed in (-1, 2**64 - 1):
        params = types.SamplingParams(max_tokens=2, seed=seed)
        a, b = (sample_with(sampler, params=params, prompt_alt_tokens_k=3).prompt_alt_tokens for _ in range(2))
        np.testing.assert_array_equal(a.tokens.to_numpy(), b.tokens.to_numpy())
    still_works(tc, sampler)


def outcome(call):
    """What a call raises, synchronously or through the future it returns."""
    try:
        result = call()
        if hasattr(result, "result"):
            result.result()
    except Exception as e:  # noqa: BLE001 - the test looks at it
        return e
    raise AssertionError("accepted")


@pytest.mark.parametrize("path", [None, 7, "", "weights/a", "tinker://", "tinker://../weights/a", "tinker://r/foo/a",
                                  "tinker://r/weights/a/b", "tinker://r/weights/a\0b", "tinker://r/weights/.."])
def test_malformed_paths_are_bad_requests_from_every_call(clients, store, path):
    """load_state refused a malformed tinker:// path with a BadRequestError, but RestClient, create_sampling_client,
    create_training_client_from_state and copy_weights raised a bare ValueError for the same path. Every one now
    raises InvalidArgumentError: a BadRequestError, and still the ValueError the SDK raises there."""
    sc, tc, sampler = clients
    rc = tinker.RestClient()
    calls = [rc.get_weights_info_by_tinker_path, rc.get_training_run_by_tinker_path, rc.delete_checkpoint_from_tinker_path,
             rc.get_checkpoint_archive_url_from_tinker_path, rc.get_external_weights_urls, rc.copy_weights,
             lambda p: rc.set_checkpoint_ttl_from_tinker_path(p, 60), sc.create_training_client_from_state]
    if path is not None:
        calls.append(lambda p: sc.create_sampling_client(model_path=p))
    for call in calls:
        error = outcome(lambda: call(path))
        assert isinstance(error, tinker.BadRequestError), (call, error)  # an InvalidArgumentError where the SDK's
        assert isinstance(error, ValueError) or call == sc.create_training_client_from_state  # is a ValueError
        assert re.search(r"tinker path|tinker://", str(error)), error
    still_works(tc, sampler)


@pytest.mark.parametrize("run_id, checkpoint_id", [("..", "weights/a"), ("", "weights/a"), (None, "weights/a"),
                                                   ("r" * 300, "weights/a"), ("r", "weights/.."), ("r", None),
                                                   ("r", "other/a"), ("r", "weights/a\0")])
def test_malformed_ids_are_bad_requests(clients, store, run_id, checkpoint_id):
    rc = tinker.RestClient()
    for call in (lambda: rc.delete_checkpoint(run_id, checkpoint_id), lambda: rc.get_checkpoint_archive_url(
            run_id, checkpoint_id), lambda: rc.get_training_run(run_id), lambda: rc.list_checkpoints(run_id)):
        error = outcome(call)
        if run_id == "r" and isinstance(error, tinker.NotFoundError):
            continue  # a well-formed run id that is not in the store
        assert isinstance(error, InvalidArgumentError), error
        assert re.search(r"invalid (training run id|checkpoint id|checkpoint name)", str(error)), error
        assert len(str(error)) < 800


def handle(**state):
    return base64.urlsafe_b64encode(json.dumps(state).encode()).decode()


@pytest.mark.parametrize("bad", [
    handle(sampling_session_id=[1], base_model="m"), handle(sampling_session_id="s", base_model=5),
    handle(sampling_session_id="s", base_model="m", model_path=7), handle(base_model="m"),
    handle(sampling_session_id="s", base_model="m", record_stability_info="no"),
    base64.urlsafe_b64encode(b"[" * 100_000).decode(), "not base64 !", None, 12,
])
def test_damaged_sampler_handles_are_refused(clients, bad):
    """A handle whose fields had the wrong types raised TypeError (unhashable type: 'list'), one of deeply nested
    JSON RecursionError, and 'no' read by truthiness turned record_stability_info on."""
    _, tc, sampler = clients
    with pytest.raises(InvalidArgumentError, match=r"^not a sampler handle"):
        tinker.SamplingClient.from_sampler_handle(bad)
    still_works(tc, sampler)


def test_store_records_take_only_what_they_can_hold(clients, store):
    """ServiceClient(user_metadata={'a': 1}, project_id=5) was accepted, and the first save wrote a run.json that the
    store then reported as damaged; copy_weights(destination_project_id=5) did the same to the copy's run."""
    sc, tc, sampler = clients
    for kwargs, name in [({"user_metadata": {"a": 1}}, "user_metadata"), ({"user_metadata": ["a"]}, "user_metadata"),
                         ({"project_id": 5}, "project_id"), ({"display_name": ["x"]}, "display_name")]:
        with pytest.raises(tinker.BadRequestError, match=rf"^{name} must be a"):
            tinker.ServiceClient(**kwargs)
    with pytest.raises(tinker.BadRequestError, match=r"^user_metadata must be a dict of str to str"):
        sc.create_lora_training_client(tc._base_model, rank=2, user_metadata={"a": 1}).result()
    path = tc.save_weights_for_sampler("s").result().path
    with pytest.raises(tinker.BadRequestError, match=r"^destination_project_id must be a str or None, got 5"):
        tinker.RestClient().copy_weights(path, 5).result()
    assert tinker.RestClient().list_training_runs().result().training_runs[0].corrupted is False
    still_works(tc, sampler)


def test_flags_of_sampling_clients_are_not_read_by_truthiness(clients, tiny_llama):
    sc, tc, sampler = clients
    assert sc.create_sampling_client(base_model=tiny_llama, record_stability_info="no").result() \
        .record_stability_info is False
    assert tc.save_weights_and_get_sampling_client(record_stability_info="false").result().record_stability_info is False
    with pytest.raises(tinker.BadRequestError, match=r"^record_stability_info must be True or False, got 'maybe'"):
        sc.create_sampling_client(base_model=tiny_llama, record_stability_info="maybe").result()
    still_works(tc, sampler)


def test_stop_strings_that_cannot_be_matched_are_refused(clients):
    """A lone surrogate raised UnicodeEncodeError from deep in the sampler; a stop string on a checkpoint without
    tokenizer files (the tiny test model) raised FileNotFoundError."""
    _, tc, sampler = clients
    with pytest.raises(tinker.BadRequestError, match=r"^stop, position 1: '\\ud800' is not valid text"):
        sample_with(sampler, params=types.SamplingParams(max_tokens=2, stop=["a", "\ud800"]))
    with pytest.raises(tinker.BadRequestError, match=r"^stop strings need the model's tokenizer: .*tokenizer files"):
        sample_with(sampler, params=types.SamplingParams(max_tokens=2, stop=["a"]))
    still_works(tc, sampler)
