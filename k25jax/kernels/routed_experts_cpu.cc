// Routed experts of one MoE layer on the host CPU, as one XLA FFI custom call (digest §1.1, "MoE router").
//
//   y[t] = sum_j w[t, j] * SwiGLU_{idx[t, j]}(x[t]),   SwiGLU_e(x) = (silu(x Wg_e) * (x Wu_e)) Wd_e
//
// XLA:CPU has no grouped matmul: its dispatches either run every expert on every row (`dense`, E/k times the
// routed work) or loop over per-expert tiles with a per-iteration cost that dominates a decode step's few rows.
// Here each expert's rows are gathered and multiplied in register-blocked chunks of up to kRows rows, so a step
// does only the routed FLOPs and brings each chosen expert's weights from memory once (its later chunks find
// them in cache). At a decode step's few rows per expert the call streams weights, so they come tile-packed
// (`routed_experts_cpu.pack`, once per generate call or `prepare_decode`): each pass over a column tile is one contiguous read, which
// the hardware prefetchers follow (row-major [K, N] weights read 64 of every N columns per row, at about half the
// bandwidth).
// Single-threaded: each XLA CPU device runs its own rows (`k25jax.runtime.cpu_device_per_core`).
// Forward only, float32; shapes x [T, D], idx [T, k] int32, w [T, k], wg / wu [E, ceil(F / kTile), D, kTile],
// wd [E, ceil(D / kTile), F, kTile] -> y [T, D].

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
constexpr int kVecs = 4;                 // vectors per column tile
constexpr int kTile = kVecs * kLanes;    // columns per tile (`TILE` in routed_experts_cpu.py)
constexpr int kRows = 6;                 // rows per chunk: kRows x kVecs accumulators stay in registers

// out[r][:] = a[r][:] W for r < NR, a [NR, K] (row pointers), W tile-packed [ceil(N / kTile), K, kTile]: tile j
// holds columns [j * kTile, (j + 1) * kTile) row after row (zero past N), so each tile is one contiguous read.
template <int NR>
void RowsTimes(const float* const* a, const float* W, int64_t K, int64_t N, float* const* out) {
  for (int64_t n0 = 0; n0 < N; n0 += kTile, W += K * kTile) {
    Vec acc[NR][kVecs];
    for (int r = 0; r < NR; ++r)
      for (int c = 0; c < kVecs; ++c) acc[r][c] = Vec{};
    for (int64_t k = 0; k < K; ++k) {
      Vec w[kVecs];
      for (int c = 0; c < kVecs; ++c) {
        std::memcpy(&w[c], W + k * kTile + c * kLanes, sizeof(Vec));
        asm("" : "+v"(w[c]));  // keep the loaded row in a register: GCC otherwise reloads it for every row
      }
      for (int r = 0; r < NR; ++r) {
        const float s = a[r][k];
        for (int c = 0; c < kVecs; ++c) acc[r][c] += s * w[c];
      }
    }
    const int64_t width = std::min<int64_t>(kTile, N - n0);
    for (int r = 0; r < NR; ++r) std::memcpy(out[r] + n0, acc[r], sizeof(float) * width);
  }
}

int64_t Tiles(int64_t n) { return (n + kTile - 1) / kTile; }

void Rows(int nr, const float* const* a, const float* W, int64_t K, int64_t N, float* const* out) {
  switch (nr) {
    case 6: return RowsTimes<6>(a, W, K, N, out);
    case 5: return RowsTimes<5>(a, W, K, N, out);
    case 4: return RowsTimes<4>(a, W, K, N, out);
    case 3: return RowsTimes<3>(a, W, K, N, out);
    case 2: return RowsTimes<2>(a, W, K, N, out);
    default: return RowsTimes<1>(a, W, K, N, out);
  }
}

// y [T, D] = routed SwiGLU experts of x [T, D] (file comment), weights tile-packed. Returns the flat index of the
// first assignment whose expert id is outside [0, E), or -1.
int64_t RoutedExpertsCore(const float* xp, const int32_t* ip, const float* wp, const float* wg, const float* wu,
                          const float* wd, float* yp, int64_t T, int64_t D, int64_t K, int64_t E, int64_t F) {
  std::memset(yp, 0, sizeof(float) * T * D);

  // Assignments grouped by expert (counting sort): start[e] .. start[e + 1] index rows / weights.
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t i = 0; i < T * K; ++i) {
    if (ip[i] < 0 || ip[i] >= E) return i;
    ++start[ip[i] + 1];
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  std::vector<int64_t> next(start.begin(), start.end() - 1), row(T * K);
  std::vector<float> weight(T * K);
  for (int64_t i = 0; i < T * K; ++i) {
    const int64_t slot = next[ip[i]]++;
    row[slot] = i / K;
    weight[slot] = wp[i];
  }

  std::vector<float> g(kRows * F), u(kRows * F), o(kRows * D);
  for (int64_t e = 0; e < E; ++e) {
    const float* we_g = wg + e * Tiles(F) * D * kTile;
    const float* we_u = wu + e * Tiles(F) * D * kTile;
    const float* we_d = wd + e * Tiles(D) * F * kTile;
    for (int64_t s = start[e]; s < start[e + 1]; s += kRows) {
      const int nr = static_cast<int>(std::min<int64_t>(kRows, start[e + 1] - s));
      const float* xr[kRows];
      float *gr[kRows], *ur[kRows], *orow[kRows];
      for (int r = 0; r < nr; ++r) {
        xr[r] = xp + row[s + r] * D;
        gr[r] = g.data() + r * F;
        ur[r] = u.data() + r * F;
        orow[r] = o.data() + r * D;
      }
      Rows(nr, xr, we_g, D, F, gr);
      Rows(nr, xr, we_u, D, F, ur);
      for (int r = 0; r < nr; ++r) {  // h = silu(g) * u, scaled by the routing weight (Wd is linear)
        const float scale = weight[s + r];
        for (int64_t f = 0; f < F; f += kLanes) {
          const Vec a = Load(gr[r] + f, F - f);
          Store(gr[r] + f, scale * (a / (1.f + Exp(-a))) * Load(ur[r] + f, F - f), F - f);
        }
      }
      Rows(nr, gr, we_d, F, D, orow);
      for (int r = 0; r < nr; ++r) {
        float* yr = yp + row[s + r] * D;
        for (int64_t d = 0; d < D; ++d) yr[d] += orow[r][d];
      }
    }
  }
  return -1;
}

ffi::Error RoutedExperts(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::F32> w,
                         ffi::Buffer<ffi::F32> wg, ffi::Buffer<ffi::F32> wu, ffi::Buffer<ffi::F32> wd,
                         ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), id = idx.dimensions(), gd = wg.dimensions(), dd = wd.dimensions();
  const auto ud = wu.dimensions(), wdim = w.dimensions();
  const bool ranks = xd.size() == 2 && id.size() == 2 && wdim.size() == 2 && gd.size() == 4 && ud.size() == 4 &&
                     dd.size() == 4;
  if (!ranks || id[0] != xd[0] || wdim[0] != id[0] || wdim[1] != id[1] || dd[0] != gd[0] || dd[1] != Tiles(xd[1]) ||
      gd[1] != Tiles(dd[2]) || gd[2] != xd[1] || gd[3] != kTile || dd[3] != kTile ||
      !std::equal(gd.begin(), gd.end(), ud.begin())) {
    return ffi::Error::InvalidArgument(
        "routed_experts_cpu: expected x [T, D], idx / w [T, k] and tile-packed weights wg / wu [E, ceil(F / " +
        std::to_string(kTile) + "), D, " + std::to_string(kTile) + "], wd [E, ceil(D / " + std::to_string(kTile) +
        "), F, " + std::to_string(kTile) + "] (routed_experts_cpu.pack)");
  }
  const int64_t T = xd[0], D = xd[1], K = id[1], E = gd[0], F = dd[2];
  const int64_t bad = RoutedExpertsCore(x.typed_data(), idx.typed_data(), w.typed_data(), wg.typed_data(),
                                        wu.typed_data(), wd.typed_data(), y->typed_data(), T, D, K, E, F);
  if (bad != -1) {
    return ffi::Error::InvalidArgument("routed_experts_cpu: expert id " + std::to_string(idx.typed_data()[bad]) +
                                       " outside [0, " + std::to_string(E) + ")");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(K25RoutedExpertsCpu, RoutedExperts,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::S32>>()   // idx
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w
                                  .Arg<ffi::Buffer<ffi::F32>>()   // wg
                                  .Arg<ffi::Buffer<ffi::F32>>()   // wu
                                  .Arg<ffi::Buffer<ffi::F32>>()   // wd
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y
