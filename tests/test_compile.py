"""torch.compile(fullgraph=True) traces sampling loops that call the fused steps (torch.library op)."""
import pytest
import torch

import fastdiff

S = fastdiff.DDPMSchedule(T=50)


def _model(x, t):
    return 0.1 * x + 0.01 * t


def test_ddpm_loop_compiles_fullgraph_and_matches_eager():
    def loop(x, seed):
        g = fastdiff.Generator(seed)
        for t in range(S.T - 1, S.T - 6, -1):
            x = fastdiff.ddpm_step(x, _model(x, t), t, S, generator=g)
        return x

    x = torch.randn(4, 16)
    eager = loop(x, 3)
    torch._dynamo.reset()
    compiled = torch.compile(loop, fullgraph=True, backend="aot_eager")(x, 3)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


def test_per_sample_and_out_variants_trace():
    def step(x, t, out):
        m = _model(x, 0.0)
        y = fastdiff.ddim_step(x, m, t, t - 1, S, eta=0.0)
        fastdiff.euler_step(y, m, 2.0, 1.0, out=out)
        return out

    x = torch.randn(3, 8)
    t = torch.tensor([10, 20, 30])
    eager = step(x, t, torch.empty_like(x))
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(x, t, torch.empty_like(x))
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-6)


def test_op_is_registered_with_fake_impl():
    op = torch.ops.fastdiff.fused_step_.default
    out = torch.empty(8, device="meta")
    x = torch.empty(8, device="meta")
    op(out, [x], None, [1.0, 0.0], 0, None, 0, None, 0, "torch")  # the fake kernel runs on meta tensors (seeds=None)
    torch.library.opcheck(torch.ops.fastdiff.fused_step_, (torch.empty(8), [torch.randn(8)], None, [2.0, 0.0], 0, None, 0, None, 0, "torch"))


def test_invalid_per_sample_values_poison_without_sync():
    """Where a host check would synchronize (CUDA tensors, or traced code), an invalid per-sample
    timestep or level makes that sample NaN instead of raising; the others are untouched."""
    def step(x, t, sigma):
        y = fastdiff.ddpm_step(x, x, t, S, noise=x)
        return fastdiff.euler_step(y, x, sigma, 0.0)

    x = torch.randn(3, 4)
    t = torch.tensor([5, S.T + 7, 2])
    sigma = torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    torch._dynamo.reset()
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(x, t, sigma)
    assert torch.isfinite(out[0]).all()
    assert torch.isnan(out[1]).all() and torch.isnan(out[2]).all()


def test_denoisers_trace_fullgraph():
    """molrg_denoise and empirical_denoise inside torch.compile(fullgraph=True) (traced as their
    GEMM form) give the eager result."""
    U = torch.linalg.qr(torch.randn(3, 16, 4, generator=torch.Generator().manual_seed(0)))[0]
    data = torch.randn(40, 16, generator=torch.Generator().manual_seed(1))

    def f(x, s):
        return fastdiff.molrg_denoise(x, U, 1.0, s, pi=[0.2, 0.3, 0.5]) + fastdiff.empirical_denoise(x, data, 1.0, 0.5)

    x = torch.randn(32, 16)
    s = torch.full((32,), 0.5)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, s)
    torch.testing.assert_close(got, f(x, s), rtol=1e-5, atol=1e-5)


def test_empirical_scan_library_op_with_asked_columns_compiles():
    """The scan as the opaque library op fastdiff::empirical_scan with ``acc_cols`` (the patch
    denoisers' centre pixels): its fake impl gives acc's (B, ncol) shape, fullgraph, eager's values."""
    from fastdiff import dispatch
    from fastdiff.ops.empirical import empirical_scan
    if not dispatch.exists("empirical", "cpp"):
        pytest.skip("the C++ build is absent")
    g = torch.Generator().manual_seed(5)
    xh, data = torch.randn(6, 25, generator=g), torch.randn(70, 25, generator=g)
    c, g1, g2, h = data.mean(0), torch.full((6,), 0.3), torch.full((6,), 0.1), torch.zeros(6)
    cols = torch.tensor([12, 3])

    def f(xh):
        m, l, acc, *_ = empirical_scan("cpp", xh, data, c, g1, g2, h, acc_cols=cols)
        return acc / l[:, None]

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(xh)
    assert got.shape == (6, 2)
    torch.testing.assert_close(got, f(xh))


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_molrg_forward_backward_compiles_with_the_fused_ops(backend):
    """Gradients through torch.compile(fullgraph=True): on CPU ``auto`` runs the fused C++ kernels as
    the library ops fastdiff::molrg_forward / molrg_backward (``torch`` traces the GEMM form)."""
    gen = torch.Generator().manual_seed(3)
    U0 = torch.linalg.qr(torch.randn(2, 12, 3, generator=gen))[0]
    x0 = torch.randn(10, 12, generator=gen)

    def loss(x, U):
        return (fastdiff.molrg_denoise(x, U, 0.9, 0.4, pi=[0.3, 0.7], backend=backend) ** 2).sum()

    def grads(fn, dtype=torch.float32):
        x, U = x0.to(dtype).requires_grad_(), U0.to(dtype).requires_grad_()
        return torch.autograd.grad(fn(x, U), (x, U))

    ref = grads(loss, torch.float64)
    eager = grads(loss)
    torch._dynamo.reset()
    compiled = grads(torch.compile(loss, fullgraph=True, backend="aot_eager"))
    # eager may run the fused C++ mix where the trace runs torch ops: each is float32-accurate
    # against float64 (1e-5 of the largest gradient), not bitwise equal to the other
    for got in (eager, compiled):
        for a, b in zip(got, ref):
            assert (a.double() - b).abs().max() <= 1e-5 * b.abs().max()


def test_molrg_ops_pass_opcheck():
    from fastdiff import dispatch
    from fastdiff.denoisers.molrg import molrg_params

    gen = torch.Generator().manual_seed(4)
    ucat = torch.linalg.qr(torch.randn(9, 5, generator=gen))[0]
    x = torch.randn(6, 9, generator=gen)
    params = molrg_params(0.9, 0.5, [2, 3], None, None, 0.0, "x0", None, 6, x.device).float()
    impl = "cpp" if dispatch.exists("molrg", "cpp") else "torch"
    args = (x, ucat, params, None, [2, 3], False, impl)
    torch.library.opcheck(torch.ops.fastdiff.molrg_forward, args, test_utils=("test_schema", "test_faketensor"))
    out, w = torch.ops.fastdiff.molrg_forward(*args)
    G = torch.randn(6, 9, generator=gen)
    torch.library.opcheck(torch.ops.fastdiff.molrg_backward, (x, ucat, params, w, None, G, [2, 3], False, impl),
                          test_utils=("test_schema", "test_faketensor"))


def test_backend_probe_is_marked_constant_without_importing_dynamo():
    """backends._works sets by hand the flag that torch.compiler.assume_constant_result sets (so that
    ``import fastdiff`` does not import torch._dynamo); if torch ever changes what the decorator does,
    this fails and the hand-set flag must follow."""
    from fastdiff import backends

    def probe():
        return True

    marked = torch.compiler.assume_constant_result(probe)
    assert marked is probe and vars(probe) == {"_dynamo_marked_constant": True}
    assert backends._works._dynamo_marked_constant is True


def test_import_does_not_load_dynamo():
    """``import fastdiff`` (and so ``fastdiff --help``) stays about as cheap as ``import torch``."""
    import subprocess
    import sys

    code = "import sys, fastdiff; print(sorted(m for m in ('torch._dynamo', 'scipy', 'matplotlib') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
