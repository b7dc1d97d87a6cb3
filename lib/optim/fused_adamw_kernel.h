#pragma once
// Internal: the one-pass AdamW kernel over raw CPU buffers (no ATen types, so
// this translation unit compiles in a second and can get -O3 -fno-math-errno).
#include <cstdint>
#include <vector>

namespace rhine::detail {

/// One contiguous parameter: p, g, m, v of n elements; its own step.
template <class T>
struct AdamWBuffers {
  T* p;
  const T* g;
  T* m;
  T* v;
  int64_t n;
  double step_size;  ///< lr / (1 - beta1^t)
  double sqrt_bc2;   ///< sqrt(1 - beta2^t)
  /// Optional: the bf16 copy of the updated p (bits), written in the same pass.
  uint16_t* bf16_copy = nullptr;
};

/// decay = 1 - lr*wd (1 = no decay). Threads over chunks of all buffers.
void fused_adamw_cpu(const std::vector<AdamWBuffers<float>>& items, double beta1, double beta2,
                     double eps, double decay);
void fused_adamw_cpu(const std::vector<AdamWBuffers<double>>& items, double beta1, double beta2,
                     double eps, double decay);

}  // namespace rhine::detail
