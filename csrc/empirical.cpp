// fastdiff empirical scan (CPU): one streamed pass over a training set gives the online softmax
// and the nearest rows (the contract: fastdiff/ops/empirical.py; the math: docs/math.md 2c).
//
//   per query b (B), training row i (N), Yc_i = y_i - c (y_i = lo + (hi - lo) u_i / 255 for uint8):
//     H_bi = xh_b . Yc_i,   S_bi = g1_b H_bi - g2_b ||Yc_i||^2,
//     V_bi = (H_bi - ||Yc_i||^2 / 2) - h_b (c . Yc_i)
//     m_b = max_i S_bi,  l_b = sum_i e^{S_bi - m_b},  acc_b = sum_i e^{S_bi - m_b} Yc_i
//     best_b = the kc largest V_bi (value, row), ymax2 = max_i ||Yc_i||^2
//   in the compute dtype T (float32 / float64), with FlashAttention's online softmax (Dao et al.
//   2022, Algorithm 1): no (B, N) matrix, memory O((B + N) n + B kc) per thread.
//
// Structure (empirical_scan.h, per thread):
//   the data in tiles of NT = 128 rows (256: 5-15% slower on an AVX-512 EPYC at n = 48 and 784),
//   each converted (uint8 -> T), centred by c and written twice, row-major Yc (NT, nP) (nP = n
//   rounded up to 16, zero padded) and as transposed panels Yt of 16 rows (n, 16), with ||Yc||^2,
//   ||Yc||^2 / 2, c . Yc per row;
//   then per block of BQ queries, while the tile is in L2:
//     1. H = xh Yc^T by mr x 16 register tiles (fma_tile: broadcast xh[b, k], FMA a panel row),
//        the epilogue fused on each: S into the block's (BQ, NT) buffer, V checked against each
//        query's worst kept candidate (one vector compare; a min-heap of kc entries is touched
//        only by rows that beat it: ~kc log(N / kc) times per query in random order);
//     2. the online softmax of each S row (max, e^{S - m'} in place, l, the rescale e^{m - m'});
//     3. acc = e^{m - m'} acc + P Yc by mr x 16 register tiles (fma_tile again: broadcast P[b, j], FMA
//        a row of Yc), the rescale folded into the tile's load; or, where the caller wants only the
//        columns `cols` of acc (the patch denoisers: the C centre pixels of a C P^2 patch), one dot
//        product per query and column with those columns of the tile (Vt, column-major, copied
//        at load): ncol instead of nP (n rounded up to 16) multiply-adds per score.
//   float32 MR = 6 queries x 2 vectors, float64 MR = 3 x 4: 12 accumulators, 16 ymm registers
//   (AVX-512: tiles of two 16-column blocks, 12 of the 32 zmm registers).
// Parallel over data tiles (OpenMP, `threads` from torch.get_num_threads()): each thread keeps
// its own (m, l, acc, heaps) over its contiguous range of tiles, merged at the end per query:
// m = max_t m_t, l = sum_t e^{m_t - m} l_t, acc likewise, the candidates by a selection of the
// T kc.  (Over data, not queries: each tile is converted once (the conversion and transposes are
// ~4% of a pass at (256, 10000, 192) by perf, which a split over queries would repeat on every
// thread), the merge is O(T B n), and B = 1 splits as well.)
// Three code paths from one source (use_avx512() / use_avx2(), cpu_features.h;
// FASTDIFF_CPU_SIMD=sse2 forces the generic one, =avx2 the AVX2 one): empirical_scan.h included
// once per ISA (AVX-512 tiles of 32 columns (two 16-float vectors a row), AVX2 + FMA tiles of 16,
// GCC generic 16-byte vectors; the other loops vectorized by GCC for the ISA; -fopt-info-vec
// checked).  The exps: exp_nonpos (float32, vectorized Cephes), std::exp (float64).  Generic / AVX2 time
// ~2.8x at (256, 10000, 192) float32 (SSE2: 4 lanes, no FMA).
// NaN / Inf: no -ffast-math, the max is NaN-sticky: a NaN logit makes m, l, acc NaN for that
// query (a NaN row: for every query), as the formula; candidates order NaN as -inf.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_features.h"  // use_avx2(), use_avx512(), FD_X86
#include "exp_nonpos.h"
#if FD_X86
#include <immintrin.h>
#endif

#define FD_SCAN_INLINE inline __attribute__((always_inline))

namespace fastdiff {
namespace empirical_detail {

constexpr int64_t PW = 16;   // rows per transposed panel = columns per acc tile
// data rows per tile (a multiple of 2 PW): Yc + Yt 200 KB at n = 192, 800 KB at n = 784 (L2)
constexpr int64_t NT = 128;
template <class T> constexpr int MR = sizeof(T) == 4 ? 6 : 3;   // queries per register tile
template <class T> constexpr int64_t BQ = 10 * MR<T>;           // queries per block of a tile

inline int64_t round_up(int64_t a, int64_t m) { return (a + m - 1) / m * m; }

template <class T> FD_SCAN_INLINE T nan_max(T a, T b) {  // NaN-sticky max
  return a != a || b != b ? std::numeric_limits<T>::quiet_NaN() : std::max(a, b);
}
template <class T> FD_SCAN_INLINE T key(T v) {  // the candidates' order: NaN as -inf
  return v != v ? -std::numeric_limits<T>::infinity() : v;
}

template <class T> std::unique_ptr<T[]> buffer(int64_t count) {
  return std::unique_ptr<T[]>(new T[static_cast<size_t>(std::max<int64_t>(1, count))]());
}

// The inputs, as the entry point checked them.
template <class T> struct Job {
  const T* xh;             // (B, n)
  const T* data;           // (N, n), or null when data_u8
  const uint8_t* data_u8;  // (N, n) read as lo + step u
  const T* c;              // (n,)
  const T *g1, *g2, *h;    // (B,)
  T lo, step;
  int64_t B, N, n, nP, kc;
  bool soft, want_acc;
  const int64_t* cols;     // (ncol,) the columns of Yc acc sums (null: all n)
  int64_t ncol;
  int64_t acc_width() const { return cols ? ncol : n; }     // acc's columns as returned
  int64_t acc_stride() const { return cols ? ncol : nP; }   // and in a thread's partial
};

// One thread's running results over its tiles, and its tile buffers.
template <class T> struct Partial {
  std::unique_ptr<T[]> m, l, acc, hv, thr, Yc, Yt, Vt, ysq, hys, cy, S, sc;
  std::unique_ptr<int64_t[]> hi, cnt;
  T ymax2 = T(0);

  explicit Partial(const Job<T>& J)
      : m(buffer<T>(J.B)), l(buffer<T>(J.B)), acc(buffer<T>(J.want_acc ? J.B * J.acc_stride() : 0)),
        hv(buffer<T>(J.B * J.kc)), thr(buffer<T>(J.B)), Yc(buffer<T>(NT * J.nP)),
        Yt(buffer<T>(NT * J.n)), Vt(buffer<T>(J.cols ? NT * J.ncol : 0)), ysq(buffer<T>(NT)),
        hys(buffer<T>(NT)), cy(buffer<T>(NT)),
        S(buffer<T>(BQ<T> * NT)), sc(buffer<T>(BQ<T>)), hi(buffer<int64_t>(J.B * J.kc)),
        cnt(buffer<int64_t>(J.B)) {
    for (int64_t b = 0; b < J.B; ++b) {
      m[b] = -std::numeric_limits<T>::infinity();
      thr[b] = std::numeric_limits<T>::quiet_NaN();  // "not full": every row is offered
    }
  }

  // Row `row` with score v into query b's min-heap of kc (root: the worst kept, by key()).
  void offer(int64_t b, int64_t kc, T v, int64_t row) {
    T* hvb = hv.get() + b * kc;
    int64_t* hib = hi.get() + b * kc;
    int64_t& c = cnt[b];
    const T kv = key(v);
    if (c < kc) {  // sift up from the end
      int64_t i = c++;
      while (i > 0) {
        const int64_t p = (i - 1) / 2;
        if (key(hvb[p]) <= kv) break;
        hvb[i] = hvb[p];
        hib[i] = hib[p];
        i = p;
      }
      hvb[i] = v;
      hib[i] = row;
    } else if (kv > key(hvb[0])) {  // replace the root, sift down
      int64_t i = 0;
      for (;;) {
        int64_t s = 2 * i + 1;
        if (s >= kc) break;
        if (s + 1 < kc && key(hvb[s + 1]) < key(hvb[s])) ++s;
        if (kv <= key(hvb[s])) break;
        hvb[i] = hvb[s];
        hib[i] = hib[s];
        i = s;
      }
      hvb[i] = v;
      hib[i] = row;
    }
    thr[b] = c < kc ? std::numeric_limits<T>::quiet_NaN() : key(hvb[0]);
  }
};

}  // namespace empirical_detail
}  // namespace fastdiff

// The pass, once per ISA.
#define FD_SCAN_NS scan_generic
#define FD_SCAN_AVX2 0
#define FD_SCAN_AVX512 0
#include "empirical_scan.h"
#undef FD_SCAN_NS
#undef FD_SCAN_AVX2
#undef FD_SCAN_AVX512
#if FD_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define FD_SCAN_NS scan_avx2
#define FD_SCAN_AVX2 1
#define FD_SCAN_AVX512 0
#include "empirical_scan.h"
#undef FD_SCAN_NS
#undef FD_SCAN_AVX2
#undef FD_SCAN_AVX512
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
#define FD_SCAN_NS scan_avx512
#define FD_SCAN_AVX2 1
#define FD_SCAN_AVX512 1
#include "empirical_scan.h"
#undef FD_SCAN_NS
#undef FD_SCAN_AVX2
#undef FD_SCAN_AVX512
#pragma GCC pop_options
#endif

namespace fastdiff {

using namespace empirical_detail;

namespace {

// The partials of the threads merged into the outputs (m, l (B,), acc (B, n) or null, best_v,
// best_i (B, kc) sorted by score descending, ties by row; ymax2).
template <class T>
void merge(const Job<T>& J, const std::vector<Partial<T>>& parts, T* m, T* l, T* acc, T* best_v,
           int64_t* best_i, T* ymax2) {
  const T inf = std::numeric_limits<T>::infinity();
  T y2 = parts[0].ymax2;
  for (const auto& P : parts) y2 = nan_max(y2, P.ymax2);
  *ymax2 = y2;
  std::vector<T> w(parts.size());
  std::vector<std::pair<T, int64_t>> cand;
  for (int64_t b = 0; b < J.B; ++b) {
    if (J.soft) {
      T mb = -inf;
      for (const auto& P : parts) mb = nan_max(mb, P.m[b]);
      T lb = 0;
      for (size_t t = 0; t < parts.size(); ++t) {  // a thread that saw no finite logit adds 0
        const T mt = parts[t].m[b];
        w[t] = mt == mb ? T(1) : (mt == -inf ? T(0) : std::exp(mt - mb));
        lb += w[t] * parts[t].l[b];
      }
      m[b] = mb;
      l[b] = lb;
      if (acc) {
        const int64_t na = J.acc_width(), st = J.acc_stride();
        for (int64_t k = 0; k < na; ++k) {
          T a = 0;
          for (size_t t = 0; t < parts.size(); ++t) a += w[t] * parts[t].acc[b * st + k];
          acc[b * na + k] = a;
        }
      }
    } else {
      m[b] = -inf;
      l[b] = 0;
      if (acc)
        for (int64_t k = 0; k < J.acc_width(); ++k) acc[b * J.acc_width() + k] = 0;
    }
    if (J.kc) {
      cand.clear();
      for (const auto& P : parts)
        for (int64_t i = 0; i < P.cnt[b]; ++i) cand.emplace_back(P.hv[b * J.kc + i], P.hi[b * J.kc + i]);
      const auto better = [](const std::pair<T, int64_t>& a, const std::pair<T, int64_t>& c) {
        return key(a.first) > key(c.first) || (key(a.first) == key(c.first) && a.second < c.second);
      };
      std::partial_sort(cand.begin(), cand.begin() + J.kc, cand.end(), better);
      for (int64_t i = 0; i < J.kc; ++i) {
        best_v[b * J.kc + i] = cand[i].first;
        best_i[b * J.kc + i] = cand[i].second;
      }
    }
  }
}

template <class T>
void run(const Job<T>& J, int threads, T* m, T* l, T* acc, T* best_v, int64_t* best_i, T* ymax2) {
  const int64_t ntiles = (J.N + NT - 1) / NT;
  const bool big = J.B * J.N * J.n >= (int64_t(1) << 18);
  const int nt = static_cast<int>(std::max<int64_t>(1, big ? std::min<int64_t>(threads, ntiles) : 1));
  std::vector<Partial<T>> parts;
  parts.reserve(nt);
  for (int t = 0; t < nt; ++t) parts.emplace_back(J);  // allocated here: no throw inside the region
  void (*pass)(const Job<T>&, Partial<T>&, int64_t, int64_t) = &scan_generic::scan_tiles<T>;
#if FD_X86
  if (use_avx512()) pass = &scan_avx512::scan_tiles<T>;
  else if (use_avx2()) pass = &scan_avx2::scan_tiles<T>;
#endif
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
#ifdef _OPENMP
    const int t = omp_get_thread_num();
#else
    const int t = 0;
#endif
    pass(J, parts[t], ntiles * t / nt, ntiles * (t + 1) / nt);
  }
  merge(J, parts, m, l, acc, best_v, best_i, ymax2);
}

}  // namespace

void empirical_scan(uintptr_t xh_ptr, uintptr_t data_ptr, uintptr_t center_ptr, uintptr_t g1_ptr,
                    uintptr_t g2_ptr, uintptr_t h_ptr, int dtype, bool data_u8, int64_t B, int64_t N,
                    int64_t n, double lo, double hi, bool soft, bool want_acc, int64_t kc,
                    uintptr_t m_ptr, uintptr_t l_ptr, uintptr_t acc_ptr, uintptr_t best_v_ptr,
                    uintptr_t best_i_ptr, uintptr_t ymax2_ptr, uintptr_t cols_ptr, int64_t ncol,
                    int threads) {
  const std::string f = "empirical_scan: ";
  if (dtype != 0 && dtype != 1) throw std::invalid_argument(f + "dtype must be 0 (float32) or 1 (float64)");
  if (B < 0 || N < 1 || n < 1)  // B = 0: an empty batch (the denoisers pass it through)
    throw std::invalid_argument(f + "need B >= 0 and N, n >= 1, got B = " + std::to_string(B) + ", N = " +
                                std::to_string(N) + ", n = " + std::to_string(n));
  if (kc < 0 || kc > N)
    throw std::invalid_argument(f + "kc = " + std::to_string(kc) + " outside [0, N = " + std::to_string(N) + "]");
  if (!data_ptr || !center_ptr || !ymax2_ptr ||
      (B && (!xh_ptr || !g1_ptr || !g2_ptr || !h_ptr || !m_ptr || !l_ptr || (want_acc && !acc_ptr) ||
             (kc && (!best_v_ptr || !best_i_ptr)))))
    throw std::invalid_argument(f + "null pointer (data, center, ymax2; with B > 0 every other input, m, l, "
                                "acc with want_acc, best_v and best_i with kc)");
  const int64_t* cols = reinterpret_cast<const int64_t*>(cols_ptr);
  if (cols) {
    if (ncol < 1) throw std::invalid_argument(f + "need ncol >= 1 columns with cols, got " + std::to_string(ncol));
    for (int64_t c = 0; c < ncol; ++c)
      if (cols[c] < 0 || cols[c] >= n)
        throw std::invalid_argument(f + "cols[" + std::to_string(c) + "] = " + std::to_string(cols[c]) +
                                    " outside [0, n = " + std::to_string(n) + ")");
  }
  const auto go = [&](auto tag) {
    using T = decltype(tag);
    Job<T> J{reinterpret_cast<const T*>(xh_ptr),
             data_u8 ? nullptr : reinterpret_cast<const T*>(data_ptr),
             data_u8 ? reinterpret_cast<const uint8_t*>(data_ptr) : nullptr,
             reinterpret_cast<const T*>(center_ptr), reinterpret_cast<const T*>(g1_ptr),
             reinterpret_cast<const T*>(g2_ptr), reinterpret_cast<const T*>(h_ptr),
             static_cast<T>(lo), static_cast<T>((hi - lo) / 255.0), B, N, n, round_up(n, PW), kc,
             soft, want_acc && soft, cols, cols ? ncol : 0};
    run(J, std::max(1, threads), reinterpret_cast<T*>(m_ptr), reinterpret_cast<T*>(l_ptr),
        want_acc ? reinterpret_cast<T*>(acc_ptr) : nullptr, reinterpret_cast<T*>(best_v_ptr),
        reinterpret_cast<int64_t*>(best_i_ptr), reinterpret_cast<T*>(ymax2_ptr));
  };
  if (dtype == 0) go(float{});
  else go(double{});
}

}  // namespace fastdiff
