#pragma once
// Tiny model configs of every architecture Rhine builds, for tests that need
// a real model of each kind but not particular sizes.
#include <string>

#include "rhine/nn/config.h"

namespace rhine::test {

/// `model_type` (llama, mistral, apertus, deepseek_v2, deepseek_v3) at toy
/// size: 2 layers, hidden 16, vocab 32. DeepSeek: MLA with query compression,
/// 4 routed + 1 shared experts after a dense first layer; V3 adds sigmoid
/// routing with the correction bias and one MTP module.
inline rhine::nn::ModelConfig tiny_config(const std::string& model_type) {
  rhine::nn::ModelConfig c;
  c.model_type = model_type;
  c.vocab_size = 32;
  c.hidden_size = 16;
  c.intermediate_size = 24;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  if (model_type.rfind("deepseek", 0) == 0) {
    c.q_lora_rank = 8;
    c.kv_lora_rank = 8;
    c.qk_nope_head_dim = 4;
    c.qk_rope_head_dim = 4;
    c.v_head_dim = 4;
    c.n_routed_experts = 4;
    c.n_shared_experts = 1;
    c.num_experts_per_tok = 2;
    c.moe_intermediate_size = 8;
    c.n_group = 1;
    c.topk_group = 1;
    c.first_k_dense_replace = 1;
    if (model_type == "deepseek_v3") {
      c.topk_method = "noaux_tc";
      c.scoring_func = "sigmoid";
      c.num_nextn_predict_layers = 1;
    }
  }
  c.validate();
  return c;
}

}  // namespace rhine::test
