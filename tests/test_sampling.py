"""fastdiff.sample: the fused trajectory kernels against the step-by-step loop and a float64 reference
sampler, the samples' distribution (MoLRG: subspace union, component frequencies, covariances;
Gaussian: the exact per-eigenmode prediction of SPEC 4), and bad input."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

import fastdiff
from fastdiff import sampling
from fastdiff.denoisers import Gaussian, MoLRG
from fastdiff.reference import denoisers as RD, rng as RR, steps as RS
from conftest import backend_devices


FUSED = backend_devices("trajectory", torch_=False)
CPP = [p for p in FUSED if p[0] == "cpp"]


def _bases(n, dims, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.linalg.qr(torch.randn(n, d, generator=gen, dtype=torch.float64))[0].to(dtype) for d in dims]


def _model(n=13, dims=(2, 4, 3), seed=0, **kw):
    kw.setdefault("pi", [0.2, 0.3, 0.5][:len(dims)] if len(dims) == 3 else None)
    kw.setdefault("tau", [1.0, 0.7, 1.3][:len(dims)] if len(dims) == 3 else None)
    return MoLRG(_bases(n, dims, seed), **kw)


# (method, schedule, options): T = 1000 steps each (langevin: 2 levels x 500)
METHODS = [
    ("ddpm", lambda: fastdiff.DDPMSchedule(), {}),
    ("ddpm", lambda: fastdiff.DDPMSchedule.linear(), {"variance": "fixed_large"}),
    ("ddim", lambda: fastdiff.DDPMSchedule(), {"eta": 0.0}),
    ("ddim", lambda: fastdiff.DDPMSchedule(), {"eta": 1.0, "steps": 1000}),
    ("euler", lambda: fastdiff.KarrasSchedule(1000), {}),
    ("euler", lambda: fastdiff.KarrasSchedule(1000), {"churn": 40.0}),
    ("euler_ancestral", lambda: fastdiff.KarrasSchedule(1000), {"eta": 0.7, "s_noise": 1.01}),
    ("heun", lambda: fastdiff.KarrasSchedule(1000), {}),
    ("heun", lambda: fastdiff.KarrasSchedule(1000), {"churn": 40.0, "s_noise": 1.003}),
    ("langevin", lambda: [1.0, 0.2], {"steps": 500}),
    ("walk_jump", lambda: 0.3, {"steps": 1000}),
]


def _close(a, b, tol, scale=None):
    """|a - b| <= tol (scale + 1); scale: max |b| (default), or the largest state along the trajectory
    where the final state is much smaller than the states it came from (float32 rounding of the
    large intermediate states carries over as absolute error)."""
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    err = (a - b).abs().max().item()
    scale = b.abs().max().item() if scale is None else float(scale)
    assert err <= tol * (scale + 1.0), f"max abs err {err:.3g} (tol {tol}, scale {scale:.3g})"


# ------------------------------------------------------------------------------------ fused == loop
@pytest.mark.parametrize("backend,device", CPP, ids=[f"{b}-{d}" for b, d in CPP])
@pytest.mark.parametrize("case", range(len(METHODS)), ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(METHODS)])
def test_fused_equals_loop_T1000(backend, device, case):
    """Acceptance 1: same seed, same result after T = 1000 steps.  On CPU both paths run the same
    per-row denoiser routine, the same Philox normals and the same fused multiply-adds, so they
    agree bit for bit except for rare last-bit differences of a vectorized vs scalar Box-Muller;
    1e-5 of the sample scale (float32 eps ~ 1.2e-7 amplified by at most ~100 over the run) is the bound."""
    method, sched, kw = METHODS[case]
    m = _model()
    B, n = 37, 13  # odd sizes: tiles and rows straddle SIMD vectors and Philox quads
    gen_f, gen_l = fastdiff.Generator(7, 12), fastdiff.Generator(7, 12)
    nsteps = len(sampling.trajectory_table(sched(), method, **kw))  # 1000 (walk_jump: + the jump)
    snaps = [0, 1, 500, 999, nsteps]
    a, ta = fastdiff.sample(m, (B, n), sched(), method, generator=gen_f, backend=backend, fused=True,
                            return_trajectory=snaps, progress=False, **kw)
    b, tb = fastdiff.sample(m, (B, n), sched(), method, generator=gen_l, fused=False, return_trajectory=snaps,
                            progress=False, **kw)
    assert gen_f.offset == gen_l.offset > 12  # both drew the same windows
    _close(a, b, 1e-5)
    _close(ta, tb, 1e-5)
    assert torch.equal(ta[-1], a) and a.dtype == torch.float32 and a.shape == (B, n)


@pytest.mark.parametrize("backend,device", CPP, ids=[f"{b}-{d}" for b, d in CPP])
@pytest.mark.parametrize("mode,labels", [("hard", False), ("soft", True), ("hard", True)])
def test_fused_equals_loop_hard_and_cfg(backend, device, mode, labels):
    m = _model(n=20, dims=(3, 3, 5), mode=mode, delta=0.1)
    B = 50
    y = torch.arange(B) % 3 if labels else None
    w = 2.5 if labels else None
    for method, sched in (("ddpm", fastdiff.DDPMSchedule()), ("heun", fastdiff.KarrasSchedule(200))):
        kw = dict(labels=y, guidance=w, progress=False)
        a = fastdiff.sample(m, (B, 20), sched, method, generator=fastdiff.Generator(3), backend=backend, **kw)
        b = fastdiff.sample(m, (B, 20), sched, method, generator=fastdiff.Generator(3), fused=False, **kw)
        _close(a, b, 1e-5)


@pytest.mark.parametrize("backend,device", FUSED, ids=[f"{b}-{d}" for b, d in FUSED])
@pytest.mark.parametrize("method", ["ddpm", "heun", "euler_ancestral"])
def test_fused_short_equals_loop_all_options(backend, device, method):
    """Every kernel (the Triton one under the interpreter: small T and sizes), every option:
    hard / soft, labels + CFG, I instances with their own pi / tau, ragged dims, trajectory."""
    I, B, n, dims = 3, 17, 13, (2, 5, 3)
    sched = fastdiff.DDPMSchedule(T=8) if method == "ddpm" else fastdiff.KarrasSchedule(6)
    kw = {"churn": 3.0} if method == "heun" else {}
    for mode in ("soft", "hard"):
        models = [MoLRG(_bases(n, dims, 30 + i), pi=[0.2, 0.3 + 0.1 * i, 0.5 - 0.1 * i], tau=[1.0, 0.6, 1.0 + i],
                        delta=0.02 * i, mode=mode) for i in range(I)]
        x = fastdiff.randn(I, B, n, generator=fastdiff.Generator(1)).to(device)
        y = (torch.arange(I * B) % 3).reshape(I, B)
        for labels, w in ((None, None), (y, 2.0)):
            a, ta = fastdiff.sample(models, x, sched, method, generator=fastdiff.Generator(2), backend=backend, fused=True,
                                    labels=labels, guidance=w, return_trajectory=True, progress=False, **kw)
            b, tb = fastdiff.sample(models, x.cpu(), sched, method, generator=fastdiff.Generator(2), fused=False,
                                    labels=labels, guidance=w, return_trajectory=True, progress=False, **kw)
            scale = tb.abs().max()
            _close(a, b, 1e-5, scale)
            _close(ta, tb, 1e-5)


@pytest.mark.parametrize("backend,device", CPP, ids=[f"{b}-{d}" for b, d in CPP])
def test_instances_equal_loop_and_single_calls(backend, device):
    """I instances (different bases, and different pi / tau) in one call == each instance alone."""
    I, B, n, dims = 5, 9, 11, (2, 3)
    models = [MoLRG(_bases(n, dims, 10 + i), pi=[0.3 + 0.05 * i, 0.7 - 0.05 * i], tau=[1.0, 0.5 + 0.1 * i])
              for i in range(I)]
    x = fastdiff.randn(I, B, n, generator=fastdiff.Generator(1))
    labels = torch.randint(0, 2, (I, B), generator=torch.Generator().manual_seed(0))
    sched = fastdiff.DDPMSchedule(T=300)
    for kw in ({}, {"labels": labels, "guidance": 1.5}):
        a = fastdiff.sample(models, x, sched, generator=fastdiff.Generator(4), backend=backend, progress=False, **kw)
        b = fastdiff.sample(models, x, sched, generator=fastdiff.Generator(4), fused=False, progress=False, **kw)
        _close(a, b, 1e-5)
    # instances drawn with deterministic steps are independent: each equals its own single call
    a = fastdiff.sample(models, x, sched, "ddim", backend=backend, progress=False)
    for i in range(I):
        single = fastdiff.sample(models[i], x[i], sched, "ddim", backend=backend, progress=False)
        _close(a[i], single, 1e-6)
    # a (I, K, n, d) bases tensor is I MoLRG instances with default pi / tau / delta
    U = torch.stack([torch.stack(_bases(n, (3, 3), 20 + i)) for i in range(I)])
    a = fastdiff.sample(U, x, sched, "ddim", backend=backend, progress=False)
    b = fastdiff.sample([MoLRG(u) for u in U], x, sched, "ddim", fused=False, progress=False)
    _close(a, b, 1e-5)


@pytest.mark.parametrize("backend,device", FUSED, ids=[f"{b}-{d}" for b, d in FUSED])
@pytest.mark.parametrize("case", range(len(METHODS)), ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(METHODS)])
def test_fused_matches_float64_reference(backend, device, case):
    """The fused trajectory against a float64 sampler written from the SPEC formulas
    (fastdiff.reference steps and denoiser, the same Philox noise windows), 12 steps.  float32
    state vs float64: ~1e-6 per step relative, 2e-5 over the run (interpreter shapes)."""
    method, sched_fn, kw = METHODS[case]
    sched = _short(sched_fn(), method)
    kw = dict(kw)
    if "steps" in kw or method == "ddim":
        kw["steps"] = 6 if method == "langevin" else 12
    B, n, dims = 16, 16, (3, 4, 2)
    m = _model(n=n, dims=dims, delta=0.05)
    x = fastdiff.randn(B, n, generator=fastdiff.Generator(2)) * (80.0 if method in ("euler", "euler_ancestral", "heun") else 1.0)
    gen = fastdiff.Generator(9)
    got = fastdiff.sample(m, x.to(device), sched, method, generator=gen.clone(), backend=backend, fused=True,
                          progress=False, **kw)
    ref = _reference_sampler(m, x.double(), sched, method, gen.clone(), **kw)
    _close(got, ref, 2e-5)


def _short(sched, method):
    if isinstance(sched, fastdiff.DDPMSchedule):
        return fastdiff.DDPMSchedule(T=12) if method == "ddpm" else sched
    if isinstance(sched, fastdiff.KarrasSchedule):
        return fastdiff.KarrasSchedule(12)
    return sched


def _reference_sampler(m, x, sched, method, gen, *, eta=None, churn=0.0, s_noise=1.0, variance="fixed_small", steps=None):
    """SPEC 1 in float64 with fastdiff.reference; noise windows drawn from ``gen`` like the steps do."""
    U = [u.double() for u in m.bases]

    def D(x, a, s):
        return RD.molrg_denoise(x, U, a, s, pi=m.pi, tau=m.tau, delta=m.delta, mode=m.mode)

    def z():
        return torch.from_numpy(RR.randn(gen.seed, gen.draw(x.numel()), x.numel()).astype(np.float64)).reshape(x.shape)

    if method == "ddpm":
        for t in range(sched.T - 1, -1, -1):
            a, s = math.sqrt(sched.floats("abar")[t]), math.sqrt(1 - sched.floats("abar")[t])
            x = RS.ddpm_step(x, D(x, a, s), t, sched, prediction="x0", variance=variance, noise=z() if t > 0 else None)
        return x
    if method == "ddim":
        T = sched.T
        n = T if steps is None else steps
        ts = [round((T - 1) * (1 - i / (n - 1))) for i in range(n)]
        for i, t in enumerate(ts):
            tp = ts[i + 1] if i + 1 < n else -1
            a, s = math.sqrt(sched.floats("abar")[t]), math.sqrt(1 - sched.floats("abar")[t])
            x = RS.ddim_step(x, D(x, a, s), t, tp, sched, eta=eta, prediction="x0",
                             noise=z() if eta and tp >= 0 else None)
        return x
    if method in ("euler", "heun", "euler_ancestral"):
        sig = sched.floats("sigmas")
        gamma = min(churn / sched.n, math.sqrt(2) - 1) if churn else 0.0
        for i in range(sched.n):
            s, sn = sig[i], sig[i + 1]
            if gamma > 0:
                x, sh = RS.edm_churn(x, s, gamma, s_noise=s_noise, noise=z())
                s = float(sh)
            if method == "euler_ancestral":
                x = RS.euler_ancestral_step(x, D(x, 1.0, s), s, sn, eta=eta, s_noise=s_noise, noise=z() if sn > 0 else None)
                continue
            d0 = D(x, 1.0, s)
            xp = RS.euler_step(x, d0, s, sn)
            if method == "heun" and sn > 0:
                xp = RS.heun_step(x, d0, s, sn, x_pred=xp, model_output_pred=D(xp, 1.0, sn))
            x = xp
        return x
    levels = sched if isinstance(sched, list) else [sched]
    for s in levels:
        g = 0.1 * s * s
        for _ in range(steps):
            x = RS.langevin_step(x, D(x, 1.0, s), g, prediction="x0", sigma=s, noise=z())
    return D(x, 1.0, levels[0]) if method == "walk_jump" else x


# ------------------------------------------------------------------------------------ distributions
@pytest.mark.parametrize("backend,device", CPP, ids=[f"{b}-{d}" for b, d in CPP])
def test_molrg_ddpm_samples_union_frequencies_covariance(backend, device):
    """Acceptance 1 (distribution): DDPM, T = 1000, from the fused kernel."""
    n, d, N = 12, 2, 6000
    pi, tau = [0.2, 0.3, 0.5], [1.0, 0.5, 2.0]
    U = _bases(n, (d, d, d), 5)
    m = MoLRG(U, pi=pi, tau=tau)
    x = fastdiff.sample(m, (N, n), fastdiff.DDPMSchedule(), generator=fastdiff.Generator(11), backend=backend,
                        progress=False).double()
    coords = torch.stack([x @ u.double() for u in U])               # (K, N, d)
    resid = torch.stack([(x - c @ u.double().T).norm(dim=1) for c, u in zip(coords, U)]).min(0).values
    # the subspaces meet at 0: a sample within a few final noise levels (sigma_0 = 0.01) of it is
    # genuinely ambiguous for the soft posterior (a mix of projections); away from it (norm > r0 =
    # 5 sigma_0) every sample lies on one subspace.  The data put mass
    # sum_k pi_k (1 - exp(-r0^2 / (2 tau_k^2))) (d = 2: chi-square with 2 dof) within r0 of 0.
    r0 = 0.05
    norm = x.norm(dim=1)
    far = norm > r0
    near_mass = sum(p * (1 - math.exp(-r0 ** 2 / (2 * t ** 2))) for p, t in zip(pi, tau))
    assert (~far).double().mean() < 2 * near_mass + 5 * math.sqrt(near_mass / N)
    assert (resid[far] / norm[far]).max() < 1e-2
    comp = coords.square().sum(-1).argmax(0)
    counts = torch.bincount(comp, minlength=3).numpy()
    p = stats.chisquare(counts, np.array(pi) * N).pvalue
    assert p > 1e-3, (counts, p)
    for k in range(3):
        a = coords[k][comp == k]                                     # (N_k, d) coordinates in U_k
        Nk = a.shape[0]
        C = a.T @ a / Nk                                             # zero-mean covariance estimate
        # sampling error: sd(C_ii) = tau^2 sqrt(2 / N_k), sd(C_ij) = tau^2 / sqrt(N_k); 5 sd bound
        # plus 3% for the sampler's discretization and the assignment of boundary points
        bound = tau[k] ** 2 * (5 * math.sqrt(2 / Nk) + 0.03)
        assert (C - tau[k] ** 2 * torch.eye(d, dtype=torch.float64)).abs().max() < bound, (k, C)


GAUSS_CASES = [
    ("ddpm", lambda: fastdiff.DDPMSchedule(T=200), {}),
    ("ddim", lambda: fastdiff.DDPMSchedule(), {"steps": 10, "eta": 0.5}),
    ("euler", lambda: fastdiff.KarrasSchedule(8, sigma_max=20.0), {"churn": 4.0}),
    ("heun", lambda: fastdiff.KarrasSchedule(6, sigma_max=20.0), {}),
    ("euler_ancestral", lambda: fastdiff.KarrasSchedule(8, sigma_max=20.0), {}),
    ("langevin", lambda: [0.5], {"steps": 30}),
]


@pytest.mark.parametrize("case", range(len(GAUSS_CASES)), ids=[c[0] for c in GAUSS_CASES])
def test_gaussian_covariance_matches_exact_prediction(case):
    """Acceptance 2: sampled covariance (in the eigenbasis) vs the exact per-eigenmode recursion.
    Few steps on purpose: the prediction then differs visibly from the data covariance, so the
    check tests the sampler's recursion, not just 'samples look like the data'."""
    method, sched_fn, kw = GAUSS_CASES[case]
    sched = sched_fn()
    n, N = 6, 40000
    gen = torch.Generator().manual_seed(case)
    V = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    lam = torch.tensor([4.0, 1.0, 0.5, 0.1, 0.02, 0.003], dtype=torch.float64)
    g = Gaussian(torch.zeros(n), V @ torch.diag(lam) @ V.T)
    x = fastdiff.sample(g, (N, n), sched, method, generator=fastdiff.Generator(case), progress=False, **kw).double()
    table = sampling.trajectory_table(sched, method, **kw)
    init = (1.0 if method in ("ddpm", "ddim") else 1.0 + 0.25 if method == "langevin"
            else sched.floats("sigmas")[0] ** 2)  # the variance of x_T drawn from a shape
    pred = sampling.gaussian_sampler_variance(g.eigenvalues, table, init)
    y = x @ g.eigenvectors
    var = (y * y).mean(0)
    # Monte Carlo: sd of a variance estimate from N normals is v sqrt(2 / N); 5 sd, plus float32 rounding
    assert ((var - pred).abs() <= 5 * pred * math.sqrt(2 / N) + 1e-6).all(), (var, pred)
    cov = y.T @ y / N                                                 # modes are independent
    off = cov - torch.diag(torch.diag(cov))
    assert (off.abs() <= 5 * torch.sqrt(pred[:, None] * pred[None, :] / N) + 1e-6).all()
    if method != "langevin":  # the prediction is not just the data: the test can tell samplers apart
        assert ((pred - g.eigenvalues).abs() > 10 * pred * math.sqrt(2 / N)).any()


# ------------------------------------------------------------------------------------ options
def test_reproducible_and_generator_advances():
    m = _model()
    sched = fastdiff.DDPMSchedule(T=50)
    g1, g2 = fastdiff.Generator(5), fastdiff.Generator(5)
    a = fastdiff.sample(m, (10, 13), sched, generator=g1, progress=False)
    b = fastdiff.sample(m, (10, 13), sched, generator=g2, progress=False)
    assert torch.equal(a, b) and g1.offset == g2.offset == 50 * 132  # x_T + 49 noisy steps, quads of 130 -> 132
    c = fastdiff.sample(m, (10, 13), sched, generator=g1, progress=False)
    assert not torch.equal(a, c)
    fastdiff.manual_seed(3)
    d = fastdiff.sample(m, (10, 13), sched, progress=False)
    assert torch.equal(d, fastdiff.sample(m, (10, 13), sched, generator=fastdiff.Generator(3), progress=False))


def test_x_given_is_not_modified_and_numpy_roundtrip():
    m = _model()
    x = fastdiff.randn(8, 13, generator=fastdiff.Generator(0))
    x0 = x.clone()
    out = fastdiff.sample(m, x, fastdiff.DDPMSchedule(T=20), generator=fastdiff.Generator(1), progress=False)
    assert torch.equal(x, x0) and not torch.equal(out, x)
    out_np = fastdiff.sample(m, x.numpy(), fastdiff.DDPMSchedule(T=20), generator=fastdiff.Generator(1), progress=False)
    assert isinstance(out_np, np.ndarray) and np.array_equal(out_np, out.numpy())


@pytest.mark.parametrize("backend,device", CPP, ids=[f"{b}-{d}" for b, d in CPP])
def test_half_dtypes_state_in_float32(backend, device):
    """float16 / bfloat16 x: the fused kernel keeps the state in float32 and rounds once at the end."""
    m = _model()
    x = fastdiff.randn(8, 13, generator=fastdiff.Generator(0))
    ref = fastdiff.sample(m, x, fastdiff.DDPMSchedule(T=30), "ddim", backend=backend, progress=False)
    for dt in (torch.float16, torch.bfloat16):
        xh = x.to(dt)
        got = fastdiff.sample(m, xh, fastdiff.DDPMSchedule(T=30), "ddim", backend=backend, progress=False)
        exp = fastdiff.sample(m, xh.float(), fastdiff.DDPMSchedule(T=30), "ddim", backend=backend, progress=False)
        assert got.dtype == dt and torch.equal(got, exp.to(dt))
        _close(got, ref, {torch.float16: 5e-3, torch.bfloat16: 4e-2}[dt])


def test_return_trajectory_all_and_repeated():
    m = _model()
    sched = fastdiff.KarrasSchedule(10)
    x, tr = fastdiff.sample(m, (6, 13), sched, "heun", generator=fastdiff.Generator(0), return_trajectory=True,
                            progress=False)
    assert tr.shape == (11, 6, 13) and torch.equal(tr[-1], x)
    assert torch.allclose(tr[0].std(), torch.tensor(80.0), rtol=0.3)
    x2, tr2 = fastdiff.sample(m, (6, 13), sched, "heun", generator=fastdiff.Generator(0), return_trajectory=[3, 0, 3, 10],
                              progress=False)
    assert torch.equal(tr2[0], tr[3]) and torch.equal(tr2[1], tr[0]) and torch.equal(tr2[2], tr[3]) and torch.equal(tr2[3], x)


def test_generic_callable_runs_the_loop():
    m = _model()
    calls = []

    def den(x, alpha, sigma):
        calls.append((alpha, sigma))
        return m(x, alpha, sigma)

    a = fastdiff.sample(den, (5, 13), fastdiff.KarrasSchedule(7), "heun", generator=fastdiff.Generator(0), progress=False)
    b = fastdiff.sample(m, (5, 13), fastdiff.KarrasSchedule(7), "heun", generator=fastdiff.Generator(0), progress=False)
    assert len(calls) == 13  # 6 Heun steps x 2 evaluations + the final Euler step
    _close(a, b, 1e-5)


LOOP_CASES = [
    ("ddpm", lambda: fastdiff.DDPMSchedule(T=12), {}),
    ("ddim", lambda: fastdiff.DDPMSchedule(T=40), {"steps": 7, "eta": 0.5}),
    ("heun", lambda: fastdiff.KarrasSchedule(6), {}),
    ("euler", lambda: fastdiff.KarrasSchedule(6), {"churn": 3.0}),
    ("euler_ancestral", lambda: fastdiff.KarrasSchedule(6), {"eta": 0.8}),
    ("walk_jump", lambda: 0.4, {"steps": 5}),
]


@pytest.mark.parametrize("case", range(len(LOOP_CASES)), ids=[c[0] for c in LOOP_CASES])
def test_loop_callback_once_per_step_with_the_step_values(case):
    """fastdiff.sampling.run's callback: once per table row, before the update, with the row's
    index, level and row, the state the denoiser saw and the denoiser's output at it.  Without
    churn that state is the trajectory's (so recording x reproduces return_trajectory); with
    churn it is the churned one.  A callback changes nothing in the result."""
    method, sched_fn, kw = LOOP_CASES[case]
    m = _model()
    sched = sched_fn()
    table = sampling.trajectory_table(sched, method, **kw)
    seen = []
    cb = lambda info: seen.append(info._replace(x=info.x.clone(), x0_hat=info.x0_hat.clone()))  # noqa: E731
    x, traj = fastdiff.sample(m, (7, 13), sched, method, generator=fastdiff.Generator(1), callback=cb,
                              return_trajectory=True, progress=False, **kw)
    assert [s.i for s in seen] == list(range(len(table)))
    for s, row in zip(seen, table):
        assert (s.alpha, s.sigma) == row.level and s.step == row
        assert torch.equal(s.x0_hat, m(s.x, s.alpha, s.sigma))
    states = torch.stack([s.x for s in seen] + [x])
    if method == "euler":   # churn: the denoiser saw x + s1 z, not the trajectory's x
        assert not torch.equal(states[:-1], traj[:-1]) and torch.equal(states[-1], traj[-1])
    else:
        assert torch.equal(states, traj)
    plain = fastdiff.sample(m, (7, 13), sched, method, generator=fastdiff.Generator(1), fused=False,
                            progress=False, **kw)
    assert torch.equal(x, plain)


def test_run_with_a_callable_records_the_trajectory_and_keeps_x():
    m = _model()
    table = sampling.trajectory_table(fastdiff.KarrasSchedule(8), "heun", churn=2.0)
    x_T = fastdiff.randn(5, 13, generator=fastdiff.Generator(0)) * 80.0
    keep = x_T.clone()
    gen = fastdiff.Generator(3)
    xs = []
    out, traj = sampling.run(lambda x, a, s: m(x, a, s), x_T, table, generator=gen, return_trajectory=[0, 8],
                             callback=lambda info: xs.append(info.x.clone()), progress=False)
    assert torch.equal(x_T, keep) and torch.equal(traj[0], x_T) and torch.equal(traj[1], out)
    assert len(xs) == 8 and gen.offset == 8 * 68   # 8 churn draws of 65 normals, quads of 65 -> 68
    ref = fastdiff.sample(m, x_T, fastdiff.KarrasSchedule(8), "heun", churn=2.0, generator=fastdiff.Generator(3),
                          fused=False, progress=False)
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="fused"):
        fastdiff.sample(m, x_T, fastdiff.KarrasSchedule(8), "heun", fused=True, callback=lambda info: None)
    with pytest.raises(TypeError, match="denoiser"):
        sampling.run(3.0, x_T, table)
    with pytest.raises(TypeError, match="generator"):
        sampling.run(m, x_T, table, generator=torch.Generator())


def test_ve_levels_as_a_tensor_or_a_list():
    """euler / heun / euler_ancestral take VE levels as a KarrasSchedule or a 1-D sequence of sigmas
    (what fastdiff.guidance and jacobian_rank_trajectory accept): the same levels, the same run."""
    m = _model()
    K = fastdiff.KarrasSchedule(9)
    for method in ("heun", "euler_ancestral"):
        runs = [fastdiff.sample(m, (6, 13), sched, method, generator=fastdiff.Generator(2), progress=False)
                for sched in (K, K.sigmas, tuple(K.floats("sigmas")), K.floats("sigmas"))]
        assert all(torch.equal(r, runs[0]) for r in runs[1:])
        short = fastdiff.sample(m, (6, 13), [80.0, 3.0, 0.5], method, generator=fastdiff.Generator(2), progress=False)
        assert torch.isfinite(short).all()   # ends at sigma = 0.5 (a last level > 0: a full Heun step)
    with pytest.raises(ValueError, match="schedule: expected at least two"):
        fastdiff.sample(m, (2, 13), [1.0, 2.0, 0.0], "heun")
    with pytest.raises(ValueError, match="steps"):
        fastdiff.sample(m, (2, 13), [1.0, 0.5, 0.0], "heun", steps=3)
    with pytest.raises(TypeError, match="schedule"):
        fastdiff.sample(m, (2, 13), torch.ones(2, 3), "euler")


def test_torch_backend_runs_the_loop_in_torch():
    m = _model()
    a = fastdiff.sample(m, (5, 13), fastdiff.DDPMSchedule(T=40), generator=fastdiff.Generator(0), backend="torch",
                        progress=False)
    b = fastdiff.sample(m, (5, 13), fastdiff.DDPMSchedule(T=40), generator=fastdiff.Generator(0), progress=False)
    _close(a, b, 1e-5)


def test_progress_bar(capsys):
    m = _model()
    fastdiff.sample(m, (4, 13), fastdiff.DDPMSchedule(T=20), progress=True, disable=True)
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------ bad input
def test_bad_input():
    m = _model()
    S = fastdiff.DDPMSchedule(T=10)
    K = fastdiff.KarrasSchedule(5)
    with pytest.raises(ValueError, match="method"):
        fastdiff.sample(m, (2, 13), S, "dpm")
    with pytest.raises(TypeError, match="schedule.*KarrasSchedule"):
        fastdiff.sample(m, (2, 13), S, "euler")
    with pytest.raises(TypeError, match="schedule.*DDPMSchedule"):
        fastdiff.sample(m, (2, 13), K, "ddpm")
    with pytest.raises(ValueError, match="steps"):
        fastdiff.sample(m, (2, 13), S, "ddpm", steps=5)
    with pytest.raises(ValueError, match="steps"):
        fastdiff.sample(m, (2, 13), S, "ddim", steps=11)
    with pytest.raises(ValueError, match="steps"):
        fastdiff.sample(m, (2, 13), S, "ddim", steps=0)
    with pytest.raises(ValueError, match="churn"):
        fastdiff.sample(m, (2, 13), K, "heun", churn=-1.0)
    with pytest.raises(ValueError, match="eta"):
        fastdiff.sample(m, (2, 13), S, "ddim", eta=-0.1)
    with pytest.raises(ValueError, match="eta"):
        fastdiff.sample(m, (2, 13), K, "heun", eta=0.5)
    with pytest.raises(ValueError, match="schedule"):
        fastdiff.sample(m, (2, 13), [0.5, -1.0], "langevin")
    with pytest.raises(TypeError, match="schedule"):
        fastdiff.sample(m, (2, 13), "linear", "langevin")
    with pytest.raises(ValueError, match="x: expected shape"):
        fastdiff.sample(m, (2, 12), S)
    with pytest.raises(TypeError, match="x:"):
        fastdiff.sample(m, "big", S)
    with pytest.raises(TypeError, match="generator"):
        fastdiff.sample(m, (2, 13), S, generator=torch.Generator())
    with pytest.raises(ValueError, match="guidance: required"):
        fastdiff.sample(m, (2, 13), S, labels=[0, 1])
    with pytest.raises(ValueError, match="guidance: given"):
        fastdiff.sample(m, (2, 13), S, guidance=2.0)
    with pytest.raises(ValueError, match="labels: expected shape"):
        fastdiff.sample(m, (2, 13), S, labels=[0, 1, 2], guidance=2.0)
    with pytest.raises(ValueError, match="labels: expected values"):
        fastdiff.sample(m, (2, 13), S, labels=[0, 3], guidance=2.0)
    with pytest.raises(TypeError, match="labels"):
        fastdiff.sample(m, (2, 13), S, labels=[0.0, 1.0], guidance=2.0)
    with pytest.raises(ValueError, match="return_trajectory"):
        fastdiff.sample(m, (2, 13), S, return_trajectory=[11])
    with pytest.raises(ValueError, match="fused"):
        fastdiff.sample(lambda x, a, s: x, (2, 13), S, fused=True)
    with pytest.raises(TypeError, match="denoiser"):
        fastdiff.sample(3.0, (2, 13), S)
    with pytest.raises(ValueError, match=r"x: expected shape \(I, B, n\)"):
        fastdiff.sample([m, m], (3, 2, 13), S)
    with pytest.raises(ValueError, match=r"denoiser\[1\]"):
        fastdiff.sample([m, _model(n=12)], (2, 2, 13), S)
    with pytest.raises(ValueError, match="mode"):
        MoLRG(_bases(13, (2,), 0), mode="argmax")
    with pytest.raises(ValueError, match="backend"):
        fastdiff.sample(m, (2, 13), S, backend="gpu")


@pytest.mark.parametrize("backend,device", FUSED, ids=[f"{b}-{d}" for b, d in FUSED])
def test_philox_offsets_past_2_32_quads(backend, device):
    """Noise windows straddling quad index 2^32 (64-bit counters: the high word carries)."""
    m = _model()
    x = fastdiff.randn(6, 13, generator=fastdiff.Generator(0)).to(device)
    start = 2**34 - 64  # quad 2^32 - 16: the first window crosses into the high word
    a = fastdiff.sample(m, x, fastdiff.DDPMSchedule(T=6), generator=fastdiff.Generator(3, start), backend=backend,
                        fused=True, progress=False)
    b = fastdiff.sample(m, x.cpu(), fastdiff.DDPMSchedule(T=6), generator=fastdiff.Generator(3, start), fused=False,
                        progress=False)
    _close(a, b, 1e-5)
    c = fastdiff.sample(m, x, fastdiff.DDPMSchedule(T=6), generator=fastdiff.Generator(3, 0), backend=backend,
                        progress=False)
    assert not torch.allclose(a.cpu(), c.cpu())
