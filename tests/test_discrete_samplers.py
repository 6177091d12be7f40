"""The discrete Langevin samplers' stationary laws (docs/math.md 7c-7e).

Two kinds of evidence, on a d <= 10 mixture where q is known exactly by enumeration:

- the one-stage chain's transition matrix, computed (float64, 2^d x 2^d): the Metropolis-adjusted
  chain's stationary law is q to float64 rounding; the unadjusted one's is off by a bias that stays
  below the perturbation bound ``k TV(q P, q) / (1 - delta(P^k))`` (math.md 7d);
- large runs of the fused kernels: ``n`` independent chains started from q itself (exact draws) run
  ``T`` steps; an exact chain leaves q invariant, so the final states are ``n`` iid draws of q and
  ``TV(empirical, q)`` is below the sampling bound ``1/2 sum sqrt(p (1 - p) / n) + sqrt(log(1e6) / 2n)``
  (fails with probability < 1e-6 for a correct sampler).  The unadjusted one-stage run is checked
  against ``q P^T`` from its matrix instead.  The bound is tight enough to fail: dropping the
  Metropolis correction moves the law by more than it (asserted).
"""
import pytest
import torch

import fastdiff
from fastdiff.denoisers import BinaryMixture
from fastdiff.discrete import discrete_langevin
from fastdiff.reference import discrete as RD

from conftest import backend_devices

D, ALPHA, ETA = 5, 1.0, 2.0
N_CHAINS, STEPS = 1 << 13, 20


@pytest.fixture(scope="module")
def model():
    gen = torch.Generator().manual_seed(0)
    mu = torch.rand(3, D, generator=gen, dtype=torch.float64) * 1.6 - 0.8
    w = torch.rand(3, generator=gen, dtype=torch.float64) + 0.2
    return BinaryMixture(w, mu)


def _exact(m, d=None):
    X = RD.states(m.d)
    lq, s = m.log_q_and_score(X, ALPHA)
    return X, lq, s, lq.exp()


def _draw_q(q, X, n, seed):
    """n exact draws of q (float32 (n, d)) by inverse-CDF on the enumerated pmf."""
    idx = torch.multinomial(q, n, replacement=True, generator=torch.Generator().manual_seed(seed))
    return X[idx].float()


def _empirical(y, d):
    return torch.bincount(RD.index(y), minlength=1 << d).double() / y.shape[0]


@pytest.mark.parametrize("d,alpha", [(8, 0.5), (10, 1.0)])
def test_one_stage_transition_matrix(d, alpha):
    gen = torch.Generator().manual_seed(d)
    m = BinaryMixture(torch.rand(4, generator=gen, dtype=torch.float64) + 0.2,
                      torch.rand(4, d, generator=gen, dtype=torch.float64) * 1.6 - 0.8)
    X = RD.states(d)
    lq, s = m.log_q_and_score(X, alpha)
    q = lq.exp()
    # Metropolis-adjusted: q exactly (detailed balance; the solve is float64)
    T = RD.one_stage_matrix(lq, s, ETA, metropolis=True)
    assert torch.allclose(T.sum(1), torch.ones(1 << d, dtype=torch.float64), atol=1e-12)
    assert RD.tv(RD.stationary(T), q) < 1e-9
    # unadjusted (the talk's algorithm): a bias, within the perturbation bound
    P = RD.one_stage_matrix(lq, s, ETA, metropolis=False)
    pi = RD.stationary(P)
    bias = RD.tv(pi, q)
    k = 8  # sum_{j<k} delta(P^j) <= k
    bound = RD.tv(q @ P, q) * k / (1 - RD.dobrushin(torch.linalg.matrix_power(P, k)))
    assert 0.005 < bias <= bound, (bias, bound)


def test_one_stage_large_run_unadjusted_matches_its_chain(model):
    X, lq, s, q = _exact(model)
    P = RD.one_stage_matrix(lq, s, ETA, metropolis=False)
    target = q @ torch.linalg.matrix_power(P, STEPS)
    y = discrete_langevin(model, _draw_q(q, X, N_CHAINS, 1), ALPHA, steps=STEPS, eta=ETA, method="one_stage",
                          generator=fastdiff.Generator(11), progress=False)
    bound = RD.tv_sampling_bound(target, N_CHAINS)
    assert RD.tv(_empirical(y, D), target) < bound
    # the power of the test: without the correction the law moved from q by more than the bound
    assert RD.tv(target, q) > RD.tv_sampling_bound(q, N_CHAINS)


@pytest.mark.parametrize("method", ["one_stage", "two_stage"])
def test_metropolis_samplers_leave_q_invariant(model, method):
    X, lq, s, q = _exact(model)
    y = discrete_langevin(model, _draw_q(q, X, N_CHAINS, 2), ALPHA, steps=STEPS, eta=ETA, method=method,
                          metropolis=True, generator=fastdiff.Generator(12), progress=False)
    assert RD.tv(_empirical(y, D), q) < RD.tv_sampling_bound(q, N_CHAINS)


def test_one_stage_metropolis_converges_from_uniform(model):
    """From uniform states: TV(empirical, q) <= sampling bound + TV(uniform P^T, q) (exact, from the matrix)."""
    X, lq, s, q = _exact(model)
    T = RD.one_stage_matrix(lq, s, ETA, metropolis=True)
    mix = RD.tv(torch.full((1 << D,), 2.0 ** -D, dtype=torch.float64) @ torch.linalg.matrix_power(T, STEPS), q)
    y = discrete_langevin(model, N_CHAINS, ALPHA, steps=STEPS, eta=ETA, metropolis=True,
                          generator=fastdiff.Generator(13), progress=False)
    assert RD.tv(_empirical(y, D), q) < RD.tv_sampling_bound(q, N_CHAINS) + mix


@pytest.fixture(scope="module")
def two_stage_chain():
    """The unadjusted two-stage chain of a d = 3 mixture (alpha, eta) = (1, 2) by Gauss-Hermite
    quadrature at 64 and 80 nodes a coordinate: (model, q, P at 80 nodes, e = the largest row's TV
    change from 64 to 80 nodes, the quadrature error estimate; it falls ~5x from 48 -> 64 -> 80)."""
    gen = torch.Generator().manual_seed(0)
    mu = torch.rand(3, 3, generator=gen, dtype=torch.float64) * 1.6 - 0.8
    d3 = BinaryMixture(torch.rand(3, generator=gen, dtype=torch.float64) + 0.2, mu)
    q = d3.log_q_and_score(RD.states(3), ALPHA)[0].exp()
    P64, P80 = (RD.two_stage_matrix(lambda z: d3.score(z, ALPHA), 3, ETA, nodes) for nodes in (64, 80))
    e = float((0.5 * (P80 - P64).abs().sum(1)).max())
    return d3, q, P80, e


def test_two_stage_transition_matrix_bias_within_the_perturbation_bound(two_stage_chain):
    """The talk's two-stage sampler (q(y | z) linearised at z) is biased: its stationary law (computed,
    0.066 from q at d = 3) is below the perturbation bound k TV(q P, q) / (1 - delta(P^k)) (0.29), the
    bound math.md 7d states for the one-stage chain, which holds for any chain."""
    _, q, P, e = two_stage_chain
    assert e < 1e-4, f"the quadrature has not converged: row TV change {e:.3g} from 64 to 80 nodes"
    assert torch.allclose(P.sum(1), torch.ones(8, dtype=torch.float64), atol=1e-12)
    bias = RD.tv(RD.stationary(P), q)
    k = 8
    bound = RD.tv(q @ P, q) * k / (1 - RD.dobrushin(torch.linalg.matrix_power(P, k)))
    assert 0.01 < bias <= bound, (bias, bound)


def test_two_stage_large_run_unadjusted_matches_its_chain(two_stage_chain):
    """From exact draws of q, T fused two-stage steps land on q P^T (within the sampling bound plus
    T e, the quadrature error carried over T steps: TV(mu A^T, mu B^T) <= T max_y TV(A[y], B[y])),
    and that law is farther from q than the bound: the test tells the chain from an exact one."""
    d3, q, P, e = two_stage_chain
    X = RD.states(3)
    target = q @ torch.linalg.matrix_power(P, STEPS)
    y = discrete_langevin(d3, _draw_q(q, X, N_CHAINS, 3), ALPHA, steps=STEPS, eta=ETA, method="two_stage",
                          generator=fastdiff.Generator(14), progress=False)
    slack = STEPS * e
    assert RD.tv(_empirical(y, 3), target) < RD.tv_sampling_bound(target, N_CHAINS) + slack
    assert RD.tv(target, q) > RD.tv_sampling_bound(q, N_CHAINS) + slack


@pytest.mark.parametrize("method,metropolis", [("one_stage", False), ("one_stage", True), ("two_stage", True)])
def test_sampler_streams_agree_across_backends(model, method, metropolis):
    """The whole chain on C++ and on the Triton interpreter (and torch): the same states (the flips
    may differ only at float ties u ~ sigmoid(l), none here)."""
    backends = [b for b, _ in backend_devices("discrete_langevin")]
    if len(backends) < 2:
        pytest.skip("one backend here")
    y0 = RD.states(D)[torch.arange(0, 32, 3)].float()
    runs = [discrete_langevin(model, y0, ALPHA, steps=4, eta=ETA, method=method, metropolis=metropolis,
                              generator=fastdiff.Generator(21), backend=b, progress=False, return_trajectory=True)
            for b in backends]
    assert runs[0].shape == (5, y0.shape[0], D)
    for r in runs[1:]:
        assert torch.equal(r, runs[0])
