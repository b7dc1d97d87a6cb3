#pragma once
// How Rhine's layers create their Linear and Embedding modules: initialised
// by LibTorch, or, while a DeferredInit lives on this thread, with weights
// that are allocated but never written (CausalLMOptions::defer_init): the
// pages of a large allocation are only reserved until something writes
// them, so such a model costs no resident memory until FSDP copies this
// rank's rows out and frees the rest. Internal to lib/nn.
//
// (The meta device would not even reserve the memory, but LibTorch 1.13
// cannot turn a module's CPU parameter into a meta one in place.)
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>

#include <cstdint>

namespace rhine::nn::detail {

/// While alive, make_linear / make_embedding on this thread leave their weights unwritten.
class DeferredInit {
 public:
  DeferredInit();
  ~DeferredInit();
  DeferredInit(const DeferredInit&) = delete;
  DeferredInit& operator=(const DeferredInit&) = delete;

 private:
  bool previous_;
};

/// True while a DeferredInit lives on this thread.
bool deferring_init();

/// torch::nn::Linear(in, out) with or without bias (weight [out, in]).
torch::nn::Linear make_linear(std::int64_t in, std::int64_t out, bool bias);
/// torch::nn::Embedding(n, dim) (weight [n, dim]).
torch::nn::Embedding make_embedding(std::int64_t n, std::int64_t dim);

}  // namespace rhine::nn::detail
