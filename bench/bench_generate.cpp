// Generation throughput: rhine::nn::generate producing many tokens after a short prompt, where
// the KV cache and the per-step sampling dominate (JSON Lines, see bench.h).
//
//   bench_generate [--new-tokens N] [--runs R] [--warmup W] [--threads N]
//
// Models (C 512, 4 layers, 8 query heads, vocabulary 8000, fp32, random weights): "GQA" (Llama,
// 2 KV heads) and "MLA" (DeepSeek-V2 style, kv_lora_rank 256, latent cache). Modes: greedy,
// and sampled (temperature 0.8, top-p 0.95, repetition penalty 1.1), with batch 1 and 4.
// Reports tokens/s (new tokens of all rows / seconds of the whole generate call, prefill
// included: the prompt is 16 tokens).
#include <ATen/Parallel.h>

#include <cstdlib>
#include <cstring>

#include "bench.h"
#include "rhine/core/json.h"
#include "rhine/nn/config.h"
#include "rhine/nn/generate.h"
#include "rhine/nn/model.h"

int main(int argc, char** argv) {
  std::int64_t new_tokens = 1024;
  int runs = 3, warmup = 1, threads = 2;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--new-tokens") && i + 1 < argc) new_tokens = std::atoll(argv[++i]);
    else if (!std::strcmp(argv[i], "--runs") && i + 1 < argc) runs = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--warmup") && i + 1 < argc) warmup = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--threads") && i + 1 < argc) threads = std::atoi(argv[++i]);
    else {
      std::fprintf(stderr, "usage: bench_generate [--new-tokens N] [--runs R] [--warmup W] [--threads N]\n");
      return 2;
    }
  }
  at::set_num_threads(threads);
  rhine::Json base = {{"vocab_size", 8000}, {"hidden_size", 512}, {"intermediate_size", 1376},
                      {"num_hidden_layers", 4}, {"num_attention_heads", 8}, {"max_position_embeddings", 8192},
                      {"rms_norm_eps", 1e-5}};
  rhine::Json gqa = base, mla = base;
  gqa["model_type"] = "llama";
  gqa["num_key_value_heads"] = 2;
  mla["model_type"] = "deepseek_v2";
  mla["num_key_value_heads"] = 8;
  mla["q_lora_rank"] = nullptr;
  mla["kv_lora_rank"] = 256;
  mla["qk_nope_head_dim"] = 64;
  mla["qk_rope_head_dim"] = 32;
  mla["v_head_dim"] = 64;
  for (const auto& [kind, j] : {std::pair<const char*, rhine::Json>{"GQA", gqa}, {"MLA", mla}}) {
    const auto config = rhine::nn::ModelConfig::from_json(j);
    rhine::nn::CausalLMOptions lo;
    lo.init_seed = 0;
    rhine::nn::CausalLM lm(config, lo);
    for (const bool sampled : {false, true}) {
      for (const std::int64_t B : {1, 4}) {
        std::vector<std::vector<std::int64_t>> prompts;
        for (std::int64_t b = 0; b < B; ++b) {
          std::vector<std::int64_t> p;
          for (int t = 0; t < 16; ++t) p.push_back((37 * t + 11 * b + 1) % config.vocab_size);
          prompts.push_back(p);
        }
        rhine::nn::GenerateOptions go;
        go.max_new_tokens = new_tokens;
        if (sampled) {
          go.temperature = 0.8;
          go.top_p = 0.95;
          go.repetition_penalty = 1.1;
          go.seed = 3;
        }
        const auto s = rhine::bench::time_runs([&] { rhine::nn::generate(lm, prompts, go); }, runs, warmup);
        rhine::bench::report_rate("generate",
                                  {{"attention", kind}, {"mode", sampled ? "sampled" : "greedy"}, {"batch", B},
                                   {"prompt", 16}, {"new_tokens", new_tokens}, {"threads", threads}, {"dtype", "fp32"}},
                                  s, static_cast<double>(B * new_tokens), "tokens/s");
      }
    }
  }
  return 0;
}
