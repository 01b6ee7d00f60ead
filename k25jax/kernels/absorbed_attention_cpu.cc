// MLA attention over the latent cache in DeepSeek-V3's absorbed form, on the host CPU, as one XLA FFI custom
// call (digest §1.1; the math of `k25jax.sample.cache.absorbed_attention`):
//
//   q_lat[h] = q_nope[h] W_uk[h]^T                      a query in latent space (kv_b_proj = [W_uk | W_uv])
//   p[h, s]  = softmax_s(scale * [q_lat[h] | q_rot[h]] . latent[s])    over the slots the mask allows
//   out[h]   = (sum_s p[h, s] c[s]) W_uv[h]             c = latent[:, :kv_lora]
//
// Per query row the allowed cached rows are read in order, a block of 16 at a time, for all heads (XLA:CPU runs
// the same math as a chain of small batched matmuls and fusions). Products are accumulated in registers; the 16
// dot products of a block are reduced together (`SumEach`).
// A row whose mask allows no slot averages every slot, as softmax over equal masked logits does.
// Single-threaded: each XLA CPU device runs its own rows. Forward only, float32; shapes q_nope [B, L, H, nope],
// q_rot [B, L, H, rope], latent [B, S, kv_lora + rope], kv_b [kv_lora, H * (nope + v)], mask [B, L, S] bool ->
// out [B, L, H, v].

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using k25jax::Exp;
using k25jax::kLanes;
using k25jax::Load;
using k25jax::Store;
using k25jax::Vec;
using k25jax::VecI;
constexpr int kGroup = 4;  // output vectors accumulated in registers at once

// One vector whose lane i is the sum of x[i]'s lanes (x is overwritten): four rounds of pairwise two-source
// shuffles and adds instead of sixteen separate horizontal sums.
inline Vec SumEach(Vec* x) {
  const VecI a1 = {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30};
  const VecI b1 = {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31};
  const VecI a2 = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};
  const VecI b2 = {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31};
  const VecI a3 = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27};
  const VecI b3 = {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31};
  const VecI a4 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const VecI b4 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  for (int k = 0; k < 8; ++k) x[k] = __builtin_shuffle(x[2 * k], x[2 * k + 1], a1) +
                                     __builtin_shuffle(x[2 * k], x[2 * k + 1], b1);
  for (int k = 0; k < 4; ++k) x[k] = __builtin_shuffle(x[2 * k], x[2 * k + 1], a2) +
                                     __builtin_shuffle(x[2 * k], x[2 * k + 1], b2);
  for (int k = 0; k < 2; ++k) x[k] = __builtin_shuffle(x[2 * k], x[2 * k + 1], a3) +
                                     __builtin_shuffle(x[2 * k], x[2 * k + 1], b3);
  return __builtin_shuffle(x[0], x[1], a4) + __builtin_shuffle(x[0], x[1], b4);
}

// y[:n] = sum_k a[k] * row(k)[:n] for k < K, `G` vectors of y at a time in registers (two sets: even and odd
// k, so consecutive FMAs do not wait on each other).
template <int G, typename Row>
void CombineGroup(const float* a, int64_t K, Row row, int64_t off, int64_t n, float* y) {
  Vec even[G], odd[G];
  for (int g = 0; g < G; ++g) even[g] = odd[g] = Vec{};
  int64_t k = 0;
  for (; k + 1 < K; k += 2) {
    const float *r0 = row(k) + off, *r1 = row(k + 1) + off;
    for (int g = 0; g < G; ++g) {
      even[g] += a[k] * Load(r0 + g * kLanes, n - g * kLanes);
      odd[g] += a[k + 1] * Load(r1 + g * kLanes, n - g * kLanes);
    }
  }
  if (k < K)
    for (int g = 0; g < G; ++g) even[g] += a[k] * Load(row(k) + off + g * kLanes, n - g * kLanes);
  for (int g = 0; g < G; ++g) Store(y + off + g * kLanes, even[g] + odd[g], n - g * kLanes);
}

// part[g][i] = lane products of q[g] (rows of width W) and latent row slots[i] for i < m (zero for i >= m):
// G heads at once, so each cached row is loaded once for them and their FMAs run side by side. CW > 0: W spans
// CW vectors, and the queries stay in registers across the block.
template <int G, int CW>
void ScoreProducts(const float* q, int64_t W, const float* rows, const int64_t* slots, int64_t m,
                   Vec (*part)[kLanes]) {
  Vec qv[G][CW > 0 ? CW : 1];
  if constexpr (CW > 0)
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < CW; ++c) qv[g][c] = Load(q + g * W + c * kLanes, W - c * kLanes);
  for (int64_t i = 0; i < kLanes; ++i) {
    Vec acc[G];
    for (int g = 0; g < G; ++g) acc[g] = Vec{};
    if (i < m) {
      const float* row = rows + slots[i] * W;
      if constexpr (CW > 0) {
        for (int c = 0; c < CW; ++c) {
          const Vec r = Load(row + c * kLanes, W - c * kLanes);
          for (int g = 0; g < G; ++g) acc[g] += qv[g][c] * r;
        }
      } else {
        for (int64_t c = 0; c < W; c += kLanes) {
          const Vec r = Load(row + c, W - c);
          for (int g = 0; g < G; ++g) acc[g] += Load(q + g * W + c, W - c) * r;
        }
      }
    }
    for (int g = 0; g < G; ++g) part[g][i] = acc[g];
  }
}

template <int G>
void ScoreProductsAnyWidth(const float* q, int64_t W, const float* rows, const int64_t* slots, int64_t m,
                           Vec (*part)[kLanes]) {
  switch ((W + kLanes - 1) / kLanes) {
    case 1: return ScoreProducts<G, 1>(q, W, rows, slots, m, part);
    case 2: return ScoreProducts<G, 2>(q, W, rows, slots, m, part);
    case 3: return ScoreProducts<G, 3>(q, W, rows, slots, m, part);
    case 4: return ScoreProducts<G, 4>(q, W, rows, slots, m, part);
    default: return ScoreProducts<G, 0>(q, W, rows, slots, m, part);
  }
}

// o[g][off:off + CV * 16] = sum_j p[g][j] * latent row slots[j] [off:...] (clipped to `width`) for G heads (p
// rows S apart, o rows ldo apart): each cached row is loaded once for the G heads.
template <int G, int CV>
void WeightedRows(const float* p, int64_t S, const float* rows, int64_t W, const int64_t* slots, int64_t n,
                  int64_t off, int64_t width, float* o, int64_t ldo) {
  Vec acc[G][CV];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < CV; ++c) acc[g][c] = Vec{};
  for (int64_t j = 0; j < n; ++j) {
    const float* r = rows + slots[j] * W + off;
    Vec x[CV];
    for (int c = 0; c < CV; ++c) x[c] = Load(r + c * kLanes, width - off - c * kLanes);
    for (int g = 0; g < G; ++g) {
      const float pj = p[g * S + j];
      for (int c = 0; c < CV; ++c) acc[g][c] += pj * x[c];
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < CV; ++c) Store(o + g * ldo + off + c * kLanes, acc[g][c], width - off - c * kLanes);
}

template <int G>
void WeightedRowsAll(const float* p, int64_t S, const float* rows, int64_t W, const int64_t* slots, int64_t n,
                     int64_t width, float* o, int64_t ldo) {
  for (int64_t off = 0; off < width; off += 2 * kLanes) {
    if (width - off > kLanes) WeightedRows<G, 2>(p, S, rows, W, slots, n, off, width, o, ldo);
    else WeightedRows<G, 1>(p, S, rows, W, slots, n, off, width, o, ldo);
  }
}

template <typename Row>
void Combine(const float* a, int64_t K, Row row, int64_t n, float* y) {
  for (int64_t off = 0; off < n; off += kGroup * kLanes) {
    const int64_t left = n - off;
    switch (std::min<int64_t>(kGroup, (left + kLanes - 1) / kLanes)) {
      case 4: CombineGroup<4>(a, K, row, off, left, y); break;
      case 3: CombineGroup<3>(a, K, row, off, left, y); break;
      case 2: CombineGroup<2>(a, K, row, off, left, y); break;
      default: CombineGroup<1>(a, K, row, off, left, y);
    }
  }
}

// p[:n] = softmax(p[:n]) (n >= 1).
void Softmax(float* p, int64_t n) {
  Vec top = Vec{} + p[0];
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const Vec x = Load(p + i);
    top = x > top ? x : top;
  }
  float m = top[0];
  for (int k = 1; k < kLanes; ++k) m = std::max(m, top[k]);
  for (; i < n; ++i) m = std::max(m, p[i]);
  Vec sum{};
  for (i = 0; i < n; i += kLanes) {
    const Vec e = Exp(Load(p + i, n - i) - m);
    Store(p + i, e, n - i);
    sum += n - i >= kLanes ? e : Vec{};
  }
  float total = 0.f;
  for (int k = 0; k < kLanes; ++k) total += sum[k];
  for (i = n - n % kLanes; i < n; ++i) total += p[i];
  const float inv = 1.f / total;
  for (i = 0; i < n; i += kLanes) Store(p + i, Load(p + i, n - i) * inv, n - i);
}

void AbsorbedAttentionCore(const float* q_nope, const float* q_rot, const float* latent, const float* kv_b,
                           const bool* mask, float* out, int64_t B, int64_t L, int64_t H, int64_t S, int64_t nope,
                           int64_t rope, int64_t v, int64_t kv_lora, float scale) {
  const int64_t W = kv_lora + rope, hw = nope + v, ld = H * hw;
  // W_uk per head transposed to [H, nope, kv_lora]: q_lat is a combination of its contiguous rows.
  std::vector<float> wk(H * nope * kv_lora);
  for (int64_t c = 0; c < kv_lora; ++c)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < nope; ++i) wk[(h * nope + i) * kv_lora + c] = kv_b[c * ld + h * hw + i];
  std::vector<float> q(H * W), p(H * S), o(H * kv_lora);
  std::vector<int64_t> slots(S);
  Vec part[kGroup][kLanes];
  for (int64_t b = 0; b < B; ++b) {
    const float* rows = latent + b * S * W;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t bl = b * L + l;
      const bool* allowed = mask + bl * S;
      int64_t n = 0;
      for (int64_t s = 0; s < S; ++s)
        if (allowed[s]) slots[n++] = s;
      const bool none = n == 0;
      if (none)
        for (int64_t s = 0; s < S; ++s) slots[n++] = s;

      for (int64_t h = 0; h < H; ++h) {  // q[h] = [q_nope W_uk^T | q_rot]
        const float* wh = wk.data() + h * nope * kv_lora;
        Combine(q_nope + (bl * H + h) * nope, nope, [&](int64_t i) { return wh + i * kv_lora; }, kv_lora,
                q.data() + h * W);
        std::copy(q_rot + (bl * H + h) * rope, q_rot + (bl * H + h + 1) * rope, q.data() + h * W + kv_lora);
      }
      for (int64_t j0 = 0; j0 < n; j0 += kLanes) {  // logits, 16 slots at a time
        const int64_t m = std::min<int64_t>(kLanes, n - j0);
        for (int64_t h0 = 0; h0 < H; h0 += kGroup) {
          const int64_t g = std::min<int64_t>(kGroup, H - h0), live = none ? 0 : m;
          const float* qg = q.data() + h0 * W;
          switch (g) {
            case 4: ScoreProductsAnyWidth<4>(qg, W, rows, slots.data() + j0, live, part); break;
            case 3: ScoreProductsAnyWidth<3>(qg, W, rows, slots.data() + j0, live, part); break;
            case 2: ScoreProductsAnyWidth<2>(qg, W, rows, slots.data() + j0, live, part); break;
            default: ScoreProductsAnyWidth<1>(qg, W, rows, slots.data() + j0, live, part);
          }
          for (int64_t k = 0; k < g; ++k) Store(p.data() + (h0 + k) * S + j0, SumEach(part[k]) * scale, m);
        }
      }
      for (int64_t h = 0; h < H; ++h) Softmax(p.data() + h * S, n);
      for (int64_t h0 = 0; h0 < H; h0 += kGroup) {  // o[h] = sum_s p[h, s] c[s]
        const float* pg = p.data() + h0 * S;
        float* og = o.data() + h0 * kv_lora;
        switch (std::min<int64_t>(kGroup, H - h0)) {
          case 4: WeightedRowsAll<4>(pg, S, rows, W, slots.data(), n, kv_lora, og, kv_lora); break;
          case 3: WeightedRowsAll<3>(pg, S, rows, W, slots.data(), n, kv_lora, og, kv_lora); break;
          case 2: WeightedRowsAll<2>(pg, S, rows, W, slots.data(), n, kv_lora, og, kv_lora); break;
          default: WeightedRowsAll<1>(pg, S, rows, W, slots.data(), n, kv_lora, og, kv_lora);
        }
      }
      for (int64_t h = 0; h < H; ++h)  // out[h] = o[h] W_uv[h]
        Combine(o.data() + h * kv_lora, kv_lora, [&](int64_t c) { return kv_b + c * ld + h * hw + nope; }, v,
                out + (bl * H + h) * v);
    }
  }
}

ffi::Error AbsorbedAttention(ffi::Buffer<ffi::F32> q_nope, ffi::Buffer<ffi::F32> q_rot,
                             ffi::Buffer<ffi::F32> latent, ffi::Buffer<ffi::F32> kv_b, ffi::Buffer<ffi::PRED> mask,
                             ffi::ResultBuffer<ffi::F32> out, float scale) {
  const auto qn = q_nope.dimensions(), qr = q_rot.dimensions(), ld = latent.dimensions();
  const auto kd = kv_b.dimensions(), md = mask.dimensions(), od = out->dimensions();
  bool ok = qn.size() == 4 && qr.size() == 4 && ld.size() == 3 && kd.size() == 2 && md.size() == 3;
  if (ok) {
    const int64_t B = qn[0], L = qn[1], H = qn[2], S = ld[1], kv_lora = kd[0];
    ok = qr[0] == B && qr[1] == L && qr[2] == H && ld[0] == B && ld[2] == kv_lora + qr[3] && md[0] == B &&
         md[1] == L && md[2] == S && S > 0 && kd[1] % H == 0 && kd[1] / H > qn[3] && od.size() == 4 &&
         od[3] == kd[1] / H - qn[3];
  }
  if (!ok) {
    return ffi::Error::InvalidArgument(
        "absorbed_attention_cpu: expected q_nope [B, L, H, nope], q_rot [B, L, H, rope], latent [B, S, kv_lora + "
        "rope], kv_b [kv_lora, H * (nope + v)] and mask [B, L, S]");
  }
  AbsorbedAttentionCore(q_nope.typed_data(), q_rot.typed_data(), latent.typed_data(), kv_b.typed_data(),
                        mask.typed_data(), out->typed_data(), qn[0], qn[1], qn[2], ld[1], qn[3], qr[3],
                        od[3], kd[0], scale);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(K25AbsorbedAttentionCpu, AbsorbedAttention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // q_nope
                                  .Arg<ffi::Buffer<ffi::F32>>()    // q_rot
                                  .Arg<ffi::Buffer<ffi::F32>>()    // latent
                                  .Arg<ffi::Buffer<ffi::F32>>()    // kv_b
                                  .Arg<ffi::Buffer<ffi::PRED>>()   // mask
                                  .Ret<ffi::Buffer<ffi::F32>>()    // out
                                  .Attr<float>("scale"));
