"""The empirical (memorizing) denoiser of a training set, and exact nearest neighbours in it."""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Sequence, Tuple

import torch

from fastdiff import backends
from fastdiff._interop import accepts_arrays, check_real
from fastdiff._args import OUTPUTS, _check_x, _per_sample
from fastdiff.data import ImageSet

__all__ = ["empirical_denoise", "nearest_neighbors", "empirical_posterior", "empirical_logp", "EmpiricalPosterior",
           "POSTERIOR_OUTPUTS", "Empirical"]


def _chunk(B, N, n, chunk):
    if chunk is not None:
        if chunk < 1:
            raise ValueError(f"chunk: expected a positive int, got {chunk}")
        return int(chunk)
    # keep the (B, chunk) block no larger than the inputs themselves: memory O((B + N) n)
    return int(min(N, max(1024, min(16384, (B + N) * n // max(B, 1)))))


@accepts_arrays
def empirical_denoise(x, data, alpha, sigma, *, output: str = "x0", chunk: Optional[int] = None):
    """Optimal denoiser of the empirical distribution of ``data`` (N, n) (it reproduces training points)::

        x0_hat = sum_i softmax_i( -||x - alpha y_i||^2 / (2 sigma^2) ) y_i

    Streamed over chunks of ``data`` with an online softmax (FlashAttention's recurrence): no
    (B, N) matrix is ever held, memory is O((B + N) n); each chunk is two GEMMs.  ``data`` may be
    a :class:`fastdiff.data.ImageSet` (uint8 images, flattened to n = C H W, values in [-1, 1]):
    each chunk is converted as it is read, so no float copy of the set is ever made.
    """
    x = _check_x(x)
    if output not in OUTPUTS:
        raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")
    if isinstance(data, ImageSet):
        return _empirical_streamed(x, data, alpha, sigma, output, chunk)
    if not isinstance(data, torch.Tensor) or data.ndim != 2:
        raise ValueError(f"data: expected an (N, n) tensor, got {getattr(data, 'shape', type(data).__name__)}")
    check_real("data", data)
    B, n = x.shape
    N = data.shape[0]
    if data.shape[1] != n:
        raise ValueError(f"data: expected n = {n} columns (x has shape (B, {n})), got {data.shape[1]}")
    if N < 1:
        raise ValueError("data: expected at least one training point")
    if data.device != x.device:
        raise ValueError(f"data: expected a tensor on {x.device} (the device of x), got {data.device}")
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    yc = data.to(ct)
    return _online_softmax(x, lambda j, c: yc[j:j + c], N, alpha, sigma, output, chunk)


def _empirical_streamed(x, data: "ImageSet", alpha, sigma, output, chunk):
    """``data`` held as uint8 images: each chunk converted to floats as it is read (data.float)."""
    B, n = x.shape
    if data.n != n:
        raise ValueError(f"data: expected images of n = {n} values (x has shape (B, {n})), got {data.shape}")
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    return _online_softmax(x, lambda j, c: data.float(j, j + c, dtype=ct, device=x.device, flatten=True),
                           len(data), alpha, sigma, output, chunk)


def _online_softmax(x, rows, N, alpha, sigma, output, chunk):
    """The streamed recurrence over ``rows(j, c)`` (the training points j .. j + c, compute dtype)."""
    B, n = x.shape
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc = x.to(ct)
    a = _per_sample("alpha", alpha, B, x.device).to(ct)[:, None]
    s = _per_sample("sigma", sigma, B, x.device).to(ct)[:, None]
    # logit_i = (alpha x.y_i - alpha^2 ||y_i||^2 / 2) / sigma^2  (the ||x||^2 term cancels in the softmax)
    xs = xc * (a / (s * s))
    bias = (a * a / (2 * s * s))                         # (R, 1), times ||y||^2 per column
    m = torch.full((B, 1), -math.inf, dtype=ct, device=x.device)
    l = torch.zeros(B, 1, dtype=ct, device=x.device)
    acc = torch.zeros(B, n, dtype=ct, device=x.device)
    step = _chunk(B, N, n, chunk)
    for j in range(0, N, step):
        Y = rows(j, step)
        S = backends.mm(xs, Y.T)                         # (B, c)
        S.sub_(bias * (Y * Y).sum(1))
        m_new = torch.maximum(m, S.amax(1, keepdim=True))
        scale = torch.exp(m - m_new)                     # exp(-inf) = 0 on the first chunk
        S.sub_(m_new).exp_()
        l.mul_(scale).add_(S.sum(1, keepdim=True))
        acc.mul_(scale).add_(backends.mm(S, Y))
        m = m_new
    x0 = (acc / l).to(x.dtype)
    if output == "x0":
        return x0
    eps = (x - a.to(x.dtype) * x0) / s.to(x.dtype)
    return eps if output == "eps" else -eps / s.to(x.dtype)


@accepts_arrays
def nearest_neighbors(x, data, k: int = 2, *, chunk: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Distances (B, k) and indices (B, k) of the ``k`` nearest rows of ``data`` (N, n), nearest first.

    Exact (the float64 brute force's answer, up to ties).  Candidates come from chunked GEMM
    scores ``a_i = ||y_i||^2 - 2 x.y_i`` in the compute dtype (memory O((B + N) n)) on x and data
    centred on the data mean (far from the origin the expansion cancels: at |y| ~ 1e4 with spread
    1, float32 scores cannot tell neighbours apart); the ``2k + 2`` best per row are re-ranked with
    exact float64 distances.  A row is accepted when its k-th exact score is below the worst kept
    candidate score minus the rounding bound ``E = 2 (n + 4) eps (max||y||^2 + 2 ||x|| max||y||)``
    of any score; the rows that fail that test (rare: a tie band wider than the candidate set)
    are recomputed by a float64 brute force.
    """
    x = _check_x(x)
    if not isinstance(data, torch.Tensor) or data.ndim != 2 or data.shape[1] != x.shape[1]:
        raise ValueError(f"data: expected an (N, {x.shape[1]}) tensor, got {getattr(data, 'shape', type(data).__name__)}")
    check_real("data", data)
    if data.device != x.device:
        raise ValueError(f"data: expected a tensor on {x.device} (the device of x), got {data.device}")
    N = data.shape[0]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= N:  # np.int64 is an int too
        raise ValueError(f"k: expected an int in [1, N = {N}], got {k!r}")
    k = int(k)
    B, n = x.shape
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    y64 = data.double()
    fin = torch.isfinite(y64).all(1)  # a NaN / Inf training row must not move the centre of the others
    center = y64[fin].mean(0) if bool(fin.any()) else torch.zeros(n, dtype=torch.float64, device=x.device)
    x64, y64 = x.double() - center, y64 - center   # exact re-rank coordinates
    xc, yc = x64.to(ct), y64.to(ct)
    ysq = (yc * yc).sum(1)
    best_d = torch.full((B, 0), math.inf, dtype=ct, device=x.device)
    best_i = torch.zeros(B, 0, dtype=torch.long, device=x.device)
    kc = min(N, 2 * k + 2)  # spare candidates: the GEMM scores are re-ranked exactly below
    step = _chunk(B, N, n, chunk)
    for j in range(0, N, step):
        d2 = torch.addmm(ysq[j:j + step][None, :], xc, yc[j:j + step].T, alpha=-2.0)  # ||y||^2 - 2 x.y
        v, i = torch.topk(d2, min(kc, d2.shape[1]), dim=1, largest=False)
        best_d = torch.cat([best_d, v], 1)
        best_i = torch.cat([best_i, i + j], 1)
        if best_d.shape[1] > kc:
            best_d, sel = torch.topk(best_d, kc, dim=1, largest=False)
            best_i = best_i.gather(1, sel)
    exact = ((x64[:, None, :] - y64[best_i]) ** 2).sum(-1)  # (B, kc) exact squared distances
    d2k, order = torch.topk(exact, k, dim=1, largest=False)
    idx = best_i.gather(1, order)
    if kc < N:
        # every row left out has score >= T (the worst kept one), so true score >= T - E: the
        # k-th exact one (minus ||x||^2, the term the scores drop) below that cannot be beaten
        eps = torch.finfo(ct).eps
        ymax = y64.norm(dim=1)[fin].max() if bool(fin.any()) else torch.zeros((), dtype=torch.float64, device=x.device)
        xn = x64.norm(dim=1)
        E = 2 * (n + 4) * eps * (ymax * ymax + 2 * xn * ymax)
        T = best_d.double().amax(1)
        ok = d2k[:, -1] - xn * xn < T - E
        redo = (~ok & torch.isfinite(x64).all(1)).nonzero().reshape(-1)
        if redo.numel():
            d2k, idx = d2k.clone(), idx.clone()
            rd, ri = _nearest_brute64(x64[redo], y64, k, step)
            d2k[redo], idx[redo] = rd, ri
    return d2k.sqrt().to(x.dtype), idx


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
        if isinstance(data, ImageSet):
            self.data, self.N, self.n = data, len(data), data.n
            return
        if not isinstance(data, torch.Tensor) or data.ndim != 2 or data.shape[0] < 1:
            raise ValueError(f"data: expected an (N, n) tensor or an ImageSet with N >= 1, got "
                             f"{getattr(data, 'shape', type(data).__name__)}")
        self.data = data
        self.N, self.n = data.shape

    def _on(self, device):
        return self.data if isinstance(self.data, ImageSet) else self.data.to(device)

    def __call__(self, x, alpha, sigma, **kwargs):
        return empirical_denoise(x, self._on(x.device), alpha, sigma, **kwargs)

    def nearest(self, x, k: int = 2) -> Tuple[torch.Tensor, torch.Tensor]:
        data = self.data.float(dtype=x.dtype, device=x.device, flatten=True) if isinstance(self.data, ImageSet) \
            else self.data.to(x.device)
        return nearest_neighbors(x, data, k)

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
                        chunk: Optional[int] = None) -> EmpiricalPosterior:
    """The posterior mean, score, ``log p_t(x)`` and the k nearest training points, from one read
    of the training set ``data`` (N, n) (or a uint8 :class:`~fastdiff.data.ImageSet`)::

        p_t(x)   = (1/N) sum_i N(x; alpha y_i, sigma^2 I)
        log p_t  = LSE_i( -||x - alpha y_i||^2 / (2 sigma^2) ) - log N - (n/2) log(2 pi sigma^2)
        x0_hat   = sum_i softmax_i(...) y_i,     score = (alpha x0_hat - x) / sigma^2
        neighbors: argmin_i ||x - y_i|| (the memorization ratio's d1 / d2, docs/math.md section 4)

    Every chunk of rows is one GEMM ``G = (x - c) (y - c)^T`` on coordinates centred on the data
    mean ``c`` (far from the origin the expanded squares cancel; docs/math.md 2c): the softmax
    logits are ``(2 alpha (G + (1 - alpha) c.(y - c)) - alpha^2 ||y - c||^2) / (2 sigma^2)`` (the
    identity ``x - alpha y = (x - alpha c) - alpha (y - c)``), the neighbour scores
    ``||y - c||^2 - 2 G``.  The log-sum-exp runs online (FlashAttention's recurrence) and the
    constant terms are added in float64; the neighbours' 2k + 2 best candidates are re-ranked with
    exact float64 distances.  Memory O((B + N) n + B k); never a (B, N) matrix.

    ``outputs``: any of :data:`POSTERIOR_OUTPUTS`; ``alpha, sigma`` scalars or (B,).
    """
    x = _check_x(x)
    want = tuple(outputs) if not isinstance(outputs, str) else (outputs,)
    bad = [o for o in want if o not in POSTERIOR_OUTPUTS]
    if bad or not want:
        raise ValueError(f"outputs: expected a non-empty subset of {POSTERIOR_OUTPUTS}, got {outputs!r}")
    B, n = x.shape
    if isinstance(data, ImageSet):
        if data.n != n:
            raise ValueError(f"data: expected images of n = {n} values (x has shape (B, {n})), got {data.shape}")
        N = len(data)
    else:
        if not isinstance(data, torch.Tensor) or data.ndim != 2 or data.shape[1] != n or data.shape[0] < 1:
            raise ValueError(f"data: expected an (N, {n}) tensor with N >= 1 or an ImageSet, got "
                             f"{getattr(data, 'shape', type(data).__name__)}")
        check_real("data", data)
        if data.device != x.device:
            raise ValueError(f"data: expected a tensor on {x.device} (the device of x), got {data.device}")
        N = data.shape[0]
    if "neighbors" in want and (isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= N):
        raise ValueError(f"k: expected an int in [1, N = {N}], got {k!r}")
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    dev = x.device
    if isinstance(data, ImageSet):
        def rows(j, c, dtype=ct):
            return data.float(j, j + c, dtype=dtype, device=dev, flatten=True)
    else:
        def rows(j, c, dtype=ct):
            return data[j:j + c].to(dtype)
    step = _chunk(B, N, n, chunk)
    center = torch.zeros(n, dtype=torch.float64, device=dev)
    for j in range(0, N, step):
        center += rows(j, step).sum(0, dtype=torch.float64)
    center /= N
    a64 = _per_sample("alpha", alpha, B, dev)[:, None]
    s64 = _per_sample("sigma", sigma, B, dev)[:, None]
    soft = "x0" in want or "score" in want or "logp" in want
    near = "neighbors" in want
    x64 = x.double() - center                      # x - c: the neighbours' coordinates
    xa = (x.double() - a64 * center)               # x - alpha c: the softmax's
    # one GEMM a chunk, H = (x - alpha c) (y - c)^T; the softmax logits are
    # (alpha / sigma^2) H - (alpha^2 / (2 sigma^2)) ||y - c||^2 and, as (x - c).(y - c) =
    # H - (1 - alpha) c.(y - c), the nearest rows maximise H - (1 - alpha) c.(y - c) - ||y - c||^2 / 2
    xh, cc = xa.to(ct), center.to(ct)
    g1, g2 = (a64 / (s64 * s64)).to(ct), (a64 * a64 / (2 * s64 * s64)).to(ct)
    one_minus_a = (1 - a64).to(ct)
    m = torch.full((B, 1), -math.inf, dtype=ct, device=dev)
    l = torch.zeros(B, 1, dtype=ct, device=dev)
    acc = torch.zeros(B, n, dtype=ct, device=dev) if ("x0" in want or "score" in want) else None
    kc = min(N, 2 * k + 2) if near else 0
    best_v = torch.full((B, 0), -math.inf, dtype=ct, device=dev)
    best_i = torch.zeros(B, 0, dtype=torch.long, device=dev)
    ymax2 = torch.zeros((), dtype=torch.float64, device=dev)   # max ||y - c||^2, for the certificate
    for j in range(0, N, step):
        Y = rows(j, step).sub_(cc) if isinstance(data, ImageSet) else rows(j, step) - cc   # y - c, (c, n)
        H = backends.mm(xh, Y.T)                   # (B, c)
        ysq = (Y * Y).sum(1)
        if near:
            ymax2 = torch.maximum(ymax2, ysq.double().max())
            score_nb = torch.addcmul(H - 0.5 * ysq, one_minus_a, (Y @ cc)[None, :], value=-1.0)
            v, i = torch.topk(score_nb, min(kc, score_nb.shape[1]), dim=1)
            best_v, best_i = torch.cat([best_v, v], 1), torch.cat([best_i, i + j], 1)
            if best_v.shape[1] > kc:
                best_v, sel = torch.topk(best_v, kc, dim=1)
                best_i = best_i.gather(1, sel)
        if soft:
            S = torch.addcmul(H.mul_(g1), g2, ysq[None, :], value=-1.0)
            m_new = torch.maximum(m, S.amax(1, keepdim=True))
            scale = torch.exp(m - m_new)
            S.sub_(m_new).exp_()
            l.mul_(scale).add_(S.sum(1, keepdim=True))
            if acc is not None:
                acc.mul_(scale).add_(backends.mm(S, Y))
            m = m_new
    x0 = score = logp = dist = idx = None
    if acc is not None:
        x0_64 = (acc.double() / l.double()) + center
        x0 = x0_64.to(x.dtype)
        if "score" in want:
            score = ((a64 * x0_64 - x.double()) / (s64 * s64)).to(x.dtype)
        if "x0" not in want:
            x0 = None
    if "logp" in want:
        logp = (m.double() + l.double().log() - (xa * xa).sum(1, keepdim=True) / (2 * s64 * s64)
                - math.log(N) - 0.5 * n * torch.log(2 * math.pi * s64 * s64)).reshape(B)
    if near:
        flat = best_i.reshape(-1)
        ysel = data[flat].float(dtype=torch.float64, device=dev, flatten=True) if isinstance(data, ImageSet) \
            else data[flat].double()
        exact = ((x64[:, None, :] - (ysel - center).reshape(B, -1, n)) ** 2).sum(-1)
        d2k, order = torch.topk(exact, k, dim=1, largest=False)
        idx = best_i.gather(1, order)
        if kc < N:
            # nearest_neighbors' certificate: a row left out scored >= T (the worst kept), so its
            # true score is >= T - E; a k-th exact one below that cannot be beaten, else brute force
            eps = torch.finfo(ct).eps
            xn = x64.norm(dim=1)
            # the scores are (x - alpha c).(y - c) - (1 - alpha) c.(y - c) - ||y - c||^2 / 2 in ct: bound each product
            reach = xa.norm(dim=1) + (1 - a64.reshape(-1)).abs() * center.norm()
            E = 2 * (n + 4) * eps * (ymax2 + 2 * reach * ymax2.sqrt())
            redo = (~(d2k[:, -1] - xn * xn < -2 * best_v.double().amin(1) - E) & torch.isfinite(x64).all(1)).nonzero().reshape(-1)
            if redo.numel():
                y64 = torch.cat([rows(j, step, torch.float64) for j in range(0, N, step)]) - center
                rd, ri = _nearest_brute64(x64[redo], y64, k, step)
                d2k, idx = d2k.clone(), idx.clone()
                d2k[redo], idx[redo] = rd, ri
        dist = d2k.sqrt().to(x.dtype)
    return EmpiricalPosterior(x0, score, logp, dist, idx)


def empirical_logp(x, data, alpha, sigma, *, chunk: Optional[int] = None) -> torch.Tensor:
    """``log p_t(x)`` (B,) float64 of the noised empirical distribution: :func:`empirical_posterior`'s ``logp``."""
    return empirical_posterior(x, data, alpha, sigma, outputs=("logp",), chunk=chunk).logp
