// fastdiff batched singular values with the numerical rank fused in (CPU):
//
//   for each matrix A_b (m, n) of a contiguous batch (B, m, n), float32 or float64:
//     S_b    = singular values of A_b, descending, min(m, n) of them
//     rank_b = min { r : sum_{i<=r} s_i^2 > eta^2 sum_i s_i^2 }          (SPEC 3)
//              (clamped to N = min(m, n), which eta = 1 gives; a zero matrix has rank 0)
//   A matrix with a NaN / Inf entry gets S = NaN and rank = -1 (also if the QR iteration does
//   not converge, which backward-stable shifts make practically unreachable).
//
// Method, per matrix, everything in float64 (float32 inputs are converted exactly):
//   1. copy into a row-major (M, N) workspace, M = max(m, n) >= N = min(m, n) (the transpose
//      when m < n: same singular values), scaled by a power of two so that max |a_ij| lies in
//      [0.5, 1) (exact, and squares can neither overflow nor, for anything that matters at
//      eps * s_1, underflow).
//   2. Householder bidiagonalization A = Q_L [B; 0] Q_R^T, B upper bidiagonal (d, e).  Each
//      step k applies a left reflector (column k) and a right reflector (row k) to the trailing
//      matrix; the two rank-1 updates of a step and the products that the next reflectors need
//      are fused into two passes over the trailing rows (LAPACK's unblocked dgebd2 makes four):
//        pass 1, row i > k:  r -= tau_l v_i w          z_i = <r, u>      (u from row k first)
//        pass 2, row i > k:  r -= tau_r z_i u          w' += v'_i r      (v' from column k+1)
//      Backward stable: the computed d, e are exact for A + E with ||E|| ~ eps ||A||, so every
//      singular value is within ~eps * s_1 (absolute) of the exact one (Weyl).
//   3. singular values of B by implicit-shift QR (Golub-Kahan-Reinsch: Wilkinson shift from
//      the trailing 2 x 2, chasing the bulge with Givens rotations, splitting where
//      |e_l| <= eps ||B||), no vectors.  Also absolute accuracy ~eps * s_1, O(N^2) work (the
//      bidiagonalization is O(M N^2)).  Squaring into B^T B (Gram + symmetric eigenvalues, or
//      bisection on it) would cost accuracy ~sqrt(eps) s_1 in the small values; bisection on
//      the 2N Golub-Kahan tridiagonal keeps eps * s_1 but needs ~50 Sturm counts of O(N) per
//      value (~100 N^2 divisions against the QR's O(N^2) rotations: several times its cost).
//   4. sort descending; the rank from the prefix sums of s_i^2 (same order as the reference:
//      largest first).
// Parallel over the batch (OpenMP, static schedule; one workspace per thread).  Two code paths
// picked once at run time (FASTDIFF_CPU_SIMD=sse2 forces the generic one): the same template
// compiled for AVX2 + FMA, and for the baseline ISA.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_features.h"  // use_avx2(), FD_X86

#define FD_INLINE inline __attribute__((always_inline))

namespace fastdiff {

namespace {

constexpr int MAX_QR_SWEEPS = 75;  // per singular value (LAPACK's dbdsqr allows 6 per value in all)

template <bool FMA>
FD_INLINE double madd(double a, double b, double c) {
  if constexpr (FMA) {
    return __builtin_fma(a, b, c);
  } else {
    return a * b + c;
  }
}

// Householder reflector H = I - tau v v^T with v_0 = 1 that maps x = (alpha, x_1..) to
// (beta, 0, ...).  x_tail_sq = sum x_i^2 (i >= 1).  Returns tau; beta in *beta; the caller
// scales the tail of x by *inv (1 / (alpha - beta)) to get v.
FD_INLINE double householder(double alpha, double x_tail_sq, double* beta, double* inv) {
  if (x_tail_sq == 0.0) {  // already (alpha, 0, ...): H = I
    *beta = alpha;
    *inv = 0.0;
    return 0.0;
  }
  const double norm = std::sqrt(alpha * alpha + x_tail_sq);
  const double b = alpha >= 0.0 ? -norm : norm;  // opposite sign to alpha: no cancellation
  *beta = b;
  *inv = 1.0 / (alpha - b);
  return (b - alpha) / b;
}

// Rows i..i+3 of W (row stride ld) and their coefficients a_l = s c[i + l]: the block of four
// rows that both passes of the bidiagonalization update together, r_l[j] <- r_l[j] + a_l t_j.
struct Rows4 {
  double *r0, *r1, *r2, *r3;
  double a0, a1, a2, a3;
  FD_INLINE Rows4(double* W, int64_t i, int64_t ld, double s, const double* c)
      : r0(W + i * ld), r1(r0 + ld), r2(r1 + ld), r3(r2 + ld),
        a0(s * c[i]), a1(s * c[i + 1]), a2(s * c[i + 2]), a3(s * c[i + 3]) {}
  // column j: r_l[j] = x_l = madd(a_l, t, r_l[j]) (the updated entries are returned in x_l)
  template <bool FMA>
  FD_INLINE void update(int64_t j, double t, double& x0, double& x1, double& x2, double& x3) const {
    x0 = madd<FMA>(a0, t, r0[j]);
    x1 = madd<FMA>(a1, t, r1[j]);
    x2 = madd<FMA>(a2, t, r2[j]);
    x3 = madd<FMA>(a3, t, r3[j]);
    r0[j] = x0;
    r1[j] = x1;
    r2[j] = x2;
    r3[j] = x3;
  }
};

// Step 2: W (M, N) row-major, M >= N >= 1, destroyed.  d (N) diagonal, e (N) with e[0] = 0 and
// e[j] the superdiagonal entry (j-1, j).  v (M), w, u (N), z (M): scratch.
template <bool FMA>
FD_INLINE void bidiagonalize(double* W, int64_t M, int64_t N, double* d, double* e, double* v, double* w,
                             double* u, double* z) {
  const int64_t ld = N;
  e[0] = 0.0;
  // left reflector of column 0, and w = v^T W[0:, 1:]
  double tau_l, beta, inv;
  {
    double sq = 0.0;
    for (int64_t i = 1; i < M; ++i) sq = madd<FMA>(W[i * ld], W[i * ld], sq);
    tau_l = householder(W[0], sq, &beta, &inv);
    d[0] = beta;
    v[0] = 1.0;
    for (int64_t i = 1; i < M; ++i) v[i] = W[i * ld] * inv;
    for (int64_t j = 1; j < N; ++j) w[j] = W[j];
    for (int64_t i = 1; i < M; ++i) {
      const double vi = v[i];
      const double* r = W + i * ld;
#pragma omp simd
      for (int64_t j = 1; j < N; ++j) w[j] = madd<FMA>(vi, r[j], w[j]);
    }
  }
  for (int64_t k = 0; k + 1 < N; ++k) {
    // row k after the left reflector, then the right reflector from its columns k+1..N-1
    double* rk = W + k * ld;
    double sq = 0.0;
    for (int64_t j = k + 1; j < N; ++j) {
      rk[j] = madd<FMA>(-tau_l, w[j], rk[j]);
      if (j > k + 1) sq = madd<FMA>(rk[j], rk[j], sq);
    }
    double tau_r, beta_r, inv_r;
    tau_r = householder(rk[k + 1], sq, &beta_r, &inv_r);
    e[k + 1] = beta_r;
    u[k + 1] = 1.0;
    for (int64_t j = k + 2; j < N; ++j) u[j] = rk[j] * inv_r;
    // pass 1: left update of rows k+1.., z_i = <row_i, u> (columns k+1..); rows in fours so
    // that each w / u vector load serves four rows
    int64_t i = k + 1;
    for (; i + 4 <= M; i += 4) {
      const Rows4 R(W, i, ld, -tau_l, v);
      double z0 = 0.0, z1 = 0.0, z2 = 0.0, z3 = 0.0;
#pragma omp simd reduction(+ : z0, z1, z2, z3)
      for (int64_t j = k + 1; j < N; ++j) {
        const double uj = u[j];
        double x0, x1, x2, x3;
        R.update<FMA>(j, w[j], x0, x1, x2, x3);
        z0 = madd<FMA>(x0, uj, z0);
        z1 = madd<FMA>(x1, uj, z1);
        z2 = madd<FMA>(x2, uj, z2);
        z3 = madd<FMA>(x3, uj, z3);
      }
      z[i] = z0;
      z[i + 1] = z1;
      z[i + 2] = z2;
      z[i + 3] = z3;
    }
    for (; i < M; ++i) {
      double* r = W + i * ld;
      const double a = -tau_l * v[i];
      double acc = 0.0;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = k + 1; j < N; ++j) {
        const double x = madd<FMA>(a, w[j], r[j]);
        r[j] = x;
        acc = madd<FMA>(x, u[j], acc);
      }
      z[i] = acc;
    }
    // column k+1 after the right update: c_i = W[i][k+1] - tau_r z_i (u_{k+1} = 1); the next
    // left reflector from it
    const double alpha = madd<FMA>(-tau_r, z[k + 1], W[(k + 1) * ld + k + 1]);
    double sq2 = 0.0;
    for (int64_t i = k + 2; i < M; ++i) {
      const double c = madd<FMA>(-tau_r, z[i], W[i * ld + k + 1]);
      v[i] = c;
      sq2 = madd<FMA>(c, c, sq2);
    }
    tau_l = householder(alpha, sq2, &beta, &inv);
    d[k + 1] = beta;
    v[k + 1] = 1.0;
    for (int64_t i = k + 2; i < M; ++i) v[i] *= inv;
    // pass 2: right update of rows k+1.. (columns k+2..), w' = v'^T W[k+1:, k+2:]
    const int64_t j0 = k + 2;
    for (int64_t j = j0; j < N; ++j) w[j] = 0.0;
    if (j0 < N) {
      int64_t i = k + 1;
      for (; i + 4 <= M; i += 4) {  // rows in fours: one load and store of w per four rows
        const Rows4 R(W, i, ld, -tau_r, z);
        const double v0 = v[i], v1 = v[i + 1], v2 = v[i + 2], v3 = v[i + 3];
#pragma omp simd
        for (int64_t j = j0; j < N; ++j) {
          double x0, x1, x2, x3;
          R.update<FMA>(j, u[j], x0, x1, x2, x3);
          w[j] = madd<FMA>(v3, x3, madd<FMA>(v2, x2, madd<FMA>(v1, x1, madd<FMA>(v0, x0, w[j]))));
        }
      }
      for (; i < M; ++i) {
        double* r = W + i * ld;
        const double a = -tau_r * z[i];
        const double vi = v[i];
#pragma omp simd
        for (int64_t j = j0; j < N; ++j) {
          const double x = madd<FMA>(a, u[j], r[j]);
          r[j] = x;
          w[j] = madd<FMA>(vi, x, w[j]);
        }
      }
    }
  }
}

// Step 3: singular values of the upper bidiagonal (d, e) (e[0] = 0), overwriting d with them
// (unsorted, >= 0).  Golub-Kahan-Reinsch implicit-shift QR without vectors (the form of
// EISPACK's svd / Numerical Recipes' svdcmp).
//
// Each bulge-chasing step is a chain of two dependent (sqrt, divide) pairs: latency-bound
// (~90 cycles a step on one matrix).  LANES matrices are therefore iterated together: their
// deflation logic runs one after another, but their sweeps run in one loop whose body holds
// LANES independent chains that the CPU overlaps (bench/test_bench_linalg.py times the result).
constexpr int LANES = 4;

struct QrLane {
  double* d;
  double* e;
  int64_t k;     // the singular value being converged (k = -1: done)
  int its;
  double tol;
  bool failed;
  // the sweep set up by prepare(): rotations j = l .. k-1
  int64_t l;
  double f, x;
};

// Deflation / splitting for one lane until it needs a sweep (true) or is done / failed (false).
bool qr_prepare(QrLane& L) {
  double* d = L.d;
  double* e = L.e;
  const double tol = L.tol;
  while (L.k >= 0) {
    const int64_t k = L.k;
    // find l: the start of the unreduced block ending at k (e[l] negligible), or a
    // negligible d[l-1] (then e[l] is chased out with rotations from the left)
    int64_t l = k;
    bool cancel = true;
    for (; l >= 0; --l) {
      if (std::fabs(e[l]) <= tol) {  // e[0] = 0 always stops here
        cancel = false;
        break;
      }
      if (std::fabs(d[l - 1]) <= tol) break;
    }
    if (cancel) {  // d[l-1] ~ 0: zero e[l..k] by rotations of rows (l-1, i)
      double c = 0.0, s = 1.0;
      for (int64_t i = l; i <= k; ++i) {
        const double f = s * e[i];
        e[i] = c * e[i];
        if (std::fabs(f) <= tol) break;
        const double g = d[i];
        const double h = std::sqrt(f * f + g * g);
        d[i] = h;
        c = g / h;
        s = -f / h;
      }
    }
    const double z = d[k];
    if (l == k) {  // converged
      if (z < 0.0) d[k] = -z;
      --L.k;
      L.its = 0;
      continue;
    }
    if (L.its++ >= MAX_QR_SWEEPS) {
      L.failed = true;
      L.k = -1;
      return false;
    }
    // Wilkinson shift from the trailing 2 x 2 of B^T B
    const double x = d[l];
    const double y = d[k - 1];
    double g = e[k - 1];
    const double h = e[k];
    double f = ((y - z) * (y + z) + (g - h) * (g + h)) / (2.0 * h * y);
    g = std::hypot(f, 1.0);  // f may be huge (y tiny): hypot does not overflow
    L.f = ((x - z) * (x + z) + h * ((y / (f + (f >= 0.0 ? g : -g))) - h)) / x;
    L.x = x;
    L.l = l;
    return true;
  }
  return false;
}

// Runs the QR iteration of `count` lanes to completion.  false per lane in ok[] on failure.
// sqrt(a^2 + b^2) without hypot: the problem is scaled (|B| <= ~sqrt(M N)), so no overflow;
// an underflow to 0 needs both below ~1e-154, far under the splitting threshold.
void bidiagonal_singular_values(QrLane* lanes, int count) {
  bool active[LANES];
  for (int t = 0; t < count; ++t) active[t] = qr_prepare(lanes[t]);
  for (;;) {
    int64_t len = 0;
    for (int t = 0; t < count; ++t)
      if (active[t]) len = std::max(len, lanes[t].k - lanes[t].l);
    if (len == 0) break;
    double c[LANES], s[LANES], f[LANES], x[LANES];
    int64_t n_rot[LANES], l0[LANES];
    for (int t = 0; t < LANES; ++t) {
      c[t] = s[t] = 1.0;
      f[t] = x[t] = 0.0;
      n_rot[t] = 0;
      l0[t] = 0;
    }
    for (int t = 0; t < count; ++t)
      if (active[t]) {
        f[t] = lanes[t].f;
        x[t] = lanes[t].x;
        n_rot[t] = lanes[t].k - lanes[t].l;
        l0[t] = lanes[t].l;
      }
    for (int64_t r = 0; r < len; ++r) {
#pragma GCC unroll 4
      for (int t = 0; t < LANES; ++t) {
        if (r >= n_rot[t]) continue;
        double* d = lanes[t].d;
        double* e = lanes[t].e;
        const int64_t j = l0[t] + r, i = j + 1;
        double g = e[i];
        double y = d[i];
        double h = s[t] * g;
        g = c[t] * g;
        double z = std::sqrt(f[t] * f[t] + h * h);
        e[j] = z;
        double cc = f[t] / z, ss = h / z;
        double ff = x[t] * cc + g * ss;
        g = g * cc - x[t] * ss;
        h = y * ss;
        y *= cc;
        z = std::sqrt(ff * ff + h * h);
        d[j] = z;
        if (z != 0.0) {
          const double iz = 1.0 / z;
          cc = ff * iz;
          ss = h * iz;
        }
        f[t] = cc * g + ss * y;
        x[t] = cc * y - ss * g;
        c[t] = cc;
        s[t] = ss;
      }
    }
    for (int t = 0; t < count; ++t)
      if (active[t]) {
        QrLane& L = lanes[t];
        L.e[L.l] = 0.0;
        L.e[L.k] = f[t];
        L.d[L.k] = x[t];
        active[t] = qr_prepare(L);
      }
  }
}

// Step 4: the energy rank of descending s (N).
int64_t energy_rank(const double* s, int64_t N, double eta) {
  double total = 0.0;
  for (int64_t i = 0; i < N; ++i) total += s[i] * s[i];
  if (total == 0.0) return 0;
  const double bound = eta * eta * total;
  double cum = 0.0;
  for (int64_t r = 0; r < N; ++r) {
    cum += s[r] * s[r];
    if (cum > bound) return r + 1;
  }
  return N;  // eta = 1: no prefix exceeds the total; clamped to N (as the Triton kernel does)
}

struct SvdJob {
  const void* a;
  void* s;
  int64_t* rank;  // nullptr: no rank
  int dtype;      // 0 float32, 1 float64
  int64_t m, n;
  double eta;
};

struct Workspace {
  std::vector<double> W, v, w, u, z, d, e;
  int64_t N;
  explicit Workspace(int64_t M, int64_t N_)
      : W(M * N_ + 1), v(M), w(N_), u(N_), z(M), d(LANES * N_), e(LANES * N_), N(N_) {}
};

// W (M, N) row-major (+ one slot) = A (m >= n) or A^T (m < n), scaled by 2^-ex so that
// max |w_ij| is in [0.5, 1); returns false if an entry is not finite.
template <typename T>
FD_INLINE bool load(const T* a, int64_t m, int64_t n, double* W, int* ex) {
  double amax = 0.0;
  bool finite = true;
  if (m >= n) {
    for (int64_t i = 0; i < m * n; ++i) {
      const double x = static_cast<double>(a[i]);
      W[i] = x;
      finite &= std::isfinite(x);
      amax = std::max(amax, std::fabs(x));
    }
  } else {  // W[j][i] = a[i][j], W is (n, m)
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        const double x = static_cast<double>(a[i * n + j]);
        W[j * m + i] = x;
        finite &= std::isfinite(x);
        amax = std::max(amax, std::fabs(x));
      }
  }
  *ex = 0;
  if (!finite) return false;
  if (amax > 0.0) {
    std::frexp(amax, ex);  // amax = f 2^ex, f in [0.5, 1)
    const double scale = std::ldexp(1.0, -*ex);
    for (int64_t i = 0; i < m * n; ++i) W[i] *= scale;
  }
  return true;
}

// Matrices b0 .. b0 + count - 1 (count <= LANES): bidiagonalize each, QR them together.
template <bool FMA>
FD_INLINE void svd_group(const SvdJob& J, int64_t b0, int count, Workspace& ws) {
  const int64_t m = J.m, n = J.n, M = std::max(m, n), N = std::min(m, n);
  QrLane lanes[LANES];
  int ex[LANES];
  bool finite[LANES];
  int q = 0;  // lanes that go to the QR
  QrLane* order[LANES];
  for (int t = 0; t < count; ++t) {
    const int64_t b = b0 + t;
    double* W = ws.W.data();
    if (J.dtype == 0)
      finite[t] = load(static_cast<const float*>(J.a) + b * m * n, m, n, W, &ex[t]);
    else
      finite[t] = load(static_cast<const double*>(J.a) + b * m * n, m, n, W, &ex[t]);
    double* d = ws.d.data() + t * N;
    double* e = ws.e.data() + t * N;
    QrLane& L = lanes[t];
    L.d = d;
    L.e = e;
    L.failed = !finite[t];
    if (!finite[t]) continue;
    bidiagonalize<FMA>(W, M, N, d, e, ws.v.data(), ws.w.data(), ws.u.data(), ws.z.data());
    double anorm = 0.0;
    for (int64_t i = 0; i < N; ++i) anorm = std::max(anorm, std::fabs(d[i]) + std::fabs(e[i]));
    L.tol = std::numeric_limits<double>::epsilon() * anorm;
    L.k = N - 1;
    L.its = 0;
    order[q++] = &L;
  }
  if (q) {
    QrLane packed[LANES];
    for (int t = 0; t < q; ++t) packed[t] = *order[t];
    bidiagonal_singular_values(packed, q);
    for (int t = 0; t < q; ++t) order[t]->failed = packed[t].failed;
  }
  for (int t = 0; t < count; ++t) {
    const int64_t b = b0 + t;
    double* d = lanes[t].d;
    int64_t rank = -1;
    if (!lanes[t].failed) {
      std::sort(d, d + N, [](double x, double y) { return x > y; });
      rank = energy_rank(d, N, J.eta);  // scale-free: the ratio is unchanged by 2^ex
      for (int64_t i = 0; i < N; ++i) d[i] = std::ldexp(d[i], ex[t]);
    } else {
      for (int64_t i = 0; i < N; ++i) d[i] = std::numeric_limits<double>::quiet_NaN();
    }
    if (J.dtype == 0) {
      float* s = static_cast<float*>(J.s) + b * N;
      for (int64_t i = 0; i < N; ++i) s[i] = static_cast<float>(d[i]);
    } else {
      double* s = static_cast<double*>(J.s) + b * N;
      for (int64_t i = 0; i < N; ++i) s[i] = d[i];
    }
    if (J.rank) J.rank[b] = rank;
  }
}

void svd_group_generic(const SvdJob& J, int64_t b0, int count, Workspace& ws) { svd_group<false>(J, b0, count, ws); }

#if FD_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
void svd_group_avx2(const SvdJob& J, int64_t b0, int count, Workspace& ws) { svd_group<true>(J, b0, count, ws); }
#pragma GCC pop_options
#endif

}  // namespace

void svdvals_rank(uintptr_t a_ptr, int dtype, int64_t B, int64_t m, int64_t n, uintptr_t s_ptr,
                  uintptr_t rank_ptr, double eta) {
  if (dtype != 0 && dtype != 1) throw std::invalid_argument("svdvals_rank: dtype must be 0 (float32) or 1 (float64)");
  if (B < 0 || m < 1 || n < 1) throw std::invalid_argument("svdvals_rank: need B >= 0, m >= 1, n >= 1");
  if (!(eta > 0.0 && eta <= 1.0)) throw std::invalid_argument("svdvals_rank: eta must lie in (0, 1]");
  if (B == 0) return;
  SvdJob J{reinterpret_cast<const void*>(a_ptr), reinterpret_cast<void*>(s_ptr),
           reinterpret_cast<int64_t*>(rank_ptr), dtype, m, n, eta};
  void (*group)(const SvdJob&, int64_t, int, Workspace&) = &svd_group_generic;
#if FD_X86
  if (use_avx2()) group = &svd_group_avx2;
#endif
  const int64_t M = std::max(m, n), N = std::min(m, n);
  // fork only when there is more than one matrix's worth of work (~M N^2 flops each)
  const bool par = B > 1 && static_cast<double>(B) * M * N * N > 2e5;
#pragma omp parallel if (par)
  {
    Workspace ws(M, N);
    const int64_t groups = (B + LANES - 1) / LANES;
#pragma omp for schedule(dynamic, 4)
    for (int64_t g = 0; g < groups; ++g)
      group(J, g * LANES, static_cast<int>(std::min<int64_t>(LANES, B - g * LANES)), ws);
  }
}

}  // namespace fastdiff
