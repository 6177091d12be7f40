"""Test support: run the Triton interpreter's grid programs in a seeded random order.

Under TRITON_INTERPRET=1 the interpreter runs the programs of a launch one after another in
row-major grid order, so a kernel whose result depends on program order (an atomic counter, one
program reading what another wrote, a cross-program reduction in a fixed order) always sees the
same, benign schedule on the CPU.  ``shuffled_program_order(seed)`` changes the schedule.

How: every interpreter version iterates the grid with its own loop, but each iteration calls
``interpreter_builder.set_grid_dim(*grid)`` once per launch and then, before running a program,
``interpreter_builder.set_grid_idx(x, y, z)`` -- the only thing ``tl.program_id`` reads.  The
patch leaves the loop alone and remaps that index: the program the loop would run at grid
position l (row-major linear index) becomes program perm[l], perm a fresh random permutation of
the grid per launch.  So the programs execute in the order perm[0], perm[1], ...; each runs
exactly once.  Only the two methods of the interpreter's builder class are patched, and restored
on exit.  A structure this does not recognise raises ``ShuffleUnsupported`` (a test should skip
with its message) instead of silently running in order.
"""
from __future__ import annotations

import contextlib
import inspect
import random


class ShuffleUnsupported(RuntimeError):
    """The installed Triton interpreter does not have the structure the patch relies on."""


def _interpreter():
    """(module, builder class): checks every assumption the patch makes, else ShuffleUnsupported."""
    try:
        import triton.runtime.interpreter as interp
    except Exception as e:  # pragma: no cover - depends on the installation
        raise ShuffleUnsupported(f"triton.runtime.interpreter not importable: {e!r}") from e
    builder = getattr(interp, "interpreter_builder", None)
    cls = type(builder)
    if builder is None or not all(callable(getattr(cls, m, None)) for m in ("set_grid_dim", "set_grid_idx")):
        raise ShuffleUnsupported("triton.runtime.interpreter.interpreter_builder has no set_grid_dim / "
                                 f"set_grid_idx (triton {_version()}): cannot remap program ids")
    executor = getattr(interp, "GridExecutor", None)
    try:
        src = inspect.getsource(executor.__call__) if executor is not None else ""
    except (OSError, TypeError):
        src = ""
    # the grid loop must go through these two calls, or remapping them would change nothing
    if "interpreter_builder.set_grid_dim(" not in src or "interpreter_builder.set_grid_idx(" not in src:
        raise ShuffleUnsupported("GridExecutor.__call__ does not set the grid through interpreter_builder."
                                 f"set_grid_dim / set_grid_idx (triton {_version()}): cannot shuffle")
    # newer interpreters also hand the index to other builders (gluon's): those would keep the
    # in-order ids, so the programs would disagree about who they are
    if src.count(".set_grid_idx(") != src.count("interpreter_builder.set_grid_idx("):
        raise ShuffleUnsupported("GridExecutor.__call__ sets program ids on builders other than "
                                 f"interpreter_builder (triton {_version()}): remapping one would be inconsistent")
    return interp, cls


def _version():
    try:
        import triton
        return triton.__version__
    except Exception:  # pragma: no cover
        return "?"


def check_supported() -> None:
    """Raise ShuffleUnsupported (with the reason) if the interpreter cannot be shuffled."""
    _interpreter()


@contextlib.contextmanager
def shuffled_program_order(seed: int, log=None):
    """Within the block, every interpreted launch runs its grid programs in a random permutation.

    seed: the permutations are drawn from ``random.Random(seed)``, one per launch, so the same
    sequence of launches gets the same orders.  log: optional list; each launch appends the
    linear program ids in the order they ran (row-major: (x * gy + y) * gz + z).
    """
    _, cls = _interpreter()
    orig_dim, orig_idx = cls.set_grid_dim, cls.set_grid_idx
    rng = random.Random(seed)
    state = {}

    def set_grid_dim(self, nx, ny, nz):
        orig_dim(self, nx, ny, nz)
        perm = list(range(nx * ny * nz))
        rng.shuffle(perm)
        state[id(self)] = ((nx, ny, nz), perm)
        if log is not None:
            log.append([])

    def set_grid_idx(self, x, y, z):
        dims, perm = state.get(id(self), (None, None))
        if dims is None or tuple(self.grid_dim) != dims:  # a launch begun outside the block
            raise ShuffleUnsupported("a program id was set without this block seeing its launch's "
                                     "set_grid_dim: cannot map it to the launch's permutation")
        _, ny, nz = dims
        p = perm[(x * ny + y) * nz + z]
        if log is not None:
            log[-1].append(p)
        orig_idx(self, p // (ny * nz), (p // nz) % ny, p % nz)

    cls.set_grid_dim, cls.set_grid_idx = set_grid_dim, set_grid_idx
    try:
        yield
    finally:
        cls.set_grid_dim, cls.set_grid_idx = orig_dim, orig_idx
