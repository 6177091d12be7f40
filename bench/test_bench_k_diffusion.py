"""k-diffusion's samplers against fastdiff's adapters, whole 25-step loops with a cheap model.

Latent 4 x 4 x 64 x 64 float32, Karras sigmas (25 steps, 0.03 .. 14.6).  The model is one fused
multiply (``x / sqrt(1 + sigma^2)``: a single pass, far cheaper than a network), so the rows time
the samplers' own arithmetic: k-diffusion's 4-10 elementwise torch ops per step (``eager``) against
fastdiff's one fused pass per update (``fastdiff``).  Noise: the same pre-drawn tensors on both
sides through ``noise_sampler`` where a sampler takes one, so neither side pays for its RNG.
``eager`` needs k-diffusion's ``sampling.py`` (loaded by file path, as the adapter tests do).
Bytes: per step, the state read and written and each model output read once (a lower bound).
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from test_adapters import K_SAMPLING, K_WHY  # noqa: E402

from fastdiff.adapters import k_diffusion as fd_k  # noqa: E402

SHAPE = (4, 4, 64, 64)
STEPS = 25
SAMPLERS = {  # name -> (kwargs, model evaluations per step, takes a noise_sampler)
    "sample_dpmpp_2m": ({}, 1, False),
    "sample_dpmpp_2m_sde": ({}, 1, True),
    "sample_dpmpp_3m_sde": ({}, 1, True),
    "sample_dpmpp_2s_ancestral": ({}, 2, True),
    "sample_dpm_2": ({}, 2, False),
    "sample_dpm_2_ancestral": ({}, 2, True),
    "sample_lms": ({}, 1, False),
    "sample_euler": ({}, 1, False),
    "sample_heun": ({}, 2, False),
    "sample_euler_ancestral": ({}, 1, True),
}


def _model(x, sigma):
    return x * (1 + sigma[0] ** 2) ** -0.5


@pytest.mark.parametrize("impl", ["fastdiff", "eager"])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_k_diffusion_sampler(record, device, name, impl):
    if K_SAMPLING is None:
        pytest.skip(str(K_WHY))
    kwargs, evals, noisy = SAMPLERS[name]
    sig = K_SAMPLING.get_sigmas_karras(STEPS, 0.03, 14.6, device=device)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(device) * sig[0]
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).to(device)
    kw = dict(kwargs, disable=True)
    if noisy:
        kw["noise_sampler"] = lambda s, s_next: noise
    fn = getattr(fd_k if impl == "fastdiff" else K_SAMPLING, name)
    per_step = (2 + 2 * evals) * x.numel() * x.element_size()
    record(f"k-diffusion {name} 25 steps {'x'.join(map(str, SHAPE))}", impl, lambda: fn(_model, x, sig, **kw),
           bytes_moved=STEPS * per_step, rounds=60, warmup=2)
