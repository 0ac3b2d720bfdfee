"""Shared by the hostile-input tests: a training and a sampling client on the tiny model, and the check that
they keep working after a refused call (a valid forward_backward, optim_step and sample)."""

from __future__ import annotations

from tinker import types


def datum(tokens=(1, 2, 3)):
    tokens = list(tokens)
    return types.Datum(model_input=types.ModelInput.from_ints(tokens),
                       loss_fn_inputs={"target_tokens": [1] * len(tokens), "weights": [1.0] * len(tokens)})


def make_clients(model_path: str):
    """(ServiceClient, TrainingClient rank 2, base-model SamplingClient) on `model_path`."""
    import tinker

    sc = tinker.ServiceClient()
    tc = sc.create_lora_training_client(model_path, rank=2).result()
    return sc, tc, sc.create_sampling_client(base_model=model_path).result()


def still_works(tc, sampler):
    assert tc.forward_backward([datum()], "cross_entropy").result().metrics["loss:sum"] > 0
    tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    params = types.SamplingParams(max_tokens=3, temperature=0.0, stop=[])  # stop=[]: EOS cannot end it early
    out = sampler.sample(types.ModelInput.from_ints([1, 2]), 2, params)
    assert [len(s.tokens) for s in out.result().sequences] == [3, 3]
