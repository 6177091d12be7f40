// The run-time CPU-feature check shared by all the kernels (cpu_features.h).
#include "cpu_features.h"

#include <cstdlib>
#include <cstring>

namespace fastdiff {

bool use_avx2() {
#if FD_X86
  static const bool ok = [] {
    __builtin_cpu_init();
    // FASTDIFF_CPU_SIMD=sse2 (or generic) forces the baseline path (testing / debugging).
    const char* env = std::getenv("FASTDIFF_CPU_SIMD");
    if (env && (std::strcmp(env, "sse2") == 0 || std::strcmp(env, "generic") == 0)) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }();
  return ok;
#else
  return false;
#endif
}

bool use_avx512() {
#if FD_X86
  static const bool ok = [] {
    const char* env = std::getenv("FASTDIFF_CPU_SIMD");
    if (!use_avx2() || (env && std::strcmp(env, "avx2") == 0)) return false;
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return ok;
#else
  return false;
#endif
}

const char* simd_name() {
#if FD_X86
  return use_avx512() ? "avx512" : use_avx2() ? "avx2" : "sse2";
#elif defined(__aarch64__)
  return "neon";
#else
  return "generic";
#endif
}

}  // namespace fastdiff
