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

// The Box-Muller of cnt quads' words r[lane][i] into zc (element order): the scalar box_muller,
// auto-vectorized for the caller's target.  Both wide paths run this one loop, so GCC makes the
// same choices in both (which products it contracts into FMAs: -ffp-contract=fast is GCC's C++
// default), and the AVX2 and AVX-512 streams are the same bit for bit.
FD_INLINE void box_muller_words(const uint32_t (*r)[64], int64_t cnt, float* zc) {
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

// Normals of quads q0 .. q0 + nq - 1 into z (element order), like philox_normals().
inline void philox_normals_avx2(const KeySchedule& ks, uint64_t q0, int64_t nq, float* z) {
  constexpr int CH = 64;  // quads per chunk (multiple of 8)
  alignas(32) uint32_t r[4][CH];
  for (int64_t base = 0; base < nq; base += CH) {
    const int64_t cnt = nq - base < CH ? nq - base : CH;
    philox_words_avx2(ks, q0, base, cnt, r);
    box_muller_words(r, cnt, z + 4 * base);
  }
}

#pragma GCC pop_options

// ---------------------------------------------------------------------------------------
// AVX-512 Philox with explicit intrinsics: 16 quads per vector (a vpternlogd for each round's
// two xors).  The normals' Box-Muller is the AVX2 path's loop (box_muller_words), so the two
// streams are the same bit for bit; the uniforms (exact: an integer-to-float conversion and one
// product) are written in element order by a 4 x 16 transpose.  Only call after a runtime
// AVX-512F check (cpu_features.h, use_avx512()).
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c,prefer-vector-width=512")
// GCC 12 warns of the undefined pass-through operand inside _mm512_shuffle_f32x4: not a real use
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

constexpr int AVX512_CH = 64;  // quads per chunk: eight groups of 8, in flight together

// The Philox words of the 64 quads q0 + i0 .. q0 + i0 + 63 into r[lane][0 .. 64).  Each group of 8
// quads sits in 64-bit lanes (the word in the low half, the high half don't-care), so one vpmuludq
// gives a lane's whole product: its high word by a vpshufd (port 5, off the multiplier's port),
// its low word as it is.  The ten rounds are one dependent chain (multiply, shuffle, xor: ~7
// cycles a round); running the eight groups' rounds interleaved hides that latency, ~3x faster
// than one 16-quad vector at a time on this Xeon (0.14 against 0.46 ns a normal, one core).
FD_INLINE void philox_words_avx512(const KeySchedule& ks, uint32_t lo0, uint32_t hi0, int64_t i0,
                                   uint32_t (*r)[AVX512_CH]) {
  constexpr int G = AVX512_CH / 8;
  __m512i c0[G], c1[G], c2[G], c3[G];
  const __m512i vlo0 = _mm512_set1_epi32(static_cast<int32_t>(lo0));
  const __m512i vhi0 = _mm512_set1_epi32(static_cast<int32_t>(hi0));
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int g = 0; g < G; g += 2) {
    const __m512i lo = _mm512_add_epi32(vlo0, _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int32_t>(i0 + 8 * g))));
    const __mmask16 wrap = _mm512_cmplt_epu32_mask(lo, vlo0);   // lo0 + i wrapped: carry into hi
    const __m512i hi = _mm512_mask_add_epi32(vhi0, wrap, vhi0, _mm512_set1_epi32(1));
    c0[g] = _mm512_cvtepu32_epi64(_mm512_castsi512_si256(lo));
    c0[g + 1] = _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(lo, 1));
    c1[g] = _mm512_cvtepu32_epi64(_mm512_castsi512_si256(hi));
    c1[g + 1] = _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(hi, 1));
  }
  for (int g = 0; g < G; ++g) c2[g] = c3[g] = _mm512_setzero_si512();
  const __m512i mA = _mm512_set1_epi64(static_cast<int64_t>(ROUND_A));
  const __m512i mB = _mm512_set1_epi64(static_cast<int64_t>(ROUND_B));
  for (int rd = 0; rd < N_ROUNDS; ++rd) {
    const __m512i k0 = _mm512_set1_epi32(static_cast<int32_t>(ks.k0[rd]));
    const __m512i k1 = _mm512_set1_epi32(static_cast<int32_t>(ks.k1[rd]));
    for (int g = 0; g < G; ++g) {
      const __m512i p0 = _mm512_mul_epu32(c2[g], mB), p1 = _mm512_mul_epu32(c0[g], mA);
      // 0x96: a ^ b ^ c in one instruction; _MM_PERM_CDAB swaps a lane's two 32-bit halves
      c0[g] = _mm512_ternarylogic_epi32(_mm512_shuffle_epi32(p0, _MM_PERM_CDAB), c1[g], k0, 0x96);
      c2[g] = _mm512_ternarylogic_epi32(_mm512_shuffle_epi32(p1, _MM_PERM_CDAB), c3[g], k1, 0x96);
      c1[g] = p0;
      c3[g] = p1;
    }
  }
  // the low halves of two groups, in quad order, into one 16-lane row of each word
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  for (int g = 0; g < G; g += 2) {
    _mm512_store_si512(reinterpret_cast<__m512i*>(&r[0][8 * g]), _mm512_permutex2var_epi32(c0[g], even, c0[g + 1]));
    _mm512_store_si512(reinterpret_cast<__m512i*>(&r[1][8 * g]), _mm512_permutex2var_epi32(c1[g], even, c1[g + 1]));
    _mm512_store_si512(reinterpret_cast<__m512i*>(&r[2][8 * g]), _mm512_permutex2var_epi32(c2[g], even, c2[g + 1]));
    _mm512_store_si512(reinterpret_cast<__m512i*>(&r[3][8 * g]), _mm512_permutex2var_epi32(c3[g], even, c3[g + 1]));
  }
}

FD_INLINE __m512 uint_to_uniform_avx512(__m512i r) {
  const __m512i y = _mm512_xor_si512(r, _mm512_srai_epi32(r, 31));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(y), _mm512_set1_ps(4.6566127342e-10f));
}

// out[4 i + l] = v_l[i] for i < 16: a 4 x 16 transpose (within 128-bit lanes, then across them).
FD_INLINE void store_quads_avx512(float* out, __m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 t0 = _mm512_unpacklo_ps(a, b), t1 = _mm512_unpackhi_ps(a, b);
  const __m512 t2 = _mm512_unpacklo_ps(c, d), t3 = _mm512_unpackhi_ps(c, d);
  const __m512 u0 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
  const __m512 u1 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
  const __m512 u2 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
  const __m512 u3 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
  // u_k's 128-bit lane L holds quad 4 L + k
  const __m512 w0 = _mm512_shuffle_f32x4(u0, u1, 0x44), w1 = _mm512_shuffle_f32x4(u2, u3, 0x44);
  const __m512 w2 = _mm512_shuffle_f32x4(u0, u1, 0xEE), w3 = _mm512_shuffle_f32x4(u2, u3, 0xEE);
  _mm512_storeu_ps(out, _mm512_shuffle_f32x4(w0, w1, 0x88));
  _mm512_storeu_ps(out + 16, _mm512_shuffle_f32x4(w0, w1, 0xDD));
  _mm512_storeu_ps(out + 32, _mm512_shuffle_f32x4(w2, w3, 0x88));
  _mm512_storeu_ps(out + 48, _mm512_shuffle_f32x4(w2, w3, 0xDD));
}

// Normals of quads q0 .. q0 + nq - 1 into z (element order), like philox_normals(): the words 64
// quads at a time, the Box-Muller through box_muller_words (the AVX2 path's loop, here 16 wide).
// A last chunk of under 64 quads computes all 64 words and uses its first ones.
inline void philox_normals_avx512(const KeySchedule& ks, uint64_t q0, int64_t nq, float* z) {
  alignas(64) uint32_t r[4][AVX512_CH];
  const uint32_t lo0 = static_cast<uint32_t>(q0), hi0 = static_cast<uint32_t>(q0 >> 32);
  for (int64_t base = 0; base < nq; base += AVX512_CH) {
    const int64_t cnt = nq - base < AVX512_CH ? nq - base : AVX512_CH;
    philox_words_avx512(ks, lo0, hi0, base, r);
    // a constant trip count for whole chunks: GCC then emits the loop without its remainder
    // handling (the variable-count loop took ~1.5x as long here)
    if (cnt == AVX512_CH) box_muller_words(r, AVX512_CH, z + 4 * base);
    else box_muller_words(r, cnt, z + 4 * base);
  }
}

// Uniforms of quads q0 .. q0 + nq - 1 into u (element order), like philox_uniforms().
inline void philox_uniforms_avx512(const KeySchedule& ks, uint64_t q0, int64_t nq, float* u) {
  alignas(64) uint32_t r[4][AVX512_CH];
  alignas(64) float tail[4 * AVX512_CH];
  const uint32_t lo0 = static_cast<uint32_t>(q0), hi0 = static_cast<uint32_t>(q0 >> 32);
  for (int64_t base = 0; base < nq; base += AVX512_CH) {
    const int64_t cnt = nq - base < AVX512_CH ? nq - base : AVX512_CH;
    philox_words_avx512(ks, lo0, hi0, base, r);
    float* out = cnt == AVX512_CH ? u + 4 * base : tail;   // a short last chunk through a buffer
    for (int v = 0; v < AVX512_CH; v += 16) {
      const auto word = [&](int l) {
        return uint_to_uniform_avx512(_mm512_load_si512(reinterpret_cast<const __m512i*>(&r[l][v])));
      };
      store_quads_avx512(out + 4 * v, word(0), word(1), word(2), word(3));
    }
    if (out == tail) std::memcpy(u + 4 * base, tail, sizeof(float) * 4 * static_cast<size_t>(cnt));
  }
}

#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif  // x86-64

}  // namespace philox
}  // namespace fastdiff
