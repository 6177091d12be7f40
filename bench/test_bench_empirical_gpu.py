"""GPU benchmark of the Triton empirical scan (kernels/empirical.py): issue 17, the streamed kernel.

At (B, N, n) = (256, 50000, 3072) (acc in the output buffer) and (256, 50000, 192) (acc in registers),
float32, the posterior's pass two ways:

* "mean": the softmax mean and log-sum-exp only (empirical_denoise's call: soft, acc, kc = 0);
* "posterior": also the 2k + 2 = 6 neighbour candidates (empirical_posterior with k = 2).

Rows: the Triton kernel (the op's launcher, backend "triton"), the op's torch launcher (chunked
GEMMs, backend "torch", the default chunk), and the eager torch formulation a user would write:
``d2 = cdist(x, alpha y)^2``, ``softmax(-d2 / 2 sigma^2) @ y``, ``logsumexp``, ``topk`` of
``-cdist(x, y)`` (a (B, N) matrix: 51 MB here).  Each timed kernel result is checked against the
eager one first (log-sum-exp to 1e-3 absolute, the mean to 1e-4 of the data scale: float32 both).
A small sweep of the kernel's tiles (``tune=``), splits and TF32x3 dots at both shapes, so the
defaults in kernels/empirical.py can be set from measurements.  GFLOP/s counts the two GEMMs,
4 B N n.  CUDA events through the shared harness (bench/conftest.py ``record``).

Skipped without CUDA.  Smoke mode, to check on a CPU that this file runs (not a timing):
    FASTDIFF_BENCH_EMPIRICAL_SMOKE=1 TRITON_INTERPRET=1 FASTDIFF_BENCH_DEVICE=cpu \
        python -m pytest bench/test_bench_empirical_gpu.py --benchmark-enable
runs every test on tiny sizes under the Triton interpreter.
"""
import math

import pytest
import torch

import harness

SMOKE = harness.gpu_bench_mode("FASTDIFF_BENCH_EMPIRICAL_SMOKE")

from fastdiff.ops import empirical as op  # noqa: E402

SHAPES = [(8, 300, 40), (8, 300, 12)] if SMOKE else [(256, 50000, 3072), (256, 50000, 192)]
ROUNDS = 1 if SMOKE else 10
K = 2                                   # neighbours: kc = 2k + 2 candidates
ALPHA, SIGMA = 0.8, 0.5
# tiles (BLOCK_B, BLOCK_N, BLOCK_K, num_warps) and splits to sweep; None: the default plan
TUNE = [None, dict(BLOCK_B=32), dict(BLOCK_N=32), dict(BLOCK_K=32), dict(num_warps=4),
        dict(BLOCK_B=32, BLOCK_N=32, num_warps=8)]
SPLITS = [None, 1, 4] if SMOKE else [None, 16, 64, 256]


def _problem(B, N, n, device):
    """Data y ~ N(0, 1) (N, n), queries x = alpha y_j + sigma eps at random rows (the sampler's
    situation), and the scan's inputs in centred coordinates (fastdiff/denoisers/empirical.py)."""
    g = torch.Generator(device=device).manual_seed(0)
    Y = torch.randn(N, n, generator=g, device=device)
    rows = torch.randint(0, N, (B,), generator=g, device=device)
    x = ALPHA * Y[rows] + SIGMA * torch.randn(B, n, generator=g, device=device)
    c = Y.mean(0)
    ones = torch.ones(B, device=device)
    args = ((x - ALPHA * c).contiguous(), Y, c, ones * (ALPHA / SIGMA**2), ones * (ALPHA**2 / (2 * SIGMA**2)),
            ones * (1 - ALPHA))
    return x, Y, args


def _eager(x, Y, kc):
    """The formula as eager torch: (log-sum-exp of the logits, the softmax mean, the kc nearest rows)."""
    logits = torch.cdist(x, ALPHA * Y).square_().mul_(-0.5 / SIGMA**2)
    lse = torch.logsumexp(logits, 1)
    mean = torch.softmax(logits, 1) @ Y
    near = torch.topk(torch.cdist(x, Y), kc, dim=1, largest=False).indices if kc else None
    return lse, mean, near


def _lse_and_mean(out, args):
    """The scan's (m, l, acc) as the eager quantities: LSE = m + log l - ||xh||^2 / (2 sigma^2), mean = acc / l + c."""
    m, l, acc = out[:3]
    xh, c = args[0], args[2]
    lse = m + l.log() - (xh * xh).sum(1) / (2 * SIGMA**2)
    return lse, acc / l[:, None] + c


def _check(out, ref, args):
    lse, mean = _lse_and_mean(out, args)
    assert (lse - ref[0]).abs().max().item() <= 1e-3 * (1 + ref[0].abs().max().item())
    assert (mean - ref[1]).abs().max().item() <= 1e-4 * 3


def _group(what, B, N, n):
    return f"empirical {what} (B,N,n)=({B},{N},{n}) float32"


@pytest.mark.parametrize("what", ["mean", "posterior"])
@pytest.mark.parametrize("impl", ["triton", "torch launcher", "eager"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"n{s[2]}" for s in SHAPES])
def test_scan_against_eager(record, device, shape, impl, what):
    B, N, n = shape
    x, Y, args = _problem(B, N, n, device)
    kc = 2 * K + 2 if what == "posterior" else 0
    if impl == "eager":
        fn = lambda: _eager(x, Y, kc)  # noqa: E731
    else:
        backend = "triton" if impl == "triton" else "torch"
        fn = lambda: op.empirical_scan(backend, *args, kc=kc)  # noqa: E731
        _check(fn(), _eager(x, Y, 0), args)
    record(_group(what, B, N, n), impl, fn, bytes_moved=4 * (N * n + 2 * B * n), flops=4 * B * N * n, rounds=ROUNDS)


CASES = [(s, t, p) for s in SHAPES for t in TUNE for p in ([None] if t else SPLITS)] + \
        [(s, "tf32x3", None) for s in SHAPES]


def _case_id(shape, tune, splits):
    tiles = tune if isinstance(tune, str) else "-".join(f"{k}{v}" for k, v in (tune or {}).items()) or "default"
    return f"n{shape[2]}-{tiles}-splits{splits}"


@pytest.mark.parametrize("shape,tune,splits", CASES, ids=[_case_id(*c) for c in CASES])
def test_kernel_tuning_sweep(record, device, shape, tune, splits):
    """Tiles, num_warps, splits and TF32x3 dots of the posterior's pass (kc = 6), one group a shape."""
    from fastdiff.kernels import empirical as E

    B, N, n = shape
    x, Y, args = _problem(B, N, n, device)
    precision = "tf32x3" if tune == "tf32x3" else "ieee"
    tune = None if isinstance(tune, str) else tune
    kc = 2 * K + 2
    fn = lambda: E.empirical_scan(*args, -1.0, 1.0, True, True, kc, None, splits=splits,  # noqa: E731
                                  dot_precision=precision, tune=tune)
    _check(fn(), _eager(x, Y, 0), args)
    label = f"{precision} {tune or 'default tiles'} splits={splits or 'auto'}"
    record(f"empirical tune (B,N,n)=({B},{N},{n}) kc={kc}", label, fn, flops=4 * B * N * n, rounds=ROUNDS)


def test_candidates_match_eager_neighbours(device):
    """Not a timing: the kernel's 6 candidates hold the eager 2 nearest rows of every query (the
    denoiser re-ranks them in float64), at the benchmark's shapes."""
    for B, N, n in SHAPES:
        x, Y, args = _problem(B, N, n, device)
        best_i = op.empirical_scan("triton", *args, kc=2 * K + 2)[4]
        near = _eager(x, Y, K)[2]
        assert bool((best_i[:, :, None] == near[:, None, :]).any(1).all()), f"(B, N, n) = ({B}, {N}, {n})"
        assert not math.isnan(best_i.float().sum().item())
