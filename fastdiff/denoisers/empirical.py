"""The empirical (memorizing) denoiser of a training set, and exact nearest neighbours in it."""
from __future__ import annotations

import math
import numbers
import weakref
from typing import NamedTuple, Optional, Sequence, Tuple

import torch

from fastdiff import dispatch
from fastdiff._interop import accepts_arrays, check_real
from fastdiff._args import OUTPUTS, _check_x, _per_sample
from fastdiff.data import ImageSet
from fastdiff.ops.empirical import chunk_rows, empirical_scan, rows_of

__all__ = ["empirical_denoise", "nearest_neighbors", "empirical_posterior", "empirical_logp", "EmpiricalPosterior",
           "POSTERIOR_OUTPUTS", "Empirical"]


@accepts_arrays
def empirical_denoise(x, data, alpha, sigma, *, output: str = "x0", chunk: Optional[int] = None,
                      backend: str = "auto"):
    """Optimal denoiser of the empirical distribution of ``data`` (N, n) (it reproduces training points)::

        x0_hat = sum_i softmax_i( -||x - alpha y_i||^2 / (2 sigma^2) ) y_i

    :func:`empirical_posterior`'s one streamed pass (the empirical scan, :mod:`fastdiff.ops.empirical`)
    asked for the mean only: an online softmax over chunks of ``data`` (FlashAttention's
    recurrence), no (B, N) matrix, memory O((B + N) n).  ``data`` may be a
    :class:`fastdiff.data.ImageSet` (uint8 images, flattened to n = C H W, values in [-1, 1]),
    converted tile by tile.  ``output``: "x0", "eps" = (x - alpha x0) / sigma or "score" = -eps / sigma.
    """
    x = _check_x(x)
    if output not in OUTPUTS:
        raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")
    x0_64, a64, s64 = _scan(x, data, alpha, sigma, ("x0",), 1, chunk, backend)[:3]
    if output == "x0":
        return x0_64.to(x.dtype)
    eps = (x.double() - a64 * x0_64) / s64
    return (eps if output == "eps" else -eps / s64).to(x.dtype)


@accepts_arrays
def nearest_neighbors(x, data, k: int = 2, *, chunk: Optional[int] = None,
                      backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Distances (B, k) and indices (B, k) of the ``k`` nearest rows of ``data`` (N, n) (or of a uint8
    :class:`~fastdiff.data.ImageSet`, flattened), nearest first.

    Exact (the float64 brute force's answer, up to ties).  Candidates come from the empirical
    scan's scores ``||y_i||^2 - 2 x.y_i`` in the compute dtype (memory O((B + N) n)) on x and data
    centred on the data mean (far from the origin the expansion cancels: at |y| ~ 1e4 with spread
    1, float32 scores cannot tell neighbours apart); the ``2k + 2`` best per row are re-ranked with
    exact float64 distances.  A row is accepted when its k-th exact score is below the worst kept
    candidate score minus the rounding bound ``E = 2 (n + 4) eps (max||y||^2 + 2 ||x|| max||y||)``
    of any score; the rows that fail that test (rare: a tie band wider than the candidate set)
    are recomputed by a float64 brute force.
    """
    x = _check_x(x)
    post = _scan(x, data, 1.0, 1.0, ("neighbors",), k, chunk, backend)
    return post[3].to(x.dtype), post[4]


def _nearest_brute64(x64, y64, k, step):
    """(squared distances, indices) (b, k) of the k nearest rows, float64, chunked over the data."""
    best_d = torch.full((x64.shape[0], 0), math.inf, dtype=torch.float64, device=x64.device)
    best_i = torch.zeros(x64.shape[0], 0, dtype=torch.long, device=x64.device)
    for j in range(0, y64.shape[0], step):
        d2 = ((x64[:, None, :] - y64[None, j:j + step]) ** 2).sum(-1) if x64.shape[0] * step * x64.shape[1] <= 1 << 24 \
            else torch.cdist(x64, y64[j:j + step]) ** 2
        v, i = torch.topk(d2, min(k, d2.shape[1]), dim=1, largest=False)
        best_d, best_i = torch.cat([best_d, v], 1), torch.cat([best_i, i + j], 1)
        best_d, sel = torch.topk(best_d, min(k, best_d.shape[1]), dim=1, largest=False)
        best_i = best_i.gather(1, sel)
    return best_d, best_i


class Empirical:
    """The empirical distribution of a training set (N, n), or of an :class:`~fastdiff.data.ImageSet`
    (kept as uint8, converted chunk by chunk): its optimal denoiser memorizes."""

    def __init__(self, data):
        self._moved = None
        if isinstance(data, ImageSet):
            self.data, self.N, self.n = data, len(data), data.n
            return
        if not isinstance(data, torch.Tensor) or data.ndim != 2 or data.shape[0] < 1:
            raise ValueError(f"data: expected an (N, n) tensor or an ImageSet with N >= 1, got "
                             f"{getattr(data, 'shape', type(data).__name__)}")
        self.data = data
        self.N, self.n = data.shape

    def _on(self, device):
        """The set on ``device`` (kept: a sampler calls this every step, and a uint8 set is moved once)."""
        if self._moved is None or self._moved[0] != device:
            data = self.data
            if isinstance(data, ImageSet):
                data = data if data.images.device == device else \
                    ImageSet(data.images.to(device), data.labels, classes=data.classes, source=data.source)
            else:
                data = data.to(device)
            self._moved = (device, data)
        return self._moved[1]

    def __call__(self, x, alpha, sigma, **kwargs):
        return empirical_denoise(x, self._on(x.device), alpha, sigma, **kwargs)

    def nearest(self, x, k: int = 2) -> Tuple[torch.Tensor, torch.Tensor]:
        return nearest_neighbors(x, self._on(x.device), k)

    def __repr__(self) -> str:
        return f"Empirical(N={self.N}, n={self.n})"


# =========================================================================== one pass, every output
POSTERIOR_OUTPUTS = ("x0", "score", "logp", "neighbors")


class EmpiricalPosterior(NamedTuple):
    """What :func:`empirical_posterior` computed (``None`` where not asked for)."""
    x0: Optional[torch.Tensor]          # (B, n) posterior mean E[x_0 | x_t]
    score: Optional[torch.Tensor]       # (B, n) grad log p_t(x) = (alpha x0 - x) / sigma^2
    logp: Optional[torch.Tensor]        # (B,) log p_t(x), float64
    distances: Optional[torch.Tensor]   # (B, k) ||x - y_i|| of the k nearest training points, nearest first
    indices: Optional[torch.Tensor]     # (B, k) their row indices


@accepts_arrays
def empirical_posterior(x, data, alpha, sigma, *, outputs: Sequence[str] = ("x0",), k: int = 2,
                        chunk: Optional[int] = None, backend: str = "auto") -> EmpiricalPosterior:
    """The posterior mean, score, ``log p_t(x)`` and the k nearest training points, from one read
    of the training set ``data`` (N, n) (or a uint8 :class:`~fastdiff.data.ImageSet`)::

        p_t(x)   = (1/N) sum_i N(x; alpha y_i, sigma^2 I)
        log p_t  = LSE_i( -||x - alpha y_i||^2 / (2 sigma^2) ) - log N - (n/2) log(2 pi sigma^2)
        x0_hat   = sum_i softmax_i(...) y_i,     score = (alpha x0_hat - x) / sigma^2
        neighbors: argmin_i ||x - y_i|| (the memorization ratio's d1 / d2, docs/math.md section 4)

    The pass is the empirical scan (:mod:`fastdiff.ops.empirical`, one dispatch-table row: Triton
    on CUDA, C++ or torch on the CPU): per chunk of rows one GEMM ``(x - alpha c) (y - c)^T`` on
    coordinates centred on the data mean ``c`` of the finite rows (far from the origin the expanded
    squares cancel; docs/math.md 2c), an online log-sum-exp (FlashAttention's recurrence) and the
    2k + 2 best neighbour candidates.  Here, in float64: the constant terms, the division, the
    candidates' exact re-rank and its certificate (a row that fails it is redone by brute force).
    Memory O((B + N) n + B k); never a (B, N) matrix.

    ``outputs``: any of :data:`POSTERIOR_OUTPUTS`; ``alpha, sigma`` scalars or (B,); ``backend``:
    "auto", "triton", "cpp" or "torch" (a kernel that takes no float64 falls back to torch).
    """
    x = _check_x(x)
    want = tuple(outputs) if not isinstance(outputs, str) else (outputs,)
    bad = [o for o in want if o not in POSTERIOR_OUTPUTS]
    if bad or not want:
        raise ValueError(f"outputs: expected a non-empty subset of {POSTERIOR_OUTPUTS}, got {outputs!r}")
    x0_64, a64, s64, dist, idx, logp = _scan(x, data, alpha, sigma, want, k, chunk, backend)
    x0 = score = None
    if x0_64 is not None:
        x0 = x0_64.to(x.dtype) if "x0" in want else None
        if "score" in want:
            score = ((a64 * x0_64 - x.double()) / (s64 * s64)).to(x.dtype)
    return EmpiricalPosterior(x0, score, logp, dist.to(x.dtype) if dist is not None else None, idx)


def _training_rows(x, data):
    """(data as an (N, n) tensor: ct floats or uint8, N, lo, hi): ``data`` checked against x."""
    B, n = x.shape
    if isinstance(data, ImageSet):
        if data.n != n:
            raise ValueError(f"data: expected images of n = {n} values (x has shape (B, {n})), got {data.shape}")
        return data.images.reshape(len(data), n).to(x.device), len(data), -1.0, 1.0
    if not isinstance(data, torch.Tensor) or data.ndim != 2:
        raise ValueError(f"data: expected an (N, {n}) tensor or an ImageSet, got "
                         f"{getattr(data, 'shape', type(data).__name__)}")
    if data.shape[1] != n:
        raise ValueError(f"data: expected n = {n} columns (x has shape (B, {n})), got {data.shape[1]}")
    if data.shape[0] < 1:
        raise ValueError("data: expected at least one training point")
    check_real("data", data)
    if data.device != x.device:
        raise ValueError(f"data: expected a tensor on {x.device} (the device of x), got {data.device}")
    return data, data.shape[0], -1.0, 1.0


# the last training set's centre: a sampler calls the denoiser on the same set every step, and the
# centre would be a second read of it.  Keyed by layout and version (an in-place change bumps it) and
# held against a weak reference to the tensor that owns the memory: a freed set whose pointer a new
# set reuses must miss, or the new set's results would depend (in the last bits) on the calls before.
_LAST_CENTER: dict = {}


def _center(Y, N, lo, hi, step, ct):
    """The mean of the finite rows of ``Y`` (a NaN / Inf training row must not move the centre of the
    others), rounded to ``ct`` and returned in float64: any centre makes the scan's identities exact,
    so it need only be near the data, but the kernel and the float64 epilogue must use the same one."""
    if torch.compiler.is_compiling():
        return _center_of(Y, N, lo, hi, step, ct)
    owner = Y if Y._base is None else Y._base        # a per-call view (a reshape) of a long-lived set
    key = (Y.data_ptr(), tuple(Y.shape), Y.stride(), Y.dtype, Y.device, Y._version, lo, hi, ct)
    hit = _LAST_CENTER.get(key)
    if hit is None or hit[0]() is not owner:
        _LAST_CENTER.clear()
        hit = _LAST_CENTER[key] = (weakref.ref(owner), _center_of(Y, N, lo, hi, step, ct))
    return hit[1]


def _center_of(Y, N, lo, hi, step, ct):
    n = Y.shape[1]
    if Y.dtype == torch.uint8:
        total = sum(Y[j:j + step].sum(0, dtype=torch.int64) for j in range(0, N, step)).double()
        center = lo + (hi - lo) / 255.0 * total / N
    else:
        center = Y.sum(0, dtype=ct).double() / N           # one vectorised pass in the compute dtype
        # a NaN / Inf row: the careful float64 pass (not under torch.compile: a data-dependent branch)
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(center).all()):
            center, count = torch.zeros(n, dtype=torch.float64, device=Y.device), 0
            for j in range(0, N, step):
                rows = Y[j:j + step].double()
                rows = rows[torch.isfinite(rows).all(1)]
                center += rows.sum(0)
                count += rows.shape[0]
            center /= max(count, 1)
    return center.to(ct).double()


def _scan(x, data, alpha, sigma, want, k, chunk, backend):
    """(x0 float64 or None, alpha, sigma (B or 1, 1) float64, distances float64 or None, indices, logp):
    the validated call of the empirical scan and its float64 epilogue."""
    B, n = x.shape
    table = dispatch.check_backend("empirical", backend)
    Y, N, lo, hi = _training_rows(x, data)
    near = "neighbors" in want
    if near and (isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= N):
        raise ValueError(f"k: expected an int in [1, N = {N}], got {k!r}")
    kc = min(N, 2 * int(k) + 2) if near else 0
    step = chunk_rows(B, N, n, chunk)
    a64 = _per_sample("alpha", alpha, B, x.device)[:, None]
    s64 = _per_sample("sigma", sigma, B, x.device)[:, None]
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    # kc: the Triton kernel's limit (a size only when candidates are kept: choose caches sizeless calls)
    impl = dispatch.choose(table.name, backend, x.device, ct, **({"kc": kc} if kc else {}))
    exact_rows = Y                       # the re-rank reads the data as given (float64 data stays exact)
    if Y.dtype != torch.uint8 and Y.dtype != ct:
        Y = Y.to(ct)          # a kernel reads the compute dtype or uint8 (torch would convert per chunk too)
    Y = Y.contiguous()
    center = _center(exact_rows, N, lo, hi, step, ct)
    soft = "x0" in want or "score" in want or "logp" in want
    kc = min(N, 2 * int(k) + 2) if near else 0
    x64 = x.double() - center                      # x - c: the neighbours' coordinates
    xa = x.double() - a64 * center                 # x - alpha c: the softmax's
    full = lambda v: v.reshape(-1).expand(B).to(ct).contiguous()   # noqa: E731  (1,) or (B,) -> (B,)
    m, l, acc, best_v, best_i, ymax2 = empirical_scan(
        impl, xa.to(ct).contiguous(), Y, center.to(ct).contiguous(), full(a64 / (s64 * s64)),
        full(a64 * a64 / (2 * s64 * s64)), full(1 - a64), lo=lo, hi=hi, soft=soft,
        want_acc="x0" in want or "score" in want, kc=kc, chunk=step)
    x0_64 = logp = dist = idx = None
    if acc is not None:
        x0_64 = acc.double() / l.double()[:, None] + center
    if "logp" in want:
        logp = (m.double() + l.double().log() - (xa * xa).sum(1) / (2 * s64[:, 0] ** 2)
                - math.log(N) - 0.5 * n * torch.log(2 * math.pi * s64[:, 0] ** 2)).reshape(B)
    if near:
        ysel = rows_of(exact_rows[best_i.reshape(-1)], lo, hi, 0, B * kc, torch.float64).sub_(center).reshape(B, kc, n)
        exact = ((x64[:, None, :] - ysel) ** 2).sum(-1)
        d2k, order = torch.topk(exact, k, dim=1, largest=False)
        idx = best_i.gather(1, order)
        if kc < N:
            # a row left out scored <= T (the worst kept) in ct, so its true score is <= T + E; a k-th
            # exact distance below -2 (T + E) + ||x - c||^2 (minus the dropped per-query terms) cannot
            # be beaten, else that query is redone by brute force.  The scores are
            # (x - alpha c).(y - c) - (1 - alpha) c.(y - c) - ||y - c||^2 / 2 in ct: bound each product
            eps = torch.finfo(ct).eps
            xn = x64.norm(dim=1)
            y2 = ymax2.double()
            reach = xa.norm(dim=1) + (1 - a64.reshape(-1)).abs() * center.norm()
            E = 2 * (n + 4) * eps * (y2 + 2 * reach * y2.sqrt())
            ok = d2k[:, -1] - xn * xn < -2 * best_v.double().amin(1) - E
            redo = (~ok & torch.isfinite(x64).all(1)).nonzero().reshape(-1)
            if redo.numel():
                y64 = torch.cat([rows_of(exact_rows, lo, hi, j, step, torch.float64) for j in range(0, N, step)]) - center
                rd, ri = _nearest_brute64(x64[redo], y64, k, step)
                d2k, idx = d2k.clone(), idx.clone()
                d2k[redo], idx[redo] = rd, ri
        dist = d2k.sqrt()
    return x0_64, a64, s64, dist, idx, logp


def empirical_logp(x, data, alpha, sigma, *, chunk: Optional[int] = None, backend: str = "auto") -> torch.Tensor:
    """``log p_t(x)`` (B,) float64 of the noised empirical distribution: :func:`empirical_posterior`'s ``logp``."""
    return empirical_posterior(x, data, alpha, sigma, outputs=("logp",), chunk=chunk, backend=backend).logp
