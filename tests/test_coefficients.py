"""fastdiff.coefficients: the one place each step's coefficients are computed (docs/math.md 1).

The step API and the trajectory tables agreeing bit for bit is tested in test_sampling.py
("fused equals loop") and test_steps.py (against the float64 references); here, identities
between the methods that the formulas must satisfy."""
import math

import pytest
import torch

import fastdiff
from fastdiff import coefficients as C


def test_ddim_eta1_is_ddpm_fixed_small():
    """DDIM with eta = 1 between consecutive timesteps is DDPM's posterior (Song et al. Sec. 4.1)."""
    s = fastdiff.DDPMSchedule.linear()
    for t in (1, 10, 500, 999):
        beta, abar, abar_p = s.floats("beta")[t], s.floats("abar")[t], s.floats("abar")[t - 1]
        _, _, s_ddpm = C.ddpm(beta, abar, abar_p, "fixed_small", True)
        _, _, s_ddim = C.ddim(abar, abar_p, 1.0)
        assert s_ddim == pytest.approx(s_ddpm, rel=1e-12)


def test_ancestral_sigmas_split_sigma_next():
    for sigma, nxt, eta in [(10.0, 5.0, 1.0), (2.0, 1.9, 0.5), (1.0, 0.0, 1.0), (3.0, 1.0, 0.0)]:
        down, up = C.ancestral_sigmas(sigma, nxt, eta)
        assert down * down + up * up == pytest.approx(nxt * nxt, rel=1e-12, abs=1e-15)
        assert 0.0 <= up <= nxt


def test_float_and_tensor_inputs_agree():
    """Per-sample (tensor) coefficients are the scalar ones, elementwise."""
    sig = torch.tensor([5.0, 2.0, 0.7], dtype=torch.float64)
    nxt = torch.tensor([2.0, 0.0, 0.3], dtype=torch.float64)
    vec = C.heun_corrector(sig, nxt)
    for i in range(3):
        one = C.heun_corrector(float(sig[i]), float(nxt[i]))
        assert [float(v[i]) for v in vec] == list(one)
    vec = C.euler_ancestral(sig, nxt, 1.0, 1.0)
    for i in range(3):
        assert [float(v[i]) for v in vec] == list(C.euler_ancestral(float(sig[i]), float(nxt[i]), 1.0, 1.0))


def test_heun_corrector_is_euler_at_sigma_next_zero():
    assert C.heun_corrector(2.0, 0.0)[:4] == (0.0, -0.0, 1.0, -0.0)


def test_ddpm_no_noise_on_last_step_and_fixed_large():
    beta, abar = 0.02, 0.5
    assert C.ddpm(beta, abar, 1.0, "fixed_small", False)[2] == 0.0
    assert C.ddpm(beta, abar, 0.6, "fixed_large", True)[2] == pytest.approx(math.sqrt(beta))
