# The two commands of the README work on a fresh clone: `make demo` (the main job: the Fig. 4 sweep) and
# `make test` (what .ci/run calls).  Both install what they need first.
PY ?= python3
PIP = $(PY) -m pip install -q --disable-pip-version-check

.PHONY: install test demo bench bench-compare aot
install:
	# torch first and pinned: anything that pulls an unpinned torch would fetch GBs of CUDA wheels
	$(PIP) "torch==2.13.0"
	$(PIP) "setuptools>=64" wheel "pybind11>=2.10"
	# knn: faiss-cpu (one 19 MB wheel, numpy its only heavy requirement; ~6 s): the FAISS path's tests run
	$(PIP) --no-build-isolation -e ".[test,triton,plot,sweeps,data,knn]"
	# the original k-diffusion samplers the adapter tests compare with; --no-deps: its requirements pull torchvision
	$(PIP) --no-deps "k-diffusion==0.1.1.post1"

# two workers (pytest-xdist), one test file each at a time: the module fixtures (the AOT compiles) run once;
# --durations: CI's log names the slowest tests (CI must stay under 30 minutes)
test: install
	$(PY) -m pytest -q -n auto --dist loadfile --durations=40

# the main job: seed 002's Fig. 4 phase diagram -> results/subspace-recovery.{sqlite,rows.csv,csv,png}
demo: install
	$(PY) -m fastdiff info
	$(PY) -m fastdiff sweep subspace-recovery --out results

bench: install
	$(PIP) --no-build-isolation -e ".[bench]"
	$(PY) -m fastdiff bench

# no speed regression: BASE's and HEAD's CPU benchmarks side by side, interleaved, in one run
# (bench/compare.py; bench/RESULTS.md says how to read it).  Needs pytest and pybind11, not an install.
BASE ?= 237765d
# the n = 3072 rows the base calls sgd are the adam learner's since c66f6cb (sgd became Algorithm 1)
COMPARE_ARGS ?= --rename "n=3072, sgd," "n=3072, adam," --rename "sgd n=3072 one cell" "adam n=3072 one cell"
bench-compare:
	$(PY) bench/compare.py --base $(BASE) --head HEAD $(COMPARE_ARGS)
