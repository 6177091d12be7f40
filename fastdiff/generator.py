"""The counter-based random stream shared by every backend (SPEC 0).

A :class:`Generator` is just ``(seed, offset)``: the normal with global index ``g`` is a pure
function of ``(seed, g)`` (Philox4x32-10 + Box-Muller, :mod:`fastdiff.reference.rng`), so the
C++ kernels, the Triton kernels, the CUDA kernels and the torch fallback all draw the same
numbers, and a kernel can draw them in any order and in parallel.  Each call that draws ``n``
normals takes the window ``[offset, offset + n)`` and advances ``offset`` past it, rounded up
to a multiple of 4 (one Philox call yields 4 normals; keeping windows quad-aligned lets the
kernels generate whole quads), so consecutive steps never reuse noise.

Per-sample seeds: ``Generator(seed=[s_0, ..., s_{B-1}])`` (a list of ints or a 1-d integer tensor)
gives each sample of a ``(B, ...)`` batch its own stream: element ``j`` of sample ``b``
(``j in [0, numel / B)``) is the normal at ``(s_b, offset + j)``, and a draw advances ``offset`` by
the per-sample count rounded up to 4.  Sample ``b``'s noise is then the same whatever batch it is
in, at whatever position: ``Generator(seed=[s_b], offset)`` reproduces it alone.  The kernels read
the seeds from a device tensor (:meth:`Generator.seed_tensor`, int64 holding the u64 bits, made
once per device and cached), so a step launches without a host-device copy or sync.
"""
from __future__ import annotations

import operator
from typing import Sequence, Tuple, Union

__all__ = ["Generator", "default_generator"]

_U64 = 1 << 64
_MAX_OFFSET = 1 << 63  # offsets are int64 kernel arguments; 2^63 normals is beyond any run


class Generator:
    """Philox stream position ``(seed, offset)``; ``seed`` an int, or B ints (one stream per sample).

    >>> g = fastdiff.Generator(0)
    >>> x = fastdiff.ddpm_step(x, eps, t, sched, generator=g)   # draws x.numel() normals
    >>> g = fastdiff.Generator(seed=[3, 7, 11])                 # x of shape (3, ...)
    >>> x = fastdiff.ddpm_step(x, eps, t, sched, generator=g)   # draws x.numel() / 3 per sample

    ``seed``: an int in ``[0, 2**64)``, or a list / tuple of them / a 1-d integer tensor (read once,
    on the host, here); :attr:`seed` is then a tuple of ints and :attr:`per_sample` is true.
    """

    __slots__ = ("seed", "offset", "_tables")

    def __init__(self, seed: Union[int, "Sequence[int]", "torch.Tensor"] = 0, offset: int = 0):
        self.seed = _as_seed(seed)
        offset = _as_u64("offset", offset)
        if offset >= _MAX_OFFSET:
            raise ValueError(f"offset: expected < 2**63, got {offset}")
        if offset % 4:
            raise ValueError(f"offset: expected a multiple of 4 (whole Philox quads), got {offset}")
        self.offset = offset
        self._tables = {}

    @property
    def per_sample(self) -> bool:
        """Whether this generator holds one seed per sample (:attr:`seed` a tuple)."""
        return isinstance(self.seed, tuple)

    def manual_seed(self, seed) -> "Generator":
        self.seed, self.offset, self._tables = _as_seed(seed), 0, {}
        return self

    def draw(self, n: int) -> int:
        """Reserve ``n`` normals (per sample, for a per-sample generator); returns the offset of
        the first and advances past them, rounded up to a whole quad."""
        start = self.offset
        end = start + ((n + 3) & ~3)
        if end >= _MAX_OFFSET:
            raise OverflowError(f"generator: drawing {n} normals at offset {start} passes 2**63; reseed it")
        self.offset = end
        return start

    def check_batch(self, B: int, name: str = "x") -> None:
        """A per-sample generator must hold one seed per sample of ``name``'s batch (``B``)."""
        if self.per_sample and len(self.seed) != B:
            raise ValueError(f"generator: expected {B} seeds (one per sample of {name}, batch {B}), "
                             f"got {len(self.seed)}")

    def seed_tensor(self, device) -> "torch.Tensor":
        """The per-sample seeds as an int64 ``(B,)`` tensor on ``device`` (each entry the u64 seed's
        bits; ``s >= 2**63`` is stored as ``s - 2**64``), made once per device and cached, as the
        schedules cache their device tables."""
        import torch

        if not self.per_sample:
            raise ValueError("generator: seed_tensor() needs per-sample seeds")
        device = torch.device(device)
        t = self._tables.get(device)
        if t is None:
            bits = [s - _U64 if s >= _MAX_OFFSET else s for s in self.seed]
            t = self._tables[device] = torch.tensor(bits, dtype=torch.int64).to(device)
        return t

    def get_state(self) -> tuple:
        return (self.seed, self.offset)

    def set_state(self, state) -> "Generator":
        seed, offset = state
        self.__init__(seed, offset)
        return self

    def clone(self) -> "Generator":
        g = Generator(self.seed, self.offset)
        g._tables = self._tables  # the same seeds: share the device copies
        return g

    def __repr__(self) -> str:
        seed = list(self.seed) if self.per_sample else self.seed
        return f"fastdiff.Generator(seed={seed}, offset={self.offset})"


def _as_seed(seed) -> Union[int, Tuple[int, ...]]:
    """An int seed as an int; a list / tuple / 1-d integer tensor (or array) of them as a tuple."""
    if hasattr(seed, "__index__") and not (hasattr(seed, "ndim") and seed.ndim > 0):
        return _as_u64("seed", seed)  # Generator(int): unchanged
    if hasattr(seed, "dtype") and hasattr(seed, "ndim"):  # a torch tensor / NumPy array
        if seed.ndim != 1:
            raise ValueError(f"seed: expected an int or a 1-d sequence of per-sample seeds, got shape {tuple(seed.shape)}")
        kind = str(seed.dtype)
        if "int" not in kind or "bool" in kind:
            raise TypeError(f"seed: expected integer seeds, got dtype {seed.dtype}")
        seed = seed.tolist()  # once, at construction: the kernels read the cached device copy
    if not isinstance(seed, (list, tuple)):
        raise TypeError(f"seed: expected an int, a list of ints or a 1-d integer tensor, got {type(seed).__name__}")
    if len(seed) == 0:
        raise ValueError("seed: expected at least one per-sample seed, got an empty sequence")
    out = []
    for i, v in enumerate(seed):
        if isinstance(v, bool):
            raise TypeError(f"seed[{i}]: expected an int, got bool")
        out.append(_as_u64(f"seed[{i}]", v))
    return tuple(out)


def _as_u64(name: str, v) -> int:
    try:
        v = operator.index(v)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}") from None
    if not 0 <= v < _U64:
        raise ValueError(f"{name}: expected 0 <= {name} < 2**64, got {v}")
    return v


default_generator = Generator(0)
