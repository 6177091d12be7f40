"""The counter-based random stream shared by every backend (SPEC 0).

A :class:`Generator` is just ``(seed, offset)``: the normal with global index ``g`` is a pure
function of ``(seed, g)`` (Philox4x32-10 + Box-Muller, :mod:`fastdiff.reference.rng`), so the
C++ kernels, the Triton kernels, the CUDA kernels and the torch fallback all draw the same
numbers, and a kernel can draw them in any order and in parallel.  Each call that draws ``n``
normals takes the window ``[offset, offset + n)`` and advances ``offset`` past it, rounded up
to a multiple of 4 (one Philox call yields 4 normals; keeping windows quad-aligned lets the
kernels generate whole quads), so consecutive steps never reuse noise.
"""
from __future__ import annotations

import operator

__all__ = ["Generator", "default_generator"]

_U64 = 1 << 64
_MAX_OFFSET = 1 << 63  # offsets are int64 kernel arguments; 2^63 normals is beyond any run


class Generator:
    """Philox stream position ``(seed, offset)``.

    >>> g = fastdiff.Generator(0)
    >>> x = fastdiff.ddpm_step(x, eps, t, sched, generator=g)   # draws x.numel() normals
    """

    __slots__ = ("seed", "offset")

    def __init__(self, seed: int = 0, offset: int = 0):
        self.seed = _as_u64("seed", seed)
        offset = _as_u64("offset", offset)
        if offset >= _MAX_OFFSET:
            raise ValueError(f"offset: expected < 2**63, got {offset}")
        if offset % 4:
            raise ValueError(f"offset: expected a multiple of 4 (whole Philox quads), got {offset}")
        self.offset = offset

    def manual_seed(self, seed: int) -> "Generator":
        self.seed, self.offset = _as_u64("seed", seed), 0
        return self

    def draw(self, n: int) -> int:
        """Reserve ``n`` normals; returns the offset of the first and advances past them."""
        start = self.offset
        end = start + ((n + 3) & ~3)
        if end >= _MAX_OFFSET:
            raise OverflowError(f"generator: drawing {n} normals at offset {start} passes 2**63; reseed it")
        self.offset = end
        return start

    def get_state(self) -> tuple:
        return (self.seed, self.offset)

    def set_state(self, state) -> "Generator":
        seed, offset = state
        self.__init__(seed, offset)
        return self

    def clone(self) -> "Generator":
        return Generator(self.seed, self.offset)

    def __repr__(self) -> str:
        return f"fastdiff.Generator(seed={self.seed}, offset={self.offset})"


def _as_u64(name: str, v) -> int:
    try:
        v = operator.index(v)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}") from None
    if not 0 <= v < _U64:
        raise ValueError(f"{name}: expected 0 <= {name} < 2**64, got {v}")
    return v


default_generator = Generator(0)
