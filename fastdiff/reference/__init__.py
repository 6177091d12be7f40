"""Pure-torch references: the SPEC's formulas written as directly as possible, for tests.

They compute in the dtype they are given (tests pass float64) and take explicit noise only.
"""
from fastdiff.reference import rng, steps  # noqa: F401
