"""Reference Jacobian-rank linear algebra (SPEC 3), written plainly, in the inputs' dtype (tests pass float64).

- ``svdvals_rank``: ``torch.linalg.svdvals`` (LAPACK) and ``rank_eta = min { r : sum_{i<=r} s_i^2 > eta^2 sum s_i^2 }``
  (clamped to min(m, n); 0 for a zero matrix).
- ``jacobian``: the dense per-sample Jacobian by autograd, one backward pass per output coordinate.
- ``molrg_jacobian``: SPEC 3's closed form, term by term, one sample at a time::

      J = a_perp I + sum_k w_k (a_k - a_perp) P_k + sum_k w_k 2 g_k m_k (P_k x)^T - mbar (sum_k w_k 2 g_k P_k x)^T
      m_k = (a_k - a_perp) P_k x,  mbar = sum_k w_k m_k
"""
from __future__ import annotations

import math

import torch


def energy_rank(S: torch.Tensor, eta: float) -> torch.Tensor:
    """Ranks (B,) int64 of descending singular values S (B, N)."""
    N = S.shape[-1]
    ranks = []
    for s in S.double():
        total = float((s * s).sum())
        if total == 0.0:
            ranks.append(0)
            continue
        cum, r = 0.0, N
        for i, v in enumerate(s.tolist()):
            cum += v * v
            if cum > eta * eta * total:
                r = i + 1
                break
        ranks.append(r)
    return torch.tensor(ranks, dtype=torch.int64)


def energy_ratios(S: torch.Tensor) -> torch.Tensor:
    """``sum_{i<=r} s_i^2 / sum s_i^2`` for r = 1..N, (B, N) float64 (tests use it to skip
    matrices whose ratio lies within 1e-6 of eta^2: there the rank is decided by rounding)."""
    e = S.double() ** 2
    return e.cumsum(-1) / e.sum(-1, keepdim=True)


def svdvals_rank(A: torch.Tensor, eta: float = 0.99):
    """A (B, m, n) -> (S (B, min(m, n)) descending, rank (B,))."""
    S = torch.linalg.svdvals(A)
    return S, energy_rank(S, eta)


def jacobian(fn, x: torch.Tensor, *args) -> torch.Tensor:
    """J[b, i, j] = d fn(x)[b, i] / d x[b, j] for a row-wise fn, by n_out backward passes."""
    x = x.detach().requires_grad_(True)
    y = fn(x, *args)
    rows = []
    for i in range(y.shape[1]):
        (g,) = torch.autograd.grad(y[:, i].sum(), x, retain_graph=True)
        rows.append(g)
    return torch.stack(rows, 1)


def molrg_jacobian(x, bases, alpha, sigma, *, pi=None, tau=None, delta=0.0):
    """SPEC 3's closed form (soft weights, x0 output): x (B, n), bases list of (n, d_k); (B, n, n)."""
    B, n = x.shape
    K = len(bases)
    pi = [1.0 / K] * K if pi is None else [float(p) for p in pi]
    tau = [1.0] * K if tau is None else [float(t) for t in torch.as_tensor(tau, dtype=torch.float64).reshape(-1).expand(K)]
    a_all = torch.as_tensor(alpha, dtype=x.dtype).reshape(-1).expand(B)
    s_all = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1).expand(B)
    out = []
    eye = torch.eye(n, dtype=x.dtype)
    for b in range(B):
        a, s, xb = float(a_all[b]), float(s_all[b]), x[b]
        v_perp = a * a * delta * delta + s * s
        a_perp = a * delta * delta / v_perp
        logits, g, a_k, P = [], [], [], []
        for k, U in enumerate(bases):
            U = U.to(x.dtype)
            v_k = a * a * (tau[k] ** 2 + delta * delta) + s * s
            g.append((1 / v_perp - 1 / v_k) / 2)
            a_k.append(a * (tau[k] ** 2 + delta * delta) / v_k)
            P.append(U @ U.T)
            logits.append(math.log(pi[k]) - U.shape[1] / 2 * math.log(v_k / v_perp) + g[k] * float((U.T @ xb).square().sum()))
        w = torch.softmax(torch.tensor(logits, dtype=x.dtype), 0)
        m = [(a_k[k] - a_perp) * (P[k] @ xb) for k in range(K)]
        mbar = sum(w[k] * m[k] for k in range(K))
        grad_sum = sum(w[k] * 2 * g[k] * (P[k] @ xb) for k in range(K))
        J = a_perp * eye
        for k in range(K):
            J = J + w[k] * (a_k[k] - a_perp) * P[k] + w[k] * 2 * g[k] * torch.outer(m[k], P[k] @ xb)
        J = J - torch.outer(mbar, grad_sum)
        out.append(J)
    return torch.stack(out)
