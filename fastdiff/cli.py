"""Command line: ``fastdiff info | demo | bench``."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastdiff", description="Fused kernels for diffusion models")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="which backends work here")
    d = sub.add_parser("demo", help="DDPM sampling of a power-law Gaussian with the fused steps: table + plot")
    d.add_argument("--out", default="results")
    d.add_argument("--n", type=int, default=32)
    d.add_argument("--samples", type=int, default=8192)
    d.add_argument("--T", type=int, default=1000)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--backend", default="auto")
    b = sub.add_parser("bench", help="run the benchmark suite (pytest-benchmark) and print the table of ratios")
    b.add_argument("args", nargs=argparse.REMAINDER, help="extra pytest arguments")
    a = p.parse_args(argv)

    if a.cmd == "info":
        import fastdiff

        fastdiff.info()
        return 0
    if a.cmd == "demo":
        from fastdiff import demo

        r = demo.run(a.out, n=a.n, samples=a.samples, T=a.T, seed=a.seed, backend=a.backend)
        print(f"backend {r['backend']}: {a.T} DDPM steps in {r['seconds']:.2f} s ({r['steps_per_second']:.0f} steps/s)")
        print(f"sampled vs exact per-mode variance: worst |z| = {r['worst_z']:.2f} (std errors)")
        print(f"table: {r['table']}" + (f"\nplot:  {r['plot']}" if r["plot"] else "\n(no plot: matplotlib not installed)"))
        return 0 if r["worst_z"] < 5 else 1
    if a.cmd == "bench":
        here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
        if not os.path.isdir(here):
            print("bench/ not found: run from a source checkout", file=sys.stderr)
            return 2
        cmd = [sys.executable, "-m", "pytest", here, "--benchmark-enable", "-q", "-p", "no:cacheprovider", *a.args]
        env = dict(os.environ, FASTDIFF_BENCH_COMMAND="fastdiff bench")
        return subprocess.call(cmd, env=env)
    return 2


if __name__ == "__main__":
    sys.exit(main())
