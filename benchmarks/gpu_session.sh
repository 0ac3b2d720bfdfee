#!/usr/bin/env bash
# The one script a GPU session runs on the device machine (an H100 / H200 with nvcc, torch, transformers, peft and
# pytest, no network): it builds the package with nvcc, runs the per-op harness and the engine's CUDA-vs-CPU tests
# on the GPU, then benchmarks/bench_cuda.py, and writes $OUT/report.md (pass/fail lines, step times, the table).
#
#   here, first (needs pip's network; idempotent):  bash benchmarks/gpu_session.sh --prepare
#   there, through the device tool:  run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
#
# --prepare downloads into .whl/ (git-ignored) the Python packages the device machine
# lacks (its image has no pydantic, scipy-openblas32 or gguf: KINDS.md's package list), as cp312 wheels, and
# builds .whl/prebuilt/tinker/_C.cpython-312-x86_64-linux-gnu.so here with Python 3.12 (where pyenv has one) and
# nvcc, TINKER_NATIVE=0: used there only if building there fails (say Python.h is missing).
#
# Each step has its own time limit and its own log in $OUT (at most 8 files come back: env.log, build.log, ops.log,
# ops_cuda.log, engine.log, bench.log, bench.json, report.md); report.md is rewritten after every step, so it comes
# back even if the call is cut short. Environment: GPU_SESSION_SECONDS (default 540: the whole script's target,
# under the tool's 600 s), GPU_SESSION_STEPS (default "env wheels build ops engine bench": a subset or another
# order), BENCH_ARGS (extra bench_cuda.py arguments, e.g. "--only training"). Without a GPU (here) the GPU steps
# skip or fail fast and the script still runs to its end: OUT defaults to /tmp/gpu_session_out.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY=${PYTHON:-python3}
WHL="$ROOT/.whl"
SITE=${GPU_SESSION_SITE:-/tmp/site}  # where the carried wheels are installed there
WHEELS=(pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
        typing-extensions==4.16.0 gguf==0.19.0 scipy-openblas32==0.3.34.481.3)

prepare() {
    set -e
    local exclude
    exclude="$(git -C "$ROOT" rev-parse --path-format=absolute --git-common-dir)/info/exclude"
    mkdir -p "$(dirname "$exclude")" "$WHL"
    grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
    rm -f "$WHL"/*.whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHL" "${WHEELS[@]}"
    local py312
    py312=$(ls /root/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | head -1 || true)
    [[ -z "$py312" ]] && py312=$(command -v python3.12 || true)
    rm -rf "$WHL/prebuilt"
    if [[ -n "$py312" ]] && command -v nvcc >/dev/null; then
        local tmp
        tmp=$(mktemp -d)
        python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp/dl" setuptools
        "$py312" -m pip install -q --no-index --no-deps --target "$tmp/site" "$tmp"/dl/*.whl "$WHL"/scipy_openblas32-*.whl
        (PYTHONPATH="$tmp/site" TINKER_CUDA=1 TINKER_NATIVE=0 "$py312" setup.py -q build_ext \
            --build-lib "$WHL/prebuilt" --build-temp "$tmp/build" 2>&1 | grep -E "error|warning:" || true)
        rm -rf "$tmp"
        ls "$WHL"/prebuilt/tinker/_C.cpython-312-*.so
    else
        echo "no python3.12 or nvcc here: no prebuilt fallback (the device machine must build the package itself)"
    fi
    du -sh "$WHL"
    echo "carry .whl: run(command=\"bash benchmarks/gpu_session.sh\", carry=[\".whl\"], timeout_s=600)"
}

if [[ "${1:-}" == "--prepare" ]]; then
    prepare
    exit $?
fi

TOTAL=${GPU_SESSION_SECONDS:-540}
STEP_LIST=${GPU_SESSION_STEPS:-env wheels build ops engine bench}
OUT=${OUT:-/tmp/gpu_session_out}
mkdir -p "$OUT"
rm -f "$OUT"/{env,build,ops,ops_cuda,engine,bench}.log "$OUT/bench.json" "$OUT/report.md"  # (a rerun here)
WORK=$(mktemp -d /tmp/gpu_session.XXXXXX)
REPORT="$OUT/report.md"
START=$SECONDS
STEPS=()
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TINKER_HOME="$WORK/tinker-home"

left() { echo $((TOTAL - (SECONDS - START))); }
# limit WANT RESERVE: WANT seconds, or less so that RESERVE seconds stay for the steps after (at least 20)
limit() {
    local l=$(($(left) - $2))
    ((l > $1)) && l=$1
    ((l < 20)) && l=20
    echo $l
}

# run_step NAME LOGFILE SECONDS COMMAND...: the command under `timeout` (its whole process group is killed), output
# to the console and LOGFILE; records name, exit status and seconds for the report
run_step() {
    local name=$1 log=$2 secs=$3 t0=$SECONDS rc
    shift 3
    echo "=== [$name] limit ${secs}s ($(left)s of ${TOTAL}s left): $*"
    timeout -k 10 "$secs" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    local dt=$((SECONDS - t0)) what="ok"
    ((rc != 0)) && what="FAILED (exit $rc)"
    ((rc == 124 || rc == 137)) && what="TIMED OUT after ${secs}s"
    STEPS+=("$name|$what|$dt")
    echo "=== [$name] $what in ${dt}s"
    write_report
    return "$rc"
}

note() { STEPS+=("$1|$2|0"); echo "=== [$1] $2"; write_report; }

# the lines of a pytest log that say what passed and what failed
pytest_lines() {
    [[ -f "$1" ]] || { echo "(no log)"; return; }
    grep -E "^(FAILED|ERROR|SKIPPED)|[0-9]+ (passed|failed|skipped|deselected|error)|^E  " "$1" | head -40
}

write_report() {
    {
        echo "# GPU session report"
        echo
        echo "$(date -u '+%Y-%m-%d %H:%M:%S UTC'); commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')" \
             "$(git -C "$ROOT" status --porcelain 2>/dev/null | grep -q . && echo '(with uncommitted changes)');" \
             "$((SECONDS - START))s elapsed of ${TOTAL}s"
        [[ -f "$WORK/gpu.txt" ]] && { echo; echo '```'; cat "$WORK/gpu.txt"; echo '```'; }
        echo
        echo "| step | result | seconds |"
        echo "| --- | --- | --- |"
        local s
        for s in "${STEPS[@]}"; do
            IFS='|' read -r n w t <<<"$s"
            echo "| $n | $w | $t |"
        done
        if [[ -f "$OUT/build.log" ]]; then
            echo; echo "## build"; echo '```'
            grep -E "error|warning:|^cuda_probe|^cuda_status|^tinker from|prebuilt" "$OUT/build.log" | grep -v "Werror" | head -30
            echo '```'
        fi
        if [[ -f "$OUT/ops.log" ]]; then
            echo; echo "## per-op harness (tests/test_ops_backend.py, every backend; the cuda one on the GPU)"; echo '```'
            pytest_lines "$OUT/ops.log"
            echo '```'
        fi
        if [[ -f "$OUT/ops_cuda.log" ]]; then
            echo; echo "## harness on the cuda backend alone (ops_cuda.log: every line)"; echo '```'
            grep -cE "^ok " "$OUT/ops_cuda.log" | sed 's/^/ok lines: /'
            grep -E "^(FAIL|skip)|checks, |notes \(" "$OUT/ops_cuda.log" | head -60
            echo '```'
        fi
        if [[ -f "$OUT/engine.log" ]]; then
            echo; echo "## engine on CUDA vs CPU (tests/test_cuda_engine.py -k gpu)"; echo '```'
            pytest_lines "$OUT/engine.log"
            echo '```'
        fi
        if [[ -f "$OUT/bench.json" ]]; then
            echo; echo "## benchmarks/bench_cuda.py"; echo '```'
            "$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["table"])' "$OUT/bench.json" 2>&1
            echo '```'
        elif [[ -f "$OUT/bench.log" ]]; then
            echo; echo "## benchmarks/bench_cuda.py (no bench.json: the end of its log)"; echo '```'
            tail -40 "$OUT/bench.log"
            echo '```'
        fi
    } >"$REPORT.tmp" && mv "$REPORT.tmp" "$REPORT"
}

step_env() {
    {
        echo "host $(hostname), $(nproc) cores, $(uname -r); $($PY --version 2>&1) at $(command -v "$PY")"
        if command -v nvidia-smi >/dev/null; then
            timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit \
                --format=csv,noheader 2>&1
        else
            echo "no nvidia-smi: no GPU here"
        fi
    } | tee "$WORK/gpu.txt"
    # nvcc: on PATH, or in the usual toolkit folders (setup.py looks for it on PATH, the runtime under CUDA_HOME)
    if ! command -v nvcc >/dev/null; then
        local d
        for d in /usr/local/cuda/bin /usr/local/cuda-*/bin /opt/cuda/bin; do
            [[ -x "$d/nvcc" ]] && { export PATH="$d:$PATH"; break; }
        done
    fi
    if command -v nvcc >/dev/null && [[ -z "${CUDA_HOME:-}" ]]; then
        CUDA_HOME="$(cd "$(dirname "$(readlink -f "$(command -v nvcc)")")/.." && pwd)"
        export CUDA_HOME
    fi
    # cuBLAS: the CUDA backend dlopens libcublas.so.13 (or .12, or $TINKER_CUBLAS); where the loader's cache does
    # not know it, name the toolkit's or the pip wheel's (torch's nvidia-cublas) copy
    if [[ -z "${TINKER_CUBLAS:-}" ]] && ! ldconfig -p 2>/dev/null | grep -qE "libcublas\.so\.1[23] "; then
        local c
        for c in "${CUDA_HOME:-/usr/local/cuda}"/lib64/libcublas.so.13 "${CUDA_HOME:-/usr/local/cuda}"/targets/x86_64-linux/lib/libcublas.so.13 \
                 "$("$PY" -c 'import nvidia.cublas, os; print(os.path.join(list(nvidia.cublas.__path__)[0], "lib", "libcublas.so.13"))' 2>/dev/null)" \
                 "${CUDA_HOME:-/usr/local/cuda}"/lib64/libcublas.so.12; do
            [[ -n "$c" && -f "$c" ]] && { export TINKER_CUBLAS="$c"; break; }
        done
    fi
    local cublas=${TINKER_CUBLAS:-}
    [[ -z "$cublas" ]] && cublas="as the loader finds it: $(ldconfig -p 2>/dev/null | grep -oE 'libcublas[.]so[.]1[23] .*' | head -1)"
    echo "cuBLAS: $cublas" | tee -a "$WORK/gpu.txt"
    run_step env "$OUT/env.log" 60 bash -c '
        command -v nvidia-smi >/dev/null && nvidia-smi
        echo "nvcc: $(command -v nvcc || echo none) CUDA_HOME=${CUDA_HOME:-unset}"; nvcc --version 2>&1 | tail -2
        ls -l "${CUDA_HOME:-/usr/local/cuda}/lib64/libcudart_static.a" 2>&1
        python3 -c "import sysconfig, os; h = sysconfig.get_paths()[\"include\"]; print(\"Python.h:\", os.path.exists(h + \"/Python.h\"), h)"
        python3 -m pip list 2>/dev/null | grep -iE "^(torch|transformers|peft|numpy|safetensors|tokenizers|pydantic|pytest|setuptools|typing.extensions|gguf|scipy.openblas32) "
        df -h /tmp | tail -1; free -g | head -2'
}

step_wheels() {
    local pyver
    pyver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    if [[ "$pyver" != 3.12 ]]; then
        note wheels "skipped: the carried wheels are for Python 3.12 (the device machine's); this python is $pyver"
    elif compgen -G "$WHL/*.whl" >/dev/null; then
        run_step wheels "$OUT/env.log" 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target "$SITE" "$WHL"/*.whl
        export PYTHONPATH="$PYTHONPATH:$SITE"
    else
        note wheels "no .whl/ carried: using what is installed (run --prepare here and carry .whl)"
    fi
    "$PY" -c "import pydantic, scipy_openblas32, gguf" 2>&1 | tail -1 | tee -a "$OUT/env.log"
}

step_build() {
    local secs
    secs=$(limit 300 230)
    if ! run_step build "$OUT/build.log" "$secs" env TINKER_CUDA=1 "$PY" setup.py build_ext --inplace; then
        local pre
        pre=$(ls "$WHL"/prebuilt/tinker/_C.cpython-3*.so 2>/dev/null | head -1)
        if [[ -n "$pre" ]]; then
            cp "$pre" tinker/ && echo "build failed: using the prebuilt $pre" | tee -a "$OUT/build.log"
            export LD_LIBRARY_PATH="$SITE/scipy_openblas32/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
            STEPS+=("build|using .whl/prebuilt (built here by --prepare)|0")
        fi
    fi
    run_step import "$OUT/build.log" 60 "$PY" -c "
import tinker
from tinker import _C
from tinker._engine import cuda_status
print('tinker from', tinker.__file__)
print('cuda_probe', _C.cuda_probe())
print('cuda_status', cuda_status())"
}

step_ops() {
    local secs
    secs=$(limit 180 200)
    run_step ops "$OUT/ops.log" "$secs" "$PY" -m pytest -x -q -p no:cacheprovider --basetemp "$WORK/ops" \
        tests/test_ops_backend.py -k "test_backend_ops and not isa and not sanitized and not emulated"
    # every line of the harness on the cuda backend alone (pytest shows them only on failure)
    local exe
    exe=$(find "$WORK/ops" -type f -name test_backend_ops -perm -u+x 2>/dev/null | head -1)
    if [[ -n "$exe" ]]; then
        run_step ops_cuda "$OUT/ops_cuda.log" "$(limit 90 180)" env TK_TEST_BACKENDS=cuda "$exe"
    else
        note ops_cuda "the harness was not built: see ops.log"
    fi
}

step_engine() {
    if [[ ! -f tests/test_cuda_engine.py ]]; then
        note engine "tests/test_cuda_engine.py is not in this checkout"
        return
    fi
    run_step engine "$OUT/engine.log" "$(limit 180 170)" "$PY" -m pytest -q -p no:cacheprovider \
        --basetemp "$WORK/engine" tests/test_cuda_engine.py -k gpu
}

step_bench() {
    local budget=$(($(left) - 30))
    ((budget < 60)) && budget=60
    # shellcheck disable=SC2086
    run_step bench "$OUT/bench.log" $((budget + 25)) "$PY" benchmarks/bench_cuda.py --budget "$budget" \
        --out "$OUT/bench.json" --workdir "$WORK" ${BENCH_ARGS:-}
}

echo "gpu_session: $(date -u '+%H:%M:%S UTC'), steps: $STEP_LIST; OUT=$OUT; ${TOTAL}s in all"
for s in $STEP_LIST; do
    "step_$s"
done
write_report
echo
echo "=== $((SECONDS - START))s in all; $REPORT:"
cat "$REPORT"
rm -rf "$WORK"
