// pybind11 module fastdiff._C: the CPU kernels (fused step, discrete Langevin flip, MoLRG, batched SVD, empirical scan).  No torch linkage: the Python side
// passes raw data pointers (ints), sizes and floats; it validates shapes / dtypes / devices.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "cpu_features.h"  // simd_name()

namespace py = pybind11;

namespace fastdiff {
void fused_step(uintptr_t out_ptr, const std::vector<uintptr_t>& in_ptrs, int dtype, int64_t n,
                int64_t inner, int64_t start, uintptr_t coef_ptr, const std::vector<float>& coefs,
                int noise_mode, uintptr_t noise_ptr, uint64_t seed, uint64_t offset,
                uintptr_t seeds_ptr, int64_t per);
int num_threads();
int64_t discrete_flip(uintptr_t out_ptr, uintptr_t anchor_ptr, uintptr_t score_ptr, int64_t n, float a,
                      float b, uint64_t seed, uint64_t offset);
void ksubspaces(uintptr_t x_ptr, int64_t B, int64_t N, int64_t n, uintptr_t counts_ptr, int64_t K,
                int64_t d, int64_t R, uintptr_t u_ptr, uintptr_t starts_ptr, int64_t max_iter,
                uintptr_t bases_ptr, uintptr_t labels_ptr, uintptr_t converged_ptr, double tol,
                int64_t refit_iter, uintptr_t iters_ptr, int threads);
void top_subspace(uintptr_t x_ptr, int64_t B, int64_t N, int64_t n, uintptr_t counts_ptr, int64_t d,
                  uintptr_t v0_ptr, double tol, int64_t max_iter, uintptr_t v_ptr, uintptr_t converged_ptr,
                  int threads);
void molrg_forward(uintptr_t x_ptr, uintptr_t out_ptr, uintptr_t w_ptr, int64_t B, int64_t n,
                   uintptr_t u_ptr, const std::vector<int64_t>& offsets, uintptr_t params_ptr,
                   int64_t R, uintptr_t labels_ptr, bool hard);
void molrg_backward(uintptr_t x_ptr, uintptr_t g_ptr, uintptr_t w_ptr, uintptr_t dx_ptr,
                    uintptr_t du_ptr, int64_t B, int64_t n, uintptr_t u_ptr,
                    const std::vector<int64_t>& offsets, uintptr_t params_ptr, int64_t R,
                    uintptr_t labels_ptr, bool hard);
void molrg_mix(uintptr_t p_ptr, uintptr_t q_ptr, uintptr_t w_ptr, int64_t B,
               const std::vector<int64_t>& offsets, uintptr_t params_ptr, int64_t R,
               uintptr_t labels_ptr, bool hard);
void molrg_mix_backward(uintptr_t p_ptr, uintptr_t dq_ptr, uintptr_t w_ptr, uintptr_t q_ptr,
                        int64_t B, const std::vector<int64_t>& offsets, uintptr_t params_ptr,
                        int64_t R, uintptr_t labels_ptr, bool hard);
void svdvals_rank(uintptr_t a_ptr, int dtype, int64_t B, int64_t m, int64_t n, uintptr_t s_ptr,
                  uintptr_t rank_ptr, double eta);
void empirical_scan(uintptr_t xh_ptr, uintptr_t data_ptr, uintptr_t center_ptr, uintptr_t g1_ptr,
                    uintptr_t g2_ptr, uintptr_t h_ptr, int dtype, bool data_u8, int64_t B, int64_t N,
                    int64_t n, double lo, double hi, bool soft, bool want_acc, int64_t kc,
                    uintptr_t m_ptr, uintptr_t l_ptr, uintptr_t acc_ptr, uintptr_t best_v_ptr,
                    uintptr_t best_i_ptr, uintptr_t ymax2_ptr, uintptr_t cols_ptr, int64_t ncol,
                    int threads);
void molrg_trajectory(uintptr_t x_ptr, int64_t I, int64_t B, int64_t n, uintptr_t u_ptr,
                      const std::vector<int64_t>& offsets, uintptr_t params_ptr,
                      int64_t params_istride, uintptr_t labels_ptr, bool hard, uintptr_t coef_ptr,
                      uintptr_t idx_ptr, int64_t t0, int64_t t1, uintptr_t traj_ptr, uint64_t seed);
}  // namespace fastdiff

namespace {

// A kernel entry point: a plain function of pointers, sizes and scalars, its arguments named
// (the launchers in kernels/cpp.py pass them by keyword), the GIL released while it runs.
template <class R, class... A, class... Names>
void def_kernel(py::module_& m, const char* name, R (*fn)(A...), const char* doc, Names... names) {
  static_assert(sizeof...(A) == sizeof...(Names), "one name per argument");
  m.def(name, fn, py::arg(names)..., py::call_guard<py::gil_scoped_release>(), doc);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastdiff CPU kernels (OpenMP + SIMD)";
  def_kernel(m, "fused_step", &fastdiff::fused_step,
R"(out[i] = sum_{j<k} c[b,j]*in_j[i] + c[b,k]*z_i, b = (start+i)//inner.
dtype: 0 float32, 1 float16, 2 bfloat16; noise_mode: 0 none, 1 tensor at noise_ptr,
2 philox stream (seed, offset+start+i); coef_ptr: float32 (R, k+1) rows or 0 for coefs.
seeds_ptr: 0, or per-sample seeds int64 (B,) (u64 bits): mode 2 then draws element j of sample b
(start+i = b*per + j) from (seeds[b], offset+j).)",
             "out_ptr", "in_ptrs", "dtype", "n", "inner", "start", "coef_ptr", "coefs",
             "noise_mode", "noise_ptr", "seed", "offset", "seeds_ptr", "per");
  def_kernel(m, "discrete_flip", &fastdiff::discrete_flip,
R"(Discrete Langevin flip, float32 (see csrc/discrete_langevin.cpp).  out, anchor, score (n,):
out[i] = +1 if u_i < sigmoid(a*score[i] + b*anchor[i]) else -1, u_i the uniform Philox stream
(seed, offset+i) (word (g%4) of quad g//4); score_ptr 0: no score term; offset % 4 == 0.
Returns the number of anchor entries not in {-1, +1}.)",
             "out_ptr", "anchor_ptr", "score_ptr", "n", "a", "b", "seed", "offset");
  def_kernel(m, "molrg_forward", &fastdiff::molrg_forward,
R"(Fused MoLRG denoiser forward, float32.  x, out (B, n); Ucat (n, D) = [U_0|...|U_{K-1}],
component k = columns [offsets[k], offsets[k+1]); params (R, 3K+2) rows
[g(K), b(K), C(K), A, gw], R in {1, B}; labels int64 (B,) or 0; w (B, K) or 0.
P = U^T x, l_k = b_k + g_k |P_k|^2, w = softmax(l) (hard: one_hot(argmax)),
w' = (1-gw) w + gw onehot(label), out = A x + sum_k w'_k C_k U_k P_k.)",
             "x_ptr", "out_ptr", "w_ptr", "B", "n", "u_ptr", "offsets", "params_ptr", "R",
             "labels_ptr", "hard");
  def_kernel(m, "molrg_backward", &fastdiff::molrg_backward,
R"(Fused MoLRG denoiser backward, float32 (the math of _MoLRGFunction.backward).
x, G = dL/dout, dx (B, n); w (B, K) the forward's posterior; Ucat, dU (n, D);
params / offsets / labels / hard as molrg_forward.  P = U^T x recomputed,
dx = A G + U dP, dU = G^T q + x^T dP (both overwritten; dx must not alias x / G).)",
             "x_ptr", "g_ptr", "w_ptr", "dx_ptr", "du_ptr", "B", "n", "u_ptr", "offsets",
             "params_ptr", "R", "labels_ptr", "hard");
  def_kernel(m, "molrg_mix", &fastdiff::molrg_mix,
R"(The MoLRG forward's per-row mix, float32: P = x Ucat (B, D) given (row-major);
writes q (B, D) = w'_{k(j)} C_{k(j)} P_j and w (B, K) (or 0).  params / offsets /
labels / hard as molrg_forward.)",
             "p_ptr", "q_ptr", "w_ptr", "B", "offsets", "params_ptr", "R", "labels_ptr", "hard");
  def_kernel(m, "molrg_mix_backward", &fastdiff::molrg_mix_backward,
R"(The MoLRG backward's per-row mix, float32: P (B, D), dq = G Ucat (B, D) in, dP out
(in place); w (B, K) the forward's posterior; writes q (B, D).  Then
dx = A G + dP Ucat^T and dU = G^T q + x^T dP are library GEMMs.)",
             "p_ptr", "dq_ptr", "w_ptr", "q_ptr", "B", "offsets", "params_ptr", "R",
             "labels_ptr", "hard");
  def_kernel(m, "svdvals_rank", &fastdiff::svdvals_rank,
R"(Batched singular values (float64 arithmetic) with the energy rank fused in.
A (B, m, n) contiguous, dtype 0 float32 / 1 float64; S (B, min(m, n)) same dtype, descending;
rank int64 (B,) or 0: min r with sum_{i<=r} s_i^2 > eta^2 sum s_i^2 (clamped to min(m, n);
zero matrix: 0).  Non-finite entries: S = NaN, rank = -1.)",
             "a_ptr", "dtype", "B", "m", "n", "s_ptr", "rank_ptr", "eta");
  def_kernel(m, "molrg_trajectory", &fastdiff::molrg_trajectory,
R"(Fused MoLRG sampling trajectory, float32, steps [t0, t1) (see csrc/trajectory.cpp).
x (I*B, n) in/out; U (I, n, D); params (I or 1, P, 3K+2) with instance stride
params_istride (0: shared); labels int64 (I*B) or 0; coef float32 (T, 8)
[s1, cx, cm, cz, hx, hm, hxp, hmp]; idx int64 (T, 5) [off1, off2, prow1, prow2, snap]
(-1: none); traj (S, I*B, n) or 0.)",
             "x_ptr", "I", "B", "n", "u_ptr", "offsets", "params_ptr", "params_istride",
             "labels_ptr", "hard", "coef_ptr", "idx_ptr", "t0", "t1", "traj_ptr", "seed");
  def_kernel(m, "ksubspaces", &fastdiff::ksubspaces,
R"(K-subspaces of the subspace-recovery sweep, float32 (see csrc/ksubspaces.cpp).
X (B, N, n), the first counts[b] (int64, >= 1) rows of instance b are points; u float32
(B, R) uniforms: seed the starts (B, R, K, n, d) into starts_ptr (0: read them from there);
bases (B, K, n, d): each cluster of the best start refitted by top_subspace (tol,
refit_iter), converged uint8 (B, K), labels int64 (B, N) (bases 0: seeding only);
iters int64 (B,) assignment refits done, or 0; threads: OpenMP threads.)",
             "x_ptr", "B", "N", "n", "counts_ptr", "K", "d", "R", "u_ptr", "starts_ptr",
             "max_iter", "bases_ptr", "labels_ptr", "converged_ptr", "tol", "refit_iter",
             "iters_ptr", "threads");
  def_kernel(m, "top_subspace", &fastdiff::top_subspace,
R"(Top-d right singular subspaces by subspace iteration, float32 (see csrc/ksubspaces.cpp).
X (B, N, n) of which the first counts[b] (int64) rows count; V0, V (B, n, d); converged
uint8 (B,): 0 where max_iter updates did not reach ||C V - V V^T C V|| <= tol ||X||_F^2.)",
             "x_ptr", "B", "N", "n", "counts_ptr", "d", "v0_ptr", "tol", "max_iter", "v_ptr",
             "converged_ptr", "threads");
  def_kernel(m, "empirical_scan", &fastdiff::empirical_scan,
R"(The empirical scan (see csrc/empirical.cpp; the contract: fastdiff/ops/empirical.py), one
streamed pass in the compute dtype (0 float32, 1 float64).  xh (B, n), center (n,), g1, g2, h
(B,); data (N, n) that dtype, or uint8 (data_u8) read as lo + (hi - lo) u / 255.  Yc = y - c,
H = xh Yc^T, S = g1 H - g2 |Yc|^2, V = H - |Yc|^2 / 2 - h (c . Yc).  Writes m = max S, l =
sum e^(S - m) (soft; else -inf, 0), acc (B, n) = sum e^(S - m) Yc (want_acc), best_v / best_i
(B, kc) the kc largest V per query (descending, int64 rows; 0 <= kc <= N), ymax2 = max |Yc|^2.
cols_ptr (int64, ncol; 0: all n): acc is (B, ncol), sum e^(S - m) Yc[:, cols].)",
             "xh_ptr", "data_ptr", "center_ptr", "g1_ptr", "g2_ptr", "h_ptr", "dtype", "data_u8",
             "B", "N", "n", "lo", "hi", "soft", "want_acc", "kc", "m_ptr", "l_ptr", "acc_ptr",
             "best_v_ptr", "best_i_ptr", "ymax2_ptr", "cols_ptr", "ncol", "threads");
  m.def("num_threads", &fastdiff::num_threads, "omp_get_max_threads()");
  m.def("simd", &fastdiff::simd_name, "SIMD code path selected at run time");
}
