"""The U-Net learner's generalization transition against d (issue 16, acceptance 2; seed 002 Fig. 5a).

Runs ``network-generalization`` for each d on the grid N = r d (r in --ratios), takes the trial-mean
GL score per cell, the transition N*(d) where it first reaches --level
(:func:`fastdiff.sweeps.networks.transition_point`) and fits ``N* = a d + b``
(:func:`fastdiff.sweeps.networks.linear_fit`); writes the table and the fit as Markdown.

    python bench/network_transition.py --out bench/results/network-transition.md

CPU-sized (a 54k-parameter U-Net, 1000 Adam steps); the stores go to --store-dir and resume.
"""
import argparse
import os
import platform
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from fastdiff.sweeps import networks as nw  # noqa: E402
from fastdiff.sweeps.runner import run_sweep  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", default="2,4,6")
    ap.add_argument("--ratios", default="1,2,4,6,8,12,16", help="N = r d")
    ap.add_argument("--arch", default="unet", choices=nw.ARCHS)
    ap.add_argument("--K", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--level", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--store-dir", default="results/network-transition")
    ap.add_argument("--out", default="bench/results/network-transition.md")
    a = ap.parse_args(argv)
    ds = [int(v) for v in a.d.split(",")]
    ratios = [int(v) for v in a.ratios.split(",")]
    os.makedirs(a.store_dir, exist_ok=True)
    table, trans, wall = [], {}, {}
    for d in ds:
        Ns = [r * d for r in ratios]
        st = run_sweep("network-generalization", {"d": d, "K": a.K, "N": ",".join(map(str, Ns)), "arch": a.arch,
                                                   "steps": a.steps},
                       trials=a.trials, store=os.path.join(a.store_dir, f"{a.arch}-K{a.K}-d{d}-s{a.steps}.sqlite"),
                       threads=a.threads, workers=1)
        rows = st.rows()
        wall[d] = sum(r["seconds"] for r in rows)   # the batches' wall time, as stored (a resumed run adds 0)
        means = []
        for N in Ns:
            rs = [r for r in rows if r["N"] == N]
            gl = [r["gl"] for r in rs]
            means.append(statistics.fmean(gl))
            table.append((d, N, N / d, means[-1], max(gl) - min(gl), statistics.fmean(r["memorized"] for r in rs),
                          statistics.fmean(r["off_support"] for r in rs), statistics.fmean(r["loss"] for r in rs)))
        trans[d] = nw.transition_point(Ns, means, a.level)
        print(f"d = {d}: N* = {trans[d]:.2f} ({wall[d]:.0f} s)", flush=True)
    fit = nw.linear_fit(ds, [trans[d] for d in ds]) if len(ds) > 1 else None
    lines = [
        f"# {a.arch} learner: GL score (seed 002 eq. 21) vs N, transition vs d",
        "",
        f"`python bench/network_transition.py` on {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, a 2-core machine shared with other jobs; torch {torch.__version__}. ",
        f"MoLRG n = 48, K = {a.K}, orthonormal bases, no noise; {a.arch} (width 16), EDM loss, Adam lr 2e-3, "
        f"batch 64, {a.steps} steps; EDM Heun 18 levels; 128 samples and 128 fresh draws per instance; "
        f"{a.trials} trials per cell (docs/math.md section 4b).",
        "",
        "| d | N | N/d | GL (mean) | GL range | memorized | off_support | final loss |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {d} | {N} | {r:g} | {g:.3f} | {s:.3f} | {m:.3f} | {o:.3f} | {lo:.3f} |"
              for d, N, r, g, s, m, o, lo in table]
    lines += ["", f"Transition N*(d): the N where the mean GL first reaches {a.level} (linear interpolation):", ""]
    lines += [f"- d = {d}: N* = {trans[d]:.2f} (N*/d = {trans[d] / d:.2f}; its batch {wall[d]:.0f} s wall)" for d in ds]
    if fit is not None:
        lines += ["", f"Least squares N* = a d + b over d in {ds}: a = {fit['slope']:.2f}, b = {fit['intercept']:.2f}, "
                  f"RMS residual {fit['rms']:.2f}; through the origin N* = c d: c = {fit['ratio']:.2f}, "
                  f"RMS residual {fit['ratio_rms']:.2f}.", ""]
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
