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
// Keys and values come unpadded, (B H, n, d): padded key p is real key p - left, and no tile's products
// reach a padded key (they are never valid), so neither the inputs nor dK, dV are copied into a padded
// layout. Per chunk, each query row's allowed band keys lie in [lo, hi) (RowSpan): exp, masks and
// products skip the rest. Products: fp32 on oneDNN's BRGEMM (ATen), MKL's sgemm as the alternative;
// bf16 on MKL's gemm_bf16bf16f32 (fp32 accumulation and output). Softmax statistics are always fp32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void cblas_gemm_bf16bf16f32(int layout, int ta, int tb, int m, int n, int k, float alpha, const uint16_t* a,
                            int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc);
}

namespace {

using bf16 = c10::BFloat16;

// Row-major C (m x n, ldc) = A (m x k, lda) B (k x n, ldb), + C if acc. Every product of the kernel has
// this form (keys and values also go in transposed, dK and dV accumulate transposed), so that fp32 runs
// on oneDNN's BRGEMM micro-kernel (ATen's cpublas::brgemm, JIT-compiled per shape and cached per thread;
// it uses AVX-512 on AMD too, where MKL takes its Zen AVX2 path: measured 10-25% faster on the tile
// shapes here), or on MKL's sgemm with LONGCTX_FUSED_GEMM=mkl. bf16 stays on MKL: oneDNN's bf16 BRGEMM
// wants VNNI-packed operands, which this CPU's ukernel cannot pack, and unpacked it was slower than MKL.
inline void nn(bool brgemm, int m, int n, int k, const float* A, int lda, const float* B, int ldb, float* C,
               int ldc, bool acc) {
  if (brgemm) {
    at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, acc, A, B, C, false);
    return;
  }
  const float one = 1.f, beta = acc ? 1.f : 0.f;  // column-major BLAS on row-major data: C^T = B^T A^T
  sgemm_("N", "N", &n, &m, &k, &one, B, &ldb, A, &lda, &beta, C, &ldc);
}

inline void nn(bool, int m, int n, int k, const bf16* A, int lda, const bf16* B, int ldb, float* C, int ldc,
               bool acc) {
  constexpr int kRowMajor = 101, kNoTrans = 111;
  cblas_gemm_bf16bf16f32(kRowMajor, kNoTrans, kNoTrans, m, n, k, 1.f, reinterpret_cast<const uint16_t*>(A), lda,
                         reinterpret_cast<const uint16_t*>(B), ldb, acc ? 1.f : 0.f, C, ldc);
}

// dst (cols x rows, ld ldd) = src (rows x cols, ld lds)^T
template <typename S, typename D>
inline void transpose(const S* src, int64_t rows, int64_t cols, int64_t lds, D* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t e = 0; e < cols; ++e) dst[e * ldd + r] = static_cast<D>(src[r * lds + e]);
  }
}

// Explicit SIMD through GCC/Clang vector extensions: one source for every x86 level (-march=native
// picks AVX-512 or splits into AVX2 halves); the compiler left the softmax loops scalar when written
// as plain loops (the exp's bit tricks and the max reduction), which made them a quarter of the time.
constexpr int kW = 16;
typedef float vf __attribute__((vector_size(kW * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kW * sizeof(int32_t))));

inline vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
template <typename F>
inline F bcast(float x) {
  return F{} + x;  // a float stays a float; a vector gets x in every lane
}

inline float pow2i(float n) {  // 2^n for an integral n in [-126, 0]
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline vf pow2i(vf n) { return (vf)((__builtin_convertvector(n, vi) + 127) << 23); }

// exp for the softmax (arguments <= 0): Cephes' expf polynomial, about 1 ulp. The reduction rounds
// x log2(e) to the nearest integer by adding 1.5 * 2^23 (no floor call, so it vectorises); glibc's vector
// expf needs -ffast-math, which would break the -inf of masked scores.
template <typename F>
inline F exp_le0(F x) {
  const F lo = bcast<F>(-87.0f), shift = bcast<F>(12582912.0f);
  x = x < lo ? lo : x;
  const F n = (x * 1.44269504088896341f + shift) - shift;
  x = x - n * 0.693359375f + n * 2.12194440e-4f;
  const F z = x * x;
  F p = bcast<F>(1.9875691500e-4f);
  p = p * x + 1.3981999507e-3f;
  p = p * x + 8.3334519073e-3f;
  p = p * x + 4.1665795894e-2f;
  p = p * x + 1.6666665459e-1f;
  p = p * x + 5.0000001201e-1f;
  p = p * z + x + 1.0f;
  return p * pow2i(n);
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

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

// s[j] = exp(s[j] - m) over [lo, hi), 0 where s[j] is -inf (a masked pair) if kMasked; returns the sum.
template <bool kMasked>
inline float row_exp(float* s, int64_t lo, int64_t hi, float m) {
  const vf vm = bcast<vf>(m), ninf = bcast<vf>(kNegInf), zero = bcast<vf>(0.f);
  vf vs = zero;
  int64_t j = lo;
  for (; j + kW <= hi; j += kW) {
    const vf x = vload(s + j);
    vf e = exp_le0(x - vm);
    if (kMasked) e = x == ninf ? zero : e;
    vstore(s + j, e);
    vs += e;
  }
  float sum = 0.f;
  for (int e = 0; e < kW; ++e) sum += vs[e];
  for (; j < hi; ++j) {
    const float e = exp_le0(s[j] - m);
    s[j] = kMasked && s[j] == kNegInf ? 0.f : e;
    sum += s[j];
  }
  return sum;
}

// backward over [lo, hi): s[j] = P = exp(s[j] - lse) (0 where masked if kMasked), dp[j] = dS = P (dP - D)
template <bool kMasked>
inline void row_ds(float* s, float* dp, int64_t lo, int64_t hi, float lse, float D) {
  const vf vl = bcast<vf>(lse), vD = bcast<vf>(D), ninf = bcast<vf>(kNegInf), zero = bcast<vf>(0.f);
  int64_t j = lo;
  for (; j + kW <= hi; j += kW) {
    const vf x = vload(s + j);
    vf p = exp_le0(x - vl);
    if (kMasked) p = x == ninf ? zero : p;
    vstore(s + j, p);
    vstore(dp + j, p * (vload(dp + j) - vD));
  }
  for (; j < hi; ++j) {
    const float p = kMasked && s[j] == kNegInf ? 0.f : exp_le0(s[j] - lse);
    s[j] = p;
    dp[j] = p * (dp[j] - D);
  }
}

inline void zero_cols(float* s, int64_t lo, int64_t hi) {
  if (hi > lo) std::memset(s + lo, 0, (hi - lo) * sizeof(float));
}

// Phase timers for profiling (LONGCTX_FUSED_PROFILE=1): each thread adds the time since its previous lap
// to the phase named; read and reset through the op band_profile. Off, a lap is one branch.
enum Phase { kRows, kQK, kMask, kSoftmax, kPV, kDP, kDS, kDVDK, kDQ, kCopy, kNumPhases };
const bool kProfiling = std::getenv("LONGCTX_FUSED_PROFILE") != nullptr;
std::atomic<int64_t> phase_ns[kNumPhases];

struct Lap {
  std::chrono::steady_clock::time_point t0 = kProfiling ? std::chrono::steady_clock::now()
                                                         : std::chrono::steady_clock::time_point{};
  void operator()(Phase p) {
    if (!kProfiling) return;
    const auto t = std::chrono::steady_clock::now();
    phase_ns[p].fetch_add(std::chrono::duration_cast<std::chrono::nanoseconds>(t - t0).count(),
                          std::memory_order_relaxed);
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
  int64_t B, H, nc, c, nk, span, G, d, L, Ml, Bk, nkeys, left;
  bool causal, brgemm;
  const uint8_t *local, *kvalid, *g_valid;
  const int32_t *q_pos, *k_pos, *g_pos;
  const float* slopes;  // nullptr: no ALiBi
  std::vector<RowSpan> rows;    // (Bk, nc, c)
  std::vector<TileSpan> tiles;  // (Bk, nc)

  Geo(const at::Tensor& q, const at::Tensor& k, const at::Tensor& kg, const at::Tensor& local_,
      const at::Tensor& kvalid_, const at::Tensor& q_pos_, const at::Tensor& k_pos_, const at::Tensor& g_pos_,
      const at::Tensor& g_valid_, const at::Tensor& slopes_, int64_t B_, int64_t H_, bool causal_,
      int64_t left_) {
    B = B_, H = H_, causal = causal_, left = left_;
    const char* blas = std::getenv("LONGCTX_FUSED_GEMM");
    brgemm = !(blas && std::string(blas) == "mkl");
    d = q.size(2);
    c = local_.size(1), span = local_.size(2), Ml = local_.size(0);
    nc = q.size(1) / c, nk = kvalid_.size(1) / c, nkeys = k.size(1);
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
          int64_t lo = -1, hi = 0, count = 0;
          for (int64_t j = 0; j < span; ++j) {
            if (loc[r * span + j] & kv[j]) {
              lo = lo < 0 ? j : lo;
              hi = j + 1, ++count;
            }
          }
          lo = lo < 0 ? 0 : lo;
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

template <typename T>
inline void to_input(const float* src, T* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(src[j]);
}

// The operand of a product that the tile computed in fp32 (P, dS): as is in fp32, rounded to bf16 else
// (only the columns the products read: the tile's band columns and the global ones).
template <typename T>
inline const T* operand(const Geo& g, const float* src, T* buf, TileSpan ts) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t r = 0; r < g.c; ++r) {
      to_input(src + r * g.L + ts.lo, buf + r * g.L + ts.lo, ts.hi - ts.lo);
      to_input(src + r * g.L + g.span, buf + r * g.L + g.span, g.G);
    }
    return buf;
  }
}

// The operands of one head: K^T, V^T (d x nkeys) and the global keys' Kg^T, Vg^T (d x G) besides K, V.
template <typename T>
struct Head {
  const T *K, *V, *KT, *VT, *Kg, *Vg, *KgT, *VgT;
};

// scores of chunk i: S (c x L) = Q_i [K_band | K_g]^T over the tile's band columns [ts.lo, ts.hi) (key
// row r0 = g.band_row(i, ts) onwards) and the global ones, then masked row by row
template <typename T>
void scores(const Geo& g, float* S, const T* Qi, const Head<T>& hd, int64_t b, int64_t h, int64_t i, Lap& lap) {
  const int c = g.c, d = g.d, L = g.L;
  const TileSpan ts = g.tile_of(b, i);
  const int64_t r0 = g.band_row(i, ts);
  if (ts.hi > ts.lo) nn(g.brgemm, c, ts.hi - ts.lo, d, Qi, d, hd.KT + r0, g.nkeys, S + ts.lo, L, false);
  if (g.G) nn(g.brgemm, c, g.G, d, Qi, d, hd.KgT, g.G, S + g.span, L, false);
  lap(kQK);
  const RowSpan* rows = g.rows_of(b, i);
  for (int64_t r = 0; r < c; ++r) g.mask_row(S + r * L, b, h, i, r, rows[r]);
  lap(kMask);
}

// columns of the tile's band outside the row's own [lo, hi): zero in P and dS
inline void zero_outside(float* s, TileSpan ts, const RowSpan& rs) {
  if (rs.hi > rs.lo) {
    zero_cols(s, ts.lo, rs.lo), zero_cols(s, rs.hi, ts.hi);
  } else {
    zero_cols(s, ts.lo, ts.hi);
  }
}

// Softmax of the scores S in place, unnormalised: S = exp(S - rowmax); inv = 1 / row sum (0 for a row
// with no allowed key, whose log-sum-exp is +inf). Normalising the c x d output instead of the c x L
// probabilities saves a pass over the tile.
inline void softmax_rows(const Geo& g, float* S, const RowSpan* rows, TileSpan ts, float* lse, float* inv) {
  const int64_t span = g.span, L = g.L;
  for (int64_t r = 0; r < g.c; ++r) {
    float* s = S + r * L;
    const RowSpan rs = rows[r];
    const float m = row_max(s, span, L, row_max(s, rs.lo, rs.hi, kNegInf));
    if (m == kNegInf) {
      zero_cols(s, ts.lo, ts.hi), zero_cols(s, span, L);
      lse[r] = std::numeric_limits<float>::infinity(), inv[r] = 0.f;
      continue;
    }
    float sum = rs.dense ? row_exp<false>(s, rs.lo, rs.hi, m) : row_exp<true>(s, rs.lo, rs.hi, m);
    sum += row_exp<true>(s, span, L, m);
    zero_outside(s, ts, rs);
    lse[r] = m + std::log(sum), inv[r] = 1.f / sum;
  }
}

template <typename T>
struct Buffers {  // one thread's tile buffers, reused across its tiles
  std::vector<float> S, dP, O, row, dKT, dVT, dKgT, dVgT;  // backward: one head's dK^T, dV^T (d x nkeys)
  std::vector<T> P, dS, QT, dOT;                          // Q_i^T, dO_i^T (d x c)
  Buffers(const Geo& g, bool backward)
      : S(g.c * g.L), dP(backward ? g.c * g.L : 0), O(g.c * g.d), row(g.c), dKT(backward ? g.d * g.nkeys : 0),
        dVT(dKT.size()), dKgT(backward ? g.d * g.G : 0), dVgT(dKgT.size()),
        P(std::is_same_v<T, float> ? 0 : g.c * g.L), dS(std::is_same_v<T, float> || !backward ? 0 : g.c * g.L),
        QT(backward ? g.d * g.c : 0), dOT(QT.size()) {}
};

// one (head bh, chunk i) tile of the forward: out rows (c x d) and their log-sum-exp
template <typename T>
void forward_tile(const Geo& g, Buffers<T>& buf, int64_t bh, int64_t i, const T* Qi, const Head<T>& hd, T* Oi,
                  float* lse) {
  Lap lap;
  const int64_t b = bh / g.H, h = bh % g.H, c = g.c, d = g.d, L = g.L;
  const TileSpan ts = g.tile_of(b, i);
  scores<T>(g, buf.S.data(), Qi, hd, b, h, i, lap);
  softmax_rows(g, buf.S.data(), g.rows_of(b, i), ts, lse, buf.row.data());
  lap(kSoftmax);
  const T* P = operand<T>(g, buf.S.data(), buf.P.data(), ts);
  float* O = buf.O.data();
  if (ts.hi > ts.lo) {
    nn(g.brgemm, c, d, ts.hi - ts.lo, P + ts.lo, L, hd.V + g.band_row(i, ts) * d, d, O, d, false);
  } else {
    std::fill(O, O + c * d, 0.f);
  }
  if (g.G) nn(g.brgemm, c, d, g.G, P + g.span, L, hd.Vg, d, O, d, true);
  lap(kPV);
  for (int64_t r = 0; r < c; ++r) {
    const float inv = buf.row[r];
    for (int64_t e = 0; e < d; ++e) Oi[r * d + e] = static_cast<T>(O[r * d + e] * inv);
  }
  lap(kCopy);
}

// (..., rows, cols) -> (BH, cols, rows), a copy (global keys come as (B, H, G, d)); in 16 x 16 blocks, in
// parallel over heads (ATen's strided copy took 5% of the kernel's time)
template <typename T>
at::Tensor transposed(const at::Tensor& x) {
  if (!x.numel()) return x;
  const int64_t rows = x.size(-2), cols = x.size(-1), BH = x.numel() / (rows * cols);
  auto out = at::empty({BH, cols, rows}, x.options());
  const T* src = x.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  constexpr int64_t kB = 16;
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h) {
      for (int64_t r0 = 0; r0 < rows; r0 += kB) {
        for (int64_t c0 = 0; c0 < cols; c0 += kB) {
          const int64_t nr = std::min(kB, rows - r0), ncol = std::min(kB, cols - c0);
          const T* sp = src + (h * rows + r0) * cols + c0;
          T* dp = dst + (h * cols + c0) * rows + r0;
          for (int64_t e = 0; e < ncol; ++e) {
            for (int64_t r = 0; r < nr; ++r) dp[e * rows + r] = sp[r * cols + e];
          }
        }
      }
    }
  });
  return out;
}

template <typename T>
Head<T> head(const at::Tensor* t, int64_t bh, const Geo& g) {  // t: k, v, kt, vt, kg, vg, kgt, vgt
  auto at = [&](int j, int64_t size) { return t[j].defined() && t[j].numel() ? t[j].data_ptr<T>() + bh * size : nullptr; };
  const int64_t nd = g.nkeys * g.d, gd = g.G * g.d;
  return {at(0, nd), at(1, nd), at(2, nd), at(3, nd), at(4, gd), at(5, gd), at(6, gd), at(7, gd)};
}

template <typename T>
std::vector<at::Tensor> forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& kg, const at::Tensor& vg, const Geo& g) {
  const int64_t BH = q.size(0), nq = q.size(1);
  auto out = at::empty({BH, nq, g.d}, q.options());
  auto lse = at::empty({BH, nq}, q.options().dtype(at::kFloat));
  const at::Tensor ops[8] = {k, v, transposed<T>(k), at::Tensor(), kg, vg, transposed<T>(kg), at::Tensor()};
  const T* qd = q.data_ptr<T>();
  T* od = out.data_ptr<T>();
  float* ld = lse.data_ptr<float>();
  const int64_t c = g.c, d = g.d;
  at::parallel_for(0, BH * g.nc, 1, [&](int64_t begin, int64_t end) {
    Buffers<T> buf(g, false);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / g.nc, i = t % g.nc, row0 = bh * nq + i * c;
      forward_tile<T>(g, buf, bh, i, qd + row0 * d, head<T>(ops, bh, g), od + row0 * d, ld + row0);
    }
  });
  return {out, lse};
}

// Backward's elementwise part of a tile, in place: S -> P (recomputed from the saved log-sum-exp),
// dP -> dS = P (dP - D) with D_r = rowsum(dP * P) = dO_r . O_r; zero outside each row's allowed keys.
template <typename T>
void ds_rows(const Geo& g, float* S, float* dP, float* D, const RowSpan* rows, TileSpan ts, const T* dOi,
             const T* Oi, const float* lse) {
  const int64_t span = g.span, L = g.L, d = g.d;
  for (int64_t r = 0; r < g.c; ++r) {
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t e = 0; e < d; ++e) acc += static_cast<float>(dOi[r * d + e]) * static_cast<float>(Oi[r * d + e]);
    D[r] = acc;
  }
  for (int64_t r = 0; r < g.c; ++r) {
    float *s = S + r * L, *dp = dP + r * L;
    const RowSpan rs = rows[r];
    const float l = lse[r];
    if (l == std::numeric_limits<float>::infinity()) {  // no allowed key
      zero_cols(s, ts.lo, ts.hi), zero_cols(s, span, L), zero_cols(dp, ts.lo, ts.hi), zero_cols(dp, span, L);
      continue;
    }
    if (rs.dense) {
      row_ds<false>(s, dp, rs.lo, rs.hi, l, D[r]);
    } else {
      row_ds<true>(s, dp, rs.lo, rs.hi, l, D[r]);
    }
    row_ds<true>(s, dp, span, L, l, D[r]);
    zero_outside(s, ts, rs), zero_outside(dp, ts, rs);
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

// one (head bh, chunk i) tile of the backward: dQ_i (c x d) written, dK^T, dV^T of the band and of the
// global keys accumulated in buf
template <typename T>
double backward_tile(const Geo& g, Buffers<T>& buf, int64_t bh, int64_t i, const T* Qi, const Head<T>& hd,
                     const T* Oi, const T* dOi, const float* lse, float* dQi) {
  Lap lap;
  const int64_t b = bh / g.H, h = bh % g.H, c = g.c, d = g.d, L = g.L, span = g.span, G = g.G;
  const TileSpan ts = g.tile_of(b, i);
  const int nb = ts.hi - ts.lo;
  const int64_t r0 = g.band_row(i, ts);
  const bool brg = g.brgemm;
  float *S = buf.S.data(), *dP = buf.dP.data();
  scores<T>(g, S, Qi, hd, b, h, i, lap);
  // dP (c x L) = dO_i [V_band | V_g]^T
  if (nb) nn(brg, c, nb, d, dOi, d, hd.VT + r0, g.nkeys, dP + ts.lo, L, false);
  if (G) nn(brg, c, G, d, dOi, d, hd.VgT, G, dP + span, L, false);
  lap(kDP);
  const RowSpan* rows = g.rows_of(b, i);
  ds_rows<T>(g, S, dP, buf.row.data(), rows, ts, dOi, Oi, lse);
  const double dslope = g.slopes ? slope_grad(g, dP, rows, b, i) : 0.0;
  lap(kDS);
  const T* P = operand<T>(g, S, buf.P.data(), ts);
  const T* dS = operand<T>(g, dP, buf.dS.data(), ts);
  T *QT = buf.QT.data(), *dOT = buf.dOT.data();
  transpose(Qi, c, d, d, QT, c), transpose(dOi, c, d, d, dOT, c);
  lap(kCopy);
  // dV^T_band += dO_i^T P, dK^T_band += Q_i^T dS (the band's keys are contiguous columns of dK^T)
  if (nb) {
    nn(brg, d, nb, c, dOT, c, P + ts.lo, L, buf.dVT.data() + r0, g.nkeys, true);
    nn(brg, d, nb, c, QT, c, dS + ts.lo, L, buf.dKT.data() + r0, g.nkeys, true);
  }
  if (G) {
    nn(brg, d, G, c, dOT, c, P + span, L, buf.dVgT.data(), G, true);
    nn(brg, d, G, c, QT, c, dS + span, L, buf.dKgT.data(), G, true);
  }
  lap(kDVDK);
  // dQ_i = dS [K_band | K_g]
  if (nb) {
    nn(brg, c, d, nb, dS + ts.lo, L, hd.K + r0 * d, d, dQi, d, false);
  } else {
    std::fill(dQi, dQi + c * d, 0.f);
  }
  if (G) nn(brg, c, d, G, dS + span, L, hd.Kg, d, dQi, d, true);
  lap(kDQ);
  return dslope;
}

// out (rows x cols) = the accumulated transpose acc (cols x rows), which is zeroed for the next head
inline void untranspose(std::vector<float>& acc, int64_t cols, int64_t rows, float* out) {
  transpose(acc.data(), cols, rows, rows, out, cols);
  std::fill(acc.begin(), acc.end(), 0.f);
}

template <typename T>
std::vector<at::Tensor> backward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& kg, const at::Tensor& vg, const at::Tensor& out,
                                      const at::Tensor& dout, const at::Tensor& lse, const Geo& g) {
  const int64_t BH = q.size(0), nq = q.size(1), nkeys = g.nkeys;
  const int64_t c = g.c, d = g.d, G = g.G;
  auto f32 = q.options().dtype(at::kFloat);
  auto dq = at::empty({BH, nq, d}, f32), dk = at::empty({BH, nkeys, d}, f32), dv = at::empty({BH, nkeys, d}, f32);
  auto dkg = at::empty({BH, G, d}, f32), dvg = at::empty({BH, G, d}, f32);
  auto dslopes = at::zeros({BH}, q.options().dtype(at::kDouble));
  const at::Tensor ops[8] = {k, v, transposed<T>(k), transposed<T>(v), kg, vg, transposed<T>(kg), transposed<T>(vg)};
  const T *qd = q.data_ptr<T>(), *od = out.data_ptr<T>(), *dod = dout.data_ptr<T>();
  const float* ld = lse.data_ptr<float>();
  float *dqd = dq.data_ptr<float>(), *dkd = dk.data_ptr<float>(), *dvd = dv.data_ptr<float>();
  float *dkgd = dkg.data_ptr<float>(), *dvgd = dvg.data_ptr<float>();
  double* dsd = dslopes.data_ptr<double>();
  // one head per task: the bands of neighbouring chunks overlap, so dK and dV of a head are accumulated
  // by one thread, in chunk order (deterministic), in its own transposed buffers
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    Buffers<T> buf(g, true);
    for (int64_t bh = begin; bh < end; ++bh) {
      const Head<T> hd = head<T>(ops, bh, g);
      double dslope = 0.0;
      for (int64_t i = 0; i < g.nc; ++i) {
        const int64_t row0 = bh * nq + i * c;
        dslope += backward_tile<T>(g, buf, bh, i, qd + row0 * d, hd, od + row0 * d, dod + row0 * d, ld + row0,
                                   dqd + row0 * d);
      }
      Lap lap;
      untranspose(buf.dKT, d, nkeys, dkd + bh * nkeys * d), untranspose(buf.dVT, d, nkeys, dvd + bh * nkeys * d);
      untranspose(buf.dKgT, d, G, dkgd + bh * G * d), untranspose(buf.dVgT, d, G, dvgd + bh * G * d);
      lap(kCopy);
      dsd[bh] = dslope;
    }
  });
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
             int64_t H, bool causal, int64_t left) {
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && local.is_contiguous() && kvalid.is_contiguous(),
              "longctx fused attention: inputs must be contiguous");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "longctx fused attention runs float32 and bfloat16");
  TORCH_CHECK(k.size(1) + left <= kvalid.size(1) && left >= 0, "longctx fused attention: bad key padding");
  return Geo(q, k, kg, local, kvalid, q_pos, k_pos, g_pos, g_valid, slopes, B, H, causal, left);
}

std::vector<at::Tensor> band_forward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor kg, at::Tensor vg,
                                     at::Tensor local, at::Tensor kvalid, at::Tensor q_pos, at::Tensor k_pos,
                                     at::Tensor g_pos, at::Tensor g_valid, at::Tensor slopes, int64_t B,
                                     int64_t H, bool causal, int64_t left) {
  const Geo g = make_geo(q, k, v, kg, local, kvalid, q_pos, k_pos, g_pos, g_valid, slopes, B, H, causal, left);
  if (q.scalar_type() == at::kFloat) return forward_impl<float>(q, k, v, kg, vg, g);
  return forward_impl<bf16>(q, k, v, kg, vg, g);
}

std::vector<at::Tensor> band_backward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor kg, at::Tensor vg,
                                      at::Tensor out, at::Tensor dout, at::Tensor lse, at::Tensor local,
                                      at::Tensor kvalid, at::Tensor q_pos, at::Tensor k_pos, at::Tensor g_pos,
                                      at::Tensor g_valid, at::Tensor slopes, int64_t B, int64_t H, bool causal,
                                      int64_t left) {
  const Geo g = make_geo(q, k, v, kg, local, kvalid, q_pos, k_pos, g_pos, g_valid, slopes, B, H, causal, left);
  if (q.scalar_type() == at::kFloat) return backward_impl<float>(q, k, v, kg, vg, out, dout, lse, g);
  return backward_impl<bf16>(q, k, v, kg, vg, out, dout, lse, g);
}

}  // namespace

TORCH_LIBRARY(longctx_fused, m) {
  m.def("band_forward(Tensor q, Tensor k, Tensor v, Tensor kg, Tensor vg, Tensor local, Tensor kvalid, "
        "Tensor q_pos, Tensor k_pos, Tensor g_pos, Tensor g_valid, Tensor slopes, int B, int H, bool causal, "
        "int left) -> Tensor[]");
  m.def("band_backward(Tensor q, Tensor k, Tensor v, Tensor kg, Tensor vg, Tensor out, Tensor dout, "
        "Tensor lse, Tensor local, Tensor kvalid, Tensor q_pos, Tensor k_pos, Tensor g_pos, Tensor g_valid, "
        "Tensor slopes, int B, int H, bool causal, int left) -> Tensor[]");
  m.def("band_profile(bool reset) -> Tensor", band_profile);
}

TORCH_LIBRARY_IMPL(longctx_fused, CPU, m) {
  m.impl("band_forward", band_forward);
  m.impl("band_backward", band_backward);
}
