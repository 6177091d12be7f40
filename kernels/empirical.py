"""Triton empirical scan: the online softmax and the nearest rows of a training set in one streamed
pass (the contract, formulas and shapes: fastdiff/ops/empirical.py; the math: docs/math.md section 2,
"The streamed scan's merges").

Per query b and training row i, with Yc_i = y_i - c (uint8 rows read as lo + (hi - lo) u / 255)::

    H_bi = xh_b . Yc_i,   S_bi = g1_b H_bi - g2_b ||Yc_i||^2,   V_bi = H_bi - ||Yc_i||^2 / 2 - h_b c.Yc_i
    m_b = max_i S_bi,  l_b = sum_i e^(S_bi - m_b),  acc_b = sum_i e^(S_bi - m_b) Yc_i,  best = top-kc of V_b.

Design (FlashAttention's forward, Dao et al. 2022 Algorithm 1, with the training rows as keys and
values; N split over programs as in Flash-Decoding):

* Grid (row blocks of BLOCK_B queries, splits of the N rows).  Program (q, s) streams the tiles of
  BLOCK_N training rows of split s.  Per tile: H = xh_q Yc^T by tl.dot over n in BLOCK_K chunks, the
  row sums ||Yc||^2 and c.Yc from the same loaded chunks; then the logits, the online max / sum
  (m, l rescaled by e^(m_old - m_new)) and acc += P Yc.  No (B, N) matrix exists anywhere.
* acc (BLOCK_B, n): in registers when the padded n is at most ACC_REGISTER_MAX (one (BLOCK_N, D_PAD)
  reload of the tile, from L1/L2); above it the program's rows of the output are the accumulator,
  read-scaled-added-written in ACC_CHUNK-column chunks per tile (its own rows only, L2-resident:
  BLOCK_B n 4 bytes a program).  The first tile writes without reading (the buffer is poisoned).
* Candidates: a register set of KC_PAD (kc padded to a power of two) scores and indices per query.
  Per tile, rounds of "the tile's best remaining entry replaces the set's minimum if larger" until
  no query's tile beats its set (a while loop: after the first tiles, one round a tile).  Set slots
  that are still empty take any entry, so every slot holds a real row once kc rows were seen; a
  NaN score ranks lowest.  kc <= MAX_KC (the dispatch row's limit).
* Splits: enough programs for PROGRAMS_PER_SM a streaming multiprocessor, each split at least
  MIN_TILES tiles and splits x B <= N (the partial accumulators then take at most the data's own
  size: memory stays O((B + N) n)).  Each split writes its partial (m, l, acc, candidates); the
  launcher merges them in torch (Flash-Decoding's combine, docs/math.md): m = max_s m_s,
  l = sum_s e^(m_s - m) l_s, acc = sum_s e^(m_s - m) acc_s, candidates the top kc of the union.
  Programs never read each other's output, so any program order gives the same bits.

Precision: DOT_PRECISION = "ieee" (float32 FMA dots): the logits are g1 H with g1 up to ~1/sigma^2,
so TF32's 2^-11 relative error on H would move them by far more than the contract's 1e-4 (as in
kernels/molrg.py); "tf32x3" is a tuning option with an AOT variant.  Offsets of the data, the
queries and the accumulators are int64 (N n and splits B n may pass 2^31); row indices int32
(N < 2^31, checked).  NaN in a query or training row: the rescaling and P of that query are NaN,
so m or l and acc are NaN (the formula's propagation; the candidates of a NaN query unspecified).
"""
from __future__ import annotations

import math
import os
from typing import List, Optional

import torch
import triton
import triton.language as tl

from .fused_step import AOTVariant

__all__ = ["empirical_scan", "plan", "AOT_KERNELS"]

NUM_WARPS = 8
# Tiles (ptxas, sm_90, 8 warps; bench/results/triton-resources.md has every variant): Triton lowers an
# fp32 "ieee" tl.dot to FMAs whose operands each thread holds whole (its rows x K and K x its columns),
# so K and the outputs a thread set the registers.  32 x 32 x 32 tiles took 232-255 registers (4 warps:
# spills); 32-query blocks with 16 x 16 tiles 128-176; 16 queries, 16 x 16 tiles and 64-column acc
# chunks at most 128 (two blocks an SM), none spilling.  Not tuned on a GPU yet:
# bench/test_bench_empirical_gpu.py sweeps them (tune=).
BLOCK_B = 16          # queries a program
BLOCK_N = 16          # training rows a tile (the K of acc += P Yc)
BLOCK_K = 16          # columns a chunk of the H GEMM
# padded n up to this: acc (BLOCK_B, D_PAD) in registers, with the (BLOCK_N, D_PAD) tile reload; above
# it, acc lives in the output buffer, ACC_CHUNK columns a chunk (half of it with over 16 candidates:
# at 64 columns and KC_PAD 64, sm_80 spilled 56 B a thread; at 32, 120 registers and none)
ACC_REGISTER_MAX = 256
ACC_CHUNK = 64
PROGRAMS_PER_SM = 2
INTERPRETER_SMS = 2   # under TRITON_INTERPRET=1: a few programs a row block, so the split-and-merge path runs
MIN_TILES = 4         # tiles a split at least: per-program overhead and the merge stay small
DOT_PRECISION = "ieee"
# candidates a query at most: the register set is (BLOCK_B, KC_PAD) scores and indices (the dispatch
# row's limit, fastdiff.ops.empirical.TRITON_MAX_KC, is this number: tests/test_empirical_triton.py)
MAX_KC = 64


@triton.jit
def _centred_rows(y_ptr, yrow, cols, live, cmask, c, y_scale, y_lo, UINT8: tl.constexpr):
    """Yc = y - c of the training rows at int64 offsets ``yrow`` (R,), columns ``cols`` (C,): (R, C)
    float32, 0 outside ``live`` x ``cmask``; uint8 rows read as y_lo + y_scale u."""
    mask = live[:, None] & cmask[None, :]
    raw = tl.load(y_ptr + yrow[:, None] + cols[None, :], mask=mask, other=0)
    if UINT8:
        y = raw.to(tl.float32) * y_scale + y_lo
    else:
        y = raw
    return tl.where(mask, y - c[None, :], 0.0)


@triton.jit
def _merge_candidates(best_v, best_i, V, idx, live, kc, BLOCK_N: tl.constexpr, KC_PAD: tl.constexpr):
    """The set (best_v, best_i) (BLOCK_B, KC_PAD) updated with this tile's scores V (BLOCK_B, BLOCK_N)
    of the rows ``idx`` (BLOCK_N,) int32 (``live``: real rows).  Slots >= kc are padding (+inf, never
    chosen); an empty slot (index -1, -inf) takes any live entry; NaN ranks as -inf.  Each round
    inserts, per query, the tile's best remaining entry where it beats the set's minimum (or fills an
    empty slot); at most kc rounds insert (entries go in descending order), one more finds none."""
    jj = tl.arange(0, BLOCK_N)
    slots = tl.arange(0, KC_PAD)
    key = tl.where(V != V, float("-inf"), V)
    avail = live[None, :] & (key == key)
    go = tl.max(live.to(tl.int32), axis=0) > 0
    while go:
        tkey = tl.where(avail, key, float("-inf"))
        tmax = tl.max(tkey, axis=1)
        tcol = tl.min(tl.where(avail & (tkey == tmax[:, None]), jj[None, :], BLOCK_N), axis=1)
        bkey = tl.where(best_v != best_v, float("-inf"), best_v)
        bkey = tl.where(slots[None, :] < kc, bkey, float("inf"))
        bmin = tl.min(bkey, axis=1)
        # the slot to replace: an empty one first among those at the minimum
        order = tl.where(best_i < 0, slots[None, :], slots[None, :] + KC_PAD)
        pick = tl.min(tl.where(bkey == bmin[:, None], order, 2 * KC_PAD), axis=1)
        empty = pick < KC_PAD
        slot = tl.where(empty, pick, pick - KC_PAD)
        do = (tcol < BLOCK_N) & ((tmax > bmin) | empty)
        taken = jj[None, :] == tcol[:, None]
        tv = tl.sum(tl.where(taken, V, 0.0), axis=1)        # the entry's raw score (one term: exact)
        ti = tl.sum(tl.where(taken, idx[None, :], 0), axis=1)
        hit = do[:, None] & (slots[None, :] == slot[:, None])
        best_v = tl.where(hit, tv[:, None], best_v)
        best_i = tl.where(hit, ti[:, None], best_i)
        avail = avail & ~(do[:, None] & taken)
        go = tl.max(do.to(tl.int32), axis=0) > 0
    return best_v, best_i


@triton.jit
def _scan_kernel(
    xh_ptr, y_ptr, c_ptr, g1_ptr, g2_ptr, h_ptr,
    m_ptr, l_ptr, acc_ptr, bv_ptr, bi_ptr, ymax_ptr,   # per split: (S, B), (S, B), (S, B, n), (S, B, kc) x 2, (S,)
    B, N, n, kc, tiles_per_split,
    y_scale, y_lo,                                     # uint8 data: y = y_lo + y_scale u
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    KC_PAD: tl.constexpr, SOFT: tl.constexpr, WANT_ACC: tl.constexpr, ACC_IN_REGISTERS: tl.constexpr,
    UINT8: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program (row block q, split s): queries q BLOCK_B .. + BLOCK_B against the training tiles
    s tiles_per_split .. + tiles_per_split; writes row block q of split s's partial outputs."""
    pid_b = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    xrow = rows.to(tl.int64) * n
    orow = split.to(tl.int64) * B + rows                 # this split's row of the partial outputs
    g1 = tl.load(g1_ptr + rows, mask=rmask, other=0.0)
    g2 = tl.load(g2_ptr + rows, mask=rmask, other=0.0)
    h = tl.load(h_ptr + rows, mask=rmask, other=0.0)
    kk = tl.arange(0, BLOCK_K)
    jj = tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)

    m_i = tl.full([BLOCK_B], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    c_d = tl.load(c_ptr + dd, mask=dd < n, other=0.0)    # the register path's centre (all of n)
    if KC_PAD > 0:
        slots = tl.arange(0, KC_PAD)
        best_v = tl.where(slots[None, :] < kc, float("-inf"), float("inf")) + tl.zeros([BLOCK_B, KC_PAD], tl.float32)
        best_i = tl.full([BLOCK_B, KC_PAD], -1, tl.int32)
    ymax = tl.full([], float("-inf"), tl.float32)
    ynan = tl.zeros([], dtype=tl.int32)

    t0 = split * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(N, BLOCK_N))
    for t in range(t0, t1):
        r = t * BLOCK_N + jj
        live = r < N
        yrow = r.to(tl.int64) * n
        # ---- H = xh Yc^T, ||Yc||^2, c.Yc from the same chunks
        H = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        ysq = tl.zeros([BLOCK_N], dtype=tl.float32)
        cy = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, n, BLOCK_K):
            k = k0 + kk
            kmask = k < n
            c = tl.load(c_ptr + k, mask=kmask, other=0.0)
            yc = _centred_rows(y_ptr, yrow, k, live, kmask, c, y_scale, y_lo, UINT8)
            x = tl.load(xh_ptr + xrow[:, None] + k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            H = tl.dot(x, tl.trans(yc), H, input_precision=DOT_PRECISION)
            ysq += tl.sum(yc * yc, axis=1)
            if KC_PAD > 0:
                cy += tl.sum(yc * c[None, :], axis=1)
        # ---- candidates and max ||Yc||^2
        if KC_PAD > 0:
            V = H - 0.5 * ysq[None, :] - h[:, None] * cy[None, :]
            best_v, best_i = _merge_candidates(best_v, best_i, V, r, live, kc, BLOCK_N, KC_PAD)
            ymax = tl.maximum(ymax, tl.max(tl.where(live, ysq, float("-inf")), axis=0))
            ynan = tl.maximum(ynan, tl.max((live & (ysq != ysq)).to(tl.int32), axis=0))
        # ---- online softmax (FlashAttention Algorithm 1, lines 9-12)
        if SOFT:
            S = g1[:, None] * H - g2[:, None] * ysq[None, :]
            S = tl.where(live[None, :], S, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(S, axis=1))
            alpha = tl.exp(m_i - m_new)                  # 0 on the first tile (m_i = -inf)
            p = tl.exp(S - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if WANT_ACC:
                if ACC_IN_REGISTERS:
                    yc = _centred_rows(y_ptr, yrow, dd, live, dd < n, c_d, y_scale, y_lo, UINT8)
                    acc = tl.dot(p, yc, acc * alpha[:, None], input_precision=DOT_PRECISION)
                else:
                    # the first tile writes: the buffer holds poison, not zeros (a (BLOCK_B,) flag: the
                    # interpreter rejects a scalar & tensor mask)
                    again = rmask & (rows * 0 + t > t0)
                    for d0 in range(0, n, BLOCK_D):
                        d = d0 + dd
                        dmask = d < n
                        aptr = acc_ptr + orow[:, None] * n + d[None, :]
                        amask = rmask[:, None] & dmask[None, :]
                        a = tl.load(aptr, mask=again[:, None] & dmask[None, :], other=0.0)
                        cd = tl.load(c_ptr + d, mask=dmask, other=0.0)
                        yc = _centred_rows(y_ptr, yrow, d, live, dmask, cd, y_scale, y_lo, UINT8)
                        a = tl.dot(p, yc, a * alpha[:, None], input_precision=DOT_PRECISION)
                        tl.store(aptr, a, mask=amask)
                    tl.debug_barrier()  # this tile's stores before the next tile's loads (other threads)
            m_i = m_new

    if SOFT:
        tl.store(m_ptr + orow, m_i, mask=rmask)
        tl.store(l_ptr + orow, l_i, mask=rmask)
        if WANT_ACC and ACC_IN_REGISTERS:
            tl.store(acc_ptr + orow[:, None] * n + dd[None, :], acc, mask=rmask[:, None] & (dd < n)[None, :])
    if KC_PAD > 0:
        cand = orow[:, None] * kc + slots[None, :]
        cmask = rmask[:, None] & (slots < kc)[None, :]
        tl.store(bv_ptr + cand, best_v, mask=cmask)
        tl.store(bi_ptr + cand, best_i.to(tl.int64), mask=cmask)
        ymax = tl.where(ynan > 0, float("nan"), ymax)
        tl.store(ymax_ptr + split, ymax, mask=pid_b == 0)


# --------------------------------------------------------------------------- launch plan
def _pow2(v: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(v)))


def plan(B: int, N: int, n: int, kc: int, device: torch.device, splits: Optional[int] = None,
         tune: Optional[dict] = None) -> dict:
    """The launch: block sizes (tl.dot takes no dimension below 16), the accumulator's place, the
    candidates' padding and the split of the N rows (module docstring).  ``splits`` overrides the
    count (benchmarks, tests); it is still clamped so that every split holds at least one tile.
    ``tune``: block sizes / num_warps to use instead (benchmarks)."""
    d_pad = _pow2(n)
    in_regs = d_pad <= ACC_REGISTER_MAX
    kc_pad = triton.next_power_of_2(kc) if kc else 0
    chunk = ACC_CHUNK if kc_pad <= 16 else max(16, ACC_CHUNK // 2)
    blocks = dict(BLOCK_B=_pow2(min(B, BLOCK_B)), BLOCK_N=_pow2(min(N, BLOCK_N)),
                  BLOCK_K=_pow2(min(n, BLOCK_K)), BLOCK_D=d_pad if in_regs else _pow2(min(n, chunk)),
                  KC_PAD=kc_pad, ACC_IN_REGISTERS=in_regs, num_warps=NUM_WARPS)
    for key, value in (tune or {}).items():   # benchmarks' overrides
        if key not in blocks or key in ("KC_PAD", "ACC_IN_REGISTERS"):
            raise ValueError(f"tune: expected keys among BLOCK_B, BLOCK_N, BLOCK_K, BLOCK_D, num_warps, got {key!r}")
        low = 1 if key == "num_warps" else 16       # tl.dot takes no dimension below 16
        if isinstance(value, bool) or not isinstance(value, int) or value < low or value & (value - 1):
            raise ValueError(f"tune: {key} must be a power of two >= {low}, got {value!r}")
        blocks[key] = value
    if not in_regs or blocks["BLOCK_D"] < d_pad:
        blocks["ACC_IN_REGISTERS"] = False
    tiles = triton.cdiv(N, blocks["BLOCK_N"])
    row_blocks = triton.cdiv(B, blocks["BLOCK_B"])
    if splits is None:
        sms = (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda"
               else INTERPRETER_SMS)
        splits = min(triton.cdiv(PROGRAMS_PER_SM * sms, row_blocks), triton.cdiv(tiles, MIN_TILES), max(1, N // B))
    per = triton.cdiv(tiles, max(1, min(int(splits), tiles)))
    return dict(blocks, tiles_per_split=per, splits=triton.cdiv(tiles, per), row_blocks=row_blocks)


def _check(xh, data, center, g1, g2, h, kc):
    if not isinstance(xh, torch.Tensor) or xh.dim() != 2:
        raise ValueError(f"xh: expected a (B, n) tensor, got {getattr(xh, 'shape', type(xh).__name__)}")
    B, n = xh.shape
    if xh.dtype != torch.float32:
        raise TypeError(f"xh: the Triton empirical scan computes in float32, got {xh.dtype}")
    if not (xh.is_cuda or (xh.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")):
        raise ValueError(f"xh: expected a CUDA tensor (CPU only under TRITON_INTERPRET=1), got {xh.device}")
    if not isinstance(data, torch.Tensor) or data.dim() != 2 or data.shape[1] != n or data.shape[0] < 1:
        raise ValueError(f"data: expected an (N, {n}) tensor with N >= 1, got {getattr(data, 'shape', None)}")
    if data.dtype not in (torch.float32, torch.uint8):
        raise TypeError(f"data: expected float32 or uint8, got {data.dtype}")
    if data.shape[0] >= 1 << 31:
        raise ValueError(f"data: at most 2^31 - 1 rows (int32 row indices), got {data.shape[0]}")
    for name, t, shape in (("center", center, (n,)), ("g1", g1, (B,)), ("g2", g2, (B,)), ("h", h, (B,))):
        if t.shape != shape or t.dtype != torch.float32:
            raise ValueError(f"{name}: expected a {shape} float32 tensor, got {tuple(t.shape)} {t.dtype}")
    for name, t in (("xh", xh), ("data", data), ("center", center), ("g1", g1), ("g2", g2), ("h", h)):
        if t.device != xh.device or not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor on {xh.device} (the device of xh)")
    if isinstance(kc, bool) or not isinstance(kc, int) or not 0 <= kc <= data.shape[0]:
        raise ValueError(f"kc: expected an int in [0, N = {data.shape[0]}], got {kc!r}")
    if kc > MAX_KC:
        raise ValueError(f"kc: the Triton empirical scan keeps at most {MAX_KC} candidates a query "
                         f"(a register set), got {kc}; use backend='torch' or 'cpp'")


def empirical_scan(xh, data, center, g1, g2, h, lo, hi, soft, want_acc, kc, chunk=None, acc_cols=None, *,
                   splits: Optional[int] = None, dot_precision: str = DOT_PRECISION,
                   tune: Optional[dict] = None):
    """The contract of fastdiff/ops/empirical.py on CUDA (or the CPU under TRITON_INTERPRET=1):
    ``(m (B,), l (B,), acc (B, n) or None, best_v (B, kc), best_i (B, kc) int64, ymax2)`` float32.

    ``chunk`` (the torch launcher's rows a GEMM) is not used: this kernel streams BLOCK_N-row tiles
    and splits N by the device (:func:`plan`).  ``splits``, ``dot_precision``, ``tune`` (:func:`plan`):
    tuning knobs (benchmarks).  ``acc_cols`` (ncol,) int64: acc's columns returned (the kernel sums all n).
    Outputs are allocated poisoned (NaN, index -1).  No host-device sync."""
    _check(xh, data, center, g1, g2, h, kc)
    B, n = xh.shape
    N = data.shape[0]
    dev = xh.device
    p = plan(B, N, n, kc, dev, splits, tune)
    S = p["splits"]
    nan = float("nan")
    want_acc = bool(want_acc and soft)
    m = torch.full((S, B), nan, dtype=torch.float32, device=dev)
    l = torch.full((S, B), nan, dtype=torch.float32, device=dev)
    acc = torch.full((S, B, n), nan, dtype=torch.float32, device=dev) if want_acc else None
    best_v = torch.full((S, B, kc), nan, dtype=torch.float32, device=dev)
    best_i = torch.full((S, B, kc), -1, dtype=torch.int64, device=dev)
    ymax = torch.full((S,), nan, dtype=torch.float32, device=dev)
    if soft or kc:
        grid = (p["row_blocks"], S)
        _scan_kernel[grid](
            xh, data, center, g1, g2, h, m, l, acc if acc is not None else m, best_v, best_i, ymax,
            B, N, n, kc, p["tiles_per_split"], (float(hi) - float(lo)) / 255.0, float(lo),
            BLOCK_B=p["BLOCK_B"], BLOCK_N=p["BLOCK_N"], BLOCK_K=p["BLOCK_K"], BLOCK_D=p["BLOCK_D"],
            KC_PAD=p["KC_PAD"], SOFT=bool(soft), WANT_ACC=want_acc, ACC_IN_REGISTERS=p["ACC_IN_REGISTERS"],
            UINT8=data.dtype == torch.uint8, DOT_PRECISION=dot_precision, num_warps=p["num_warps"])
    out = _merge_splits(m, l, acc, best_v, best_i, ymax, soft, want_acc, kc, n)
    if acc_cols is not None and out[2] is not None:   # all n columns summed here; the contract's selection
        out = (out[0], out[1], out[2][:, acc_cols]) + tuple(out[3:])
    return out


def _merge_splits(m, l, acc, best_v, best_i, ymax, soft, want_acc, kc, n):
    """The splits' partial outputs merged (Flash-Decoding's combine, docs/math.md section 2); one split: views."""
    S, B = m.shape
    dev = m.device
    if soft:
        if S == 1:
            m, l, acc = m[0], l[0], acc[0] if acc is not None else None
        else:
            mt = m.amax(0)
            w = torch.exp(m - mt)                               # (S, B); a NaN m_s makes the row NaN
            l = (w * l).sum(0)
            acc = torch.einsum("sb,sbn->bn", w, acc) if acc is not None else None
            m = mt
    else:
        m = torch.full((B,), -math.inf, dtype=torch.float32, device=dev)
        l = torch.zeros(B, dtype=torch.float32, device=dev)
        acc = torch.zeros(B, n, dtype=torch.float32, device=dev) if want_acc else None
    if not kc:
        return m, l, acc, best_v[0], best_i[0], torch.zeros((), dtype=torch.float32, device=dev)
    if S == 1:
        return m, l, acc, best_v[0], best_i[0], ymax[0]
    v = best_v.permute(1, 0, 2).reshape(B, S * kc)
    i = best_i.permute(1, 0, 2).reshape(B, S * kc)
    # a real row (NaN / -inf score: lowest of the real ones) before an empty slot (index -1)
    key = torch.where(i < 0, -math.inf, torch.where(torch.isnan(v) | (v == -math.inf), torch.finfo(v.dtype).min, v))
    sel = torch.topk(key, kc, dim=1).indices
    return m, l, acc, v.gather(1, sel), i.gather(1, sel), ymax.amax()


# --------------------------------------------------------------------------- AOT variants
def aot_variant(n: int, kc: int, soft: bool = True, want_acc: bool = True, uint8: bool = False,
                precision: str = DOT_PRECISION) -> AOTVariant:
    """The compile a large launch (B = 256, N = 50000) of these options makes (:func:`plan`)."""
    p = plan(256, 50000, n, kc, torch.device("cpu"), splits=1)
    sig = {"xh_ptr": "*fp32", "y_ptr": "*u8" if uint8 else "*fp32", "c_ptr": "*fp32", "g1_ptr": "*fp32",
           "g2_ptr": "*fp32", "h_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32",
           "bv_ptr": "*fp32", "bi_ptr": "*i64", "ymax_ptr": "*fp32", "B": "i32", "N": "i32", "n": "i32",
           "kc": "i32", "tiles_per_split": "i32", "y_scale": "fp32", "y_lo": "fp32"}
    const = {k: p[k] for k in ("BLOCK_B", "BLOCK_N", "BLOCK_K", "BLOCK_D", "KC_PAD")}
    const.update(SOFT=soft, WANT_ACC=want_acc and soft, ACC_IN_REGISTERS=p["ACC_IN_REGISTERS"], UINT8=uint8,
                 DOT_PRECISION=precision)
    sig.update({name: "constexpr" for name in const})
    name = (f"empirical_{'u8' if uint8 else 'fp32'}_D{p['BLOCK_D']}{'_regs' if p['ACC_IN_REGISTERS'] else '_streamed'}"
            f"_kc{const['KC_PAD']}{'_soft' if soft else ''}{'_acc' if want_acc and soft else ''}"
            f"{'' if precision == DOT_PRECISION else '_' + precision}")
    aligned = tuple(k for k, ty in sig.items() if ty.startswith("*")) + ("n",)
    op = "empirical" if precision == DOT_PRECISION else None  # the library launches "ieee" dots
    return AOTVariant(name, _scan_kernel, sig, const, p["num_warps"], aligned, op, torch.float32,
                      {"kc": kc} if kc else {})


# The bench shapes (n = 192: acc in registers, n = 3072: streamed), the posterior's call (mean and
# 2k + 2 = 6 candidates), the largest candidate set, the neighbours alone, uint8 data, a small n,
# and TF32x3 dots (a tuning option).
AOT_KERNELS: List[AOTVariant] = [
    aot_variant(192, 0),
    aot_variant(192, 6),
    aot_variant(192, 64),
    aot_variant(16, 6),
    aot_variant(3072, 0),
    aot_variant(3072, 6),
    aot_variant(3072, 64),
    aot_variant(3072, 6, soft=False, want_acc=False),
    aot_variant(3072, 6, uint8=True),
    aot_variant(192, 6, uint8=True),
    aot_variant(3072, 0, precision="tf32x3"),
]
