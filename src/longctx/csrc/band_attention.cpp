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
// Products go to MKL (bundled with the PyTorch CPU build): sgemm in fp32, gemm_bf16bf16f32 in bf16
// (fp32 accumulation and output). Softmax statistics are always fp32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
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

// Row-major C (m x n, ldc) = op(A) (m x k) op(B) (k x n) + beta C; ta / tb: A / B are stored transposed.
inline void gemm(bool ta, bool tb, int m, int n, int k, const float* A, int lda, const float* B, int ldb,
                 float beta, float* C, int ldc) {
  // column-major BLAS on row-major data: C^T = op(B)^T op(A)^T
  const char cta = ta ? 'T' : 'N', ctb = tb ? 'T' : 'N';
  const float one = 1.f;
  sgemm_(&ctb, &cta, &n, &m, &k, &one, B, &ldb, A, &lda, &beta, C, &ldc);
}

inline void gemm(bool ta, bool tb, int m, int n, int k, const bf16* A, int lda, const bf16* B, int ldb,
                 float beta, float* C, int ldc) {
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
  cblas_gemm_bf16bf16f32(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, m, n, k, 1.f,
                         reinterpret_cast<const uint16_t*>(A), lda, reinterpret_cast<const uint16_t*>(B), ldb,
                         beta, C, ldc);
}

// exp for the softmax (arguments <= 0): Cephes' expf polynomial, about 1 ulp, written so the compiler
// vectorises it (glibc's vector expf needs -ffast-math, which would break the -inf of masked scores).
inline float exp_le0(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  x = x - n * 0.693359375f + n * 2.12194440e-4f;
  const float z = x * x;
  float p = 1.9875691500e-4f;
  p = p * x + 1.3981999507e-3f;
  p = p * x + 8.3334519073e-3f;
  p = p * x + 4.1665795894e-2f;
  p = p * x + 1.6666665459e-1f;
  p = p * x + 5.0000001201e-1f;
  p = p * z + x + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Geo {
  int64_t B, H, nc, c, nk, span, G, d, L, Ml, Bk;
  bool causal;
  const uint8_t *local, *kvalid, *g_valid;
  const int32_t *q_pos, *k_pos, *g_pos;
  const float* slopes;  // nullptr: no ALiBi

  Geo(const at::Tensor& q, const at::Tensor& k, const at::Tensor& kg, const at::Tensor& local_,
      const at::Tensor& kvalid_, const at::Tensor& q_pos_, const at::Tensor& k_pos_, const at::Tensor& g_pos_,
      const at::Tensor& g_valid_, const at::Tensor& slopes_, int64_t B_, int64_t H_, bool causal_) {
    B = B_, H = H_, causal = causal_;
    d = q.size(2);
    c = local_.size(1), span = local_.size(2), Ml = local_.size(0);
    nc = q.size(1) / c, nk = k.size(1) / c;
    G = kg.numel() ? kg.size(2) : 0;
    L = span + G;
    Bk = kvalid_.size(0);
    local = local_.data_ptr<uint8_t>(), kvalid = kvalid_.data_ptr<uint8_t>();
    q_pos = q_pos_.data_ptr<int32_t>(), k_pos = k_pos_.data_ptr<int32_t>();
    g_pos = G ? g_pos_.data_ptr<int32_t>() : nullptr;
    g_valid = G ? g_valid_.data_ptr<uint8_t>() : nullptr;
    slopes = slopes_.numel() ? slopes_.data_ptr<float>() : nullptr;
  }

  // S (c x L): scores of chunk i; masked pairs become -inf (overwritten, so a NaN in a key a query may
  // not attend never reaches it), ALiBi subtracted from the allowed ones.
  void mask(float* S, int64_t b, int64_t h, int64_t i) const {
    const uint8_t* loc = local + (Ml > 1 ? i : 0) * c * span;
    const uint8_t* kv = kvalid + (Bk > 1 ? b : 0) * nk * c + i * c;
    const int32_t* kp = k_pos + i * c;
    const float slope = slopes ? slopes[h] : 0.f;
    for (int64_t r = 0; r < c; ++r) {
      float* s = S + r * L;
      const uint8_t* lr = loc + r * span;
      const int32_t qp = q_pos[i * c + r];
      if (slopes) {
#pragma omp simd
        for (int64_t j = 0; j < span; ++j) {
          const float bias = slope * static_cast<float>(std::abs(qp - kp[j]));
          s[j] = (lr[j] & kv[j]) ? s[j] - bias : kNegInf;
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < span; ++j) s[j] = (lr[j] & kv[j]) ? s[j] : kNegInf;
      }
      for (int64_t t = 0; t < G; ++t) {
        const int32_t gp = g_pos[b * G + t];
        const bool ok = g_valid[b * G + t] && (!causal || gp <= qp);
        s[span + t] = ok ? s[span + t] - slope * static_cast<float>(std::abs(qp - gp)) : kNegInf;
      }
    }
  }
};

template <typename T>
inline void to_input(const float* src, T* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(src[j]);
}

// The operand of a product that the tile computed in fp32 (P, dS): as is in fp32, rounded to bf16 else.
template <typename T>
inline const T* operand(const float* src, T* buf, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    to_input(src, buf, n);
    return buf;
  }
}

// scores of chunk i of head bh: S (c x L) = Q_i [K_band | K_g]^T, masked
template <typename T>
void scores(const Geo& g, float* S, const T* Qi, const T* Kb, const T* Kg, int64_t b, int64_t h, int64_t i) {
  const int c = g.c, d = g.d, L = g.L;
  gemm(false, true, c, g.span, d, Qi, d, Kb, d, 0.f, S, L);
  if (g.G) gemm(false, true, c, g.G, d, Qi, d, Kg, d, 0.f, S + g.span, L);
  g.mask(S, b, h, i);
}

template <typename T>
std::vector<at::Tensor> forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& kg, const at::Tensor& vg, const Geo& g) {
  const int64_t BH = q.size(0), nq = q.size(1);
  auto out = at::empty({BH, nq, g.d}, q.options());
  auto lse = at::empty({BH, nq}, q.options().dtype(at::kFloat));
  const T *qd = q.data_ptr<T>(), *kd = k.data_ptr<T>(), *vd = v.data_ptr<T>();
  const T *kgd = g.G ? kg.data_ptr<T>() : nullptr, *vgd = g.G ? vg.data_ptr<T>() : nullptr;
  T* od = out.data_ptr<T>();
  float* ld = lse.data_ptr<float>();
  const int64_t c = g.c, d = g.d, L = g.L, span = g.span, G = g.G;
  at::parallel_for(0, BH * g.nc, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> S(c * L), O(c * d);
    std::vector<T> Pbuf(std::is_same_v<T, float> ? 0 : c * L);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / g.nc, i = t % g.nc, b = bh / g.H, h = bh % g.H;
      const T* Qi = qd + (bh * nq + i * c) * d;
      const T* Kb = kd + (bh * g.nk * c + i * c) * d;
      const T* Vb = vd + (bh * g.nk * c + i * c) * d;
      scores<T>(g, S.data(), Qi, Kb, kgd ? kgd + bh * G * d : nullptr, b, h, i);
      for (int64_t r = 0; r < c; ++r) {  // softmax per row, fp32
        float* s = S.data() + r * L;
        float m = kNegInf;
        for (int64_t j = 0; j < L; ++j) m = s[j] > m ? s[j] : m;
        if (m == kNegInf) {  // no allowed key: the row is zero (and its log-sum-exp +inf)
          std::fill(s, s + L, 0.f);
          ld[bh * nq + i * c + r] = std::numeric_limits<float>::infinity();
          continue;
        }
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < L; ++j) {
          const float e = exp_le0(s[j] - m);
          s[j] = s[j] == kNegInf ? 0.f : e;
          sum += s[j];
        }
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t j = 0; j < L; ++j) s[j] *= inv;
        ld[bh * nq + i * c + r] = m + std::log(sum);
      }
      const T* P = operand<T>(S.data(), Pbuf.data(), c * L);
      gemm(false, false, c, d, span, P, L, Vb, d, 0.f, O.data(), d);
      if (G) gemm(false, false, c, d, G, P + span, L, vgd + bh * G * d, d, 1.f, O.data(), d);
      to_input(O.data(), od + (bh * nq + i * c) * d, c * d);
    }
  });
  return {out, lse};
}

template <typename T>
std::vector<at::Tensor> backward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& kg, const at::Tensor& vg, const at::Tensor& out,
                                      const at::Tensor& dout, const at::Tensor& lse, const Geo& g) {
  const int64_t BH = q.size(0), nq = q.size(1), nkc = k.size(1);
  const int64_t c = g.c, d = g.d, L = g.L, span = g.span, G = g.G;
  auto f32 = q.options().dtype(at::kFloat);
  auto dq = at::empty({BH, nq, d}, f32);
  auto dk = at::zeros({BH, nkc, d}, f32), dv = at::zeros({BH, nkc, d}, f32);
  auto dkg = at::zeros({BH, G, d}, f32), dvg = at::zeros({BH, G, d}, f32);
  auto dslopes = at::zeros({BH}, q.options().dtype(at::kDouble));
  const T *qd = q.data_ptr<T>(), *kd = k.data_ptr<T>(), *vd = v.data_ptr<T>();
  const T *kgd = G ? kg.data_ptr<T>() : nullptr, *vgd = G ? vg.data_ptr<T>() : nullptr;
  const T *od = out.data_ptr<T>(), *dod = dout.data_ptr<T>();
  const float* ld = lse.data_ptr<float>();
  float *dqd = dq.data_ptr<float>(), *dkd = dk.data_ptr<float>(), *dvd = dv.data_ptr<float>();
  float *dkgd = dkg.data_ptr<float>(), *dvgd = dvg.data_ptr<float>();
  double* dsd = dslopes.data_ptr<double>();
  // one head per task: the bands of neighbouring chunks overlap, so dK and dV of a head are accumulated
  // by one thread, in chunk order (deterministic)
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> S(c * L), dP(c * L), D(c);
    constexpr bool lowp = !std::is_same_v<T, float>;
    std::vector<T> Pbuf(lowp ? c * L : 0), dSbuf(lowp ? c * L : 0);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / g.H, h = bh % g.H;
      const T* Kg = G ? kgd + bh * G * d : nullptr;
      const T* Vg = G ? vgd + bh * G * d : nullptr;
      double dslope = 0.0;
      for (int64_t i = 0; i < g.nc; ++i) {
        const int64_t row0 = bh * nq + i * c, key0 = bh * nkc + i * c;
        const T *Qi = qd + row0 * d, *dOi = dod + row0 * d, *Oi = od + row0 * d;
        const T *Kb = kd + key0 * d, *Vb = vd + key0 * d;
        scores<T>(g, S.data(), Qi, Kb, Kg, b, h, i);
        // dP (c x L) = dO_i [V_band | V_g]^T
        gemm(false, true, c, span, d, dOi, d, Vb, d, 0.f, dP.data(), L);
        if (G) gemm(false, true, c, G, d, dOi, d, Vg, d, 0.f, dP.data() + span, L);
        for (int64_t r = 0; r < c; ++r) {
          float acc = 0.f;  // D_r = rowsum(dP * P) = dO_r . O_r
          for (int64_t e = 0; e < d; ++e) acc += static_cast<float>(dOi[r * d + e]) * static_cast<float>(Oi[r * d + e]);
          D[r] = acc;
        }
        for (int64_t r = 0; r < c; ++r) {  // P recomputed from the saved log-sum-exp; dS = P (dP - D)
          float *s = S.data() + r * L, *dp = dP.data() + r * L;
          const float l = ld[row0 + r], Dr = D[r];
#pragma omp simd
          for (int64_t j = 0; j < L; ++j) {
            const float p = s[j] == kNegInf ? 0.f : exp_le0(s[j] - l);
            s[j] = p;
            dp[j] = p * (dp[j] - Dr);
          }
        }
        if (g.slopes) {  // d score / d slope = -|q - k|
          const int32_t* kp = g.k_pos + i * c;
          for (int64_t r = 0; r < c; ++r) {
            const int32_t qp = g.q_pos[i * c + r];
            const float* dp = dP.data() + r * L;
            for (int64_t j = 0; j < span; ++j) dslope -= dp[j] * std::abs(qp - kp[j]);
            for (int64_t t = 0; t < G; ++t) dslope -= dp[span + t] * std::abs(qp - g.g_pos[b * G + t]);
          }
        }
        const T* P = operand<T>(S.data(), Pbuf.data(), c * L);
        const T* dS = operand<T>(dP.data(), dSbuf.data(), c * L);
        // dV_band += P^T dO_i, dK_band += dS^T Q_i (the band's key rows are contiguous in the padded keys)
        gemm(true, false, span, d, c, P, L, dOi, d, 1.f, dvd + key0 * d, d);
        gemm(true, false, span, d, c, dS, L, Qi, d, 1.f, dkd + key0 * d, d);
        // dQ_i = dS [K_band | K_g]
        gemm(false, false, c, d, span, dS, L, Kb, d, 0.f, dqd + row0 * d, d);
        if (G) {
          gemm(false, false, c, d, G, dS + span, L, Kg, d, 1.f, dqd + row0 * d, d);
          gemm(true, false, G, d, c, P + span, L, dOi, d, 1.f, dvgd + bh * G * d, d);
          gemm(true, false, G, d, c, dS + span, L, Qi, d, 1.f, dkgd + bh * G * d, d);
        }
      }
      dsd[bh] = dslope;
    }
  });
  return {dq, dk, dv, dkg, dvg, dslopes};
}

Geo make_geo(const at::Tensor& q, const at::Tensor& k, const at::Tensor& kg, const at::Tensor& local,
             const at::Tensor& kvalid, const at::Tensor& q_pos, const at::Tensor& k_pos,
             const at::Tensor& g_pos, const at::Tensor& g_valid, const at::Tensor& slopes, int64_t B,
             int64_t H, bool causal) {
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && local.is_contiguous() && kvalid.is_contiguous(),
              "longctx fused attention: inputs must be contiguous");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "longctx fused attention runs float32 and bfloat16");
  return Geo(q, k, kg, local, kvalid, q_pos, k_pos, g_pos, g_valid, slopes, B, H, causal);
}

std::vector<at::Tensor> band_forward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor kg, at::Tensor vg,
                                     at::Tensor local, at::Tensor kvalid, at::Tensor q_pos, at::Tensor k_pos,
                                     at::Tensor g_pos, at::Tensor g_valid, at::Tensor slopes, int64_t B,
                                     int64_t H, bool causal) {
  const Geo g = make_geo(q, k, kg, local, kvalid, q_pos, k_pos, g_pos, g_valid, slopes, B, H, causal);
  if (q.scalar_type() == at::kFloat) return forward_impl<float>(q, k, v, kg, vg, g);
  return forward_impl<bf16>(q, k, v, kg, vg, g);
}

std::vector<at::Tensor> band_backward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor kg, at::Tensor vg,
                                      at::Tensor out, at::Tensor dout, at::Tensor lse, at::Tensor local,
                                      at::Tensor kvalid, at::Tensor q_pos, at::Tensor k_pos, at::Tensor g_pos,
                                      at::Tensor g_valid, at::Tensor slopes, int64_t B, int64_t H, bool causal) {
  const Geo g = make_geo(q, k, kg, local, kvalid, q_pos, k_pos, g_pos, g_valid, slopes, B, H, causal);
  if (q.scalar_type() == at::kFloat) return backward_impl<float>(q, k, v, kg, vg, out, dout, lse, g);
  return backward_impl<bf16>(q, k, v, kg, vg, out, dout, lse, g);
}

}  // namespace

TORCH_LIBRARY(longctx_fused, m) {
  m.def("band_forward(Tensor q, Tensor k, Tensor v, Tensor kg, Tensor vg, Tensor local, Tensor kvalid, "
        "Tensor q_pos, Tensor k_pos, Tensor g_pos, Tensor g_valid, Tensor slopes, int B, int H, bool causal) "
        "-> Tensor[]");
  m.def("band_backward(Tensor q, Tensor k, Tensor v, Tensor kg, Tensor vg, Tensor out, Tensor dout, "
        "Tensor lse, Tensor local, Tensor kvalid, Tensor q_pos, Tensor k_pos, Tensor g_pos, Tensor g_valid, "
        "Tensor slopes, int B, int H, bool causal) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(longctx_fused, CPU, m) {
  m.impl("band_forward", band_forward);
  m.impl("band_backward", band_backward);
}
