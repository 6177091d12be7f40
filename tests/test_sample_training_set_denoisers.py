"""Every training-set denoiser of issue 17 through ``fastdiff.sample`` with every method.

For each (denoiser, method) the sampler runs twice from the same state and generator: once with the
fastdiff denoiser and once with a float64 reference written directly from its formula (a dense
softmax over the training points or patches; the Gaussian mixture from NumPy's linear algebra).  The
samplers are the same code, so the two trajectories agree to the denoisers' float64 agreement (1e-8
of the state's scale) unless the denoiser mishandles what a sampler hands it: per-sample ``(B,)``
levels, alpha != 1 (the VP and flow paths), flattened images, the levels' extremes (sigma -> 0).
"""
import math

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.data import ImageSet
from fastdiff.denoisers import Empirical, GaussianMixture, PatchDenoiser
from fastdiff.sampling import METHODS

C, H, W = 1, 4, 5
n = C * H * W


def _train(N=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(N, C, H, W, generator=g, dtype=torch.float64) * 2 - 1


def _ref_empirical(Y):
    """x0 = softmax_i(-||x - alpha y_i||^2 / (2 sigma^2)) y_i, dense float64."""
    Yf = Y.reshape(Y.shape[0], -1)

    def den(x, alpha, sigma):
        a = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1)
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
        d2 = ((x.double()[:, None, :] - a[:, :, None] * Yf[None]) ** 2).sum(-1)
        return (torch.softmax(-d2 / (2 * s * s), 1) @ Yf).to(x.dtype)
    return den


def _ref_local(Y, P, equivariant):
    """Pixel by pixel: each output pixel the softmax over the (zero-padded) training patches at that
    position (equivariant: at every position) of the patch's centre."""
    r = P // 2
    Yp = torch.nn.functional.pad(Y, (r, r, r, r))

    def patch(img, i, j):                               # (..., C, P, P) around (i, j) of a padded image
        return img[..., :, i:i + P, j:j + P]

    def den(x, alpha, sigma):
        B = x.shape[0]
        a = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1).expand(B)
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(B)
        xi = torch.nn.functional.pad(x.double().reshape(B, C, H, W), (r, r, r, r))
        out = torch.empty(B, C, H, W, dtype=torch.float64)
        for i in range(H):
            for j in range(W):
                q = patch(xi, i, j).reshape(B, -1)                                  # (B, C P^2)
                where = [(i, j)] if not equivariant else [(u, v) for u in range(H) for v in range(W)]
                keys = torch.cat([patch(Yp, u, v).reshape(Y.shape[0], -1) for u, v in where])
                cent = torch.cat([Y[:, :, u, v] for u, v in where])                 # (M, C)
                d2 = ((q[:, None, :] - a[:, None, None] * keys[None]) ** 2).sum(-1)
                w = torch.softmax(-d2 / (2 * s[:, None] ** 2), 1)
                out[:, :, i, j] = w @ cent
        return out.reshape(x.shape).to(x.dtype)
    return den


def _ref_gmm(means, covs, weights):
    """NumPy: responsibilities from N(x; alpha mu_k, alpha^2 S_k + sigma^2 I), then the Gaussian conditional means."""
    mu, S, w = (t.double().numpy() for t in (means, covs, weights))

    def den(x, alpha, sigma):
        B = x.shape[0]
        a = np.broadcast_to(np.asarray(torch.as_tensor(alpha, dtype=torch.float64)).reshape(-1), (B,))
        s = np.broadcast_to(np.asarray(torch.as_tensor(sigma, dtype=torch.float64)).reshape(-1), (B,))
        X = x.double().numpy()
        out = np.empty_like(X)
        for b in range(B):
            logr, cond = [], []
            for k in range(len(w)):
                M = a[b] ** 2 * S[k] + s[b] ** 2 * np.eye(n)
                r = X[b] - a[b] * mu[k]
                sol = np.linalg.solve(M, r)
                logr.append(math.log(w[k]) - 0.5 * r @ sol - 0.5 * np.linalg.slogdet(M)[1])
                cond.append(mu[k] + a[b] * S[k] @ sol)
            logr = np.array(logr)
            p = np.exp(logr - logr.max())
            out[b] = (p / p.sum()) @ np.array(cond)
        return torch.from_numpy(out).to(x.dtype)
    return den


def _gmm():
    g = torch.Generator().manual_seed(2)
    A = torch.randn(2, n, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    covs = A @ A.mT + 0.2 * torch.eye(n, dtype=torch.float64)
    return torch.randn(2, n, generator=g, dtype=torch.float64), covs, torch.tensor([0.3, 0.7], dtype=torch.float64)


def _denoisers():
    Y = _train()
    means, covs, weights = _gmm()
    images = ImageSet(((Y + 1) * 127.5).round().to(torch.uint8))
    Yq = images.float(dtype=torch.float64)                  # the uint8 set's own values
    return {
        "empirical": (Empirical(Y.reshape(7, -1)), _ref_empirical(Y)),
        "empirical-uint8": (Empirical(images), _ref_empirical(Yq)),
        "local": (PatchDenoiser(Y, 3, mode="local"), _ref_local(Y, 3, False)),
        "equivariant": (PatchDenoiser(Y, 3, mode="equivariant"), _ref_local(Y, 3, True)),
        "gmm": (GaussianMixture(means, covs, weights), _ref_gmm(means, covs, weights)),
    }


DENOISERS = _denoisers()
KARRAS = lambda: fastdiff.KarrasSchedule(5)  # noqa: E731

# (schedule, options) per method: a few steps each
PLANS = {
    "ddpm": (lambda: fastdiff.DDPMSchedule(1e-3, 0.3, T=6), {}),
    "ddim": (lambda: fastdiff.DDPMSchedule(), {"steps": 5, "eta": 0.5}),
    "langevin": (lambda: [1.0, 0.3], {"steps": 3}),
    "walk_jump": (lambda: 0.5, {"steps": 4}),
    "ou_reverse": (lambda: 4.0, {"steps": 5}),
    "sms": (lambda: 1.0, {"steps": 3, "measurements": 2}),
    "jms": (lambda: 1.0, {"steps": 3, "measurements": 2}),
    # from t = 0.05: at t = 0 the level (alpha, sigma) = (1e-10, 1e-5) makes the dense references
    # cancel ~1e10 in the logits (fastdiff drops the ||x||^2 term, the references cannot)
    "stochastic_localization": (lambda: [0.05, 0.1, 1.0, 3.0, 10.0], {}),
}


def _plan(method):
    return PLANS.get(method, (KARRAS, {}))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(DENOISERS))
def test_every_method_with_every_training_set_denoiser(name, method):
    den, ref = DENOISERS[name]
    sched, kw = _plan(method)
    shape = (3, 2, n) if method == "jms" else (3, n)     # JMS's state: m = 2 measurements a sample
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    if method != "stochastic_localization":
        x0 = x0 * 2.0
    # every state of the trajectory (the last alone forgets early errors once the levels are small)
    _, got = fastdiff.sample(den, x0, sched(), method, generator=fastdiff.Generator(9), dtype=torch.float64,
                             disable=True, return_trajectory=True, **kw)
    _, want = fastdiff.sample(ref, x0, sched(), method, generator=fastdiff.Generator(9), dtype=torch.float64,
                              disable=True, return_trajectory=True, **kw)
    assert got.shape == want.shape and got.dtype == torch.float64
    assert bool(torch.isfinite(got).all())
    scale = 1.0 + want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= 1e-7 * scale, f"{name} / {method}: max |diff| {err:.3g} (scale {scale:.3g})"
