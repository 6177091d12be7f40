// fastdiff fused MoLRG denoiser, phase 2: the per-row mix (logits, softmax / argmax, the
// guided coefficients, q = w'_k C_k P; and its backward), generic and avx2 paths, used by the
// fused kernels (molrg_forward.cpp, molrg_backward.cpp) and on its own by the GEMM form below.
// The math and the code paths are described at the top of molrg_forward.cpp, the backward's
// at the top of molrg_backward.cpp.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <vector>

#include "cpu_features.h"
#include "molrg.h"
#include "molrg_avx2.h"
#include "molrg_detail.h"
#include "philox.h"

namespace fastdiff {
namespace molrg_detail {
namespace {

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
    guided_coefs(J, r, pr, w, CF + (r - rs) * K);
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

}  // namespace

FD_MOLRG_ALIGNED void mix_rows_generic(const MolrgJob& J, int64_t r0, int64_t r1, float* P) {
  FD_MOLRG_MIX_ROWS(sum_sq, scale_generic)
}

// Phase 2 of the backward (declared in molrg_detail.h), per row (the math at the top of
// molrg_backward.cpp).
FD_MOLRG_ALIGNED void bwd_mix_rows(const MolrgBwd& Bw, int64_t r0, int64_t r1, float* P,
                                   float* Q) {
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
    guided_coefs(J, r, pr, w, cf);
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

#if FD_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace {

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

}  // namespace

FD_MOLRG_ALIGNED void mix_rows_avx2(const MolrgJob& J, int64_t r0, int64_t r1, float* P) {
  FD_MOLRG_MIX_ROWS(sum_sq_avx2, scale_avx2)
}

// Phase 2 (bwd_mix_rows) vectorized over the columns: the per-column factors c_{k(j)} and
// 2 g_k dl_k are gathered through Bw.seg; dc_k sums the float32 products dq_j P_j.
FD_MOLRG_ALIGNED void bwd_mix_rows_avx2(const MolrgBwd& Bw, int64_t r0, int64_t r1, float* P,
                                        float* Q) {
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
    guided_coefs(J, r, pr, w, cf);
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

#pragma GCC pop_options
#endif  // FD_X86

}  // namespace molrg_detail

using namespace molrg_detail;

// =======================================================================================
// The per-row mix alone (phase 2 of the forward and of the backward), for callers that do
// the big products with a library GEMM: fastdiff.ops.molrg.forward_torch on large CPU problems, where
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
#if FD_X86
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
