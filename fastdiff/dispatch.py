"""The one dispatch table: which backend runs each op, and the only place ``backend="auto"`` is decided.

Per op, :data:`OPS` lists its implementations in ``auto``'s preference order per device type, each
with the devices it runs on, the dtypes it takes, how to tell it exists in this build (a
``fastdiff._C`` symbol, a ``fastdiff.kernels.<module>``) and its size limits (``fits(**sizes) ->
(ok, why)`` and a human-readable ``limit``).  :func:`choose` reads it; ``fastdiff info`` prints it
(:func:`matrix`); the tests parametrize from it (``tests/conftest.py: backend_devices``).

Sizes (keyword arguments of :func:`choose`; a size not given is taken to fit):
``molrg``: ``n`` (dimension), ``D`` (sum d_k), ``K`` (components), ``grad`` (a backward follows);
``svd``: ``m``, ``n``; ``trajectory``: ``n``, ``D``, ``K``.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from fastdiff.backends import BACKENDS, KERNEL_DTYPES, _probe, _works, available, has_kernel

__all__ = ["Impl", "Op", "OPS", "COLUMNS", "check_backend", "choose", "exists", "cell", "rows", "matrix", "info"]

COLUMNS = ("triton", "cuda", "cpp", "torch")
ANY_DTYPE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# fused per-row C++ MoLRG kernels up to this many multiply-adds per row (n * D); torch GEMMs above.
# Measured here: the fused forward wins up to ~2^15, the fused backward only up to ~2^13.
CPP_FUSED_MAX_ND = 1 << 15
CPP_FUSED_MAX_ND_GRAD = 1 << 13
# the C++ MoLRG kernels keep per-row logits in fixed stack buffers
CPP_MAX_K = 1024

Fits = Callable[..., Tuple[bool, str]]


def _fits_always(**_) -> Tuple[bool, str]:
    return True, ""


@dataclass(frozen=True)
class Impl:
    """One implementation of an op.  ``fits`` is a hard limit (a forced backend is refused or falls
    back outside it); ``prefer`` an extra condition for ``auto`` only (where it is the faster one)."""
    backend: str
    devices: Tuple[str, ...]                 # device types; Triton also CPU under TRITON_INTERPRET=1 when forced
    dtypes: Tuple[torch.dtype, ...] = KERNEL_DTYPES
    cpp_symbol: Optional[str] = None         # fastdiff._C.<symbol> must exist ("cpp")
    triton_module: Optional[str] = None      # fastdiff.kernels.<module> must import ("triton")
    fits: Fits = _fits_always
    prefer: Fits = _fits_always
    limit: str = ""


@dataclass(frozen=True)
class Op:
    """An op's table.  ``auto``: preference order per device type (torch / ``fallback`` last).
    ``fallback``: what runs when no kernel does ("torch"; "loop" for the step-by-step sampler loop).
    ``soft``: refusals of a forced backend that fall back instead of raising ("dtype", "fits", or
    "all").  ``names``: the backend names the op accepts.  ``what``: its name in error messages."""
    name: str
    impls: Tuple[Impl, ...]
    auto: Dict[str, Tuple[str, ...]]
    what: str
    fallback: str = "torch"
    soft: Tuple[str, ...] = ()
    names: Tuple[str, ...] = BACKENDS


# --------------------------------------------------------------------------- size limits
def _molrg_cpp_fits(K: int = 1, **_) -> Tuple[bool, str]:
    if K > CPP_MAX_K:
        return False, f"the C++ MoLRG kernels take K <= {CPP_MAX_K} components, got {K}"
    return True, ""


def _molrg_cpp_prefer(n: int = 0, D: int = 0, grad: bool = False, **_) -> Tuple[bool, str]:
    limit = CPP_FUSED_MAX_ND_GRAD if grad else CPP_FUSED_MAX_ND
    if n * D > limit:
        return False, f"n * sum d_k = {n * D} > {limit}: the GEMM form is faster"
    return True, ""


def _molrg_triton_fits(D: int = 0, K: int = 1, **_) -> Tuple[bool, str]:
    from fastdiff.kernels.molrg import MAX_D, MAX_K

    if D > MAX_D or K > MAX_K:
        return False, f"the Triton MoLRG kernel takes sum d_k <= {MAX_D} and K <= {MAX_K}, got {D}, {K}"
    return True, ""


def _svd_triton_fits(m: int = 1, n: int = 1, **_) -> Tuple[bool, str]:
    from fastdiff.kernels.svd import MAX_DIM

    if max(m, n) > MAX_DIM:
        return False, f"backend='triton': the SVD kernel takes m, n <= {MAX_DIM}, got ({m}, {n})"
    return True, ""


def _trajectory_cpp_fits(K: int = 1, **_) -> Tuple[bool, str]:
    if K > CPP_MAX_K:
        return False, f"the C++ trajectory kernel takes K <= {CPP_MAX_K} components, got {K}"
    return True, ""


def _trajectory_triton_fits(n: int = 1, D: int = 1, K: int = 1, **_) -> Tuple[bool, str]:
    from fastdiff.kernels.trajectory import fits

    return fits(n, D, K)


_CPU, _CUDA, _ALL = ("cpu",), ("cuda",), ("cpu", "cuda")
_TORCH = Impl("torch", _ALL, ANY_DTYPE, limit="any device, any float dtype")

OPS: Dict[str, Op] = {op.name: op for op in (
    Op("fused_step", what="fused-step", impls=(
        Impl("triton", _CUDA), Impl("cuda", _CUDA), Impl("cpp", _CPU), _TORCH),
        auto={"cuda": ("triton", "cuda"), "cpu": ("cpp",)}),
    # forced float64 and oversized problems run the GEMM form in torch ops (the call still works)
    Op("molrg", what="MoLRG", soft=("dtype", "fits"), impls=(
        Impl("triton", _CUDA, triton_module="molrg", fits=_molrg_triton_fits, limit="sum d_k <= 512, K <= 32"),
        Impl("cpp", _CPU, cpp_symbol="molrg_forward", fits=_molrg_cpp_fits, prefer=_molrg_cpp_prefer,
             limit=f"K <= {CPP_MAX_K}; auto: n*sum d_k <= {CPP_FUSED_MAX_ND} ({CPP_FUSED_MAX_ND_GRAD} with grad)"),
        Impl("torch", _ALL, ANY_DTYPE, limit="GEMM form, any size")),
        auto={"cuda": ("triton",), "cpu": ("cpp",)}),
    Op("svd", what="SVD", impls=(
        Impl("triton", _CUDA, ANY_DTYPE, triton_module="svd", fits=_svd_triton_fits, limit="m, n <= 256"),
        Impl("cpp", _CPU, ANY_DTYPE, cpp_symbol="svdvals_rank", limit="float32 / float64"),
        _TORCH),
        auto={"cuda": ("triton",), "cpu": ("cpp",)}),
    Op("trajectory", what="trajectory", fallback="loop", soft=("all",), impls=(
        Impl("triton", _CUDA, triton_module="trajectory", fits=_trajectory_triton_fits,
             limit="K <= 32, n x sum d_k in registers"),
        Impl("cpp", _CPU, cpp_symbol="molrg_trajectory", fits=_trajectory_cpp_fits, limit=f"K <= {CPP_MAX_K}"),
        Impl("torch", _ALL, ANY_DTYPE, limit="the step-by-step loop")),
        auto={"cuda": ("triton",), "cpu": ("cpp",)}),
    Op("ksubspaces", what="K-subspaces", names=("auto", "cpp", "torch"), impls=(
        Impl("cpp", _CPU, (torch.float32,), cpp_symbol="ksubspaces", limit="float32"),
        _TORCH),
        auto={"cpu": ("cpp",)}),
)}


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
    if op.name == "ksubspaces":  # one message for every refusal (tests/test_sweeps.py matches it)
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


def choose(op: str, backend: str, device, dtype: torch.dtype, *, explain: bool = False, **sizes):
    """The backend that runs ``op`` for tensors on ``device`` of ``dtype`` at these ``sizes``.

    ``"auto"``: the first of the op's preferred backends for this device type that runs here, exists
    in this build, takes the dtype and fits (``fits`` and ``prefer``); else the op's fallback
    ("torch"; "loop" for the trajectory).  A forced backend: itself, or a clear error naming it
    (unknown name, not available here, wrong dtype or device, no kernel in this build, too large),
    except the op's ``soft`` refusals, which fall back.  ``explain=True``: (choice, why) instead,
    why saying what was refused ("" when a kernel runs)."""
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
