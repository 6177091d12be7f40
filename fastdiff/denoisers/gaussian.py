"""The Gaussian denoiser: posterior mean of ``N(mean, cov)`` data, linear in x."""
from __future__ import annotations

import torch

from fastdiff._interop import accepts_arrays, check_real
from fastdiff._args import OUTPUTS, _check_finite, _check_x, _per_sample, _torch_generator

__all__ = ["gaussian_denoise", "psd_eigenvalues", "Gaussian"]


def psd_eigenvalues(lam: torch.Tensor, dtype=torch.float64, name: str = "cov") -> torch.Tensor:
    """The eigenvalues of a covariance, clamped at 0, after checking it is positive semi-definite
    to rounding: a low-rank covariance formed in ``dtype`` has eigenvalues down to about
    ``-n eps lambda_max`` (float32: ~-7e-8 at unit scale), which are zeros; anything below
    ``-max(1e-10, 4 n eps) lambda_max`` is a genuinely indefinite matrix and is rejected."""
    if lam.numel() == 0:
        return lam
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float64).eps
    top = float(lam.max().clamp(min=0))
    tol = max(1e-10, 4 * lam.numel() * eps) * top
    low = float(lam.min())
    if low < -tol:
        raise ValueError(f"{name}: expected a positive semi-definite matrix, got eigenvalue {low:.3g} "
                         f"(below the rounding tolerance -{tol:.3g} = -max(1e-10, 4 n eps) lambda_max)")
    return lam.clamp(min=0)


@accepts_arrays
def gaussian_denoise(x, mean, cov=None, alpha=1.0, sigma=1.0, *, eig=None, output: str = "x0"):
    """Posterior mean for Gaussian data ``N(mean, cov)`` (seed 001, seed 004 Ex. 7.4)::

        x0_hat = mean + alpha cov (alpha^2 cov + sigma^2 I)^{-1} (x - alpha mean)

    computed in the eigenbasis ``cov = V diag(l) V^T`` (pass ``eig=(l, V)`` to reuse one):
    ``x0_hat = mean + V diag(alpha l / (alpha^2 l + sigma^2)) V^T (x - alpha mean)``.
    """
    x = _check_x(x)
    if output not in OUTPUTS:
        raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")
    B, n = x.shape
    mean = torch.as_tensor(check_real("mean", mean), device=x.device)
    _check_finite("mean", mean)
    mean = mean.to(x.dtype).reshape(-1)
    if mean.numel() != n:
        raise ValueError(f"mean: expected {n} entries (x has n = {n}), got {mean.numel()}")
    if eig is None:
        if cov is None:
            raise ValueError("cov: required unless eig=(eigenvalues, eigenvectors) is given")
        cov = torch.as_tensor(check_real("cov", cov), device=x.device)
        _check_finite("cov", cov)
        cov_dtype, cov = cov.dtype, cov.to(torch.float64)
        if cov.shape != (n, n):
            raise ValueError(f"cov: expected shape ({n}, {n}), got {tuple(cov.shape)}")
        if not torch.allclose(cov, cov.T, rtol=1e-6, atol=1e-8 * float(cov.abs().max())):
            raise ValueError("cov: expected a symmetric matrix")
        lam, V = torch.linalg.eigh(cov)
    else:
        lam, V = (torch.as_tensor(check_real(f"eig[{i}]", t), device=x.device) for i, t in enumerate(eig))
        _check_finite("eig", lam), _check_finite("eig", V)
        cov_dtype, lam, V = lam.dtype, lam.to(torch.float64), V.to(torch.float64)
    lam = psd_eigenvalues(lam, cov_dtype)
    a = _per_sample("alpha", alpha, B, x.device)[:, None]
    s = _per_sample("sigma", sigma, B, x.device)[:, None]
    gain = (a * lam / (a * a * lam + s * s)).to(x.dtype)          # (R, n)
    Vx = V.to(x.dtype)
    a_x = a.to(x.dtype)
    y = ((x - a_x * mean) @ Vx) * gain
    x0 = mean + y @ Vx.T
    if output == "x0":
        return x0
    s_x = s.to(x.dtype)
    eps = (x - a_x * x0) / s_x
    return eps if output == "eps" else -eps / s_x


class Gaussian:
    """``N(mean, cov)`` data; the posterior mean is linear (eigendecomposition computed once)."""

    def __init__(self, mean, cov):
        mean, cov = torch.as_tensor(mean), torch.as_tensor(cov)
        _check_finite("mean", mean.cpu())
        _check_finite("cov", cov.cpu())
        self.mean = mean.to(torch.float64).reshape(-1)
        self.cov = cov.to(torch.float64)
        n = self.mean.numel()
        if self.cov.shape != (n, n):
            raise ValueError(f"cov: expected shape ({n}, {n}) to match mean, got {tuple(self.cov.shape)}")
        if not torch.allclose(self.cov, self.cov.T):
            raise ValueError("cov: expected a symmetric matrix")
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(self.cov)
        # float32 low-rank covariances have eigenvalues ~ -n eps lambda_max: zeros, clamped
        self.eigenvalues = psd_eigenvalues(self.eigenvalues, cov.dtype if cov.is_floating_point() else torch.float64)
        self.n = n

    def __call__(self, x, alpha, sigma, **kwargs):
        eig = (self.eigenvalues.to(x.device), self.eigenvectors.to(x.device))
        return gaussian_denoise(x, self.mean.to(x.device), alpha=alpha, sigma=sigma, eig=eig, **kwargs)

    def sample(self, N: int, generator=None) -> torch.Tensor:
        gen = _torch_generator(generator, "cpu")
        z = torch.randn(N, self.n, generator=gen, dtype=torch.float64)
        return self.mean + (z * self.eigenvalues.clamp(min=0).sqrt()) @ self.eigenvectors.T

    def __repr__(self) -> str:
        return f"Gaussian(n={self.n})"
