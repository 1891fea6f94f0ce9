#!/usr/bin/env bash
# Issue 4's GPU run: the CUDA correctness tests, then `normlab bench` on CUDA against torch eager,
# torch.compile and Liger-Kernel. Run from the repo root on the GPU machine (no network needed:
# torch with CUDA, triton, pytest and hypothesis are there; Liger-Kernel comes from a carried
# wheel or is skipped). Everything lands in $OUT (default ./gpu-out).
#
#   bash benchmarks/gpu_run.sh [STEP ...]        (default: tests llm cnn)
#
# STEP   what                                                       writes to $OUT
# tests  pytest of the Triton kernels and the CUDA suite            tests_cuda.log
# llm    bench --preset llm: LayerNorm/RMSNorm rows, bf16 + fp32    bench_gpu_llm.csv, .md
# cnn    bench --preset cnn: Group/Instance/BatchNorm, NCHW + NHWC  bench_gpu_cnn.csv, .md
# all    bench --preset all: both in one table                      bench_gpu.csv, .md
# Always first: nvidia-smi, versions and the Liger wheel install; the whole output also goes to
# $OUT/gpu_run.log, and the last lines are each step's exit code and seconds.
#
# Time: the whole command stops by GPU_RUN_SECONDS (default 540, under a 10-minute device call).
# `tests` gets at most TESTS_SECONDS (default 240); each bench step gets what is left, as
# `--time-budget` (cells that would not finish are listed as "not run"), and its CSV and markdown
# are rewritten after every cell, so a hard stop keeps the cells done. Planned split, two calls:
#   call 1: bash benchmarks/gpu_run.sh tests llm     (tests ~2-4 min, llm ~4-5 min)
#   call 2: bash benchmarks/gpu_run.sh cnn           (~5-8 min)
#   then, here: python -m normlab bench --from-csv A/bench_gpu_llm.csv,B/bench_gpu_cnn.csv \
#                   --out benchmarks/bench_gpu_h100.csv          (one merged table + .md)
# Cells cut by the budget can be rerun alone, e.g. BENCH_ARGS="--dtypes float32" ... cnn.
#
# Liger-Kernel: a wheel at benchmarks/wheels/liger_kernel-*.whl or .whl/liger_kernel-*.whl
# (here: python3 -m pip download --no-deps -d benchmarks/wheels liger-kernel==0.8.5) is installed
# with pip --no-index --no-deps into /tmp/normlab-peers; without one, the liger peer is skipped.
# Extra env: PYTHON (default python3), BENCH_ARGS (appended to each bench command),
# TEST_WORKERS (pytest-xdist workers, default 8; 0 runs the tests in one process).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DEADLINE=$(( SECONDS + ${GPU_RUN_SECONDS:-540} ))
unset TRITON_INTERPRET  # the kernels run on the GPU, not in Triton's CPU interpreter
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
STATUS=()

left() { echo $(( DEADLINE - SECONDS )); }

info() {
    echo "== gpu_run.sh $* at $(date -u +%FT%TZ) on $(hostname); $(left) s left"
    git log -1 --format='commit %H %s' 2>/dev/null || echo "(no git metadata here)"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi
        nvidia-smi --format=csv --query-gpu=name,driver_version,memory.total,clocks.sm,\
clocks.max.sm,clocks.mem,power.limit,temperature.gpu
    else
        echo "nvidia-smi: not found"
    fi
    if ! "$PY" -c "import liger_kernel.ops.rms_norm" 2>/dev/null; then
        local whl
        for whl in benchmarks/wheels/liger_kernel-*.whl .whl/liger_kernel-*.whl; do
            [ -f "$whl" ] || continue
            echo "installing $whl (no index, no deps) into /tmp/normlab-peers"
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
                --disable-pip-version-check --target /tmp/normlab-peers "$whl" \
                && export PYTHONPATH=/tmp/normlab-peers${PYTHONPATH:+:$PYTHONPATH}
            break
        done
    fi
    "$PY" - <<'EOF'
import importlib, platform, sys
import torch
print(f"python {platform.python_version()} ({sys.executable})")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    l2 = getattr(p, "L2_cache_size", 0) / 2**20
    print(f"GPU {torch.cuda.get_device_name()}: {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB, L2 {l2:.0f} MiB, capability {p.major}.{p.minor}")
else:
    print("torch.cuda.is_available() is False: the CUDA steps below will fail")
for name in ("triton", "numba", "pytest", "hypothesis", "xdist", "rich", "normlab"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')}")
    except Exception as e:
        print(f"{name}: not importable ({type(e).__name__}: {e})")
try:
    import liger_kernel.ops.layer_norm, liger_kernel.ops.rms_norm  # noqa: F401
    from importlib.metadata import version
    print(f"liger-kernel {version('liger-kernel')}: the liger peer runs")
except Exception as e:
    print(f"liger-kernel: not importable ({type(e).__name__}: {e}); the liger peer is skipped")
EOF
}

tests() {
    local limit=$(( $(left) - 30 ))
    (( limit > ${TESTS_SECONDS:-240} )) && limit=${TESTS_SECONDS:-240}
    if (( limit < 30 )); then echo "tests: skipped, a limit of $limit s"; return 124; fi
    local workers=()
    if [ "${TEST_WORKERS:-8}" != 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
        workers=(-n "${TEST_WORKERS:-8}")
    fi
    echo "== tests (at most $limit s, ${workers[*]:-one process})"
    timeout -k 10 "$limit" "$PY" -m pytest -q -p no:cacheprovider ${workers[@]+"${workers[@]}"} \
        --durations=15 tests/test_triton_rows.py tests/test_triton_channels.py \
        tests/test_triton_backend.py tests/test_cuda.py 2>&1 | tee "$OUT/tests_cuda.log"
}

bench() {  # NAME PRESET: one `normlab bench` within the time left
    # the budget leaves 60 s for Python's start, a last cell running over, the final copy
    # measurement and the report; the hard stop comes 5 s before the deadline
    local budget=$(( $(left) - 60 ))
    if (( budget < 60 )); then echo "bench $1: skipped, $(left) s left"; return 124; fi
    local csv="$OUT/bench_gpu${1:+_$1}.csv"
    echo "== bench --preset $2 (time budget $budget s) -> $csv"
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
    timeout -k 5 $(( budget + 55 )) "$PY" -m normlab bench --device cuda --preset "$2" \
        --dtypes bfloat16,float32 --time-budget "$budget" --out "$csv" ${BENCH_ARGS:-}
}

step() {  # NAME COMMAND...: run it, record its exit code and duration, never stop the script
    local t0=$SECONDS rc
    "${@:2}"
    rc=$?
    STATUS+=("$1: exit $rc, $(( SECONDS - t0 )) s")
}

main() {
    local steps=("$@")
    (( ${#steps[@]} )) || steps=(tests llm cnn)
    info "${steps[@]}"
    for s in "${steps[@]}"; do
        case "$s" in
            tests) step tests tests ;;
            llm) step llm bench llm llm ;;
            cnn) step cnn bench cnn cnn ;;
            all) step all bench "" all ;;
            info) ;;
            *) echo "unknown step '$s' (tests, llm, cnn, all)"; STATUS+=("$s: unknown") ;;
        esac
    done
    echo "== done, $(left) s before the deadline; files in $OUT:"
    ls -l "$OUT"
    printf '%s\n' "${STATUS[@]}"
}

main "$@" 2>&1 | tee -a "$OUT/gpu_run.log"
