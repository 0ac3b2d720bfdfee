"""Optimizer selection (0.30+), custom losses by handle (0.36+), the 0.38 forward_backward_custom
rules, and external weights (0.33+), through the public clients on a tiny random Llama."""

from __future__ import annotations

import asyncio
import json
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import tinker
from tinker import types
from tiny_models import make_hf_checkpoint


@pytest.fixture(scope="module")
def model_name(tmp_path_factory):
    path, _ = make_hf_checkpoint(tmp_path_factory.mktemp("sdk038o") / "llama", "llama", max_positions=64)
    return str(path)


@pytest.fixture
def service(store):
    return tinker.ServiceClient()


def data(n=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for length in range(4, 4 + n):
        ids = rng.integers(1, 60, size=length + 1).tolist()
        out.append(types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                               loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * length}))
    return out


# ---- optimizer selection ---------------------------------------------------------------------------


def test_optimizer_config_and_optim_step_forms(service, model_name):
    tc = service.create_lora_training_client(model_name, rank=2, seed=0, optimizer=types.AdamOptimizerConfig())
    assert tc.get_info().optimizer_config == types.AdamOptimizerConfig()
    default = service.create_lora_training_client(model_name, rank=2, seed=0)
    assert default.get_info().optimizer_config.type == "adamw"
    adam = types.AdamParams(learning_rate=1e-3)
    tc.forward_backward(data(), "cross_entropy")
    default.forward_backward(data(), "cross_entropy")
    a = tc.optim_step(adam).result().metrics
    b = default.optim_step(optim_params=adam).result().metrics
    assert a == b
    assert default.optim_step(adam_params=adam).result().metrics["step:max"] == 2
    with pytest.raises(ValueError, match="not both"):
        tc.optim_step(adam, adam_params=adam)
    with pytest.raises(TypeError, match="missing"):
        tc.optim_step()
    with pytest.raises(tinker.BadRequestError, match="optimizer is 'adamw'"):
        tc.optim_step(types.DimuonParams(learning_rate=1e-3)).result()
    assert asyncio.run(_twice(tc.optim_step_async(optim_params=adam))).metrics["step:max"] == 2


async def _twice(coro):
    return await (await coro)


def test_weights_info_says_the_runs_optimizer(service, model_name, store):
    tc = service.create_lora_training_client(model_name, rank=2, seed=0)
    path = tc.save_state("s").result().path
    rest = tinker.RestClient()
    info = rest.get_weights_info_by_tinker_path(path).result()
    assert info.optimizer_config == types.AdamOptimizerConfig() and info.lora_rank == 2
    # a run recorded before the field existed reads as AdamW, the only optimizer it could have had
    run_json = next(store.rglob("run.json"))
    record = json.loads(run_json.read_text())
    del record["optimizer_config"]
    run_json.write_text(json.dumps(record))
    assert rest.get_weights_info_by_tinker_path(path).result().optimizer_config.type == "adamw"
    assert types.GetInfoResponse(model_data=types.ModelData(), model_id="m").optimizer_config.type == "adamw"


def test_dimuon_says_what_is_missing(service, model_name):
    with pytest.raises(tinker.BadRequestError, match="update rule.*matrix-sign"):
        service.create_lora_training_client(model_name, rank=2, optimizer=types.DimuonOptimizerConfig())
    with pytest.raises(tinker.BadRequestError, match="unknown optimizer type 'lion'"):
        service.create_lora_training_client(model_name, rank=2, optimizer=types.OptimizerConfigBase(type="lion"))


def test_optimizer_types():
    assert tinker.DimuonParams(learning_rate=0.1).beta1 == 0.9
    with pytest.raises(Exception):
        tinker.DimuonParams(learning_rate=-1.0)
    with pytest.raises(Exception):
        tinker.DimuonParams()  # learning_rate is required
    for key in ("optim_params", "adam_params", "optimizer_params"):
        req = types.OptimStepRequest(**{key: types.AdamParams()}, model_id="m")
        assert isinstance(req.optim_params, types.AdamParams) and req.adam_params == types.AdamParams()
    req = types.OptimStepRequest(optim_params={"type": "dimuon", "learning_rate": 0.5}, model_id="m")
    assert isinstance(req.optim_params, types.DimuonParams) and req.adam_params is None
    assert types.DimuonOptimizerConfig().version == 1 and tinker.AdamOptimizerConfig().type == "adamw"


# ---- forward_backward_custom (0.38) and LossHandle ---------------------------------------------------


def test_custom_loss_metrics_order_and_handle(service, model_name):
    torch = pytest.importorskip("torch")
    batch = data()
    custom = service.create_lora_training_client(model_name, rank=2, seed=5)
    plain = service.create_lora_training_client(model_name, rank=2, seed=5)
    adam = types.AdamParams(learning_rate=1e-2)

    def nll(d, logprobs):
        loss = sum(-(lp * x.loss_fn_inputs["weights"].to_torch()).sum() for lp, x in zip(logprobs, d))
        return 2 * loss, {"custom:sum": float(loss.detach())}

    fut = custom.forward_backward_custom(batch, nll)
    step = custom.optim_step(adam)  # queued after the custom pass's backward
    out = fut.result()
    ref = plain.forward_backward(batch, "cross_entropy").result()
    ref_step = plain.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    assert out.metrics["loss:sum"] == pytest.approx(2 * ref.metrics["loss:sum"], rel=1e-5)
    # the linear pass: sum(-lp * (-dL/dlp)) = sum(-lp * 2w), here equal to the custom loss
    assert out.metrics["surrogate_loss:sum"] == pytest.approx(2 * ref.metrics["loss:sum"], rel=1e-5)
    assert out.metrics["custom:sum"] == pytest.approx(ref.metrics["loss:sum"], rel=1e-5)
    assert step.result().metrics["grad_norm:mean"] == pytest.approx(2 * ref_step.metrics["grad_norm:mean"], rel=1e-4)

    def neg_ll(logprobs, weights):
        loss = -(logprobs * weights).sum()
        return loss, {"custom/neg_ll:sum": loss, "custom/tokens:mean": weights.sum()}

    handle = service.create_custom_loss(neg_ll, input_ranks={"logprobs": 1, "weights": 1}).result()
    assert isinstance(handle, tinker.lib.public_interfaces.custom_loss.LossHandle) and handle.loss_id is None
    assert [i.name for i in handle.inputs] == ["logprobs", "weights"]
    now = plain.forward(batch, "cross_entropy").result().metrics["loss:sum"]  # after plain's step
    by_handle = plain.forward_backward_custom(batch, handle).result()
    assert by_handle.metrics["loss:sum"] == pytest.approx(now, rel=1e-5)
    assert by_handle.metrics["custom/neg_ll:sum"] == pytest.approx(now, rel=1e-5)
    assert by_handle.metrics["custom/tokens:mean"] == pytest.approx(np.mean([4, 5, 6]))
    with pytest.raises(ValueError, match="one rank per parameter"):
        service.create_custom_loss(neg_ll, input_ranks={"logprobs": 1}).result()
    with pytest.raises(ValueError, match="rank 1, but loss 'neg_ll' declared weights with rank 2"):
        handle2 = service.create_custom_loss(neg_ll, input_ranks={"logprobs": 1, "weights": 2}).result()
        plain.forward_backward_custom(batch, handle2)
    with pytest.warns(DeprecationWarning, match="loss_type_input"):
        plain.forward_backward_custom(batch, nll, loss_type_input="logprobs").result()
    failing = plain.forward_backward_custom(batch, lambda d, lp: (torch.tensor(1.0), {}))
    with pytest.raises(ValueError, match="no gradient"):
        failing.result()
    assert plain.forward(batch, "cross_entropy").result().metrics["loss:sum"] > 0  # the client goes on


# ---- external weights -------------------------------------------------------------------------------


def local(url: str) -> Path:
    return Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))


def test_save_weights_external_and_urls(service, model_name, tmp_path):
    tc = service.create_lora_training_client(model_name, rank=2, seed=3)
    rest = service.create_rest_client()
    plain = tc.save_weights_external("plain").result()
    assert isinstance(plain, types.SaveWeightsExternalResponse)
    assert plain.path == f"tinker://{tc.model_id}/external_weights/plain"
    assert types.ParsedCheckpointTinkerPath.from_tinker_path(plain.path).checkpoint_type == "external"
    urls = rest.get_external_weights_urls(plain.path).result()
    assert set(urls.urls) == {"adapter_config.json", "adapter_model.safetensors"} and urls.expires is not None
    sampler_path = tc.save_weights_for_sampler("same").result().path
    sampler_dir = local(urls.urls["adapter_model.safetensors"]).parents[2]
    want = (sampler_dir / "sampler_weights" / "same" / "adapter_model.safetensors").read_bytes()
    fetched = tmp_path / "w.safetensors"
    urllib.request.urlretrieve(urls.urls["adapter_model.safetensors"], fetched)
    assert fetched.read_bytes() == want and sampler_path.endswith("/same")

    pyrage = pytest.importorskip("pyrage")
    identity = pyrage.x25519.Identity.generate()
    secret = tc.save_weights_external("secret", ttl_seconds=3600,
                                      age_encryption_recipients=[str(identity.to_public())]).result()
    enc = rest.get_external_weights_urls(secret.path).result()
    assert set(enc.urls) == {"adapter_config.json.age", "adapter_model.safetensors.age"} and enc.encrypted
    blob = local(enc.urls["adapter_model.safetensors.age"]).read_bytes()
    assert pyrage.decrypt(blob, [identity]) == want
    rest.set_checkpoint_ttl_from_tinker_path(secret.path, 7200).result()
    rest.delete_checkpoint_from_tinker_path(secret.path).result()
    with pytest.raises(tinker.NotFoundError):
        rest.get_external_weights_urls(secret.path).result()
    with pytest.raises(tinker.BadRequestError, match="age public keys"):
        tc.save_weights_external("bad", age_encryption_recipients=["not-a-key"]).result()
    with pytest.raises(tinker.BadRequestError, match="not an external weights checkpoint"):
        rest.get_external_weights_urls(sampler_path).result()


def test_exports():
    for name in ("LossHandle", "PerDatumLossFn", "AdamOptimizerConfig", "DimuonOptimizerConfig", "DimuonParams",
                 "OptimParams", "PromptProvenanceSpan", "SampledProvenanceSpan"):
        assert hasattr(tinker, name) and name in tinker.__all__
    assert tinker.LossHandle.__module__ == "tinker"
    for name in ("CustomLossInput", "CustomLossInputRank", "ProvenanceSpans", "SamplingClientKind", "PromptAltTokens",
                 "SaveWeightsExternalResponse", "ExternalWeightsUrlsResponse", "OptimizerConfig"):
        assert hasattr(types, name)
