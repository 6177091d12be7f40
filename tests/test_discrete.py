"""Discrete data under binary-flip noise (docs/math.md section 7): the models' exact q, score and
E[x | y] against brute-force enumeration; the fused flip on every backend against its formula and
the uniform stream; the noise's statistics; bad input."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

import fastdiff
from fastdiff.denoisers import BinaryEmpirical, BinaryMixture
from fastdiff.discrete import binary_flip, discrete_langevin, discrete_langevin_step
from fastdiff.ops.discrete_langevin import LAUNCHERS
from fastdiff.reference import discrete as RD
from fastdiff.reference import rng as ref_rng

from conftest import backend_devices

FLIP_BACKENDS = backend_devices("discrete_langevin")


def _mixture(d, K, gen, extremes=True):
    mu = torch.rand(K, d, generator=gen, dtype=torch.float64) * 1.8 - 0.9
    if extremes and d > 1:  # deterministic coordinates (mu = +-1) exercise the infinite atanh
        mu[0, 0], mu[-1, 1] = 1.0, -1.0
    w = torch.rand(K, generator=gen, dtype=torch.float64) + 0.1
    return w, mu


def _binary(shape, gen):
    return (torch.randint(0, 2, shape, generator=gen) * 2 - 1).double()


# --------------------------------------------------------------------------- E[x | y] vs enumeration
@pytest.mark.parametrize("d,K,B", [(1, 1, 1), (3, 2, 5), (7, 4, 9), (12, 3, 4)])
def test_mixture_posterior_matches_enumeration(d, K, B):
    gen = torch.Generator().manual_seed(d)
    w, mu = _mixture(d, K, gen)
    m = BinaryMixture(w, mu)
    pmf = RD.mixture_pmf(w, mu)
    X, p = m.pmf()
    assert torch.allclose(p, pmf, rtol=0, atol=1e-15) and abs(float(p.sum()) - 1) < 1e-12
    for y in (_binary((B, d), gen), torch.randn(B, d, generator=gen, dtype=torch.float64) * 2):  # on and off the cube
        for alpha in (0.3, 1.7):
            lq_ref, E_ref = RD.posterior_brute(pmf, y, alpha)
            lq, s = m.log_q_and_score(y, alpha)
            torch.testing.assert_close(m.posterior_mean(y, alpha), E_ref, rtol=0, atol=1e-12)
            torch.testing.assert_close(lq, lq_ref, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(s, alpha * E_ref, rtol=0, atol=1e-12)
            torch.testing.assert_close(m.score(y, alpha), s, rtol=0, atol=0)
            # float32: the same to float32 rounding
            E32 = m.posterior_mean(y.float(), alpha)
            assert E32.dtype == torch.float32
            torch.testing.assert_close(E32.double(), E_ref, rtol=0, atol=2e-5 * d)
    # the denoiser is sign(E[x | y])
    y = _binary((B, d), gen)
    E = RD.posterior_brute(pmf, y, 0.8)[1]
    assert torch.equal(m.denoise(y, 0.8), torch.where(E >= 0, 1.0, -1.0).double())
    # q is a pmf on the cube
    assert abs(float(m.log_q(X, 0.9).exp().sum()) - 1) < 1e-12


@pytest.mark.parametrize("d,N,chunk", [(1, 1, None), (4, 9, 2), (7, 200, 7), (12, 301, None)])
def test_empirical_posterior_matches_enumeration_streamed(d, N, chunk):
    gen = torch.Generator().manual_seed(100 + d)
    data = _binary((N, d), gen)
    data[N // 2:] = data[: N - N // 2].clone()  # duplicates: the empirical pmf has weights 2/N
    m = BinaryEmpirical(data, chunk=chunk)
    code = RD.index(data)
    pmf = torch.bincount(code, minlength=1 << d).double() / N
    torch.testing.assert_close(m.pmf()[1], pmf, rtol=0, atol=0)
    # the empirical law has zeros: enumerate only its support (log 0 = -inf is fine in the softmax)
    for y in (_binary((6, d), gen), torch.randn(6, d, generator=gen, dtype=torch.float64)):
        for alpha in (0.5, 3.0):
            lq_ref, E_ref = RD.posterior_brute(pmf, y, alpha)
            lq, s = m.log_q_and_score(y, alpha)
            torch.testing.assert_close(lq, lq_ref, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(s / alpha, E_ref, rtol=0, atol=1e-12)
            torch.testing.assert_close(m.posterior_mean(y.float(), alpha).double(), E_ref, rtol=0, atol=2e-5 * d)
    # the same law as a mixture with K = N binary means
    mix = BinaryMixture(torch.ones(N), data)
    y = torch.randn(5, d, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(mix.log_q(y, 1.1), m.log_q(y, 1.1), rtol=1e-12, atol=1e-12)


def test_score_is_the_gradient_of_log_q():
    gen = torch.Generator().manual_seed(3)
    w, mu = _mixture(6, 3, gen)
    for m in (BinaryMixture(w, mu), BinaryEmpirical(_binary((40, 6), gen))):
        y = torch.randn(4, 6, generator=gen, dtype=torch.float64).requires_grad_(True)
        (g,) = torch.autograd.grad(m.log_q(y, 0.7).sum(), y)
        torch.testing.assert_close(m.score(y.detach(), 0.7), g, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- the fused flip
def _flip_case(n, gen, with_score=True):
    anchor = torch.randn(n, generator=gen) * 2
    score = torch.randn(n, generator=gen) * 3 if with_score else None
    return anchor, score


@pytest.mark.parametrize("backend,device", FLIP_BACKENDS)
@pytest.mark.parametrize("n", [1, 3, 4, 5, 1023, 2049, 4099])
def test_flip_matches_formula_and_uniform_stream(backend, device, n):
    """Every element equals ``+1 if u < sigmoid(a s + b v) else -1`` with ``u`` the reference uniform
    stream (rng.rand), except where ``u`` is within float32 rounding of ``sigmoid`` (none expected)."""
    if backend == "triton" and n > 2049:
        pytest.skip("interpreter: small shapes")
    gen = torch.Generator().manual_seed(n)
    for seed, offset, with_score in [(0, 0, True), (2**63 + 5, 4 * 2**32 + 8, True), (11, 12, False)]:
        anchor, score = _flip_case(n, gen, with_score)
        out = torch.empty(n)
        LAUNCHERS[backend](out, anchor, score, 1.3, 0.7, seed, offset)
        u = torch.from_numpy(ref_rng.rand(seed, offset, n))
        ref = RD.flip(anchor, score, 1.3, 0.7, u).float()
        logit = 0.7 * anchor.double() + (1.3 * score.double() if score is not None else 0)
        near = (u.double() - torch.sigmoid(logit)).abs() < 1e-6
        bad = (out != ref) & ~near
        assert not bool(bad.any()), f"{int(bad.sum())} of {n} flips differ from the formula"
        assert int((out != ref).sum()) <= int(near.sum())


def test_uniform_stream_definition():
    """The uniforms are Philox words mapped by Triton's uint_to_uniform_float: torch == numpy
    bitwise, in [0, 1), and (as a stream) uniform with independent neighbours."""
    for seed, offset, n in [(0, 0, 1001), (2**63 + 5, 4 * 2**32 + 8, 513), (7, 2**62, 17)]:
        a = ref_rng.rand(seed, offset, n)
        b = ref_rng.rand_torch(seed, offset, n).numpy()
        assert np.array_equal(a, b)
    u = ref_rng.rand(5, 0, 1 << 16).astype(np.float64)
    assert u.min() >= 0 and u.max() < 1
    assert stats.kstest(u, "uniform").pvalue > 1e-4
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 5 / math.sqrt(u.size)
    # a window is the same numbers as the longer stream it sits in
    assert np.array_equal(ref_rng.rand(9, 8, 10), ref_rng.rand(9, 0, 18)[8:])


def test_kernel_backends_agree():
    """C++ and the Triton interpreter draw the same flips (bitwise here; in general they may differ
    only where u is within an ulp of sigmoid(l), ~1e-7 per element)."""
    kernels = [b for b, _ in FLIP_BACKENDS if b != "torch"]
    if len(kernels) < 2:
        pytest.skip("needs the C++ and the Triton (interpreter) kernels")
    gen = torch.Generator().manual_seed(0)
    anchor, score = _flip_case(3001, gen)
    outs = []
    for b in kernels:
        o = torch.empty(3001)
        LAUNCHERS[b](o, anchor, score, 2.0, 1.5, 42, 4)
        outs.append(o)
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


@pytest.mark.parametrize("backend,device", [p for p in FLIP_BACKENDS if p[0] != "triton"])
def test_flip_frequencies(backend, device):
    """P(+1) = sigmoid(l): for each of 8 logits, 2^14 draws; binomial z-scores within 5."""
    logits = torch.tensor([-6.0, -2.0, -0.5, 0.0, 0.3, 1.0, 3.0, 7.0])
    reps = 1 << 14
    anchor = logits.repeat_interleave(reps)
    out = torch.empty_like(anchor)
    LAUNCHERS[backend](out, anchor, None, 0.0, 1.0, 2024, 0)
    k = (out.view(8, reps) > 0).double().sum(1)
    p = torch.sigmoid(logits.double())
    z = (k - reps * p) / torch.sqrt(reps * p * (1 - p))
    assert bool((z.abs() < 5).all()), z


def test_nan_logit_gives_minus_one():
    for backend, _ in FLIP_BACKENDS:
        out = torch.empty(8)
        LAUNCHERS[backend](out, torch.full((8,), math.nan), None, 0.0, 1.0, 0, 0)
        assert bool((out == -1).all()), backend


# --------------------------------------------------------------------------- binary-flip noise
def test_binary_flip_noise_statistics_and_generator():
    """P(y_i != x_i) = sigmoid(-2 alpha) (the talk's P(eps_i = -1)); draws advance the generator."""
    gen = torch.Generator().manual_seed(1)
    x = _binary((64, 1024), gen).float()
    for alpha in (0.25, 1.0):
        g = fastdiff.Generator(7)
        y = binary_flip(x, alpha, generator=g)
        assert g.offset == x.numel()
        assert set(y.unique().tolist()) <= {-1.0, 1.0}
        n, k = x.numel(), int((y != x).sum())
        p = 1 / (1 + math.exp(2 * alpha))
        assert abs(k - n * p) / math.sqrt(n * p * (1 - p)) < 5
        y2 = binary_flip(x, alpha, generator=fastdiff.Generator(7), backend="torch")
        assert int((y2 != y).sum()) <= 2  # torch and the kernel: the same uniforms
        assert not torch.equal(binary_flip(x, alpha, generator=g), y)  # the next window


def test_one_stage_step_formula():
    gen = torch.Generator().manual_seed(2)
    y = _binary((3, 17), gen).float()
    s = torch.randn(3, 17, generator=gen)
    yp = discrete_langevin_step(y, s, 0.8, generator=fastdiff.Generator(5, 16))
    u = torch.from_numpy(ref_rng.rand(5, 16, y.numel())).view(3, 17)
    assert torch.equal(yp, RD.flip(y, s, 1.0, 2 / 0.8, u).float())


# --------------------------------------------------------------------------- bad input
def test_errors_name_the_argument():
    m = BinaryMixture(torch.ones(2), torch.zeros(2, 3))
    y = torch.ones(2, 3)
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="alpha"):
            m.score(y, bad)
        with pytest.raises(ValueError, match="alpha"):
            binary_flip(y, bad)
        with pytest.raises(ValueError, match="alpha"):
            discrete_langevin(m, y, bad, steps=1, eta=1.0)
        with pytest.raises(ValueError, match="eta"):
            discrete_langevin(m, y, 1.0, steps=1, eta=bad)
    with pytest.raises(ValueError, match=r"data: expected binary entries in \{-1, \+1\}, got 0.0 \(a \{0, 1\}"):
        BinaryEmpirical(torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="data: expected binary"):
        BinaryEmpirical(torch.tensor([[0.5, 1.0]]))
    with pytest.raises(ValueError, match="x: expected binary"):
        binary_flip(torch.tensor([[1.0, 0.3]]), 1.0)
    with pytest.raises(ValueError, match="y: expected binary"):
        discrete_langevin(m, torch.tensor([[1.0, 2.0, 1.0]]), 1.0, steps=1, eta=1.0)
    with pytest.raises(ValueError, match="y: expected binary"):
        discrete_langevin_step(torch.zeros(1, 3), torch.zeros(1, 3), 1.0)
    with pytest.raises(ValueError, match="means"):
        BinaryMixture(torch.ones(1), torch.full((1, 3), 1.5))
    with pytest.raises(ValueError, match="weights"):
        BinaryMixture(torch.ones(3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"y: expected shape \(B, 3\)"):
        m.log_q(torch.ones(2, 4), 1.0)
    with pytest.raises(ValueError, match="method"):
        discrete_langevin(m, y, 1.0, steps=1, eta=1.0, method="three_stage")
    with pytest.raises(ValueError, match="steps"):
        discrete_langevin(m, y, 1.0, steps=-1, eta=1.0)
    with pytest.raises(ValueError, match="score"):
        discrete_langevin_step(y, torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="generator"):
        binary_flip(y, 1.0, generator=fastdiff.Generator(seed=[1, 2]))
    with pytest.raises(ValueError, match="backend"):
        binary_flip(y, 1.0, backend="cuda")


@pytest.mark.parametrize("backend,device", FLIP_BACKENDS)
def test_flip_counts_non_binary_anchors(backend, device):
    """The binary check rides in the kernel's pass: the count of anchor entries not in {-1, +1}."""
    gen = torch.Generator().manual_seed(4)
    for n, nbad in [(1, 0), (1, 1), (2049, 0), (2049, 5)]:
        v = _binary((n,), gen).float()
        v[torch.randperm(n, generator=gen)[:nbad]] = torch.tensor([0.0, 0.5, 2.0, -3.0, math.nan])[:nbad]
        out = torch.empty(n)
        assert int(LAUNCHERS[backend](out, v, None, 0.0, 1.0, 0, 0)) == nbad
    with pytest.raises(ValueError, match=r"y: expected binary entries in \{-1, \+1\}, got 1 other"):
        discrete_langevin_step(torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2), 1.0, backend=backend)


def test_float64_falls_back_to_torch_and_callback():
    """float64 states run on the torch flip (the kernels are float32); the chain keeps y's dtype,
    calls back once per step, and its trajectory starts at y."""
    gen = torch.Generator().manual_seed(5)
    w, mu = _mixture(4, 2, gen)
    m = BinaryMixture(w, mu)
    y = _binary((6, 4), gen)
    from fastdiff import dispatch

    assert dispatch.choose("discrete_langevin", "auto", torch.device("cpu"), torch.float64) == "torch"
    for method in ("one_stage", "two_stage"):
        calls = []
        traj = discrete_langevin(m, y, 1.0, steps=3, eta=1.0, method=method, metropolis=True, progress=False,
                                 callback=lambda i, s: calls.append(i), return_trajectory=True,
                                 generator=fastdiff.Generator(1))
        assert traj.dtype == torch.float64 and traj.shape == (4, 6, 4) and calls == [0, 1, 2]
        assert torch.equal(traj[0], y) and set(traj.unique().tolist()) <= {-1.0, 1.0}
