// fastdiff fused MoLRG denoiser: the AVX2 + FMA register tiles shared by the forward and the
// backward (x86-64 only; call only when use_avx2(), cpu_features.h).  Internal: included by
// molrg_forward.cpp / molrg_backward.cpp / molrg_mix.cpp only.  The tile structure is described
// at the top of molrg_forward.cpp.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu_features.h"
#include "molrg_detail.h"

#if FD_X86
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace fastdiff {
namespace molrg_detail {

inline __m256i tail_mask(int64_t valid) {  // lanes [0, valid) on, valid in [1, 8]
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(valid)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

#define FD_AVX2_INLINE inline __attribute__((always_inline))

// The pieces of every register tile (phase 1, phase 3, the backward's dU): an MR x NV tile of
// 8-float vectors acc[r][v], updated by rank-1 products a[r] * u[0:8 NV].

// f(r, v) for every vector of an MR x NV tile (fully unrolled).
template <int MR, int NV, class F>
FD_AVX2_INLINE void for_each_vec(F&& f) {
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) f(r, v);
}

// uv[v] = u[8 v : 8 v + 8], the last vector masked if MASK (masked lanes load 0).
template <int NV, bool MASK>
FD_AVX2_INLINE void load_row(const float* u, __m256 (&uv)[NV], __m256i m = _mm256_setzero_si256()) {
#pragma GCC unroll 3
  for (int v = 0; v < NV; ++v)
    uv[v] = (MASK && v == NV - 1) ? _mm256_maskload_ps(u + 8 * v, m) : _mm256_loadu_ps(u + 8 * v);
}

// acc[r][v] += a[r * lda] uv[v] (FMA), r < MR.
template <int MR, int NV>
FD_AVX2_INLINE void rank1_update(__m256 (&acc)[MR][NV], const float* a, int64_t lda,
                                 const __m256 (&uv)[NV]) {
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) {
    const __m256 b = _mm256_broadcast_ss(a + r * lda);
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(b, uv[v], acc[r][v]);
  }
}

// acc[r][v] += sum_{t in [t0, t1)} a[r lda + t] u[t ldu + 8 v : ... + 8] (rows of u masked as
// load_row): the product loop of phases 1 and 3.
template <int MR, int NV, bool MASK>
FD_AVX2_INLINE void accumulate_tile(__m256 (&acc)[MR][NV], const float* a, int64_t lda,
                                    const float* u, int64_t ldu, int64_t t0, int64_t t1,
                                    __m256i m) {
  for (int64_t t = t0; t < t1; ++t) {
    __m256 uv[NV];
    load_row<NV, MASK>(u + t * ldu, uv, m);
    rank1_update(acc, a + t, lda, uv);
  }
}

// Internal linkage, as when these lived in one file: each including file gets its own copy.
namespace {

// P[r, 0:8 NV] (+)= sum_{i in [ib, ie)} x[r, i] U[i, 0:8 NV] for MR rows (stores when ib == 0,
// adds otherwise); the last vector of U masked if MASK (masked lanes load 0, so the padding
// columns of P come out 0).
template <int MR, int NV, bool MASK>
FD_AVX2_INLINE void proj_tile(const float* x, int64_t n, int64_t ib, int64_t ie, const float* U,
                              int64_t ldu, float* P, int64_t ldp, __m256i m) {
  for (int64_t i0 = ib; i0 == ib || i0 < ie; i0 += IBLK) {
    const int64_t i1 = std::min(ie, i0 + IBLK);
    __m256 acc[MR][NV];
    for_each_vec<MR, NV>([&](int r, int v) { acc[r][v] = _mm256_setzero_ps(); });
    accumulate_tile<MR, NV, MASK>(acc, x, n, U, ldu, i0, i1, m);
    for_each_vec<MR, NV>([&](int r, int v) {
      float* pp = P + r * ldp + 8 * v;
      _mm256_storeu_ps(pp, i0 == 0 ? acc[r][v] : _mm256_add_ps(_mm256_loadu_ps(pp), acc[r][v]));
    });
  }
}

// out[r, 0:8 NV] = A_r x[r, 0:8 NV] + sum_{j in [jb, je)} q[r, j] Ut[j, 0:8 NV] for MR rows
// when jb == 0, out += the sum otherwise; the last vector of x / out masked if MASK (Ut is
// padded, its loads never are).
template <int MR, int NV, bool MASK>
FD_AVX2_INLINE void out_tile(const float* q, int64_t ldq, int64_t jb, int64_t je, const float* Ut,
                             int64_t ldt, const float* x, float* out, int64_t n, const float* A,
                             __m256i m) {
  __m256 acc[MR][NV];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) {
    __m256 xv[NV];
    load_row<NV, MASK>((jb == 0 ? x : out) + r * n, xv, m);
    const __m256 a = _mm256_set1_ps(A[r]);
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) acc[r][v] = jb == 0 ? _mm256_mul_ps(a, xv[v]) : xv[v];
  }
  accumulate_tile<MR, NV, false>(acc, q, ldq, Ut, ldt, jb, je, m);
  for_each_vec<MR, NV>([&](int r, int v) {
    float* op = out + r * n + 8 * v;
    if (MASK && v == NV - 1) _mm256_maskstore_ps(op, m, acc[r][v]);
    else _mm256_storeu_ps(op, acc[r][v]);
  });
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

}  // namespace

constexpr int64_t TILE = 24;  // columns per register tile (3 vectors)

// Phase 1 over blocks of KBLK values of i and phase 3 over blocks of KBLK values of j, so that
// the 24-wide strip of U / Ut of a block (24 KB) stays in L1 across the row groups of a chunk.
constexpr int64_t KBLK = 256;  // multiple of IBLK

// The tile walk of phases 1 and 3: columns [0, width) in tiles of TILE (nv vectors, the last
// one masked by m when mask), rows [r0, r1) in groups of 4, then one by one:
// f(std::integral_constant<int, MR>, r, jt, nv, mask, m) for each tile.
template <class F>
FD_AVX2_INLINE void for_each_tile(int64_t width, int64_t r0, int64_t r1, F&& f) {
  for (int64_t jt = 0; jt < width; jt += TILE) {
    const int64_t cols = std::min(TILE, width - jt);
    const int nv = static_cast<int>((cols + 7) / 8);
    const bool mask = (cols & 7) != 0;
    const __m256i m = tail_mask(mask ? (cols & 7) : 8);
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) f(std::integral_constant<int, 4>{}, r, jt, nv, mask, m);
    for (; r < r1; ++r) f(std::integral_constant<int, 1>{}, r, jt, nv, mask, m);
  }
}

namespace {

// Phase 1 for rows [r0, r1): P[r - r0, :] = X[r, :] U (rows of D8, padding columns 0), over
// blocks of KBLK values of i and register tiles of TILE columns; with X2 also P2 = X2 U in the
// same pass (the backward: P = x U and dq = G U use each strip of U while it is in L1).
FD_MOLRG_INLINE void proj_rows_avx2(const MolrgJob& J, int64_t r0, int64_t r1, const float* X,
                                    float* P, const float* X2 = nullptr, float* P2 = nullptr) {
  const int64_t n = J.n, D = J.D, D8 = J.D8;
  for (int64_t ib = 0; ib == 0 || ib < n; ib += KBLK) {
    const int64_t ie = std::min(n, ib + KBLK);
    for_each_tile(D, r0, r1, [&](auto mr, int64_t r, int64_t jt, int nv, bool mask, __m256i m) {
      constexpr int MR = decltype(mr)::value;
      proj_dispatch<MR>(nv, mask, X + r * n, n, ib, ie, J.U + jt, D, P + (r - r0) * D8 + jt, D8,
                        m);
      if (X2)
        proj_dispatch<MR>(nv, mask, X2 + r * n, n, ib, ie, J.U + jt, D, P2 + (r - r0) * D8 + jt,
                          D8, m);
    });
  }
}

}  // namespace

// The posterior's ISA policy of the avx2 path (the generic one: ScalarIsa, molrg_detail.h).
// Plain inline (an always_inline avx2 function cannot be inlined into the ISA-neutral
// templates); the avx2 instantiations are flatten, which inlines these into them.
struct Avx2Isa {
  // float64 sum of squares of p[0, d): exact float -> double, FMA in float64.
  static inline double sum_sq(const float* p, int64_t d) {
    __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
    for (int64_t j = 0; j < d; j += 8) {
      const __m256 v = j + 8 <= d ? _mm256_loadu_ps(p + j) : _mm256_maskload_ps(p + j, tail_mask(d - j));
      const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
      const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
      a0 = _mm256_fmadd_pd(lo, lo, a0);
      a1 = _mm256_fmadd_pd(hi, hi, a1);
    }
    const __m256d a = _mm256_add_pd(a0, a1);
    const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
    return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
  }
  static inline void scale(float* p, int64_t d, float c) {
    const __m256 cv = _mm256_set1_ps(c);
    int64_t j = 0;
    for (; j + 8 <= d; j += 8) _mm256_storeu_ps(p + j, _mm256_mul_ps(cv, _mm256_loadu_ps(p + j)));
    if (j < d) {
      const __m256i m = tail_mask(d - j);
      _mm256_maskstore_ps(p + j, m, _mm256_mul_ps(cv, _mm256_maskload_ps(p + j, m)));
    }
  }
  // dc[k] = sum_{j in comp k} dq_j P_j: the float32 products of the whole row (D8) first, then
  // two float32 partial sums per component.  prod: D8 floats.
  static constexpr bool kBwdScratch = true;
  static inline void segment_dots(const MolrgJob& J, const float* dq, const float* p,
                                  float* prod, double* dc) {
    for (int64_t j = 0; j < J.D8; j += 8)
      _mm256_storeu_ps(prod + j, _mm256_mul_ps(_mm256_loadu_ps(dq + j), _mm256_loadu_ps(p + j)));
    for (int k = 0; k < J.K; ++k) {
      float dc0 = 0.0f, dc1 = 0.0f;
      int64_t j = J.off[k];
      for (; j + 2 <= J.off[k + 1]; j += 2) {
        dc0 += prod[j];
        dc1 += prod[j + 1];
      }
      if (j < J.off[k + 1]) dc0 += prod[j];
      dc[k] = static_cast<double>(dc0 + dc1);
    }
  }
  // dq_j = dq_j c_k + P_j h_k (soft; FMA) or dq_j c_k (hard), P_j = P_j c_k, vectorized over
  // the columns (D8: the padding columns are component K, factor 0): the per-column factors are
  // gathered through Bw.seg.
  static inline void bwd_scale(const MolrgBwd& Bw, float* p, float* dq, const float* cf,
                               const float* gf) {
    for (int64_t j = 0; j < Bw.J.D8; j += 8) {
      const __m256i idx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(Bw.seg + j));
      const __m256 c = _mm256_i32gather_ps(cf, idx, 4);
      const __m256 pv = _mm256_loadu_ps(p + j);
      __m256 dv = _mm256_mul_ps(_mm256_loadu_ps(dq + j), c);
      if (!Bw.J.hard) dv = _mm256_fmadd_ps(pv, _mm256_i32gather_ps(gf, idx, 4), dv);
      _mm256_storeu_ps(dq + j, dv);
      _mm256_storeu_ps(p + j, _mm256_mul_ps(pv, c));
    }
  }
};

// ---- molrg_forward.cpp
// Phase 3 for rows [r0, r1): out[r, :] = A_r src[r, :] + Q[r - r0, :] Ut, over blocks of KBLK
// values of j and register tiles of TILE columns.  The forward passes src = x with the mixed
// projections q; the backward src = G with dP (its J.out is dx).
void out_rows_avx2(const MolrgJob& J, int64_t r0, int64_t r1, const float* Q, const float* src);

// ---- molrg_mix.cpp: phase 2 (mix_rows / bwd_mix_rows, molrg_detail.h) for the avx2 path
void mix_rows_avx2(const MolrgJob& J, int64_t r0, int64_t r1, float* P);
void bwd_mix_rows_avx2(const MolrgBwd& Bw, int64_t r0, int64_t r1, float* P, float* Q);

}  // namespace molrg_detail
}  // namespace fastdiff

#pragma GCC pop_options
#endif  // FD_X86
