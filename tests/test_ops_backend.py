"""Per-op tests of the backend table, every backend this build has: tests/ops/test_backend_ops.c.

That C program links the engine's C sources (csrc/ minus csrc/python/) and the same BLAS as setup.py, makes
each backend with the factory the engine is given (tk_cpu_backend_create over a pool of 1 and of 3 threads, and
tk_devsim_backend_create: the CPU backend behind device pointers the host cannot read, so every call hands the
ops device copies of the test's host arrays and reads results back through download, as a GPU backend needs),
runs every op of csrc/backend/backend.h against a float64 reference on odd shapes, strided rows, packed
sequences and grouped-query heads, checks every backward op by finite differences too, runs the base-weight
ops (matmul_w, matmul_w_decode, matmul_w_t, embed) on tk_weight handles of all 11 storage types and of mixed
parts (exact decoding included), checks the memory, indexing, optimizer and RoPE-table ops, and checks
tk_dequantize against an independent decode; its header states what is checked and the tolerances. Here it
is compiled (gcc -O2 -march=native) and run, once plainly and once under AddressSanitizer +
UndefinedBehaviorSanitizer (with leak detection), and must exit 0. Its output (one line per op and shape)
is shown on failure.

The CUDA backend's ops run here too, without a GPU: test_backend_ops_cuda_emulated builds them with g++ against
tests/cuda_emu (a CPU emulation of CUDA's execution model, whose checks tests/test_cuda_emu.py proves) and runs
the harness on that backend only, with tests/cuda_emu/fake_cublas.c standing in for cuBLAS. On a GPU machine
test_backend_ops itself runs them on the real device (the build compiles the .cu sources with nvcc).
"""

from __future__ import annotations

import os
import subprocess

import pytest

import native_build

SOURCES = ["test_backend_ops.c", "harness.c", "reference.c", "quant_ref.c"]


def run_harness(exe, env=None, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{exe.name} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.rstrip().endswith("0 failed"), proc.stdout
    return proc


def test_backend_ops(tmp_path):
    run_harness(native_build.build(tmp_path / "test_backend_ops", SOURCES))


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())


# The CPU kernels have an AVX-512 path, an AVX2 + FMA path and a plain C one (tgemm.c, qmatmul.c, the decode
# attention): -march=native compiles only the first this machine has, so the others are built here too.
@pytest.mark.parametrize("isa", ["avx2", "plain"])
def test_backend_ops_other_isa(tmp_path, isa):
    if isa == "avx2" and not {"avx2", "fma"} <= cpu_flags():
        pytest.skip("this CPU cannot run AVX2 code")
    flags = ("-mno-avx512f",) if isa == "avx2" else ("-mno-avx512f", "-mno-avx2", "-mno-fma")
    run_harness(native_build.build(tmp_path / f"test_backend_ops_{isa}", SOURCES, isa_flags=flags))


def test_backend_ops_sanitized(tmp_path):
    exe = native_build.build(tmp_path / "test_backend_ops_asan", SOURCES, sanitize=True)
    # Leak detection works in this project's containers and CI (LeakSanitizer needs ptrace-like access; where
    # the sandbox forbids it, LSan aborts with "LeakSanitizer has encountered a fatal error" and this would
    # need detect_leaks=0).
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1")
    run_harness(exe, env)


def test_backend_ops_cuda_emulated(tmp_path):
    exe = native_build.build(tmp_path / "test_backend_ops_cuda_emu", SOURCES, emulate_cuda=True)
    env = dict(os.environ, TK_TEST_BACKENDS="cuda", TINKER_CUBLAS=str(native_build.fake_cublas(tmp_path)))
    proc = run_harness(exe, env, timeout=900)
    assert "skip cuda:" not in proc.stdout, proc.stdout  # the backend was made
    assert "cuda-emu:" not in proc.stderr, proc.stderr  # no launch, barrier, pointer or copy fault
