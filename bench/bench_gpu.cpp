// GPU training throughput (scripts/gpu-check.sh runs it): one training step
// (forward + backward + AdamW) of dense Llama-style models in bf16 autocast on
// cuda:0, side by side with the same models in PyTorch eager and torch.compile
// (bench/bench_gpu.py, the model of bench_model.py, run by the Python given
// with --python in the same run). Prints JSON Lines (bench.h):
//  - "gpu_train_step": tokens/s (median over steps, timed after a device
//    synchronize), with "mfu" and peak memory;
//  - "gpu_train_step_python" (from the Python side, impl eager / compile);
//  - "gpu_train_step_ratio": Rhine tokens/s over each Python impl's.
// MFU = tokens/s x FLOPs per token / peak, FLOPs per token = 6 N (N: parameters
// without the embedding table) + 12 L T C (attention scores and values,
// forward + backward, causal halving not counted: PaLM's convention); peak
// bf16 dense of the GPU from --peak-tflops (default 989: H100/H200 SXM).
//
//   bench_gpu [--size 125M|0.9B] [--steps N] [--python PYTHON] [--no-python] [--peak-tflops F]
#include <ATen/ops/randint.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>

#include "bench.h"
#include "rhine/nn/model.h"
#include "rhine/optim/adamw.h"
#include "rhine/torch/compat.h"
#include "rhine/torch/cuda.h"
#include "rhine/torch/runtime.h"

namespace {

struct Size {
  std::string name;
  int64_t V, C, L, H, Hkv, I, B, T;
};

// Keep in step with SIZES in bench_gpu.py.
const Size kSizes[] = {{"125M", 32000, 768, 12, 12, 4, 2048, 8, 1024},
                       {"0.9B", 32000, 2048, 16, 16, 8, 5632, 4, 2048}};

}  // namespace

int main(int argc, char** argv) try {
  std::string only_size, python = "python3";
  int steps = 10;
  double peak_tflops = 989.0;
  bool run_python = true;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--size") && i + 1 < argc) only_size = argv[++i];
    else if (!std::strcmp(argv[i], "--steps") && i + 1 < argc) steps = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--python") && i + 1 < argc) python = argv[++i];
    else if (!std::strcmp(argv[i], "--no-python")) run_python = false;
    else if (!std::strcmp(argv[i], "--peak-tflops") && i + 1 < argc) peak_tflops = std::atof(argv[++i]);
  }
  if (!rhine::cuda::available()) {
    std::fprintf(stderr, "[bench_gpu] no CUDA device (%s); nothing measured\n",
                 rhine::cuda::compiled_with_cuda() ? "none visible" : "Rhine built without CUDA");
    return 77;
  }
  const c10::Device gpu(c10::DeviceType::CUDA, 0);
  std::map<std::string, double> rhine_rate;
  std::map<std::string, int64_t> rhine_params;
  for (const auto& s : kSizes) {
    if (!only_size.empty() && s.name != only_size) continue;
    const rhine::Json cfg = {{"model_type", "llama"},       {"vocab_size", s.V},
                             {"hidden_size", s.C},          {"num_hidden_layers", s.L},
                             {"num_attention_heads", s.H},  {"num_key_value_heads", s.Hkv},
                             {"intermediate_size", s.I},    {"max_position_embeddings", 4096},
                             {"rms_norm_eps", 1e-5},        {"tie_word_embeddings", false}};
    rhine::nn::CausalLMOptions lo;
    lo.init_seed = 0;
    rhine::nn::CausalLM lm(rhine::nn::ModelConfig::from_json(cfg), lo);
    lm->to(gpu);
    lm->train();
    rhine::NamedParameters params;
    for (const auto& p : lm->named_parameters()) params.push_back({p.key(), p.value()});
    rhine::AdamWOptions ao;
    ao.lr = 1e-4;
    ao.weight_decay = 0.1;
    rhine::AdamW opt(params, ao, rhine::OptimizerImpl::kForeach);
    at::manual_seed(0);
    const auto ids = at::randint(s.V, {s.B, s.T}, at::TensorOptions().dtype(at::kLong).device(gpu));
    rhine::nn::ForwardOptions fo;
    fo.labels = ids.roll(-1, 1);
    fo.mtp_lambda = 0.3;  // MTP heads train (a model without them ignores it)
    rhine::cuda::reset_peak_memory(gpu);
    auto stats = rhine::bench::time_runs(
        [&] {
          opt.zero_grad();
          at::Tensor loss;
          {
            rhine::AutocastGuard g(at::kCUDA, at::kBFloat16);
            loss = lm->forward(ids, fo).loss;
          }
          loss.backward();
          opt.step();
          rhine::cuda::synchronize(gpu);
        },
        steps, 3);
    const int64_t n = lm->num_parameters(), n_embed = s.V * s.C;
    const double flops_per_token = 6.0 * double(n - n_embed) + 12.0 * double(s.L * s.T * s.C);
    const double tps = double(s.B * s.T) / stats.median;
    const auto mem = rhine::cuda::memory_stats(gpu);
    rhine::Json j = {{"name", "gpu_train_step"},
                     {"params", {{"size", s.name}, {"n_params", n}, {"B", s.B}, {"T", s.T}, {"dtype", "bf16"},
                                 {"impl", "rhine"}, {"device", rhine::cuda::device_name(gpu)},
                                 {"torch", rhine::torch_version()}}},
                     {"median", tps},
                     {"min", double(s.B * s.T) / stats.max},
                     {"max", double(s.B * s.T) / stats.min},
                     {"unit", "tokens/s"},
                     {"mfu", tps * flops_per_token / (peak_tflops * 1e12)},
                     {"peak_allocated_gib", double(mem.peak_allocated) / (1 << 30)},
                     {"runs", stats.runs}};
    std::printf("%s\n", j.dump().c_str());
    std::fflush(stdout);
    rhine_rate[s.name] = tps;
    rhine_params[s.name] = n;
  }
  if (!run_python) return 0;
  std::string script = __FILE__;
  script = script.substr(0, script.size() - 4) + ".py";
  std::string cmd = python + " " + script + " --steps " + std::to_string(steps);
  if (!only_size.empty()) cmd += " --size " + only_size;
  std::unique_ptr<FILE, int (*)(FILE*)> p(popen(cmd.c_str(), "r"), pclose);
  if (!p) return 1;
  char line[4096];
  while (std::fgets(line, sizeof line, p.get())) {
    std::printf("%s", line);
    std::fflush(stdout);
    try {
      const auto j = rhine::Json::parse(line);
      if (j.value("name", "") != "gpu_train_step_python") continue;
      const auto size = j["params"]["size"].get<std::string>();
      if (!rhine_rate.count(size)) continue;
      // The same architecture on both sides: the parameter counts must agree.
      const auto n_py = j["params"].value("n_params", int64_t{0});
      if (n_py != rhine_params[size])
        std::fprintf(stderr, "[bench_gpu] %s: Python model has %lld parameters, Rhine %lld\n", size.c_str(),
                     static_cast<long long>(n_py), static_cast<long long>(rhine_params[size]));
      rhine::Json r = {{"name", "gpu_train_step_ratio"},
                       {"params", {{"size", size}, {"python_impl", j["params"]["impl"]}, {"same_n_params", n_py == rhine_params[size]}}},
                       {"median", rhine_rate[size] / j["median"].get<double>()},
                       {"unit", "rhine/python"}};
      std::printf("%s\n", r.dump().c_str());
    } catch (...) {
    }
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "%s\n", e.what());
  return 1;
}
