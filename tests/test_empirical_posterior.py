"""empirical_posterior: the posterior mean, score, log p_t and the k nearest training points from one
read of the data, each against a float64 reference written from its formula (scipy's logsumexp,
torch.cdist + topk), on random shapes, N = 1, per-sample alpha / sigma, data far from the origin,
uint8 ImageSets, and bad input."""
import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

import fastdiff
from fastdiff import data as D
from fastdiff.denoisers import empirical_logp, empirical_posterior

ALL = ("x0", "score", "logp", "neighbors")


def _reference(x, Y, alpha, sigma, k):
    """float64, from the formulas: p_t(x) = (1/N) sum_i N(x; alpha y_i, sigma^2 I)."""
    x, Y = x.double(), Y.double()
    B, n = x.shape
    a = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1).expand(B, 1)
    s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1).expand(B, 1)
    lw = -((x[:, None, :] - a[:, :, None] * Y[None]) ** 2).sum(-1) / (2 * s * s)
    logp = logsumexp(lw.numpy(), axis=1) - math.log(len(Y)) - 0.5 * n * np.log(2 * np.pi * (s * s).numpy()[:, 0])
    x0 = torch.softmax(lw, 1) @ Y
    score = (a * x0 - x) / (s * s)
    d, i = torch.topk(torch.cdist(x, Y), k, dim=1, largest=False)
    return x0, score, torch.from_numpy(logp), d, i


def _case(seed, B, N, n, offset=0.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    Y = torch.randn(N, n, generator=g, dtype=torch.float64) + offset
    x = 0.8 * Y[torch.randint(N, (B,), generator=g)] + 0.5 * torch.randn(B, n, generator=g, dtype=torch.float64)
    return x.to(dtype), Y.to(dtype)


@pytest.mark.parametrize("B,N,n,chunk", [(1, 1, 1, None), (5, 57, 9, 10), (7, 33, 31, 64), (3, 200, 2, 7), (16, 5, 48, 1)])
def test_every_output_against_float64(B, N, n, chunk):
    x, Y = _case(B * N + n, B, N, n)
    k = min(N, 3)
    alpha = torch.rand(B, dtype=torch.float64) + 0.3
    sigma = torch.rand(B, dtype=torch.float64) + 0.2
    r = empirical_posterior(x, Y, alpha, sigma, outputs=ALL, k=k, chunk=chunk)
    x0, score, logp, d, i = _reference(x, Y, alpha, sigma, k)
    torch.testing.assert_close(r.x0, x0, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(r.score, score, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(r.logp, logp, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(r.distances, d, rtol=1e-12, atol=1e-12)
    assert torch.equal(r.indices, i)


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_float32_to_rounding_also_far_from_the_origin(offset):
    """float32 inputs: x0 to float32 rounding of the data scale, log p to ~1e-5 relative (centring
    keeps |x - alpha c| small where the expanded squares would cancel), neighbours exact."""
    x, Y = _case(1, 6, 300, 24, offset)
    ref = _reference(x, Y, 1.0, 0.4, 2)
    r = empirical_posterior(x.float(), Y.float(), 1.0, 0.4, outputs=ALL, chunk=64)
    assert (r.x0.double() - ref[0]).abs().max() < 1e-5 * (1 + offset)
    assert ((r.logp - ref[2]).abs() / ref[2].abs()).max() < 1e-5
    assert torch.equal(r.indices, ref[4])


def test_agrees_with_empirical_denoise_and_nearest_neighbors():
    x, Y = _case(3, 9, 80, 12, dtype=torch.float32)
    r = empirical_posterior(x, Y, 0.7, 0.3, outputs=ALL, k=2)
    torch.testing.assert_close(r.x0, fastdiff.empirical_denoise(x, Y, 0.7, 0.3), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r.score, fastdiff.empirical_denoise(x, Y, 0.7, 0.3, output="score"), rtol=1e-4, atol=1e-3)
    d, i = fastdiff.nearest_neighbors(x, Y, 2)
    assert torch.equal(r.indices, i)
    torch.testing.assert_close(r.distances, d)


def test_only_what_is_asked_and_imagesets():
    s = D.synthetic(41, (1, 3, 4), seed=2)
    Y = s.float(dtype=torch.float64, flatten=True)
    x = torch.randn(4, 12, dtype=torch.float64)
    r = empirical_posterior(x, s, 0.9, 0.6, outputs=("logp",), chunk=8)
    assert r.x0 is None and r.score is None and r.distances is None and r.indices is None
    ref = _reference(x, Y, 0.9, 0.6, 2)
    torch.testing.assert_close(r.logp, ref[2], rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(empirical_logp(x, s, 0.9, 0.6), ref[2], rtol=1e-12, atol=1e-10)
    r = empirical_posterior(x, s, 0.9, 0.6, outputs=("x0", "neighbors"), k=1, chunk=8)
    torch.testing.assert_close(r.x0, ref[0], rtol=1e-11, atol=1e-12)
    assert torch.equal(r.indices, ref[4][:, :1])


def test_numpy_in_numpy_out():
    x, Y = _case(4, 3, 20, 5)
    r = empirical_posterior(x.numpy(), Y.numpy(), 0.5, 0.5, outputs=("x0", "logp"))
    assert isinstance(r.x0, np.ndarray) and isinstance(r.logp, np.ndarray) and r.score is None
    np.testing.assert_allclose(r.x0, _reference(x, Y, 0.5, 0.5, 1)[0].numpy(), rtol=1e-10)


def test_the_normalisation_is_a_density():
    """log p_t integrates to 1: on a 1-d grid, sum exp(log p) dx = 1 (a test the reference cannot pass by construction)."""
    Y = torch.tensor([[-1.0], [0.5], [2.0]], dtype=torch.float64)
    grid = torch.linspace(-8, 10, 4001, dtype=torch.float64)[:, None]
    lp = empirical_logp(grid, Y, 0.9, 0.7)
    assert abs(float(lp.exp().sum() * (grid[1] - grid[0])) - 1.0) < 1e-9


@pytest.mark.parametrize("kw,match", [
    (dict(outputs=("x0", "mean")), "outputs: expected a non-empty subset"),
    (dict(outputs=()), "outputs: expected a non-empty subset"),
    (dict(outputs=("neighbors",), k=0), r"k: expected an int in \[1, N = 6\]"),
    (dict(outputs=("neighbors",), k=7), r"k: expected an int in \[1, N = 6\]"),
])
def test_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        empirical_posterior(torch.randn(2, 3), torch.randn(6, 3), 1.0, 0.5, **kw)


def test_bad_data_and_levels():
    with pytest.raises(ValueError, match=r"data: expected n = 3 columns \(x has shape \(B, 3\)\), got 4"):
        empirical_posterior(torch.randn(2, 3), torch.randn(6, 4), 1.0, 0.5)
    with pytest.raises(ValueError, match="data: expected at least one training point"):
        empirical_posterior(torch.randn(2, 3), torch.randn(0, 3), 1.0, 0.5)
    with pytest.raises(ValueError, match=r"data: expected an \(N, 3\) tensor or an ImageSet"):
        empirical_posterior(torch.randn(2, 3), torch.randn(6), 1.0, 0.5)
    with pytest.raises(ValueError, match="data: expected images of n = 3"):
        empirical_posterior(torch.randn(2, 3), D.synthetic(4, (1, 2, 2)), 1.0, 0.5)
    with pytest.raises(ValueError, match="sigma"):
        empirical_posterior(torch.randn(2, 3), torch.randn(6, 3), 1.0, 0.0)


def test_centre_cache_reads_a_set_once_and_never_answers_for_another(monkeypatch):
    """The training set's centre is kept between calls on the same set (a sampler's every step), and a
    new set never gets a freed set's centre, even where the allocator hands it the same pointer: the
    results of a call must not depend, in any bit, on the calls before it."""
    from fastdiff.denoisers import empirical as E
    calls = []
    real = E._center_of
    monkeypatch.setattr(E, "_center_of", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(3)
    full, x = torch.randn(400, 48, generator=g), torch.randn(6, 48, generator=g)
    for _ in range(3):
        empirical_posterior(x, full, 0.9, 0.5, outputs=("x0",))
    assert len(calls) == 1                                   # one read for three calls on one set
    full.mul_(1.0)                                           # in place: the version moves, the centre is read again
    empirical_posterior(x, full, 0.9, 0.5, outputs=("x0",))
    assert len(calls) == 2
    pointers = []
    for t in range(12):
        sub = full[torch.randperm(400, generator=g)[:100]]  # same size each time: malloc reuses the pointer
        pointers.append(sub.data_ptr())
        warm = empirical_posterior(x, sub, 0.9, 0.5, outputs=("x0",)).x0
        E._LAST_CENTER.clear()
        cold = empirical_posterior(x, sub, 0.9, 0.5, outputs=("x0",)).x0
        assert torch.equal(warm, cold), t
        del sub
    assert len(set(pointers)) < len(pointers)               # the case this guards did happen
