"""Denoiser objects holding their parameters: ``den(x, alpha, sigma) -> x0_hat`` (B, n).

Each wraps one function of :mod:`fastdiff.denoise`; samplers can call any of them (or any other
callable with that signature).  ``MoLRG.sample`` and ``Gaussian.sample`` draw data from the model.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from fastdiff.denoise import (_check_finite, empirical_denoise, gaussian_denoise, molrg_denoise, nearest_neighbors,
                              pack_bases, psd_eigenvalues)

__all__ = ["MoLRG", "Gaussian", "Empirical"]


def _torch_generator(generator, device) -> Optional[torch.Generator]:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    return torch.Generator(device=device).manual_seed(int(generator))


class MoLRG:
    """Mixture of low-rank Gaussians (SPEC 2): component k (probability ``pi_k``) is
    ``x_0 = U_k a + delta g``, ``a ~ N(0, tau_k^2 I_{d_k})``, ``g ~ N(0, I_n)``.

    ``bases``: (K, n, d) tensor or list of (n, d_k) orthonormal tensors.  ``mode``: the
    denoiser's weights, "soft" (posterior softmax) or "hard" (argmax), used by every call.
    """

    def __init__(self, bases, pi=None, tau=None, delta: float = 0.0, *, mode: str = "soft",
                 check_orthonormal: bool = True):
        if mode not in ("soft", "hard"):
            raise ValueError(f"mode: expected 'soft' or 'hard', got {mode!r}")
        self.mode = mode
        self.ucat, self.dims = pack_bases(bases, check_orthonormal=check_orthonormal)
        self.bases = list(torch.split(self.ucat, self.dims, dim=1))
        self.K, self.n = len(self.dims), self.ucat.shape[0]
        self.pi = (torch.full((self.K,), 1.0 / self.K, dtype=torch.float64) if pi is None
                   else torch.as_tensor(pi, dtype=torch.float64).reshape(-1))
        self.tau = (torch.ones(self.K, dtype=torch.float64) if tau is None
                    else torch.as_tensor(tau, dtype=torch.float64).reshape(-1).expand(self.K).clone())
        self.delta = float(delta)
        # validate pi/tau/delta once, with the same messages as the kernel call
        molrg_denoise(torch.zeros(1, self.n, dtype=self.ucat.dtype, device=self.ucat.device), self.bases, 1.0, 1.0,
                      pi=self.pi, tau=self.tau, delta=self.delta, backend="torch")

    def __call__(self, x, alpha, sigma, **kwargs):
        kwargs.setdefault("mode", self.mode)
        return molrg_denoise(x, self.bases, alpha, sigma, pi=self.pi, tau=self.tau, delta=self.delta, **kwargs)

    def sample(self, N: int, generator=None, *, return_labels: bool = False):
        """``N`` draws of x_0 (N, n) (and their components (N,) with ``return_labels``)."""
        if isinstance(N, bool) or not isinstance(N, int) or N < 0:
            raise ValueError(f"N: expected a non-negative int, got {N!r}")
        dev, dt = self.ucat.device, self.ucat.dtype
        gen = _torch_generator(generator, "cpu")
        labels = torch.multinomial(self.pi, N, replacement=True, generator=gen) if N else torch.zeros(0, dtype=torch.long)
        x = torch.zeros(N, self.n, dtype=torch.float64)
        for k, U in enumerate(self.bases):
            idx = (labels == k).nonzero().reshape(-1)
            if idx.numel():
                a = torch.randn(idx.numel(), self.dims[k], generator=gen, dtype=torch.float64) * self.tau[k]
                x[idx] = a @ U.double().cpu().T
        if self.delta:
            x += self.delta * torch.randn(N, self.n, generator=gen, dtype=torch.float64)
        x = x.to(dt).to(dev)
        return (x, labels.to(dev)) if return_labels else x

    def __repr__(self) -> str:
        return f"MoLRG(n={self.n}, K={self.K}, dims={self.dims}, delta={self.delta}, mode={self.mode!r})"


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


class Empirical:
    """The empirical distribution of a training set (N, n): its optimal denoiser memorizes."""

    def __init__(self, data):
        if not isinstance(data, torch.Tensor) or data.ndim != 2 or data.shape[0] < 1:
            raise ValueError(f"data: expected an (N, n) tensor with N >= 1, got {getattr(data, 'shape', type(data).__name__)}")
        self.data = data
        self.N, self.n = data.shape

    def __call__(self, x, alpha, sigma, **kwargs):
        return empirical_denoise(x, self.data.to(x.device), alpha, sigma, **kwargs)

    def nearest(self, x, k: int = 2) -> Tuple[torch.Tensor, torch.Tensor]:
        return nearest_neighbors(x, self.data.to(x.device), k)

    def __repr__(self) -> str:
        return f"Empirical(N={self.N}, n={self.n})"
