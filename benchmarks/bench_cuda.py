"""LoRA training and decode throughput of the engine on a GPU, beside peft / transformers on the same GPU.

    python benchmarks/bench_cuda.py [--device cuda|cpu] [--tiny] [--layers 4] [--skip-peers]
                                    [--only training|decode] [--budget SECONDS] [--out results.json]

Training: a Qwen3-8B-shaped model (hidden 4096, 32 query / 8 kv heads of 128, intermediate 12288, vocab 151936,
rms eps 1e-6, rope theta 1e6) with random bf16 weights, but only --layers of its 36 layers (default 4: compare
per-layer throughput and MFU, not tokens/s of the whole model), written by torch (on the GPU where there is one)
as a safetensors checkpoint in a temporary folder. One step = forward_backward (cross_entropy) on 8 sequences of
2048 tokens + an AdamW optim_step, LoRA rank 32 (alpha 32) on what create_lora_training_client adapts by default:
q, k, v, o, gate, up, down and the LM head. Ours: tinker.ServiceClient().create_lora_training_client(path).
Peer: transformers' Qwen3ForCausalLM in bf16 with sdpa attention + peft LoRA on the same targets (peft's own
defaults: adapter weights in float32), the same batch, the cross-entropy summed in float32, torch.optim.AdamW.
Medians over --steps steps after one warm-up step (fewer when the time budget would not allow them); ours first
times a step on one sequence (learning rate 0), whose per-token figure stands in if the full batch does not finish
in its time. The first step's loss (LoRA B = 0: the base model's) of ours and peft is compared too. MFU is
printed with the formula it uses; the peak is the card's bf16 dense datasheet figure (H100 SXM / H200: 989
TFLOP/s), and the measured 8192^3 bf16 torch matmul rate is printed beside it.

Decode: a Qwen3-0.6B-shaped model (hidden 1024, 28 layers, 16 / 8 heads of 128, intermediate 3072, vocab 151936,
tied embeddings), random bf16. Ours: SamplingClient.sample(prompt of 32 tokens, num_samples 1 and 64,
max_tokens 128, temperature 1, stop=[] so that every sequence runs to max_tokens; prefix cache off). Peer:
transformers' generate (bf16, sdpa, batch 1 and 64 of the same prompt, do_sample, top_k 0,
min_new_tokens = max_new_tokens). tokens/s = new tokens over the call's wall time (the prompt's prefill included
on both sides), median of --reps calls after a short warm-up call.

Our engine runs on TINKER_DEVICE=--device (default cuda); the peers on torch's device (cuda where torch sees one,
else the CPU). --tiny shrinks every shape to what runs in a minute on a CPU (or under tests/cuda_emu). Each
measurement runs in its own subprocess with its own share of --budget: a crash or a hang of one (ours or a
peer's) is reported in its row and the others still run. Progress goes to stderr, the table to stdout, every
figure (with the failures' output tails) to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
FULL_LAYERS = {"training": 36, "decode": 28}

# bf16 dense tensor-core peaks (datasheets; the 2:4-sparsity figures are twice these), by a substring of
# torch.cuda.get_device_name(), first match wins
PEAKS_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0), ("H200", 989.0), ("H800", 989.0),
                ("H20", 148.0), ("A100", 312.0), ("L40S", 362.0), ("B200", 2250.0)]  # fmt: skip


def shapes(tiny: bool, layers: int) -> dict:
    if tiny:
        training = dict(hidden=128, layers=2, heads=4, kv_heads=2, head_dim=32, intermediate=256, vocab=1024,
                        eps=1e-6, theta=1e6, tied=False, max_positions=1024, batch=2, seq=64, rank=32)
        decode = dict(hidden=128, layers=2, heads=4, kv_heads=2, head_dim=32, intermediate=256, vocab=1024,
                      eps=1e-6, theta=1e6, tied=True, max_positions=1024, prompt=8, new_tokens=16, samples=[1, 8])
    else:
        training = dict(hidden=4096, layers=layers, heads=32, kv_heads=8, head_dim=128, intermediate=12288,
                        vocab=151936, eps=1e-6, theta=1e6, tied=False, max_positions=40960, batch=8, seq=2048,
                        rank=32)
        decode = dict(hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128, intermediate=3072, vocab=151936,
                      eps=1e-6, theta=1e6, tied=True, max_positions=40960, prompt=32, new_tokens=128,
                      samples=[1, 64])
    return {"training": training, "decode": decode}


# ---- FLOP and byte counts ---------------------------------------------------------------------------------------

def layer_params(s: dict) -> int:
    D, F, H, Hkv, Dh = s["hidden"], s["intermediate"], s["heads"], s["kv_heads"], s["head_dim"]
    return D * (H + 2 * Hkv) * Dh + H * Dh * D + 3 * D * F


def matmul_params(s: dict) -> int:
    """N: the parameters of the matrix products a token goes through (every layer's projections and the LM head;
    not the embedding lookup, not the norms)."""
    return s["layers"] * layer_params(s) + s["vocab"] * s["hidden"]


def lora_params(s: dict) -> int:
    D, F, H, Hkv, Dh, r = s["hidden"], s["intermediate"], s["heads"], s["kv_heads"], s["head_dim"], s["rank"]
    per_layer = (D + H * Dh) + 2 * (D + Hkv * Dh) + (H * Dh + D) + 2 * (D + F) + (F + D)  # in + out of each target
    return r * (s["layers"] * per_layer + s["hidden"] + s["vocab"])


def training_flops(s: dict) -> dict:
    """Per token. model_6n: PaLM's model FLOPs (6N + 12 L H Dh S: forward + both backward products of every
    matrix, attention counted non-causal). work: what LoRA training must compute with frozen base weights: the
    base matrices forward and input-gradient only (4N), LoRA forward + both gradients (6 N_lora), causal attention
    forward (2 products x 2 S/2 x H Dh per layer) and its backward at 2.5x the forward."""
    N, L, H, Dh, S = matmul_params(s), s["layers"], s["heads"], s["head_dim"], s["seq"]
    attention_fwd = L * H * Dh * 2 * 2 * (S + 1) / 2
    return {"N": N, "N_lora": lora_params(s), "model_6n": 6 * N + 12 * L * H * Dh * S,
            "work": 4 * N + 6 * lora_params(s) + 3.5 * attention_fwd,
            "lm_head_share": s["vocab"] * s["hidden"] / N}


def decode_weight_bytes(s: dict) -> int:
    """bf16 bytes of the weights one decode step reads (every layer, the LM head; the embedding rows are few)."""
    return 2 * matmul_params(s)


# ---- workers (each runs in its own process) ---------------------------------------------------------------------

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def emit(result: dict) -> None:
    """A result line; the last one a worker printed counts, also when it is killed afterwards."""
    print("RESULT " + json.dumps(result), flush=True)


def torch_device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def own_gpu_memory_gib() -> float | None:
    """This process's GPU memory as nvidia-smi sees it (None without nvidia-smi or a GPU context)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0] == str(os.getpid()) and fields[1].isdigit():
            return int(fields[1]) / 1024
    return None


def worker_env(spec: dict) -> None:
    import torch

    info: dict = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_device": torch_device()}
    for name in ("transformers", "peft"):
        try:
            info[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001
            info[name] = f"missing ({type(e).__name__}: {e})"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        name = torch.cuda.get_device_name(0)
        info.update(gpu=name, sms=props.multi_processor_count, gpu_memory_gib=round(props.total_memory / 2**30, 1))
        info["peak_tflops"] = spec.get("peak_tflops") or next((p for key, p in PEAKS_TFLOPS if key in name), None)
        info["peak_source"] = "--peak-tflops" if spec.get("peak_tflops") else "datasheet, bf16 dense"
        n, dtype = 8192, torch.bfloat16
    else:
        info.update(gpu=None, cpus=os.cpu_count(), peak_tflops=spec.get("peak_tflops"), peak_source="--peak-tflops")
        n, dtype = 1024, torch.float32
    emit(info)
    try:  # the measured matrix-product rate (random data, never zeros)
        dev = torch_device()
        a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
        for _ in range(3):
            a @ b
        sync()
        reps = 10
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        info["matmul_tflops"] = 2 * n**3 * reps / (time.perf_counter() - start) / 1e12
        info["matmul_shape"] = f"{n}^3 {str(dtype).replace('torch.', '')}"
        if info.get("peak_tflops") is None and info["gpu"] is None:
            info["peak_tflops"], info["peak_source"] = info["matmul_tflops"], f"measured {info['matmul_shape']}"
    except Exception as e:  # noqa: BLE001
        info["matmul_error"] = f"{type(e).__name__}: {e}"
    emit(info)
    try:  # which tinker the engine runs will be, and what it sees of CUDA
        import tinker
        from tinker import _C

        info["tinker"] = os.path.dirname(tinker.__file__)
        probe = _C.cuda_probe()
        info["tinker_cuda_probe"] = {"built": probe.get("built"), "reason": probe.get("reason"),
                                     "devices": [d.get("name") for d in probe.get("devices", [])]}
    except Exception as e:  # noqa: BLE001
        info["tinker_error"] = f"{type(e).__name__}: {e}"
    emit(info)


def worker_make(spec: dict) -> None:
    """A random bf16 Qwen3 checkpoint (safetensors + config.json) at spec['path'], made with torch on its device."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    s, dev = spec["shape"], torch_device()
    start = time.perf_counter()
    config = Qwen3Config(
        vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
        head_dim=s["head_dim"], max_position_embeddings=s["max_positions"], rms_norm_eps=s["eps"],
        rope_parameters={"rope_type": "default", "rope_theta": float(s["theta"])}, tie_word_embeddings=s["tied"],
        hidden_act="silu", bos_token_id=min(151643, s["vocab"] - 2), eos_token_id=min(151645, s["vocab"] - 1),
        pad_token_id=None, use_sliding_window=False,
        initializer_range=0.02,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(dev):
        model = Qwen3ForCausalLM._from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():  # random everywhere (transformers' init leaves norms at 1): norms 1 + N(0, 0.1^2)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p, dtype=torch.float32))
    w = model.model.layers[0].mlp.down_proj.weight.detach()
    std = float(w.float().std())
    assert 0.005 < std < 0.1 and bool(torch.isfinite(w).all()), f"weights not initialised: std {std}"
    made = time.perf_counter() - start
    model.save_pretrained(spec["path"])
    result = {"path": spec["path"], "params": sum(p.numel() for p in model.parameters()), "device": dev,
              "make_s": made, "save_s": time.perf_counter() - start - made,
              "bytes": sum(f.stat().st_size for f in Path(spec["path"]).glob("*.safetensors"))}
    emit(result)


def batch_ids(s: dict):
    import numpy as np

    return np.random.default_rng(0).integers(0, s["vocab"], size=(s["batch"], s["seq"] + 1))


def timed_steps(step, spec: dict, result: dict) -> None:
    """One warm-up step, then up to spec['steps'] timed ones while the worker's time lasts; results emitted after
    each step (a worker killed at its deadline still reports what it measured)."""
    deadline = spec["started"] + spec["deadline_s"]
    start = time.perf_counter()
    first = step()
    result["warmup_s"] = time.perf_counter() - start
    result["first_loss"] = first
    result["step_s_list"] = []
    log(f"  warm-up step {result['warmup_s']:.2f} s, loss {first:.6g}")
    emit(result)
    for i in range(spec["steps"]):
        expected = result["step_s_list"][-1] if result["step_s_list"] else result["warmup_s"]
        if time.time() + expected > deadline:
            result["note"] = f"{i} of {spec['steps']} timed steps (time budget)"
            log(f"  stopping after {i} timed steps: the next would pass this worker's deadline")
            break
        start = time.perf_counter()
        step()
        result["step_s_list"].append(time.perf_counter() - start)
        result["step_s"] = statistics.median(result["step_s_list"])
        log(f"  step {i + 1}: {result['step_s_list'][-1]:.3f} s")
        emit(result)
    if not result["step_s_list"]:  # no timed step fitted: the warm-up step is all there is (a pessimistic figure)
        result["step_s"] = result["warmup_s"]
        result["note"] = "warm-up step only (time budget)"
        emit(result)


def worker_train_ours(spec: dict) -> None:
    import tinker
    from tinker import types
    from tinker._engine import device_description, get_engine

    s = spec["shape"]
    result: dict = {}
    start = time.perf_counter()
    service = tinker.ServiceClient()
    client = service.create_lora_training_client(spec["path"], rank=s["rank"], seed=0).result()
    result["load_s"] = time.perf_counter() - start
    result["device"] = device_description(get_engine())
    log(f"  ours: {result['device']}, model loaded and adapter made in {result['load_s']:.1f} s")
    ids = batch_ids(s)
    data = [types.Datum(model_input=types.ModelInput.from_ints(ids[b, :-1].tolist()),
                        loss_fn_inputs={"target_tokens": ids[b, 1:].tolist(), "weights": [1.0] * s["seq"]})
            for b in range(s["batch"])]  # fmt: skip
    adam = types.AdamParams(learning_rate=1e-4)

    def step(batch=data, params=adam) -> float:
        fb = client.forward_backward(batch, "cross_entropy")
        opt = client.optim_step(params)
        loss = fb.result().metrics["loss:sum"]
        opt.result()
        return float(loss)

    # first a step on one sequence, twice (the first warms up): the engine runs a batch in groups of at most 2048
    # tokens anyway, so this gives a per-token figure early, kept if the full batch does not finish in time. Their
    # optimizer steps have learning rate 0 (the same work; the weights stay), so the full batch's first loss is
    # still the base model's, as peft's is
    if s["batch"] > 1:
        frozen = types.AdamParams(learning_rate=0.0)
        step(data[:1], frozen)
        start = time.perf_counter()
        step(data[:1], frozen)
        result["probe_step_s"] = time.perf_counter() - start
        log(f"  probe step on 1 x {s['seq']} tokens: {result['probe_step_s']:.3f} s")
        emit(result)
    timed_steps(step, spec, result)
    result["gpu_memory_gib"] = own_gpu_memory_gib()
    emit(result)


def worker_train_peft(spec: dict) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    s, dev = spec["shape"], torch_device()
    result: dict = {"device": f"{dev} ({torch.cuda.get_device_name(0)})" if dev == "cuda" else dev}
    start = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=torch.bfloat16, attn_implementation="sdpa",
                                                device_map=dev)  # fmt: skip
    model = get_peft_model(base, LoraConfig(r=s["rank"], lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
    result["load_s"] = time.perf_counter() - start
    result["lora_params"] = sum(p.numel() for p in params)
    result["adapter_dtype"] = str(params[0].dtype).replace("torch.", "")
    log(f"  peft: {result['device']}, loaded in {result['load_s']:.1f} s, {result['lora_params']} LoRA parameters "
        f"({result['adapter_dtype']})")
    ids = torch.tensor(batch_ids(s), device=dev)
    micro = [s["batch"]]  # sequences per forward; halved on out-of-memory (gradients accumulate over the step)

    def step() -> float:
        while True:
            try:
                total = 0.0
                for b0 in range(0, s["batch"], micro[0]):
                    x, y = ids[b0:b0 + micro[0], :-1], ids[b0:b0 + micro[0], 1:]
                    logits = model(input_ids=x).logits
                    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(),
                                                             reduction="sum")  # weights all 1: cross_entropy summed
                    loss.backward()
                    total += float(loss.detach())
                    del logits, loss
                optim.step()
                optim.zero_grad(set_to_none=True)
                sync()
                return total
            except torch.OutOfMemoryError:
                optim.zero_grad(set_to_none=True)
                if micro[0] == 1:
                    raise
                micro[0] //= 2
                result["microbatch"] = micro[0]
                log(f"  peft: out of memory, now {micro[0]} sequences per forward (gradients accumulated)")
                torch.cuda.empty_cache()

    timed_steps(step, spec, result)
    if dev == "cuda":
        result["gpu_memory_gib"] = own_gpu_memory_gib()
        result["torch_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        emit(result)


def decode_prompt(s: dict) -> list[int]:
    import numpy as np

    return [int(t) for t in np.random.default_rng(1).integers(100, s["vocab"] - 100, size=s["prompt"])]


def median_rate(call, reps: int, deadline: float, results: list) -> None:
    for _ in range(reps):
        start = time.perf_counter()
        n = call()
        results.append(n / (time.perf_counter() - start))
        if time.time() > deadline:
            break


def worker_decode_ours(spec: dict) -> None:
    import tinker
    from tinker import types
    from tinker._engine import device_description, get_engine

    s, deadline = spec["shape"], spec["started"] + spec["deadline_s"]
    result: dict = {"rates": {}}
    start = time.perf_counter()
    sampler = tinker.ServiceClient().create_sampling_client(base_model=spec["path"]).result()
    prompt = types.ModelInput.from_ints(decode_prompt(s))
    sampler.sample(prompt, num_samples=1, sampling_params=types.SamplingParams(max_tokens=2, stop=[])).result()
    result["load_s"] = time.perf_counter() - start
    result["device"] = device_description(get_engine())
    log(f"  ours: {result['device']}, loaded and first sample in {result['load_s']:.1f} s")
    emit(result)
    for n in s["samples"]:
        def call(max_tokens=s["new_tokens"]) -> int:
            params = types.SamplingParams(max_tokens=max_tokens, temperature=1.0, stop=[], seed=n)
            out = sampler.sample(prompt, num_samples=n, sampling_params=params).result()
            got = sum(len(q.tokens) for q in out.sequences)
            assert got == n * max_tokens, f"{got} tokens from {n} x {max_tokens}"
            return got

        call(4)  # warm-up at this batch size
        rates: list = []
        median_rate(call, spec["reps"], deadline, rates)
        result["rates"][str(n)] = statistics.median(rates)
        log(f"  ours num_samples {n}: {result['rates'][str(n)]:.1f} tok/s ({len(rates)} calls)")
        result["gpu_memory_gib"] = own_gpu_memory_gib()
        emit(result)


def worker_decode_hf(spec: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    s, dev, deadline = spec["shape"], torch_device(), spec["started"] + spec["deadline_s"]
    result: dict = {"rates": {}, "device": f"{dev} ({torch.cuda.get_device_name(0)})" if dev == "cuda" else dev}
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=torch.bfloat16, attn_implementation="sdpa",
                                                 device_map=dev).eval()  # fmt: skip
    result["load_s"] = time.perf_counter() - start
    prompt = decode_prompt(s)
    emit(result)
    for n in s["samples"]:
        x = torch.tensor([prompt] * n, device=dev)

        def call(new=s["new_tokens"]) -> int:
            with torch.inference_mode():
                out = model.generate(x, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new,
                                     min_new_tokens=new, pad_token_id=0)  # fmt: skip
            sync()
            got = (out.shape[1] - len(prompt)) * n
            assert got == n * new, f"{got} tokens from {n} x {new}"
            return got

        call(4)
        rates: list = []
        median_rate(call, spec["reps"], deadline, rates)
        result["rates"][str(n)] = statistics.median(rates)
        log(f"  hf num_samples {n}: {result['rates'][str(n)]:.1f} tok/s ({len(rates)} calls)")
        result["gpu_memory_gib"] = own_gpu_memory_gib()
        emit(result)


WORKERS = {"env": worker_env, "make": worker_make, "train-ours": worker_train_ours, "train-peft": worker_train_peft,
           "decode-ours": worker_decode_ours, "decode-hf": worker_decode_hf}


# ---- the orchestrator ---------------------------------------------------------------------------------------------

def run_worker(name: str, spec: dict, timeout: float, env: dict) -> dict:
    """Runs worker `name` (make-training and make-decode run the worker make) in a subprocess for at most
    `timeout` seconds, echoing its stderr. Returns its last RESULT (or {}) with ok, seconds, and on failure error
    and the output's tail."""
    spec = {**spec, "deadline_s": max(1.0, 0.85 * timeout - 3)}
    log(f"[{name}] start (time allowed {timeout:.0f} s)")
    start = time.time()
    worker = "make" if name.startswith("make") else name
    proc = subprocess.Popen([sys.executable, __file__, "--worker", worker, "--spec", json.dumps(spec)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)  # fmt: skip
    out_lines: list[str] = []
    err_lines: list[str] = []

    def pump(stream, sink, echo):
        for line in stream:
            sink.append(line)
            if echo:
                sys.stderr.write(f"[{name}] {line}")
                sys.stderr.flush()

    threads = [threading.Thread(target=pump, args=(proc.stdout, out_lines, False), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, err_lines, True), daemon=True)]
    for t in threads:
        t.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        proc.wait()
    for t in threads:
        t.join(timeout=5)
    seconds = time.time() - start
    results = [json.loads(line[7:]) for line in out_lines if line.startswith("RESULT ")]
    result = dict(results[-1]) if results else {}
    result["seconds"] = seconds
    result["ok"] = proc.returncode == 0 and not timed_out
    if not result["ok"]:
        tail = "".join(err_lines)[-3000:] + "".join(line for line in out_lines if not line.startswith("RESULT "))[-1000:]
        last = next((line.strip() for line in reversed(err_lines) if line.strip()), "")
        result["error"] = (f"timed out after {seconds:.0f} s" if timed_out
                           else f"exited {proc.returncode}: {last[:300]}")  # fmt: skip
        result["output_tail"] = tail
        log(f"[{name}] FAILED: {result['error']}")
    else:
        log(f"[{name}] done in {seconds:.1f} s")
    return result


class Budget:
    """Splits the remaining time among the workers still to run, in proportion to their weights, so that time a
    worker does not use (it finished early or failed fast) goes to the ones after it."""

    def __init__(self, seconds: float, plan: list[tuple[str, float]]):
        self.end = time.time() + seconds
        self.weights = dict(plan)
        # a checkpoint takes its time whatever the budget (import torch, init, write GBs): what it leaves unused
        # goes on to the next workers
        self.floor = {"make-training": 90.0, "make-decode": 60.0, "env": 30.0}

    def take(self, name: str) -> float:
        remaining = max(0.0, self.end - time.time())
        share = remaining * self.weights[name] / sum(self.weights.values())
        del self.weights[name]
        return max(share, min(remaining, self.floor.get(name, 20.0)))

    def drop(self, name: str) -> None:
        self.weights.pop(name, None)


def fmt(x, spec=".1f", none="-"):
    return none if x is None else format(x, spec)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="our engine's TINKER_DEVICE")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU, the CUDA emulator)")
    parser.add_argument("--layers", type=int, default=4, help="layers of Qwen3-8B's 36 in the training model")
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--only", choices=["training", "decode"])
    parser.add_argument("--batch", type=int, help="training sequences per step (default 8; --tiny 2)")
    parser.add_argument("--seq", type=int, help="training tokens per sequence (default 2048; --tiny 64)")
    parser.add_argument("--rank", type=int, help="LoRA rank (default 32)")
    parser.add_argument("--samples", type=int, nargs="+", help="decode num_samples (default 1 64; --tiny 1 8)")
    parser.add_argument("--new-tokens", type=int, help="decode max_tokens (default 128; --tiny 16)")
    parser.add_argument("--prompt-tokens", type=int, help="decode prompt length (default 32; --tiny 8)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps after the warm-up")
    parser.add_argument("--reps", type=int, default=2, help="timed sample / generate calls per batch size")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run (default 420; --tiny 1200)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the card's bf16 dense peak")
    parser.add_argument("--out", default=None, help="write every figure here as JSON")
    parser.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary folder)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        spec = json.loads(args.spec)
        spec["started"] = time.time()
        WORKERS[args.worker](spec)
        return

    budget_s = args.budget or (1200.0 if args.tiny else 420.0)
    parts = [args.only] if args.only else ["training", "decode"]
    sh = shapes(args.tiny, args.layers)
    for part, key, value in [("training", "batch", args.batch), ("training", "seq", args.seq),
                             ("training", "rank", args.rank), ("decode", "samples", args.samples),
                             ("decode", "new_tokens", args.new_tokens), ("decode", "prompt", args.prompt_tokens)]:
        if value is not None:
            sh[part][key] = value
    plan = [("env", 0.3)]
    if "training" in parts:
        plan += [("make-training", 0.8), ("train-ours", 3.0)] + ([] if args.skip_peers else [("train-peft", 2.0)])
    if "decode" in parts:
        plan += [("make-decode", 0.5), ("decode-ours", 2.0)] + ([] if args.skip_peers else [("decode-hf", 1.5)])
    budget = Budget(budget_s, plan)
    tmp = tempfile.TemporaryDirectory(prefix="bench_cuda_", dir=args.workdir)
    base_env = {k: v for k, v in os.environ.items() if k != "TINKER_DEVICE"}
    base_env.update(PYTHONUNBUFFERED="1", TINKER_HOME=os.path.join(tmp.name, "tinker-home"),
                    TOKENIZERS_PARALLELISM="false")  # fmt: skip
    ours_env = dict(base_env, TINKER_DEVICE=args.device, TINKER_PREFIX_CACHE_MB="0")
    # torch (peers, and the checkpoints) never sees TINKER_DEVICE; it uses the GPU when it has one
    report: dict = {"args": vars(args), "budget_s": budget_s, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    env = report["env"] = run_worker("env", {"peak_tflops": args.peak_tflops}, budget.take("env"), base_env)
    peak = env.get("peak_tflops")
    common = {"steps": args.steps, "reps": args.reps}

    if "training" in parts:
        s = sh["training"]
        r = report["training"] = {"shape": s, "flops_per_token": training_flops(s)}
        path = os.path.join(tmp.name, "qwen3-8b-shape")
        r["checkpoint"] = run_worker("make-training", {"shape": s, "path": path}, budget.take("make-training"), base_env)
        if r["checkpoint"].get("ok"):
            spec = {**common, "shape": s, "path": path}
            r["ours"] = run_worker("train-ours", spec, budget.take("train-ours"), ours_env)
            if not args.skip_peers:
                r["peft"] = run_worker("train-peft", spec, budget.take("train-peft"), base_env)
        else:
            budget.drop("train-ours")
            budget.drop("train-peft")
        tokens = s["batch"] * s["seq"]
        for who in ("ours", "peft"):
            m = r.get(who)
            if m and not m.get("step_s") and m.get("probe_step_s"):  # only the one-sequence probe finished
                m["tokens_per_s"] = s["seq"] / m["probe_step_s"]
                m["note"] = f"figure from a 1 x {s['seq']} step: the full batch did not finish"
            elif m and m.get("step_s"):
                m["tokens_per_s"] = tokens / m["step_s"]
            if m and m.get("tokens_per_s"):
                fl = r["flops_per_token"]
                m["tflops_6n"] = m["tokens_per_s"] * fl["model_6n"] / 1e12
                m["tflops_work"] = m["tokens_per_s"] * fl["work"] / 1e12
                if peak:
                    m["mfu_6n"] = m["tflops_6n"] / peak
                    m["mfu_work"] = m["tflops_work"] / peak
        if r.get("ours", {}).get("tokens_per_s") and r.get("peft", {}).get("tokens_per_s"):
            r["ratio"] = r["ours"]["tokens_per_s"] / r["peft"]["tokens_per_s"]
        shutil_rmtree(path)

    if "decode" in parts:
        s = sh["decode"]
        d = report["decode"] = {"shape": s, "weight_bytes_per_step": decode_weight_bytes(s)}
        path = os.path.join(tmp.name, "qwen3-0.6b-shape")
        d["checkpoint"] = run_worker("make-decode", {"shape": s, "path": path}, budget.take("make-decode"), base_env)
        if d["checkpoint"].get("ok"):
            spec = {**common, "shape": s, "path": path}
            d["ours"] = run_worker("decode-ours", spec, budget.take("decode-ours"), ours_env)
            if not args.skip_peers:
                d["hf"] = run_worker("decode-hf", spec, budget.take("decode-hf"), base_env)
        d["ratio"] = {}
        for n in s["samples"]:
            a = d.get("ours", {}).get("rates", {}).get(str(n))
            b = d.get("hf", {}).get("rates", {}).get(str(n))
            if a and b:
                d["ratio"][str(n)] = a / b
        shutil_rmtree(path)

    table = render(report, args, peak)
    print(table)
    report["table"] = table
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
        log(f"wrote {args.out}")
    tmp.cleanup()


def shutil_rmtree(path):
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def status(m: dict | None) -> str:
    if m is None:
        return "not run"
    if m.get("ok"):
        return "ok" + (f" ({m['note']})" if m.get("note") else "")
    return ("FAILED: " + m.get("error", "?").replace("\n", " ")[:160]
            + (f" ({m['note']})" if m.get("note") else ""))


def render(report: dict, args, peak) -> str:
    env = report["env"]
    lines = []
    where = env.get("gpu") or f"cpu ({env.get('cpus')} cores)"
    mm = (f"measured {env['matmul_shape']} torch matmul {env['matmul_tflops']:.1f} TFLOP/s"
          if env.get("matmul_tflops") else "matmul not measured")  # fmt: skip
    lines.append(f"bench_cuda: ours on TINKER_DEVICE={args.device}, peers on torch {env.get('torch')} "
                 f"({env.get('torch_device')}, transformers {env.get('transformers')}, peft {env.get('peft')}); "
                 f"{where}")
    lines.append(f"peak for MFU: {fmt(peak, '.4g', 'none')} TFLOP/s ({env.get('peak_source')}); {mm}")
    if env.get("tinker"):
        lines.append(f"tinker from {env['tinker']}; its CUDA probe: {env.get('tinker_cuda_probe')}")
    if not env.get("ok"):
        lines.append(f"env: {status(env)}")

    r = report.get("training")
    if r:
        s, fl = r["shape"], r["flops_per_token"]
        of = "" if args.tiny else f" ({s['layers']} of Qwen3-8B's 36 layers: compare per-layer throughput and MFU)"
        lines += ["", f"LoRA training: Qwen3-8B shape{' (tiny)' if args.tiny else ''}, {s['layers']} layers{of}, "
                      f"hidden {s['hidden']}, vocab {s['vocab']}; rank {s['rank']} on {', '.join(TARGETS)}; "
                      f"batch {s['batch']} x {s['seq']} tokens; cross_entropy + AdamW; bf16 weights",
                  f"{'':>20} {'tok/s':>10} {'step s':>8} {'TFLOP/s':>8} {'MFU':>6} {'MFU work':>9} {'1st loss':>11}"
                  f"  status"]  # fmt: skip
        for who, label in (("ours", f"ours ({args.device})"), ("peft", f"peft ({env.get('torch_device')})")):
            m = r.get(who)
            if m is None and who == "peft" and args.skip_peers:
                continue
            m = m or {}
            lines.append(f"{label:>20} {fmt(m.get('tokens_per_s'), '10.1f'):>10} {fmt(m.get('step_s'), '8.3f'):>8} "
                         f"{fmt(m.get('tflops_6n'), '8.2f'):>8} {fmt(m.get('mfu_6n'), '6.1%'):>6} "
                         f"{fmt(m.get('mfu_work'), '9.1%'):>9} {fmt(m.get('first_loss'), '11.5g'):>11}  "
                         f"{status(r.get(who)) if who in r else status(None)}")  # fmt: skip
        if r.get("ratio"):
            lines.append(f"{'ours / peft':>20} {r['ratio']:9.2f}x")
        if not r.get("checkpoint", {}).get("ok"):
            lines.append(f"checkpoint: {status(r.get('checkpoint'))}")
        lines.append(f"MFU = (6 N + 12 L H Dh S) x tok/s / peak (PaLM's model FLOPs; N = {fl['N']:.4g} "
                     f"matmul parameters of the layers and the LM head, which is {fl['lm_head_share']:.0%} of N; "
                     f"L H Dh S = {s['layers']} x {s['heads']} x {s['head_dim']} x {s['seq']}); "
                     f"TFLOP/s on the same count")
        lines.append(f"MFU work = (4 N + 6 N_lora + 3.5 x causal attention forward) x tok/s / peak: what LoRA "
                     f"training with frozen weights must compute (N_lora = {fl['N_lora']:.4g})")
        o, p = r.get("ours", {}), r.get("peft", {})
        if o.get("gpu_memory_gib") or p.get("gpu_memory_gib"):
            lines.append(f"GPU memory (nvidia-smi, at the end): ours {fmt(o.get('gpu_memory_gib'))} GiB, peft "
                         f"{fmt(p.get('gpu_memory_gib'))} GiB (torch's peak allocation "
                         f"{fmt(p.get('torch_max_allocated_gib'))} GiB)"
                         + (f"; peft ran {p['microbatch']} sequences per forward (out of memory at more)"
                            if p.get("microbatch") else ""))
        if o.get("first_loss") and p.get("first_loss"):
            lines.append(f"first-step loss (B = 0: the base model's) ours / peft - 1 = "
                         f"{o['first_loss'] / p['first_loss'] - 1:+.2e}")

    d = report.get("decode")
    if d:
        s = d["shape"]
        lines += ["", f"Decode: Qwen3-0.6B shape{' (tiny)' if args.tiny else ''}, {s['layers']} layers, hidden "
                      f"{s['hidden']}, vocab {s['vocab']}, tied; random bf16; prompt {s['prompt']} tokens, "
                      f"{s['new_tokens']} new per sequence, temperature 1",
                  f"{'num_samples':>12} {'ours tok/s':>11} {'hf tok/s':>10} {'ratio':>7} {'ours GB/s':>10} "
                  f"{'hf GB/s':>9}"]  # fmt: skip
        for n in s["samples"]:
            a = d.get("ours", {}).get("rates", {}).get(str(n))
            b = d.get("hf", {}).get("rates", {}).get(str(n))
            gb = d["weight_bytes_per_step"] / 1e9 / n
            lines.append(f"{n:>12} {fmt(a, '11.1f'):>11} {fmt(b, '10.1f'):>10} "
                         f"{fmt(d['ratio'].get(str(n)), '6.2f') + ('x' if d['ratio'].get(str(n)) else ''):>7} "
                         f"{fmt(a and a * gb, '10.1f'):>10} {fmt(b and b * gb, '9.1f'):>9}")  # fmt: skip
        lines.append(f"ours: {status(d.get('ours'))}; hf: "
                     f"{'skipped' if args.skip_peers else status(d.get('hf'))}"
                     + ("" if d.get("checkpoint", {}).get("ok") else f"; checkpoint: {status(d.get('checkpoint'))}"))
        o, h = d.get("ours", {}), d.get("hf", {})
        if o.get("gpu_memory_gib") or h.get("gpu_memory_gib"):
            lines.append(f"GPU memory (nvidia-smi): ours {fmt(o.get('gpu_memory_gib'))} GiB, hf "
                         f"{fmt(h.get('gpu_memory_gib'))} GiB")
        lines.append(f"GB/s = {d['weight_bytes_per_step'] / 1e9:.2f} GB of bf16 weights read per decode step x "
                     f"steps/s (tok/s / num_samples); the prompt's prefill is inside the timed call on both sides")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
