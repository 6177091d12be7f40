"""Noise schedules (SPEC 0): every schedule supplies ``alpha_t, sigma_t`` of ``x_t = alpha_t x_0 + sigma_t eps``.

Tables are float64 on the CPU; :meth:`_Schedule.table` caches a copy per device so a step
never copies a schedule host -> device (a step stays CUDA-graph safe).
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, Tuple

import torch

__all__ = ["DDPMSchedule", "KarrasSchedule"]


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).nonzero()[0, 0])
        raise ValueError(f"{name}: schedule is not finite (index {bad} is {t[bad].item()})")


class _Schedule:
    _tables: Tuple[str, ...] = ()

    def __init__(self) -> None:
        self._device_cache: Dict[tuple, object] = {}

    def floats(self, name: str) -> list:
        """``getattr(self, name)`` as a list of Python floats (cached): scalar-timestep steps
        compute their coefficients from these on the host, and torch.compile sees constants."""
        key = (name, None)
        v = self._device_cache.get(key)
        if v is None:
            v = self._device_cache[key] = getattr(self, name).tolist()
        return v

    def table(self, name: str, device) -> torch.Tensor:
        """``getattr(self, name)`` as float64 on ``device``, copied once per device."""
        device = torch.device(device)
        key = (name, device)
        t = self._device_cache.get(key)
        if t is None:
            t = getattr(self, name).to(device)
            self._device_cache[key] = t
        return t


class DDPMSchedule(_Schedule):
    """Discrete variance-preserving schedule with ``T`` steps, indexed ``t = 0 .. T-1``.

    ``beta_t`` per step, ``abar_t = prod_{s<=t} (1 - beta_s)``, ``alpha_t = sqrt(abar_t)``,
    ``sigma_t = sqrt(1 - abar_t)``.  The default is seed 001's linear form
    ``beta_t = beta_min + (beta_max - beta_min) t / T`` with ``beta_min=1e-4, beta_max=1e-2,
    T=1000``; :meth:`linear`, :meth:`scaled_linear` and :meth:`cosine` give diffusers' tables.

    Attributes (float64 CPU tensors of shape (T,)): ``beta, abar, alpha, sigma``, and
    ``sigma_ve = sigma / alpha`` (the same levels in the VE form ``x/alpha = x_0 + sigma_ve eps``
    that the Euler/Heun steps use).
    """

    def __init__(self, beta_min: float = 1e-4, beta_max: float = 1e-2, T: int = 1000, *, betas=None):
        super().__init__()
        if betas is None:
            if isinstance(T, bool) or not isinstance(T, numbers.Integral) or T < 1:  # np.int64 is an int
                raise ValueError(f"T: expected a positive int, got {T!r}")
            T = int(T)
            for name, v in (("beta_min", beta_min), ("beta_max", beta_max)):
                if not math.isfinite(v) or not 0.0 < v < 1.0:
                    raise ValueError(f"{name}: expected a finite value in (0, 1), got {v!r}")
            t = torch.arange(T, dtype=torch.float64)
            betas = beta_min + (beta_max - beta_min) * t / T
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten().cpu()
        if betas.numel() < 1:
            raise ValueError("betas: expected at least one step")
        _check_finite("betas", betas)
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas: every beta_t must lie in (0, 1)")
        self.T = betas.numel()
        self.beta = betas
        self.abar = torch.cumprod(1.0 - betas, 0)
        self.alpha = self.abar.sqrt()
        self.sigma = (1.0 - self.abar).sqrt()
        self.sigma_ve = self.sigma / self.alpha

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "DDPMSchedule":
        """diffusers ``beta_schedule="linear"``: ``linspace(beta_start, beta_end, T)``."""
        return cls(betas=torch.linspace(beta_start, beta_end, T, dtype=torch.float64))

    @classmethod
    def scaled_linear(cls, T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> "DDPMSchedule":
        """diffusers ``beta_schedule="scaled_linear"`` (Stable Diffusion): ``linspace(sqrt b0, sqrt b1, T)^2``."""
        return cls(betas=torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2)

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "DDPMSchedule":
        """diffusers ``beta_schedule="squaredcos_cap_v2"`` (Nichol & Dhariwal):
        ``beta_t = min(1 - abar(t+1)/abar(t), max_beta)``, ``abar(u) = cos((u/T + s)/(1 + s) pi/2)^2``."""
        f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        return cls(betas=[min(1 - f(i + 1) / f(i), max_beta) for i in range(T)])

    def __len__(self) -> int:
        return self.T

    def __repr__(self) -> str:
        return f"DDPMSchedule(T={self.T}, beta[0]={self.beta[0].item():.3g}, beta[-1]={self.beta[-1].item():.3g})"


class KarrasSchedule(_Schedule):
    """EDM / VE noise levels (Karras et al. 2022): ``alpha = 1`` and ``n`` decreasing sigmas
    ``sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho`` followed by a final 0.

    Attributes (float64, shape (n+1,)): ``sigmas`` (= ``sigma``), ``alpha`` (ones), and the
    variance-preserving equivalents ``abar = 1 / (1 + sigma^2)`` (the signal fraction of
    ``x / sqrt(1 + sigma^2)``) and ``beta[i] = 1 - abar[i] / abar[i+1]`` (the VP noising step
    from level i+1 to level i; ``beta[n] = 0``).  Step ``i`` goes from ``sigmas[i]`` to ``sigmas[i+1]``.
    """

    def __init__(self, n: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
        super().__init__()
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:  # np.int64 is an int
            raise ValueError(f"n: expected a positive int, got {n!r}")
        n = int(n)
        for name, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("rho", rho)):
            if not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name}: expected a finite positive value, got {v!r}")
        if sigma_min > sigma_max:
            raise ValueError(f"sigma_min: expected <= sigma_max ({sigma_max}), got {sigma_min}")
        ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        s = (hi + ramp * (lo - hi)) ** rho
        self.n = n
        self.sigmas = torch.cat([s, s.new_zeros(1)])
        self.sigma = self.sigmas
        self.alpha = torch.ones_like(self.sigmas)
        self.abar = 1.0 / (1.0 + self.sigmas**2)
        self.beta = torch.cat([1.0 - self.abar[:-1] / self.abar[1:], self.abar.new_zeros(1)])

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"KarrasSchedule(n={self.n}, sigma_max={self.sigmas[0].item():.4g}, sigma_min={self.sigmas[-2].item():.4g})"
