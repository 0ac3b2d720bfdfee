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
"""
import os
from pathlib import Path

from setuptools import Extension, setup

ROOT = Path(__file__).parent


def c_sources():
    # Every .c under csrc/ except CUDA-only directories (none are built yet).
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.c") if "cuda" not in p.parts)


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
