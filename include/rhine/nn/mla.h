#pragma once
/// \file
/// Multi-head Latent Attention (DeepSeek-V2/V3, docs/architectures.md section 1),
/// with parameters under the HF names of `model.layers.{L}.self_attn.`:
///
///     q_proj             [H*(Dn+Dr), C]      (q_lora_rank null)
///     q_a_proj           [Rq, C]             (q_lora_rank set; bias if attention_bias)
///     q_a_layernorm      [Rq]
///     q_b_proj           [H*(Dn+Dr), Rq]
///     kv_a_proj_with_mqa [Rkv + Dr, C]       (bias if attention_bias)
///     kv_a_layernorm     [Rkv]
///     kv_b_proj          [H*(Dn+Dv), Rkv]
///     o_proj             [C, H*Dv]           (bias if attention_bias)
///
/// Two forms of the same math: the naive form (training; keys and values
/// expanded per head) and the absorbed form (DeepSeek `attn_impl="absorb"`;
/// W^UK folded into the query, W^UV applied after attention) whose cache holds
/// only the normalised latent and the shared rotary key: Rkv + Dr elements
/// per token per layer (576 for V2/V3). The absorbed form is MQA with one
/// key/value head over [latent ; rope key], so it runs on rhine::attention.
///
/// Dimension letters: B batch, T new tokens, S keys (cache + new), C hidden,
/// H heads, Dn qk_nope_head_dim, Dr qk_rope_head_dim, Dv v_head_dim, Rq
/// q_lora_rank, Rkv kv_lora_rank.

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include "rhine/nn/config.h"
#include "rhine/nn/layers.h"

namespace rhine::nn {

/// The latent cache of one MLA layer: ckv [B, S, Rkv] (after kv_a_layernorm)
/// and k_pe [B, S, Dr] (after RoPE). Undefined tensors = empty cache.
struct LatentKV {
  at::Tensor ckv, k_pe;          ///< [B, S, Rkv], [B, S, Dr]: views of the buffers below
  at::Tensor ckv_buf, k_pe_buf;  ///< storage growing by doubling (cache_append, layers.h)
  /// Cached elements per token: Rkv + Dr.
  std::int64_t elements_per_token() const {
    return ckv.defined() ? ckv.size(-1) + k_pe.size(-1) : 0;
  }
};

/// Multi-head Latent Attention. RoPE tables (AttentionInputs::cos/sin) must
/// have Dr dims; the layout (interleaved pairs for DeepSeek checkpoints)
/// follows config.rope_interleave.
class MLAImpl : public torch::nn::Module {
 public:
  explicit MLAImpl(const ModelConfig& config);
  /// x [B, T, C] -> [B, T, C]. Without a cache: the naive form (or the
  /// absorbed one when `absorb` is set). With a cache: the absorbed form over
  /// the cached latents plus the T new ones, which are appended to it.
  at::Tensor forward(const at::Tensor& x, const AttentionInputs& in, LatentKV* cache = nullptr);
  /// The naive (training) form. x [B, T, C] -> [B, T, C]
  at::Tensor forward_naive(const at::Tensor& x, const AttentionInputs& in);
  /// The absorbed form; `cache` may be null (attention over the T new tokens).
  at::Tensor forward_absorbed(const at::Tensor& x, const AttentionInputs& in, LatentKV* cache);

  torch::nn::Linear q_proj{nullptr}, q_a_proj{nullptr}, q_b_proj{nullptr};
  RMSNorm q_a_layernorm{nullptr};
  torch::nn::Linear kv_a_proj_with_mqa{nullptr}, kv_b_proj{nullptr}, o_proj{nullptr};
  RMSNorm kv_a_layernorm{nullptr};
  std::int64_t n_heads, nope_dim, rope_dim, v_dim, kv_rank;
  double softmax_scale, dropout;
  RopeLayout layout;
  /// Use the absorbed form also without a cache (tests, benchmarks).
  bool absorb = false;

 private:
  // q [B, H, T, Dn + Dr] after RoPE on its last Dr dims.
  at::Tensor query(const at::Tensor& x, const AttentionInputs& in);
  // (normalised latent [B, T, Rkv], rotated shared key [B, T, Dr])
  std::pair<at::Tensor, at::Tensor> latent(const at::Tensor& x, const AttentionInputs& in);
};
TORCH_MODULE(MLA);

/// KV-cache elements per token per layer of the attention `config` builds:
/// MLA (absorbed) Rkv + Dr; otherwise 2 * Hkv * D (MHA, GQA, MQA).
std::int64_t kv_cache_elements_per_token(const ModelConfig& config);

}  // namespace rhine::nn
