"""The CUDA emulator (tests/cuda_emu) that runs the CUDA backend's kernels in tests without a GPU: its own checks.

tests/cuda_emu/selftest.cu is compiled as the CUDA backend is under emulation (tests/native_build.py rewrites
the launches, g++ against the emulator's headers) and each case is run on its own: correct kernels must give
the right answers, and each fault the emulator exists to catch (a fault a GPU would show as a hang, an illegal
address or a launch error) must be reported, with the CUDA error a GPU gives and a "cuda-emu:" line naming the
kernel. So a kernel test passing under the emulator means something: these are the checks it ran.
"""

from __future__ import annotations

import os
import subprocess

import pytest

import native_build


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    d = tmp_path_factory.mktemp("cuda_emu")
    source = native_build.emulated_source(native_build.CUDA_EMU / "selftest.cu", d / "selftest.cpp")
    exe = d / "selftest"
    subprocess.run(["g++", *native_build.EMU_FLAGS, "-o", str(exe), str(source),
                    str(native_build.CUDA_EMU / "emu.cpp")], check=True)  # fmt: skip
    return exe


def run_case(exe, name, **env):
    proc = subprocess.run([str(exe), name], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, **env))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith(f"case {name}:"))
    return line.split(":", 1)[1].strip(), proc.stderr


def test_correct_kernels_give_right_answers(selftest):
    # warp shuffles (xor and down) + shared memory at 32..1024 threads, dynamic shared memory, a 3-D grid
    assert run_case(selftest, "sums") == ("right (cudaSuccess)", "")


def test_device_memory_starts_undefined(selftest):
    assert run_case(selftest, "uninitialised")[0] == "NaN"


def test_launch_limits(selftest):
    result, stderr = run_case(selftest, "config")
    # 2048 threads, grid.y 70000, 64 KB dynamic shared memory; then allowed after cudaFuncSetAttribute
    assert result == "cudaErrorInvalidConfiguration cudaErrorInvalidConfiguration cudaErrorInvalidValue cudaSuccess"
    assert "more than 1024 threads" in stderr and "grid.y" in stderr and "shared memory" in stderr


def test_copies_check_their_memory(selftest):
    result, stderr = run_case(selftest, "copies")
    assert result == "cudaErrorInvalidValue cudaErrorInvalidValue cudaErrorInvalidValue"
    assert "not device memory" in stderr and "past its allocation" in stderr


def test_device_memory_is_bounded(selftest):
    result, _ = run_case(selftest, "memory", TK_CUDA_EMU_MEMORY=str(1 << 30))
    assert result == "cudaSuccess cudaErrorMemoryAllocation cudaSuccess"


@pytest.mark.parametrize("case, kernel, message", [
    ("host_pointer", "copy_k", "argument 1"),
    ("deadlock", "deadlock_k", "deadlock"),
    ("exit_then_sync", "exit_then_sync_k", "__syncthreads reached after some threads of the block exited"),
    ("shuffle_exited", "shuffle_exited_k", "names a lane that has exited"),
])  # fmt: skip
def test_faults_are_caught(selftest, case, kernel, message):
    result, stderr = run_case(selftest, case)
    assert result == "cudaErrorLaunchFailure"  # sticky, as a fault on a GPU
    assert f"cuda-emu: kernel {kernel}" in stderr and message in stderr, stderr
