"""Patch-based empirical denoisers: the local and the equivariant local score machines.

For images ``x`` (B, C, H, W) at noise level ``x_t = alpha x_0 + sigma eps`` and a training set
``y_1..y_N`` (N, C, H, W), write ``P_p z`` for the P x P patch of ``z`` centred at pixel ``p``
(all C channels; ``boundary`` says what lies outside the image: zeros, or the image wrapped
around).  The two denoisers (docs/math.md section 2, after M. Kamb and S. Ganguli, *An analytic
theory of creativity in convolutional diffusion models*, ICML 2025, their LS and ELS machines;
the local posterior is also Niedoba et al.'s patch posterior) are, at every pixel p:

    local:        x0_hat[:, p] = sum_i      softmax_i    ( -||P_p x - alpha P_p y_i||^2 / (2 sigma^2) ) y_i[:, p]
    equivariant:  x0_hat[:, p] = sum_{i,q}  softmax_{i,q}( -||P_p x - alpha P_q y_i||^2 / (2 sigma^2) ) y_i[:, q]

The local machine lets pixel p see the training patches at p only (locality); the equivariant one
every training patch at every position (locality + translation equivariance), so its samples are
new mosaics of training patches.  With ``boundary="circular"`` and ``P = H = W`` (odd), every patch
is a cyclic shift of the whole image: local equals the global empirical denoiser exactly, and
equivariant equals the global one on the training set augmented by all cyclic shifts.

Both stream over the training set with the online softmax of the empirical denoiser: the local one
as L = H W independent attention problems (one batched GEMM a chunk), the equivariant one as a
single attention of the B L query patches over the N L training patches.  The patches are cut a
chunk of images at a time (``unfold``), so memory is O((B + chunk) L P^2 C), never (B, N L).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from fastdiff._args import OUTPUTS, _per_sample
from fastdiff._interop import check_float_tensor, check_real
from fastdiff.data import ImageSet

__all__ = ["patch_denoise", "PatchDenoiser", "PATCH_MODES", "BOUNDARIES"]

PATCH_MODES = ("local", "equivariant")
BOUNDARIES = ("zero", "circular")


def _patches(images: torch.Tensor, P: int, boundary: str) -> torch.Tensor:
    """(M, L, C P P): the patch centred at each of the L = H W pixels, in unfold's (c, di, dj) order."""
    r = P // 2
    padded = F.pad(images, (r, r, r, r), mode="constant" if boundary == "zero" else "circular")
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


def _rows_per_chunk(per_image: int, budget: int = 1 << 22) -> int:
    """Training images per chunk so the (G, R, c) score block stays near ``budget`` elements."""
    return max(1, budget // max(per_image, 1))


def patch_denoise(x, data, alpha, sigma, *, patch: int, mode: str = "local", boundary: str = "zero",
                  output: str = "x0", chunk: Optional[int] = None) -> torch.Tensor:
    """The local / equivariant local empirical denoiser (module docstring) of ``data``.

    x: (B, C, H, W), or (B, C H W) flattened (the result has x's shape); data: (N, C, H, W) float
    tensor or a uint8 :class:`~fastdiff.data.ImageSet` (converted a chunk at a time); alpha, sigma:
    scalars or (B,); patch: odd P >= 1; mode: ``"local"`` or ``"equivariant"``; boundary:
    ``"zero"`` or ``"circular"``; output ``"x0"`` / ``"eps"`` / ``"score"``; chunk: training images a chunk.
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
    if isinstance(patch, bool) or not isinstance(patch, numbers.Integral) or patch < 1 or patch % 2 == 0:
        raise ValueError(f"patch: expected an odd int >= 1, got {patch!r}")
    P = int(patch)
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
    B, L = x.shape[0], H * W
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    dev = x.device
    img = x.reshape(B, C, H, W).to(ct)
    a = _per_sample("alpha", alpha, B, dev).to(ct).expand(B)
    s = _per_sample("sigma", sigma, B, dev).to(ct).expand(B)
    gain, bias = a / (s * s), a * a / (2 * s * s)                      # per sample
    Xp = _patches(img, P, boundary)                                    # (B, L, D)
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk: expected a positive int, got {chunk!r}")

    def images(j, c):
        return data.float(j, j + c, dtype=ct, device=dev) if isinstance(data, ImageSet) else data[j:j + c].to(ct)

    if mode == "local":
        step = chunk or _rows_per_chunk(L * B)

        def chunks():
            for j in range(0, N, step):
                y = images(j, step)
                yield _patches(y, P, boundary).transpose(0, 1), y.flatten(2).permute(2, 0, 1)   # (L, c, D), (L, c, C)

        out = _attend(Xp.transpose(0, 1), chunks(), gain[None, :, None], bias[None, :, None], (L, B))  # (L, B, C)
        x0 = out.permute(1, 2, 0)
    else:
        step = chunk or _rows_per_chunk(L * B * L)

        def chunks():
            for j in range(0, N, step):
                y = images(j, step)
                yield _patches(y, P, boundary).reshape(1, -1, Xp.shape[-1]), y.flatten(2).transpose(1, 2).reshape(1, -1, C)

        per_query = lambda v: v.repeat_interleave(L)[None, :, None]   # noqa: E731  query b * L + p
        out = _attend(Xp.reshape(1, B * L, -1), chunks(), per_query(gain), per_query(bias), (1, B * L))
        x0 = out.reshape(B, L, C).transpose(1, 2)
    x0 = x0.reshape(x.shape).to(x.dtype)
    if output == "x0":
        return x0
    shape = (B,) + (1,) * (x.ndim - 1)
    eps = (x - a.reshape(shape).to(x.dtype) * x0) / s.reshape(shape).to(x.dtype)
    return eps if output == "eps" else -eps / s.reshape(shape).to(x.dtype)


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
    :func:`patch_denoise`.  For a label-conditional model pass ``data.with_label(k)``."""

    def __init__(self, data: Union[torch.Tensor, ImageSet], patch: Union[int, Callable[[float], int]], *,
                 mode: str = "local", boundary: str = "zero"):
        if mode not in PATCH_MODES:
            raise ValueError(f"mode: expected one of {PATCH_MODES}, got {mode!r}")
        if boundary not in BOUNDARIES:
            raise ValueError(f"boundary: expected one of {BOUNDARIES}, got {boundary!r}")
        if not callable(patch) and (isinstance(patch, bool) or not isinstance(patch, numbers.Integral)
                                    or patch < 1 or patch % 2 == 0):
            raise ValueError(f"patch: expected an odd int >= 1 or a callable sigma -> odd int, got {patch!r}")
        self.data, self.patch, self.mode, self.boundary = data, patch, mode, boundary

    def patch_at(self, sigma) -> int:
        return int(self.patch(_scalar_level(sigma))) if callable(self.patch) else int(self.patch)

    def __call__(self, x, alpha, sigma, **kwargs):
        return patch_denoise(x, self.data, alpha, sigma, patch=self.patch_at(sigma), mode=self.mode,
                             boundary=self.boundary, **kwargs)

    def __repr__(self) -> str:
        return f"PatchDenoiser(N={len(self.data)}, patch={self.patch!r}, mode={self.mode!r}, boundary={self.boundary!r})"
