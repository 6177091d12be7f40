"""Reference Philox4x32-10 normal stream (pure NumPy), the definition every backend matches.

The stream is a function of ``(seed, g)`` where ``g`` is the global element index
(``generator offset + position in the flattened tensor``), a 64-bit integer:

    q = g // 4, lane = g % 4
    (r0, r1, r2, r3) = Philox4x32-10(counter=(lo32(q), hi32(q), 0, 0),
                                     key=(lo32(seed), hi32(seed)))
    u_j = float32(int32(r_j) if >= 0 else -int32(r_j) - 1) * 4.6566127342e-10   # [0, 1)
    (n0, n1) = BoxMuller(u0, u1),  (n2, n3) = BoxMuller(u2, u3)
    BoxMuller(a, b) = r cos(th), r sin(th),  r = sqrt(-2 log max(a, 1e-7)),  th = 2 pi b
    z[g] = n_lane

This is Triton's ``tl.randn4x`` mapping (``triton.language.random``): the same rounds and
constants, the same uint -> uniform map and Box-Muller, with the 64-bit quad index ``q``
spread over the first two counter words so streams longer than 2^32 quads never wrap.
Every float step is float32, as in the kernels, so backends agree to a few ulp.

Per-sample seeds (``fastdiff.Generator(seed=[s_0, ..., s_{B-1}])``): a tensor of ``B * per``
elements is ``B`` samples of ``per``; element ``j`` of sample ``b`` is the normal ``(s_b, offset + j)``
of ``s_b``'s own stream (:func:`randn_per_sample`), so a sample's noise does not depend on its
batch-mates, on ``B`` or on its position.
"""
from __future__ import annotations

import numpy as np

PHILOX_KEY_A = np.uint32(0x9E3779B9)
PHILOX_KEY_B = np.uint32(0xBB67AE85)
PHILOX_ROUND_A = np.uint64(0xD2511F53)
PHILOX_ROUND_B = np.uint64(0xCD9E8D57)
N_ROUNDS = 10
_M32 = np.uint64(0xFFFFFFFF)


def philox4x32(seed: int, c0, c1, c2, c3, n_rounds: int = N_ROUNDS):
    """Philox4x32 on uint32 arrays; ``seed`` is a 64-bit key split into (lo, hi)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0 = np.uint32(seed & 0xFFFFFFFF)
    k1 = np.uint32(seed >> 32)
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint32) for c in (c0, c1, c2, c3))
    with np.errstate(over="ignore"):
        for _ in range(n_rounds):
            p0 = PHILOX_ROUND_B * c2.astype(np.uint64)  # B * c2 (64-bit product)
            p1 = PHILOX_ROUND_A * c0.astype(np.uint64)  # A * c0
            n0 = (p0 >> np.uint64(32)).astype(np.uint32) ^ c1 ^ k0
            n2 = (p1 >> np.uint64(32)).astype(np.uint32) ^ c3 ^ k1
            n1 = (p0 & _M32).astype(np.uint32)
            n3 = (p1 & _M32).astype(np.uint32)
            c0, c1, c2, c3 = n0, n1, n2, n3
            k0 = np.uint32((int(k0) + int(PHILOX_KEY_A)) & 0xFFFFFFFF)
            k1 = np.uint32((int(k1) + int(PHILOX_KEY_B)) & 0xFFFFFFFF)
    return c0, c1, c2, c3


def uint_to_uniform(r: np.ndarray) -> np.ndarray:
    """Triton's ``uint_to_uniform_float`` for 32-bit words: [0, 1) in float32."""
    x = r.astype(np.uint32).view(np.int32).astype(np.int64)
    x = np.where(x < 0, -x - 1, x)
    return x.astype(np.float32) * np.float32(4.6566127342e-10)


def box_muller(u1: np.ndarray, u2: np.ndarray):
    """Triton's ``pair_uniform_to_normal``, in float32."""
    u1 = np.maximum(np.float32(1.0e-7), u1)
    th = np.float32(6.283185307179586) * u2
    r = np.sqrt(np.float32(-2.0) * np.log(u1))
    return r * np.cos(th), r * np.sin(th)


def normal_quads(seed: int, q: np.ndarray) -> np.ndarray:
    """The four normals of each quad index ``q`` (int64 array): shape ``q.shape + (4,)``."""
    q = np.asarray(q, dtype=np.int64).astype(np.uint64)
    lo = (q & _M32).astype(np.uint32)
    hi = (q >> np.uint64(32)).astype(np.uint32)
    zero = np.zeros_like(lo)
    r0, r1, r2, r3 = philox4x32(seed, lo, hi, zero, zero)
    n0, n1 = box_muller(uint_to_uniform(r0), uint_to_uniform(r1))
    n2, n3 = box_muller(uint_to_uniform(r2), uint_to_uniform(r3))
    return np.stack([n0, n1, n2, n3], axis=-1).astype(np.float32)


def randn(seed: int, offset: int, n: int) -> np.ndarray:
    """Elements ``offset .. offset + n - 1`` of the stream for ``seed`` (float32, shape (n,))."""
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    g = np.arange(n, dtype=np.int64) + np.int64(offset)
    vals = normal_quads(seed, g // 4)
    return vals[np.arange(n), g % 4]


def randn_per_sample(seeds, offset: int, per: int) -> np.ndarray:
    """The per-sample stream: ``(B, per)`` float32, row ``b`` = ``randn(seeds[b], offset, per)``."""
    return np.stack([randn(int(s), offset, per) for s in seeds]).reshape(len(seeds), per)


def randn_at(seed: int, g: np.ndarray) -> np.ndarray:
    """Stream values at arbitrary global indices ``g`` (int64 array)."""
    g = np.asarray(g, dtype=np.int64)
    vals = normal_quads(seed, g // 4)
    return np.take_along_axis(vals, (g % 4)[..., None], axis=-1)[..., 0]


def _philox_words_torch(seed, offset: int, n: int, device):
    """The Philox words ``(r0, r1, r2, r3)`` of each element's quad and the element's counter ``g``
    (int64 tensors of ``n``), torch int64 ops on any device; ``seed`` as in :func:`randn_torch`."""
    import torch

    m32 = 0xFFFFFFFF
    g = torch.arange(n, dtype=torch.int64, device=device)
    if isinstance(seed, torch.Tensor):
        per = n // seed.numel()
        b = g // per
        g = g - b * per + int(offset)       # the counter within the sample's own stream
        key = seed.to(device)[b]
        k0, k1 = key & m32, (key >> 32) & m32  # arithmetic shift, then the low 32 bits: the u64's high word
    else:
        g = g + int(offset)
        seed = int(seed) & 0xFFFFFFFFFFFFFFFF
        k0, k1 = seed & m32, seed >> 32
    q = g >> 2
    c0, c1 = q & m32, (q >> 32) & m32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    A, B = int(PHILOX_ROUND_A), int(PHILOX_ROUND_B)
    for _ in range(N_ROUNDS):
        # 32x32 -> 64-bit products split into 16-bit halves so nothing overflows int64
        hi_b, lo_b = _mul32(B, c2)
        hi_a, lo_a = _mul32(A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + int(PHILOX_KEY_A)) & m32
        k1 = (k1 + int(PHILOX_KEY_B)) & m32
    return (c0, c1, c2, c3), g


def _uniform_torch(r):
    """:func:`uint_to_uniform` on int64 tensors holding uint32 words."""
    import torch

    r = torch.where(r >= 2**31, r - 2**32, r)  # int32 view
    r = torch.where(r < 0, -r - 1, r)
    return r.to(torch.float32) * 4.6566127342e-10


def randn_torch(seed, offset: int, n: int, device="cpu"):
    """The same stream computed with torch int64 ops on any device (the torch backend's noise).

    ``seed``: an int, or per-sample seeds as an int64 ``(B,)`` tensor on ``device`` holding the u64
    bits (``fastdiff.Generator.seed_tensor``); then ``n = B * per`` and element ``i = b per + j`` is
    ``(seeds[b], offset + j)`` (:func:`randn_per_sample`), with no host sync."""
    import torch

    (c0, c1, c2, c3), g = _philox_words_torch(seed, offset, n, device)

    def pair(u1, u2):
        u1 = torch.clamp(u1, min=1.0e-7)
        th = u2 * 6.283185307179586
        r = torch.sqrt(-2.0 * torch.log(u1))
        return r * torch.cos(th), r * torch.sin(th)

    n0, n1 = pair(_uniform_torch(c0), _uniform_torch(c1))
    n2, n3 = pair(_uniform_torch(c2), _uniform_torch(c3))
    vals = torch.stack([n0, n1, n2, n3], dim=-1)
    return vals.gather(-1, (g & 3).unsqueeze(-1)).squeeze(-1)


# --------------------------------------------------------------------------- the uniform stream
# Element g of the uniform stream of ``seed`` is word ``g % 4`` of the Philox quad ``g // 4``
# mapped by :func:`uint_to_uniform` (Triton's ``tl.rand4x``): ``u[g] = uint_to_uniform(r_{g % 4})``,
# float32 in [0, 1), exactly representable, so every backend draws the same bits.  The discrete
# samplers (fastdiff/ops/discrete_langevin.py) draw their flips from it.
def rand(seed: int, offset: int, n: int) -> np.ndarray:
    """Uniforms ``offset .. offset + n - 1`` of the stream for ``seed`` (float32, shape (n,))."""
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    g = np.arange(n, dtype=np.int64) + np.int64(offset)
    q = (g // 4).astype(np.uint64)
    lo = (q & _M32).astype(np.uint32)
    hi = (q >> np.uint64(32)).astype(np.uint32)
    zero = np.zeros_like(lo)
    words = np.stack(philox4x32(seed, lo, hi, zero, zero), axis=-1)
    return uint_to_uniform(words[np.arange(n), g % 4])


def rand_torch(seed: int, offset: int, n: int, device="cpu"):
    """:func:`rand` with torch int64 ops on any device (the torch backend's uniforms)."""
    import torch

    words, g = _philox_words_torch(seed, offset, n, device)
    w = torch.stack(words, dim=-1).gather(-1, (g & 3).unsqueeze(-1)).squeeze(-1)
    return _uniform_torch(w)


def _mul32(a: int, b):
    """(hi32, lo32) of the 64-bit product of the constant ``a`` and uint32 tensor ``b`` (int64)."""
    m32 = 0xFFFFFFFF
    a_lo, a_hi = a & 0xFFFF, a >> 16
    b_lo, b_hi = b & 0xFFFF, b >> 16
    ll = a_lo * b_lo
    lh = a_lo * b_hi
    hl = a_hi * b_lo
    hh = a_hi * b_hi
    mid = (ll >> 16) + (lh & 0xFFFF) + (hl & 0xFFFF)
    lo = (ll & 0xFFFF) | ((mid & 0xFFFF) << 16)
    hi = hh + (lh >> 16) + (hl >> 16) + (mid >> 16)
    return hi & m32, lo & m32
