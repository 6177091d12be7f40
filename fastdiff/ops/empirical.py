"""The empirical scan: one read of a training set gives the online softmax and the nearest rows.

Every output of :func:`fastdiff.denoisers.empirical_posterior` (the posterior mean, the score,
``log p_t`` and the k nearest training points; docs/math.md section 2c) comes from one streamed
pass over the data ``y_i`` (N, n), on coordinates centred on the data mean ``c`` (far from the
origin the expanded squares cancel).  Per query ``b`` and training row ``i``, with ``Yc_i = y_i - c``::

    H_bi   = xh_b . Yc_i                                   (xh = x - alpha c: one GEMM)
    S_bi   = g1_b H_bi - g2_b ||Yc_i||^2                   (the softmax logit, up to a per-query constant)
    V_bi   = H_bi - ||Yc_i||^2 / 2 - h_b (c . Yc_i)        (-||x - y_i||^2 / 2 up to a per-query constant)

    m_b    = max_i S_bi,   l_b = sum_i exp(S_bi - m_b),   acc_b = sum_i exp(S_bi - m_b) Yc_i
    best   = the kc largest V_bi per query (values and row indices, any order)
    ymax2  = max_i ||Yc_i||^2                              (for the neighbours' rounding certificate)

with ``g1 = alpha / sigma^2``, ``g2 = alpha^2 / (2 sigma^2)`` and ``h = 1 - alpha`` per query.  The
log-sum-exp runs online (FlashAttention's recurrence: Dao et al. 2022, Algorithm 1), so memory is
O((B + N) n + B kc) and no (B, N) matrix exists; :mod:`fastdiff.denoisers.empirical` adds the float64
constants, divides, re-ranks the candidates exactly and certifies them (the same code for every backend).

Contract (every backend; :func:`fastdiff.denoisers.empirical_posterior` checks it, nothing here does):

- ``xh`` (B, n), ``center`` (n,), ``g1``, ``g2``, ``h`` (B,): contiguous, the compute dtype ``ct``
  (float32 or float64), one device; B, n >= 1.
- ``data`` (N, n) contiguous, N >= 1: ``ct``, or uint8 images read as ``y = lo + (hi - lo) u / 255``
  (:meth:`fastdiff.data.ImageSet.float`), converted tile by tile: no float copy of the set.
- ``soft``: compute ``m, l``; ``want_acc``: also ``acc`` (else None); ``acc_cols``: None, or (ncol,)
  int64 column indices on the device, distinct, in ``[0, n)``: ``acc`` is then (B, ncol), the sum of
  ``exp(S - m) Yc[:, acc_cols]`` (the patch denoisers want a patch's C centre pixels of its C P^2
  values; the C++ kernel then does ncol multiply-adds a score instead of n); ``kc``: candidates kept (0: none;
  at most N; the Triton backend at most TRITON_MAX_KC, its row's ``fits``, a ValueError above).
  Returns ``(m (B,), l (B,), acc (B, n) or None, best_v (B, kc), best_i (B, kc) int64, ymax2)`` in
  ``ct`` (``ymax2`` a 0-d tensor; ``m = -inf, l = 0`` where not ``soft``).
- A NaN or Inf in a query row or a training row propagates into that query's ``m, l, acc`` (as the
  formula does); the candidates of a NaN query are unspecified (the caller's float64 re-rank sees it).
  Kernels may sum in any order: results agree to the compute dtype's rounding, not bit for bit.

Layers: :func:`empirical_scan` (the entry, a concrete backend already chosen) and one launcher per
backend (:data:`LAUNCHERS`): :func:`_scan_torch` here (chunked GEMMs; any device), the C++ kernel
``fastdiff.kernels.cpp.empirical_scan`` (csrc/empirical.cpp) and the Triton one
``fastdiff.kernels.empirical.empirical_scan``, each ``(xh, data, center, g1, g2, h, lo, hi, soft,
want_acc, kc, chunk, acc_cols)``.  No autograd (the denoiser's gradient is not a kernel's business here).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from fastdiff import backends
from fastdiff.ops.table import CPU, CUDA, TORCH, Impl, Launchers, Op

__all__ = ["ROW", "LAUNCHERS", "empirical_scan", "chunk_rows", "rows_of", "TRITON_MAX_KC"]

COMPUTE_DTYPES = (torch.float32, torch.float64)
# the Triton kernel keeps each query's candidates in a register set of kc padded to a power of two:
# kc = 2k + 2 <= 64 covers k <= 31 neighbours (fastdiff.kernels.empirical.MAX_KC; its tests check the two agree)
TRITON_MAX_KC = 64


def _triton_fits(kc: int = 0, **_) -> Tuple[bool, str]:
    if kc > TRITON_MAX_KC:
        return False, (f"backend='triton' keeps at most {TRITON_MAX_KC} candidates a query (kc = 2k + 2: "
                       f"k <= {(TRITON_MAX_KC - 2) // 2} neighbours), got kc = {kc}")
    return True, ""


ROW = Op("empirical", what="empirical-scan", impls=(
    Impl("triton", CUDA, (torch.float32,), triton_module="empirical", fits=_triton_fits,
         limit=f"float32, kc <= {TRITON_MAX_KC} candidates"),
    Impl("cpp", CPU, COMPUTE_DTYPES, cpp_symbol="empirical_scan", limit="float32 / float64"),
    TORCH),
    auto={"cuda": ("triton",), "cpu": ("cpp",)}, soft=("dtype",),
    names=("auto", "triton", "cpp", "torch"))
"""auto on the CPU runs the C++ kernel (one streamed pass, no (B, chunk) matrices, one parallel
region) where it is built: measured faster than torch's chunked MKL GEMMs for the mean + log p_t +
top-2 (kc = 6), float32, min of 5 (50 for the small size), 2-core AMD EPYC, AVX2 path, a shared
machine at loadavg 11-14 (so rough; 2-thread times there are mostly scheduling):
(B, N, n) = (256, 50000, 192): 290-489 vs 449-715 ms on 1 thread (1.5x), 316-550 vs 950-2210 ms on 2;
(16, 2000, 64): 0.21-0.22 vs 0.44-0.60 ms on 1 thread (2-2.7x), 0.14-0.23 vs 0.39-0.55 ms on 2.
On a 2-core AVX-512 EPYC (MKL's float32 GEMM at 430 GFLOP/s), the denoiser alone, 2 threads, medians of 7 over
several runs: the AVX-512 scan 6.3-8.0 vs the torch launcher 10.6-15.8 ms at (1024, 8192, 48) and 15.9-23.3 vs
20.4-35.8 ms at (256, 8192, 784) (its AVX2 path: 9.9-10.4 and 33-34 ms).
Torch where the C++ build is absent."""


def chunk_rows(B: int, N: int, n: int, chunk: Optional[int]) -> int:
    """Training rows per chunk: ``chunk`` if given, else a (B, chunk) block no larger than the inputs
    themselves (memory O((B + N) n)), between 1024 and 16384 rows."""
    if chunk is not None:
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk: expected a positive int, got {chunk!r}")
        return int(chunk)
    return int(min(N, max(1024, min(16384, (B + N) * n // max(B, 1)))))


def rows_of(data: torch.Tensor, lo: float, hi: float, j: int, c: int, dtype: torch.dtype,
            shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows ``j .. j + c`` of ``data`` as ``dtype`` floats (uint8 read as ``lo + (hi - lo) u / 255``),
    minus ``shift`` (n,) if given; always a new tensor."""
    view = data[j:j + c]
    if data.dtype != torch.uint8:
        return view - shift if shift is not None and view.dtype == dtype else \
            (view.to(dtype, copy=True) if shift is None else view.to(dtype).sub_(shift))
    Y = view.to(dtype).mul_((hi - lo) / 255.0).add_(lo)
    return Y.sub_(shift) if shift is not None else Y


def _scan_torch(xh, data, center, g1, g2, h, lo, hi, soft, want_acc, kc, chunk, acc_cols=None):
    """Pure torch, any device: per chunk one GEMM ``H = xh Yc^T``, the online softmax, a ``topk``."""
    B, n = xh.shape
    N = data.shape[0]
    ct, dev = xh.dtype, xh.device
    g1, g2, h = g1[:, None], g2[:, None], h[:, None]
    m = torch.full((B, 1), -math.inf, dtype=ct, device=dev)
    l = torch.zeros(B, 1, dtype=ct, device=dev)
    acc = torch.zeros(B, n if acc_cols is None else acc_cols.numel(), dtype=ct, device=dev) if want_acc else None
    best_v = torch.full((B, 0), -math.inf, dtype=ct, device=dev)
    best_i = torch.zeros(B, 0, dtype=torch.long, device=dev)
    ymax2 = torch.zeros((), dtype=ct, device=dev)
    xs = xh * g1 if not kc else None                          # g1 folded into the GEMM when H is not needed
    step = chunk_rows(B, N, n, chunk)
    for j in range(0, N, step):
        Y = rows_of(data, lo, hi, j, step, ct, center)        # Yc, (c, n)
        ysq = (Y * Y).sum(1)
        if kc:
            H = backends.mm(xh, Y.T)                          # (B, c)
            ymax2 = torch.maximum(ymax2, ysq.max())
            V = torch.addcmul(H - 0.5 * ysq, h, (Y @ center)[None, :], value=-1.0)
            v, i = torch.topk(V, min(kc, V.shape[1]), dim=1)
            best_v, best_i = torch.cat([best_v, v], 1), torch.cat([best_i, i + j], 1)
            if best_v.shape[1] > kc:
                best_v, sel = torch.topk(best_v, kc, dim=1)
                best_i = best_i.gather(1, sel)
            S = H.mul_(g1) if soft else None
        else:
            S = backends.mm(xs, Y.T)
        if soft:
            S.addcmul_(g2, ysq[None, :], value=-1.0)
            m_new = torch.maximum(m, S.amax(1, keepdim=True))
            scale = torch.exp(m - m_new)                      # exp(-inf) = 0 on the first chunk
            S.sub_(m_new).exp_()
            l.mul_(scale).add_(S.sum(1, keepdim=True))
            if acc is not None:
                # a narrow (B, n) product (patches: n = C P^2) runs ~2-5x faster as (n, B) = Y^T S^T
                # (measured single-threaded, MKL: n = 9, c = 256); wide ones as S Y
                Yv = Y if acc_cols is None else Y[:, acc_cols]
                acc.mul_(scale).add_(backends.mm(Yv.T, S.T).T if Yv.shape[1] < 32 else backends.mm(S, Yv))
            m = m_new
    return m.reshape(B), l.reshape(B), acc, best_v, best_i, ymax2


LAUNCHERS = Launchers("empirical-scan", {"cpp": "fastdiff.kernels.cpp:empirical_scan",
                                         "triton": "fastdiff.kernels.empirical:empirical_scan"},
                      torch=_scan_torch)
"""``{backend: launcher}``, each ``(xh, data, center, g1, g2, h, lo, hi, soft, want_acc, kc, chunk, acc_cols)``."""


def empirical_scan(backend: str, xh, data, center, g1, g2, h, *, lo: float = -1.0, hi: float = 1.0,
                   soft: bool = True, want_acc: bool = True, kc: int = 0, chunk: Optional[int] = None,
                   acc_cols: Optional[torch.Tensor] = None):
    """The module's contract on a concrete ``backend``: ``(m, l, acc, best_v, best_i, ymax2)``.
    Under torch.compile a kernel runs as the opaque library op ``fastdiff::empirical_scan`` (its
    fake impl gives the shapes); torch's own form is traced; eager calls skip the op layer."""
    if backend != "torch" and torch.compiler.is_compiling():
        m, l, acc, best_v, best_i, ymax2 = _scan_op(xh, data, center, g1, g2, h, float(lo), float(hi), bool(soft),
                                                    bool(want_acc), int(kc), backend, acc_cols)
        return m, l, acc if want_acc else None, best_v, best_i, ymax2
    return LAUNCHERS[backend](xh, data, center, g1, g2, h, float(lo), float(hi), bool(soft),
                              bool(want_acc), int(kc), chunk, acc_cols)


# =========================================================================== torch.library op
@torch.library.custom_op("fastdiff::empirical_scan", mutates_args=())
def _scan_op(xh: torch.Tensor, data: torch.Tensor, center: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor,
             h: torch.Tensor, lo: float, hi: float, soft: bool, want_acc: bool, kc: int,
             impl: str, acc_cols: Optional[torch.Tensor]
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    m, l, acc, best_v, best_i, ymax2 = LAUNCHERS[impl](xh, data, center, g1, g2, h, lo, hi, soft, want_acc, kc, None,
                                                       acc_cols)
    if acc is None:  # a library op returns tensors: (0, width) stands for "not asked for"
        acc = xh.new_empty((0, xh.shape[1] if acc_cols is None else acc_cols.numel()))
    return m, l, acc, best_v, best_i, ymax2


@_scan_op.register_fake
def _(xh, data, center, g1, g2, h, lo, hi, soft, want_acc, kc, impl, acc_cols):
    B, n = xh.shape
    n = n if acc_cols is None else acc_cols.shape[0]
    return (xh.new_empty(B), xh.new_empty(B), xh.new_empty((B if want_acc else 0, n)), xh.new_empty((B, kc)),
            xh.new_empty((B, kc), dtype=torch.int64), xh.new_empty(()))
