// fastdiff fused step kernel (CPU):
//
//   out[i] = sum_{j<k} c[b, j] * float(in_j[i]) + c[b, k] * z_i        for i in [0, n)
//   b      = (start + i) / inner                                      (int64)
//   z_i    = float(noise[i])                   noise_mode 1 (explicit noise tensor)
//          = philox stream (seed, offset + start + i)   noise_mode 2
//          = philox stream (seeds[b'], offset + j)     noise_mode 2, per-sample seeds (seeds_ptr != 0):
//            g = start + i = b' per + j, seeds int64 (B,) holding the u64 bits (0 <= j < per)
//          = (no noise term)                   noise_mode 0
//
// dtype of out / inputs / noise: float32 (0), float16 (1), bfloat16 (2); math in float32,
// stores round to nearest even, NaN stays NaN.  No -ffast-math anywhere: NaN/Inf propagate.
//
// Structure: OpenMP (schedule(static)) over blocks of BLOCK elements.  Per block, the philox
// normals are generated into a stack buffer by an auto-vectorized loop (philox.h), then a
// combine loop specialised on (dtype, number of streamed inputs, has-philox-term) runs per
// segment of constant coefficient row.  An explicit noise tensor (mode 1) is just one more
// streamed input.  Code paths picked once at run time (use_avx2(), use_avx512(), cpu_features.h):
//   "avx512": the "avx2" combine loops; Philox and Box-Muller in AVX-512F intrinsics, 16 quads
//            a vector (philox.h), the same normals bit for bit;
//   "avx2":  AVX2 + FMA + F16C intrinsics combine loop and Philox rounds, the Box-Muller
//            loop auto-vectorized for AVX2;
//   generic: plain C++ loops that GCC vectorizes for the baseline ISA (SSE2 on x86-64,
//            NEON on aarch64), software fp16/bf16 conversions.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_features.h"
#if FD_X86
#include <immintrin.h>
#endif

#include "philox.h"

namespace fastdiff {

namespace {

using philox::as_float;
using philox::as_uint;
using philox::KeySchedule;
using philox::mask_if;
using philox::sel;

constexpr int64_t BLOCK = 2048;   // elements per OpenMP work item (multiple of 8 and of 4)
constexpr int MAX_K = 6;          // inputs
constexpr int MAX_STREAMS = MAX_K + 1;  // inputs + explicit noise tensor

enum : int { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };

// ---------------------------------------------------------------------------------------
// Software conversions (branch-free so that loops using them vectorize).

// all-ones if c else 0; selects written as mask arithmetic so that GCC neither threads
// jumps through them nor refuses to if-convert (float ops on threaded paths may trap).

FD_INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7FFFu;
  // Normals and subnormals: place exponent/mantissa in a float and rescale by 2^112 (exact).
  const uint32_t finite = as_uint(as_float(em << 13) * 0x1p112f);
  const uint32_t special = 0x7F800000u | (em << 13);  // inf / nan (payload kept)
  const uint32_t bits = sel(mask_if(em >= 0x7C00u), special, finite);
  return as_float(bits | sign);
}

// float -> half, round to nearest even (F. Giesen's float_to_half_fast3_rtne), branch-free.
FD_INLINE uint16_t float_to_half(float f) {
  uint32_t u = as_uint(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  // overflow / inf / nan
  const uint32_t big = 0x7C00u | (mask_if(u > 0x7F800000u) & 0x0200u);
  // subnormal half results (|f| < 2^-14): add magic, the FPU rounds (RNE) for us
  const uint32_t denorm_magic = ((127 - 15) + (23 - 10) + 1) << 23;
  const uint32_t sub = as_uint(as_float(u) + as_float(denorm_magic)) - denorm_magic;
  // normal half results
  const uint32_t mant_odd = (u >> 13) & 1u;
  const uint32_t nrm = (u + ((15u - 127u) << 23) + 0xFFFu + mant_odd) >> 13;
  uint32_t o = sel(mask_if(u < (113u << 23)), sub, nrm);
  o = sel(mask_if(u >= ((127u + 16u) << 23)), big, o);
  return static_cast<uint16_t>(o | (sign >> 16));
}

FD_INLINE float bf16_to_float(uint16_t h) { return as_float(static_cast<uint32_t>(h) << 16); }

FD_INLINE uint16_t float_to_bf16(float f) {
  const uint32_t u = as_uint(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = (u >> 16) | 0x40u;                    // quiet NaN, sign kept
  const bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(is_nan ? nan : rounded);
}

template <int DT>
struct Elem {
  using T = uint16_t;
};
template <>
struct Elem<DT_F32> {
  using T = float;
};

template <int DT>
FD_INLINE float to_f32(typename Elem<DT>::T v) {
  if constexpr (DT == DT_F32) return v;
  else if constexpr (DT == DT_F16) return half_to_float(v);
  else return bf16_to_float(v);
}

template <int DT>
FD_INLINE typename Elem<DT>::T from_f32(float v) {
  if constexpr (DT == DT_F32) return v;
  else if constexpr (DT == DT_F16) return float_to_half(v);
  else return float_to_bf16(v);
}

// ---------------------------------------------------------------------------------------
// Combine loops.  Signature shared by all code paths:
//   out, in[0..NS) point at element 0 of the window; the segment is [i0, i0 + len);
//   z (philox normals) points at the segment's first normal; c holds NS (+1 if HZ) floats.
using CombineFn = void (*)(void* out, const void* const* in, const float* z, const float* c,
                           int64_t i0, int64_t len);
using NormalsFn = void (*)(const KeySchedule& ks, uint64_t q0, int64_t nq, float* z);

// Generic: scalar source, vectorized by GCC.  #pragma GCC ivdep: elementwise, so out may be
// the very same buffer as an input (in-place step) without runtime alias checks.
template <int DT, int NS, bool HZ>
FD_INLINE void combine_scalar_loop(void* out, const void* const* in, const float* z,
                                   const float* c, int64_t i0, int64_t len) {
  using T = typename Elem<DT>::T;
  T* o = static_cast<T*>(out) + i0;
  const T* p[MAX_STREAMS + 1];
  float cc[MAX_STREAMS + 1];
  for (int j = 0; j < NS; ++j) p[j] = static_cast<const T*>(in[j]) + i0;
  for (int j = 0; j < NS + (HZ ? 1 : 0); ++j) cc[j] = c[j];
#if defined(_OPENMP)
#pragma omp simd
#elif defined(__GNUC__) && !defined(__clang__)
#pragma GCC ivdep
#endif
  for (int64_t i = 0; i < len; ++i) {
    float acc = 0.0f;
    if constexpr (NS > 0) acc = cc[0] * to_f32<DT>(p[0][i]);
    if constexpr (NS > 1) acc += cc[1] * to_f32<DT>(p[1][i]);
    if constexpr (NS > 2) acc += cc[2] * to_f32<DT>(p[2][i]);
    if constexpr (NS > 3) acc += cc[3] * to_f32<DT>(p[3][i]);
    if constexpr (NS > 4) acc += cc[4] * to_f32<DT>(p[4][i]);
    if constexpr (NS > 5) acc += cc[5] * to_f32<DT>(p[5][i]);
    if constexpr (NS > 6) acc += cc[6] * to_f32<DT>(p[6][i]);
    if constexpr (HZ) {
      if constexpr (NS > 0) acc += cc[NS] * z[i];
      else acc = cc[0] * z[i];
    }
    o[i] = from_f32<DT>(acc);
  }
}

// A code path's combine loops are the member template run<DT, NS, HZ> of its struct
// (GenericCombine, Avx2Combine); combine_for picks the one of a call.
struct GenericCombine {
  template <int DT, int NS, bool HZ>
  static void run(void* out, const void* const* in, const float* z, const float* c, int64_t i0,
                  int64_t len) {
    combine_scalar_loop<DT, NS, HZ>(out, in, z, c, i0, len);
  }
};

void normals_generic(const KeySchedule& ks, uint64_t q0, int64_t nq, float* z) {
  philox::philox_normals(ks, q0, nq, z);
}

template <class Path, int DT, int... N>
CombineFn pick_combine(int ns, bool hz, std::integer_sequence<int, N...>) {
  CombineFn r = nullptr;
  ((ns == N ? (r = hz ? &Path::template run<DT, N, true> : &Path::template run<DT, N, false>) : r),
   ...);
  return r;
}

// Path's combine loop for dtype code dt, ns streamed inputs, with (hz) or without a philox term.
template <class Path>
CombineFn combine_for(int dt, int ns, bool hz) {
  using Seq = std::make_integer_sequence<int, MAX_STREAMS + 1>;
  switch (dt) {
    case DT_F32: return pick_combine<Path, DT_F32>(ns, hz, Seq{});
    case DT_F16: return pick_combine<Path, DT_F16>(ns, hz, Seq{});
    default: return pick_combine<Path, DT_BF16>(ns, hz, Seq{});
  }
}

// ---------------------------------------------------------------------------------------
// AVX2 + FMA + F16C path (x86-64 only, selected at run time).
#if FD_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

template <int DT>
inline __m256 ld8(const void* base, int64_t i) {
  if constexpr (DT == DT_F32) {
    return _mm256_loadu_ps(static_cast<const float*>(base) + i);
  } else if constexpr (DT == DT_F16) {
    return _mm256_cvtph_ps(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i)));
  } else {
    const __m128i h =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

template <int DT>
inline void st8(void* base, int64_t i, __m256 v) {
  if constexpr (DT == DT_F32) {
    _mm256_storeu_ps(static_cast<float*>(base) + i, v);
  } else if constexpr (DT == DT_F16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(base) + i),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i nanv = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    const __m256 isnan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    r = _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(nanv), isnan));
    // 8 x u32 (each <= 0xFFFF) -> 8 x u16
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(base) + i),
                     _mm256_castsi256_si128(packed));
  }
}

struct Avx2Combine {
  template <int DT, int NS, bool HZ>
  static void run(void* out, const void* const* in, const float* z, const float* c, int64_t i0,
                  int64_t len) {
    constexpr int NC = NS + (HZ ? 1 : 0);
    __m256 cv[MAX_STREAMS + 1];
    const void* p[MAX_STREAMS + 1];
    for (int j = 0; j < NC; ++j) cv[j] = _mm256_set1_ps(c[j]);
    for (int j = 0; j < NS; ++j) p[j] = in[j];
    int64_t i = 0;
    const int64_t len8 = len & ~int64_t(7);
    for (; i < len8; i += 8) {
      const int64_t g = i0 + i;
      __m256 acc = _mm256_setzero_ps();
      if constexpr (NS > 0) acc = _mm256_mul_ps(cv[0], ld8<DT>(p[0], g));
      if constexpr (NS > 1) acc = _mm256_fmadd_ps(cv[1], ld8<DT>(p[1], g), acc);
      if constexpr (NS > 2) acc = _mm256_fmadd_ps(cv[2], ld8<DT>(p[2], g), acc);
      if constexpr (NS > 3) acc = _mm256_fmadd_ps(cv[3], ld8<DT>(p[3], g), acc);
      if constexpr (NS > 4) acc = _mm256_fmadd_ps(cv[4], ld8<DT>(p[4], g), acc);
      if constexpr (NS > 5) acc = _mm256_fmadd_ps(cv[5], ld8<DT>(p[5], g), acc);
      if constexpr (NS > 6) acc = _mm256_fmadd_ps(cv[6], ld8<DT>(p[6], g), acc);
      if constexpr (HZ) {
        if constexpr (NS > 0) acc = _mm256_fmadd_ps(cv[NS], _mm256_loadu_ps(z + i), acc);
        else acc = _mm256_mul_ps(cv[0], _mm256_loadu_ps(z + i));
      }
      st8<DT>(out, g, acc);
    }
    if (i < len) {
      combine_scalar_loop<DT, NS, HZ>(out, in, HZ ? z + i : z, c, i0 + i, len - i);
    }
  }
};

void normals_avx2(const KeySchedule& ks, uint64_t q0, int64_t nq, float* z) {
  philox::philox_normals_avx2(ks, q0, nq, z);
}

#pragma GCC pop_options

// AVX-512F (use_avx512()): the normals 16 quads at a time; the combine loops stay the AVX2 ones,
// which already keep up with memory once the normals are no longer the bound.
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c,prefer-vector-width=512")
void normals_avx512(const KeySchedule& ks, uint64_t q0, int64_t nq, float* z) {
  philox::philox_normals_avx512(ks, q0, nq, z);
}
#pragma GCC pop_options

#endif  // FD_X86

// ---------------------------------------------------------------------------------------

struct Job {
  void* out;
  const void* in[MAX_STREAMS];
  int64_t n, inner, start;
  const float* coef_rows;  // nullptr: scalar coefs
  int64_t row_stride;      // floats per coef row (k + 1)
  float coefs[MAX_STREAMS + 1];
  bool hz;                 // philox term
  uint64_t gbase;          // offset + start (global index of element 0)
  const uint64_t* seeds;   // per-sample keys (nullptr: one key for the whole tensor)
  int64_t per;             // elements per sample (per-sample keys)
  uint64_t offset;         // the per-sample streams' counter of j = 0
  CombineFn combine;
  NormalsFn normals;
};

void run_block(const Job& J, const KeySchedule& ks, int64_t i0, int64_t i1) {
  alignas(64) float zbuf[BLOCK + 8];
  const float* z = nullptr;
  const int64_t len = i1 - i0;
  if (J.hz && J.seeds != nullptr) {
    // Per-sample keys: cut the block at sample boundaries and generate each piece from its
    // sample's stream at counter offset + j.  A piece starts on a stream quad except the block's
    // first (j0 % 4 may be != 0), written sh elements early into the 4-float lead of zbuf; each
    // piece's whole-quad tail (<= 3 extra normals) is overwritten by the next piece, generated
    // after it, so a quad straddling two samples gets each element from its own key.
    float* zb = zbuf + 4;
    int64_t i = i0;
    while (i < i1) {
      const int64_t g = J.start + i;
      const int64_t b = g / J.per;
      const int64_t seg_end = std::min(i1, (b + 1) * J.per - J.start);
      const uint64_t c = J.offset + static_cast<uint64_t>(g - b * J.per);
      const int64_t sh = static_cast<int64_t>(c & 3u);  // 0 but for the block's first piece
      const KeySchedule kb(J.seeds[b]);
      J.normals(kb, c >> 2, (sh + (seg_end - i) + 3) / 4, zb + (i - i0) - sh);
      i = seg_end;
    }
    z = zb;
  } else if (J.hz) {
    const uint64_t g0 = J.gbase + static_cast<uint64_t>(i0);
    const int64_t sh = static_cast<int64_t>(g0 & 3u);  // 0 when (offset + start) % 4 == 0
    const int64_t nq = (sh + len + 3) / 4;
    J.normals(ks, g0 >> 2, nq, zbuf);
    z = zbuf + sh;
  }
  if (J.coef_rows == nullptr) {
    J.combine(J.out, J.in, z, J.coefs, i0, len);
    return;
  }
  int64_t i = i0;
  while (i < i1) {
    const int64_t b = (J.start + i) / J.inner;
    const int64_t seg_end = std::min(i1, (b + 1) * J.inner - J.start);
    J.combine(J.out, J.in, z ? z + (i - i0) : nullptr, J.coef_rows + b * J.row_stride, i,
              seg_end - i);
    i = seg_end;
  }
}

}  // namespace

int num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void fused_step(uintptr_t out_ptr, const std::vector<uintptr_t>& in_ptrs, int dtype, int64_t n,
                int64_t inner, int64_t start, uintptr_t coef_ptr, const std::vector<float>& coefs,
                int noise_mode, uintptr_t noise_ptr, uint64_t seed, uint64_t offset,
                uintptr_t seeds_ptr, int64_t per) {
  const int k = static_cast<int>(in_ptrs.size());
  if (k > MAX_K) throw std::invalid_argument("fused_step: at most 6 inputs");
  if (dtype < 0 || dtype > 2) throw std::invalid_argument("fused_step: bad dtype code");
  if (noise_mode < 0 || noise_mode > 2) throw std::invalid_argument("fused_step: bad noise_mode");
  const int ncoef = k + (noise_mode != 0 ? 1 : 0);  // coefficients actually used
  if (coef_ptr == 0 && static_cast<int>(coefs.size()) < ncoef)
    throw std::invalid_argument("fused_step: too few coefficients");
  if (coef_ptr != 0 && inner <= 0) throw std::invalid_argument("fused_step: inner must be > 0");
  if (seeds_ptr != 0 && (per <= 0 || noise_mode != 2))
    throw std::invalid_argument("fused_step: per-sample seeds need noise_mode 2 and per > 0");
  if (n <= 0) return;

  Job J;
  J.out = reinterpret_cast<void*>(out_ptr);
  for (int j = 0; j < k; ++j) J.in[j] = reinterpret_cast<const void*>(in_ptrs[j]);
  int ns = k;
  if (noise_mode == 1) J.in[ns++] = reinterpret_cast<const void*>(noise_ptr);
  J.n = n;
  J.inner = inner;
  J.start = start;
  J.coef_rows = reinterpret_cast<const float*>(coef_ptr);
  J.row_stride = k + 1;
  for (int j = 0; j <= MAX_STREAMS; ++j) J.coefs[j] = 0.0f;
  if (coef_ptr == 0)
    for (int j = 0; j < ncoef; ++j) J.coefs[j] = coefs[j];
  J.hz = noise_mode == 2;
  J.gbase = offset + static_cast<uint64_t>(start);
  J.seeds = reinterpret_cast<const uint64_t*>(seeds_ptr);
  J.per = per;
  J.offset = offset;
#if FD_X86
  if (use_avx2()) {
    J.combine = combine_for<Avx2Combine>(dtype, ns, J.hz);
    J.normals = use_avx512() ? &normals_avx512 : &normals_avx2;
  } else
#endif
  {
    J.combine = combine_for<GenericCombine>(dtype, ns, J.hz);
    J.normals = &normals_generic;
  }
  const KeySchedule ks(seed);

  const int64_t nblocks = (n + BLOCK - 1) / BLOCK;
  // Parallel only when there is enough work to beat the fork/join cost (~ a few us).
  const bool par = J.hz ? n >= 4 * BLOCK : n >= 32 * BLOCK;
#pragma omp parallel for schedule(static) if (par)
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const int64_t i0 = blk * BLOCK;
    const int64_t i1 = std::min(n, i0 + BLOCK);
    run_block(J, ks, i0, i1);
  }
}

}  // namespace fastdiff
