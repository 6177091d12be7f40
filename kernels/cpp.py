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


# =========================================================================== fused_step
# csrc/fused_step.cpp; the contract: fastdiff/ops/fused_step.py.  (Section-level imports, unlike
# the sections that import per call: a small step's whole budget is ~20 us, an import statement
# per call ~0.5 us.  The module still imports without the C++ build.)
import torch  # noqa: E402

try:
    from fastdiff import _C
except ImportError:  # not built: the "cpp" backend is never chosen, these launchers never run
    _C = None

_FUSED_STEP_DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # the kernel's dtype codes


def fused_step(out, ins, coefs, inner, noise_mode, noise, seed, offset, start=0) -> None:
    """``_C.fused_step`` on CPU tensors: ``out``, ``ins`` (0..6) and ``noise`` (or None) contiguous,
    of ``out.numel()`` elements and ``out``'s dtype (float32 / float16 / bfloat16); ``coefs``: k + 1
    floats, or a float32 contiguous (R, k + 1) tensor read through its pointer; ``inner``: elements
    per coefficient row; ``start``: global index of ``out[0]``; noise mode 0/1/2, Philox
    ``(seed, offset + start + i)``; ``seed`` an int64 (B,) contiguous CPU tensor (per-sample seeds):
    element ``start + i = b per + j`` from ``(seed[b], offset + j)``, ``per = out.numel() // B``
    (``start == 0``; a window of a larger tensor would pass that tensor's ``per``)."""
    if isinstance(coefs, torch.Tensor):
        coef_ptr, scalars = coefs.data_ptr(), []
    else:
        coef_ptr, scalars = 0, [float(v) for v in coefs]
    seeds_ptr = per = 0
    if isinstance(seed, torch.Tensor):
        seeds_ptr, per, seed = seed.data_ptr(), out.numel() // seed.numel(), 0
    _C.fused_step(
        out.data_ptr(), [t.data_ptr() for t in ins], _FUSED_STEP_DTYPE[out.dtype], out.numel(), inner, start,
        coef_ptr, scalars, noise_mode, noise.data_ptr() if noise is not None else 0, seed, offset, seeds_ptr, per,
    )


# =========================================================================== discrete_langevin
# csrc/discrete_langevin.cpp; the contract: fastdiff/ops/discrete_langevin.py.
def discrete_flip(out, anchor, score, a: float, b: float, seed: int, offset: int) -> int:
    """``_C.discrete_flip`` on CPU float32 tensors: ``out``, ``anchor`` and ``score`` (or None)
    contiguous, ``out.numel()`` elements each; ``offset % 4 == 0``; ``seed`` an int.  Returns the
    number of ``anchor`` entries not in {-1, +1}."""
    return _C.discrete_flip(out.data_ptr(), anchor.data_ptr(), score.data_ptr() if score is not None else 0, out.numel(),
                     float(a), float(b), int(seed) & 0xFFFFFFFFFFFFFFFF, int(offset))


# =========================================================================== trajectory
# csrc/trajectory.cpp; the contract and the tables: fastdiff/ops/trajectory.py.
def molrg_trajectory(x, I, B, ucat, offsets, params, p_istride, labels, hard, coef, idx, t0, t1, traj, seed) -> None:
    """``_C.molrg_trajectory``: steps ``[t0, t1)`` of the fused MoLRG trajectory, ``x`` updated in
    place.  x: (I B, n) float32 contiguous; ucat: (I, n, D) float32 contiguous; offsets: K + 1 ints;
    params: float32 contiguous, instance stride ``p_istride`` elements (0: shared); labels: (I B,)
    int64 contiguous or None; coef (T, 8) float32 and idx (T, 5) int64 contiguous; traj:
    (S, I B, n) float32 contiguous or None; seed: the generator's seed."""
    from fastdiff import _C

    _C.molrg_trajectory(x.data_ptr(), I, B, x.shape[1], ucat.data_ptr(), offsets, params.data_ptr(), p_istride,
                        labels.data_ptr() if labels is not None else 0, bool(hard), coef.data_ptr(), idx.data_ptr(),
                        t0, t1, traj.data_ptr() if traj is not None else 0, seed)


# =========================================================================== molrg
# The four MoLRG kernels (csrc/molrg_forward.cpp, molrg_backward.cpp, molrg_mix.cpp), float32 only.
# What they share:
#   offsets  K + 1 column offsets of the components in Ucat (strictly increasing, offsets[K] = D);
#   params   (R, 3K + 2) float32 contiguous, rows [g_k | b_k | C_k | A | gw], R in {1, B}
#            (R = 1: one row for the whole batch);
#   labels   (B,) int64 contiguous, values in [0, K), or None (no guidance);
#   hard     one-hot argmax weights instead of the softmax.
# Every other tensor is float32, contiguous (row-major); outputs are written, never read.
def _molrg_ptr(t) -> int:
    """A tensor's address, 0 for None (the kernels' "absent")."""
    return t.data_ptr() if t is not None else 0


def molrg_forward(x, ucat, offsets, params, labels, hard: bool, out, w) -> None:
    """The fused forward: ``out = A x + sum_k w'_k C_k U_k U_k^T x``.  x, out (B, n); ucat (n, D);
    w (B, K) (the posterior before guidance) or None."""
    from fastdiff import _C

    B, n = x.shape
    _C.molrg_forward(x.data_ptr(), out.data_ptr(), _molrg_ptr(w), B, n, ucat.data_ptr(), offsets, params.data_ptr(),
                     params.shape[0], _molrg_ptr(labels), hard)


def molrg_backward(x, G, w, ucat, offsets, params, labels, hard: bool, dx, dU) -> None:
    """The fused backward: ``dx = A G + dP Ucat^T``, ``dU = G^T q + x^T dP`` (both overwritten).
    x, G, dx (B, n), dx not aliasing x or G; w (B, K) the forward's posterior; ucat, dU (n, D)."""
    from fastdiff import _C

    B, n = x.shape
    _C.molrg_backward(x.data_ptr(), G.data_ptr(), w.data_ptr(), dx.data_ptr(), dU.data_ptr(), B, n, ucat.data_ptr(),
                      offsets, params.data_ptr(), params.shape[0], _molrg_ptr(labels), hard)


def molrg_mix(P, offsets, params, labels, hard: bool, q, w) -> None:
    """The forward's per-row mix between the two GEMMs: from P = x Ucat (B, D), writes
    ``q_j = w'_{k(j)} C_{k(j)} P_j`` (B, D) and w (B, K) (or None)."""
    from fastdiff import _C

    _C.molrg_mix(P.data_ptr(), q.data_ptr(), _molrg_ptr(w), P.shape[0], offsets, params.data_ptr(), params.shape[0],
                 _molrg_ptr(labels), hard)


def molrg_mix_backward(P, dP, w, offsets, params, labels, hard: bool, q) -> None:
    """The backward's per-row mix: P (B, D); dP (B, D) holds dq = G Ucat on entry and dP on exit
    (in place); w (B, K) the forward's posterior; writes q (B, D)."""
    from fastdiff import _C

    _C.molrg_mix_backward(P.data_ptr(), dP.data_ptr(), w.data_ptr(), q.data_ptr(), P.shape[0], offsets,
                          params.data_ptr(), params.shape[0], _molrg_ptr(labels), hard)


# =========================================================================== svd
def svdvals_rank(A, eta, S, rank) -> None:
    """Batched singular values with the energy rank fused in (csrc/svd.cpp, float64 arithmetic).
    A (B, m, n) float32 or float64 contiguous; S (B, min(m, n)) A's dtype, written descending;
    rank (B,) int64 or None (then ``eta`` is unused and may be None)."""
    import torch

    from fastdiff import _C

    B, m, n = A.shape
    _C.svdvals_rank(A.data_ptr(), 0 if A.dtype == torch.float32 else 1, B, m, n, S.data_ptr(),
                    rank.data_ptr() if rank is not None else 0,
                    eta if eta is not None else 1.0)


# =========================================================================== empirical scan
# csrc/empirical.cpp; the contract: fastdiff/ops/empirical.py (its caller,
# fastdiff.denoisers.empirical_posterior, checks it).
def empirical_scan(xh, data, center, g1, g2, h, lo: float, hi: float, soft: bool, want_acc: bool, kc: int, chunk,
                   acc_cols=None):
    """``_C.empirical_scan`` on CPU tensors, all contiguous: xh (B, n), center (n,), g1, g2, h (B,)
    of one compute dtype (float32 / float64); data (N, n) that dtype or uint8; 0 <= kc <= N;
    ``acc_cols`` None or (ncol,) int64 column indices (acc (B, ncol): those columns only).
    ``chunk`` is not used (the kernel streams the data in its own cache-sized tiles).  Returns
    ``(m, l, acc or None, best_v, best_i, ymax2)``, allocated poisoned (NaN, index -1) and all
    written by the kernel; OpenMP threads = torch.get_num_threads(), the GIL released."""
    B, n = xh.shape
    N = data.shape[0]
    ct = xh.dtype
    nan = float("nan")
    m, l = torch.full((B,), nan, dtype=ct), torch.full((B,), nan, dtype=ct)
    if acc_cols is not None:    # the kernel reads int64 contiguously
        acc_cols = acc_cols.to(torch.int64).contiguous()
    acc = torch.full((B, n if acc_cols is None else acc_cols.numel()), nan, dtype=ct) if want_acc else None
    best_v = torch.full((B, kc), nan, dtype=ct)
    best_i = torch.full((B, kc), -1, dtype=torch.int64)
    ymax2 = torch.full((), nan, dtype=ct)
    _C.empirical_scan(xh.data_ptr(), data.data_ptr(), center.data_ptr(), g1.data_ptr(), g2.data_ptr(), h.data_ptr(),
                      0 if ct == torch.float32 else 1, data.dtype == torch.uint8, B, N, n, float(lo), float(hi),
                      bool(soft), bool(want_acc), int(kc), m.data_ptr(), l.data_ptr(),
                      acc.data_ptr() if acc is not None else 0, best_v.data_ptr(), best_i.data_ptr(),
                      ymax2.data_ptr(), 0 if acc_cols is None else acc_cols.data_ptr(),
                      0 if acc_cols is None else acc_cols.numel(), torch.get_num_threads())
    return m, l, acc, best_v, best_i, ymax2
