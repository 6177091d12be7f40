// fastdiff fused MoLRG denoiser: the AVX2 + FMA register tiles shared by the forward and the
// backward (x86-64 only; call only when use_avx2(), cpu_features.h).  Internal: included by
// molrg_forward.cpp / molrg_backward.cpp / molrg_mix.cpp only.  The tile structure is described
// at the top of molrg_forward.cpp.
#pragma once

#include <algorithm>
#include <cstdint>

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

// Internal linkage, as when these lived in one file: each including file gets its own copy.
namespace {

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

}  // namespace

constexpr int64_t TILE = 24;  // columns per register tile (3 vectors)

// Phase 1 over blocks of KBLK values of i and phase 3 over blocks of KBLK values of j, so that
// the 24-wide strip of U / Ut of a block (24 KB) stays in L1 across the row groups of a chunk.
constexpr int64_t KBLK = 256;  // multiple of IBLK

namespace {

// Phase 1 for rows [r0, r1): P[r - r0, :] = X[r, :] U (rows of D8, padding columns 0), over
// blocks of KBLK values of i and register tiles of TILE columns; with X2 also P2 = X2 U in the
// same pass (the backward: P = x U and dq = G U use each strip of U while it is in L1).
FD_MOLRG_INLINE void proj_rows_avx2(const MolrgJob& J, int64_t r0, int64_t r1, const float* X,
                                    float* P, const float* X2 = nullptr, float* P2 = nullptr) {
  const int64_t n = J.n, D = J.D, D8 = J.D8;
  for (int64_t ib = 0; ib == 0 || ib < n; ib += KBLK) {
    const int64_t ie = std::min(n, ib + KBLK);
    for (int64_t jt = 0; jt < D; jt += TILE) {
      const int64_t cols = std::min(TILE, D - jt);
      const int nv = static_cast<int>((cols + 7) / 8);
      const bool mask = (cols & 7) != 0;
      const __m256i m = tail_mask(mask ? (cols & 7) : 8);
      int64_t r = r0;
      for (; r + 4 <= r1; r += 4) {
        proj_dispatch<4>(nv, mask, X + r * n, n, ib, ie, J.U + jt, D, P + (r - r0) * D8 + jt,
                         D8, m);
        if (X2)
          proj_dispatch<4>(nv, mask, X2 + r * n, n, ib, ie, J.U + jt, D,
                           P2 + (r - r0) * D8 + jt, D8, m);
      }
      for (; r < r1; ++r) {
        proj_dispatch<1>(nv, mask, X + r * n, n, ib, ie, J.U + jt, D, P + (r - r0) * D8 + jt,
                         D8, m);
        if (X2)
          proj_dispatch<1>(nv, mask, X2 + r * n, n, ib, ie, J.U + jt, D,
                           P2 + (r - r0) * D8 + jt, D8, m);
      }
    }
  }
}

}  // namespace

// ---- molrg_forward.cpp
// Phase 3 for rows [r0, r1): out[r, :] = A_r src[r, :] + Q[r - r0, :] Ut, over blocks of KBLK
// values of j and register tiles of TILE columns.  The forward passes src = x with the mixed
// projections q; the backward src = G with dP (its J.out is dx).
void out_rows_avx2(const MolrgJob& J, int64_t r0, int64_t r1, const float* Q, const float* src);

// ---- molrg_mix.cpp: phase 2 vectorized (as mix_rows_generic / bwd_mix_rows, molrg_detail.h)
void mix_rows_avx2(const MolrgJob& J, int64_t r0, int64_t r1, float* P);
void bwd_mix_rows_avx2(const MolrgBwd& Bw, int64_t r0, int64_t r1, float* P, float* Q);

}  // namespace molrg_detail
}  // namespace fastdiff

#pragma GCC pop_options
#endif  // FD_X86
