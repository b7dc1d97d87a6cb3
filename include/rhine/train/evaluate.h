#pragma once
/// \file
/// Per-language held-out evaluation: cross-entropy and bits per byte.
///
/// Bits per byte = (sum of token cross-entropies in nats) / ln 2 / (UTF-8
/// bytes of the text those tokens encode). It does not depend on the
/// tokenizer, so runs with different tokenizers (or vocabulary sizes)
/// compare, and it is the number multilingual model reports quote per
/// language. Each held-out document is scored as `[bos] tokens`, chunked into
/// windows of `seq_len` predictions without overlap; every token after the
/// first of a document is predicted exactly once.

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "rhine/core/json.h"
#include "rhine/nn/model.h"

namespace rhine {
class Tokenizer;
struct SftExamples;
}

namespace rhine::dist {
class World;
}

namespace rhine::train {

/// Options of HeldoutSet::from_shards.
struct HeldoutOptions {
  /// Token shards (files, directories or globs as DataLoaderOptions::shards).
  std::vector<std::string> shards;
  /// Stop adding documents of a language once it has this many tokens.
  std::int64_t max_tokens_per_language = 20000;
  /// Tokens predicted per forward pass.
  std::int64_t seq_len = 256;
};

/// Held-out documents grouped by language, with the byte count bpb divides by.
struct HeldoutSet {
  struct Language {
    std::vector<std::vector<std::int64_t>> docs;  ///< [bos] tokens, per document
    /// Per document, 1 where a token is predicted and scored (SFT: the
    /// replies); empty = every token after the first.
    std::vector<std::vector<std::uint8_t>> targets;
    std::uint64_t bytes = 0;                      ///< UTF-8 bytes of the scored text
  };
  std::map<std::string, Language> languages;
  std::int64_t seq_len = 256;

  /// Reads shards written by rhine-prepare; bytes come from decoding each
  /// document with `tokenizer` (the one the shards were made with).
  static HeldoutSet from_shards(const HeldoutOptions& options, const Tokenizer& tokenizer);
  /// SFT conversations (rhine/data/sft.h): only the replies are scored, and
  /// bits per byte divide by the replies' bytes. At most
  /// `max_tokens_per_language` tokens per language.
  static HeldoutSet from_sft(const SftExamples& examples, std::int64_t seq_len,
                             std::int64_t max_tokens_per_language = 20000);
};

/// One language's numbers.
struct LanguageEval {
  double loss = 0.0;            ///< mean cross-entropy per predicted token (nats)
  double bits_per_byte = 0.0;   ///< tokenizer-independent
  std::int64_t tokens = 0;      ///< predicted tokens
  std::uint64_t bytes = 0;
  /// MoE models: [n_moe_layers, E] tokens routed to each expert while scoring
  /// this language (undefined for dense models). Shows how routing differs
  /// between languages.
  at::Tensor expert_counts;
};

/// Per-language results of one evaluation.
struct EvalResult {
  std::int64_t step = 0;
  std::map<std::string, LanguageEval> languages;
  /// {"de": {"loss":..., "bpb":..., "tokens":..., "bytes":...,
  ///         "moe_imbalance": mean over layers of max/mean expert load (MoE only)}, ...}
  Json to_json() const;
};

/// max(expert load) / mean(expert load), averaged over MoE layers, of
/// counts [n_moe_layers, E]: 1 is perfectly balanced, E is one expert taking
/// everything. 0 for an undefined tensor. `counts` must be on the host (the
/// Trainer and evaluate read them once per step or language).
double moe_imbalance(const at::Tensor& counts);

/// Options of evaluate.
struct EvalOptions {
  /// Run the forward passes under bf16 autocast.
  bool bf16 = false;
  /// Windows per forward pass. Windows of equal length (every full window of
  /// `seq_len` predictions, and equal-length last windows) share a batch, so no
  /// padding is scored or routed; 1 scores one window per pass.
  std::int64_t batch_size = 8;
  /// Data parallel: each rank scores every world_size-th window and one host
  /// all-reduce sums the results, which every rank returns. Only for a
  /// replicated model: a model whose forward runs collectives (FSDP hooks,
  /// expert parallelism) is scored whole on every rank, as without a world.
  dist::World* world = nullptr;
};

/// Scores `heldout` with `model` in eval mode (no grad, no MTP heads); the
/// model is put back in train mode. The numbers do not depend on
/// batch_size or the world (up to floating-point summation order).
EvalResult evaluate(nn::CausalLM& model, const HeldoutSet& heldout, const EvalOptions& options);
/// evaluate() with EvalOptions{bf16}.
EvalResult evaluate(nn::CausalLM& model, const HeldoutSet& heldout, bool bf16);

}  // namespace rhine::train
