// fastdiff: a branch-free float32 exp for non-positive arguments, written so that a plain loop
// of it vectorizes (SSE2 or AVX2, whichever ISA the caller is compiled for).  Shared by the
// MoLRG posterior (molrg_detail.h: the softmax's exps) and the empirical scan (empirical_scan.h:
// the online softmax's exps).
#pragma once

#include <cstdint>
#include <cstring>

#include "philox.h"  // philox::as_float

#if defined(__GNUC__)
#define FD_EXP_INLINE inline __attribute__((always_inline))
#else
#define FD_EXP_INLINE inline
#endif

namespace fastdiff {

// exp(x) for x <= 0 (Cephes expf, <= ~1 ulp; 0 below -87.3 (a normal-range flush); x = -inf
// gives 0).  Branch-free (float->int by truncation + fix-up, no floor) so that the loop in
// posterior_weights() vectorizes for SSE2 as well as for AVX2 callers.  Not for NaN (filtered).
FD_EXP_INLINE float exp_nonpos(float x) {
  // x <= 0 (or +0): as bit patterns, larger magnitude == larger uint, so clamps and the
  // underflow test are integer ops (selects as mask arithmetic: GCC if-converts them).
  uint32_t xb;
  std::memcpy(&xb, &x, 4);
  const uint32_t lo = 0xC2AE0000u;                              // -87.0f
  const uint32_t under = 0u - static_cast<uint32_t>(xb > 0xC2AEA8F6u);  // x < -87.33f
  const float xc = philox::as_float(xb < lo ? xb : lo);
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
  const float v = p * philox::as_float(static_cast<uint32_t>(n + 127) << 23);  // n >= -126
  uint32_t vb;
  std::memcpy(&vb, &v, 4);
  return philox::as_float(vb & ~under);
}

}  // namespace fastdiff
