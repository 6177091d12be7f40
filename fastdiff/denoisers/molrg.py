"""The MoLRG denoiser (docs/math.md section 2): the softmax projection onto a mixture of low-rank Gaussians.

It returns the posterior mean ``x0_hat = E[x_0 | x_t]`` of ``x_t = alpha x_0 + sigma eps`` (or its
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
from typing import List, Optional

import torch

from fastdiff import dispatch
from fastdiff._interop import accepts_arrays
from fastdiff._args import OUTPUTS, _check_x, _per_sample, _torch_generator
from fastdiff.denoisers._cache import _packed, pack_bases
from fastdiff.ops import molrg as molrg_op

__all__ = ["molrg_denoise", "molrg_params", "pack_bases", "MoLRG"]


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


def _checked_mixture(K: int, pi, tau, delta):
    """``(pi, tau)`` as K Python floats each (defaults: uniform, 1), with ``pi``, ``tau`` and ``delta``
    checked: the validation of the scalar path, which :class:`MoLRG` runs once on construction."""
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
    return pis, taus


def _molrg_params_scalar(a, s, dims, pi, tau, delta, output, gw):
    """The (1, 3K+2) table from Python floats: K scalar expressions on the host, where the same
    expressions as tensor ops would be dozens of tiny op launches."""
    K = len(dims)
    for name, v in (("alpha", a), ("sigma", s)):
        if not math.isfinite(v):
            raise ValueError(f"{name}: expected finite values, got {v}")
        if v <= 0:
            raise ValueError(f"{name}: expected {name} > 0, got {v}")
    pis, taus = _checked_mixture(K, pi, tau, delta)
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


def _molrg_inputs(x, bases, mode: str, output: str, labels, guidance, check_orthonormal: bool):
    """The checks every MoLRG entry point shares: ``(x, ucat, dims, labels)`` validated and packed."""
    x = _check_options(x, mode, output)
    ucat, dims = _packed(bases, x.shape[1], check_orthonormal)
    return x, ucat, dims, _check_bound(x, ucat, dims, labels, guidance)


def _check_options(x, mode: str, output: str) -> torch.Tensor:
    x = _check_x(x)
    if mode not in ("soft", "hard"):
        raise ValueError(f"mode: expected 'soft' or 'hard', got {mode!r}")
    if output not in OUTPUTS:
        raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")
    return x


def _check_bound(x, ucat, dims, labels, guidance) -> Optional[torch.Tensor]:
    """The packed bases on x's device; the CFG labels checked against them."""
    if ucat.device != x.device:
        raise ValueError(f"bases: expected tensors on {x.device} (the device of x), got {ucat.device}")
    return _check_labels(labels, guidance, x.shape[0], len(dims), x.device)


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
    """Posterior mean of a mixture of low-rank Gaussians (docs/math.md section 2; module docstring for the formula).

    x: (B, n). bases: (K, n, d) tensor or list of (n, d_k) orthonormal tensors (ragged d_k allowed).
    alpha, sigma: scalars or (B,). pi: (K,) mixing weights summing to 1 (uniform). tau: scalar or
    (K,) component scales (1). delta: isotropic floor (0). mode: "soft" (softmax) or "hard"
    (one-hot argmax, seed 002 eq. 16-17). labels (B,) ints with guidance w: classifier-free
    guidance ``(1 - w) x0_hat + w x0_hat(x | y)`` (seed 004 eq. 7.4.20). output: "x0", "eps" or
    "score". return_weights: also return the posterior responsibilities w (B, K) (before
    guidance).  Differentiable in ``x`` and ``bases``: the fused forward with a hand-derived
    backward (:class:`fastdiff.ops.molrg.MoLRGFunction`); the returned weights are detached.  backend: "auto",
    "torch", "cpp", "triton"; sizes a fused kernel cannot hold (C++: K > 1024; Triton:
    sum d_k > 512 or K > 32) run the GEMM form in torch ops instead, as do calls under
    torch.func transforms (jvp / vjp / vmap) and forward-mode AD.
    """
    x, ucat, dims, labels = _molrg_inputs(x, bases, mode, output, labels, guidance, check_orthonormal)
    params = molrg_params(alpha, sigma, dims, pi, tau, delta, output, guidance, x.shape[0], x.device)
    return _denoise(x, ucat, dims, params, labels, mode, return_weights, backend)


@accepts_arrays
def _model_denoise(x, model: "MoLRG", alpha, sigma, *, mode: str, labels, guidance, output: str,
                   return_weights: bool, check_orthonormal: bool, backend: str):
    """:meth:`MoLRG.__call__`: :func:`molrg_denoise` on the model's packed bases and checked pi, tau,
    delta (nothing re-packed; the same checks of everything else, with the same messages)."""
    x = _check_options(x, mode, output)
    if x.shape[1] != model.n:
        raise ValueError(f"bases: expected n = {x.shape[1]} rows (x has shape (B, {x.shape[1]})), got {model.n}")
    if check_orthonormal:
        pack_bases(model.bases, check_orthonormal=True)
    labels = _check_bound(x, model.ucat, model.dims, labels, guidance)
    params = molrg_params(alpha, sigma, model.dims, model.pi, model.tau, model.delta, output, guidance, x.shape[0],
                          x.device)
    return _denoise(x, model.ucat, model.dims, params, labels, mode, return_weights, backend)


def _denoise(x, ucat, dims, params, labels, mode: str, return_weights: bool, backend: str):
    """The backend chosen and the op run on validated, packed inputs; ``out`` in x's dtype (and w)."""
    B, n = x.shape
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or ucat.requires_grad)
    impl = dispatch.choose("molrg", backend, x.device, ct, n=n, D=ucat.shape[1], K=len(dims), grad=needs_grad)
    out, w = molrg_op.forward(impl, x.to(ct), ucat.to(ct), dims, params, labels, mode == "hard", return_weights)
    out = out.to(x.dtype)
    return (out, w) if return_weights else out


class MoLRG:
    """Mixture of low-rank Gaussians (docs/math.md section 2): component k (probability ``pi_k``) is
    ``x_0 = U_k a + delta g``, ``a ~ N(0, tau_k^2 I_{d_k})``, ``g ~ N(0, I_n)``.

    ``bases``: (K, n, d) tensor or list of (n, d_k) orthonormal tensors.  ``mode``: the
    denoiser's weights, "soft" (posterior softmax) or "hard" (argmax), used by every call.
    """

    def __init__(self, bases, pi=None, tau=None, delta: float = 0.0, *, mode: str = "soft",
                 check_orthonormal: bool = True):
        if mode not in ("soft", "hard"):
            raise ValueError(f"mode: expected 'soft' or 'hard', got {mode!r}")
        self.mode = mode
        self.ucat, self.dims = pack_bases(bases, check_orthonormal=check_orthonormal)
        self.bases = list(torch.split(self.ucat, self.dims, dim=1))
        self.K, self.n = len(self.dims), self.ucat.shape[0]
        self.pi = (torch.full((self.K,), 1.0 / self.K, dtype=torch.float64) if pi is None
                   else torch.as_tensor(pi, dtype=torch.float64).reshape(-1))
        self.tau = (torch.ones(self.K, dtype=torch.float64) if tau is None
                    else torch.as_tensor(tau, dtype=torch.float64).reshape(-1).expand(self.K).clone())
        self.delta = float(delta)
        # validated once, with the same messages as molrg_denoise; every call uses ucat, dims, pi,
        # tau and delta as they are (no re-packing)
        _checked_mixture(self.K, self.pi, self.tau, self.delta)

    def __call__(self, x, alpha, sigma, *, mode: Optional[str] = None, labels=None, guidance=None,
                 output: str = "x0", return_weights: bool = False, check_orthonormal: bool = False,
                 backend: str = "auto"):
        """:func:`molrg_denoise` with this model's bases, pi, tau, delta (and mode, unless given)."""
        return _model_denoise(x, self, alpha, sigma, mode=self.mode if mode is None else mode, labels=labels,
                              guidance=guidance, output=output, return_weights=return_weights,
                              check_orthonormal=check_orthonormal, backend=backend)

    def sample(self, N: int, generator=None, *, return_labels: bool = False):
        """``N`` draws of x_0 (N, n) (and their components (N,) with ``return_labels``)."""
        if isinstance(N, bool) or not isinstance(N, int) or N < 0:
            raise ValueError(f"N: expected a non-negative int, got {N!r}")
        dev, dt = self.ucat.device, self.ucat.dtype
        gen = _torch_generator(generator, "cpu")
        labels = torch.multinomial(self.pi, N, replacement=True, generator=gen) if N else torch.zeros(0, dtype=torch.long)
        x = torch.zeros(N, self.n, dtype=torch.float64)
        for k, U in enumerate(self.bases):
            idx = (labels == k).nonzero().reshape(-1)
            if idx.numel():
                a = torch.randn(idx.numel(), self.dims[k], generator=gen, dtype=torch.float64) * self.tau[k]
                x[idx] = a @ U.double().cpu().T
        if self.delta:
            x += self.delta * torch.randn(N, self.n, generator=gen, dtype=torch.float64)
        x = x.to(dt).to(dev)
        return (x, labels.to(dev)) if return_labels else x

    def __repr__(self) -> str:
        return f"MoLRG(n={self.n}, K={self.K}, dims={self.dims}, delta={self.delta}, mode={self.mode!r})"
