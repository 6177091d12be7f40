// fastdiff discrete Langevin flip kernel (CPU); the contract is fastdiff/ops/discrete_langevin.py:
//
//   out[i] = u_i < sigmoid(l_i) ? +1 : -1,    l_i = a * score[i] + b * anchor[i]     i in [0, n)
//   u_i    = uniform Philox stream (seed, offset + i)   (rng.py rand(): word (g % 4) of quad g / 4)
//
// Returns the number of anchor entries not in {-1, +1} (the callers' binary check, same pass).
// float32 in and out, math in float32, sigmoid(l) = 1 / (1 + exp(-l)).  score may be absent
// (score_ptr == 0: l_i = b * anchor[i]).  No -ffast-math: a NaN logit compares false (-1).
//
// Structure (as csrc/fused_step.cpp): OpenMP (schedule(static)) over blocks of BLOCK elements;
// per block the uniforms go to a stack buffer (philox.h: AVX-512F or AVX2 intrinsics, or the
// auto-vectorized loop), then one branch-free loop (exp as a Cephes polynomial, so it vectorizes)
// writes the signs.  Code paths picked once at run time (use_avx2(), use_avx512()): the same loop
// compiled for AVX2 + FMA, or for the baseline ISA; the uniforms 16 quads a vector where AVX-512F is.
#include <algorithm>
#include <cstdint>
#include <stdexcept>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_features.h"
#include "philox.h"

namespace fastdiff {

namespace {

using philox::as_float;
using philox::as_uint;
using philox::KeySchedule;
using philox::mask_if;
using philox::sel;

constexpr int64_t BLOCK = 2048;  // elements per OpenMP work item (a multiple of 8 and of 4)


// exp(x) for float x, Cephes expf: x = n ln2 + r, |r| <= ln2 / 2, degree-6 polynomial, 2^n by
// exponent bits.  x clamped to [-87, 88] so 2^n stays a normal float (the sigmoid saturates there
// anyway: exp(-88) ~ 6e-39).  Branch-free so the loops below vectorize; ~1 ulp.
FD_INLINE float exp_f32(float x) {
  // clamps as mask selects (a float ?: is not if-converted: GCC keeps the branch, the loop stays
  // scalar); a NaN x gives junk here, flip_loop tests l itself
  x = as_float(sel(mask_if(x < 88.0f), as_uint(x), as_uint(88.0f)));
  x = as_float(sel(mask_if(x > -87.0f), as_uint(x), as_uint(-87.0f)));
  // n = round(x / ln2) by the 1.5 * 2^23 trick (round to nearest, no floorf: SSE2 has no roundps)
  const float fn = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  const float z = r * r;
  float y = 1.9875691500E-4f;
  y = y * r + 1.3981999507E-3f;
  y = y * r + 8.3334519073E-3f;
  y = y * r + 4.1665795894E-2f;
  y = y * r + 1.6666665459E-1f;
  y = y * r + 5.0000001201E-1f;
  y = y * z + r + 1.0f;
  const int32_t n = static_cast<int32_t>(fn);
  return y * as_float(static_cast<uint32_t>(n + 127) << 23);
}

// Returns the number of anchor entries that are not -1 or +1 (the binary check of the callers
// whose anchor is a state y; counted in the same pass, so validating costs no extra read).
template <bool HS>
FD_INLINE int64_t flip_loop(float* out, const float* anchor, const float* score, const float* u, float a,
                            float b, int64_t len) {
  int32_t bad = 0;
#if defined(_OPENMP)
#pragma omp simd reduction(+ : bad)
#elif defined(__GNUC__) && !defined(__clang__)
#pragma GCC ivdep
#endif
  for (int64_t i = 0; i < len; ++i) {
    const float v = anchor[i];
    bad += static_cast<int32_t>((v != 1.0f) & (v != -1.0f));
    float l = b * v;
    if constexpr (HS) l += a * score[i];
    const float p = 1.0f / (1.0f + exp_f32(-l));
    // -1 unless u < p and l is a number; the sign as a bit mask (a select that vectorizes)
    const uint32_t minus = ~(mask_if(u[i] < p) & mask_if(l == l));
    out[i] = as_float(0x3F800000u | (minus & 0x80000000u));
  }
  return bad;
}

using FlipFn = int64_t (*)(float*, const float*, const float*, const float*, float, float, int64_t);
using UniformsFn = void (*)(const KeySchedule&, uint64_t, int64_t, float*);

template <bool HS>
int64_t flip_generic(float* out, const float* anchor, const float* score, const float* u, float a, float b,
                     int64_t len) {
  return flip_loop<HS>(out, anchor, score, u, a, b, len);
}

void uniforms_generic(const KeySchedule& ks, uint64_t q0, int64_t nq, float* u) {
  philox::philox_uniforms(ks, q0, nq, u);
}

#if FD_X86
template <bool HS>
__attribute__((target("avx2,fma"))) int64_t flip_avx2(float* out, const float* anchor, const float* score,
                                                      const float* u, float a, float b, int64_t len) {
  return flip_loop<HS>(out, anchor, score, u, a, b, len);
}

__attribute__((target("avx2,fma"))) void uniforms_avx2(const KeySchedule& ks, uint64_t q0, int64_t nq,
                                                       float* u) {
  philox::philox_uniforms_avx2(ks, q0, nq, u);
}

__attribute__((target("avx512f,avx2,fma,f16c,prefer-vector-width=512"))) void uniforms_avx512(const KeySchedule& ks, uint64_t q0,
                                                                      int64_t nq, float* u) {
  philox::philox_uniforms_avx512(ks, q0, nq, u);
}
#endif

}  // namespace

int64_t discrete_flip(uintptr_t out_ptr, uintptr_t anchor_ptr, uintptr_t score_ptr, int64_t n, float a,
                      float b, uint64_t seed, uint64_t offset) {
  if (offset % 4 != 0) throw std::invalid_argument("discrete_flip: offset must be a multiple of 4");
  if (n <= 0) return 0;
  float* out = reinterpret_cast<float*>(out_ptr);
  const float* anchor = reinterpret_cast<const float*>(anchor_ptr);
  const float* score = reinterpret_cast<const float*>(score_ptr);
  const bool hs = score != nullptr;
  FlipFn flip = hs ? &flip_generic<true> : &flip_generic<false>;
  UniformsFn uniforms = &uniforms_generic;
#if FD_X86
  if (use_avx2()) {
    flip = hs ? &flip_avx2<true> : &flip_avx2<false>;
    uniforms = use_avx512() ? &uniforms_avx512 : &uniforms_avx2;
  }
#endif
  const KeySchedule ks(seed);
  const int64_t nblocks = (n + BLOCK - 1) / BLOCK;
  // parallel when there is enough work to beat the fork / join (~ a few us): Philox + exp per element
  const bool par = n >= 4 * BLOCK;
  int64_t bad = 0;
#pragma omp parallel for schedule(static) if (par) reduction(+ : bad)
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    alignas(64) float ubuf[BLOCK];
    const int64_t i0 = blk * BLOCK;
    const int64_t len = std::min(n, i0 + BLOCK) - i0;
    // i0 and offset are multiples of 4: the block starts on a stream quad
    uniforms(ks, (offset + static_cast<uint64_t>(i0)) >> 2, (len + 3) / 4, ubuf);
    bad += flip(out + i0, anchor + i0, hs ? score + i0 : nullptr, ubuf, a, b, len);
  }
  return bad;
}

}  // namespace fastdiff
