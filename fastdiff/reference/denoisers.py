"""Reference analytic denoisers (SPEC 2), written from the formulas, in the inputs' dtype.

- MoLRG: ``x0_hat = a_perp x + sum_k w_k (a_k - a_perp) U_k U_k^T x``, ``w = softmax_k(b_k + g_k ||U_k^T x||^2)``
  (seed 002 Lemma 1 / eq. 9, with mixing weights pi, scales tau and an isotropic floor delta).
- Gaussian ``N(mu, Sigma)``: ``x0_hat = mu + alpha Sigma (alpha^2 Sigma + sigma^2 I)^{-1} (x - alpha mu)``.
- Empirical (training set y_1..y_N): ``x0_hat = sum_i softmax_i(-||x - alpha y_i||^2 / (2 sigma^2)) y_i``.
"""
from __future__ import annotations

import math

import torch


def _col(v, x):
    """A scalar or (B,) value as a (B, 1) / scalar tensor in x's dtype."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    return v.reshape(-1, 1) if v.ndim == 1 else v


def molrg_denoise(x, bases, alpha, sigma, *, pi=None, tau=None, delta=0.0, mode="soft", labels=None,
                  guidance=None, output="x0", return_weights=False):
    """x: (B, n); bases: list of (n, d_k) orthonormal bases; alpha, sigma scalars or (B,)."""
    K = len(bases)
    a, s = _col(alpha, x), _col(sigma, x)
    pi = torch.full((K,), 1.0 / K, dtype=x.dtype) if pi is None else torch.as_tensor(pi, dtype=x.dtype)
    tau = torch.ones(K, dtype=x.dtype) if tau is None else torch.as_tensor(tau, dtype=x.dtype).expand(K)
    delta = float(delta)
    v_perp = a**2 * delta**2 + s**2
    logits, proj, a_k = [], [], []
    for k, U in enumerate(bases):
        U = U.to(x.dtype)
        d = U.shape[1]
        v_k = a**2 * (tau[k] ** 2 + delta**2) + s**2
        g = (1 / v_perp - 1 / v_k) / 2
        b = math.log(pi[k]) - (d / 2) * torch.log(v_k / v_perp)
        c = x @ U                                   # (B, d)
        logits.append((b + g * (c**2).sum(1, keepdim=True)).reshape(-1))
        proj.append(c @ U.T)                        # P_k x
        a_k.append(a * (tau[k] ** 2 + delta**2) / v_k)
    logits = torch.stack(logits, 1)                 # (B, K)
    if mode == "soft":
        w = torch.softmax(logits, 1)
    else:
        w = torch.nn.functional.one_hot(logits.argmax(1), K).to(x.dtype)
    a_perp = a * delta**2 / v_perp
    x0 = a_perp * x + sum(w[:, k:k + 1] * (a_k[k] - a_perp) * proj[k] for k in range(K))
    if labels is not None:  # seed 004 eq. 7.4.20
        gw = _col(guidance, x)
        idx = torch.as_tensor(labels).long()
        cond = a_perp * x + torch.stack([(a_k[int(y)] - a_perp).reshape(-1)[i if a_k[int(y)].numel() > 1 else 0] * proj[int(y)][i]
                                         for i, y in enumerate(idx.tolist())])
        x0 = (1 - gw) * x0 + gw * cond
    if output == "x0":
        out = x0
    elif output == "eps":
        out = (x - a * x0) / s
    else:  # score
        out = (a * x0 - x) / s**2
    return (out, w) if return_weights else out


def gaussian_denoise(x, mean, cov, alpha, sigma):
    """Posterior mean for N(mean, cov) data: mean + alpha cov (alpha^2 cov + sigma^2 I)^-1 (x - alpha mean)."""
    n = x.shape[1]
    a, s = _col(alpha, x), _col(sigma, x)
    mean = torch.as_tensor(mean, dtype=x.dtype)
    cov = torch.as_tensor(cov, dtype=x.dtype)
    outs = []
    for i in range(x.shape[0]):
        ai = a.reshape(-1)[i if a.numel() > 1 else 0]
        si = s.reshape(-1)[i if s.numel() > 1 else 0]
        M = ai * cov @ torch.linalg.inv(ai**2 * cov + si**2 * torch.eye(n, dtype=x.dtype))
        outs.append(mean + M @ (x[i] - ai * mean))
    return torch.stack(outs)


def empirical_denoise(x, data, alpha, sigma):
    """The optimal denoiser of the empirical distribution of ``data`` (N, n) (it memorizes)."""
    a, s = _col(alpha, x), _col(sigma, x)
    d2 = ((x[:, None, :] - a[..., None] * data[None]) ** 2).sum(-1)   # (B, N)
    w = torch.softmax(-d2 / (2 * s**2), 1)
    return w @ data


def nearest_neighbors(x, data, k=2):
    """Distances (B, k) and indices (B, k) of the k nearest rows of ``data``, nearest first."""
    d = torch.cdist(x, data)
    vals, idx = torch.topk(d, k, dim=1, largest=False)
    return vals, idx


def _window(img, i, j, P, boundary):
    """The P x P patch of img (C, H, W) centred at pixel (i, j), by explicit indexing: zeros outside
    the image, or the image wrapped around."""
    C, H, W = img.shape
    r = P // 2
    out = torch.zeros(C, P, P, dtype=img.dtype)
    for di in range(P):
        for dj in range(P):
            u, v = i + di - r, j + dj - r
            if boundary == "circular":
                out[:, di, dj] = img[:, u % H, v % W]
            elif 0 <= u < H and 0 <= v < W:
                out[:, di, dj] = img[:, u, v]
    return out.reshape(-1)


def _inside(H, W, u, v, P):
    """The P x P window at (u, v) as a boolean mask of which cells lie inside the image."""
    r = P // 2
    return tuple((0 <= u + di - r < H) and (0 <= v + dj - r < W) for di in range(P) for dj in range(P))


def patch_denoise(x, data, alpha, sigma, *, patch, mode="local", boundary="zero"):
    """Local / equivariant local empirical denoiser of images x (B, C, H, W) over data (N, C, H, W),
    pixel by pixel from the formula (fastdiff/denoisers/patch.py's docstring); alpha, sigma scalars.
    ``boundary="broken"``: zero windows, and a window sees the training windows whose in-image mask
    is its own (Kamb & Ganguli's boundary-broken ELS machine, Sec. 3.4)."""
    B, C, H, W = x.shape
    N = data.shape[0]
    out = torch.zeros_like(x)
    keys = {}
    for i in range(N):
        for u in range(H):
            for v in range(W):
                keys[i, u, v] = _window(data[i], u, v, patch, boundary)
    for b in range(B):
        for u in range(H):
            for v in range(W):
                q = _window(x[b], u, v, patch, boundary)
                if mode == "local":
                    where = [(i, u, v) for i in range(N)]
                elif boundary == "broken":
                    mask = _inside(H, W, u, v, patch)
                    where = [k for k in keys if _inside(H, W, k[1], k[2], patch) == mask]
                else:
                    where = list(keys)
                logits = torch.stack([-((q - alpha * keys[k]) ** 2).sum() / (2 * sigma**2) for k in where])
                w = torch.softmax(logits, 0)
                vals = torch.stack([data[i, :, uu, vv] for i, uu, vv in where])   # (K, C)
                out[b, :, u, v] = w @ vals
    return out


def pspc_denoise(x, data, alpha, sigma, *, patch):
    """Niedoba et al.'s PSPC-Square composite of images x (B, C, H, W) over data (N, C, H, W), from the
    formula crop by crop: each P x P crop inside the image gets the posterior mean of the whole crop
    over that crop of every training image; each pixel averages the crops that hold it."""
    B, C, H, W = x.shape
    P = patch
    total = torch.zeros_like(x)
    count = torch.zeros(H, W, dtype=x.dtype)
    for u in range(H - P + 1):
        for v in range(W - P + 1):
            crops = data[:, :, u:u + P, v:v + P]                            # (N, C, P, P)
            for b in range(B):
                q = x[b, :, u:u + P, v:v + P]
                logits = torch.stack([-((q - alpha * c) ** 2).sum() / (2 * sigma**2) for c in crops])
                w = torch.softmax(logits, 0)
                total[b, :, u:u + P, v:v + P] += (w[:, None, None, None] * crops).sum(0)
            count[u:u + P, v:v + P] += 1
    return total / count
