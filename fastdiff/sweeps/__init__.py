"""Phase-diagram sweeps (issue 6, SPEC 4): experiments run over grids of parameters as a few large
batched computations, stored in a resumable SQLite file, on this process or a Ray cluster.

>>> from fastdiff import sweeps
>>> store = sweeps.run_sweep("subspace-recovery", {"K": 1, "d": "1:12", "N": "2:48:2"}, store="results/sr.sqlite")
>>> sweeps.plot_store("results/sr.sqlite", "results")

Experiments (``EXPERIMENTS``): ``subspace-recovery`` (:mod:`.subspace`), ``linear-diffusion``
(:mod:`.linear`), ``memorization`` (:mod:`.memorization`), ``memorization-images`` (:mod:`.memorization_images`), ``jacobian-rank`` (:mod:`.jacobian`),
``network-generalization`` (:mod:`.networks`: a U-Net or MLP trained on the diffusion loss);
``fastdiff sweep sampler-error`` (:mod:`.sampler_error`) is computed exactly, not a grid of trials.
The models they fit (PCA, K-subspaces, SGD on the diffusion loss, the Gaussian) are
:mod:`.learners`; the parameters they share, :mod:`.params`; a cell's random numbers, :mod:`.streams`;
the collapse time of a training set from its excess entropy (Biroli et al. 2024), :mod:`.collapse`.
"""
from fastdiff.sweeps.runner import EXPERIMENTS, Experiment, Param, build_grid, parse_values, plan, run_sweep
from fastdiff.sweeps.store import Store
from fastdiff.sweeps.plots import plot_store
from fastdiff.sweeps import jacobian, linear, memorization, memorization_images, networks, subspace  # noqa: F401  (register their experiments)

__all__ = ["EXPERIMENTS", "Experiment", "Param", "Store", "build_grid", "parse_values", "plan", "plot_store", "run_sweep"]
