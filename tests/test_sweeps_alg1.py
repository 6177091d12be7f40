"""The sgd learner (seed 002's Algorithm 1, fastdiff.sweeps.alg1): its D-space gradient against autograd
through the materialized x_t, the law of its orthogonal noise, the PSD root, recovery and failure on
small instances, the tailored K > 1 start, the cell's own noise windows, balanced N_k, bad input.
The n = 48 Fig. 4 check is bench/alg1_fig4.py (bench/results/alg1.md)."""
import pytest
import torch

from fastdiff.sweeps import alg1 as A
from fastdiff.sweeps import learners as LR
from fastdiff.sweeps import subspace as S
from sweeps_helpers import gen


def _bases(B, K, n, d, g, dtype=torch.float64):
    return torch.linalg.qr(torch.randn(B, K, n, d, generator=g, dtype=dtype)).Q.permute(0, 2, 1, 3).reshape(B, n, K * d)


@pytest.mark.parametrize("B,N,n,K,d,b", [(3, 7, 11, 2, 2, 5), (2, 1, 5, 1, 1, 1), (2, 6, 13, 3, 2, 20),
                                         (1, 9, 9, 1, 9, 3), (2, 4, 17, 2, 3, 30), (1, 3, 6, 3, 2, 2)])
def test_gradient_is_autograd_through_the_materialized_xt(B, N, n, K, d, b):
    """grad = U M1 + X^T M2 + (I - Pi) eps^T S, formed in D-space, equals autograd of the loss of the
    materialized x_t = x + sigma eps, and so does the loss (up to the U-free ||x||^2)."""
    g = gen(B * 1000 + N * 100 + n + b)
    X = torch.randn(B, N, n, generator=g, dtype=torch.float64)
    U = _bases(B, K, n, d, g)
    idx = torch.randint(0, N, (B, b), generator=g)
    sigma = 0.05 + torch.rand(B, b, 1, generator=g, dtype=torch.float64)
    eps = torch.randn(B, b, n, generator=g, dtype=torch.float64)
    got, loss = A.alg1_grad(X, U, K, idx, sigma, None, None, eps=eps)
    ref, ref_loss = A.materialized_grad(X, U, K, idx, sigma, eps)
    assert got.shape == (B, n, K * d)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)


def test_gradient_with_overlapping_blocks():
    """A start whose blocks share directions (G = U^T U singular): the pseudo-inverse still gives the
    projector onto span U, and the gradient is autograd's."""
    g = gen(7)
    B, N, n, K, d, b = 2, 5, 9, 2, 3, 8
    X = torch.randn(B, N, n, generator=g, dtype=torch.float64)
    U = _bases(B, K, n, d, g)
    U[:, :, d] = U[:, :, 0]                       # block 2's first column is block 1's
    idx = torch.randint(0, N, (B, b), generator=g)
    sigma = 0.1 + torch.rand(B, b, 1, generator=g, dtype=torch.float64)
    eps = torch.randn(B, b, n, generator=g, dtype=torch.float64)
    got, _ = A.alg1_grad(X, U, K, idx, sigma, None, None, eps=eps)
    ref, _ = A.materialized_grad(X, U, K, idx, sigma, eps)
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-8)


def test_psd_root_and_pseudo_inverse():
    g = gen(8)
    Y = torch.randn(4, 6, 6, generator=g, dtype=torch.float64)
    M = Y @ Y.mT
    M[2] = Y[2, :, :3] @ Y[2, :, :3].T              # rank 3
    M[3] = 0                                       # rank 0
    L, inv = A._psd_root(M, True)
    torch.testing.assert_close(L @ L.mT, M, rtol=0, atol=1e-9)
    torch.testing.assert_close(M @ inv @ M, M, rtol=0, atol=1e-8)
    torch.testing.assert_close(inv @ M @ inv, inv, rtol=0, atol=1e-6)
    assert A._psd_root(M, False)[1] is None


@pytest.mark.parametrize("b,D", [(40, 6), (3, 6), (6, 6)])
def test_orthogonal_noise_has_the_law_of_eps_t_s(b, D):
    """Z F with F^T F = S^T S (F = S when b <= D) has rows iid N(0, S^T S), the law of the rows of
    eps^T S: the sample covariance of 200 000 rows matches S^T S within 5 standard errors."""
    g = gen(b * 10 + D)
    S_ = torch.randn(b, D, generator=g, dtype=torch.float64)
    S_[:, -1] = 0 if b > D else S_[:, -1]            # a singular S^T S takes the eigh branch
    F = S_ if b <= D else A._psd_root((S_.T @ S_)[None], False)[0][0].T
    rows = 200_000
    W = torch.randn(rows, F.shape[0], generator=g, dtype=torch.float64) @ F
    C = S_.T @ S_
    emp = W.T @ W / rows
    se = ((C.diagonal()[:, None] * C.diagonal()[None, :] + C * C) / rows).sqrt()    # Var of a Wishart entry
    assert ((emp - C).abs() <= 5 * se + 1e-12).all()


def _fit(K, d, Ns, n=16, trials=6, balanced=True, **opt):
    seeds = [100 + N for N in Ns]
    U, X, _ = S.molrg_batch(n, K, d, Ns, 0.0, "orthogonal", seeds, trials, balanced=balanced)
    counts = torch.tensor([float(N) for N in Ns]).repeat_interleave(trials)
    params = {f"sgd_{k}": v for k, v in opt.items()}
    Uh = LR.fit_bases("sgd", X, counts, K, d, [(s, t) for s in seeds for t in range(trials)], params)
    return S.subspace_errors(Uh, U).reshape(len(Ns), trials)


def test_k1_recovers_when_n_exceeds_d_and_fails_below():
    """K = 1, noiseless: N < d leaves d - N directions at random (error >= sqrt(1/d)-ish), N >= d + 2
    converges to the data's span (plain SGD, random start)."""
    err = _fit(1, 3, [2, 5, 9], steps=600)
    assert (err[0] > 0.3).all()
    assert (err[1:] < 0.05).all(), err


def test_k2_tailored_start_recovers_balanced_mixtures():
    """K = 2, balanced N_k: the tailored start plus SGD recovers both subspaces at N_k >= d and cannot
    at N_k < d (the unspanned directions come from the other component)."""
    err = _fit(2, 2, [2, 8, 12], steps=200)
    assert (err[0] > 0.3).all()
    assert (err[1:] < 0.05).all(), err
    rnd = _fit(2, 2, [12], steps=200, init="random")          # the random start is accepted too
    assert rnd.shape == (1, 6) and torch.isfinite(rnd).all()


def test_noise_window_is_the_cells_own():
    """A cell's step-s window is (trials, b (D + 2) + n min(b, D)): the same whatever the batch."""
    n, K, d = 8, 2, 2
    U, X, _ = S.molrg_batch(n, K, d, [4, 9], 0.0, "orthogonal", [5, 6], 2)
    counts = torch.tensor([4.0, 4.0, 9.0, 9.0])
    init = torch.randn(4, K, n, d, generator=gen(2))
    both = A.alg1_bases(X, counts, K, d, [(5, 0), (5, 1), (6, 0), (6, 1)], init, steps=5)
    alone = A.alg1_bases(X[:2, :4], counts[:2], K, d, [(5, 0), (5, 1)], init[:2], steps=5)
    assert (both[:2] - alone).abs().max() < 1e-5
    assert (both.mT @ both - torch.eye(d)).abs().max() < 1e-5            # orthonormal blocks


def test_flop_count():
    n, D = 3072, 24
    assert A.alg1_flops(48, n, 2, 12, 64) == 4 * 48 * n * D + 6 * n * D * D + 2 * n * D * D + 4 * n * 144 * 2


def test_balanced_components():
    """balanced: point i in component i mod K (N_k = N / K, up to one), the data in its subspace."""
    U, X, lab = S.molrg_batch(12, 3, 2, [7, 9], 0.0, "orthogonal", [1, 2], 2, balanced=True)
    assert torch.equal(lab[:2, :7], (torch.arange(7) % 3).expand(2, 7))
    assert bool((lab[:2, 7:] == -1).all()) and torch.equal(lab[2:], (torch.arange(9) % 3).expand(2, 9))
    for t in range(4):
        for i in range(int((lab[t] >= 0).sum())):
            Uk = U[t, lab[t, i]]
            assert (X[t, i] - Uk @ (Uk.T @ X[t, i])).norm() < 1e-5


def test_bad_input_is_refused():
    X = torch.randn(2, 4, 6)
    init = torch.randn(2, 1, 6, 2)
    rows = [(1, 0), (1, 1)]
    counts = torch.full((2,), 4.0)
    for kw, name in (({"steps": 0}, "sgd_steps"), ({"batch": 0}, "sgd_batch"), ({"grid": 1.5}, "sgd_grid"),
                     ({"lr": 0.0}, "sgd_lr"), ({"sigma_max": -1.0}, "sgd_sigma_max")):
        with pytest.raises(ValueError, match=name):
            A.alg1_bases(X, counts, 1, 2, rows, init, **kw)
    with pytest.raises(ValueError, match="learner: expected one of"):
        LR.fit_bases("sgdd", X, counts, 1, 2, rows, {})


def test_wide_retraction_is_householder_with_positive_r():
    """_retract_t (CholeskyQR2 on U^T blocks) equals the Householder retraction with R's diagonal
    positive; a block with a zero column (Gram singular) takes the Householder fallback."""
    Y = torch.randn(3, 2, 40, 5, generator=gen(31)) + 0.1
    Q = A._retract_t(Y.mT.contiguous())
    H = LR._retract(Y, "householder")
    assert (Q.mT - H).abs().max() < 1e-4
    Y[1, 0, :, 2] = 0
    Qf = A._retract_t(Y.mT.contiguous())
    assert torch.isfinite(Qf).all()
    assert (Qf[1, 0] - LR._retract(Y, "householder")[1, 0].mT).abs().max() < 1e-5


def test_sweep_refuses_bad_sgd_parameters():
    from fastdiff import sweeps

    for name in ("sgd_batch", "sgd_grid", "sgd_steps", "sgd_lr"):
        with pytest.raises(ValueError, match=f"--{name.replace('_', '-')}: expected a positive value"):
            sweeps.run_sweep("subspace-recovery", {"K": 1, "d": 1, "N": 2, "learner": "sgd", name: -1},
                             trials=1, store="/nonexistent/never.sqlite", progress=False)
