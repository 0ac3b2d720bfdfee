"""Compiles the engine's C sources together with test-only C code (tests/ops/), outside the shipped module.

Sources: every .c under csrc/ except csrc/python/ (the only code that includes Python.h), as setup.py collects
them, and, where setup.py's cuda_settings() finds nvcc and the static CUDA runtime, the .cu sources compiled by
nvcc with TK_HAVE_CUDA defined (not in sanitized builds). With emulate_cuda, the .cu sources are instead compiled
by g++ against tests/cuda_emu (a CPU emulation of CUDA's execution model and runtime: its cuda_runtime.h says
what it checks), so the CUDA backend's kernels run on machines without a GPU; fake_cublas() builds the cuBLAS
stand-in the backend then loads through $TINKER_CUBLAS. BLAS and CUDA: setup.py's own blas_settings() and
cuda_settings(), read out of setup.py (without running setup()) so the two cannot drift apart. Objects compile
in parallel, one job per core.
"""

from __future__ import annotations

import ast
import concurrent.futures
import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS_C = ROOT / "tests" / "ops"
CUDA_EMU = ROOT / "tests" / "cuda_emu"
EMU_FLAGS = ["-std=c++17", "-O2", "-g", "-ffp-contract=off", "-fPIC", "-Wall", "-Wno-unused-function",
             "-I" + str(CUDA_EMU / "include"), "-I" + str(ROOT / "csrc")]  # fmt: skip

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


# kernel<<<grid, block[, shared[, stream]]>>>(args) -> tk_emu::launch("kernel", kernel, grid, block, ...)(args)
LAUNCH = re.compile(r"\b([A-Za-z_]\w*(?:\s*<[^<>;()]*>)?)\s*<<<(.+?)>>>\s*\(")
# extern __shared__ [__align__(n)] T name[];  ->  T *name = (T *)tk_emu::dynamic_shared();
DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([A-Za-z_][\w\s]*?)\s+"
                            r"(?:__align__\(\s*\d+\s*\)\s+)?(\w+)\s*\[\s*\]\s*;")  # fmt: skip


def emulated_source(source: Path, out: Path) -> Path:
    """`source` (.cu) rewritten as the C++ the emulator compiles: only the launch syntax and dynamic shared memory
    declarations change (#line keeps the compiler's messages pointing at the original lines)."""
    text = source.read_text()
    text = LAUNCH.sub(lambda m: f'tk_emu::launch("{m.group(1)}", {m.group(1)}, {m.group(2)})(', text)
    text = DYNAMIC_SHARED.sub(lambda m: f"{m.group(1)} *{m.group(2)} = ({m.group(1)} *)tk_emu::dynamic_shared();",
                              text)
    for left in ("<<<", "extern __shared__"):
        if left in text:
            line = text[: text.index(left)].count("\n") + 1
            raise BuildError(f"{source}:{line}: '{left}' in a form tests/native_build.py cannot rewrite for the "
                             f"CUDA emulator (write launches on one line; dynamic shared memory as "
                             f"'extern __shared__ T name[];')")
    out.write_text(f'#line 1 "{source}"\n' + text)
    return out


def fake_cublas(directory: Path) -> Path:
    """Builds tests/cuda_emu/fake_cublas.c into directory/libcublas_emu.so (for $TINKER_CUBLAS)."""
    blas = blas_settings()
    output = directory / "libcublas_emu.so"
    _run(["gcc", "-std=c11", "-O2", "-fPIC", "-shared", "-Wall", "-Wextra", "-o", str(output),
          str(CUDA_EMU / "fake_cublas.c"), *[f"-D{name}={value}" for name, value in blas["macros"]],
          *["-I" + d for d in blas["include_dirs"]], *["-L" + d for d in blas["library_dirs"]],
          *["-l" + lib for lib in blas["libraries"]], *[f"-Wl,-rpath,{d}" for d in blas["library_dirs"]]])  # fmt: skip
    return output


def emulated_package(dest: Path) -> Path:
    """A copy of the tinker package in dest/tinker whose extension (_C) has the CUDA backend built against the
    CUDA emulator, so that the whole engine runs on the emulated "GPU" (TINKER_DEVICE=cuda, with $TINKER_CUBLAS
    naming fake_cublas()'s library): run Python with PYTHONPATH=dest. Returns dest/tinker."""
    import sysconfig

    package = dest / "tinker"
    shutil.copytree(ROOT / "tinker", package, ignore=shutil.ignore_patterns("_C.*", "__pycache__"))
    module = package / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    build(module, [], shared=True, emulate_cuda=True, python=True)
    return package


def build(output: Path, test_sources: list[str], *, shared: bool = False, sanitize: bool = False,
          isa_flags: tuple[str, ...] = (), emulate_cuda: bool = False, python: bool = False) -> Path:
    """Compiles the engine sources and tests/ops/<test_sources> into `output` (an executable, or with shared=True
    a shared library), objects beside it; isa_flags (e.g. -mno-avx512f) narrow -march=native to test the
    kernels' other instruction-set paths; emulate_cuda builds the CUDA backend against tests/cuda_emu (see the
    module's docstring); python adds csrc/python/ (the extension module itself). Raises BuildError with the
    compiler's output on failure."""
    blas = blas_settings()
    flags = CFLAGS + list(isa_flags) + (SANITIZE if sanitize else []) + (["-fPIC"] if shared else [])
    flags += [f"-D{name}={value}" for name, value in blas["macros"]]
    flags += ["-I" + str(ROOT / "csrc"), "-I" + str(TESTS_C)] + ["-I" + d for d in blas["include_dirs"]]
    cuda = None if sanitize or emulate_cuda else cuda_settings()
    if cuda or emulate_cuda:
        flags += ["-DTK_HAVE_CUDA=1"]
    obj_dir = output.parent / (output.name + ".objs")
    obj_dir.mkdir(parents=True, exist_ok=True)
    sources = engine_sources() + [TESTS_C / s for s in test_sources]
    if python:
        import sysconfig

        flags += ["-I" + sysconfig.get_paths()["include"]]
        sources += sorted((ROOT / "csrc" / "python").glob("*.c"))
    cuda_sources = sorted((ROOT / "csrc").rglob("*.cu")) if cuda else []
    objects = [obj_dir / (str(s.relative_to(ROOT)).replace(os.sep, "_") + ".o") for s in sources + cuda_sources]
    commands = [["gcc", *flags, "-c", str(s), "-o", str(o)] for s, o in zip(sources, objects)]
    commands += [[cuda["nvcc"], "-c", str(s), "-o", str(o), "-O2", "-std=c++17", "-I" + str(ROOT / "csrc"),
                  "-gencode", "arch=compute_90,code=[sm_90,compute_90]", "-Xcompiler", "-fPIC"]
                 for s, o in zip(cuda_sources, objects[len(sources):])]  # fmt: skip
    if emulate_cuda:
        emulated = [(emulated_source(s, obj_dir / (s.name + ".emu.cpp")), s.parent)
                    for s in sorted((ROOT / "csrc").rglob("*.cu"))] + [(CUDA_EMU / "emu.cpp", CUDA_EMU)]
        for source, home in emulated:
            obj = obj_dir / (source.name + ".o")
            objects.append(obj)
            commands.append(["g++", *EMU_FLAGS, *(SANITIZE if sanitize else []), "-iquote", str(home), "-c",
                             str(source), "-o", str(obj)])
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for job in [pool.submit(_run, cmd) for cmd in commands]:
            job.result()
    cuda_libs = [cuda["cudart_static"], "-ldl", "-lrt", "-lstdc++"] if cuda else []
    if emulate_cuda:
        cuda_libs = ["-ldl", "-lstdc++"]
    link = ["gcc", *(SANITIZE if sanitize else []), "-pthread", *(["-shared"] if shared else []), "-o", str(output),
            *map(str, objects), *["-L" + d for d in blas["library_dirs"]], *["-l" + lib for lib in blas["libraries"]],
            *cuda_libs, "-lm", *[f"-Wl,-rpath,{d}" for d in blas["library_dirs"]]]  # fmt: skip
    _run(link)
    return output
