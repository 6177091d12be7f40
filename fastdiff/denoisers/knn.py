"""Nearest-neighbour importance-sampled estimates of the empirical denoiser (docs/math.md section 2g).

M. Niedoba, D. Green, S. Naderiparizi, V. Lioutas, J. W. Lavington, X. Liang, Y. Liu, K. Zhang,
S. Dabiri, A. Scibior, B. Zwartsenberg and F. Wood, *Nearest Neighbour Score Estimators for Diffusion
Generative Models*, ICML 2024 (arXiv:2402.08018), section 3.  The posterior of the noised empirical
law over the training rows is ``p(i | x) = w_i / Z``, ``w_i = exp(-||x - alpha y_i||^2 / (2 sigma^2))``,
``Z = sum_i w_i``; the k rows nearest to ``x / alpha`` carry the k largest ``w_i`` and every other row
has ``w_i <= w_(k)``.  Two estimators of ``x0_hat = sum_i p(i | x) y_i`` read only ``k + m`` rows:

- ``"stratified"``: the k neighbours summed exactly, the other ``N - k`` rows estimated from ``m``
  uniform draws among them (weight ``(N - k) / m``), self-normalised.  Exact at ``k = N``.
- ``"snis"``: the paper's estimator: ``m`` draws from its kNN proposal
  ``q_i = max(w_i, w_(k)) / Zhat`` (``w_(k)`` for every row outside the neighbour set),
  ``Zhat = sum_{i in K} w_i + (N - k) w_(k)``, self-normalised importance weights ``w_i / q_i``.

Both write ``x0_hat = sum_l softmax_l(log w_l + log c_l) y_l`` over candidate rows ``l`` with
multipliers ``c_l`` such that ``sum_l c_l w_l`` is an unbiased estimate of ``Z``
(:func:`knn_proposal` returns them).  The search is :func:`~fastdiff.denoisers.nearest_neighbors`
(exact, certified) or a FAISS index (``pip install 'fastdiff[knn]'``).
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch

from fastdiff._args import OUTPUTS, _check_x, _per_sample, _torch_generator
from fastdiff._interop import accepts_arrays
from fastdiff.denoisers.empirical import Empirical, _training_rows, nearest_neighbors
from fastdiff.ops.empirical import rows_of

__all__ = ["knn_denoise", "knn_proposal", "KNNProposal", "KNNEmpirical", "ESTIMATORS", "SEARCHES"]

ESTIMATORS = ("stratified", "snis")
SEARCHES = ("auto", "exact", "faiss")
# "auto" uses FAISS on CPU tensors from this many training rows on: at N = 50000, n = 192, B = 256,
# k = 64 its flat index searched in 0.53 s against nearest_neighbors' 1.0 s (2 shared cores)
AUTO_FAISS_ROWS = 20000
DEFAULT_K = 64              # k = None: min(DEFAULT_K, N) neighbours
GATHER_BUDGET = 1 << 23     # float64 values of gathered rows per batch chunk (64 MiB)


class KNNProposal(NamedTuple):
    """The candidate rows of one estimate and their importance multipliers."""
    indices: torch.Tensor          # (B, L) int64 training-row indices: the k neighbours first for "stratified"
    log_multipliers: torch.Tensor  # (B, L) float64 log c_l: sum_l c_l w_l is an unbiased estimate of Z
    neighbors: torch.Tensor        # (B, k) int64 the neighbour set K, nearest first


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise ImportError("search='faiss' needs FAISS: pip install 'fastdiff[knn]' (the faiss-cpu package)") from e
    return faiss


def faiss_available() -> bool:
    try:
        _faiss()
    except ImportError:
        return False
    return True


class _FaissIndex:
    """A FAISS index over the training rows, centred on their mean (the flat index scores with the
    expansion ``||q||^2 + ||y||^2 - 2 q.y`` in float32, which far from the origin cancels; docs/math.md section 2g).
    ``factory``: a faiss.index_factory string, "Flat" (exact, IndexFlatL2) or an approximate one
    ("HNSW32", "IVF256,Flat", ...); ``params``: faiss.ParameterSpace parameters ("nprobe=16")."""

    def __init__(self, Y, N, lo, hi, factory: str = "Flat", params: Optional[str] = None, step: int = 8192):
        faiss = _faiss()
        n = Y.shape[1]
        rows = lambda j: rows_of(Y, lo, hi, j, step, torch.float64)  # noqa: E731
        self.center = (sum(rows(j).sum(0) for j in range(0, N, step)) / N)
        self.index = faiss.IndexFlatL2(n) if factory == "Flat" else faiss.index_factory(n, factory)
        chunk = lambda j: (rows(j) - self.center).float().cpu().numpy()  # noqa: E731
        if not self.index.is_trained:
            # train on an evenly spaced subsample (at most 64k rows): k-means needs no more
            pick = torch.linspace(0, N - 1, min(N, 65536)).long()
            sub = rows_of(Y[pick.to(Y.device)], lo, hi, 0, pick.numel(), torch.float64) - self.center
            self.index.train(sub.float().cpu().numpy())
        for j in range(0, N, step):
            self.index.add(chunk(j))
        if params:
            faiss.ParameterSpace().set_index_parameters(self.index, params)
        self.N, self.n, self.factory = N, n, factory

    def search(self, q64: torch.Tensor, k: int) -> torch.Tensor:
        """(B, k) int64 indices of the k nearest rows to ``q64`` (B, n), nearest first."""
        _, I = self.index.search((q64 - self.center.to(q64.device)).float().cpu().numpy(), k)
        I = torch.from_numpy(I)
        if bool((I < 0).any()):
            raise RuntimeError(f"the FAISS index {self.factory!r} returned fewer than k = {k} neighbours for some "
                               "queries: search more of it (index_params, e.g. 'nprobe=...') or lower k")
        return I.to(q64.device)


def _check_int(name, v, lo, hi=None):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo or (hi is not None and v > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name}: expected an int {rng}, got {v!r}")
    return int(v)


def _check_options(k, m, estimator, N):
    """(k, m) validated for a set of N rows; k = None is min(DEFAULT_K, N)."""
    k = _check_int("k", min(DEFAULT_K, N) if k is None else k, 1, N)
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator: expected one of {ESTIMATORS}, got {estimator!r}")
    return k, _check_int("m", m, 1 if estimator == "snis" else 0)


def _check_generator(generator):
    if generator is not None and not isinstance(generator, torch.Generator) and \
            (isinstance(generator, bool) or not isinstance(generator, numbers.Integral)):
        raise TypeError(f"generator: expected None, an int seed or a CPU torch.Generator, got {type(generator).__name__}")
    g = _torch_generator(generator, "cpu")
    if g is not None and g.device.type != "cpu":
        raise ValueError(f"generator: expected a CPU torch.Generator (the draws are made on the CPU so that a "
                         f"seed gives the same rows on every device), got one on {g.device}")
    return g


def _resolve_search(search, x, N):
    if search not in SEARCHES:
        raise ValueError(f"search: expected one of {SEARCHES}, got {search!r}")
    if search == "auto":
        # FAISS scores in float32: a float64 query keeps the exact (float64-certified) search
        use = x.device.type == "cpu" and x.dtype != torch.float64 and N >= AUTO_FAISS_ROWS and faiss_available()
        return "faiss" if use else "exact"
    return search


def _log_w(x64, a64, s64, Y, lo, hi, idx):
    """``log w`` (B, L) float64 of the rows ``idx`` (B, L)."""
    out = torch.empty(idx.shape, dtype=torch.float64, device=x64.device)
    for b0, b1, _, lw in _weighted_rows(x64, a64, s64, Y, lo, hi, idx):
        out[b0:b1] = lw
    return out


def _weighted_rows(x64, a64, s64, Y, lo, hi, idx):
    """Batch chunks ``(b0, b1, rows, log w)``: the training rows ``idx[b0:b1]`` as (b, L, n) float64 and
    their ``log w = -||x - alpha y||^2 / (2 sigma^2)`` (b, L), from the difference (no expanded squares to
    cancel); at most :data:`GATHER_BUDGET` gathered values per chunk."""
    B, L = idx.shape
    n = x64.shape[1]
    step = max(1, GATHER_BUDGET // max(1, L * n))
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        flat = idx[b0:b1].reshape(-1).to(Y.device)
        rows = rows_of(Y[flat], lo, hi, 0, flat.numel(), torch.float64).to(x64.device).reshape(b1 - b0, L, n)
        a = a64 if a64.shape[0] == 1 else a64[b0:b1]
        s = s64 if s64.shape[0] == 1 else s64[b0:b1]
        yield b0, b1, rows, -((x64[b0:b1, None, :] - a[:, :, None] * rows) ** 2).sum(-1) / (2 * s * s)


def _complement_draws(neighbors, N, m, g):
    """(B, m) uniform draws (with replacement) from the rows outside each query's neighbour set:
    r ~ U{0 .. N-k-1} mapped to the r-th row of the complement, ``r + #{j : s_j - j <= r}`` for the
    sorted neighbours ``s_0 < s_1 < ...`` (``s_j - j`` counts the complement rows before ``s_j``)."""
    B, k = neighbors.shape
    r = torch.randint(N - k, (B, m), generator=g, dtype=torch.long)
    s = torch.sort(neighbors.cpu(), dim=1).values
    before = s - torch.arange(k)
    return (r + torch.searchsorted(before, r, right=True)).to(neighbors.device)


def _snis_draws(neighbors, logw_k, N, m, g):
    """(B, m) draws from the paper's proposal and their log q (B, m) float64.

    q is the mixture: with probability ``lam = N w_(k) / Zhat`` a uniform row of all N, else a
    neighbour i with probability proportional to ``w_i - w_(k)`` (what ``q_i = max(w_i, w_(k)) / Zhat``
    leaves after the uniform floor), as in the authors' code (plai-group/knn-score)."""
    B, k = neighbors.shape
    lw = logw_k.cpu()
    lw_k = lw.min(1, keepdim=True).values                          # log w_(k): the farthest neighbour
    log_zhat = torch.logsumexp(torch.cat([lw, math.log(N - k) + lw_k if N > k else lw_k - math.inf], 1), 1,
                               keepdim=True)
    lam = (math.log(N) + lw_k - log_zhat).exp().clamp(max=1.0)     # (B, 1)
    excess = (lw - log_zhat).exp() - (lw_k - log_zhat).exp()       # (B, k), sums to 1 - lam
    excess = excess.clamp(min=0.0)
    flat = excess.sum(1, keepdim=True) <= 0                        # every neighbour as likely: lam = 1
    excess = torch.where(flat, torch.ones_like(excess), excess)
    pick = torch.multinomial(excess, m, replacement=True, generator=g)         # (B, m) positions in K
    uniform = torch.rand(B, m, generator=g, dtype=torch.float64) < lam
    rows = torch.randint(N, (B, m), generator=g, dtype=torch.long)
    nb = neighbors.cpu()
    draws = torch.where(uniform, rows, nb.gather(1, pick))
    # log q of each draw: a uniform draw may land in K, where q_i = w_i / Zhat
    s, order = torch.sort(nb, dim=1)
    pos = torch.searchsorted(s, draws).clamp(max=k - 1)
    in_k = s.gather(1, pos) == draws
    lw_draw = lw.gather(1, order.gather(1, pos))
    log_q = torch.where(in_k, lw_draw, lw_k.expand(B, m)) - log_zhat
    return draws.to(neighbors.device), log_q.to(neighbors.device)


@accepts_arrays
def knn_proposal(x, data, alpha, sigma, *, k: Optional[int] = None, m: int = 16, estimator: str = "stratified",
                 search: str = "exact", index: str = "Flat", index_params: Optional[str] = None, generator=None,
                 _faiss_index: Optional[_FaissIndex] = None, _rows=None) -> KNNProposal:
    """The candidate rows and log multipliers (B, L) of :func:`knn_denoise` (same arguments)::

        "stratified": rows K (the k nearest to x / alpha), c = 1, then m uniform draws
                      from the other N - k rows, c = (N - k) / m           (L = k + m; L = N at k = N)
        "snis":       m draws i_l ~ q, c_l = 1 / (m q_{i_l}),  q_i = max(w_i, w_(k)) / Zhat   (L = m)
    """
    x = _check_x(x)
    B, n = x.shape
    Y, N, lo, hi = _rows if _rows is not None else _training_rows(x, data)
    k, m = _check_options(k, m, estimator, N)
    if not isinstance(index, str) or not index:
        raise ValueError(f"index: expected a faiss.index_factory string such as 'Flat' or 'HNSW32', got {index!r}")
    g = _check_generator(generator)
    search = _resolve_search(search, x, N)
    a64 = _per_sample("alpha", alpha, B, x.device)[:, None]
    s64 = _per_sample("sigma", sigma, B, x.device)[:, None]
    x64 = x.double()
    if search == "exact":
        ct = torch.float64 if x.dtype == torch.float64 else torch.float32
        neighbors = nearest_neighbors((x64 / a64).to(ct), data, k)[1]
    else:
        fi = _faiss_index if _faiss_index is not None else _FaissIndex(Y, N, lo, hi, index, index_params)
        neighbors = fi.search(x64 / a64, k)
    if estimator == "stratified":
        zeros = torch.zeros(B, k, dtype=torch.float64, device=x.device)
        if k == N or m == 0:
            return KNNProposal(neighbors, zeros, neighbors)
        tail = _complement_draws(neighbors, N, m, g)
        logc = torch.full((B, m), math.log((N - k) / m), dtype=torch.float64, device=x.device)
        return KNNProposal(torch.cat([neighbors, tail], 1), torch.cat([zeros, logc], 1), neighbors)
    draws, log_q = _snis_draws(neighbors, _log_w(x64, a64, s64, Y, lo, hi, neighbors), N, m, g)
    return KNNProposal(draws, -math.log(m) - log_q, neighbors)


@accepts_arrays
def knn_denoise(x, data, alpha, sigma, *, k: Optional[int] = None, m: int = 16, estimator: str = "stratified",
                search: str = "exact", index: str = "Flat", index_params: Optional[str] = None, generator=None,
                output: str = "x0", _faiss_index: Optional[_FaissIndex] = None):
    """Estimate of the empirical denoiser of ``data`` (N, n) (or a uint8 :class:`~fastdiff.data.ImageSet`)
    from its k nearest rows and m random ones (Niedoba et al., ICML 2024, section 3)::

        w_i    = exp( -||x - alpha y_i||^2 / (2 sigma^2) )
        x0_hat = sum_l c_l w_l y_l / sum_l c_l w_l       over the candidate rows l of :func:`knn_proposal`

    ``k``: neighbours (None: min(64, N)); ``m``: random rows.  ``estimator``: "stratified" (default;
    the neighbours exactly, the rest from ``m`` uniform draws; ``k = N`` is the exact empirical
    denoiser, ``m = 0`` drops the tail) or "snis" (the paper's ``m`` draws from its kNN proposal).
    ``search``: "exact" (:func:`nearest_neighbors`, certified), "faiss" (an ``index`` built by
    faiss.index_factory on the centred rows: "Flat" = IndexFlatL2, exact up to float32 rounding;
    "HNSW32", "IVF256,Flat", ... approximate, tuned by ``index_params``) or "auto" (FAISS for CPU,
    non-float64 ``x`` when installed and N >= :data:`AUTO_FAISS_ROWS`).  ``generator``: None (torch's
    global CPU generator), an int seed or a CPU ``torch.Generator``: the draws are made on the CPU,
    so a seed gives the same rows on every device.  ``output``: "x0", "eps" = (x - alpha x0) / sigma or
    "score" = -eps / sigma.  Cost: the search, then O(B (k + m) n) float64 work; never a (B, N) matrix.
    """
    x = _check_x(x)
    if output not in OUTPUTS:
        raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")
    rows = _training_rows(x, data)
    prop = knn_proposal(x, data, alpha, sigma, k=k, m=m, estimator=estimator, search=search, index=index,
                        index_params=index_params, generator=generator, _faiss_index=_faiss_index, _rows=rows)
    Y, N, lo, hi = rows
    B = x.shape[0]
    a64 = _per_sample("alpha", alpha, B, x.device)[:, None]
    s64 = _per_sample("sigma", sigma, B, x.device)[:, None]
    x64 = x.double()
    x0 = torch.empty_like(x64)
    for b0, b1, ysel, lw in _weighted_rows(x64, a64, s64, Y, lo, hi, prop.indices):
        x0[b0:b1] = torch.einsum("bl,bln->bn", torch.softmax(lw + prop.log_multipliers[b0:b1], 1), ysel)
    if output == "x0":
        return x0.to(x.dtype)
    eps = (x64 - a64 * x0) / s64
    return (eps if output == "eps" else -eps / s64).to(x.dtype)


class KNNEmpirical(Empirical):
    """The empirical distribution of a training set, denoised by :func:`knn_denoise` (a callable
    ``den(x, alpha, sigma, output=...)`` for :func:`fastdiff.sample`).

    ``seed``: the draws of every call come from one CPU generator seeded once here (None: torch's
    global generator), so a sampling run is reproducible and successive steps draw fresh rows.
    A FAISS index is built on the first call that searches with it and kept (one per device)."""

    def __init__(self, data, *, k: Optional[int] = None, m: int = 16, estimator: str = "stratified", search: str = "exact",
                 index: str = "Flat", index_params: Optional[str] = None, seed=None):
        super().__init__(data)
        self.k, self.m = _check_options(k, m, estimator, self.N)
        if search not in SEARCHES:
            raise ValueError(f"search: expected one of {SEARCHES}, got {search!r}")
        if search == "faiss":
            _faiss()                                   # the ImportError now, not at the first step
        self.estimator, self.search, self.index, self.index_params = estimator, search, index, index_params
        self.generator = _check_generator(seed)
        self._faiss = None

    def _index(self, x, data):
        if _resolve_search(self.search, x, self.N) != "faiss":
            return None
        if self._faiss is None or self._faiss[0] != x.device:
            self._faiss = (x.device, _FaissIndex(*_training_rows(x, data), self.index, self.index_params))
        return self._faiss[1]

    def __call__(self, x, alpha, sigma, *, output: str = "x0"):
        x = _check_x(x)
        data = self._on(x.device)
        fi = self._index(x, data)
        return knn_denoise(x, data, alpha, sigma, k=self.k, m=self.m, estimator=self.estimator,
                           search="faiss" if fi is not None else "exact", generator=self.generator,
                           output=output, _faiss_index=fi)

    def __repr__(self) -> str:
        return f"KNNEmpirical(N={self.N}, n={self.n}, k={self.k}, m={self.m}, estimator={self.estimator!r})"
