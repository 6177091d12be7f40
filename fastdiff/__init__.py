"""fastdiff: fused compiled kernels for diffusion models.

Reverse steps (:mod:`fastdiff.steps`), analytic denoisers and the objects holding
their parameters (:mod:`fastdiff.denoisers`), schedules and the samplers' noise levels
(:mod:`fastdiff.sigmas`), the shared Philox stream (and the Brownian paths drawn from it,
:mod:`fastdiff.brownian`), and one dispatch point
(:mod:`fastdiff.backends`) choosing Triton, CUDA, C++ or torch per call; batched SVD and
Jacobian ranks (:mod:`fastdiff.linalg`).
"""
from fastdiff import data, denoisers, sigmas
from fastdiff.backends import available
from fastdiff.brownian import BrownianNoise
from fastdiff.dispatch import info as _info_text
from fastdiff.denoisers import empirical_denoise, gaussian_denoise, molrg_denoise, nearest_neighbors
from fastdiff.generator import Generator, default_generator
from fastdiff.linalg import (
    jacobian,
    jacobian_rank,
    jacobian_rank_trajectory,
    molrg_jacobian,
    molrg_jacobian_rank,
    svd,
    svdvals,
    svdvals_rank,
)
from fastdiff.capture import CapturedSampler
from fastdiff.discrete import binary_flip, discrete_langevin, discrete_langevin_step
from fastdiff.sampling import sample
from fastdiff import conditional, multimeasurement
from fastdiff.sure import sure
from fastdiff.schedules import DDPMSchedule, KarrasSchedule
from fastdiff.steps import (
    PREDICTIONS,
    affine_step,
    ddim_step,
    ddpm_step,
    edm_churn,
    euler_ancestral_step,
    euler_step,
    heun_step,
    langevin_step,
    ou_reverse_step,
    predict_x0,
    randn,
)

__version__ = "0.1.0"


def info(print_: bool = True) -> str:
    """Which backends work here (and what ``backend="auto"`` picks); printed and returned."""
    text = _info_text()
    if print_:
        print(text)
    return text


def manual_seed(seed: int) -> Generator:
    """Reset :data:`default_generator` to ``(seed, 0)``."""
    return default_generator.manual_seed(seed)


__all__ = [
    "DDPMSchedule", "KarrasSchedule", "Generator", "BrownianNoise", "default_generator", "manual_seed", "info", "available",
    "PREDICTIONS", "affine_step", "ddpm_step", "ddim_step", "euler_step", "edm_churn", "euler_ancestral_step", "heun_step",
    "langevin_step", "ou_reverse_step", "predict_x0", "randn",
    "molrg_denoise", "gaussian_denoise", "empirical_denoise", "nearest_neighbors", "denoisers",
    "svdvals", "svdvals_rank", "jacobian_rank", "svd", "jacobian", "molrg_jacobian", "molrg_jacobian_rank",
    "jacobian_rank_trajectory", "sample", "CapturedSampler", "sigmas", "data",
    "binary_flip", "discrete_langevin", "discrete_langevin_step", "sure", "conditional", "multimeasurement",
]
