// fastdiff fused MoLRG denoiser: what the translation units of the kernel share
// (molrg_forward.cpp, molrg_backward.cpp, molrg_mix.cpp).  Internal: included by those files
// only.  The math and the code paths are described at the top of molrg_forward.cpp.
#pragma once

#include <cstdint>
#include <vector>

#include "molrg.h"

#if defined(__GNUC__)
#define FD_MOLRG_INLINE inline __attribute__((always_inline))
#else
#define FD_MOLRG_INLINE inline
#endif

// The row kernels (chunk_*, the mixes, out_rows_avx2) start on a 64-byte boundary.  Their inner
// loops are a few dozen bytes; where they fall relative to 32 / 64-byte boundaries (the decoded
// uop cache lines) otherwise depends on whatever the linker places before them: splitting
// molrg.cpp into files moved the (bit-identical) generic forward chunk by 16 bytes and made it
// 1.45x slower, the aligned one runs as before the split.
#if defined(__GNUC__)
#define FD_MOLRG_ALIGNED __attribute__((aligned(64)))
#else
#define FD_MOLRG_ALIGNED
#endif

namespace fastdiff {
namespace molrg_detail {

constexpr int64_t MOLRG_MAX_K = 1024;
// Phase 1 sums over i in blocks of IBLK terms that are then added up: float32 rounding error
// ~ (IBLK + n / IBLK) eps instead of ~ n eps (the logits amplify errors in P by ~ g |P|).
constexpr int64_t IBLK = 64;
constexpr int MIX_CAP = MOLRG_MAX_K;  // logits per batch of rows in the mix (>= K: one row)

inline const float* params_row(const MolrgJob& J, int64_t r) {
  return J.params + (J.R == 1 ? 0 : r) * J.pstride;
}

// The per-row guided (CFG) coefficients of the mix, forward and backward alike:
//   cf[k] = float(w'_k C_k),  w'_k = (1 - gw) w_k + gw [k == label]  (w'_k = w_k without labels)
// for row r with parameter row pr; w: the row's posterior (float64 in the forward, the saved
// float32 one in the backward).  always_inline, so that each caller compiles it for its own
// ISA (the avx2 callers for AVX2 + FMA), as the loops it replaced.
template <class W>
FD_MOLRG_INLINE void guided_coefs(const MolrgJob& J, int64_t r, const float* pr, const W* w,
                                  float* cf) {
  const int K = J.K;
  const float* C = pr + 2 * K;
  const double gw = pr[3 * K + 1];
  const int64_t lab = J.labels ? J.labels[r] : -1;
  for (int k = 0; k < K; ++k) {
    double wk = w[k];
    if (J.labels) wk = (1.0 - gw) * wk + (k == lab ? gw : 0.0);
    cf[k] = static_cast<float>(wk * static_cast<double>(C[k]));
  }
}

// The backward's data (molrg_backward.cpp; molrg_mix_backward uses the mix part).
struct MolrgBwd {
  MolrgJob J;               // x, U, Ut, off, params, labels, hard, sizes (J.out = dx)
  const float* G;
  const float* w;           // (B, K) posterior from the forward
  const int32_t* seg;       // (D8) component of each column, K for the padding columns
};

// ---- molrg_forward.cpp
// The checks and fields every entry point shares (sizes, offsets, params, labels); the callers
// set the data pointers.  B == 0 passes (the caller returns early); labels are range-checked.
MolrgJob molrg_job(const char* fn, int64_t B, int64_t n, const std::vector<int64_t>& offsets,
                   uintptr_t params_ptr, int64_t R, uintptr_t labels_ptr, bool hard);
// How molrg_forward / molrg_backward split their rows: chunks of M rows (a multiple of 4, scratch
// M x D8 floats <= 32 K floats, at most 32, a few chunks per thread) over nthreads OpenMP
// threads, forked (par) only with more than one chunk and at least min_work = B n D multiply-adds
// (~ >= 10 us on one core); U is transposed in ntb blocks of TB rows.
struct RowPlan {
  int nthreads;
  int64_t M, nchunks;
  bool par;
  int64_t TB, ntb;
};
RowPlan row_plan(int64_t B, int64_t n, int64_t D, int64_t D8, int64_t min_work);
// Ut[j, i] = U[i, j], rows [i0, i1) of U; padding columns [n, n8) of Ut zeroed by the caller.
void transpose_block(const MolrgJob& J, float* Ut, int64_t i0, int64_t i1);

// ---- molrg_mix.cpp: phase 2, the per-row mix (generic path; the avx2 ones in molrg_avx2.h)
// Forward, rows [r0, r1): P (rows of stride J.D8, row r0 first) holds P on entry and
// q = w'_k C_k P on exit; writes w.
void mix_rows_generic(const MolrgJob& J, int64_t r0, int64_t r1, float* P);
// Backward, rows [r0, r1): P (q on exit), Q (dq on entry, dP on exit), rows of stride J.D8.
void bwd_mix_rows(const MolrgBwd& Bw, int64_t r0, int64_t r1, float* P, float* Q);

}  // namespace molrg_detail
}  // namespace fastdiff
