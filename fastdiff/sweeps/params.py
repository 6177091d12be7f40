"""Parameters several experiments share, and their cell checks: one definition, one error message.

The MoLRG experiments (subspace-recovery, memorization, jacobian-rank) share the data's shape
``(n, K, d)``; the learning experiments (subspace-recovery, memorization, linear-diffusion) the
training-set size ``N``; the DDPM samplers the step count ``T``.  Each experiment chooses its own
defaults.  The checks raise the ``ValueError`` the CLI prints, naming the flag.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

from fastdiff.sweeps.runner import Param

__all__ = ["molrg_shape", "training_samples", "ddpm_steps", "check_at_least_one", "check_d_fits",
           "check_orthogonal_fits", "check_ddpm_steps"]


def molrg_shape(n: Tuple[int, ...], K: Tuple[int, ...], d: Tuple[int, ...], K_help: str) -> Tuple[Param, Param, Param]:
    """The parameters ``n`` (ambient dimension), ``K`` (subspaces) and ``d`` (subspace dimension)."""
    return (Param("n", int, n, "ambient dimension"), Param("K", int, K, K_help),
            Param("d", int, d, "subspace dimension"))


def training_samples(default: Tuple[int, ...], help: str = "training samples") -> Param:
    """The parameter ``N``: the size of the training set a model is fitted to."""
    return Param("N", int, default, help)


def ddpm_steps(default: Tuple[int, ...], help: str) -> Param:
    """The parameter ``T``: the DDPM steps of seed 001's schedule."""
    return Param("T", int, default, help)


def check_at_least_one(c: Dict, names: Sequence[str]) -> None:
    for name in names:
        if c[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected {name} >= 1, got {c[name]}")


def check_d_fits(c: Dict) -> None:
    if c["d"] > c["n"]:
        raise ValueError(f"--d: expected d <= n = {c['n']}, got d = {c['d']}")


def check_orthogonal_fits(c: Dict, hint: str = "") -> None:
    """K mutually orthogonal d-dimensional bases in R^n need ``K d <= n``; ``hint`` ends the message."""
    if c["K"] * c["d"] > c["n"]:
        raise ValueError(f"--K/--d: orthogonal bases need K d <= n, got K d = {c['K'] * c['d']} > n = {c['n']}{hint}")


def check_ddpm_steps(c: Dict) -> None:
    if c["T"] < 2:
        raise ValueError(f"--T: expected T >= 2 steps, got {c['T']}")
