// 16-lane float vectors (GCC / Clang vector extensions) shared by the CPU kernels of `k25jax.kernels`: one
// AVX-512 register, or two 256-bit halves without AVX-512.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

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

// The first min(n, 16) floats at p, zero past them (never reads beyond p + n).
inline Vec Load(const float* p, int64_t n = kLanes) {
  Vec v{};
  if (n >= kLanes) std::memcpy(&v, p, sizeof(Vec));
  else std::memcpy(&v, p, sizeof(float) * n);
  return v;
}

// Stores the first min(n, 16) lanes of v at p.
inline void Store(float* p, Vec v, int64_t n = kLanes) {
  if (n >= kLanes) std::memcpy(p, &v, sizeof(Vec));
  else std::memcpy(p, &v, sizeof(float) * n);
}

}  // namespace k25jax
