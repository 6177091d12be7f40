"""Schedules against their defining formulas (SPEC 0)."""
import math

import torch

import fastdiff


def test_seed001_linear_default():
    s = fastdiff.DDPMSchedule()
    assert s.T == 1000
    t = 637
    beta = 1e-4 + (1e-2 - 1e-4) * t / 1000
    assert math.isclose(s.beta[t].item(), beta, rel_tol=1e-14)
    abar = math.prod(1 - (1e-4 + (1e-2 - 1e-4) * u / 1000) for u in range(t + 1))
    assert math.isclose(s.abar[t].item(), abar, rel_tol=1e-12)
    torch.testing.assert_close(s.alpha**2 + s.sigma**2, torch.ones(1000, dtype=torch.float64))


def test_diffusers_tables():
    lin = fastdiff.DDPMSchedule.linear()
    assert math.isclose(lin.beta[0].item(), 1e-4) and math.isclose(lin.beta[-1].item(), 0.02)
    sl = fastdiff.DDPMSchedule.scaled_linear()
    assert math.isclose(sl.beta[0].item(), 0.00085) and math.isclose(sl.beta[-1].item(), 0.012, rel_tol=1e-12)
    assert math.isclose(sl.beta[500].item(), (0.00085**0.5 + 500 / 999 * (0.012**0.5 - 0.00085**0.5)) ** 2, rel_tol=1e-12)
    cos = fastdiff.DDPMSchedule.cosine()
    f = lambda u: math.cos((u / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert math.isclose(cos.abar[9].item(), f(10) / f(0), rel_tol=1e-10)
    assert cos.beta.max().item() <= 0.999


def test_karras():
    k = fastdiff.KarrasSchedule(18)
    assert k.sigmas.shape == (19,) and k.sigmas[-1] == 0
    assert math.isclose(k.sigmas[0].item(), 80.0) and math.isclose(k.sigmas[-2].item(), 0.002, rel_tol=1e-12)
    i = 7
    expect = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert math.isclose(k.sigmas[i].item(), expect, rel_tol=1e-12)
    assert (k.sigmas[:-1] > k.sigmas[1:]).all()
    assert (k.alpha == 1).all()
    torch.testing.assert_close(k.abar, 1 / (1 + k.sigmas**2))
    assert ((k.beta[:-1] > 0) & (k.beta[:-1] < 1)).all() and k.beta[-1] == 0
    # the VP chain rebuilds abar: abar[i] = abar[i+1] (1 - beta[i])
    torch.testing.assert_close(k.abar[:-1], k.abar[1:] * (1 - k.beta[:-1]))


def test_ddpm_sigma_ve():
    s = fastdiff.DDPMSchedule()
    torch.testing.assert_close(s.sigma_ve, ((1 - s.abar) / s.abar).sqrt())


def test_device_table_cache():
    s = fastdiff.DDPMSchedule(T=10)
    a = s.table("abar", "cpu")
    assert a is s.table("abar", "cpu")
