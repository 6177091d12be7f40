#!/usr/bin/env bash
# One call on a lent GPU machine (no registry there: Python 3.12, torch 2.11, triton 3.6,
# cupy-cuda13x, pybind11, pytest, pytest-benchmark preinstalled): build, run the whole test suite
# on CUDA (Triton, CUDA C++ via NVRTC, torch backends), then the benchmarks; logs and the results
# table land in $OUT (or bench/results/ when OUT is unset).
#   device run:  bash bench/gpu.sh [all|tests|bench]   (one stage per call where 600 s is too short
#   for both; the sgd n = 3072 sweep rows of acceptance 7 are in bench/test_bench_sweeps.py)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
STAGE=${1:-all}
case $STAGE in all|tests|bench) ;; *) echo "usage: bash bench/gpu.sh [all|tests|bench], got '$STAGE'" >&2; exit 2;; esac

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -m pip install -q --no-build-isolation --no-deps --no-index -e . 2>&1 | tail -3
$PY -m fastdiff info | tee "$OUT/info.txt"

tests_rc=0
bench_rc=0
if [[ $STAGE == all || $STAGE == tests ]]; then
    # no -x: every CUDA failure is reported, not only the first
    $PY -m pytest tests -q -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -15
    tests_rc=${PIPESTATUS[0]}
fi
if [[ $STAGE == all || $STAGE == bench ]]; then
    FASTDIFF_BENCH_COMMAND="bash bench/gpu.sh bench" $PY -m pytest bench -q -p no:cacheprovider --benchmark-enable \
        --benchmark-columns=median,iqr,rounds -s 2>&1 | tee "$OUT/bench.log" | tail -60
    bench_rc=${PIPESTATUS[0]}
fi
cp bench/results/*NVIDIA*.md "$OUT/" 2>/dev/null
cat bench/results/*NVIDIA*.md 2>/dev/null
echo "tests rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
