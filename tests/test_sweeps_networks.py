"""The trained-network learners (fastdiff.sweeps.networks): the GL score (seed 002 eq. 21) against
its formula computed directly, EDM's preconditioning against its formula, the instance-batched
layers against one instance alone, and a few cells of the sweep (GL rises with N)."""
import math
import os

import pytest
import torch

from fastdiff.sweeps import networks as nw
from fastdiff.sweeps.memorization import off_support
from fastdiff.sweeps.plots import plot_store
from fastdiff.sweeps.runner import EXPERIMENTS, build_grid, run_sweep
from tests.sweeps_helpers import gen


def _gl_direct(y, X, Xf):
    """mean_j min_i ||y_j - x_i|| / mean_j min_i ||x'_j - x_i||, one distance at a time, float64."""
    def mean_nn(A):
        tot = 0.0
        for a in A.double():
            tot += min(math.sqrt(float(((a - x) ** 2).sum())) for x in X.double())
        return tot / A.shape[0]
    return mean_nn(y) / mean_nn(Xf)


@pytest.mark.parametrize("M,N,Mf,n", [(1, 1, 1, 1), (7, 3, 5, 13), (33, 17, 9, 48), (4, 1, 6, 2)])
def test_gl_score_matches_formula(M, N, Mf, n):
    g = gen(M * 1000 + N * 10 + n)
    X = torch.randn(N, n, generator=g)
    y, Xf = torch.randn(M, n, generator=g), 2 * torch.randn(Mf, n, generator=g)
    assert nw.gl_score(y, X, Xf) == pytest.approx(_gl_direct(y, X, Xf), rel=1e-12)
    # float32 inputs are scored in float64
    assert nw.gl_score(y.float(), X.float(), Xf.float()) == pytest.approx(_gl_direct(y, X, Xf), rel=1e-6)


def test_gl_score_limits_and_errors():
    g = gen(1)
    X = torch.randn(5, 8, generator=g)
    Xf = torch.randn(20, 8, generator=g)
    assert nw.gl_score(X[[0, 3, 3, 1]], X, Xf) == 0.0                           # copies of training points
    assert nw.gl_score(Xf, X, Xf) == pytest.approx(1.0)                        # samples as new data
    with pytest.raises(ValueError, match="samples"):
        nw.gl_score(torch.randn(3, 7), X, Xf)
    with pytest.raises(ValueError, match="fresh"):
        nw.gl_score(Xf, X, torch.empty(0, 8))
    with pytest.raises(ValueError, match="fresh"):
        nw.gl_score(Xf, X, X[:2])


def test_edm_preconditioning_formula():
    class Probe(torch.nn.Module):   # F(u, c) = 3 u + c, so D's terms are visible
        def forward(self, u, c):
            return 3 * u + c[..., None]
    D = nw.EDMDenoiser(Probe(), sigma_data=0.7)
    x = torch.randn(2, 5, 3, generator=gen(2), dtype=torch.float64)
    sigma = torch.tensor([[0.01, 0.3, 1.0, 5.0, 80.0]] * 2, dtype=torch.float64)
    s, sd = sigma[..., None], 0.7
    c_skip, c_out, c_in = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), 1 / (s**2 + sd**2).sqrt()
    want = c_skip * x + c_out * (3 * c_in * x + (s.log() / 4))
    torch.testing.assert_close(D(x, sigma), want)
    torch.testing.assert_close(D(x, 0.3), D(x, torch.full((2, 5), 0.3, dtype=torch.float64)))   # scalar sigma


@pytest.mark.parametrize("arch", nw.ARCHS)
def test_instances_do_not_mix(arch):
    """An instance's output and its training do not depend on the instances beside it."""
    n = 32
    both = nw.make_networks(arch, n, [11, 22], width=4)
    alone = nw.make_networks(arch, n, [22], width=4)
    x = torch.randn(2, 6, n, generator=gen(3))
    sig = torch.rand(2, 6, generator=gen(4)) * 3 + 0.01
    torch.testing.assert_close(both(x, sig)[1:], alone(x[1:], sig[1:]))
    data = torch.randn(2, 5, n, generator=gen(5))
    z = torch.randn(4, 2, 8, n + 2, generator=gen(6))
    l2 = nw.train(both, data, [5, 3], lambda s: z[s], 4, batch=8, progress=False)
    l1 = nw.train(alone, data[1:], [3], lambda s: z[s, 1:], 4, batch=8, progress=False)
    torch.testing.assert_close(l2[1:], l1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both(x, sig)[1:], alone(x[1:], sig[1:]), rtol=1e-4, atol=1e-5)


def test_unet_shapes_and_errors():
    m = nw.make_networks("unet", 16, [0, 1, 2], width=3)     # n = 16: one 4 x 4 channel, odd width
    assert m(torch.randn(3, 1, 16), torch.ones(3, 1)).shape == (3, 1, 16)
    with pytest.raises(ValueError, match="n: .*divisible by 16"):
        nw.UNet(20)
    with pytest.raises(ValueError, match="arch"):
        nw.make_networks("cnn", 16, [0])
    exp = EXPERIMENTS["network-generalization"]
    with pytest.raises(ValueError, match="--n"):
        build_grid(exp, {"n": 40, "d": 2})
    build_grid(exp, {"n": 40, "d": 2, "arch": "mlp"})         # the MLP takes any n
    with pytest.raises(ValueError, match="--lr"):
        build_grid(exp, {"lr": 0.0})


def test_fresh_draws_lie_on_the_subspaces():
    U = torch.linalg.qr(torch.randn(2, 48, 12, generator=gen(7))).Q.reshape(2, 48, 3, 4).permute(0, 2, 1, 3)
    x = nw.molrg_fresh(U, 200, seed=5, trials=2)
    assert x.shape == (2, 200, 48)
    _, energy = off_support(x, U)
    assert float(energy.max()) < 1e-6     # float32 bases: orthonormal to ~1e-7
    # the per-coordinate variance is d / n (a ~ N(0, I_d), orthonormal bases), both components used
    assert float(x.square().mean()) == pytest.approx(4 / 48, rel=0.15)
    on = torch.einsum("tmn,tknd->tmkd", x, U.double()).square().sum(-1).argmax(-1)   # (2, 200): component
    assert 0.2 < float((on == 1).double().mean()) < 0.45 and 0.2 < float((on == 2).double().mean()) < 0.45


def test_run_batch_reproducible_and_batch_independent():
    """The same cells give the same rows; a cell's rows do not depend on the cells beside it (a short
    run: the rounding of differently shaped batches has no time to grow)."""
    exp = EXPERIMENTS["network-generalization"]
    cells, _ = build_grid(exp, {"d": 2, "N": "2,5", "steps": 3, "samples": 8, "heun_steps": 3, "width": 4})
    seeds = [101, 202]
    a, b = exp.run_batch(cells, seeds, 2)[0], exp.run_batch(cells, seeds, 2)[0]
    assert a == b
    alone = exp.run_batch(cells[1:], seeds[1:], 2)[0]
    for r, s in zip([r for r in a if r["cell_index"] == 1], alone):
        for k in ("gl", "memorized", "off_support", "loss"):
            assert r[k] == pytest.approx(s[k], rel=1e-4, abs=1e-6), k


def test_transition_point_and_fit():
    assert nw.transition_point([2, 4, 8], [0.1, 0.3, 0.7], 0.5) == pytest.approx(4 + 0.2 / 0.4 * 4)
    assert nw.transition_point([2, 4], [0.6, 0.9]) == 2.0
    assert math.isnan(nw.transition_point([2, 4], [0.1, 0.2]))
    with pytest.raises(ValueError, match="Ns"):
        nw.transition_point([4, 2], [0.1, 0.9])
    g = gen(8)
    d = torch.tensor([2.0, 4.0, 6.0, 9.0])
    N = 5 * d + 3 + 0.1 * torch.randn(4, generator=g, dtype=torch.float64)
    fit = nw.linear_fit(d.tolist(), N.tolist())
    # the normal equations, solved directly
    A = torch.stack([d.double(), torch.ones(4, dtype=torch.float64)], 1)
    want = torch.linalg.solve(A.T @ A, A.T @ N)
    assert fit["slope"] == pytest.approx(float(want[0])) and fit["intercept"] == pytest.approx(float(want[1]))
    assert fit["rms"] == pytest.approx(float((A @ want - N).square().mean().sqrt()))
    assert fit["ratio"] == pytest.approx(float((d.double() * N).sum() / d.double().square().sum()))
    with pytest.raises(ValueError, match="d, N"):
        nw.linear_fit([2.0], [3.0])


def test_sweep_cells_gl_rises_with_N(tmp_path):
    """Two cells of the U-Net sweep (d = 2, K = 2): it memorizes at N = 2 and generalizes at N = 32."""
    grid = {"d": 2, "N": "2,32", "steps": 400, "samples": 64}
    st = run_sweep("network-generalization", grid, trials=2, store=str(tmp_path / "a.sqlite"), progress=False)
    rows = st.rows()
    gl = {N: [r["gl"] for r in rows if r["N"] == N] for N in (2, 32)}
    mem = {N: [r["memorized"] for r in rows if r["N"] == N] for N in (2, 32)}
    assert max(gl[2]) < 0.3 and min(gl[32]) > 0.7, gl
    assert min(mem[2]) > 0.7 and max(mem[32]) < 0.2, mem
    assert max(r["off_support"] for r in rows) < 0.2
    pytest.importorskip("matplotlib")
    out = plot_store(str(tmp_path / "a.sqlite"), str(tmp_path))
    assert os.path.getsize(out["plot"]) > 0 and os.path.getsize(out["table"]) > 0
