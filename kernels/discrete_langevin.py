"""Triton discrete Langevin flip (the contract: fastdiff/ops/discrete_langevin.py)::

    out[i] = +1 if u_i < sigmoid(l_i) else -1,     l_i = a * score[i] + b * anchor[i]
    u_i    = uniform Philox stream (seed, offset + start + i): word (g % 4) of quad g // 4,
             tl.uint_to_uniform_float of it (rng.py rand(); the C++ kernel's bits exactly)

float32, math in float32, one Philox call per quad of 4 elements.  The launcher cuts n into
chunks of at most ``CHUNK`` elements (in-kernel offsets int32; the Philox counter uses the int64
``start + offset``).
"""
from __future__ import annotations

__all__ = ["discrete_flip"]

import torch
import triton
import triton.language as tl

BLOCK = 1024
NUM_WARPS = 8
CHUNK = 1 << 30  # elements per launch; a multiple of BLOCK and of 4


@triton.jit(do_not_specialize=["start", "seed", "offset"])
def _flip_kernel(out_ptr, anchor_ptr, score_ptr, bad_ptr, a: tl.float32, b: tl.float32, n, start: tl.int64,
                 seed: tl.int64, offset: tl.int64, HAS_SCORE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    # the uniforms: quad q = (offset + start) / 4 + local quad; lanes joined in element order
    q = (offset + start) // 4 + (pid * (BLOCK // 4) + tl.arange(0, BLOCK // 4))
    r0, r1, r2, r3 = tl.philox(seed, q.to(tl.uint32), (q >> 32).to(tl.uint32), 0, 0)
    u0, u1 = tl.uint_to_uniform_float(r0), tl.uint_to_uniform_float(r1)
    u2, u3 = tl.uint_to_uniform_float(r2), tl.uint_to_uniform_float(r3)
    u = tl.reshape(tl.join(tl.join(u0, u2), tl.join(u1, u3)), (BLOCK,))  # u_l at element 4 q + l
    v = tl.load(anchor_ptr + offs, mask=mask, other=1.0).to(tl.float32)
    # the callers' binary check in the same pass: anchor entries not in {-1, +1}, one atomic per program
    tl.atomic_add(bad_ptr, tl.sum(((v != 1.0) & (v != -1.0)).to(tl.int32), axis=0))
    logit = b * v
    if HAS_SCORE:
        logit += a * tl.load(score_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = 1.0 / (1.0 + tl.exp(-logit))
    y = tl.where(u < p, 1.0, -1.0)  # NaN logit: p NaN, the compare false, -1
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def discrete_flip(out, anchor, score, a, b, seed, offset, start=0):
    """Launch the flip on contiguous float32 tensors of ``n`` elements, read as flat (CUDA, or CPU
    under TRITON_INTERPRET=1); ``score`` None: no score term; ``(offset + start) % 4 == 0``.
    Returns the number of ``anchor`` entries not in {-1, +1} as a 0-d int32 tensor on the device
    (not read here: reading it on CUDA is a host sync, the caller decides)."""
    n = out.numel()
    bad = torch.zeros((), dtype=torch.int32, device=out.device)
    if n == 0:
        return bad
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    if seed >= 1 << 63:  # the same bits as int64: one kernel for every seed
        seed -= 1 << 64
    fo, fa = out.view(-1), anchor.view(-1)
    fs = score.view(-1) if score is not None else fa
    for s in range(0, n, CHUNK):
        e = min(s + CHUNK, n)
        _flip_kernel[(triton.cdiv(e - s, BLOCK),)](
            fo[s:e], fa[s:e], fs[s:e], bad, float(a), float(b), e - s, start + s, seed, offset,
            HAS_SCORE=score is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return bad



# --------------------------------------------------------------------------- AOT variants
def _aot_kernels():
    """The two variants (with / without a score term) that tests/test_aot.py compiles for sm_80 / sm_90."""
    from .fused_step import AOTVariant

    sig = {"out_ptr": "*fp32", "anchor_ptr": "*fp32", "score_ptr": "*fp32", "bad_ptr": "*i32", "a": "fp32",
           "b": "fp32", "n": "i32", "start": "i64", "seed": "i64", "offset": "i64",
           "HAS_SCORE": "constexpr", "BLOCK": "constexpr"}
    aligned = ("out_ptr", "anchor_ptr", "score_ptr", "n")
    return [AOTVariant(f"discrete_flip_fp32_{'score' if hs else 'noscore'}", _flip_kernel, sig,
                       {"HAS_SCORE": hs, "BLOCK": BLOCK}, NUM_WARPS, aligned, "discrete_langevin", torch.float32)
            for hs in (True, False)]


AOT_KERNELS = _aot_kernels()
