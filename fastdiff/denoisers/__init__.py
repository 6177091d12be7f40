"""Analytic denoisers (docs/math.md section 2): MoLRG softmax projection, Gaussian, empirical (memorizing);
and the discrete models under binary-flip noise (:mod:`.binary`, docs/math.md section 7).

All return the posterior mean ``x0_hat = E[x_0 | x_t]`` of ``x_t = alpha x_0 + sigma eps`` (or its
eps / score form) for ``x`` of shape (B, n), with scalar or per-sample (B,) ``alpha, sigma``.

The functions (:func:`molrg_denoise`, :func:`gaussian_denoise`, :func:`empirical_denoise`,
:func:`nearest_neighbors`) and the objects holding their parameters, ``den(x, alpha, sigma) ->
x0_hat`` (B, n) (:class:`MoLRG`, :class:`Gaussian`, :class:`Empirical`; samplers can call any of
them, or any other callable with that signature; ``MoLRG.sample`` and ``Gaussian.sample`` draw
data from the model).  One module per model: :mod:`.molrg` (its op, the kernels' glue, in
:mod:`fastdiff.ops.molrg`; the packed-bases cache in ``_cache``), :mod:`.gaussian`, :mod:`.empirical`, :mod:`.patch` (local / equivariant local patch machines, PSPC), :mod:`.knn` (the
nearest-neighbour importance-sampled estimate of the empirical denoiser, :class:`KNNEmpirical`); shared argument
checks in ``_args``.
"""
from fastdiff.denoisers._cache import pack_bases
from fastdiff.denoisers.binary import BinaryEmpirical, BinaryMixture
from fastdiff.denoisers.empirical import (Empirical, EmpiricalPosterior, empirical_denoise, empirical_logp,
                                          empirical_posterior, nearest_neighbors)
from fastdiff.denoisers.knn import KNNEmpirical, KNNProposal, knn_denoise, knn_proposal
from fastdiff.denoisers.gaussian import Gaussian, gaussian_denoise, psd_eigenvalues
from fastdiff.denoisers.molrg import MoLRG, molrg_denoise
from fastdiff.denoisers.gmm import GaussianMixture, MixturePosterior, as_mixture, mixture_components
from fastdiff.denoisers.patch import PatchDenoiser, patch_denoise

__all__ = ["MoLRG", "Gaussian", "Empirical", "GaussianMixture", "BinaryMixture", "BinaryEmpirical", "PatchDenoiser",
           "molrg_denoise", "gaussian_denoise", "empirical_denoise", "nearest_neighbors", "empirical_posterior",
           "empirical_logp", "EmpiricalPosterior", "MixturePosterior", "mixture_components", "as_mixture",
           "patch_denoise", "knn_denoise", "knn_proposal", "KNNEmpirical", "KNNProposal", "pack_bases", "psd_eigenvalues"]
