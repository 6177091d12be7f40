"""k-diffusion's samplers (Karras et al. 2022, EDM Alg. 2) with fastdiff's fused steps.

    from fastdiff.adapters.k_diffusion import sample_euler, sample_heun, sample_euler_ancestral
    x = sample_heun(model, x, sigmas, extra_args={"cond": c}, disable=False)

Same signatures, semantics and callback payloads as ``k_diffusion.sampling``: ``model(x, sigma *
s_in, **extra_args)`` returns the denoised ``x0_hat``; ``sigmas`` decreasing, ending at 0.  Each
update is one fused pass (:func:`fastdiff.euler_step`, :func:`fastdiff.heun_step`,
:func:`fastdiff.euler_ancestral_step`, :func:`fastdiff.edm_churn`) where k-diffusion runs 4-6
elementwise ops.  k-diffusion itself is not needed.

Noise: ``noise_sampler(sigma, sigma_next)`` (k-diffusion's argument; here also accepted by the
Euler and Heun samplers for their churn) supplies it as a tensor, for agreement with code that
draws its own; without one, the Philox stream of ``generator`` (:class:`fastdiff.Generator`,
default :data:`fastdiff.default_generator`) is drawn inside the kernel.  k-diffusion's Euler and
Heun draw ``torch.randn_like(x)`` on every step even when ``gamma = 0``; these draw only when the
churn acts.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from tqdm.auto import trange

from fastdiff.generator import Generator
from fastdiff import steps

# samplers hand the steps torch tensors only: skip their NumPy/CuPy conversion wrapper (~5 us a call)
edm_churn, euler_step = steps.edm_churn.__wrapped__, steps.euler_step.__wrapped__
euler_ancestral_step, heun_step = steps.euler_ancestral_step.__wrapped__, steps.heun_step.__wrapped__

__all__ = ["sample_euler", "sample_heun", "sample_euler_ancestral"]


def _levels(x, sigmas):
    """sigmas as Python floats (one host copy, instead of a device sync per comparison)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 1:
        raise TypeError(f"x: expected a floating-point tensor (B, ...), got {getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas: expected a 1-D tensor of at least 2 noise levels, got {getattr(sigmas, 'shape', type(sigmas).__name__)}")
    levels = sigmas.detach().double().cpu().tolist()
    if not all(math.isfinite(s) and s >= 0 for s in levels) or any(s <= 0 for s in levels[:-1]):
        raise ValueError("sigmas: expected finite levels, all > 0 but the last (which may be 0)")
    return levels


def _noise(noise_sampler: Optional[Callable], generator, sigma, sigma_next):
    """(noise tensor or None, fastdiff generator or None) for one stochastic update."""
    if noise_sampler is not None:
        return noise_sampler(sigma, sigma_next), None
    if generator is not None and not isinstance(generator, Generator):
        raise TypeError(f"generator: expected a fastdiff.Generator, got {type(generator).__name__}")
    return None, generator


def _churn(x, sigmas, i, levels, s_churn, s_tmin, s_tmax, s_noise, noise_sampler, generator):
    """EDM churn before step i: ``(x_hat, sigma_hat as k-diffusion's tensor, sigma_hat float)``."""
    n = len(levels) - 1
    gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= levels[i] <= s_tmax else 0.0
    sigma_hat = sigmas[i] * (gamma + 1)    # the model sees exactly k-diffusion's sigma tensor
    if gamma > 0:
        noise, gen = _noise(noise_sampler, generator, sigmas[i], sigmas[i + 1])
        x, _ = edm_churn(x, levels[i], gamma, s_noise=s_noise, noise=noise, generator=gen)
    return x, sigma_hat, levels[i] * (gamma + 1)


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float("inf"), s_noise=1., *, noise_sampler=None, generator: Optional[Generator] = None):
    """Euler steps with EDM churn (Karras et al. Alg. 2 with Euler): per step
    ``x_hat = x + sqrt(sigma_hat^2 - sigma^2) S_noise z`` (churn ``gamma = min(s_churn/n, sqrt 2 - 1)``
    inside ``[s_tmin, s_tmax]``), then ``x = x_hat + (sigma_next - sigma_hat) (x_hat - x0_hat)/sigma_hat``."""
    levels = _levels(x, sigmas)
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(levels) - 1, disable=disable):
        x, sigma_hat, sh = _churn(x, sigmas, i, levels, s_churn, s_tmin, s_tmax, s_noise, noise_sampler, generator)
        denoised = model(x, sigma_hat * s_in, **extra_args).to(x.dtype)  # k-diffusion's arithmetic would promote
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
        x = euler_step(x, denoised, sh, levels[i + 1], prediction="x0")
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                s_tmax=float("inf"), s_noise=1., *, noise_sampler=None, generator: Optional[Generator] = None):
    """Heun's 2nd-order steps with EDM churn (Karras et al. Alg. 2): the Euler predictor, the model
    at ``(x_pred, sigma_next)``, then ``x = x_hat + (sigma_next - sigma_hat)(d + d')/2``; Euler on the
    last step (``sigma_next = 0``)."""
    levels = _levels(x, sigmas)
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(levels) - 1, disable=disable):
        x, sigma_hat, sh = _churn(x, sigmas, i, levels, s_churn, s_tmin, s_tmax, s_noise, noise_sampler, generator)
        denoised = model(x, sigma_hat * s_in, **extra_args).to(x.dtype)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
        x_pred = heun_step(x, denoised, sh, levels[i + 1], prediction="x0")
        if levels[i + 1] == 0:
            x = x_pred
        else:
            denoised_2 = model(x_pred, sigmas[i + 1] * s_in, **extra_args).to(x.dtype)
            x = heun_step(x, denoised, sh, levels[i + 1], x_pred=x_pred, model_output_pred=denoised_2,
                          prediction="x0")
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None, *, generator: Optional[Generator] = None):
    """Ancestral Euler: Euler to ``sigma_down``, then ``S_noise sigma_up z`` with
    ``sigma_up = min(sigma_next, eta sqrt(sigma_next^2 (sigma^2 - sigma_next^2)/sigma^2))``,
    ``sigma_down = sqrt(sigma_next^2 - sigma_up^2)``; no noise on the last step."""
    levels = _levels(x, sigmas)
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(levels) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args).to(x.dtype)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if levels[i + 1] > 0 and eta:
            noise, gen = _noise(noise_sampler, generator, sigmas[i], sigmas[i + 1])
            x = euler_ancestral_step(x, denoised, levels[i], levels[i + 1], eta=eta, s_noise=s_noise,
                                     prediction="x0", noise=noise, generator=gen)
        else:  # eta = 0 or the last step: k-diffusion's plain Euler to sigma_next, no draw
            x = euler_step(x, denoised, levels[i], levels[i + 1], prediction="x0")
    return x
