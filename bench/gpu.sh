#!/usr/bin/env bash
# One call on a lent GPU machine (no registry there: Python 3.12, torch 2.11, triton 3.6,
# cupy-cuda13x, pybind11, pytest, pytest-benchmark preinstalled): build, run the whole test suite
# on CUDA (Triton, CUDA C++ via NVRTC, torch backends), then the benchmarks; logs and the results
# table land in $OUT (or bench/results/ when OUT is unset).
#   device run:  bash bench/gpu.sh [all|resources|tests|bench]   (one stage per call where 600 s is
#   too short for all; the sgd n = 3072 sweep rows of acceptance 7 are in bench/test_bench_sweeps.py)
# `resources` (also the first part of `all`; ~1-2 min on 16 cores): the Triton resource table
# of bench/results/triton-resources.md from this machine's own Triton and ptxas, with the registers
# and spills its driver reports for the kernels loaded on this GPU, against bench/triton_budgets.json;
# the roofline (bench/results/roofline.md) is printed after the benchmarks' measured times.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
STAGE=${1:-all}
case $STAGE in all|resources|tests|bench) ;; *) echo "usage: bash bench/gpu.sh [all|resources|tests|bench], got '$STAGE'" >&2; exit 2;; esac

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -m pip install -q --no-build-isolation --no-deps --no-index -e . 2>&1 | tail -3
$PY -m fastdiff info | tee "$OUT/info.txt"

tests_rc=0
bench_rc=0
res_rc=0
if [[ $STAGE == all || $STAGE == resources ]]; then
    # the resource report from this machine's compiler: 4 workers a compute capability
    FASTDIFF_AOT_JOBS=${FASTDIFF_AOT_JOBS:-4} timeout 300 $PY tests/test_aot.py --report "$OUT/triton-resources-gpu.md" \
        2> "$OUT/resources.err" | tee "$OUT/resources.log"
    res_rc=${PIPESTATUS[0]}
    [[ $res_rc == 0 ]] || tail -20 "$OUT/resources.err"
    if [[ $STAGE == resources ]]; then echo "resources rc=$res_rc"; exit $res_rc; fi
fi
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
# the written expectation beside the measured rows above (same group names)
$PY bench/roofline.py --print | tee "$OUT/roofline.md" | tail -n +9
echo "resources rc=$res_rc tests rc=$tests_rc bench rc=$bench_rc"
exit $(( res_rc || tests_rc || bench_rc ))
