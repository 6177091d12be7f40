"""Reference reverse steps (SPEC 1), written from the formulas, in the inputs' dtype.

Each takes the same arguments as its fused counterpart in :mod:`fastdiff.steps`, with explicit
``noise`` (``z``) instead of a generator.  Timesteps and levels may be scalars or (B,) tensors.
"""
from __future__ import annotations

import torch


def _per_sample(v, x):
    """A scalar or (B,) value as a tensor broadcastable against x (B, ...)."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    return v.reshape(-1, *([1] * (x.ndim - 1))) if v.ndim == 1 else v


def to_x0(x, m, alpha, sigma, prediction):
    """Tweedie conversions: the posterior mean x0_hat from a model output."""
    if prediction == "eps":
        return (x - sigma * m) / alpha
    if prediction == "x0":
        return m
    if prediction == "v":  # v = alpha eps - sigma x0, x = alpha x0 + sigma eps
        return (alpha * x - sigma * m) / (alpha**2 + sigma**2)
    if prediction == "score":  # score = -eps / sigma
        return (x + sigma**2 * m) / alpha
    if prediction == "flow":  # flow = eps - x0, x = alpha x0 + sigma eps = (alpha + sigma) x0 + sigma flow
        return (x - sigma * m) / (alpha + sigma)
    raise ValueError(prediction)


def guided_x0(x, model_output, alpha, sigma, prediction, guidance):
    """SPEC 1 guidance: x0 = (1 - w) x0(uncond) + w x0(cond)."""
    if isinstance(model_output, (tuple, list)):
        w = _per_sample(guidance, x)
        u, c = model_output
        return (1 - w) * to_x0(x, u, alpha, sigma, prediction) + w * to_x0(x, c, alpha, sigma, prediction)
    return to_x0(x, model_output, alpha, sigma, prediction)


def _gather(table, t, x):
    t = torch.as_tensor(t)
    return _per_sample(table.to(x.dtype)[t.long().to(table.device)].to(x.device), x)


def ddpm_step(x, model_output, t, schedule, *, prediction="eps", variance="fixed_small", guidance=None, noise=None):
    beta = _gather(schedule.beta, t, x)
    abar = _gather(schedule.abar, t, x)
    tt = torch.as_tensor(t)
    abar_prev = torch.where(_per_sample(tt, x) > 0, _gather(schedule.abar, (tt - 1).clamp(min=0), x), 1.0)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    x0 = guided_x0(x, model_output, alpha, sigma, prediction, guidance)
    eps = (x - alpha * x0) / sigma
    mean = (x - beta / (1 - abar).sqrt() * eps) / (1 - beta).sqrt()
    var = beta if variance == "fixed_large" else beta * (1 - abar_prev) / (1 - abar)
    s = torch.where(_per_sample(tt, x) > 0, var.sqrt(), 0.0)
    return mean + s * noise if noise is not None else mean


def ddim_step(x, model_output, t, t_prev, schedule, *, eta=0.0, prediction="eps", guidance=None, noise=None):
    abar = _gather(schedule.abar, t, x)
    tp = torch.as_tensor(t_prev)
    abar_p = torch.where(_per_sample(tp, x) >= 0, _gather(schedule.abar, tp.clamp(min=0), x), 1.0)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    x0 = guided_x0(x, model_output, alpha, sigma, prediction, guidance)
    eps = (x - alpha * x0) / sigma
    eta = _per_sample(eta, x)
    s = eta * ((1 - abar_p) / (1 - abar)).sqrt() * (1 - abar / abar_p).sqrt()
    out = abar_p.sqrt() * x0 + (1 - abar_p - s**2).clamp(min=0).sqrt() * eps
    return out + s * noise if noise is not None else out


def _d(x, model_output, sigma, prediction, guidance):
    return (x - guided_x0(x, model_output, 1.0, sigma, prediction, guidance)) / sigma


def euler_step(x, model_output, sigma, sigma_next, *, prediction="x0", guidance=None):
    sigma, sigma_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    return x + (sigma_next - sigma) * _d(x, model_output, sigma, prediction, guidance)


def edm_churn(x, sigma, gamma, *, s_noise=1.0, noise=None):
    sigma = _per_sample(sigma, x)
    sigma_hat = sigma * (1 + _per_sample(gamma, x))
    return x + (sigma_hat**2 - sigma**2).sqrt() * _per_sample(s_noise, x) * noise, sigma_hat


def euler_ancestral_step(x, model_output, sigma, sigma_next, *, eta=1.0, s_noise=1.0, prediction="x0",
                         guidance=None, noise=None):
    sigma, sigma_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    sigma_up = torch.minimum(sigma_next, _per_sample(eta, x) * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).sqrt())
    sigma_down = (sigma_next**2 - sigma_up**2).sqrt()
    out = x + (sigma_down - sigma) * _d(x, model_output, sigma, prediction, guidance)
    return out + _per_sample(s_noise, x) * sigma_up * noise if noise is not None else out


def heun_step(x, model_output, sigma, sigma_next, *, x_pred=None, model_output_pred=None, prediction="x0", guidance=None):
    if x_pred is None:
        return euler_step(x, model_output, sigma, sigma_next, prediction=prediction, guidance=guidance)
    sigma, sigma_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    d = _d(x, model_output, sigma, prediction, guidance)
    safe = torch.where(sigma_next > 0, sigma_next, 1.0)
    d2 = _d(x_pred, model_output_pred, safe, prediction, guidance)
    return torch.where(sigma_next > 0, x + (sigma_next - sigma) * (d + d2) / 2, x_pred)


def _score(x, model_output, prediction, alpha, sigma, guidance):
    if prediction == "score" and not isinstance(model_output, (tuple, list)):
        return model_output
    if prediction == "score":
        w = _per_sample(guidance, x)
        return (1 - w) * model_output[0] + w * model_output[1]
    sigma, alpha = _per_sample(sigma, x), _per_sample(alpha, x)
    x0 = guided_x0(x, model_output, alpha, sigma, prediction, guidance)
    return (alpha * x0 - x) / sigma**2


def langevin_step(x, model_output, step_size, *, prediction="score", alpha=1.0, sigma=None, guidance=None, noise=None):
    g = _per_sample(step_size, x)
    out = x + g * _score(x, model_output, prediction, alpha, sigma, guidance)
    return out + (2 * g).sqrt() * noise if noise is not None else out


def ou_reverse_step(x, model_output, step_size, *, prediction="score", alpha=1.0, sigma=None, guidance=None, noise=None):
    g = _per_sample(step_size, x)
    out = x + g * x + 2 * g * _score(x, model_output, prediction, alpha, sigma, guidance)
    return out + (2 * g).sqrt() * noise if noise is not None else out


def predict_x0(x, model_output, alpha, sigma, *, prediction="eps", guidance=None):
    return guided_x0(x, model_output, _per_sample(alpha, x), _per_sample(sigma, x), prediction, guidance)
