#pragma once
/// \file
/// KV-cached autoregressive generation for CausalLM: greedy or sampled
/// (temperature, top-k, top-p), repetition penalty, stop tokens, seeded with
/// rhine::Rng, and batches of prompts of different lengths (left padding).
///
///     rhine::nn::GenerateOptions g;
///     g.max_new_tokens = 32; g.temperature = 0.8; g.top_p = 0.95; g.seed = 7;
///     g.stop_tokens = cfg.eos_token_id;
///     auto out = rhine::nn::generate(lm, {{1, 42, 7}, {1, 5}}, g);  // new ids per prompt

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "rhine/core/random.h"
#include "rhine/nn/model.h"

namespace rhine::nn {

/// Options of `generate`.
struct GenerateOptions {
  std::int64_t max_new_tokens = 32;
  /// 0 = greedy (argmax); > 0 divides the logits before sampling.
  double temperature = 0.0;
  /// Keep the k most likely tokens (0 = all).
  std::int64_t top_k = 0;
  /// Keep the smallest set of tokens whose probability reaches top_p (1 = all).
  double top_p = 1.0;
  /// HF/CTRL penalty on tokens already in the prompt or output: a positive
  /// logit is divided by it, a negative one multiplied (1 = off).
  double repetition_penalty = 1.0;
  /// A row stops after emitting one of these (the stop token is kept).
  std::vector<std::int64_t> stop_tokens;
  /// Seed of the sampler (rhine::Rng); each row samples from its own stream.
  std::uint64_t seed = 0;
  /// Id written into padding slots (never attended to).
  std::int64_t pad_token_id = 0;
  /// Sample only ids below this (0: every id). A model whose vocabulary is
  /// padded past its tokenizer's (rounded up to a multiple of 64 or 128, or
  /// grown for new tokens) then never emits an id the tokenizer cannot
  /// decode; the processed logits cover [0, vocab_limit).
  std::int64_t vocab_limit = 0;
};

/// What `generate` returns besides the ids (for tests and tools).
struct GenerateResult {
  std::vector<std::vector<std::int64_t>> tokens;  ///< new tokens per prompt
  /// Per step, the processed logits [B, V] fp32 the choice was made from (only
  /// when `keep_logits` was asked for).
  std::vector<at::Tensor> step_logits;
};

/// Generates continuations of `prompts` (each non-empty) with a KV cache: one
/// prefill over the left-padded batch, then one token per step. Runs in
/// no-grad, eval mode (the module's mode is restored).
GenerateResult generate(CausalLM& model, const std::vector<std::vector<std::int64_t>>& prompts,
                        const GenerateOptions& options, bool keep_logits = false);

/// Applies repetition penalty, temperature, top-k and top-p to one row of
/// logits [V] (fp32) and returns the token chosen with `rng` (argmax when
/// temperature is 0). `seen` lists the tokens the penalty applies to. When
/// `processed` is given it receives the filtered logits (-inf = removed).
std::int64_t sample_token(const at::Tensor& logits, const std::vector<std::int64_t>& seen,
                          const GenerateOptions& options, Rng& rng,
                          at::Tensor* processed = nullptr);

/// The batched form of sample_token that `generate` runs, on the logits' device:
/// logits [B, V] (any float dtype), `seen` [B, V] bool (the tokens the repetition
/// penalty applies to), `active` (B flags: only active rows draw a number from their
/// `rngs[b]`; the others get -1). Returns [B] int64 on the logits' device; row b equals
/// sample_token(logits[b], its seen tokens, options, rngs[b]) (tested), and `processed`
/// (when given) receives the filtered logits [B, V] fp32.
at::Tensor sample_tokens(const at::Tensor& logits, const at::Tensor& seen, const std::vector<bool>& active,
                         const GenerateOptions& options, std::vector<Rng>& rngs, at::Tensor* processed = nullptr);

}  // namespace rhine::nn
