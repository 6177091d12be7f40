"""Bad input: a clear ValueError/TypeError that names the argument; nothing silently wrong."""
import math

import pytest
import torch

import fastdiff
from fastdiff import backends, dispatch

S = fastdiff.DDPMSchedule()


def _xm(*shape, dtype=torch.float32):
    return torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)


@pytest.mark.parametrize("call,exc,match", [
    (lambda x, m: fastdiff.ddpm_step(x, m[:, :3], 5, S), ValueError, "model_output: expected shape"),
    (lambda x, m: fastdiff.ddpm_step(x, m.half(), 5, S), TypeError, "model_output: expected dtype"),
    (lambda x, m: fastdiff.ddpm_step(x, m, 1000, S), ValueError, "t: expected 0 <= t < 1000"),
    (lambda x, m: fastdiff.ddpm_step(x, m, -1, S), ValueError, "t: expected"),
    (lambda x, m: fastdiff.ddpm_step(x, m, torch.tensor([0, 5, 1000, 2]), S), ValueError, "t: expected .*sample 2"),
    (lambda x, m: fastdiff.ddpm_step(x, m, torch.tensor([0, 5]), S), ValueError, r"t: expected an int or a \(4,\)"),
    (lambda x, m: fastdiff.ddpm_step(x, m, 5.0, S), TypeError, "t: expected an int"),
    (lambda x, m: fastdiff.ddpm_step(x, m, torch.tensor([0.5] * 4), S), TypeError, "t: expected integer timesteps"),
    (lambda x, m: fastdiff.ddpm_step(x, m, 5, S, prediction="epsilon"), ValueError, "prediction: expected one of"),
    (lambda x, m: fastdiff.ddpm_step(x, m, 5, S, variance="learned"), ValueError, "variance"),
    (lambda x, m: fastdiff.ddpm_step(x, m, 5, "linear"), TypeError, "schedule: expected a fastdiff.DDPMSchedule"),
    (lambda x, m: fastdiff.ddpm_step(x, m, 5, S, noise=m[:2]), ValueError, "noise: expected shape"),
    (lambda x, m: fastdiff.ddpm_step(x, m, 5, S, out=torch.empty(4, 6, dtype=torch.float16)), TypeError, "out: expected dtype"),
    (lambda x, m: fastdiff.ddpm_step(x, m, 5, S, generator=torch.Generator()), TypeError, "generator: expected a fastdiff.Generator"),
    (lambda x, m: fastdiff.ddpm_step(x, (m, m), 5, S), ValueError, "guidance: required"),
    (lambda x, m: fastdiff.ddpm_step(x, m, 5, S, guidance=2.0), ValueError, "guidance: given"),
    (lambda x, m: fastdiff.ddpm_step(x, (m, m, m), 5, S, guidance=2.0), ValueError, r"model_output: a guidance pair"),
    (lambda x, m: fastdiff.ddpm_step(x, m, 5, S, guidance=2.0) if False else fastdiff.ddpm_step(x, (m, m), 5, S, guidance=math.nan), ValueError, "guidance: expected a finite"),
    (lambda x, m: fastdiff.ddpm_step(x.long(), m, 5, S), TypeError, "x: expected a floating-point"),
    (lambda x, m: fastdiff.ddpm_step([1.0], m, 5, S), TypeError, "x: expected a torch.Tensor"),
    (lambda x, m: fastdiff.ddim_step(x, m, 5, 1000, S), ValueError, "t_prev: expected -1 <= t_prev < 1000"),
    (lambda x, m: fastdiff.ddim_step(x, m, 5, 2, S, eta=-0.1), ValueError, "eta: expected eta >= 0"),
    (lambda x, m: fastdiff.euler_step(x, m, 0.0, 0.0), ValueError, "sigma: expected sigma > 0"),
    (lambda x, m: fastdiff.euler_step(x, m, math.inf, 0.0), ValueError, "sigma: expected a finite"),
    (lambda x, m: fastdiff.euler_step(x, m, 1.0, -0.5), ValueError, "sigma_next: expected sigma_next >= 0"),
    (lambda x, m: fastdiff.euler_step(x, m, torch.tensor([1.0, math.nan, 1.0, 1.0]), 0.5), ValueError, "sigma: expected finite values.*sample 1"),
    (lambda x, m: fastdiff.euler_step(x, m, torch.ones(3), 0.5), ValueError, r"sigma: expected a scalar or a \(4,\)"),
    (lambda x, m: fastdiff.heun_step(x, m, 1.0, 0.5, x_pred=x), ValueError, "model_output_pred: required"),
    (lambda x, m: fastdiff.heun_step(x, m, 1.0, 0.5, model_output_pred=m), ValueError, "x_pred: required"),
    (lambda x, m: fastdiff.langevin_step(x, m, 0.0), ValueError, "step_size: expected step_size > 0"),
    (lambda x, m: fastdiff.langevin_step(x, m, 0.1, prediction="eps"), ValueError, "sigma: required"),
    (lambda x, m: fastdiff.edm_churn(x, 1.0, -0.1), ValueError, "gamma: expected gamma >= 0"),
    (lambda x, m: fastdiff.ddpm_step(x, m, 5, S, backend="cuda-graphs"), ValueError, "backend: expected one of"),
])
def test_bad_input(call, exc, match):
    x, m = _xm(4, 6)
    with pytest.raises(exc, match=match):
        call(x, m)


def test_backend_forced_on_wrong_device_or_dtype():
    """Every kernel backend of the fused step (from the dispatch table): refused by name where it
    cannot run here, and for float64 tensors where it can."""
    x, m = _xm(4, 6)
    for impl in dispatch.OPS["fused_step"].impls:
        b = impl.backend
        if b == "torch":
            continue
        if backends.available()[b][0]:
            with pytest.raises(TypeError, match=f"backend='{b}' takes float32"):
                fastdiff.euler_step(x.double(), m.double(), 1.0, 0.5, backend=b)
        elif not torch.cuda.is_available() or b != "triton":
            with pytest.raises((RuntimeError, ValueError), match=f"backend='{b}'"):
                fastdiff.euler_step(x, m, 1.0, 0.5, backend=b)


def test_device_mismatch_names_argument():
    x, m = _xm(4, 6)
    meta = torch.empty(4, 6, device="meta")
    with pytest.raises(ValueError, match="model_output: expected a tensor on cpu"):
        fastdiff.ddpm_step(x, meta, 5, S)


@pytest.mark.parametrize("make,match", [
    (lambda: fastdiff.DDPMSchedule(betas=[0.1, float("nan"), 0.2]), "betas: schedule is not finite"),
    (lambda: fastdiff.DDPMSchedule(betas=[0.1, 1.5]), r"betas: every beta_t must lie in \(0, 1\)"),
    (lambda: fastdiff.DDPMSchedule(beta_min=float("inf")), "beta_min"),
    (lambda: fastdiff.DDPMSchedule(T=0), "T: expected a positive int"),
    (lambda: fastdiff.KarrasSchedule(0), "n: expected a positive int"),
    (lambda: fastdiff.KarrasSchedule(10, sigma_min=-1.0), "sigma_min"),
    (lambda: fastdiff.KarrasSchedule(10, sigma_min=100.0, sigma_max=1.0), "sigma_min: expected <= sigma_max"),
    (lambda: fastdiff.KarrasSchedule(10, rho=float("nan")), "rho"),
])
def test_bad_schedule(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_empty_batch_is_fine():
    x = torch.empty(0, 5)
    assert fastdiff.ddpm_step(x, x, 5, S, generator=fastdiff.Generator(0)).shape == (0, 5)


def test_index_math_past_2_31_on_an_expanded_view():
    """A (2^31 + 64)-element stride-0 view: the per-sample row index and the noise counter are
    64-bit.  Only the dispatcher's flattening and row math run (the kernel itself is tested on
    windows past 2^31 in test_fused_kernel.py); nothing of 8 GB is allocated."""
    n = 2**31 + 64
    x = torch.zeros(1).expand(2, n // 2)
    assert x.numel() == n and x.numel() > 2**31
    g = fastdiff.Generator(5)
    assert g.draw(x.numel()) == 0 and g.offset == n  # the window covers all 2^31 + 64 draws
