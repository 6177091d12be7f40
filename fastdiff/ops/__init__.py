"""The ops: one module per op, the same vertical slice for each (see docs/architecture.md).

=======================  ==========================================================================
``fused_step``           ``out = sum_j c_j in_j + c_k z`` (every solver step of :mod:`fastdiff.steps`)
``molrg``                the MoLRG posterior mean / CFG / backward (:mod:`fastdiff.denoisers.molrg`)
``svd``                  batched singular values and energy ranks (:mod:`fastdiff.linalg`)
``trajectory``           a whole MoLRG sampling trajectory in one kernel (:func:`fastdiff.sample`)
``ksubspaces``           K-subspaces clustering (:mod:`fastdiff.sweeps.learners`)
``discrete_langevin``    the sign flip of the discrete samplers (:mod:`fastdiff.discrete`)
=======================  ==========================================================================

Each ``fastdiff/ops/<op>.py`` holds the op's contract (math, shapes, dtypes), its row of the
dispatch table (``ROW``, an :class:`fastdiff.ops.table.Op`), the
pure-torch form and the autograd / ``torch.library`` registration.  The launchers (tensors to
pointers and grids) are ``fastdiff/kernels/<op>.py`` (Triton), ``fastdiff/kernels/cpp.py`` (every
``fastdiff._C`` call) and ``fastdiff/_cuda.py`` (NVRTC).  :mod:`fastdiff.dispatch` collects the
rows into the one table and is the only place ``backend="auto"`` is decided; an op module never
imports it (the public API chooses the backend, then calls the op with a concrete one).

This package imports none of its modules: importing one op does not load the others.
"""
