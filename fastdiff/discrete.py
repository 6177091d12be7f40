"""Sampling discrete data ``y in {-1, 1}^d`` (seed 003, "Extension to discrete data"; docs/math.md
section 7): binary-flip noise and the one-stage / two-stage discrete Langevin samplers.

Every random move here is one launch of the fused flip (:mod:`fastdiff.ops.discrete_langevin`:
``y'_i = +1 w.p. sigmoid(a s_i + b v_i)``, uniforms from the Philox stream of a
:class:`fastdiff.Generator`, C++ / Triton / torch chosen by :func:`fastdiff.dispatch.choose`);
the two-stage sampler's Gaussian stage is the fused step (:func:`fastdiff.affine_step`).

- :func:`binary_flip`: ``y = x o eps``, ``P(eps_i = +-1) = sigmoid(+-2 alpha)``.
- :func:`discrete_langevin_step`: one proposal of the one-stage sampler (Zhang et al. 2022),
  ``t(y'|y) prop. exp((s(y)/2 + y/eta).y')``, i.e. ``P(y'_i = +1) = sigmoid(s_i(y) + 2 y_i / eta)``.
- :func:`discrete_langevin`: the chain, ``method="one_stage"`` or ``"two_stage"`` (``z ~ N(y, eta I)``,
  then ``P(y_i = +1 | z) = sigmoid(2 s_i(z) + 2 z_i / eta)``), each as in the talk (unadjusted, an
  O(eta, alpha) bias) or with ``metropolis=True`` an exact Metropolis-Hastings correction (the chain
  then leaves ``q`` invariant exactly: docs/math.md 7d, 7e).

Not a :func:`fastdiff.sample` method: that loop runs a noise-level schedule of affine steps on a
denoiser ``(x, alpha, sigma)``; the discrete chain has neither (its moves are sign draws at one
noise level ``alpha``), so it is this separate entry with the same generator, backends and
progress bar.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional

import torch

from fastdiff._args import _check_x, check_binary, check_positive
from fastdiff.generator import Generator, default_generator
from fastdiff.ops.discrete_langevin import _discrete_flip

__all__ = ["METHODS", "binary_flip", "discrete_langevin_step", "discrete_langevin"]

METHODS = ("one_stage", "two_stage")


# --------------------------------------------------------------------------- shared checks
def _generator(generator) -> Generator:
    if generator is None:
        return default_generator
    if not isinstance(generator, Generator):
        raise TypeError(f"generator: expected a fastdiff.Generator, got {type(generator).__name__}")
    if generator.per_sample:
        raise ValueError("generator: the discrete samplers take one seed (Generator(int)), not per-sample seeds")
    return generator


def _backend(backend, t: torch.Tensor) -> str:
    from fastdiff import dispatch

    return dispatch.choose("discrete_langevin", backend, t.device, t.dtype)


def _flip(anchor, score, a, b, gen, backend, out=None, check=None):
    """The fused flip on ``anchor`` (and ``score``), drawing ``anchor.numel()`` uniforms from ``gen``;
    ``check``: the argument name to raise with if ``anchor`` is not binary (counted in the same pass)."""
    be = _backend(backend, anchor)
    if be != "torch":
        anchor = anchor.contiguous()
        score = score.contiguous() if score is not None else None
    res = out if out is not None else torch.empty_like(anchor, memory_format=torch.contiguous_format)
    off = gen.draw(anchor.numel())
    return _discrete_flip(res, anchor, score, a, b, seed=gen.seed, offset=off, backend=be, check=check)


def _out(out, like):
    if out is None:
        return None
    if not isinstance(out, torch.Tensor) or out.shape != like.shape or out.dtype != like.dtype \
            or out.device != like.device or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous {like.dtype} tensor of shape {tuple(like.shape)} on {like.device}")
    return out


# --------------------------------------------------------------------------- the moves
def binary_flip(x, alpha, *, generator: Optional[Generator] = None, out=None, backend: str = "auto") -> torch.Tensor:
    """Binary-flip noise ``y = x o eps``, ``P(eps_i = +1) = sigmoid(2 alpha)`` (seed 003): each
    coordinate kept w.p. ``sigmoid(2 alpha)``, flipped otherwise; ``alpha`` ~ an inverse variance.

    ``x``: (B, d) float tensor with entries in {-1, +1}; ``alpha > 0``.  One fused flip
    (``P(y_i = +1) = sigmoid(2 alpha x_i)``), ``x.numel()`` uniforms from ``generator``."""
    x = _check_x(x)
    a = check_positive("alpha", alpha)
    return _flip(x, None, 0.0, 2.0 * a, _generator(generator), backend, _out(out, x), check="x")


def discrete_langevin_step(y, score, eta, *, generator: Optional[Generator] = None, out=None,
                           backend: str = "auto") -> torch.Tensor:
    """One one-stage discrete Langevin proposal (Zhang et al. 2022, seed 003)::

        t(y' | y) prop. exp( s(y).(y' - y) / 2 - ||y' - y||^2 / (2 eta) ),   y' in {-1, 1}^d
                  = prod_i sigmoid(y'_i (s_i(y) + 2 y_i / eta))

    ``y``: (B, d) in {-1, +1}; ``score``: ``s(y)`` (B, d), any real values; ``eta > 0``.  Fused:
    one pass reads ``y`` and ``score`` and writes ``y'`` (and checks ``y`` is binary in that pass: a
    ValueError naming ``y`` otherwise, ``out`` then unspecified)."""
    y = _check_x(y)
    e = check_positive("eta", eta)
    if not isinstance(score, torch.Tensor) or score.shape != y.shape or score.dtype != y.dtype \
            or score.device != y.device:
        raise ValueError(f"score: expected a {y.dtype} tensor of shape {tuple(y.shape)} on {y.device} (like y), "
                         f"got {getattr(score, 'shape', type(score).__name__)}")
    return _flip(y, score, 1.0, 2.0 / e, _generator(generator), backend, _out(out, y), check="y")


def _log_proposal(yp, logit):
    """``sum_i log sigmoid(y'_i l_i)`` (B,): the log-probability of ``y'`` under the product proposal."""
    return torch.nn.functional.logsigmoid(yp * logit).sum(1)


def _accept(log_ratio, gen, y_new, y_old, *rest):
    """Metropolis-Hastings: keep row ``b`` of the new state where ``log u_b < log_ratio_b``
    (``u_b`` from the generator's uniform stream); ``rest`` are (new, old) pairs carried along."""
    from fastdiff.reference.rng import rand_torch

    B = log_ratio.shape[0]
    u = rand_torch(gen.seed, gen.draw(B), B, log_ratio.device).double()
    ok = torch.log(u) < log_ratio.double()
    out = [torch.where(ok[:, None], y_new, y_old)]
    for new, old in rest:
        out.append(torch.where(ok.reshape((B,) + (1,) * (new.ndim - 1)), new, old))
    return ok, out


def discrete_langevin(model, y, alpha, *, steps: int, eta: float, method: str = "one_stage",
                      metropolis: bool = False, generator: Optional[Generator] = None, backend: str = "auto",
                      progress: bool = True, return_trajectory: bool = False,
                      callback: Optional[Callable[[int, torch.Tensor], None]] = None):
    """Sample ``q(y) prop. sum_x p(x) exp(alpha x.y)`` on ``{-1, 1}^d`` knowing its score (seed 003).

    ``model``: an object with ``score(y, alpha)`` (and ``log_q_and_score(y, alpha)`` for
    ``metropolis=True``), e.g. :class:`fastdiff.denoisers.BinaryMixture` / ``BinaryEmpirical``;
    its score is also evaluated off the cube (two-stage).  ``y``: the initial states (B, d) in
    {-1, +1}, or an int ``B`` to start from uniform random states.  ``steps >= 0``; ``eta > 0``.

    ``method="one_stage"``: ``y' ~ prod_i sigmoid(y'_i (s_i(y) + 2 y_i / eta))`` (Zhang et al. 2022).
    ``method="two_stage"``: ``z = y + sqrt(eta) xi``, then ``y' ~ prod_i sigmoid(2 y'_i (s_i(z) + z_i / eta))``
    (``q(y | z)`` linearised at ``z``; the extension of Lee et al. 2021's proximal sampler).
    ``metropolis=True`` accepts each move with the exact Metropolis-Hastings ratio (one-stage: the
    usual ``q(y') t(y|y') / (q(y) t(y'|y))``; two-stage: an independence sampler for
    ``q(y | z) prop. q(y) e^{y.z / eta}``), so ``q`` is exactly invariant.

    Returns the final states (B, d) float32 (or ``y``'s dtype), or with ``return_trajectory`` a
    ``(steps + 1, B, d)`` tensor of every state.  ``callback(i, y)`` after each step.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if not callable(getattr(model, "score", None)):
        raise TypeError(f"model: expected an object with a score(y, alpha) method, got {type(model).__name__}")
    if metropolis and not callable(getattr(model, "log_q_and_score", None)):
        raise TypeError("model: metropolis=True needs a model with log_q_and_score(y, alpha) (the exact log q)")
    a = check_positive("alpha", alpha)
    e = check_positive("eta", eta)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"steps: expected an int >= 0, got {steps!r}")
    gen = _generator(generator)
    if isinstance(y, numbers.Integral) and not isinstance(y, bool):
        if y < 1:
            raise ValueError(f"y: expected a batch size >= 1 or a (B, d) tensor, got {y}")
        d = getattr(model, "d", None)
        if not isinstance(d, int):
            raise ValueError("y: starting from a batch size needs model.d (the dimension); pass a (B, d) tensor")
        ones = torch.ones(int(y), d)
        y = _flip(ones, None, 0.0, 0.0, gen, backend)  # P(+1) = sigmoid(0) = 1/2
    else:
        y = _check_x(y)
        check_binary("y", y)
        y = y.contiguous().clone()
    from fastdiff.trajectory import _progress

    traj = [y.clone()] if return_trajectory else None
    lq = s = None
    if method == "one_stage" or metropolis:
        lq, s = model.log_q_and_score(y, a) if metropolis else (None, model.score(y, a))
    bar = _progress(steps, progress)
    for i in range(int(steps)):
        if method == "one_stage":
            yp = _flip(y, s, 1.0, 2.0 / e, gen, backend)
            if metropolis:
                lqp, sp = model.log_q_and_score(yp, a)
                fwd = _log_proposal(yp, s + (2.0 / e) * y)
                bwd = _log_proposal(y, sp + (2.0 / e) * yp)
                _, (y, s, lq) = _accept(lqp - lq + bwd - fwd, gen, yp, y, (sp, s), (lqp, lq))
            else:
                y = yp
                s = model.score(y, a)
        else:
            from fastdiff.steps import affine_step

            z = affine_step([(y, 1.0)], math.sqrt(e), generator=gen, backend=backend)  # the fused step
            sz = model.score(z, a)
            yp = _flip(z, sz, 2.0, 2.0 / e, gen, backend)
            if metropolis:
                lqp, sp = model.log_q_and_score(yp, a)
                logit = 2.0 * sz + (2.0 / e) * z
                # target q(y | z) prop. q(y) exp(y.z / eta); proposal t(y | z) = prod sigmoid(y_i l_i), independent of y
                new = lqp + (yp * z).sum(1) / e - _log_proposal(yp, logit)
                old = lq + (y * z).sum(1) / e - _log_proposal(y, logit)
                _, (y, lq) = _accept(new - old, gen, yp, y, (lqp, lq))
            else:
                y = yp
        if traj is not None:
            traj.append(y.clone())
        if callback is not None:
            callback(i, y)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return torch.stack(traj) if traj is not None else y
