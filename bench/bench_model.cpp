// Training-step throughput (forward + backward + AdamW step) of dense
// Llama-style models of ~10M and ~50M parameters, fp32 and bf16 autocast, 1 and
// 2 threads, side by side with the same model in Python PyTorch
// (bench/bench_model.py, run with /usr/bin/python3 in the same run). Prints JSON
// Lines (bench.h): "train_step" (Rhine), "train_step_python" (PyTorch eager) and
// "train_step_ratio" (Rhine tokens/s / Python tokens/s, median over median);
// also the fused CPU kernels against their plain-op twins ("rms_norm_fwd_bwd").
//
//   bench_model [--quick] [--no-python] [--python PATH_TO_bench_model.py]
//               [--size 10M|50M] [--threads N] [--dtype fp32|bf16]   (filters)
//               [--kernels-only]   (only fused kernels vs their twins)
//               [--fused]          (train with CausalLMOptions::fused_kernels)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/optim/adamw.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>

#include "bench.h"
#include "rhine/nn/fused.h"
#include "rhine/nn/layers.h"
#include "rhine/nn/model.h"
#include "rhine/torch/compat.h"
#include "rhine/torch/runtime.h"

namespace {

struct Size {
  std::string name;
  rhine::Json config;
};

std::vector<Size> sizes() {
  auto cfg = [](int64_t V, int64_t C, int64_t L, int64_t H, int64_t Hkv, int64_t I) {
    return rhine::Json{{"model_type", "llama"},    {"vocab_size", V},
                       {"hidden_size", C},         {"num_hidden_layers", L},
                       {"num_attention_heads", H}, {"num_key_value_heads", Hkv},
                       {"intermediate_size", I},   {"max_position_embeddings", 4096},
                       {"rms_norm_eps", 1e-5},     {"tie_word_embeddings", false}};
  };
  return {{"10M", cfg(8000, 256, 8, 4, 2, 688)}, {"50M", cfg(16000, 512, 12, 8, 4, 1376)}};
}

// Reads the JSON Lines the Python twin prints, keyed by "size/dtype/threads".
std::map<std::string, rhine::Json> run_python(const std::string& script, bool quick,
                                              const std::string& filters) {
  std::map<std::string, rhine::Json> out;
  std::string cmd = "/usr/bin/python3 " + script + (quick ? " --quick" : "") + filters;
  std::unique_ptr<FILE, int (*)(FILE*)> p(popen(cmd.c_str(), "r"), pclose);
  if (!p) return out;
  char line[4096];
  while (std::fgets(line, sizeof line, p.get())) {
    std::printf("%s", line);  // pass the Python measurements through
    try {
      auto j = rhine::Json::parse(line);
      if (j.value("name", "") != "train_step_python") continue;
      const auto& pr = j["params"];
      out[pr["size"].get<std::string>() + "/" + pr["dtype"].get<std::string>() + "/" +
          std::to_string(pr["threads"].get<int>())] = j;
    } catch (...) {
    }
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false, python = true, kernels_only = false, fused = false;
  std::string only_size, only_dtype, filters;
  int only_threads = 0;
  // The Python twin sits next to this source file.
  std::string script = __FILE__;
  script = script.substr(0, script.size() - 4) + ".py";
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick"))
      quick = true;
    else if (!std::strcmp(argv[i], "--fused"))
      fused = true;
    else if (!std::strcmp(argv[i], "--kernels-only"))
      kernels_only = true;
    else if (!std::strcmp(argv[i], "--no-python"))
      python = false;
    else if (!std::strcmp(argv[i], "--python") && i + 1 < argc)
      script = argv[++i];
    else if (!std::strcmp(argv[i], "--size") && i + 1 < argc)
      only_size = argv[++i];
    else if (!std::strcmp(argv[i], "--dtype") && i + 1 < argc)
      only_dtype = argv[++i];
    else if (!std::strcmp(argv[i], "--threads") && i + 1 < argc)
      only_threads = std::atoi(argv[++i]);
  }
  rhine::init_runtime({});
  // Fused kernels vs their plain-op twins: RMSNorm forward + backward.
  for (int threads : {1, 2}) {
    if (only_threads && threads != only_threads) continue;
    at::set_num_threads(threads);
    for (int64_t N : {512, 2048})
      for (auto xt : {at::kFloat, at::kBFloat16}) {
        const int64_t rows = 4096;
        auto x0 = at::randn({rows, N}).to(xt);
        auto w = at::ones({N}).requires_grad_(true);
        auto dy = at::randn({rows, N});
        double twin_median = 0;
        for (bool use_fused : {false, true}) {
          auto s = rhine::bench::time_runs(
              [&] {
                auto x = x0.detach().requires_grad_(true);
                auto y = use_fused ? rhine::nn::fused_rms_norm(x, w, 1e-5)
                                   : rhine::nn::rms_norm(x, w, 1e-5);
                y.backward(dy);
              },
              quick ? 5 : 21, 2);
          rhine::Json params = {{"rows", rows},
                                {"N", N},
                                {"dtype", xt == at::kFloat ? "fp32" : "bf16"},
                                {"threads", threads},
                                {"impl", use_fused ? "fused" : "twin"}};
          rhine::bench::report("rms_norm_fwd_bwd", params, s, "ms", 1e3);
          if (!use_fused) twin_median = s.median;
          if (use_fused) {
            params.erase("impl");
            rhine::Json j = {{"name", "rms_norm_fused_speedup"},
                             {"params", params},
                             {"median", twin_median / s.median},
                             {"unit", "twin/fused"}};
            std::printf("%s\n", j.dump().c_str());
          }
        }
      }
  }
  if (kernels_only) return 0;
  const int64_t B = 4, T = quick ? 64 : 256;
  const int runs = quick ? 2 : 5;
  std::map<std::string, double> rhine_rate;
  if (!only_size.empty()) filters += " --size " + only_size;
  if (!only_dtype.empty()) filters += " --dtype " + only_dtype;
  if (only_threads) filters += " --threads " + std::to_string(only_threads);
  for (const auto& size : sizes()) {
    if (!only_size.empty() && size.name != only_size) continue;
    auto config = rhine::nn::ModelConfig::from_json(size.config);
    for (int threads : {1, 2}) {
      if (only_threads && threads != only_threads) continue;
      at::set_num_threads(threads);
      for (bool bf16 : {false, true}) {
        if (!only_dtype.empty() && only_dtype != (bf16 ? "bf16" : "fp32")) continue;
        rhine::nn::CausalLMOptions lo;
        lo.init_seed = 0;
        lo.fused_kernels = fused;
        rhine::nn::CausalLM lm(config, lo);
        lm->train();
        torch::optim::AdamW opt(lm->parameters(),
                                torch::optim::AdamWOptions(1e-4).weight_decay(0.1));
        at::manual_seed(0);
        auto ids = at::randint(config.vocab_size, {B, T}, at::kLong);
        rhine::nn::ForwardOptions fo;
        fo.labels = ids.roll(-1, 1);
        auto s = rhine::bench::time_runs(
            [&] {
              opt.zero_grad();
              rhine::nn::ForwardOutput out;
              {
                rhine::AutocastGuard g(at::kCPU, at::kBFloat16, bf16);
                out = lm->forward(ids, fo);
              }
              out.loss.backward();
              opt.step();
            },
            runs, 1);
        const std::string dtype = bf16 ? "bf16" : "fp32";
        rhine::Json params = {{"size", size.name},
                              {"n_params", lm->num_parameters()},
                              {"B", B},
                              {"T", T},
                              {"dtype", dtype},
                              {"threads", threads},
                              {"impl", fused ? "rhine_fused" : "rhine"}};
        rhine::bench::report_rate("train_step", params, s, double(B * T), "tokens/s");
        // Where the time goes: forward, backward, optimizer (median ms over the runs).
        std::vector<double> tf, tb, to;
        for (int r = 0; r < runs; ++r) {
          auto t0 = std::chrono::steady_clock::now();
          opt.zero_grad();
          rhine::nn::ForwardOutput out;
          {
            rhine::AutocastGuard g(at::kCPU, at::kBFloat16, bf16);
            out = lm->forward(ids, fo);
          }
          auto t1 = std::chrono::steady_clock::now();
          out.loss.backward();
          auto t2 = std::chrono::steady_clock::now();
          opt.step();
          auto t3 = std::chrono::steady_clock::now();
          tf.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
          tb.push_back(std::chrono::duration<double, std::milli>(t2 - t1).count());
          to.push_back(std::chrono::duration<double, std::milli>(t3 - t2).count());
        }
        auto med = [](std::vector<double> v) {
          std::sort(v.begin(), v.end());
          return v[v.size() / 2];
        };
        rhine::Json phases = {{"name", "train_step_phases"}, {"params", params},
                              {"forward_ms", med(tf)},       {"backward_ms", med(tb)},
                              {"optimizer_ms", med(to)},     {"unit", "ms"}};
        std::printf("%s\n", phases.dump().c_str());
        rhine_rate[size.name + "/" + dtype + "/" + std::to_string(threads)] = B * T / s.median;
      }
    }
  }
  if (!python) return 0;
  auto py = run_python(script, quick, filters);
  for (const auto& [key, rate] : rhine_rate) {
    auto it = py.find(key);
    if (it == py.end()) continue;
    rhine::Json params = it->second["params"];
    params.erase("impl");
    rhine::Json j = {{"name", "train_step_ratio"},
                     {"params", params},
                     {"median", rate / it->second["median"].get<double>()},
                     {"unit", "rhine/python"}};
    std::printf("%s\n", j.dump().c_str());
  }
  // bf16 over fp32 speed-up of Rhine itself.
  for (const auto& size : sizes())
    for (int threads : {1, 2}) {
      if (!rhine_rate.count(size.name + "/fp32/" + std::to_string(threads)) ||
          !rhine_rate.count(size.name + "/bf16/" + std::to_string(threads)))
        continue;
      const double f = rhine_rate[size.name + "/fp32/" + std::to_string(threads)];
      const double b = rhine_rate[size.name + "/bf16/" + std::to_string(threads)];
      rhine::Json j = {{"name", "train_step_bf16_speedup"},
                       {"params", {{"size", size.name}, {"threads", threads}}},
                       {"median", b / f},
                       {"unit", "bf16/fp32"}};
      std::printf("%s\n", j.dump().c_str());
    }
  return 0;
}
