"""fastdiff.dispatch: the one table that decides backend="auto", its printed op x backend matrix,
the forced-backend errors, the size limits at their edges, and float64 going to torch."""
import os

import pytest
import torch

import fastdiff
from fastdiff import backends, dispatch
from fastdiff.dispatch import OPS
from fastdiff.ops.molrg import CPP_FUSED_MAX_ND, CPP_FUSED_MAX_ND_GRAD, CPP_MAX_K

CPU = torch.device("cpu")
F32 = torch.float32
INTERP = os.environ.get("TRITON_INTERPRET") == "1"


def _row(op, name):
    return next((i for i in OPS[op].impls if i.backend == name), None)


def _matrix_rows():
    lines = fastdiff.dispatch.info().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("op x backend"))
    return [[c.strip() for c in line.split(" | ")] for line in lines[start + 1:]]


def test_info_prints_the_op_by_backend_matrix_of_the_table():
    rows = _matrix_rows()
    assert rows[0] == ["op", *dispatch.COLUMNS, "auto cpu", "auto cuda"]
    assert set(dispatch.COLUMNS) == set(backends.BACKENDS) - {"auto"}
    assert [r[0] for r in rows[1:]] == list(OPS)
    for r in rows[1:]:
        op = r[0]
        for name, text in zip(dispatch.COLUMNS, r[1:5]):
            impl = _row(op, name)
            if impl is None:
                assert text == "-", (op, name)
                continue
            assert text.startswith("yes" if dispatch.exists(op, name) else "no ("), (op, name, text)
            assert impl.limit in text, (op, name, text)
        assert r[5] == dispatch.choose(op, "auto", CPU, F32)
        assert r[6] == dispatch.choose(op, "auto", torch.device("cuda"), F32)


def test_info_command_prints_the_matrix(capsys):
    fastdiff.info()
    out = capsys.readouterr().out
    assert "op x backend" in out
    for op in OPS:
        assert op in out


def _runs_forced_on_cpu(op, name):
    impl = _row(op, name)
    if impl is None or not dispatch.exists(op, name):
        return False
    return "cpu" in impl.devices or name == "triton" and INTERP


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("name", [*backends.BACKENDS, "gpu"])
def test_choose_every_op_and_backend_on_cpu(op, name):
    table = OPS[op]
    if name not in table.names:
        with pytest.raises(ValueError, match="backend: expected one of"):
            dispatch.choose(op, name, CPU, F32)
        return
    if not (name in ("auto", "torch") or op == "trajectory" or _runs_forced_on_cpu(op, name)):
        with pytest.raises((RuntimeError, ValueError), match=f"backend='{name}'"):
            dispatch.choose(op, name, CPU, F32)
        return
    got = dispatch.choose(op, name, CPU, F32)
    if name == "auto":
        want = next((b for b in table.auto.get("cpu", ()) if dispatch.exists(op, b)), table.fallback)
        assert got == want
    elif name == "torch":
        assert got == table.fallback
    elif _runs_forced_on_cpu(op, name):
        assert got == name
    else:
        assert got == "loop"  # the fused trajectory is an optimization: the loop runs instead


def test_unknown_backend_name_is_an_error_on_empty_tensors():
    e = torch.empty(0, 6)
    match = "backend: expected one of"
    with pytest.raises(ValueError, match=match):
        fastdiff.euler_step(e, e, 1.0, 0.5, backend="gpu")
    with pytest.raises(ValueError, match=match):
        fastdiff.ddpm_step(e, e, 5, fastdiff.DDPMSchedule(), backend="gpu")
    with pytest.raises(ValueError, match=match):
        fastdiff.randn(0, 3, backend="gpu")
    with pytest.raises(ValueError, match=match):
        fastdiff.molrg_denoise(e, torch.linalg.qr(torch.randn(6, 2))[0][None], 0.9, 0.5, backend="gpu")
    U = torch.linalg.qr(torch.randn(6, 2))[0][None]
    empty_matrices = torch.empty(0, 3, 3)
    for call in (lambda: fastdiff.linalg.svdvals(empty_matrices, backend="gpu"),
                 lambda: fastdiff.linalg.svdvals_rank(empty_matrices, backend="gpu"),
                 lambda: fastdiff.linalg.jacobian_rank(empty_matrices, backend="gpu"),
                 lambda: fastdiff.linalg.molrg_jacobian_rank(e, U, 1.0, 0.5, backend="gpu"),
                 lambda: fastdiff.jacobian_rank_trajectory(fastdiff.denoisers.MoLRG(U), e, backend="gpu"),
                 lambda: fastdiff.sample(fastdiff.denoisers.MoLRG(U), (0, 6), fastdiff.DDPMSchedule(T=10),
                                         backend="gpu", progress=False)):
        with pytest.raises(ValueError, match=match):
            call()
    for op in OPS:
        with pytest.raises(ValueError, match=match):
            dispatch.choose(op, "gpu", CPU, F32)


needs_cpp = pytest.mark.skipif(not dispatch.exists("molrg", "cpp"), reason="fastdiff._C without molrg_forward")
needs_triton = pytest.mark.skipif(not dispatch.exists("molrg", "triton") or not (INTERP or torch.cuda.is_available()),
                                  reason="no Triton here")
TRITON_DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@needs_cpp
def test_molrg_cpp_limits_just_inside_and_outside():
    choose = dispatch.choose
    assert choose("molrg", "auto", CPU, F32, n=CPP_FUSED_MAX_ND, D=1, K=1) == "cpp"
    assert choose("molrg", "auto", CPU, F32, n=CPP_FUSED_MAX_ND + 1, D=1, K=1) == "torch"
    assert choose("molrg", "auto", CPU, F32, n=CPP_FUSED_MAX_ND_GRAD, D=1, K=1, grad=True) == "cpp"
    assert choose("molrg", "auto", CPU, F32, n=CPP_FUSED_MAX_ND_GRAD + 1, D=1, K=1, grad=True) == "torch"
    # the n * sum d_k limit is auto's speed rule; a forced cpp keeps the fused kernel
    assert choose("molrg", "cpp", CPU, F32, n=CPP_FUSED_MAX_ND + 1, D=1, K=1) == "cpp"
    for backend in ("auto", "cpp"):
        assert choose("molrg", backend, CPU, F32, n=2, D=CPP_MAX_K, K=CPP_MAX_K) == "cpp"
        assert choose("molrg", backend, CPU, F32, n=2, D=CPP_MAX_K + 1, K=CPP_MAX_K + 1) == "torch"  # GEMM form
    assert choose("trajectory", "cpp", CPU, F32, n=4, D=CPP_MAX_K, K=CPP_MAX_K) == "cpp"
    assert choose("trajectory", "cpp", CPU, F32, n=4, D=CPP_MAX_K + 1, K=CPP_MAX_K + 1) == "loop"


@needs_triton
def test_triton_limits_just_inside_and_outside():
    from fastdiff.kernels import molrg, svd, trajectory

    choose = dispatch.choose
    D, K = molrg.MAX_D, molrg.MAX_K
    assert choose("molrg", "triton", TRITON_DEV, F32, n=8, D=D, K=K) == "triton"
    assert choose("molrg", "triton", TRITON_DEV, F32, n=8, D=D + 1, K=K) == "torch"  # GEMM form
    assert choose("molrg", "triton", TRITON_DEV, F32, n=8, D=D, K=K + 1) == "torch"
    m = svd.MAX_DIM
    assert choose("svd", "triton", TRITON_DEV, F32, m=m, n=m) == "triton"
    with pytest.raises(ValueError, match=rf"backend='triton': the SVD kernel takes m, n <= {m}"):
        choose("svd", "triton", TRITON_DEV, F32, m=m + 1, n=2)
    # no SVD variant spills (the large tiles are streamed): auto takes every size the kernel fits
    assert choose("svd", "auto", torch.device("cuda"), F32, m=m, n=m) == "triton"
    assert choose("svd", "auto", torch.device("cuda"), F32, m=128, n=64) == "triton"
    assert choose("svd", "auto", torch.device("cuda"), F32, m=2, n=m + 1) == "torch"
    assert choose("trajectory", "triton", TRITON_DEV, F32, n=4, D=4, K=trajectory.MAX_K) == "triton"
    got, why = choose("trajectory", "triton", TRITON_DEV, F32, explain=True, n=4, D=4, K=trajectory.MAX_K + 1)
    assert got == "loop" and why == trajectory.fits(4, 4, trajectory.MAX_K + 1)[1]


@needs_triton
def test_triton_auto_refuses_the_sizes_whose_variants_spill():
    """auto runs torch (the loop for the trajectory) where the Triton variant spills registers, with
    the measured spill as the reason (bench/results/triton-resources.md, tests/test_aot.py checks
    that no default spills); a forced backend="triton" still runs there.  No SVD variant spills (the
    large tiles are streamed), so auto takes the SVD kernel at every size it fits."""
    choose, cuda = dispatch.choose, torch.device("cuda")
    # register tiles (<= 128 x 64 padded) and streamed ones alike: no SVD variant spills
    for m, n in ((64, 64), (128, 64), (64, 128), (256, 32), (1, 256), (65, 65), (129, 64), (128, 128), (256, 256)):
        assert choose("svd", "auto", cuda, F32, m=m, n=n) == "triton", (m, n)
        assert choose("svd", "auto", cuda, torch.float64, m=m, n=n) == "triton", (m, n)
    for n, D in ((16, 16), (32, 16), (16, 32), (4, 4)):
        assert choose("trajectory", "auto", cuda, F32, n=n, D=D, K=32) == "triton", (n, D)
    for n, D in ((48, 24), (32, 17), (33, 16), (128, 32)):  # the benchmark's 48 x 24 pads to 64 x 32
        got, why = choose("trajectory", "auto", cuda, F32, explain=True, n=n, D=D, K=3)
        assert got == "loop" and "spills" in why and "triton-resources.md" in why, (n, D, why)
        assert choose("trajectory", "triton", TRITON_DEV, F32, n=n, D=D, K=3) == "triton"
    # the MoLRG kernels spill at no size they take (their blocks were shrunk instead)
    assert choose("molrg", "auto", cuda, F32, n=1024, D=512, K=32, grad=True) == "triton"


def test_float64_goes_to_torch():
    f64 = torch.float64
    for op in ("fused_step", "molrg", "ksubspaces"):
        assert dispatch.choose(op, "auto", CPU, f64) == "torch", op
    assert dispatch.choose("trajectory", "auto", CPU, f64) == "loop"
    if dispatch.exists("molrg", "cpp"):
        assert dispatch.choose("molrg", "cpp", CPU, f64) == "torch"  # the GEMM form, as documented
        with pytest.raises(TypeError, match="backend='cpp' takes float32"):
            dispatch.choose("fused_step", "cpp", CPU, f64)
        with pytest.raises(RuntimeError, match="float32 CPU"):
            dispatch.choose("ksubspaces", "cpp", CPU, f64)
    # the SVD kernels take float64 (their accuracy is documented per backend in fastdiff.linalg)
    want = "cpp" if dispatch.exists("svd", "cpp") else "torch"
    assert dispatch.choose("svd", "auto", CPU, f64) == want
