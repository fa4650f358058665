// Explicit SIMD shared by the extension's kernels (band_attention.cpp, cross_entropy.cpp, dropout.cpp): 16
// fp32 lanes through GCC/Clang vector extensions, loads and stores of fp32 or bf16 rows, and the softmax's exp.
#pragma once

#include <c10/util/BFloat16.h>
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define LONGCTX_VEC_BF16 1
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace longctx_vec {

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

// 16 values of T widened to fp32 lanes (exact for bf16: its bits are the top half of an fp32)
typedef uint16_t vh __attribute__((vector_size(kW * sizeof(uint16_t))));
typedef uint32_t vu __attribute__((vector_size(kW * sizeof(uint32_t))));
template <typename T>
inline vf vload_as(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return vload(p);
  } else {
    vh h;
    std::memcpy(&h, p, sizeof(h));
    return (vf)(__builtin_convertvector(h, vu) << 16);
  }
}

// 16 lanes stored as T (bf16: rounded to nearest even)
template <typename T>
inline void vstore_as(T* p, vf v) {
  if constexpr (std::is_same_v<T, float>) {
    vstore(p, v);
  } else {
#if defined(LONGCTX_VEC_BF16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh((__m512)v));
#else
    for (int e = 0; e < kW; ++e) p[e] = static_cast<T>(v[e]);
#endif
  }
}

}  // namespace longctx_vec
