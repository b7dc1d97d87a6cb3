// The fused AdamW pass: per element, read p, g, m, v once and write p, m, v
// once (the reference makes about 20 passes over memory), and where asked the
// parameter's bf16 copy in the same pass (AdamW::set_weight_copies). The arithmetic
// follows the reference op by op, in the parameter's dtype:
//   p = p*decay; m = m*b1 + (1-b1)*g; v = v*b2 + ((1-b2)*g)*g;
//   p = p + (-step_size*m) / (sqrt(v)/sqrt_bc2 + eps)
#include "fused_adamw_kernel.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "../core/cpu_clones.h"

namespace rhine::detail {
namespace {

constexpr int64_t kChunk = 1 << 15;

// fp32 -> bf16 bits, rounding to nearest even with NaN as 0x7FC0: exactly
// c10::BFloat16's scalar conversion (LibTorch's vectorised cast agrees on
// every non-NaN value), written without a branch so that the loop around it
// vectorises.
inline uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
  return static_cast<uint16_t>(f != f ? 0x7FC0u : rounded);
}

// Hyper-parameters of one pass, in the parameters' dtype.
template <class T>
struct Hyper {
  T b1, omb1, b2, omb2, eps, decay;
  bool apply_decay;
};

// Elements [b, e) of one parameter. The arithmetic per element follows the
// reference op by op; `cp` (fp32 only) also receives the bf16 copy.
template <class T>
RHINE_INLINE void update_range(T* __restrict p, const T* __restrict g, T* __restrict m, T* __restrict v,
                               uint16_t* __restrict cp, int64_t b, int64_t e, const Hyper<T>& h, T neg_step,
                               T sbc2) {
  if (h.apply_decay)
    for (int64_t i = b; i < e; ++i) p[i] = p[i] * h.decay;
  auto update = [&](int64_t i) RHINE_INLINE_LAMBDA {
    const T gi = g[i];
    const T mi = m[i] * h.b1 + h.omb1 * gi;
    const T vi = v[i] * h.b2 + h.omb2 * gi * gi;
    const T den = std::sqrt(vi) / sbc2 + h.eps;
    const T pi = p[i] + neg_step * mi / den;
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    return pi;
  };
  if constexpr (std::is_same_v<T, float>) {
    if (cp != nullptr) {
      for (int64_t i = b; i < e; ++i) cp[i] = bf16_bits(update(i));
      return;
    }
  }
  for (int64_t i = b; i < e; ++i) update(i);
}

// One compiled body per instruction set (AVX-512, AVX2, baseline), picked at
// load time: the pass is arithmetic-bound (sqrt, division) at baseline SSE.
RHINE_CLONES void update_chunk(float* p, const float* g, float* m, float* v, uint16_t* cp, int64_t b, int64_t e,
                               const Hyper<float>& h, float neg_step, float sbc2) {
  update_range(p, g, m, v, cp, b, e, h, neg_step, sbc2);
}
RHINE_CLONES void update_chunk(double* p, const double* g, double* m, double* v, uint16_t* cp, int64_t b,
                               int64_t e, const Hyper<double>& h, double neg_step, double sbc2) {
  update_range(p, g, m, v, cp, b, e, h, neg_step, sbc2);
}

template <class T>
void run(const std::vector<AdamWBuffers<T>>& items, double beta1, double beta2, double eps,
         double decay) {
  // Chunks over all buffers, so small and large tensors share the threads.
  struct Chunk {
    int32_t item;
    int64_t begin, end;
  };
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < items.size(); ++i)
    for (int64_t b = 0; b < items[i].n; b += kChunk)
      chunks.push_back({static_cast<int32_t>(i), b, std::min(items[i].n, b + kChunk)});
  const Hyper<T> h{T(beta1), T(1 - beta1), T(beta2), T(1 - beta2), T(eps), T(decay), decay != 1.0};
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const auto& it = items[chunks[c].item];
      update_chunk(it.p, it.g, it.m, it.v, it.bf16_copy, chunks[c].begin, chunks[c].end, h, T(-it.step_size),
                   T(it.sqrt_bc2));
    }
  });
}

}  // namespace

void fused_adamw_cpu(const std::vector<AdamWBuffers<float>>& items, double beta1, double beta2,
                     double eps, double decay) {
  run(items, beta1, beta2, eps, decay);
}
void fused_adamw_cpu(const std::vector<AdamWBuffers<double>>& items, double beta1, double beta2,
                     double eps, double decay) {
  run(items, beta1, beta2, eps, decay);
}

}  // namespace rhine::detail
