// fastdiff: the one run-time CPU-feature check every C++ kernel uses to pick its code path.
//
// Each kernel is compiled twice, once for the baseline ISA (SSE2 on x86-64, NEON on aarch64)
// and once for AVX2 + FMA (+ F16C in the fused step) through `#pragma GCC target`, and picks
// the AVX2 one when use_avx2() is true; the empirical scan and the Philox streams (fused step,
// MoLRG trajectory, discrete flip) have a third, AVX-512F one (use_avx512()).  FASTDIFF_CPU_SIMD=sse2 (or =generic) in the environment forces the baseline
// path everywhere, FASTDIFF_CPU_SIMD=avx2 the AVX2 one (testing / debugging:
// tests/test_cpp_simd_paths.py runs the kernel tests again both ways).
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#define FD_X86 1
#else
#define FD_X86 0
#endif

namespace fastdiff {

// The CPU has AVX2, FMA and F16C and FASTDIFF_CPU_SIMD does not force the baseline path.
// Decided once (the first call) and cached; always false off x86-64.
bool use_avx2();

// use_avx2() and the CPU has AVX-512F (and FASTDIFF_CPU_SIMD is not "avx2"): the kernels that
// have a third, AVX-512 path take it (the empirical scan's register tiles, the Philox normals
// and uniforms: 16 float lanes).
bool use_avx512();

// The selected path's name, as fastdiff._C.simd(): "avx512" (AVX2 everywhere, AVX-512 where a
// kernel has it), "avx2", "sse2" (x86-64 baseline), "neon" (aarch64) or "generic".
const char* simd_name();

}  // namespace fastdiff
