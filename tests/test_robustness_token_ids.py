"""Integers past int32 (and past 64 bits) are checked at the width the user gave them: a token id of
2**32 + 5 is refused with that value, never narrowed to token 5 (issue: hostile input, item 1); a TTL
under one second is rounded up, never handed out already expired (item 3). The same client keeps
working afterwards."""

from __future__ import annotations

import time

import pytest

import tinker
from tinker import types

from robustness import datum, make_clients, still_works  # noqa: E402

BIG = [2**32 + 5, 2**63 - 1, 2**64 + 5, -(2**40)]



@pytest.fixture(scope="module")
def clients(tiny_llama):
    return make_clients(tiny_llama)



@pytest.mark.parametrize("bad", BIG)
def test_training_token_ids_checked_at_full_width(clients, bad):
    _, tc, sampler = clients
    for call in (tc.forward, tc.forward_backward):
        with pytest.raises(tinker.BadRequestError, match=rf"sequence 0, position 1: token id {bad} is outside the vocabulary"):
            call([datum([1, bad, 3])], "cross_entropy").result()
    still_works(tc, sampler)


@pytest.mark.parametrize("bad", BIG)
def test_prompt_token_ids_checked_at_full_width(clients, bad):
    _, tc, sampler = clients
    prompt = types.ModelInput.from_ints([1, bad])
    with pytest.raises(tinker.BadRequestError, match=rf"prompt, position 1: token id {bad} is outside the vocabulary"):
        sampler.sample(prompt, 1, types.SamplingParams(max_tokens=2)).result()
    with pytest.raises(tinker.BadRequestError, match=rf"prompt, position 1: token id {bad} is outside the vocabulary"):
        sampler.compute_logprobs(prompt).result()
    still_works(tc, sampler)


def test_subsecond_ttl_is_rounded_up(clients, store, tiny_llama):
    _, _, sampler = clients
    tc = tinker.ServiceClient().create_lora_training_client(tiny_llama, rank=2).result()
    path = tc.save_state("short", ttl_seconds=0.5).result().path
    # the path handed back is alive: a client can be made from it at once
    tinker.ServiceClient().create_training_client_from_state(path).result()
    time.sleep(1.2)
    with pytest.raises(tinker.TinkerError):
        tinker.ServiceClient().create_training_client_from_state(path).result()
    still_works(tc, sampler)


def test_min_p_has_one_range(clients):
    """SamplingParams and the engine agree on min_p's range [0, 1]: at 1 only the most likely token is left
    (issue: hostile input, item 9), so sampling at temperature 1 gives the greedy tokens."""
    _, tc, sampler = clients
    prompt = types.ModelInput.from_ints([1, 2, 3])
    greedy = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=6, temperature=0.0)).result()
    top = sampler.sample(prompt, 2, types.SamplingParams(max_tokens=6, temperature=1.0, min_p=1.0, seed=5)).result()
    assert [s.tokens for s in top.sequences] == [greedy.sequences[0].tokens] * 2
    with pytest.raises(ValueError, match="min_p"):
        types.SamplingParams(max_tokens=2, min_p=1.5)
    still_works(tc, sampler)


@pytest.mark.parametrize("args, match", [
    (("DATUM", "cross_entropy"), r"data must be a list of tinker.Datum, got Datum \(wrap a single datum"),
    (("abc", "cross_entropy"), "data must be a list of tinker.Datum, got str"),
    ((["DATUM"], ["cross_entropy"]), "loss_fn must be a loss name"),
    ((["DATUM"], "cross_entropy", [1]), "loss_fn_config must be a dict"),
    ((["DATUM"], "cross_entropy", "clip"), "loss_fn_config must be a dict"),
])
def test_wrong_container_types_say_what_was_expected(clients, args, match):
    """Issue: hostile input, item 7: a datum instead of a list, a list as loss_fn or loss_fn_config."""
    _, tc, sampler = clients
    d = datum([1, 2, 3])
    args = tuple(d if a == "DATUM" else [d] if a == ["DATUM"] else a for a in args)
    for call in (tc.forward, tc.forward_backward):
        with pytest.raises(tinker.BadRequestError, match=match):
            call(*args).result()
    still_works(tc, sampler)


@pytest.mark.parametrize("big", [1e30, -1e19, 2.0**63])
def test_float_ids_past_int64_are_refused_not_wrapped(clients, big):
    """A float target of 1e30 became int64's -2**63 silently (numpy's astype); now it is refused where it is made."""
    _, tc, sampler = clients
    with pytest.raises(ValueError, match=r"TensorData with dtype 'int64' got .*outside int64's range"):
        types.TensorData(data=[1.0, big], dtype="int64")
    with pytest.raises(ValueError, match=r"loss_fn_inputs\['target_tokens'\].*outside int64's range"):
        datum_with_targets = types.Datum(model_input=types.ModelInput.from_ints([1, 2]),
                                         loss_fn_inputs={"target_tokens": [1.0, big], "weights": [1.0, 1.0]})
        tc.forward_backward([datum_with_targets], "cross_entropy").result()
    assert types.TensorData(data=[2.0**62], dtype="int64").data == [2**62]
    still_works(tc, sampler)
