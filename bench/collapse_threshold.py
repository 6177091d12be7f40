"""The finite-d collapse time against Biroli et al.'s high-dimensional t_C (docs/math.md section 4c).

For N points of ``N(0, var I_d)`` the excess entropy ``f^e(t) / alpha_N`` (2048 Monte Carlo samples,
57 OU times on [0.2, 3] t_C) is crossed at thresholds 0.1, 0.2 and 0.3; each crossing is divided by
``t_C = (1/2) log(1 + var / (N^(2/d) - 1))``.  Writes bench/results/collapse-threshold.md.

    python bench/collapse_threshold.py [--out bench/results/collapse-threshold.md]
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from fastdiff.sweeps.collapse import crossing_time, excess_entropy, gaussian_collapse_time

CASES = [(8, 1000, 4.0), (16, 500, 1.0), (16, 2000, 9.0), (32, 1000, 4.0), (32, 4000, 1.0), (64, 2000, 9.0),
         (64, 500, 1.0), (128, 2000, 4.0)]
THRESHOLDS = (0.1, 0.2, 0.3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/collapse-threshold.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    lines = ["# Finite-d collapse time / high-dimensional t_C (Gaussian data)", "",
             "`python bench/collapse_threshold.py`: 2048 samples, 57 OU times on [0.2, 3] t_C, one thread.", "",
             "| d | N | var | t_C | " + " | ".join(f"crossing {e} / t_C" for e in THRESHOLDS) + " |",
             "|---|---|---|---|" + "---|" * len(THRESHOLDS)]
    t0 = time.time()
    for d, N, var in CASES:
        Y = torch.randn(N, d, generator=torch.Generator().manual_seed(d * N), dtype=torch.float64) * var ** 0.5
        tc = gaussian_collapse_time(N, d, var)
        ee = excess_entropy(Y, torch.linspace(0.2 * tc, 3 * tc, 57, dtype=torch.float64), samples=2048, seed=1)
        ratios = [crossing_time(ee.times, ee.excess / ee.alpha, e) / tc for e in THRESHOLDS]
        lines.append(f"| {d} | {N} | {var:g} | {tc:.3f} | " + " | ".join(f"{r:.3f}" for r in ratios) + " |")
        print(lines[-1], flush=True)
    lines += ["", f"({time.time() - t0:.0f} s)"]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
