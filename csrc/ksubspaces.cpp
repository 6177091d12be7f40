// K-subspaces clustering for the subspace-recovery sweep (CPU, float32): the learner of
// fastdiff.sweeps.learners.seed_bases / ksubspaces, one instance per OpenMP task.
//
// Per instance b with data X_b (N, n) of which the first counts[b] rows are points (the rest
// padding), R starts of K orthonormal (n, d) bases each:
//
//   seeding (u given), start r:  Xn = rows of X scaled to unit norm;
//     k = 0: seed = min(floor(u[b, r] counts[b]), counts[b] - 1); k > 0: the point of least
//     explained = sum_{k' < k} ||U_k'^T xn_i||^2 (first on ties);
//     U_k = Q of the QR of the min(d, counts) points of largest |cos| to the seed (zero columns
//     after them).
//   iteration (bases wanted), all R starts in lockstep, at most max_iter refits:
//     E[i, r, k] = ||U_{r,k}^T x_i||^2, label[i, r] = argmax_k (first on ties);
//     stop when no label of any start changed; else U_{r,k} <- Q of the QR of
//     sum_{i: label[i, r] = k} x_i (x_i^T U_{r,k})   (one subspace-iteration step of C_k).
//   result: the start of largest objective sum_i max_k E[i, r, k] (first on ties), its labels
//   (padding rows: label 0, as argmax over zero energies) and, for each cluster, the exact top-d
//   subspace of its points from that start's basis (top_subspace below).
//
// top_subspace (also an entry point: the pca learner): the top-d right singular subspace of the
// rows of X (m, n) from a start V0: V = qr(V0); repeat V <- qr(X^T X V) until
// ||X^T X V - V V^T X^T X V||_F <= tol ||X||_F^2 (V spans an invariant subspace; the check comes
// first, so a converged V is returned as it is); after max_iter updates the instance is flagged
// not converged (the caller finishes it with an exact SVD).
//
// Why here and not in torch: an instance is a few KB (N, n <= 48 in the default sweep), the
// batched torch form spends most of its time in per-matrix LAPACK QR calls and masked GEMMs over
// every component (K times the work of the assigned one), and holds the GIL between its ops; this
// loop keeps an instance in L1 and releases the GIL for a whole batch.
//
// QR: Householder (float32, like torch.linalg.qr of the float32 torch form) with LAPACK's conventions (dlarfg: beta = -sign(alpha) ||x||, H = I
// when the column's tail is zero; Q = H_1 ... H_d I[:, :d] as dorg2r), so Q equals
// torch.linalg.qr's up to rounding, also for rank-deficient blocks (an empty cluster gives
// Q = I[:, :d], as LAPACK).  Every dot product is an OpenMP SIMD reduction; the code is compiled
// twice, for AVX2 + FMA and for the baseline ISA, and the path is picked once at run time (as the
// other kernels: FASTDIFF_CPU_SIMD=sse2 forces the baseline).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_features.h"  // use_avx2(), FD_X86

#define FD_INLINE inline __attribute__((always_inline))

namespace fastdiff {

namespace {

FD_INLINE float dot(const float* a, const float* b, int64_t m) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < m; ++i) s += a[i] * b[i];
  return s;
}

FD_INLINE void axpy(float* y, float a, const float* x, int64_t m) {
#pragma omp simd
  for (int64_t i = 0; i < m; ++i) y[i] += a * x[i];
}

// Rows of a small GEMM with the accumulators in registers: out (rows, ldb) = A B, A(r, k) = a[r ar + k ak],
// B (K, ldb) row-major, ldb a multiple of 8; up to 8 vectors of 8 columns accumulate across all of k
// (an axpy per k would load and store the output row K times, and the output is the kernel's hot loop).
typedef float v8f __attribute__((vector_size(32)));

FD_INLINE int64_t padded(int64_t w) { return (w + 7) / 8 * 8; }

template <int NV>
FD_INLINE void gemm_cols(float* out, const float* a, int64_t ar, int64_t ak, const float* B, int64_t ldb,
                         int64_t rows, int64_t K, int64_t w0) {
  for (int64_t r = 0; r < rows; ++r) {
    v8f acc[NV];
    for (int c = 0; c < NV; ++c) acc[c] = v8f{};
    for (int64_t k = 0; k < K; ++k) {
      const float s = a[r * ar + k * ak];
      const float* b = B + k * ldb + w0;
      for (int c = 0; c < NV; ++c) {
        v8f v;
        std::memcpy(&v, b + 8 * c, sizeof v);
        acc[c] += s * v;
      }
    }
    std::memcpy(out + r * ldb + w0, acc, sizeof acc);
  }
}

FD_INLINE void gemm_rows(float* out, const float* a, int64_t ar, int64_t ak, const float* B, int64_t ldb,
                         int64_t rows, int64_t K) {
  int64_t w0 = 0;
  for (; ldb - w0 >= 64; w0 += 64) gemm_cols<8>(out, a, ar, ak, B, ldb, rows, K, w0);
  if (ldb - w0 >= 32) gemm_cols<4>(out, a, ar, ak, B, ldb, rows, K, w0), w0 += 32;
  if (ldb - w0 >= 16) gemm_cols<2>(out, a, ar, ak, B, ldb, rows, K, w0), w0 += 16;
  if (ldb - w0 >= 8) gemm_cols<1>(out, a, ar, ak, B, ldb, rows, K, w0);
}

// Q (m, d) column-major of the Householder QR of A (m, d) column-major (overwritten), m >= d.
FD_INLINE void householder_q(float* A, int64_t m, int64_t d, float* tau, float* Q) {
  for (int64_t j = 0; j < d; ++j) {
    float* a = A + j * m;
    const float tail = dot(a + j + 1, a + j + 1, m - j - 1);
    if (tail == 0.f) {  // dlarfg: nothing to annihilate, H = I (even for a negative alpha)
      tau[j] = 0.f;
      continue;
    }
    const float alpha = a[j];
    const float beta = -std::copysign(std::sqrt(alpha * alpha + tail), alpha);
    tau[j] = (beta - alpha) / beta;
    const float scale = 1.f / (alpha - beta);
    for (int64_t i = j + 1; i < m; ++i) a[i] *= scale;  // v = [1; a[j+1:]]
    a[j] = beta;
    for (int64_t c = j + 1; c < d; ++c) {                // A[j:, c] -= tau v (v^T A[j:, c])
      float* b = A + c * m;
      const float w = tau[j] * (b[j] + dot(a + j + 1, b + j + 1, m - j - 1));
      b[j] -= w;
      axpy(b + j + 1, -w, a + j + 1, m - j - 1);
    }
  }
  // Q = H_0 ... H_{d-1} I[:, :d], applied from the last reflector (H_j touches rows and columns >= j)
  std::fill(Q, Q + m * d, 0.f);
  for (int64_t c = 0; c < d; ++c) Q[c * m + c] = 1.f;
  for (int64_t j = d - 1; j >= 0; --j) {
    if (tau[j] == 0.f) continue;
    const float* a = A + j * m;
    for (int64_t c = j; c < d; ++c) {
      float* q = Q + c * m;
      const float w = tau[j] * (q[j] + dot(a + j + 1, q + j + 1, m - j - 1));
      q[j] -= w;
      axpy(q + j + 1, -w, a + j + 1, m - j - 1);
    }
  }
}

// Top-d right singular subspace of the rows X (m, n) (row-major), V (n, d) column-major: the start
// in, the result out (see the header).  Returns whether it converged within max_iter updates.
struct SubspaceWork {
  std::vector<float> A, Q, tau, T, Y, G, r;
  SubspaceWork(int64_t N, int64_t n, int64_t d) : A(n * d), Q(n * d), tau(d), T(N * d), Y(n * d), G(d * d), r(n) {}
};

FD_INLINE bool top_subspace_rows(const float* X, int64_t m, int64_t n, int64_t d, float* V, float tol,
                                 int64_t max_iter, SubspaceWork& w) {
  std::copy(V, V + n * d, w.A.begin());
  householder_q(w.A.data(), n, d, w.tau.data(), V);
  float scale = 0.f;
  for (int64_t i = 0; i < m; ++i) scale += dot(X + i * n, X + i * n, n);
  for (int64_t it = 0; it < max_iter; ++it) {
    for (int64_t i = 0; i < m; ++i)                           // T = X V
      for (int64_t j = 0; j < d; ++j) w.T[i * d + j] = dot(X + i * n, V + j * n, n);
    std::fill(w.Y.begin(), w.Y.end(), 0.f);                   // Y = X^T T, column-major
    for (int64_t j = 0; j < d; ++j)
      for (int64_t i = 0; i < m; ++i) axpy(&w.Y[j * n], w.T[i * d + j], X + i * n, n);
    float res = 0.f;                                          // ||Y - V (V^T Y)||_F^2
    for (int64_t j = 0; j < d; ++j) {
      std::copy(&w.Y[j * n], &w.Y[j * n] + n, w.r.begin());
      for (int64_t a = 0; a < d; ++a) axpy(w.r.data(), -dot(V + a * n, &w.Y[j * n], n), V + a * n, n);
      res += dot(w.r.data(), w.r.data(), n);
    }
    if (std::sqrt(res) <= tol * scale) return true;
    householder_q(w.Y.data(), n, d, w.tau.data(), V);
  }
  return false;
}

struct Job {
  const float* X;
  const int64_t* counts;
  const float* u;     // (B, R) or null: read the starts instead of seeding them
  float* starts;      // (B, R, K, n, d)
  float* bases;       // (B, K, n, d) or null: seeding only
  int64_t* labels;    // (B, N)
  int64_t* iters;     // (B,) or null
  uint8_t* converged; // (B, K): the exact refit of each cluster converged
  int64_t B, N, n, K, d, R, max_iter, refit_iter;
  float tol;
};

struct Workspace {
  std::vector<float> A, Q, tau, xn, explained, cosine, Vt, P, Y, E, V, Xk;
  std::vector<int64_t> order, lab;
  SubspaceWork sub;
  explicit Workspace(const Job& J) : sub(J.N, J.n, J.d) {
    V.resize(J.n * J.d);
    Xk.resize(J.N * J.n);
    const int64_t W = padded(J.R * J.K * J.d);
    A.resize(J.n * J.d);
    Q.resize(J.n * J.d);
    tau.resize(J.d);
    xn.resize(J.N * J.n);
    explained.resize(J.N);
    cosine.resize(J.N);
    order.resize(J.N);
    Vt.resize(J.n * W);
    P.resize(J.N * W);
    Y.resize(J.n * W);
    E.resize(J.N * J.R * J.K);
    lab.resize(J.N * J.R);
  }
};

template <int ISA>
FD_INLINE void seed_instance(const Job& J, int64_t b, Workspace& ws) {
  const int64_t N = J.N, n = J.n, d = J.d, cnt = J.counts[b];
  const float* X = J.X + b * N * n;
  float* xn = ws.xn.data();
  for (int64_t i = 0; i < cnt; ++i) {
    const float s = dot(X + i * n, X + i * n, n);
    const float inv = s > 0.f ? 1.f / std::sqrt(s) : 0.f;
    for (int64_t l = 0; l < n; ++l) xn[i * n + l] = X[i * n + l] * inv;
  }
  const int64_t take = std::min(d, cnt);
  for (int64_t r = 0; r < J.R; ++r) {
    std::fill(ws.explained.begin(), ws.explained.begin() + cnt, 0.f);
    int64_t seed = std::min(static_cast<int64_t>(J.u[b * J.R + r] * static_cast<float>(cnt)), cnt - 1);
    for (int64_t k = 0; k < J.K; ++k) {
      if (k) seed = std::min_element(ws.explained.begin(), ws.explained.begin() + cnt) - ws.explained.begin();
      for (int64_t i = 0; i < cnt; ++i) ws.cosine[i] = std::fabs(dot(xn + seed * n, xn + i * n, n));
      std::iota(ws.order.begin(), ws.order.begin() + cnt, 0);
      std::partial_sort(ws.order.begin(), ws.order.begin() + take, ws.order.begin() + cnt, [&](int64_t p, int64_t q) {
        return ws.cosine[p] > ws.cosine[q] || (ws.cosine[p] == ws.cosine[q] && p < q);
      });
      std::fill(ws.A.begin(), ws.A.end(), 0.f);                 // the neighbours as columns, zeros past them
      for (int64_t j = 0; j < take; ++j) std::memcpy(&ws.A[j * n], X + ws.order[j] * n, n * sizeof(float));
      householder_q(ws.A.data(), n, d, ws.tau.data(), ws.Q.data());
      float* U = J.starts + (((b * J.R + r) * J.K + k) * n) * d;   // (n, d) row-major
      for (int64_t l = 0; l < n; ++l)
        for (int64_t j = 0; j < d; ++j) U[l * d + j] = ws.Q[j * n + l];
      if (k + 1 == J.K) break;                                  // the last component's energies pick nothing
      const int64_t dp = padded(d);                             // Xn U as register-blocked rows
      float* Up = ws.Y.data();                                  // (n, dp), zero padding
      float* Pr = ws.P.data();                                  // (cnt, dp)
      std::fill(Up, Up + n * dp, 0.f);
      for (int64_t l = 0; l < n; ++l) std::memcpy(Up + l * dp, U + l * d, d * sizeof(float));
      gemm_rows(Pr, xn, n, 1, Up, dp, cnt, n);
      for (int64_t i = 0; i < cnt; ++i) ws.explained[i] += dot(Pr + i * dp, Pr + i * dp, d);
    }
  }
}

template <int ISA>
FD_INLINE void iterate_instance(const Job& J, int64_t b, Workspace& ws) {
  const int64_t N = J.N, n = J.n, d = J.d, K = J.K, R = J.R, cnt = J.counts[b];
  const int64_t W = R * K * d, Wp = padded(W);   // Vt, P, Y rows: W columns, stride Wp (zero padding)
  const float* X = J.X + b * N * n;
  float* Vt = ws.Vt.data();  // (n, Wp), column (r K + k) d + j
  std::fill(Vt, Vt + n * Wp, 0.f);
  for (int64_t rk = 0; rk < R * K; ++rk) {
    const float* U = J.starts + (b * R * K + rk) * n * d;
    for (int64_t l = 0; l < n; ++l) std::memcpy(Vt + l * Wp + rk * d, U + l * d, d * sizeof(float));
  }
  int64_t* lab = ws.lab.data();  // (cnt, R)
  std::fill(lab, lab + cnt * R, int64_t(-1));
  float* P = ws.P.data();        // (cnt, Wp) = X Vt
  float* Y = ws.Y.data();        // (n, Wp)
  int64_t it = 0;
  for (;; ++it) {
    gemm_rows(P, X, n, 1, Vt, Wp, cnt, n);
    bool moved = false;
    for (int64_t i = 0; i < cnt; ++i)
      for (int64_t r = 0; r < R; ++r) {
        int64_t best = 0;
        float top = -1.f;
        for (int64_t k = 0; k < K; ++k) {
          const float* p = P + i * Wp + (r * K + k) * d;
          const float e = dot(p, p, d);
          ws.E[(i * R + r) * K + k] = e;
          if (e > top) top = e, best = k;
        }
        moved |= lab[i * R + r] != best;
        lab[i * R + r] = best;
      }
    if (!moved || it == J.max_iter) break;
    // refit: Y_{r,k} = sum over the points of cluster k of start r of x_i (x_i^T U_{r,k}) = X^T Pm,
    // Pm = P with every block but the assigned one of each start zeroed (full-width register-blocked rows)
    for (int64_t i = 0; i < cnt; ++i)
      for (int64_t r = 0; r < R; ++r)
        for (int64_t k = 0; k < K; ++k)
          if (k != lab[i * R + r]) std::fill(P + i * Wp + (r * K + k) * d, P + i * Wp + (r * K + k + 1) * d, 0.f);
    gemm_rows(Y, X, 1, n, P, Wp, n, cnt);
    for (int64_t rk = 0; rk < R * K; ++rk) {  // Vt block <- Q of the QR of the Y block
      for (int64_t j = 0; j < d; ++j)
        for (int64_t l = 0; l < n; ++l) ws.A[j * n + l] = Y[l * Wp + rk * d + j];
      householder_q(ws.A.data(), n, d, ws.tau.data(), ws.Q.data());
      for (int64_t l = 0; l < n; ++l)
        for (int64_t j = 0; j < d; ++j) Vt[l * Wp + rk * d + j] = ws.Q[j * n + l];
    }
  }
  // the start of largest objective, its bases and labels
  int64_t best = 0;
  double top = -1.0;
  for (int64_t r = 0; r < R; ++r) {
    double obj = 0.0;
    for (int64_t i = 0; i < cnt; ++i) {
      const float* e = ws.E.data() + (i * R + r) * K;
      obj += *std::max_element(e, e + K);
    }
    if (obj > top) top = obj, best = r;
  }
  int64_t* labels = J.labels + b * N;
  for (int64_t i = 0; i < N; ++i) labels[i] = i < cnt ? lab[i * R + best] : 0;
  if (J.iters) J.iters[b] = it;
  // exact refit of each cluster (its points gathered into Xk), from the best start's basis
  float* Xk = ws.Xk.data();
  for (int64_t k = 0; k < K; ++k) {
    int64_t m = 0;
    for (int64_t i = 0; i < cnt; ++i)
      if (labels[i] == k) std::memcpy(Xk + (m++) * n, X + i * n, n * sizeof(float));
    float* V = ws.V.data();
    for (int64_t j = 0; j < d; ++j)
      for (int64_t l = 0; l < n; ++l) V[j * n + l] = Vt[l * Wp + (best * K + k) * d + j];
    J.converged[b * K + k] = top_subspace_rows(Xk, m, n, d, V, J.tol, J.refit_iter, ws.sub);
    float* out = J.bases + (b * K + k) * n * d;
    for (int64_t l = 0; l < n; ++l)
      for (int64_t j = 0; j < d; ++j) out[l * d + j] = V[j * n + l];
  }
}

// Job.R == 0: top_subspace of instance b (starts = V0 (B, 1, 1, n, d) in, bases (B, 1, n, d) out)
template <int ISA>
FD_INLINE void instance(const Job& J, int64_t b, Workspace& ws) {
  if (J.R == 0) {
    const int64_t n = J.n, d = J.d;
    float* V = ws.V.data();
    for (int64_t l = 0; l < n; ++l)
      for (int64_t j = 0; j < d; ++j) V[j * n + l] = J.starts[(b * n + l) * d + j];
    J.converged[b] = top_subspace_rows(J.X + b * J.N * n, J.counts[b], n, d, V, J.tol, J.refit_iter, ws.sub);
    for (int64_t l = 0; l < n; ++l)
      for (int64_t j = 0; j < d; ++j) J.bases[(b * n + l) * d + j] = V[j * n + l];
    return;
  }
  if (J.u) seed_instance<ISA>(J, b, ws);
  if (J.bases) iterate_instance<ISA>(J, b, ws);
}

void instance_generic(const Job& J, int64_t b, Workspace& ws) { instance<0>(J, b, ws); }
#if FD_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
void instance_avx2(const Job& J, int64_t b, Workspace& ws) { instance<1>(J, b, ws); }
#pragma GCC pop_options
#endif

void run_job(const Job& J, int threads) {
  void (*run)(const Job&, int64_t, Workspace&) = &instance_generic;
#if FD_X86
  if (use_avx2()) run = &instance_avx2;
#endif
  const int nt = std::max(1, threads);
#pragma omp parallel num_threads(nt) if (nt > 1 && J.B > 1)
  {
    Workspace ws(J);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < J.B; ++b) run(J, b, ws);
  }
}

void check_counts(const char* fn, const int64_t* counts, int64_t B, int64_t N) {
  for (int64_t b = 0; b < B; ++b)
    if (counts[b] < 0 || counts[b] > N)
      throw std::invalid_argument(std::string(fn) + ": counts[" + std::to_string(b) + "] = " +
                                  std::to_string(counts[b]) + " outside [0, N = " + std::to_string(N) + "]");
}

}  // namespace

void ksubspaces(uintptr_t x_ptr, int64_t B, int64_t N, int64_t n, uintptr_t counts_ptr, int64_t K,
                int64_t d, int64_t R, uintptr_t u_ptr, uintptr_t starts_ptr, int64_t max_iter,
                uintptr_t bases_ptr, uintptr_t labels_ptr, uintptr_t converged_ptr, double tol,
                int64_t refit_iter, uintptr_t iters_ptr, int threads) {
  if (B < 0 || N < 1 || n < 1 || K < 1 || R < 1 || d < 1 || d > n)
    throw std::invalid_argument("ksubspaces: need B >= 0, N, n, K, R >= 1 and 1 <= d <= n");
  if (max_iter < 0 || refit_iter < 0) throw std::invalid_argument("ksubspaces: max_iter and refit_iter must be >= 0");
  if (!x_ptr || !counts_ptr || !starts_ptr || (!u_ptr && !bases_ptr) ||
      (bases_ptr && (!labels_ptr || !converged_ptr)))
    throw std::invalid_argument("ksubspaces: missing pointer (x, counts, starts; u or bases; labels and converged with bases)");
  const int64_t* counts = reinterpret_cast<const int64_t*>(counts_ptr);
  check_counts("ksubspaces", counts, B, N);
  for (int64_t b = 0; b < B; ++b)
    if (counts[b] < 1) throw std::invalid_argument("ksubspaces: counts[" + std::to_string(b) + "] = 0, need >= 1 point");
  Job J{reinterpret_cast<const float*>(x_ptr), counts, reinterpret_cast<const float*>(u_ptr),
        reinterpret_cast<float*>(starts_ptr), reinterpret_cast<float*>(bases_ptr),
        reinterpret_cast<int64_t*>(labels_ptr), reinterpret_cast<int64_t*>(iters_ptr),
        reinterpret_cast<uint8_t*>(converged_ptr), B, N, n, K, d, R, max_iter, refit_iter, static_cast<float>(tol)};
  if (B) run_job(J, threads);
}

void top_subspace(uintptr_t x_ptr, int64_t B, int64_t N, int64_t n, uintptr_t counts_ptr, int64_t d,
                  uintptr_t v0_ptr, double tol, int64_t max_iter, uintptr_t v_ptr, uintptr_t converged_ptr,
                  int threads) {
  if (B < 0 || N < 1 || n < 1 || d < 1 || d > n)
    throw std::invalid_argument("top_subspace: need B >= 0, N, n >= 1 and 1 <= d <= n");
  if (max_iter < 0) throw std::invalid_argument("top_subspace: max_iter must be >= 0");
  if (!x_ptr || !counts_ptr || !v0_ptr || !v_ptr || !converged_ptr)
    throw std::invalid_argument("top_subspace: missing pointer (x, counts, v0, v, converged)");
  const int64_t* counts = reinterpret_cast<const int64_t*>(counts_ptr);
  check_counts("top_subspace", counts, B, N);
  Job J{reinterpret_cast<const float*>(x_ptr), counts, nullptr, reinterpret_cast<float*>(v0_ptr),
        reinterpret_cast<float*>(v_ptr), nullptr, nullptr, reinterpret_cast<uint8_t*>(converged_ptr),
        B, N, n, 1, d, 0, 0, max_iter, static_cast<float>(tol)};
  if (B) run_job(J, threads);
}

}  // namespace fastdiff
