#include "build.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

namespace rhine::nn::detail {

namespace {
thread_local bool deferring = false;

// Gives `parameter` the shape `shape` in fresh memory that nothing writes.
void unwritten(at::Tensor& parameter, at::IntArrayRef shape) {
  at::NoGradGuard no_grad;
  parameter.set_data(at::empty(shape, parameter.options()));
}
}  // namespace

DeferredInit::DeferredInit() : previous_(deferring) { deferring = true; }
DeferredInit::~DeferredInit() { deferring = previous_; }
bool deferring_init() { return deferring; }

torch::nn::Linear make_linear(std::int64_t in, std::int64_t out, bool bias) {
  if (!deferring) return torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(bias));
  // A 1 x 1 Linear (nothing to initialise) given tensors of the real shape.
  torch::nn::Linear l(torch::nn::LinearOptions(1, 1).bias(bias));
  unwritten(l->weight, {out, in});
  if (bias) unwritten(l->bias, {out});
  return l;
}

torch::nn::Embedding make_embedding(std::int64_t n, std::int64_t dim) {
  if (!deferring) return torch::nn::Embedding(n, dim);
  torch::nn::Embedding e(1, 1);
  unwritten(e->weight, {n, dim});
  return e;
}

}  // namespace rhine::nn::detail
