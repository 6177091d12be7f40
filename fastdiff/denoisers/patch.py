"""Patch-based empirical denoisers: the local and the equivariant local score machines.

For images ``x`` (B, C, H, W) at noise level ``x_t = alpha x_0 + sigma eps`` and a training set
``y_1..y_N`` (N, C, H, W), write ``P_p z`` for the P x P patch of ``z`` centred at pixel ``p``
(all C channels; ``boundary`` says what lies outside the image: zeros, or the image wrapped
around).  The two denoisers (docs/math.md section 2, after M. Kamb and S. Ganguli, *An analytic
theory of creativity in convolutional diffusion models*, ICML 2025, their LS and ELS machines,
eqs. 7-10; the local posterior is also Niedoba et al.'s patch posterior) are, at every pixel p:

    local:        x0_hat[:, p] = sum_i          softmax_i    ( -||P_p x - alpha P_p y_i||^2 / (2 sigma^2) ) y_i[:, p]
    equivariant:  x0_hat[:, p] = sum_{i, q~p}   softmax_{i,q}( -||P_p x - alpha P_q y_i||^2 / (2 sigma^2) ) y_i[:, q]

The local machine lets pixel p see the training patches at p only (locality); the equivariant one
every training patch at every position q (locality + translation equivariance), so its samples are
new mosaics of training patches.  ``q ~ p`` is every q for the ``"zero"`` and ``"circular"``
boundaries; ``boundary="broken"`` is Kamb & Ganguli's boundary-broken ELS machine (their Sec. 3.4
and App. B.2): zero padding, and a patch flows only to training patches with the same overlap with
the padding, so q ~ p when the patches at p and q hang over the top, bottom, left and right borders
by the same amounts (interior to interior, each edge row or column to itself, each corner pixel to
the same corner pixel).  For the local machine "broken" is "zero" (p ~ p only).  With
``boundary="circular"`` and ``P = H = W`` (odd) every patch is a cyclic shift of the whole image:
local equals the global empirical denoiser exactly, and equivariant equals the global one on the
training set augmented by all cyclic shifts.

``mode="pspc"`` is Niedoba et al.'s patch set posterior composite (*Towards a mechanistic
explanation of diffusion model generalization*, ICML 2025, PSPC-Square): for every P x P crop Q
inside the image (no padding), the posterior mean of the whole crop over the same crop of every
training image, and at each pixel the average over the crops that hold it:

    pspc:  x0_hat[:, p] = (1 / #{Q : p in Q}) sum_{Q ∋ p} sum_i softmax_i( -||x_Q - alpha y_{i,Q}||^2 / (2 sigma^2) ) y_i[:, p]

The equivariant machine is the empirical scan (:mod:`fastdiff.ops.empirical`) of the B L query
patches over the N L training patches (a chunk of training images unfolded at a time, one scan per
boundary class, the partial softmax sums merged in log-sum-exp form); the local one L independent
attention problems (one batched GEMM a chunk).  Memory is O((B + chunk) L P^2 C), never (B, N L).
``labels`` makes either label-conditional: sample b sees only the training images of class
``labels[b]`` (:meth:`fastdiff.data.ImageSet.with_label`).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from fastdiff import dispatch
from fastdiff._args import OUTPUTS, _per_sample
from fastdiff._interop import check_float_tensor, check_real
from fastdiff.data import ImageSet
from fastdiff.ops.empirical import empirical_scan

__all__ = ["patch_denoise", "PatchDenoiser", "PATCH_MODES", "BOUNDARIES"]

PATCH_MODES = ("local", "equivariant", "pspc")
BOUNDARIES = ("zero", "circular", "broken")
SCAN_BLOCK = 1 << 19
"""Elements of the scan's (queries, tile) score block: small enough to stay in cache between its passes."""
SCAN_FLOOR = 1 << 18
"""The smallest score block however small the inputs: smaller tiles mean more torch calls, whose fixed cost
dominates (8 x 8 images, N = 1797, P = 5, single-threaded: 2^17 elements 10-25% slower than 2^18 or 2^19)."""
BLOCK_FLOOR = 1 << 17
"""The smallest patch block (elements) however small the inputs."""


def _patches(images: torch.Tensor, P: int, boundary: str) -> torch.Tensor:
    """(M, L, C P P): the patch centred at each of the L = H W pixels, in unfold's (c, di, dj) order."""
    r = P // 2
    padded = F.pad(images, (r, r, r, r), mode="circular" if boundary == "circular" else "constant")
    return F.unfold(padded, P).transpose(1, 2)


def _attend(q, chunks, gain, bias, R_shape):
    """Online-softmax attention of queries ``q`` (G, R, D) over key / value chunks (G, c, D) / (G, c, C):
    ``sum_k softmax_k(gain q.k - bias ||k||^2) v_k`` (gain, bias: (1, R, 1) per query); (G, R, C)."""
    qs = q * gain
    m = l = acc = None
    for K, V in chunks:
        S = torch.baddbmm((K * K).sum(-1)[:, None, :] * -bias, qs, K.transpose(1, 2))   # (G, R, c)
        top = S.amax(-1, keepdim=True)
        if m is None:
            m, l, acc = top, torch.zeros_like(top), torch.zeros(*R_shape, V.shape[-1], dtype=q.dtype, device=q.device)
        m_new = torch.maximum(m, top)
        scale = torch.exp(m - m_new)
        S.sub_(m_new).exp_()
        l = l * scale + S.sum(-1, keepdim=True)
        acc = acc * scale + torch.bmm(S, V)
        m = m_new
    return acc / l


def _images_per_chunk(N: int, B: int, C: int, L: int, D: int, per_query: int) -> int:
    """Training images a chunk: their (c L, D) patch block and the (per_query B, c) score block at
    most a quarter of the inputs ((N + B) C L elements; at least BLOCK_FLOOR): the peak stays a small multiple of them."""
    budget = max(BLOCK_FLOOR, (N + B) * C * L // 4)
    return max(1, min(N, budget // (L * D), budget // max(1, per_query * B)))


def _boundary_classes(H: int, W: int, P: int, boundary: str, device) -> list:
    """The positions (flat ``u W + v``) that see each other's training patches, as index tensors:
    one class of all L positions, or for ``"broken"`` one per overhang ``(top, bottom, left, right)``
    of the P x P patch over the zero padding (Kamb & Ganguli Sec. 3.4)."""
    if boundary != "broken":
        return [None]
    r = P // 2

    def overhang(i, n):                     # rows (or columns) of the patch at i outside [0, n)
        return max(0, r - i), max(0, i + r - (n - 1))

    groups = {}
    for u in range(H):
        for v in range(W):
            groups.setdefault(overhang(u, H) + overhang(v, W), []).append(u * W + v)
    return [torch.tensor(g, dtype=torch.long, device=device) for g in groups.values()]


def _equivariant(Xp, images, N, step, a, s, P, C, H, W, boundary, impl):
    """The equivariant machine by the empirical scan: (B, L, C) posterior means of the centre pixels.

    Per boundary class and chunk of training images, the scan of the class's query patches over its
    training patches (centred on the mean training patch ``c``) returns the running max ``m``, sum
    ``l`` and ``acc = sum exp(S - m) (k - c)`` over the C centre columns only (the scan's ``acc_cols``:
    C of the C P^2 multiply-adds a score); the chunks merge as ``m = max(m1, m2)``,
    ``l = l1 e^{m1 - m} + l2 e^{m2 - m}`` (same for acc)."""
    B, L, D = Xp.shape
    ct, dev = Xp.dtype, Xp.device
    r = P // 2
    cols = torch.arange(C, device=dev) * P * P + r * P + r          # the centre pixel in (c, di, dj) order
    total = None                                                      # the mean image -> the mean patch
    for j in range(0, N, step):
        part = images(j, step).sum(0)
        total = part if total is None else total + part
    center = _patches(total[None] / N, P, boundary)[0].mean(0).contiguous()     # (D,)
    gain, bias = a / (s * s), a * a / (2 * s * s)
    xh = (Xp - a[:, None, None] * center).reshape(B * L, D)
    per_query = lambda v: v.repeat_interleave(L)                   # noqa: E731  query b L + p
    g1, g2, h = per_query(gain), per_query(bias), per_query(1 - a)
    block = min(SCAN_BLOCK, max(SCAN_FLOOR, (N + B) * C * L // 4))    # a quarter of the inputs, at least SCAN_FLOOR
    classes = []
    for idx in _boundary_classes(H, W, P, boundary, dev):
        q = None if idx is None else (torch.arange(B, device=dev)[:, None] * L + idx).reshape(-1)
        pick = (lambda v: v) if q is None else (lambda v, q=q: v[q])  # noqa: E731
        tile = int(min(16384, max(128, block // (B * (L if idx is None else idx.numel())))))
        classes.append((idx, q, pick(xh).contiguous(), pick(g1).contiguous(), pick(g2).contiguous(),
                        pick(h).contiguous(), tile))
    m = torch.full((B * L,), -math.inf, dtype=ct, device=dev)
    l = torch.zeros(B * L, dtype=ct, device=dev)
    acc = torch.zeros(B * L, C, dtype=ct, device=dev)
    for j in range(0, N, step):
        keys = _patches(images(j, step), P, boundary)                 # (c, L, D)
        for idx, q, xq, g1q, g2q, hq, tile in classes:
            rows = (keys if idx is None else keys[:, idx]).reshape(-1, D).contiguous()   # the scan's contract
            mk, lk, ak, *_ = empirical_scan(impl, xq, rows, center, g1q, g2q, hq, soft=True, want_acc=True,
                                            kc=0, chunk=tile, acc_cols=cols)
            sel = slice(None) if q is None else q
            m_old = m[sel]
            m_new = torch.maximum(m_old, mk)
            s_old, s_new = torch.exp(m_old - m_new), torch.exp(mk - m_new)
            m[sel] = m_new
            l[sel] = l[sel] * s_old + lk * s_new
            acc[sel] = acc[sel] * s_old[:, None] + ak * s_new[:, None]
    return (acc / l[:, None] + center[cols]).reshape(B, L, C)


def _pspc(img, images, N, chunk, a, s, P):
    """Niedoba et al.'s PSPC-Square composite: the posterior mean of every P x P crop inside the image
    over the same crop of each training image, the crops' means averaged where they overlap."""
    B, C, H, W = img.shape
    Xc = F.unfold(img, P).permute(2, 0, 1)                              # (L', B, D): crops, no padding
    Lc = Xc.shape[0]
    step = chunk or _images_per_chunk(N, B, C, Lc, C * P * P, Lc)

    def chunks():
        for j in range(0, N, step):
            crops = F.unfold(images(j, step), P).permute(2, 0, 1)     # (L', c, D), keys and values
            yield crops, crops

    gain, bias = a / (s * s), a * a / (2 * s * s)
    means = _attend(Xc, chunks(), gain[None, :, None], bias[None, :, None], (Lc, B))   # (L', B, D)
    composite = F.fold(means.permute(1, 2, 0), (H, W), P)                               # (B, C, H, W)
    cover = F.fold(torch.ones(1, C * P * P, Lc, dtype=img.dtype, device=img.device), (H, W), P)
    return composite / cover


def patch_denoise(x, data, alpha, sigma, *, patch: int, mode: str = "local", boundary: str = "zero",
                  labels=None, output: str = "x0", chunk: Optional[int] = None,
                  backend: str = "auto") -> torch.Tensor:
    """The local / equivariant local empirical denoiser (module docstring) of ``data``.

    x: (B, C, H, W), or (B, C H W) flattened (the result has x's shape); data: (N, C, H, W) float
    tensor or a uint8 :class:`~fastdiff.data.ImageSet` (converted a chunk at a time); alpha, sigma:
    scalars or (B,); patch: odd P >= 1; mode: ``"local"``, ``"equivariant"`` or ``"pspc"`` (P <= H, W;
    boundary "zero", which it does not use: it crops inside the image); boundary:
    ``"zero"``, ``"circular"`` or ``"broken"`` (zero padding, patches flow only to patches with the
    same border overlap); labels: None, or one int or (B,) ints with ``data`` a labelled ImageSet
    (sample b sees class ``labels[b]`` only); output ``"x0"`` / ``"eps"`` / ``"score"``; chunk:
    training images a chunk; backend: the empirical scan's (equivariant mode; "auto", "torch", ...).
    """
    if mode not in PATCH_MODES:
        raise ValueError(f"mode: expected one of {PATCH_MODES}, got {mode!r}")
    if boundary not in BOUNDARIES:
        raise ValueError(f"boundary: expected one of {BOUNDARIES}, got {boundary!r}")
    if output not in OUTPUTS:
        raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")
    if isinstance(data, ImageSet):
        N, (C, H, W) = len(data), data.shape
    else:
        if not isinstance(data, torch.Tensor) or data.ndim != 4 or data.shape[0] < 1:
            raise ValueError(f"data: expected an (N, C, H, W) tensor with N >= 1 or an ImageSet, got "
                             f"{getattr(data, 'shape', type(data).__name__)}")
        check_float_tensor("data", data)
        check_real("data", data)
        N, C, H, W = data.shape
    if isinstance(patch, bool) or not isinstance(patch, numbers.Integral) or patch < 1 or \
            (patch % 2 == 0 and mode != "pspc"):
        raise ValueError(f"patch: expected an odd int >= 1 (any int >= 1 for pspc), got {patch!r}")
    P = int(patch)
    if mode == "pspc" and (boundary != "zero" or P > min(H, W)):
        raise ValueError(f"patch: the pspc mode averages P x P crops inside the image (no padding, boundary "
                         f"left at 'zero'): expected P <= {min(H, W)}, got P = {P} with boundary={boundary!r}")
    if boundary == "circular" and P // 2 > min(H, W):
        raise ValueError(f"patch: a circular boundary wraps at most once: expected P <= {2 * min(H, W) + 1}, got {P}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    check_float_tensor("x", x)
    flat = x.ndim == 2
    if (flat and x.shape[1] != C * H * W) or (not flat and tuple(x.shape[1:]) != (C, H, W)) or x.ndim not in (2, 4):
        raise ValueError(f"x: expected shape (B, {C}, {H}, {W}) or (B, {C * H * W}) like the data, got {tuple(x.shape)}")
    if not isinstance(data, ImageSet) and data.device != x.device:
        raise ValueError(f"data: expected a tensor on {x.device} (the device of x), got {data.device}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk: expected a positive int, got {chunk!r}")
    B, L = x.shape[0], H * W
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    dev = x.device
    a = _per_sample("alpha", alpha, B, dev).to(ct).expand(B)
    s = _per_sample("sigma", sigma, B, dev).to(ct).expand(B)
    table = dispatch.check_backend("empirical", backend)
    if labels is not None:
        return _by_label(x, data, a, s, labels, dict(patch=P, mode=mode, boundary=boundary, output=output,
                                                         chunk=chunk, backend=backend))
    img = x.reshape(B, C, H, W).to(ct)
    Xp = _patches(img, P, boundary) if mode != "pspc" else None        # (B, L, D)

    def images(j, c):
        return data.float(j, j + c, dtype=ct, device=dev) if isinstance(data, ImageSet) else data[j:j + c].to(ct)

    if mode == "local":
        gain, bias = a / (s * s), a * a / (2 * s * s)
        step = chunk or _images_per_chunk(N, B, C, L, Xp.shape[-1], L)

        def chunks():
            for j in range(0, N, step):
                y = images(j, step)
                yield _patches(y, P, boundary).transpose(0, 1), y.flatten(2).permute(2, 0, 1)   # (L, c, D), (L, c, C)

        out = _attend(Xp.transpose(0, 1), chunks(), gain[None, :, None], bias[None, :, None], (L, B))  # (L, B, C)
        x0 = out.permute(1, 2, 0)
    elif mode == "pspc":
        x0 = _pspc(img, images, N, chunk, a, s, P)
    else:
        # the scan tiles its own score block; "broken" also copies each class's part of the patch block
        step = chunk or _images_per_chunk(N, B, C, L, Xp.shape[-1] * (2 if boundary == "broken" else 1), 1)
        impl = dispatch.choose(table.name, backend, dev, ct)
        x0 = _equivariant(Xp, images, N, step, a, s, P, C, H, W, boundary, impl).transpose(1, 2)
    x0 = x0.reshape(x.shape).to(x.dtype)
    if output == "x0":
        return x0
    shape = (B,) + (1,) * (x.ndim - 1)
    eps = (x - a.reshape(shape).to(x.dtype) * x0) / s.reshape(shape).to(x.dtype)
    return eps if output == "eps" else -eps / s.reshape(shape).to(x.dtype)


def _by_label(x, data, a, s, labels, kwargs):
    """The label-conditional denoiser: each class's samples against ``data.with_label(k)``."""
    B = x.shape[0]
    if not isinstance(data, ImageSet) or data.labels is None:
        raise ValueError("labels: label-conditional denoising needs data as an ImageSet with labels")
    lab = torch.as_tensor(labels)
    if lab.dtype.is_floating_point or lab.dtype == torch.bool or lab.is_complex() or lab.numel() not in (1, B):
        raise ValueError(f"labels: expected one integer label or {B} (one per sample), got {lab.dtype} {tuple(lab.shape)}")
    lab = lab.reshape(-1).to(torch.int64).expand(B).cpu()
    out = torch.empty_like(x)
    for k in torch.unique(lab).tolist():
        sel = (lab == k).nonzero().reshape(-1).to(x.device)
        out[sel] = patch_denoise(x[sel], data.with_label(k), a[sel], s[sel], **kwargs)
    return out


def _scalar_level(v) -> float:
    """One noise level for a patch-size schedule: a number, or a (B,) tensor of equal values."""
    t = torch.as_tensor(v, dtype=torch.float64).reshape(-1)
    if t.numel() == 0 or not bool((t == t[0]).all()):
        raise ValueError("sigma: a patch-size schedule needs one noise level for the batch, got different per-sample values")
    return float(t[0])


class PatchDenoiser:
    """A training set with a patch geometry: ``den(x, alpha, sigma) -> x0_hat`` (x's shape), usable by
    every sampler.  ``patch`` is an odd int or a schedule ``patch(sigma) -> odd int`` (the ELS
    machine's patch size grows with the noise level); ``mode`` and ``boundary`` as in
    :func:`patch_denoise`.  ``labels`` (one int, or (B,) for a batch of B samples) makes it
    label-conditional (``data`` an ImageSet with labels); ``data.with_label(k)`` is one class's model."""

    def __init__(self, data: Union[torch.Tensor, ImageSet], patch: Union[int, Callable[[float], int]], *,
                 mode: str = "local", boundary: str = "zero", labels=None):
        if mode not in PATCH_MODES:
            raise ValueError(f"mode: expected one of {PATCH_MODES}, got {mode!r}")
        if boundary not in BOUNDARIES:
            raise ValueError(f"boundary: expected one of {BOUNDARIES}, got {boundary!r}")
        if not callable(patch) and (isinstance(patch, bool) or not isinstance(patch, numbers.Integral)
                                    or patch < 1 or patch % 2 == 0):
            raise ValueError(f"patch: expected an odd int >= 1 or a callable sigma -> odd int, got {patch!r}")
        if labels is not None and (not isinstance(data, ImageSet) or data.labels is None):
            raise ValueError("labels: label-conditional denoising needs data as an ImageSet with labels")
        self.data, self.patch, self.mode, self.boundary, self.labels = data, patch, mode, boundary, labels

    def patch_at(self, sigma) -> int:
        return int(self.patch(_scalar_level(sigma))) if callable(self.patch) else int(self.patch)

    def __call__(self, x, alpha, sigma, **kwargs):
        return patch_denoise(x, self.data, alpha, sigma, patch=self.patch_at(sigma), mode=self.mode,
                             boundary=self.boundary, labels=self.labels, **kwargs)

    def __repr__(self) -> str:
        return f"PatchDenoiser(N={len(self.data)}, patch={self.patch!r}, mode={self.mode!r}, boundary={self.boundary!r})"
