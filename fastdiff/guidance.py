"""Conditional sampling (seed 004 Sec. 7.3-7.4): diffusion posterior sampling, the exact Gaussian
posterior, and classifier-free guidance through the MoLRG labels.

Every sampler here is seed 004's DDIM loop (Alg. 7.1) over a (conditional) denoiser ``x0_c``::

    x_{l-1} = (sigma_{l-1}/sigma_l) x_l + (alpha_{l-1} - (sigma_{l-1}/sigma_l) alpha_l) x0_c(x_l)

run by :func:`fastdiff.sampling.run` over a :func:`fastdiff.sampling.trajectory_table`:
``"ddim"`` on a :class:`fastdiff.DDPMSchedule` (``steps``, ``spacing``; ``eta`` adds DDIM's
noise), ``"euler"`` on VE levels (a :class:`fastdiff.KarrasSchedule` or a decreasing 1-D tensor
of sigmas ending at 0; with ``alpha = 1`` the DDIM update above *is* the Euler step), and
``"euler_ancestral"`` there for ``eta > 0``.  So ``cfg_sample`` and ``fastdiff.sample(...,
"ddim", labels=, guidance=)`` run the same steps.

Diffusion posterior sampling (DPS; Chung et al., seed 004 eq. 7.3.29 and Alg. 7.1) for a
measurement ``y = h(x) + s_y w`` (``h(x) = A x`` for a matrix ``A``) corrects the unconditional
posterior mean by the gradient of the measurement log-likelihood evaluated at it::

    x0_c(x_t) = x0_hat(x_t) - scale * sigma_t^2 / (2 alpha_t s_y^2) * grad_x ||h(x0_hat(x_t)) - y||^2

with the gradient taken by autograd through the denoiser (:func:`fastdiff.molrg_denoise`'s fused
backward, or :func:`fastdiff.gaussian_denoise`).  ``scale = 1`` is the book's algorithm.

For Gaussian data ``N(mu, Sigma)`` and ``h = A`` the posterior is Gaussian (seed 004 eq. 7.3.15)::

    mu_post  = mu + Sigma A^T (A Sigma A^T + s_y^2 I)^{-1} (y - A mu)
    Sig_post = Sigma - Sigma A^T (A Sigma A^T + s_y^2 I)^{-1} A Sigma

and its own posterior-mean denoiser (eq. 7.3.16) is the *exact* conditional denoiser, so running
the same loop with it (``method="exact"``) is the comparison of seed 004 Fig. 7.11.  DPS is biased
where ``sigma_t`` is not small against the data's scales: at small ``s_y`` it collapses the
posterior variance along the rows of ``A`` (Fig. 7.11, bottom row).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Union

import torch

from fastdiff._args import check_positive
from fastdiff._interop import accepts_arrays
from fastdiff.denoisers import Gaussian
from fastdiff.generator import Generator
from fastdiff.sampling import StepInfo, run, trajectory_table
from fastdiff.schedules import DDPMSchedule, KarrasSchedule
from fastdiff.steps import randn

__all__ = ["gaussian_posterior", "posterior_sample", "cfg_sample"]

METHODS = ("dps", "exact")


# =========================================================================== argument checks


def _measurement(A, y, device, dtype):
    """``(h, y)``: the forward model as a callable (B, D) -> (B, d) and y as a (1 or B, d) tensor."""
    if isinstance(A, torch.Tensor):
        if A.ndim != 2:
            raise ValueError(f"A: expected a (d, D) matrix (or a callable forward model), got shape {tuple(A.shape)}")
        if not A.is_floating_point():
            raise TypeError(f"A: expected a floating-point matrix, got {A.dtype}")
        # x @ A.T on the transposed view, the product a user's callable ``lambda x: x @ A.T`` computes:
        # a materialised A.T takes another GEMM kernel here, equal only to rounding
        Ad = A.to(device, dtype)
        h = lambda x: x @ Ad.T  # noqa: E731
        d = A.shape[0]
    elif callable(A):
        h, d = A, None
    else:
        raise TypeError(f"A: expected a (d, D) tensor or a callable forward model h(x), got {type(A).__name__}")
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y: expected a tensor of measurements, got {type(y).__name__}")
    if y.ndim not in (1, 2) or (d is not None and y.shape[-1] != d):
        want = f"({d},) or (B, {d})" if d is not None else "(d,) or (B, d)"
        raise ValueError(f"y: expected shape {want}, got {tuple(y.shape)}")
    y = y.to(device, dtype)
    return h, (y if y.ndim == 2 else y[None])


# =========================================================================== the Gaussian posterior
@accepts_arrays
def gaussian_posterior(prior: Gaussian, A: torch.Tensor, y: torch.Tensor, noise_std: float) -> Gaussian:
    """The exact posterior ``p(x | y)`` of Gaussian data under ``y = A x + noise_std w`` (seed 004 eq.
    7.3.15), as a :class:`fastdiff.denoisers.Gaussian`: ``.sample(N)`` draws from it, and calling
    it is the exact conditional denoiser ``E[x | x_t, y]`` (eq. 7.3.16).

    prior: ``Gaussian(mu, Sigma)`` (D,); A: (d, D); y: (d,) one measurement; noise_std > 0.
    Computed in float64.
    """
    if not isinstance(prior, Gaussian):
        raise TypeError(f"prior: expected a fastdiff.denoisers.Gaussian, got {type(prior).__name__}")
    if not isinstance(A, torch.Tensor) or A.ndim != 2 or A.shape[1] != prior.n:
        raise ValueError(f"A: expected a (d, {prior.n}) matrix, got {getattr(A, 'shape', type(A).__name__)}")
    if not isinstance(y, torch.Tensor) or y.ndim != 1 or y.shape[0] != A.shape[0]:
        raise ValueError(f"y: expected one measurement of shape ({A.shape[0]},), got {getattr(y, 'shape', type(y).__name__)}")
    s2 = check_positive("noise_std", noise_std) ** 2
    A64, y64 = A.detach().double().cpu(), y.detach().double().cpu()
    S, mu = prior.cov, prior.mean
    SAt = S @ A64.T                                                   # (D, d)
    gram = A64 @ SAt + s2 * torch.eye(A64.shape[0], dtype=torch.float64)
    mean = mu + SAt @ torch.linalg.solve(gram, y64 - A64 @ mu)
    cov = S - SAt @ torch.linalg.solve(gram, SAt.T)
    return Gaussian(mean, (cov + cov.T) / 2)                          # symmetric to rounding


# =========================================================================== the DDIM loop
def _table(schedule, steps, eta, spacing):
    """``(trajectory_table rows, "vp" | "ve")``: DDIM (``steps``, ``spacing``, ``eta``) on a
    DDPMSchedule; Euler (``eta = 0``, seed 004's update with ``alpha = 1``) or Euler ancestral
    (``eta > 0``) on VE levels."""
    eta = check_positive("eta", eta, allow_zero=True)
    if isinstance(schedule, DDPMSchedule):
        return trajectory_table(schedule, "ddim", steps=steps, eta=eta, spacing=spacing), "vp"
    if not isinstance(schedule, (KarrasSchedule, torch.Tensor)):
        raise TypeError("schedule: expected a fastdiff.DDPMSchedule, a fastdiff.KarrasSchedule or a 1-D tensor of "
                        f"decreasing noise levels, got {type(schedule).__name__}")
    if steps is not None:
        raise ValueError("steps: only for a DDPMSchedule (VE levels are given explicitly)")
    if spacing != "linspace":
        raise ValueError(f"spacing: only for a DDPMSchedule (VE levels are given explicitly), got {spacing!r}")
    if eta == 0.0:
        return trajectory_table(schedule, "euler"), "ve"
    return trajectory_table(schedule, "euler_ancestral", eta=eta), "ve"


def _device(*candidates) -> torch.device:
    """Where fresh samples go: the device of the first tensor among the arguments (CPU if none)."""
    return next((c.device for c in candidates if isinstance(c, torch.Tensor)), torch.device("cpu"))


def _initial(x, num_samples, n, table, kind, generator, device, dtype):
    if x is not None:
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or not x.is_floating_point():
            raise ValueError(f"x: expected a floating-point (B, D) tensor of starting points, got {getattr(x, 'shape', type(x).__name__)}")
        if n is not None and x.shape[1] != n:
            raise ValueError(f"x: expected D = {n} columns, got {x.shape[1]}")
        return x  # the loop runs on a copy
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples: expected a positive int (or pass x), got {num_samples!r}")
    if n is None:
        raise ValueError("x: required when the dimension D cannot be read from A or the denoiser (.n)")
    z = randn(num_samples, n, generator=generator, dtype=dtype, device=device)
    # VP: x_T ~ N(0, I) (alpha_T ~ 0); VE: x_T ~ N(0, sigma_max^2 I) (Alg. 7.1, line 2)
    return z if kind == "vp" else z.mul_(table[0].level[1])


# =========================================================================== public samplers
@accepts_arrays
def posterior_sample(denoiser, y, A: Union[torch.Tensor, Callable], noise_std: float, schedule, *, x=None,
                     num_samples: Optional[int] = None, method: str = "dps", steps: Optional[int] = None,
                     eta: float = 0.0, scale: float = 1.0, generator: Optional[Generator] = None,
                     disable: Optional[bool] = None, spacing: str = "linspace",
                     callback: Optional[Callable[[StepInfo], None]] = None) -> torch.Tensor:
    """Samples approximately from ``p(x | y)`` for ``y = A x + noise_std w`` (seed 004 Alg. 7.1).

    denoiser: ``den(x, alpha, sigma) -> x0_hat``, differentiable in ``x`` (:mod:`fastdiff.denoisers`
    objects are). y: (d,) or per-sample (B, d). A: (d, D) matrix, or a differentiable callable
    ``h(x) (B, D) -> (B, d)``. schedule: :class:`DDPMSchedule` (``steps`` DDIM steps at the
    timesteps :func:`fastdiff.sample` uses, ``fastdiff.coefficients.timesteps(T, steps, spacing)``,
    all T by default), :class:`KarrasSchedule` or a decreasing 1-D tensor of VE sigmas ending at 0.
    method: ``"dps"`` (module docstring; ``scale`` multiplies the correction) or ``"exact"``
    (``denoiser`` a :class:`fastdiff.denoisers.Gaussian`, A a matrix, one y: the loop runs the exact
    conditional denoiser of :func:`gaussian_posterior`). x: (B, D) starting points, else
    ``num_samples`` fresh ones from ``generator`` (VP ``N(0, I)``, VE ``N(0, sigma_max^2 I)``).
    eta: DDIM noise (0 = Alg. 7.1). disable: the tqdm progress bar, as in k-diffusion. callback:
    called once per step with a :class:`fastdiff.sampling.StepInfo` (``x0_hat`` is the corrected
    ``x0_c``), as in :func:`fastdiff.sampling.run`.
    Returns (B, D) in x's dtype (float32 for fresh samples); NumPy in (x, y or A), NumPy out.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    noise_std = check_positive("noise_std", noise_std)
    scale = check_positive("scale", scale, allow_zero=True)
    if not callable(denoiser):
        raise TypeError(f"denoiser: expected a callable den(x, alpha, sigma), got {type(denoiser).__name__}")
    table, kind = _table(schedule, steps, eta, spacing)
    n = A.shape[1] if isinstance(A, torch.Tensor) and A.ndim == 2 else getattr(denoiser, "n", None)
    device = _device(x, A, y)
    dtype = x.dtype if isinstance(x, torch.Tensor) else torch.float32
    x = _initial(x, num_samples, n, table, kind, generator, device, dtype)
    h, y_b = _measurement(A, y, x.device, x.dtype)
    if y_b.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"y: expected one measurement or {x.shape[0]} (one per sample), got {y_b.shape[0]}")

    if method == "exact":
        if not isinstance(denoiser, Gaussian):
            raise TypeError(f"denoiser: method='exact' needs a fastdiff.denoisers.Gaussian prior, got {type(denoiser).__name__}")
        if not isinstance(A, torch.Tensor) or y_b.shape[0] != 1:
            raise ValueError("method='exact' takes a matrix A and a single measurement y of shape (d,)")
        return run(gaussian_posterior(denoiser, A, y_b[0], noise_std), x, table, generator=generator,
                   callback=callback, progress=not disable, desc="exact posterior")

    def dps_x0(xt, alpha, sigma):
        with torch.enable_grad():
            xi = xt.detach().requires_grad_(True)
            x0 = denoiser(xi, alpha, sigma)
            if not isinstance(x0, torch.Tensor) or x0.shape != xt.shape:
                raise ValueError(f"denoiser: expected an output of shape {tuple(xt.shape)}, got {getattr(x0, 'shape', None)}")
            residual = h(x0) - y_b
            (grad,) = torch.autograd.grad(residual.square().sum(), xi)
        # samples are independent, so the gradient of the summed loss is each sample's own gradient
        return x0.detach().add_(grad, alpha=-scale * sigma * sigma / (2.0 * alpha * noise_std * noise_std))

    return run(dps_x0, x, table, generator=generator, callback=callback, progress=not disable, desc="DPS")


@accepts_arrays
def cfg_sample(denoiser, labels, guidance, schedule, *, x=None, num_samples: Optional[int] = None,
               steps: Optional[int] = None, eta: float = 0.0, generator: Optional[Generator] = None,
               disable: Optional[bool] = None, spacing: str = "linspace",
               callback: Optional[Callable[[StepInfo], None]] = None) -> torch.Tensor:
    """Classifier-free guidance (seed 004 eq. 7.4.20) through a labelled denoiser such as
    :class:`fastdiff.denoisers.MoLRG`: the loop of :func:`posterior_sample` over

        x0_cfg = (1 - w) x0_hat(x_t) + w x0_hat(x_t | label)

    fused inside the MoLRG kernel (``den(x, alpha, sigma, labels=..., guidance=w)``).  ``w = 0`` samples
    the mixture, ``w = 1`` the labelled component, ``w > 1`` over-guides.  labels: (B,) ints, or one
    int for every sample; guidance: scalar or (B,).  Other arguments as in :func:`posterior_sample`.
    """
    if not callable(denoiser):
        raise TypeError(f"denoiser: expected a callable den(x, alpha, sigma, labels=, guidance=), got {type(denoiser).__name__}")
    table, kind = _table(schedule, steps, eta, spacing)
    device = _device(x, getattr(denoiser, "ucat", None), labels)
    dtype = x.dtype if isinstance(x, torch.Tensor) else torch.float32
    x = _initial(x, num_samples, getattr(denoiser, "n", None), table, kind, generator, device, dtype)
    if isinstance(labels, numbers.Integral) and not isinstance(labels, bool):
        labels = torch.full((x.shape[0],), int(labels), dtype=torch.long, device=x.device)
    return run(lambda xt, a, s: denoiser(xt, a, s, labels=labels, guidance=guidance), x, table, generator=generator,
               callback=callback, progress=not disable, desc="CFG")
