"""Triton fused MoLRG denoiser: forward (GEMM, segmented square-sum + softmax over K, GEMM) and backward.

Per row x (n,) of X (B, n), with Ucat = [U_0 | ... | U_{K-1}] (n, D) and seg[j] the component
of column j (component k owns columns [off[k], off[k+1]), ragged d_k allowed):

    P   = x @ Ucat                                   (D,)
    s_k = sum_{j: seg[j] = k} P_j^2                  ||U_k^T x||^2
    l_k = b_k + g_k s_k
    w   = softmax_k(l)  (HARD == 0)  |  one_hot(argmax_k l), ties -> lowest k  (HARD == 1)
    w'  = (1 - gw) w + gw one_hot(label)             (HAS_LABELS only)
    out = A x + Ucat @ q,   q_j = w'_{seg[j]} C_{seg[j]} P_j

params (R, 3K+2) float32, R = 1 (row stride 0) or B: [g_0..g_{K-1}, b_0..b_{K-1}, C_0..C_{K-1}, A, gw].
x / out float32, float16 or bfloat16; everything is computed in float32, one rounding on the store.

Design (FlashAttention-like; nothing of size B x K x d ever goes to memory):
  * one program per BLOCK_B rows.  Pass 1 loops over n in BLOCK_N tiles and accumulates the
    projections P (BLOCK_B, D_PAD) in registers with tl.dot(x_tile, U_tile): the x tile is
    BLOCK_B rows x BLOCK_N contiguous elements (coalesced), the U tile BLOCK_N rows of D_PAD
    contiguous columns (coalesced, L2-resident: U is shared by every program).
  * the segmented square-sum is one more tl.dot, (P*P) @ S with S (D_PAD, K_PAD) the indicator
    seg[j] == k built in registers (0/1: the products are exact, only the fp32 sums round), so a
    ragged segmentation costs nothing more than a uniform one.  Padded columns j >= D have S = 0.
  * softmax / argmax over K_PAD columns, padded components at -inf (logits reach ~1e9 at tiny
    noise: the max is subtracted).  K_PAD >= 16 and D_PAD >= 16 because tl.dot needs every
    dimension >= 16.
  * the per-column coefficient w'_{seg[j]} C_{seg[j]} is the broadcast back, (w' C) @ S^T (each
    output is one product with 1.0: exact), and q = P * that.
  * pass 2 loops over n again: out_tile = A x_tile + tl.dot(q, U_tile^T).  x is read twice (the
    second read mostly from L2 for the tile sizes used); U twice per program, from L2.
Precision: DOT_PRECISION = "ieee" (fp32 FMA dots) meets the 1e-5 relative bound.  TF32 ("tf32",
10-bit mantissa, ~5e-4 relative per product) would miss it by ~50x, and worse: its error on s_k
is multiplied by g_k ~ 1/(2 sigma^2) in the logits, so the posterior w would be visibly wrong at
small noise.  "tf32x3" (3 TF32 tensor-core products, ~fp32 accuracy) is the fast option on
sm_80/sm_90 to try when tuning; it has an AOT variant so it is known to compile.
NaN in x: P of that row is NaN in every column (NaN * 0 = NaN, padding included), so s, w, q and
out are NaN for that row (hard mode: w is set to NaN explicitly, since an argmax of NaNs would
give a finite one-hot); rows are independent in every dot, so other rows are unaffected.
"""
from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from .fused_step import AOTVariant, _TY

MAX_D = 512
MAX_K = 32
# fp32 elements of the P accumulator / U tile per program: 16 per thread at 8 warps.  8192 at 4
# warps (64 per thread) spilled 20 KB/thread at D_PAD 128 (sm_80; ptxas -v,
# bench/results/triton-resources.md)
NUM_WARPS = 8
REG_TILE = 4096


@triton.jit
def posterior_weights(logit, kk, kmask, HARD: tl.constexpr):
    """The MoLRG posterior w (BLOCK_B, K_PAD) from the logits ``l = b + g s`` (module docstring), over
    the live components ``kmask``: softmax, or (HARD) the one-hot of the lowest k attaining the max
    (torch.argmax's tie rule), a row with a NaN logit all NaN.  The one Triton copy: the denoiser
    kernel and the fused trajectory (kernels/trajectory.py) both call it."""
    logit = tl.where(kmask[None, :], logit, float("-inf"))
    m = tl.max(logit, axis=1)
    if HARD:
        first = tl.min(tl.where(logit == m[:, None], kk[None, :], 1 << 30), axis=1)
        w = tl.where(kk[None, :] == first[:, None], 1.0, 0.0)
        nan_row = tl.max(tl.where(logit != logit, 1, 0), axis=1) > 0
        w = tl.where(nan_row[:, None], float("nan"), w)
    else:
        e = tl.exp(logit - m[:, None])     # padded columns: exp(-inf) = 0
        w = e / tl.sum(e, axis=1)[:, None]
    return w


@triton.jit
def guided_weights(w, gw, lab, kk):
    """CFG: ``w' = (1 - gw) w + gw onehot(label)`` (seed 004 eq. 7.4.20); gw per row (BLOCK_B, 1) or one scalar."""
    return (1.0 - gw) * w + tl.where(kk[None, :] == lab[:, None], gw, 0.0)


@triton.jit
def _row_block(B, n, D, K, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, K_PAD: tl.constexpr):
    """This program's rows and the index ranges both kernels tile with: ``(rows, rmask, xrow, cols,
    cmask, ii, kk, kmask)`` -- the rows and their mask, each row's int64 offset into x (B * n may
    pass 2^31), the columns of Ucat, the offsets within an n tile, the components (with masks)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, D_PAD)
    kk = tl.arange(0, K_PAD)
    return rows, rows < B, rows.to(tl.int64) * n, cols, cols < D, tl.arange(0, BLOCK_N), kk, kk < K


@triton.jit
def _molrg_fwd_kernel(
    x_ptr, u_ptr, seg_ptr, params_ptr, labels_ptr, out_ptr, w_ptr,
    B, n, D, K,
    p_stride,   # row stride of params: 0 (R = 1) or 3K + 2 (R = B)
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, K_PAD: tl.constexpr,
    HARD: tl.constexpr, HAS_LABELS: tl.constexpr, WRITE_W: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    rows, rmask, xrow, cols, cmask, ii, kk, kmask = _row_block(B, n, D, K, BLOCK_B, BLOCK_N, D_PAD, K_PAD)

    # ---- pass 1: P = x @ Ucat, (BLOCK_B, D_PAD) fp32 in registers
    P = tl.zeros([BLOCK_B, D_PAD], dtype=tl.float32)
    for i0 in range(0, n, BLOCK_N):
        i = i0 + ii
        imask = i < n
        xt = tl.load(x_ptr + xrow[:, None] + i[None, :], mask=rmask[:, None] & imask[None, :], other=0.0)
        ut = tl.load(u_ptr + i[:, None] * D + cols[None, :], mask=imask[:, None] & cmask[None, :], other=0.0)
        P = tl.dot(xt.to(tl.float32), ut, P, input_precision=DOT_PRECISION)

    # ---- segmented square-sum: s = (P*P) @ S, S[j, k] = (seg[j] == k)
    seg = tl.load(seg_ptr + cols, mask=cmask, other=-1)
    S = (seg[:, None] == kk[None, :]).to(tl.float32)               # (D_PAD, K_PAD)
    s = tl.dot(P * P, S, input_precision=DOT_PRECISION)            # (BLOCK_B, K_PAD)

    # ---- per-row parameters (row stride 0 broadcasts one row to every program)
    prow = params_ptr + rows.to(tl.int64) * p_stride
    pm = rmask[:, None] & kmask[None, :]
    g = tl.load(prow[:, None] + kk[None, :], mask=pm, other=0.0)
    b = tl.load(prow[:, None] + K + kk[None, :], mask=pm, other=0.0)
    C = tl.load(prow[:, None] + 2 * K + kk[None, :], mask=pm, other=0.0)
    A = tl.load(prow + 3 * K, mask=rmask, other=0.0)

    # ---- posterior over the K components
    w = posterior_weights(b + g * s, kk, kmask, HARD)
    if WRITE_W:
        tl.store(w_ptr + rows.to(tl.int64)[:, None] * K + kk[None, :], w.to(w_ptr.dtype.element_ty), mask=pm)
    if HAS_LABELS:
        gw = tl.load(prow + 3 * K + 1, mask=rmask, other=0.0)
        lab = tl.load(labels_ptr + rows, mask=rmask, other=0).to(tl.int32)
        w = guided_weights(w, gw[:, None], lab, kk)

    # ---- q_j = w'_{seg j} C_{seg j} P_j: broadcast back over each component's columns
    wc = tl.where(kmask[None, :], w * C, 0.0)
    q = P * tl.dot(wc, tl.trans(S), input_precision=DOT_PRECISION)  # (BLOCK_B, D_PAD)

    # ---- pass 2: out = A x + q @ Ucat^T, tile by tile
    for i0 in range(0, n, BLOCK_N):
        i = i0 + ii
        imask = i < n
        xm = rmask[:, None] & imask[None, :]
        xt = tl.load(x_ptr + xrow[:, None] + i[None, :], mask=xm, other=0.0).to(tl.float32)
        ut = tl.load(u_ptr + i[:, None] * D + cols[None, :], mask=imask[:, None] & cmask[None, :], other=0.0)
        o = tl.dot(q, tl.trans(ut), input_precision=DOT_PRECISION)  # (BLOCK_B, BLOCK_N)
        o = A[:, None] * xt + o
        tl.store(out_ptr + xrow[:, None] + i[None, :], o.to(out_ptr.dtype.element_ty), mask=xm)


def _pow2(v, lo=16):
    return max(lo, triton.next_power_of_2(int(v)))


def _blocks(B, n, D, K):
    """(BLOCK_B, BLOCK_N, D_PAD, K_PAD): the P accumulator <= REG_TILE fp32, the U tile <= half
    of it (at D_PAD 128 a 32-row U tile spilled 12 B/thread at sm_90, 16 rows none)."""
    D_PAD, K_PAD = _pow2(D), _pow2(K)
    BLOCK_B = max(16, min(64, REG_TILE // D_PAD, _pow2(B)))  # tl.dot takes no dimension below 16
    BLOCK_N = max(16, min(64, REG_TILE // 2 // D_PAD, _pow2(n)))
    return BLOCK_B, BLOCK_N, D_PAD, K_PAD


def molrg_forward(x, ucat, seg, K, params, labels, hard, out, w=None, dot_precision="ieee") -> None:
    """Launch the fused MoLRG forward (CUDA, or CPU under TRITON_INTERPRET=1); writes out (and w).

    x, out: (B, n) contiguous, float32/float16/bfloat16; ucat: (n, D) float32 row-major; seg:
    (D,) int32 component of each column; K: components (<= 32); params: (R, 3K+2) float32
    contiguous, R in {1, B}; labels: (B,) int64 or None; hard: bool; w: (B, K) contiguous or
    None (posterior before guidance, stored in w's dtype).  D <= 512.  No host-device sync.
    """
    B, n = x.shape
    D = ucat.shape[1]
    if B == 0 or n == 0:
        return
    if K < 1 or K > MAX_K or D > MAX_D:
        raise ValueError(f"molrg_forward: K={K} (1..{MAX_K}), D={D} (<= {MAX_D}) unsupported")
    if not out.is_contiguous() or (w is not None and not w.is_contiguous()):
        raise ValueError("molrg_forward: out and w must be contiguous (the kernel writes them row-major)")
    # the kernel indexes every input as a dense row-major array: a strided view (a transposed
    # or QR-output basis, a column slice of x) would be read with the wrong strides
    x, ucat, seg, params = x.contiguous(), ucat.contiguous(), seg.contiguous(), params.contiguous()
    labels = labels.contiguous() if labels is not None else None
    R = params.shape[0]
    BLOCK_B, BLOCK_N, D_PAD, K_PAD = _blocks(B, n, D, K)
    _molrg_fwd_kernel[(triton.cdiv(B, BLOCK_B),)](
        x, ucat, seg, params, labels if labels is not None else seg, out, w if w is not None else out,
        B, n, D, K, 0 if R == 1 else params.stride(0),
        BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N, D_PAD=D_PAD, K_PAD=K_PAD,
        HARD=bool(hard), HAS_LABELS=labels is not None, WRITE_W=w is not None, DOT_PRECISION=dot_precision,
        num_warps=NUM_WARPS,
    )


@triton.jit
def _molrg_bwd_kernel(
    x_ptr, g_ptr, u_ptr, seg_ptr, params_ptr, labels_ptr, w_ptr, dx_ptr, q_ptr, dp_ptr,
    B, n, D, K,
    p_stride,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, K_PAD: tl.constexpr,
    HARD: tl.constexpr, HAS_LABELS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Per row, with G = dL/d out (the math of ``fastdiff.ops.molrg.MoLRGFunction.backward``):

        P = x Ucat, dq = G Ucat, c = (w' C)[seg], q = P c
        dw = (1 - gw) C segsum(dq P);  dl = w (dw - <w, dw>)  (soft; 0 for hard)
        dP = dq c + 2 P (g dl)[seg];   dx = A G + dP Ucat^T

    writes dx (B, n) and q, dP (B, D) float32; the launcher finishes dUcat = G^T q + x^T dP with
    two library GEMMs (a reduction over the whole batch: cuBLAS does it deterministically and at
    full rate, where per-program atomics would be neither).
    """
    rows, rmask, xrow, cols, cmask, ii, kk, kmask = _row_block(B, n, D, K, BLOCK_B, BLOCK_N, D_PAD, K_PAD)

    # ---- pass 1: P = x Ucat and dq = G Ucat share every U tile
    P = tl.zeros([BLOCK_B, D_PAD], dtype=tl.float32)
    dq = tl.zeros([BLOCK_B, D_PAD], dtype=tl.float32)
    for i0 in range(0, n, BLOCK_N):
        i = i0 + ii
        imask = i < n
        xm = rmask[:, None] & imask[None, :]
        ut = tl.load(u_ptr + i[:, None] * D + cols[None, :], mask=imask[:, None] & cmask[None, :], other=0.0)
        xt = tl.load(x_ptr + xrow[:, None] + i[None, :], mask=xm, other=0.0)
        gt = tl.load(g_ptr + xrow[:, None] + i[None, :], mask=xm, other=0.0)
        P = tl.dot(xt.to(tl.float32), ut, P, input_precision=DOT_PRECISION)
        dq = tl.dot(gt.to(tl.float32), ut, dq, input_precision=DOT_PRECISION)

    seg = tl.load(seg_ptr + cols, mask=cmask, other=-1)
    S = (seg[:, None] == kk[None, :]).to(tl.float32)               # (D_PAD, K_PAD) indicator
    prow = params_ptr + rows.to(tl.int64) * p_stride
    pm = rmask[:, None] & kmask[None, :]
    g = tl.load(prow[:, None] + kk[None, :], mask=pm, other=0.0)
    C = tl.load(prow[:, None] + 2 * K + kk[None, :], mask=pm, other=0.0)
    A = tl.load(prow + 3 * K, mask=rmask, other=0.0)
    # the forward's posterior (saved, not recomputed: hard mode's argmax must not flip on rounding)
    w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * K + kk[None, :], mask=pm, other=0.0)
    wp = w
    keep = 1.0
    if HAS_LABELS:
        gw = tl.load(prow + 3 * K + 1, mask=rmask, other=0.0)
        lab = tl.load(labels_ptr + rows, mask=rmask, other=0).to(tl.int32)
        wp = (1.0 - gw)[:, None] * w + tl.where(kk[None, :] == lab[:, None], gw[:, None], 0.0)
        keep = (1.0 - gw)[:, None]
    c = tl.dot(tl.where(kmask[None, :], wp * C, 0.0), tl.trans(S), input_precision=DOT_PRECISION)
    q = P * c
    dP = dq * c
    if not HARD:
        dw = tl.dot(dq * P, S, input_precision=DOT_PRECISION) * C * keep          # (BLOCK_B, K_PAD)
        dl = w * (dw - tl.sum(w * dw, axis=1)[:, None])
        dP += 2.0 * P * tl.dot(tl.where(kmask[None, :], g * dl, 0.0), tl.trans(S), input_precision=DOT_PRECISION)
    dm = rmask[:, None] & cmask[None, :]
    drow = rows.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(q_ptr + drow, q, mask=dm)
    tl.store(dp_ptr + drow, dP, mask=dm)

    # ---- pass 2: dx = A G + dP Ucat^T
    for i0 in range(0, n, BLOCK_N):
        i = i0 + ii
        imask = i < n
        xm = rmask[:, None] & imask[None, :]
        ut = tl.load(u_ptr + i[:, None] * D + cols[None, :], mask=imask[:, None] & cmask[None, :], other=0.0)
        gt = tl.load(g_ptr + xrow[:, None] + i[None, :], mask=xm, other=0.0).to(tl.float32)
        o = A[:, None] * gt + tl.dot(dP, tl.trans(ut), input_precision=DOT_PRECISION)
        tl.store(dx_ptr + xrow[:, None] + i[None, :], o.to(dx_ptr.dtype.element_ty), mask=xm)


def _bwd_blocks(B, n, D, K):
    """Two (BLOCK_B, D_PAD) accumulators live through pass 1: half the forward's row block."""
    D_PAD, K_PAD = _pow2(D), _pow2(K)
    BLOCK_B = max(16, min(32, REG_TILE // (2 * D_PAD), _pow2(B)))
    BLOCK_N = max(16, min(64, REG_TILE // D_PAD, _pow2(n)))
    return BLOCK_B, BLOCK_N, D_PAD, K_PAD


def molrg_backward(x, G, ucat, seg, K, params, labels, hard, w, dot_precision="ieee", *, dx=None, q=None, dP=None):
    """Fused MoLRG backward; returns ``(dx, dUcat)`` (float32, like x / ucat).

    x, G: (B, n) float32 contiguous; ucat (n, D) float32; seg, K, params, labels, hard as
    :func:`molrg_forward`; w: (B, K) float32, the forward's posterior before guidance.  The
    kernel writes dx and the per-row q, dP; dUcat = G^T q + x^T dP is two GEMMs on the library.
    dx / q / dP may be given (tests pass NaN-poisoned buffers).
    """
    B, n = x.shape
    D = ucat.shape[1]
    if K < 1 or K > MAX_K or D > MAX_D:
        raise ValueError(f"molrg_backward: K={K} (1..{MAX_K}), D={D} (<= {MAX_D}) unsupported")
    # row-major reads only (see molrg_forward): the saved bases of a (K, n, d) QR output are a
    # column-major strided view; dx / q / dP are written row-major
    x, G, ucat, seg, params, w = (t.contiguous() for t in (x, G, ucat, seg, params, w))
    labels = labels.contiguous() if labels is not None else None
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if dx is None else dx
    if not all(t is None or t.is_contiguous() for t in (dx, q, dP)):
        raise ValueError("molrg_backward: dx, q and dP must be contiguous (the kernel writes them row-major)")
    q = torch.empty(B, D, dtype=torch.float32, device=x.device) if q is None else q
    dP = torch.empty(B, D, dtype=torch.float32, device=x.device) if dP is None else dP
    if B and n:
        BLOCK_B, BLOCK_N, D_PAD, K_PAD = _bwd_blocks(B, n, D, K)
        _molrg_bwd_kernel[(triton.cdiv(B, BLOCK_B),)](
            x, G, ucat, seg, params, labels if labels is not None else seg, w, dx, q, dP,
            B, n, D, K, 0 if params.shape[0] == 1 else params.stride(0),
            BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N, D_PAD=D_PAD, K_PAD=K_PAD,
            HARD=bool(hard), HAS_LABELS=labels is not None, DOT_PRECISION=dot_precision,
            num_warps=NUM_WARPS,
        )
    else:
        q.zero_(), dP.zero_()
    dU = torch.mm(G.T, q)
    dU.addmm_(x.T, dP)
    return dx, dU


# --------------------------------------------------------------------------- AOT variants
def aot_variant(dtype, D, K, hard, labels, write_w, precision="ieee") -> AOTVariant:
    t = "*" + _TY[dtype]
    sig = {"x_ptr": t, "u_ptr": "*fp32", "seg_ptr": "*i32", "params_ptr": "*fp32", "labels_ptr": "*i64",
           "out_ptr": t, "w_ptr": "*fp32", "B": "i32", "n": "i32", "D": "i32", "K": "i32", "p_stride": "i32"}
    BLOCK_B, BLOCK_N, D_PAD, K_PAD = _blocks(1 << 16, 1 << 10, D, K)  # the large-B launch shape
    const = {"BLOCK_B": BLOCK_B, "BLOCK_N": BLOCK_N, "D_PAD": D_PAD, "K_PAD": K_PAD, "HARD": hard,
             "HAS_LABELS": labels, "WRITE_W": write_w, "DOT_PRECISION": precision}
    sig.update({name: "constexpr" for name in const})
    name = (f"molrg_{_TY[dtype]}_D{D_PAD}_K{K_PAD}_{'hard' if hard else 'soft'}"
            f"{'_labels' if labels else ''}{'_w' if write_w else ''}{'' if precision == 'ieee' else '_' + precision}")
    aligned = tuple(k for k, ty in sig.items() if ty.startswith("*")) + ("n", "D")
    op = "molrg" if precision == "ieee" else None  # the library always launches "ieee" dots
    return AOTVariant(name, _molrg_fwd_kernel, sig, const, NUM_WARPS, aligned, op, dtype, {"n": 1 << 10, "D": D, "K": K})


def aot_variant_backward(D, K, hard, labels) -> AOTVariant:
    sig = {name: "*fp32" for name in ("x_ptr", "g_ptr", "u_ptr")}
    sig.update({"seg_ptr": "*i32", "params_ptr": "*fp32", "labels_ptr": "*i64", "w_ptr": "*fp32",
                "dx_ptr": "*fp32", "q_ptr": "*fp32", "dp_ptr": "*fp32",
                "B": "i32", "n": "i32", "D": "i32", "K": "i32", "p_stride": "i32"})
    BLOCK_B, BLOCK_N, D_PAD, K_PAD = _bwd_blocks(1 << 16, 1 << 10, D, K)
    const = {"BLOCK_B": BLOCK_B, "BLOCK_N": BLOCK_N, "D_PAD": D_PAD, "K_PAD": K_PAD, "HARD": hard,
             "HAS_LABELS": labels, "DOT_PRECISION": "ieee"}
    sig.update({name: "constexpr" for name in const})
    name = f"molrg_bwd_D{D_PAD}_K{K_PAD}_{'hard' if hard else 'soft'}{'_labels' if labels else ''}"
    aligned = tuple(k for k, ty in sig.items() if ty.startswith("*")) + ("n", "D")
    return AOTVariant(name, _molrg_bwd_kernel, sig, const, NUM_WARPS, aligned, "molrg", torch.float32,
                      {"n": 1 << 10, "D": D, "K": K, "grad": True})


# The tile extremes (D_PAD 16 / 128 / 512, K_PAD 16 / 32) and each constexpr branch once;
# halves differ only in the load/store conversions (one bf16 variant, at the cheap D: ~1.5 s a
# compile against ~8 s at D_PAD 128).  128 / 8 is the benchmark shape (65536, 256, 8, 16).
AOT_KERNELS: List[AOTVariant] = [
    aot_variant(torch.float32, 16, 3, False, False, False),
    aot_variant(torch.float32, 128, 8, False, True, True),
    aot_variant(torch.float32, 512, 32, True, True, True),
    aot_variant(torch.bfloat16, 16, 3, True, False, False),
    aot_variant(torch.float32, 128, 8, False, False, False, precision="tf32x3"),
    aot_variant_backward(16, 3, False, False),
    aot_variant_backward(128, 8, False, True),
    aot_variant_backward(512, 32, True, True),
]
