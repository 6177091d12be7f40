"""The main job's speed (issue 6, acceptance 6): the default Fig. 4 sweep of seed 002 end to end
against the same grid run one instance at a time with ``torch.linalg.svd``, in the same run.

Grid: n = 48, K in {1, 2}, d = 1..12, N = 2..48 step 2, 20 trials, learners pca (K = 1) and
ksubspaces (K = 1, 2): 864 cells, 17280 instances.

- fastdiff: ``fastdiff sweep subspace-recovery`` (the CLI, in process) into a fresh store: batched
  data, batched learners, SQLite writes, CSV/Parquet export and the plot.  Must finish in < 60 s.
- eager: :func:`fastdiff.reference.sweeps.subspace_recovery_loop`, the same algorithms (PCA;
  K-subspaces from the same seeded starts with exact SVD refits) one instance at a time, nothing
  stored.  The issue asks for >= 10x.

A second row times ``run_sweep`` alone (compute and store, no export or plot) against the same loop.
Both run on one thread (the sweep's default, see fastdiff.sweeps.runner.run_sweep).  Rate column:
instances per second are printed; the harness's GB/s and GFLOP/s do not apply to a whole sweep.
"""
import os
import shutil
import tempfile
import time

import harness
import pytest
import torch

from fastdiff import cli, sweeps
from fastdiff.reference.sweeps import subspace_recovery_loop
from fastdiff.sweeps import EXPERIMENTS, build_grid

GROUP = "fastdiff sweep subspace-recovery CLI end to end (Fig. 4 grid, 17280 instances)"
COMPUTE = "run_sweep only: compute + SQLite store (Fig. 4 grid, 17280 instances)"
INSTANCES = 864 * 20


def test_fig4_sweep_fastdiff(record):
    def run():
        out = tempfile.mkdtemp(prefix="fastdiff-sweep-")
        try:
            t = time.perf_counter()
            assert cli.main(["sweep", "subspace-recovery", "--out", out, "--no-progress"]) == 0
            return time.perf_counter() - t
        finally:
            shutil.rmtree(out, ignore_errors=True)

    record(GROUP, "fastdiff", run, rounds=3, warmup=1)
    t = min(run() for _ in range(1))
    print(f"\nfastdiff sweep: {t:.2f} s end to end, {INSTANCES / t:.0f} instances/s")
    assert t < 60, f"the default Fig. 4 sweep took {t:.1f} s (acceptance: < 60 s)"


def test_fig4_sweep_compute_only(record):
    def run():
        out = tempfile.mkdtemp(prefix="fastdiff-sweep-")
        try:
            sweeps.run_sweep("subspace-recovery", {}, store=os.path.join(out, "s.sqlite"), progress=False).close()
        finally:
            shutil.rmtree(out, ignore_errors=True)

    record(COMPUTE, "fastdiff", run, rounds=3, warmup=1)


def test_fig4_sweep_one_instance_at_a_time(record, benchmark):
    cells, _ = build_grid(EXPERIMENTS["subspace-recovery"], {})
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        record(GROUP, "eager", lambda: subspace_recovery_loop(cells, 20), rounds=1, warmup=0)
    finally:
        torch.set_num_threads(before)
    # the same loop is the baseline of the compute-only row (measured once: it takes ~20 s)
    harness.TABLE.add(harness.Row(COMPUTE, "eager", benchmark.stats.stats.median))


# --------------------------------------------------------------------------- acceptance 7: image-sized
# n = 3072 (a 32 x 32 x 3 image), the Fig. 4 learners plus adam (300 Adam steps on the diffusion loss
# per instance; the Algorithm 1 learner sgd is timed by bench/alg1_gemm.py), 20 trials.  On a GPU a
# subgrid of the Fig. 4 grid (the full one is 576 cells per
# learner and K) reports the time per cell of each learner; on the CPU a few cells, for scale.
# Useful sgd FLOPs per instance and step: the four (N, n) x (n, K d) GEMMs of the forward and
# backward passes and the two of the gradient, 12 N n K d, plus the QR retraction, ~4 n (K d)^2.
SGD_N = 3072
SGD_GRID = {"cuda": {"K": "1,2", "d": "1,4,8,12", "N": "2,12,24,36,48"}, "cpu": {"K": "1,2", "d": "4", "N": "24"}}
SGD_CELL = {"K": 2, "d": 4, "N": 24}            # the one cell timed against one instance at a time


def _sgd_flops(cells, trials=20, steps=300):
    return sum(trials * steps * (12 * c["N"] * SGD_N * c["K"] * c["d"] + 4 * SGD_N * (c["K"] * c["d"]) ** 2)
               for c in cells)


def _sgd_sweep(grid, device, store=None):
    out = tempfile.mkdtemp(prefix="fastdiff-sgd-")
    try:
        sweeps.run_sweep("subspace-recovery", {"n": SGD_N, "learner": "adam", **grid},
                         store=store or os.path.join(out, "s.sqlite"), progress=False, device=device).close()
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _per_cell(benchmark, group, impl, fn, cells, flops):
    benchmark.group, benchmark.name = group, impl
    benchmark.pedantic(fn, rounds=1, warmup_rounds=0, iterations=1)
    harness.TABLE.add(harness.Row(group, impl, benchmark.stats.stats.median / cells, 0, flops // cells))


def test_n3072_sweep_time_per_cell(benchmark, device):
    """The whole subgrid in one sweep; each learner's time per cell from the store (every row holds
    its batch's wall time shared over the batch's instances)."""
    import sqlite3

    grid = {**SGD_GRID["cuda" if device.startswith("cuda") else "cpu"], "learner": "pca,ksubspaces,adam"}
    cells, _ = build_grid(EXPERIMENTS["subspace-recovery"], {"n": SGD_N, **grid})
    _sgd_sweep({"K": "1,2", "d": 2, "N": 4, "learner": "pca,ksubspaces,adam", "sgd_steps": 2}, device)   # warm-up
    out = tempfile.mkdtemp(prefix="fastdiff-n3072-")
    try:
        store = os.path.join(out, "s.sqlite")
        benchmark.group, benchmark.name = f"Fig. 4 sweep n={SGD_N}, 3 learners, {len(cells)} cells", "fastdiff"
        benchmark.pedantic(lambda: _sgd_sweep(grid, device, store), rounds=1, warmup_rounds=0, iterations=1)
        with sqlite3.connect(store) as db:
            per = db.execute("SELECT learner, SUM(seconds), COUNT(DISTINCT cell), AVG(success) FROM results "
                             "GROUP BY learner ORDER BY learner").fetchall()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    for learner, seconds, count, rate in per:
        mine = [c for c in cells if c["learner"] == learner]
        ks = ",".join(str(k) for k in sorted({c["K"] for c in mine}))
        group = f"Fig. 4 sweep n={SGD_N}, {learner}, 20 trials: time per cell ({count} cells: K {ks}, " \
                f"d {grid['d']}, N {grid['N']})"
        harness.TABLE.add(harness.Row(group, "fastdiff", seconds / count, 0,
                                      _sgd_flops(mine) // count if learner == "adam" else 0))
        print(f"\nn={SGD_N} {learner} on {device}: {seconds / count:.3f} s per cell of 20 instances "
              f"(success rate {rate:.2f} over the subgrid)")


ONE_CELL = f"adam n={SGD_N} one cell (K 2, d 4, N 24, 20 trials, 300 steps)"


def test_sgd_n3072_one_cell(benchmark, device):
    _sgd_sweep({"K": 2, "d": 2, "N": 4, "sgd_steps": 2}, device)
    grid = {k: str(v) for k, v in SGD_CELL.items()}
    _per_cell(benchmark, ONE_CELL, "fastdiff", lambda: _sgd_sweep(grid, device), 1, _sgd_flops([SGD_CELL]))


def test_sgd_n3072_one_cell_one_instance_at_a_time(benchmark, device):
    """The same 20 instances through the same learner (adam_bases), one instance per call."""
    from fastdiff.sweeps import learners as L
    from fastdiff.sweeps import subspace as S

    K, d, N = SGD_CELL["K"], SGD_CELL["d"], SGD_CELL["N"]
    _, X, _ = S.molrg_batch(SGD_N, K, d, [N], 0.0, "orthogonal", [1], 20)
    X = X.to(device)
    init = torch.randn(20, K, SGD_N, d)
    counts = torch.full((1,), float(N))
    L.adam_bases(X[:1], counts, K, d, [(1, 0)], steps=2, init=init[:1])

    def loop():
        for t in range(20):
            L.adam_bases(X[t:t + 1], counts, K, d, [(1, t)], init=init[t:t + 1])
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    _per_cell(benchmark, ONE_CELL, "eager", loop, 1, 0)


@pytest.mark.parametrize("method", ["householder", "cholesky"])
def test_sgd_retraction(record, device, method):
    """The sgd learner's per-step QR retraction at the shape of a GPU batch (240 instances of K = 2
    bases, n = 3072, d = 12): Householder (cuSOLVER per matrix on CUDA) against CholeskyQR2 (batched
    GEMMs, Cholesky, triangular solve).  ``_retract("auto")`` takes CholeskyQR2 on CUDA, Householder
    on the CPU; this row is where that choice is measured."""
    from fastdiff.ops.ksubspaces import orth
    from fastdiff.sweeps import learners as L

    B = 240 if device.startswith("cuda") else 20
    U = orth(torch.randn(B, 2, SGD_N, 12, device=device))
    Y = U - 0.01 * torch.randn_like(U).sign()
    flops = B * 2 * (2 * 2 * SGD_N * 12 ** 2 + 2 * 2 * SGD_N * 12 ** 2)   # two (Gram + solve) passes
    record(f"sgd retraction: QR of ({B}, 2, {SGD_N}, 12) float32", "fastdiff" if method == "cholesky" else "eager",
           lambda: L._retract(Y, method), flops=flops, rounds=10, warmup=2)
