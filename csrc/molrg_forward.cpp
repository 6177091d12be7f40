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
// Two code paths, picked once at run time (use_avx2(), cpu_features.h: FASTDIFF_CPU_SIMD=sse2
// forces the generic one):
//   "avx2":  AVX2 + FMA intrinsics register tiles (masked loads/stores for ragged tails);
//   generic: plain C++ loops of the same structure that GCC vectorizes for the baseline ISA.
//
// Files: this one (the per-row forward: molrg_rows / molrg_transpose / molrg_forward, phases 1
// and 3, and the checks shared by the entry points), molrg_detail.h (the posterior, phase 2,
// written once for every caller: logits, softmax / argmax, guidance, the mix and its backward;
// the generic phases 1 and 3), molrg_avx2.h (the AVX2 register tiles and the posterior's AVX2
// loops), molrg_mix.cpp (phase 2 instantiated per code path; molrg_mix / molrg_mix_backward for
// the GEMM form), molrg_backward.cpp (molrg_backward), molrg.h (the per-row routine, shared
// with trajectory.cpp).
#include <algorithm>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "molrg.h"
#include "molrg_avx2.h"
#include "molrg_detail.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastdiff {
namespace molrg_detail {

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

RowPlan row_plan(int64_t B, int64_t n, int64_t D, int64_t D8, int64_t min_work) {
  RowPlan p;
#ifdef _OPENMP
  p.nthreads = omp_get_max_threads();
#else
  p.nthreads = 1;
#endif
  int64_t m = std::max<int64_t>(4, (32768 / D8) & ~int64_t(3));
  m = std::min<int64_t>(m, 32);
  const int64_t per = (B + 4 * p.nthreads - 1) / (4 * p.nthreads);  // ~4 chunks per thread
  p.M = std::min(m, std::max<int64_t>(4, (per + 3) & ~int64_t(3)));
  p.nchunks = (B + p.M - 1) / p.M;
  p.par = p.nthreads > 1 && p.nchunks > 1 && B * n * D >= min_work;
  p.TB = 64;  // rows of U per transpose block
  p.ntb = (n + p.TB - 1) / p.TB;
  return p;
}

#if FD_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
// (declared in molrg_avx2.h)
FD_MOLRG_ALIGNED void out_rows_avx2(const MolrgJob& J, int64_t r0, int64_t r1, const float* Q,
                                    const float* src) {
  const int64_t n = J.n, D = J.D, D8 = J.D8;
  for (int64_t jb = 0; jb < D; jb += KBLK) {
    const int64_t je = std::min(D, jb + KBLK);
    for_each_tile(n, r0, r1, [&](auto mr, int64_t r, int64_t it, int nv, bool mask, __m256i m) {
      constexpr int MR = decltype(mr)::value;
      float A[MR];
      for (int rr = 0; rr < MR; ++rr) A[rr] = params_row(J, r + rr)[3 * J.K];
      out_dispatch<MR>(nv, mask, Q + (r - r0) * D8, D8, jb, je, J.Ut + it, J.n8, src + r * n + it,
                       J.out + r * n + it, n, A, m);
    });
  }
}
#pragma GCC pop_options
#endif  // FD_X86

}  // namespace molrg_detail

using namespace molrg_detail;

namespace {

// ---------------------------------------------------------------------------------------
// Generic path: plain loops (GCC vectorizes the innermost, contiguous ones).
// P: scratch of (r1 - r0 + 4) x D8 floats (the last 4 rows: block partial sums).
// Rows in groups of 4 through all three phases (the group's P stays in L1).
FD_MOLRG_ALIGNED void chunk_generic(const MolrgJob& J, int64_t r0, int64_t r1, float* P) {
  float* T = P + (r1 - r0) * J.D8;
  for (int64_t r = r0; r < r1; r += 4) {
    const int64_t re = std::min(r1, r + 4);
    float* Pr = P + (r - r0) * J.D8;
    proj_rows_generic(J, r, re, J.x, Pr, T);  // phase 1
    mix_rows_generic(J, r, re, Pr);           // phase 2 (the posterior)
    out_rows_generic(J, r, re, Pr, J.x);      // phase 3: A x + U q
  }
}
// ---------------------------------------------------------------------------------------
// AVX2 + FMA path (x86-64 only, selected at run time).
#if FD_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")

FD_MOLRG_ALIGNED void chunk_avx2(const MolrgJob& J, int64_t r0, int64_t r1, float* P) {
  proj_rows_avx2(J, r0, r1, J.x, P);  // phase 1: P (rows of D8, padding columns 0)
  mix_rows_avx2(J, r0, r1, P);        // phase 2 (the posterior)
  out_rows_avx2(J, r0, r1, P, J.x);   // phase 3: A x + U q
}

#pragma GCC pop_options
#endif  // FD_X86

}  // namespace

// (declared in molrg.h)
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

void molrg_rows(const MolrgJob& J, int64_t r0, int64_t r1, float* scratch) {
#if FD_X86
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

  const RowPlan pl = row_plan(B, n, J.D, J.D8, int64_t(1) << 17);
  const int64_t M = pl.M, nchunks = pl.nchunks, TB = pl.TB, ntb = pl.ntb;

#pragma omp parallel if (pl.par)
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
#if FD_X86
      if (avx2) chunk_avx2(J, r0, r1, scratch.get());
      else
#endif
        chunk_generic(J, r0, r1, scratch.get());
    }
  }
  (void)avx2;
}

}  // namespace fastdiff
