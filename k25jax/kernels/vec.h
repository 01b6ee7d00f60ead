// 16-lane float vectors (GCC vector extensions) shared by the CPU kernels of `k25jax.kernels`: one
// AVX-512 register each. The kernels' register blocking is written for AVX-512's 32 such registers; on hosts
// without it the build stops here and generation uses XLA's ops (`k25jax.kernels.build.available`).
#pragma once

#if !defined(__AVX512F__)
#error "k25jax's CPU kernels need AVX-512 (x86-64); this host's compiler target lacks it"
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>

#include <immintrin.h>

namespace k25jax {

typedef float Vec __attribute__((vector_size(64), aligned(4)));
typedef int32_t VecI __attribute__((vector_size(64), aligned(4)));
constexpr int kLanes = 16;

// exp(x) on 16 lanes (Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2, a degree-6 polynomial for e^r, 2^n from
// the exponent bits); relative error ~1e-7. x is clamped to [-87.3, 88.3], inside float's normal range.
inline Vec Exp(Vec x) {
  x = x < -87.3f ? Vec{} - 87.3f : x;
  x = x > 88.3f ? Vec{} + 88.3f : x;
  Vec n = x * 1.44269504088896341f;
  n = (n + 12582912.f) - 12582912.f;  // round to nearest (1.5 * 2^23 pushes the fraction out)
  const Vec r = x - n * 0.693359375f - n * -2.12194440e-4f;  // ln2 in two parts
  Vec p = Vec{} + 1.9875691500e-4f;
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = p * r + c;
  const VecI bits = (__builtin_convertvector(n, VecI) + 127) << 23;
  return (p * r * r + r + 1.f) * (Vec)bits;  // a vector cast keeps the bits
}

// The first min(n, 16) floats at p (n >= 1), zero past them; never reads beyond p + n. Partial vectors use a
// masked load: a variable-length memcpy would be a library call, around which the compiler spills every vector
// register of the loop.
inline Vec Load(const float* p, int64_t n = kLanes) {
  if (n >= kLanes) {
    Vec v;
    std::memcpy(&v, p, sizeof(Vec));
    return v;
  }
  return (Vec)_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
}

// Stores the first min(n, 16) lanes of v at p (n >= 1).
inline void Store(float* p, Vec v, int64_t n = kLanes) {
  if (n >= kLanes) std::memcpy(p, &v, sizeof(Vec));
  else _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), (__m512)v);
}

}  // namespace k25jax
