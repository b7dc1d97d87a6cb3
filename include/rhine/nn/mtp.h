#pragma once
/// \file
/// Multi-token prediction (DeepSeek-V3, docs/architectures.md section 3). Module k
/// (k = 1..D) sees the previous depth's hidden states h^{k-1} [B, T, C] (h^0:
/// the main model's output after model.norm, as vLLM feeds it) and the
/// tokens k positions ahead, and predicts the token k + 1 ahead:
///
///     h'  = eh_proj( [enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)] )   embedding first
///     h^k = decoder block(h')                                      causal, same positions
///     logits^k = head( shared_head.norm(h^k) )
///
/// Stored as the extra layer `model.layers.{num_hidden_layers + k - 1}`:
///
///     enorm.weight, hnorm.weight       [C]
///     eh_proj.weight                   [C, 2C]
///     shared_head.norm.weight          [C]
///     input_layernorm, self_attn.*, post_attention_layernorm, mlp.*  (a normal block)
///     embed_tokens.weight              [V, C]  BUFFER aliasing model.embed_tokens.weight
///     shared_head.head.weight          [V, C]  BUFFER aliasing the LM's output weight
///
/// The embedding and the head are shared with the main model (V3 paper);
/// checkpoints store copies. Rhine keeps the copies as buffers that share
/// storage with the main tensors, so the state dict has every checkpoint key
/// (loading either copy writes the same storage) while optimizers see each
/// trained tensor once.
///
/// Dimension letters: B batch, T tokens, C hidden, V vocabulary.

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include "rhine/nn/model.h"

namespace rhine::nn {

/// A module holding one buffer `weight` that aliases another tensor.
class WeightAliasImpl : public torch::nn::Module {
 public:
  WeightAliasImpl();
  /// Makes `weight` share `target`'s storage (and dtype, device, shape).
  void tie(const at::Tensor& target);
  at::Tensor weight;
};
TORCH_MODULE(WeightAlias);

/// `shared_head`: the final norm of an MTP module and the (aliased) head.
class SharedHeadImpl : public torch::nn::Module {
 public:
  SharedHeadImpl(const ModelConfig& config);
  RMSNorm norm{nullptr};
  WeightAlias head{nullptr};
};
TORCH_MODULE(SharedHead);

/// One MTP module: a decoder block (the layer index decides MLA/MoE as for
/// main layers) plus enorm, hnorm, eh_proj, shared_head and embed_tokens.
class MTPLayerImpl : public DecoderLayerImpl {
 public:
  /// `layer` = num_hidden_layers + k - 1.
  MTPLayerImpl(const ModelConfig& config, std::int64_t layer);
  /// h_prev [B, T, C]; ids_ahead [B, T] int64 (token i + k at position i);
  /// embedding [V, C] and head [V, C] are the main model's trained tensors.
  /// Returns h^k [B, T, C] with the block's MoE statistics (BlockOutput), and
  /// the logits [B, T, V].
  std::pair<BlockOutput, at::Tensor> forward(const at::Tensor& h_prev, const at::Tensor& ids_ahead,
                                             const at::Tensor& embedding, const at::Tensor& head,
                                             const AttentionInputs& in, const BalanceLossWeights& balance = {});
  RMSNorm enorm{nullptr}, hnorm{nullptr};
  torch::nn::Linear eh_proj{nullptr};
  SharedHead shared_head{nullptr};
  WeightAlias embed_tokens{nullptr};
};

/// Targets of MTP depth k from next-token labels [B, T] (labels[i] = t_{i+1}):
/// labels rolled left by k, the last k positions set to ignore_index.
/// `documents` [B, T] int64 (packed rows: each position's document index;
/// undefined: one document per row): a target is kept only where
/// documents[i + k] == documents[i], so that no position learns a token of
/// the next document, exactly as each document trained alone would.
at::Tensor mtp_labels(const at::Tensor& labels, std::int64_t k, std::int64_t ignore_index,
                      const at::Tensor& documents = {});

/// Inputs of MTP depth k: ids [B, T] rolled left by k (position i holds
/// t_{i+k}; the last k positions wrap around and carry no loss).
at::Tensor mtp_inputs(const at::Tensor& ids, std::int64_t k);

}  // namespace rhine::nn
