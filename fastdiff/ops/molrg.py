"""The MoLRG posterior mean ``x0_hat = E[x0 | x_t]`` of a mixture of low-rank Gaussians, its CFG
form and its backward (seed 002 eq. 8, seed 004 eq. 7.4.20; docs/math.md section 2).

The contract.  Inputs (validated by :func:`fastdiff.denoisers.molrg.molrg_denoise`, which also
computes ``params`` and chooses ``impl``):

- ``x`` (B, n) float32 or float64 (float64: the torch form only), ``ucat`` (n, D) in x's dtype:
  the bases side by side, ``ucat = [U_1 | ... | U_K]``, component k owning ``dims[k]`` columns;
- ``params`` (R, 3K + 2) float64 (or float32), R in {1, B}, rows ``[g_k | b_k | C_k | A | gw]``:
  every per-sample scalar of the formula, from :func:`fastdiff.denoisers.molrg.molrg_params`;
- ``labels`` (B,) int64 in [0, K) or None; ``hard``: one-hot argmax weights instead of the softmax.

Per row, with ``P = x Ucat`` (the projections ``U_k^T x`` side by side)::

    l_k  = b_k + g_k ||P_k||^2                     logits
    w    = softmax_k(l)  |  onehot(argmax_k l)     posterior responsibilities (:func:`posterior`)
    w'   = (1 - gw) w + gw onehot(label)           CFG (:func:`guided`)
    out  = A x + sum_k w'_k C_k U_k P_k = A x + q Ucat^T,   q_j = w'_{k(j)} C_{k(j)} P_j

Outputs: ``out`` (B, n) in x's dtype and ``w`` (B, K) before guidance (float32 from the kernels,
x's dtype from the torch form).  Gradients flow to ``x`` and ``ucat`` (:class:`MoLRGFunction`).

The forms: :func:`forward_torch` (two library GEMMs with the per-row mix between them, in C++ for
float32 CPU tensors, else torch ops), the fused kernels (``kernels/cpp.py`` ``molrg_forward`` /
``molrg_backward``, ``kernels/molrg.py`` on CUDA), and ``fastdiff::molrg_forward`` /
``fastdiff::molrg_backward``, torch.library ops for torch.compile (registered on import).
:func:`forward` is the one entry point, given a concrete backend.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch.autograd import forward_ad

from fastdiff import backends
from fastdiff.ops.table import ALL, ANY_DTYPE, CPU, CUDA, Impl, Op

__all__ = ["ROW", "CPP_FUSED_MAX_ND", "CPP_FUSED_MAX_ND_GRAD", "CPP_MAX_K", "forward", "forward_torch", "backward",
           "posterior", "guided", "MoLRGFunction", "segment_ops", "offsets", "segments", "has_cpp_mix"]

# fused per-row C++ MoLRG kernels up to this many multiply-adds per row (n * D); torch GEMMs above
# (bench/test_bench_crossovers.py measures the crossover across both thresholds)
CPP_FUSED_MAX_ND = 1 << 15
CPP_FUSED_MAX_ND_GRAD = 1 << 13
# the C++ MoLRG kernels keep per-row logits in fixed stack buffers
CPP_MAX_K = 1024


def _cpp_fits(K: int = 1, **_) -> Tuple[bool, str]:
    if K > CPP_MAX_K:
        return False, f"the C++ MoLRG kernels take K <= {CPP_MAX_K} components, got {K}"
    return True, ""


def _cpp_prefer(n: int = 0, D: int = 0, grad: bool = False, **_) -> Tuple[bool, str]:
    limit = CPP_FUSED_MAX_ND_GRAD if grad else CPP_FUSED_MAX_ND
    if n * D > limit:
        return False, f"n * sum d_k = {n * D} > {limit}: the GEMM form is faster"
    return True, ""


def _triton_fits(D: int = 0, K: int = 1, **_) -> Tuple[bool, str]:
    from fastdiff.kernels.molrg import MAX_D, MAX_K

    if D > MAX_D or K > MAX_K:
        return False, f"the Triton MoLRG kernel takes sum d_k <= {MAX_D} and K <= {MAX_K}, got {D}, {K}"
    return True, ""


# forced float64 and oversized problems run the GEMM form in torch ops (the call still works)
ROW = Op("molrg", what="MoLRG", soft=("dtype", "fits"), impls=(
    Impl("triton", CUDA, triton_module="molrg", fits=_triton_fits, limit="sum d_k <= 512, K <= 32"),
    Impl("cpp", CPU, cpp_symbol="molrg_forward", fits=_cpp_fits, prefer=_cpp_prefer,
         limit=f"K <= {CPP_MAX_K}; auto: n*sum d_k <= {CPP_FUSED_MAX_ND} ({CPP_FUSED_MAX_ND_GRAD} with grad)"),
    Impl("torch", ALL, ANY_DTYPE, limit="GEMM form, any size")),
    auto={"cuda": ("triton",), "cpu": ("cpp",)})


# =========================================================================== segmentation of Ucat
_SEG_CACHE: dict = {}


def segment_ops(dims, device):
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


def offsets(dims) -> List[int]:
    """K + 1 column offsets of the components (the C++ kernels' segmentation)."""
    out = [0]
    for d in dims:
        out.append(out[-1] + d)
    return out


def segments(dims, device) -> torch.Tensor:
    """(D,) int32 component index of each column of Ucat (the Triton kernels' segmentation)."""
    return torch.repeat_interleave(torch.arange(len(dims), device=device, dtype=torch.int32),
                                   torch.tensor(dims, device=device))


# =========================================================================== the posterior
def posterior(P: torch.Tensor, params: torch.Tensor, dims, hard: bool,
              labels: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(w, w')`` (B, K) in P's dtype from the projections ``P = x Ucat`` (B, D): the one torch
    computation of the MoLRG posterior (the torch forward and :mod:`fastdiff.linalg`'s closed-form
    Jacobians call it; the kernels compute the same in their registers)::

        l = b + g segsum(P^2),   w = softmax(l)  (hard: onehot(argmax l), ties -> lowest k),
        w' = (1 - gw) w + gw onehot(label)

    ``params`` (R, 3K + 2) in P's dtype.  A row with a NaN logit gets NaN weights in hard mode
    too (an argmax of NaNs would be a finite one-hot)."""
    K = len(dims)
    g, b = params[:, :K], params[:, K:2 * K]
    segsum, _ = segment_ops(dims, P.device)
    logits = b + g * segsum(P * P)
    if hard:
        w = torch.nn.functional.one_hot(logits.argmax(1), K).to(P.dtype)
        w = torch.where(torch.isnan(logits).any(1, keepdim=True), float("nan"), w)  # NaN in, NaN out
    else:
        w = torch.softmax(logits, 1)
    return w, guided(w, params, labels)


def guided(w: torch.Tensor, params: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
    """The CFG weights ``w' = (1 - gw) w + gw onehot(label)`` (seed 004 eq. 7.4.20); w without labels."""
    if labels is None:
        return w
    gw = params[:, -1:]
    return (1 - gw) * w + gw * torch.nn.functional.one_hot(labels, w.shape[1]).to(w.dtype)


# =========================================================================== the op
def under_transform(*ts) -> bool:
    """Some tensor is a functorch wrapper (inside torch.func.vjp / jvp / vmap / grad) or carries a
    forward-mode tangent (torch.autograd.forward_ad)."""
    if torch.compiler.is_compiling():
        return False
    if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in ts):
        return True
    return forward_ad._current_level >= 0 and any(forward_ad.unpack_dual(t).tangent is not None for t in ts)


def forward(impl: str, x, ucat, dims, params, labels, hard: bool, want_w: bool):
    """``(out, w or None)`` (contract above) on backend ``impl`` ("torch", "cpp", "triton").

    Under torch.func transforms (jvp / vjp / vmap, e.g. ``jacobian_rank(..., method="lanczos")``)
    and forward-mode AD the GEMM form runs in plain torch ops, whatever ``impl``: the fused kernels
    read raw pointers and :class:`MoLRGFunction` has no jvp / vmap rule.  Traced by torch.compile,
    a kernel runs as the ``fastdiff::molrg_forward`` library op; with autograd tracking x or ucat,
    through :class:`MoLRGFunction` (w always computed there)."""
    if under_transform(x, ucat):
        out, w = forward_torch(x, ucat, dims, params, labels, hard, want_w, plain=True)
        return out, (w.detach() if w is not None else None)
    if impl != "torch" and torch.compiler.is_compiling():
        return _molrg_forward_op(x, ucat, params.to(torch.float32), labels, list(dims), hard, impl)
    if torch.is_grad_enabled() and (x.requires_grad or ucat.requires_grad):
        return MoLRGFunction.apply(x, ucat, params, labels, hard, dims, impl, want_w)
    if impl == "torch":
        return forward_torch(x, ucat, dims, params, labels, hard, want_w)
    return _forward_kernel(impl, x.contiguous(), ucat.contiguous(), dims, params, labels, hard, want_w)


def forward_torch(x, ucat, dims, params, labels, hard, want_w, keep_p=False, plain=False):
    """GEMM formulation (the large-size and autograd path): P = x Ucat and out = A x + q Ucat^T on
    the library GEMM (:func:`fastdiff.backends.mm`), the per-row mix between them fused in C++
    (float32 CPU) or as torch ops (differentiable in x and Ucat; float64, CUDA, traced code).
    ``plain``: plain differentiable torch ops only (see :func:`under_transform`).  Returns
    ``(out, w or None)``, or ``(out, w, P)`` with ``keep_p``."""
    K = len(dims)
    ct = x.dtype
    params = params.to(ct)
    A = params[:, 3 * K:3 * K + 1]
    P = x @ ucat if plain else backends.mm(x, ucat)         # (B, D)
    if not plain and _cpp_mix_ok(x, ucat, K):
        from fastdiff.kernels import cpp

        P, pc = P.contiguous(), params.contiguous()         # (bound: the kernel reads raw pointers)
        q = torch.empty_like(P)
        w = torch.empty(x.shape[0], K, dtype=ct, device=x.device)
        cpp.molrg_mix(P, offsets(dims), pc, labels, hard, q, w)
    else:
        w, wp = posterior(P, params, dims, hard, labels)
        _, expand = segment_ops(dims, x.device)
        q = P * expand(wp * params[:, 2 * K:3 * K])         # (B, D)
    if plain:
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
            and not (torch.is_grad_enabled() and (x.requires_grad or ucat.requires_grad)) and has_cpp_mix())


def has_cpp_mix() -> bool:
    return backends.has_kernel("cpp", "molrg_mix", "molrg")


def _forward_kernel(impl, x, ucat, dims, params, labels, hard, want_w):
    """The fused forward kernel ("cpp" or "triton"); x, ucat row-major float32."""
    B, n = x.shape
    K = len(dims)
    out = torch.empty_like(x)
    w = torch.empty(B, K, dtype=torch.float32, device=x.device) if want_w else None
    p32 = params.to(torch.float32).contiguous()
    if impl == "cpp":
        from fastdiff.kernels import cpp

        cpp.molrg_forward(x, ucat, offsets(dims), p32, labels, hard, out, w)
    else:
        from fastdiff.kernels.molrg import molrg_forward

        molrg_forward(x, ucat, segments(dims, x.device), K, p32, labels, hard, out, w)
    return out, w


# =========================================================================== the backward
class MoLRGFunction(torch.autograd.Function):
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
            out, w, P = forward_torch(x, ucat, dims, params, labels, hard, True, keep_p=True)
        else:                # the fused kernels keep nothing: P is recomputed (one small GEMM)
            # the kernels (forward and backward) read row-major: save the copies they read
            x, ucat = x.contiguous(), ucat.contiguous()
            out, w = _forward_kernel(impl, x, ucat, dims, params, labels, hard, True)
            P = torch.empty(0)
        ctx.save_for_backward(x, ucat, params, w, labels if labels is not None else torch.empty(0), P)
        ctx.hard, ctx.dims, ctx.has_labels, ctx.impl = hard, dims, labels is not None, impl
        ctx.mark_non_differentiable(w)
        return out, w

    @staticmethod
    def backward(ctx, G, _gw):
        x, ucat, params, w, labels, P = ctx.saved_tensors
        dx, dU = backward(ctx.impl, x, ucat, params, w, labels if ctx.has_labels else None, G, ctx.dims,
                          ctx.hard, P if P.numel() else None)
        return dx, dU, None, None, None, None, None, None


def backward(impl, x, ucat, params, w, labels, G, dims, hard, P=None):
    """``(dx, dUcat)``: the fused C++ / Triton backward after a kernel forward, else the GEMM form
    below (the math of :class:`MoLRGFunction`; P = x Ucat is recomputed when not kept)."""
    if impl == "cpp" and backends.has_kernel("cpp", "molrg_backward", "molrg"):
        return _backward_cpp(x, ucat, params, w, labels, G, dims, hard)
    if impl == "triton":
        return _backward_triton(x, ucat, params, w, labels, G, dims, hard)
    K = len(dims)
    ct = x.dtype
    params = params.to(ct)
    A = params[:, 3 * K:3 * K + 1]
    if P is None:
        P = backends.mm(x, ucat)
    dP = backends.mm(G, ucat)                                # dq = G Ucat, becomes dP
    if _cpp_mix_ok(x, ucat, K) and G.dtype == ct:
        from fastdiff.kernels import cpp

        P, dP, wc, pc = P.contiguous(), dP.contiguous(), w.to(ct).contiguous(), params.contiguous()
        q = torch.empty_like(P)
        cpp.molrg_mix_backward(P, dP, wc, offsets(dims), pc, labels, hard, q)
    else:
        g, C, gw = params[:, :K], params[:, 2 * K:3 * K], params[:, 3 * K + 1:]
        w = w.to(ct)
        segsum, expand = segment_ops(dims, x.device)
        c = expand(guided(w, params, labels) * C)
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


def _backward_cpp(x, ucat, params, w, labels, G, dims, hard):
    """The same backward as :class:`MoLRGFunction`, fused per row in C++ (float32, CPU)."""
    from fastdiff.kernels import cpp

    x, ucat, w = x.contiguous(), ucat.contiguous(), w.contiguous()
    G = G.to(torch.float32).contiguous()
    dx = torch.empty_like(x)
    dU = torch.empty_like(ucat)
    cpp.molrg_backward(x, G, w, ucat, offsets(dims), params.to(torch.float32).contiguous(), labels, hard, dx, dU)
    return dx, dU


def _backward_triton(x, ucat, params, w, labels, G, dims, hard):
    """The same backward, Triton: one fused pass per row block for dx, two library GEMMs for dUcat."""
    from fastdiff.kernels.molrg import molrg_backward

    return molrg_backward(x, G.to(torch.float32).contiguous(), ucat, segments(dims, x.device), len(dims),
                          params.to(torch.float32).contiguous(), labels, hard, w.contiguous())


# =========================================================================== torch.library ops
# Under torch.compile the fused kernels run as opaque library ops (fake impls give the shapes),
# with the same backward registered on the forward op; eager calls skip this layer.
@torch.library.custom_op("fastdiff::molrg_forward", mutates_args=())
def _molrg_forward_op(x: torch.Tensor, ucat: torch.Tensor, params: torch.Tensor, labels: Optional[torch.Tensor],
                      dims: List[int], hard: bool, impl: str) -> Tuple[torch.Tensor, torch.Tensor]:
    return _forward_kernel(impl, x.contiguous(), ucat.contiguous(), dims, params, labels, hard, True)


@_molrg_forward_op.register_fake
def _(x, ucat, params, labels, dims, hard, impl):
    return x.new_empty(x.shape), x.new_empty(x.shape[0], len(dims), dtype=torch.float32)


@torch.library.custom_op("fastdiff::molrg_backward", mutates_args=())
def _molrg_backward_op(x: torch.Tensor, ucat: torch.Tensor, params: torch.Tensor, w: torch.Tensor,
                       labels: Optional[torch.Tensor], G: torch.Tensor, dims: List[int], hard: bool,
                       impl: str) -> Tuple[torch.Tensor, torch.Tensor]:
    dx, dU = backward(impl, x, ucat, params, w, labels, G.contiguous(), dims, hard)
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
