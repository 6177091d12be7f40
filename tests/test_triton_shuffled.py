"""The Triton kernels once more with the interpreter's grid programs in a shuffled order.

The interpreter runs a launch's programs in grid order, so a kernel whose result depends on
program order (atomics, one program reading another's output, a cross-program reduction) passes
on the CPU by luck.  Here each kernel family (fused step, MoLRG forward and backward, SVD, empirical scan,
trajectory) runs one representative case whose grid has several programs under
``shuffled_program_order``: against the float64 reference with the original test's tolerance,
and bit-identical to the in-order run (programs that do not interact compute the same bits in
any order).  A tiny order-dependent kernel proves the shuffle takes effect and is reproducible.
Skipped on a GPU (the hardware's order applies there) and where Triton is missing.
"""
import pytest
import torch

from conftest import HAS_CUDA

if HAS_CUDA:
    pytest.skip("a GPU is present: the Triton kernels run on it, not under the interpreter",
                allow_module_level=True)
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

import fastdiff  # noqa: E402
from fastdiff import backends  # noqa: E402
from fastdiff.denoisers import _cache  # noqa: E402
from fastdiff.ops import molrg as molrg_op  # noqa: E402
from fastdiff.denoisers.molrg import molrg_params  # noqa: E402
from fastdiff.reference import denoisers as R  # noqa: E402
from triton_order import ShuffleUnsupported, check_supported, shuffled_program_order  # noqa: E402

if not backends.available()["triton"][0]:
    pytest.skip(f"no Triton backend: {backends.available()['triton'][1]}", allow_module_level=True)
try:
    check_supported()
except ShuffleUnsupported as e:
    pytest.skip(str(e), allow_module_level=True)

SEEDS = (1, 2)


def _programs(log):
    """Programs per launch in the log: the case really has a multi-program grid."""
    return [len(l) for l in log]


# --------------------------------------------------------------------------- the shuffle itself
@triton.jit
def _arrival_kernel(counter_ptr, out_ptr):
    # each program takes the next free slot: out is the order the programs ran in
    slot = tl.atomic_add(counter_ptr, 1)
    tl.store(out_ptr + slot, tl.program_id(0) * tl.num_programs(1) + tl.program_id(1))


def _arrivals(grid):
    n = grid[0] * grid[1]
    counter = torch.zeros(1, dtype=torch.int32)
    out = torch.full((n,), -1, dtype=torch.int32)
    _arrival_kernel[grid](counter, out)
    assert counter.item() == n
    return out.tolist()


def test_shuffle_changes_the_order_reproducibly():
    """In order: the identity.  Shuffled: a permutation (every program once), not the identity
    for some seed, the same for the same seed, and what the log says ran; restored after."""
    grid = (4, 3)
    ident = list(range(12))
    assert _arrivals(grid) == ident
    orders = {}
    for seed in range(4):
        log = []
        with shuffled_program_order(seed, log):
            orders[seed] = _arrivals(grid)
        assert sorted(orders[seed]) == ident
        assert log == [orders[seed]]
    assert any(o != ident for o in orders.values()), "the shuffle did not change the order"
    assert len({tuple(o) for o in orders.values()}) > 1, "different seeds, same order"
    with shuffled_program_order(2):
        assert _arrivals(grid) == orders[2]
    assert _arrivals(grid) == ident  # the patch is gone


def _loop_elsewhere(self, *args, **kwargs):  # stand-in grid loops of other Triton versions (never run)
    return None


def _loop_with_gluon(self, *args, **kwargs):
    interpreter_builder.set_grid_dim(1, 1, 1)  # noqa: F821
    interpreter_builder.set_grid_idx(0, 0, 0)  # noqa: F821
    gluon_builder.set_grid_idx(0, 0, 0)  # noqa: F821


@pytest.mark.parametrize("call,match", [(_loop_elsewhere, "set_grid_idx"), (_loop_with_gluon, "other than")],
                         ids=["no-builder-calls", "second-builder"])
def test_unknown_interpreter_structure_is_refused(monkeypatch, call, match):
    """A grid loop that does not set program ids only through interpreter_builder (another Triton
    version) is refused with the reason, never silently run in order."""
    import triton.runtime.interpreter as interp

    monkeypatch.setattr(interp.GridExecutor, "__call__", call)
    with pytest.raises(ShuffleUnsupported, match=match):
        with shuffled_program_order(0):
            pass


# --------------------------------------------------------------------------- the kernels
def _in_order_and_shuffled(fn):
    """fn() in grid order, then under each seed; the shuffled results must equal the in-order
    bits.  Returns (in-order result, the launches' program counts)."""
    base = fn()
    for seed in SEEDS:
        log = []
        with shuffled_program_order(seed, log):
            got = fn()
        for a, b in zip(got, base):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m: f"seed {seed}: the result depends on program order: {m}")
    return base, got, _programs(log)


def test_fused_step_shuffled():
    """The primitive: 2 inputs, Philox noise, per-sample rows; n = 3 blocks + 5 (4 programs of
    the block this path launches, kernels/fused_step.py block_for)."""
    from test_fused_kernel import _case, _check
    from fastdiff.kernels.fused_step import block_for
    from fastdiff.ops import fused_step as fused_step_op
    dtype, n, inner = torch.float32, 3 * block_for(2, True, 0, 4) + 5, 1000
    ins, noise, coefs, ref, c = _case(2, 2, True, dtype, "cpu", n, inner, 0)

    def run():
        out = torch.full((n,), float("nan"), dtype=dtype)
        fused_step_op.LAUNCHERS["triton"](out, ins, coefs, inner, 2, noise, 1234, 8)
        return (out,)

    (out,), (shuffled,), progs = _in_order_and_shuffled(run)
    assert progs == [4]
    _check(shuffled, ref, c, ins, 2, dtype)


def test_molrg_forward_shuffled():
    """molrg_denoise's fused forward, weights and CFG; B = 150 rows over 3 row blocks."""
    from test_denoise import _bases, _rel_close
    gen = torch.Generator().manual_seed(3)
    B, n, dims = 150, 20, [3, 5, 2]
    U = [u.float() for u in _bases(n, dims, gen)]
    x = torch.randn(B, n, generator=gen)
    sigma = torch.rand(B, generator=gen, dtype=torch.float64) + 0.2
    labels = torch.randint(0, len(dims), (B,), generator=gen)
    kw = dict(pi=[0.2, 0.3, 0.5], tau=[1.0, 0.7, 1.3], delta=0.05)

    def run():
        out, w = fastdiff.molrg_denoise(x, U, 0.8, sigma, return_weights=True, backend="triton", **kw)
        cfg = fastdiff.molrg_denoise(x, U, 0.8, sigma, labels=labels, guidance=2.5, mode="hard", backend="triton", **kw)
        return out, w, cfg

    _, (out, w, cfg), progs = _in_order_and_shuffled(run)
    assert progs and min(progs) > 1, progs
    U64 = [u.double() for u in U]
    ref, wr = R.molrg_denoise(x.double(), U64, 0.8, sigma, return_weights=True, **kw)
    _rel_close(out, ref)
    _rel_close(w, wr)
    _rel_close(cfg, R.molrg_denoise(x.double(), U64, 0.8, sigma, labels=labels, guidance=2.5, mode="hard", **kw))


def test_molrg_backward_shuffled():
    """The fused backward kernel on its own (as test_molrg_triton_backward_kernel_writes_everything):
    B = 70 rows over several row blocks, NaN-poisoned outputs, against float64 autograd."""
    from test_denoise import _bases
    from fastdiff.kernels.molrg import molrg_backward
    gen = torch.Generator().manual_seed(15)
    B, n, dims = 70, 33, [3, 5, 1]
    D = sum(dims)
    U64 = _bases(n, dims, gen)
    x64 = torch.randn(B, n, generator=gen, dtype=torch.float64)
    G64 = torch.randn(B, n, generator=gen, dtype=torch.float64)
    sig = torch.rand(B, generator=gen, dtype=torch.float64) + 0.2
    Uf = [u.float() for u in U64]
    ucat, _ = _cache._packed(Uf, n, False)
    params = molrg_params(0.9, sig, dims, None, None, 0.0, "x0", None, B, "cpu")
    x = x64.float()
    _, w = fastdiff.molrg_denoise(x, Uf, 0.9, sig, return_weights=True, backend="triton")

    def run():
        poison = dict(dx=torch.full((B, n), float("nan")), q=torch.full((B, D), float("nan")),
                      dP=torch.full((B, D), float("nan")))
        return molrg_backward(x, G64.float(), ucat, molrg_op.segments(dims, "cpu"), len(dims),
                              params.float().contiguous(), None, False, w.contiguous(), **poison)

    _, (dx, dU), progs = _in_order_and_shuffled(run)
    assert progs == [3], progs
    U = [u.clone().requires_grad_() for u in U64]
    xr = x64.clone().requires_grad_()
    ref = torch.autograd.grad((R.molrg_denoise(xr, U, 0.9, sig) * G64).sum(), [xr, *U])
    for a, b in zip([dx] + list(torch.split(dU, dims, dim=1)), ref):
        assert torch.isfinite(a).all()
        assert (a.double() - b).abs().max() <= 1e-4 * (b.abs().max() + 1e-3)


def test_svd_shuffled():
    """svdvals_rank on 6 matrices (one program each), every test matrix kind, against LAPACK."""
    from test_svd_triton import KINDS, check_against_lapack, matrices, run_poisoned
    gen = torch.Generator().manual_seed(7)
    A64 = torch.cat([matrices(kind, 2, 9, 6, gen) for kind in KINDS[:3]])

    def run():
        return run_poisoned(A64.float(), 0.99)

    _, (S, rank), progs = _in_order_and_shuffled(run)
    assert progs == [6], progs
    check_against_lapack(A64, S, rank, 0.99, torch.float32)


def test_svd_streamed_shuffled(monkeypatch):
    """The streamed SVD kernel (forced on a small tile, 16-element chunks): 3 persistent programs
    for 6 matrices, each program's workspace its own, so any program order gives the same bits."""
    from test_svd_triton import KINDS, check_against_lapack, matrices, run_poisoned
    from fastdiff.kernels import svd
    monkeypatch.setattr(svd, "REGISTER_TILE", 0)
    monkeypatch.setattr(svd, "STREAM_CHUNK_ELEMENTS", 16)
    gen = torch.Generator().manual_seed(8)
    A64 = torch.cat([matrices(kind, 2, 9, 6, gen) for kind in KINDS[:3]])

    def run():
        return run_poisoned(A64.float(), 0.99, programs=3)

    _, (S, rank), progs = _in_order_and_shuffled(run)
    assert progs == [3], progs
    check_against_lapack(A64, S, rank, 0.99, torch.float32)


def test_trajectory_shuffled():
    """fastdiff.sample's fused trajectory kernel: 2 instances x 40 rows (a (3, 2) grid of 16-row
    blocks), labels + CFG, trajectory; against the step-by-step loop (as test_sampling does)."""
    from test_sampling import _bases as sbases, _close
    from fastdiff.denoisers import MoLRG
    I, B, n, dims = 2, 40, 13, (2, 5, 3)
    models = [MoLRG(sbases(n, dims, 30 + i), pi=[0.2, 0.3 + 0.1 * i, 0.5 - 0.1 * i], tau=[1.0, 0.6, 1.0 + i])
              for i in range(I)]
    x = fastdiff.randn(I, B, n, generator=fastdiff.Generator(1))
    y = (torch.arange(I * B) % 3).reshape(I, B)
    sched = fastdiff.DDPMSchedule(T=4)
    kw = dict(labels=y, guidance=2.0, return_trajectory=True, progress=False)

    def run():
        return fastdiff.sample(models, x, sched, "ddpm", generator=fastdiff.Generator(2), backend="triton", fused=True,
                               **kw)

    _, (a, ta), progs = _in_order_and_shuffled(run)
    assert progs and max(progs) == 6, progs
    b, tb = fastdiff.sample(models, x, sched, "ddpm", generator=fastdiff.Generator(2), fused=False, **kw)
    _close(a, b, 1e-5, tb.abs().max())
    _close(ta, tb, 1e-5)


@pytest.mark.parametrize("register_max", [None, 0], ids=["acc-registers", "acc-buffer"])
def test_empirical_scan_shuffled(monkeypatch, register_max):
    """The empirical scan: B = 40 queries (3 row blocks of 16) x 3 splits of N = 150 rows, candidates
    and the softmax mean, acc in registers and in the output buffer (its read-add-write touches only
    the program's own rows of its own split), against the float64 formula."""
    from test_empirical_scan import _check, _inputs, _reference
    from fastdiff.kernels import empirical as E
    if register_max is not None:
        monkeypatch.setattr(E, "ACC_REGISTER_MAX", register_max)
        monkeypatch.setattr(E, "ACC_CHUNK", 16)
    B, N, n, kc = 40, 150, 21, 6
    xh, data, center, g1, g2, h = _inputs(B, N, n, torch.float32, 12)

    def run():
        return E.empirical_scan(xh, data, center, g1, g2, h, -1.0, 1.0, True, True, kc, None, splits=3)

    _, got, progs = _in_order_and_shuffled(run)
    assert progs == [9], progs
    _check(got, _reference(xh, data, center, g1, g2, h, -1.0, 1.0, kc), torch.float32, kc, True, True, 3.0)
