// Attention throughput through rhine::attention (fused kernels on LibTorch 2.x,
// the math path on 1.13), fp32 and bf16 autocast, causal, GQA 4:1.
// Prints JSON Lines (see bench.h).
#include <ATen/ATen.h>

#include "bench.h"
#include "rhine/torch/compat.h"
#include "rhine/torch/runtime.h"

int main() {
  auto info = rhine::init_runtime({});
  for (int64_t T : {128, 512}) {
    for (bool bf16 : {false, true}) {
      const int64_t B = 4, H = 8, Hkv = 2, D = 64;
      auto q = at::randn({B, H, T, D}), k = at::randn({B, Hkv, T, D}), v = at::randn({B, Hkv, T, D});
      rhine::AttentionOptions o;
      o.is_causal = true;
      auto s = rhine::bench::time_runs([&] {
        rhine::AutocastGuard g(at::kCPU, at::kBFloat16, bf16);
        auto out = rhine::attention(bf16 ? q.to(at::kBFloat16) : q, bf16 ? k.to(at::kBFloat16) : k,
                                    bf16 ? v.to(at::kBFloat16) : v, o);
        (void)out.sum().item<float>();
      });
      // FLOPs: QK^T and PV, each 2*B*H*T*T*D, halved by causality.
      const double flops = 2.0 * 2.0 * B * H * T * T * D / 2.0;
      rhine::bench::report_rate("attention_forward",
                                {{"B", B}, {"H", H}, {"Hkv", Hkv}, {"T", T}, {"D", D},
                                 {"dtype", bf16 ? "bf16" : "fp32"}, {"threads", info.threads},
                                 {"torch", info.torch_version}},
                                s, flops / 1e9, "GFLOP/s");
    }
  }
  return 0;
}
