// Training-step throughput (forward + backward + AdamW step) of dense
// Llama-style models of ~10M and ~50M parameters, fp32 and bf16 autocast, 1 and
// 2 threads, side by side with the same model in Python PyTorch
// (bench/bench_model.py, run with /usr/bin/python3 in the same run). Prints JSON
// Lines (bench.h): "train_step" (Rhine), "train_step_python" (PyTorch eager) and
// "train_step_ratio" (Rhine tokens/s / Python tokens/s, median over median),
// each for Rhine with plain ops ("rhine") and with the fused kernels
// ("rhine_fused": fused RMSNorm, RoPE, SwiGLU and cross-entropy); also the
// fused CPU kernels against their plain-op twins, forward + backward
// ("kernel_fwd_bwd" and "kernel_fused_speedup" for rms_norm, rope, swiglu,
// lm_loss).
//
//   bench_model [--quick] [--no-python] [--python PATH_TO_bench_model.py]
//               [--size 10M|50M] [--threads N] [--dtype fp32|bf16]   (filters)
//               [--kernels-only | --train-only]  (only the kernels / only training)
//               [--fused | --no-fused]  (train only with / without the fused kernels)
//               [--runs N]         (timed steps per configuration, default 5; median)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/optim/adamw.h>

#include <chrono>
#include <functional>
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
  bool quick = false, python = true, kernels_only = false, train_only = false, only_fused = false,
       no_fused = false;
  int runs_arg = 0;
  std::string only_size, only_dtype, filters;
  int only_threads = 0;
  // The Python twin sits next to this source file.
  std::string script = __FILE__;
  script = script.substr(0, script.size() - 4) + ".py";
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick"))
      quick = true;
    else if (!std::strcmp(argv[i], "--fused"))
      only_fused = true;
    else if (!std::strcmp(argv[i], "--no-fused"))
      no_fused = true;
    else if (!std::strcmp(argv[i], "--runs") && i + 1 < argc)
      runs_arg = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--kernels-only"))
      kernels_only = true;
    else if (!std::strcmp(argv[i], "--train-only"))
      train_only = true;
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
  // Fused kernels vs their plain-op twins, forward + backward, at the shapes
  // of the 50M model (B*T = 1024 tokens): RMSNorm, RoPE, SwiGLU, cross-entropy.
  const int kernel_runs = quick ? 5 : 21;
  auto kernel = [&](const std::string& name, int threads, at::ScalarType xt,
                    const rhine::Json& shape, const std::function<void(bool)>& step) {
    double twin_median = 0;
    for (bool use_fused : {false, true}) {
      auto s = rhine::bench::time_runs([&] { step(use_fused); }, kernel_runs, 2);
      rhine::Json params = shape;
      params["kernel"] = name;
      params["dtype"] = xt == at::kFloat ? "fp32" : "bf16";
      params["threads"] = threads;
      params["impl"] = use_fused ? "fused" : "twin";
      rhine::bench::report("kernel_fwd_bwd", params, s, "ms", 1e3);
      if (!use_fused) {
        twin_median = s.median;
        continue;
      }
      params.erase("impl");
      rhine::Json j = {{"name", "kernel_fused_speedup"},
                       {"params", params},
                       {"median", twin_median / s.median},
                       {"unit", "twin/fused"}};
      std::printf("%s\n", j.dump().c_str());
    }
  };
  for (int threads : {1, 2}) {
    if ((only_threads && threads != only_threads) || train_only) continue;
    at::set_num_threads(threads);
    for (auto xt : {at::kFloat, at::kBFloat16}) {
      const int64_t rows = 1024, C = 512, H = 8, Hkv = 4, D = 64, I = 1376, V = 16000;
      {  // RMSNorm over [rows, C]
        auto x0 = at::randn({rows, C}).to(xt);
        auto w = at::ones({C}).requires_grad_(true);
        auto dy = at::randn({rows, C});
        kernel("rms_norm", threads, xt, {{"rows", rows}, {"N", C}}, [&](bool f) {
          auto x = x0.detach().requires_grad_(true);
          auto y = f ? rhine::nn::fused_rms_norm(x, w, 1e-5) : rhine::nn::rms_norm(x, w, 1e-5);
          y.backward(dy);
        });
      }
      {  // RoPE on q and k as attention sees them: [B, H, T, D] views of [B, T, H*D]
        const int64_t B = 4, T = rows / B;
        rhine::nn::RopeParameters rp;
        auto freqs = rhine::nn::rope_frequencies(rp, D, 4096);
        auto pos = at::arange(T).unsqueeze(0).expand({B, T}).contiguous();
        auto [cos, sin] = rhine::nn::rope_cos_sin(freqs, pos, rhine::nn::RopeLayout::HalfSplit);
        auto q0 = at::randn({B, T, H * D}).to(xt), k0 = at::randn({B, T, Hkv * D}).to(xt);
        auto dq = at::randn({B, H, T, D}).to(xt), dk = at::randn({B, Hkv, T, D}).to(xt);
        kernel("rope", threads, xt, {{"B", B}, {"T", T}, {"H", H}, {"Hkv", Hkv}, {"D", D}},
               [&](bool f) {
                 auto q = q0.detach().requires_grad_(true), k = k0.detach().requires_grad_(true);
                 auto qv = q.view({B, T, H, D}).transpose(1, 2);
                 auto kv = k.view({B, T, Hkv, D}).transpose(1, 2);
                 const auto L = rhine::nn::RopeLayout::HalfSplit;
                 auto qr = f ? rhine::nn::fused_rope(qv, cos, sin, L)
                             : rhine::nn::apply_rope(qv, cos, sin, L);
                 auto kr = f ? rhine::nn::fused_rope(kv, cos, sin, L)
                             : rhine::nn::apply_rope(kv, cos, sin, L);
                 torch::autograd::backward({qr, kr}, {dq, dk});
               });
      }
      {  // SwiGLU gate [rows, I]
        auto g0 = at::randn({rows, I}).to(xt), u0 = at::randn({rows, I}).to(xt);
        auto dy = at::randn({rows, I}).to(xt);
        kernel("swiglu", threads, xt, {{"rows", rows}, {"I", I}}, [&](bool f) {
          auto g = g0.detach().requires_grad_(true), u = u0.detach().requires_grad_(true);
          auto y = f ? rhine::nn::fused_swiglu(g, u) : at::silu(g) * u;
          y.backward(dy);
        });
      }
      {  // cross-entropy over [rows, V] logits
        auto l0 = (at::randn({rows, V}) * 2).to(xt);
        auto t = at::randint(V, {rows}, at::kLong);
        kernel("lm_loss", threads, xt, {{"rows", rows}, {"V", V}}, [&](bool f) {
          auto l = l0.detach().requires_grad_(true);
          auto [ce, z, n] = f ? rhine::nn::fused_lm_loss(l, t, -100, 1e-4)
                              : rhine::nn::lm_loss(l, t, -100, 1e-4);
          (ce + z).backward();
        });
      }
    }
  }
  if (kernels_only) return 0;
  const int64_t B = 4, T = quick ? 64 : 256;
  const int runs = runs_arg > 0 ? runs_arg : quick ? 2 : 5;
  std::map<std::string, double> rhine_rate;  // "impl/size/dtype/threads" -> tokens/s
  if (!only_size.empty()) filters += " --size " + only_size;
  if (!only_dtype.empty()) filters += " --dtype " + only_dtype;
  if (only_threads) filters += " --threads " + std::to_string(only_threads);
  for (const auto& size : sizes()) {
    if (!only_size.empty() && size.name != only_size) continue;
    auto config = rhine::nn::ModelConfig::from_json(size.config);
    for (int threads : {1, 2}) {
      if (only_threads && threads != only_threads) continue;
      at::set_num_threads(threads);
      for (bool bf16 : {false, true})
      for (bool fused : {false, true}) {
        if (!only_dtype.empty() && only_dtype != (bf16 ? "bf16" : "fp32")) continue;
        if ((fused && no_fused) || (!fused && only_fused)) continue;
        rhine::nn::CausalLMOptions lo;
        lo.init_seed = 0;
        lo.fused_kernels = fused;
        rhine::nn::CausalLM lm(config, lo);
        rhine::nn::set_fused_kernels(*lm, fused);  // RMSNorm, RoPE, SwiGLU
        lm->train();
        torch::optim::AdamW opt(lm->parameters(),
                                torch::optim::AdamWOptions(1e-4).weight_decay(0.1));
        at::manual_seed(0);
        auto ids = at::randint(config.vocab_size, {B, T}, at::kLong);
        rhine::nn::ForwardOptions fo;
        fo.labels = ids.roll(-1, 1);
        fo.mtp_lambda = 0.3;  // MTP heads train (a model without them ignores it)
        auto labels = fo.labels->reshape({B * T});
        // The loss: CausalLM's own (lm_loss), or fused_lm_loss on its logits.
        auto forward = [&] {
          rhine::AutocastGuard g(at::kCPU, at::kBFloat16, bf16);
          if (!fused) return lm->forward(ids, fo).loss;
          auto logits = lm->forward(ids).logits;  // [B, T, V]
          auto [ce, z, n] = rhine::nn::fused_lm_loss(logits.reshape({B * T, -1}), labels,
                                                     -100, 0.0);
          return ce;
        };
        auto s = rhine::bench::time_runs(
            [&] {
              opt.zero_grad();
              at::Tensor loss = forward();
              loss.backward();
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
          at::Tensor loss = forward();
          auto t1 = std::chrono::steady_clock::now();
          loss.backward();
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
        rhine_rate[std::string(fused ? "rhine_fused" : "rhine") + "/" + size.name + "/" + dtype +
                   "/" + std::to_string(threads)] = B * T / s.median;
      }
    }
  }
  // bf16 over fp32 and fused over plain speed-ups of Rhine itself.
  auto rate = [&](const std::string& impl, const std::string& size, const std::string& dtype,
                  int threads) -> double {
    auto it = rhine_rate.find(impl + "/" + size + "/" + dtype + "/" + std::to_string(threads));
    return it == rhine_rate.end() ? 0.0 : it->second;
  };
  for (const auto& size : sizes())
    for (int threads : {1, 2})
      for (const char* impl : {"rhine", "rhine_fused"}) {
        const double f = rate(impl, size.name, "fp32", threads),
                     b = rate(impl, size.name, "bf16", threads);
        if (f > 0 && b > 0) {
          rhine::Json j = {{"name", "train_step_bf16_speedup"},
                           {"params", {{"size", size.name}, {"threads", threads}, {"impl", impl}}},
                           {"median", b / f},
                           {"unit", "bf16/fp32"}};
          std::printf("%s\n", j.dump().c_str());
        }
        if (std::string(impl) == "rhine") continue;
        for (const char* dtype : {"fp32", "bf16"}) {
          const double p = rate("rhine", size.name, dtype, threads),
                       q = rate("rhine_fused", size.name, dtype, threads);
          if (p <= 0 || q <= 0) continue;
          rhine::Json j = {{"name", "train_step_fused_speedup"},
                           {"params", {{"size", size.name}, {"threads", threads}, {"dtype", dtype}}},
                           {"median", q / p},
                           {"unit", "fused/plain"}};
          std::printf("%s\n", j.dump().c_str());
        }
      }
  std::fflush(stdout);
  if (!python) return 0;
  auto py = run_python(script, quick, filters + (runs_arg > 0 ? " --runs " + std::to_string(runs_arg) : ""));
  for (const auto& [key, r] : rhine_rate) {
    const auto slash = key.find('/');
    const std::string impl = key.substr(0, slash);
    auto it = py.find(key.substr(slash + 1));
    if (it == py.end()) continue;
    rhine::Json params = it->second["params"];
    params.erase("impl");
    params.erase("torch");
    params["rhine_impl"] = impl;
    rhine::Json j = {{"name", "train_step_ratio"},
                     {"params", params},
                     {"median", r / it->second["median"].get<double>()},
                     {"rhine_tokens_per_s", r},
                     {"python_tokens_per_s", it->second["median"].get<double>()},
                     {"unit", "rhine/python"}};
    std::printf("%s\n", j.dump().c_str());
  }
  return 0;
}
