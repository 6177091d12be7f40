// fastdiff fused MoLRG denoiser, phase 2: the per-row mix (logits, softmax / argmax, the
// guided coefficients, q = w'_k C_k P; and its backward) instantiated for the generic and avx2
// paths from its one implementation in molrg_detail.h, used by the fused kernels
// (molrg_forward.cpp, molrg_backward.cpp, and through molrg_rows the fused trajectory) and on
// its own by the GEMM form below.  The math and the code paths are described at the top of
// molrg_forward.cpp, the backward's at the top of molrg_backward.cpp.
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

namespace fastdiff {
namespace molrg_detail {

// Phase 2 of the fused kernels, once per code path: the templates are the posterior's one
// implementation (molrg_detail.h), the ISA policies their path-specific loops.
FD_MOLRG_ALIGNED void mix_rows_generic(const MolrgJob& J, int64_t r0, int64_t r1, float* P) {
  mix_rows<ScalarIsa>(J, r0, r1, P);
}

FD_MOLRG_ALIGNED void bwd_mix_rows_generic(const MolrgBwd& Bw, int64_t r0, int64_t r1, float* P,
                                           float* Q) {
  bwd_mix_rows<ScalarIsa>(Bw, r0, r1, P, Q);
}

#if FD_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")

// flatten: inlines Avx2Isa's members (and the templates' loops) into the AVX2 + FMA function.
FD_MOLRG_ALIGNED __attribute__((flatten)) void mix_rows_avx2(const MolrgJob& J, int64_t r0,
                                                             int64_t r1, float* P) {
  mix_rows<Avx2Isa>(J, r0, r1, P);
}

FD_MOLRG_ALIGNED __attribute__((flatten)) void bwd_mix_rows_avx2(const MolrgBwd& Bw, int64_t r0,
                                                                 int64_t r1, float* P, float* Q) {
  bwd_mix_rows<Avx2Isa>(Bw, r0, r1, P, Q);
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
    bwd_mix_rows_generic(Bw, r0, r1, q, dQ + r0 * J.D);
  });
}

}  // namespace fastdiff
