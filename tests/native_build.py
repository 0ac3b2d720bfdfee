"""Compiles the engine's C sources together with test-only C code (tests/ops/), outside the shipped module.

Sources: every .c under csrc/ except csrc/python/ (the only code that includes Python.h), as setup.py collects
them, and, where setup.py's cuda_settings() finds nvcc and the static CUDA runtime, the .cu sources compiled by
nvcc with TK_HAVE_CUDA defined (not in sanitized builds). BLAS and CUDA: setup.py's own blas_settings() and
cuda_settings(), read out of setup.py (without running setup()) so the two cannot drift apart. Objects compile
in parallel, one job per core.
"""

from __future__ import annotations

import ast
import concurrent.futures
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS_C = ROOT / "tests" / "ops"

CFLAGS = ["-std=c11", "-D_POSIX_C_SOURCE=200809L", "-O2", "-march=native", "-pthread", "-Wall", "-Wextra",
          "-Wno-unused-parameter", "-Werror=implicit-function-declaration"]  # fmt: skip
SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"]


def setup_function(name: str):
    """A function of setup.py, its definition executed on its own."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    defs = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == name]
    assert defs, f"setup.py has no {name}() any more: update tests/native_build.py"
    namespace: dict = {"os": os, "shutil": shutil, "Path": Path}
    exec(compile(ast.Module(body=defs, type_ignores=[]), str(ROOT / "setup.py"), "exec"), namespace)
    return namespace[name]


def blas_settings() -> dict:
    return setup_function("blas_settings")()


def cuda_settings() -> dict | None:
    """{nvcc, cudart_static} where setup.py would build the CUDA sources, else None."""
    return setup_function("cuda_settings")()


def engine_sources() -> list[Path]:
    return sorted(p for p in (ROOT / "csrc").rglob("*.c") if "python" not in p.relative_to(ROOT / "csrc").parts)


class BuildError(AssertionError):
    pass


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(cmd)}\nexited {proc.returncode}:\n{proc.stdout}{proc.stderr}")


def build(output: Path, test_sources: list[str], *, shared: bool = False, sanitize: bool = False,
          isa_flags: tuple[str, ...] = ()) -> Path:
    """Compiles the engine sources and tests/ops/<test_sources> into `output` (an executable, or with shared=True
    a shared library), objects beside it; isa_flags (e.g. -mno-avx512f) narrow -march=native to test the
    kernels' other instruction-set paths. Raises BuildError with the compiler's output on failure."""
    blas = blas_settings()
    flags = CFLAGS + list(isa_flags) + (SANITIZE if sanitize else []) + (["-fPIC"] if shared else [])
    flags += [f"-D{name}={value}" for name, value in blas["macros"]]
    flags += ["-I" + str(ROOT / "csrc"), "-I" + str(TESTS_C)] + ["-I" + d for d in blas["include_dirs"]]
    cuda = None if sanitize else cuda_settings()
    if cuda:
        flags += ["-DTK_HAVE_CUDA=1"]
    obj_dir = output.parent / (output.name + ".objs")
    obj_dir.mkdir(parents=True, exist_ok=True)
    sources = engine_sources() + [TESTS_C / s for s in test_sources]
    cuda_sources = sorted((ROOT / "csrc").rglob("*.cu")) if cuda else []
    objects = [obj_dir / (str(s.relative_to(ROOT)).replace(os.sep, "_") + ".o") for s in sources + cuda_sources]
    commands = [["gcc", *flags, "-c", str(s), "-o", str(o)] for s, o in zip(sources, objects)]
    commands += [[cuda["nvcc"], "-c", str(s), "-o", str(o), "-O2", "-std=c++17", "-I" + str(ROOT / "csrc"),
                  "-gencode", "arch=compute_90,code=[sm_90,compute_90]", "-Xcompiler", "-fPIC"]
                 for s, o in zip(cuda_sources, objects[len(sources):])]  # fmt: skip
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for job in [pool.submit(_run, cmd) for cmd in commands]:
            job.result()
    cuda_libs = [cuda["cudart_static"], "-ldl", "-lrt", "-lstdc++"] if cuda else []
    link = ["gcc", *(SANITIZE if sanitize else []), "-pthread", *(["-shared"] if shared else []), "-o", str(output),
            *map(str, objects), *["-L" + d for d in blas["library_dirs"]], *["-l" + lib for lib in blas["libraries"]],
            *cuda_libs, "-lm", *[f"-Wl,-rpath,{d}" for d in blas["library_dirs"]]]  # fmt: skip
    _run(link)
    return output
