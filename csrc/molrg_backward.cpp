// fastdiff fused MoLRG softmax-projection denoiser backward (CPU).  The forward's math, tile
// structure and code paths are described at the top of molrg_forward.cpp; phase 2 (the
// per-row mix and the softmax backward) is the posterior's one implementation, molrg_detail.h.
//
// Fused MoLRG backward (CPU), the math of fastdiff.ops.molrg.MoLRGFunction.backward per row:
//   P = U^T x (recomputed), c_j = w'_{k(j)} C_{k(j)}, q = P c, dq = U^T G, dP = dq c
//   (soft: + 2 P_j g_k dl_k, dc_k = sum_{j in k} dq_j P_j, dw = (1 - gw) C dc,
//   dl = w (dw - <w, dw>)), dx = A G + U dP, dU = sum_rows G q^T + x dP^T.
// Same chunk / tile structure as the forward: phase 1 P and dq (proj tiles), phase 2 the
// per-row mix (in place: P -> q, dq -> dP), phase 3 dx (out tiles with x = G), phase 4
// dU partial sums over the chunk's rows in float32 registers, flushed into a per-thread
// float64 (n, D8) accumulator; the accumulators are added up (in float64) at the end.
// dx must not alias x or G.
#include <algorithm>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <vector>

#include "cpu_features.h"
#include "molrg.h"
#include "molrg_avx2.h"
#include "molrg_detail.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastdiff {

using namespace molrg_detail;

namespace {

// Generic path.  S: scratch of 2 (M + 4) D8 + n D8 floats.
FD_MOLRG_ALIGNED void bwd_chunk_generic(const MolrgBwd& Bw, int64_t r0, int64_t r1, float* S,
                                        double* acc) {
  const MolrgJob& J = Bw.J;
  const int64_t n = J.n, D8 = J.D8, M = r1 - r0;
  float* P = S;
  float* Q = S + M * D8;
  float* T = Q + M * D8;  // n x D8 (phase 4; phase 1's block sums use 8 x D8 of it: >= 8 D8 follow Q)
  // phase 1: P = X U (the forward's sums, recomputed), dq = G U
  proj_rows_generic(J, r0, r1, J.x, P, T, Bw.G, Q);
  bwd_mix_rows_generic(Bw, r0, r1, P, Q);
  // phase 3: dx = A G + dP Ut
  out_rows_generic(J, r0, r1, Q, Bw.G);
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

#if FD_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")

// acc[i0 + r, jt : jt + 8 NV] (float64, row stride D8) += sum_{rows} G[row, i0 + r] q[row, jt..]
//                                                        + X[row, i0 + r] dP[row, jt..]
template <int MR, int NV>
__attribute__((always_inline)) inline void du_tile(const float* G, const float* X, int64_t n,
                                                   int64_t rows, const float* q, const float* dp,
                                                   int64_t ldq, double* acc, int64_t lda) {
  __m256 a[MR][NV];
  for_each_vec<MR, NV>([&](int r, int v) { a[r][v] = _mm256_setzero_ps(); });
  for (int64_t t = 0; t < rows; ++t) {
    __m256 u[NV];
    load_row<NV, false>(q + t * ldq, u);
    rank1_update(a, G + t * n, 1, u);
    load_row<NV, false>(dp + t * ldq, u);
    rank1_update(a, X + t * n, 1, u);
  }
  for_each_vec<MR, NV>([&](int r, int v) {
    double* d = acc + r * lda + 8 * v;
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(a[r][v]));
    const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(a[r][v], 1));
    _mm256_storeu_pd(d, _mm256_add_pd(_mm256_loadu_pd(d), lo));
    _mm256_storeu_pd(d + 4, _mm256_add_pd(_mm256_loadu_pd(d + 4), hi));
  });
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

// S: scratch of 2 (M + 4) D8 floats.
FD_MOLRG_ALIGNED void bwd_chunk_avx2(const MolrgBwd& Bw, int64_t r0, int64_t r1, float* S,
                                     double* acc) {
  const MolrgJob& J = Bw.J;
  const int64_t n = J.n, D = J.D, D8 = J.D8, M = r1 - r0;
  float* P = S;
  float* Q = S + M * D8;
  proj_rows_avx2(J, r0, r1, J.x, P, Bw.G, Q);  // phase 1: P = X U, dq = G U
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
#endif  // FD_X86

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

  const RowPlan pl = row_plan(B, n, J.D, J.D8, int64_t(1) << 16);
  const int64_t M = pl.M, nchunks = pl.nchunks, TB = pl.TB, ntb = pl.ntb;
  const int64_t accn = n * J.D8;
  std::unique_ptr<double[]> accs(new double[static_cast<size_t>(accn * pl.nthreads)]);
  int team = 1;

#pragma omp parallel if (pl.par)
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
#if FD_X86
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

}  // namespace fastdiff
