"""The public kernel-calling boundary: ``out=`` validation (writeable, overlap), autograd through
the compiled backends, version counters, NumPy round trips, and the dtype/meta/shape checks on
the inputs of every public function (issue 13, items 3, 4, 12, 14)."""
import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import backends

S = fastdiff.DDPMSchedule()


# --------------------------------------------------------------------------- item 14
def test_fused_step_is_private():
    # the unchecked primitive (raw pointers, no length checks) is not public API
    assert "fused_step" not in backends.__all__
    assert not hasattr(backends, "fused_step")
    assert "fused_step" not in fastdiff.__all__
    from fastdiff.ops import fused_step as op  # the op module exports its table row and constants only
    assert not hasattr(op, "fused_step") and "_fused_step" not in op.__all__


# --------------------------------------------------------------------------- helpers
def _steps(x, m, **kw):
    """One call of every public step that takes out= (and randn), as (name, thunk)."""
    g = lambda: fastdiff.Generator(3)  # noqa: E731
    return [
        ("ddpm_step", lambda: fastdiff.ddpm_step(x, m, 5, S, generator=g(), **kw)),
        ("ddim_step", lambda: fastdiff.ddim_step(x, m, 5, 2, S, eta=0.5, generator=g(), **kw)),
        ("euler_step", lambda: fastdiff.euler_step(x, m, 1.0, 0.5, **kw)),
        ("edm_churn", lambda: fastdiff.edm_churn(x, 1.0, 0.2, generator=g(), **kw)[0]),
        ("euler_ancestral_step", lambda: fastdiff.euler_ancestral_step(x, m, 1.0, 0.5, generator=g(), **kw)),
        ("heun_step", lambda: fastdiff.heun_step(x, m, 1.0, 0.5, x_pred=m, model_output_pred=x, **kw)),
        ("langevin_step", lambda: fastdiff.langevin_step(x, m, 0.1, generator=g(), **kw)),
        ("ou_reverse_step", lambda: fastdiff.ou_reverse_step(x, m, 0.1, generator=g(), **kw)),
        ("predict_x0", lambda: fastdiff.predict_x0(x, m, 0.8, 0.6, **kw)),
    ]


STEP_NAMES = [n for n, _ in _steps(None, None)]


def _one(name, x, m, **kw):
    return dict(_steps(x, m, **kw))[name]()


def _np_xm():
    rng = np.random.default_rng(0)
    return rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal((4, 6)).astype(np.float32)


# --------------------------------------------------------------------------- item 3: read-only out=
@pytest.mark.parametrize("name", STEP_NAMES)
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_readonly_numpy_out_is_refused(name, backend):
    x, m = _np_xm()
    out = np.zeros((4, 6), np.float32)
    out.setflags(write=False)
    with pytest.raises(ValueError, match="out: expected a writeable array"):
        _one(name, x, m, out=out, backend=backend)
    assert not out.any()  # nothing was written


def test_readonly_memmap_out_is_refused(tmp_path):
    path = tmp_path / "out.f32"
    np.zeros((4, 6), np.float32).tofile(path)
    out = np.memmap(path, dtype=np.float32, mode="r", shape=(4, 6))
    x, m = _np_xm()
    for name in STEP_NAMES:
        with pytest.raises(ValueError, match="out: expected a writeable array"):
            _one(name, x, m, out=out)
    with pytest.raises(ValueError, match="out: expected a writeable array"):
        fastdiff.randn(4, 6, out=out)
    assert not np.fromfile(path, np.float32).any()


def test_readonly_numpy_inputs_are_fine():
    x, m = _np_xm()
    x.setflags(write=False)
    m.setflags(write=False)
    ref = fastdiff.euler_step(x.copy(), m.copy(), 1.0, 0.5)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "array is not writable" warning for inputs we only read
        r = fastdiff.euler_step(x, m, 1.0, 0.5)
    np.testing.assert_array_equal(r, ref)


def test_inference_tensor_out_outside_inference_mode_is_refused():
    x, m = torch.randn(4, 6), torch.randn(4, 6)
    with torch.inference_mode():
        out = torch.zeros(4, 6)
    with pytest.raises(ValueError, match="out: an inference tensor"):
        fastdiff.euler_step(x, m, 1.0, 0.5, out=out, backend="cpp")
    with pytest.raises(ValueError, match="out: an inference tensor"):
        fastdiff.randn(4, 6, out=out)
    assert not out.any()
    with torch.inference_mode():  # inside inference mode it is an ordinary tensor
        fastdiff.euler_step(x, m, 1.0, 0.5, out=out, backend="cpp")
    assert out.any()


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_leaf_requiring_grad_out_is_refused(backend):
    x, m = torch.randn(4, 6), torch.randn(4, 6)
    out = torch.zeros(4, 6, requires_grad=True)
    with pytest.raises(ValueError, match="out: a leaf tensor that requires grad"):
        fastdiff.euler_step(x, m, 1.0, 0.5, out=out, backend=backend)
    assert not out.detach().any()
    with torch.no_grad():
        fastdiff.euler_step(x, m, 1.0, 0.5, out=out, backend=backend)
    assert out.detach().any()


def test_expanded_out_is_refused():
    x, m = torch.randn(4, 6), torch.randn(4, 6)
    with pytest.raises(ValueError, match="out: expected a tensor whose elements have distinct memory"):
        fastdiff.euler_step(x, m, 1.0, 0.5, out=torch.zeros(6).expand(4, 6))


# --------------------------------------------------------------------------- NumPy round trips
@pytest.mark.parametrize("name", STEP_NAMES)
def test_numpy_in_numpy_out(name):
    x, m = _np_xm()
    ref = _one(name, torch.from_numpy(x), torch.from_numpy(m), backend="torch")
    r = _one(name, x, m)
    assert isinstance(r, np.ndarray)
    np.testing.assert_allclose(r, ref.numpy(), rtol=1e-5, atol=1e-5)
    out = np.full((4, 6), np.nan, np.float32)
    r = _one(name, x, m, out=out)
    assert r is out
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-5, atol=1e-5)


def test_edm_churn_numpy_out_returns_the_array():
    x, _ = _np_xm()
    out = np.zeros_like(x)
    x_hat, sigma_hat = fastdiff.edm_churn(x, 1.0, 0.5, generator=fastdiff.Generator(1), out=out)
    assert x_hat is out and sigma_hat == 1.5


def test_tensor_out_with_numpy_inputs_returns_the_tensor():
    x, m = _np_xm()
    out = torch.zeros(4, 6)
    assert fastdiff.euler_step(x, m, 1.0, 0.5, out=out) is out


def test_randn_numpy_out():
    out = np.zeros((5, 3), np.float32)
    r = fastdiff.randn(5, 3, generator=fastdiff.Generator(7), out=out)
    assert r is out
    np.testing.assert_array_equal(out, fastdiff.randn(5, 3, generator=fastdiff.Generator(7)).numpy())


# --------------------------------------------------------------------------- item 4a: overlap
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("name", STEP_NAMES)
def test_partial_overlap_with_an_input_is_refused(name, backend):
    buf = torch.randn(25)
    before = buf.clone()
    x, m = buf[:-1].view(4, 6), torch.randn(4, 6)
    with pytest.raises(ValueError, match="out: partially overlaps x"):
        _one(name, x, m, out=buf[1:].view(4, 6), backend=backend)
    assert torch.equal(buf, before)
    if name == "edm_churn":  # reads x only
        return
    buf2 = torch.randn(25)
    with pytest.raises(ValueError, match="out: partially overlaps (model_output|x_pred)"):
        _one(name, torch.randn(4, 6), buf2[1:].view(4, 6), out=buf2[:-1].view(4, 6), backend=backend)


def test_partial_overlap_with_noise_is_refused():
    buf = torch.randn(25)
    x, m = torch.randn(4, 6), torch.randn(4, 6)
    with pytest.raises(ValueError, match="out: partially overlaps noise"):
        fastdiff.ddpm_step(x, m, 5, S, noise=buf[:-1].view(4, 6), out=buf[1:].view(4, 6))


def test_partial_overlap_numpy():
    buf = np.random.default_rng(0).standard_normal(25).astype(np.float32)
    x, m = buf[:-1].reshape(4, 6), np.ones((4, 6), np.float32)
    with pytest.raises(ValueError, match="out: partially overlaps x"):
        fastdiff.euler_step(x, m, 1.0, 0.5, out=buf[1:].reshape(4, 6), backend="cpp")


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("name", STEP_NAMES)
def test_out_equal_to_an_input_and_disjoint_slices_are_allowed(name, backend):
    x, m = torch.randn(4, 6), torch.randn(4, 6)
    ref = _one(name, x, m, backend=backend)
    xx = x.clone()
    assert _one(name, xx, m, out=xx, backend=backend) is xx  # out=x exactly
    torch.testing.assert_close(xx, ref, rtol=0, atol=0)
    buf = torch.randn(48)  # x and out are adjacent, disjoint slices of one buffer
    buf[:24] = x.reshape(-1)
    _one(name, buf[:24].view(4, 6), m, out=buf[24:].view(4, 6), backend=backend)
    torch.testing.assert_close(buf[24:].view(4, 6), ref, rtol=0, atol=0)


def test_strided_views_of_one_buffer_are_allowed():
    # interleaved, disjoint: x = buf[..., 0], out = buf[..., 1] (written through a private buffer)
    buf = torch.randn(4, 6, 2)
    x, m = buf[..., 0], torch.randn(4, 6)
    ref = fastdiff.euler_step(x.clone(), m, 1.0, 0.5)
    fastdiff.euler_step(x, m, 1.0, 0.5, out=buf[..., 1])
    torch.testing.assert_close(buf[..., 1], ref)


# --------------------------------------------------------------------------- item 4b: versions
@pytest.mark.parametrize("backend", ["cpp", "triton", "torch"])
def test_kernel_write_bumps_version(backend):
    x, m = torch.randn(4, 6), torch.randn(4, 6)
    out = torch.zeros(4, 6)
    v = out._version
    fastdiff.euler_step(x, m, 1.0, 0.5, out=out, backend=backend)
    assert out._version > v
    v = out._version
    fastdiff.randn(4, 6, out=out, backend=backend)
    assert out._version > v


@pytest.mark.parametrize("backend", ["cpp", "triton", "torch"])
def test_overwriting_a_tensor_saved_for_backward_raises_on_backward(backend):
    a = torch.randn(4, 6, requires_grad=True)
    x = a * 1.0
    y = x.exp()  # saves its output for backward
    with torch.no_grad():
        fastdiff.euler_step(y, torch.randn(4, 6), 1.0, 0.5, out=y, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


# --------------------------------------------------------------------------- item 12: dtypes, meta, shapes
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.complex64, torch.bool])
@pytest.mark.parametrize("name", STEP_NAMES)
def test_steps_refuse_int_and_complex(name, dtype):
    x = torch.ones(4, 6, dtype=dtype)
    with pytest.raises(TypeError, match=r"x: expected a floating-point tensor \(float16, bfloat16, float32 or float64\)"):
        _one(name, x, x)


@pytest.mark.parametrize("name", STEP_NAMES)
def test_steps_refuse_meta(name):
    x = torch.ones(4, 6, device="meta")
    gen = fastdiff.Generator(0)
    with pytest.raises(ValueError, match="x: meta tensors hold no data to compute with"):
        _one(name, x, x)
    assert gen.offset == 0


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, torch.bool, torch.float8_e4m3fn])
def test_randn_refuses_non_float_dtypes(dtype):
    with pytest.raises(TypeError, match="dtype: expected a floating-point tensor"):
        fastdiff.randn(2, 3, dtype=dtype)
    with pytest.raises(TypeError, match="out: expected a floating-point tensor"):
        fastdiff.randn(2, 3, out=torch.zeros(2, 3).to(dtype))


def test_randn_shapes():
    g = fastdiff.Generator(0)
    with pytest.raises(ValueError, match="shape: expected non-negative sizes, got -1 at position 0"):
        fastdiff.randn(-1, 3, generator=g)
    with pytest.raises(TypeError, match="shape: expected ints, got float"):
        fastdiff.randn(2.5, 3, generator=g)
    with pytest.raises(ValueError, match=r"out: expected shape \(4, 6\)"):
        fastdiff.randn(4, 6, out=torch.zeros(2, 3), generator=g)
    with pytest.raises(ValueError, match="device: meta tensors hold no data"):
        fastdiff.randn(2, 3, device="meta", generator=g)
    assert g.offset == 0  # no failed call drew
    a = fastdiff.randn(np.int64(2), 3, generator=fastdiff.Generator(1))
    b = fastdiff.randn((2, np.int64(3)), generator=fastdiff.Generator(1))
    assert a.shape == b.shape == (2, 3) and torch.equal(a, b)
    out = torch.zeros(2, 3)
    assert fastdiff.randn(out=out, generator=fastdiff.Generator(1)) is out and torch.equal(out, a)
    assert fastdiff.randn(0, 3).shape == (0, 3)


def test_per_sample_values_refuse_complex_and_bool():
    x, m = torch.randn(4, 6), torch.randn(4, 6)
    with pytest.raises(TypeError, match="sigma: expected real"):
        fastdiff.euler_step(x, m, torch.full((4,), 1 + 1j), 0.5)
    with pytest.raises(TypeError, match="sigma_next: expected real"):
        fastdiff.euler_step(x, m, 1.0, torch.ones(4, dtype=torch.bool))
    r = fastdiff.euler_step(x, m, torch.ones(4, dtype=torch.int64), 0.5)  # integer values are numbers
    torch.testing.assert_close(r, fastdiff.euler_step(x, m, 1.0, 0.5))


def test_numpy_integer_timesteps():
    x, m = torch.randn(4, 6), torch.randn(4, 6)
    ref = fastdiff.ddim_step(x, m, 5, 2, S)
    torch.testing.assert_close(fastdiff.ddim_step(x, m, np.int64(5), np.int32(2), S), ref, rtol=0, atol=0)
    np.testing.assert_array_equal(fastdiff.ddim_step(x, m, np.array(5), np.int64(2), S), ref.numpy())  # a 0-d array is an array


# --------------------------------------------------------------------------- item 4c: autograd on every backend
def _grad_run(name, backend, per_sample, noise_tensor):
    torch.manual_seed(0)
    x = torch.randn(4, 6, requires_grad=True)
    m = torch.randn(4, 6, requires_grad=True)
    sig = torch.tensor([1.0, 0.7, 1.3, 0.9], dtype=torch.float64, requires_grad=True) if per_sample else 1.0
    noise = torch.randn(4, 6, requires_grad=True) if noise_tensor else None
    kw = dict(backend=backend)
    g = fastdiff.Generator(5)
    nz = dict(noise=noise) if noise is not None else dict(generator=g)
    calls = {
        "ddpm_step": lambda: fastdiff.ddpm_step(x, m, torch.tensor([5, 9, 0, 3]) if per_sample else 5, S, **nz, **kw),
        "euler_step": lambda: fastdiff.euler_step(x, m, sig, 0.5, **kw),
        "edm_churn": lambda: fastdiff.edm_churn(x, sig, 0.3, **nz, **kw)[0],
        "euler_ancestral_step": lambda: fastdiff.euler_ancestral_step(x, m, sig, 0.5, **nz, **kw),
        "heun_step": lambda: fastdiff.heun_step(x, m, sig, 0.5, x_pred=m * 2, model_output_pred=x * 3, **kw),
        "langevin_step": lambda: fastdiff.langevin_step(x, m, 0.1, prediction="eps", sigma=sig, **nz, **kw),
        "predict_x0": lambda: fastdiff.predict_x0(x, (m, x * 0.5), 0.8, sig, guidance=1.5, **kw),
    }
    y = calls[name]()
    w = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    (y * w).sum().backward()
    grads = [t.grad for t in (x, m) + ((sig,) if per_sample else ()) + ((noise,) if noise is not None else ())]
    return y.detach(), grads


GRAD_STEPS = ["ddpm_step", "euler_step", "edm_churn", "euler_ancestral_step", "heun_step", "langevin_step", "predict_x0"]


@pytest.mark.parametrize("noise_tensor", [False, True], ids=["philox", "noise"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["scalar", "per_sample"])
@pytest.mark.parametrize("name", GRAD_STEPS)
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_kernel_backends_are_differentiable_like_torch(backend, name, per_sample, noise_tensor):
    if not backends.available()[backend][0]:
        pytest.skip(f"{backend} not available")
    y_ref, g_ref = _grad_run(name, "torch", per_sample, noise_tensor)
    y, gr = _grad_run(name, backend, per_sample, noise_tensor)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(gr, g_ref):
        if b is None:
            assert a is None or not a.any()
            continue
        assert a is not None, "the kernel backend dropped a gradient the torch backend has"
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpp", "triton", "torch"])
def test_out_joins_the_graph_on_every_backend(backend):
    x = torch.randn(4, 6, requires_grad=True)
    m = torch.randn(4, 6)
    out = torch.zeros(4, 6)
    r = fastdiff.euler_step(x, m, 1.0, 0.5, out=out, backend=backend)
    assert r is out and out.requires_grad
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((4, 6), 0.5))  # x + (0.5 - 1)(x - m)/1


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_out_x_overwriting_a_saved_input_raises_on_backward(backend):
    # per-sample sigma requiring grad: the step saves x for dL/dsigma; out=x then overwrites it
    a = torch.randn(4, 6, requires_grad=True)
    x = a * 1.0
    sig = torch.tensor([1.0, 0.7, 1.3, 0.9], requires_grad=True)
    fastdiff.euler_step(x, torch.randn(4, 6), sig, 0.5, out=x, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        x.sum().backward()


def test_randn_into_requires_grad_nonleaf():
    a = torch.randn(4, 6, requires_grad=True)
    y = a * 2.0
    fastdiff.randn(4, 6, out=y, backend="cpp", generator=fastdiff.Generator(0))
    assert y._version > 0


@pytest.mark.parametrize("backend", ["cpp", "triton", "auto"])
def test_svdvals_keep_the_graph_on_every_backend(backend):
    if backend != "auto" and not backends.available()[backend][0]:
        pytest.skip(f"{backend} not available")
    A0 = torch.randn(3, 4, 5)
    w = torch.linspace(0.5, 2.0, 4)
    grads = []
    for b in ("torch", backend):
        A = A0.clone().requires_grad_(True)
        S = fastdiff.svdvals(A, backend=b)
        S2, rank = fastdiff.svdvals_rank(A, backend=b)
        assert S.requires_grad and S2.requires_grad
        ((S * w).sum() + S2.sum()).backward()
        grads.append(A.grad)
    torch.testing.assert_close(grads[1], grads[0])
    with torch.no_grad():  # no grad needed: the kernel still runs (values agree to its accuracy)
        torch.testing.assert_close(fastdiff.svdvals(A0, backend=backend), torch.linalg.svdvals(A0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("what", ["x", "bases"])
def test_fused_sample_keeps_the_graph(what):
    from fastdiff.denoisers import MoLRG

    if not backends.available()["cpp"][0]:
        pytest.skip("cpp not available")
    sched = fastdiff.DDPMSchedule(T=20)
    grads = []
    for b in ("torch", "cpp"):
        torch.manual_seed(0)
        bases = torch.linalg.qr(torch.randn(2, 6, 2))[0].requires_grad_(what == "bases")
        x = torch.randn(4, 6).requires_grad_(what == "x")
        out = fastdiff.sample(MoLRG(bases), x, sched, "ddim", steps=5, backend=b, progress=False,
                              generator=fastdiff.Generator(0))
        assert out.requires_grad
        (out * torch.linspace(-1, 1, 24).reshape(4, 6)).sum().backward()
        grads.append((x if what == "x" else bases).grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="fused: .*require grad"):
        fastdiff.sample(MoLRG(bases), x, sched, "ddim", steps=5, backend="cpp", fused=True, progress=False)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_compiled_step_with_grad_matches_eager(backend):
    # traced code with an input that requires grad differentiates the torch step
    def f(x, m, s):
        return fastdiff.euler_step(x, m, s, 0.5, backend=backend)

    x, m = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6)
    s = torch.tensor([1.0, 0.8, 1.2, 0.9], requires_grad=True)
    torch._dynamo.reset()
    torch.compile(f, fullgraph=True, backend="aot_eager")(x, m, s).sum().backward()
    gx, gs = x.grad.clone(), s.grad.clone()
    x.grad = s.grad = None
    f(x, m, s).sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gs, s.grad)


# --------------------------------------------------------------------------- item 12: denoisers, linalg, schedules
_BASES = torch.linalg.qr(torch.randn(2, 6, 2, generator=torch.Generator().manual_seed(0)))[0]
_DENOISERS = {
    "molrg_denoise": lambda x: fastdiff.molrg_denoise(x, _BASES, 0.9, 0.4),
    "gaussian_denoise": lambda x: fastdiff.gaussian_denoise(x, torch.zeros(6), torch.eye(6), 0.9, 0.4),
    "empirical_denoise": lambda x: fastdiff.empirical_denoise(x, torch.randn(10, 6), 0.9, 0.4),
    "nearest_neighbors": lambda x: fastdiff.nearest_neighbors(x, torch.randn(10, 6)),
    "molrg_jacobian": lambda x: fastdiff.molrg_jacobian(x, _BASES, 0.9, 0.4),
    "molrg_jacobian_rank": lambda x: fastdiff.molrg_jacobian_rank(x, _BASES, 0.9, 0.4),
}


@pytest.mark.parametrize("name", list(_DENOISERS))
def test_denoisers_refuse_int_complex_meta(name):
    for dtype in (torch.int64, torch.complex64):
        with pytest.raises(TypeError, match=r"x: expected a floating-point tensor \(float16, bfloat16"):
            _DENOISERS[name](torch.ones(4, 6, dtype=dtype))
    with pytest.raises(ValueError, match="x: meta tensors hold no data"):
        _DENOISERS[name](torch.ones(4, 6, device="meta"))


@pytest.mark.parametrize("name", list(_DENOISERS))
def test_denoisers_empty_batch(name):
    r = _DENOISERS[name](torch.ones(0, 6))
    r = r[0] if isinstance(r, tuple) else r
    assert r.shape[0] == 0


@pytest.mark.parametrize("call,exc,match", [
    (lambda x: fastdiff.gaussian_denoise(x, torch.zeros(6, dtype=torch.complex64), torch.eye(6), 0.9, 0.4), TypeError, "mean: expected a real tensor"),
    (lambda x: fastdiff.gaussian_denoise(x, torch.zeros(6), torch.eye(6, dtype=torch.complex64), 0.9, 0.4), TypeError, "cov: expected a real tensor"),
    (lambda x: fastdiff.gaussian_denoise(x, torch.zeros(6, device="meta"), torch.eye(6), 0.9, 0.4), ValueError, "mean: meta tensors"),
    (lambda x: fastdiff.gaussian_denoise(x, torch.zeros(6), eig=(torch.ones(6, dtype=torch.complex64), torch.eye(6))), TypeError, r"eig\[0\]: expected a real tensor"),
    (lambda x: fastdiff.empirical_denoise(x, torch.ones(10, 6, dtype=torch.complex64), 0.9, 0.4), TypeError, "data: expected a real tensor"),
    (lambda x: fastdiff.empirical_denoise(x, torch.ones(10, 6, dtype=torch.bool), 0.9, 0.4), TypeError, "data: expected a real tensor"),
    (lambda x: fastdiff.nearest_neighbors(x, torch.ones(10, 6, dtype=torch.complex64)), TypeError, "data: expected a real tensor"),
    (lambda x: fastdiff.nearest_neighbors(x, torch.ones(10, 6, device="meta")), ValueError, "data: meta tensors"),
    (lambda x: fastdiff.svdvals(torch.ones(3, 4, 5, device="meta")), ValueError, "A: meta tensors"),
    (lambda x: fastdiff.svd(torch.ones(3, 4, 5, device="meta")), ValueError, "A: meta tensors"),
    (lambda x: fastdiff.jacobian_rank(torch.ones(3, 4, 5, device="meta")), ValueError, "J: meta tensors"),
])
def test_other_arguments_refuse_complex_and_meta(call, exc, match):
    with pytest.raises(exc, match=match):
        call(torch.randn(4, 6))


def test_numpy_integers_for_integer_arguments():
    x, data = torch.randn(4, 6), torch.randn(10, 6)
    d, i = fastdiff.nearest_neighbors(x, data, k=np.int64(3))
    d2, i2 = fastdiff.nearest_neighbors(x, data, k=3)
    assert torch.equal(i, i2) and torch.equal(d, d2)
    assert fastdiff.DDPMSchedule(T=np.int64(50)).T == 50
    assert len(fastdiff.KarrasSchedule(n=np.int32(5)).sigmas) == len(fastdiff.KarrasSchedule(n=5).sigmas)
    with pytest.raises(ValueError, match="T: expected a positive int"):
        fastdiff.DDPMSchedule(T=True)
    with pytest.raises(ValueError, match="k: expected an int"):
        fastdiff.nearest_neighbors(x, data, k=2.0)


def test_meta_per_sample_value_message():
    x, m = torch.randn(4, 6), torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"sigma: expected a tensor on cpu, got meta"):
        fastdiff.euler_step(x, m, torch.ones(4, device="meta"), 0.5)
    with pytest.raises(ValueError, match=r"t: expected a tensor on cpu, got meta"):
        fastdiff.ddpm_step(x, m, torch.ones(4, dtype=torch.long, device="meta"), S)


def test_packed_bases_cache_sees_kernel_writes():
    # the packing cache keys on (id, _version): a kernel write into the bases must invalidate it
    gen = torch.Generator().manual_seed(1)
    bases = torch.linalg.qr(torch.randn(2, 6, 2, generator=gen))[0].contiguous()
    x = torch.randn(4, 6, generator=gen)
    first = fastdiff.molrg_denoise(x, bases, 0.9, 0.4)
    new = torch.linalg.qr(torch.randn(2, 6, 2, generator=gen))[0].contiguous()
    fastdiff.predict_x0(bases, torch.zeros_like(bases), 1.0, 1.0, prediction="x0", out=bases, backend="cpp")
    assert not bases.any()  # x0 = model_output = 0 (through the C++ kernel)
    fastdiff.euler_step(bases, new, 1.0, 0.0, prediction="x0", out=bases, backend="cpp")  # = new
    torch.testing.assert_close(bases, new)
    again = fastdiff.molrg_denoise(x, bases, 0.9, 0.4)
    torch.testing.assert_close(again, fastdiff.molrg_denoise(x, new.clone(), 0.9, 0.4))
    assert not torch.allclose(again, first)


def test_molrg_jacobian_rank_svals_gradient_matches_torch():
    # the small (r, r) SVD inside goes through svdvals: a kernel there detached part of the graph
    if not backends.available()["cpp"][0]:
        pytest.skip("cpp not available")
    grads = []
    for b in ("torch", "cpp"):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
        _, S = fastdiff.molrg_jacobian_rank(x, _BASES, 0.9, 0.4, return_svals=True, backend=b)
        (S * torch.linspace(0.1, 1.0, 6)).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradients_match_torch(dtype):
    if not backends.available()["cpp"][0]:
        pytest.skip("cpp not available")
    grads = []
    for b in ("torch", "cpp"):
        gen = torch.Generator().manual_seed(4)
        x = torch.randn(4, 6, generator=gen).to(dtype).requires_grad_(True)
        m = torch.randn(4, 6, generator=gen).to(dtype).requires_grad_(True)
        sig = torch.tensor([1.0, 0.7, 1.3, 0.9], requires_grad=True)
        y = fastdiff.euler_ancestral_step(x, m, sig, 0.5, generator=fastdiff.Generator(3), backend=b)
        assert y.dtype == dtype
        (y.float() * torch.linspace(-1, 1, 24).reshape(4, 6)).sum().backward()
        grads.append((x.grad, m.grad, sig.grad))
    for a, r in zip(*grads):
        torch.testing.assert_close(a, r, rtol=1e-2, atol=1e-2)
