// Attention throughput through rhine::attention (fused kernels on LibTorch 2.x,
// the math path on 1.13), fp32 and bf16 autocast, causal, GQA 4:1; and packed
// documents through document_starts (per document on the CPU, the
// variable-length flash kernel on CUDA) vs through the dense document mask.
//   bench_attention [--cuda-only]
// Prints JSON Lines (see bench.h).
#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "bench.h"
#include "rhine/torch/compat.h"
#include "rhine/torch/cuda.h"
#include "rhine/torch/runtime.h"

int main(int argc, char** argv) {
  // --cuda-only: just the packed documents on cuda (what scripts/gpu-check.sh runs).
  const bool cuda_only = argc > 1 && std::string(argv[1]) == "--cuda-only";
  auto info = rhine::init_runtime({});
  for (int64_t T : {128, 512}) {
    if (cuda_only) break;
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
  // Packed documents: AttentionOptions::document_starts (one call per document
  // on the CPU, one variable-length flash call for all documents on CUDA in
  // bf16) against the dense [B, 1, T, T] document mask it replaces, forward +
  // backward, bf16, rows of T = 1024 tokens cut into documents of about
  // `mean` tokens. On the CPU always; on cuda too when a GPU is there.
  std::vector<c10::Device> devices;
  if (!cuda_only) devices.emplace_back(at::kCPU);
  if (rhine::cuda::available()) devices.emplace_back(at::kCUDA, 0);
  for (const auto& device : devices) {
    for (int64_t mean : {64, 256}) {
      const int64_t B = 4, H = 8, Hkv = 2, D = 64, T = 1024;
      std::vector<std::vector<int64_t>> starts(B);
      at::manual_seed(3);
      for (int64_t b = 0; b < B; ++b) {  // lengths uniform in [mean / 2, 3 mean / 2)
        for (int64_t t = 0; t < T; t += mean / 2 + at::randint(0, mean, {1}, at::kLong).item<int64_t>())
          starts[b].push_back(t);
      }
      const auto opts = at::TensorOptions().dtype(at::kBFloat16).device(device);
      auto q = at::randn({B, H, T, D}, opts).requires_grad_(true);
      auto k = at::randn({B, Hkv, T, D}, opts).requires_grad_(true);
      auto v = at::randn({B, Hkv, T, D}, opts).requires_grad_(true);
      rhine::AttentionOptions per_doc;
      per_doc.is_causal = true;
      per_doc.document_starts = starts;
      rhine::AttentionOptions dense;
      dense.mask = rhine::document_mask(starts, T, device);
      for (const bool segmented : {false, true}) {
        const auto& o = segmented ? per_doc : dense;
        auto s = rhine::bench::time_runs([&] {
          rhine::attention(q, k, v, o).sum().backward();
          (void)q.grad().sum().item<float>();  // waits for the device
          for (auto* t : {&q, &k, &v}) t->mutable_grad() = at::Tensor();
        }, 7, 1);
        rhine::bench::report("attention_packed_documents",
                             {{"B", B}, {"H", H}, {"Hkv", Hkv}, {"T", T}, {"D", D}, {"mean_doc", mean},
                              {"path", segmented ? "document_starts" : "dense_mask"},
                              {"kernel", rhine::attention_backend(q, k, v, o)}, {"dtype", "bf16"},
                              {"device", device.str()}, {"threads", info.threads}, {"torch", info.torch_version}},
                             s, "ms", 1e3);
      }
    }
  }
  return 0;
}
