#pragma once
/// \file
/// The decoder-only causal LM of the Llama family (llama, mistral, apertus),
/// composed from a ModelConfig, with parameters under the HF names so that
/// `named_parameters()` matches a checkpoint one to one:
///
///     model.embed_tokens.weight                 [V, C]
///     model.layers.{L}.input_layernorm.weight   [C]   (apertus: attention_layernorm)
///     model.layers.{L}.self_attn.{q,k,v,o}_proj.weight (+ q_norm/k_norm [D])
///     model.layers.{L}.post_attention_layernorm.weight [C] (apertus: feedforward_layernorm)
///     model.layers.{L}.mlp.{gate,up,down}_proj.weight  (apertus: up/down + act_fn.alpha_{p,n})
///     model.norm.weight                         [C]
///     lm_head.weight                            [V, C]  (absent when tie_word_embeddings)
///
/// Dimension letters: B batch, T new tokens, S keys (cache + new), C hidden,
/// V vocabulary.
///
///     auto cfg = rhine::nn::ModelConfig::from_file("config.json");
///     rhine::nn::CausalLM lm(cfg);
///     auto out = lm->forward(ids);             // out.logits [B, T, V]

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <optional>
#include <vector>

#include "rhine/nn/config.h"
#include "rhine/nn/layers.h"

namespace rhine::nn {

/// One pre-norm block: h = x + attn(norm1(x)); out = h + mlp(norm2(h)).
class DecoderLayerImpl : public torch::nn::Module {
 public:
  explicit DecoderLayerImpl(const ModelConfig& config);
  /// x [B, T, C] -> [B, T, C]
  at::Tensor forward(const at::Tensor& x, const AttentionInputs& in, LayerKV* cache = nullptr);
  RMSNorm norm1{nullptr}, norm2{nullptr};
  Attention self_attn{nullptr};
  MLP mlp{nullptr};
};
TORCH_MODULE(DecoderLayer);

/// The KV cache of a whole model for incremental decoding.
struct KVCache {
  std::vector<LayerKV> layers;  ///< one per layer; k/v [B, Hkv, S, D]
  /// [B, S] bool: which cached key slots are real tokens (false = padding).
  at::Tensor key_valid;
  /// [B] int64: the position id the next token of each row gets.
  at::Tensor next_position;
  /// Number of cached key slots S.
  std::int64_t length() const {
    return layers.empty() || !layers[0].k.defined() ? 0 : layers[0].k.size(2);
  }
};

/// Inputs of CausalLM::forward besides the token ids.
struct ForwardOptions {
  /// [B, T] int64 position ids. Default: 0..T-1 (continuing the cache:
  /// `cache->next_position`, or counting only valid tokens when
  /// `attention_mask` marks padding).
  std::optional<at::Tensor> position_ids;
  /// [B, T] bool/int (1 = real token, 0 = padding) for the NEW tokens; with a
  /// cache, earlier slots come from `cache->key_valid`. Padding keys are masked.
  std::optional<at::Tensor> attention_mask;
  /// Packed sequences: a token attends only to earlier tokens of its own
  /// document, where a document starts wherever position_ids is 0.
  bool document_mask = false;
  /// Next-token targets aligned with the inputs ([B, T] int64, already shifted
  /// by the data loader); `ignore_index` entries carry no loss.
  std::optional<at::Tensor> labels;
  std::int64_t ignore_index = -100;
  /// Adds z_loss * mean(logsumexp(logits)^2) over the counted tokens (PaLM).
  double z_loss = 0.0;
  /// KV cache to read and extend (generation). nullptr = no cache.
  KVCache* cache = nullptr;
  /// Return logits of the last position only ([B, 1, V]; generation).
  bool last_logits_only = false;
};

/// Numbers a training loop logs per step.
struct ForwardStats {
  double ce_loss = 0.0;       ///< mean cross-entropy over counted tokens
  double z_loss = 0.0;        ///< z-loss term (already multiplied by its weight)
  std::int64_t n_tokens = 0;  ///< tokens that carried loss
};

/// Outputs of CausalLM::forward.
struct ForwardOutput {
  at::Tensor logits;  ///< [B, T, V] (or [B, 1, V]) in the compute dtype
  at::Tensor loss;    ///< scalar fp32 (ce + z), undefined without labels
  ForwardStats stats;
};

/// Options of CausalLM that are not part of config.json.
struct CausalLMOptions {
  /// Recompute each block in backward instead of keeping its activations.
  bool activation_checkpointing = false;
  /// Seed of the N(0, initializer_range) initialisation (LibTorch's generator).
  std::optional<std::uint64_t> init_seed;
  /// Use Rhine's fused CPU kernels (rhine/nn/fused.h; so far RMSNorm).
  bool fused_kernels = false;
};

/// `model.*`: embeddings, the blocks and the final norm.
class DecoderModelImpl : public torch::nn::Module {
 public:
  explicit DecoderModelImpl(const ModelConfig& config);
  torch::nn::Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers{nullptr};
  RMSNorm norm{nullptr};
  std::vector<DecoderLayer> blocks;  ///< typed views of `layers`
};
TORCH_MODULE(DecoderModel);

/// The causal LM (LlamaForCausalLM and friends).
class CausalLMImpl : public torch::nn::Module {
 public:
  explicit CausalLMImpl(const ModelConfig& config, const CausalLMOptions& options = {});
  /// ids [B, T] int64 -> logits [B, T, V], plus loss/stats when labels are given.
  ForwardOutput forward(const at::Tensor& ids, const ForwardOptions& options = {});
  /// An empty cache for this model.
  KVCache make_cache() const;
  /// Number of parameters (tied embeddings counted once); without
  /// embeddings: excludes embed_tokens and lm_head (the "non-embedding" count).
  std::int64_t num_parameters(bool include_embeddings = true) const;
  /// The output projection [V, C]: lm_head.weight, or embed_tokens.weight when tied.
  at::Tensor output_weight() const;

  const ModelConfig& config() const { return config_; }
  CausalLMOptions options;
  DecoderModel model{nullptr};
  torch::nn::Linear lm_head{nullptr};

 private:
  ModelConfig config_;
  RopeFrequencies freqs_;
};
TORCH_MODULE(CausalLM);

/// Parameter count of the model `config` describes, in closed form (no model
/// is built, so it works for 70B configs); matches CausalLM::num_parameters.
std::int64_t parameter_count(const ModelConfig& config, bool include_embeddings = true);

/// Cross-entropy over the vocabulary with ignore_index and optional z-loss.
/// logits [N, V] (any float dtype; computed in fp32), targets [N] int64.
/// Returns (ce mean, z term, counted tokens); the plain-op reference.
std::tuple<at::Tensor, at::Tensor, std::int64_t> lm_loss(const at::Tensor& logits,
                                                         const at::Tensor& targets,
                                                         std::int64_t ignore_index, double z_loss);

/// The bool attention mask [B, 1, T, S] for T new tokens after S - T cached
/// ones: causal (bottom-right), `key_valid` [B, S] padding, optional sliding
/// window (q - k < window) and document boundaries (`doc_ids` [B, S]). A query
/// that would see no key sees itself (padding rows stay finite).
at::Tensor build_attention_mask(std::int64_t T, std::int64_t S, const at::Tensor& key_valid,
                                std::optional<std::int64_t> window,
                                const std::optional<at::Tensor>& doc_ids);

}  // namespace rhine::nn
