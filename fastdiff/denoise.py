"""Analytic denoisers (SPEC 2): MoLRG softmax projection, Gaussian, empirical (memorizing).

All return the posterior mean ``x0_hat = E[x_0 | x_t]`` of ``x_t = alpha x_0 + sigma eps`` (or its
eps / score form) for ``x`` of shape (B, n), with scalar or per-sample (B,) ``alpha, sigma``.

MoLRG (seed 002 Lemma 1 / eq. 9, seed 004 eq. 7.4.19-20)::

    v_perp = alpha^2 delta^2 + sigma^2,   v_k = alpha^2 (tau_k^2 + delta^2) + sigma^2
    w      = softmax_k( log pi_k - (d_k/2) log(v_k/v_perp) + (1/v_perp - 1/v_k)/2 ||U_k^T x||^2 )
    x0_hat = a_perp x + sum_k w_k (a_k - a_perp) U_k U_k^T x,  a_perp = alpha delta^2/v_perp, a_k = alpha (tau_k^2 + delta^2)/v_k

Every per-sample scalar of that formula (logit gain and bias, the recombination coefficients, the
output conversion and the guidance weight) is computed once here, in float64, and packed into a
``(R, 3K + 2)`` table ``[g_k | b_k | C_k | A | gw]`` so the kernels only do
``out = A x + sum_k w'_k C_k U_k U_k^T x`` with ``w' = (1 - gw) softmax(b + g ||U^T x||^2) + gw onehot(label)``.
The bases are packed side by side into ``Ucat`` (n, D = sum d_k): the two products are single GEMMs.
"""
from __future__ import annotations

import math
import numbers
import threading
import weakref
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch.autograd import forward_ad

from fastdiff import backends, dispatch
from fastdiff._interop import accepts_arrays, check_float_tensor, check_real
# the C++ kernels keep per-row logits in fixed stack buffers: K above this runs the GEMM form
from fastdiff.dispatch import CPP_MAX_K

__all__ = ["molrg_denoise", "gaussian_denoise", "empirical_denoise", "nearest_neighbors", "pack_bases"]

OUTPUTS = ("x0", "eps", "score")


# =========================================================================== validation helpers
def _check_x(x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, NumPy or CuPy array, got {type(x).__name__}")
    check_float_tensor("x", x)
    if x.ndim != 2:
        raise ValueError(f"x: expected shape (B, n), got {tuple(x.shape)}")
    return x


def _per_sample(name: str, v, B: int, device, *, positive=True, allow_zero=False) -> torch.Tensor:
    """A scalar or (B,) value as a float64 tensor of shape (1,) or (B,), validated."""
    if isinstance(v, bool) or not isinstance(v, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{name}: expected a number or a (B,) tensor, got {type(v).__name__}")
    t = torch.as_tensor(v, dtype=torch.float64).to(device).reshape(-1)
    if t.numel() not in (1, B):
        raise ValueError(f"{name}: expected a scalar or a ({B},) tensor (one per sample), got {t.numel()} values")
    if t.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: expected finite values")
        if positive and not bool((t > 0).all() if not allow_zero else (t >= 0).all()):
            raise ValueError(f"{name}: expected {name} {'>=' if allow_zero else '>'} 0")
    return t


def pack_bases(bases, n: Optional[int] = None, *, check_orthonormal: bool = False, atol: float = 1e-4):
    """``(Ucat (n, D), dims [d_k])`` from a (K, n, d) tensor or a list of (n, d_k) tensors."""
    if isinstance(bases, torch.Tensor):
        if bases.ndim != 3:
            raise ValueError(f"bases: expected a (K, n, d) tensor or a list of (n, d_k) tensors, got shape {tuple(bases.shape)}")
        mats = list(bases.unbind(0))
    elif isinstance(bases, (list, tuple)):
        mats = list(bases)
        for i, U in enumerate(mats):
            if not isinstance(U, torch.Tensor) or U.ndim != 2:
                raise ValueError(f"bases[{i}]: expected an (n, d_k) tensor, got {getattr(U, 'shape', type(U).__name__)}")
    else:
        raise TypeError(f"bases: expected a (K, n, d) tensor or a list of (n, d_k) tensors, got {type(bases).__name__}")
    if len(mats) == 0:
        raise ValueError("bases: expected at least one component (K >= 1), got K = 0")
    n_b = mats[0].shape[0]
    for i, U in enumerate(mats):
        if U.shape[0] != n_b:
            raise ValueError(f"bases[{i}]: expected {n_b} rows like bases[0], got {U.shape[0]}")
        if U.shape[1] < 1 or U.shape[1] > U.shape[0]:
            raise ValueError(f"bases[{i}]: expected 1 <= d_k <= n = {U.shape[0]}, got d_k = {U.shape[1]}")
        if not U.is_floating_point():
            raise TypeError(f"bases[{i}]: expected a floating-point tensor, got {U.dtype}")
    if n is not None and n_b != n:
        raise ValueError(f"bases: expected n = {n} rows (x has shape (B, {n})), got {n_b}")
    if check_orthonormal:
        for i, U in enumerate(mats):
            G = U.double().T @ U.double()
            err = (G - torch.eye(G.shape[0], dtype=torch.float64, device=G.device)).abs().max().item()
            if not err <= atol:
                raise ValueError(f"bases[{i}]: not orthonormal (max |U^T U - I| = {err:.3g} > {atol})")
    dims = [int(U.shape[1]) for U in mats]
    if isinstance(bases, torch.Tensor):  # one strided copy; its backward is a view (no stack of dU)
        return bases.permute(1, 0, 2).reshape(n_b, -1), dims
    return torch.cat(mats, 1), dims


_PACK_CACHE: dict = {}
_PACK_LOCK = threading.Lock()  # sweeps call the denoisers from worker threads: eviction must not race


def _tensor_key(ts, extra=()):
    """A cache key for the current contents of the tensors ``ts``: identity, storage pointer,
    version counter (bumped by every in-place write, the kernels' included), layout and dtype;
    None for inference tensors (they have no version counter, so an in-place write could not be
    seen: they are never cached) and for torch.func wrappers."""
    if any(t.is_inference() or torch._C._functorch.is_functorch_wrapped_tensor(t) for t in ts):
        return None  # (functorch wrappers: no storage, and a fresh wrapper every call)
    return tuple((id(t), t.data_ptr(), t._version, tuple(t.shape), t.stride(), t.storage_offset(), t.dtype, t.device)
                 for t in ts) + tuple(extra)


def cache_get(cache: dict, key, ts):
    """The value cached under ``key`` for the tensors ``ts`` (held by weak reference: a freed
    tensor whose id was reused misses), or None.  Thread-safe (``_PACK_LOCK``)."""
    if key is None:
        return None
    with _PACK_LOCK:
        hit = cache.get(key)
    if hit is not None and len(hit[0]) == len(ts) and all(r() is t for r, t in zip(hit[0], ts)):
        return hit[1]
    return None


def cache_put(cache: dict, key, ts, value, size: int = 16) -> None:
    """Store ``value`` under ``key`` (oldest entries evicted beyond ``size``).  Nothing is stored
    under torch.inference_mode: a value made there is an inference tensor, which a later call
    outside it could not save for backward."""
    if key is None or torch.is_inference_mode_enabled():
        return
    refs = [weakref.ref(t) for t in ts]
    with _PACK_LOCK:
        while len(cache) >= size:
            cache.pop(next(iter(cache)))
        cache[key] = (refs, value)


def _packed(bases, n, check_orthonormal):
    """``pack_bases`` with a small cache for repeated calls with the same, unmodified tensors
    (samplers call the denoiser thousands of times with one set of bases): keyed by
    :func:`_tensor_key`, so a freed or modified tensor misses."""
    mats = bases.unbind(0) if isinstance(bases, torch.Tensor) and bases.ndim == 3 else bases
    if (check_orthonormal or not isinstance(mats, (list, tuple)) or torch.is_grad_enabled() and
            any(isinstance(t, torch.Tensor) and t.requires_grad for t in mats) or torch.compiler.is_compiling()):
        return pack_bases(bases, n, check_orthonormal=check_orthonormal)
    src = [bases] if isinstance(bases, torch.Tensor) else list(bases)
    if not all(isinstance(t, torch.Tensor) for t in src):
        return pack_bases(bases, n)
    key = _tensor_key(src)
    hit = cache_get(_PACK_CACHE, key, src)
    if hit is not None:
        ucat, dims = hit
        if n is not None and ucat.shape[0] != n:
            raise ValueError(f"bases: expected n = {n} rows (x has shape (B, {n})), got {ucat.shape[0]}")
        return ucat, dims
    packed = pack_bases(bases, n)
    cache_put(_PACK_CACHE, key, src, packed)
    return packed


def _mixture_params(K, dims, pi, tau, delta, device):
    if pi is None:
        pi_t = torch.full((K,), 1.0 / K, dtype=torch.float64, device=device)
    else:
        pi_t = torch.as_tensor(pi, dtype=torch.float64).to(device).reshape(-1)
        if pi_t.numel() != K:
            raise ValueError(f"pi: expected {K} mixing weights (one per component), got {pi_t.numel()}")
        if pi_t.device.type == "cpu" and not torch.compiler.is_compiling():
            if not bool(torch.isfinite(pi_t).all()) or bool((pi_t < 0).any()):
                raise ValueError("pi: expected finite non-negative mixing weights")
            if abs(pi_t.sum().item() - 1.0) > 1e-6:
                raise ValueError(f"pi: mixing weights must sum to 1, got {pi_t.sum().item():.8g}")
    tau_t = torch.ones(K, dtype=torch.float64, device=device) if tau is None else \
        torch.as_tensor(tau, dtype=torch.float64).to(device).reshape(-1).expand(K)
    if tau_t.device.type == "cpu" and not torch.compiler.is_compiling() and not bool((torch.isfinite(tau_t) & (tau_t > 0)).all()):
        raise ValueError("tau: expected finite positive component scales")
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not math.isfinite(delta) or delta < 0:
        raise ValueError(f"delta: expected a finite value >= 0, got {delta!r}")
    return pi_t, tau_t, float(delta)


def _scalar(v):
    """v as a Python float if it is a plain number (or a one-element CPU tensor), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, numbers.Real):
        return float(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1 and v.device.type == "cpu" and not torch.compiler.is_compiling():
        return float(v)
    return None


def _floats(v) -> List[float]:
    """A number, sequence of numbers or CPU tensor as a list of floats (lists stay Python: traceable)."""
    if isinstance(v, numbers.Real):
        return [float(v)]
    if isinstance(v, (list, tuple)) and all(isinstance(e, numbers.Real) for e in v):
        return [float(e) for e in v]
    return [float(e) for e in torch.as_tensor(v, dtype=torch.float64).reshape(-1).tolist()]


def _molrg_params_scalar(a, s, dims, pi, tau, delta, output, gw):
    """The (1, 3K+2) table from Python floats: microseconds, where tensor ops would take ~0.3 ms."""
    K = len(dims)
    for name, v in (("alpha", a), ("sigma", s)):
        if not math.isfinite(v):
            raise ValueError(f"{name}: expected finite values, got {v}")
        if v <= 0:
            raise ValueError(f"{name}: expected {name} > 0, got {v}")
    pis = [1.0 / K] * K if pi is None else _floats(pi)
    if len(pis) != K:
        raise ValueError(f"pi: expected {K} mixing weights (one per component), got {len(pis)}")
    if not all(math.isfinite(p) and p >= 0 for p in pis):
        raise ValueError("pi: expected finite non-negative mixing weights")
    if abs(sum(pis) - 1.0) > 1e-6:
        raise ValueError(f"pi: mixing weights must sum to 1, got {sum(pis):.8g}")
    taus = [1.0] * K if tau is None else _floats(tau)
    taus = taus * K if len(taus) == 1 else taus
    if len(taus) != K:
        raise ValueError(f"tau: expected a scalar or {K} component scales, got {len(taus)}")
    if not all(math.isfinite(t) and t > 0 for t in taus):
        raise ValueError("tau: expected finite positive component scales")
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not math.isfinite(delta) or delta < 0:
        raise ValueError(f"delta: expected a finite value >= 0, got {delta!r}")
    v_perp = a * a * delta * delta + s * s
    p, q = {"x0": (0.0, 1.0), "eps": (1.0 / s, -a / s), "score": (-1.0 / (s * s), a / (s * s))}[output]
    a_perp = a * delta * delta / v_perp
    g, b, C = [], [], []
    for k in range(K):
        v_k = a * a * (taus[k] ** 2 + delta * delta) + s * s
        g.append((1.0 / v_perp - 1.0 / v_k) / 2.0)
        b.append((math.log(pis[k]) if pis[k] > 0 else -math.inf) - dims[k] / 2.0 * math.log(v_k / v_perp))
        C.append(q * (a * (taus[k] ** 2 + delta * delta) / v_k - a_perp))
    return torch.tensor([g + b + C + [p + q * a_perp, gw]], dtype=torch.float64)


def molrg_params(alpha, sigma, dims, pi, tau, delta, output, guidance, B, device):
    """The packed (R, 3K+2) float64 table ``[g | b | C | A | gw]`` (see the module docstring)."""
    a_f, s_f = _scalar(alpha), _scalar(sigma)
    gw_f = 0.0 if guidance is None else _scalar(guidance)
    if a_f is not None and s_f is not None and gw_f is not None and (gw_f == 0.0 or math.isfinite(gw_f)):
        if guidance is not None and not math.isfinite(gw_f):
            raise ValueError("guidance: expected finite values")
        return _molrg_params_scalar(a_f, s_f, dims, pi, tau, delta, output, gw_f).to(device)
    K = len(dims)
    a = _per_sample("alpha", alpha, B, device)
    s = _per_sample("sigma", sigma, B, device)
    pi_t, tau_t, delta = _mixture_params(K, dims, pi, tau, delta, device)
    d = torch.tensor(dims, dtype=torch.float64, device=device)
    a, s = a[:, None], s[:, None]                      # (R, 1)
    v_perp = a * a * delta * delta + s * s
    v_k = a * a * (tau_t * tau_t + delta * delta) + s * s  # (R, K)
    g = (1.0 / v_perp - 1.0 / v_k) / 2.0
    with torch.no_grad():
        log_pi = torch.log(pi_t)  # log 0 = -inf: that component never wins
    b = log_pi - (d / 2.0) * torch.log(v_k / v_perp)
    a_perp = a * delta * delta / v_perp
    a_k = a * (tau_t * tau_t + delta * delta) / v_k
    if output == "x0":
        p, q = torch.zeros_like(s), torch.ones_like(s)
    elif output == "eps":
        p, q = 1.0 / s, -a / s
    else:  # score
        p, q = -1.0 / (s * s), a / (s * s)
    A = p + q * a_perp
    C = q * (a_k - a_perp)
    gw = None if guidance is None else _per_sample("guidance", guidance, B, device, positive=False)[:, None]
    # one row per sample as soon as any of alpha, sigma, guidance is per-sample (a (B,) guidance
    # with scalar alpha / sigma included)
    R = max(g.shape[0], C.shape[0], 1 if gw is None else gw.shape[0])
    gw = torch.zeros(R, 1, dtype=torch.float64, device=device) if gw is None else gw.expand(R, 1)
    return torch.cat([g.expand(R, K), b.expand(R, K), C.expand(R, K), A.expand(R, 1), gw], 1)


# =========================================================================== MoLRG
_SEG_CACHE: dict = {}


def _segment_ops(dims, device):
    """(segsum (B, D) -> (B, K), expand (B, K) -> (B, D)) for the column segmentation ``dims``:
    reshapes when every d_k is equal, an index map otherwise (cached per dims and device)."""
    K = len(dims)
    if len(set(dims)) == 1:
        d = dims[0]
        return (lambda t: t.reshape(t.shape[0], K, d).sum(-1),
                lambda c: c[:, :, None].expand(c.shape[0], K, d).reshape(c.shape[0], K * d))
    key = (tuple(dims), device)
    seg = _SEG_CACHE.get(key)
    if seg is None:
        seg = _SEG_CACHE[key] = torch.repeat_interleave(torch.arange(K, device=device), torch.tensor(dims, device=device))
    return (lambda t: torch.zeros(t.shape[0], K, dtype=t.dtype, device=t.device).index_add_(1, seg, t),
            lambda c: c[:, seg])


def _under_transform(*ts) -> bool:
    """Some tensor is a functorch wrapper (inside torch.func.vjp / jvp / vmap / grad) or carries a
    forward-mode tangent (torch.autograd.forward_ad)."""
    if torch.compiler.is_compiling():
        return False
    if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in ts):
        return True
    return forward_ad._current_level >= 0 and any(forward_ad.unpack_dual(t).tangent is not None for t in ts)


def _molrg_torch(x, ucat, dims, params, labels, hard, want_w, keep_p=False, plain=False):
    """GEMM formulation (the large-size and autograd path): P = x Ucat and out = A x + q Ucat^T on
    the library GEMM (:func:`fastdiff.backends.mm`), the per-row mix between them fused in C++
    (float32 CPU) or as torch ops (differentiable in x and Ucat; float64, CUDA, traced code)."""
    K = len(dims)
    ct = x.dtype
    params = params.to(ct)
    A = params[:, 3 * K:3 * K + 1]
    P = x @ ucat if plain else backends.mm(x, ucat)         # (B, D)
    if not plain and _cpp_mix_ok(x, ucat, K):
        from fastdiff import _C

        P, pc = P.contiguous(), params.contiguous()         # (bound: the kernel reads raw pointers)
        q = torch.empty_like(P)
        w = torch.empty(x.shape[0], K, dtype=ct, device=x.device)
        _C.molrg_mix(P.data_ptr(), q.data_ptr(), w.data_ptr(), x.shape[0], _offsets(dims), pc.data_ptr(), pc.shape[0],
                     labels.data_ptr() if labels is not None else 0, hard)
    else:
        g, b, C, gw = params[:, :K], params[:, K:2 * K], params[:, 2 * K:3 * K], params[:, 3 * K + 1:]
        segsum, expand = _segment_ops(dims, x.device)
        logits = b + g * segsum(P * P)
        if hard:
            w = torch.nn.functional.one_hot(logits.argmax(1), K).to(ct)
            w = torch.where(torch.isnan(logits).any(1, keepdim=True), float("nan"), w)  # NaN in, NaN out
        else:
            w = torch.softmax(logits, 1)
        wp = w if labels is None else (1 - gw) * w + gw * torch.nn.functional.one_hot(labels, K).to(ct)
        q = P * expand(wp * C)                              # (B, D)
    if plain:  # differentiable plain torch ops only (see _under_transform)
        out = A * x + q @ ucat.T
    elif params.shape[0] == 1 and params.device.type == "cpu" and not torch.compiler.is_compiling():
        a = float(params[0, 3 * K])  # one A for the batch, read on the host: no sync; skipped when 0
        out = backends.mm(q, ucat.T)
        if a != 0.0:
            out.add_(x, alpha=a)
    elif x.requires_grad or ucat.requires_grad:
        out = A * x + q @ ucat.T
    else:
        out = backends.mm(q, ucat.T).addcmul_(A, x)
    if keep_p:
        return out, w, P
    return out, (w if want_w else None)


def _cpp_mix_ok(x, ucat, K: int) -> bool:
    """The C++ per-row mix applies: float32 CPU tensors autograd is not tracking, eager mode, K <= CPP_MAX_K."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and K <= CPP_MAX_K and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (x.requires_grad or ucat.requires_grad)) and _has_cpp_mix())


def _has_cpp_mix() -> bool:
    return backends.has_kernel("cpp", "molrg_mix", "molrg")


def _offsets(dims) -> List[int]:
    """K + 1 column offsets of the components (the C++ kernels' segmentation)."""
    offsets = [0]
    for d in dims:
        offsets.append(offsets[-1] + d)
    return offsets


class _MoLRGFunction(torch.autograd.Function):
    """Fused forward (C++ / Triton kernel, or the GEMM form) with a hand-derived backward.

    With G = dL/d out, q = P * c[seg], c = w' C, P = Ucat^T x, s = segsum(P^2), l = b + g s:

        dq = G Ucat                      dUcat = G^T q + x^T dP
        dc = segsum(dq * P)              dw = (1 - gw) C dc            (w' = (1 - gw) w + gw onehot)
        dl = w (dw - <w, dw>)  (soft; 0 for hard)
        dP = dq * c[seg] + 2 P * (g dl)[seg]
        dx = A G + dP Ucat^T

    four GEMMs and a few (B, D) / (B, K) elementwise passes, where autograd through the einsum
    form replays a dozen ops with B x K x d intermediates.  The weights w come out detached.
    """

    @staticmethod
    def forward(ctx, x, ucat, params, labels, hard, dims, impl, want_w):
        if impl == "torch":  # the GEMM form computes P anyway: keep it for the backward
            out, w, P = _molrg_torch(x, ucat, dims, params, labels, hard, True, keep_p=True)
        else:                # the fused kernels keep nothing: P is recomputed (one small GEMM)
            # the kernels (forward and backward) read row-major: save the copies they read
            x, ucat = x.contiguous(), ucat.contiguous()
            out, w = _molrg_kernel(impl, x, ucat, dims, params, labels, hard, True)
            P = torch.empty(0)
        ctx.save_for_backward(x, ucat, params, w, labels if labels is not None else torch.empty(0), P)
        ctx.hard, ctx.dims, ctx.has_labels, ctx.impl = hard, dims, labels is not None, impl
        ctx.mark_non_differentiable(w)
        return out, w

    @staticmethod
    def backward(ctx, G, _gw):
        x, ucat, params, w, labels, P = ctx.saved_tensors
        dx, dU = _molrg_backward(ctx.impl, x, ucat, params, w, labels if ctx.has_labels else None, G, ctx.dims,
                                 ctx.hard, P if P.numel() else None)
        return dx, dU, None, None, None, None, None, None


def _molrg_backward(impl, x, ucat, params, w, labels, G, dims, hard, P=None):
    """``(dx, dUcat)``: the fused C++ / Triton backward after a kernel forward, else the GEMM form
    below (the math of :class:`_MoLRGFunction`; P = x Ucat is recomputed when not kept)."""
    if impl == "cpp" and _has_cpp_backward():
        return _molrg_backward_cpp(x, ucat, params, w, labels, G, dims, hard)
    if impl == "triton":
        return _molrg_backward_triton(x, ucat, params, w, labels, G, dims, hard)
    K = len(dims)
    ct = x.dtype
    params = params.to(ct)
    A = params[:, 3 * K:3 * K + 1]
    if P is None:
        P = backends.mm(x, ucat)
    dP = backends.mm(G, ucat)                                # dq = G Ucat, becomes dP
    if _cpp_mix_ok(x, ucat, K) and G.dtype == ct:
        from fastdiff import _C

        P, dP, wc, pc = P.contiguous(), dP.contiguous(), w.to(ct).contiguous(), params.contiguous()
        q = torch.empty_like(P)
        _C.molrg_mix_backward(P.data_ptr(), dP.data_ptr(), wc.data_ptr(), q.data_ptr(), x.shape[0], _offsets(dims),
                              pc.data_ptr(), pc.shape[0], labels.data_ptr() if labels is not None else 0, hard)
    else:
        g, C, gw = params[:, :K], params[:, 2 * K:3 * K], params[:, 3 * K + 1:]
        w = w.to(ct)
        segsum, expand = _segment_ops(dims, x.device)
        wp = w if labels is None else (1 - gw) * w + gw * torch.nn.functional.one_hot(labels, K).to(ct)
        c = expand(wp * C)
        q = P * c
        dq = dP
        dP = dq * c
        if not hard:
            dw = segsum(dq * P) * C * (1 - gw)
            dl = w * (dw - (w * dw).sum(1, keepdim=True))
            dP.addcmul_(P, expand(g * dl), value=2.0)
    dx = backends.mm(dP, ucat.T)
    if params.shape[0] == 1 and params.device.type == "cpu" and not torch.compiler.is_compiling():
        a = float(params[0, 3 * K])     # batch-wide A: one scaled add, none when A = 0 (x0 output, delta = 0)
        if a != 0.0:
            dx.add_(G, alpha=a)
    else:
        dx.add_(A * G)
    dU = G.T @ q
    dU.addmm_(x.T, dP)
    return dx, dU


# --------------------------------------------------------------------------- torch.library ops
# Under torch.compile the fused kernels run as opaque library ops (fake impls give the shapes),
# with the same backward registered on the forward op; eager calls skip this layer.
@torch.library.custom_op("fastdiff::molrg_forward", mutates_args=())
def _molrg_forward_op(x: torch.Tensor, ucat: torch.Tensor, params: torch.Tensor, labels: Optional[torch.Tensor],
                      dims: List[int], hard: bool, impl: str) -> Tuple[torch.Tensor, torch.Tensor]:
    return _molrg_kernel(impl, x.contiguous(), ucat.contiguous(), dims, params, labels, hard, True)


@_molrg_forward_op.register_fake
def _(x, ucat, params, labels, dims, hard, impl):
    return x.new_empty(x.shape), x.new_empty(x.shape[0], len(dims), dtype=torch.float32)


@torch.library.custom_op("fastdiff::molrg_backward", mutates_args=())
def _molrg_backward_op(x: torch.Tensor, ucat: torch.Tensor, params: torch.Tensor, w: torch.Tensor,
                       labels: Optional[torch.Tensor], G: torch.Tensor, dims: List[int], hard: bool,
                       impl: str) -> Tuple[torch.Tensor, torch.Tensor]:
    dx, dU = _molrg_backward(impl, x, ucat, params, w, labels, G.contiguous(), dims, hard)
    return dx.contiguous(), dU.contiguous()  # the fake impl promises row-major outputs


@_molrg_backward_op.register_fake
def _(x, ucat, params, w, labels, G, dims, hard, impl):
    return x.new_empty(x.shape), ucat.new_empty(ucat.shape)


def _molrg_op_setup(ctx, inputs, output):
    x, ucat, params, labels, dims, hard, impl = inputs
    ctx.save_for_backward(x, ucat, params, output[1], labels)
    ctx.dims, ctx.hard, ctx.impl = dims, hard, impl


def _molrg_op_backward(ctx, G, _gw):
    x, ucat, params, w, labels = ctx.saved_tensors
    dx, dU = _molrg_backward_op(x, ucat, params, w, labels, G, ctx.dims, ctx.hard, ctx.impl)
    return dx, dU, None, None, None, None, None


_molrg_forward_op.register_autograd(_molrg_op_backward, setup_context=_molrg_op_setup)


def _has_cpp_backward() -> bool:
    from fastdiff import _C

    return hasattr(_C, "molrg_backward")


def _molrg_backward_cpp(x, ucat, params, w, labels, G, dims, hard):
    """The same backward as :class:`_MoLRGFunction`, fused per row in C++ (float32, CPU)."""
    from fastdiff import _C

    x, ucat, w = x.contiguous(), ucat.contiguous(), w.contiguous()
    G = G.to(torch.float32).contiguous()
    dx = torch.empty_like(x)
    dU = torch.empty_like(ucat)
    p32 = params.to(torch.float32).contiguous()
    offsets = _offsets(dims)
    _C.molrg_backward(x.data_ptr(), G.data_ptr(), w.data_ptr(), dx.data_ptr(), dU.data_ptr(), x.shape[0], x.shape[1],
                      ucat.data_ptr(), offsets, p32.data_ptr(), p32.shape[0],
                      labels.data_ptr() if labels is not None else 0, hard)
    return dx, dU


def _molrg_backward_triton(x, ucat, params, w, labels, G, dims, hard):
    """The same backward, Triton: one fused pass per row block for dx, two library GEMMs for dUcat."""
    from fastdiff.kernels.molrg import molrg_backward

    return molrg_backward(x, G.to(torch.float32).contiguous(), ucat, _segments(dims, x.device), len(dims),
                          params.to(torch.float32).contiguous(), labels, hard, w.contiguous())


def _molrg_inputs(x, bases, mode: str, output: str, labels, guidance, check_orthonormal: bool):
    """The checks every MoLRG entry point shares: ``(x, ucat, dims, labels)`` validated and packed."""
    x = _check_x(x)
    if mode not in ("soft", "hard"):
        raise ValueError(f"mode: expected 'soft' or 'hard', got {mode!r}")
    if output not in OUTPUTS:
        raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")
    ucat, dims = _packed(bases, x.shape[1], check_orthonormal)
    if ucat.device != x.device:
        raise ValueError(f"bases: expected tensors on {x.device} (the device of x), got {ucat.device}")
    return x, ucat, dims, _check_labels(labels, guidance, x.shape[0], len(dims), x.device)


def _check_labels(labels, guidance, B: int, K: int, device) -> Optional[torch.Tensor]:
    """CFG labels as a (B,) int64 tensor on ``device`` (or None), validated against K components;
    guidance must come with labels and only with them.  Values are range-checked on the host only
    (a CUDA or traced check would synchronize)."""
    if labels is None:
        if guidance is not None:
            raise ValueError("guidance: given without labels")
        return None
    labels = torch.as_tensor(labels, device=device)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels: expected integer class labels, got {labels.dtype}")
    labels = labels.reshape(-1).long().contiguous()  # the kernels read it as a flat int64 array
    if labels.numel() != B:
        raise ValueError(f"labels: expected {B} labels (one per sample), got {labels.numel()}")
    if labels.device.type == "cpu" and B and not torch.compiler.is_compiling() and not bool(((labels >= 0) & (labels < K)).all()):
        raise ValueError(f"labels: expected values in [0, {K}) (one per component)")
    if guidance is None:
        raise ValueError("guidance: required with labels (the CFG weight w)")
    return labels


@accepts_arrays
def molrg_denoise(x, bases, alpha, sigma, *, pi=None, tau=None, delta: float = 0.0, mode: str = "soft",
                  labels=None, guidance=None, output: str = "x0", return_weights: bool = False,
                  check_orthonormal: bool = False, backend: str = "auto"):
    """Posterior mean of a mixture of low-rank Gaussians (SPEC 2; module docstring for the formula).

    x: (B, n). bases: (K, n, d) tensor or list of (n, d_k) orthonormal tensors (ragged d_k allowed).
    alpha, sigma: scalars or (B,). pi: (K,) mixing weights summing to 1 (uniform). tau: scalar or
    (K,) component scales (1). delta: isotropic floor (0). mode: "soft" (softmax) or "hard"
    (one-hot argmax, seed 002 eq. 16-17). labels (B,) ints with guidance w: classifier-free
    guidance ``(1 - w) x0_hat + w x0_hat(x | y)`` (seed 004 eq. 7.4.20). output: "x0", "eps" or
    "score". return_weights: also return the posterior responsibilities w (B, K) (before
    guidance).  Differentiable in ``x`` and ``bases``: the fused forward with a hand-derived
    backward (:class:`_MoLRGFunction`); the returned weights are detached.  backend: "auto",
    "torch", "cpp", "triton"; sizes a fused kernel cannot hold (C++: K > 1024; Triton:
    sum d_k > 512 or K > 32) run the GEMM form in torch ops instead, as do calls under
    torch.func transforms (jvp / vjp / vmap) and forward-mode AD.
    """
    x, ucat, dims, labels = _molrg_inputs(x, bases, mode, output, labels, guidance, check_orthonormal)
    B, n = x.shape
    K = len(dims)
    params = molrg_params(alpha, sigma, dims, pi, tau, delta, output, guidance, B, x.device)
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc, uc = x.to(ct), ucat.to(ct)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or ucat.requires_grad)
    impl = dispatch.choose("molrg", backend, x.device, ct, n=n, D=ucat.shape[1], K=K, grad=needs_grad)
    if _under_transform(x, ucat):
        # torch.func (jvp / vjp / vmap, e.g. jacobian_rank(..., method="lanczos")) and forward-mode
        # AD: the fused kernels read raw pointers and _MoLRGFunction has no jvp / vmap rule; the
        # GEMM form in plain torch ops is what these transforms can trace
        out, w = _molrg_torch(xc, uc, dims, params, labels, mode == "hard", return_weights, plain=True)
        out = out.to(x.dtype)
        return (out, w.detach() if w is not None else None) if return_weights else out
    if impl != "torch" and torch.compiler.is_compiling():
        out, w = _molrg_forward_op(xc, uc, params.to(torch.float32), labels, list(dims), mode == "hard", impl)
        out = out.to(x.dtype)
        return (out, w) if return_weights else out
    if needs_grad:
        out, w = _MoLRGFunction.apply(xc, uc, params, labels, mode == "hard", dims, impl, return_weights)
        out = out.to(x.dtype)
        return (out, w) if return_weights else out
    if impl == "torch":
        out, w = _molrg_torch(xc, uc, dims, params, labels, mode == "hard", return_weights)
    else:
        out, w = _molrg_kernel(impl, xc.contiguous(), uc.contiguous(), dims, params, labels, mode == "hard", return_weights)
    out = out.to(x.dtype)
    return (out, w) if return_weights else out


def _molrg_kernel(impl, x, ucat, dims, params, labels, hard, want_w):
    B, n = x.shape
    K = len(dims)
    out = torch.empty_like(x)
    w = torch.empty(B, K, dtype=torch.float32, device=x.device) if want_w else None
    p32 = params.to(torch.float32).contiguous()
    offsets = _offsets(dims)
    if impl == "cpp":
        from fastdiff import _C

        _C.molrg_forward(x.data_ptr(), out.data_ptr(), w.data_ptr() if w is not None else 0, B, n, ucat.data_ptr(),
                         offsets, p32.data_ptr(), p32.shape[0], labels.data_ptr() if labels is not None else 0, hard)
    else:
        from fastdiff.kernels.molrg import molrg_forward

        molrg_forward(x, ucat, _segments(dims, x.device), K, p32, labels, hard, out, w)
    return out, w


def _segments(dims, device) -> torch.Tensor:
    """(D,) int32 component index of each column of Ucat (the Triton kernels' segmentation)."""
    return torch.repeat_interleave(torch.arange(len(dims), device=device, dtype=torch.int32),
                                   torch.tensor(dims, device=device))


# =========================================================================== Gaussian
def _check_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and t.device.type == "cpu" and not torch.compiler.is_compiling() \
            and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: expected finite values (got NaN or Inf)")


def psd_eigenvalues(lam: torch.Tensor, dtype=torch.float64, name: str = "cov") -> torch.Tensor:
    """The eigenvalues of a covariance, clamped at 0, after checking it is positive semi-definite
    to rounding: a low-rank covariance formed in ``dtype`` has eigenvalues down to about
    ``-n eps lambda_max`` (float32: ~-7e-8 at unit scale), which are zeros; anything below
    ``-max(1e-10, 4 n eps) lambda_max`` is a genuinely indefinite matrix and is rejected."""
    if lam.numel() == 0:
        return lam
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float64).eps
    top = float(lam.max().clamp(min=0))
    tol = max(1e-10, 4 * lam.numel() * eps) * top
    low = float(lam.min())
    if low < -tol:
        raise ValueError(f"{name}: expected a positive semi-definite matrix, got eigenvalue {low:.3g} "
                         f"(below the rounding tolerance -{tol:.3g} = -max(1e-10, 4 n eps) lambda_max)")
    return lam.clamp(min=0)


@accepts_arrays
def gaussian_denoise(x, mean, cov=None, alpha=1.0, sigma=1.0, *, eig=None, output: str = "x0"):
    """Posterior mean for Gaussian data ``N(mean, cov)`` (seed 001, seed 004 Ex. 7.4)::

        x0_hat = mean + alpha cov (alpha^2 cov + sigma^2 I)^{-1} (x - alpha mean)

    computed in the eigenbasis ``cov = V diag(l) V^T`` (pass ``eig=(l, V)`` to reuse one):
    ``x0_hat = mean + V diag(alpha l / (alpha^2 l + sigma^2)) V^T (x - alpha mean)``.
    """
    x = _check_x(x)
    if output not in OUTPUTS:
        raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")
    B, n = x.shape
    mean = torch.as_tensor(check_real("mean", mean), device=x.device)
    _check_finite("mean", mean)
    mean = mean.to(x.dtype).reshape(-1)
    if mean.numel() != n:
        raise ValueError(f"mean: expected {n} entries (x has n = {n}), got {mean.numel()}")
    if eig is None:
        if cov is None:
            raise ValueError("cov: required unless eig=(eigenvalues, eigenvectors) is given")
        cov = torch.as_tensor(check_real("cov", cov), device=x.device)
        _check_finite("cov", cov)
        cov_dtype, cov = cov.dtype, cov.to(torch.float64)
        if cov.shape != (n, n):
            raise ValueError(f"cov: expected shape ({n}, {n}), got {tuple(cov.shape)}")
        if not torch.allclose(cov, cov.T, rtol=1e-6, atol=1e-8 * float(cov.abs().max())):
            raise ValueError("cov: expected a symmetric matrix")
        lam, V = torch.linalg.eigh(cov)
    else:
        lam, V = (torch.as_tensor(check_real(f"eig[{i}]", t), device=x.device) for i, t in enumerate(eig))
        _check_finite("eig", lam), _check_finite("eig", V)
        cov_dtype, lam, V = lam.dtype, lam.to(torch.float64), V.to(torch.float64)
    lam = psd_eigenvalues(lam, cov_dtype)
    a = _per_sample("alpha", alpha, B, x.device)[:, None]
    s = _per_sample("sigma", sigma, B, x.device)[:, None]
    gain = (a * lam / (a * a * lam + s * s)).to(x.dtype)          # (R, n)
    Vx = V.to(x.dtype)
    a_x = a.to(x.dtype)
    y = ((x - a_x * mean) @ Vx) * gain
    x0 = mean + y @ Vx.T
    if output == "x0":
        return x0
    s_x = s.to(x.dtype)
    eps = (x - a_x * x0) / s_x
    return eps if output == "eps" else -eps / s_x


# =========================================================================== empirical
def _chunk(B, N, n, chunk):
    if chunk is not None:
        if chunk < 1:
            raise ValueError(f"chunk: expected a positive int, got {chunk}")
        return int(chunk)
    # keep the (B, chunk) block no larger than the inputs themselves: memory O((B + N) n)
    return int(min(N, max(1024, min(16384, (B + N) * n // max(B, 1)))))


@accepts_arrays
def empirical_denoise(x, data, alpha, sigma, *, output: str = "x0", chunk: Optional[int] = None):
    """Optimal denoiser of the empirical distribution of ``data`` (N, n) (it reproduces training points)::

        x0_hat = sum_i softmax_i( -||x - alpha y_i||^2 / (2 sigma^2) ) y_i

    Streamed over chunks of ``data`` with an online softmax (FlashAttention's recurrence): no
    (B, N) matrix is ever held, memory is O((B + N) n); each chunk is two GEMMs.
    """
    x = _check_x(x)
    if output not in OUTPUTS:
        raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")
    if not isinstance(data, torch.Tensor) or data.ndim != 2:
        raise ValueError(f"data: expected an (N, n) tensor, got {getattr(data, 'shape', type(data).__name__)}")
    check_real("data", data)
    B, n = x.shape
    N = data.shape[0]
    if data.shape[1] != n:
        raise ValueError(f"data: expected n = {n} columns (x has shape (B, {n})), got {data.shape[1]}")
    if N < 1:
        raise ValueError("data: expected at least one training point")
    if data.device != x.device:
        raise ValueError(f"data: expected a tensor on {x.device} (the device of x), got {data.device}")
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc, yc = x.to(ct), data.to(ct)
    a = _per_sample("alpha", alpha, B, x.device).to(ct)[:, None]
    s = _per_sample("sigma", sigma, B, x.device).to(ct)[:, None]
    # logit_i = (alpha x.y_i - alpha^2 ||y_i||^2 / 2) / sigma^2  (the ||x||^2 term cancels in the softmax)
    xs = xc * (a / (s * s))
    bias = (a * a / (2 * s * s))                         # (R, 1), times ||y||^2 per column
    ysq = (yc * yc).sum(1)
    m = torch.full((B, 1), -math.inf, dtype=ct, device=x.device)
    l = torch.zeros(B, 1, dtype=ct, device=x.device)
    acc = torch.zeros(B, n, dtype=ct, device=x.device)
    step = _chunk(B, N, n, chunk)
    for j in range(0, N, step):
        Y = yc[j:j + step]
        S = backends.mm(xs, Y.T)                         # (B, c)
        S.sub_(bias * ysq[j:j + step])
        m_new = torch.maximum(m, S.amax(1, keepdim=True))
        scale = torch.exp(m - m_new)                     # exp(-inf) = 0 on the first chunk
        S.sub_(m_new).exp_()
        l.mul_(scale).add_(S.sum(1, keepdim=True))
        acc.mul_(scale).add_(backends.mm(S, Y))
        m = m_new
    x0 = (acc / l).to(x.dtype)
    if output == "x0":
        return x0
    eps = (x - a.to(x.dtype) * x0) / s.to(x.dtype)
    return eps if output == "eps" else -eps / s.to(x.dtype)


@accepts_arrays
def nearest_neighbors(x, data, k: int = 2, *, chunk: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Distances (B, k) and indices (B, k) of the ``k`` nearest rows of ``data`` (N, n), nearest first.

    Exact (the float64 brute force's answer, up to ties).  Candidates come from chunked GEMM
    scores ``a_i = ||y_i||^2 - 2 x.y_i`` in the compute dtype (memory O((B + N) n)) on x and data
    centred on the data mean (far from the origin the expansion cancels: at |y| ~ 1e4 with spread
    1, float32 scores cannot tell neighbours apart); the ``2k + 2`` best per row are re-ranked with
    exact float64 distances.  A row is accepted when its k-th exact score is below the worst kept
    candidate score minus the rounding bound ``E = 2 (n + 4) eps (max||y||^2 + 2 ||x|| max||y||)``
    of any score; the rows that fail that test (rare: a tie band wider than the candidate set)
    are recomputed by a float64 brute force.
    """
    x = _check_x(x)
    if not isinstance(data, torch.Tensor) or data.ndim != 2 or data.shape[1] != x.shape[1]:
        raise ValueError(f"data: expected an (N, {x.shape[1]}) tensor, got {getattr(data, 'shape', type(data).__name__)}")
    check_real("data", data)
    if data.device != x.device:
        raise ValueError(f"data: expected a tensor on {x.device} (the device of x), got {data.device}")
    N = data.shape[0]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= N:  # np.int64 is an int too
        raise ValueError(f"k: expected an int in [1, N = {N}], got {k!r}")
    k = int(k)
    B, n = x.shape
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    y64 = data.double()
    fin = torch.isfinite(y64).all(1)  # a NaN / Inf training row must not move the centre of the others
    center = y64[fin].mean(0) if bool(fin.any()) else torch.zeros(n, dtype=torch.float64, device=x.device)
    x64, y64 = x.double() - center, y64 - center   # exact re-rank coordinates
    xc, yc = x64.to(ct), y64.to(ct)
    ysq = (yc * yc).sum(1)
    best_d = torch.full((B, 0), math.inf, dtype=ct, device=x.device)
    best_i = torch.zeros(B, 0, dtype=torch.long, device=x.device)
    kc = min(N, 2 * k + 2)  # spare candidates: the GEMM scores are re-ranked exactly below
    step = _chunk(B, N, n, chunk)
    for j in range(0, N, step):
        d2 = torch.addmm(ysq[j:j + step][None, :], xc, yc[j:j + step].T, alpha=-2.0)  # ||y||^2 - 2 x.y
        v, i = torch.topk(d2, min(kc, d2.shape[1]), dim=1, largest=False)
        best_d = torch.cat([best_d, v], 1)
        best_i = torch.cat([best_i, i + j], 1)
        if best_d.shape[1] > kc:
            best_d, sel = torch.topk(best_d, kc, dim=1, largest=False)
            best_i = best_i.gather(1, sel)
    exact = ((x64[:, None, :] - y64[best_i]) ** 2).sum(-1)  # (B, kc) exact squared distances
    d2k, order = torch.topk(exact, k, dim=1, largest=False)
    idx = best_i.gather(1, order)
    if kc < N:
        # every row left out has score >= T (the worst kept one), so true score >= T - E: the
        # k-th exact one (minus ||x||^2, the term the scores drop) below that cannot be beaten
        eps = torch.finfo(ct).eps
        ymax = y64.norm(dim=1)[fin].max() if bool(fin.any()) else torch.zeros((), dtype=torch.float64, device=x.device)
        xn = x64.norm(dim=1)
        E = 2 * (n + 4) * eps * (ymax * ymax + 2 * xn * ymax)
        T = best_d.double().amax(1)
        ok = d2k[:, -1] - xn * xn < T - E
        redo = (~ok & torch.isfinite(x64).all(1)).nonzero().reshape(-1)
        if redo.numel():
            d2k, idx = d2k.clone(), idx.clone()
            rd, ri = _nearest_brute64(x64[redo], y64, k, step)
            d2k[redo], idx[redo] = rd, ri
    return d2k.sqrt().to(x.dtype), idx


def _nearest_brute64(x64, y64, k, step):
    """(squared distances, indices) (b, k) of the k nearest rows, float64, chunked over the data."""
    best_d = torch.full((x64.shape[0], 0), math.inf, dtype=torch.float64, device=x64.device)
    best_i = torch.zeros(x64.shape[0], 0, dtype=torch.long, device=x64.device)
    for j in range(0, y64.shape[0], step):
        d2 = ((x64[:, None, :] - y64[None, j:j + step]) ** 2).sum(-1) if x64.shape[0] * step * x64.shape[1] <= 1 << 24 \
            else torch.cdist(x64, y64[j:j + step]) ** 2
        v, i = torch.topk(d2, min(k, d2.shape[1]), dim=1, largest=False)
        best_d, best_i = torch.cat([best_d, v], 1), torch.cat([best_i, i + j], 1)
        best_d, sel = torch.topk(best_d, min(k, best_d.shape[1]), dim=1, largest=False)
        best_i = best_i.gather(1, sel)
    return best_d, best_i
