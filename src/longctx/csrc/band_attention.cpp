// Fused band attention for CPU (longctx.attention.fused): one (query chunk, head) tile at a time, its
// scores stay in a per-thread buffer from Q K^T through mask and softmax to P V, and in backward from the
// recompute through dP and dS to the three gradient products. Nothing of size n x n, and no pass over
// memory between the products: the elementwise work runs on a tile the product just wrote (in cache).
//
// Layout (the geometry of longctx.attention.blocked.BandGeometry): query chunk i (c rows) attends to the
// padded keys i*c .. i*c + span - 1 (its band) and to G global keys. Which pairs are allowed comes from
// Python, already composed from the pattern's predicate (longctx.attention.patterns.compose):
//   local (Ml, c, span) uint8: the pattern on chunk i (Ml = nc) or on every chunk alike (Ml = 1);
//   kvalid (Bk, nk * c) uint8: the padded key is a real, non-global token (Bk = B or 1);
//   g_valid (B, G) uint8, g_pos (B, G), q_pos (nc * c): global keys, causal test for them;
//   slopes (H) or empty: ALiBi, score -= slope * |q_pos - k_pos|.
// Queries, keys and values come unpadded as (B, H, n, d) with unit stride along d and any other strides
// (the layer's projections: (B, n, H, d) memory), and the output and dQ, dK, dV are written in
// (B, n, H, d) memory: no copy on either side of the kernel. Padded key p is real key p - left, and no
// tile's products reach a padded key (they are never valid); a last, partial query chunk goes through a
// zero-padded thread buffer. The score scale is folded into the transposed keys (and into Q^T and dQ in
// backward), so q is not scaled in a separate pass. Thread buffers (the tile, a head's K^T, V^T and its
// dK^T, dV^T) are kept across calls, so a training step faults no fresh pages in for them.
// Per chunk, each query row's allowed band keys lie in [lo, hi) (RowSpan): exp, masks and products skip
// the rest. Products: fp32 on oneDNN's BRGEMM (ATen); bf16 on this file's own AVX512-BF16 micro-kernel
// (ukernel::, vdpbf16ps, fp32 accumulation and output) where the build targets it (__AVX512BF16__, as
// -march=native does on a CPU with avx512_bf16): its B operands VNNI-packed (pairs of rows interleaved),
// once per task for those reused across chunks (K^T, V^T by pairs of head dimensions, K, V by pairs of
// keys: PackedOps, in place of the transposed copies the other paths make) and by the tile for P and dS
// (rounded to bf16 and packed in one pass); A operands (Q, dO^T, Q^T, P, dS) read as they are. Without
// AVX512-BF16 bf16 runs on MKL's gemm_bf16bf16f32. LONGCTX_FUSED_GEMM=mkl (read per call) puts both dtypes
// on MKL (sgemm, gemm_bf16bf16f32); op bf16_products names the bf16 path. Softmax statistics are always fp32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <torch/library.h>

#include "vec.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <initializer_list>
#include <limits>
#include <string>
#include <utility>
#include <vector>

extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void cblas_gemm_bf16bf16f32(int layout, int ta, int tb, int m, int n, int k, float alpha, const uint16_t* a,
                            int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc);
}

namespace {

using namespace longctx_vec;
using bf16 = c10::BFloat16;

// Row-major C (m x n, ldc) = A (m x k, lda) B (k x n, ldb), + C if acc. Every product of the kernel has
// this form (keys and values also go in transposed, dK and dV accumulate transposed), so that fp32 runs
// on oneDNN's BRGEMM micro-kernel (ATen's cpublas::brgemm, JIT-compiled per shape and cached per thread;
// it uses AVX-512 on AMD too, where MKL takes its Zen AVX2 path: measured 10-25% faster on the tile
// shapes here), or on MKL's sgemm with LONGCTX_FUSED_GEMM=mkl. bf16 does not go through oneDNN: its bf16
// BRGEMM wants VNNI-packed operands, which this CPU's ukernel could not pack, and unpacked it was slower
// than MKL, whose gemm_bf16bf16f32 in turn ran no faster than fp32 here. So bf16 runs on the micro-kernel
// below, which packs B itself (ahead of time where B is reused: prod() with PackedOps).
inline void nn(bool brgemm, int m, int n, int k, const float* A, int lda, const float* B, int ldb, float* C,
               int ldc, bool acc) {
  if (brgemm) {
    at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, acc, A, B, C, false);
    return;
  }
  const float one = 1.f, beta = acc ? 1.f : 0.f;  // column-major BLAS on row-major data: C^T = B^T A^T
  sgemm_("N", "N", &n, &m, &k, &one, B, &ldb, A, &lda, &beta, C, &ldc);
}

// bf16 products on this file's own AVX512-BF16 micro-kernel (vdpbf16ps), where the compiler targets it
// (-march=native on a CPU with avx512_bf16): C (m x n, fp32) [+]= A (m x k, bf16, row-major, read as is)
// B (k x n, bf16) with B VNNI-packed: pair row p holds rows 2p and 2p + 1 interleaved, one uint32 per
// column (low half row 2p, high half row 2p + 1), Bp[p * ldp + j]. vdpbf16ps multiplies a broadcast pair
// of A (two consecutive bf16 of a row) with 16 such columns and adds both products to fp32 lanes (the
// products of bf16 values are exact in fp32; only the summation order differs from a plain loop).
// Register blocking: 8 rows x 48 columns (24 accumulators) for wide products, 8 x 32 for n <= 64 (the
// P V and dS K products); column tails through masks, an odd k through a last half pair (A's second
// element 0 and B's high halves cleared, so nothing past row k - 1 of B is used, not even a NaN there).
// Measured alone (one core, the tile shapes 64 x 576 x 64 and 64 x 64 x 576): 185-225 GFLOP/s, about
// the core's bf16 peak; MKL's gemm_bf16bf16f32 runs no faster than fp32 here.
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define LONGCTX_BF16_UKERNEL 1
namespace ukernel {

// (Written so that GCC keeps the accumulators in registers through the loop: with the C load inside an
// `acc ?` at the top and indexed A and B reads, it stored all 24 of them to the stack every pair.)
template <int MR, int NV>
void tile(int64_t kp, bool odd, const uint16_t* A, int64_t lda, const uint32_t* Bp, int64_t ldp, float* C,
          int64_t ldc, bool acc, __mmask16 ml) {
  __m512 c[MR][NV];
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) c[r][v] = _mm512_setzero_ps();
  }
  const int64_t full = odd ? kp - 1 : kp;
  const uint16_t* a = A;
  const uint32_t* b = Bp;
  for (int64_t p = 0; p < full; ++p, a += 2, b += ldp) {
    __m512i bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_si512(b + 16 * v);
    for (int r = 0; r < MR; ++r) {
      int32_t x;
      std::memcpy(&x, a + r * lda, sizeof(x));
      const __m512i va = _mm512_set1_epi32(x);
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_dpbf16_ps(c[r][v], (__m512bh)va, (__m512bh)bv[v]);
    }
  }
  if (odd) {  // the last row of A's pair is k - 1 alone: A's second element and B's high halves 0
    const __m512i lo = _mm512_set1_epi32(0xFFFF);
    __m512i bv[NV];
    for (int v = 0; v < NV; ++v) {
      bv[v] = _mm512_and_si512(_mm512_maskz_loadu_epi32(v == NV - 1 ? ml : __mmask16(0xFFFF), b + 16 * v), lo);
    }
    for (int r = 0; r < MR; ++r) {
      const __m512i va = _mm512_set1_epi32(a[r * lda]);
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_dpbf16_ps(c[r][v], (__m512bh)va, (__m512bh)bv[v]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) {
      float* dst = C + r * ldc + 16 * v;
      const __mmask16 m = v == NV - 1 ? ml : __mmask16(0xFFFF);
      __m512 x = c[r][v];
      if (acc) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, dst));
      _mm512_mask_storeu_ps(dst, m, x);
    }
  }
}

// A tile reads whole 16-column vectors of B (the columns past n are computed and never stored): every
// packed buffer has kSlack more entries, so the last pair row's reads stay inside it.
constexpr int64_t kSlack = 16;

using TileFn = void (*)(int64_t, bool, const uint16_t*, int64_t, const uint32_t*, int64_t, float*, int64_t, bool,
                        __mmask16);
constexpr int kMR = 8;

template <int NV, int... R>
constexpr std::array<TileFn, kMR> tiles_of(std::integer_sequence<int, R...>) {
  return {&tile<R + 1, NV>...};
}
// kTiles[nv - 1][mr - 1]
const std::array<TileFn, kMR> kTiles[3] = {tiles_of<1>(std::make_integer_sequence<int, kMR>{}),
                                           tiles_of<2>(std::make_integer_sequence<int, kMR>{}),
                                           tiles_of<3>(std::make_integer_sequence<int, kMR>{})};

// C (m x n, ldc) [+]= A (m x k, lda) Bp (packed k x n, ldp uint32 per pair row)
inline void gemm_packed(int64_t m, int64_t n, int64_t k, const bf16* A, int64_t lda, const uint32_t* Bp,
                        int64_t ldp, float* C, int64_t ldc, bool acc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    if (!acc) {
      for (int64_t r = 0; r < m; ++r) std::fill(C + r * ldc, C + r * ldc + n, 0.f);
    }
    return;
  }
  const auto* a = reinterpret_cast<const uint16_t*>(A);
  const int64_t kp = (k + 1) / 2, nr = n <= 64 ? 32 : 48;
  const bool odd = k & 1;
  for (int64_t j0 = 0; j0 < n; j0 += nr) {
    const int64_t w = std::min(nr, n - j0), nv = (w + 15) / 16;
    const __mmask16 ml = w % 16 ? static_cast<__mmask16>((1u << (w % 16)) - 1) : static_cast<__mmask16>(0xFFFF);
    for (int64_t i0 = 0; i0 < m; i0 += kMR) {
      const int64_t mr = std::min<int64_t>(kMR, m - i0);
      kTiles[nv - 1][mr - 1](kp, odd, a + i0 * lda, lda, Bp + j0, ldp, C + i0 * ldc + j0, ldc, acc, ml);
    }
  }
}

inline __m512i pair16(__m256i lo, __m256i hi) {  // 16 columns of two rows -> 16 pairs
  return _mm512_or_si512(_mm512_cvtepu16_epi32(lo), _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
}
inline __mmask16 tail_mask(int64_t w) { return static_cast<__mmask16>((1u << w) - 1); }

// Bp (pairs of rows, ldp) = B (k x n bf16, ldb) VNNI-packed; an odd k's last pair gets 0 in its high halves
inline void pack(int64_t k, int64_t n, const bf16* B, int64_t ldb, uint32_t* Bp, int64_t ldp) {
  const auto* b = reinterpret_cast<const uint16_t*>(B);
  for (int64_t p = 0; p < (k + 1) / 2; ++p) {
    const uint16_t *r0 = b + 2 * p * ldb, *r1 = r0 + ldb;
    const bool two = 2 * p + 1 < k;
    uint32_t* dst = Bp + p * ldp;
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
      const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + j));
      const __m256i x1 = two ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + j)) : _mm256_setzero_si256();
      _mm512_storeu_si512(dst + j, pair16(x0, x1));
    }
    if (j < n) {
      const __mmask16 ml = tail_mask(n - j);
      const __m256i x0 = _mm256_maskz_loadu_epi16(ml, r0 + j);
      const __m256i x1 = two ? _mm256_maskz_loadu_epi16(ml, r1 + j) : _mm256_setzero_si256();
      _mm512_mask_storeu_epi32(dst + j, ml, pair16(x0, x1));
    }
  }
}

// the same from fp32 rows (rounded to bf16, to nearest even): a tile's P or dS straight into B form
inline void pack(int64_t k, int64_t n, const float* B, int64_t ldb, uint32_t* Bp, int64_t ldp) {
  for (int64_t p = 0; p < (k + 1) / 2; ++p) {
    const float *r0 = B + 2 * p * ldb, *r1 = r0 + ldb;
    const bool two = 2 * p + 1 < k;
    uint32_t* dst = Bp + p * ldp;
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
      const __m256i x0 = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(r0 + j));
      const __m256i x1 = two ? (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(r1 + j)) : _mm256_setzero_si256();
      _mm512_storeu_si512(dst + j, pair16(x0, x1));
    }
    if (j < n) {
      const __mmask16 ml = tail_mask(n - j);
      const __m256i x0 = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(ml, r0 + j));
      const __m256i x1 = two ? (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(ml, r1 + j)) : _mm256_setzero_si256();
      _mm512_mask_storeu_epi32(dst + j, ml, pair16(x0, x1));
    }
  }
}

// one thread's buffer for B packed on the fly (a product whose B is not packed ahead)
inline uint32_t* scratch(int64_t n) {
  static thread_local std::vector<uint32_t> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

// the plain entry point: B (k x n, ldb) row-major, packed here into a thread buffer
inline void gemm(int64_t m, int64_t n, int64_t k, const bf16* A, int64_t lda, const bf16* B, int64_t ldb, float* C,
                 int64_t ldc, bool acc) {
  if (m <= 0 || n <= 0) return;
  uint32_t* Bp = scratch(((k + 1) / 2) * n + kSlack);
  pack(k, n, B, ldb, Bp, n);
  gemm_packed(m, n, k, A, lda, Bp, n, C, ldc, acc);
}

}  // namespace ukernel
#endif

// bf16: the micro-kernel below (B packed on the fly into a thread buffer) where the build has
// AVX512-BF16 and LONGCTX_FUSED_GEMM is not "mkl" (own), MKL's gemm_bf16bf16f32 otherwise.
inline void nn(bool own, int m, int n, int k, const bf16* A, int lda, const bf16* B, int ldb, float* C, int ldc,
               bool acc) {
#if defined(LONGCTX_BF16_UKERNEL)
  if (own) {
    ukernel::gemm(m, n, k, A, lda, B, ldb, C, ldc, acc);
    return;
  }
#endif
  constexpr int kRowMajor = 101, kNoTrans = 111;
  cblas_gemm_bf16bf16f32(kRowMajor, kNoTrans, kNoTrans, m, n, k, 1.f, reinterpret_cast<const uint16_t*>(A), lda,
                         reinterpret_cast<const uint16_t*>(B), ldb, acc ? 1.f : 0.f, C, ldc);
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp (arguments <= 0) for the bf16 kernel, whose P and dS are rounded to bf16 (relative error up to
// 2^-9) right after: 2^t with t = x log2(e) = n + f (n the nearest integer, |f| <= 1/2) and 2^f by a
// degree-4 polynomial fitted for relative error (2.6e-6 on [-1/2, 1/2]; t's own rounding adds at most
// 7.5e-6 where x is near -87, 1e-6 for x > -10): about 750 times below the rounding that follows, and 9
// vector operations (AVX-512, below) where exp_le0 takes 19. The softmax's sums, maxima and log-sum-exp
// stay fp32. t is clamped at -125.5 (x = -86.99, where exp_le0 clamps too): n >= -126 with f = 1/2 there,
// so every result is at least 2^-125.5, normal, and no denormal ever reaches an operation. Forward and
// backward both use it, so the probabilities the backward recomputes are the forward's.
template <typename F>
inline F exp_bf16(F x) {
  const F shift = bcast<F>(12582912.0f);
  F t = x * 1.44269504088896341f;
  t = t < bcast<F>(-125.5f) ? bcast<F>(-125.5f) : t;
  const F n = (t + shift) - shift;
  const F f = t - n;
  F p = bcast<F>(9.570104070007801e-3f);
  p = p * f + 5.591786280274391e-2f;
  p = p * f + 2.40247443318367e-1f;
  p = p * f + 6.931217908859253e-1f;
  p = p * f + 9.999992847442627e-1f;
  return p * pow2i(n);
}

#if defined(__AVX512F__)
// the same for 16 lanes with AVX-512's rounding (vrndscaleps, to nearest even as above) and scaling by 2^n
// (vscalefps, exact as the integer build of 2^n above): the same values in 9 operations
inline vf exp_bf16(vf x) {
  const __m512 t = _mm512_max_ps(_mm512_mul_ps((__m512)x, _mm512_set1_ps(1.44269504088896341f)),
                                 _mm512_set1_ps(-125.5f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(9.570104070007801e-3f), f, _mm512_set1_ps(5.591786280274391e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.40247443318367e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931217908859253e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.999992847442627e-1f));
  return (vf)_mm512_scalef_ps(p, n);
}
#endif

// the softmax's exp for a kernel on T: exp_le0 (about 1 ulp) for fp32, exp_bf16 for bf16
template <typename T, typename F>
inline F exp_of(F x) {
  if constexpr (std::is_same_v<T, float>) {
    return exp_le0(x);
  } else {
    return exp_bf16(x);
  }
}


// max of s[lo, hi) (-inf when empty)
inline float row_max(const float* s, int64_t lo, int64_t hi, float m) {
  vf vm = bcast<vf>(m);
  int64_t j = lo;
  for (; j + kW <= hi; j += kW) {
    const vf x = vload(s + j);
    vm = x > vm ? x : vm;
  }
  for (int e = 0; e < kW; ++e) m = vm[e] > m ? vm[e] : m;
  for (; j < hi; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

// out[j] = exp(s[j] - m) over [lo, hi) as T (out = s for fp32: in place), 0 where s[j] is -inf (a masked
// pair) if kMasked; returns the sum of the fp32 values (before any rounding to T).
template <bool kMasked, typename T>
inline float row_exp(const float* s, T* out, int64_t lo, int64_t hi, float m) {
  const vf vm = bcast<vf>(m), ninf = bcast<vf>(kNegInf), zero = bcast<vf>(0.f);
  vf vs = zero;
  int64_t j = lo;
  for (; j + kW <= hi; j += kW) {
    const vf x = vload(s + j);
    vf e = exp_of<T>(x - vm);
    if (kMasked) e = x == ninf ? zero : e;
    vstore_as(out + j, e);
    vs += e;
  }
  float sum = 0.f;
  for (int e = 0; e < kW; ++e) sum += vs[e];
  for (; j < hi; ++j) {
    const float e = kMasked && s[j] == kNegInf ? 0.f : exp_of<T>(s[j] - m);
    out[j] = static_cast<T>(e);
    sum += e;
  }
  return sum;
}

// backward over [lo, hi): P = exp(s[j] - lse) (0 where masked if kMasked) and dS = P (dp[j] - D), with the
// exp of the forward on T, stored as O into po, dso (for fp32 in place: po = s, dso = dp); keep: dS also
// in fp32 into dp (where the stores are bf16 and ALiBi's slope gradient needs it)
template <bool kMasked, typename T, typename O>
inline void row_ds(const float* s, float* dp, O* po, O* dso, int64_t lo, int64_t hi, float lse, float D, bool keep) {
  const vf vl = bcast<vf>(lse), vD = bcast<vf>(D), ninf = bcast<vf>(kNegInf), zero = bcast<vf>(0.f);
  int64_t j = lo;
  for (; j + kW <= hi; j += kW) {
    const vf x = vload(s + j);
    vf p = exp_of<T>(x - vl);
    if (kMasked) p = x == ninf ? zero : p;
    const vf ds = p * (vload(dp + j) - vD);
    vstore_as(po + j, p), vstore_as(dso + j, ds);
    if (keep) vstore(dp + j, ds);
  }
  for (; j < hi; ++j) {
    const float p = kMasked && s[j] == kNegInf ? 0.f : exp_of<T>(s[j] - lse);
    const float ds = p * (dp[j] - D);
    po[j] = static_cast<O>(p), dso[j] = static_cast<O>(ds);
    if (keep) dp[j] = ds;
  }
}

template <typename T>
inline void zero_cols(T* s, int64_t lo, int64_t hi) {
  if (hi > lo) std::memset(static_cast<void*>(s + lo), 0, (hi - lo) * sizeof(T));  // +0 in fp32 and bf16
}

// Phase timers for profiling (LONGCTX_FUSED_PROFILE=1): each thread adds the CPU time since its previous lap
// to the phase named; read and reset through the op band_profile. Off, a lap is one branch.
enum Phase { kRows, kQK, kMask, kSoftmax, kPV, kDP, kDS, kDVDK, kDQ, kCopy, kNumPhases };
const bool kProfiling = std::getenv("LONGCTX_FUSED_PROFILE") != nullptr;
std::atomic<int64_t> phase_ns[kNumPhases];

// The laps read the thread's CPU time (CLOCK_THREAD_CPUTIME_ID), not the wall clock: on a shared machine a
// thread that is switched out does not charge the phase it was in.
inline int64_t thread_ns() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

struct Lap {
  int64_t t0 = kProfiling ? thread_ns() : 0;
  void operator()(Phase p) {
    if (!kProfiling) return;
    const int64_t t = thread_ns();
    phase_ns[p].fetch_add(t - t0, std::memory_order_relaxed);
    t0 = t;
  }
};

// The allowed band keys of one query row: columns [lo, hi) of its band hold every allowed key (lo = hi:
// none), and dense says every column in between is allowed too, so the row needs no per-pair mask.
// Sliding windows, blocks and causal blocks with end padding are dense; random padding or a permuted,
// dilated chunk may not be.
struct RowSpan {
  int32_t lo, hi;
  bool dense;
};
struct TileSpan {
  int32_t lo, hi;  // union of the rows' [lo, hi): the band columns the tile's products cover
};

struct Geo {
  int64_t B, H, nc, c, nk, span, G, d, L, Ml, Bk, nq, nkeys, left;
  float scale;  // applied to the scores: S = scale Q K^T (folded into K^T, and into Q^T, dQ in backward)
  bool causal, brgemm;
  const uint8_t *local, *kvalid, *g_valid;
  const int32_t *q_pos, *k_pos, *g_pos;
  const float* slopes;  // nullptr: no ALiBi
  std::vector<RowSpan> rows;    // (Bk, nc, c)
  std::vector<TileSpan> tiles;  // (Bk, nc)

  Geo(const at::Tensor& q, const at::Tensor& k, const at::Tensor& kg, const at::Tensor& local_,
      const at::Tensor& kvalid_, const at::Tensor& q_pos_, const at::Tensor& k_pos_, const at::Tensor& g_pos_,
      const at::Tensor& g_valid_, const at::Tensor& slopes_, int64_t B_, int64_t H_, bool causal_,
      int64_t left_, double scale_) {
    B = B_, H = H_, causal = causal_, left = left_, scale = static_cast<float>(scale_);
    const char* blas = std::getenv("LONGCTX_FUSED_GEMM");
    brgemm = !(blas && std::string(blas) == "mkl");
    d = q.size(3), nq = q.size(2);
    c = local_.size(1), span = local_.size(2), Ml = local_.size(0);
    nc = q_pos_.size(0) / c, nk = kvalid_.size(1) / c, nkeys = k.size(2);
    G = kg.numel() ? kg.size(2) : 0;
    L = span + G;
    Bk = kvalid_.size(0);
    local = local_.data_ptr<uint8_t>(), kvalid = kvalid_.data_ptr<uint8_t>();
    q_pos = q_pos_.data_ptr<int32_t>(), k_pos = k_pos_.data_ptr<int32_t>();
    g_pos = G ? g_pos_.data_ptr<int32_t>() : nullptr;
    g_valid = G ? g_valid_.data_ptr<uint8_t>() : nullptr;
    slopes = slopes_.numel() ? slopes_.data_ptr<float>() : nullptr;
    find_spans();
    for (int64_t t = 0; t < Bk * nc; ++t) {  // the promise the unpadded key layout rests on
      const int64_t first = (t % nc) * c + tiles[t].lo - left, last = (t % nc) * c + tiles[t].hi - left;
      TORCH_CHECK(tiles[t].hi == tiles[t].lo || (first >= 0 && last <= nkeys),
                  "longctx fused attention: a padded key is marked valid");
    }
  }

  // first key row (unpadded) of chunk i's band columns [ts.lo, ts.hi) (0 for an empty band)
  int64_t band_row(int64_t i, TileSpan ts) const { return ts.hi > ts.lo ? i * c + ts.lo - left : 0; }

  const uint8_t* local_of(int64_t i) const { return local + (Ml > 1 ? i : 0) * c * span; }
  const uint8_t* kvalid_of(int64_t b, int64_t i) const { return kvalid + (Bk > 1 ? b : 0) * nk * c + i * c; }
  const RowSpan* rows_of(int64_t b, int64_t i) const { return rows.data() + ((Bk > 1 ? b : 0) * nc + i) * c; }
  TileSpan tile_of(int64_t b, int64_t i) const { return tiles[(Bk > 1 ? b : 0) * nc + i]; }

  // One pass over the (uint8) masks per chunk, shared by all heads: the tiles then skip the masked
  // corners of the band (no products, no exp there) and apply no per-pair mask to dense rows.
  void find_spans() {
    Lap lap;
    rows.resize(Bk * nc * c), tiles.resize(Bk * nc);
    at::parallel_for(0, Bk * nc, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / nc, i = t % nc;
        const uint8_t *loc = local_of(i), *kv = kvalid_of(b, i);
        TileSpan ts{static_cast<int32_t>(span), 0};
        for (int64_t r = 0; r < c; ++r) {
          // the first and last allowed key, and whether all between are (a vectorised count: the masks
          // are 0/1 bytes); about 5x faster than one loop tracking all three
          const uint8_t* lr = loc + r * span;
          int64_t lo = 0, hi = span, count = 0;
          while (lo < span && !(lr[lo] & kv[lo])) ++lo;
          while (hi > lo && !(lr[hi - 1] & kv[hi - 1])) --hi;
          if (hi == lo) lo = hi = 0;
#pragma omp simd reduction(+ : count)
          for (int64_t j = lo; j < hi; ++j) count += lr[j] & kv[j];
          rows[t * c + r] = {static_cast<int32_t>(lo), static_cast<int32_t>(hi), count == hi - lo};
          if (hi > lo) ts = {std::min<int32_t>(ts.lo, lo), std::max<int32_t>(ts.hi, hi)};
        }
        tiles[t] = ts.hi > ts.lo ? ts : TileSpan{0, 0};
      }
    });
    lap(kRows);
  }

  // Row r of chunk i's scores s (L): the band part masked and ALiBi-biased over the row's [lo, hi) only
  // (the rest is never read); masked pairs become -inf (overwritten, so a NaN in a key a query may not
  // attend never reaches it), ALiBi subtracted from the allowed ones.
  void mask_row(float* s, int64_t b, int64_t h, int64_t i, int64_t r, const RowSpan& rs) const {
    const int32_t* kp = k_pos + i * c;
    const int32_t qp = q_pos[i * c + r];
    const float slope = slopes ? slopes[h] : 0.f;
    if (!rs.dense) {
      const uint8_t *lr = local_of(i) + r * span, *kv = kvalid_of(b, i);
#pragma omp simd
      for (int64_t j = rs.lo; j < rs.hi; ++j) {
        const float bias = slope * static_cast<float>(std::abs(qp - kp[j]));
        s[j] = (lr[j] & kv[j]) ? s[j] - bias : kNegInf;
      }
    } else if (slopes) {
#pragma omp simd
      for (int64_t j = rs.lo; j < rs.hi; ++j) s[j] -= slope * static_cast<float>(std::abs(qp - kp[j]));
    }
    for (int64_t t = 0; t < G; ++t) {
      const int32_t gp = g_pos[b * G + t];
      const bool ok = g_valid[b * G + t] && (!causal || gp <= qp);
      s[span + t] = ok ? s[span + t] - slope * static_cast<float>(std::abs(qp - gp)) : kNegInf;
    }
  }
};

// dst[0, n) = s src[0, n) as T (bf16: rounded to nearest even)
template <typename T>
inline void scale_to(const float* src, float s, T* dst, int64_t n) {
  int64_t j = 0;
  const vf vs = bcast<vf>(s);
  for (; j + kW <= n; j += kW) vstore_as(dst + j, vload(src + j) * vs);
  for (; j < n; ++j) dst[j] = static_cast<T>(src[j] * s);
}

// A (B, H, rows, d) tensor with unit stride along d and any other strides. The layer's projections are
// (B, n, H, d) memory seen as (B, H, n, d): the kernel reads them, and writes its output and gradients,
// in that layout, so no copy is made on either side of it.
// With grouped-query attention (keys and values of H / group heads), query head h reads key head h / group.
template <typename T>
struct Seq {
  T* p;
  int64_t sb, sh, ld, H, group;
  Seq(const at::Tensor& t, int64_t H_, int64_t group_ = 1)
      : p(t.numel() ? t.data_ptr<T>() : nullptr), sb(t.stride(0)), sh(t.stride(1)), ld(t.stride(2)), H(H_),
        group(group_) {}
  T* head(int64_t bh) const { return p + (bh / H) * sb + (bh % H) / group * sh; }
};

// A B operand VNNI-packed for the bf16 micro-kernel (see PackBufs); null where there is none
struct Pk {
  const uint32_t *even = nullptr, *odd = nullptr;
  int64_t ld = 0;
  // pairs of rows: the pair row that starts at row `row` (K, V)
  const uint32_t* at_row(int64_t row) const {
    return !even ? nullptr : row % 2 ? odd + (row + 1) / 2 * ld : even + row / 2 * ld;
  }
  // pairs of dimensions: column `col` (K^T, V^T)
  const uint32_t* at_col(int64_t col) const { return even ? even + col : nullptr; }
};
struct PackedOps {
  Pk KT, VT, K, V, KgT, VgT, Kg, Vg;
};
// C = A B where B is Bp packed (the micro-kernel) when given, else B (ld ldb) on nn
template <typename T>
inline void prod(bool own, int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb,
                 const uint32_t* Bp, int64_t ldp, float* C, int64_t ldc, bool acc) {
#if defined(LONGCTX_BF16_UKERNEL)
  if constexpr (std::is_same_v<T, bf16>) {
    if (Bp) {
      ukernel::gemm_packed(m, n, k, A, lda, Bp, ldp, C, ldc, acc);
      return;
    }
  }
#endif
  nn(own, m, n, k, A, lda, B, ldb, C, ldc, acc);
}

#if defined(LONGCTX_BF16_UKERNEL)
// A tile's products on the micro-kernel, 8 rows at a time over only the key columns those rows attend
// (the union of their [lo, hi), relative to the tile's first band column ts.lo; {0, 0} where none): the
// band's masked corners (a 64-row tile of a 256 window computes 576 columns, a row attends 513) are
// skipped. The score products write no other columns (the softmax reads only each row's [lo, hi) and
// zeroes the rest of the tile's columns in P and dS); the P V and dS K products take no other terms (P
// and dS are 0 there), starting at an even column so that the packed keys keep their pairs.
inline std::pair<int64_t, int64_t> rows_range(const RowSpan* rows, int64_t r0, int64_t r1, TileSpan ts) {
  int64_t lo = std::numeric_limits<int64_t>::max(), hi = 0;
  for (int64_t r = r0; r < r1; ++r) {
    if (rows[r].hi > rows[r].lo) lo = std::min<int64_t>(lo, rows[r].lo), hi = std::max<int64_t>(hi, rows[r].hi);
  }
  return hi > 0 ? std::pair<int64_t, int64_t>{lo - ts.lo, hi - ts.lo} : std::pair<int64_t, int64_t>{0, 0};
}

// C (m x band columns, ldc) = A (m x k) Bp (k x band columns, ldp), each 8-row group over its own columns
inline void band_cols(int64_t m, int64_t k, const bf16* A, int64_t lda, const uint32_t* Bp, int64_t ldp, float* C,
                      int64_t ldc, const RowSpan* rows, TileSpan ts) {
  for (int64_t i0 = 0; i0 < m; i0 += ukernel::kMR) {
    const int64_t mr = std::min<int64_t>(ukernel::kMR, m - i0);
    const auto [lo, hi] = rows_range(rows, i0, i0 + mr, ts);
    if (hi > lo) ukernel::gemm_packed(mr, hi - lo, k, A + i0 * lda, lda, Bp + lo, ldp, C + i0 * ldc + lo, ldc, false);
  }
}

// C (m x n, ldc) = A (m x band columns) B (band rows from brow, packed by pairs of rows), each 8-row group
// over its own columns of A (rows of B) only
inline void band_depth(int64_t m, int64_t n, const bf16* A, int64_t lda, const Pk& B, int64_t brow, float* C,
                       int64_t ldc, const RowSpan* rows, TileSpan ts) {
  for (int64_t i0 = 0; i0 < m; i0 += ukernel::kMR) {
    const int64_t mr = std::min<int64_t>(ukernel::kMR, m - i0);
    auto [lo, hi] = rows_range(rows, i0, i0 + mr, ts);
    lo -= lo % 2;
    ukernel::gemm_packed(mr, n, hi - lo, A + i0 * lda + lo, lda, B.at_row(brow + lo), B.ld, C + i0 * ldc, ldc, false);
  }
}


// The query rows [a, z) of a tile (c rows) that attend some key column in [c0, c1) ({0, 0}: none)
inline std::pair<int64_t, int64_t> rows_of_cols(const RowSpan* rows, int64_t c, int64_t c0, int64_t c1) {
  const auto hits = [&](int64_t r) { return rows[r].hi > rows[r].lo && rows[r].hi > c0 && rows[r].lo < c1; };
  int64_t a = 0, z = c;
  while (a < c && !hits(a)) ++a;
  if (a == c) return {0, 0};
  while (!hits(z - 1)) --z;
  return {a, z};
}

// C (m x band columns, ldc) += A (m x c) Bp (c x band columns, packed pairs of rows, ldp), where B's rows
// are the tile's query rows (P or dS: the dV^T and dK^T products): each panel of columns over only the
// rows that attend one of its columns (the others are 0 there), so the band's masked corners are skipped
// (a 64-row tile of a 256 window has 576 columns and 513 keys a row). Panels are 16 columns, merged up to
// the micro-kernel's widest (48) while their rows agree.
inline void band_rows(int64_t m, const bf16* A, int64_t lda, const uint32_t* Bp, int64_t ldp, float* C,
                      int64_t ldc, const RowSpan* rows, int64_t c, TileSpan ts) {
  const auto* a16 = reinterpret_cast<const uint16_t*>(A);
  const int64_t nb = ts.hi - ts.lo;
  for (int64_t j = 0; j < nb;) {
    const auto range = rows_of_cols(rows, c, ts.lo + j, ts.lo + std::min(j + 16, nb));
    int64_t w = std::min<int64_t>(16, nb - j);
    while (w < 48 && j + w < nb && rows_of_cols(rows, c, ts.lo + j + w, ts.lo + std::min(j + w + 16, nb)) == range) {
      w += std::min<int64_t>(16, nb - j - w);
    }
    const int64_t r0 = range.first - range.first % 2, k = range.second - r0;
    if (k > 0) {
      const int64_t nv = (w + 15) / 16;
      const __mmask16 ml = w % 16 ? ukernel::tail_mask(w % 16) : __mmask16(0xFFFF);
      for (int64_t i0 = 0; i0 < m; i0 += ukernel::kMR) {
        const int64_t mr = std::min<int64_t>(ukernel::kMR, m - i0);
        ukernel::kTiles[nv - 1][mr - 1]((k + 1) / 2, k & 1, a16 + i0 * lda + r0, lda, Bp + r0 / 2 * ldp + j, ldp,
                                        C + i0 * ldc + j, ldc, true, ml);
      }
    }
    j += w;
  }
}

#endif

// the band product of a tile on band_cols / band_depth where B is packed (bf16 on the micro-kernel); false
// (nothing done) otherwise
template <typename T>
inline bool packed_cols(int64_t m, int64_t k, const T* A, int64_t lda, const Pk& B, int64_t col, float* C,
                        int64_t ldc, const RowSpan* rows, TileSpan ts) {
#if defined(LONGCTX_BF16_UKERNEL)
  if constexpr (std::is_same_v<T, bf16>) {
    if (B.even) {
      band_cols(m, k, A, lda, B.at_col(col), B.ld, C, ldc, rows, ts);
      return true;
    }
  }
#endif
  return false;
}
template <typename T>
inline bool packed_depth(int64_t m, int64_t n, const T* A, int64_t lda, const Pk& B, int64_t brow, float* C,
                         int64_t ldc, const RowSpan* rows, TileSpan ts) {
#if defined(LONGCTX_BF16_UKERNEL)
  if constexpr (std::is_same_v<T, bf16>) {
    if (B.even) {
      band_depth(m, n, A, lda, B, brow, C, ldc, rows, ts);
      return true;
    }
  }
#endif
  return false;
}

// the dV^T / dK^T band product of a tile on band_rows where its B is packed (Bp: bf16 on the micro-kernel);
// false (nothing done) otherwise
template <typename T>
inline bool rows_packed(int64_t m, const T* A, int64_t lda, const uint32_t* Bp, int64_t col, int64_t ldp, float* C,
                        int64_t ldc, const RowSpan* rows, int64_t c, TileSpan ts) {
#if defined(LONGCTX_BF16_UKERNEL)
  if constexpr (std::is_same_v<T, bf16>) {
    if (Bp) {
      band_rows(m, A, lda, Bp + col, ldp, C, ldc, rows, c, ts);
      return true;
    }
  }
#endif
  return false;
}

// The operands of one head: its key and value rows (ld lk, lv); scale K^T and V^T of the key rows
// [row0, row0 + ldt) in a thread buffer (d x ldt); the global keys (G x d) and scale Kg^T, Vg^T (d x G).
template <typename T>
struct Head {
  const T *K, *V;
  int64_t lk, lv;
  const T *KT, *VT;
  int64_t row0, ldt;
  const T *Kg, *Vg, *KgT, *VgT;
  PackedOps pk;  // the same packed for the micro-kernel (bf16), or empty
  const T* kt(int64_t r) const { return KT ? KT + (r - row0) : nullptr; }
  const T* vt(int64_t r) const { return VT ? VT + (r - row0) : nullptr; }
};

#if defined(__AVX512F__)
// 16 x 16 fp32 transpose in registers: r[i] holds row i, then column i
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0x88);
      t[8 * i + j + 4] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
  }
}
#endif

#if defined(LONGCTX_BF16_UKERNEL)
inline __m512 load_bf16x16(const bf16* p) {  // 16 bf16 widened to fp32 (exact)
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
}
#endif

#if defined(__AVX512F__)
// 16 values of T as fp32 lanes (back through vstore_as; in registers where T is fp32 or, with AVX512-BF16, bf16)
template <typename T>
constexpr bool kVec16 = std::is_same_v<T, float>
#if defined(LONGCTX_BF16_UKERNEL)
                        || std::is_same_v<T, bf16>
#endif
    ;
template <typename T>
inline __m512 load16(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(p);
  } else {
    return load_bf16x16(p);
  }
}
#endif

// dst (cols x rows, ld ldd) = alpha * src (rows x cols, ld lds)^T (+ dst if acc), in 16 x 16 blocks (in
// registers with AVX-512: the plain loop took a sixth of the kernel's time at 16,384 tokens); fp32 in
// between, so a bf16 side is widened exactly and rounded once, to nearest even
template <typename TS, typename TD = TS>
void transpose(const TS* src, int64_t lds, int64_t rows, int64_t cols, float alpha, TD* dst, int64_t ldd,
               bool acc = false) {
  constexpr int64_t kB = 16;
  for (int64_t a = 0; a < rows; a += kB) {
    for (int64_t e0 = 0; e0 < cols; e0 += kB) {
      const int64_t nr = std::min(kB, rows - a), ne = std::min(kB, cols - e0);
      const TS* sp = src + a * lds + e0;
      TD* dp = dst + e0 * ldd + a;
#if defined(__AVX512F__)
      if constexpr (kVec16<TS> && kVec16<TD>) {
        if (nr == kB && ne == kB) {
          __m512 r[16];
          const __m512 va = _mm512_set1_ps(alpha);
          for (int i = 0; i < 16; ++i) r[i] = _mm512_mul_ps(load16(sp + i * lds), va);
          transpose16(r);
          for (int i = 0; i < 16; ++i) {
            vstore_as(dp + i * ldd, (vf)(acc ? _mm512_add_ps(load16(dp + i * ldd), r[i]) : r[i]));
          }
          continue;
        }
      }
#endif
      for (int64_t e = 0; e < ne; ++e) {
        for (int64_t r = 0; r < nr; ++r) {
          const float x = alpha * static_cast<float>(sp[r * lds + e]);
          dp[e * ldd + r] = static_cast<TD>(acc ? static_cast<float>(dp[e * ldd + r]) + x : x);
        }
      }
    }
  }
}

// rows of a partial last chunk copied into a zero-padded c x d buffer (ld d)
template <typename T>
const T* padded(const T* src, int64_t lds, int64_t nr, int64_t c, int64_t d, T* buf) {
  for (int64_t r = 0; r < c; ++r) {
    for (int64_t e = 0; e < d; ++e) buf[r * d + e] = r < nr ? src[r * lds + e] : static_cast<T>(0.f);
  }
  return buf;
}

// scores of chunk i: S (c x L) = scale Q_i [K_band | K_g]^T over the tile's band columns [ts.lo, ts.hi)
// (key row r0 = g.band_row(i, ts) onwards) and the global ones, then masked row by row
template <typename T>
void scores(const Geo& g, float* S, const T* Qi, int64_t ldq, const Head<T>& hd, int64_t b, int64_t h, int64_t i,
            Lap& lap) {
  const int c = g.c, d = g.d, L = g.L;
  const TileSpan ts = g.tile_of(b, i);
  const int64_t r0 = g.band_row(i, ts);
  if (ts.hi > ts.lo && !packed_cols(c, d, Qi, ldq, hd.pk.KT, r0 - hd.row0, S + ts.lo, L, g.rows_of(b, i), ts)) {
    prod(g.brgemm, c, ts.hi - ts.lo, d, Qi, ldq, hd.kt(r0), hd.ldt, hd.pk.KT.at_col(r0 - hd.row0), hd.pk.KT.ld,
         S + ts.lo, L, false);
  }
  if (g.G) prod(g.brgemm, c, g.G, d, Qi, ldq, hd.KgT, g.G, hd.pk.KgT.at_col(0), hd.pk.KgT.ld, S + g.span, L, false);
  lap(kQK);
  const RowSpan* rows = g.rows_of(b, i);
  for (int64_t r = 0; r < c; ++r) g.mask_row(S + r * L, b, h, i, r, rows[r]);
  lap(kMask);
}

// columns of the tile's band outside the row's own [lo, hi): zero in P and dS
template <typename T>
inline void zero_outside(T* s, TileSpan ts, const RowSpan& rs) {
  if (rs.hi > rs.lo) {
    zero_cols(s, ts.lo, rs.lo), zero_cols(s, rs.hi, ts.hi);
  } else {
    zero_cols(s, ts.lo, ts.hi);
  }
}

// Softmax of the scores S, unnormalised, into P (T; P = S for fp32: in place; bf16: rounded once, so the
// P V product's operand needs no pass of its own): P = exp(S - rowmax) over the band columns [ts.lo,
// ts.hi) and the global ones; inv = 1 / row sum (0 for a row with no allowed key, whose log-sum-exp is
// +inf). Normalising the c x d output instead of the c x L probabilities saves a pass over the tile.
template <typename T>
inline void softmax_rows(const Geo& g, const float* S, T* P, const RowSpan* rows, TileSpan ts, float* lse,
                         float* inv) {
  const int64_t span = g.span, L = g.L;
  for (int64_t r = 0; r < g.c; ++r) {
    const float* s = S + r * L;
    T* p = P + r * L;
    const RowSpan rs = rows[r];
    const float m = row_max(s, span, L, row_max(s, rs.lo, rs.hi, kNegInf));
    if (m == kNegInf) {
      zero_cols(p, ts.lo, ts.hi), zero_cols(p, span, L);
      lse[r] = std::numeric_limits<float>::infinity(), inv[r] = 0.f;
      continue;
    }
    float sum = rs.dense ? row_exp<false>(s, p, rs.lo, rs.hi, m) : row_exp<true>(s, p, rs.lo, rs.hi, m);
    sum += row_exp<true>(s, p, span, L, m);
    zero_outside(p, ts, rs);
    lse[r] = m + std::log(sum), inv[r] = 1.f / sum;
  }
}

// Leading dimension of a (d x keys) transposed buffer: a multiple of 16 floats that is an odd multiple of
// 64 bytes, so that its d rows fall in different L1 sets; with a stride of a multiple of 128 bytes (e.g.
// 4,352 keys) a 32-row tile's products ran at 78% of the rate they reach with rows spread (measured).
inline int64_t spread_ld(int64_t keys) {
  const int64_t ld = (keys + 15) / 16 * 16;
  return ld % 32 ? ld : ld + 16;
}

template <typename T>
void grow(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
}

// B operands packed ahead for the bf16 micro-kernel: a task packs each head's reused operands once, in the
// layout vdpbf16ps reads (ukernel:: above), where it used to transpose them:
//   KT, VT (and KgT, VgT): K^T (times scale) and V^T, pairs of head dimensions: a 32-bit transpose of the
//     rows, pair row p = dimensions 2p, 2p + 1, one column per key (the Q K^T and dO V^T products);
//   K, V (and Kg, Vg): the rows as they are, pairs of keys (the P V and dS K products). A product starts at
//     any key row, so these come twice where a tile may start at an odd row: even (pair p = rows 2p, 2p + 1
//     of the task) and odd (rows 2p - 1, 2p; row -1 is zero).
// P and dS, which the dV^T and dK^T products take as B, are packed by the tile from its fp32 rows (the
// rounding to bf16 and the packing in one pass). Empty (all null) for fp32, for MKL's products, and in a
// build without AVX512-BF16: every product then takes the unpacked operands. A thread's storage for them:
struct PackBufs {
  std::vector<uint32_t> KT, VT, K0, K1, V0, V1, KgT, VgT, Kg, Vg, P, dS;
};

#if defined(LONGCTX_BF16_UKERNEL)
inline uint16_t bf16_bits(float x) { return c10::BFloat16(x).x; }

// Bp[p * ldp + j] = (s X[j][2p], s X[j][2p + 1]) for rows j < R of X (R x n, ldx): X^T packed, scaled
inline void pack_t(int64_t R, int64_t n, const bf16* X, int64_t ldx, float s, uint32_t* Bp, int64_t ldp) {
  const auto* x = reinterpret_cast<const uint16_t*>(X);
  const int64_t np = (n + 1) / 2;
  const auto scalar = [&](int64_t j0, int64_t j1, int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t j = j0; j < j1; ++j) {
        const uint16_t* r = x + j * ldx + 2 * p;
        const uint16_t lo = s == 1.f ? r[0] : bf16_bits(s * static_cast<float>(X[j * ldx + 2 * p]));
        const uint16_t hi = 2 * p + 1 >= n ? 0 : s == 1.f ? r[1] : bf16_bits(s * static_cast<float>(X[j * ldx + 2 * p + 1]));
        Bp[p * ldp + j] = static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16;
      }
    }
  };
  const int64_t pv = n % 2 ? 0 : np / 16 * 16;  // pairs done 16 at a time (an odd n: all scalar)
  const __m512 vs = _mm512_set1_ps(s);
  int64_t j0 = 0;
  for (; j0 + 16 <= R; j0 += 16) {
    for (int64_t p0 = 0; p0 < pv; p0 += 16) {
      __m512 r[16];
      for (int i = 0; i < 16; ++i) {
        __m512i v = _mm512_loadu_si512(x + (j0 + i) * ldx + 2 * p0);  // 32 bf16: 16 pairs
        if (s != 1.f) {
          const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)), 16));
          const __m512 hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)), 16));
          v = (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, vs), _mm512_mul_ps(lo, vs));
        }
        r[i] = _mm512_castsi512_ps(v);
      }
      transpose16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_ps(reinterpret_cast<float*>(Bp + (p0 + i) * ldp + j0), r[i]);
    }
    scalar(j0, j0 + 16, pv, np);
  }
  scalar(j0, R, 0, np);
}

// Bp = rows [-shift, R) of X (R x n, ldx) in pairs of rows (shift 0: pair p = rows 2p, 2p + 1; shift 1:
// rows 2p - 1, 2p, row -1 zero); a missing last row is zero
inline void pack_rows(int64_t R, int64_t n, const bf16* X, int64_t ldx, int shift, uint32_t* Bp, int64_t ldp) {
  if (shift) {
    ukernel::pack(1, n, X, ldx, Bp, ldp);  // pair 0 = (X[0], 0): swap its halves to (0, X[0])
    for (int64_t j = 0; j < n; ++j) Bp[j] <<= 16;
    if (R > 1) ukernel::pack(R - 1, n, X + ldx, ldx, Bp + ldp, ldp);
  } else {
    ukernel::pack(R, n, X, ldx, Bp, ldp);
  }
}
#endif

inline bool own_bf16(bool own) {
#if defined(LONGCTX_BF16_UKERNEL)
  return own;
#else
  return false;
#endif
}

// A task's packed operands (see Pk), of its key rows K, V (rows x d, ld lk, lv) and the global keys Kg, Vg
// (G x d): forward: KT, KgT (times scale), V (even, and odd if odd), Vg; backward: KT, KgT (times scale),
// VT, VgT, K (even, odd if odd), Kg. Nothing (all null) unless T is bf16 and the products are the micro-kernel's.
template <typename T>
PackedOps pack_task(PackBufs& pb, bool own, bool backward, bool odd, const T* K, int64_t lk, const T* V, int64_t lv,
                    int64_t rows, int64_t ldt, const T* Kg, const T* Vg, int64_t G, int64_t d, float scale) {
  PackedOps ops;
#if defined(LONGCTX_BF16_UKERNEL)
  if constexpr (std::is_same_v<T, bf16>) {
    if (!own) return ops;
    const int64_t dp = (d + 1) / 2, rp = rows / 2 + 1, gp = G / 2 + 1, ldr = spread_ld(d);
    grow(pb.KT, dp * ldt + ukernel::kSlack), grow(pb.KgT, dp * G + ukernel::kSlack);
    pack_t(rows, d, K, lk, scale, pb.KT.data(), ldt);
    ops.KT = {pb.KT.data(), nullptr, ldt};
    if (G) pack_t(G, d, Kg, d, scale, pb.KgT.data(), G), ops.KgT = {pb.KgT.data(), nullptr, G};
    auto& R0 = backward ? pb.K0 : pb.V0;
    auto& R1 = backward ? pb.K1 : pb.V1;
    auto& Rg = backward ? pb.Kg : pb.Vg;
    const T* X = backward ? K : V;
    const int64_t ldx = backward ? lk : lv;
    grow(R0, rp * ldr + ukernel::kSlack), grow(Rg, gp * ldr + ukernel::kSlack);
    pack_rows(rows, d, X, ldx, 0, R0.data(), ldr);
    Pk rk{R0.data(), nullptr, ldr};
    if (odd) grow(R1, (rp + 1) * ldr + ukernel::kSlack), pack_rows(rows, d, X, ldx, 1, R1.data(), ldr), rk.odd = R1.data();
    Pk gk;
    if (G) pack_rows(G, d, backward ? Kg : Vg, d, 0, Rg.data(), ldr), gk = {Rg.data(), nullptr, ldr};
    if (backward) {
      ops.K = rk, ops.Kg = gk;
      grow(pb.VT, dp * ldt + ukernel::kSlack), grow(pb.VgT, dp * G + ukernel::kSlack);
      pack_t(rows, d, V, lv, 1.f, pb.VT.data(), ldt);
      ops.VT = {pb.VT.data(), nullptr, ldt};
      if (G) pack_t(G, d, Vg, d, 1.f, pb.VgT.data(), G), ops.VgT = {pb.VgT.data(), nullptr, G};
    } else {
      ops.V = rk, ops.Vg = gk;
    }
  }
#endif
  return ops;
}

// a tile's rows (c x the column ranges of src, ld L: fp32, rounded here, or bf16) packed into buf (pairs of
// rows, ld L, at the same columns); returns buf (nullptr where nothing is packed: fp32, MKL's products)
template <typename T, typename Src>
inline const uint32_t* pack_tile(bool own, std::vector<uint32_t>& buf, const Src* src, int64_t c, int64_t L,
                                 std::initializer_list<std::pair<int64_t, int64_t>> ranges) {
#if defined(LONGCTX_BF16_UKERNEL)
  if constexpr (std::is_same_v<T, bf16>) {
    if (!own) return nullptr;
    grow(buf, (c + 1) / 2 * L + ukernel::kSlack);
    for (auto [lo, hi] : ranges) {
      if (hi > lo) ukernel::pack(c, hi - lo, src + lo, L, buf.data() + lo, L);
    }
    return buf.data();
  }
#endif
  return nullptr;
}

// One thread's buffers, kept across tiles and calls (grown, never shrunk, so that a training step does
// not fault fresh pages in for them): the tile's scores and products, the head's transposed keys and
// values of the task's key rows, and in backward their dK^T, dV^T accumulators (d x keys, ld spread_ld(keys)).
template <typename T>
struct Buffers {
  std::vector<float> S, dP, O, row, dKT, dVT, dKgT, dVgT, dQ;
  std::vector<T> P, dS, QT, dOT, KT, VT, KgT, VgT, Qp, Op, dOp;
  PackBufs pk;
  void fit(const Geo& g, bool backward, int64_t keys) {
    keys = spread_ld(keys);
    const int64_t cL = g.c * g.L, cd = g.c * g.d, dG = g.d * g.G;
    grow(S, cL), grow(O, cd), grow(row, g.c), grow(KT, g.d * keys), grow(KgT, dG), grow(Qp, cd);
    if (!std::is_same_v<T, float>) grow(P, cL);
    if (!backward) return;
    grow(dP, cL), grow(dKT, g.d * keys), grow(dVT, g.d * keys), grow(dKgT, dG), grow(dVgT, dG), grow(dQ, cd);
    grow(VT, g.d * keys), grow(VgT, dG), grow(QT, cd), grow(dOT, cd), grow(Op, cd), grow(dOp, cd);
    if (!std::is_same_v<T, float>) grow(dS, cL);
  }
};

template <typename T>
Buffers<T>& buffers(const Geo& g, bool backward, int64_t keys) {
  static thread_local Buffers<T> buf;
  buf.fit(g, backward, keys);
  return buf;
}

// one (head bh, chunk i) tile of the forward: out rows (nr of c, ld ldo) and their log-sum-exp
template <typename T>
void forward_tile(const Geo& g, Buffers<T>& buf, int64_t bh, int64_t i, const T* Qi, int64_t ldq,
                  const Head<T>& hd, T* Oi, int64_t ldo, int64_t nr, float* lse) {
  Lap lap;
  const int64_t b = bh / g.H, h = bh % g.H, c = g.c, d = g.d, L = g.L;
  const TileSpan ts = g.tile_of(b, i);
  scores<T>(g, buf.S.data(), Qi, ldq, hd, b, h, i, lap);
  T* P = std::is_same_v<T, float> ? reinterpret_cast<T*>(buf.S.data()) : buf.P.data();
  softmax_rows<T>(g, buf.S.data(), P, g.rows_of(b, i), ts, lse, buf.row.data());
  lap(kSoftmax);
  float* O = buf.O.data();
  if (ts.hi > ts.lo) {
    const int64_t r0 = g.band_row(i, ts);
    if (!packed_depth(c, d, P + ts.lo, L, hd.pk.V, r0 - hd.row0, O, d, g.rows_of(b, i), ts)) {
      prod(g.brgemm, c, d, ts.hi - ts.lo, P + ts.lo, L, hd.V + r0 * hd.lv, hd.lv, hd.pk.V.at_row(r0 - hd.row0),
           hd.pk.V.ld, O, d, false);
    }
  } else {
    std::fill(O, O + c * d, 0.f);
  }
  if (g.G) prod(g.brgemm, c, d, g.G, P + g.span, L, hd.Vg, d, hd.pk.Vg.at_row(0), hd.pk.Vg.ld, O, d, true);
  lap(kPV);
  for (int64_t r = 0; r < nr; ++r) scale_to(O + r * d, buf.row[r], Oi + r * ldo, d);
  lap(kCopy);
}

// Query chunks per segment: a task works on one segment of one head, so that the key rows it transposes
// (and in backward accumulates dK, dV for) stay in the core's L2 cache: about 2,048 queries. At 32,768 tokens
// the kernel took 9.2x (backward) and 8.5x (forward) its time at 4,096 with whole heads per task.
// The segments depend only on the geometry (never on the thread count), so results do not either.
constexpr int64_t kSegmentQueries = 2048;
inline int64_t segment_chunks(const Geo& g) {
  return std::max<int64_t>((kSegmentQueries + g.c - 1) / g.c, (g.span + g.c - 1) / g.c);
}
inline int64_t segments(const Geo& g) {
  const int64_t per = segment_chunks(g);
  return (g.nc + per - 1) / per;
}
// the key rows [k0, k1) that query chunks [i0, i1) reach (their bands, unpadded)
inline std::pair<int64_t, int64_t> key_rows(const Geo& g, int64_t i0, int64_t i1) {
  const int64_t k0 = std::clamp<int64_t>(i0 * g.c - g.left, 0, g.nkeys);
  return {k0, std::clamp<int64_t>((i1 - 1) * g.c - g.left + g.span, k0, g.nkeys)};
}

// some tile of chunks [i0, i1) (batch row b) starts its band at an odd key row of the task (from k0): the
// packed K or V rows are then needed in odd pairs too
inline bool odd_rows(const Geo& g, int64_t b, int64_t i0, int64_t i1, int64_t k0) {
  for (int64_t i = i0; i < i1; ++i) {
    const TileSpan ts = g.tile_of(b, i);
    if (ts.hi > ts.lo && (g.band_row(i, ts) - k0) % 2) return true;
  }
  return false;
}

// The forward runs in tasks of consecutive chunks of one head: at least the segments, and enough tasks
// for every thread (about four each); each transposes only the key rows its chunks reach, in its own buffer.
template <typename T>
std::vector<at::Tensor> forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& kg, const at::Tensor& vg, const Geo& g) {
  const int64_t B = q.size(0), H = q.size(1), BH = B * H, c = g.c, d = g.d, nc = g.nc;
  auto out = at::empty({B, g.nq, H, d}, q.options()).permute({0, 2, 1, 3});
  auto lse = at::empty({BH, nc * c}, q.options().dtype(at::kFloat));
  const int64_t group = H / k.size(1);
  const Seq<T> Q(q, H), K(k, H, group), V(v, H, group), O(out, H);
  const T *kgd = g.G ? kg.data_ptr<T>() : nullptr, *vgd = g.G ? vg.data_ptr<T>() : nullptr;
  float* ld = lse.data_ptr<float>();
  const int64_t threads = at::get_num_threads();
  const int64_t seg = std::min<int64_t>(nc, std::max({(4 * threads + BH - 1) / BH, segments(g), int64_t{1}}));
  const int64_t per = (nc + seg - 1) / seg;
  const bool own = std::is_same_v<T, bf16> && own_bf16(g.brgemm);
  at::parallel_for(0, BH * seg, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / seg, i0 = (t % seg) * per, i1 = std::min(nc, i0 + per);
      if (i0 >= i1) continue;
      const auto [k0, k1] = key_rows(g, i0, i1);
      Buffers<T>& buf = buffers<T>(g, false, k1 - k0);
      const int64_t ldt = spread_ld(k1 - k0);
      Lap lap;
      const T *Kg = g.G ? kgd + bh * g.G * d : nullptr, *Vg = g.G ? vgd + bh * g.G * d : nullptr;
      Head<T> hd{K.head(bh), V.head(bh), K.ld, V.ld, buf.KT.data(), nullptr, k0, ldt,
                 Kg, Vg, buf.KgT.data(), nullptr, {}};
      if (own) {  // bf16 on the micro-kernel: K^T and V packed instead
        hd.KT = hd.KgT = nullptr;
        hd.pk = pack_task<T>(buf.pk, true, false, odd_rows(g, bh / H, i0, i1, k0), K.head(bh) + k0 * K.ld, K.ld,
                             V.head(bh) + k0 * V.ld, V.ld, k1 - k0, ldt, Kg, Vg, g.G, d, g.scale);
      } else {
        transpose(K.head(bh) + k0 * K.ld, K.ld, k1 - k0, d, g.scale, buf.KT.data(), ldt);
        if (g.G) transpose(Kg, d, g.G, d, g.scale, buf.KgT.data(), g.G);
      }
      lap(kCopy);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t nr = std::min(c, g.nq - i * c);
        const T* Qi = Q.head(bh) + i * c * Q.ld;
        int64_t ldq = Q.ld;
        if (nr < c) Qi = padded(Qi, Q.ld, nr, c, d, buf.Qp.data()), ldq = d;
        forward_tile<T>(g, buf, bh, i, Qi, ldq, hd, O.head(bh) + i * c * O.ld, O.ld, nr, ld + bh * nc * c + i * c);
      }
    }
  });
  return {out, lse};
}

// a . b over n elements of T, in fp32 (16 lanes at a time: the scalar loop over bf16 rows took 4% of a
// bf16 fwd+bwd)
template <typename T>
inline float dot(const T* a, const T* b, int64_t n) {
  int64_t j = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, bf16>) {
    __m512 acc = _mm512_setzero_ps();
    for (; j + 16 <= n; j += 16) acc = _mm512_fmadd_ps(load16(a + j), load16(b + j), acc);
    s = _mm512_reduce_add_ps(acc);
  }
#endif
  for (; j < n; ++j) s += static_cast<float>(a[j]) * static_cast<float>(b[j]);
  return s;
}

// D_r = rowsum(dP * P) = dO_r . O_r for the c rows of the tile
template <typename T>
void out_dots(const Geo& g, float* D, const T* dOi, int64_t lddo, const T* Oi, int64_t ldo) {
  for (int64_t r = 0; r < g.c; ++r) D[r] = dot(dOi + r * lddo, Oi + r * ldo, g.d);
}

// Backward's elementwise part of a tile: P (recomputed from the saved log-sum-exp) and dS = P (dP - D)
// with D from out_dots, as T (fp32: in place, P = S and dS = dP; bf16: rounded once, the products'
// operands, with dS also kept in fp32 in dP under ALiBi); 0 outside each row's allowed keys.
template <typename T>
inline void ds_rows(const Geo& g, const float* S, float* dP, const float* D, const RowSpan* rows, TileSpan ts,
                    const float* lse, T* P, T* dS) {
  const int64_t span = g.span, L = g.L;
  const bool keep = !std::is_same_v<T, float> && g.slopes;
  for (int64_t r = 0; r < g.c; ++r) {
    const float* s = S + r * L;
    float* dp = dP + r * L;
    T *p = P + r * L, *ds = dS + r * L;
    const RowSpan rs = rows[r];
    const float l = lse[r];
    if (l == std::numeric_limits<float>::infinity()) {  // no allowed key
      zero_cols(p, ts.lo, ts.hi), zero_cols(p, span, L), zero_cols(ds, ts.lo, ts.hi), zero_cols(ds, span, L);
      if (keep) zero_cols(dp, ts.lo, ts.hi), zero_cols(dp, span, L);
      continue;
    }
    if (rs.dense) {
      row_ds<false, T>(s, dp, p, ds, rs.lo, rs.hi, l, D[r], keep);
    } else {
      row_ds<true, T>(s, dp, p, ds, rs.lo, rs.hi, l, D[r], keep);
    }
    row_ds<true, T>(s, dp, p, ds, span, L, l, D[r], keep);
    zero_outside(p, ts, rs), zero_outside(ds, ts, rs);
  }
}

// d loss / d slope of head h from chunk i's dS: d score / d slope = -|q - k|
inline double slope_grad(const Geo& g, const float* dS, const RowSpan* rows, int64_t b, int64_t i) {
  double dslope = 0.0;
  const int32_t* kp = g.k_pos + i * g.c;
  for (int64_t r = 0; r < g.c; ++r) {
    const int32_t qp = g.q_pos[i * g.c + r];
    const float* dp = dS + r * g.L;
    for (int64_t j = rows[r].lo; j < rows[r].hi; ++j) dslope -= dp[j] * std::abs(qp - kp[j]);
    for (int64_t t = 0; t < g.G; ++t) dslope -= dp[g.span + t] * std::abs(qp - g.g_pos[b * g.G + t]);
  }
  return dslope;
}

// one (head bh, chunk i) tile of the backward: dQ_i (c x d, ld lddq) written, dK^T, dV^T of the band and
// of the global keys accumulated in buf
template <typename T>
double backward_tile(const Geo& g, Buffers<T>& buf, int64_t bh, int64_t i, const T* Qi, int64_t ldq,
                     const Head<T>& hd, const T* Oi, int64_t ldo, const T* dOi, int64_t lddo, const float* lse,
                     float* dQi, int64_t lddq) {
  Lap lap;
  const int64_t b = bh / g.H, h = bh % g.H, c = g.c, d = g.d, L = g.L, span = g.span, G = g.G;
  const TileSpan ts = g.tile_of(b, i);
  const int nb = ts.hi - ts.lo;
  const int64_t r0 = g.band_row(i, ts);
  const bool brg = g.brgemm;
  float *S = buf.S.data(), *dP = buf.dP.data();
  scores<T>(g, S, Qi, ldq, hd, b, h, i, lap);
  // dP (c x L) = dO_i [V_band | V_g]^T
  if (nb && !packed_cols(c, d, dOi, lddo, hd.pk.VT, r0 - hd.row0, dP + ts.lo, L, g.rows_of(b, i), ts)) {
    prod(brg, c, nb, d, dOi, lddo, hd.vt(r0), hd.ldt, hd.pk.VT.at_col(r0 - hd.row0), hd.pk.VT.ld, dP + ts.lo, L, false);
  }
  if (G) prod(brg, c, G, d, dOi, lddo, hd.VgT, G, hd.pk.VgT.at_col(0), hd.pk.VgT.ld, dP + span, L, false);
  lap(kDP);
  const RowSpan* rows = g.rows_of(b, i);
  out_dots(g, buf.row.data(), dOi, lddo, Oi, ldo);
  constexpr bool kF32 = std::is_same_v<T, float>;
  T *P = kF32 ? reinterpret_cast<T*>(S) : buf.P.data(), *dS = kF32 ? reinterpret_cast<T*>(dP) : buf.dS.data();
  ds_rows<T>(g, S, dP, buf.row.data(), rows, ts, lse, P, dS);
  // P only as B (dV^T), packed for the micro-kernel from its bf16 rows; dS as B (dK^T) and A (dQ). (Writing
  // them packed straight from ds_rows' registers, through masked 16-bit stores, ran slower on an AMD EPYC.)
  const bool own = hd.pk.KT.even != nullptr;
  const uint32_t* Pp = pack_tile<T>(own, buf.pk.P, P, c, L, {{ts.lo, ts.hi}, {span, L}});
  const uint32_t* dSp = pack_tile<T>(own, buf.pk.dS, dS, c, L, {{ts.lo, ts.hi}, {span, L}});
  const double dslope = g.slopes ? slope_grad(g, dP, rows, b, i) : 0.0;
  lap(kDS);
  T *QT = buf.QT.data(), *dOT = buf.dOT.data();
  transpose(Qi, ldq, c, d, g.scale, QT, c), transpose(dOi, lddo, c, d, 1.f, dOT, c);
  lap(kCopy);
  // dV^T_band += dO_i^T P, dK^T_band += scale Q_i^T dS (the band's keys are contiguous columns of dK^T)
  if (nb && !rows_packed(d, dOT, c, Pp, ts.lo, L, buf.dVT.data() + (r0 - hd.row0), hd.ldt, rows, c, ts)) {
    prod(brg, d, nb, c, dOT, c, P + ts.lo, L, nullptr, L, buf.dVT.data() + (r0 - hd.row0), hd.ldt, true);
  }
  if (nb && !rows_packed(d, QT, c, dSp, ts.lo, L, buf.dKT.data() + (r0 - hd.row0), hd.ldt, rows, c, ts)) {
    prod(brg, d, nb, c, QT, c, dS + ts.lo, L, nullptr, L, buf.dKT.data() + (r0 - hd.row0), hd.ldt, true);
  }
  if (G) {
    prod(brg, d, G, c, dOT, c, P + span, L, Pp ? Pp + span : nullptr, L, buf.dVgT.data(), G, true);
    prod(brg, d, G, c, QT, c, dS + span, L, dSp ? dSp + span : nullptr, L, buf.dKgT.data(), G, true);
  }
  lap(kDVDK);
  // dQ_i = scale dS [K_band | K_g]
  if (nb) {
    if (!packed_depth(c, d, dS + ts.lo, L, hd.pk.K, r0 - hd.row0, dQi, lddq, g.rows_of(b, i), ts)) {
      prod(brg, c, d, nb, dS + ts.lo, L, hd.K + r0 * hd.lk, hd.lk, hd.pk.K.at_row(r0 - hd.row0), hd.pk.K.ld, dQi,
           lddq, false);
    }
  } else {
    for (int64_t r = 0; r < c; ++r) std::fill(dQi + r * lddq, dQi + r * lddq + d, 0.f);
  }
  if (G) prod(brg, c, d, G, dS + span, L, hd.Kg, d, hd.pk.Kg.at_row(0), hd.pk.Kg.ld, dQi, lddq, true);
  for (int64_t r = 0; r < c; ++r) {
    float* dq = dQi + r * lddq;
#pragma omp simd
    for (int64_t e = 0; e < d; ++e) dq[e] *= g.scale;
  }
  lap(kDQ);
  return dslope;
}

// out (rows x cols, ld ldo) = the accumulated transpose acc (cols x rows, ld lda), which is zeroed for the
// next head
inline void untranspose(float* acc, int64_t lda, int64_t cols, int64_t rows, float* out, int64_t ldo) {
  transpose(acc, lda, cols, rows, 1.f, out, ldo);
  std::fill(acc, acc + cols * lda, 0.f);
}

// The start of a backward task, shared by the band and the layout kernels: the thread's dK^T, dV^T
// accumulators (d x ld) and the global keys' (d x G) zeroed, and K^T (times scale), V^T of the task's key
// rows (rows of K and V, ld lk and lv) and of the global keys transposed into its buffers.
template <typename T, typename Buf>
PackedOps begin_backward_task(Buf& buf, bool own, bool odd, const T* K, int64_t lk, const T* V, int64_t lv,
                              int64_t rows, int64_t ld, const T* Kg, const T* Vg, int64_t G, int64_t d, float scale) {
  std::fill(buf.dKT.begin(), buf.dKT.begin() + d * ld, 0.f);
  std::fill(buf.dVT.begin(), buf.dVT.begin() + d * ld, 0.f);
  std::fill(buf.dKgT.begin(), buf.dKgT.begin() + d * G, 0.f);
  std::fill(buf.dVgT.begin(), buf.dVgT.begin() + d * G, 0.f);
  if (own) return pack_task<T>(buf.pk, true, true, odd, K, lk, V, lv, rows, ld, Kg, Vg, G, d, scale);
  transpose(K, lk, rows, d, scale, buf.KT.data(), ld);
  transpose(V, lv, rows, d, 1.f, buf.VT.data(), ld);
  if (G) transpose(Kg, d, G, d, scale, buf.KgT.data(), G), transpose(Vg, d, G, d, 1.f, buf.VgT.data(), G);
  return {};
}

template <typename T>
std::vector<at::Tensor> backward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& kg, const at::Tensor& vg, const at::Tensor& out,
                                      const at::Tensor& dout, const at::Tensor& lse, const Geo& g) {
  const int64_t B = q.size(0), H = q.size(1), BH = B * H, nkeys = g.nkeys, nq = g.nq;
  const int64_t c = g.c, d = g.d, G = g.G, nc = g.nc;
  auto f32 = q.options().dtype(at::kFloat);
  // the gradients in their inputs' dtype and layout where that is dense ((B, n, H, d) memory for the
  // layer's projections, (B, H, n, d) for contiguous leaves), so autograd hands them on without a copy;
  // bf16 ones are summed in fp32 and rounded once
  // (grouped-query attention: dK and dV per query head, in (B, n, H, d) memory; the caller sums each group)
  const int64_t group = H / k.size(1);
  auto per_head = [&](const at::Tensor& x) {
    return group == 1 ? at::empty_like(x) : at::empty({B, nkeys, H, d}, x.options()).permute({0, 2, 1, 3});
  };
  auto dq = at::empty_like(q), dk = per_head(k), dv = per_head(v);
  auto dkg = at::empty({BH, G, d}, f32), dvg = at::empty({BH, G, d}, f32);
  auto dslopes = at::zeros({BH}, q.options().dtype(at::kDouble));
  const Seq<T> Q(q, H), K(k, H, group), V(v, H, group), O(out, H), dO(dout, H);
  const Seq<T> dQ(dq, H), dK(dk, H), dV(dv, H);
  // fp32 rows of dK, dV that two segments share (bf16 only; fp32 sums in the gradients themselves): the
  // even pass writes its part, the odd pass adds its own and rounds. Only those rows are ever touched.
  constexpr bool kRound = !std::is_same_v<T, float>;
  at::Tensor side = kRound ? at::empty({2, BH, nkeys, d}, f32) : at::Tensor();
  const T *kgd = G ? kg.data_ptr<T>() : nullptr, *vgd = G ? vg.data_ptr<T>() : nullptr;
  const float* ld = lse.data_ptr<float>();
  float *dkgd = dkg.data_ptr<float>(), *dvgd = dvg.data_ptr<float>();
  double* dsd = dslopes.data_ptr<double>();
  // Tasks are (head, segment); each accumulates dK^T, dV^T of the key rows its chunks reach in its own
  // buffers, in chunk order. Neighbouring segments share the rows at their border (never more than two
  // share one, as a segment is at least a band long): the even segments write their rows first, then the
  // odd ones add theirs on the shared rows and write the rest, so every row has one summation order,
  // whatever the number of threads. The global keys' gradients and ALiBi's slope gradients are kept per
  // task and summed in segment order at the end.
  const int64_t per = segment_chunks(g), nseg = (nc + per - 1) / per;
  const bool own = std::is_same_v<T, bf16> && own_bf16(g.brgemm);
  std::vector<float> gpart(BH * nseg * 2 * G * d);
  std::vector<double> spart(BH * nseg, 0.0);
  for (int64_t pass = 0; pass < 2; ++pass) {
    const int64_t count = (nseg - pass + 1) / 2;  // segments pass, pass + 2, ...
    if (count == 0) continue;
    at::parallel_for(0, BH * count, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t bh = t / count, sg = 2 * (t % count) + pass;
        const int64_t i0 = sg * per, i1 = std::min(nc, i0 + per);
        const auto [k0, k1] = key_rows(g, i0, i1);
        Buffers<T>& buf = buffers<T>(g, true, k1 - k0);
        const int64_t ldk = spread_ld(k1 - k0);
        Lap lap;
        const T *Kh = K.head(bh), *Vh = V.head(bh);
        const T *Kg = G ? kgd + bh * G * d : nullptr, *Vg = G ? vgd + bh * G * d : nullptr;
        const bool odd = own && odd_rows(g, bh / H, i0, i1, k0);
        const PackedOps pk = begin_backward_task(buf, own, odd, Kh + k0 * K.ld, K.ld, Vh + k0 * V.ld, V.ld, k1 - k0, ldk,
                                                 Kg, Vg, G, d, g.scale);
        lap(kCopy);
        const Head<T> hd{Kh, Vh, K.ld, V.ld, own ? nullptr : buf.KT.data(), own ? nullptr : buf.VT.data(), k0, ldk,
                         Kg, Vg, own ? nullptr : buf.KgT.data(), own ? nullptr : buf.VgT.data(), pk};
        double dslope = 0.0;
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t nr = std::min(c, nq - i * c), row = i * c;
          const T *Qi = Q.head(bh) + row * Q.ld, *Oi = O.head(bh) + row * O.ld, *dOi = dO.head(bh) + row * dO.ld;
          int64_t ldq = Q.ld, ldo = O.ld, lddo = dO.ld;
          T* dst = dQ.head(bh) + row * dQ.ld;
          // dQ_i straight into the gradient (fp32, a whole chunk), else via the thread's fp32 buffer
          const bool direct = !kRound && nr == c;
          float* dQi = direct ? reinterpret_cast<float*>(dst) : buf.dQ.data();
          const int64_t lddq = direct ? dQ.ld : d;
          if (nr < c) {
            Qi = padded(Qi, ldq, nr, c, d, buf.Qp.data()), Oi = padded(Oi, ldo, nr, c, d, buf.Op.data());
            dOi = padded(dOi, lddo, nr, c, d, buf.dOp.data());
            ldq = ldo = lddo = d;
          }
          dslope += backward_tile<T>(g, buf, bh, i, Qi, ldq, hd, Oi, ldo, dOi, lddo, ld + bh * nc * c + row, dQi, lddq);
          if (!direct) {
            for (int64_t r = 0; r < nr; ++r) scale_to(dQi + r * d, 1.f, dst + r * dQ.ld, d);
          }
        }
        Lap lap2;
        // rows [k0, a) shared with the previous segment and [z, k1) with the next one: added in the odd pass
        const int64_t a = pass && sg > 0 ? key_rows(g, i0 - per, i0).second : k0;
        const int64_t z = pass && sg + 1 < nseg ? key_rows(g, i1, std::min(nc, i1 + per)).first : k1;
        int kv = 0;
        for (auto [acc, D] : {std::pair<float*, const Seq<T>*>{buf.dKT.data(), &dK}, {buf.dVT.data(), &dV}}) {
          T* rows = D->head(bh);
          if constexpr (kRound) {
            // the rows shared with the previous segment [k0, a0) and the next one [z0, k1)
            const int64_t a0 = sg > 0 ? key_rows(g, i0 - per, i0).second : k0;
            const int64_t z0 = sg + 1 < nseg ? key_rows(g, i1, std::min(nc, i1 + per)).first : k1;
            float* sd = side.data_ptr<float>() + (kv * BH + bh) * nkeys * d;
            for (auto [r0, r1] : {std::pair<int64_t, int64_t>{k0, a0}, {z0, k1}}) {
              transpose(acc + (r0 - k0), ldk, d, r1 - r0, 1.f, sd + r0 * d, d, pass == 1);
              if (pass == 1) {
                for (int64_t r = r0; r < r1; ++r) scale_to(sd + r * d, 1.f, rows + r * D->ld, d);
              }
            }
            transpose(acc + (a0 - k0), ldk, d, z0 - a0, 1.f, rows + a0 * D->ld, D->ld);
          } else {
            transpose(acc, ldk, d, a - k0, 1.f, rows + k0 * D->ld, D->ld, true);
            transpose(acc + (a - k0), ldk, d, z - a, 1.f, rows + a * D->ld, D->ld);
            transpose(acc + (z - k0), ldk, d, k1 - z, 1.f, rows + z * D->ld, D->ld, true);
          }
          ++kv;
        }
        float* gp = gpart.data() + (bh * nseg + sg) * 2 * G * d;
        untranspose(buf.dKgT.data(), G, d, G, gp, d), untranspose(buf.dVgT.data(), G, d, G, gp + G * d, d);
        lap2(kCopy);
        spart[bh * nseg + sg] = dslope;
      }
    });
  }
  for (int64_t bh = 0; bh < BH; ++bh) {
    float *kgo = dkgd + bh * G * d, *vgo = dvgd + bh * G * d;
    std::fill(kgo, kgo + G * d, 0.f), std::fill(vgo, vgo + G * d, 0.f);
    double dslope = 0.0;
    for (int64_t sg = 0; sg < nseg; ++sg) {
      const float* gp = gpart.data() + (bh * nseg + sg) * 2 * G * d;
      for (int64_t e = 0; e < G * d; ++e) kgo[e] += gp[e], vgo[e] += gp[G * d + e];
      dslope += spart[bh * nseg + sg];
    }
    dsd[bh] = dslope;
  }
  return {dq, dk, dv, dkg, dvg, dslopes};
}

// Seconds spent per phase since the last reset, summed over threads (all zero unless the library was
// loaded with LONGCTX_FUSED_PROFILE set): rows, QK, mask, softmax, PV, dP, dS, dV/dK, dQ, copy.
at::Tensor band_profile(bool reset) {
  auto out = at::empty({kNumPhases}, at::TensorOptions().dtype(at::kDouble));
  for (int p = 0; p < kNumPhases; ++p) {
    out.data_ptr<double>()[p] = 1e-9 * static_cast<double>(reset ? phase_ns[p].exchange(0) : phase_ns[p].load());
  }
  return out;
}

Geo make_geo(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kg, const at::Tensor& local,
             const at::Tensor& kvalid, const at::Tensor& q_pos, const at::Tensor& k_pos,
             const at::Tensor& g_pos, const at::Tensor& g_valid, const at::Tensor& slopes, int64_t B,
             int64_t H, bool causal, int64_t left, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(0) == B && q.size(1) == H,
              "longctx fused attention: q, k, v must be (B, H, n, d)");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(1) > 0 && H % k.size(1) == 0 && k.size(3) == q.size(3),
              "longctx fused attention: k and v must be (B, Hkv, n, d) with Hkv dividing H");
  TORCH_CHECK(k.size(1) == H || kg.numel() == 0, "longctx fused attention: global keys need as many key heads as queries");
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->stride(3) == 1 && t->stride(2) >= t->size(3), "longctx fused attention: rows of q, k, v must be dense");
  }
  TORCH_CHECK(local.is_contiguous() && kvalid.is_contiguous() && (!kg.numel() || kg.is_contiguous()),
              "longctx fused attention: masks and global keys must be contiguous");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "longctx fused attention runs float32 and bfloat16");
  TORCH_CHECK(q_pos.size(0) % local.size(1) == 0 && q_pos.size(0) >= q.size(2), "longctx fused attention: bad query chunks");
  TORCH_CHECK(k.size(2) + left <= kvalid.size(1) && left >= 0, "longctx fused attention: bad key padding");
  return Geo(q, k, kg, local, kvalid, q_pos, k_pos, g_pos, g_valid, slopes, B, H, causal, left, scale);
}

std::vector<at::Tensor> band_forward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor kg, at::Tensor vg,
                                     at::Tensor local, at::Tensor kvalid, at::Tensor q_pos, at::Tensor k_pos,
                                     at::Tensor g_pos, at::Tensor g_valid, at::Tensor slopes, int64_t B,
                                     int64_t H, bool causal, int64_t left, double scale) {
  const Geo g = make_geo(q, k, v, kg, local, kvalid, q_pos, k_pos, g_pos, g_valid, slopes, B, H, causal, left, scale);
  if (q.scalar_type() == at::kFloat) return forward_impl<float>(q, k, v, kg, vg, g);
  return forward_impl<bf16>(q, k, v, kg, vg, g);
}

std::vector<at::Tensor> band_backward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor kg, at::Tensor vg,
                                      at::Tensor out, at::Tensor dout, at::Tensor lse, at::Tensor local,
                                      at::Tensor kvalid, at::Tensor q_pos, at::Tensor k_pos, at::Tensor g_pos,
                                      at::Tensor g_valid, at::Tensor slopes, int64_t B, int64_t H, bool causal,
                                      int64_t left, double scale) {
  const Geo g = make_geo(q, k, v, kg, local, kvalid, q_pos, k_pos, g_pos, g_valid, slopes, B, H, causal, left, scale);
  TORCH_CHECK(out.stride(3) == 1 && dout.stride(3) == 1 && dout.stride(2) >= g.d && out.sizes() == q.sizes() &&
              dout.sizes() == q.sizes(), "longctx fused attention: bad output or gradient layout");
  if (q.scalar_type() == at::kFloat) return backward_impl<float>(q, k, v, kg, vg, out, dout, lse, g);
  return backward_impl<bf16>(q, k, v, kg, vg, out, dout, lse, g);
}


// ---------------------------------------------------------------------------------------------------
// BigBird's block-sparse attention (Zaheer et al., 2020; longctx.attention.bigbird, layout_attention):
// query block i of head h attends the W key blocks cols[h, i, :] where col_ok (its sliding and random
// blocks: a layout, not a band) and then the G global keys. One tile = (head, query block): c = b query
// rows (the block size) against the tile's allowed key blocks, each a c x c product of Q_i with the
// block's columns of the head's K^T (transposed once per task into a thread buffer), written side by side
// into the score buffer (allowed block a into columns [a c, (a + 1) c), in the order of cols), the global
// keys right after them, so that each row's keys are one contiguous range [0, na c + G) for the masks,
// the softmax and the products. Masked blocks (col_ok false) are skipped entirely. q arrives scaled, and
// q, k, v padded to whole blocks (nb c rows; the padded keys are never valid, the padded rows are dropped
// by the caller). The rows of global queries are recomputed over every key in Python (_global_rows).
//   cols (H, nb, W) int64, col_ok (H, nb, W) uint8: the layout;
//   valid (B, nb, c) uint8: the key is real and not global (a global key comes in once, as a global);
//   g_valid (B, G) uint8: the global key slot holds a real key.
struct LayoutGeo {
  int64_t B, H, nb, c, W, G, d, N, L;
  bool brgemm;
  const int64_t* cols;
  const uint8_t *col_ok, *valid, *g_valid;
  std::vector<uint8_t> full;  // (B, nb): every key of the block is valid (the tile needs no key mask there)
  bool g_full = true;         // every global slot holds a real key, in every batch row

  LayoutGeo(const at::Tensor& q, const at::Tensor& kg, const at::Tensor& cols_, const at::Tensor& col_ok_,
            const at::Tensor& valid_, const at::Tensor& g_valid_) {
    const char* blas = std::getenv("LONGCTX_FUSED_GEMM");
    brgemm = !(blas && std::string(blas) == "mkl");
    B = q.size(0), H = q.size(1), N = q.size(2), d = q.size(3);
    nb = cols_.size(1), W = cols_.size(2), c = valid_.size(2), G = kg.size(2);
    L = W * c + G;
    cols = cols_.data_ptr<int64_t>(), col_ok = col_ok_.data_ptr<uint8_t>(), valid = valid_.data_ptr<uint8_t>();
    g_valid = G ? g_valid_.data_ptr<uint8_t>() : nullptr;
    full.resize(B * nb);
    for (int64_t t = 0; t < B * nb; ++t) {
      full[t] = std::all_of(valid + t * c, valid + (t + 1) * c, [](uint8_t x) { return x != 0; });
    }
    for (int64_t t = 0; t < B * G; ++t) g_full = g_full && g_valid[t];
    for (int64_t t = 0; t < H * nb * W; ++t) {  // a block index out of range would read past the keys
      TORCH_CHECK(!col_ok[t] || (cols[t] >= 0 && cols[t] < nb), "longctx fused layout attention: bad key block");
    }
  }

  // the allowed key blocks of query block i of head h, in the order of cols, into js; returns their count
  int64_t blocks(int64_t h, int64_t i, int64_t* js) const {
    int64_t na = 0;
    const int64_t *cl = cols + (h * nb + i) * W;
    const uint8_t* ok = col_ok + (h * nb + i) * W;
    for (int64_t w = 0; w < W; ++w) {
      if (ok[w]) js[na++] = cl[w];
    }
    return na;
  }
};

// One thread's buffers for the layout kernel, kept across calls like the band kernel's (grown, never
// shrunk): the tile's scores (c x L) and products, the head's K^T, V^T (d x ldt) and in backward their
// dK^T, dV^T accumulators.
template <typename T>
struct LayoutBuffers {
  std::vector<float> S, dP, O, row, dKT, dVT, dKgT, dVgT;
  std::vector<T> P, dS, QT, dOT, KT, VT, KgT, VgT;
  PackBufs pk;
  std::vector<int64_t> js;
  void fit(const LayoutGeo& g, bool backward) {
    const int64_t cL = g.c * g.L, cd = g.c * g.d, dG = g.d * g.G, dN = g.d * spread_ld(g.N);
    grow(S, cL), grow(O, cd), grow(row, g.c), grow(KT, dN), grow(KgT, dG), grow(js, g.W);
    if (!std::is_same_v<T, float>) grow(P, cL);
    if (!backward) return;
    grow(dP, cL), grow(dKT, dN), grow(dVT, dN), grow(dKgT, dG), grow(dVgT, dG);
    grow(VT, dN), grow(VgT, dG), grow(QT, cd), grow(dOT, cd);
    if (!std::is_same_v<T, float>) grow(dS, cL);
  }
};

template <typename T>
LayoutBuffers<T>& layout_buffers(const LayoutGeo& g, bool backward) {
  static thread_local LayoutBuffers<T> buf;
  buf.fit(g, backward);
  return buf;
}

// The operands of one head for the layout tiles: its rows (ld lk, lv), K^T and V^T of all N key rows
// (d x ldt), the global keys (G x d) and their transposes (d x G).
template <typename T>
struct LayoutHead {
  const T *K, *V;
  int64_t lk, lv;
  const T *KT, *VT;
  int64_t ldt;
  const T *Kg, *Vg, *KgT, *VgT;
  PackedOps pk;  // the same packed for the micro-kernel (bf16), or empty
};

// Scores of tile (bh, i): S (c x L) = Q_i [K_j1 | ... | K_jna | K_g]^T over its na allowed key blocks
// (js) and the globals, invalid keys overwritten with -inf (a NaN in a key no query may attend never
// reaches a row). Returns na; masked says some key of the tile is invalid (the softmax must test for -inf).
template <typename T>
int64_t layout_scores(const LayoutGeo& g, float* S, const T* Qi, int64_t ldq, const LayoutHead<T>& hd,
                      int64_t b, int64_t h, int64_t i, int64_t* js, bool& masked, Lap& lap) {
  const int64_t c = g.c, L = g.L, G = g.G;
  const int64_t na = g.blocks(h, i, js);
  for (int64_t a = 0; a < na; ++a) {
    prod(g.brgemm, c, c, g.d, Qi, ldq, hd.KT ? hd.KT + js[a] * c : nullptr, hd.ldt, hd.pk.KT.at_col(js[a] * c),
         hd.pk.KT.ld, S + a * c, L, false);
  }
  if (G) prod(g.brgemm, c, G, g.d, Qi, ldq, hd.KgT, G, hd.pk.KgT.at_col(0), hd.pk.KgT.ld, S + na * c, L, false);
  lap(kQK);
  masked = false;
  for (int64_t a = 0; a < na; ++a) {
    if (g.full[b * g.nb + js[a]]) continue;
    masked = true;
    const uint8_t* kv = g.valid + (b * g.nb + js[a]) * c;
    for (int64_t r = 0; r < c; ++r) {
      float* s = S + r * L + a * c;
#pragma omp simd
      for (int64_t t = 0; t < c; ++t) s[t] = kv[t] ? s[t] : kNegInf;
    }
  }
  if (G && !g.g_full) {
    masked = true;
    const uint8_t* gv = g.g_valid + b * G;
    for (int64_t r = 0; r < c; ++r) {
      float* s = S + r * L + na * c;
      for (int64_t t = 0; t < G; ++t) s[t] = gv[t] ? s[t] : kNegInf;
    }
  }
  lap(kMask);
  return na;
}

// the tile's fp32 P or dS over its columns [0, len) as a product operand: as is in fp32, bf16 else
template <typename T>
inline const T* layout_operand(const LayoutGeo& g, const float* src, T* buf, int64_t len) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t r = 0; r < g.c; ++r) scale_to(src + r * g.L, 1.f, buf + r * g.L, len);
    return buf;
  }
}

// one (head bh, query block i) tile of the forward: Oi (c x d, ld ldo) and the rows' log-sum-exp
template <typename T>
void layout_forward_tile(const LayoutGeo& g, LayoutBuffers<T>& buf, int64_t bh, int64_t i, const T* Qi,
                         int64_t ldq, const LayoutHead<T>& hd, T* Oi, int64_t ldo, float* lse) {
  Lap lap;
  const int64_t b = bh / g.H, h = bh % g.H, c = g.c, d = g.d, L = g.L, G = g.G;
  int64_t* js = buf.js.data();
  bool masked;
  float* S = buf.S.data();
  const int64_t na = layout_scores<T>(g, S, Qi, ldq, hd, b, h, i, js, masked, lap);
  const int64_t len = na * c + G;
  // softmax unnormalised (P = exp(S - rowmax) as T, row[r] = 1 / sum), the c x d output normalised instead
  T* P = std::is_same_v<T, float> ? reinterpret_cast<T*>(S) : buf.P.data();
  for (int64_t r = 0; r < c; ++r) {
    const float* s = S + r * L;
    const float m = row_max(s, 0, len, kNegInf);
    if (m == kNegInf) {  // no allowed key: output 0, log-sum-exp +inf
      zero_cols(P + r * L, 0, len);
      lse[r] = std::numeric_limits<float>::infinity(), buf.row[r] = 0.f;
      continue;
    }
    const float sum = masked ? row_exp<true>(s, P + r * L, 0, len, m) : row_exp<false>(s, P + r * L, 0, len, m);
    lse[r] = m + std::log(sum), buf.row[r] = 1.f / sum;
  }
  lap(kSoftmax);
  float* O = buf.O.data();
  // O = sum_a P_a V_ja + P_g V_g: W accumulating products, in the order of cols
  for (int64_t a = 0; a < na; ++a) {
    prod(g.brgemm, c, d, c, P + a * c, L, hd.V + js[a] * c * hd.lv, hd.lv, hd.pk.V.at_row(js[a] * c), hd.pk.V.ld, O, d,
         a > 0);
  }
  if (G) prod(g.brgemm, c, d, G, P + na * c, L, hd.Vg, d, hd.pk.Vg.at_row(0), hd.pk.Vg.ld, O, d, na > 0);
  if (na == 0 && G == 0) std::fill(O, O + c * d, 0.f);
  lap(kPV);
  for (int64_t r = 0; r < c; ++r) scale_to(O + r * d, buf.row[r], Oi + r * ldo, d);
  lap(kCopy);
}

// one (head bh, query block i) tile of the backward: dQ_i (c x d, ld lddq) written, dK^T, dV^T of the
// tile's key blocks and of the global keys accumulated in buf
template <typename T>
void layout_backward_tile(const LayoutGeo& g, LayoutBuffers<T>& buf, int64_t bh, int64_t i, const T* Qi,
                          int64_t ldq, const LayoutHead<T>& hd, const T* Oi, int64_t ldo, const T* dOi,
                          int64_t lddo, const float* lse, float* dQi, int64_t lddq) {
  Lap lap;
  const int64_t b = bh / g.H, h = bh % g.H, c = g.c, d = g.d, L = g.L, G = g.G;
  const bool brg = g.brgemm;
  int64_t* js = buf.js.data();
  bool masked;
  float *S = buf.S.data(), *dP = buf.dP.data();
  const int64_t na = layout_scores<T>(g, S, Qi, ldq, hd, b, h, i, js, masked, lap);
  const int64_t len = na * c + G;
  // dP (c x len) = dO_i [V_j1 | ... | V_g]^T
  for (int64_t a = 0; a < na; ++a) {
    prod(brg, c, c, d, dOi, lddo, hd.VT ? hd.VT + js[a] * c : nullptr, hd.ldt, hd.pk.VT.at_col(js[a] * c), hd.pk.VT.ld,
         dP + a * c, L, false);
  }
  if (G) prod(brg, c, G, d, dOi, lddo, hd.VgT, G, hd.pk.VgT.at_col(0), hd.pk.VgT.ld, dP + na * c, L, false);
  lap(kDP);
  // S -> P from the saved log-sum-exp, dP -> dS = P (dP - D), D_r = rowsum(dP * P) = dO_r . O_r
  for (int64_t r = 0; r < c; ++r) {
    float *s = S + r * L, *dp = dP + r * L;
    const float l = lse[r];
    if (l == std::numeric_limits<float>::infinity()) {  // no allowed key
      zero_cols(s, 0, len), zero_cols(dp, 0, len);
      continue;
    }
    const float D = dot(dOi + r * lddo, Oi + r * ldo, d);
    if (masked) {
      row_ds<true, T>(s, dp, s, dp, 0, len, l, D, false);
    } else {
      row_ds<false, T>(s, dp, s, dp, 0, len, l, D, false);
    }
  }
  lap(kDS);
  const bool own = hd.pk.KT.even != nullptr;  // P only as B (dV^T), packed for the micro-kernel
  const uint32_t* Pp = pack_tile<T>(own, buf.pk.P, S, c, L, {{0, len}});
  const uint32_t* dSp = pack_tile<T>(own, buf.pk.dS, dP, c, L, {{0, len}});
  const T* P = Pp ? buf.P.data() : layout_operand<T>(g, S, buf.P.data(), len);
  const T* dS = layout_operand<T>(g, dP, buf.dS.data(), len);
  T *QT = buf.QT.data(), *dOT = buf.dOT.data();
  transpose(Qi, ldq, c, d, 1.f, QT, c), transpose(dOi, lddo, c, d, 1.f, dOT, c);
  lap(kCopy);
  // dV^T_j += dO_i^T P_a, dK^T_j += Q_i^T dS_a (block j's keys are columns [j c, (j + 1) c) of dK^T)
  for (int64_t a = 0; a < na; ++a) {
    prod(brg, d, c, c, dOT, c, P + a * c, L, Pp ? Pp + a * c : nullptr, L, buf.dVT.data() + js[a] * c, hd.ldt, true);
    prod(brg, d, c, c, QT, c, dS + a * c, L, dSp ? dSp + a * c : nullptr, L, buf.dKT.data() + js[a] * c, hd.ldt, true);
  }
  if (G) {
    prod(brg, d, G, c, dOT, c, P + na * c, L, Pp ? Pp + na * c : nullptr, L, buf.dVgT.data(), G, true);
    prod(brg, d, G, c, QT, c, dS + na * c, L, dSp ? dSp + na * c : nullptr, L, buf.dKgT.data(), G, true);
  }
  lap(kDVDK);
  // dQ_i = sum_a dS_a K_ja + dS_g K_g
  for (int64_t a = 0; a < na; ++a) {
    prod(brg, c, d, c, dS + a * c, L, hd.K + js[a] * c * hd.lk, hd.lk, hd.pk.K.at_row(js[a] * c), hd.pk.K.ld, dQi, lddq,
         a > 0);
  }
  if (G) prod(brg, c, d, G, dS + na * c, L, hd.Kg, d, hd.pk.Kg.at_row(0), hd.pk.Kg.ld, dQi, lddq, na > 0);
  if (na == 0 && G == 0) {
    for (int64_t r = 0; r < c; ++r) std::fill(dQi + r * lddq, dQi + r * lddq + d, 0.f);
  }
  lap(kDQ);
}

// Forward tasks: (head, run of query blocks), enough for every thread (about four each). A tile's result
// does not depend on its task (each task transposes the whole head's K: random blocks reach any key), so
// neither does the output on the thread count.
template <typename T>
std::vector<at::Tensor> layout_forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const at::Tensor& kg, const at::Tensor& vg, const LayoutGeo& g) {
  const int64_t B = g.B, H = g.H, BH = B * H, c = g.c, d = g.d, nb = g.nb, N = g.N, G = g.G;
  auto out = at::empty({B, H, N, d}, q.options());
  auto lse = at::empty({BH, N}, q.options().dtype(at::kFloat));
  const Seq<T> Q(q, H), K(k, H), V(v, H), O(out, H);
  const T *kgd = G ? kg.data_ptr<T>() : nullptr, *vgd = G ? vg.data_ptr<T>() : nullptr;
  float* ld = lse.data_ptr<float>();
  const int64_t threads = at::get_num_threads();
  const int64_t seg = std::min<int64_t>(nb, std::max<int64_t>((4 * threads + BH - 1) / BH, 1));
  const int64_t per = (nb + seg - 1) / seg;
  const bool own = std::is_same_v<T, bf16> && own_bf16(g.brgemm);
  at::parallel_for(0, BH * seg, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / seg, i0 = (t % seg) * per, i1 = std::min(nb, i0 + per);
      if (i0 >= i1) continue;
      LayoutBuffers<T>& buf = layout_buffers<T>(g, false);
      const int64_t ldt = spread_ld(N);
      Lap lap;
      const T *Kg = G ? kgd + bh * G * d : nullptr, *Vg = G ? vgd + bh * G * d : nullptr;
      LayoutHead<T> hd{K.head(bh), V.head(bh), K.ld, V.ld, buf.KT.data(), nullptr, ldt, Kg, Vg, buf.KgT.data(),
                       nullptr, {}};
      if (own) {  // bf16 on the micro-kernel: K^T and V packed instead (odd pairs too for an odd block size)
        hd.KT = hd.KgT = nullptr;
        hd.pk = pack_task<T>(buf.pk, true, false, c % 2, K.head(bh), K.ld, V.head(bh), V.ld, N, ldt, Kg, Vg, G, d, 1.f);
      } else {
        transpose(K.head(bh), K.ld, N, d, 1.f, buf.KT.data(), ldt);
        if (G) transpose(Kg, d, G, d, 1.f, buf.KgT.data(), G);
      }
      lap(kCopy);
      for (int64_t i = i0; i < i1; ++i) {
        layout_forward_tile<T>(g, buf, bh, i, Q.head(bh) + i * c * Q.ld, Q.ld, hd, O.head(bh) + i * c * O.ld,
                               O.ld, ld + bh * N + i * c);
      }
    }
  });
  return {out, lse};
}

// Backward tasks: one per (batch, head), its query blocks in order, so that the dK^T, dV^T of every key
// block (which random blocks reach from anywhere in the head) accumulate in the task's own buffers in
// one summation order, whatever the number of threads; then written out transposed back.
template <typename T>
std::vector<at::Tensor> layout_backward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& kg, const at::Tensor& vg, const at::Tensor& out,
                                             const at::Tensor& dout, const at::Tensor& lse, const LayoutGeo& g) {
  const int64_t B = g.B, H = g.H, BH = B * H, c = g.c, d = g.d, nb = g.nb, N = g.N, G = g.G;
  auto f32 = q.options().dtype(at::kFloat);
  auto dq = at::empty({B, H, N, d}, f32), dk = at::empty({B, H, N, d}, f32), dv = at::empty({B, H, N, d}, f32);
  auto dkg = at::empty({B, H, G, d}, f32), dvg = at::empty({B, H, G, d}, f32);
  const Seq<T> Q(q, H), K(k, H), V(v, H), O(out, H), dO(dout, H);
  const Seq<float> dQ(dq, H), dK(dk, H), dV(dv, H);
  const T *kgd = G ? kg.data_ptr<T>() : nullptr, *vgd = G ? vg.data_ptr<T>() : nullptr;
  const float* ld = lse.data_ptr<float>();
  float *dkgd = dkg.data_ptr<float>(), *dvgd = dvg.data_ptr<float>();
  const bool own = std::is_same_v<T, bf16> && own_bf16(g.brgemm);
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      LayoutBuffers<T>& buf = layout_buffers<T>(g, true);
      const int64_t ldt = spread_ld(N);
      Lap lap;
      const T *Kh = K.head(bh), *Vh = V.head(bh);
      const T *Kg = G ? kgd + bh * G * d : nullptr, *Vg = G ? vgd + bh * G * d : nullptr;
      const PackedOps pk = begin_backward_task(buf, own, c % 2, Kh, K.ld, Vh, V.ld, N, ldt, Kg, Vg, G, d, 1.f);  // q arrives scaled
      lap(kCopy);
      const LayoutHead<T> hd{Kh, Vh, K.ld, V.ld, own ? nullptr : buf.KT.data(), own ? nullptr : buf.VT.data(), ldt, Kg,
                             Vg, own ? nullptr : buf.KgT.data(), own ? nullptr : buf.VgT.data(), pk};
      for (int64_t i = 0; i < nb; ++i) {
        const int64_t row = i * c;
        layout_backward_tile<T>(g, buf, bh, i, Q.head(bh) + row * Q.ld, Q.ld, hd, O.head(bh) + row * O.ld, O.ld,
                                dO.head(bh) + row * dO.ld, dO.ld, ld + bh * N + row, dQ.head(bh) + row * dQ.ld,
                                dQ.ld);
      }
      Lap lap2;
      transpose(buf.dKT.data(), ldt, d, N, 1.f, dK.head(bh), dK.ld);
      transpose(buf.dVT.data(), ldt, d, N, 1.f, dV.head(bh), dV.ld);
      if (G) {
        transpose(buf.dKgT.data(), G, d, G, 1.f, dkgd + bh * G * d, d);
        transpose(buf.dVgT.data(), G, d, G, 1.f, dvgd + bh * G * d, d);
      }
      lap2(kCopy);
    }
  });
  return {dq, dk, dv, dkg, dvg};
}

LayoutGeo make_layout_geo(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kg,
                          const at::Tensor& vg, const at::Tensor& cols, const at::Tensor& col_ok,
                          const at::Tensor& valid, const at::Tensor& g_valid) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "longctx fused layout attention: q, k, v must be (B, H, nb * b, d) alike");
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->stride(3) == 1 && t->stride(2) >= t->size(3),
                "longctx fused layout attention: rows of q, k, v must be dense");
  }
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "longctx fused layout attention runs float32 and bfloat16");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
              kg.scalar_type() == q.scalar_type() && vg.scalar_type() == q.scalar_type(),
              "longctx fused layout attention: q, k, v, kg, vg must share a dtype");
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), d = q.size(3);
  TORCH_CHECK(kg.dim() == 4 && kg.size(0) == B && kg.size(1) == H && kg.size(3) == d && vg.sizes() == kg.sizes() &&
              kg.is_contiguous() && vg.is_contiguous(),
              "longctx fused layout attention: kg, vg must be contiguous (B, H, G, d)");
  TORCH_CHECK(cols.dim() == 3 && cols.size(0) == H && cols.scalar_type() == at::kLong && cols.is_contiguous() &&
              col_ok.sizes() == cols.sizes() && col_ok.scalar_type() == at::kByte && col_ok.is_contiguous(),
              "longctx fused layout attention: cols (H, nb, W) int64 and col_ok (H, nb, W) uint8, contiguous");
  TORCH_CHECK(valid.dim() == 3 && valid.size(0) == B && valid.size(1) == cols.size(1) &&
              valid.size(1) * valid.size(2) == N && valid.scalar_type() == at::kByte && valid.is_contiguous(),
              "longctx fused layout attention: valid must be contiguous (B, nb, b) uint8 with nb * b = n");
  TORCH_CHECK(g_valid.dim() == 2 && g_valid.size(0) == B && g_valid.size(1) == kg.size(2) &&
              g_valid.scalar_type() == at::kByte && g_valid.is_contiguous(),
              "longctx fused layout attention: g_valid must be contiguous (B, G) uint8");
  return LayoutGeo(q, kg, cols, col_ok, valid, g_valid);
}

std::vector<at::Tensor> layout_forward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor kg, at::Tensor vg,
                                       at::Tensor cols, at::Tensor col_ok, at::Tensor valid, at::Tensor g_valid) {
  const LayoutGeo g = make_layout_geo(q, k, v, kg, vg, cols, col_ok, valid, g_valid);
  if (q.scalar_type() == at::kFloat) return layout_forward_impl<float>(q, k, v, kg, vg, g);
  return layout_forward_impl<bf16>(q, k, v, kg, vg, g);
}

std::vector<at::Tensor> layout_backward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor kg, at::Tensor vg,
                                        at::Tensor out, at::Tensor dout, at::Tensor lse, at::Tensor cols,
                                        at::Tensor col_ok, at::Tensor valid, at::Tensor g_valid) {
  const LayoutGeo g = make_layout_geo(q, k, v, kg, vg, cols, col_ok, valid, g_valid);
  TORCH_CHECK(out.sizes() == q.sizes() && dout.sizes() == q.sizes() && out.stride(3) == 1 && dout.stride(3) == 1 &&
              out.stride(2) >= g.d && dout.stride(2) >= g.d && out.scalar_type() == q.scalar_type() &&
              dout.scalar_type() == q.scalar_type(),
              "longctx fused layout attention: bad output or gradient layout");
  TORCH_CHECK(lse.is_contiguous() && lse.numel() == g.B * g.H * g.N && lse.scalar_type() == at::kFloat,
              "longctx fused layout attention: bad log-sum-exp");
  if (q.scalar_type() == at::kFloat) return layout_backward_impl<float>(q, k, v, kg, vg, out, dout, lse, g);
  return layout_backward_impl<bf16>(q, k, v, kg, vg, out, dout, lse, g);
}

// Which bf16 product path the kernels take now (LONGCTX_FUSED_GEMM is read per call, as by the kernels).
std::string bf16_products() {
  const char* blas = std::getenv("LONGCTX_FUSED_GEMM");
  const bool mkl = blas && std::string(blas) == "mkl";
#if defined(LONGCTX_BF16_UKERNEL)
  return mkl ? "MKL gemm_bf16bf16f32 (LONGCTX_FUSED_GEMM=mkl)" : "avx512-bf16 micro-kernel";
#else
  return mkl ? "MKL gemm_bf16bf16f32 (LONGCTX_FUSED_GEMM=mkl)" : "MKL gemm_bf16bf16f32 (built without AVX512-BF16)";
#endif
}

// One bf16 product as the kernels run it, for tests: c (m x n fp32) + a (m x k bf16) b (k x n bf16) if acc,
// else a b; rows of a, b and c may have any stride (unit stride along a row). own: the micro-kernel
// (where built; MKL otherwise), else MKL.
at::Tensor bf16_gemm(at::Tensor a, at::Tensor b, at::Tensor c, bool acc, bool own) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2 && a.size(1) == b.size(0) && c.size(0) == a.size(0) &&
              c.size(1) == b.size(1), "bf16_gemm: shapes");
  TORCH_CHECK(a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16 && c.scalar_type() == at::kFloat,
              "bf16_gemm: a, b bf16 and c fp32");
  TORCH_CHECK(a.stride(1) == 1 && b.stride(1) == 1 && c.stride(1) == 1, "bf16_gemm: rows must be dense");
  auto out = c.clone(at::MemoryFormat::Contiguous);
  const int64_t m = a.size(0), n = b.size(1), k = a.size(1);
  nn(own, m, n, k, a.data_ptr<bf16>(), std::max<int64_t>(a.stride(0), 1), b.data_ptr<bf16>(),
     std::max<int64_t>(b.stride(0), 1), out.data_ptr<float>(), std::max<int64_t>(out.stride(0), 1), acc);
  return out;
}

// The softmax's exp as the bf16 kernel computes it, for tests: exp_bf16 of each element of x (fp32,
// contiguous; arguments <= 0), 16 lanes at a time and the scalar version for the tail, as in the rows.
at::Tensor bf16_exp(at::Tensor x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "bf16_exp: contiguous fp32");
  auto out = at::empty_like(x);
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t n = x.numel();
  int64_t j = 0;
  for (; j + kW <= n; j += kW) vstore(dst + j, exp_bf16(vload(src + j)));
  for (; j < n; ++j) dst[j] = exp_bf16(src[j]);
  return out;
}

}  // namespace

TORCH_LIBRARY(longctx_fused, m) {
  m.def("band_forward(Tensor q, Tensor k, Tensor v, Tensor kg, Tensor vg, Tensor local, Tensor kvalid, "
        "Tensor q_pos, Tensor k_pos, Tensor g_pos, Tensor g_valid, Tensor slopes, int B, int H, bool causal, "
        "int left, float scale) -> Tensor[]");
  m.def("band_backward(Tensor q, Tensor k, Tensor v, Tensor kg, Tensor vg, Tensor out, Tensor dout, "
        "Tensor lse, Tensor local, Tensor kvalid, Tensor q_pos, Tensor k_pos, Tensor g_pos, Tensor g_valid, "
        "Tensor slopes, int B, int H, bool causal, int left, float scale) -> Tensor[]");
  m.def("band_profile(bool reset) -> Tensor", band_profile);
  m.def("bf16_products() -> str", bf16_products);
  m.def("layout_forward(Tensor q, Tensor k, Tensor v, Tensor kg, Tensor vg, Tensor cols, Tensor col_ok, "
        "Tensor valid, Tensor g_valid) -> Tensor[]");
  m.def("layout_backward(Tensor q, Tensor k, Tensor v, Tensor kg, Tensor vg, Tensor out, Tensor dout, "
        "Tensor lse, Tensor cols, Tensor col_ok, Tensor valid, Tensor g_valid) -> Tensor[]");
  m.def("bf16_gemm(Tensor a, Tensor b, Tensor c, bool acc, bool own) -> Tensor");
  m.def("bf16_exp(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(longctx_fused, CPU, m) {
  m.impl("band_forward", band_forward);
  m.impl("band_backward", band_backward);
  m.impl("layout_forward", layout_forward);
  m.impl("layout_backward", layout_backward);
  m.impl("bf16_gemm", bf16_gemm);
  m.impl("bf16_exp", bf16_exp);
}
