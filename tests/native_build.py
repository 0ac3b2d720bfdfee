"""Compiles the engine's C sources together with test-only C code (tests/ops/), outside the shipped module.

Sources: every .c under csrc/ except csrc/python/ (the only code that includes Python.h) and CUDA-only
directories, as setup.py collects them. BLAS: the include dirs, library and macros of setup.py's own
blas_settings(), read out of setup.py (without running setup()) so the two cannot drift apart.
Objects compile in parallel, one job per core.
"""

from __future__ import annotations

import ast
import concurrent.futures
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS_C = ROOT / "tests" / "ops"

CFLAGS = ["-std=c11", "-D_POSIX_C_SOURCE=200809L", "-O2", "-march=native", "-pthread", "-Wall", "-Wextra",
          "-Wno-unused-parameter", "-Werror=implicit-function-declaration"]  # fmt: skip
SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"]


def blas_settings() -> dict:
    """setup.py's blas_settings(): its function definition is executed on its own."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    defs = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "blas_settings"]
    assert defs, "setup.py has no blas_settings() any more: update tests/native_build.py"
    namespace: dict = {"os": os}
    exec(compile(ast.Module(body=defs, type_ignores=[]), str(ROOT / "setup.py"), "exec"), namespace)
    return namespace["blas_settings"]()


def engine_sources() -> list[Path]:
    return sorted(p for p in (ROOT / "csrc").rglob("*.c") if "python" not in p.relative_to(ROOT / "csrc").parts
                  and "cuda" not in p.parts)  # fmt: skip


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
    obj_dir = output.parent / (output.name + ".objs")
    obj_dir.mkdir(parents=True, exist_ok=True)
    sources = engine_sources() + [TESTS_C / s for s in test_sources]
    objects = [obj_dir / (str(s.relative_to(ROOT)).replace(os.sep, "_") + ".o") for s in sources]
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for job in [pool.submit(_run, ["gcc", *flags, "-c", str(s), "-o", str(o)]) for s, o in zip(sources, objects)]:
            job.result()
    link = ["gcc", *(SANITIZE if sanitize else []), "-pthread", *(["-shared"] if shared else []), "-o", str(output),
            *map(str, objects), *["-L" + d for d in blas["library_dirs"]], *["-l" + lib for lib in blas["libraries"]],
            "-lm", *[f"-Wl,-rpath,{d}" for d in blas["library_dirs"]]]  # fmt: skip
    _run(link)
    return output
