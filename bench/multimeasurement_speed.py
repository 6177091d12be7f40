"""SMS / JMS on fastdiff's loop (one fused Langevin pass per step, noise drawn in the kernel) against the
eager torch loop a user would write (the same denoiser call, then ``y + g (D - y) / sigma^2 +
sqrt(2 g) randn_like(y)``).  JMS twice: by default (its exact split, docs/math.md §8a: the (B, n) mean
chain) and with ``per_measurement=True`` (the m coupled chains on the fused steps).  Writes
bench/results/multimeasurement-speed.md.

    python bench/multimeasurement_speed.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import fastdiff
from fastdiff.denoisers import GaussianMixture


def eager_jms(den, y, sigma, g, steps):
    m = y.shape[1]
    se = sigma / math.sqrt(m)
    for _ in range(steps):
        x0 = den(y.mean(1), 1.0, se)
        y = y + g * (x0[:, None, :] - y) / (sigma * sigma) + math.sqrt(2 * g) * torch.randn_like(y)
    return den(y.mean(1), 1.0, se)


def eager_sms(den, y, sigma, g, m, steps):
    total = None
    for i in range(1, m + 1):
        for _ in range(steps):
            ybar = y if total is None else (total + y) / i
            x0 = den(ybar, 1.0, sigma / math.sqrt(i))
            y = y + g * (x0 - y) / (sigma * sigma) + math.sqrt(2 * g) * torch.randn_like(y)
        if i < m:
            total = y.clone() if total is None else total + y
    return den((total + y) / m, 1.0, sigma / math.sqrt(m))


def timed(fn, repeats):
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "multimeasurement-speed.md"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load = open("/proc/loadavg").read().split()[0] if Path("/proc/loadavg").exists() else "?"
    rows = []
    sigma = 4.0
    for (B, m, n, steps) in [(4096, 16, 64, 20), (1024, 64, 64, 20), (256, 16, 64, 50)]:
        den = GaussianMixture(torch.stack([torch.full((n,), -3.0), torch.full((n,), 3.0)]), 1.0, pi=[0.3, 0.7])
        g = 0.1 * sigma ** 2
        y0 = torch.randn(B, m, n)
        eager = timed(lambda: eager_jms(den, y0, sigma, g, steps), args.repeats)
        for label, per in (("jms", False), ("jms, per_measurement=True", True)):
            fused = timed(lambda: fastdiff.sample(den, y0, sigma, "jms", measurements=m, steps=steps, step_size=g,
                                                  per_measurement=per, generator=fastdiff.Generator(0), disable=True),
                          args.repeats)
            rows.append((label, B, m, n, steps, fused / steps * 1e3, eager / steps * 1e3, eager / fused))
    for (B, m, n, steps) in [(65536, 4, 64, 5), (4096, 4, 64, 10)]:
        den = GaussianMixture(torch.stack([torch.full((n,), -3.0), torch.full((n,), 3.0)]), 1.0, pi=[0.3, 0.7])
        g = 0.1 * sigma ** 2
        y0 = torch.randn(B, n)
        fused = timed(lambda: fastdiff.sample(den, y0, sigma, "sms", measurements=m, steps=steps, step_size=g,
                                              generator=fastdiff.Generator(0), disable=True), args.repeats)
        eager = timed(lambda: eager_sms(den, y0, sigma, g, m, steps), args.repeats)
        rows.append(("sms", B, m, n, steps * m, fused / (steps * m) * 1e3, eager / (steps * m) * 1e3, eager / fused))
    lines = [
        "# SMS / JMS: fastdiff's loop (fused steps) vs an eager torch loop, this CPU",
        "",
        f"Device: {platform.machine()} CPU, {torch.get_num_threads()} threads (torch {torch.__version__}); "
        f"1-min load average {load} at the start on {os.cpu_count()} cores"
        + (" (shared with other jobs: the absolute times are noisy; the ratio, both loops measured back to "
           "back, is the figure)." if load != "?" and float(load) >= 1.0 else "."),
        f"Command: `python bench/multimeasurement_speed.py --repeats {args.repeats}"
        f"{' --threads ' + str(args.threads) if args.threads else ''}` (median of the repeats, "
        "after one warm-up).  Denoiser: the talk's two-Gaussian mixture (isotropic, n = 64), the same call in "
        "both loops; eager step: `y + g (D - y) / sigma^2 + sqrt(2 g) randn_like(y)`.",
        "",
        "| method | B | m | n | steps | fused ms/step | eager ms/step | eager / fused |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]:.2f} | {r[6]:.2f} | {r[7]:.2f}x |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
