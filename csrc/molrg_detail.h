// fastdiff fused MoLRG denoiser: what the translation units of the kernel share
// (molrg_forward.cpp, molrg_backward.cpp, molrg_mix.cpp), among it the posterior's one
// implementation (below "The MoLRG posterior").  Internal: included by those files
// only.  The math and the code paths are described at the top of molrg_forward.cpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "molrg.h"
#include "exp_nonpos.h"
#include "philox.h"

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

// The backward's data (molrg_backward.cpp; molrg_mix_backward uses the mix part).
struct MolrgBwd {
  MolrgJob J;               // x, U, Ut, off, params, labels, hard, sizes (J.out = dx)
  const float* G;
  const float* w;           // (B, K) posterior from the forward
  const int32_t* seg;       // (D8) component of each column, K for the padding columns
};

// =======================================================================================
// The MoLRG posterior (docs/math.md sec. 2; seed 002 Lemma 1 / eq. 9, seed 004 eq. 7.4.20),
// each piece written once.  Every C++ caller goes through these: molrg_forward and the fused
// trajectory (through molrg_rows), molrg_backward, molrg_mix / molrg_mix_backward.
//   logits      l_k  = b_k + g_k ||P_k||^2              (posterior_logits)
//   weights     w    = softmax_k(l) | one_hot(argmax)   (posterior_weights)
//   guidance    c_k  = float(w'_k C_k), w'_k = (1 - gw) w_k + gw [k == label]   (guided_coefs)
//   mix         q_j  = c_{k(j)} P_j                     (mix_rows; x0_hat = A x + U q is phase 3)
//   backward    dl_k = w_k (dw_k - <w, dw>), dw_k = (1 - gw) C_k dc_k            (bwd_mix_rows)
// The few loops whose best form depends on the ISA are the members of an ISA policy: ScalarIsa
// below (plain loops GCC vectorizes for the caller's ISA) and Avx2Isa (molrg_avx2.h); the
// templates take one and are instantiated once per path in molrg_mix.cpp, which use_avx2()
// (cpu_features.h) picks between.  Everything here is always_inline, so that the avx2
// instantiations compile the shared loops (the exps, the softmax) for AVX2 as well.

// exp_nonpos (Cephes expf for x <= 0): csrc/exp_nonpos.h, shared with the empirical scan.

// The logits of one row: l[k] = b_k + g_k ||P_k||^2 in float64 (P: the row's projections,
// pr: its parameter row [g(K), b(K), C(K), A, gw]).
template <class Isa>
FD_MOLRG_INLINE void posterior_logits(const MolrgJob& J, const float* p, const float* pr,
                                      double* l) {
  const int K = J.K;
  for (int k = 0; k < K; ++k)
    l[k] = static_cast<double>(pr[K + k]) +
           static_cast<double>(pr[k]) * Isa::sum_sq(p + J.off[k], J.off[k + 1] - J.off[k]);
}

// The per-row guided (CFG) coefficients of the mix, forward and backward alike:
//   cf[k] = float(w'_k C_k),  w'_k = (1 - gw) w_k + gw [k == label]  (w'_k = w_k without labels)
// for row r with parameter row pr; w: the row's posterior (float64 in the forward, the saved
// float32 one in the backward).
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

// The posterior of rows [rs, re) from their logits L ((re - rs) x K, overwritten by w in
// float64): softmax (max subtracted first; the exps in float32, the sum in float64) or one-hot
// argmax (ties -> lowest k); NaN logits (and, soft, a max of +-inf: 0/0 as torch) give a NaN
// row.  Writes J.w (float32, when set) and CF[(r - rs) K + k] = guided_coefs.  E: scratch.
// The exps of all the rows form one loop that vectorizes.
FD_MOLRG_INLINE void posterior_weights(const MolrgJob& J, int64_t rs, int64_t re, double* L,
                                       float* E, float* CF) {
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
    guided_coefs(J, r, params_row(J, r), w, CF + (r - rs) * K);
  }
}

// Phase 2 of the forward for rows [r0, r1): P (rows of stride J.D8, row r0 first) holds
// P = U^T x on entry and q = w'_k C_k P on exit; writes w.  Rows go in batches of MIX_CAP / K
// so that the exps of a batch form one loop.
template <class Isa>
FD_MOLRG_INLINE void mix_rows(const MolrgJob& J, int64_t r0, int64_t r1, float* P) {
  const int K = J.K;
  const int64_t* off = J.off;
  double L[MIX_CAP];
  float E[MIX_CAP], CF[MIX_CAP];
  const int64_t rb = std::max<int64_t>(1, MIX_CAP / K);
  for (int64_t rs = r0; rs < r1; rs += rb) {
    const int64_t re = std::min(r1, rs + rb);
    for (int64_t r = rs; r < re; ++r)
      posterior_logits<Isa>(J, P + (r - r0) * J.D8, params_row(J, r), L + (r - rs) * K);
    posterior_weights(J, rs, re, L, E, CF);
    for (int64_t r = rs; r < re; ++r) {
      float* p = P + (r - r0) * J.D8;
      const float* cf = CF + (r - rs) * K;
      for (int k = 0; k < K; ++k) Isa::scale(p + off[k], off[k + 1] - off[k], cf[k]);
    }
  }
}

// The softmax backward through the guided weights, one row (the math at the top of
// molrg_backward.cpp): from dc_k = sum_{j in k} dq_j P_j,
//   dw_k = (1 - gw) C_k dc_k,  dl_k = w_k (dw_k - <w, dw>),  gf[k] = float(2 g_k dl_k).
FD_MOLRG_INLINE void posterior_logit_grads(const MolrgJob& J, const float* pr, const float* w,
                                           const double* dc, float* gf) {
  const int K = J.K;
  const float* g = pr;
  const float* C = pr + 2 * K;
  const double gw = pr[3 * K + 1];
  double dw[MIX_CAP];
  double sw = 0.0;
  for (int k = 0; k < K; ++k) {
    dw[k] = (1.0 - gw) * static_cast<double>(C[k]) * dc[k];
    sw += static_cast<double>(w[k]) * dw[k];
  }
  for (int k = 0; k < K; ++k)
    gf[k] = static_cast<float>(2.0 * static_cast<double>(g[k]) * (w[k] * (dw[k] - sw)));
}

// Phase 2 of the backward for rows [r0, r1): P (P on entry, q on exit), Q (dq = U^T G on entry,
// dP = dq c + 2 P g dl on exit; hard: dq c), rows of stride J.D8; w from the forward.
template <class Isa>
FD_MOLRG_INLINE void bwd_mix_rows(const MolrgBwd& Bw, int64_t r0, int64_t r1, float* P,
                                  float* Q) {
  const MolrgJob& J = Bw.J;
  const int K = J.K;
  alignas(32) float cf[MIX_CAP + 1], gf[MIX_CAP + 1];  // [K]: the padding columns' factor 0
  double dc[MIX_CAP];
  cf[K] = 0.0f;
  gf[K] = 0.0f;
  std::unique_ptr<float[]> prod(J.hard || !Isa::kBwdScratch ? nullptr
                                                            : new float[static_cast<size_t>(J.D8)]);
  for (int64_t r = r0; r < r1; ++r) {
    float* p = P + (r - r0) * J.D8;
    float* dq = Q + (r - r0) * J.D8;
    const float* pr = params_row(J, r);
    const float* w = Bw.w + r * K;
    guided_coefs(J, r, pr, w, cf);
    if (!J.hard) {
      Isa::segment_dots(J, dq, p, prod.get(), dc);
      posterior_logit_grads(J, pr, w, dc, gf);
    }
    Isa::bwd_scale(Bw, p, dq, cf, gf);
  }
}

// The ISA policy of the generic path: plain loops (GCC vectorizes them for the baseline ISA).
struct ScalarIsa {
  // float64 sum of squares of p[0, d) (four partial sums: one float64 chain would be latency
  // bound).
  static FD_MOLRG_INLINE double sum_sq(const float* p, int64_t d) {
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
  static FD_MOLRG_INLINE void scale(float* p, int64_t d, float c) {
    for (int64_t j = 0; j < d; ++j) p[j] *= c;
  }
  // dc[k] = sum_{j in comp k} dq_j P_j, in float64 (exact products)
  static constexpr bool kBwdScratch = false;
  static FD_MOLRG_INLINE void segment_dots(const MolrgJob& J, const float* dq, const float* p,
                                           float*, double* dc) {
    for (int k = 0; k < J.K; ++k) {
      double s = 0.0;
      for (int64_t j = J.off[k]; j < J.off[k + 1]; ++j) s += static_cast<double>(dq[j]) * p[j];
      dc[k] = s;
    }
  }
  // dq_j = dq_j c_k + P_j h_k (soft) or dq_j c_k (hard), P_j = P_j c_k, j in comp k
  static FD_MOLRG_INLINE void bwd_scale(const MolrgBwd& Bw, float* p, float* dq, const float* cf,
                                        const float* gf) {
    const MolrgJob& J = Bw.J;
    const int64_t* off = J.off;
    if (J.hard) {
      for (int k = 0; k < J.K; ++k) {
        const float c = cf[k];
        for (int64_t j = off[k]; j < off[k + 1]; ++j) {
          dq[j] *= c;
          p[j] *= c;
        }
      }
      return;
    }
    for (int k = 0; k < J.K; ++k) {
      const float c = cf[k], h = gf[k];
      for (int64_t j = off[k]; j < off[k + 1]; ++j) {
        const float pj = p[j];
        dq[j] = dq[j] * c + pj * h;
        p[j] = pj * c;
      }
    }
  }
};

// Phase 1, generic path, rows [r0, r1): P[r - r0, :] = X[r, :] U (rows of D8, padding columns
// 0), summed over i in blocks of IBLK (T: scratch of 4 D8 floats for the block sums), rows in
// groups of 4; with X2 also P2 = X2 U in the same pass (the backward: P = x U and dq = G U share
// each row of U; T then holds 8 D8 floats).  The avx2 path's proj_rows_avx2 (molrg_avx2.h) sums
// in the same blocks.
FD_MOLRG_INLINE void proj_rows_generic(const MolrgJob& J, int64_t r0, int64_t r1, const float* X,
                                       float* P, float* T, const float* X2 = nullptr,
                                       float* P2 = nullptr) {
  const int64_t n = J.n, D = J.D, D8 = J.D8;
  float* T2 = T + 4 * D8;
  const int nx = X2 ? 2 : 1;
  for (int64_t r = r0; r < r1; r += 4) {
    const int rg = static_cast<int>(std::min<int64_t>(4, r1 - r));
    for (int s = 0; s < nx; ++s) {
      float* Pr = (s ? P2 : P) + (r - r0) * D8;
      for (int rr = 0; rr < rg; ++rr) std::fill(Pr + rr * D8, Pr + (rr + 1) * D8, 0.0f);
    }
    for (int64_t i0 = 0; i0 < n; i0 += IBLK) {
      const int64_t i1 = std::min(n, i0 + IBLK);
      for (int rr = 0; rr < 4 * nx; ++rr) std::fill(T + rr * D8, T + rr * D8 + D, 0.0f);
      for (int64_t i = i0; i < i1; ++i) {
        const float* __restrict u = J.U + i * D;
        for (int rr = 0; rr < rg; ++rr) {
          const float xv = X[(r + rr) * n + i];
          float* __restrict tt = T + rr * D8;
          if (!X2) {
            for (int64_t j = 0; j < D; ++j) tt[j] += xv * u[j];
            continue;
          }
          const float gv = X2[(r + rr) * n + i];
          float* __restrict t2 = T2 + rr * D8;
          for (int64_t j = 0; j < D; ++j) {
            tt[j] += xv * u[j];
            t2[j] += gv * u[j];
          }
        }
      }
      for (int s = 0; s < nx; ++s)
        for (int rr = 0; rr < rg; ++rr) {
          float* __restrict pp = (s ? P2 : P) + (r - r0 + rr) * D8;
          const float* __restrict tt = (s ? T2 : T) + rr * D8;
          for (int64_t j = 0; j < D; ++j) pp[j] += tt[j];
        }
    }
  }
}

// Phase 3, generic path, rows [r0, r1): out[r, :] = A_r src[r, :] + Q[r - r0, :] Ut (Q rows of
// stride D8), rows in groups of 4.  The forward passes src = x with the mixed projections q
// (x0_hat = A x + U q); the backward src = G with dP (its J.out is dx).  src and out may alias
// (the forward in place).  Inline, so that each chunk keeps its loops in its own (aligned) body.
FD_MOLRG_INLINE void out_rows_generic(const MolrgJob& J, int64_t r0, int64_t r1, const float* Q,
                                      const float* src) {
  const int64_t n = J.n, D = J.D, D8 = J.D8;
  for (int64_t r = r0; r < r1; r += 4) {
    const int rg = static_cast<int>(std::min<int64_t>(4, r1 - r));
    const float* Qr = Q + (r - r0) * D8;
    // (src and out may alias: each element is read before it is written)
    for (int rr = 0; rr < rg; ++rr) {
      const float A = params_row(J, r + rr)[3 * J.K];
      const float* xr = src + (r + rr) * n;
      float* o = J.out + (r + rr) * n;
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC ivdep
#endif
      for (int64_t i = 0; i < n; ++i) o[i] = A * xr[i];
    }
    for (int64_t j = 0; j < D; ++j) {
      const float* __restrict u = J.Ut + j * J.n8;
      for (int rr = 0; rr < rg; ++rr) {
        const float qv = Qr[rr * D8 + j];
        float* __restrict o = J.out + (r + rr) * n;
        for (int64_t i = 0; i < n; ++i) o[i] += qv * u[i];
      }
    }
  }
}

// ---- molrg_forward.cpp (molrg_job: molrg.h)
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


// ---- molrg_mix.cpp: phase 2 (mix_rows / bwd_mix_rows above) instantiated for the generic
// path (the avx2 ones in molrg_avx2.h), as the fused kernels and the GEMM form call them.
void mix_rows_generic(const MolrgJob& J, int64_t r0, int64_t r1, float* P);
void bwd_mix_rows_generic(const MolrgBwd& Bw, int64_t r0, int64_t r1, float* P, float* Q);

}  // namespace molrg_detail
}  // namespace fastdiff
