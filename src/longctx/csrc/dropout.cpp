// Counter-based dropout for CPU (longctx.dropout): the keep mask of element e is a function of a 64-bit key
// and e alone, drawn from Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC
// 2011; the generator PyTorch's CUDA dropout uses), so
//   - nothing is stored for backward: the backward pass recomputes the same mask from the key;
//   - the mask does not depend on the number of threads or on how the elements are split among them;
//   - 16 counters go through the rounds at once in AVX-512 lanes (a scalar loop where the build has no
//     AVX-512): about 0.2 ns an element on one core, where ATen's bernoulli_ takes 6 (one mt19937 draw and a
//     double compare per element).
// Element e of the flat (contiguous) tensor: block b = e / 64, r = e % 64; counter (16 b + r % 16, as two
// 32-bit words, then 0, 0), key (key & 0xffffffff, key >> 32), word r / 16 of Philox's four. The element is
// kept when that word >= round(p * 2^32), so the drop probability is p to within 2^-33, and a kept element
// is x / (1 - p), a dropped one x * 0 (NaN and inf stay visible, as in ATen). bf16 is computed in fp32 and
// rounded once, to nearest even (vec.h's loads and stores). tests/test_dropout.py checks the generator against Random123's known
// answers and the masks against a NumPy implementation of this definition.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#if defined(__AVX512F__)
#define LONGCTX_DROPOUT_AVX512 1
#include <immintrin.h>
#endif
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "vec.h"

namespace {

using namespace longctx_vec;

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // Philox4x32's multipliers
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // its key schedule (Weyl sequence)
constexpr int kRounds = 10;
constexpr int64_t kBlock = 64;  // elements per 16 counters

// -- scalar Philox4x32-10, one counter ------------------------------------------------------------------------
inline void philox_scalar(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int r = 0; r < kRounds; ++r) {
    if (r) { k0 += kW0; k1 += kW1; }
    const uint64_t p0 = uint64_t{kM0} * c[0], p1 = uint64_t{kM1} * c[2];
    const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0), hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
    const uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0; c[1] = lo1; c[2] = n2; c[3] = lo0;
  }
}

#if defined(LONGCTX_DROPOUT_AVX512)
// -- 16 counters in AVX-512 lanes ---------------------------------------------------------------------------
// lo and hi halves of the 32 x 32 -> 64-bit products a * m, lane by lane: vpmuludq multiplies the even
// lanes, the odd ones go through it shifted down
inline __m512i mulhilo(__m512i a, __m512i m, __m512i* hi) {
  const __m512i pe = _mm512_mul_epu32(a, m);
  const __m512i po = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe, 32), po);
  return _mm512_mask_blend_epi32(0xAAAA, pe, _mm512_slli_epi64(po, 32));
}

inline void philox16(__m512i c[4], uint32_t k0, uint32_t k1) {
  const __m512i m0 = _mm512_set1_epi32(int(kM0)), m1 = _mm512_set1_epi32(int(kM1));
  for (int r = 0; r < kRounds; ++r) {
    if (r) { k0 += kW0; k1 += kW1; }
    __m512i hi0, hi1;
    const __m512i lo0 = mulhilo(c[0], m0, &hi0), lo1 = mulhilo(c[2], m1, &hi1);
    const __m512i n0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c[1]), _mm512_set1_epi32(int(k0)));
    const __m512i n2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c[3]), _mm512_set1_epi32(int(k1)));
    c[0] = n0; c[1] = lo1; c[2] = n2; c[3] = lo0;
  }
}

// the four words of the 16 counters 16 b .. 16 b + 15 (as two 32-bit words each, then 0, 0)
inline void block_words(int64_t b, uint32_t k0, uint32_t k1, __m512i w[4]) {
  const uint64_t first = uint64_t(b) * 16;
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const uint32_t lo = uint32_t(first), hi = uint32_t(first >> 32);
  // first is a multiple of 16, so lo + lane never carries into the high word
  w[0] = _mm512_add_epi32(_mm512_set1_epi32(int(lo)), lane);
  w[1] = _mm512_set1_epi32(int(hi));
  w[2] = _mm512_setzero_si512();
  w[3] = _mm512_setzero_si512();
  philox16(w, k0, k1);
}

#endif

template <typename T>
void apply_scalar(const T* x, T* y, int64_t n, int64_t b0, int64_t b1, uint32_t k0, uint32_t k1, uint32_t thr,
                  float scale) {
  for (int64_t b = b0; b < b1; ++b) {
    uint32_t w[4][16];
    for (int lane = 0; lane < 16; ++lane) {
      const uint64_t ctr = uint64_t(b) * 16 + lane;
      uint32_t c[4] = {uint32_t(ctr), uint32_t(ctr >> 32), 0u, 0u};
      philox_scalar(c, k0, k1);
      for (int j = 0; j < 4; ++j) w[j][lane] = c[j];
    }
    for (int j = 0; j < 4; ++j)
      for (int lane = 0; lane < 16; ++lane) {
        const int64_t e = b * kBlock + 16 * j + lane;
        if (e >= n) break;
        y[e] = T(float(x[e]) * (w[j][lane] >= thr ? scale : 0.0f));  // bf16: to nearest even
      }
  }
}

#if defined(LONGCTX_DROPOUT_AVX512)
template <typename T>
void apply_avx512(const T* x, T* y, int64_t n, int64_t b0, int64_t b1, uint32_t k0, uint32_t k1, uint32_t thr,
                  float scale) {
  const __m512i vthr = _mm512_set1_epi32(int(thr));
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t b = b0; b < b1; ++b) {
    __m512i w[4];
    block_words(b, k0, k1, w);
    for (int j = 0; j < 4; ++j) {
      const int64_t e = b * kBlock + 16 * j;
      if (e >= n) break;
      const __mmask16 keep = _mm512_cmpge_epu32_mask(w[j], vthr);
      const vf s = (vf)_mm512_maskz_mov_ps(keep, vscale);  // x * 0 where dropped: NaN and inf stay visible
      if (n - e >= kW) {
        vstore_as(y + e, vload_as(x + e) * s);
      } else {  // the last, partial vector
        for (int64_t lane = 0; lane < n - e; ++lane) y[e + lane] = T(float(x[e + lane]) * s[lane]);
      }
    }
  }
}
#endif

template <typename T>
void apply_blocks(const T* x, T* y, int64_t n, int64_t b0, int64_t b1, uint32_t k0, uint32_t k1, uint32_t thr,
                  float scale, bool vector) {
#if defined(LONGCTX_DROPOUT_AVX512)
  if (vector) return apply_avx512(x, y, n, b0, b1, k0, k1, thr, scale);
#endif
  apply_scalar(x, y, n, b0, b1, k0, k1, thr, scale);
}

uint32_t threshold(double p) {
  const double t = std::nearbyint(p * 4294967296.0);
  return t >= 4294967295.0 ? 0xFFFFFFFFu : uint32_t(t);
}

// vector=false takes the scalar loop (for the tests: both paths give the same bits)
at::Tensor dropout(const at::Tensor& x_, double p, int64_t key, bool vector) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout probability must be in [0, 1), got ", p);
  TORCH_CHECK(x_.device().is_cpu(), "longctx_dropout.dropout runs on CPU tensors");
  TORCH_CHECK(x_.scalar_type() == at::kFloat || x_.scalar_type() == at::kBFloat16,
              "longctx_dropout.dropout takes float32 or bfloat16, got ", x_.scalar_type());
  const at::Tensor x = x_.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n = x.numel();
  if (n == 0) return y;
  const uint64_t ukey = uint64_t(key);
  const uint32_t k0 = uint32_t(ukey), k1 = uint32_t(ukey >> 32), thr = threshold(p);
  const float scale = float(1.0 / (1.0 - p));
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 1024, [&](int64_t b0, int64_t b1) {
    if (x.scalar_type() == at::kFloat)
      apply_blocks(x.data_ptr<float>(), y.data_ptr<float>(), n, b0, b1, k0, k1, thr, scale, vector);
    else
      apply_blocks(x.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(), n, b0, b1, k0, k1, thr, scale, vector);
  });
  return y;
}

// Philox4x32-10 of each row of `counters` (m, 4) under the key (k0, k1), as int64 (m, 4): for the tests,
// on the vector path (16 counters at once, where the build has AVX-512) or the scalar one
at::Tensor philox(const at::Tensor& counters, int64_t k0_, int64_t k1_, bool vector) {
  TORCH_CHECK(counters.dim() == 2 && counters.size(1) == 4 && counters.scalar_type() == at::kLong,
              "philox takes an (m, 4) int64 tensor of 32-bit counter words");
  const at::Tensor c = counters.contiguous();
  const int64_t m = c.size(0);
  at::Tensor out = at::empty({m, 4}, c.options());
  const int64_t* in = c.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  const uint32_t k0 = uint32_t(k0_), k1 = uint32_t(k1_);
  for (int64_t r0 = 0; r0 < m; r0 += 16) {
    uint32_t w[4][16] = {};
    const int64_t len = std::min<int64_t>(16, m - r0);
    for (int64_t i = 0; i < len; ++i)
      for (int j = 0; j < 4; ++j) w[j][i] = uint32_t(in[(r0 + i) * 4 + j]);
#if defined(LONGCTX_DROPOUT_AVX512)
    if (vector) {
      __m512i v[4];
      for (int j = 0; j < 4; ++j) v[j] = _mm512_loadu_si512(w[j]);
      philox16(v, k0, k1);
      for (int j = 0; j < 4; ++j) _mm512_storeu_si512(w[j], v[j]);
    }
#else
    vector = false;
#endif
    if (!vector)
      for (int64_t i = 0; i < len; ++i) {
        uint32_t ctr[4] = {w[0][i], w[1][i], w[2][i], w[3][i]};
        philox_scalar(ctr, k0, k1);
        for (int j = 0; j < 4; ++j) w[j][i] = ctr[j];
      }
    for (int64_t i = 0; i < len; ++i)
      for (int j = 0; j < 4; ++j) o[(r0 + i) * 4 + j] = int64_t(w[j][i]);
  }
  return out;
}

std::string path() {
#if defined(LONGCTX_DROPOUT_AVX512)
  return "avx512";
#else
  return "scalar";
#endif
}

}  // namespace

TORCH_LIBRARY(longctx_dropout, m) {
  m.def("dropout(Tensor x, float p, int key, bool vector=True) -> Tensor");
  m.def("philox(Tensor counters, int k0, int k1, bool vector=True) -> Tensor");
  m.def("path() -> str", path);
}

TORCH_LIBRARY_IMPL(longctx_dropout, CPU, m) {
  m.impl("dropout", dropout);
  m.impl("philox", philox);
}
