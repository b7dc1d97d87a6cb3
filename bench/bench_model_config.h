#pragma once
// The Llama-style model bench_dist and bench_plan train (so that the planner
// is measured against the same model the layout benchmark runs).
#include "rhine/nn/config.h"

namespace rhine::bench {

/// Llama, head_dim 64, MHA, SwiGLU width 8/3 x hidden, untied embeddings.
inline rhine::nn::ModelConfig llama_bench_config(int hidden, int layers, int vocab, int seq) {
  rhine::nn::ModelConfig c;
  c.model_type = "llama";
  c.vocab_size = vocab;
  c.hidden_size = hidden;
  c.intermediate_size = hidden * 8 / 3;
  c.num_hidden_layers = layers;
  c.num_attention_heads = hidden / 64;
  c.num_key_value_heads = hidden / 64;
  c.head_dim = 64;
  c.max_position_embeddings = seq;
  c.validate();
  return c;
}

}  // namespace rhine::bench
