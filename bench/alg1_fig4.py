"""Acceptance 1 of issue 16: seed 002's Fig. 4 with the Algorithm 1 learner (``sgd``) at n = 48.

K = 1: success rate at N = d - 1, d, d + 2 for d = 1..12 (noiseless, orthogonal bases); K = 2 with
balanced N_k (N = 2 N_k): at N_k = d - 1, d, d + 2.  20 trials per cell, the learner's defaults
(fastdiff.sweeps.alg1.DEFAULTS) unless given.  The instances are the subspace-recovery sweep's
(``molrg_batch`` from the sweep's cell seeds), fitted through ``fit_bases`` as the sweep does, one
batch per (K, d) holding every N of that row (ragged counts).

    python bench/alg1_fig4.py --K 1 --out bench/results/alg1_fig4_K1.csv
    python bench/alg1_fig4.py --K 2 --out bench/results/alg1_fig4_K2.csv

Prints one line per cell: K, d, N, N_k, success rate, median and max error, seconds.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import print_row, write_rows                            # noqa: E402  (bench/, the script's folder)

from fastdiff.sweeps import learners as LR                          # noqa: E402
from fastdiff.sweeps import subspace as S                           # noqa: E402
from fastdiff.sweeps.runner import EXPERIMENTS, build_grid, cell_seed   # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--K", type=int, required=True)
    ap.add_argument("--d", default="1:12")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    for k in ("steps", "batch", "grid"):
        ap.add_argument(f"--{k}", type=int, default=0)
    for k in ("lr", "sigma_max"):
        ap.add_argument(f"--{k}", type=float, default=0.0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lo, hi = (int(v) for v in a.d.split(":"))
    exp = EXPERIMENTS["subspace-recovery"]
    rows = []
    for d in range(lo, hi + 1):
        per = [d - 1, d, d + 2] if a.K == 1 else [d - 1, d, d + 2]      # N (K = 1) or N_k (K = 2)
        Ns = [v * a.K for v in per if v >= 1]
        grid = {"n": 48, "K": a.K, "d": d, "N": ",".join(map(str, Ns)), "learner": "sgd", "balanced": 1,
                **{f"sgd_{k}": getattr(a, k) for k in ("steps", "batch", "grid", "lr", "sigma_max")}}
        cells, _ = build_grid(exp, grid)
        seeds = [cell_seed(exp.name, 0, c) for c in cells]
        t0 = time.time()
        U, X, _ = S.molrg_batch(48, a.K, d, Ns, 0.0, "orthogonal", seeds, a.trials, balanced=True)
        counts = torch.tensor([float(N) for N in Ns]).repeat_interleave(a.trials)
        owner = [(s, t) for s in seeds for t in range(a.trials)]
        Uh = LR.fit_bases("sgd", X, counts, a.K, d, owner, cells[0])
        err = S.subspace_errors(Uh, U).reshape(len(Ns), a.trials)
        sec = time.time() - t0
        for N, e in zip(Ns, err):
            r = {"K": a.K, "d": d, "N": N, "N_k": N // a.K, "success": (e <= 0.1).double().mean().item(),
                 "median_error": e.median().item(), "max_error": e.max().item(), "seconds": sec / len(Ns)}
            rows.append(r)
            print_row(r)
    write_rows(a.out, rows)


if __name__ == "__main__":
    main()
