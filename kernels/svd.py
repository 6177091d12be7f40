"""Triton batched singular values (and the energy rank, docs/math.md section 3) of many small matrices.

    S[b]    = singular values of A[b] (m x n), descending,        (B, min(m, n)), A's dtype
    rank[b] = min { r : sum_{i<=r} s_i^2 > eta^2 sum_i s_i^2 }    (B,) int64, in the same kernel

Let N = min(m, n), M = max(m, n); the kernels work on the tall view (M, N) (A itself, or A^T
read through swapped strides: no copy), padded to (M_PAD, N_PAD) powers of two, in the compute
precision (float64 by default).  Two kernels run the same four steps:

- ``_svd_kernel`` (padded tiles up to REGISTER_TILE = 128 x 64): one program a matrix, the whole
  tile in registers.
- ``_svd_streamed_kernel`` (larger tiles, up to 256 x 256): held in registers, a 128 x 128 float64
  tile spilled ~500 B a thread and 256 x 256 ~12 KB.  Instead the scaled matrix lives in a global
  workspace (one per persistent program, WORKSPACE_BYTES in all: about the L2 of an H100/H200),
  and each Householder step streams its active block (rows >= k, columns > k) through registers
  CHUNK rows at a time in two passes (w = v^T A; then both updates, written back).  ptxas: 128
  registers a thread at 8 warps, no spills.  Workspace traffic a matrix: 3 sum_k (M - k)(N - k)
  = 3 (M N^2 / 2 - N^3 / 6) words, L2-resident when the workspace fits: at 128 x 128 float64
  17 MB a matrix, a few microseconds at the several TB/s of an H100's L2 (bench/roofline.py
  lists it), against a cuSOLVER call a matrix in torch.

1. Scale: A <- A * 2^-e with 2^e the power of two at or below max|A|, exact, so no sum of squares
   can overflow or underflow to a loss (entries are in [-2, 2)); S is scaled back at the end.
   e is clamped to [-1000, 1000] in float64 (an all-subnormal float64 matrix is the one case
   this does not normalize; its S then has absolute, not relative, accuracy).
2. Householder bidiagonalization, for k = 0 .. N-1 (A = U B V^T, B upper bidiagonal):
     x = A[k:, k]               (a masked reduction: registers cannot be indexed)
     d_k = -sign(x_0) ||x||,    v = x - d_k e_0,   A -= (2 / v^T v) v (v^T A)
     y = A[k, k+1:],            e_k = -sign(y_0) ||y||,   u = y - e_k e_0,   A -= (2 / u^T u) (A u) u^T
   Each step touches the whole padded tile (about 6 passes), masked: 2-3x the flops of a
   trailing-submatrix update, but no dynamic indexing and no shared-memory round trips.
   Backward stable: the bidiagonal's singular values are within ~ c N eps ||A|| of A's.
   d_k^2 and e_k^2 are written to a small global scratch row (2 N values per matrix, L1-resident)
   because the next phase reads them one scalar at a time.
3. All N singular values at once by multisection on the Golub-Kahan tridiagonal T (2N x 2N, zero
   diagonal, off-diagonal d_0, e_0, d_1, e_1, ..., d_{N-1}), whose eigenvalues are +-s_i.  Its
   Sturm count (LDL^T pivots q_0 = -x, q_i = -x - b_{i-1}^2 / q_{i-1}; count of q_i < 0) is the
   number of eigenvalues below x, so #{s_i < x} = count(x) - N for x > 0.  Each target t (the
   t-th smallest) keeps an interval [lo_t, hi_t], starting at [0, Gershgorin bound of T]; each
   round evaluates SECTIONS interior points per target (vectorized over N_PAD x SECTIONS lanes,
   one recurrence of 2N - 1 steps shared by all) and shrinks every interval by SECTIONS + 1.
   Bisection on T is accurate to O(eps ||B||) absolute (Demmel-Kahan), without squaring the
   singular values (B^T B would lose small ones: acceptance asks 1e-12 s_1 in float64).
   The recurrence is a dependent chain of divisions: latency bound, so SECTIONS > 1 trades
   otherwise idle lanes for fewer rounds (4 points: 2.3 bits a round instead of 1).
4. Rank from the same registers: reverse cumulative sums of s^2 (the energy of the r largest),
   rank = 1 + #{r : C_r <= eta^2 C_N}, clamped to N; 0 for an all-zero matrix.

Non-finite input (any NaN or +-Inf in A[b]): S[b] is all NaN and rank[b] = -1 (the other
matrices are unaffected).  Sizes: 1 <= m, n <= MAX_DIM = 256 (larger: ValueError; callers fall
back to another backend).

Precision: COMPUTE_F64 (default for both input dtypes) meets 1e-12 s_1 (float64) and 1e-5 s_1
(float32) against LAPACK float64.  float32 compute is an option for float32 inputs (half the
registers, 2x the FP rate on H100) whose accuracy is measured in tests/test_svd_triton.py.
Rounds: enough for 2^-52 of the bound (float64 output) or 2^-36 (float32 output; far below the
float32 rounding of S, and keeps the rank's energy ratio error below 1e-7).

Performance (reasoning, not a measurement: bench/test_bench_svd_gpu.py measures it on a GPU).  The
kernel is latency bound, not FP64 bound: per Householder step about ten block-wide reductions
(shuffles + a barrier each), and per multisection round a chain of 2N - 1 dependent float64
divisions, so it runs far below the FP64 peak; what it saves is torch's and cuSOLVER's one solver
call per matrix above 32 x 32.  Float32 compute halves the registers (more programs per SM) and the
division latency.

64-bit offsets: the matrix offset b * m * n and the workspace offset are formed in int64 (B * m * n
may pass 2^31); offsets within one matrix are below 2^17.
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .fused_step import AOTVariant

MAX_DIM = 256
SECTIONS = 4  # interior points per target per round (power of two: it is a tl.arange length)
# padded tiles up to this many elements live in registers (_svd_kernel); larger ones are streamed
# through a global workspace (_svd_streamed_kernel): in registers 128 x 128 spilled ~500 B a thread
# and 256 x 256 ~12 KB (ptxas -v at sm_90, 32 warps), streamed neither spills
REGISTER_TILE = 128 * 64
STREAM_WARPS = 8                # 256 threads: a 2048-element chunk is 8 float64 values a thread
STREAM_CHUNK_ELEMENTS = 2048
WORKSPACE_BYTES = 48 << 20      # the streamed kernel's default workspace, all programs: ~ an H100/H200 L2


@triton.jit
def _power_of_two_scale(amax, COMPUTE_F64: tl.constexpr):
    """(2^-e, 2^e) for 2^e the power of two at or below amax, e clamped (see step 1)."""
    if COMPUTE_F64:
        ex = ((amax.to(tl.int64, bitcast=True) >> 52) & 0x7FF) - 1023
        ex = tl.minimum(tl.maximum(ex, -1000), 1000)
        down = ((1023 - ex) << 52).to(tl.float64, bitcast=True)
        up = ((1023 + ex) << 52).to(tl.float64, bitcast=True)
    else:
        ex = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        ex = tl.minimum(tl.maximum(ex, -100), 100)
        down = ((127 - ex) << 23).to(tl.float32, bitcast=True)
        up = ((127 + ex) << 23).to(tl.float32, bitcast=True)
    return down, up


@triton.jit
def _reflector(x0, nx2):
    """The Householder reflector H = I - beta v v^T with H x = d e_0, for a vector x whose first
    entry is x0 and whose squared norm is nx2: d = -sign(x0) ||x||, v = x - d e_0 (only v_0 =
    x0 - d = x0 + sign(x0) ||x|| differs from x: no cancellation), beta = 2 / v^T v with
    v^T v = 2 ||x|| (||x|| + |x0|), 0 for x = 0.  Returns (d, v_0, beta)."""
    nx = tl.sqrt(nx2)
    d = tl.where(x0 >= 0, -nx, nx)
    vtv = 2.0 * nx * (nx + tl.abs(x0))
    beta = tl.where(vtv > 0, 2.0 / tl.where(vtv > 0, vtv, 1.0), 0.0)
    return d, x0 - d, beta


@triton.jit
def _bidiagonal_singular_values(scr, N, bound, N_PAD: tl.constexpr, SECTIONS: tl.constexpr,
                                ROUNDS: tl.constexpr, COMPUTE_F64: tl.constexpr):
    """Step 3: the N singular values of the bidiagonal whose squared entries d_0^2, e_0^2, d_1^2, ...
    are scr[0 : 2N - 1], ascending in an (N_PAD,) vector (0 beyond N), by multisection of
    [0, bound] on the Golub-Kahan tridiagonal's Sturm counts."""
    if COMPUTE_F64:
        cdt: tl.constexpr = tl.float64
        PIVMIN: tl.constexpr = 1e-290     # pivots below this are replaced: b^2 / q stays finite
    else:
        cdt: tl.constexpr = tl.float32
        PIVMIN: tl.constexpr = 1e-32
    t = tl.arange(0, N_PAD)                                     # target: the t-th smallest
    frac = ((tl.arange(0, SECTIONS) + 1).to(cdt) / (SECTIONS + 1))[None, :]
    lo = tl.zeros([N_PAD], dtype=cdt)
    hi = tl.zeros([N_PAD], dtype=cdt) + bound * 1.0000001 + PIVMIN
    for _ in range(ROUNDS):
        xs = lo[:, None] + (hi - lo)[:, None] * frac            # (N_PAD, SECTIONS), increasing along axis 1
        q = -xs
        q = tl.where(tl.abs(q) < PIVMIN, -PIVMIN, q)
        cnt = tl.where(q < 0, 1, 0)
        for i in range(1, 2 * N):
            b2 = tl.load(scr + (i - 1))
            q = -xs - b2 / q
            q = tl.where(tl.abs(q) < PIVMIN, -PIVMIN, q)
            cnt += tl.where(q < 0, 1, 0)
        at_or_below = (cnt - N) <= t[:, None]                   # #{s < x} <= t  <=>  x <= s_t
        lo = tl.max(tl.where(at_or_below, xs, lo[:, None]), axis=1)
        hi = tl.min(tl.where(at_or_below, hi[:, None], xs), axis=1)
    s = 0.5 * (lo + hi)
    return tl.where(t < N, s, 0.0)


@triton.jit
def _store_values_and_rank(s, up, nonfinite, s_ptr, rank_ptr, b, N, eta2,
                           N_PAD: tl.constexpr, WITH_RANK: tl.constexpr):
    """Step 4: S[b] = s * 2^e descending (NaN if A[b] was not finite) and the energy rank."""
    t = tl.arange(0, N_PAD)
    out = tl.where(nonfinite, float("nan"), s * up)
    tl.store(s_ptr + b * N + (N - 1 - t), out.to(s_ptr.dtype.element_ty), mask=t < N)
    if WITH_RANK:
        s2 = s * s
        tail = tl.cumsum(s2, axis=0, reverse=True)              # tail[t] = energy of the N - t largest
        total = tl.sum(s2, axis=0)
        below = tl.sum(tl.where((t < N) & (tail <= eta2 * total), 1, 0), axis=0)
        r = tl.minimum(below + 1, N)
        r = tl.where(total > 0, r, 0)
        r = tl.where(nonfinite, -1, r)
        tl.store(rank_ptr + b, r.to(tl.int64))


@triton.jit
def _svd_kernel(
    a_ptr, s_ptr, rank_ptr, scratch_ptr,
    M, N,                 # tall view: M >= N rows x N columns
    stride_r, stride_c,   # element strides of the tall view's rows / columns within one matrix
    eta2: tl.float64,     # eta^2 (unused without WITH_RANK)
    M_PAD: tl.constexpr, N_PAD: tl.constexpr, SECTIONS: tl.constexpr, ROUNDS: tl.constexpr,
    COMPUTE_F64: tl.constexpr, WITH_RANK: tl.constexpr,
):
    """One matrix a program, its whole padded tile in registers (tiles up to REGISTER_TILE)."""
    cdt: tl.constexpr = tl.float64 if COMPUTE_F64 else tl.float32
    pid = tl.program_id(0).to(tl.int64)
    ri = tl.arange(0, M_PAD)
    cj = tl.arange(0, N_PAD)
    rows = ri[:, None]
    cols = cj[None, :]
    inside = (rows < M) & (cols < N)
    A = tl.load(a_ptr + pid * M * N + rows * stride_r + cols * stride_c, mask=inside, other=0.0).to(cdt)

    # ---- 1. non-finite check and power-of-two scaling
    finite = (A == A) & (tl.abs(A) < float("inf"))
    nonfinite = tl.sum(tl.where(finite, 0, 1)) > 0
    A = tl.where(finite, A, 0.0)
    down, up = _power_of_two_scale(tl.max(tl.max(tl.abs(A), axis=1), axis=0), COMPUTE_F64)
    A = A * down

    # ---- 2. Householder bidiagonalization; squares of d_k, e_k -> scratch[2k], scratch[2k+1]
    scr = scratch_ptr + pid * (2 * N)
    bound = tl.zeros([], dtype=cdt)    # Gershgorin bound of T: max |b_{i-1}| + |b_i|
    prev = tl.zeros([], dtype=cdt)     # |e_{k-1}|
    for k in range(0, N):
        # left reflector: zero A[k+1:, k]
        x = tl.sum(tl.where(cols == k, A, 0.0), axis=1)
        x = tl.where(ri >= k, x, 0.0)
        nx2 = tl.sum(x * x, axis=0)
        d, v0, beta = _reflector(tl.sum(tl.where(ri == k, x, 0.0), axis=0), nx2)
        v = tl.where(ri == k, v0, x)
        w = tl.sum(v[:, None] * A, axis=0)
        A = A - (beta * v)[:, None] * w[None, :]
        # right reflector: zero A[k, k+2:] (a no-op at k = N-1: y = 0)
        y = tl.sum(tl.where(rows == k, A, 0.0), axis=0)
        y = tl.where(cj > k, y, 0.0)
        ny2 = tl.sum(y * y, axis=0)
        e, u0, gamma = _reflector(tl.sum(tl.where(cj == k + 1, y, 0.0), axis=0), ny2)
        u = tl.where(cj == k + 1, u0, y)
        z = tl.sum(A * u[None, :], axis=1)
        A = A - z[:, None] * (gamma * u)[None, :]
        tl.store(scr + 2 * k, nx2)
        tl.store(scr + 2 * k + 1, ny2)
        bound = tl.maximum(bound, tl.maximum(prev + tl.abs(d), tl.abs(d) + tl.abs(e)))
        prev = tl.abs(e)
    tl.debug_barrier()  # the scratch stores above are read back by every thread below

    # ---- 3. and 4.
    s = _bidiagonal_singular_values(scr, N, bound, N_PAD, SECTIONS, ROUNDS, COMPUTE_F64)
    _store_values_and_rank(s, up, nonfinite, s_ptr, rank_ptr, pid, N, eta2, N_PAD, WITH_RANK)


@triton.jit
def _svd_streamed_kernel(
    a_ptr, s_ptr, rank_ptr, scratch_ptr, work_ptr,
    B, M, N, stride_r, stride_c, eta2: tl.float64,
    M_PAD: tl.constexpr, N_PAD: tl.constexpr, CHUNK: tl.constexpr, SECTIONS: tl.constexpr,
    ROUNDS: tl.constexpr, COMPUTE_F64: tl.constexpr, WITH_RANK: tl.constexpr,
):
    """Tiles above REGISTER_TILE: the same four steps with the scaled matrix in a global workspace
    (L2-resident), streamed CHUNK rows at a time, so no tile outgrows the registers.

    Persistent: program p takes matrices p, p + P, ... (P programs), reusing its workspace
    work[p] = (M_PAD x N_PAD tile, two M_PAD column buffers).  Householder step k touches only the
    active block rows >= k, columns > k (column k is final once d_k is known; rows < k and the
    rest of column k never feed d or e again) in two passes:
      A: w = v^T A                                   (v = the left reflector of column k, read from
                                                      the column buffer filled by the last pass)
         row k after the left update, y = A[k, :] - beta v_0 w: the right reflector u, gamma
      B: A <- A - beta v w^T, then A <- A - gamma (A u) u^T per row (each row's z = (A u)_r needs
         only that row), written back; column k+1 -> the other buffer (the next step's x).
    """
    cdt: tl.constexpr = tl.float64 if COMPUTE_F64 else tl.float32
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    work = work_ptr + pid.to(tl.int64) * (M_PAD * N_PAD + 2 * M_PAD)
    colbuf = work + M_PAD * N_PAD
    scr = scratch_ptr + pid.to(tl.int64) * (2 * N)
    ri = tl.arange(0, M_PAD)
    cj = tl.arange(0, N_PAD)
    cr = tl.arange(0, CHUNK)
    cols = cj[None, :]
    for b in range(pid, B, nprog):
        b64 = tl.cast(b, tl.int64)  # (the interpreter hands the loop a Python int)
        src = a_ptr + b64 * M * N
        # ---- 1. non-finite check and scale (one read pass), then the scaled copy (a second)
        amax = tl.zeros([], dtype=cdt)
        bad = tl.zeros([], dtype=tl.int32)
        for r0 in range(0, M, CHUNK):
            rows = (r0 + cr)[:, None]
            a = tl.load(src + rows * stride_r + cols * stride_c, mask=(rows < M) & (cols < N), other=0.0).to(cdt)
            finite = (a == a) & (tl.abs(a) < float("inf"))
            bad += tl.sum(tl.sum(tl.where(finite, 0, 1), axis=1), axis=0)
            amax = tl.maximum(amax, tl.max(tl.max(tl.abs(tl.where(finite, a, 0.0)), axis=1), axis=0))
        down, up = _power_of_two_scale(amax, COMPUTE_F64)
        for r0 in range(0, M, CHUNK):
            rr = r0 + cr
            rows = rr[:, None]
            a = tl.load(src + rows * stride_r + cols * stride_c, mask=(rows < M) & (cols < N), other=0.0).to(cdt)
            a = tl.where((a == a) & (tl.abs(a) < float("inf")), a, 0.0) * down
            tl.store(work + rows * N_PAD + cols, a, mask=rows < M)
            tl.store(colbuf + rr, tl.sum(tl.where(cols == 0, a, 0.0), axis=1), mask=rr < M)
        tl.debug_barrier()

        # ---- 2. Householder bidiagonalization, streamed
        bound = tl.zeros([], dtype=cdt)
        prev = tl.zeros([], dtype=cdt)
        for k in range(0, N):
            x_buf = colbuf + (k % 2) * M_PAD
            next_buf = colbuf + ((k + 1) % 2) * M_PAD
            x = tl.load(x_buf + ri, mask=(ri >= k) & (ri < M), other=0.0)
            nx2 = tl.sum(x * x, axis=0)
            d, v0, beta = _reflector(tl.load(x_buf + k), nx2)
            first = (k // CHUNK) * CHUNK
            w = tl.zeros([N_PAD], dtype=cdt)
            for r0 in range(first, M, CHUNK):                  # pass A
                rr = r0 + cr
                live = (rr >= k) & (rr < M)
                v = tl.where(rr == k, v0, tl.load(x_buf + rr, mask=live, other=0.0))
                a = tl.load(work + rr[:, None] * N_PAD + cols, mask=live[:, None] & (cols > k), other=0.0)
                w += tl.sum(v[:, None] * a, axis=0)
            y = tl.load(work + k * N_PAD + cj, mask=cj > k, other=0.0) - beta * v0 * w
            y = tl.where(cj > k, y, 0.0)
            ny2 = tl.sum(y * y, axis=0)
            e, u0, gamma = _reflector(tl.sum(tl.where(cj == k + 1, y, 0.0), axis=0), ny2)
            u = tl.where(cj == k + 1, u0, y)
            # every thread has read row k and pass A's tiles before any thread overwrites them (the
            # reductions above need not cross warps, so they are no barrier)
            tl.debug_barrier()
            for r0 in range(first, M, CHUNK):                  # pass B
                rr = r0 + cr
                live = (rr >= k) & (rr < M)
                active = live[:, None] & (cols > k)
                v = tl.where(rr == k, v0, tl.load(x_buf + rr, mask=live, other=0.0))
                a = tl.load(work + rr[:, None] * N_PAD + cols, mask=active, other=0.0)
                a = a - (beta * v)[:, None] * w[None, :]
                z = tl.sum(a * u[None, :], axis=1)
                a = a - z[:, None] * (gamma * u)[None, :]
                tl.store(work + rr[:, None] * N_PAD + cols, a, mask=active)
                tl.store(next_buf + rr, tl.sum(tl.where(cols == k + 1, a, 0.0), axis=1), mask=live)
            tl.store(scr + 2 * k, nx2)
            tl.store(scr + 2 * k + 1, ny2)
            bound = tl.maximum(bound, tl.maximum(prev + tl.abs(d), tl.abs(d) + tl.abs(e)))
            prev = tl.abs(e)
            tl.debug_barrier()  # this step's stores are the next step's loads, by other threads

        # ---- 3. and 4.
        s = _bidiagonal_singular_values(scr, N, bound, N_PAD, SECTIONS, ROUNDS, COMPUTE_F64)
        _store_values_and_rank(s, up, bad > 0, s_ptr, rank_ptr, b64, N, eta2, N_PAD, WITH_RANK)
        tl.debug_barrier()  # the scratch reads above before the next matrix's stores


def _pow2(v: int) -> int:
    return triton.next_power_of_2(int(v))


def rounds_for(out_dtype: torch.dtype, sections: int = SECTIONS) -> int:
    """Multisection rounds to shrink [0, bound] to 2^-52 of it (float64 output) or 2^-36 (float32)."""
    bits = 52 if out_dtype == torch.float64 else 36
    return math.ceil(bits / math.log2(sections + 1))


def num_warps_for(m_pad: int, n_pad: int, compute_f64: bool = True) -> int:
    """Register tiles: about 32 tile elements a thread in float64 compute, 16 in float32 (ptxas,
    sm_90, registers a thread: float64 32x32 1 warp 236, 64x64 4 warps 254 (8 warps: 166, 16:
    108), 128x64 8 warps 246; float32 64x64 8 warps 110 (4 warps: 128 and 4 B spilled, 2: 234);
    none spills).  Streamed tiles: STREAM_WARPS (128 registers, no spill; 4 warps spill 8 B, 16
    warps 124 registers: one block an SM instead of two, the same warps resident).  Not tuned on a
    GPU yet: bench/test_bench_svd_gpu.py sweeps num_warps and SECTIONS."""
    if m_pad * n_pad > REGISTER_TILE:
        return STREAM_WARPS
    return max(1, (m_pad * n_pad) // (32 * 32) * (1 if compute_f64 else 2))


def chunk_for(m_pad: int, n_pad: int) -> int:
    """Rows a streamed pass holds at once: STREAM_CHUNK_ELEMENTS / N_PAD (a power of two)."""
    return max(1, min(m_pad, STREAM_CHUNK_ELEMENTS // n_pad))


def streamed_programs(B: int, m_pad: int, n_pad: int, compute_f64: bool, device: torch.device) -> int:
    """Persistent programs of the streamed kernel: as many as WORKSPACE_BYTES of workspace holds,
    at least one per SM, at most B."""
    per = (m_pad * n_pad + 2 * m_pad) * (8 if compute_f64 else 4)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return max(1, min(B, max(sms, WORKSPACE_BYTES // per)))


def _check(A: torch.Tensor, eta: Optional[float]) -> None:
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"A: expected a torch.Tensor, got {type(A).__name__}")
    if A.dim() != 3:
        raise ValueError(f"A: expected a (B, m, n) tensor, got shape {tuple(A.shape)}")
    if A.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"A: expected float32 or float64, got {A.dtype}")
    if not A.is_contiguous():
        raise ValueError("A: expected a contiguous tensor")
    if not (A.is_cuda or (A.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")):
        raise ValueError(f"A: expected a CUDA tensor (CPU only under TRITON_INTERPRET=1), got {A.device}")
    m, n = A.shape[1:]
    if not (1 <= m <= MAX_DIM and 1 <= n <= MAX_DIM):
        raise ValueError(f"A: m and n must be in 1..{MAX_DIM} for the Triton kernel, got (m, n) = ({m}, {n})")
    if eta is not None and not (0.0 < float(eta) <= 1.0):
        raise ValueError(f"eta: expected a value in (0, 1], got {eta}")


def svdvals_rank(A: torch.Tensor, eta: Optional[float] = None, *, compute_f64: bool = True,
                 out: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None,
                 sections: int = SECTIONS, num_warps: Optional[int] = None,
                 programs: Optional[int] = None,
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Singular values (descending) and, if ``eta`` is given, the energy rank of each A[b].

    A: (B, m, n) float32/float64 contiguous, CUDA (or CPU under TRITON_INTERPRET=1), 1 <= m, n <= 256.
    Returns S (B, min(m, n)) in A's dtype and rank (B,) int64 (None without eta); see the module
    docstring for the formulas, non-finite input (NaN S, rank -1) and accuracy.
    ``out=(S, rank)`` writes into given tensors; ``compute_f64=False`` computes float32 inputs in
    float32; ``sections`` / ``num_warps`` / ``programs`` (the streamed kernel's persistent programs,
    tiles over REGISTER_TILE) are tuning knobs (benchmarks).  No host-device sync.
    """
    _check(A, eta)
    if not compute_f64 and A.dtype == torch.float64:
        raise ValueError("compute_f64=False is for float32 inputs only")
    if sections < 1 or sections & (sections - 1):
        raise ValueError(f"sections: expected a power of two >= 1, got {sections}")
    if programs is not None and (isinstance(programs, bool) or not isinstance(programs, int) or programs < 1):
        raise ValueError(f"programs: expected an int >= 1, got {programs}")
    B, m, n = A.shape
    N, M = min(m, n), max(m, n)
    if out is None:
        S = torch.empty((B, N), dtype=A.dtype, device=A.device)
        rank = torch.empty((B,), dtype=torch.int64, device=A.device) if eta is not None else None
    else:
        S, rank = out
        if S.shape != (B, N) or S.dtype != A.dtype or S.device != A.device or not S.is_contiguous():
            raise ValueError(f"out: S must be a contiguous ({B}, {N}) {A.dtype} tensor on {A.device}")
        if eta is not None and (rank is None or rank.shape != (B,) or rank.dtype != torch.int64
                                or rank.device != A.device):
            raise ValueError(f"out: rank must be a ({B},) int64 tensor on {A.device}")
    if B == 0:
        return S, rank
    # tall view (M, N): A itself (rows stride n) or A^T (its rows are A's columns: stride 1)
    stride_r, stride_c = (n, 1) if m >= n else (1, n)
    cdt = torch.float64 if compute_f64 else torch.float32
    M_PAD, N_PAD = _pow2(M), _pow2(N)
    rank_arg = rank if rank is not None else S
    eta2 = float(eta) ** 2 if eta is not None else 1.0
    consts = dict(M_PAD=M_PAD, N_PAD=N_PAD, SECTIONS=sections, ROUNDS=rounds_for(A.dtype, sections),
                  COMPUTE_F64=compute_f64, WITH_RANK=eta is not None,
                  num_warps=num_warps or num_warps_for(M_PAD, N_PAD, compute_f64))
    if M_PAD * N_PAD <= REGISTER_TILE:
        scratch = torch.empty((B, 2 * N), dtype=cdt, device=A.device)
        _svd_kernel[(B,)](A, S, rank_arg, scratch, M, N, stride_r, stride_c, eta2, **consts)
        return S, rank
    P = min(B, programs) if programs is not None else streamed_programs(B, M_PAD, N_PAD, compute_f64, A.device)
    scratch = torch.empty((P, 2 * N), dtype=cdt, device=A.device)
    work = torch.empty((P, M_PAD * N_PAD + 2 * M_PAD), dtype=cdt, device=A.device)
    _svd_streamed_kernel[(P,)](A, S, rank_arg, scratch, work, B, M, N, stride_r, stride_c, eta2,
                               CHUNK=chunk_for(M_PAD, N_PAD), **consts)
    return S, rank


# --------------------------------------------------------------------------- AOT variants
_PTR = {torch.float32: "*fp32", torch.float64: "*fp64"}


def aot_variant(dtype, m, n, with_rank, compute_f64=True) -> AOTVariant:
    M_PAD, N_PAD = _pow2(max(m, n)), _pow2(min(m, n))
    streamed = M_PAD * N_PAD > REGISTER_TILE
    fp = "*fp64" if compute_f64 else "*fp32"
    sig = {"a_ptr": _PTR[dtype], "s_ptr": _PTR[dtype], "rank_ptr": "*i64", "scratch_ptr": fp,
           **({"work_ptr": fp, "B": "i32"} if streamed else {}),
           "M": "i32", "N": "i32", "stride_r": "i32", "stride_c": "i32", "eta2": "fp64"}
    const = {"M_PAD": M_PAD, "N_PAD": N_PAD, **({"CHUNK": chunk_for(M_PAD, N_PAD)} if streamed else {}),
             "SECTIONS": SECTIONS, "ROUNDS": rounds_for(dtype),
             "COMPUTE_F64": compute_f64, "WITH_RANK": with_rank}
    sig.update({name: "constexpr" for name in const})
    name = (f"svd_{_PTR[dtype][1:]}_{M_PAD}x{N_PAD}{'_rank' if with_rank else ''}"
            f"{'' if compute_f64 else '_f32compute'}")
    aligned = ("a_ptr", "s_ptr", "rank_ptr", "scratch_ptr", *(("work_ptr",) if streamed else ()))
    op = "svd" if compute_f64 else None  # the library always computes in float64
    return AOTVariant(name, _svd_streamed_kernel if streamed else _svd_kernel, sig, const,
                      num_warps_for(M_PAD, N_PAD, compute_f64), aligned, op, dtype, {"m": m, "n": n})


# Each constexpr branch once and the tile extremes: 1 x 1, tall 256 x 1, the benchmark's 64 x 64,
# 128 x 128 and the spilling 256 x 256 (float64 and float32 inputs), float32 compute.
AOT_KERNELS: List[AOTVariant] = [
    aot_variant(torch.float32, 1, 1, True),
    aot_variant(torch.float64, 256, 1, False),
    aot_variant(torch.float32, 64, 64, True),
    aot_variant(torch.float32, 64, 64, False),
    aot_variant(torch.float64, 64, 64, True),
    aot_variant(torch.float32, 128, 64, True),   # the largest tile auto runs (fastdiff/ops/svd.py)
    aot_variant(torch.float32, 128, 128, True),
    aot_variant(torch.float64, 256, 256, True),
    aot_variant(torch.float32, 64, 64, True, compute_f64=False),
]
