"""Checkpoints: save_state / load_state(_with_optimizer) / save_weights_for_sampler, resuming in a new
process bit for bit, PEFT compatibility, crash safety, corruption and path security."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tinker
from tinker import _checkpoints as ckpt
from tinker import types
from tinker._models import DEFAULT_MODEL


ADAM = types.AdamParams(learning_rate=1e-2)
pytestmark = pytest.mark.usefixtures("store")  # each test gets its own checkpoint store


@pytest.fixture(scope="module")
def service():
    return tinker.ServiceClient()


def data(seed: int, n: int = 3, length: int = 20, vocab: int = 49152) -> list[types.Datum]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens = rng.integers(0, vocab, size=length).tolist()
        out.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                               loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (length - 1)}))
    return out


def steps(tc, n: int, seed: int = 100, vocab: int = 49152) -> list[tuple[float, float]]:
    out = []
    for i in range(n):
        fb = tc.forward_backward(data(seed + i, vocab=vocab), "cross_entropy")
        opt = tc.optim_step(ADAM)
        out.append((fb.result().metrics["loss:sum"], opt.result().metrics["grad_norm:mean"]))
    return out


def trained(service, base=DEFAULT_MODEL, vocab=49152, **kwargs):
    tc = service.create_lora_training_client(base, **{"rank": 4, "seed": 7, **kwargs})
    steps(tc, 2, seed=1, vocab=vocab)
    return tc


# ---- resume ------------------------------------------------------------------------------------------

RESUME_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import tinker
from test_checkpoints import steps
client = tinker.ServiceClient().create_training_client_from_state_with_optimizer({path!r})
print(json.dumps(steps(client, 2)))
"""


def test_resume_in_a_new_process_is_bit_for_bit(service, store):
    tc = trained(service)
    path = tc.save_state("step2").result().path
    assert path == f"tinker://{tc.model_id}/weights/step2"
    uninterrupted = steps(tc, 2)
    script = RESUME_SCRIPT.format(tests=str(Path(__file__).parent), path=path)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TINKER_HOME": str(store)})
    assert out.returncode == 0, out.stderr
    resumed = [tuple(x) for x in json.loads(out.stdout.strip().splitlines()[-1])]
    assert resumed == uninterrupted  # losses and gradient norms, bit for bit


def test_load_state_starts_from_fresh_adam(service):
    tc = trained(service)
    path = tc.save_state("s").result().path
    saved = tc._adapter.parameters()
    other = service.create_lora_training_client(DEFAULT_MODEL, rank=4, seed=99)
    steps(other, 1)  # moments, step and gradients that the load must clear
    other.forward_backward(data(5), "cross_entropy")
    assert isinstance(other.load_state(path).result(), types.LoadWeightsResponse)
    params = other._adapter.parameters()
    assert all(np.array_equal(params[k], saved[k]) for k in saved)
    state = other._adapter.optimizer_state()
    assert state["step"] == 0
    assert all(not v.any() for v in state["exp_avg"].values()) and all(not v.any() for v in state["exp_avg_sq"].values())
    assert all(not g.any() for g in other._adapter.gradients().values())

    fresh = service.create_training_client_from_state(path)
    assert fresh.get_info().lora_rank == 4 and fresh._adapter.optimizer_state()["step"] == 0
    assert steps(fresh, 1) == steps(other, 1)


def test_load_with_optimizer_restores_moments(service):
    tc = trained(service)
    path = tc.save_state("s").result().path
    expected = tc._adapter.optimizer_state()
    other = service.create_lora_training_client(DEFAULT_MODEL, rank=4, seed=1)
    other.load_state_with_optimizer(path).result()
    got = other._adapter.optimizer_state()
    assert got["step"] == expected["step"] == 2
    assert all(np.array_equal(got["exp_avg_sq"][k], v) for k, v in expected["exp_avg_sq"].items())


def test_save_is_ordered_in_the_queue(service):
    tc = service.create_lora_training_client(DEFAULT_MODEL, rank=4, seed=3)
    tc.forward_backward(data(1), "cross_entropy")
    tc.optim_step(ADAM)
    save = tc.save_state("after-one-step")  # not waited for: the later steps must not leak into it
    tc.forward_backward(data(2), "cross_entropy")
    tc.optim_step(ADAM).result()
    loaded = ckpt.load_checkpoint(save.result().path, with_optimizer=True)
    assert loaded.step == 1


def test_sampler_from_saved_path_samples_like_the_original(service):
    tc = trained(service)
    live = tc.save_weights_and_get_sampling_client()
    path = tc.save_weights_for_sampler("final").result().path
    assert path == f"tinker://{tc.model_id}/sampler_weights/final"
    prompt = data(9)[0].model_input
    params = types.SamplingParams(max_tokens=12, temperature=0.8, seed=5)
    for saved in (service.create_sampling_client(model_path=path), tc.create_sampling_client(path),
                  service.create_sampling_client(model_path=tc.save_state("w").result().path)):
        assert saved.compute_logprobs(prompt).result() == live.compute_logprobs(prompt).result()
        assert saved.sample(prompt, 2, params).result().sequences[1].tokens == \
            live.sample(prompt, 2, params).result().sequences[1].tokens
    by_path = service.create_sampling_client(model_path=path)
    import pickle

    assert pickle.loads(pickle.dumps(by_path)).compute_logprobs(prompt).result() == \
        live.compute_logprobs(prompt).result()


def test_async_twins(service):
    tc = trained(service)

    async def main():
        save = await tc.save_state_async("a")
        sampler_save = await tc.save_weights_for_sampler_async("b")
        path = (await save).path
        assert (await sampler_save.result_async()).path.endswith("/sampler_weights/b")
        load = await tc.load_state_async(path)
        assert (await load).path == path
        await (await tc.load_state_with_optimizer_async(path))
        client = await service.create_training_client_from_state_async(path)
        resumed = await service.create_training_client_from_state_with_optimizer_async(path)
        sampler = await tc.create_sampling_client_async(path)
        return client, resumed, sampler

    client, resumed, sampler = asyncio.run(main())
    assert resumed._adapter.optimizer_state()["step"] == 2 and client._adapter.optimizer_state()["step"] == 0
    assert isinstance(sampler, tinker.SamplingClient)


# ---- PEFT --------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`", "ignore::FutureWarning")
def test_peft_loads_the_sampler_checkpoint(service, smollm2_gguf_path):
    torch = pytest.importorskip("torch")
    import transformers
    from peft import PeftModel

    tc = trained(service, rank=8)
    path = tc.save_weights_for_sampler("peft").result().path
    run_id, kind, name = ckpt.parse_path(path)
    directory = ckpt.checkpoint_dir(run_id, kind, name)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_gguf_path.parent),
                                                             gguf_file=smollm2_gguf_path.name, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(directory)).eval()
    tokens = data(11, n=1, length=40)[0].model_input.to_ints()
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].double()
    theirs = torch.log_softmax(logits, -1)[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])].numpy()
    ours = service.create_sampling_client(model_path=path).compute_logprobs(
        types.ModelInput.from_ints(tokens)).result()[1:]
    np.testing.assert_allclose(ours, theirs, atol=1e-3)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_continue_training_from_a_peft_directory(service, tiny_llama, tmp_path):
    torch = pytest.importorskip("torch")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation="eager")
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 lora_dropout=0.0))
    torch.manual_seed(0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.2)
    peft_model.save_pretrained(tmp_path / "adapter")
    tc = service.create_training_client_from_state(str(tmp_path / "adapter"), base_model=tiny_llama)
    info = tc.get_info()
    assert info.lora_rank == 4 and not tc._adapter.train_unembed
    tokens = list(range(3, 40))
    with torch.no_grad():
        logits = peft_model.eval()(torch.tensor([tokens])).logits[0].double()
    theirs = torch.log_softmax(logits, -1)[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])].numpy()
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
    ours = tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    assert steps(tc, 1, vocab=256)[0][0] > 0  # and it trains on


# ---- crash safety and corruption ----------------------------------------------------------------------

KILLED_SAVE_SCRIPT = """
import os, sys
import tinker
from tinker import _checkpoints as ckpt
original = ckpt._write_file
def dying_write(path, data):
    if path.name == ckpt.OPTIMIZER:
        os._exit(9)  # the process dies in the middle of the save
    return original(path, data)
ckpt._write_file = dying_write
client = tinker.ServiceClient().create_training_client_from_state_with_optimizer({path!r})
client.save_state("second").result()
"""


def test_killed_save_leaves_earlier_checkpoints_and_nothing_partial(service, store):
    tc = trained(service)
    first = tc.save_state("first").result().path
    out = subprocess.run([sys.executable, "-c", KILLED_SAVE_SCRIPT.format(path=first)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "TINKER_HOME": str(store)})
    assert out.returncode == 9, out.stderr
    runs = [p for p in (store / "runs").iterdir() if p.name != tc.model_id]
    assert len(runs) == 1  # the dead process's run exists, with no loadable "second"
    second = f"tinker://{runs[0].name}/weights/second"
    with pytest.raises(tinker.NotFoundError):
        ckpt.load_checkpoint(second)
    with pytest.raises(tinker.NotFoundError):  # 0.38: reported by the client future
        service.create_training_client_from_state(second).result()
    assert ckpt.load_checkpoint(first, with_optimizer=True).step == 2  # the earlier checkpoint is intact


def _checkpoint_files(path):
    return ckpt.checkpoint_dir(*ckpt.parse_path(path))


@pytest.mark.parametrize("damage", ["truncate", "flip", "no-manifest", "bad-manifest", "missing-file"])
def test_corrupt_checkpoint_raises_a_clear_error(service, damage):
    tc = trained(service)
    path = tc.save_state("c").result().path
    directory = _checkpoint_files(path)
    weights = directory / ckpt.ADAPTER_WEIGHTS
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "flip":
        raw = bytearray(weights.read_bytes())
        raw[-5] ^= 0x40
        weights.write_bytes(bytes(raw))
    elif damage == "no-manifest":
        (directory / ckpt.MANIFEST).unlink()
    elif damage == "bad-manifest":
        (directory / ckpt.MANIFEST).write_text("{not json")
    else:
        (directory / ckpt.OPTIMIZER).unlink()
    with pytest.raises(tinker.BadRequestError, match="corrupt|cannot read|incomplete"):
        tc.load_state_with_optimizer(path).result()
    with pytest.raises(tinker.BadRequestError):  # 0.38: reported by the client future
        service.create_sampling_client(model_path=path).result() if damage != "missing-file" else \
            tc.load_state_with_optimizer(path).result()
    assert steps(tc, 1)[0][0] > 0  # the client keeps working


def test_incompatible_checkpoint(service, tiny_llama):
    path = trained(service).save_state("r4").result().path
    other_rank = service.create_lora_training_client(DEFAULT_MODEL, rank=8)
    with pytest.raises(tinker.BadRequestError, match="does not match this adapter"):
        other_rank.load_state(path).result()
    other_base = service.create_lora_training_client(tiny_llama, rank=4)
    with pytest.raises(tinker.BadRequestError, match="was trained on"):
        other_base.load_state(path).result()
    sampler_only = trained(service).save_weights_for_sampler("s").result().path
    with pytest.raises(tinker.BadRequestError, match="no optimizer state"):
        other_rank.load_state_with_optimizer(sampler_only).result()


# ---- names, paths, TTLs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["..", "../escape", "a/b", "/abs", "", ".hidden", "a\0b", "-x", "x" * 300, 5])
def test_bad_names_cannot_write_outside_the_store(service, store, name):
    tc = service.create_lora_training_client(DEFAULT_MODEL, rank=1)
    with pytest.raises(tinker.BadRequestError, match="invalid checkpoint name"):
        tc.save_state(name).result()
    with pytest.raises(tinker.BadRequestError, match="invalid checkpoint name"):
        tc.save_weights_for_sampler(name).result()
    assert not list(store.parent.glob("escape*"))


@pytest.mark.parametrize("path", ["tinker://run/weights", "tinker://run/other/x", "http://run/weights/x",
                                  "tinker://../weights/x", "tinker://run/weights/..", "tinker://run/weights/a/b",
                                  "tinker:///weights/x", "tinker://run/weights/x\0y", "tinker://run/weights/.x"])
def test_malformed_paths_raise_value_error(service, path):
    with pytest.raises(ValueError):
        ckpt.parse_path(path)
    with pytest.raises(ValueError):
        service.create_sampling_client(model_path=path)
    tc = service.create_lora_training_client(DEFAULT_MODEL, rank=1)
    with pytest.raises(tinker.BadRequestError):
        tc.load_state(path).result()


def test_symlinks_cannot_lead_outside_the_store(service, store, tmp_path):
    tc = trained(service)
    tc.save_state("real").result()
    outside = tmp_path / "outside"
    outside.mkdir()
    link = store / "runs" / tc.model_id / "weights" / "evil"
    link.symlink_to(outside)
    with pytest.raises(tinker.BadRequestError, match="outside the checkpoint store"):
        tc.load_state(f"tinker://{tc.model_id}/weights/evil").result()
    with pytest.raises(tinker.BadRequestError, match="outside"):
        tc.save_state("evil", overwrite=True).result()
    assert not list(outside.iterdir())


def test_overwrite_and_ttl(service):
    tc = trained(service)
    tc.save_state("same").result()
    with pytest.raises(tinker.ConflictError, match="overwrite=True"):
        tc.save_state("same").result()
    steps(tc, 1)
    path = tc.save_state("same", overwrite=True).result().path
    assert ckpt.load_checkpoint(path, with_optimizer=True).step == 3
    with pytest.raises(tinker.BadRequestError, match="ttl_seconds"):
        tc.save_state("t", ttl_seconds=-5).result()
    short = tc.save_weights_for_sampler("short", ttl_seconds=1).result().path
    service.create_sampling_client(model_path=short).result()
    time.sleep(1.2)
    with pytest.raises(tinker.NotFoundError, match="expired"):  # 0.38: reported by the client future
        service.create_sampling_client(model_path=short).result()
    assert not _checkpoint_files(short).exists()
