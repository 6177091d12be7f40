// Philox4x32-10 normal stream of fastdiff (CPU side), vectorizable.
//
// The definition lives in fastdiff/reference/rng.py.  Element g (uint64 global index):
//   q = g / 4, lane = g % 4
//   (r0..r3) = Philox4x32-10(counter = (lo32(q), hi32(q), 0, 0), key = (lo32(seed), hi32(seed)))
//   u_j = float(int32(r_j) >= 0 ? int32(r_j) : -int32(r_j) - 1) * 4.6566127342e-10f
//   (n0, n1) = BoxMuller(u0, u1), (n2, n3) = BoxMuller(u2, u3)
//   BoxMuller(a, b) = (r cos th, r sin th), r = sqrt(-2 log max(a, 1e-7)), th = 2 pi * b
//
// Everything here is branch-free scalar code on uint32 / float lanes, written so that GCC
// auto-vectorizes the loop in philox_normals() (no -ffast-math needed): Philox uses 32x32->64
// products, log and sincos are Cephes-style float32 polynomials (<= 2 ulp on the needed
// ranges: log on [1e-7, 1], sin/cos on [0, 2 pi]) because libm calls do not vectorize.
//
// All functions are always_inline so that a caller compiled for a wider ISA (an
// __attribute__((target("avx2,fma"))) clone) gets the loop inlined and vectorized for it.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#if defined(__GNUC__)
#define FD_INLINE inline __attribute__((always_inline))
#else
#define FD_INLINE inline
#endif

namespace fastdiff {
namespace philox {

constexpr uint32_t KEY_A = 0x9E3779B9u;
constexpr uint32_t KEY_B = 0xBB67AE85u;
constexpr uint64_t ROUND_A = 0xD2511F53u;
constexpr uint64_t ROUND_B = 0xCD9E8D57u;
constexpr int N_ROUNDS = 10;

// Round keys of one seed: k0[r], k1[r] for round r.
struct KeySchedule {
  uint32_t k0[N_ROUNDS];
  uint32_t k1[N_ROUNDS];
  explicit KeySchedule(uint64_t seed) {
    uint32_t a = static_cast<uint32_t>(seed), b = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < N_ROUNDS; ++r) {
      k0[r] = a;
      k1[r] = b;
      a += KEY_A;
      b += KEY_B;
    }
  }
};

// One Philox4x32-10 block, Triton's round order (see rng.py).
FD_INLINE void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                             const KeySchedule& ks) {
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 10
#endif
  for (int r = 0; r < N_ROUNDS; ++r) {
    const uint64_t p0 = ROUND_B * static_cast<uint64_t>(c2);
    const uint64_t p1 = ROUND_A * static_cast<uint64_t>(c0);
    const uint32_t n0 = static_cast<uint32_t>(p0 >> 32) ^ c1 ^ ks.k0[r];
    const uint32_t n2 = static_cast<uint32_t>(p1 >> 32) ^ c3 ^ ks.k1[r];
    const uint32_t n1 = static_cast<uint32_t>(p0);
    const uint32_t n3 = static_cast<uint32_t>(p1);
    c0 = n0;
    c1 = n1;
    c2 = n2;
    c3 = n3;
  }
}

FD_INLINE float as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Branch-free select on bit masks (a float ?: is not if-converted: the loops would stay scalar).
FD_INLINE uint32_t mask_if(bool c) { return 0u - static_cast<uint32_t>(c); }  // all-ones if c
FD_INLINE uint32_t sel(uint32_t m, uint32_t a, uint32_t b) { return (a & m) | (b & ~m); }
FD_INLINE uint32_t as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Triton's uint_to_uniform_float: int32 x, negatives -> -x - 1 (== ~x), times 2^-31-ish.
FD_INLINE float uint_to_uniform(uint32_t r) {
  const int32_t x = static_cast<int32_t>(r);
  const int32_t y = x ^ (x >> 31);  // x >= 0 ? x : -x - 1
  return static_cast<float>(y) * 4.6566127342e-10f;
}

// Natural log for x in [1e-7, 1] (positive normal floats), Cephes logf. Branch-free.
FD_INLINE float log_pos(float x) {
  const uint32_t ix = as_uint(x);
  int32_t e = static_cast<int32_t>(ix >> 23) - 126;             // x = m * 2^e, m in [0.5, 1)
  float m = as_float((ix & 0x007FFFFFu) | 0x3F000000u);
  // m < sqrt(1/2): use 2m and e - 1.  Integer compare / exponent bump (no branches: GCC
  // would otherwise duplicate the whole tail per case and refuse to vectorize).
  const uint32_t small = as_uint(m) < 0x3F3504F3u ? 1u : 0u;    // 0x3F3504F3 = sqrt(1/2)
  e -= static_cast<int32_t>(small);
  m = as_float(as_uint(m) + (small << 23)) - 1.0f;               // m in [sqrt(.5)-1, sqrt(2)-1)
  const float z = m * m;
  float y = 7.0376836292E-2f;
  y = y * m - 1.1514610310E-1f;
  y = y * m + 1.1676998740E-1f;
  y = y * m - 1.2420140846E-1f;
  y = y * m + 1.4249322787E-1f;
  y = y * m - 1.6668057665E-1f;
  y = y * m + 2.0000714765E-1f;
  y = y * m - 2.4999993993E-1f;
  y = y * m + 3.3333331174E-1f;
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  float r = m + y;
  r += 0.693359375f * fe;
  return r;
}

// sin and cos for x in [0, 2 pi] (a little beyond is fine), Cephes sincosf. Branch-free.
FD_INLINE void sincos_pos(float x, float& s, float& c) {
  int32_t j = static_cast<int32_t>(x * 1.27323954473516f);     // x * 4/pi, truncated (x >= 0)
  j = (j + 1) & ~1;                                              // even octant: 0, 2, 4, 6, 8
  const float y = static_cast<float>(j);
  const float xr = ((x - y * 0.78515625f) - y * 2.4187564849853515625e-4f) -
                   y * 3.77489497744594108e-8f;                  // |xr| <= ~pi/4
  const float z = xr * xr;
  float ps = -1.9515295891E-4f;
  ps = ps * z + 8.3321608736E-3f;
  ps = ps * z - 1.6666654611E-1f;
  ps = ps * z * xr + xr;                                         // sin(xr)
  float pc = 2.443315711809948E-005f;
  pc = pc * z - 1.388731625493765E-003f;
  pc = pc * z + 4.166664568298827E-002f;
  pc = pc * z * z - 0.5f * z + 1.0f;                             // cos(xr)
  // j mod 8: 0 -> (s, c) = (ps, pc); 2 -> (pc, -ps); 4 -> (-ps, -pc); 6 -> (-pc, ps)
  const bool swap = (j & 2) != 0;
  const float sv = swap ? pc : ps;
  const float cv = swap ? ps : pc;
  const uint32_t ssign = static_cast<uint32_t>(j & 4) << 29;         // bit 31 if j & 4
  const uint32_t csign = static_cast<uint32_t>((j + 2) & 4) << 29;   // j in {2, 4} (mod 8)
  s = as_float(as_uint(sv) ^ ssign);
  c = as_float(as_uint(cv) ^ csign);
}

// Box-Muller of one pair; writes (r cos th, r sin th).
FD_INLINE void box_muller(float a, float b, float& n0, float& n1) {
  // max(a, 1e-7) on the bit patterns (a >= 0), an integer max that vectorizes.
  const uint32_t ab = as_uint(a), lb = as_uint(1.0e-7f);
  const float ua = as_float(ab > lb ? ab : lb);
  const float th = 6.283185307179586f * b;
  const float r = __builtin_sqrtf(-2.0f * log_pos(ua));
  float s, c;
  sincos_pos(th, s, c);
  n0 = r * c;
  n1 = r * s;
}

// The four normals of quad index q (scalar reference path, used by tests / tails).
FD_INLINE void normal_quad(const KeySchedule& ks, uint64_t q, float out[4]) {
  uint32_t c0 = static_cast<uint32_t>(q), c1 = static_cast<uint32_t>(q >> 32), c2 = 0, c3 = 0;
  philox4x32_10(c0, c1, c2, c3, ks);
  box_muller(uint_to_uniform(c0), uint_to_uniform(c1), out[0], out[1]);
  box_muller(uint_to_uniform(c2), uint_to_uniform(c3), out[2], out[3]);
}

// The Philox words (r0, r1, r2, r3) of quads q0 .. q0 + nq - 1, handed to emit(i, r0, r1, r2, r3):
// the one counter loop of the portable streams below.  The loop auto-vectorizes with emit inlined;
// q0 + i may cross a 2^32 boundary (the hi word carries).
template <class Emit>
FD_INLINE void philox_quads(const KeySchedule& ks, uint64_t q0, int64_t nq, Emit&& emit) {
  const uint32_t lo0 = static_cast<uint32_t>(q0);
  const uint32_t hi0 = static_cast<uint32_t>(q0 >> 32);
#if defined(_OPENMP)
#pragma omp simd
#elif defined(__GNUC__) && !defined(__clang__)
#pragma GCC ivdep
#endif
  for (int64_t i = 0; i < nq; ++i) {
    uint32_t c0 = lo0 + static_cast<uint32_t>(i);
    uint32_t c1 = hi0 + (c0 < lo0 ? 1u : 0u);
    uint32_t c2 = 0, c3 = 0;
    philox4x32_10(c0, c1, c2, c3, ks);
    emit(i, c0, c1, c2, c3);
  }
}

// Normals of quads q0 .. q0 + nq - 1 into z[0 .. 4 nq) (element order: z[4 i + lane]).
FD_INLINE void philox_normals(const KeySchedule& ks, uint64_t q0, int64_t nq, float* z) {
  philox_quads(ks, q0, nq, [z](int64_t i, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
    float n0, n1, n2, n3;
    box_muller(uint_to_uniform(r0), uint_to_uniform(r1), n0, n1);
    box_muller(uint_to_uniform(r2), uint_to_uniform(r3), n2, n3);
    z[4 * i + 0] = n0;
    z[4 * i + 1] = n1;
    z[4 * i + 2] = n2;
    z[4 * i + 3] = n3;
  });
}

// Uniforms of quads q0 .. q0 + nq - 1 into u[0 .. 4 nq) (element order u[4 i + lane] =
// uint_to_uniform(r_lane)): the uniform stream of rng.py's rand().
FD_INLINE void philox_uniforms(const KeySchedule& ks, uint64_t q0, int64_t nq, float* u) {
  philox_quads(ks, q0, nq, [u](int64_t i, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
    u[4 * i + 0] = uint_to_uniform(r0);
    u[4 * i + 1] = uint_to_uniform(r1);
    u[4 * i + 2] = uint_to_uniform(r2);
    u[4 * i + 3] = uint_to_uniform(r3);
  });
}

#if defined(__x86_64__) || defined(_M_X64)
// ---------------------------------------------------------------------------------------
// AVX2 Philox with explicit intrinsics.  GCC's auto-vectorized 32x32->64 products need
// cross-lane shuffles; here each product is two vpmuludq (even / odd lanes) and two blends.
// About 1.7x faster than the auto-vectorized loop.  Only call after a runtime AVX2 check.
#pragma GCC push_options
#pragma GCC target("avx2,fma")

FD_INLINE void mulhilo_avx2(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i pe = _mm256_mul_epu32(a, m);                        // lanes 0, 2, 4, 6
  const __m256i po = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1, 3, 5, 7
  hi = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
  lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
}

// Philox words of quads q0 + base .. q0 + base + cnt - 1 (cnt <= 64) into r[lane][i], AVX2.
inline void philox_words_avx2(const KeySchedule& ks, uint64_t q0, int64_t base, int64_t cnt,
                              uint32_t (*r)[64]) {
  const uint32_t lo0 = static_cast<uint32_t>(q0);
  const uint32_t hi0 = static_cast<uint32_t>(q0 >> 32);
  const __m256i mA = _mm256_set1_epi64x(static_cast<int64_t>(ROUND_A));
  const __m256i mB = _mm256_set1_epi64x(static_cast<int64_t>(ROUND_B));
  const __m256i sbit = _mm256_set1_epi32(static_cast<int32_t>(0x80000000u));
  const __m256i vlo0 = _mm256_set1_epi32(static_cast<int32_t>(lo0));
  const __m256i vhi0 = _mm256_set1_epi32(static_cast<int32_t>(hi0));
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t v = 0; v < cnt; v += 8) {
    __m256i c0 = _mm256_add_epi32(
        vlo0, _mm256_add_epi32(iota, _mm256_set1_epi32(static_cast<int32_t>(base + v))));
    // carry into the high word when lo0 + i wrapped: c0 < lo0 (unsigned)
    const __m256i wrap =
        _mm256_cmpgt_epi32(_mm256_xor_si256(vlo0, sbit), _mm256_xor_si256(c0, sbit));
    __m256i c1 = _mm256_sub_epi32(vhi0, wrap);
    __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
    for (int rd = 0; rd < N_ROUNDS; ++rd) {
      __m256i hb, lb, ha, la;
      mulhilo_avx2(c2, mB, hb, lb);
      mulhilo_avx2(c0, mA, ha, la);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hb, c1),
                            _mm256_set1_epi32(static_cast<int32_t>(ks.k0[rd])));
      c2 = _mm256_xor_si256(_mm256_xor_si256(ha, c3),
                            _mm256_set1_epi32(static_cast<int32_t>(ks.k1[rd])));
      c1 = lb;
      c3 = la;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(&r[0][v]), c0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(&r[1][v]), c1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(&r[2][v]), c2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(&r[3][v]), c3);
  }
}

// Uniforms of quads q0 .. q0 + nq - 1 into u (element order), like philox_uniforms().
inline void philox_uniforms_avx2(const KeySchedule& ks, uint64_t q0, int64_t nq, float* u) {
  constexpr int CH = 64;
  alignas(32) uint32_t r[4][CH];
  for (int64_t base = 0; base < nq; base += CH) {
    const int64_t cnt = nq - base < CH ? nq - base : CH;
    philox_words_avx2(ks, q0, base, cnt, r);
    float* uc = u + 4 * base;
#if defined(_OPENMP)
#pragma omp simd
#endif
    for (int64_t i = 0; i < cnt; ++i) {
      uc[4 * i + 0] = uint_to_uniform(r[0][i]);
      uc[4 * i + 1] = uint_to_uniform(r[1][i]);
      uc[4 * i + 2] = uint_to_uniform(r[2][i]);
      uc[4 * i + 3] = uint_to_uniform(r[3][i]);
    }
  }
}

// Normals of quads q0 .. q0 + nq - 1 into z (element order), like philox_normals().
inline void philox_normals_avx2(const KeySchedule& ks, uint64_t q0, int64_t nq, float* z) {
  constexpr int CH = 64;  // quads per chunk (multiple of 8)
  alignas(32) uint32_t r[4][CH];
  for (int64_t base = 0; base < nq; base += CH) {
    const int64_t cnt = nq - base < CH ? nq - base : CH;
    philox_words_avx2(ks, q0, base, cnt, r);
    float* zc = z + 4 * base;
#if defined(_OPENMP)
#pragma omp simd
#endif
    for (int64_t i = 0; i < cnt; ++i) {
      float n0, n1, n2, n3;
      box_muller(uint_to_uniform(r[0][i]), uint_to_uniform(r[1][i]), n0, n1);
      box_muller(uint_to_uniform(r[2][i]), uint_to_uniform(r[3][i]), n2, n3);
      zc[4 * i + 0] = n0;
      zc[4 * i + 1] = n1;
      zc[4 * i + 2] = n2;
      zc[4 * i + 3] = n3;
    }
  }
}

#pragma GCC pop_options
#endif  // x86-64

}  // namespace philox
}  // namespace fastdiff
