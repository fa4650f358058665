// Cross-entropy over a large vocabulary for CPU (longctx.loss): per row i of logits z (N, V), fp32 or bf16,
//   loss_i = lse_i - z[i, label_i],  lse_i = log sum_j exp(z_ij)      (0 where label_i == ignore_index)
// and in backward dz_ij = g_i (exp(z_ij - lse_i) - [j == label_i]), written in z's dtype. All arithmetic is
// fp32, and the exp is Cephes' (about 1 ulp, vec.h), as ATen's log_softmax in fp32. A row with an infinite
// maximum gives NaN, as ATen's; a -inf logit gets a gradient of exactly 0. What it saves over
// F.cross_entropy(z.float(), ...): the fp32 copy of bf16 logits and the cast of its gradient back (two
// passes over N x V), and the (N, V) log-probabilities ATen writes and reads back (two more); forward reads a
// row twice while it is in cache (max, then the sum of exps), backward reads it once and writes dz.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "vec.h"

namespace {

using namespace longctx_vec;
using bf16 = c10::BFloat16;

template <typename T>
float row_lse(const T* z, int64_t V) {
  float m = -std::numeric_limits<float>::infinity();
  vf vm = bcast<vf>(m);
  int64_t j = 0;
  for (; j + kW <= V; j += kW) {
    const vf x = vload_as(z + j);
    vm = x > vm ? x : vm;
  }
  for (int e = 0; e < kW; ++e) m = vm[e] > m ? vm[e] : m;
  for (; j < V; ++j) m = float(z[j]) > m ? float(z[j]) : m;
  // a row of -inf, or with a +inf: NaN, as ATen's (its x - max is inf - inf somewhere in the row)
  if (std::isinf(m)) return std::numeric_limits<float>::quiet_NaN();
  vf vs = bcast<vf>(0.f);
  const vf vmax = bcast<vf>(m);
  for (j = 0; j + kW <= V; j += kW) vs += exp_le0(vload_as(z + j) - vmax);
  float s = 0.f;
  for (int e = 0; e < kW; ++e) s += vs[e];
  for (; j < V; ++j) s += exp_le0(float(z[j]) - m);
  return m + std::log(s);  // NaN anywhere in the row makes s NaN
}

// softmax's p = exp(x - lse), exactly 0 for a -inf logit (exp_le0 stops at exp(-87))
template <typename F>
inline F prob(F x, F lse) {
  const F t = x - lse;
  return t == bcast<F>(-std::numeric_limits<float>::infinity()) ? bcast<F>(0.f) : exp_le0(t);
}

template <typename T>
void row_grad(const T* z, T* dz, int64_t V, float lse, float g, int64_t label) {
  const vf vl = bcast<vf>(lse), vg = bcast<vf>(g);
  int64_t j = 0;
  for (; j + kW <= V; j += kW) vstore_as(dz + j, vg * prob(vload_as(z + j), vl));
  for (; j < V; ++j) dz[j] = T(g * prob(float(z[j]), lse));
  dz[label] = T(g * prob(float(z[label]), lse) - g);
}

void check(const at::Tensor& z, const at::Tensor& labels) {
  TORCH_CHECK(z.device().is_cpu() && z.dim() == 2 && z.stride(1) == 1,
              "cross_entropy takes CPU logits (N, V) with contiguous rows");
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kBFloat16,
              "cross_entropy takes float32 or bfloat16 logits, got ", z.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == z.size(0) && labels.scalar_type() == at::kLong,
              "cross_entropy takes int64 labels (N) for logits (N, V)");
}

// (loss (N), lse (N)), fp32
std::tuple<at::Tensor, at::Tensor> ce_forward(const at::Tensor& z, const at::Tensor& labels_, int64_t ignore) {
  check(z, labels_);
  const at::Tensor labels = labels_.contiguous();
  const int64_t N = z.size(0), V = z.size(1), ld = z.stride(0);
  const int64_t* lab = labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i)
    TORCH_CHECK(lab[i] == ignore || (lab[i] >= 0 && lab[i] < V), "Target ", lab[i], " is out of bounds.");
  at::Tensor loss = at::zeros({N}, z.options().dtype(at::kFloat));
  at::Tensor lse = at::zeros({N}, z.options().dtype(at::kFloat));
  float* lo = loss.data_ptr<float>();
  float* ls = lse.data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      if (lab[i] == ignore) continue;
      if (z.scalar_type() == at::kFloat) {
        const float* row = z.data_ptr<float>() + i * ld;
        ls[i] = row_lse(row, V);
        lo[i] = ls[i] - row[lab[i]];
      } else {
        const bf16* row = z.data_ptr<bf16>() + i * ld;
        ls[i] = row_lse(row, V);
        lo[i] = ls[i] - float(row[lab[i]]);
      }
    }
  });
  return {loss, lse};
}

// dz (N, V) in z's dtype, from the gradient of each row's loss (N)
at::Tensor ce_backward(const at::Tensor& grad_, const at::Tensor& z, const at::Tensor& labels_,
                       const at::Tensor& lse, int64_t ignore) {
  check(z, labels_);
  const int64_t N = z.size(0), V = z.size(1), ld = z.stride(0);
  TORCH_CHECK(grad_.numel() == N && lse.numel() == N && lse.scalar_type() == at::kFloat && lse.is_contiguous(),
              "cross_entropy_backward: grad and lse must have one fp32 entry per row");
  const at::Tensor labels = labels_.contiguous();
  const at::Tensor grad = grad_.to(at::kFloat).contiguous();
  for (int64_t i = 0; i < N; ++i) {
    const int64_t l = labels.data_ptr<int64_t>()[i];
    TORCH_CHECK(l == ignore || (l >= 0 && l < V), "Target ", l, " is out of bounds.");
  }
  at::Tensor dz = at::empty({N, V}, z.options());
  const int64_t* lab = labels.data_ptr<int64_t>();
  const float* g = grad.data_ptr<float>();
  const float* ls = lse.data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      if (z.scalar_type() == at::kFloat) {
        float* out = dz.data_ptr<float>() + i * V;
        if (lab[i] == ignore) std::fill(out, out + V, 0.f);
        else row_grad(z.data_ptr<float>() + i * ld, out, V, ls[i], g[i], lab[i]);
      } else {
        bf16* out = dz.data_ptr<bf16>() + i * V;
        if (lab[i] == ignore) std::fill(out, out + V, bf16(0.f));
        else row_grad(z.data_ptr<bf16>() + i * ld, out, V, ls[i], g[i], lab[i]);
      }
    }
  });
  return dz;
}

}  // namespace

TORCH_LIBRARY(longctx_loss, m) {
  m.def("cross_entropy_forward(Tensor logits, Tensor labels, int ignore_index) -> (Tensor, Tensor)");
  m.def("cross_entropy_backward(Tensor grad, Tensor logits, Tensor labels, Tensor lse, int ignore_index) -> Tensor");
}

TORCH_LIBRARY_IMPL(longctx_loss, CPU, m) {
  m.impl("cross_entropy_forward", ce_forward);
  m.impl("cross_entropy_backward", ce_backward);
}
