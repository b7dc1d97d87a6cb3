#pragma once
// A tiny training setup shared by the trainer tests and their worker process:
// random-token shards in two languages, a 2-layer llama, AdamW, a schedule.
#include <filesystem>
#include <memory>
#include <string>

#include "rhine/core/random.h"
#include "rhine/data/loader.h"
#include "rhine/formats/token_shard.h"
#include "rhine/nn/model.h"
#include "rhine/optim/adamw.h"
#include "rhine/optim/schedule.h"
#include "rhine/train/trainer.h"

namespace rhine::test {

constexpr std::int64_t kVocab = 64;

/// Writes two shards ("de", "fr") of pseudo-text with learnable structure
/// (each token mostly follows its predecessor by +1), deterministic.
inline void write_tiny_shards(const std::filesystem::path& dir) {
  std::filesystem::create_directories(dir);
  Rng rng(7);
  const char* langs[] = {"de", "fr"};
  for (int l = 0; l < 2; ++l) {
    TokenShardMeta meta;
    meta.vocab_size = kVocab;
    meta.tokenizer = "synthetic";
    meta.languages = {langs[l]};
    meta.sources = {"synthetic"};
    TokenShardWriter w((dir / (std::string(langs[l]) + ".tokens")).string(), meta);
    for (int d = 0; d < 40; ++d) {
      std::vector<std::int32_t> ids(20 + rng.below(60));
      std::int32_t t = static_cast<std::int32_t>(rng.below(kVocab));
      for (auto& id : ids) {
        id = t;
        t = rng.below(8) == 0 ? static_cast<std::int32_t>(rng.below(kVocab)) : (t + 1 + l) % kVocab;
      }
      w.add(ids, 0, 0);
    }
    w.finish();
  }
}

inline nn::ModelConfig tiny_config(std::int64_t vocab = kVocab) {
  nn::ModelConfig c;
  c.vocab_size = vocab;
  c.hidden_size = 32;
  c.intermediate_size = 64;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  c.max_position_embeddings = 64;
  c.validate();
  return c;
}

/// The AdamW options of TinyRun.
inline AdamWOptions tiny_adamw_options() {
  AdamWOptions ao;
  ao.lr = 3e-3;
  return ao;
}

/// Everything a Trainer needs, owned together.
struct TinyRun {
  nn::CausalLM model{nullptr};
  std::unique_ptr<AdamW> optimizer;
  std::unique_ptr<DataLoader> loader;
  Schedule schedule = warmup_cosine(2, 40, 1.0, 0.1);

  TinyRun(const std::filesystem::path& shards, std::int64_t batch_size, std::uint64_t seed = 3,
          std::int64_t vocab = kVocab, int rank = 0, int world_size = 1) {
    nn::CausalLMOptions mo;
    mo.init_seed = seed;
    model = nn::CausalLM(tiny_config(vocab), mo);
    NamedParameters params;
    for (const auto& p : model->named_parameters()) params.push_back({p.key(), p.value()});
    optimizer = std::make_unique<AdamW>(params, tiny_adamw_options());
    DataLoaderOptions lo;
    lo.shards = {shards.string()};
    lo.batch_size = batch_size;
    lo.seq_len = 16;
    lo.seed = seed;
    lo.prefetch = 0;
    lo.rank = rank;
    lo.world_size = world_size;
    loader = std::make_unique<DataLoader>(lo);
  }
};

}  // namespace rhine::test
