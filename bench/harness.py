"""Shared benchmark harness: timing, the machine's measured ceiling, and the results table.

Timing follows the device tool's METHOD: warm up (compilation, first-touch page faults), then
the median of many runs; CUDA work is timed with events.  The ceiling is measured in the same
run: a large tensor copy (bytes read + bytes written over time).  Each kernel row reports its
time, the ratio of the torch eager reference's time to it (and of torch.compile's), and the
achieved bandwidth counting the fewest bytes the op must move (each input read once, the output
written once) as a fraction of the copy ceiling.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch


def gpu_bench_mode(smoke_var: str) -> bool:
    """A GPU benchmark module's gate, called at its import: skip the module without CUDA unless the
    environment sets ``smoke_var=1`` with ``TRITON_INTERPRET=1`` (tiny sizes under the interpreter,
    to check on a CPU that the file runs).  Returns whether this is the smoke mode."""
    import pytest

    smoke = os.environ.get(smoke_var) == "1"
    if smoke and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("smoke mode needs TRITON_INTERPRET=1", allow_module_level=True)
    if not smoke and not torch.cuda.is_available():
        pytest.skip(f"GPU benchmark (set {smoke_var}=1 TRITON_INTERPRET=1 for a CPU smoke run)",
                    allow_module_level=True)
    return smoke


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str, *, warmup: int = 3, reps: int = 25) -> List[float]:
    """Seconds per call, ``reps`` samples (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    if device.startswith("cuda"):
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
    else:
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return out


_CEILING: Dict[tuple, float] = {}


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Measured copy bandwidth in bytes/s (read + write) for a copy moving ``nbytes`` in all
    (``nbytes / 2`` read, ``nbytes / 2`` written), median of 15, cached per (device, size).

    A kernel row is compared with a copy that moves the same bytes: both then see the same cache
    behaviour (a 48 MiB step is partly resident in a 32 MiB L3 or a 50 MiB GPU L2).  The 1 GiB
    default is the DRAM figure, reported beside the table."""
    key = (device, nbytes)
    if key not in _CEILING:
        src = torch.randn(nbytes // 8, device=device)
        dst = torch.empty_like(src)
        med = statistics.median(time_fn(lambda: dst.copy_(src), device, warmup=3, reps=15))
        _CEILING[key] = nbytes / med
        del src, dst
    return _CEILING[key]


def matmul_rate(device: str, size: int = 2048) -> float:
    """Measured float32 matmul rate in FLOP/s, cached per device: the faster of torch's BLAS
    (MKL / cuBLAS) and :func:`fastdiff.backends.mm` (oneDNN on x86 CPUs), so that no op can
    beat its ceiling by picking the better library."""
    from fastdiff.backends import mm

    key = (device, "matmul")
    if key not in _CEILING:
        a = torch.randn(size, size, device=device)
        b = torch.randn(size, size, device=device)
        med = min(statistics.median(time_fn(f, device, warmup=2, reps=10)) for f in (lambda: a @ b, lambda: mm(a, b)))
        _CEILING[key] = 2 * size**3 / med
    return _CEILING[key]


@dataclass
class Row:
    group: str          # the op and size, e.g. "ddpm_step n=2^22 float32"
    impl: str           # "fastdiff", "eager", "compile", ...
    seconds: float      # median
    bytes_moved: int = 0
    flops: int = 0


PEERS = ("cupy", "keops")  # peer libraries that rows may be measured against


@dataclass
class Table:
    rows: List[Row] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)

    def markdown(self, device: str, command: str) -> str:
        dram = copy_bandwidth(device)
        groups: Dict[str, Dict[str, Row]] = {}
        for r in self.rows:
            groups.setdefault(r.group, {})[r.impl] = r
        impls = [i for i in ("fastdiff", "fastdiff out=", "eager", "compile", *PEERS) if any(i in g for g in groups.values())]
        head = ["op"] + [f"{i} ms" for i in impls] + ["eager/fastdiff", "compile/fastdiff", "peer/fastdiff", "fastdiff rate", "ceiling", "% of ceiling"]
        lines = [
            f"Device: {describe(device)}; DRAM copy {dram / 1e9:.1f} GB/s (1 GiB, read+write), float32 matmul "
            f"{matmul_rate(device) / 1e9:.0f} GFLOP/s (2048^3, the faster of torch.mm and fastdiff.backends.mm), both measured in this run.",
            f"Command: `{command}`",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        for name, g in groups.items():
            fd = g.get("fastdiff out=") or g.get("fastdiff")
            cells = [name] + [f"{g[i].seconds * 1e3:.3f}" if i in g else "-" for i in impls]
            cells.append(f"{g['eager'].seconds / fd.seconds:.2f}x" if "eager" in g and fd else "-")
            cells.append(f"{g['compile'].seconds / fd.seconds:.2f}x" if "compile" in g and fd else "-")
            peer = next((g[p] for p in PEERS if p in g), None)   # the peer library the issue names
            cells.append(f"{peer.seconds / fd.seconds:.2f}x ({peer.impl})" if peer and fd else "-")
            if fd and fd.flops:  # compute-bound op: GFLOP/s against the matmul rate
                rate, ceiling = fd.flops / fd.seconds, matmul_rate(device)
                cells += [f"{rate / 1e9:.1f} GFLOP/s", f"{ceiling / 1e9:.0f} GFLOP/s matmul", f"{100 * rate / ceiling:.0f}%"]
            elif fd and fd.bytes_moved:  # memory-bound op: GB/s against a copy of the same bytes
                rate, ceiling = fd.bytes_moved / fd.seconds, copy_bandwidth(device, fd.bytes_moved)
                cells += [f"{rate / 1e9:.1f} GB/s", f"{ceiling / 1e9:.1f} GB/s copy", f"{100 * rate / ceiling:.0f}%"]
            else:
                cells += ["-", "-", "-"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("Ratios use the in-place (`out=`) fastdiff time where measured; both are listed. GB/s counts each "
                     "input read once and the output written once, against a copy moving the same bytes; GFLOP/s counts "
                     "the op's multiply-adds (2 per), against the measured matmul rate.")
        return "\n".join(lines)


def describe(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads, {os.cpu_count()} cores (torch {torch.__version__})"


TABLE = Table()


# --------------------------------------------------------------------------- the stand-alone scripts
def print_row(row: Dict[str, object]) -> None:
    """One measured row as ``key=value`` pairs (floats to 4 significant digits), flushed as it comes."""
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)


def write_rows(path: str, rows: List[Dict[str, object]]) -> None:
    """The rows of a stand-alone bench script (bench/alg1_*.py) as a CSV with the first row's columns."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

