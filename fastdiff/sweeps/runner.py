"""Experiments, grids, batching plans and executors: how a sweep runs.

A sweep is an experiment evaluated on every cell of a grid (the cartesian product of its
parameters' value lists), ``trials`` random instances per cell.  Cells whose ``batch_key`` agree
(every parameter that fixes tensor shapes or algorithm, typically all but the sample size) are run
together as one batched computation, at most ``max_instances`` instances per batch.  The plan is
a pure function of the grid, so a re-run after an interruption recomputes exactly the batches
that had not been committed, with exactly the same inputs.

Randomness: each cell draws from the counter-based Philox stream (SPEC 0) keyed by
``cell_seed(experiment, seed, params)``; trial ``t`` uses a fixed window of that stream, so its
numbers do not depend on which other cells share its batch, on the executor, or on ``trials``.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import itertools
import math
import os
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from tqdm import tqdm

from fastdiff.sweeps.store import SQL_TYPES, Store, cell_key

__all__ = ["Param", "Experiment", "EXPERIMENTS", "register", "parse_values", "build_grid", "plan", "run_sweep",
           "cell_seed", "versions"]


@dataclass(frozen=True)
class Param:
    """One parameter of an experiment: a sweep takes a list of values for it (the default if absent)."""

    name: str
    type: type
    default: Tuple
    help: str = ""
    choices: Optional[Tuple] = None


@dataclass(frozen=True)
class Experiment:
    """An experiment of the phase-diagram sweeps.

    ``run_batch(cells, seeds, trials, device)`` evaluates a list of cells sharing one ``batch_key``
    as one batched computation on ``device`` (a ``torch.device``; the data are drawn on the CPU and
    moved, so a table does not depend on the device beyond rounding) and returns ``(rows, backend)``:
    rows are dicts with ``cell_index``, ``trial`` and every metric.  ``check(cell)`` raises
    ``ValueError`` for an invalid cell;
    ``applicable(cell)`` returns ``None`` or the reason a cell of the product is skipped (e.g. a
    learner that does not apply to K).  ``instance_cost(cell)`` is the batching weight.
    """

    name: str
    params: Tuple[Param, ...]
    metrics: Tuple[Tuple[str, type], ...]
    run_batch: Callable
    check: Callable[[Dict], None]
    batch_key: Callable[[Dict], Tuple]
    applicable: Callable[[Dict], Optional[str]] = lambda cell: None
    instance_cost: Callable[[Dict], float] = lambda cell: 1.0
    max_cost: float = 4096.0
    description: str = ""
    seed_params: Callable[[Dict], Dict] = lambda cell: cell  # the parameters a cell's stream is keyed by
    instance_bytes: Callable[[Dict], float] = lambda cell: 0.0  # estimated peak memory of one instance
    version: int = 1  # bump when a change of the code changes the rows: a store of another version is refused

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise ValueError(f"{name}: not a parameter of {self.name!r} (expected one of {[p.name for p in self.params]})")


# The experiment registry (SPEC 4): subspace-recovery, linear-diffusion, memorization and
# jacobian-rank register themselves from their modules (fastdiff/sweeps/__init__.py imports them).
EXPERIMENTS: Dict[str, Experiment] = {}


def register(exp: Experiment) -> Experiment:
    if exp.name in EXPERIMENTS:
        raise ValueError(f"experiment {exp.name!r} is already registered")
    EXPERIMENTS[exp.name] = exp
    return exp


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise ValueError(f"experiment: expected one of {sorted(EXPERIMENTS)}, got {name!r}")
    return EXPERIMENTS[name]


# --------------------------------------------------------------------------- grids
MAX_CELLS = 10 ** 6          # cells of one grid (and values of one parameter): beyond, a typo, not a sweep
MAX_CELL_BYTES = 16 * 2 ** 30  # estimated peak memory of one cell's trials (they run as one batch)


def _flag(name: str) -> str:
    """A parameter's command-line spelling, for messages: ``max_iter`` -> ``--max-iter``."""
    return "--" + name.replace("_", "-")


def parse_values(name: str, text, typ: type) -> List:
    """Values of one parameter from text: ``"5"``, ``"1,2,4"``, ``"1:12"`` (inclusive), ``"2:48:2"``
    (start:stop:step, inclusive), or a mix ``"1:4,8"``; a list or scalar is taken as given."""
    if not isinstance(text, str):
        if isinstance(text, (list, tuple, range)) and len(text) > MAX_CELLS:
            raise ValueError(f"{_flag(name)}: {len(text)} values, more than a sweep's cap of {MAX_CELLS} cells")
        vals = list(text) if isinstance(text, (list, tuple, range)) else [text]
    else:
        vals, total = [], 0
        for part in text.split(","):
            part = part.strip()
            if not part:
                raise ValueError(f"{_flag(name)}: empty value in {text!r}")
            if ":" in part:
                if typ not in (int, float):
                    raise ValueError(f"{_flag(name)}: ranges need a numeric parameter, got {part!r}")
                bits = part.split(":")
                if len(bits) not in (2, 3) or not all(b.strip() for b in bits):
                    raise ValueError(f"{_flag(name)}: expected start:stop or start:stop:step, got {part!r}")
                start, stop = _convert(name, bits[0], typ), _convert(name, bits[1], typ)
                step = _convert(name, bits[2], typ) if len(bits) == 3 else typ(1)
                if step <= 0:
                    raise ValueError(f"{_flag(name)}: step must be positive, got {part!r}")
                if stop < start:
                    raise ValueError(f"{_flag(name)}: inverted range {part!r} (stop {stop} < start {start})")
                count = int(math.floor((stop - start) / step + 1e-9)) + 1
                total += count
                if total > MAX_CELLS:   # counted before anything is built: 1:2000000000 is refused, not allocated
                    raise ValueError(f"{_flag(name)}: {text!r} has {total} values, more than a sweep's cap of "
                                     f"{MAX_CELLS} cells")
                vals.append((start, step, count))
            else:
                total += 1
                vals.append(_convert(name, part, typ))
        vals = [v for part in vals for v in (_expand(part, typ) if isinstance(part, tuple) else (part,))]
    if len(vals) > MAX_CELLS:
        raise ValueError(f"{_flag(name)}: {len(vals)} values, more than a sweep's cap of {MAX_CELLS} cells")
    out, seen = [], set()
    for v in vals:   # first occurrence kept, in order; a set makes it O(n)
        v = _convert(name, v, typ)
        if v not in seen:
            seen.add(v)
            out.append(v)
    if not out:
        raise ValueError(f"{_flag(name)}: empty list of values")
    return out


def _expand(part, typ):
    start, step, count = part
    return [typ(start + i * step) if typ is int else round(start + i * step, 12) for i in range(count)]


def _float_integer(v: str) -> bool:
    if v.strip().lstrip("+-").isdigit():
        return False
    try:
        f = float(v)
    except ValueError:
        return False
    return math.isfinite(f) and f.is_integer()


def _convert(name, v, typ):
    if typ is bool:
        if isinstance(v, str):
            if v.lower() in ("1", "true", "yes"):
                return True
            if v.lower() in ("0", "false", "no"):
                return False
            raise ValueError(f"{_flag(name)}: expected true/false, got {v!r}")
        return bool(v)
    if typ is int and isinstance(v, str) and _float_integer(v):
        # 1e8 is refused rather than read as 100000000: an integer parameter is written as one
        raise ValueError(f"{_flag(name)}: expected int values written as integers (e.g. {int(float(v))}), got {v!r}")
    try:
        if typ is int:
            if isinstance(v, float) and not v.is_integer():
                raise ValueError
            if isinstance(v, str) and not v.strip().lstrip("+-").isdigit():
                raise ValueError
            return int(v)
        if typ is float:
            f = float(v)
            if not math.isfinite(f):
                raise ValueError
            return f
        return typ(v).strip() if typ is str else typ(v)
    except (TypeError, ValueError):
        raise ValueError(f"{_flag(name)}: expected {typ.__name__} values, got {v!r}") from None


def build_grid(exp: Experiment, values: Dict[str, object]) -> Tuple[List[Dict], List[str]]:
    """``(cells, skipped_reasons)``: the product of the parameter lists (defaults where absent),
    every cell checked; cells that do not apply are dropped (their reasons returned)."""
    for k in values:
        exp.param(k)  # unknown name -> ValueError
    lists = []
    for p in exp.params:
        vals = parse_values(p.name, values[p.name], p.type) if p.name in values and values[p.name] is not None \
            else list(p.default)
        if p.choices is not None:
            bad = [v for v in vals if v not in p.choices]
            if bad:
                raise ValueError(f"{_flag(p.name)}: expected values in {list(p.choices)}, got {bad[0]!r}")
        lists.append(vals)
    size = math.prod(len(v) for v in lists)
    if size > MAX_CELLS:
        raise ValueError(f"{exp.name}: the grid has {size} cells ({' x '.join(str(len(v)) for v in lists)}), more "
                         f"than the cap of {MAX_CELLS}")
    cells, skipped = [], []
    for combo in itertools.product(*lists):
        cell = dict(zip([p.name for p in exp.params], combo))
        reason = exp.applicable(cell)
        if reason:
            skipped.append(reason)
            continue
        exp.check(cell)
        cells.append(cell)
    if not cells:
        raise ValueError(f"{exp.name}: no cell of the grid applies: {skipped[0] if skipped else 'empty grid'}")
    return cells, skipped


def cell_seed(experiment: str, seed: int, cell: Dict) -> int:
    """A 63-bit seed for one cell: a hash of (experiment, sweep seed, parameters)."""
    h = hashlib.blake2b(f"{experiment}|{seed}|{cell_key(cell)}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def plan(exp: Experiment, cells: Sequence[Dict], trials: int, max_cost: Optional[float] = None) -> List[List[int]]:
    """Batches of cell indices: cells grouped by ``batch_key`` (in grid order), each group cut into
    runs of total cost ``trials * instance_cost <= max_cost`` (at least one cell per batch;
    ``max_cost`` defaults to the experiment's)."""
    max_cost = exp.max_cost if max_cost is None else max_cost
    groups: Dict[Tuple, List[int]] = {}
    for i, c in enumerate(cells):
        groups.setdefault(exp.batch_key(c), []).append(i)
    batches = []
    for idx in groups.values():
        cur, cost = [], 0.0
        for i in idx:
            w = trials * exp.instance_cost(cells[i])
            if cur and cost + w > max_cost:
                batches.append(cur)
                cur, cost = [], 0.0
            cur.append(i)
            cost += w
        if cur:
            batches.append(cur)
    return batches


def versions() -> str:
    import numpy
    import torch

    import fastdiff

    return f"fastdiff {fastdiff.__version__}; torch {torch.__version__}; numpy {numpy.__version__}; python {platform.python_version()}"


# --------------------------------------------------------------------------- executors
def execute_batch(name: str, cells: List[Dict], seeds: List[int], trials: int, threads: int = 1,
                  device: str = "cpu"):
    """Run one batch (in this process or a Ray worker) on ``threads`` threads and ``device``:
    ``(rows, backend, seconds)``."""
    import torch

    import fastdiff.sweeps  # noqa: F401  (a fresh Ray worker registers the experiments here)

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _timed_batch(get_experiment(name), cells, seeds, trials, device)
    finally:
        torch.set_num_threads(before)


def _timed_batch(exp, cells, seeds, trials, device):
    import torch

    dev = torch.device(device)
    t0 = time.perf_counter()
    rows, backend = exp.run_batch(cells, seeds, trials, dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)   # the rows are host values already; this only closes the timing
    return rows, backend if dev.type == "cpu" else f"{backend} on {dev}", time.perf_counter() - t0


def _store_rows(exp, cells, seeds, batch, rows, backend, seconds, vers):
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    share = seconds / max(len(rows), 1)  # the batch's wall time, shared over its instances
    base = [{"cell": cell_key(cells[i]), **cells[i], "seed": seeds[i], "backend": backend, "versions": vers,
             "seconds": share, "finished_at": now} for i in batch]
    return [{**base[r["cell_index"]], **r} for r in rows]


_GC_FROZEN = False


@contextlib.contextmanager
def gc_frozen():
    """Move the objects alive on entry (torch's and the user's, ~350k after ``import torch``) out of the
    garbage collector's view until exit (``gc.freeze`` / ``gc.unfreeze``): a sweep allocates enough
    rows and tensors to trigger full collections, and each traversed them all (a sizeable share of
    the default sweep, bench/test_bench_sweeps.py).  Objects made inside are collected as usual.  Reentrant."""
    global _GC_FROZEN
    if _GC_FROZEN or not gc.isenabled():
        yield
        return
    _GC_FROZEN = True
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        _GC_FROZEN = False


def run_sweep(experiment: str, grid: Optional[Dict[str, object]] = None, *, trials: int = 20, seed: int = 0,
              store: str = "results/sweep.sqlite", executor: str = "local", address: Optional[str] = None,
              progress: bool = True, threads: int = 1, max_retries: int = 3, workers: Optional[int] = None,
              device: str = "cpu") -> Store:
    """Run (or resume) a sweep and return its open :class:`Store`.

    ``grid``: ``{param: values}`` (lists, scalars or range text like ``"2:48:2"``; defaults for absent
    parameters).  Cells already in the store are skipped.  ``executor``: ``"local"`` (this process)
    or ``"ray"`` (each batch a Ray task with a CPU hint, retried up to ``max_retries`` times;
    ``address`` of a running cluster, or a local instance).  ``threads``: torch/OpenMP threads per
    batch (1 by default: a batch is many small batched ops, too small to amortise an OpenMP barrier, and
    threads that share cores with other batches wait for each other at every one; scale out with
    more batches in parallel instead).  ``workers``: batches run side by side in this process (local
    executor; default: one per core with ``threads = 1``): torch releases the GIL inside its kernels,
    so two single-threaded batches use two cores; the store is written from this thread only, each
    batch in one transaction as it finishes (their order does not change any row).
    ``device``: where the batches compute (``"cpu"``, ``"cuda"``, ``"cuda:1"``; with Ray each task
    asks for one GPU).  The instances are drawn on the CPU from the same Philox windows and moved,
    so a table does not depend on the device beyond float rounding; on a GPU the batches are
    ``GPU_BATCH_SCALE`` times larger and run one at a time (``workers = 1``).
    """
    with gc_frozen():
        return _run_sweep(experiment, grid, trials, seed, store, executor, address, progress, threads, max_retries,
                          workers, device)


def _check_memory(exp, cells, trials):
    """Refuse a cell whose ``trials`` instances (one batch) would need more than ``MAX_CELL_BYTES``."""
    worst = max(cells, key=exp.instance_bytes)
    need = trials * exp.instance_bytes(worst)
    if need > MAX_CELL_BYTES:
        raise ValueError(f"{exp.name}: cell {worst} needs about {need / 2 ** 30:.1f} GiB for its {trials} trials "
                         f"({exp.instance_bytes(worst) / 2 ** 20:.0f} MiB each), more than the cap of "
                         f"{MAX_CELL_BYTES / 2 ** 30:.0f} GiB; use smaller sizes or fewer --trials")


GPU_BATCH_SCALE = 16  # batch cost budget on a GPU relative to the experiment's (CPU-tuned) max_cost


def _check_device(device) -> str:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu' or a CUDA device, got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={device!r}: CUDA is not available here (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device: {device!r} is out of range ({torch.cuda.device_count()} CUDA devices)")
    return str(dev)


def _run_sweep(experiment, grid, trials, seed, store, executor, address, progress, threads, max_retries, workers,
               device):
    exp = get_experiment(experiment)
    device = _check_device(device)
    on_gpu = device != "cpu"
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials: expected an int >= 1, got {trials!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads: expected an int >= 1, got {threads!r}")
    if executor not in ("local", "ray"):
        raise ValueError(f"executor: expected 'local' or 'ray', got {executor!r}")
    if workers is None:
        workers = 1 if on_gpu else max(1, (os.cpu_count() or 1) // threads)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: expected an int >= 1, got {workers!r}")
    cells, _ = build_grid(exp, grid or {})         # every input error is raised before the store is touched
    _check_memory(exp, cells, trials)
    seeds = [cell_seed(exp.name, seed, exp.seed_params(c)) for c in cells]
    st = Store(store, exp.name, [(p.name, SQL_TYPES[p.type]) for p in exp.params],
               [(m, SQL_TYPES[t]) for m, t in exp.metrics])
    try:   # the resume key is (cell, trial): whatever else changes a row must match the store's
        st.check_settings({"seed": seed, "device": device.split(":")[0], "experiment_version": exp.version},
                          {cell_key(c): s for c, s in zip(cells, seeds)})
    except BaseException:
        st.close()
        raise
    done = st.finished(cell_key(c) for c in cells)
    batches = [b for b in plan(exp, cells, trials, exp.max_cost * (GPU_BATCH_SCALE if on_gpu else 1))
               if any((cell_key(cells[i]), t) not in done for i in b for t in range(trials))]
    total = sum(len(b) for b in batches) * trials
    # what a resumed run did, for the caller to say (cells of partly stored batches are recomputed)
    st.cells_total = len(cells)
    st.cells_computed = sum(len(b) for b in batches)
    st.cells_in_store = sum(all((cell_key(c), t) in done for t in range(trials)) for c in cells)
    vers = versions()
    bar = tqdm(total=total, desc=f"{exp.name} ({executor}, {device})", unit="inst", disable=not progress,
               smoothing=0.05)
    try:
        if executor == "local" and workers == 1:
            for b in batches:
                rows, backend, secs = execute_batch(exp.name, [cells[i] for i in b], [seeds[i] for i in b], trials,
                                                    threads, device)
                st.write(_store_rows(exp, cells, seeds, b, rows, backend, secs, vers))
                bar.update(len(b) * trials)
        elif executor == "local":
            _run_threads(exp, cells, seeds, batches, trials, st, bar, vers, workers, device)
        else:
            _run_ray(exp, cells, seeds, batches, trials, st, bar, vers, address, threads, max_retries, device)
    finally:
        bar.close()
    return st


def _run_threads(exp, cells, seeds, batches, trials, st, bar, vers, workers, device):
    """Local batches on ``workers`` Python threads, torch at one intra-op thread for the duration."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending = {pool.submit(_timed_batch, exp, [cells[i] for i in b], [seeds[i] for i in b], trials, device): b
                       for b in batches}
            try:
                while pending:
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for f in finished:
                        b = pending.pop(f)
                        rows, backend, secs = f.result()
                        st.write(_store_rows(exp, cells, seeds, b, rows, backend, secs, vers))
                        bar.update(len(b) * trials)
            finally:
                for f in pending:
                    f.cancel()
    finally:
        torch.set_num_threads(before)


_RAY_HOOKED = False


def _shut_ray_down_on_exit(ray) -> None:
    """``ray.shutdown()`` when this process ends, also by SIGTERM or SIGINT: a local Ray instance this
    driver started (its GCS, raylet and workers) otherwise outlives a killed driver.  The signal
    handlers (main thread only) shut Ray down, then do what the previous handler would have done."""
    import atexit
    import signal
    import threading

    global _RAY_HOOKED
    if _RAY_HOOKED:
        return
    _RAY_HOOKED = True
    atexit.register(_quiet_shutdown, ray)
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)

        def handler(signum, frame, previous=previous):
            _quiet_shutdown(ray)
            signal.signal(signum, previous)
            if callable(previous):
                return previous(signum, frame)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)

        signal.signal(sig, handler)


def _quiet_shutdown(ray) -> None:
    with contextlib.suppress(Exception):
        if ray.is_initialized():
            ray.shutdown()


def _run_ray(exp, cells, seeds, batches, trials, st, bar, vers, address, threads, max_retries, device):
    try:
        import ray
    except ImportError:
        raise RuntimeError("executor='ray' needs ray (pip install 'fastdiff[ray]' or pip install ray)") from None
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        _shut_ray_down_on_exit(ray)
    task = ray.remote(execute_batch).options(num_cpus=threads, num_gpus=0 if device == "cpu" else 1,
                                             max_retries=max_retries, retry_exceptions=True)
    pending = {task.remote(exp.name, [cells[i] for i in b], [seeds[i] for i in b], trials, threads, device): b
               for b in batches}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            b = pending.pop(ref)
            rows, backend, secs = ray.get(ref)
            st.write(_store_rows(exp, cells, seeds, b, rows, backend, secs, vers))
            bar.update(len(b) * trials)
