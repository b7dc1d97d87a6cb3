// DeepSeek-style design on the CPU (JSON Lines, bench.h):
//  - "moe_dispatch": one MoE layer forward + backward, grouped (sort/gather/
//    index_add, one call per expert) vs the loop twin, and, on LibTorch 2.x,
//    the grouped GEMM (at::_grouped_mm over the stacked expert weights);
//    "moe_dispatch_speedup" (loop/grouped, and per-expert/grouped-GEMM);
//  - "train_step_moe": training tokens/s (forward + backward + AdamW) of an
//    MLA + MoE model and of a dense Llama model with the same active
//    parameters per token, and of the same MLA + MoE model in Python PyTorch
//    eager (bench/bench_moe.py, /usr/bin/python3, same run); "train_step_moe_ratio"
//    = Rhine tokens/s / Python tokens/s;
//  - "kv_cache": KV-cache bytes per token per layer (fp32 and bf16) and
//    "decode": decode tokens/s after a prefill, for MLA (absorbed, latent
//    cache) vs GQA vs MHA at equal width.
//
//   bench_moe [--quick] [--no-python] [--python PATH] [--threads N] [--decode-only]
#include <ATen/core/grad_mode.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/optim/adamw.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "bench.h"
#include "rhine/nn/mla.h"
#include "rhine/nn/model.h"
#include "rhine/nn/moe.h"
#include "rhine/torch/compat.h"
#include "rhine/torch/runtime.h"

namespace {

using rhine::Json;
using rhine::nn::ModelConfig;

// The MLA + MoE model of the training comparison (~14M parameters, ~5M active).
Json moe_model_json() {
  return Json{{"model_type", "deepseek_v3"}, {"vocab_size", 8000}, {"hidden_size", 256},
              {"intermediate_size", 688},    {"num_hidden_layers", 4}, {"num_attention_heads", 4},
              {"num_key_value_heads", 4},    {"max_position_embeddings", 4096},
              {"rms_norm_eps", 1e-5},        {"q_lora_rank", nullptr}, {"kv_lora_rank", 64},
              {"qk_nope_head_dim", 32},      {"qk_rope_head_dim", 16}, {"v_head_dim", 32},
              {"n_routed_experts", 16},      {"n_shared_experts", 1},  {"num_experts_per_tok", 2},
              {"moe_intermediate_size", 128}, {"first_k_dense_replace", 1},
              {"n_group", 1},                {"topk_group", 1},        {"routed_scaling_factor", 2.5},
              {"scoring_func", "sigmoid"},   {"topk_method", "noaux_tc"}, {"norm_topk_prob", true},
              {"num_nextn_predict_layers", 0}, {"tie_word_embeddings", false}};
}

// A dense Llama model whose parameters equal the MoE model's active ones.
ModelConfig dense_twin(const ModelConfig& moe) {
  ModelConfig d = ModelConfig::from_json(Json{{"model_type", "llama"},
                                              {"vocab_size", moe.vocab_size},
                                              {"hidden_size", moe.hidden_size},
                                              {"intermediate_size", 8},
                                              {"num_hidden_layers", moe.num_hidden_layers},
                                              {"num_attention_heads", moe.num_attention_heads},
                                              {"max_position_embeddings", 4096},
                                              {"rms_norm_eps", 1e-5}});
  const auto target = rhine::nn::active_parameter_count(moe);
  const auto base = rhine::nn::parameter_count(d);
  // Each unit of intermediate_size adds 3 * C * L parameters.
  d.intermediate_size += (target - base) / (3 * d.hidden_size * d.num_hidden_layers);
  return d;
}

std::map<std::string, Json> run_python(const std::string& cmd) {
  std::map<std::string, Json> out;
  std::unique_ptr<FILE, int (*)(FILE*)> p(popen(cmd.c_str(), "r"), pclose);
  if (!p) return out;
  char line[8192];
  while (std::fgets(line, sizeof line, p.get())) {
    std::printf("%s", line);
    std::fflush(stdout);
    try {
      auto j = Json::parse(line);
      if (j.value("name", "") != "train_step_moe_python") continue;
      const auto& pr = j["params"];
      out[pr["dtype"].get<std::string>() + "/" + std::to_string(pr["threads"].get<int>())] = j;
    } catch (...) {
    }
  }
  return out;
}

void bench_dispatch(bool quick, int threads) {
  ModelConfig c = ModelConfig::from_json(moe_model_json());
  for (auto [E, K] : {std::pair<int64_t, int64_t>{16, 2}, {64, 6}}) {
    c.n_routed_experts = E;
    c.num_experts_per_tok = K;
    at::manual_seed(0);
    rhine::nn::MoE moe(c);
    const int64_t B = 4, T = quick ? 128 : 512;
    auto x0 = at::randn({B, T, c.hidden_size});
    std::map<std::string, double> medians;
    std::vector<rhine::nn::MoEDispatch> dispatches = {rhine::nn::MoEDispatch::Loop, rhine::nn::MoEDispatch::Grouped};
    if (rhine::nn::grouped_gemm_available()) dispatches.push_back(rhine::nn::MoEDispatch::GroupedGemm);
    for (auto d : dispatches) {
      moe->dispatch = d;
      auto s = rhine::bench::time_runs(
          [&] {
            auto x = x0.detach().requires_grad_(true);
            moe(x).y.sum().backward();
          },
          quick ? 3 : 9, 1);
      const std::string impl = d == rhine::nn::MoEDispatch::Loop      ? "loop"
                               : d == rhine::nn::MoEDispatch::Grouped ? "grouped"
                                                                      : "grouped_gemm";
      medians[impl] = s.median;
      rhine::bench::report("moe_dispatch",
                           {{"E", E}, {"K", K}, {"tokens", B * T}, {"C", c.hidden_size},
                            {"I", c.moe_intermediate_size}, {"threads", threads},
                            {"impl", impl}, {"pass", "fwd+bwd"}},
                           s, "ms", 1e3);
    }
    auto speedup = [&](const std::string& a, const std::string& b) {
      if (!medians.count(a) || !medians.count(b)) return;
      Json j = {{"name", "moe_dispatch_speedup"},
                {"params", {{"E", E}, {"K", K}, {"tokens", B * T}, {"threads", threads}}},
                {"median", medians[a] / medians[b]},
                {"unit", a + "/" + b}};
      std::printf("%s\n", j.dump().c_str());
    };
    speedup("loop", "grouped");
    speedup("grouped", "grouped_gemm");
  }
}

double bench_train(const std::string& name, const ModelConfig& config, bool bf16, bool quick,
                   int threads) {
  rhine::nn::CausalLMOptions lo;
  lo.init_seed = 0;
  rhine::nn::CausalLM lm(config, lo);
  lm->train();
  torch::optim::AdamW opt(lm->parameters(), torch::optim::AdamWOptions(1e-4).weight_decay(0.1));
  const int64_t B = 4, T = quick ? 64 : 256;
  at::manual_seed(0);
  auto ids = at::randint(config.vocab_size, {B, T}, at::kLong);
  rhine::nn::ForwardOptions fo;
  fo.labels = ids.roll(-1, 1);
  fo.mtp_lambda = 0.3;  // MTP heads train (a model without them ignores it)
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
        if (config.uses_moe()) lm->update_router_bias(out.expert_counts, 1e-3);
      },
      quick ? 2 : 5, 1);
  rhine::bench::report_rate("train_step_moe",
                            {{"model", name},
                             {"n_params", lm->num_parameters()},
                             {"n_active", rhine::nn::active_parameter_count(config)},
                             {"B", B}, {"T", T}, {"dtype", bf16 ? "bf16" : "fp32"},
                             {"threads", threads}, {"impl", "rhine"}},
                            s, double(B * T), "tokens/s");
  return double(B * T) / s.median;
}

void bench_decode(bool quick, int threads) {
  // Equal width C = 512, 8 query heads, 4 layers, dense MLP.
  auto base = Json{{"vocab_size", 8000}, {"hidden_size", 512},      {"intermediate_size", 1376},
                   {"num_hidden_layers", 4}, {"num_attention_heads", 8}, {"max_position_embeddings", 8192},
                   {"rms_norm_eps", 1e-5}};
  std::vector<std::pair<std::string, Json>> kinds;
  Json mha = base, gqa = base, mla = base;
  mha["model_type"] = "llama";
  mha["num_key_value_heads"] = 8;
  gqa["model_type"] = "llama";
  gqa["num_key_value_heads"] = 2;
  mla["model_type"] = "deepseek_v2";
  mla["num_key_value_heads"] = 8;
  mla["q_lora_rank"] = nullptr;
  mla["kv_lora_rank"] = 256;  // 4 * d_h, as V2/V3
  mla["qk_nope_head_dim"] = 64;
  mla["qk_rope_head_dim"] = 32;
  mla["v_head_dim"] = 64;
  kinds = {{"MHA", mha}, {"GQA", gqa}, {"MLA", mla}};
  const int64_t prompt = quick ? 128 : 1024, steps = quick ? 16 : 64;
  for (auto& [kind, j] : kinds) {
    auto c = ModelConfig::from_json(j);
    const auto elems = rhine::nn::kv_cache_elements_per_token(c);
    for (auto [dt, bytes] : {std::pair<const char*, int>{"fp32", 4}, {"bf16", 2}}) {
      Json r = {{"name", "kv_cache"},
                {"params", {{"attention", kind}, {"C", 512}, {"heads", 8}, {"dtype", dt}}},
                {"median", elems * bytes},
                {"unit", "bytes/token/layer"}};
      std::printf("%s\n", r.dump().c_str());
    }
    rhine::nn::CausalLMOptions lo;
    lo.init_seed = 0;
    rhine::nn::CausalLM lm(c, lo);
    lm->eval();
    at::NoGradGuard ng;
    auto ids = at::randint(c.vocab_size, {1, prompt}, at::kLong);
    auto s = rhine::bench::time_runs(
        [&] {
          auto cache = lm->make_cache();
          rhine::nn::ForwardOptions fo;
          fo.cache = &cache;
          fo.last_logits_only = true;
          auto next = lm->forward(ids, fo).logits.argmax(-1);  // [1, 1]
          for (int64_t t = 0; t < steps; ++t) next = lm->forward(next, fo).logits.argmax(-1);
        },
        quick ? 1 : 3, 1);
    // Prefill time measured alone, subtracted to get the decode rate.
    auto sp = rhine::bench::time_runs(
        [&] {
          auto cache = lm->make_cache();
          rhine::nn::ForwardOptions fo;
          fo.cache = &cache;
          fo.last_logits_only = true;
          lm->forward(ids, fo);
        },
        quick ? 1 : 3, 1);
    Json r = {{"name", "decode"},
              {"params", {{"attention", kind}, {"C", 512}, {"layers", 4}, {"prompt", prompt},
                          {"new_tokens", steps}, {"threads", threads}, {"dtype", "fp32"},
                          {"cache_elements_per_token_layer", elems}}},
              {"median", double(steps) / std::max(1e-9, s.median - sp.median)},
              {"unit", "tokens/s"}};
    std::printf("%s\n", r.dump().c_str());
    std::fflush(stdout);
  }
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false, python = true, decode_only = false;
  int threads = 2;
  std::string script = __FILE__;
  script = script.substr(0, script.size() - 4) + ".py";
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick"))
      quick = true;
    else if (!std::strcmp(argv[i], "--decode-only"))
      decode_only = true;
    else if (!std::strcmp(argv[i], "--no-python"))
      python = false;
    else if (!std::strcmp(argv[i], "--python") && i + 1 < argc)
      script = argv[++i];
    else if (!std::strcmp(argv[i], "--threads") && i + 1 < argc)
      threads = std::atoi(argv[++i]);
  }
  rhine::init_runtime({});
  at::set_num_threads(threads);
  if (decode_only) {
    bench_decode(quick, threads);
    return 0;
  }
  bench_dispatch(quick, threads);

  ModelConfig moe = ModelConfig::from_json(moe_model_json());
  ModelConfig dense = dense_twin(moe);
  std::map<std::string, double> rhine_rate;
  for (bool bf16 : {false, true}) {
    const std::string dt = bf16 ? "bf16" : "fp32";
    rhine_rate[dt] = bench_train("mla_moe", moe, bf16, quick, threads);
    bench_train("dense_equal_active", dense, bf16, quick, threads);
  }
  if (python) {
    std::string cmd = "/usr/bin/python3 " + script + " --threads " + std::to_string(threads) +
                      (quick ? " --quick" : "") + " 2>&1";
    auto py = run_python(cmd);
    for (auto& [dt, rate] : rhine_rate) {
      auto it = py.find(dt + "/" + std::to_string(threads));
      if (it == py.end()) continue;
      Json j = {{"name", "train_step_moe_ratio"},
                {"params", {{"dtype", dt}, {"threads", threads}, {"model", "mla_moe"}}},
                {"median", rate / it->second["median"].get<double>()},
                {"unit", "rhine/python"}};
      std::printf("%s\n", j.dump().c_str());
    }
  }
  bench_decode(quick, threads);
  return 0;
}
