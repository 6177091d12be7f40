"""Before/after benchmark comparison: two revisions' CPU benchmarks side by side, one run, one machine.

    python bench/compare.py --base 237765d [--head HEAD] [-k EXPR] [--quick] [--out bench/results/before-after.md]

Each revision is checked out in a temporary git worktree outside the repository (removed at the
end) and gets its own ``fastdiff._C``: built there with ``python setup.py build_ext --inplace``,
or copied from the build cache when a revision with the same csrc/ tree and setup.py was built
before (the cache is keyed by those git hashes and the Python version), or with ``--reuse-build``
from this checkout when its csrc/ and setup.py are those of the revision.

Then, one bench file at a time, a fresh pytest process per revision runs that revision's own file (its ``fastdiff``
first on PYTHONPATH: the header of the table lists the ``fastdiff.__file__`` each side imported)
with bench/compare_worker.py in place of pytest-benchmark.  The two processes walk the same list
of tests side by side; for each benchmark row both run their warm-up rounds (untimed, at the same
time), then the row's timed rounds in alternating blocks, before, after, before, after (the side
that starts alternates from row to row), one process timing while the other waits, so the machine's
drift falls on both sides alike.  Threads are pinned to the same number on both sides.

Rows are matched by their name in the benchmark table (the op and size, and the implementation),
not by test id, so the two revisions' bench files may differ; rows found on one side only are
listed below the table.  Per row: the median of the timed rounds on each side, after/before, and
a flag where after/before exceeds ``--threshold`` (1.10).  A row whose rounds take under
``--min-time`` (1 s) a side is timed for more rounds than its bench file asks, up to 20 times.  ``--quick`` times a quarter of each
row's rounds (at least 3, or the row's own count where that is smaller).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
PLUGIN = Path(__file__).resolve().with_name("compare_worker.py")
CACHE = Path(tempfile.gettempdir()) / "fastdiff-compare-cache"
REWARM_BELOW_S = 0.1  # rows faster than this get one untimed call at the start of each later block
LOADS: List[float] = []  # the 1-minute load average after each test, for the report's header
OTHERS: List[float] = []  # cores busy outside this run's process tree during each test (Linux)
QUIET_CORES = 0.25        # more than this, median, and the report says the machine was not quiet


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def cpu_jiffies() -> Optional[Tuple[int, int]]:
    """(busy jiffies of all CPUs, jiffies of this process and its descendants, children reaped
    included), from /proc; None where there is no /proc (the report then falls back to the load
    average, which counts this run's own threads too)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    busy = sum(v[:8]) - v[3] - v[4]   # user nice system idle iowait irq softirq steal: all but idle, iowait
    parent, own = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                text = f.read()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()   # from field 3 (state): ppid, ..., utime (14) .. cstime (17)
        parent[int(d)] = int(fields[1])
        own[int(d)] = sum(int(x) for x in fields[11:15])
    tree, frontier = set(), {os.getpid()}
    while frontier:
        tree |= frontier
        frontier = {p for p, pp in parent.items() if pp in frontier and p not in tree}
    return busy, sum(own.get(p, 0) for p in tree)


class OtherLoad:
    """Cores kept busy by processes outside this run between calls of :meth:`sample`."""

    def __init__(self):
        self.last, self.t = cpu_jiffies(), time.perf_counter()

    def sample(self) -> Optional[float]:
        now, t = cpu_jiffies(), time.perf_counter()
        out = None
        if now and self.last and t > self.t:
            others = (now[0] - self.last[0]) - (now[1] - self.last[1])   # a process of ours that exited: < 0
            out = max(0.0, others / os.sysconf("SC_CLK_TCK") / (t - self.t))
        self.last, self.t = now, t
        return out


def quick_rounds(rounds: int) -> int:
    return min(rounds, max(3, math.ceil(rounds / 4)))


def split_blocks(n: int, blocks: int) -> List[int]:
    """``n`` timed rounds as ``min(n, blocks)`` blocks of near-equal size, e.g. 10, 4 -> 3, 3, 2, 2."""
    b = max(1, min(n, blocks))
    return [n // b + (i < n % b) for i in range(b)]


# --------------------------------------------------------------------------------------- checkouts


@dataclass
class Revision:
    label: str            # "before" / "after"
    rev: str              # as given
    sha: str
    subject: str
    path: Path            # the temporary worktree
    build: str = ""       # how its _C was obtained


def build_key(sha: str) -> str:
    """The build's identity: the csrc/ tree and setup.py of the revision, and what compiles them."""
    parts = [git("rev-parse", f"{sha}:csrc"), git("rev-parse", f"{sha}:setup.py"), sys.version,
             platform.machine(), os.environ.get("FASTDIFF_NATIVE", ""), os.environ.get("CXXFLAGS", "")]
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]


def checkout_matches(sha: str) -> bool:
    """True when this checkout's csrc/ and setup.py are exactly the revision's (no uncommitted or
    untracked change) and its built library is newer than every file under csrc/."""
    if subprocess.run(["git", "diff", "--quiet", sha, "--", "csrc", "setup.py"], cwd=REPO).returncode != 0:
        return False
    if git("ls-files", "--others", "--exclude-standard", "csrc"):
        return False
    libs = list((REPO / "fastdiff").glob("_C*.so"))
    newest_source = max(p.stat().st_mtime for p in (REPO / "csrc").rglob("*") if p.is_file())
    return bool(libs) and min(p.stat().st_mtime for p in libs) >= newest_source


def add_worktree(label: str, rev: str, root: Path) -> Revision:
    sha = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    path = root / f"{label}-{sha[:10]}"
    git("worktree", "add", "--detach", str(path), sha)
    # the package maps kernels/ and csrc/ in (setup.py's package_dir); a source tree run needs the links
    for name, target in (("kernels", "../kernels"), ("_csrc", "../csrc")):
        link = path / "fastdiff" / name
        if (path / target[3:]).is_dir() and not link.exists():
            link.symlink_to(target)
    return Revision(label, rev, sha, git("log", "-1", "--format=%s", sha), path)


def provide_builds(revs: List[Revision], args) -> None:
    """Give every revision its ``fastdiff/_C*.so``: cache, this checkout (``--reuse-build``) or a
    build; the builds that are needed run at the same time (each compiles one file at a time)."""
    building: List[Tuple[Revision, Path, subprocess.Popen, float]] = []
    for r in revs:
        key = build_key(r.sha)
        cached = CACHE / key
        if cached.is_dir() and not args.rebuild:
            for so in cached.glob("*.so"):
                shutil.copy2(so, r.path / "fastdiff" / so.name)
            r.build = f"cached build of csrc tree {git('rev-parse', '--short', r.sha + ':csrc')} ({cached})"
        elif args.reuse_build and not args.rebuild and checkout_matches(r.sha):
            for so in (REPO / "fastdiff").glob("_C*.so"):
                shutil.copy2(so, r.path / "fastdiff" / so.name)
            r.build = f"this checkout's build ({REPO / 'fastdiff'}), same csrc/ and setup.py"
        else:
            log = r.path.parent / f"build-{r.label}.log"
            print(f"[compare] building {r.label} ({r.sha[:10]}) in {r.path}, log {log}", flush=True)
            proc = subprocess.Popen([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=r.path,
                                    stdout=open(log, "w"), stderr=subprocess.STDOUT, env=clean_env(r))
            building.append((r, log, proc, time.perf_counter()))
    for r, log, proc, t0 in building:
        if proc.wait() != 0:
            sys.exit(f"[compare] build of {r.label} ({r.rev}) failed:\n{log.read_text()[-3000:]}")
        seconds = time.perf_counter() - t0
        r.build = f"built here in {seconds:.0f} s"
        key = build_key(r.sha)
        tmp = CACHE / f".{key}.{os.getpid()}"
        tmp.mkdir(parents=True, exist_ok=True)
        for so in (r.path / "fastdiff").glob("*.so"):
            shutil.copy2(so, tmp / so.name)
        try:
            tmp.rename(CACHE / key)
        except OSError:  # another run cached it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)


def remove_worktrees(revs: List[Revision], root: Path) -> None:
    for r in revs:
        subprocess.run(["git", "worktree", "remove", "--force", str(r.path)], cwd=REPO, capture_output=True)
    subprocess.run(["git", "worktree", "prune"], cwd=REPO, capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


def clean_env(r: Revision) -> Dict[str, str]:
    """The environment of a revision's processes: the caller's, with only that revision's checkout
    (and this tool's plugin) on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{r.path}{os.pathsep}{r.path.parent / 'plugin'}"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


# --------------------------------------------------------------------------------------- workers


class Worker:
    """One revision's pytest process, driven over a pair of pipes (see compare_worker.py)."""

    def __init__(self, r: Revision, args, paths: List[str], carry: Optional["Worker"] = None):
        self.rev = r
        to_worker_r, to_worker_w = os.pipe()
        from_worker_r, from_worker_w = os.pipe()
        env = clean_env(r)
        threads = str(args.threads)
        env.update(FASTDIFF_COMPARE_FDS=f"{to_worker_r},{from_worker_w}", FASTDIFF_COMPARE_THREADS=threads,
                   OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, FASTDIFF_BENCH_DEVICE="cpu",
                   CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "pytest", *paths, "-q", "-p", "no:cacheprovider", "-p", "no:benchmark",
               "-p", "compare_worker", "-o", "addopts=", "-s", "-W", "ignore::DeprecationWarning"]
        if args.k:
            cmd += ["-k", args.k]
        self.log = r.path.parent / f"bench-{r.label}-{Path(paths[0]).stem}.log"
        self.proc = subprocess.Popen(cmd, cwd=r.path, env=env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                     pass_fds=(to_worker_r, from_worker_w))
        os.close(to_worker_r)
        os.close(from_worker_w)
        self._w = os.fdopen(to_worker_w, "w")
        self._r = os.fdopen(from_worker_r, "r")
        # the results so far: a worker for the next bench file carries on the one before's dicts
        self.samples: Dict[str, List[float]] = carry.samples if carry else {}     # pedantic row -> timed seconds
        self.table: Dict[Tuple[str, str], float] = carry.table if carry else {}  # (group, impl) -> median
        self.outcomes: Dict[str, Tuple[str, str]] = carry.outcomes if carry else {}
        self.hello = self.recv()
        if self.hello.get("event") != "hello":
            raise RuntimeError(f"{r.label}: unexpected first message {self.hello}")
        self.items: List[str] = self.hello["items"]

    def send(self, **msg) -> None:
        self._w.write(json.dumps(msg) + "\n")
        self._w.flush()

    def recv(self) -> dict:
        line = self._r.readline()
        if not line:
            self.proc.wait()
            tail = self.log.read_text()[-4000:]
            raise RuntimeError(f"{self.rev.label}'s pytest ended (rc {self.proc.returncode}); its log ends:\n{tail}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send(cmd="quit")
                self.proc.wait(timeout=120)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def bench_files(revs: List[Revision], args) -> Tuple[List[List[str]], List[str]]:
    """The pytest paths each pair of worker processes runs: one bench file at a time (a fresh
    process pair per file, so what earlier files left in a process, its heap, torch.compile's
    caches, threads, weighs on neither side), or the whole ``bench/`` in one pair with
    ``--one-process``; and the files only one side has (not run: nothing to compare them with)."""
    if args.one_process:
        return [["bench"]], []
    have = [{p.name for p in (r.path / "bench").glob("test_bench_*.py")} for r in revs]
    both = sorted(have[0] & have[1])
    return [[f"bench/{name}"] for name in both], sorted(have[0] ^ have[1])


def check_imports(w: Worker) -> None:
    h, root = w.hello, str(w.rev.path)
    print(f"[compare] {w.rev.label}: {w.rev.sha[:10]} fastdiff from {h['fastdiff']}, _C from {h['C']}, "
          f"torch {h['torch']} with {h['threads']} threads", flush=True)
    for what in ("fastdiff", "C"):
        if not str(h[what]).startswith(root):
            raise RuntimeError(f"{w.rev.label} imported {what} from {h[what]}, not from its checkout {root}")


def planned_rounds(rounds: int, per_call_s: float, min_time_s: float, most: int) -> int:
    """The rounds a row is timed for: the bench file's ``rounds``, or more, so that each side's
    timed rounds take at least ``min_time_s`` at ``per_call_s`` a call (at most ``most`` times the
    file's rounds).  A few-millisecond row the file times 5 times otherwise rests on 5 calls, and a
    median of 5 on a shared 2-core VM swings by far more than the 10% this tool is for.  The count
    depends on the first block's time only, never on the ratio, so it biases neither side."""
    if min_time_s <= 0 or not per_call_s > 0:
        return rounds
    return max(rounds, min(rounds * most, math.ceil(min_time_s / per_call_s)))


def time_row(sides: List[Worker], events: Dict[Worker, dict], rounds: int, blocks: int,
             min_time_s: float = 0.0, most: int = 20) -> Dict[Worker, str]:
    """The timed rounds of one row on each side in ``sides`` (1 or 2), in alternating blocks
    (more rounds than the bench file's where :func:`planned_rounds` asks, planned after the first
    block); returns the error of a side whose call raised (that side has left the row)."""
    row = events[sides[0]]["row"]
    errors: Dict[Worker, str] = {}
    for w in sides:
        w.samples[row] = []
    schedule = split_blocks(rounds, blocks)
    b = 0
    while b < len(schedule):
        k = schedule[b]
        for w in sides:
            if w in errors:
                continue
            s = w.samples[row]
            rewarm = b > 0 and events[w]["warmup"] > 0 and bool(s) and statistics.median(s) < REWARM_BELOW_S
            w.send(cmd="time", n=k, rewarm=rewarm)
            reply = w.recv()
            s += reply["seconds"]
            if "error" in reply:
                errors[w] = reply["error"]
        if b == 0 and not errors:
            # each side's fastest call of the block: the first rounds of a block can be page-fault
            # spikes many times the typical call (a median of few rounds as well), which would plan too few
            per_call = max(min(w.samples[row]) for w in sides)
            total = planned_rounds(rounds, per_call, min_time_s, most)
            if total > rounds:
                rest = split_blocks(total - schedule[0], max(1, blocks - 1))
                schedule = schedule[:1] + rest
        b += 1
    for w in sides:
        if w not in errors:
            w.send(cmd="finish")
    return errors


def run_pairs(before: Worker, after: Worker, args) -> Dict[str, bool]:
    """Walk both sides' tests in one order (before's, then after's own); returns, per row timed,
    whether it was interleaved with the other side."""
    plan = before.items + [n for n in after.items if n not in set(before.items)]
    seq = {w: [n for n in plan if n in set(w.items)] for w in (before, after)}
    interleaved: Dict[str, bool] = {}
    index = 0
    other_load = OtherLoad()
    for n, node in enumerate(plan):
        here = [w for w in (before, after) if node in seq[w]]
        for w in here:
            i = seq[w].index(node)
            w.send(cmd="run", node=node, next=seq[w][i + 1] if i + 1 < len(seq[w]) else None)
        events = {w: w.recv() for w in here}
        timed = []
        while True:
            ready = [w for w in here if events[w]["event"] == "ready"]
            if not ready:
                break
            if len(ready) == 2 and events[before]["row"] == events[after]["row"]:
                sides = [before, after] if index % 2 == 0 else [after, before]
            else:
                sides = ready[:1]
            requested = min(events[w]["rounds"] for w in sides)
            rounds = quick_rounds(requested) if args.quick else requested
            errors = time_row(sides, events, rounds, args.blocks, args.min_time, args.most_rounds)
            row = events[sides[0]]["row"]
            interleaved[row] = len(sides) == 2 and not errors
            timed.append(row)
            index += 1
            for w in sides:
                events[w] = w.recv()
        for w in here:
            done = events[w]
            w.outcomes[node] = (done["outcome"], done["message"])
            for group, impl, seconds in done["rows"]:
                w.table[(group, impl)] = seconds
        LOADS.append(os.getloadavg()[0])
        others = other_load.sample()
        if others is not None:
            OTHERS.append(others)
        progress(n, len(plan), node, timed, before, after)
    return interleaved


def progress(n: int, total: int, node: str, timed: List[str], before: Worker, after: Worker) -> None:
    parts = [f"{w.rev.label} {w.outcomes[node][0]}" for w in (before, after)
             if node in w.outcomes and w.outcomes[node][0] != "passed"]
    for row in timed:
        b, a = (statistics.median(w.samples[row]) if w.samples.get(row) else None for w in (before, after))
        parts.append(f"{fmt_us(b)} -> {fmt_us(a)} µs" + (f" ({a / b:.3f})" if a and b else ""))
    print(f"[compare] {n + 1}/{total} {node} {'; '.join(parts)}".rstrip(), flush=True)


# --------------------------------------------------------------------------------------- report


def fmt_us(seconds: Optional[float]) -> str:
    if seconds is None or seconds != seconds:
        return "-"
    us = seconds * 1e6
    return f"{us:,.0f}" if us >= 100 else f"{us:.1f}"


def spread(samples: List[float]) -> Optional[float]:
    """Interquartile range over the median, of one side's timed rounds (None under 4 rounds)."""
    if len(samples) < 4:
        return None
    q = statistics.quantiles(samples, n=4)
    return (q[2] - q[0]) / q[1]


def apply_renames(before: Worker, after: Worker, renames: List[Tuple[str, str]],
                  interleaved: Dict[str, bool]) -> Dict[str, bool]:
    """``--rename OLD NEW``: the before side's row names (its table; both sides' timed samples, which
    are filed under the name of the side that started the row) with OLD read as NEW, so a row the
    after revision renamed is matched with its old self."""
    pairs = [(old, new) for old, new in renames]
    if any(not old for old, _ in pairs):
        raise SystemExit("--rename: OLD must not be empty")

    def rn(name: str) -> str:
        for old, new in pairs:
            name = name.replace(old, new)
        return name

    if pairs:
        before.table = {(rn(g), i): v for (g, i), v in before.table.items()}
        for w in (before, after):
            w.samples = {rn(k): v for k, v in w.samples.items()}
    return {rn(k): v for k, v in interleaved.items()}


def report(before: Worker, after: Worker, interleaved: Dict[str, bool], args, meta: dict) -> Tuple[str, int]:
    interleaved = apply_renames(before, after, args.rename, interleaved)
    keys = list(before.table) + [k for k in after.table if k not in before.table]
    matched = [k for k in keys if k in before.table and k in after.table]
    ratios = {k: after.table[k] / before.table[k] for k in matched if before.table[k] > 0}
    slower = [k for k in matched if ratios.get(k, 0) > args.threshold]
    mode = "quick: a quarter of each row's rounds, at least 3" if args.quick else "the bench files' own rounds"
    cores, load0, loads = os.cpu_count() or 1, meta["load0"], LOADS or [meta["load0"]]
    lines = [
        f"# Benchmarks before / after: {before.rev.rev} -> {after.rev.rev}" + (" (a subset)" if args.k else ""),
        "",
        f"Command: `{meta['command']}` ({meta['minutes']:.1f} min, of which {meta['build_s']:.0f} s checkouts "
        f"and builds).",
        f"Load: 1-minute load average {load0:.2f} at the start, {statistics.median(loads):.2f} median and "
        f"{max(loads):.2f} at most during the run, on {cores} cores (this run's own threads count in it: "
        f"{args.threads} while a side is timed, both sides' during warm-ups).",
        *([f"Other processes (CPU time outside this run's process tree, /proc, per test): "
           f"{statistics.median(OTHERS):.2f} cores median, {max(OTHERS):.2f} at most."] if OTHERS else []),
        f"Machine: {platform.processor() or platform.machine()} CPU, torch {before.hello['torch']}, "
        f"Python {before.hello['python']}, {args.threads} thread{'s' * (args.threads != 1)} on both sides (OMP_NUM_THREADS, "
        f"torch.set_num_threads; torch reports {before.hello['threads']} / {after.hello['threads']}).",
        f"Rounds: {mode}"
        + (f", raised where those take under {args.min_time:g} s a side (up to {args.most_rounds}x)"
           if args.min_time > 0 else "")
        + f"; timed in up to {args.blocks} blocks a side, alternating between the two processes, "
        f"after each side's own warm-up rounds (untimed). Times: median microseconds per call.",
    ]
    busy = (statistics.median(OTHERS) >= QUIET_CORES) if OTHERS else \
        (load0 >= cores / 2 or statistics.median(loads) >= cores + args.threads)
    if busy:
        lines.append("**The machine was under load from other processes: these timings swing by far more than "
                     "the 10% the comparison is for, and are no result.** Rerun on a quiet machine.")
    lines.append("Processes: one fresh pair (before, after) per bench file." if not args.one_process else
                 "Processes: one pair for the whole bench/ (--one-process).")
    if meta.get("one_sided"):
        lines.append("Bench files on one side only (not run): " + ", ".join(f"`{f}`" for f in meta["one_sided"]) + ".")
    if args.k:
        lines.append(f"**Subset**: only the tests matching `-k {shlex.quote(args.k)}`, not the whole bench.")
    if args.rename:
        lines.append("Renamed rows, matched with their old names: "
                     + ", ".join(f"`{old}` -> `{new}`" for old, new in args.rename) + ".")
    for w in (before, after):
        r = w.rev
        lines.append(f"- {r.label}: `{r.sha[:10]}` ({r.rev}) {r.subject[:90]}; fastdiff from "
                     f"`{w.hello['fastdiff']}`, `_C`: {r.build}")
    lines += [
        "",
        f"{len(matched)} rows on both sides; {len(slower)} with after/before > {args.threshold:.2f}"
        + (f" (marked **slower**)." if slower else "."),
    ]
    if ratios:
        others = [ratios[k] for k in ratios if k[1] != "fastdiff" and not k[1].startswith("fastdiff ")]
        lines.append(f"Median after/before: {statistics.median(ratios.values()):.3f} over all rows"
                     + (f", {statistics.median(others):.3f} over the non-fastdiff rows (eager, compile: "
                        f"mostly torch's own work, so a gauge of the machine's drift)" if others else "") + ".")
    lines += ["", "| row | impl | rounds | before µs | after µs | after/before | of the minima | spread | |",
              "|---|---|---|---|---|---|---|---|---|"]
    for k in matched:
        name = f"{k[0]} | {k[1]}"
        sb, sa = before.samples.get(name, []), after.samples.get(name, [])
        sp = [x for x in (spread(sb), spread(sa)) if x is not None]
        ratio = ratios.get(k)
        flag = "**slower**" if k in slower else ("" if interleaved.get(name, name not in before.samples) else "not interleaved")
        of_min = f"{min(sa) / min(sb):.3f}" if sa and sb and min(sb) > 0 else "-"
        lines.append(f"| {k[0]} | {k[1]} | {len(sb) or 1}/{len(sa) or 1} | {fmt_us(before.table[k])} | "
                     f"{fmt_us(after.table[k])} | {f'{ratio:.3f}' if ratio else '-'} | {of_min} | "
                     f"{f'{100 * max(sp):.0f}%' if sp else '-'} | {flag} |")
    lines += ["", "after/before is of the medians (the flag's basis); \"of the minima\" is the ratio of each side's "
              "fastest round, which load from other processes disturbs less. Spread: the larger of the two sides' "
              "interquartile range over median (rows of 4 rounds or more). Rows without rounds of their own "
              "(derived in the bench file from another row's run) show 1 round."]
    only = [f"- {w.rev.label} only: {k[0]} | {k[1]} ({fmt_us(v)} µs)" for w in (before, after)
            for k, v in w.table.items() if k not in before.table or k not in after.table]
    if only:
        lines += ["", "Rows on one side only:"] + only
    bad = [(w.rev.label, node, o, m) for w in (before, after) for node, (o, m) in w.outcomes.items() if o != "passed"]
    if bad:
        lines += ["", "Tests that did not pass:"] + [f"- {label}: `{node}` {o}: {m[:200]}" for label, node, o, m in bad]
    failed = sum(o == "failed" for _, _, o, _ in bad)
    return "\n".join(lines) + "\n", (1 if slower or failed else 0)


# --------------------------------------------------------------------------------------- main


def parse(argv: List[str]):
    p = argparse.ArgumentParser(prog="python bench/compare.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the 'before' revision (e.g. 237765d)")
    p.add_argument("--head", default="HEAD", help="the 'after' revision (default HEAD: committed work only)")
    p.add_argument("-k", help="pytest -k expression selecting benchmark tests, on both sides")
    p.add_argument("--quick", action="store_true", help="a quarter of each row's rounds (at least 3)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "before-after.md",
                   help="the markdown table (default bench/results/before-after.md)")
    p.add_argument("--json", type=Path, help="also write every side's timed rounds here")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads on both sides (default: all cores)")
    p.add_argument("--blocks", type=int, default=4, help="alternating blocks per row and side (default 4)")
    p.add_argument("--min-time", type=float, default=1.0,
                   help="time each row for at least this many seconds a side, in more rounds than the bench "
                        "file's where those take less (default 1.0; 0: the file's rounds only)")
    p.add_argument("--most-rounds", type=int, default=20,
                   help="--min-time adds at most this many times a row's own rounds (default 20)")
    p.add_argument("--one-process", action="store_true",
                   help="run the whole bench/ in one process per side (default: a fresh pair per bench file)")
    p.add_argument("--threshold", type=float, default=1.10, help="flag rows with after/before above this")
    p.add_argument("--rename", action="append", default=[], nargs=2, metavar=("OLD", "NEW"),
                   help="a row the after side renamed: OLD in a before row's name reads as NEW (repeatable)")
    p.add_argument("--reuse-build", action="store_true",
                   help="take this checkout's fastdiff/_C*.so for a revision whose csrc/ and setup.py it has unchanged")
    p.add_argument("--rebuild", action="store_true", help="build both revisions, ignoring the build cache")
    p.add_argument("--keep", action="store_true", help="keep the temporary worktrees and logs (for debugging)")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.quick:
        args.min_time = 0.0   # --quick is for a first look: the bench files' rounds, cut
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    root = Path(tempfile.mkdtemp(prefix="fastdiff-compare-"))
    (root / "plugin").mkdir()
    shutil.copy2(PLUGIN, root / "plugin" / PLUGIN.name)  # only the plugin joins each side's PYTHONPATH
    revs: List[Revision] = []
    workers: List[Worker] = []
    try:
        revs = [add_worktree("before", args.base, root), add_worktree("after", args.head, root)]
        provide_builds(revs, args)
        build_s = time.perf_counter() - t0
        files, one_sided = bench_files(revs, args)
        if not files:
            raise SystemExit("[compare] the two revisions have no bench file in common")
        interleaved: Dict[str, bool] = {}
        carry: List[Optional[Worker]] = [None, None]
        for paths in files:
            workers = [Worker(r, args, paths, c) for r, c in zip(revs, carry)]
            for w in workers:
                check_imports(w)
            interleaved.update(run_pairs(*workers, args))
            for w in workers:
                w.close()
            carry = workers
        before, after = workers
        meta = dict(command="python bench/compare.py " + shlex.join(argv), build_s=build_s,
                    minutes=(time.perf_counter() - t0) / 60, load0=load0, one_sided=one_sided)
        text, rc = report(before, after, interleaved, args, meta)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        if args.json:
            args.json.write_text(json.dumps({w.rev.label: {"sha": w.rev.sha, "samples": w.samples,
                                                           "table": [[*k, v] for k, v in w.table.items()]}
                                             for w in workers}, indent=1))
        print(text + f"\n(written to {args.out})")
        return rc
    finally:
        for w in workers:
            w.close()
        if args.keep:
            print(f"[compare] kept {root} (remove with: git worktree remove --force <dir>; git worktree prune)")
        else:
            remove_worktrees(revs, root)


if __name__ == "__main__":
    sys.exit(main())
