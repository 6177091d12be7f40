"""Acceptance 5 of issue 16: the Algorithm 1 learner (``sgd``) at n = 3072 against this CPU's matmul ceiling.

Per cell (20 trials = one batch, as the sweep runs a cell): the time of ``--steps`` steps of
``alg1_bases`` after one warm-up step, its GFLOP/s from ``alg1_flops`` (the executed GEMMs and QRs:
4 N n D + 6 n D^2 + 2 n min(b, D) D + 4 n d^2 K per instance and step), and the ceiling: the best of
``--reps`` float32 ``torch.matmul`` of 2048 x 2048 matrices, measured just before and just after the
cell in the same process and thread count (the machine is shared, so the ceiling is re-measured per
cell and the best of the two is used).  ``equiv_fraction``: the step's work counted as
bench/test_bench_sweeps.py counts the adam learner's (12 b n D + 4 n D^2 per instance and step, the
materialized form of a b-row minibatch), over the same time and ceiling.

    python bench/alg1_gemm.py --threads 1 --out bench/results/alg1_gemm.csv
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import print_row, write_rows                            # noqa: E402  (bench/, the script's folder)

from fastdiff.sweeps import alg1 as A                                  # noqa: E402
from fastdiff.sweeps import subspace as S                              # noqa: E402

CELLS = [(1, 4, 24), (1, 12, 48), (2, 4, 24), (2, 12, 48), (2, 12, 24), (2, 6, 48)]   # (K, d, N)


def ceiling(reps: int, size: int = 2048) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * size ** 3 / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    n, T = 3072, a.trials
    b = A.DEFAULTS["batch"]
    rows = []
    for K, d, N in CELLS:
        U, X, _ = S.molrg_batch(n, K, d, [N], 0.0, "orthogonal", [11], T, balanced=True)
        counts = torch.full((T,), float(N))
        init = torch.randn(T, K, n, d)
        seeds = [(11, t) for t in range(T)]
        A.alg1_bases(X, counts, K, d, seeds, init, steps=1)            # warm-up
        top = ceiling(a.reps)
        t = time.perf_counter()
        A.alg1_bases(X, counts, K, d, seeds, init, steps=a.steps)
        sec = (time.perf_counter() - t) / a.steps
        top = max(top, ceiling(a.reps))
        flops = A.alg1_flops(N, n, K, d, b) * T
        r = {"K": K, "d": d, "N": N, "trials": T, "threads": a.threads, "ms_per_step": 1e3 * sec,
             "s_per_cell_default_steps": sec * A.DEFAULTS["steps"], "gflops": flops / sec / 1e9,
             "ceiling_gflops": top, "fraction": flops / sec / 1e9 / top,
             # the same step counted as bench/test_bench_sweeps.py counts adam's: the materialized
             # forward/backward GEMMs of b rows, 12 b n D, plus the QR, 4 n D^2
             "equiv_fraction": T * (12 * b * n * K * d + 4 * n * (K * d) ** 2) / sec / 1e9 / top}
        rows.append(r)
        print_row(r)
    write_rows(a.out, rows)


if __name__ == "__main__":
    main()
