#pragma once
// What bench_dist and bench_plan share: the Llama-style model they train (so
// that the planner is measured against the model the layout benchmark runs)
// and the rendezvous of the ranks they start on this machine.
#include "rhine/dist/world.h"
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

/// Rank `rank` of `procs` on 127.0.0.1:`port` (the benches start their own ranks).
inline rhine::dist::World local_world(int rank, int procs, int port) {
  rhine::dist::Rendezvous rv;
  rv.rank = rank;
  rv.world_size = procs;
  rv.local_rank = rank;
  rv.master_port = port;
  return rhine::dist::init(rv);
}

}  // namespace rhine::bench
