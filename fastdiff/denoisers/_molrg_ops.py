"""The MoLRG kernels' glue: the GEMM form in torch ops, the C++ / Triton launches, the
hand-derived backward (:class:`_MoLRGFunction`) and the ``fastdiff::molrg_forward`` /
``fastdiff::molrg_backward`` torch.library ops (registered once, on import), all on the packed
``(R, 3K + 2)`` parameter table of :mod:`fastdiff.denoisers.molrg`."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch.autograd import forward_ad

from fastdiff import backends
# the C++ kernels keep per-row logits in fixed stack buffers: K above this runs the GEMM form
from fastdiff.ops.molrg import CPP_MAX_K


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
