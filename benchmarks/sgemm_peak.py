"""The machine's sgemm peak as the engine reaches it, for the benchmarks' "fraction of peak" columns.

The engine's projections are OpenBLAS sgemm from the PyPI package scipy-openblas32, pinned to one thread,
with the output columns split over its own thread pool (csrc/backend/cpu/cpu_backend.c). This measures the
same thing without the extension module: the same shared library through ctypes (scipy_cblas_sgemm), one
OpenBLAS thread (scipy_openblas_set_num_threads(1), as the backend sets it), and C[M, N] = A[M, K] . B[N, K]^T
split into column blocks of 16 over `threads` Python threads, which run in parallel because ctypes releases
the GIL during a foreign call. numpy's BLAS is a different library (and threading) and is not a substitute.
Meant for peak-sized products (milliseconds each): a call costs some microseconds of Python more than the
engine's, and one-row products (the engine's own loop, not sgemm) are not what it measures.

    python benchmarks/sgemm_peak.py [M N K ...]
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time

import numpy as np

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS enum values


def _openblas() -> ctypes.CDLL:
    import scipy_openblas32

    lib = ctypes.CDLL(os.path.join(scipy_openblas32.get_lib_dir(), scipy_openblas32.get_library(fullname=True)))
    lib.scipy_cblas_sgemm.restype = None
    lib.scipy_cblas_sgemm.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                      ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                      ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_int]  # fmt: skip
    lib.scipy_openblas_set_num_threads.argtypes = [ctypes.c_int]
    lib.scipy_openblas_set_num_threads(1)
    return lib


def time_matmul(M: int, N: int, K: int, reps: int = 5, threads: int = 0) -> float:
    """Best seconds of `reps` runs of C[M, N] = A[M, K] . B[N, K]^T (A, B float32, B's rows contiguous, as the
    engine's weights), split over `threads` threads (0: every core)."""
    if min(M, N, K, reps) < 1:
        raise ValueError("time_matmul: sizes and reps must be >= 1")
    lib = _openblas()
    threads = threads or os.cpu_count() or 1
    a = (np.arange(M * K, dtype=np.float32) % 13 * 0.01).reshape(M, K)
    b = (np.arange(N * K, dtype=np.float32) % 7 * 0.01).reshape(N, K)
    c = np.zeros((M, N), np.float32)
    blocks = (N + 15) // 16
    tasks = threads if M * N * K >= 1 << 18 and N >= 32 * threads else 1  # the engine's rule (gemm_tasks)
    bounds = [min(N, blocks * t // tasks * 16) for t in range(tasks + 1)]  # column blocks of 16, as the engine

    def block(t: int) -> None:
        n0, n1 = bounds[t], bounds[t + 1]
        if n1 > n0:
            lib.scipy_cblas_sgemm(_ROW_MAJOR, _NO_TRANS, _TRANS, M, n1 - n0, K, 1.0, a.ctypes.data, K,
                                  b.ctypes.data + n0 * K * 4, K, 0.0, c.ctypes.data + n0 * 4, N)  # fmt: skip

    start, done = threading.Barrier(tasks), threading.Barrier(tasks)

    def helper(t: int) -> None:
        for _ in range(reps):
            start.wait()
            block(t)
            done.wait()

    helpers = [threading.Thread(target=helper, args=(t,), daemon=True) for t in range(1, tasks)]
    for h in helpers:
        h.start()
    best = float("inf")
    for _ in range(reps):
        start.wait()
        t0 = time.perf_counter()
        block(0)
        done.wait()
        best = min(best, time.perf_counter() - t0)
    for h in helpers:
        h.join()
    expected = a[:1].astype(np.float64) @ b.T.astype(np.float64)
    assert np.allclose(c[0], expected, rtol=1e-4, atol=1e-4), "sgemm through ctypes gave a wrong product"
    return best


if __name__ == "__main__":
    sizes = [int(s) for s in sys.argv[1:]] or [2048, 2048, 2048, 512, 3072, 576]
    for M, N, K in zip(sizes[0::3], sizes[1::3], sizes[2::3]):
        seconds = time_matmul(M, N, K)
        print(f"{M}x{N}x{K}: {seconds * 1e3:.2f} ms, {2 * M * N * K / seconds / 1e9:.1f} GFLOP/s "
              f"({os.cpu_count()} threads)")  # fmt: skip
