"""A whole fixed-shape sampling loop (model calls and fused steps) as one CUDA graph.

:func:`fastdiff.sampling.run` never synchronizes with the device: every coefficient of a table row is a
host float passed as a kernel argument and every Philox offset is fixed by the table before the loop
starts.  So the loop for a given ``(x shape, table, denoiser)`` is one fixed sequence of kernel launches,
which CUDA can record once and replay (``torch.cuda.CUDAGraph``), taking the host (Python, the launch
overhead of tens of small kernels per step) out of the sampler entirely.

What a replay may change: the initial state ``x_T`` (copied into a static input buffer) and the
per-sample seeds (copied into the static ``(B,)`` seed tensor the kernels read, see
:meth:`fastdiff.Generator.seed_tensor`).  A single-int seed would be a kernel argument, frozen at
capture, so the captured loop always uses per-sample seeds: ``seeds`` of length B (default
``range(B)``).  Sample b's noise is then the Philox stream of ``seeds[b]`` from ``offset`` on,
exactly what ``run(denoiser, x_T, table, generator=Generator(seeds, offset))`` draws.

On a CPU tensor (or with ``capture=False``) the same object runs that ``run`` call on every
``__call__``, uncaptured: one code path, tested on the CPU, whose results the CUDA replay must equal.

The denoiser must itself be capturable: a fixed-shape model with no host synchronization
(no ``.item()``, no data-dependent shapes) and no host-side randomness.  ``noise=`` callables
(Brownian noise, k-diffusion's ``noise_sampler``) draw on the host and are not supported here.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from fastdiff.generator import Generator
from fastdiff.sampling import run
from fastdiff.solvers import Step

__all__ = ["CapturedSampler"]


class CapturedSampler:
    """``sampler = CapturedSampler(denoiser, x_T, table, seeds=...)``; ``x0 = sampler(x_T, seeds=...)``.

    denoiser: ``denoiser(x, alpha, sigma) -> x0_hat`` as for :func:`fastdiff.sampling.run` (a fixed-shape,
        capturable model on CUDA).
    x: an example initial state, shape ``(B, ...)``; every call must pass this shape, dtype and device.
    table: the trajectory rows (:func:`fastdiff.sampling.trajectory_table`).
    seeds: B per-sample seeds (ints, a list or a 1-d integer tensor; default ``range(B)``); offset: the
        Philox offset the first draw starts at (a multiple of 4).
    capture: ``None`` (capture when ``x`` is a CUDA tensor), ``True`` (require it), ``False`` (never).
    warmup: eager runs before capture (on a side stream, as CUDA graphs require), which also compile
        and autotune the Triton kernels so that capture records launches only.
    backend: the fused steps' backend.

    Calling returns the final state, a tensor of ``x``'s shape: on the captured path the graph's own
    static output buffer, overwritten by the next call (clone it to keep it), as
    ``torch.cuda.make_graphed_callables`` does.
    """

    def __init__(self, denoiser: Callable, x: torch.Tensor, table: Sequence[Step], *, seeds=None, offset: int = 0,
                 capture: Optional[bool] = None, warmup: int = 2, backend: str = "auto"):
        if not callable(denoiser):
            raise TypeError(f"denoiser: expected a callable denoiser(x, alpha, sigma) -> x0_hat, "
                            f"got {type(denoiser).__name__}")
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
            raise TypeError(f"x: expected a floating-point tensor of shape (B, ...), got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if len(table) == 0 or not all(isinstance(r, Step) for r in table):
            raise TypeError("table: expected a non-empty sequence of fastdiff.solvers.Step rows "
                            "(fastdiff.sampling.trajectory_table)")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup: expected an int >= 1, got {warmup!r}")
        if capture and x.device.type != "cuda":
            raise ValueError(f"capture: a CUDA graph needs a CUDA tensor x, got device {x.device}")
        self.denoiser, self.table, self.backend = denoiser, list(table), backend
        self.shape, self.dtype, self.device = tuple(x.shape), x.dtype, x.device
        B = self.shape[0]
        # validates the seeds (ints, u64 range, one per sample) and the offset
        self._gen = Generator(list(range(B)) if seeds is None else seeds, offset)
        self._gen.check_batch(B)
        self.offset = offset
        self.captured = x.device.type == "cuda" if capture is None else bool(capture)
        self._graph = None
        if self.captured:
            self._capture(x, warmup)

    # ------------------------------------------------------------------ the two paths
    def _run(self, x: torch.Tensor) -> torch.Tensor:
        # a fresh stream position every run; the clone shares the device seed tensor the captured kernels read
        return run(self.denoiser, x, self.table, generator=self._gen.clone(), backend=self.backend, progress=False)

    def _capture(self, x: torch.Tensor, warmup: int) -> None:
        self._x_in = x.detach().clone()
        self._seeds = self._gen.seed_tensor(self.device)  # made before capture: no host copy inside it
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(warmup):
                self._run(self._x_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self._graph):
            self._x_out = self._run(self._x_in)

    # ------------------------------------------------------------------ calls
    def set_seeds(self, seeds) -> None:
        """Replace the per-sample seeds for later calls (B of them)."""
        g = Generator(seeds, self.offset)
        g.check_batch(self.shape[0])
        if self._graph is not None:
            self._seeds.copy_(g.seed_tensor("cpu"))  # outside the graph: the one host-to-device copy
            g._tables = self._gen._tables  # keep the static device tensor the graph reads
        self._gen = g

    def __call__(self, x: torch.Tensor, seeds=None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a tensor, got {type(x).__name__}")
        if tuple(x.shape) != self.shape or x.dtype != self.dtype or x.device != self.device:
            raise ValueError(f"x: expected shape {self.shape}, dtype {self.dtype} on {self.device} (the captured "
                             f"loop's), got shape {tuple(x.shape)}, dtype {x.dtype} on {x.device}")
        if seeds is not None:
            self.set_seeds(seeds)
        if self._graph is None:
            with torch.no_grad():
                return self._run(x)
        self._x_in.copy_(x)
        self._graph.replay()
        return self._x_out

    def __repr__(self) -> str:
        path = "CUDA graph" if self._graph is not None else "uncaptured"
        return f"fastdiff.CapturedSampler({len(self.table)} rows, x {self.shape}, {path})"
