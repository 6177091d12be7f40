// fastdiff fused sampling trajectory for the MoLRG denoiser (CPU): T reverse steps, each a
// denoiser evaluation fused with its step, in one OpenMP region.
//
// Per step t (tables built in float64 on the host by fastdiff/sampling.py, rounded to float32):
//   coef[t] = [s1, cx, cm, cz, hx, hm, hxp, hmp]      idx[t] = [off1, off2, prow1, prow2, snap]
//   x  <- 1 x + s1 z(off1)                 if off1 >= 0  (EDM churn)
//   x0  = D(x; params[prow1])                            (molrg.h: the denoiser's per-row routine)
//   x'  = cx x + cm x0 (+ cz z(off2) if off2 >= 0)
//   x  <- hx x + hm x0 + hxp x' + hmp D(x'; params[prow2])   if prow2 >= 0 (Heun), else x <- x'
//   traj[snap] = x                         if snap >= 0
// z(off) of row r (global row index over all instances), column j is the Philox normal
// (seed, off + r n + j): exactly the window the step-by-step loop draws for that step, so the
// fused trajectory equals the loop.  The sums are evaluated in the order and with the fused
// multiply-adds of the fused-step kernel (fused_step.cpp: acc = c0 in0; acc = fma(c_j, in_j,
// acc) on the avx2 path, separate multiply and add on the generic one), and the denoiser is the
// same per-row routine as molrg_forward, so on CPU the two agree bit for bit.
//
// Structure: the I * B rows are cut into tiles of M rows inside one instance (instance i owns
// rows [i B, (i + 1) B) and its bases U[i] (n, D)); each thread takes tiles (dynamic schedule)
// and keeps the tile's x, x0, x', D(x') and noise buffers (a few KB) in L1/L2 for all steps of
// [t0, t1): memory traffic is one read and one write of x per call, plus the snapshots.  The
// transposed bases Ut of every instance are built once per call (in parallel).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <vector>

#include "molrg.h"
#include "philox.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_features.h"  // use_avx2(), FD_X86

namespace fastdiff {

namespace {

enum { C_S1, C_X, C_M, C_Z, C_HX, C_HM, C_HXP, C_HMP, NCOEF };
enum { I_OFF1, I_OFF2, I_P1, I_P2, I_SNAP, NIDX };

// out[i] = a x[i] + b y[i]   /   out[i] = a x[i] + b y[i] + c z[i]   /   4 inputs (Heun).
// FMA selects the avx2 path's arithmetic (explicit fused multiply-adds, as fused_step's
// _mm256_fmadd_ps); without it, separate multiplies and adds as its generic loop.
#if defined(__GNUC__)
#define FD_TRAJ_INLINE inline __attribute__((always_inline))
#else
#define FD_TRAJ_INLINE inline
#endif

// always_inline throughout: run_tile<true> is inlined into run_tile_avx2, which is compiled
// for AVX2 + FMA, so the combine loops vectorize for it and __builtin_fmaf is one instruction.
template <bool FMA>
FD_TRAJ_INLINE float madd(float c, float v, float acc) {
  if constexpr (FMA) return __builtin_fmaf(c, v, acc);
  else return acc + c * v;
}

// Element e of the window uses FMA arithmetic unless it lies in the fused-step kernel's scalar
// tail (its avx2 loop handles the last block's final numel % 8 elements with separate
// multiplies and adds): ``fma_end`` = the window index where that tail starts (numel without
// FMA).  [i0, i0 + len) are window indices of out[0..len).
template <bool FMA>
FD_TRAJ_INLINE void combine2(float* out, const float* x, float a, const float* y, float b,
                             int64_t len, int64_t i0, int64_t fma_end) {
  const int64_t nf = FMA ? std::max<int64_t>(0, std::min(len, fma_end - i0)) : 0;
  for (int64_t i = 0; i < nf; ++i) out[i] = madd<true>(b, y[i], a * x[i]);
  for (int64_t i = nf; i < len; ++i) out[i] = madd<false>(b, y[i], a * x[i]);
}

template <bool FMA>
FD_TRAJ_INLINE void combine3(float* out, const float* x, float a, const float* y, float b,
                             const float* z, float c, int64_t len, int64_t i0, int64_t fma_end) {
  const int64_t nf = FMA ? std::max<int64_t>(0, std::min(len, fma_end - i0)) : 0;
  for (int64_t i = 0; i < nf; ++i) out[i] = madd<true>(c, z[i], madd<true>(b, y[i], a * x[i]));
  for (int64_t i = nf; i < len; ++i) out[i] = madd<false>(c, z[i], madd<false>(b, y[i], a * x[i]));
}

template <bool FMA>
FD_TRAJ_INLINE void combine4(float* out, const float* x, float a, const float* y, float b,
                             const float* u, float c, const float* v, float d, int64_t len,
                             int64_t i0, int64_t fma_end) {
  const int64_t nf = FMA ? std::max<int64_t>(0, std::min(len, fma_end - i0)) : 0;
  for (int64_t i = 0; i < nf; ++i)
    out[i] = madd<true>(d, v[i], madd<true>(c, u[i], madd<true>(b, y[i], a * x[i])));
  for (int64_t i = nf; i < len; ++i)
    out[i] = madd<false>(d, v[i], madd<false>(c, u[i], madd<false>(b, y[i], a * x[i])));
}

struct Traj {
  float* x;                  // (I B, n) in / out
  int64_t I, B, n;
  MolrgJob den;              // the denoiser's sizes, offsets, labels (I B), hard (molrg_job)
  const float* U;            // (I, n, D)
  const float* Ut;           // (I, D, n8)
  const float* params;       // (I or 1, P, 3K + 2)
  int64_t pistride;          // 0 (shared) or P (3K + 2)
  const float* coef;         // (T, NCOEF)
  const int64_t* idx;        // (T, NIDX)
  int64_t t0, t1;
  float* traj;               // (S, I B, n) or nullptr
  uint64_t seed;
};

using NormalsFn = void (*)(const philox::KeySchedule&, uint64_t, int64_t, float*);

// Normals are generated in windows aligned like the fused-step kernel's: that kernel draws the
// window [offset, offset + numel) in blocks of 2048 elements, each in chunks of 64 quads (the
// avx2 generator's CH) whose last, partial one ends at numel.  The generators' SIMD body and
// scalar epilogue may round Box-Muller differently in the last bit, so a normal is bitwise the
// loop's only if it is produced at the same position of a chunk: generating from the chunk
// boundary at or before the tile to the one after it (or numel) does that.
constexpr int64_t NORMAL_ALIGN = 256;  // elements per 64-quad chunk; divides 2048

// normals of window elements [e0, e0 + len) of the draw at offset ``off`` (numel elements in
// all) into z; returns the pointer to element e0.  z holds len + 2 NORMAL_ALIGN floats.
FD_TRAJ_INLINE const float* normals(NormalsFn fn, const philox::KeySchedule& ks, uint64_t off,
                                    int64_t e0, int64_t len, int64_t numel, float* z) {
  const int64_t a0 = e0 & ~(NORMAL_ALIGN - 1);
  const int64_t a1 = std::min(numel, (e0 + len + NORMAL_ALIGN - 1) & ~(NORMAL_ALIGN - 1));
  fn(ks, (off + static_cast<uint64_t>(a0)) >> 2, (a1 - a0 + 3) / 4, z);
  return z + (e0 - a0);
}

struct Buffers {
  std::unique_ptr<float[]> x, x0, xp, x0p, z, scratch;
  Buffers(int64_t M, int64_t n, int64_t D8)
      : x(new float[M * n]), x0(new float[M * n]), xp(new float[M * n]), x0p(new float[M * n]),
        z(new float[M * n + 2 * NORMAL_ALIGN + 16]), scratch(new float[(M + 4) * D8]) {}
  // the normals buffer 64-byte aligned like fused_step's zbuf: the generator's loop may peel
  // iterations for alignment, and a peeled (scalar) normal can differ in the last bit
  float* zbuf() const {
    const uintptr_t p = reinterpret_cast<uintptr_t>(z.get());
    return reinterpret_cast<float*>((p + 63) & ~uintptr_t(63));
  }
};

template <bool FMA>
FD_TRAJ_INLINE void run_tile(const Traj& T, int64_t inst, int64_t r0, int64_t r1, Buffers& buf, NormalsFn nfn,
              const philox::KeySchedule& ks) {
  const int64_t n = T.n, M = r1 - r0, len = M * n;
  const int64_t grow0 = inst * T.B + r0;  // global row of the tile's first row
  float* x = buf.x.get();
  float* x0 = buf.x0.get();
  float* xp = buf.xp.get();
  float* x0p = buf.x0p.get();
  std::memcpy(x, T.x + grow0 * n, sizeof(float) * len);
  MolrgJob J = T.den;  // the tile's rows of instance inst (one parameter row per call)
  J.B = M;
  J.U = T.U + inst * n * J.D;
  J.Ut = T.Ut + inst * J.D * J.n8;
  J.R = 1;
  J.labels = T.den.labels ? T.den.labels + grow0 : nullptr;
  const float* pinst = T.params + inst * T.pistride;
  const int64_t e0 = grow0 * n, numel = T.I * T.B * n;  // the tile's window elements
  constexpr int64_t STEP_BLOCK = 2048;                   // fused_step.cpp's BLOCK
  const int64_t last = (numel - 1) / STEP_BLOCK * STEP_BLOCK;
  const int64_t fma_end = last + ((numel - last) & ~int64_t(7));
  for (int64_t t = T.t0; t < T.t1; ++t) {
    const float* c = T.coef + t * NCOEF;
    const int64_t* ix = T.idx + t * NIDX;
    if (ix[I_OFF1] >= 0) {  // churn: edm_churn's step, inputs (x), noise
      const float* z = normals(nfn, ks, static_cast<uint64_t>(ix[I_OFF1]), e0, len, numel, buf.zbuf());
      combine2<FMA>(x, x, 1.0f, z, c[C_S1], len, e0, fma_end);
    }
    J.x = x;
    J.out = x0;
    J.params = pinst + ix[I_P1] * J.pstride;
    molrg_rows(J, 0, M, buf.scratch.get());
    float* dst = ix[I_P2] >= 0 ? xp : x;  // without a corrector the step writes x in place
    if (ix[I_OFF2] >= 0) {
      const float* z = normals(nfn, ks, static_cast<uint64_t>(ix[I_OFF2]), e0, len, numel, buf.zbuf());
      combine3<FMA>(dst, x, c[C_X], x0, c[C_M], z, c[C_Z], len, e0, fma_end);
    } else {
      combine2<FMA>(dst, x, c[C_X], x0, c[C_M], len, e0, fma_end);
    }
    if (ix[I_P2] >= 0) {  // Heun's corrector
      J.x = xp;
      J.out = x0p;
      J.params = pinst + ix[I_P2] * J.pstride;
      molrg_rows(J, 0, M, buf.scratch.get());
      combine4<FMA>(x, x, c[C_HX], x0, c[C_HM], xp, c[C_HXP], x0p, c[C_HMP], len, e0,
                    fma_end);
    }
    if (ix[I_SNAP] >= 0 && T.traj)
      std::memcpy(T.traj + (ix[I_SNAP] * T.I * T.B + grow0) * n, x, sizeof(float) * len);
  }
  std::memcpy(T.x + grow0 * n, x, sizeof(float) * len);
}

#if FD_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c,prefer-vector-width=512")
void normals_avx512(const philox::KeySchedule& ks, uint64_t q0, int64_t nq, float* z) {
  philox::philox_normals_avx512(ks, q0, nq, z);
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
void run_tile_avx2(const Traj& T, int64_t inst, int64_t r0, int64_t r1, Buffers& buf,
                   const philox::KeySchedule& ks) {
  run_tile<true>(T, inst, r0, r1, buf,
                 use_avx512() ? &normals_avx512 : &philox::philox_normals_avx2, ks);
}
#pragma GCC pop_options
#endif

void normals_generic(const philox::KeySchedule& ks, uint64_t q0, int64_t nq, float* z) {
  philox::philox_normals(ks, q0, nq, z);
}

}  // namespace

void molrg_trajectory(uintptr_t x_ptr, int64_t I, int64_t B, int64_t n, uintptr_t u_ptr,
                      const std::vector<int64_t>& offsets, uintptr_t params_ptr,
                      int64_t params_istride, uintptr_t labels_ptr, bool hard, uintptr_t coef_ptr,
                      uintptr_t idx_ptr, int64_t t0, int64_t t1, uintptr_t traj_ptr,
                      uint64_t seed) {
  if (I < 0 || B < 0 || n < 0 || t0 < 0 || t1 < t0)
    throw std::invalid_argument("molrg_trajectory: negative size or step range");
  Traj T;
  T.den = molrg_job("molrg_trajectory", I * B, n, offsets, params_ptr, 1, labels_ptr, hard);
  if (I == 0 || B == 0 || n == 0 || t1 == t0) return;
  if (x_ptr == 0 || u_ptr == 0 || coef_ptr == 0 || idx_ptr == 0)
    throw std::invalid_argument("molrg_trajectory: null pointer");
  T.x = reinterpret_cast<float*>(x_ptr);
  T.I = I;
  T.B = B;
  T.n = n;
  T.U = reinterpret_cast<const float*>(u_ptr);
  T.params = reinterpret_cast<const float*>(params_ptr);
  T.pistride = params_istride;
  T.coef = reinterpret_cast<const float*>(coef_ptr);
  T.idx = reinterpret_cast<const int64_t*>(idx_ptr);
  T.t0 = t0;
  T.t1 = t1;
  T.traj = reinterpret_cast<float*>(traj_ptr);
  T.seed = seed;
  const MolrgJob& den = T.den;

  std::unique_ptr<float[]> ut(new float[static_cast<size_t>(I * den.D * den.n8)]);
  T.Ut = ut.get();
#ifdef _OPENMP
  const int nthreads = omp_get_max_threads();
#else
  const int nthreads = 1;
#endif
  // Tile rows: at most 32 (the buffers stay in L1/L2), fewer when B is small, and enough
  // tiles to keep every thread busy.
  int64_t M = std::min<int64_t>(32, B);
  const int64_t per_thread = (I * B + nthreads - 1) / nthreads;
  if (I * ((B + M - 1) / M) < 2 * nthreads) M = std::max<int64_t>(1, std::min(M, (per_thread + 1) / 2));
  const int64_t tiles_per = (B + M - 1) / M;
  const int64_t ntiles = I * tiles_per;
  const bool avx2 = use_avx2();
  const philox::KeySchedule ks(seed);
  const bool par = nthreads > 1 && ntiles > 1;

#pragma omp parallel if (par)
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < I; ++i) {
      MolrgJob J = den;
      J.U = T.U + i * n * den.D;
      molrg_transpose(J, ut.get() + i * den.D * den.n8);
    }
    Buffers buf(M, n, den.D8);
#pragma omp for schedule(dynamic, 1)
    for (int64_t tile = 0; tile < ntiles; ++tile) {
      const int64_t inst = tile / tiles_per;
      const int64_t r0 = (tile % tiles_per) * M, r1 = std::min(B, r0 + M);
#if FD_X86
      if (avx2) run_tile_avx2(T, inst, r0, r1, buf, ks);
      else
#endif
        run_tile<false>(T, inst, r0, r1, buf, &normals_generic, ks);
    }
  }
  (void)avx2;
}

}  // namespace fastdiff
