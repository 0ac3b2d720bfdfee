"""Builds the C engine as the extension module tinker._C.

BLAS is OpenBLAS: by default the one PyPI ships in `scipy-openblas32` (headers
and a shared library with scipy_-prefixed symbols, found through its Python
helpers at build time and through an $ORIGIN-relative rpath at run time);
TINKER_BLAS=system links the system's libopenblas instead.

Switches (environment variables):
  TINKER_NATIVE=0    do not compile with -march=native (the default tunes for
                     the building machine, which is where pip builds it)
  TINKER_DEBUG=1     -O0 -g, assertions on
  TINKER_SANITIZE=1  AddressSanitizer + UndefinedBehaviorSanitizer
  TINKER_CUDA=auto   (the default) compile csrc/backend/cuda/*.cu with nvcc when nvcc and the static CUDA
                     runtime are found, and link the runtime statically (the module still imports and runs on
                     the CPU where no GPU or driver is); 1: the same, failing loudly without them; 0: never
"""
import os
import shutil
import subprocess
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent


def c_sources():
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.c"))


def cuda_sources():
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cu"))


def cuda_settings():
    """{nvcc, cudart_static} when the CUDA sources are to be built (TINKER_CUDA), else None."""
    mode = os.environ.get("TINKER_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"TINKER_CUDA={mode!r}: use auto (the default), 1 or 0")
    if mode == "0":
        return None
    nvcc = shutil.which("nvcc")
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if nvcc:
        homes.append(str(Path(nvcc).resolve().parent.parent))
    runtime = next((Path(h) / "lib64" / "libcudart_static.a" for h in homes
                    if h and (Path(h) / "lib64" / "libcudart_static.a").exists()), None)
    if nvcc and runtime:
        return {"nvcc": nvcc, "cudart_static": str(runtime)}
    if mode == "1":
        missing = "nvcc (not on PATH)" if not nvcc else "libcudart_static.a (set CUDA_HOME to the toolkit)"
        raise SystemExit(f"TINKER_CUDA=1 but {missing} was not found; install the CUDA toolkit or use TINKER_CUDA=0")
    return None


CUDA = cuda_settings()


class BuildWithCuda(build_ext):
    """Compiles the .cu sources with nvcc into objects linked into the extension (with the static CUDA runtime),
    and defines TK_HAVE_CUDA for the C sources, when CUDA is found; otherwise the plain build."""

    def build_extension(self, ext):
        if CUDA:
            objects = []
            for source in cuda_sources():
                obj = Path(self.build_temp) / (source + ".o")
                obj.parent.mkdir(parents=True, exist_ok=True)
                # sm_90 machine code (H100 / H200) and compute_90 PTX the driver can compile for newer GPUs
                cmd = [CUDA["nvcc"], "-c", source, "-o", str(obj), "-O3", "-std=c++17", "-Icsrc",
                       "-gencode", "arch=compute_90,code=[sm_90,compute_90]",
                       "-Xcompiler", "-fPIC,-fvisibility=hidden", "-Xcompiler", "-Wall"]
                print(" ".join(cmd))
                subprocess.check_call(cmd, cwd=ROOT)
                objects.append(str(obj))
            ext.extra_objects = [*objects, CUDA["cudart_static"]]
            ext.libraries = [*ext.libraries, "dl", "rt", "stdc++"]
            ext.define_macros = [*ext.define_macros, ("TK_HAVE_CUDA", "1")]
        super().build_extension(ext)


def blas_settings():
    if os.environ.get("TINKER_BLAS") == "system":
        return dict(include_dirs=["/usr/include/openblas", "/usr/include/x86_64-linux-gnu/openblas-pthread"],
                    libraries=["openblas"], library_dirs=[], rpath=[], macros=[])
    import scipy_openblas32

    lib_dir = scipy_openblas32.get_lib_dir()
    return dict(
        include_dirs=[scipy_openblas32.get_include_dir()],
        libraries=[scipy_openblas32.get_library()],
        library_dirs=[lib_dir],
        # installed: site-packages/tinker/_C.so next to site-packages/scipy_openblas32/lib;
        # in-place builds also find it at its build-time location.
        rpath=["$ORIGIN/../scipy_openblas32/lib", lib_dir],
        macros=[("TK_BLAS_SCIPY", "1")],
    )


def compile_flags():
    # -fno-trapping-math: the engine never reads floating-point exception flags, and without it gcc will not
    # if-convert loops whose selects guard arithmetic (tk_expf: SiLU, softmax, logsumexp) unless AVX-512
    # masks can predicate them: on AVX2-only CPUs those loops stayed scalar. It changes no value (no
    # reassociation, no contraction: that is -ffast-math's part, which stays off).
    flags = ["-std=c11", "-D_POSIX_C_SOURCE=200809L", "-Wall", "-Wextra", "-Wno-unused-parameter",
             "-Werror=implicit-function-declaration", "-pthread", "-fvisibility=hidden", "-fno-trapping-math"]
    if os.environ.get("TINKER_DEBUG") == "1":
        flags += ["-O0", "-g", "-UNDEBUG"]
    else:
        flags += ["-O3"]
    if os.environ.get("TINKER_NATIVE", "1") != "0":
        flags += ["-march=native"]
    if os.environ.get("TINKER_SANITIZE") == "1":
        flags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    return flags


blas = blas_settings()
link_flags = ["-pthread"] + [f"-Wl,-rpath,{p}" for p in blas["rpath"]]
if os.environ.get("TINKER_SANITIZE") == "1":
    link_flags += ["-fsanitize=address,undefined"]

setup(
    cmdclass={"build_ext": BuildWithCuda},
    ext_modules=[
        Extension(
            "tinker._C",
            sources=c_sources(),
            include_dirs=["csrc", *blas["include_dirs"]],
            libraries=[*blas["libraries"], "m"],
            library_dirs=blas["library_dirs"],
            define_macros=blas["macros"],
            extra_compile_args=compile_flags(),
            extra_link_args=link_flags,
        )
    ],
)
