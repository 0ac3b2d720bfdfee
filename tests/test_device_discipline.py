"""Model code reaches device memory only through the backend, as a GPU needs (issue #15's groundwork).

`TINKER_DEVICE=devsim` runs the CPU backend behind device pointers the host cannot dereference
(csrc/backend/devsim: each buffer's address has bit 62 set, a non-canonical x86-64 address, so a host load or
store through it faults), and with `host_memory` off, so model code takes the download and staging paths a GPU
takes. Before the engine kept its index lists, positions, decode views, MoE routing and head targets in a host
scratch of their own, the first forward_backward under devsim died in transformer.c (lora_segments writing
into device scratch), and the vision tower in vision.c (embed_patches); the CPU backend hid both.

These tests run the model tests of every architecture and request kind (training, MoE routing, images,
sampling with shared prefixes and many adapters) in a subprocess under devsim, check that devsim's results are
the CPU backend's bit for bit, and check TINKER_DEVICE's values.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tinker import _C

ROOT = Path(__file__).resolve().parent.parent

# every request kind and architecture, each file a few seconds to a minute
DEVSIM_TESTS = [
    "tests/test_qwen3_moe.py",
    "tests/test_qwen3_vl.py",
    "tests/test_qwen3_vl_gguf.py",
    "tests/test_sampling_prefix_cache.py",
    "tests/test_sampling_mixed_adapters.py",
    "tests/test_forward_mixed_adapters.py",
    "tests/test_training_shared_pass.py",
    "tests/test_training_optim.py",
    "tests/test_training_smollm2.py",
    "tests/test_sampling.py",
]

# a training step, a forward, sampling with logprobs: everything the engine reports, as JSON
PROBE = r"""
import json, numpy as np, tinker
from tinker import types
from tinker._engine import get_engine
from tinker._models import DEFAULT_MODEL
sc = tinker.ServiceClient()
tc = sc.create_lora_training_client(DEFAULT_MODEL, rank=8, seed=3).result()
tok = list(range(200, 260))
datum = types.Datum(model_input=types.ModelInput.from_ints(tok[:-1]),
                    loss_fn_inputs={"target_tokens": tok[1:], "weights": [1.0] * (len(tok) - 1)})
fb = tc.forward_backward([datum], "cross_entropy").result()
opt = tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
after = tc.forward([datum], "cross_entropy").result()
sampler = tc.save_weights_and_get_sampling_client().result()
params = types.SamplingParams(max_tokens=12, temperature=0.7, seed=5)
res = sampler.sample(types.ModelInput.from_ints(tok[:20]), num_samples=3, sampling_params=params,
                     include_prompt_logprobs=True).result()
print(json.dumps({
    "device": get_engine().device,
    "loss": fb.metrics["loss:sum"], "grad_norm": opt.metrics["grad_norm:mean"],
    "logprobs": [float(x) for x in after.loss_fn_outputs[0]["logprobs"].tolist()],
    "tokens": [s.tokens for s in res.sequences], "sample_logprobs": [s.logprobs for s in res.sequences],
    "prompt_logprobs": res.prompt_logprobs,
}))
"""


def run_python(code: str, device: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, TINKER_DEVICE=device)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_devsim_gives_the_cpu_backends_results_bit_for_bit():
    results = {}
    for device in ("cpu", "devsim"):
        proc = run_python(PROBE, device)
        assert proc.returncode == 0, f"{device}: {proc.stderr[-3000:]}"
        results[device] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["cpu"].pop("device") == "cpu"
    assert results["devsim"].pop("device") == "devsim"
    assert results["devsim"] == results["cpu"]


def test_model_tests_pass_with_device_memory_the_host_cannot_read():
    env = dict(os.environ, TINKER_DEVICE="devsim")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *DEVSIM_TESTS],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert " passed" in tail and "failed" not in tail, tail


@pytest.mark.parametrize("value, message", [
    ("tpu", "TINKER_DEVICE='tpu' is not a device"),
    ("cuda", "(CUDA here: "),  # no GPU or driver here (or a build without the CUDA backend)
])
def test_tinker_device_refuses_what_this_build_cannot_run(value, message):
    code = ("import tinker\n"
            "from tinker._engine import get_engine\n"
            "try:\n    get_engine()\nexcept tinker.BadRequestError as e:\n    print('refused:', e)\n")
    proc = run_python(code, value, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refused:" in proc.stdout and message in proc.stdout, proc.stdout


@pytest.mark.parametrize("value, device", [("", "cpu"), ("auto", "cpu"), ("CPU", "cpu"), ("devsim", "devsim")])
def test_tinker_device_chooses_the_backend(value, device):
    proc = run_python("from tinker._engine import get_engine\nprint(get_engine().device)", value, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == device


def test_the_build_compiles_the_cuda_sources_where_nvcc_is():
    """setup.py's TINKER_CUDA=auto builds csrc/backend/cuda/*.cu with nvcc when the toolkit is there (it is on this
    project's machines, so CI compiles them and a CUDA compile error cannot land), linking the static runtime:
    the module imports and probes on a machine with no GPU or driver."""
    probe = _C.cuda_probe()
    assert set(probe) == {"built", "devices", "reason"}
    toolkit = shutil.which("nvcc") and os.environ.get("TINKER_CUDA", "auto") != "0"
    assert probe["built"] == bool(toolkit)
    for gpu in probe["devices"]:
        assert gpu["name"] and gpu["capability"] >= (5, 0) and gpu["memory"] > 0 and gpu["multiprocessors"] > 0
    if not probe["devices"]:
        assert probe["reason"], "no GPU and no reason given"
