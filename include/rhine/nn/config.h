#pragma once
/// \file
/// `ModelConfig`: one flat struct for the Hugging Face `config.json` of the
/// decoder families Rhine builds: llama, mistral, apertus, and deepseek_v2 /
/// deepseek_v3 (MLA attention, DeepSeekMoE, multi-token prediction).
///
/// MLA and MoE inside an otherwise dense config: the DeepSeek keys are read
/// for every model_type. `kv_lora_rank > 0` makes every attention layer MLA
/// (then qk_nope_head_dim, qk_rope_head_dim, v_head_dim are required), and
/// `n_routed_experts > 0` makes layer L an MoE layer when
/// L >= first_k_dense_replace and L % moe_layer_freq == 0 (the rule of
/// DeepSeek's remote code). `num_nextn_predict_layers > 0` adds MTP modules.
/// Such a llama config writes those keys back; HF transformers would not
/// load it as LlamaForCausalLM (it is a Rhine model).
///
/// Reading accepts both RoPE spellings: transformers v4 (`rope_theta` +
/// `rope_scaling` with `type` or `rope_type`) and v5 (`rope_parameters`).
/// Writing uses the v4 spelling with both `type` and `rope_type` (v4 and v5
/// both read it; v4 does not read `rope_parameters`). Keys Rhine does not
/// model (`torch_dtype`, `transformers_version`, ...) are kept in `extra` and
/// written back unchanged. This header is torch-free.

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "rhine/core/json.h"

namespace rhine::nn {

/// RoPE frequencies and their scaling (docs/architectures.md section 4).
struct RopeParameters {
  /// "default" (no scaling), "linear", "llama3" or "yarn".
  std::string rope_type = "default";
  /// Base of the frequencies, theta.
  double rope_theta = 10000.0;
  /// Context extension factor (linear, llama3, yarn).
  double factor = 1.0;
  /// Pre-training context length (llama3, yarn). v5 falls back to
  /// max_position_embeddings when absent; so does Rhine.
  std::optional<std::int64_t> original_max_position_embeddings;
  /// llama3: wavelength band limits.
  double low_freq_factor = 1.0, high_freq_factor = 4.0;
  /// yarn: ramp limits in rotations.
  double beta_fast = 32.0, beta_slow = 1.0;
  /// yarn: mscale and mscale_all_dim (0 = absent).
  double mscale = 0.0, mscale_all_dim = 0.0;
  /// yarn: explicit cos/sin amplitude; derived from mscale when absent.
  std::optional<double> attention_factor;
  /// yarn: floor/ceil the ramp limits (HF default true).
  bool truncate = true;
  /// Keys of rope_scaling / rope_parameters Rhine does not model; written back.
  Json extra = Json::object();

  bool operator==(const RopeParameters& o) const;
};

/// The hyper-parameters of a decoder-only model, under the HF key names.
/// Sizes are int64; optional keys are std::optional. After `from_json` the
/// derived values (`head_dim`, `num_key_value_heads`) are always set.
struct ModelConfig {
  // --- identity ---------------------------------------------------------
  /// "llama", "mistral", "apertus", "deepseek_v2" or "deepseek_v3".
  std::string model_type = "llama";
  /// e.g. ["LlamaForCausalLM"]; written back as read.
  std::vector<std::string> architectures;

  // --- sizes ------------------------------------------------------------
  std::int64_t vocab_size = 32000;         ///< V
  std::int64_t hidden_size = 4096;         ///< C (d_model)
  std::int64_t intermediate_size = 11008;  ///< I (dense MLP width)
  std::int64_t num_hidden_layers = 32;     ///< L
  std::int64_t num_attention_heads = 32;   ///< H
  /// Hkv; HF default (absent/null) = num_attention_heads.
  std::int64_t num_key_value_heads = 32;
  /// D; HF default (absent/null) = hidden_size / num_attention_heads.
  std::int64_t head_dim = 128;
  std::int64_t max_position_embeddings = 2048;

  // --- layer options ----------------------------------------------------
  /// MLP activation: "silu" (SwiGLU, gated) or "xielu" (ungated, Apertus);
  /// "gelu", "gelu_pytorch_tanh", "relu" are accepted for gated MLPs.
  std::string hidden_act = "silu";
  double rms_norm_eps = 1e-6;
  double initializer_range = 0.02;
  bool attention_bias = false;
  double attention_dropout = 0.0;
  bool mlp_bias = false;
  bool tie_word_embeddings = false;
  /// Mistral: query i sees keys j with i - j < sliding_window; null = full.
  std::optional<std::int64_t> sliding_window;
  /// Apertus: RMSNorm over head_dim on q and k before RoPE (absent from
  /// config.json: true for model_type apertus, else false).
  bool qk_norm = false;
  /// Apertus: post-norm layout (only false is supported, as released).
  bool post_norm = false;
  RopeParameters rope;
  /// Interleaved-pair RoPE (Meta/DeepSeek) instead of HF rotate_half.
  /// Not a config.json key for llama; DeepSeek's `rope_interleave` sets it.
  bool rope_interleave = false;

  // --- special tokens ---------------------------------------------------
  std::optional<std::int64_t> bos_token_id;
  /// An int or a list in config.json; written back in the form read.
  std::vector<std::int64_t> eos_token_id;
  std::optional<std::int64_t> pad_token_id;

  // --- DeepSeek MLA + MoE + MTP (docs/architectures.md sections 1-3) ----
  std::optional<std::int64_t> q_lora_rank;  ///< null = no query compression
  std::int64_t kv_lora_rank = 0;            ///< d_c; > 0 = MLA attention
  std::int64_t qk_nope_head_dim = 0;        ///< d_h (non-rotary q/k part per head)
  std::int64_t qk_rope_head_dim = 0;        ///< d_h^R (decoupled rotary part)
  std::int64_t v_head_dim = 0;              ///< value head dim
  std::int64_t n_routed_experts = 0;        ///< E; > 0 = MoE layers
  std::int64_t n_shared_experts = 0;        ///< shared experts (one MLP of n * moe width)
  std::int64_t num_experts_per_tok = 0;     ///< K
  std::int64_t moe_intermediate_size = 0;   ///< per-expert FFN width
  std::int64_t first_k_dense_replace = 0;   ///< layers below it are dense
  std::int64_t moe_layer_freq = 1;          ///< MoE every n-th layer (remote-code rule)
  std::int64_t n_group = 1;                 ///< expert groups (contiguous)
  std::int64_t topk_group = 1;              ///< groups kept per token
  /// Multiplies the routed weights. deepseek_v2 follows DeepSeek-V2's own gate:
  /// only when the weights are not renormalised (top-1, or norm_topk_prob false);
  /// every other model_type always (V3's gate).
  double routed_scaling_factor = 1.0;
  /// Renormalise the K selected weights to sum 1 (deepseek_v2: only when K > 1).
  bool norm_topk_prob = false;
  /// "softmax" (V2) or "sigmoid" (V3). Absent from config.json: "sigmoid" for
  /// model_type deepseek_v3 (transformers' V3 config has no such key), else "softmax".
  std::string scoring_func = "softmax";
  /// "greedy", "group_limited_greedy" (V2: group max) or "noaux_tc" (V3:
  /// selection bias e_score_correction_bias, group top-2 sum). Absent from
  /// config.json: "noaux_tc" for deepseek_v3, else "greedy".
  std::string topk_method = "greedy";
  std::int64_t num_nextn_predict_layers = 0;  ///< MTP depth D

  /// Keys Rhine does not model, written back unchanged.
  Json extra = Json::object();

  /// Parses and validates a config.json object. Throws rhine::Error
  /// "[model_config] ..." for impossible values.
  static ModelConfig from_json(const Json& j);
  /// Reads and parses a config.json file.
  static ModelConfig from_file(const std::string& path);
  /// The config.json object (v4 RoPE spelling, `extra` merged back).
  Json to_json() const;
  /// Writes config.json atomically.
  void save(const std::string& path) const;
  /// Throws rhine::Error for impossible values (called by from_json; call it
  /// again after editing fields by hand).
  void validate() const;

  /// True for deepseek_v2 / deepseek_v3 (MLA attention, MoE MLP).
  bool is_deepseek() const;
  /// True when attention layers are MLA (kv_lora_rank > 0).
  bool uses_mla() const { return kv_lora_rank > 0; }
  /// True when some layers are MoE (n_routed_experts > 0).
  bool uses_moe() const { return n_routed_experts > 0; }
  /// True when layer `layer` (0-based; MTP layers continue after
  /// num_hidden_layers) is an MoE layer.
  bool is_moe_layer(std::int64_t layer) const {
    return uses_moe() && layer >= first_k_dense_replace && layer % moe_layer_freq == 0;
  }
  /// MLA q/k head dim: qk_nope_head_dim + qk_rope_head_dim (192 for V2/V3).
  std::int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  /// MLA softmax scale: qk_head_dim^-0.5, times mscale^2 with
  /// mscale = yarn_get_mscale(factor, mscale_all_dim) under yarn scaling with
  /// a non-zero mscale_all_dim (docs/architectures.md 1.4; 0.1352338 for V3).
  double mla_softmax_scale() const;
  /// True when the MLP is gated (SwiGLU-style): every act but xielu.
  bool gated_mlp() const { return hidden_act != "xielu"; }

  bool operator==(const ModelConfig& o) const;

 private:
  // How eos_token_id was spelled in the file, to write it back the same way.
  bool eos_is_list_ = false;
};

}  // namespace rhine::nn
