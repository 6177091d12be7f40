// fastdiff fused MoLRG softmax-projection denoiser forward (CPU):
//
//   for each row x (n) of X (B, n), with Ucat = [U_0 | ... | U_{K-1}] (n, D), component k
//   owning columns [off[k], off[k+1]), and the row's params [g(K), b(K), C(K), A, gw]:
//     P_j   = sum_i x_i U[i, j]                                   j in [0, D)   (U^T x)
//     s_k   = sum_{j in comp k} P_j^2
//     l_k   = b_k + g_k s_k                                       (logits)
//     w     = softmax_k(l)  (soft, max subtracted first)  |  one_hot(argmax_k l)  (hard,
//             ties -> lowest k)
//     w'_k  = (1 - gw) w_k + gw [k == label]                      (only with labels)
//     out_i = A x_i + sum_j U[i, j] (w'_{k(j)} C_{k(j)} P_j)
//   out (B, n) float32; w (B, K) float32 = the posterior before guidance (optional).
//
// Math: both products in float32 (FMA on the avx2 path); s_k and the logits in float64; the
// exps in float32 (a vectorized Cephes expf of l_k - max l, ~1 ulp), sums / guidance in
// float64.  No -ffast-math: a NaN anywhere in a row of x makes P, the logits, w and the whole
// output row NaN (w is forced to NaN in hard mode as well).
//
// Structure: U is transposed once per call into Ut (D, n8) (n8 = n rounded up to 8, zero
// padded) so that both products are "broadcast a scalar, FMA a contiguous vector" loops:
//   phase 1  P[r, j-vec]   += x[r, i]  * U[i, j-vec]     loop over i, tiles of 24 columns j
//   phase 2  per row: s, logits, w, q[r, j] = w'_k C_k P[r, j]   (in place in the P buffer)
//   phase 3  out[r, i-vec]  = A x[r, i-vec] + sum_j q[r, j] Ut[j, i-vec]
// Rows go in chunks of M (per-thread scratch (M + 4) x D8 floats), 4 rows at a time through
// a 4 x 3 vector register tile so that each U / Ut vector is reused 4 times from registers and
// each 24-wide strip of U stays in L1/L2 across the chunk (blocks of 256 i / j for big n / D).
// Phase 1 adds up partial sums of 64 terms (float32 error ~ (64 + n/64) eps, not ~ n eps).
// OpenMP (schedule(static)) over chunks when B n D is big enough to pay for the fork.  out may
// be the very same buffer as x.
// Two code paths, picked once at run time (shared with fused_step: FASTDIFF_CPU_SIMD=sse2):
//   "avx2":  AVX2 + FMA intrinsics register tiles (masked loads/stores for ragged tails);
//   generic: plain C++ loops of the same structure that GCC vectorizes for the baseline ISA.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "molrg.h"
#include "philox.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#define FD_MOLRG_X86 1
#include <immintrin.h>
#else
#define FD_MOLRG_X86 0
#endif

namespace fastdiff {

const char* simd_name();  // fused_step.cpp: "avx2" when the AVX2 + FMA path is selected

namespace {

constexpr int64_t MOLRG_MAX_K = 1024;
// Phase 1 sums over i in blocks of IBLK terms that are then added up: float32 rounding error
// ~ (IBLK + n / IBLK) eps instead of ~ n eps (the logits amplify errors in P by ~ g |P|).
constexpr int64_t IBLK = 64;

inline const float* params_row(const MolrgJob& J, int64_t r) {
  return J.params + (J.R == 1 ? 0 : r) * J.pstride;
}

#if defined(__GNUC__)
#define FD_MOLRG_INLINE inline __attribute__((always_inline))
#else
#define FD_MOLRG_INLINE inline
#endif

using philox::as_float;  // bit cast, shared with the fused-step kernel (philox.h)

// exp(x) for x <= 0 (Cephes expf, <= ~1 ulp; 0 below -87.3 (a normal-range flush); x = -inf
// gives 0).  Branch-free (float->int by truncation + fix-up, no floor) so that the loop in
// mix_rows() vectorizes for SSE2 as well as for AVX2 callers.  Not for NaN (filtered).
FD_MOLRG_INLINE float exp_nonpos(float x) {
  // x <= 0 (or +0): as bit patterns, larger magnitude == larger uint, so clamps and the
  // underflow test are integer ops (selects as mask arithmetic: GCC if-converts them).
  uint32_t xb;
  std::memcpy(&xb, &x, 4);
  const uint32_t lo = 0xC2AE0000u;                              // -87.0f
  const uint32_t under = 0u - static_cast<uint32_t>(xb > 0xC2AEA8F6u);  // x < -87.33f
  const float xc = as_float(xb < lo ? xb : lo);
  const float y = xc * 1.44269504088896341f + 0.5f;           // n = floor(y), y in [-125, .5]
  int32_t n = static_cast<int32_t>(y);                          // trunc toward 0
  n -= static_cast<int32_t>(static_cast<float>(n) > y);
  const float fn = static_cast<float>(n);
  const float r = (xc - fn * 0.693359375f) + fn * 2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.0f;
  const float v = p * as_float(static_cast<uint32_t>(n + 127) << 23);  // n >= -126
  uint32_t vb;
  std::memcpy(&vb, &v, 4);
  return as_float(vb & ~under);
}

// float64 sum of squares of p[0, d) (four partial sums: one float64 chain would be latency
// bound; GCC vectorizes this for the caller's ISA).
FD_MOLRG_INLINE double sum_sq(const float* p, int64_t d) {
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  int64_t j = 0;
  for (; j + 4 <= d; j += 4) {
    s0 += static_cast<double>(p[j]) * p[j];
    s1 += static_cast<double>(p[j + 1]) * p[j + 1];
    s2 += static_cast<double>(p[j + 2]) * p[j + 2];
    s3 += static_cast<double>(p[j + 3]) * p[j + 3];
  }
  for (; j < d; ++j) s0 += static_cast<double>(p[j]) * p[j];
  return (s0 + s1) + (s2 + s3);
}

// Phase 2, the part shared by the code paths, for rows [rs, re): L (logits, (re - rs) x K)
// in; writes w (the posterior) and CF[(r - rs) K + k] = float(w'_k C_k).  E: scratch.
// The exps of all the rows form one loop that vectorizes (always_inline: the avx2 caller
// gets it vectorized for AVX2).
constexpr int MIX_CAP = MOLRG_MAX_K;  // logits per batch of rows (>= K: one row at least)

FD_MOLRG_INLINE void mix_softmax(const MolrgJob& J, int64_t rs, int64_t re, double* L, float* E,
                                 float* CF) {
  const int K = J.K;
  bool bad[MIX_CAP];
  for (int64_t r = rs; r < re; ++r) {
    const double* l = L + (r - rs) * K;
    float* e = E + (r - rs) * K;
    bool nan = false;
    double m = l[0];
    for (int k = 0; k < K; ++k) {
      nan |= std::isnan(l[k]);
      m = l[k] > m ? l[k] : m;
    }
    // soft: NaN, or the max is +-inf (softmax 0/0: NaN, as torch); hard: NaN only
    const bool b = nan || (!J.hard && !std::isfinite(m));
    bad[r - rs] = b;
    if (J.hard) continue;
    if (b)
      for (int k = 0; k < K; ++k) e[k] = 0.0f;
    else
      for (int k = 0; k < K; ++k) e[k] = static_cast<float>(l[k] - m);
  }
  if (!J.hard) {
    const int64_t cnt = (re - rs) * K;
    for (int64_t i = 0; i < cnt; ++i) E[i] = exp_nonpos(E[i]);
  }
  for (int64_t r = rs; r < re; ++r) {
    const float* pr = params_row(J, r);
    const float* C = pr + 2 * K;
    double* w = L + (r - rs) * K;  // w overwrites the logits of its row
    const float* e = E + (r - rs) * K;
    if (bad[r - rs]) {
      for (int k = 0; k < K; ++k) w[k] = std::numeric_limits<double>::quiet_NaN();
    } else if (J.hard) {
      int best = 0;  // ties -> lowest k
      for (int k = 1; k < K; ++k)
        if (w[k] > w[best]) best = k;
      for (int k = 0; k < K; ++k) w[k] = k == best ? 1.0 : 0.0;
    } else {
      double sum = 0.0;
      for (int k = 0; k < K; ++k) sum += e[k];  // >= 1 (the max term is exp(0))
      const double inv = 1.0 / sum;
      for (int k = 0; k < K; ++k) w[k] = e[k] * inv;
    }
    if (J.w) {
      float* wr = J.w + r * K;
      for (int k = 0; k < K; ++k) wr[k] = static_cast<float>(w[k]);
    }
    const double gw = pr[3 * K + 1];
    const int64_t lab = J.labels ? J.labels[r] : -1;
    float* cf = CF + (r - rs) * K;
    for (int k = 0; k < K; ++k) {
      double wk = w[k];
      if (J.labels) wk = (1.0 - gw) * wk + (k == lab ? gw : 0.0);
      cf[k] = static_cast<float>(wk * static_cast<double>(C[k]));
    }
  }
}

// Phase 2 for rows [r0, r1): P (rows of D8, row r0 first) holds P on entry and
// q = w'_k C_k P on exit; writes w.  SUMSQ(p, d): float64 sum of squares; SCALE(p, d, c).
#define FD_MOLRG_MIX_ROWS(SUMSQ, SCALE)                                                    \
  const int K = J.K;                                                                       \
  const int64_t* off = J.off;                                                              \
  double L[MIX_CAP];                                                                       \
  float E[MIX_CAP], CF[MIX_CAP];                                                           \
  const int64_t rb = std::max<int64_t>(1, MIX_CAP / K);                                    \
  for (int64_t rs = r0; rs < r1; rs += rb) {                                               \
    const int64_t re = std::min(r1, rs + rb);                                              \
    for (int64_t r = rs; r < re; ++r) {                                                    \
      const float* p = P + (r - r0) * J.D8;                                                \
      const float* pr = params_row(J, r);                                                  \
      double* l = L + (r - rs) * K;                                                        \
      for (int k = 0; k < K; ++k)                                                          \
        l[k] = static_cast<double>(pr[K + k]) +                                            \
               static_cast<double>(pr[k]) * SUMSQ(p + off[k], off[k + 1] - off[k]);        \
    }                                                                                      \
    mix_softmax(J, rs, re, L, E, CF);                                                      \
    for (int64_t r = rs; r < re; ++r) {                                                    \
      float* p = P + (r - r0) * J.D8;                                                      \
      const float* cf = CF + (r - rs) * K;                                                 \
      for (int k = 0; k < K; ++k) SCALE(p + off[k], off[k + 1] - off[k], cf[k]);           \
    }                                                                                      \
  }

FD_MOLRG_INLINE void scale_generic(float* p, int64_t d, float c) {
  for (int64_t j = 0; j < d; ++j) p[j] *= c;
}

void mix_rows_generic(const MolrgJob& J, int64_t r0, int64_t r1, float* P) {
  FD_MOLRG_MIX_ROWS(sum_sq, scale_generic)
}

// Ut[j, i] = U[i, j], rows [i0, i1) of U; padding columns [n, n8) of Ut zeroed by the caller.
void transpose_block(const MolrgJob& J, float* Ut, int64_t i0, int64_t i1) {
  constexpr int64_t TB = 32;
  for (int64_t jb = 0; jb < J.D; jb += TB) {
    const int64_t je = std::min(J.D, jb + TB);
    for (int64_t i = i0; i < i1; ++i) {
      const float* u = J.U + i * J.D;
      for (int64_t j = jb; j < je; ++j) Ut[j * J.n8 + i] = u[j];
    }
  }
}

// ---------------------------------------------------------------------------------------
// Generic path: plain loops (GCC vectorizes the innermost, contiguous ones).
// P: scratch of (r1 - r0 + 4) x D8 floats (the last 4 rows: block partial sums).
void chunk_generic(const MolrgJob& J, int64_t r0, int64_t r1, float* P) {
  const int64_t n = J.n, D = J.D, D8 = J.D8;
  float* T = P + (r1 - r0) * D8;
  for (int64_t r = r0; r < r1; r += 4) {
    const int rg = static_cast<int>(std::min<int64_t>(4, r1 - r));
    float* Pr = P + (r - r0) * D8;
    // phase 1
    for (int rr = 0; rr < rg; ++rr) std::fill(Pr + rr * D8, Pr + rr * D8 + D, 0.0f);
    for (int64_t i0 = 0; i0 < n; i0 += IBLK) {
      const int64_t i1 = std::min(n, i0 + IBLK);
      for (int rr = 0; rr < rg; ++rr) std::fill(T + rr * D8, T + rr * D8 + D, 0.0f);
      for (int64_t i = i0; i < i1; ++i) {
        const float* __restrict u = J.U + i * D;
        for (int rr = 0; rr < rg; ++rr) {
          const float xv = J.x[(r + rr) * n + i];
          float* __restrict tt = T + rr * D8;
          for (int64_t j = 0; j < D; ++j) tt[j] += xv * u[j];
        }
      }
      for (int rr = 0; rr < rg; ++rr) {
        float* __restrict pp = Pr + rr * D8;
        const float* __restrict tt = T + rr * D8;
        for (int64_t j = 0; j < D; ++j) pp[j] += tt[j];
      }
    }
    // phase 2
    mix_rows_generic(J, r, r + rg, Pr);
    // phase 3 (x and out may alias: each element is read before it is written)
    for (int rr = 0; rr < rg; ++rr) {
      const float A = params_row(J, r + rr)[3 * J.K];
      const float* xr = J.x + (r + rr) * n;
      float* o = J.out + (r + rr) * n;
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC ivdep
#endif
      for (int64_t i = 0; i < n; ++i) o[i] = A * xr[i];
    }
    for (int64_t j = 0; j < D; ++j) {
      const float* __restrict u = J.Ut + j * J.n8;
      for (int rr = 0; rr < rg; ++rr) {
        const float qv = Pr[rr * D8 + j];
        float* __restrict o = J.out + (r + rr) * n;
        for (int64_t i = 0; i < n; ++i) o[i] += qv * u[i];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// AVX2 + FMA path (x86-64 only, selected at run time).
#if FD_MOLRG_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")

inline __m256i tail_mask(int64_t valid) {  // lanes [0, valid) on, valid in [1, 8]
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(valid)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// P[r, 0:8 NV] (+)= sum_{i in [ib, ie)} x[r, i] U[i, 0:8 NV] for MR rows (stores when ib == 0,
// adds otherwise); the last vector of U masked if MASK (masked lanes load 0, so the padding
// columns of P come out 0).
template <int MR, int NV, bool MASK>
__attribute__((always_inline)) inline void proj_tile(const float* x, int64_t n, int64_t ib,
                                                     int64_t ie, const float* U, int64_t ldu,
                                                     float* P, int64_t ldp, __m256i m) {
  for (int64_t i0 = ib; i0 == ib || i0 < ie; i0 += IBLK) {
    const int64_t i1 = std::min(ie, i0 + IBLK);
    __m256 acc[MR][NV];
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 3
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
    for (int64_t i = i0; i < i1; ++i) {
      const float* u = U + i * ldu;
      __m256 uv[NV];
#pragma GCC unroll 3
      for (int v = 0; v < NV; ++v)
        uv[v] = (MASK && v == NV - 1) ? _mm256_maskload_ps(u + 8 * v, m)
                                      : _mm256_loadu_ps(u + 8 * v);
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) {
        const __m256 xb = _mm256_broadcast_ss(x + r * n + i);
#pragma GCC unroll 3
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(xb, uv[v], acc[r][v]);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 3
      for (int v = 0; v < NV; ++v) {
        float* pp = P + r * ldp + 8 * v;
        _mm256_storeu_ps(pp, i0 == 0 ? acc[r][v] : _mm256_add_ps(_mm256_loadu_ps(pp), acc[r][v]));
      }
  }
}

// out[r, 0:8 NV] = A_r x[r, 0:8 NV] + sum_{j in [jb, je)} q[r, j] Ut[j, 0:8 NV] for MR rows
// when jb == 0, out += the sum otherwise; the last vector of x / out masked if MASK (Ut is
// padded, its loads never are).
template <int MR, int NV, bool MASK>
__attribute__((always_inline)) inline void out_tile(const float* q, int64_t ldq, int64_t jb,
                                                    int64_t je, const float* Ut, int64_t ldt,
                                                    const float* x, float* out, int64_t n,
                                                    const float* A, __m256i m) {
  __m256 acc[MR][NV];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) {
    const __m256 a = _mm256_set1_ps(A[r]);
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) {
      const float* src = (jb == 0 ? x : out) + r * n + 8 * v;
      const __m256 xv =
          (MASK && v == NV - 1) ? _mm256_maskload_ps(src, m) : _mm256_loadu_ps(src);
      acc[r][v] = jb == 0 ? _mm256_mul_ps(a, xv) : xv;
    }
  }
  for (int64_t j = jb; j < je; ++j) {
    const float* u = Ut + j * ldt;
    __m256 uv[NV];
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) uv[v] = _mm256_loadu_ps(u + 8 * v);
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      const __m256 qb = _mm256_broadcast_ss(q + r * ldq + j);
#pragma GCC unroll 3
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(qb, uv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) {
      float* op = out + r * n + 8 * v;
      if (MASK && v == NV - 1) _mm256_maskstore_ps(op, m, acc[r][v]);
      else _mm256_storeu_ps(op, acc[r][v]);
    }
}

template <int MR>
void proj_dispatch(int nv, bool mask, const float* x, int64_t n, int64_t ib, int64_t ie,
                   const float* U, int64_t ldu, float* P, int64_t ldp, __m256i m) {
  switch (nv * 2 + (mask ? 1 : 0)) {
    case 2: proj_tile<MR, 1, false>(x, n, ib, ie, U, ldu, P, ldp, m); break;
    case 3: proj_tile<MR, 1, true>(x, n, ib, ie, U, ldu, P, ldp, m); break;
    case 4: proj_tile<MR, 2, false>(x, n, ib, ie, U, ldu, P, ldp, m); break;
    case 5: proj_tile<MR, 2, true>(x, n, ib, ie, U, ldu, P, ldp, m); break;
    case 6: proj_tile<MR, 3, false>(x, n, ib, ie, U, ldu, P, ldp, m); break;
    default: proj_tile<MR, 3, true>(x, n, ib, ie, U, ldu, P, ldp, m); break;
  }
}

template <int MR>
void out_dispatch(int nv, bool mask, const float* q, int64_t ldq, int64_t jb, int64_t je,
                  const float* Ut, int64_t ldt, const float* x, float* out, int64_t n,
                  const float* A, __m256i m) {
  switch (nv * 2 + (mask ? 1 : 0)) {
    case 2: out_tile<MR, 1, false>(q, ldq, jb, je, Ut, ldt, x, out, n, A, m); break;
    case 3: out_tile<MR, 1, true>(q, ldq, jb, je, Ut, ldt, x, out, n, A, m); break;
    case 4: out_tile<MR, 2, false>(q, ldq, jb, je, Ut, ldt, x, out, n, A, m); break;
    case 5: out_tile<MR, 2, true>(q, ldq, jb, je, Ut, ldt, x, out, n, A, m); break;
    case 6: out_tile<MR, 3, false>(q, ldq, jb, je, Ut, ldt, x, out, n, A, m); break;
    default: out_tile<MR, 3, true>(q, ldq, jb, je, Ut, ldt, x, out, n, A, m); break;
  }
}

// float64 sum of squares of p[0, d): exact float -> double, FMA in float64.
inline double sum_sq_avx2(const float* p, int64_t d) {
  __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) {
    const __m256 v = _mm256_loadu_ps(p + j);
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    a0 = _mm256_fmadd_pd(lo, lo, a0);
    a1 = _mm256_fmadd_pd(hi, hi, a1);
  }
  if (j < d) {
    const __m256 v = _mm256_maskload_ps(p + j, tail_mask(d - j));
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    a0 = _mm256_fmadd_pd(lo, lo, a0);
    a1 = _mm256_fmadd_pd(hi, hi, a1);
  }
  const __m256d a = _mm256_add_pd(a0, a1);
  const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
  return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
}

inline void scale_avx2(float* p, int64_t d, float c) {
  const __m256 cv = _mm256_set1_ps(c);
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) _mm256_storeu_ps(p + j, _mm256_mul_ps(cv, _mm256_loadu_ps(p + j)));
  if (j < d) {
    const __m256i m = tail_mask(d - j);
    _mm256_maskstore_ps(p + j, m, _mm256_mul_ps(cv, _mm256_maskload_ps(p + j, m)));
  }
}

void mix_rows_avx2(const MolrgJob& J, int64_t r0, int64_t r1, float* P) {
  FD_MOLRG_MIX_ROWS(sum_sq_avx2, scale_avx2)
}

constexpr int64_t TILE = 24;  // columns per register tile (3 vectors)

// Phase 1 over blocks of KBLK values of i and phase 3 over blocks of KBLK values of j, so that
// the 24-wide strip of U / Ut of a block (24 KB) stays in L1 across the row groups of a chunk.
constexpr int64_t KBLK = 256;  // multiple of IBLK

// Phase 3 for rows [r0, r1): out[r, :] = A_r src[r, :] + Q[r - r0, :] Ut, over blocks of KBLK
// values of j and register tiles of TILE columns.  The forward passes src = x with the mixed
// projections q; the backward src = G with dP (its J.out is dx).
void out_rows_avx2(const MolrgJob& J, int64_t r0, int64_t r1, const float* Q, const float* src) {
  const int64_t n = J.n, D = J.D, D8 = J.D8;
  float A[4];
  for (int64_t jb = 0; jb < D; jb += KBLK) {
    const int64_t je = std::min(D, jb + KBLK);
    for (int64_t it = 0; it < n; it += TILE) {
      const int64_t cols = std::min(TILE, n - it);
      const int nv = static_cast<int>((cols + 7) / 8);
      const bool mask = (cols & 7) != 0;
      const __m256i m = tail_mask(mask ? (cols & 7) : 8);
      int64_t r = r0;
      for (; r + 4 <= r1; r += 4) {
        for (int rr = 0; rr < 4; ++rr) A[rr] = params_row(J, r + rr)[3 * J.K];
        out_dispatch<4>(nv, mask, Q + (r - r0) * D8, D8, jb, je, J.Ut + it, J.n8,
                        src + r * n + it, J.out + r * n + it, n, A, m);
      }
      for (; r < r1; ++r) {
        A[0] = params_row(J, r)[3 * J.K];
        out_dispatch<1>(nv, mask, Q + (r - r0) * D8, D8, jb, je, J.Ut + it, J.n8,
                        src + r * n + it, J.out + r * n + it, n, A, m);
      }
    }
  }
}

void chunk_avx2(const MolrgJob& J, int64_t r0, int64_t r1, float* P) {
  const int64_t n = J.n, D = J.D, D8 = J.D8;
  // phase 1: P (rows of D8, padding columns 0)
  for (int64_t ib = 0; ib == 0 || ib < n; ib += KBLK) {
    const int64_t ie = std::min(n, ib + KBLK);
    for (int64_t jt = 0; jt < D; jt += TILE) {
      const int64_t cols = std::min(TILE, D - jt);
      const int nv = static_cast<int>((cols + 7) / 8);
      const bool mask = (cols & 7) != 0;
      const __m256i m = tail_mask(mask ? (cols & 7) : 8);
      int64_t r = r0;
      for (; r + 4 <= r1; r += 4)
        proj_dispatch<4>(nv, mask, J.x + r * n, n, ib, ie, J.U + jt, D, P + (r - r0) * D8 + jt,
                         D8, m);
      for (; r < r1; ++r)
        proj_dispatch<1>(nv, mask, J.x + r * n, n, ib, ie, J.U + jt, D, P + (r - r0) * D8 + jt,
                         D8, m);
    }
  }
  // phase 2
  mix_rows_avx2(J, r0, r1, P);
  // phase 3
  out_rows_avx2(J, r0, r1, P, J.x);
}

#pragma GCC pop_options
#endif  // FD_MOLRG_X86

bool use_avx2() {
#if FD_MOLRG_X86
  static const bool ok = std::strcmp(simd_name(), "avx2") == 0;
  return ok;
#else
  return false;
#endif
}

// Rows per chunk: a multiple of 4, scratch M x D8 floats <= 32 K floats, at most 32, and small
// enough to give every thread a few chunks.
int64_t chunk_rows(int64_t B, int64_t D8, int nthreads) {
  int64_t m = std::max<int64_t>(4, (32768 / D8) & ~int64_t(3));
  m = std::min<int64_t>(m, 32);
  const int64_t per = (B + 4 * nthreads - 1) / (4 * nthreads);  // ~4 chunks per thread
  m = std::min(m, std::max<int64_t>(4, (per + 3) & ~int64_t(3)));
  return m;
}

// The checks and fields every entry point shares (sizes, offsets, params, labels); the callers
// set the data pointers.  B == 0 passes (the caller returns early); labels are range-checked.
MolrgJob molrg_job(const char* fn, int64_t B, int64_t n, const std::vector<int64_t>& offsets,
                   uintptr_t params_ptr, int64_t R, uintptr_t labels_ptr, bool hard) {
  const std::string f(fn);
  const int64_t K = static_cast<int64_t>(offsets.size()) - 1;
  if (K < 1) throw std::invalid_argument(f + ": need K >= 1 components (K + 1 offsets)");
  if (K > MOLRG_MAX_K) throw std::invalid_argument(f + ": at most 1024 components");
  if (offsets[0] != 0) throw std::invalid_argument(f + ": offsets[0] must be 0");
  for (int64_t k = 0; k < K; ++k)
    if (offsets[k + 1] <= offsets[k])
      throw std::invalid_argument(f + ": offsets must be strictly increasing");
  if (B < 0 || n < 0) throw std::invalid_argument(f + ": negative size");
  if (R != 1 && R != B) throw std::invalid_argument(f + ": R must be 1 or B");
  if (B > 0 && params_ptr == 0) throw std::invalid_argument(f + ": null pointer");
  MolrgJob J{};
  J.B = B;
  J.n = n;
  J.K = static_cast<int>(K);
  J.D = offsets[K];
  J.D8 = (J.D + 7) & ~int64_t(7);
  J.n8 = (n + 7) & ~int64_t(7);
  J.off = offsets.data();
  J.params = reinterpret_cast<const float*>(params_ptr);
  J.R = R;
  J.pstride = 3 * K + 2;
  J.labels = reinterpret_cast<const int64_t*>(labels_ptr);
  J.hard = hard;
  if (J.labels)
    for (int64_t r = 0; r < B; ++r)
      if (J.labels[r] < 0 || J.labels[r] >= K)
        throw std::invalid_argument(f + ": label out of range [0, K)");
  return J;
}

}  // namespace

void molrg_rows(const MolrgJob& J, int64_t r0, int64_t r1, float* scratch) {
#if FD_MOLRG_X86
  if (use_avx2()) {
    chunk_avx2(J, r0, r1, scratch);
    return;
  }
#endif
  chunk_generic(J, r0, r1, scratch);
}

void molrg_transpose(const MolrgJob& J, float* Ut) {
  transpose_block(J, Ut, 0, J.n);
  for (int64_t j = 0; j < J.D; ++j)
    for (int64_t i = J.n; i < J.n8; ++i) Ut[j * J.n8 + i] = 0.0f;
}

void molrg_forward(uintptr_t x_ptr, uintptr_t out_ptr, uintptr_t w_ptr, int64_t B, int64_t n,
                   uintptr_t u_ptr, const std::vector<int64_t>& offsets, uintptr_t params_ptr,
                   int64_t R, uintptr_t labels_ptr, bool hard) {
  MolrgJob J = molrg_job("molrg_forward", B, n, offsets, params_ptr, R, labels_ptr, hard);
  if (B == 0) return;
  if (x_ptr == 0 || out_ptr == 0 || u_ptr == 0)
    throw std::invalid_argument("molrg_forward: null pointer");
  J.x = reinterpret_cast<const float*>(x_ptr);
  J.out = reinterpret_cast<float*>(out_ptr);
  J.w = reinterpret_cast<float*>(w_ptr);
  J.U = reinterpret_cast<const float*>(u_ptr);

  std::unique_ptr<float[]> ut(new float[static_cast<size_t>(std::max<int64_t>(1, J.D * J.n8))]);
  J.Ut = ut.get();
  const bool avx2 = use_avx2();

#ifdef _OPENMP
  const int nthreads = omp_get_max_threads();
#else
  const int nthreads = 1;
#endif
  const int64_t M = chunk_rows(B, J.D8, nthreads);
  const int64_t nchunks = (B + M - 1) / M;
  // Fork only when there is enough work (~ >= 10 us on one core) and more than one chunk.
  const bool par = nthreads > 1 && nchunks > 1 && B * n * J.D >= (int64_t(1) << 17);
  const int64_t TB = 64;  // rows of U per transpose block
  const int64_t ntb = (n + TB - 1) / TB;

#pragma omp parallel if (par)
  {
    float* Ut = ut.get();
#pragma omp for schedule(static)
    for (int64_t t = 0; t < ntb; ++t) transpose_block(J, Ut, t * TB, std::min(n, (t + 1) * TB));
#pragma omp single
    for (int64_t j = 0; j < J.D; ++j)
      for (int64_t i = n; i < J.n8; ++i) Ut[j * J.n8 + i] = 0.0f;
    // (implicit barriers after the for and the single)
    std::unique_ptr<float[]> scratch(new float[static_cast<size_t>((M + 4) * J.D8)]);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t r0 = c * M, r1 = std::min(B, r0 + M);
#if FD_MOLRG_X86
      if (avx2) chunk_avx2(J, r0, r1, scratch.get());
      else
#endif
        chunk_generic(J, r0, r1, scratch.get());
    }
  }
  (void)avx2;
}


// =======================================================================================
// Fused MoLRG backward (CPU), the math of denoise._MoLRGFunction.backward per row:
//   P = U^T x (recomputed), c_j = w'_{k(j)} C_{k(j)}, q = P c, dq = U^T G, dP = dq c
//   (soft: + 2 P_j g_k dl_k, dc_k = sum_{j in k} dq_j P_j, dw = (1 - gw) C dc,
//   dl = w (dw - <w, dw>)), dx = A G + U dP, dU = sum_rows G q^T + x dP^T.
// Same chunk / tile structure as the forward: phase 1 P and dq (proj tiles), phase 2 the
// per-row mix (in place: P -> q, dq -> dP), phase 3 dx (out tiles with x = G), phase 4
// dU partial sums over the chunk's rows in float32 registers, flushed into a per-thread
// float64 (n, D8) accumulator; the accumulators are added up (in float64) at the end.
// dx must not alias x or G.
namespace {

struct MolrgBwd {
  MolrgJob J;               // x, U, Ut, off, params, labels, hard, sizes (J.out = dx)
  const float* G;
  const float* w;           // (B, K) posterior from the forward
  const int32_t* seg;       // (D8) component of each column, K for the padding columns
};

// Phase 2 for rows [r0, r1): P (q on exit), Q (dq on entry, dP on exit), rows of D8.
inline void bwd_mix_rows(const MolrgBwd& Bw, int64_t r0, int64_t r1, float* P, float* Q) {
  const MolrgJob& J = Bw.J;
  const int K = J.K;
  const int64_t* off = J.off;
  float cf[MIX_CAP], gf[MIX_CAP];
  double dw[MIX_CAP];
  for (int64_t r = r0; r < r1; ++r) {
    float* p = P + (r - r0) * J.D8;
    float* dq = Q + (r - r0) * J.D8;
    const float* pr = params_row(J, r);
    const float* g = pr;
    const float* C = pr + 2 * K;
    const double gw = pr[3 * K + 1];
    const float* w = Bw.w + r * K;
    const int64_t lab = J.labels ? J.labels[r] : -1;
    for (int k = 0; k < K; ++k) {
      double wk = w[k];
      if (J.labels) wk = (1.0 - gw) * wk + (k == lab ? gw : 0.0);
      cf[k] = static_cast<float>(wk * static_cast<double>(C[k]));
    }
    if (!J.hard) {
      double sw = 0.0;
      for (int k = 0; k < K; ++k) {
        double dc = 0.0;
        for (int64_t j = off[k]; j < off[k + 1]; ++j) dc += static_cast<double>(dq[j]) * p[j];
        dw[k] = (1.0 - gw) * static_cast<double>(C[k]) * dc;
        sw += static_cast<double>(w[k]) * dw[k];
      }
      for (int k = 0; k < K; ++k)
        gf[k] = static_cast<float>(2.0 * static_cast<double>(g[k]) * (w[k] * (dw[k] - sw)));
      for (int k = 0; k < K; ++k) {
        const float c = cf[k], h = gf[k];
        for (int64_t j = off[k]; j < off[k + 1]; ++j) {
          const float pj = p[j];
          dq[j] = dq[j] * c + pj * h;
          p[j] = pj * c;
        }
      }
    } else {
      for (int k = 0; k < K; ++k) {
        const float c = cf[k];
        for (int64_t j = off[k]; j < off[k + 1]; ++j) {
          dq[j] *= c;
          p[j] *= c;
        }
      }
    }
  }
}

// Generic path.  S: scratch of 2 (M + 4) D8 + n D8 floats.
void bwd_chunk_generic(const MolrgBwd& Bw, int64_t r0, int64_t r1, float* S, double* acc) {
  const MolrgJob& J = Bw.J;
  const int64_t n = J.n, D = J.D, D8 = J.D8, M = r1 - r0;
  float* P = S;
  float* Q = S + M * D8;
  float* T = Q + M * D8;  // n x D8
  // phase 1 (plain sums of n terms)
  for (int64_t r = r0; r < r1; ++r) {
    float* __restrict pp = P + (r - r0) * D8;
    float* __restrict qq = Q + (r - r0) * D8;
    std::fill(pp, pp + D8, 0.0f);
    std::fill(qq, qq + D8, 0.0f);
    const float* xr = J.x + r * n;
    const float* gr = Bw.G + r * n;
    for (int64_t i = 0; i < n; ++i) {
      const float* __restrict u = J.U + i * D;
      const float xv = xr[i], gv = gr[i];
      for (int64_t j = 0; j < D; ++j) {
        pp[j] += xv * u[j];
        qq[j] += gv * u[j];
      }
    }
  }
  bwd_mix_rows(Bw, r0, r1, P, Q);
  // phase 3
  for (int64_t r = r0; r < r1; ++r) {
    const float A = params_row(J, r)[3 * J.K];
    const float* gr = Bw.G + r * n;
    float* __restrict o = J.out + r * n;
    for (int64_t i = 0; i < n; ++i) o[i] = A * gr[i];
    const float* dp = Q + (r - r0) * D8;
    for (int64_t j = 0; j < D; ++j) {
      const float* __restrict u = J.Ut + j * J.n8;
      const float v = dp[j];
      for (int64_t i = 0; i < n; ++i) o[i] += v * u[i];
    }
  }
  // phase 4
  std::fill(T, T + n * D8, 0.0f);
  for (int64_t r = r0; r < r1; ++r) {
    const float* __restrict q = P + (r - r0) * D8;
    const float* __restrict dp = Q + (r - r0) * D8;
    const float* xr = J.x + r * n;
    const float* gr = Bw.G + r * n;
    for (int64_t i = 0; i < n; ++i) {
      const float gv = gr[i], xv = xr[i];
      float* __restrict t = T + i * D8;
      for (int64_t j = 0; j < D8; ++j) t[j] += gv * q[j] + xv * dp[j];
    }
  }
  for (int64_t e = 0; e < n * D8; ++e) acc[e] += T[e];
}

#if FD_MOLRG_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")

// acc[i0 + r, jt : jt + 8 NV] (float64, row stride D8) += sum_{rows} G[row, i0 + r] q[row, jt..]
//                                                        + X[row, i0 + r] dP[row, jt..]
template <int MR, int NV>
__attribute__((always_inline)) inline void du_tile(const float* G, const float* X, int64_t n,
                                                   int64_t rows, const float* q, const float* dp,
                                                   int64_t ldq, double* acc, int64_t lda) {
  __m256 a[MR][NV];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) a[r][v] = _mm256_setzero_ps();
  for (int64_t t = 0; t < rows; ++t) {
    __m256 u[NV];
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) u[v] = _mm256_loadu_ps(q + t * ldq + 8 * v);
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      const __m256 b = _mm256_broadcast_ss(G + t * n + r);
#pragma GCC unroll 3
      for (int v = 0; v < NV; ++v) a[r][v] = _mm256_fmadd_ps(b, u[v], a[r][v]);
    }
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) u[v] = _mm256_loadu_ps(dp + t * ldq + 8 * v);
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      const __m256 b = _mm256_broadcast_ss(X + t * n + r);
#pragma GCC unroll 3
      for (int v = 0; v < NV; ++v) a[r][v] = _mm256_fmadd_ps(b, u[v], a[r][v]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) {
      double* d = acc + r * lda + 8 * v;
      const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(a[r][v]));
      const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(a[r][v], 1));
      _mm256_storeu_pd(d, _mm256_add_pd(_mm256_loadu_pd(d), lo));
      _mm256_storeu_pd(d + 4, _mm256_add_pd(_mm256_loadu_pd(d + 4), hi));
    }
}

template <int MR>
void du_dispatch(int nv, const float* G, const float* X, int64_t n, int64_t rows, const float* q,
                 const float* dp, int64_t ldq, double* acc, int64_t lda) {
  switch (nv) {
    case 1: du_tile<MR, 1>(G, X, n, rows, q, dp, ldq, acc, lda); break;
    case 2: du_tile<MR, 2>(G, X, n, rows, q, dp, ldq, acc, lda); break;
    default: du_tile<MR, 3>(G, X, n, rows, q, dp, ldq, acc, lda); break;
  }
}

// Phase 2 (bwd_mix_rows) vectorized over the columns: the per-column factors c_{k(j)} and
// 2 g_k dl_k are gathered through Bw.seg; dc_k sums the float32 products dq_j P_j.
void bwd_mix_rows_avx2(const MolrgBwd& Bw, int64_t r0, int64_t r1, float* P, float* Q) {
  const MolrgJob& J = Bw.J;
  const int K = J.K;
  const int64_t* off = J.off;
  const int64_t D8 = J.D8;
  alignas(32) float cf[MIX_CAP + 1], gf[MIX_CAP + 1];
  double dw[MIX_CAP];
  cf[K] = 0.0f;
  gf[K] = 0.0f;
  std::unique_ptr<float[]> prod(J.hard ? nullptr : new float[static_cast<size_t>(D8)]);
  for (int64_t r = r0; r < r1; ++r) {
    float* p = P + (r - r0) * D8;
    float* dq = Q + (r - r0) * D8;
    const float* pr = params_row(J, r);
    const float* g = pr;
    const float* C = pr + 2 * K;
    const double gw = pr[3 * K + 1];
    const float* w = Bw.w + r * K;
    const int64_t lab = J.labels ? J.labels[r] : -1;
    for (int k = 0; k < K; ++k) {
      double wk = w[k];
      if (J.labels) wk = (1.0 - gw) * wk + (k == lab ? gw : 0.0);
      cf[k] = static_cast<float>(wk * static_cast<double>(C[k]));
    }
    if (!J.hard) {
      float* pd = prod.get();
      for (int64_t j = 0; j < D8; j += 8)
        _mm256_storeu_ps(pd + j, _mm256_mul_ps(_mm256_loadu_ps(dq + j), _mm256_loadu_ps(p + j)));
      double sw = 0.0;
      for (int k = 0; k < K; ++k) {
        float dc0 = 0.0f, dc1 = 0.0f;
        int64_t j = off[k];
        for (; j + 2 <= off[k + 1]; j += 2) {
          dc0 += pd[j];
          dc1 += pd[j + 1];
        }
        if (j < off[k + 1]) dc0 += pd[j];
        dw[k] = (1.0 - gw) * static_cast<double>(C[k]) * static_cast<double>(dc0 + dc1);
        sw += static_cast<double>(w[k]) * dw[k];
      }
      for (int k = 0; k < K; ++k)
        gf[k] = static_cast<float>(2.0 * static_cast<double>(g[k]) * (w[k] * (dw[k] - sw)));
    }
    for (int64_t j = 0; j < D8; j += 8) {
      const __m256i idx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(Bw.seg + j));
      const __m256 c = _mm256_i32gather_ps(cf, idx, 4);
      const __m256 pv = _mm256_loadu_ps(p + j);
      __m256 dv = _mm256_mul_ps(_mm256_loadu_ps(dq + j), c);
      if (!J.hard) dv = _mm256_fmadd_ps(pv, _mm256_i32gather_ps(gf, idx, 4), dv);
      _mm256_storeu_ps(dq + j, dv);
      _mm256_storeu_ps(p + j, _mm256_mul_ps(pv, c));
    }
  }
}

// S: scratch of 2 (M + 4) D8 floats.
void bwd_chunk_avx2(const MolrgBwd& Bw, int64_t r0, int64_t r1, float* S, double* acc) {
  const MolrgJob& J = Bw.J;
  const int64_t n = J.n, D = J.D, D8 = J.D8, M = r1 - r0;
  float* P = S;
  float* Q = S + M * D8;
  // phase 1: P = X U, dq = G U (rows of D8, padding columns 0)
  for (int64_t ib = 0; ib == 0 || ib < n; ib += KBLK) {
    const int64_t ie = std::min(n, ib + KBLK);
    for (int64_t jt = 0; jt < D; jt += TILE) {
      const int64_t cols = std::min(TILE, D - jt);
      const int nv = static_cast<int>((cols + 7) / 8);
      const bool mask = (cols & 7) != 0;
      const __m256i m = tail_mask(mask ? (cols & 7) : 8);
      int64_t r = r0;
      for (; r + 4 <= r1; r += 4) {
        proj_dispatch<4>(nv, mask, J.x + r * n, n, ib, ie, J.U + jt, D, P + (r - r0) * D8 + jt,
                         D8, m);
        proj_dispatch<4>(nv, mask, Bw.G + r * n, n, ib, ie, J.U + jt, D,
                         Q + (r - r0) * D8 + jt, D8, m);
      }
      for (; r < r1; ++r) {
        proj_dispatch<1>(nv, mask, J.x + r * n, n, ib, ie, J.U + jt, D, P + (r - r0) * D8 + jt,
                         D8, m);
        proj_dispatch<1>(nv, mask, Bw.G + r * n, n, ib, ie, J.U + jt, D,
                         Q + (r - r0) * D8 + jt, D8, m);
      }
    }
  }
  // phase 2
  bwd_mix_rows_avx2(Bw, r0, r1, P, Q);
  // phase 3: dx = A G + dP Ut
  out_rows_avx2(J, r0, r1, Q, Bw.G);
  // phase 4: acc += G^T q + X^T dP over the chunk's rows (padding columns of q / dP are 0)
  const float* Gc = Bw.G + r0 * n;
  const float* Xc = J.x + r0 * n;
  for (int64_t jt = 0; jt < D; jt += TILE) {
    const int nv = static_cast<int>((std::min(TILE, D - jt) + 7) / 8);
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
      du_dispatch<4>(nv, Gc + i, Xc + i, n, M, P + jt, Q + jt, D8, acc + i * D8 + jt, D8);
    for (; i < n; ++i)
      du_dispatch<1>(nv, Gc + i, Xc + i, n, M, P + jt, Q + jt, D8, acc + i * D8 + jt, D8);
  }
}

#pragma GCC pop_options
#endif  // FD_MOLRG_X86

}  // namespace

void molrg_backward(uintptr_t x_ptr, uintptr_t g_ptr, uintptr_t w_ptr, uintptr_t dx_ptr,
                    uintptr_t du_ptr, int64_t B, int64_t n, uintptr_t u_ptr,
                    const std::vector<int64_t>& offsets, uintptr_t params_ptr, int64_t R,
                    uintptr_t labels_ptr, bool hard) {
  MolrgBwd Bw;
  MolrgJob& J = Bw.J;
  J = molrg_job("molrg_backward", B, n, offsets, params_ptr, R, labels_ptr, hard);
  const int64_t K = J.K, D = J.D;
  if (n == 0) return;
  if (du_ptr == 0) throw std::invalid_argument("molrg_backward: null pointer");
  float* dU = reinterpret_cast<float*>(du_ptr);
  if (B == 0) {
    std::fill(dU, dU + n * D, 0.0f);
    return;
  }
  if (x_ptr == 0 || g_ptr == 0 || w_ptr == 0 || dx_ptr == 0 || u_ptr == 0)
    throw std::invalid_argument("molrg_backward: null pointer");
  J.x = reinterpret_cast<const float*>(x_ptr);
  J.out = reinterpret_cast<float*>(dx_ptr);
  J.U = reinterpret_cast<const float*>(u_ptr);
  Bw.G = reinterpret_cast<const float*>(g_ptr);
  Bw.w = reinterpret_cast<const float*>(w_ptr);

  std::unique_ptr<float[]> ut(new float[static_cast<size_t>(J.D * J.n8)]);
  J.Ut = ut.get();
  const bool avx2 = use_avx2();
  std::vector<int32_t> seg(static_cast<size_t>(J.D8), static_cast<int32_t>(K));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = offsets[k]; j < offsets[k + 1]; ++j) seg[j] = static_cast<int32_t>(k);
  Bw.seg = seg.data();

#ifdef _OPENMP
  const int nthreads = omp_get_max_threads();
#else
  const int nthreads = 1;
#endif
  const int64_t M = chunk_rows(B, J.D8, nthreads);
  const int64_t nchunks = (B + M - 1) / M;
  const bool par = nthreads > 1 && nchunks > 1 && B * n * J.D >= (int64_t(1) << 16);
  const int64_t TB = 64;
  const int64_t ntb = (n + TB - 1) / TB;
  const int64_t accn = n * J.D8;
  std::unique_ptr<double[]> accs(new double[static_cast<size_t>(accn * nthreads)]);
  int team = 1;

#pragma omp parallel if (par)
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num();
#else
    const int tid = 0;
#endif
    float* Ut = ut.get();
#pragma omp single
    {
#ifdef _OPENMP
      team = omp_get_num_threads();
#endif
      for (int64_t j = 0; j < J.D; ++j)
        for (int64_t i = n; i < J.n8; ++i) Ut[j * J.n8 + i] = 0.0f;
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < ntb; ++t) transpose_block(J, Ut, t * TB, std::min(n, (t + 1) * TB));
    double* acc = accs.get() + tid * accn;
    std::fill(acc, acc + accn, 0.0);
    std::unique_ptr<float[]> scratch(
        new float[static_cast<size_t>(2 * (M + 4) * J.D8 + (avx2 ? 0 : n * J.D8))]);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t r0 = c * M, r1 = std::min(B, r0 + M);
#if FD_MOLRG_X86
      if (avx2) bwd_chunk_avx2(Bw, r0, r1, scratch.get(), acc);
      else
#endif
        bwd_chunk_generic(Bw, r0, r1, scratch.get(), acc);
    }
    // (implicit barrier) reduce the per-thread accumulators
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      float* du = dU + i * D;
      for (int64_t j = 0; j < D; ++j) {
        double s = 0.0;
        for (int t = 0; t < team; ++t) s += accs[t * accn + i * J.D8 + j];
        du[j] = static_cast<float>(s);
      }
    }
  }
  (void)avx2;
}


// =======================================================================================
// The per-row mix alone (phase 2 of the forward and of the backward), for callers that do
// the big products with a library GEMM: denoise._molrg_torch on large CPU problems, where
// oneDNN's GEMM outruns the register tiles above and the mix is what torch would otherwise
// spread over a dozen (B, D) passes.  P = x Ucat (B, D), row-major with stride D (the masked /
// generic row routines take any stride); rows in blocks of 64 over OpenMP threads.
namespace {

constexpr int64_t MIX_BLOCK = 64;

template <class F>
void for_row_blocks(int64_t B, int64_t D, F&& f) {
  const int64_t nb = (B + MIX_BLOCK - 1) / MIX_BLOCK;
  const bool par = nb > 1 && B * D >= (int64_t(1) << 14);
#pragma omp parallel for schedule(static) if (par)
  for (int64_t b = 0; b < nb; ++b) f(b * MIX_BLOCK, std::min(B, (b + 1) * MIX_BLOCK));
}

}  // namespace

void molrg_mix(uintptr_t p_ptr, uintptr_t q_ptr, uintptr_t w_ptr, int64_t B,
               const std::vector<int64_t>& offsets, uintptr_t params_ptr, int64_t R,
               uintptr_t labels_ptr, bool hard) {
  MolrgJob J = molrg_job("molrg_mix", B, 0, offsets, params_ptr, R, labels_ptr, hard);
  if (B == 0) return;
  if (p_ptr == 0 || q_ptr == 0) throw std::invalid_argument("molrg_mix: null pointer");
  J.w = reinterpret_cast<float*>(w_ptr);
  J.D8 = J.D;  // row stride
  const float* P = reinterpret_cast<const float*>(p_ptr);
  float* Q = reinterpret_cast<float*>(q_ptr);
  const bool avx2 = use_avx2();
  for_row_blocks(B, J.D, [&](int64_t r0, int64_t r1) {
    float* q = Q + r0 * J.D;
    std::memcpy(q, P + r0 * J.D, static_cast<size_t>((r1 - r0) * J.D) * sizeof(float));
#if FD_MOLRG_X86
    if (avx2) return mix_rows_avx2(J, r0, r1, q);
#endif
    mix_rows_generic(J, r0, r1, q);
  });
  (void)avx2;
}

void molrg_mix_backward(uintptr_t p_ptr, uintptr_t dq_ptr, uintptr_t w_ptr, uintptr_t q_ptr,
                        int64_t B, const std::vector<int64_t>& offsets, uintptr_t params_ptr,
                        int64_t R, uintptr_t labels_ptr, bool hard) {
  MolrgBwd Bw{};
  MolrgJob& J = Bw.J;
  J = molrg_job("molrg_mix_backward", B, 0, offsets, params_ptr, R, labels_ptr, hard);
  if (B == 0) return;
  if (p_ptr == 0 || dq_ptr == 0 || w_ptr == 0 || q_ptr == 0)
    throw std::invalid_argument("molrg_mix_backward: null pointer");
  J.D8 = J.D;  // row stride
  Bw.w = reinterpret_cast<const float*>(w_ptr);
  const float* P = reinterpret_cast<const float*>(p_ptr);
  float* dQ = reinterpret_cast<float*>(dq_ptr);
  float* Q = reinterpret_cast<float*>(q_ptr);
  for_row_blocks(B, J.D, [&](int64_t r0, int64_t r1) {
    float* q = Q + r0 * J.D;
    std::memcpy(q, P + r0 * J.D, static_cast<size_t>((r1 - r0) * J.D) * sizeof(float));
    bwd_mix_rows(Bw, r0, r1, q, dQ + r0 * J.D);
  });
}

}  // namespace fastdiff
