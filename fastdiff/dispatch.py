"""The one dispatch table: which backend runs each op, and the only place ``backend="auto"`` is decided.

Per op, :data:`OPS` (the rows ``fastdiff/ops/<op>.py`` declare) lists its implementations in ``auto``'s preference order per device type, each
with the devices it runs on, the dtypes it takes, how to tell it exists in this build (a
``fastdiff._C`` symbol, a ``fastdiff.kernels.<module>``) and its size limits (``fits(**sizes) ->
(ok, why)`` and a human-readable ``limit``).  :func:`choose` reads it; ``fastdiff info`` prints it
(:func:`matrix`); the tests parametrize from it (``tests/conftest.py: backend_devices``).

Sizes (keyword arguments of :func:`choose`; a size not given is taken to fit):
``molrg``: ``n`` (dimension), ``D`` (sum d_k), ``K`` (components), ``grad`` (a backward follows);
``svd``: ``m``, ``n``; ``trajectory``: ``n``, ``D``, ``K``; ``empirical``: ``kc`` (candidates a query).
"""
from __future__ import annotations

import functools
import os
from typing import Dict, Optional, Tuple

import torch

from fastdiff.backends import KERNEL_DTYPES, _probe, _works, available, has_kernel
from fastdiff.ops import discrete_langevin, empirical, fused_step, ksubspaces, molrg, svd, trajectory
from fastdiff.ops.table import Impl, Op

__all__ = ["Impl", "Op", "OPS", "COLUMNS", "check_backend", "choose", "exists", "cell", "rows", "matrix", "info"]

COLUMNS = ("triton", "cuda", "cpp", "torch")

# the one table: every op's row, declared next to its contract in fastdiff/ops/<op>.py
OPS: Dict[str, Op] = {row.name: row for row in (
    fused_step.ROW, molrg.ROW, svd.ROW, trajectory.ROW, ksubspaces.ROW, discrete_langevin.ROW, empirical.ROW)}


# --------------------------------------------------------------------------- the decision
def _impl(op: Op, backend: str) -> Optional[Impl]:
    for impl in op.impls:
        if impl.backend == backend:
            return impl
    return None


def _exists(impl: Impl) -> bool:
    """Runs here and has the op in this build (an older build may lack a symbol or a module)."""
    if impl.backend == "torch":
        return True
    if impl.cpp_symbol is not None or impl.triton_module is not None:
        return has_kernel(impl.backend, impl.cpp_symbol or "", impl.triton_module or "")
    return _works(impl.backend)


def exists(op: str, backend: str) -> bool:
    """Whether ``op`` has a ``backend`` implementation that runs here in this build."""
    impl = _impl(OPS[op], backend)
    return impl is not None and _exists(impl)


def _runs_on(impl: Impl, device: torch.device, forced: bool) -> bool:
    if device.type in impl.devices:
        return True
    return (forced and impl.backend == "triton" and device.type == "cpu"
            and os.environ.get("TRITON_INTERPRET") == "1")


def _refuse(op: Op, backend: str, device, dtype, kind: str, reason: str) -> Tuple[type, str]:
    """(exception type, message) for a forced backend that cannot run (``reason``: what ``fits`` said)."""
    if kind == "fits":
        return ValueError, reason
    if op.name == "ksubspaces":  # one message for every refusal (tests/test_sweeps_learners.py matches it)
        return RuntimeError, (f"backend={backend!r}: needs float32 CPU data and fastdiff._C.ksubspaces, got {dtype} "
                              f"on {device} ({_probe(backend)[1]})")
    if kind == "unavailable":
        return RuntimeError, f"backend={backend!r} is not available here: {_probe(backend)[1]}"
    if kind == "dtype":
        return TypeError, f"backend={backend!r} takes float32, float16 or bfloat16 tensors, got {dtype}"
    if kind == "device":
        if backend == "triton":
            return ValueError, ("backend='triton' runs on CUDA tensors (CPU only under TRITON_INTERPRET=1), "
                                f"got {device}")
        where = "CPU" if backend == "cpp" else "CUDA"
        return ValueError, f"backend={backend!r} runs on {where} tensors, got tensors on {device}"
    return RuntimeError, f"backend={backend!r} has no {op.what} kernel in this build"  # "kernel"


def check_backend(op: str, backend) -> Op:
    """``op``'s table; a ValueError if ``backend`` is not a name it takes (callers with nothing to
    compute, e.g. empty tensors, still check the name)."""
    table = OPS[op]
    if not isinstance(backend, str) or backend not in table.names:
        raise ValueError(f"backend: expected one of {table.names}, got {backend!r}")
    return table


# choose()'s answers for calls without sizes, keyed by (op, backend name, torch.device, dtype): every
# step call asks, and the answer is pure (the probes are cached for the process).  A forced "triton"
# is not kept: whether it runs on CPU tensors reads TRITON_INTERPRET at each call.  Errors are not kept.
_CHOSEN: Dict[tuple, str] = {}


def choose(op: str, backend: str, device, dtype: torch.dtype, *, explain: bool = False, **sizes):
    """The backend that runs ``op`` for tensors on ``device`` of ``dtype`` at these ``sizes``.

    ``"auto"``: the first of the op's preferred backends for this device type that runs here, exists
    in this build, takes the dtype and fits (``fits`` and ``prefer``); else the op's fallback
    ("torch"; "loop" for the trajectory).  A forced backend: itself, or a clear error naming it
    (unknown name, not available here, wrong dtype or device, no kernel in this build, too large),
    except the op's ``soft`` refusals, which fall back.  ``explain=True``: (choice, why) instead,
    why saying what was refused ("" when a kernel runs)."""
    if explain or sizes or backend == "triton" or not isinstance(backend, str) or not isinstance(device, torch.device):
        return _decide(op, backend, device, dtype, explain, sizes)
    key = (op, backend, device, dtype)
    choice = _CHOSEN.get(key)
    if choice is None:
        choice = _CHOSEN[key] = _decide(op, backend, device, dtype, False, sizes)
    return choice


def _decide(op: str, backend: str, device, dtype: torch.dtype, explain: bool, sizes: dict):
    table = check_backend(op, backend)
    device = torch.device(device)
    if backend == "auto":
        why = []
        for name in table.auto.get(device.type, ()):
            impl = _impl(table, name)
            if not _exists(impl):
                why.append(f"{name}: not in this build or not available here")
                continue
            if dtype not in impl.dtypes:
                why.append(f"{name}: takes no {dtype}")
                continue
            ok, reason = impl.fits(**sizes)
            if ok:
                ok, reason = impl.prefer(**sizes)
            if ok:
                return (name, "") if explain else name
            why.append(reason)
        if not why:
            why.append(f"no {table.what} kernel for backend='auto' on {device}")
        return (table.fallback, "; ".join(why)) if explain else table.fallback
    if backend == "torch":
        return (table.fallback, f"backend='torch' runs the {table.fallback}") if explain else table.fallback
    impl = _impl(table, backend)
    soft = table.soft

    def refuse(kind, reason=""):
        exc, msg = _refuse(table, backend, device, dtype, kind, reason)
        if "all" in soft or kind in soft:
            return (table.fallback, msg) if explain else table.fallback
        raise exc(msg)

    if "dtype" in soft and dtype not in (impl.dtypes if impl is not None else KERNEL_DTYPES):
        return refuse("dtype")  # before availability: float64 MoLRG is the GEMM form on any build
    if not _works(backend):
        return refuse("unavailable")
    if impl is not None and dtype not in impl.dtypes:
        return refuse("dtype")
    devices = impl.devices if impl is not None else (("cpu",) if backend == "cpp" else ("cuda",))
    if not _runs_on(Impl(backend, devices), device, forced=True):
        return refuse("device")
    if impl is None or not _exists(impl):
        return refuse("kernel")
    ok, reason = impl.fits(**sizes)
    if not ok:
        return refuse("fits", reason)
    return (backend, "") if explain else backend


# --------------------------------------------------------------------------- the matrix
def cell(op: str, backend: str) -> str:
    """``"yes"``, ``"no (why)"`` or ``"-"`` (no kernel for this op), then the limit."""
    impl = _impl(OPS[op], backend)
    if impl is None:
        return "-"
    if _exists(impl):
        status = "yes"
    elif not _works(backend):
        status = f"no ({_probe(backend)[1].split(';')[0].split(' (')[0]})"
    else:
        status = "no (not in this build)"
    return f"{status}, {impl.limit}" if impl.limit else status


def rows() -> list:
    """The matrix as rows of strings: a header, then per op its cells (:data:`COLUMNS`) and auto's
    picks for float32 CPU and CUDA tensors (no sizes given: small problems)."""
    out = [["op", *COLUMNS, "auto cpu", "auto cuda"]]
    for op in OPS:
        picks = [choose(op, "auto", torch.device(dev), torch.float32) for dev in ("cpu", "cuda")]
        out.append([op, *(cell(op, b) for b in COLUMNS), *picks])
    return out


def matrix() -> str:
    """:func:`rows` as an aligned text table, columns separated by `` | ``."""
    table = rows()
    widths = [max(len(r[j]) for r in table) for j in range(len(table[0]))]
    lines = ["op x backend (yes / no (why) / - no kernel; the limit; what auto picks):"]
    lines += ["  " + " | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    return "\n".join(lines)


def info() -> str:
    """A table of which backends work here, what ``auto`` picks per device, and the op x backend
    matrix of this table."""
    resolve = functools.partial(choose, "fused_step")
    lines = [f"fastdiff backends (torch {torch.__version__}):"]
    for name, (ok, detail) in available().items():
        lines.append(f"  {name:<7} {'yes' if ok else 'no ':<4} {detail}")
    picks = [f"cpu -> {resolve('auto', torch.device('cpu'), torch.float32)}"]
    if torch.cuda.is_available():
        picks.append(f"cuda -> {resolve('auto', torch.device('cuda'), torch.float32)} ({torch.cuda.get_device_name()})")
    lines.append("  auto:   " + ", ".join(picks))
    lines.append(matrix())
    return "\n".join(lines)
