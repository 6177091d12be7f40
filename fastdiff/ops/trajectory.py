"""A whole MoLRG sampling trajectory in one kernel: the table of per-step affine coefficients
(:func:`fastdiff.sampling.trajectory_table`) applied with the MoLRG posterior in between, the
noise drawn in the kernel (docs/math.md).

Contract (both kernels, ``csrc/trajectory.cpp`` on CPU and ``kernels/trajectory.py`` on CUDA, run
the same per-step program; :func:`fastdiff.trajectory.tables` builds the tables, nothing here
checks them):

- the state: ``I`` instances of ``B`` samples of dimension ``n``, float32, as ``(I B, n)``;
- ``ucat`` (I, n, D) float32: each instance's concatenated bases, ``D = sum d_k``; ``offsets``:
  the K + 1 column offsets of the components in it;
- ``coef`` (T, :data:`NCOEF`) float32 ``[s1, cx, cm, cz, hx, hm, hxp, hmp]``: step ``t``'s affine
  map (float64 on the host, rounded once)::

      x  <- x + s1 z(off1)                                       if off1 >= 0   (EDM churn)
      x0  = D(x; params[prow1]),   x' = cx x + cm x0 (+ cz z(off2) if off2 >= 0)
      x  <- hx x + hm x0 + hxp x' + hmp D(x'; params[prow2])     if prow2 >= 0  (Heun), else x'
      traj[snap] = x                                             if snap >= 0

- ``idx`` (T, :data:`NIDX`) int64 ``[off1, off2, prow1, prow2, snap]`` (-1: none): the Philox
  offsets of the churn and step noise (at most one per step; ``z(off)`` of global row ``r``,
  column ``j`` is the stream at ``off + r n + j``, the window the step-by-step loop draws), the
  parameter rows of the step's evaluations, the trajectory slot of the state after the step;
- ``params`` (I or 1, P, 3K + 2) float32: one MoLRG parameter row
  (:func:`fastdiff.denoisers.molrg.molrg_params`) per distinct noise level, per instance
  (``p_istride`` elements apart; 0: shared);
- ``labels`` (I B,) int64 or None (the classes guidance steers toward); ``hard``: the argmax
  posterior instead of the softmax.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch

from fastdiff.ops.molrg import CPP_MAX_K
from fastdiff.ops.table import ALL, ANY_DTYPE, CPU, CUDA, Impl, Launchers, Op

__all__ = ["ROW", "NCOEF", "NIDX"]

NCOEF, NIDX = 8, 5


def _cpp_fits(K: int = 1, **_) -> Tuple[bool, str]:
    if K > CPP_MAX_K:
        return False, f"the C++ trajectory kernel takes K <= {CPP_MAX_K} components, got {K}"
    return True, ""


def _triton_fits(n: int = 1, D: int = 1, K: int = 1, **_) -> Tuple[bool, str]:
    from fastdiff.kernels.trajectory import fits

    return fits(n, D, K)


# auto's limit: the kernel holds U (n x sum d_k, each padded to a power of two >= 16) and the
# sample tiles in registers; above 32 x 16 it spills (ptxas -v, bench/results/triton-resources.md:
# 32 x 32 with K 32 248 B/thread of spill stores at sm_90; the benchmark's 64 x 32 576 B; 128 x 32
# 11704 B), so auto runs the step-by-step loop there; a forced backend="triton" still runs
AUTO_MAX_TILE = 32 * 16


def _triton_prefer(n: int = 1, D: int = 1, **_) -> Tuple[bool, str]:
    tile = max(16, 1 << (n - 1).bit_length()) * max(16, 1 << (D - 1).bit_length())
    if tile > AUTO_MAX_TILE:
        return False, (f"triton: n x sum d_k = {n} x {D} pads to a tile over 32 x 16 elements: the 32 x 32 variant "
                       "spills 248 B/thread at sm_90, 64 x 32 576 B (bench/results/triton-resources.md)")
    return True, ""


ROW = Op("trajectory", what="trajectory", fallback="loop", soft=("all",), impls=(
    Impl("triton", CUDA, triton_module="trajectory", fits=_triton_fits, prefer=_triton_prefer,
         limit="K <= 32, n x sum d_k in registers; auto: padded n x sum d_k <= 32 x 16 (larger ones spill)"),
    Impl("cpp", CPU, cpp_symbol="molrg_trajectory", fits=_cpp_fits, limit=f"K <= {CPP_MAX_K}"),
    Impl("torch", ALL, ANY_DTYPE, limit="the step-by-step loop")),
    auto={"cuda": ("triton",), "cpu": ("cpp",)})


# --------------------------------------------------------------------------- the launchers
LAUNCHERS = Launchers("fused-trajectory", {"cpp": "fastdiff.kernels.cpp:molrg_trajectory",
                                           "triton": "fastdiff.kernels.trajectory:molrg_trajectory"})
"""``{backend: launcher}`` ("cpp", "triton"), each
``(x, I, B, ucat, offsets, params, p_istride, labels, hard, coef, idx, t0, t1, traj, seed)``: steps
``[t0, t1)`` on the state ``x``, in place."""


# --------------------------------------------------------------------------- the entry
def _trajectory(x: torch.Tensor, ucat: torch.Tensor, offsets: Sequence[int], params: torch.Tensor, p_istride: int,
                labels: Optional[torch.Tensor], hard: bool, coef: torch.Tensor, idx: torch.Tensor,
                snapshots: Optional[int], seed: int, *, backend: str, chunk: int,
                progress: Optional[Callable[[int], object]] = None):
    """The trajectory from ``x`` (``I B n`` elements, any float dtype; not modified) through every
    step of the tables, ``chunk`` steps per launch (``progress(steps)`` after each).

    Returns ``(state, traj)``: the final state as float32 ``(I B, n)`` and, with ``snapshots``
    slots, the float32 ``(snapshots, I B, n)`` the kernel wrote (slots no step writes are left
    unset: the caller fills the initial state and repeated indices).  ``backend``: "cpp" or
    "triton", already chosen by :func:`fastdiff.dispatch.choose`.
    """
    I, n = ucat.shape[0], ucat.shape[1]
    B = x.numel() // (I * n)
    state = x.to(torch.float32).contiguous().view(I * B, n)
    if state.data_ptr() == x.data_ptr():  # the kernel updates its state in place; x is the caller's
        state = state.clone()
    traj = None
    if snapshots is not None:
        traj = torch.empty((snapshots, I * B, n), dtype=torch.float32, device=x.device)
    launch = LAUNCHERS[backend]
    T = coef.shape[0]
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        launch(state, I, B, ucat, offsets, params, p_istride, labels, hard, coef, idx, t0, t1, traj, seed)
        if progress is not None:
            progress(t1 - t0)
    return state, traj
