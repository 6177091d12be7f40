"""Reverse-step coefficients: one pure function per step method (docs/math.md section 1).

Every reverse step of :mod:`fastdiff.steps` is, per sample, the affine map
``out = sum_j c_j in_j + c_z z`` of its input tensors and one normal draw.  The functions here
compute those coefficients from the schedule values, in float64 on the host (Python floats) or
as per-sample float64 tensors (the same expressions, elementwise), in the pattern of
k-diffusion's ``to_d`` / ``get_ancestral_step``.  They are the only place the formulas live:
the step API (:mod:`fastdiff.steps`), the trajectory tables (:func:`fastdiff.sampling.trajectory_table`,
hence the fused trajectory kernel and the exact Gaussian analysis
:mod:`fastdiff.gaussian_exact`) all call them, so "fused equals loop" holds
by construction: the same float64 expressions, in the same order, round to the same float32.

Coefficients are named by what they multiply: ``x`` (the state), ``eps`` / ``x0`` / ``score``
(the prediction in that form), ``z`` (the normal draw).  :func:`prediction_forms` turns a model
output of any prediction type into the ``x0`` / ``eps`` forms.

Two modules, one namespace: :mod:`.single` (the helpers, prediction types, spacings and the
single-step methods) and :mod:`.multistep` (the exponential integrators, LMS, DEIS, iPNDM, LCM /
TCD, UniPC); ``fastdiff.coefficients.unipc`` and the rest are re-exported here.
"""
from fastdiff.coefficients.single import *  # noqa: F401,F403  (one namespace: C.ddpm, C.unipc, ...)
from fastdiff.coefficients.single import __all__ as _single
from fastdiff.coefficients.multistep import *  # noqa: F401,F403
from fastdiff.coefficients.multistep import __all__ as _multistep

__all__ = list(_single) + list(_multistep)
