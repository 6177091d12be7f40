// fastdiff empirical scan: the per-thread streamed pass (the tiles, the micro-kernels, the fused
// epilogue, the candidate heaps).  The math and the structure: the top of csrc/empirical.cpp.
//
// Deliberately no include guard: empirical.cpp includes this file three times, once for the baseline
// ISA (FD_SCAN_AVX2 0: generic vectors and loops GCC vectorizes, namespace scan_generic), once inside
// `#pragma GCC target("avx2,fma")` (FD_SCAN_AVX2 1: AVX2 + FMA register tiles, namespace
// scan_avx2) and once inside `#pragma GCC target("avx512f,avx2,fma")` (FD_SCAN_AVX512 1 as
// well: 512-bit tiles, namespace scan_avx512), so every loop here is compiled for each ISA from one
// source.  The standard headers, <immintrin.h>, exp_nonpos.h and the shared definitions (namespace empirical_detail:
// Job, Partial and its candidate heaps, the tile constants) come first, from empirical.cpp.

namespace fastdiff {
namespace FD_SCAN_NS {

using namespace empirical_detail;

// ------------------------------------------------------------------------ the micro-kernel
// fma_tile: out[r][q] <- (s ? s_r out[r][q] : 0) + sum_{k < nk} A[r lda + k] Y[k ldy + q]   (mr x 16 NB)
// used twice: H = xh Yc^T (A: rows of xh, Y: a transposed panel of 16 centred rows, no s) and
// acc <- sc acc + P Yc (A: rows of exp(S - m), Y: 16 columns of the centred tile, row-major).
// Each holds an mr x 16 NB tile of accumulators in registers: per step 16 NB / W vector loads and
// mr broadcasts feed 16 NB mr / W FMAs (12 vectors: MR = 6 in float32, 3 in float64; NB = 1, or
// 2 with AVX-512's W = 16 / 8).
#if FD_SCAN_AVX2
template <class T> struct Vec;
#if FD_SCAN_AVX512
// 16 floats / 8 doubles a vector: a 16-column block is one (float) or two (double) vectors, and a
// tile of TILE_BLOCKS = 2 blocks 2 mr or 4 mr accumulators (12 of the 32 zmm registers)
template <> struct Vec<float> {
  using R = __m512;
  static constexpr int W = 16;
  static FD_SCAN_INLINE R load(const float* p) { return _mm512_loadu_ps(p); }
  static FD_SCAN_INLINE void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static FD_SCAN_INLINE R set1(float a) { return _mm512_set1_ps(a); }
  static FD_SCAN_INLINE R zero() { return _mm512_setzero_ps(); }
  static FD_SCAN_INLINE R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static FD_SCAN_INLINE R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
};
template <> struct Vec<double> {
  using R = __m512d;
  static constexpr int W = 8;
  static FD_SCAN_INLINE R load(const double* p) { return _mm512_loadu_pd(p); }
  static FD_SCAN_INLINE void store(double* p, R v) { _mm512_storeu_pd(p, v); }
  static FD_SCAN_INLINE R set1(double a) { return _mm512_set1_pd(a); }
  static FD_SCAN_INLINE R zero() { return _mm512_setzero_pd(); }
  static FD_SCAN_INLINE R mul(R a, R b) { return _mm512_mul_pd(a, b); }
  static FD_SCAN_INLINE R fma(R a, R b, R c) { return _mm512_fmadd_pd(a, b, c); }
};
#else
template <> struct Vec<float> {
  using R = __m256;
  static constexpr int W = 8;
  static FD_SCAN_INLINE R load(const float* p) { return _mm256_loadu_ps(p); }
  static FD_SCAN_INLINE void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static FD_SCAN_INLINE R set1(float a) { return _mm256_set1_ps(a); }
  static FD_SCAN_INLINE R zero() { return _mm256_setzero_ps(); }
  static FD_SCAN_INLINE R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static FD_SCAN_INLINE R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
};
template <> struct Vec<double> {
  using R = __m256d;
  static constexpr int W = 4;
  static FD_SCAN_INLINE R load(const double* p) { return _mm256_loadu_pd(p); }
  static FD_SCAN_INLINE void store(double* p, R v) { _mm256_storeu_pd(p, v); }
  static FD_SCAN_INLINE R set1(double a) { return _mm256_set1_pd(a); }
  static FD_SCAN_INLINE R zero() { return _mm256_setzero_pd(); }
  static FD_SCAN_INLINE R mul(R a, R b) { return _mm256_mul_pd(a, b); }
  static FD_SCAN_INLINE R fma(R a, R b, R c) { return _mm256_fmadd_pd(a, b, c); }
};
#endif  // FD_SCAN_AVX512

// NB blocks of 16 columns at once (AVX-512: NB = 2, 12 accumulators of 16 floats), block c at
// Y + c bs (bs = 16 where the columns are contiguous, the panel size where they are two panels).
template <class T, int mr, int NB = 1>
FD_SCAN_INLINE void fma_tile(const T* A, int64_t lda, const T* Y, int64_t ldy, int64_t bs, int64_t nk, T* out,
                             int64_t ldo, const T* s) {
  using V = Vec<T>;
  constexpr int PV = PW / V::W;  // vectors a block
  constexpr int NV = NB * PV;
  typename V::R acc[mr][NV];
  for (int r = 0; r < mr; ++r) {
    const typename V::R sv = s ? V::set1(s[r]) : V::zero();
    for (int v = 0; v < NV; ++v) acc[r][v] = s ? V::mul(sv, V::load(out + r * ldo + V::W * v)) : V::zero();
  }
  for (int64_t k = 0; k < nk; ++k) {
    typename V::R y[NV];
    for (int v = 0; v < NV; ++v) y[v] = V::load(Y + (v / PV) * bs + k * ldy + V::W * (v % PV));
    for (int r = 0; r < mr; ++r) {
      const typename V::R a = V::set1(A[r * lda + k]);
      for (int v = 0; v < NV; ++v) acc[r][v] = V::fma(a, y[v], acc[r][v]);
    }
  }
  for (int r = 0; r < mr; ++r)
    for (int v = 0; v < NV; ++v) V::store(out + r * ldo + V::W * v, acc[r][v]);
}
#else
// The same tiles with GCC's generic 16-byte vectors (SSE2 / NEON; no reliance on the loop
// vectorizer, which vectorizes these nests across r with gathers), in passes of two vectors of
// columns so that the mr x 2 accumulators fit the 16 registers of the baseline ISA.
template <class T> struct Vec16 { typedef T R __attribute__((vector_size(16))); };
template <class T>
FD_SCAN_INLINE typename Vec16<T>::R load16(const T* p) {
  typename Vec16<T>::R v;
  std::memcpy(&v, p, 16);
  return v;
}

template <class T, int mr, int NB = 1>
FD_SCAN_INLINE void fma_tile(const T* A, int64_t lda, const T* Y, int64_t ldy, int64_t /*bs*/, int64_t nk, T* out,
                             int64_t ldo, const T* s) {
  static_assert(NB == 1, "the generic tiles are one block of 16 columns");
  using R = typename Vec16<T>::R;
  constexpr int L = 16 / sizeof(T);
  for (int c0 = 0; c0 < PW; c0 += 2 * L) {
    R acc[mr][2] = {};
    if (s)
      for (int r = 0; r < mr; ++r) {
        acc[r][0] = s[r] * load16(out + r * ldo + c0);
        acc[r][1] = s[r] * load16(out + r * ldo + c0 + L);
      }
    for (int64_t k = 0; k < nk; ++k) {
      const R y0 = load16(Y + k * ldy + c0), y1 = load16(Y + k * ldy + c0 + L);
      for (int r = 0; r < mr; ++r) {
        const T a = A[r * lda + k];
        acc[r][0] += a * y0;
        acc[r][1] += a * y1;
      }
    }
    for (int r = 0; r < mr; ++r) std::memcpy(out + r * ldo + c0, acc[r], 32);
  }
}
#endif

// 16-column blocks a register tile: two with 32 vector registers (AVX-512), else one.
constexpr int TILE_BLOCKS = FD_SCAN_AVX512 ? 2 : 1;

// f(std::integral_constant<int, mr>) for a run-time mr in [1, MR<T>] (the tail group of queries).
template <class T, class F>
FD_SCAN_INLINE void with_rows(int mr, F&& f) {
  switch (mr) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default:
      if constexpr (MR<T> == 6) {
        switch (mr) {
          case 4: f(std::integral_constant<int, 4>{}); break;
          case 5: f(std::integral_constant<int, 5>{}); break;
          default: f(std::integral_constant<int, 6>{}); break;
        }
      }
  }
}

// exp(x) for x <= 0, not NaN (softmax_rows handles a NaN row apart, so the float32 loop is
// the plain vectorized exp_nonpos with no per-element test).
FD_SCAN_INLINE float exp_le0(float x) { return exp_nonpos(x); }
FD_SCAN_INLINE double exp_le0(double x) { return std::exp(x); }

// ------------------------------------------------------------------------------ one tile
// Rows [r0, r0 + nt) of the data into the thread's tile: Yc (row-major, stride nP, zero padding
// columns and rows), the transposed panels Yt, and per row ysq = ||Yc||^2, hys = ysq / 2,
// cy = c . Yc (padding rows 0).  Updates P.ymax2.
template <class T>
FD_SCAN_INLINE void load_tile(const Job<T>& J, Partial<T>& P, int64_t r0, int64_t nt) {
  const int64_t n = J.n, nP = J.nP, ntp = round_up(nt, PW);
  const T* c = J.c;
  for (int64_t jj = 0; jj < ntp; ++jj) {
    T* y = P.Yc.get() + jj * nP;
    if (jj >= nt) {
      for (int64_t k = 0; k < nP; ++k) y[k] = T(0);
      P.ysq[jj] = P.hys[jj] = P.cy[jj] = T(0);
      continue;
    }
    if (J.data_u8) {
      const uint8_t* u = J.data_u8 + (r0 + jj) * n;
      for (int64_t k = 0; k < n; ++k) y[k] = (static_cast<T>(u[k]) * J.step + J.lo) - c[k];
    } else {
      const T* d = J.data + (r0 + jj) * n;
      for (int64_t k = 0; k < n; ++k) y[k] = d[k] - c[k];
    }
    for (int64_t k = n; k < nP; ++k) y[k] = T(0);
    T s = 0, cs = 0;
#pragma omp simd reduction(+ : s, cs)
    for (int64_t k = 0; k < n; ++k) {
      s += y[k] * y[k];
      cs += c[k] * y[k];
    }
    P.ysq[jj] = s;
    P.hys[jj] = T(0.5) * s;
    P.cy[jj] = cs;
    P.ymax2 = nan_max(P.ymax2, s);
    for (int64_t c = 0; c < J.ncol; ++c) P.Vt[c * NT + jj] = y[J.cols[c]];
  }
  // Yt[p][k][q] = Yc[16 p + q][k]: panel p, 16 rows, k-major (fma_tile's vector loads)
  for (int64_t p = 0; p < ntp / PW; ++p) {
    T* t = P.Yt.get() + p * PW * n;
    const T* y = P.Yc.get() + p * PW * nP;
    for (int64_t k = 0; k < n; ++k)
      for (int q = 0; q < PW; ++q) t[PW * k + q] = y[q * nP + k];
  }
}

// The epilogue of one H tile: rows [b, b + mr) (block start bq0) against panel rows
// [j0, j0 + 16) of the tile starting at data row r0 (valid rows: nt):
//   S = g1 H - g2 ysq into P.S (soft),  V = (H - ysq / 2) - h cy offered to the heaps (kc).
template <class T, int mr>
FD_SCAN_INLINE void epilogue(const Job<T>& J, Partial<T>& P, int64_t b, int64_t bq0, int64_t j0,
                             int64_t r0, int64_t nt, const T* H, int64_t ldh) {
  const T* ysq = P.ysq.get() + j0;
  const T *hys = P.hys.get() + j0, *cy = P.cy.get() + j0;
  for (int r = 0; r < mr; ++r) {
    const T* hr = H + ldh * r;
    if (J.soft) {
      const T g1 = J.g1[b + r], g2 = J.g2[b + r];
      T* s = P.S.get() + (b + r - bq0) * NT + j0;
      for (int q = 0; q < PW; ++q) s[q] = g1 * hr[q] - g2 * ysq[q];
    }
    if (J.kc) {
      const T h = J.h[b + r], thr = P.thr[b + r];
      T v[PW];
      int any = 0;
#pragma omp simd reduction(| : any)
      for (int q = 0; q < PW; ++q) {
        v[q] = (hr[q] - hys[q]) - h * cy[q];
        any |= !(v[q] <= thr);  // thr NaN while the heap fills: everything passes
      }
      if (any) {
        const int64_t qe = std::min<int64_t>(PW, nt - j0);
        for (int64_t q = 0; q < qe; ++q)
          if (!(v[q] <= P.thr[b + r])) P.offer(b + r, J.kc, v[q], r0 + j0 + q);
      }
    }
  }
}

// The online softmax of rows [bq0, bq1) over the tile (nt rows): m' = max(m, max_j S),
// l = l e^{m - m'} + sum_j e^{S - m'}, S <- e^{S - m'} (want_acc), P.sc = e^{m - m'}.
// A NaN logit makes m' NaN (then l, acc too): the max ignores nothing.
template <class T>
FD_SCAN_INLINE void softmax_rows(const Job<T>& J, Partial<T>& P, int64_t bq0, int64_t bq1, int64_t nt) {
  for (int64_t b = bq0; b < bq1; ++b) {
    T* s = P.S.get() + (b - bq0) * NT;
    T mx = -std::numeric_limits<T>::infinity();
    int bad = 0;
#pragma omp simd reduction(max : mx) reduction(| : bad)
    for (int64_t j = 0; j < nt; ++j) {
      mx = s[j] > mx ? s[j] : mx;
      bad |= s[j] != s[j];
    }
    const T mo = P.m[b];
    const T mn = bad || mo != mo ? std::numeric_limits<T>::quiet_NaN() : std::max(mo, mx);
    const T scale = mo == mn ? T(1) : mn != mn ? mn : exp_le0(mo - mn);  // exp(-inf) = 0 on the first tile
    T sum = 0;
    if (mn != mn) {  // a NaN logit (or an earlier one): the row is NaN
      sum = mn;
      if (J.want_acc)
        for (int64_t j = 0; j < nt; ++j) s[j] = mn;
    } else if (J.want_acc) {
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < nt; ++j) {
        const T e = exp_le0(s[j] - mn);
        s[j] = e;
        sum += e;
      }
    } else {
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < nt; ++j) sum += exp_le0(s[j] - mn);
    }
    P.l[b] = P.l[b] * scale + sum;
    P.m[b] = mn;
    P.sc[b - bq0] = scale;
  }
}

// One thread's pass over the data tiles [t0, t1) (tile t: rows [t NT, min(N, (t + 1) NT))),
// every query, into its Partial (initialised by the caller).
template <class T>
void scan_tiles(const Job<T>& J, Partial<T>& P, int64_t t0, int64_t t1) {
  constexpr int mrmax = MR<T>;
  const int64_t n = J.n, nP = J.nP;
  alignas(64) T H[mrmax * PW * TILE_BLOCKS];
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t r0 = t * NT, nt = std::min(J.N - r0, NT), npan = round_up(nt, PW) / PW;
    load_tile(J, P, r0, nt);
    if (!J.soft && !J.kc) continue;  // ymax2 only
    for (int64_t bq0 = 0; bq0 < J.B; bq0 += BQ<T>) {
      const int64_t bq1 = std::min(J.B, bq0 + BQ<T>);
      // H = xh Yc^T, panel by panel, fused with the epilogue (the xh rows of a group stay in L1)
      for (int64_t b = bq0; b < bq1; b += mrmax)
        with_rows<T>(static_cast<int>(std::min<int64_t>(mrmax, bq1 - b)), [&](auto mrc) {
          constexpr int mr = decltype(mrc)::value;
          int64_t p = 0;
          for (; p + TILE_BLOCKS <= npan; p += TILE_BLOCKS) {  // TILE_BLOCKS panels a tile
            fma_tile<T, mr, TILE_BLOCKS>(J.xh + b * n, n, P.Yt.get() + p * PW * n, PW, PW * n, n, H,
                                         PW * TILE_BLOCKS, nullptr);
            for (int c = 0; c < TILE_BLOCKS; ++c)
              epilogue<T, mr>(J, P, b, bq0, (p + c) * PW, r0, nt, H + c * PW, PW * TILE_BLOCKS);
          }
          for (; p < npan; ++p) {
            fma_tile<T, mr>(J.xh + b * n, n, P.Yt.get() + p * PW * n, PW, PW * n, n, H, PW, nullptr);
            epilogue<T, mr>(J, P, b, bq0, p * PW, r0, nt, H, PW);
          }
        });
      if (!J.soft) continue;
      softmax_rows(J, P, bq0, bq1, nt);
      if (!J.want_acc) continue;
      if (J.cols) {  // acc = sc acc + exp(S - m) Yc[:, cols]: a dot product a query and column
        for (int64_t b = bq0; b < bq1; ++b) {
          const T* s = P.S.get() + (b - bq0) * NT;
          const T sc = P.sc[b - bq0];
          for (int64_t c = 0; c < J.ncol; ++c) {
            const T* v = P.Vt.get() + c * NT;
            T sum = 0;
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < nt; ++j) sum += s[j] * v[j];
            T& a = P.acc[b * J.ncol + c];
            a = sc * a + sum;
          }
        }
        continue;
      }
      // acc = sc acc + exp(S - m) Yc, while the tile is still in cache
      for (int64_t b = bq0; b < bq1; b += mrmax)
        with_rows<T>(static_cast<int>(std::min<int64_t>(mrmax, bq1 - b)), [&](auto mrc) {
          constexpr int mr = decltype(mrc)::value;
          int64_t k0 = 0;
          for (; k0 + PW * TILE_BLOCKS <= nP; k0 += PW * TILE_BLOCKS)
            fma_tile<T, mr, TILE_BLOCKS>(P.S.get() + (b - bq0) * NT, NT, P.Yc.get() + k0, nP, PW, nt,
                                         P.acc.get() + b * nP + k0, nP, P.sc.get() + (b - bq0));
          for (; k0 < nP; k0 += PW)
            fma_tile<T, mr>(P.S.get() + (b - bq0) * NT, NT, P.Yc.get() + k0, nP, PW, nt,
                            P.acc.get() + b * nP + k0, nP, P.sc.get() + (b - bq0));
        });
    }
  }
}

}  // namespace FD_SCAN_NS
}  // namespace fastdiff
