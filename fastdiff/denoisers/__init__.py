"""Analytic denoisers (docs/math.md section 2): MoLRG softmax projection, Gaussian, empirical (memorizing).

All return the posterior mean ``x0_hat = E[x_0 | x_t]`` of ``x_t = alpha x_0 + sigma eps`` (or its
eps / score form) for ``x`` of shape (B, n), with scalar or per-sample (B,) ``alpha, sigma``.

The functions (:func:`molrg_denoise`, :func:`gaussian_denoise`, :func:`empirical_denoise`,
:func:`nearest_neighbors`) and the objects holding their parameters, ``den(x, alpha, sigma) ->
x0_hat`` (B, n) (:class:`MoLRG`, :class:`Gaussian`, :class:`Empirical`; samplers can call any of
them, or any other callable with that signature; ``MoLRG.sample`` and ``Gaussian.sample`` draw
data from the model).  One module per model: :mod:`.molrg` (its op, the kernels' glue, in
:mod:`fastdiff.ops.molrg`; the packed-bases cache in ``_cache``), :mod:`.gaussian`, :mod:`.empirical`; shared argument
checks in ``_args``.
"""
from fastdiff.denoisers._cache import pack_bases
from fastdiff.denoisers.empirical import Empirical, empirical_denoise, nearest_neighbors
from fastdiff.denoisers.gaussian import Gaussian, gaussian_denoise, psd_eigenvalues
from fastdiff.denoisers.molrg import MoLRG, molrg_denoise
from fastdiff.denoisers.mixture import GaussianMixture, mixture_components

__all__ = ["MoLRG", "Gaussian", "Empirical", "GaussianMixture", "mixture_components", "molrg_denoise", "gaussian_denoise", "empirical_denoise",
           "nearest_neighbors", "pack_bases", "psd_eigenvalues"]
