"""Discrete data ``x in {-1, 1}^d`` under binary-flip noise (seed 003, "Extension to discrete data";
docs/math.md section 7): the exact smoothed law ``q(y)``, its score and the posterior mean.

The noise: ``y = x o eps``, ``P(eps_i = +-1) = sigmoid(+-2 alpha)``, so ``p(y | x) = exp(alpha x.y) /
(2 cosh alpha)^d`` and, for any ``y in R^d`` (q is defined beyond the cube, which the two-stage
sampler needs)::

    q(y)         = (2 cosh alpha)^-d  sum_x p(x) exp(alpha x.y)
    E[x | y]     = sum_x x p(x) exp(alpha x.y) / sum_x p(x) exp(alpha x.y)
    s(y)         = grad log q(y) = alpha E[x | y]          the optimal denoiser: sign(E[x | y])

Two models, each with ``log_q``, ``posterior_mean``, ``score``, ``denoise`` (sign), ``sample`` and
(small d) ``pmf``:

- :class:`BinaryMixture`: ``p(x) = sum_k pi_k prod_i (1 + mu_ki x_i) / 2``, a mixture of product
  laws with means ``mu_k in [-1, 1]^d``.  Each component's smoothed law is again a product, so
  ``log q`` and ``E[x | y]`` are sums over the ``K`` components (streamed over chunks of them):
  ``L_ki(y) = log((1 + mu_ki)/2 e^{alpha y_i} + (1 - mu_ki)/2 e^{-alpha y_i})``,
  ``w_k = softmax_k(log pi_k + sum_i L_ki)``, ``E_k[x_i | y] = tanh(atanh(mu_ki) + alpha y_i)``.
- :class:`BinaryEmpirical`: the empirical law of ``N`` binary vectors: ``w_n = softmax_n(alpha
  x_n.y)``, ``E[x | y] = sum_n w_n x_n``; streamed over chunks of the data with an online softmax,
  as :func:`fastdiff.denoisers.empirical_denoise` (never a ``(B, N)`` matrix beyond a chunk).

Shapes: ``y`` (B, d) float (float64 computes in float64, else float32); outputs (B,) or (B, d) in
``y``'s dtype.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from fastdiff import backends
from fastdiff._args import _check_x, check_binary, check_positive

__all__ = ["BinaryMixture", "BinaryEmpirical", "log_norm"]

MAX_PMF_DIM = 20  # pmf(): 2^d states


def log_norm(alpha: float, d: int) -> float:
    """``d log(2 cosh alpha)``, the log normaliser of ``p(y | x)`` (stable for large alpha)."""
    return d * (alpha + math.log1p(math.exp(-2.0 * alpha)))


def _y(y, d: int) -> torch.Tensor:
    y = _check_x(y)
    if y.shape[1] != d:
        raise ValueError(f"y: expected shape (B, {d}) (the model's dimension d = {d}), got {tuple(y.shape)}")
    return y


def _ct(y):
    return torch.float64 if y.dtype == torch.float64 else torch.float32


def _chunk(B, c, per, budget=1 << 22):
    """Rows of a chunk so that ``B * rows * per`` stays under ``budget`` elements (at least 1)."""
    return max(1, min(c, budget // max(B * per, 1)))


def _states(d: int, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """All ``2^d`` points of ``{-1, 1}^d`` (2^d, d), state ``j``'s coordinate ``i`` = bit ``i`` of ``j``."""
    j = torch.arange(1 << d, device=device)
    bits = (j[:, None] >> torch.arange(d, device=device)) & 1
    return (2 * bits - 1).to(dtype)


class _Binary:
    """Shared API; a subclass provides ``_posterior(y, alpha, want_mean) -> (log Z (B,), E[x|y] or None)``
    with ``log Z = log sum_x p(x) exp(alpha x.y)``."""

    d: int

    def _alpha(self, alpha) -> float:
        return check_positive("alpha", alpha)

    def log_q(self, y, alpha) -> torch.Tensor:
        """``log q(y)`` (B,): the law of ``y = x o eps`` on the cube, its smooth extension off it."""
        a = self._alpha(alpha)
        y = _y(y, self.d)
        lz, _ = self._posterior(y, a, False)
        return (lz - log_norm(a, self.d)).to(y.dtype)

    def posterior_mean(self, y, alpha) -> torch.Tensor:
        """``E[x | y]`` (B, d), entries in [-1, 1]."""
        a = self._alpha(alpha)
        y = _y(y, self.d)
        return self._posterior(y, a, True)[1].to(y.dtype)

    __call__ = posterior_mean

    def score(self, y, alpha) -> torch.Tensor:
        """``s(y) = grad log q(y) = alpha E[x | y]`` (B, d)."""
        a = self._alpha(alpha)
        y = _y(y, self.d)
        return (a * self._posterior(y, a, True)[1]).to(y.dtype).contiguous()

    def log_q_and_score(self, y, alpha) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(log q(y), s(y))`` from one pass (the Metropolis-adjusted samplers need both)."""
        a = self._alpha(alpha)
        y = _y(y, self.d)
        lz, m = self._posterior(y, a, True)
        return (lz - log_norm(a, self.d)).to(y.dtype), (a * m).to(y.dtype).contiguous()

    def denoise(self, y, alpha) -> torch.Tensor:
        """The optimal denoiser ``sign(E[x | y])`` (B, d) in {-1, +1} (a tie ``E = 0`` gives +1)."""
        m = self.posterior_mean(y, alpha)
        return torch.where(m >= 0, 1.0, -1.0).to(m.dtype)

    def pmf(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(states (2^d, d), p(x) (2^d,))`` in float64, by enumeration (``d <= 20``)."""
        if self.d > MAX_PMF_DIM:
            raise ValueError(f"d: pmf() enumerates 2^d states, expected d <= {MAX_PMF_DIM}, got {self.d}")
        X = _states(self.d)
        return X, self._prior(X)


class BinaryMixture(_Binary):
    """``p(x) = sum_k weights_k prod_i (1 + means_ki x_i) / 2`` on ``{-1, 1}^d``.

    ``weights`` (K,) positive (normalised here), ``means`` (K, d) in [-1, 1] (a coordinate with
    ``mu = +-1`` is deterministic; ``K = N`` components with binary means is the empirical law,
    for which :class:`BinaryEmpirical` is the faster form)."""

    def __init__(self, weights, means):
        if not isinstance(means, torch.Tensor) or means.ndim != 2 or means.shape[0] < 1 or means.shape[1] < 1:
            raise ValueError(f"means: expected a (K, d) tensor, got {getattr(means, 'shape', type(means).__name__)}")
        m64 = means.detach().double()
        if not bool(torch.isfinite(m64).all()) or bool((m64.abs() > 1).any()):
            raise ValueError("means: expected entries in [-1, 1] (component means of x in {-1, 1}^d)")
        w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if w.numel() != means.shape[0]:
            raise ValueError(f"weights: expected {means.shape[0]} weights (one per row of means), got {w.numel()}")
        if not bool(torch.isfinite(w).all()) or not bool((w > 0).all()):
            raise ValueError("weights: expected positive finite weights")
        self.weights = (w / w.sum()).to(means.device)
        self.means = m64.to(means.device)
        self.K, self.d = means.shape

    def _prior(self, X):
        f = (1 + self.means[None] * X[:, None, :]) / 2               # (S, K, d)
        return (self.weights * f.prod(-1)).sum(-1)

    def _posterior(self, y, a, want_mean):
        ct = _ct(y)
        yc = y.to(ct)
        B = y.shape[0]
        with torch.no_grad():
            lp = torch.log1p(self.means.to(y.device)).sub(math.log(2)).to(ct)  # log((1 + mu)/2), -inf at mu = -1
            lm = torch.log1p(-self.means.to(y.device)).sub(math.log(2)).to(ct)
            lw = torch.log(self.weights.to(y.device)).to(ct)
        th = (lp - lm) / 2                                             # atanh(mu), +-inf at mu = +-1
        ay = a * yc
        m = torch.full((B,), -math.inf, dtype=ct, device=y.device)
        l = torch.zeros(B, dtype=ct, device=y.device)
        acc = torch.zeros(B, self.d, dtype=ct, device=y.device) if want_mean else None
        step = _chunk(B, self.K, self.d)
        for j in range(0, self.K, step):
            L = torch.logaddexp(lp[None, j:j + step] + ay[:, None], lm[None, j:j + step] - ay[:, None])  # (B, c, d)
            S = lw[j:j + step] + L.sum(-1)                             # (B, c) log w_k + log Z_k
            m_new = torch.maximum(m, S.amax(1))
            scale = torch.exp(m - m_new)
            P = torch.exp(S - m_new[:, None])
            l = l * scale + P.sum(1)
            if want_mean:
                Ek = torch.tanh(th[None, j:j + step] + ay[:, None])    # (B, c, d)
                acc = acc * scale[:, None] + torch.einsum("bc,bcd->bd", P, Ek)
            m = m_new
        return m + torch.log(l), (acc / l[:, None] if want_mean else None)

    def sample(self, B: int, *, generator=None) -> torch.Tensor:
        """``B`` draws of ``x ~ p`` (B, d) float32, from a ``torch.Generator`` (or int seed)."""
        from fastdiff._args import _torch_generator

        g = _torch_generator(generator, "cpu")
        k = torch.multinomial(self.weights.cpu(), int(B), replacement=True, generator=g)
        u = torch.rand(int(B), self.d, generator=g, dtype=torch.float64)
        x = torch.where(u < (1 + self.means.cpu()[k]) / 2, 1.0, -1.0)
        return x.float().to(self.means.device)

    def __repr__(self) -> str:
        return f"BinaryMixture(K={self.K}, d={self.d})"


class BinaryEmpirical(_Binary):
    """The empirical law of ``data`` (N, d), entries in {-1, +1}: ``p = (1/N) sum_n delta_{x_n}``.

    ``chunk``: data rows per streamed block (default: a ``(B, chunk)`` block no larger than ~4M
    elements)."""

    def __init__(self, data, *, chunk: Optional[int] = None):
        if not isinstance(data, torch.Tensor) or data.ndim != 2 or data.shape[0] < 1 or data.shape[1] < 1:
            raise ValueError(f"data: expected an (N, d) tensor with N >= 1, got {getattr(data, 'shape', type(data).__name__)}")
        check_binary("data", data)
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"chunk: expected a positive int, got {chunk!r}")
        self.data = data
        self.N, self.d = data.shape
        self.chunk = chunk

    def _prior(self, X):
        code = ((self.data.cpu().double() > 0).long() << torch.arange(self.d)).sum(1)
        return torch.bincount(code, minlength=1 << self.d).double() / self.N

    def _posterior(self, y, a, want_mean):
        ct = _ct(y)
        B = y.shape[0]
        ya = y.to(ct) * a
        X = self.data.to(device=y.device, dtype=ct)
        m = torch.full((B, 1), -math.inf, dtype=ct, device=y.device)
        l = torch.zeros(B, 1, dtype=ct, device=y.device)
        acc = torch.zeros(B, self.d, dtype=ct, device=y.device) if want_mean else None
        step = self.chunk or _chunk(B, self.N, 1)
        for j in range(0, self.N, step):
            Xc = X[j:j + step]
            S = backends.mm(ya, Xc.T)                                  # (B, c) alpha x_n.y
            m_new = torch.maximum(m, S.amax(1, keepdim=True))
            scale = torch.exp(m - m_new)
            if torch.is_grad_enabled() and y.requires_grad:  # log_q differentiable (out of place)
                S = torch.exp(S - m_new)
                l = l * scale + S.sum(1, keepdim=True)
                acc = acc * scale + S @ Xc if want_mean else None
            else:
                S.sub_(m_new).exp_()
                l.mul_(scale).add_(S.sum(1, keepdim=True))
                if want_mean:
                    acc.mul_(scale).add_(backends.mm(S, Xc))
            m = m_new
        lz = (m + torch.log(l)).reshape(-1) - math.log(self.N)
        return lz, (acc / l if want_mean else None)

    def sample(self, B: int, *, generator=None) -> torch.Tensor:
        """``B`` rows of ``data`` drawn uniformly with replacement (B, d)."""
        from fastdiff._args import _torch_generator

        g = _torch_generator(generator, "cpu")
        return self.data[torch.randint(self.N, (int(B),), generator=g).to(self.data.device)]

    def __repr__(self) -> str:
        return f"BinaryEmpirical(N={self.N}, d={self.d})"
