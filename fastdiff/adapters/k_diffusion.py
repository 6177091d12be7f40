"""k-diffusion's samplers (Karras et al. 2022, EDM Alg. 2; DPM-Solver / DPM-Solver++) with fastdiff's fused steps.

    from fastdiff.adapters.k_diffusion import sample_heun, sample_dpmpp_2m
    x = sample_dpmpp_2m(model, x, sigmas, extra_args={"cond": c}, disable=False)

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

The multistep and two-stage samplers (``sample_dpmpp_2m``, ``sample_dpmpp_2m_sde``, ``sample_dpmpp_3m_sde``,
``sample_dpmpp_2s_ancestral``, ``sample_dpm_2``, ``sample_dpm_2_ancestral``, ``sample_lms``, and ComfyUI's
``sample_ipndm``, ``sample_ipndm_v``, ``sample_deis``, ``sample_lcm``) are rows of
:mod:`fastdiff.solvers` run by :func:`fastdiff.sampling.run`, one fused pass per update.  The two SDE
samplers (``sample_dpmpp_2m_sde``, ``sample_dpmpp_3m_sde``) default, as k-diffusion's do, to Brownian-tree
noise: without a ``noise_sampler`` every step's noise is an increment of one Brownian path
(:class:`fastdiff.BrownianNoise`, no torchsde), seeded from ``generator`` (whose stream advances by one
quad per call, so successive calls get fresh paths), so a 20-step and a 40-step run of one seed give
close samples.  The ancestral samplers draw independent normals, in the kernel, from ``generator``.

Dtypes follow k-diffusion's arithmetic: the samplers built on ``to_d`` (Euler, Heun, Euler ancestral,
DPM-2, LMS) divide by a sigma tensor of ``sigmas.dtype`` and so carry the state in
``torch.promote_types(x.dtype, sigmas.dtype)`` (half-precision ``x`` with float32 sigmas: float32);
the DPM-Solver++ samplers keep ``x.dtype``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from tqdm.auto import trange

from fastdiff.brownian import BrownianNoise
from fastdiff.generator import Generator, default_generator
from fastdiff import steps
from fastdiff.sampling import run
from fastdiff.solvers import solver_table

# samplers hand the steps torch tensors only: skip their NumPy/CuPy conversion wrapper (~5 us a call)
edm_churn, euler_step = steps.edm_churn.__wrapped__, steps.euler_step.__wrapped__
euler_ancestral_step, heun_step = steps.euler_ancestral_step.__wrapped__, steps.heun_step.__wrapped__

__all__ = ["sample_euler", "sample_heun", "sample_euler_ancestral", "sample_dpmpp_2m", "sample_dpmpp_2m_sde",
           "sample_dpmpp_3m_sde", "sample_dpmpp_2s_ancestral", "sample_dpm_2", "sample_dpm_2_ancestral", "sample_lms",
           "sample_deis", "sample_ipndm", "sample_ipndm_v", "sample_lcm"]


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


def _to(dtype, *tensors):
    """The tensors in the sampler's state dtype.  The samplers built on ``to_d`` divide by a sigma of
    ``sigmas.dtype`` broadcast to x's rank, which promotes (a 0-d tensor would not): k-diffusion's first
    model call sees x as given, and the state is ``promote_types(x.dtype, sigmas.dtype)`` from its first
    update on.  Converting x and the model output up front gives the same values (the conversion is exact)."""
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in tensors)


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


def _churned_model(model, x, sigmas, extra_args, callback, churn):
    """The levels, and ``call(x, i) -> (x_hat, level_hat, denoised)``: step i's EDM churn, the model at
    ``sigma_hat`` (the state promoted as k-diffusion promotes it) and the callback, for Euler and Heun."""
    levels = _levels(x, sigmas)
    state = torch.promote_types(x.dtype, sigmas.dtype)
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])

    def call(x, i):
        x, sigma_hat, sh = _churn(x, sigmas, i, levels, *churn)
        x, denoised = _to(state, x, model(x, sigma_hat * s_in, **extra_args))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
        return x, sh, denoised

    return levels, call


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float("inf"), s_noise=1., *, noise_sampler=None, generator: Optional[Generator] = None):
    """Euler steps with EDM churn (Karras et al. Alg. 2 with Euler): per step
    ``x_hat = x + sqrt(sigma_hat^2 - sigma^2) S_noise z`` (churn ``gamma = min(s_churn/n, sqrt 2 - 1)``
    inside ``[s_tmin, s_tmax]``), then ``x = x_hat + (sigma_next - sigma_hat) (x_hat - x0_hat)/sigma_hat``."""
    levels, call = _churned_model(model, x, sigmas, extra_args, callback,
                                  (s_churn, s_tmin, s_tmax, s_noise, noise_sampler, generator))
    for i in trange(len(levels) - 1, disable=disable):
        x, sh, denoised = call(x, i)
        x = euler_step(x, denoised, sh, levels[i + 1], prediction="x0")
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                s_tmax=float("inf"), s_noise=1., *, noise_sampler=None, generator: Optional[Generator] = None):
    """Heun's 2nd-order steps with EDM churn (Karras et al. Alg. 2): the Euler predictor, the model
    at ``(x_pred, sigma_next)``, then ``x = x_hat + (sigma_next - sigma_hat)(d + d')/2``; Euler on the
    last step (``sigma_next = 0``)."""
    levels, call = _churned_model(model, x, sigmas, extra_args, callback,
                                  (s_churn, s_tmin, s_tmax, s_noise, noise_sampler, generator))
    s_in = x.new_ones([x.shape[0]])
    extra_args = {} if extra_args is None else extra_args
    for i in trange(len(levels) - 1, disable=disable):
        x, sh, denoised = call(x, i)
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
    state = torch.promote_types(x.dtype, sigmas.dtype)
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(levels) - 1, disable=disable):
        x, denoised = _to(state, x, model(x, sigmas[i] * s_in, **extra_args))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if levels[i + 1] > 0 and eta:
            noise, gen = _noise(noise_sampler, generator, sigmas[i], sigmas[i + 1])
            x = euler_ancestral_step(x, denoised, levels[i], levels[i + 1], eta=eta, s_noise=s_noise,
                                     prediction="x0", noise=noise, generator=gen)
        else:  # eta = 0 or the last step: k-diffusion's plain Euler to sigma_next, no draw
            x = euler_step(x, denoised, levels[i], levels[i + 1], prediction="x0")
    return x


# =========================================================================== the solvers of fastdiff.solvers
_BROWNIAN = ("dpmpp_2m_sde", "dpmpp_3m_sde")  # k-diffusion's BrownianTreeNoiseSampler by default

def _solve(method, model, x, sigmas, extra_args, callback, disable, noise_sampler, generator, promote, **options):
    """k-diffusion's ``sample_<method>`` as a table of :mod:`fastdiff.solvers` rows run by
    :func:`fastdiff.sampling.run`; the model sees ``sigma * s_in`` as k-diffusion passes it."""
    levels = _levels(x, sigmas)
    if generator is not None and not isinstance(generator, Generator):
        raise TypeError(f"generator: expected a fastdiff.Generator, got {type(generator).__name__}")
    if noise_sampler is not None and not callable(noise_sampler):
        raise TypeError(f"noise_sampler: expected a callable noise_sampler(sigma, sigma_next), got {type(noise_sampler).__name__}")
    table = solver_table(method, levels, **options)
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])  # k-diffusion's: the model sees sigma in x's own dtype
    given, first = x.dtype, [True]
    if promote:  # to_d promotes (see _to); the first model call still sees x as given (exact round trip)
        x, = _to(torch.promote_types(x.dtype, sigmas.dtype), x)

    def denoiser(xc, alpha, sigma):
        if first[0]:
            first[0] = False
            return model(xc.to(given), s_in * sigma, **extra_args).to(xc.dtype)
        return model(xc, s_in * sigma, **extra_args).to(xc.dtype)

    cb = None
    if callback is not None:
        def cb(info):  # run() updates x in place after the callback; k-diffusion hands out the tensor itself
            callback({"x": info.x.clone(), "i": info.i, "sigma": sigmas[info.i], "sigma_hat": sigmas.new_tensor(info.sigma),
                      "denoised": info.x0_hat})
    noise = None if noise_sampler is None else (lambda i, row: noise_sampler(sigmas[i], sigmas[i + 1]))
    if noise is None and method in _BROWNIAN and any(st.cz for st in table):
        gen = default_generator if generator is None else generator
        off = gen.draw(4)  # a fresh, reproducible path per call; per-sample seeds: one path per sample
        mix = lambda v: (v * 0x9E3779B97F4A7C15 + off) % (1 << 64)  # noqa: E731
        seed = [mix(v) for v in gen.seed] if isinstance(gen.seed, tuple) else mix(gen.seed)
        positive = [v for v in levels if v > 0]
        noise = BrownianNoise(seed, min(positive), max(positive)).run_noise(x, levels)
    return run(denoiser, x, table, generator=generator, callback=cb, noise=noise, progress=not disable,
               desc=f"sample_{method}")


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, *,
                    generator: Optional[Generator] = None):
    """DPM-Solver++(2M) (Lu et al. 2022b): :func:`fastdiff.coefficients.dpmpp_2m`."""
    return _solve("dpmpp_2m", model, x, sigmas, extra_args, callback, disable, None, generator, False)


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                        noise_sampler=None, solver_type="midpoint", *, generator: Optional[Generator] = None):
    """DPM-Solver++(2M) SDE: :func:`fastdiff.coefficients.dpmpp_2m_sde` (``solver_type`` midpoint / heun)."""
    return _solve("dpmpp_2m_sde", model, x, sigmas, extra_args, callback, disable, noise_sampler, generator, False,
                  eta=float(eta), s_noise=float(s_noise), solver_type=solver_type)


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                        noise_sampler=None, *, generator: Optional[Generator] = None):
    """DPM-Solver++(3M) SDE: :func:`fastdiff.coefficients.dpmpp_3m_sde` (``eta = 0``: the 3M ODE solver)."""
    return _solve("dpmpp_3m_sde", model, x, sigmas, extra_args, callback, disable, noise_sampler, generator, False,
                  eta=float(eta), s_noise=float(s_noise))


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                              noise_sampler=None, *, generator: Optional[Generator] = None):
    """Ancestral DPM-Solver++(2S): :func:`fastdiff.coefficients.dpmpp_2s_ancestral`."""
    return _solve("dpmpp_2s_ancestral", model, x, sigmas, extra_args, callback, disable, noise_sampler, generator,
                  False, eta=float(eta), s_noise=float(s_noise))


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float("inf"), s_noise=1., *, generator: Optional[Generator] = None):
    """DPM-Solver-2 with EDM churn: :func:`fastdiff.coefficients.dpm_2`; the churn draws from ``generator``."""
    return _solve("dpm_2", model, x, sigmas, extra_args, callback, disable, None, generator, True,
                  churn=float(s_churn), s_tmin=float(s_tmin), s_tmax=float(s_tmax), s_noise=float(s_noise))


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None, *, generator: Optional[Generator] = None):
    """Ancestral DPM-Solver-2: DPM-2 to ``sigma_down``, then ``s_noise sigma_up z``."""
    return _solve("dpm_2_ancestral", model, x, sigmas, extra_args, callback, disable, noise_sampler, generator, True,
                  eta=float(eta), s_noise=float(s_noise))


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4, *,
               generator: Optional[Generator] = None):
    """Linear multistep of ``order`` (1..4): :func:`fastdiff.coefficients.lms`."""
    return _solve("lms", model, x, sigmas, extra_args, callback, disable, None, generator, True, order=order)


def _max_order(max_order, top):
    if isinstance(max_order, bool) or not isinstance(max_order, int) or not 1 <= max_order <= top:
        raise ValueError(f"max_order: expected an int in [1, {top}], got {max_order!r}")
    return max_order


@torch.no_grad()
def sample_ipndm(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4, *,
                 generator: Optional[Generator] = None):
    """iPNDM (ComfyUI's ``sample_ipndm``): Adams-Bashforth with the equal-step weights, orders up to
    ``max_order`` (1..4) after the warm start; ``x = denoised`` to ``sigma = 0``: :func:`fastdiff.coefficients.ipndm`.
    The state keeps ``x.dtype`` (ComfyUI divides by a 0-d sigma, which does not promote)."""
    return _solve("ipndm", model, x, sigmas, extra_args, callback, disable, None, generator, False,
                  order=_max_order(max_order, 4))


@torch.no_grad()
def sample_ipndm_v(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4, *,
                   generator: Optional[Generator] = None):
    """iPNDM-v (ComfyUI's ``sample_ipndm_v``): iPNDM with ComfyUI's step-size-adapted weights,
    :func:`fastdiff.coefficients.ipndm_v`."""
    return _solve("ipndm_v", model, x, sigmas, extra_args, callback, disable, None, generator, False,
                  order=_max_order(max_order, 4))


@torch.no_grad()
def sample_deis(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=3, *,
                generator: Optional[Generator] = None):
    """DEIS in log rho (diffusers' ``DEISMultistepScheduler``; on these VE levels ``rho = sigma`` and
    ``eps = d``): ``x_{i+1} = x_i + sum_j c_j d_{i-j}``, :func:`fastdiff.coefficients.deis`, orders up to
    ``max_order`` (1..3).  Not ComfyUI's ``sample_deis``, whose default ``deis_mode="tab"`` integrates
    in a VP time with numerical quadrature ("rhoab" is Lagrange in sigma: :func:`sample_lms`)."""
    return _solve("deis", model, x, sigmas, extra_args, callback, disable, None, generator, False,
                  order=_max_order(max_order, 3))


@torch.no_grad()
def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, *,
               generator: Optional[Generator] = None, path: str = "ve"):
    """Multistep latent consistency sampling, ComfyUI's ``sample_lcm`` (Luo et al. 2023; docs/math.md 1e):
    per step ``x = denoised``, then, where ``sigma_next > 0``, ``x += sigma_next z`` -- one fused pass
    (:func:`fastdiff.solvers.solver_table` ``"lcm"``), ``z`` from ``noise_sampler(sigma, sigma_next)`` or drawn
    in the kernel from ``generator``.  ``path="flow"``: ``x = (1 - t_next) denoised + t_next z`` (ComfyUI's
    ``noise_scaling`` for flow models).  The model's output is the consistency model's (its c_skip/c_out
    boundary condition applied by the model wrapper, as ComfyUI's is); x keeps its dtype."""
    if path not in ("ve", "flow"):
        raise ValueError(f"path: expected 've' or 'flow', got {path!r}")
    return _solve("lcm", model, x, sigmas, extra_args, callback, disable, noise_sampler, generator, False, path=path)
