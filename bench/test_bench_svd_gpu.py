"""GPU benchmark of the batched Triton SVD kernel (kernels/svd.py): issue 4, acceptance 5.

* (16384, 64, 64) float32: fastdiff against torch.linalg.svdvals on CUDA (target >= 10x) and
  cupy.linalg.svd(compute_uv=False) (target: faster) when cupy imports, same run, CUDA events
  through the shared harness; also the fused-rank call and the float32-compute option.
* Matrices per second for n = 32, 64, 128, 256 (square, float32 and float64 inputs, rank fused);
  torch beside it at n = 32 float32 (where it batches with gesvdjBatched, its best case).
* A small sweep of the tuning knobs (multisection points, num_warps) at 64 x 64 and 128 x 128,
  and of the streamed kernel's persistent programs at 256 x 256, so the defaults in
  kernels/svd.py can be set from measurements; the streamed 128 x 128 against torch.
GFLOP/s counts Householder bidiagonalization only, 4 m n^2 - 4/3 n^3 (the bisection is extra);
the compute is float64, so the float32 matmul column of the shared table is no ceiling for it.
Matrices per second and every ratio go to bench/results/svd_gpu_<device>.md at the end.

Skipped without CUDA.  Smoke mode, to check on a CPU that this file runs (not a timing):
    FASTDIFF_BENCH_SVD_SMOKE=1 TRITON_INTERPRET=1 FASTDIFF_BENCH_DEVICE=cpu python -m pytest bench/test_bench_svd_gpu.py --benchmark-enable
runs every test on tiny sizes under the Triton interpreter.
"""
import os

import pytest
import torch

import harness

SMOKE = harness.gpu_bench_mode("FASTDIFF_BENCH_SVD_SMOKE")

from fastdiff.kernels import svd  # noqa: E402

try:
    import cupy
except ImportError:
    cupy = None

ACCEPT = (8, 6, 6) if SMOKE else (16384, 64, 64)
RATE_SIZES = {3: 4, 5: 4} if SMOKE else {32: 16384, 64: 16384, 128: 4096, 256: 1024}  # n: batch
TUNE = ({5: ((1, 4), (1, 2))} if SMOKE else
        {64: ((1, 2, 4, 8), (2, 4, 8, 16)), 128: ((2, 4, 8), (4, 8, 16))})  # n: (sections, num_warps)
TUNE_BATCH = 4 if SMOKE else 8192
# the streamed kernel (tiles over 128 x 64): persistent programs (the default fills WORKSPACE_BYTES,
# about the L2) against more of them resident; torch beside it at n = 128 (one cuSOLVER call a matrix)
PROGRAMS = {5: (1, 2)} if SMOKE else {256: (132, 264, 528, 1056)}
STREAMED_BATCH = 4 if SMOKE else 1024
ROUNDS = 1 if SMOKE else 10
SLOW_ROUNDS = 1 if SMOKE else 3   # torch / cupy at 16384 x 64 x 64 loop per matrix: seconds a call
BATCH = {}                        # group -> matrices per call, for the matrices/s summary


def _flops(B, m, n):
    m, n = max(m, n), min(m, n)
    return int(B * (4 * m * n * n - 4 * n**3 / 3))


def _matrices(B, m, n, dtype, device):
    return torch.randn(B, m, n, generator=torch.Generator().manual_seed(0)).to(dtype).to(device)


def _check(A, S):
    """The timed call is also right: first matrices against LAPACK float64, acceptance-1 bound."""
    k = min(A.shape[0], 64)
    ref = torch.linalg.svdvals(A[:k].double().cpu())
    err = (S[:k].double().cpu() - ref).abs().amax(1) / ref[:, 0]
    assert err.max().item() <= (1e-5 if A.dtype == torch.float32 else 1e-12), err.max().item()


def _torch_svdvals(A):
    return torch.linalg.svdvals(A)


@pytest.mark.parametrize("impl", ["fastdiff", "fastdiff+rank", "fastdiff f32compute", "eager", "cupy"])
def test_svdvals_acceptance(record, device, impl):
    B, m, n = ACCEPT
    A = _matrices(B, m, n, torch.float32, device)
    group = f"svdvals (B,m,n)=({B},{m},{n}) float32"
    BATCH[group] = B
    rounds = ROUNDS
    if impl == "fastdiff":
        fn = lambda: svd.svdvals_rank(A)  # noqa: E731
    elif impl == "fastdiff+rank":
        fn = lambda: svd.svdvals_rank(A, 0.99)  # noqa: E731
    elif impl == "fastdiff f32compute":
        fn = lambda: svd.svdvals_rank(A, compute_f64=False)  # noqa: E731
    elif impl == "eager":
        fn, rounds = (lambda: _torch_svdvals(A)), SLOW_ROUNDS
    else:
        if cupy is None or SMOKE:
            pytest.skip("cupy is not importable" if cupy is None else "cupy needs CUDA")
        Ac = cupy.asarray(A)
        fn, rounds = (lambda: cupy.linalg.svd(Ac, compute_uv=False)), SLOW_ROUNDS
    if impl.startswith("fastdiff"):
        _check(A, fn()[0])
    record(group, impl, fn, flops=_flops(B, m, n), rounds=rounds)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("n", list(RATE_SIZES))
def test_matrices_per_second(record, device, n, dtype):
    B = RATE_SIZES[n]
    A = _matrices(B, n, n, dtype, device)
    group = f"svdvals+rank (B,n)=({B},{n}) {str(dtype)[6:]}"
    BATCH[group] = B
    _check(A, svd.svdvals_rank(A, 0.99)[0])
    record(group, "fastdiff", lambda: svd.svdvals_rank(A, 0.99), flops=_flops(B, n, n), rounds=ROUNDS)


def test_torch_at_32(record, device):
    """torch's batched gesvdjBatched path (m, n <= 32), its best case, beside the n = 32 rate."""
    n = min(RATE_SIZES)
    B = RATE_SIZES[n]
    A = _matrices(B, n, n, torch.float32, device)
    group = f"svdvals+rank (B,n)=({B},{n}) float32"
    BATCH[group] = B
    record(group, "eager", lambda: _torch_svdvals(A), flops=_flops(B, n, n), rounds=SLOW_ROUNDS)


TUNE_CASES = [(n, s, w) for n, (secs, warps) in TUNE.items() for s in secs for w in warps]


@pytest.mark.parametrize("n,sections,warps", TUNE_CASES, ids=[f"n{n}-s{s}-w{w}" for n, s, w in TUNE_CASES])
def test_tuning_sweep(record, device, n, sections, warps):
    """sections x num_warps at float32 input, float64 compute (the default path)."""
    A = _matrices(TUNE_BATCH, n, n, torch.float32, device)
    group = f"svd tune (B,n)=({TUNE_BATCH},{n}) float32"
    BATCH[group] = TUNE_BATCH
    fn = lambda: svd.svdvals_rank(A, 0.99, sections=sections, num_warps=warps)  # noqa: E731
    _check(A, fn()[0])
    record(group, f"sections={sections} warps={warps}", fn, flops=_flops(TUNE_BATCH, n, n), rounds=ROUNDS)


@pytest.mark.parametrize("n,programs", [(n, p) for n, ps in PROGRAMS.items() for p in ps])
def test_streamed_programs_sweep(record, device, n, programs):
    A = _matrices(STREAMED_BATCH, n, n, torch.float32, device)
    group = f"svd streamed programs (B,n)=({STREAMED_BATCH},{n}) float32"
    BATCH[group] = STREAMED_BATCH
    fn = lambda: svd.svdvals_rank(A, 0.99, programs=programs)  # noqa: E731
    _check(A, fn()[0])
    record(group, f"programs={programs}", fn, flops=_flops(STREAMED_BATCH, n, n), rounds=ROUNDS)


@pytest.mark.parametrize("impl", ["fastdiff", "eager"])
def test_streamed_against_torch(record, device, impl):
    n = 5 if SMOKE else 128
    A = _matrices(STREAMED_BATCH, n, n, torch.float32, device)
    group = f"svdvals+rank streamed (B,n)=({STREAMED_BATCH},{n}) float32"
    BATCH[group] = STREAMED_BATCH
    if impl == "fastdiff":
        _check(A, svd.svdvals_rank(A, 0.99)[0])
        fn, rounds = (lambda: svd.svdvals_rank(A, 0.99)), ROUNDS
    else:
        fn, rounds = (lambda: _torch_svdvals(A)), SLOW_ROUNDS
    record(group, impl, fn, flops=_flops(STREAMED_BATCH, n, n), rounds=rounds)


@pytest.fixture(scope="module", autouse=True)
def summary(device):
    """After this module: matrices/s and ratios of every svd row -> bench/results/svd_gpu_<device>.md."""
    yield
    rows = [r for r in harness.TABLE.rows if r.group in BATCH]
    if not rows:
        return
    lines = [f"Batched SVD (kernels/svd.py) on {harness.describe(device)}"
             + (" -- SMOKE RUN under the Triton interpreter, not a timing" if SMOKE else ""), "",
             "| group | impl | ms | matrices/s | time / fastdiff time |", "|---|---|---|---|---|"]
    for r in rows:
        base = next((x for x in rows if x.group == r.group and x.impl == "fastdiff"), None)
        ratio = f"{r.seconds / base.seconds:.2f}" if base and r is not base else "-"
        lines.append(f"| {r.group} | {r.impl} | {r.seconds * 1e3:.3f} | {BATCH[r.group] / r.seconds:,.0f} | {ratio} |")
    text = "\n".join(lines)
    tag = "cpu-smoke" if device == "cpu" else torch.cuda.get_device_name().replace(" ", "_")
    path = os.path.join(os.path.dirname(__file__), "results", f"svd_gpu_{tag}.md")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text + "\n")
    print("\n" + text + f"\n(written to {path})")
