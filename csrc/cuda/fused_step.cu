// fastdiff fused step, CUDA C++ (compiled at run time with NVRTC through CuPy: fastdiff/_cuda.py;
// tests/test_aot.py compiles it with nvcc for sm_80 / sm_90).
//
//   out[i] = sum_{j<k} c[b, j] * float(in_j[i]) + c[b, k] * z_i        for i in [0, n)
//   b      = (start + i) / inner                                      (int64)
//   z_i    = float(noise[i])                                   noise_mode 1
//          = Philox normal stream (seed, offset + start + i)   noise_mode 2
//          = per-sample streams (seeds[b'], offset + j)        noise_mode 2, seeds != 0:
//            start + i = b' per + j, seeds int64 (B,) holding the u64 bits, 0 <= j < per
//          = (no noise term)                                   noise_mode 0
//
// The stream is defined in fastdiff/reference/rng.py (Triton's randn4x mapping): quad
// q = g / 4 gets Philox4x32-10 with counter (lo32(q), hi32(q), 0, 0) and key (lo32(seed),
// hi32(seed)); lane l of the quad gets normal n_l.  One thread = one quad = 4 elements, so
// Philox runs once per 4 elements, and (offset + start) % 4 == 0 makes thread quads line up
// with stream quads.  Precise logf / sincosf / sqrtf (no fast-math intrinsics), float32 math,
// one rounding on the store, NaN / Inf propagate.
//
// No headers (NVRTC has no standard library here): fp16 / bf16 are stored as unsigned short
// and converted with PTX cvt (bf16 rounding needs sm_80+).  Scalars c0..c5 multiply in0..in5,
// cz the noise; per-sample coefficients are a float32 (R, k+1) row-major table (noise last).
// The launcher splits n into launches of at most 2^30 elements (int32 local indices); start
// and offset are the int64 global position of the launch.
//
// Per-sample seeds: a thread's quad of elements may straddle two (or, per < 4, more) samples
// and two stream quads; each element takes lane (offset + j) % 4 of the Philox quad
// (seeds[b'], (offset + j) / 4), and a quad is generated again only when (b', quad) changes, so
// a quad inside one sample on a stream quad (per % 4 == 0) still costs one Philox call.

typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

namespace fastdiff {

// ---------------------------------------------------------------- element types
struct F32 {
  typedef float S;
  static __device__ __forceinline__ float load(S x) { return x; }
  static __device__ __forceinline__ S store(float x) { return x; }
};
struct F16 {
  typedef unsigned short S;
  static __device__ __forceinline__ float load(S x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
  }
  static __device__ __forceinline__ S store(float x) {
    S h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
  }
};
struct BF16 {
  typedef unsigned short S;
  static __device__ __forceinline__ float load(S x) { return __uint_as_float(static_cast<u32>(x) << 16); }
  static __device__ __forceinline__ S store(float x) {
    S h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
  }
};

// 4 consecutive elements as one aligned vector access (16 bytes for float, 8 for 16-bit types).
template <int BYTES> struct Vec4;
template <> struct Vec4<4> { typedef float4 V; };
template <> struct Vec4<2> { typedef uint2 V; };

template <class D>
__device__ __forceinline__ void load4(const typename D::S* __restrict__ p, int i, int cnt, bool vec, float x[4]) {
  typedef typename D::S S;
  if (vec && cnt == 4) {
    typename Vec4<sizeof(S)>::V v = __ldg(reinterpret_cast<const typename Vec4<sizeof(S)>::V*>(p + i));
    const S* s = reinterpret_cast<const S*>(&v);
#pragma unroll
    for (int l = 0; l < 4; ++l) x[l] = D::load(s[l]);
  } else {
#pragma unroll
    for (int l = 0; l < 4; ++l) x[l] = l < cnt ? D::load(p[i + l]) : 0.0f;
  }
}

template <class D>
__device__ __forceinline__ void store4(typename D::S* __restrict__ p, int i, int cnt, bool vec, const float x[4]) {
  typedef typename D::S S;
  if (vec && cnt == 4) {
    typename Vec4<sizeof(S)>::V v;
    S* s = reinterpret_cast<S*>(&v);
#pragma unroll
    for (int l = 0; l < 4; ++l) s[l] = D::store(x[l]);
    *reinterpret_cast<typename Vec4<sizeof(S)>::V*>(p + i) = v;
  } else {
#pragma unroll
    for (int l = 0; l < 4; ++l)
      if (l < cnt) p[i + l] = D::store(x[l]);
  }
}

// ---------------------------------------------------------------- Philox normal stream
__device__ __forceinline__ void philox4x32_10(u32& c0, u32& c1, u32& c2, u32& c3, u32 k0, u32 k1) {
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const u32 hi_b = __umulhi(0xCD9E8D57u, c2), lo_b = 0xCD9E8D57u * c2;
    const u32 hi_a = __umulhi(0xD2511F53u, c0), lo_a = 0xD2511F53u * c0;
    c0 = hi_b ^ c1 ^ k0;
    c2 = hi_a ^ c3 ^ k1;
    c1 = lo_b;
    c3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// Triton's uint_to_uniform_float: int32 x, negatives -> -x - 1 (== ~x), scaled into [0, 1).
__device__ __forceinline__ float uint_to_uniform(u32 r) {
  const int x = static_cast<int>(r);
  return static_cast<float>(x < 0 ? ~x : x) * 4.6566127342e-10f;
}

// Triton's pair_uniform_to_normal.
__device__ __forceinline__ void box_muller(float a, float b, float& n0, float& n1) {
  const float u = fmaxf(1.0e-7f, a);
  const float th = 6.283185307179586f * b;
  const float r = sqrtf(-2.0f * logf(u));
  float s, c;
  sincosf(th, &s, &c);
  n0 = r * c;
  n1 = r * s;
}

__device__ __forceinline__ void normal_quad(u64 seed, u64 q, float z[4]) {
  u32 c0 = static_cast<u32>(q), c1 = static_cast<u32>(q >> 32), c2 = 0u, c3 = 0u;
  philox4x32_10(c0, c1, c2, c3, static_cast<u32>(seed), static_cast<u32>(seed >> 32));
  box_muller(uint_to_uniform(c0), uint_to_uniform(c1), z[0], z[1]);
  box_muller(uint_to_uniform(c2), uint_to_uniform(c3), z[2], z[3]);
}

// ---------------------------------------------------------------- the kernel
template <class D>
__device__ __forceinline__ void fused_step_quad(
    typename D::S* __restrict__ out, const typename D::S* const ins[6], const typename D::S* __restrict__ noise,
    const float* __restrict__ coefs, const float cs[7], int n, i64 inner, i64 start, u64 seed, i64 offset,
    const u64* __restrict__ seeds, i64 per, int k, int noise_mode, bool per_sample, bool vec) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;  // quad of this launch; n <= 2^30
  const int i = t * 4;
  if (i >= n) return;
  const int cnt = min(4, n - i);

  // Per-sample: the row of each of the 4 elements with one 64-bit division per thread; a row
  // boundary can fall inside the quad (several, if inner < 4).
  i64 row[4];
  if (per_sample) {
    i64 b = (start + i) / inner, r = (start + i) - b * inner;
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      row[l] = b * (k + 1);
      if (++r == inner) { r = 0; ++b; }
    }
  }
  // Coefficient j of each element (only rows of elements < cnt are read: later ones may not exist).
  auto coef = [&](int j, float c[4]) {
    if (!per_sample) {
#pragma unroll
      for (int l = 0; l < 4; ++l) c[l] = cs[j];
      return;
    }
    const float c0 = __ldg(coefs + row[0] + j);
#pragma unroll
    for (int l = 0; l < 4; ++l) c[l] = (row[l] == row[0] || l >= cnt) ? c0 : __ldg(coefs + row[l] + j);
  };

  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f}, x[4], c[4];
#pragma unroll
  for (int j = 0; j < 6; ++j) {
    if (j < k) {
      load4<D>(ins[j], i, cnt, vec, x);
      coef(j, c);
#pragma unroll
      for (int l = 0; l < 4; ++l) acc[l] += c[l] * x[l];
    }
  }
  if (noise_mode != 0) {
    if (noise_mode == 1) {
      load4<D>(noise, i, cnt, vec, x);
    } else if (seeds != nullptr) {
      const i64 g = start + i;
      i64 b = g / per, j = g - b * per, bq = -1;
      u64 q = 0;
      float zq[4];
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        x[l] = 0.0f;
        if (l < cnt) {
          const u64 c = static_cast<u64>(offset) + static_cast<u64>(j);
          if (b != bq || (c >> 2) != q) {
            bq = b;
            q = c >> 2;
            normal_quad(__ldg(seeds + b), q, zq);
          }
          const u32 lane = static_cast<u32>(c & 3u);  // selects, not a dynamic index (registers)
          x[l] = lane == 0u ? zq[0] : lane == 1u ? zq[1] : lane == 2u ? zq[2] : zq[3];
          if (++j == per) { j = 0; ++b; }
        }
      }
    } else {
      normal_quad(seed, static_cast<u64>(offset + start) / 4u + static_cast<u64>(t), x);
    }
    coef(per_sample ? k : 6, c);  // scalars: noise coefficient in slot 6 (cz)
#pragma unroll
    for (int l = 0; l < 4; ++l) acc[l] += c[l] * x[l];
  }
  store4<D>(out, i, cnt, vec, acc);
}

}  // namespace fastdiff

// One extern "C" entry point per dtype (plain names for NVRTC / nvcc).  vec: every pointer is
// aligned to 4 elements, so full quads use vector loads / stores.
#define FASTDIFF_FUSED_STEP(NAME, D)                                                                       \
  extern "C" __global__ void __launch_bounds__(256) NAME(                                                  \
      D::S* __restrict__ out, const D::S* in0, const D::S* in1, const D::S* in2, const D::S* in3,          \
      const D::S* in4, const D::S* in5, const D::S* noise, const float* coefs, float c0, float c1,         \
      float c2, float c3, float c4, float c5, float cz, int n, i64 inner, i64 start, u64 seed, i64 offset, \
      const u64* seeds, i64 per, int k, int noise_mode, int per_sample, int vec) {                         \
    const D::S* const ins[6] = {in0, in1, in2, in3, in4, in5};                                             \
    const float cs[7] = {c0, c1, c2, c3, c4, c5, cz};                                                      \
    fastdiff::fused_step_quad<D>(out, ins, noise, coefs, cs, n, inner, start, seed, offset, seeds, per, k, \
                                 noise_mode, per_sample != 0, vec != 0);                                   \
  }

FASTDIFF_FUSED_STEP(fused_step_f32, fastdiff::F32)
FASTDIFF_FUSED_STEP(fused_step_f16, fastdiff::F16)
FASTDIFF_FUSED_STEP(fused_step_bf16, fastdiff::BF16)
