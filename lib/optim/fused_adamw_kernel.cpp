// The fused AdamW pass: per element, read p, g, m, v once and write p, m, v
// once (the reference makes about 20 passes over memory), and where asked the
// parameter's bf16 copy in the same pass (AdamW::set_weight_copies). The arithmetic
// follows the reference op by op, in the parameter's dtype:
//   p = p*decay; m = m*b1 + (1-b1)*g; v = v*b2 + ((1-b2)*g)*g;
//   p = p + (-step_size*m) / (sqrt(v)/sqrt_bc2 + eps)
#include "fused_adamw_kernel.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

namespace rhine::detail {
namespace {

constexpr int64_t kChunk = 1 << 15;

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
  const T b1 = T(beta1), omb1 = T(1 - beta1), b2 = T(beta2), omb2 = T(1 - beta2), e = T(eps),
          dec = T(decay);
  const bool apply_decay = decay != 1.0;
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const auto& it = items[chunks[c].item];
      T* __restrict p = it.p;
      const T* __restrict g = it.g;
      T* __restrict m = it.m;
      T* __restrict v = it.v;
      const T neg_step = T(-it.step_size), sbc2 = T(it.sqrt_bc2);
      const int64_t end = chunks[c].end;
      if (apply_decay) {
        for (int64_t i = chunks[c].begin; i < end; ++i) p[i] = p[i] * dec;
      }
      auto update = [&](int64_t i) {
        const T gi = g[i];
        const T mi = m[i] * b1 + omb1 * gi;
        const T vi = v[i] * b2 + omb2 * gi * gi;
        const T den = std::sqrt(vi) / sbc2 + e;
        const T pi = p[i] + neg_step * mi / den;
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
        return pi;
      };
      if constexpr (std::is_same_v<T, float>) {
        if (uint16_t* __restrict cp = it.bf16_copy) {
          // Round to nearest even, as LibTorch's cast does (c10::BFloat16).
          for (int64_t i = chunks[c].begin; i < end; ++i) cp[i] = c10::BFloat16(update(i)).x;
          continue;
        }
      }
      for (int64_t i = chunks[c].begin; i < end; ++i) update(i);
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
