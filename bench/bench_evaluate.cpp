// Held-out evaluation throughput: rhine::train::evaluate scoring per-language
// documents, one window per forward pass (batch 1, how evaluation ran before
// it was batched) against windows batched 8 per pass (the Trainer's default),
// side by side in one process (JSON Lines, see bench.h).
//
//   bench_evaluate [--tokens N] [--runs R] [--threads N]
//
// Models (random weights, fp32 and bf16 autocast): the demo's MLA + MoE + MTP
// model (examples/configs/demo-moe.json, vocabulary 4000) and a dense Llama
// model of the same width. Held-out set: 4 languages, documents of 40-400
// tokens, N tokens per language, windows of 128 predictions (the demo's).
// Reports scored tokens/s and the ratio batched / batch 1.
#include <ATen/Parallel.h>

#include <cstdlib>
#include <cstring>

#include "bench.h"
#include "rhine/core/json.h"
#include "rhine/nn/config.h"
#include "rhine/nn/model.h"
#include "rhine/train/evaluate.h"

int main(int argc, char** argv) {
  std::int64_t tokens = 10000;
  int runs = 3, threads = 2;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--tokens") && i + 1 < argc) tokens = std::atoll(argv[++i]);
    else if (!std::strcmp(argv[i], "--runs") && i + 1 < argc) runs = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--threads") && i + 1 < argc) threads = std::atoi(argv[++i]);
    else {
      std::fprintf(stderr, "usage: bench_evaluate [--tokens N] [--runs R] [--threads N]\n");
      return 2;
    }
  }
  at::set_num_threads(threads);
  rhine::Json base = {{"vocab_size", 4000}, {"hidden_size", 256}, {"intermediate_size", 688},
                      {"num_hidden_layers", 4}, {"num_attention_heads", 4}, {"num_key_value_heads", 4},
                      {"max_position_embeddings", 512}, {"rms_norm_eps", 1e-5}, {"tie_word_embeddings", true}};
  rhine::Json dense = base, moe = base;
  dense["model_type"] = "llama";
  moe.update({{"model_type", "deepseek_v3"}, {"q_lora_rank", nullptr}, {"kv_lora_rank", 64},
              {"qk_nope_head_dim", 32}, {"qk_rope_head_dim", 16}, {"v_head_dim", 32}, {"n_routed_experts", 8},
              {"n_shared_experts", 1}, {"num_experts_per_tok", 2}, {"moe_intermediate_size", 128},
              {"first_k_dense_replace", 1}, {"moe_layer_freq", 1}, {"n_group", 2}, {"topk_group", 1},
              {"routed_scaling_factor", 2.5}, {"scoring_func", "sigmoid"}, {"topk_method", "noaux_tc"},
              {"norm_topk_prob", true}, {"num_nextn_predict_layers", 1}});

  rhine::train::HeldoutSet heldout;
  heldout.seq_len = 128;
  std::uint64_t state = 12345;
  auto next = [&state] { return (state = state * 6364136223846793005ULL + 1442695040888963407ULL) >> 33; };
  for (const char* lang : {"de", "en", "fr", "nl"}) {
    auto& l = heldout.languages[lang];
    std::int64_t have = 0;
    while (have < tokens) {
      std::vector<std::int64_t> doc{1};
      const auto n = 40 + static_cast<std::int64_t>(next() % 361);
      for (std::int64_t t = 0; t < n; ++t) doc.push_back(2 + static_cast<std::int64_t>(next() % 3998));
      have += n;
      l.bytes += static_cast<std::uint64_t>(4 * n);
      l.docs.push_back(std::move(doc));
    }
  }

  for (const auto& [kind, j] : {std::pair<const char*, rhine::Json>{"MLA+MoE+MTP", moe}, {"dense", dense}}) {
    rhine::nn::CausalLMOptions lo;
    lo.init_seed = 0;
    lo.fused_kernels = true;
    rhine::nn::CausalLM lm(rhine::nn::ModelConfig::from_json(j), lo);
    for (const bool bf16 : {false, true}) {
      double rate[2] = {0, 0};
      for (const std::int64_t batch : {1, 8}) {
        rhine::train::EvalOptions eo;
        eo.bf16 = bf16;
        eo.batch_size = batch;
        std::int64_t scored = 0;
        const auto s = rhine::bench::time_runs(
            [&] {
              const auto r = rhine::train::evaluate(lm, heldout, eo);
              scored = 0;
              for (const auto& [lang, e] : r.languages) scored += e.tokens;
            },
            runs, 1);
        rate[batch > 1] = static_cast<double>(scored) / s.median;
        rhine::bench::report_rate("evaluate",
                                  {{"model", kind}, {"batch", batch}, {"bf16", bf16}, {"seq_len", heldout.seq_len},
                                   {"threads", threads}, {"tokens", scored}},
                                  s, static_cast<double>(scored), "tokens/s");
      }
      nlohmann::json ratio = {{"name", "evaluate_ratio"},
                              {"params", {{"model", kind}, {"bf16", bf16}, {"threads", threads}}},
                              {"batched_over_batch1", rate[1] / rate[0]}};
      std::printf("%s\n", ratio.dump().c_str());
    }
  }
  return 0;
}
