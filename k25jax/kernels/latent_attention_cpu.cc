// MLA attention over the latent cache on the host CPU, one XLA FFI custom call per layer and decode step
// (digest §1.1, "MLA forward pass", absorbed form; `k25jax.kernels.latent_attention_cpu`).
//
//   o[b, m] = sum_s p[b, m, s] c[b, s, :V],   p[b, m, :] = softmax(scale * q[b, m] . c[b, s] over unmasked s)
//
// q [B, M, W] (M = L * heads query rows, query l's heads consecutive), c [B, S, W] the cached rows
// [c_kv | k_rot], keep [B, L, S] (pred) -> o [B, M, V] (V = kv_lora leading columns). XLA:CPU runs this as two
// batched products of tiny matrices plus a softmax, each a separate library call per layer and step; here each
// batch row's cache rows are read in one pass per query row. A masked slot's logit is the model's NEG_INF
// (`k25jax.model.mla`), so a row whose every slot is masked averages them, exactly as the XLA path does.
// Single-threaded (each XLA CPU device runs its own rows); forward only, float32.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float Vec __attribute__((vector_size(64), aligned(4)));  // 16 lanes; two 256-bit halves without AVX-512
constexpr int kLanes = 16;
constexpr float kNegInf = -1e30f;  // k25jax.model.mla.NEG_INF

typedef int32_t VecI __attribute__((vector_size(64), aligned(4)));

inline Vec Load(const float* p) { Vec v; std::memcpy(&v, p, sizeof(Vec)); return v; }
inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(Vec)); }
inline Vec Splat(float x) { return x - Vec{}; }  // a broadcast (x - 0 folds to x; x + 0 would not for -0)
inline float Sum(Vec v) {
  float t[kLanes];
  std::memcpy(t, &v, sizeof(Vec));
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += t[i];
  return s;
}

// exp(x) lane-wise (Cephes' single-precision range reduction and polynomial, about 1 ulp); 0 below -87.3.
inline Vec Exp(Vec x) {
  const Vec lo = Splat(-87.3f), hi = Splat(88.7f);
  const VecI underflow = x < lo;
  x = x < lo ? lo : (x > hi ? hi : x);
  const Vec magic = Splat(12582912.f);                 // 1.5 * 2^23: adding it rounds to an integer
  Vec n = (x * Splat(1.44269504088896341f) + magic) - magic;
  Vec r = x - n * Splat(0.693359375f) - n * Splat(-2.12194440e-4f);
  Vec y = Splat(1.9875691500e-4f);
  y = y * r + Splat(1.3981999507e-3f);
  y = y * r + Splat(8.3334519073e-3f);
  y = y * r + Splat(4.1665795894e-2f);
  y = y * r + Splat(1.6666665459e-1f);
  y = y * r + Splat(5.0000001201e-1f);
  y = y * r * r + r + Splat(1.f);
  const VecI bits = (__builtin_convertvector(n, VecI) + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &bits, sizeof(Vec));
  Vec out = y * scale;
  VecI ob;
  std::memcpy(&ob, &out, sizeof(Vec));
  ob &= ~underflow;
  std::memcpy(&out, &ob, sizeof(Vec));
  return out;
}

// Lane-halving shuffles: level j merges two vectors holding 2^j slots x (16 >> j) partial sums each into one
// holding 2^(j+1) slots x (8 >> j), slots in order.
const VecI kLow[4] = {{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
                      {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27},
                      {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29},
                      {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}};
const VecI kHigh[4] = {{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31},
                       {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31},
                       {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31},
                       {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31}};

// Lane i of the result = the sum of v[i]'s lanes (v is overwritten): 15 vector adds for 16 horizontal sums.
inline Vec SumEach(Vec* v) {
#pragma GCC unroll 4
  for (int level = 0, n = kLanes; level < 4; ++level, n /= 2)
#pragma GCC unroll 8
    for (int k = 0; k < n / 2; ++k)
      v[k] = __builtin_shuffle(v[2 * k], v[2 * k + 1], kLow[level]) +
             __builtin_shuffle(v[2 * k], v[2 * k + 1], kHigh[level]);
  return v[0];
}

// o [M, V] for one batch row: q [M, W], c [S, W], keep [L, S]; M = L * heads. p: scratch of M * Sv floats
// (Sv = S rounded up to whole vectors).
void LatentAttentionRow(const float* q, const float* c, const bool* keep, float* o, int64_t M, int64_t S,
                        int64_t W, int64_t V, int64_t heads, float scale, float* p) {
  const int64_t Sv = (S + kLanes - 1) / kLanes * kLanes, Wv = W / kLanes * kLanes;
  for (int64_t m = 0; m < M; ++m) {  // probabilities p[m, :]
    const float* qm = q + m * W;
    const bool* km = keep + (m / heads) * S;
    float* pm = p + m * Sv;
    Vec top = Splat(kNegInf);  // lane-wise running max; padding lanes hold NEG_INF
    for (int64_t s0 = 0; s0 < S; s0 += kLanes) {
      const int64_t n = std::min<int64_t>(kLanes, S - s0);
      const float* rows[kLanes];  // slots past S repeat the last one (their lanes are dropped)
      for (int i = 0; i < kLanes; ++i) rows[i] = c + std::min<int64_t>(s0 + i, S - 1) * W;
      Vec acc[kLanes];
#pragma GCC unroll 16
      for (int i = 0; i < kLanes; ++i) acc[i] = Vec{};
      for (int64_t w = 0; w < Wv; w += kLanes) {
        const Vec qv = Load(qm + w);
#pragma GCC unroll 16
        for (int i = 0; i < kLanes; ++i) acc[i] += qv * Load(rows[i] + w);
      }
      Vec dot = SumEach(acc);
      if (Wv < W) {  // columns past the last whole vector
        for (int i = 0; i < n; ++i)
          for (int64_t w = Wv; w < W; ++w) dot[i] += qm[w] * rows[i][w];
      }
      VecI use;
      for (int i = 0; i < kLanes; ++i) use[i] = i < n && km[s0 + i] ? -1 : 0;
      const Vec logit = use ? dot * Splat(scale) : Splat(kNegInf);
      Store(pm + s0, logit);
      top = top > logit ? top : logit;
    }
    for (int64_t s = S; s < Sv; ++s) pm[s] = -INFINITY;  // padding lanes: exp -> 0
    float peak = kNegInf;
    for (int i = 0; i < kLanes; ++i) peak = std::max(peak, top[i]);
    Vec total{};
    for (int64_t s = 0; s < Sv; s += kLanes) {
      const Vec e = Exp(Load(pm + s) - Splat(peak));
      Store(pm + s, e);
      total += e;
    }
    const Vec inv = Splat(1.f / Sum(total));
    for (int64_t s = 0; s < Sv; s += kLanes) Store(pm + s, Load(pm + s) * inv);
  }
  constexpr int kGroup = 8;  // query rows sharing each loaded cache vector
  for (int64_t m0 = 0; m0 < M; m0 += kGroup) {  // o[m, :] = sum_s p[m, s] c[s, :V]
    const int64_t g = std::min<int64_t>(kGroup, M - m0);
    int64_t v = 0;
    for (; v + kLanes <= V; v += kLanes) {
      Vec acc[kGroup];
      for (int j = 0; j < kGroup; ++j) acc[j] = Vec{};
      for (int64_t s = 0; s < S; ++s) {
        const Vec cv = Load(c + s * W + v);
        for (int64_t j = 0; j < g; ++j) acc[j] += Splat(p[(m0 + j) * Sv + s]) * cv;
      }
      for (int64_t j = 0; j < g; ++j) Store(o + (m0 + j) * V + v, acc[j]);
    }
    for (; v < V; ++v)
      for (int64_t j = 0; j < g; ++j) {
        float acc = 0.f;
        for (int64_t s = 0; s < S; ++s) acc += p[(m0 + j) * Sv + s] * c[s * W + v];
        o[(m0 + j) * V + v] = acc;
      }
  }
}

ffi::Error LatentAttention(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> c, ffi::Buffer<ffi::PRED> keep,
                           ffi::ResultBuffer<ffi::F32> o, float scale, int64_t heads) {
  const auto qd = q.dimensions(), cd = c.dimensions(), kd = keep.dimensions(), od = o->dimensions();
  if (qd.size() != 3 || cd.size() != 3 || kd.size() != 3 || od.size() != 3 || heads < 1 || cd[0] != qd[0] ||
      cd[2] != qd[2] || kd[0] != qd[0] || kd[1] * heads != qd[1] || kd[2] != cd[1] || od[0] != qd[0] ||
      od[1] != qd[1] || od[2] > qd[2]) {
    return ffi::Error::InvalidArgument("latent_attention_cpu: expected q [B, L * heads, W], c [B, S, W], "
                                       "keep [B, L, S], o [B, L * heads, V <= W]");
  }
  const int64_t B = qd[0], M = qd[1], W = qd[2], S = cd[1], L = kd[1], V = od[2];
  std::vector<float> p(M * ((S + kLanes - 1) / kLanes * kLanes));
  for (int64_t b = 0; b < B; ++b) {
    LatentAttentionRow(q.typed_data() + b * M * W, c.typed_data() + b * S * W, keep.typed_data() + b * L * S,
                       o->typed_data() + b * M * V, M, S, W, V, heads, scale, p.data());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(K25LatentAttentionCpu, LatentAttention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // q
                                  .Arg<ffi::Buffer<ffi::F32>>()    // c
                                  .Arg<ffi::Buffer<ffi::PRED>>()   // keep
                                  .Ret<ffi::Buffer<ffi::F32>>()    // o
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("heads"));
