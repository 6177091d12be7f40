// fastdiff fused MoLRG denoiser, the per-row routine shared by the denoiser kernel
// (molrg_forward.cpp, molrg_backward.cpp, molrg_mix.cpp) and the fused trajectory
// (trajectory.cpp).  The math and the code paths are described at the top of molrg_forward.cpp.
#pragma once

#include <cstdint>
#include <vector>

namespace fastdiff {

// One call's data.  Rows r of x / out / labels are at x + r n, ...; the parameter row of row r
// is params + (R == 1 ? 0 : r) * pstride, laid out [g(K), b(K), C(K), A, gw].
struct MolrgJob {
  const float* x;
  float* out;
  float* w;                 // nullptr: do not write the weights
  int64_t B, n, D, D8, n8;  // D8 = D rounded up to 8, n8 = n rounded up to 8
  int K;
  const float* U;           // (n, D)
  const float* Ut;          // (D, n8), zero padded (molrg_transpose)
  const int64_t* off;       // K + 1 column offsets of the components
  const float* params;
  int64_t R, pstride;       // pstride = 3K + 2
  const int64_t* labels;    // nullptr: no guidance
  bool hard;
};

// The checks and fields every entry point shares (sizes, offsets, params, labels), errors
// prefixed with fn; the callers set the data pointers.  B == 0 passes (the caller returns
// early); labels (B of them) are range-checked.  J.off points into offsets.
MolrgJob molrg_job(const char* fn, int64_t B, int64_t n, const std::vector<int64_t>& offsets,
                   uintptr_t params_ptr, int64_t R, uintptr_t labels_ptr, bool hard);

// out (and w) of rows [r0, r1) of J, on the calling thread.  scratch: (r1 - r0 + 4) * D8
// floats.  A row's result does not depend on r0 / r1 (each row is computed alone).
void molrg_rows(const MolrgJob& J, int64_t r0, int64_t r1, float* scratch);

// Ut = U^T, zero padded to (D, n8), on the calling thread.
void molrg_transpose(const MolrgJob& J, float* Ut);

}  // namespace fastdiff
