"""Counter-based Brownian motion: the noise of an SDE step as an increment of one seeded path.

``BrownianNoise(seed, t_min, t_max)`` is one Brownian path ``W`` on ``[t_min, t_max]`` with
``W(t_min) = 0`` (``Cov(W(s), W(t)) = min(s, t) - t_min``), fixed by ``seed``.  Asked for the interval
``(t0, t1)`` it returns the normalised increment ``(W(t1) - W(t0)) / sqrt(|t1 - t0|)``, a standard
normal per element -- what k-diffusion's ``BrownianTreeNoiseSampler(x, sigma_min, sigma_max,
seed)(sigma, sigma_next)`` returns, without torchsde.  Because every step's noise is an increment of
the same path, a 20-step and a 40-step SDE run from one seed see the same Brownian motion (the
40-step run's two half-step increments add up to the 20-step run's one) and so give close samples.

Construction (P. Levy's construction of Brownian motion by midpoint refinement; the Brownian
bridge, e.g. I. Karatzas and S. Shreve, *Brownian Motion and Stochastic Calculus*, 1991, Sec. 2.3;
docs/math.md Sec. 6):

- The tree's cells are dyadic in a transformed time ``u``: ``u = log t`` when ``t_min > 0``
  (``spacing="log"``, the default there: noise levels are spread geometrically, Karras sigmas
  from 0.002 to 80 need the same resolution relative to sigma at both ends), else ``u = t``
  (``spacing="linear"``).  Cell ``k`` (heap order: cell 1 is ``[t_min, t_max]``, cells ``2k``
  and ``2k + 1`` its halves in ``u``) has its split point ``m`` at the middle of its ``u`` range.
  The path itself is a Brownian motion in ``t``: only the split points depend on ``u``.
- ``W(t_max) = sqrt(t_max - t_min) N_0``; given ``W(a), W(b)`` at a cell's ends, its split point is
  the Brownian bridge ``W(m) = W(a) + (m - a)/(b - a) (W(b) - W(a)) + sqrt((m - a)(b - m)/(b - a)) N_k``.
  ``W(t)`` descends from cell 1 to the leaf cell holding ``t`` (``depth`` levels), drawing the
  split points on the way, and ends with the same bridge formula at ``t`` itself inside the leaf
  (with the leaf's ``N_k``).  Every split point is exact in law, and so is any set of query times
  that lie in distinct leaf cells (given the cell ends, the bridges of distinct cells are
  independent); two query times in one leaf share its normal, an error of variance at most the
  leaf's width.  ``depth`` is set by ``tol``: leaf width ``<= tol * t`` (log spacing) or
  ``<= tol * (t_max - t_min)`` (linear); the default ``tol = 1e-3`` puts the ends of every step of a
  1000-step Karras schedule (0.002 .. 80) at least 8 leaves apart.  A deeper tree of the same seed
  refines the same path: its split points at the shallower levels are the same numbers.
- ``N_k`` for element ``j`` (the flattened index of ``like``) is the normal of fastdiff's Philox
  stream (:mod:`fastdiff.reference.rng`) for ``seed`` at the 64-bit counter
  ``2**62 + k * 2**32 + j``: a pure function of ``(seed, k, j)``, so element ``j``'s noise depends on
  ``(seed, interval, j)`` only -- not on the batch size, the number of steps, the order or number
  of queries -- and each node is one contiguous window, drawn with :func:`fastdiff.randn` on
  ``like``'s device.  Counters from ``2**62`` on are never reached by a :class:`fastdiff.Generator`
  drawing from offset 0, so the same seed may also drive ``x_T`` and the other steps' noise.
  With a sequence of seeds (k-diffusion's per-sample seeds), row ``b`` of ``like`` (its first dim)
  has its own path keyed by ``seed[b]``, ``j`` counting within the row: a sample's noise then does not
  depend on which batch it is in or where.

Arithmetic is float64 (float32 on devices without it, MPS).  The tree caches nothing; a sampler from
:meth:`BrownianNoise.noise_sampler` / :meth:`BrownianNoise.run_noise` keeps one tensor, ``W`` at the end
of its last step, where the next step starts (so a step descends the tree once, not twice).
W is a function of ``t``, so increments over adjacent intervals add up exactly up to rounding:
``(W(b) - W(a)) + (W(c) - W(b)) = W(c) - W(a)``.

    bn = fastdiff.BrownianNoise(seed, sigma_min, sigma_max)
    x = sample_dpmpp_2m_sde(model, x, sigmas, noise_sampler=bn.noise_sampler(x))      # k-diffusion adapter
    x = fastdiff.sampling.run(denoiser, x, table, noise=bn.run_noise(x, sigmas))     # the loop
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, List, Sequence, Tuple

import torch

from fastdiff._args import check_number
from fastdiff.generator import Generator, _as_u64
from fastdiff.steps import randn

__all__ = ["BrownianNoise"]

_BASE = 1 << 62        # first counter of the tree's stream (a Generator from offset 0 never gets here)
_ELEMS = 1 << 32       # counters per node: elements j < 2**32
MAX_DEPTH = 29         # nodes k < 2**30, so 2**62 + k * 2**32 + j < 2**63 (int64 offsets)
SPACINGS = ("log", "linear")
_SLACK = 2.0 ** -20    # relative: a query time this close outside [t_min, t_max] (float32 sigmas) is clamped


class BrownianNoise:
    """One Brownian path ``W`` on ``[t_min, t_max]`` fixed by ``seed`` (see the module docstring).

    seed: int in ``[0, 2**64)``, the Philox key; or a sequence of them, one per row of ``like``
        (``like.shape[0] == len(seed)``), each row its own path.
    t_min < t_max: finite reals (for a sampler: ``sigma_min`` = the smallest nonzero level, ``sigma_max``).
    tol: leaf-cell width relative to ``t`` (log spacing: about, ``du = log(b/a) <= tol``) or to
        ``t_max - t_min`` (linear); sets ``depth``.
    depth: the number of bisection levels (``0 .. 29``), overriding ``tol``.
    spacing: ``"log"`` (default when ``t_min > 0``) or ``"linear"`` (the default otherwise).

    ``bn(t0, t1, like)`` is ``(W(t1) - W(t0)) / sqrt(|t1 - t0|)`` shaped and typed as ``like``;
    ``bn.increment`` the same without the normalisation, ``bn.w(t, like)`` the path itself.
    """

    def __init__(self, seed, t_min: float, t_max: float, *, tol: float = 1e-3, depth=None,
                 spacing=None):
        if isinstance(seed, (list, tuple)) or (hasattr(seed, "tolist") and getattr(seed, "ndim", 0) == 1):
            seed = seed if isinstance(seed, (list, tuple)) else seed.tolist()  # a 1-D tensor / NumPy array
            seeds = [_as_u64(f"seed[{b}]", s) for b, s in enumerate(seed)]
            if not seeds:
                raise ValueError("seed: expected an int or a non-empty sequence of ints (one per sample)")
            self.seed = tuple(seeds)
        else:
            self.seed = _as_u64("seed", seed)
        t_min, t_max = check_number("t_min", t_min, lo=-math.inf), check_number("t_max", t_max, lo=-math.inf)
        if not t_min < t_max:
            raise ValueError(f"t_min: expected t_min < t_max, got t_min={t_min}, t_max={t_max}")
        if spacing is None:
            spacing = "log" if t_min > 0 else "linear"
        if spacing not in SPACINGS:
            raise ValueError(f"spacing: expected one of {SPACINGS}, got {spacing!r}")
        if spacing == "log" and not t_min > 0:
            raise ValueError(f"spacing: 'log' needs t_min > 0, got t_min={t_min}")
        self.t_min, self.t_max, self.spacing = t_min, t_max, spacing
        self._u = (math.log(t_min), math.log(t_max)) if spacing == "log" else (t_min, t_max)
        if depth is None:
            tol = check_number("tol", tol, strict=True)
            span = self._u[1] - self._u[0] if spacing == "log" else 1.0  # leaf width / t ~ du (log)
            depth = max(0, math.ceil(math.log2(span / tol)))
            if depth > MAX_DEPTH:
                raise ValueError(f"tol: {tol} needs depth {depth} > {MAX_DEPTH} on [{t_min}, {t_max}]; "
                                 f"expected a larger tol")
        elif isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or not 0 <= depth <= MAX_DEPTH:
            raise ValueError(f"depth: expected an int in [0, {MAX_DEPTH}], got {depth!r}")
        self.depth = int(depth)

    def __repr__(self) -> str:
        return (f"fastdiff.BrownianNoise(seed={self.seed}, t_min={self.t_min}, t_max={self.t_max}, "
                f"depth={self.depth}, spacing={self.spacing!r})")

    # ------------------------------------------------------------------ public API
    def __call__(self, t0, t1, like: torch.Tensor) -> torch.Tensor:
        """The normalised increment ``(W(t1) - W(t0)) / sqrt(|t1 - t0|)``, ``like``'s shape, dtype, device."""
        return self._normalised(t0, t1, self._check_like(like), None)

    def increment(self, t0, t1, like: torch.Tensor) -> torch.Tensor:
        """``W(t1) - W(t0)`` (variance ``|t1 - t0|``), ``like``'s shape, dtype, device."""
        like = self._check_like(like)
        w0, w1 = self._path([self._time("t0", t0), self._time("t1", t1)], like)
        return (w1 - w0).to(like.dtype).reshape(like.shape)

    def w(self, t, like: torch.Tensor) -> torch.Tensor:
        """The path ``W(t)`` (``W(t_min) = 0``, variance ``t - t_min``), ``like``'s shape, dtype, device."""
        like = self._check_like(like)
        w, = self._path([self._time("t", t)], like)
        return w.to(like.dtype).reshape(like.shape)

    def noise_sampler(self, like: torch.Tensor) -> Callable:
        """k-diffusion's ``noise_sampler(sigma, sigma_next)`` for tensors like ``like`` (the sampler's ``x``).
        ``sigma`` may be a float or a one-element tensor (k-diffusion passes ``sigmas[i]``; read with
        ``.item()``, a host sync for a GPU tensor -- :meth:`run_noise` takes the levels once instead)."""
        like, memo = self._check_like(like), []
        return lambda sigma, sigma_next: self._normalised(sigma, sigma_next, like, memo)

    def run_noise(self, like: torch.Tensor, sigmas) -> Callable:
        """:func:`fastdiff.sampling.run`'s ``noise(i, row)``: the normalised increment from ``sigmas[i]`` to
        ``sigmas[i + 1]`` (``sigmas``: the table's levels, a sequence or tensor, copied to the host once)."""
        like = self._check_like(like)
        levels = [float(s) for s in (sigmas.detach().double().cpu().tolist() if isinstance(sigmas, torch.Tensor)
                                     else sigmas)]
        memo: list = []
        return lambda i, row: self._normalised(levels[i], levels[i + 1], like, memo)

    def _normalised(self, t0, t1, like: torch.Tensor, memo) -> torch.Tensor:
        """``(W(t1) - W(t0)) / sqrt(|t1 - t0|)``.  ``memo`` (a sampler's list, or None) keeps the last
        ``(t1, W(t1))``: a sampler's next step starts where the last ended, so ``W(t0)`` is reused (one
        tensor, replaced each call -- bounded; W(t) is computed by the same ops alone or with other
        times, so the numbers are bit for bit those of a fresh call)."""
        a, b = self._time("t0", t0), self._time("t1", t1)
        if a == b:
            raise ValueError(f"t1: expected t1 != t0 (the normalised increment over an empty interval is 0/0), got {t1}")
        if memo and memo[0] == a:
            w0, (w1,) = memo[1], self._path([b], like)
        else:
            w0, w1 = self._path([a, b], like)
        if memo is not None:
            memo[:] = [b, w1]
        return ((w1 - w0) / math.sqrt(abs(b - a))).to(like.dtype).reshape(like.shape)

    # ------------------------------------------------------------------ the tree
    def _check_like(self, like) -> torch.Tensor:
        if not isinstance(like, torch.Tensor) or not like.is_floating_point():
            raise TypeError(f"like: expected a floating-point tensor, got {getattr(like, 'dtype', type(like).__name__)}")
        if like.device.type == "meta":
            raise ValueError("like: expected a tensor on a cpu or cuda device, got a meta tensor")
        rows = 1 if isinstance(self.seed, int) else len(self.seed)
        if not isinstance(self.seed, int) and (like.ndim == 0 or like.shape[0] != rows):
            raise ValueError(f"like: expected {rows} rows (one per seed) in the first dim, got shape {tuple(like.shape)}")
        if like.numel() // rows > _ELEMS:
            raise ValueError(f"like: expected at most 2**32 elements per path (the counters per tree node), "
                             f"got {like.numel() // rows}")
        return like

    def _time(self, name: str, t) -> float:
        if isinstance(t, torch.Tensor):
            if t.numel() != 1:
                raise ValueError(f"{name}: expected a scalar time, got a tensor of shape {tuple(t.shape)}")
            t = t.item()
        t = check_number(name, t, lo=-math.inf)
        lo, hi = self.t_min, self.t_max
        if not lo - _SLACK * abs(lo) <= t <= hi + _SLACK * abs(hi):
            raise ValueError(f"{name}: expected a time in [t_min, t_max] = [{lo}, {hi}], got {t}")
        return min(max(t, lo), hi)

    def _split(self, level: int, i: int) -> float:
        """The split point of the i-th cell of ``level``: the middle of its u range, back in t."""
        u0, u1 = self._u
        u = u0 + (u1 - u0) * ((2 * i + 1) / 2.0 ** (level + 1))
        return math.exp(u) if self.spacing == "log" else u

    def _normal(self, node: int, like: torch.Tensor) -> torch.Tensor:
        """``N_node`` for every element of ``like``: counters ``2**62 + node * 2**32 + j``, ``j < numel``.
        float32 (the stream's own precision; the fused kernel's float64 output takes the slow torch path),
        added into the float64 working tensors by :func:`_bridge` without a float64 copy."""
        offset = _BASE + node * _ELEMS
        if isinstance(self.seed, int):
            return randn(like.numel(), generator=Generator(self.seed, offset), device=like.device)
        z = torch.empty(like.numel(), dtype=torch.float32, device=like.device)
        for row, seed in zip(z.view(len(self.seed), -1), self.seed):  # one window per sample's own key
            randn(out=row, generator=Generator(seed, offset))
        return z

    def _path(self, times: Sequence[float], like: torch.Tensor) -> List[torch.Tensor]:
        """W at each of ``times`` (in [t_min, t_max]), flat, in the working dtype: one descent of the tree
        for all of them, each split point drawn once (queries in one cell share its ancestors)."""
        dtype = torch.float32 if like.device.type == "mps" else torch.float64
        zero = torch.zeros(like.numel(), dtype=dtype, device=like.device)
        out: List[torch.Tensor] = [zero] * len(times)
        w_top = self._normal(0, like).to(dtype) * math.sqrt(self.t_max - self.t_min)
        # a stack of cells to visit: (level, index in level, a, b, W(a), W(b), query indices inside)
        stack: List[Tuple] = [(0, 0, self.t_min, self.t_max, zero, w_top, list(range(len(times))))]
        while stack:
            level, i, a, b, wa, wb, qs = stack.pop()
            node = (1 << level) + i
            if level == self.depth:  # the leaf: the bridge at each query time, with the leaf's normal
                z = None
                for q in qs:
                    t = times[q]
                    if t == a or t == b:
                        out[q] = wa if t == a else wb
                        continue
                    z = self._normal(node, like) if z is None else z
                    out[q] = _bridge(a, b, t, wa, wb, z)
                continue
            m = self._split(level, i)
            wm = _bridge(a, b, m, wa, wb, self._normal(node, like))
            left = [q for q in qs if times[q] < m]
            right = [q for q in qs if times[q] >= m]
            if left:
                stack.append((level + 1, 2 * i, a, m, wa, wm, left))
            if right:
                stack.append((level + 1, 2 * i + 1, m, b, wm, wb, right))
        return out


def _bridge(a: float, b: float, t: float, wa: torch.Tensor, wb: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The Brownian bridge from ``(a, W(a))`` to ``(b, W(b))`` at ``a <= t <= b``: mean
    ``W(a) + (t - a)/(b - a) (W(b) - W(a))``, variance ``(t - a)(b - t)/(b - a)``."""
    r = (t - a) / (b - a)
    return torch.lerp(wa, wb, r).add_(z, alpha=math.sqrt(max((t - a) * (b - t) / (b - a), 0.0)))
