"""Command line: ``fastdiff sweep <experiment> ... | plot | info | demo | bench``.

``fastdiff sweep subspace-recovery`` (the main job) runs the seed 002 Fig. 4 grid with its defaults;
every experiment parameter is an option taking a value list or range (``--d 1:12 --N 2:48:2
--K 1,2``).  Results go to an SQLite store (``--store``, default ``results/<experiment>.sqlite``;
re-running resumes), exported as CSV (and Parquet with pyarrow) and plotted into ``--out``.
"""
from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` to an option's help once: not where the help already states its default,
    nor for ``None`` (no default) or an off switch."""

    def _get_help_string(self, action):
        h = action.help or ""
        d = action.default
        if "default" in h or d is None or d is False or d is argparse.SUPPRESS or not action.option_strings:
            return h
        return f"{h} (default: %(default)s)"


def _flag(name: str) -> str:
    """The command-line spelling of a parameter: kebab-case (``max_iter`` -> ``--max-iter``)."""
    return "--" + name.replace("_", "-")


def _parser():
    p = argparse.ArgumentParser(prog="fastdiff", description="Fused kernels for diffusion models")
    sub = p.add_subparsers(dest="cmd", required=True)
    subs = {"info": sub.add_parser("info", help="which backends work here")}
    d = subs["demo"] = sub.add_parser(
        "demo", help="DDPM sampling of a power-law Gaussian with the fused steps: table + plot",
        description="DDPM sampling of N(0, diag(v^-1)) with the exact (linear) denoiser and the fused ddpm_step; "
                    "writes demo_ddpm_gaussian.csv (sampled vs exact per-mode variance) and .png",
        formatter_class=_HelpFormatter)
    d.add_argument("--out", default="results", help="directory for the table and the plot")
    d.add_argument("--n", type=int, default=32, help="data dimension (modes), >= 1")
    d.add_argument("--samples", type=int, default=8192, help="DDPM chains sampled, >= 2")
    d.add_argument("--T", type=int, default=1000, help="DDPM steps, >= 1")
    d.add_argument("--seed", type=int, default=0, help="Philox seed of the initial and in-kernel noise")
    d.add_argument("--backend", default="auto", help="ddpm_step backend: auto, triton, cuda, cpp or torch")
    b = subs["bench"] = sub.add_parser(
        "bench", help="run the benchmark suite (pytest-benchmark) and print the table of ratios")
    b.add_argument("args", nargs=argparse.REMAINDER, help="extra pytest arguments")
    subs.update(_add_sweep_parsers(sub))
    rp = subs["reproduce"] = sub.add_parser(
        "reproduce", help="a seed document's figure with its settings: plot, table, caption, the statement checked",
        description="Runs the figure's sweep into OUT/FIGURE/ and checks the document's statement on it "
                    "(exit status 1 where it does not hold).  FIGURE: a name from `fastdiff reproduce list`, or all.",
        formatter_class=_HelpFormatter)
    rp.add_argument("figure", help="figure name, 'list' or 'all'")
    rp.add_argument("--out", default="results", help="directory; each figure writes OUT/FIGURE/")
    rp.add_argument("--trials", type=int, default=None, help="trials a cell (default: the figure's)")
    rp.add_argument("--no-progress", action="store_true", help="no progress bar")
    pl = subs["plot"] = sub.add_parser(
        "plot", help="plot a sweep store: <experiment>.png and the table it shows (.csv)", formatter_class=_HelpFormatter)
    pl.add_argument("store", help="the .sqlite store written by fastdiff sweep")
    pl.add_argument("--out", default="results", help="directory for <experiment>.png and <experiment>.csv")
    return p, subs


def main(argv=None) -> int:
    p, subs = _parser()
    a, extra = p.parse_known_args(argv)
    if extra and a.cmd != "bench":   # the subcommand's own usage, not the top level's
        key = f"sweep {a.experiment}" if a.cmd == "sweep" else a.cmd
        subs[key].error(f"unrecognized arguments: {' '.join(extra)}")
    name = f"fastdiff {a.cmd}" + (f" {a.experiment}" if a.cmd == "sweep" else "")
    try:
        return _dispatch(a)
    except (ValueError, RuntimeError, OSError, sqlite3.Error) as e:
        # one line, no traceback: bad input, an unusable path, a full disk, a corrupt store
        print(f"{name}: error: {_describe(e)}", file=sys.stderr)
        return 2


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        return f"{where}: {e.strerror}" if where else e.strerror
    if isinstance(e, sqlite3.Error):
        return f"SQLite: {e}"
    return str(e)


def _dispatch(a) -> int:
    if a.cmd == "sweep":
        return _sweep(a)
    if a.cmd == "reproduce":
        from fastdiff.reproduce import FIGURES, reproduce

        if a.figure == "list":
            for f in FIGURES.values():
                print(f"{f.name:24s} {f.source}")
            return 0
        if a.trials is not None and a.trials < 1:
            raise ValueError(f"--trials: expected an int >= 1, got {a.trials}")
        names = list(FIGURES) if a.figure == "all" else [a.figure]
        ok = True
        for name in names:
            r = reproduce(name, a.out, trials=a.trials, progress=not a.no_progress)
            print(f"{name}: {'holds' if r['holds'] else 'DOES NOT HOLD'}: {r['message']}")
            print(f"  plot:    {r['plot']}\n  table:   {r['table']}\n  caption: {r['caption']}")
            ok = ok and r["holds"]
        return 0 if ok else 1
    if a.cmd == "plot":
        from fastdiff.sweeps.plots import plot_store, write_table

        r = plot_store(a.store, a.out)
        print(f"plot:  {r['plot']}\ntable: {r['table']}")
        return 0
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


def _add_sweep_parsers(sub) -> dict:
    from fastdiff.sweeps import EXPERIMENTS

    sw = sub.add_parser("sweep", help="run a phase-diagram sweep (resumable), then export and plot it")
    exps = sw.add_subparsers(dest="experiment", required=True, metavar="experiment")
    out = {"sweep": sw}
    for name, exp in EXPERIMENTS.items():
        e = out[f"sweep {name}"] = exps.add_parser(name, help=exp.description, description=exp.description,
                                                   formatter_class=_HelpFormatter)
        for prm in exp.params:
            default = ",".join(str(v) for v in prm.default)
            e.add_argument(_flag(prm.name), dest=prm.name, default=None, metavar="VALUES",
                           help=f"{prm.help} (list a,b or range start:stop[:step]; default: {default})")
            if "_" in prm.name:   # the old underscore spelling still works, unlisted
                e.add_argument(f"--{prm.name}", dest=prm.name, default=None, help=argparse.SUPPRESS)
        e.add_argument("--trials", type=int, default=20, help="random instances per cell")
        e.add_argument("--seed", type=int, default=0, help="sweep seed (each cell's seed is derived from it)")
        e.add_argument("--store", default=None, help="SQLite store (default <out>/<experiment>.sqlite)")
        e.add_argument("--out", default="results", help="directory for the exported table and the plot")
        e.add_argument("--executor", default="local", choices=("local", "ray"), help="where the batches run")
        e.add_argument("--address", default=None, help="Ray cluster address (default: start a local instance)")
        e.add_argument("--threads", type=int, default=1, help="torch threads per batch")
        e.add_argument("--workers", type=int, default=None,
                       help="local executor: batches run side by side (default: one per core / --threads)")
        e.add_argument("--device", default="cpu",
                       help="where the batches compute: cpu (default) or cuda[:i] (large n, e.g. --n 3072 --learner sgd)")
        e.add_argument("--no-plot", action="store_true", help="skip the plot (the per-cell table <experiment>.csv "
                       "is written either way)")
        e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e = out["sweep sampler-error"] = exps.add_parser(
        "sampler-error", help="exact W2 / KL of every solver against NFE on Gaussian data (computed, no sampling)",
        description="fastdiff.sweeps.sampler_error: writes sampler-error.csv (and .png) into --out",
        formatter_class=_HelpFormatter)
    e.add_argument("--out", default="results", help="directory for the table and the plot")
    e.add_argument("--n", type=int, default=64, help="data dimension (modes)")
    e.add_argument("--k", type=float, default=1.0, help="spectrum exponent: lam_v = v^-k")
    e.add_argument("--steps", default=",".join(map(str, _SAMPLER_ERROR_STEPS)), help="Karras step counts, a,b,c")
    e.add_argument("--fit", type=int, default=4, help="step counts (the largest) in the log-log slope fit")
    e.add_argument("--no-plot", action="store_true", help="skip the plot")
    return out


_SAMPLER_ERROR_STEPS = (4, 8, 16, 32, 64, 128, 256, 512)


def _sampler_error(a) -> int:
    from fastdiff.sweeps import sampler_error

    try:
        steps = [int(s) for s in a.steps.split(",")]
    except ValueError:
        raise ValueError(f"--steps: expected comma-separated ints, got {a.steps!r}") from None
    r = sampler_error.run(a.out, n=a.n, k=a.k, steps=steps, fit=a.fit, plot=not a.no_plot)
    for label, s in r["slopes"].items():
        print(f"{label:20s} slope vs NFE: W2 {s['w2']:+.2f}  KL {s['kl']:+.2f}  W2 to the ODE {s['w2_ode']:+.2f}")
    print(f"table: {r['table']}\nslopes: {r['slopes_table']}" + (f"\nplot:  {r['plot']}" if r["plot"] else "\n(no plot)"))
    return 0


def _sweep(a) -> int:
    if a.experiment == "sampler-error":   # computed, not a grid of trials: no store
        return _sampler_error(a)
    import os
    import time

    from fastdiff import sweeps
    from fastdiff.sweeps.plots import plot_store, write_table
    from fastdiff.sweeps.runner import gc_frozen

    exp = sweeps.EXPERIMENTS[a.experiment]
    grid = {p.name: getattr(a, p.name) for p in exp.params if getattr(a, p.name) is not None}
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        raise ValueError(f"--out {a.out}: exists and is not a directory")
    store = a.store or os.path.join(a.out, f"{a.experiment}.sqlite")
    if os.path.isdir(store):
        raise ValueError(f"--store {store}: is a directory, expected an .sqlite file")
    with gc_frozen():   # the sweep, the export and the plot
        t0 = time.perf_counter()
        st = sweeps.run_sweep(a.experiment, grid, trials=a.trials, seed=a.seed, store=store, executor=a.executor,
                              address=a.address, progress=not a.no_progress, threads=a.threads,
                              workers=a.workers, device=a.device)
        seconds = time.perf_counter() - t0
        stem = os.path.splitext(store)[0]
        with st:
            rows = len(st)
            if st.cells_in_store:
                kept = "all in store" if st.cells_computed == 0 else f"{st.cells_in_store} were in store"
                print(f"resumed: {st.cells_computed} of {st.cells_total} cells recomputed ({kept})")
            print(f"{a.experiment}: {rows} rows in {store} ({seconds:.1f} s)")
            paths = st.export(stem)
            for path in paths:
                print(f"rows:  {path}")
            if len(paths) == 1:
                print("(no Parquet export: needs pyarrow; pip install 'fastdiff[sweeps]' or pip install pyarrow)")
        if a.no_plot:   # the per-cell table is the sweep's result, not the plot's: written either way
            print(f"table: {write_table(store, a.out)}")
        else:
            try:
                r = plot_store(store, a.out)
            except RuntimeError as e:  # matplotlib missing: the sweep itself succeeded (and the table is written)
                print(f"table: {os.path.join(a.out, a.experiment + '.csv')}\n(no plot: {e})")
            else:
                print(f"table: {r['table']}\nplot:  {r['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
