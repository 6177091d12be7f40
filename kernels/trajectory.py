"""Triton fused sampling trajectory for the MoLRG denoiser: T steps in one launch.

One program per (tile of BLOCK_B samples, instance).  The tile x (BLOCK_B, N_PAD) and the
instance's bases Ucat (N_PAD, D_PAD) stay in registers for all steps of [t0, t1); per step
(the contract and the tables: fastdiff/ops/trajectory.py; csrc/trajectory.cpp runs the same program on CPU):

    coef[t] = [s1, cx, cm, cz, hx, hm, hxp, hmp]     idx[t] = [off1, off2, prow1, prow2, snap]
    x  <- x + s1 z(off1)                                  if off1 >= 0   (EDM churn)
    x0  = D(x; params[prow1])
    x'  = cx x + cm x0 (+ cz z(off2) if off2 >= 0)
    x  <- hx x + hm x0 + hxp x' + hmp D(x'; params[prow2])  if prow2 >= 0 (Heun), else x <- x'
    traj[snap] = x                                        if snap >= 0

D is the MoLRG posterior mean of kernels/molrg.py on a register tile: P = x @ U (tl.dot),
s = (P*P) @ S with the 0/1 component indicator S (D_PAD, K_PAD), softmax / argmax over K,
classifier-free guidance toward the label, q = P * ((w' C) @ S^T), x0 = A x + q @ U^T.
z(off) of global row r (over all instances), column j is the shared Philox stream at
``off + r n + j`` (fastdiff/reference/rng.py: quad g >> 2, lane g & 3, Box-Muller pairs), the
window the step-by-step loop draws, so the result equals the loop up to float32 rounding.
Precision as kernels/molrg.py: "ieee" fp32 dots (TF32 would miss the 1e-5 bound).
Padding rows / columns hold zeros (masked loads; the noise is masked too) and never reach the
valid ones: the padded rows of U are 0.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import triton
import triton.language as tl

from .fused_step import AOTVariant
from .molrg import guided_weights, posterior_weights

MAX_K = 32
REG_TILE = 4096  # fp32 elements of U (N_PAD x D_PAD) held per program (32 registers per thread at 4 warps)
NUM_WARPS = 4


def num_warps_for(n_pad: int, d_pad: int) -> int:
    """8 warps up to a 32 x 16 U tile, else NUM_WARPS.  ptxas -v (registers / spill stores per
    thread): 16 x 16 with 4 warps 96 / 8 B (sm_90), 16 x 32 K 32 with 4 warps 255 / 16 B, with 8
    warps at most 177 / 0 B; at 32 x 32 the spills come and go with the warps, K and the flags
    (4 warps: 0 to 312 B, 8: 0 to 28 B), so auto stops at 32 x 16 (fastdiff/ops/trajectory.py;
    the variants' numbers: bench/results/triton-resources.md)."""
    return 8 if n_pad * d_pad <= 32 * 16 else NUM_WARPS


@triton.jit
def _normals(seed, off, g_rel):
    """The Philox normals at global indices off + g_rel (int64 tensor), tl.randn's mapping: quad
    g >> 2 gives Box-Muller pairs (u0, u1) -> lanes 0, 1 and (u2, u3) -> lanes 2, 3; only the
    pair holding each element's lane is transformed (one log, sin and cos per element: these
    libdevice calls are inlined per element and dominate the compiled code size)."""
    g = off + g_rel
    q = g >> 2
    lane = g & 3
    r0, r1, r2, r3 = tl.philox(seed, q.to(tl.uint32), (q >> 32).to(tl.uint32), 0, 0)
    lo = lane < 2
    u1 = tl.uint_to_uniform_float(tl.where(lo, r0, r2))
    u2 = tl.uint_to_uniform_float(tl.where(lo, r1, r3))
    na, nb = tl.pair_uniform_to_normal(u1, u2)
    return tl.where((lane & 1) == 0, na, nb)


@triton.jit
def _posterior_mean(x, U, S, prow, kk, kmask, K, lab, HARD: tl.constexpr, HAS_LABELS: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """x0_hat (BLOCK_B, N_PAD) of the MoLRG with the parameter row at ``prow`` ([g, b, C, A, gw])."""
    P = tl.dot(x, U, input_precision=DOT_PRECISION)                 # (BLOCK_B, D_PAD)
    s = tl.dot(P * P, S, input_precision=DOT_PRECISION)             # (BLOCK_B, K_PAD)
    g = tl.load(prow + kk, mask=kmask, other=0.0)
    b = tl.load(prow + K + kk, mask=kmask, other=0.0)
    C = tl.load(prow + 2 * K + kk, mask=kmask, other=0.0)
    A = tl.load(prow + 3 * K)
    w = posterior_weights(b[None, :] + g[None, :] * s, kk, kmask, HARD)
    if HAS_LABELS:
        w = guided_weights(w, tl.load(prow + 3 * K + 1), lab, kk)
    wc = tl.where(kmask[None, :], w * C[None, :], 0.0)
    q = P * tl.dot(wc, tl.trans(S), input_precision=DOT_PRECISION)  # (BLOCK_B, D_PAD)
    return A * x + tl.dot(q, tl.trans(U), input_precision=DOT_PRECISION)


@triton.jit(do_not_specialize=["t0", "t1", "seed"])
def _molrg_trajectory_kernel(
    x_ptr, u_ptr, seg_ptr, params_ptr, labels_ptr, coef_ptr, idx_ptr, traj_ptr,
    B, n, D, K,
    p_istride,  # params instance stride (0: shared)
    traj_stride,  # elements per trajectory slot (I B n)
    t0, t1, seed,
    BLOCK_B: tl.constexpr, N_PAD: tl.constexpr, D_PAD: tl.constexpr, K_PAD: tl.constexpr,
    HARD: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_TRAJ: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    inst = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    grow = inst * B + rows.to(tl.int64)                 # global row: I B n may pass 2^31
    cn = tl.arange(0, N_PAD)
    nmask = cn < n
    xm = rmask[:, None] & nmask[None, :]
    g_rel = grow[:, None] * n + cn[None, :]              # int64 element index in the window
    x = tl.load(x_ptr + g_rel, mask=xm, other=0.0)
    cd = tl.arange(0, D_PAD)
    dmask = cd < D
    U = tl.load(u_ptr + inst * n * D + cn[:, None] * D + cd[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
    kk = tl.arange(0, K_PAD)
    kmask = kk < K
    seg = tl.load(seg_ptr + cd, mask=dmask, other=-1)
    S = (seg[:, None] == kk[None, :]).to(tl.float32)     # (D_PAD, K_PAD)
    if HAS_LABELS:
        lab = tl.load(labels_ptr + grow, mask=rmask, other=0).to(tl.int32)
    else:
        lab = rows  # unused
    pstride = 3 * K + 2
    pinst = params_ptr + inst * p_istride
    for t in range(t0, t1):
        c = coef_ptr + t * 8
        ix = idx_ptr + t * 5
        off1 = tl.load(ix)
        off2 = tl.load(ix + 1)
        p1 = tl.load(ix + 2)
        p2 = tl.load(ix + 3)
        # at most one of the two draws per step (fastdiff/trajectory.py: tables checks): one call site
        offz = tl.maximum(off1, off2)
        if offz >= 0:
            z = tl.where(xm, _normals(seed, offz, g_rel), 0.0)
        else:
            z = tl.zeros([BLOCK_B, N_PAD], dtype=tl.float32)
        if off1 >= 0:
            x = x + tl.load(c) * z
        x0 = _posterior_mean(x, U, S, pinst + p1 * pstride, kk, kmask, K, lab, HARD, HAS_LABELS, DOT_PRECISION)
        xp = tl.load(c + 1) * x + tl.load(c + 2) * x0
        if off2 >= 0:
            xp = xp + tl.load(c + 3) * z
        if p2 >= 0:
            x0p = _posterior_mean(xp, U, S, pinst + p2 * pstride, kk, kmask, K, lab, HARD, HAS_LABELS, DOT_PRECISION)
            x = tl.load(c + 4) * x + tl.load(c + 5) * x0 + tl.load(c + 6) * xp + tl.load(c + 7) * x0p
        else:
            x = xp
        if HAS_TRAJ:
            snap = tl.load(ix + 4)
            if snap >= 0:
                tl.store(traj_ptr + snap * traj_stride + g_rel, x, mask=xm)
    tl.store(x_ptr + g_rel, x, mask=xm)


def _pow2(v, lo=16):
    return max(lo, triton.next_power_of_2(int(v)))


def _blocks(B, n, D, K):
    """(BLOCK_B, N_PAD, D_PAD, K_PAD): 16-row tiles (tl.dot's minimum) give the most programs."""
    N_PAD, D_PAD, K_PAD = _pow2(n), _pow2(D), _pow2(K)
    BLOCK_B = 16
    return BLOCK_B, N_PAD, D_PAD, K_PAD


def fits(n: int, D: int, K: int) -> Tuple[bool, str]:
    """Whether the register tiles hold this problem (U: N_PAD x D_PAD <= REG_TILE fp32, K <= 32)."""
    if K > MAX_K:
        return False, f"the Triton trajectory kernel takes K <= {MAX_K} components, got {K}"
    if _pow2(n) * _pow2(D) > REG_TILE:
        return False, f"the Triton trajectory kernel keeps U in registers: n x sum d_k <= {REG_TILE} (padded), got {n} x {D}"
    return True, ""


def molrg_trajectory(x, I, B, ucat, offsets, params, p_istride, labels, hard, coef, idx, t0, t1, traj, seed,
                     dot_precision="ieee") -> None:
    """Launch the fused trajectory (CUDA, or CPU under TRITON_INTERPRET=1); updates x in place.

    x: (I B, n) float32 contiguous; ucat: (I, n, D) float32; offsets: K + 1 column offsets;
    params: (I or 1, P, 3K+2) float32 with instance stride p_istride (elements; 0 = shared);
    labels: (I B,) int64 or None; coef (T, 8) float32, idx (T, 5) int64 on x's device; steps
    [t0, t1); traj: (S, I B, n) float32 or None; seed: the generator's seed.  No host sync.
    """
    n = x.shape[1]
    D = ucat.shape[2]
    K = len(offsets) - 1
    if I == 0 or B == 0 or n == 0 or t1 <= t0:
        return
    ok, why = fits(n, D, K)
    if not ok:
        raise ValueError(why)
    seg = torch.repeat_interleave(torch.arange(K, dtype=torch.int32, device=x.device),
                                  torch.tensor([offsets[k + 1] - offsets[k] for k in range(K)], device=x.device))
    BLOCK_B, N_PAD, D_PAD, K_PAD = _blocks(B, n, D, K)
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    if seed >= 1 << 63:  # int64 kernel argument, same bits
        seed -= 1 << 64
    _molrg_trajectory_kernel[(triton.cdiv(B, BLOCK_B), I)](
        x, ucat, seg, params, labels if labels is not None else idx, coef, idx, traj if traj is not None else x,
        B, n, D, K, p_istride, I * B * n, t0, t1, seed,
        BLOCK_B=BLOCK_B, N_PAD=N_PAD, D_PAD=D_PAD, K_PAD=K_PAD, HARD=bool(hard), HAS_LABELS=labels is not None,
        HAS_TRAJ=traj is not None, DOT_PRECISION=dot_precision, num_warps=num_warps_for(N_PAD, D_PAD),
    )


# --------------------------------------------------------------------------- AOT variants
def aot_variant(n, D, K, hard, labels, traj) -> AOTVariant:
    sig = {"x_ptr": "*fp32", "u_ptr": "*fp32", "seg_ptr": "*i32", "params_ptr": "*fp32", "labels_ptr": "*i64",
           "coef_ptr": "*fp32", "idx_ptr": "*i64", "traj_ptr": "*fp32", "B": "i32", "n": "i32", "D": "i32", "K": "i32",
           "p_istride": "i32", "traj_stride": "i64", "t0": "i32", "t1": "i32", "seed": "i64"}
    BLOCK_B, N_PAD, D_PAD, K_PAD = _blocks(1 << 16, n, D, K)
    const = {"BLOCK_B": BLOCK_B, "N_PAD": N_PAD, "D_PAD": D_PAD, "K_PAD": K_PAD, "HARD": hard, "HAS_LABELS": labels,
             "HAS_TRAJ": traj, "DOT_PRECISION": "ieee"}
    sig.update({name: "constexpr" for name in const})
    name = (f"molrg_trajectory_N{N_PAD}_D{D_PAD}_K{K_PAD}_{'hard' if hard else 'soft'}"
            f"{'_labels' if labels else ''}{'_traj' if traj else ''}")
    aligned = tuple(k for k, ty in sig.items() if ty.startswith("*"))
    return AOTVariant(name, _molrg_trajectory_kernel, sig, const, num_warps_for(N_PAD, D_PAD), aligned, "trajectory",
                      torch.float32,
                      {"n": n, "D": D, "K": K})


# The benchmark shape (n 48, D 24, K 3), every constexpr branch once, and the largest tile; the
# tiles auto runs (fastdiff/ops/trajectory.py: up to 32 x 16, K up to 32, every branch) and the
# first one above them.
AOT_KERNELS: List[AOTVariant] = [
    aot_variant(48, 24, 3, False, False, False),
    aot_variant(48, 24, 3, True, True, True),
    aot_variant(128, 32, 32, False, True, False),
    aot_variant(16, 16, 3, False, False, False),
    aot_variant(16, 16, 32, True, True, True),
    aot_variant(32, 16, 32, False, True, False),
    aot_variant(16, 32, 32, True, True, True),
    aot_variant(32, 32, 32, False, True, False),
]
