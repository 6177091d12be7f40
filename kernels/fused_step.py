"""Triton fused step: ``out = sum_j c[b, j] * in_j + c[b, k] * z`` in one pass over memory.

    out[i] = sum_{j<k} c[b, j] * float(in_j[i]) + c[b, k] * z_i        i in [0, n)
    b      = (start + i) // inner                                      (int64)
    z_i    = float(noise[i])                          NOISE == 1
           = Philox normal stream (seed, offset + start + i)   NOISE == 2 (fastdiff/reference/rng.py)
           = per-sample streams (seeds[b'], offset + j)      NOISE == 2, SEEDS > 0: start + i = b' per + j
           = no noise term                            NOISE == 0

k = NUM_INPUTS in 0..6 (k = 0 with NOISE = 2 is ``randn``).  Math in float32, one rounding on
the store.  The launcher cuts n into chunks of at most ``CHUNK`` elements and offsets the
pointers, so in-kernel offsets stay int32; only the row index and the Philox counter, which
depend on the global position, use the int64 ``start`` / ``offset``.

Per-sample seeds (``SEEDS``; int64 ``seeds_ptr``, ``per`` elements per sample): ``SEEDS == 1``
when ``per % 4 == 0`` and ``start % 4 == 0``, so every quad of 4 elements lies in one sample and
on one of its stream quads: one Philox call per quad, keyed by that sample's seed.  ``SEEDS == 2``
otherwise: a quad of elements can straddle two samples (two keys) and sit across two stream quads,
so each element runs the Philox quad of its own ``(seeds[b'], (offset + j) // 4)`` and keeps lane
``(offset + j) % 4`` (one Box-Muller pair per element).
"""
from __future__ import annotations

from typing import List, Mapping, NamedTuple, Optional

import torch
import triton
import triton.language as tl

MAX_INPUTS = 6
# elements per program: 4 per thread with 8 warps (one 16-byte float32 vector), 256 Philox quads.
# 4096 (16 per thread) spilled 76 B/thread in fp32 k=6 Philox per-row and 16 B in randn (k=0) at
# sm_80 and sm_90 (ptxas -v; bench/results/triton-resources.md); 1024 spills in no variant
BLOCK = 1024
# The heaviest float32 paths, in-kernel Philox with per-row coefficients (7 gathered coefficients
# and 6 inputs per element in flight beside the Philox rounds) or per-element Philox (SEEDS == 2),
# take 2 elements a thread: at 1024 they held 77-96 registers a thread (k = 6; 2-3 blocks of 256
# threads an SM, 16-24 of 64 warp slots), at 512 47-53 (5 blocks, 40 warps), under the 64-register
# budget of bench/triton_budgets.json; the quads' normals then reach their elements through 1 KB
# of shared memory (a layout conversion).  Halves stay at 1024 (63-64 registers there): 2 of them
# a thread would be 4-byte accesses.  The Philox stream is unchanged: its counters are global.
HEAVY_BLOCK = 512
NUM_WARPS = 8
CHUNK = 1 << 30    # elements per launch (tests monkeypatch it); a multiple of BLOCK and of 4


def block_for(noise: int, per_sample: bool, seeds: int = 0, itemsize: int = 4) -> int:
    """Elements per program of a variant (``BLOCK`` or ``HEAVY_BLOCK``, both divide ``CHUNK``)."""
    return HEAVY_BLOCK if itemsize == 4 and noise == 2 and (per_sample or seeds == 2) else BLOCK


@triton.jit(do_not_specialize=["start", "seed", "offset", "per"])
def _fused_step_kernel(
    out_ptr, in0, in1, in2, in3, in4, in5, noise_ptr, coef_ptr, seeds_ptr,
    # scalar coefficients: c0..c5 multiply in0..in5, cz the noise (used when not PER_SAMPLE)
    c0: tl.float32, c1: tl.float32, c2: tl.float32, c3: tl.float32, c4: tl.float32, c5: tl.float32,
    cz: tl.float32,
    n,                # elements in this launch (< 2^31), left specializable: n % 16 == 0 vectorizes
    inner: tl.int64,  # elements per coefficient row
    start: tl.int64,  # global index of this launch's first element
    seed: tl.int64,
    offset: tl.int64,  # Philox counter of global element 0; (offset + start) % 4 == 0
    per: tl.int64,     # elements per sample of the per-sample seeds (SEEDS > 0)
    NUM_INPUTS: tl.constexpr, NOISE: tl.constexpr, PER_SAMPLE: tl.constexpr, BLOCK: tl.constexpr,
    SEEDS: tl.constexpr = 0,
):
    pid = tl.program_id(0)
    a = tl.arange(0, BLOCK)
    offs = pid * BLOCK + a  # int32: n <= CHUNK
    mask = offs < n
    K1: tl.constexpr = NUM_INPUTS + 1

    if PER_SAMPLE:
        # Row of each element without a 64-bit division per element: one int64 division per
        # program for the first element, then a local row index `row` in [0, BLOCK].
        g0 = start + pid * BLOCK
        b0 = g0 // inner
        r0 = g0 - b0 * inner  # position of the first element inside row b0
        if inner >= BLOCK:    # at most one row boundary in this block: a compare
            row = (a >= (inner - r0)).to(tl.int32)
        else:                 # int32 division; r0 + a < 2 * BLOCK
            row = (r0.to(tl.int32) + a) // inner.to(tl.int32)
        # gathers of a few distinct addresses per block: served by L1
        crow = coef_ptr + b0 * K1 + row * K1
    else:
        crow = coef_ptr  # unused: _coef returns the scalar kernel argument

    # the inputs' terms; a slot past NUM_INPUTS adds nothing (its pointer is a placeholder)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    acc = _term(acc, in0, 0, c0, crow, offs, mask, NUM_INPUTS, PER_SAMPLE)
    acc = _term(acc, in1, 1, c1, crow, offs, mask, NUM_INPUTS, PER_SAMPLE)
    acc = _term(acc, in2, 2, c2, crow, offs, mask, NUM_INPUTS, PER_SAMPLE)
    acc = _term(acc, in3, 3, c3, crow, offs, mask, NUM_INPUTS, PER_SAMPLE)
    acc = _term(acc, in4, 4, c4, crow, offs, mask, NUM_INPUTS, PER_SAMPLE)
    acc = _term(acc, in5, 5, c5, crow, offs, mask, NUM_INPUTS, PER_SAMPLE)

    if NOISE == 1:
        z = tl.load(noise_ptr + offs, mask=mask).to(tl.float32)
        acc += _coef(crow, NUM_INPUTS, cz, mask, PER_SAMPLE) * z
    if NOISE == 2 and SEEDS == 1:
        # per-sample keys, quads inside samples: quad t's 4 elements share a sample b' and a stream quad
        gq = start + 4 * (pid * (BLOCK // 4) + tl.arange(0, BLOCK // 4)).to(tl.int64)  # first element
        bq = gq // per
        cq = offset + (gq - bq * per)  # counter of the quad's first element, a multiple of 4
        key = tl.load(seeds_ptr + bq, mask=gq < start + n, other=0)
        q = cq >> 2
        r0_, r1_, r2_, r3_ = tl.philox(key, q.to(tl.uint32), (q >> 32).to(tl.uint32), 0, 0)
        n0, n1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r0_), tl.uint_to_uniform_float(r1_))
        n2, n3 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r2_), tl.uint_to_uniform_float(r3_))
        z = tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (BLOCK,))
        acc += _coef(crow, NUM_INPUTS, cz, mask, PER_SAMPLE) * z
    if NOISE == 2 and SEEDS == 2:
        # per-sample keys, any per: element by element (a quad may straddle two samples).  The
        # sample of each element without a 64-bit division per element (whose subroutine spilled):
        # one int64 division per program, then a compare or an int32 division, as PER_SAMPLE's rows
        g0 = start + pid * BLOCK
        b0 = g0 // per
        s0 = g0 - b0 * per  # position of the program's first element inside sample b0
        if per >= BLOCK:    # at most one sample boundary in this block
            bl = (a >= (per - s0)).to(tl.int32)
            j = s0 + a - bl.to(tl.int64) * per
        else:               # int32: s0 + a < 2 * BLOCK
            t = s0.to(tl.int32) + a
            bl = t // per.to(tl.int32)
            j = (t - bl * per.to(tl.int32)).to(tl.int64)
        b = b0 + bl
        c = offset + j
        key = tl.load(seeds_ptr + b, mask=mask, other=0)
        q = c >> 2
        lane = (c & 3).to(tl.int32)
        r0_, r1_, r2_, r3_ = tl.philox(key, q.to(tl.uint32), (q >> 32).to(tl.uint32), 0, 0)
        hi = lane >= 2  # lanes 2, 3: the second pair
        na, nb = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(tl.where(hi, r2_, r0_)),
                                           tl.uint_to_uniform_float(tl.where(hi, r3_, r1_)))
        z = tl.where((lane & 1) == 1, nb, na)
        acc += _coef(crow, NUM_INPUTS, cz, mask, PER_SAMPLE) * z
    if NOISE == 2 and SEEDS == 0:
        # One Philox call per quad of 4 elements (not per element: 4x less integer work).
        # Quad q of the stream: counter (lo32(q), hi32(q), 0, 0), key = seed.
        q = (offset + start) // 4 + (pid * (BLOCK // 4) + tl.arange(0, BLOCK // 4))  # int64
        r0_, r1_, r2_, r3_ = tl.philox(seed, q.to(tl.uint32), (q >> 32).to(tl.uint32), 0, 0)
        n0, n1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r0_), tl.uint_to_uniform_float(r1_))
        n2, n3 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r2_), tl.uint_to_uniform_float(r3_))
        # (Q, 2, 2)[q, i, j] = n_{2i+j}; row-major flattening puts n_l at element 4q + l.
        z = tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (BLOCK,))
        acc += _coef(crow, NUM_INPUTS, cz, mask, PER_SAMPLE) * z

    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _term(acc, in_ptr, j: tl.constexpr, scalar, crow, offs, mask, NUM_INPUTS: tl.constexpr, PER_SAMPLE: tl.constexpr):
    """``acc + c_j * in_j`` for input ``j < NUM_INPUTS``; ``acc`` itself for an unused slot."""
    if j < NUM_INPUTS:
        acc += _coef(crow, j, scalar, mask, PER_SAMPLE) * tl.load(in_ptr + offs, mask=mask).to(tl.float32)
    return acc


@triton.jit
def _coef(row_ptr, j: tl.constexpr, scalar, mask, PER_SAMPLE: tl.constexpr):
    """Coefficient j of each element's row (per-sample), or the scalar kernel argument."""
    if PER_SAMPLE:
        return tl.load(row_ptr + j, mask=mask, other=0.0)
    else:
        return scalar


def fused_step(out, ins, coefs, inner, noise_mode, noise, seed, offset, start=0):
    """Launch the fused step on contiguous tensors, read as flat (CUDA, or CPU under TRITON_INTERPRET=1).

    out: tensor of n elements; ins: list of 0..6 tensors of n elements and out's dtype; coefs:
    list of k+1 floats or a float32 (R, k+1) contiguous tensor (row b for elements [b*inner, (b+1)*inner));
    inner: elements per coefficient row; noise_mode: 0 none, 1 ``noise`` tensor, 2 Philox
    stream (seed, offset + i) with offset % 4 == 0; seed, offset: ints.  ``start``: global index
    of ``out[0]`` when the tensors are a window of a larger logical tensor (row and counter math
    use ``start + i``; (offset + start) % 4 == 0).  ``seed`` an int64 (B,) tensor on out's device:
    per-sample seeds, element ``start + i = b per + j`` from ``(seed[b], offset + j)`` with
    ``per = (start + n) // B`` (``start`` 0, or a window ending at the tensor's end).  No host-device sync.
    """
    n = out.numel()
    k = len(ins)
    if n == 0:
        return out
    per_sample = isinstance(coefs, torch.Tensor)
    if per_sample:
        cs = (0.0,) * 7
        coef_t = coefs
    else:
        # inputs' coefficients in c0..c5, the noise coefficient in cz (slot 6)
        cs = (*(float(c) for c in coefs[:k]), *((0.0,) * (MAX_INPUTS - k)), float(coefs[k]) if noise_mode else 0.0)
        coef_t = out  # unused pointer slot
    seeds, per, mode = out, 0, 0  # placeholder pointer when there are no per-sample seeds
    if isinstance(seed, torch.Tensor):
        seeds, per, seed = seed, (start + n) // seed.numel(), 0
        mode = 1 if per % 4 == 0 and start % 4 == 0 else 2
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    if seed >= 1 << 63:  # pass as int64 (same bits): one kernel for every seed
        seed -= 1 << 64
    nz = noise if noise_mode == 1 else out
    block = block_for(noise_mode, per_sample, mode, out.element_size())
    if n <= CHUNK:  # the common case: no slicing
        ptrs = list(ins) + [out] * (MAX_INPUTS - k)
        _fused_step_kernel[(triton.cdiv(n, block),)](
            out, *ptrs, nz, coef_t, seeds, *cs, n, inner, start, seed, offset, per,
            NUM_INPUTS=k, NOISE=noise_mode, PER_SAMPLE=per_sample, BLOCK=block, SEEDS=mode, num_warps=NUM_WARPS,
        )
        return out
    flat_out, flat_ins, flat_nz = out.view(-1), [t.view(-1) for t in ins], nz.view(-1)
    for s in range(0, n, CHUNK):
        e = min(s + CHUNK, n)
        o = flat_out[s:e]
        ptrs = [t[s:e] for t in flat_ins] + [o] * (MAX_INPUTS - k)
        _fused_step_kernel[(triton.cdiv(e - s, block),)](
            o, *ptrs, flat_nz[s:e], coef_t, seeds, *cs, e - s, inner, start + s, seed, offset, per,
            NUM_INPUTS=k, NOISE=noise_mode, PER_SAMPLE=per_sample, BLOCK=block, SEEDS=mode, num_warps=NUM_WARPS,
        )
    return out


# --------------------------------------------------------------------------- AOT variants
class AOTVariant(NamedTuple):
    """One compile of a kernel: ``triton.compile(ASTSource(fn, signature, constexprs), options)``.

    ``op``, ``dtype``, ``sizes``: the ``fastdiff.dispatch.choose(op, "auto", cuda, dtype, **sizes)``
    call whose launch compiles this variant; the variant is a default when that call picks "triton"
    (tests/test_aot.py: a default must not spill).  ``op=None``: a tuning option no library call
    launches (e.g. TF32x3 dots), never a default."""
    name: str
    fn: object
    signature: dict
    constexprs: dict
    num_warps: int
    divisible_by_16: tuple  # arguments the JIT would see as multiples of 16 (aligned pointers, n)
    op: Optional[str] = None
    dtype: Optional[torch.dtype] = None
    sizes: Mapping[str, object] = {}


_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def aot_variant(dtype, num_inputs, noise, per_sample, seeds: int = 0) -> AOTVariant:
    t = "*" + _TY[dtype]
    sig = {"out_ptr": t, **{f"in{j}": t for j in range(MAX_INPUTS)}, "noise_ptr": t, "coef_ptr": "*fp32",
           "seeds_ptr": "*i64" if seeds else t, **{f"c{j}": "fp32" for j in range(MAX_INPUTS)}, "cz": "fp32",
           "n": "i32", "inner": "i64", "start": "i64", "seed": "i64", "offset": "i64", "per": "i64"}
    const = {"NUM_INPUTS": num_inputs, "NOISE": noise, "PER_SAMPLE": per_sample,
             "BLOCK": block_for(noise, per_sample, seeds, dtype.itemsize), "SEEDS": seeds}
    sig.update({name: "constexpr" for name in const})
    name = f"fused_step_{_TY[dtype]}_k{num_inputs}_noise{noise}_{'rows' if per_sample else 'scalar'}"
    if seeds:  # per-sample seeds: 1 = whole quads per sample, 2 = a quad may straddle two samples
        name += f"_seeds{seeds}"
    aligned = tuple(k for k, ty in sig.items() if ty.startswith("*")) + ("n",)
    # the step API passes no sizes: every variant is what auto runs for its dtype
    return AOTVariant(name, _fused_step_kernel, sig, const, NUM_WARPS, aligned, "fused_step", dtype)


# Every dtype x noise mode x coefficient kind, with the fewest and the most inputs (k = 0 only
# for Philox: that is randn); the middle k are the same code with fewer loads.
AOT_KERNELS: List[AOTVariant] = [
    aot_variant(dt, k, noise, ps)
    for dt in _TY
    for noise in (0, 1, 2)
    for k in ((0, 1, MAX_INPUTS) if noise == 2 else (1, MAX_INPUTS))
    for ps in (False, True)
] + [
    # per-sample seeds (Philox only): every dtype with scalar coefficients, float32 with rows
    aot_variant(dt, k, 2, ps, seeds)
    for seeds in (1, 2)
    for dt in _TY
    for k in (1, MAX_INPUTS)
    for ps in ((False, True) if dt == torch.float32 else (False,))
]
