"""The launchers of every ``fastdiff._C`` call: tensors to raw pointers and sizes, nothing else.

The C++ kernels (``csrc/``, pybind11, OpenMP, no torch linkage) take ``data_ptr()`` integers, so
each function here states the shapes, dtypes and contiguity its kernel assumes; the op modules
(``fastdiff/ops/<op>.py``) call these only with tensors the public API has validated.  A misuse
reads past the end of a buffer, which is why nothing outside ``fastdiff.ops`` calls them.
"""
from __future__ import annotations


# =========================================================================== ksubspaces
# csrc/ksubspaces.cpp: fastdiff._C.top_subspace and fastdiff._C.ksubspaces (one entry point that
# seeds the starts, or iterates and refits them).  Every tensor: CPU, contiguous; data float32,
# counts int64 (B,) with 0 <= counts[b] <= N (>= 1 for ksubspaces; the kernel checks them and
# raises ValueError);
# converged torch.bool (read as uint8).  Outputs are written in place, OpenMP threads =
# torch.get_num_threads(), the GIL released for the whole batch.  (torch and _C are imported in
# the functions: this section stands alone, and the module imports without the C++ build.)
def top_subspace(X, counts, V0, tol: float, max_iter: int, V, converged) -> None:
    """``fastdiff._C.top_subspace``: X (B, N, n), V0 and V (B, n, d), converged (B,)."""
    import torch

    from fastdiff import _C

    B, N, n = X.shape
    _C.top_subspace(X.data_ptr(), B, N, n, counts.data_ptr(), V0.shape[-1], V0.data_ptr(), tol, max_iter,
                    V.data_ptr(), converged.data_ptr(), torch.get_num_threads())


def ksubspaces_seed(X, counts, K: int, u, starts) -> None:
    """``fastdiff._C.ksubspaces`` seeding only: X (B, N, n), uniforms u (B, R), starts (B, R, K, n, d) out."""
    import torch

    from fastdiff import _C

    B, N, n = X.shape
    _C.ksubspaces(X.data_ptr(), B, N, n, counts.data_ptr(), K, starts.shape[-1], u.shape[1], u.data_ptr(),
                  starts.data_ptr(), 0, 0, 0, 0, 0.0, 0, 0, torch.get_num_threads())


def ksubspaces(X, counts, K: int, starts, max_iter: int, tol: float, refit_iter: int, bases, labels, converged) -> None:
    """``fastdiff._C.ksubspaces`` from given starts (B, R, K, n, d): bases (B, K, n, d), labels int64
    (B, N) and converged (B, K) of the best start out (no iteration counts)."""
    import torch

    from fastdiff import _C

    B, N, n = X.shape
    _C.ksubspaces(X.data_ptr(), B, N, n, counts.data_ptr(), K, starts.shape[-1], starts.shape[1], 0,
                  starts.data_ptr(), max_iter, bases.data_ptr(), labels.data_ptr(), converged.data_ptr(),
                  tol, refit_iter, 0, torch.get_num_threads())
