#include "rhine/nn/adapter.h"

#include <ATen/ATen.h>

#include "rhine/torch/compat.h"

namespace rhine::nn {

LoraMatrixImpl::LoraMatrixImpl(at::Tensor w) { weight = register_parameter("weight", std::move(w)); }

LoraPath lora_path(const torch::nn::LinearImpl& lin) {
  LoraPath p;
  for (const auto& c : lin.named_children()) {  // empty for a Linear without adapter
    if (c.key() == "lora_A") p.a = dynamic_cast<LoraMatrixImpl*>(c.value().get());
    if (c.key() == "lora_B") p.b = dynamic_cast<LoraMatrixImpl*>(c.value().get());
  }
  return p;
}

at::Tensor linear(torch::nn::LinearImpl& lin, const at::Tensor& x) {
  // at::linear on the parameter itself, not LinearImpl::forward: that one
  // multiplies by weight.t(), a view, which autocast casts afresh at every
  // use instead of once per region (or per step: rhine::AutocastStep). Under
  // an AutocastStep with the optimizer's weight copies, the copy is used.
  at::Tensor y = at::linear(x, rhine::autocast_weight(lin.weight), lin.bias);  // [..., O]
  const LoraPath p = lora_path(lin);
  if (!p || p.a->merged) return y;
  at::Tensor xd = p.a->dropout > 0 ? at::dropout(x, p.a->dropout, lin.is_training()) : x;  // [..., I]
  const auto dt = x.scalar_type();
  at::Tensor ax = at::linear(xd, p.a->weight.to(dt));                                        // [..., r]
  at::Tensor bax = at::linear(ax, p.b->weight.to(ax.scalar_type()));                         // [..., O]
  return y + (bax * p.a->scaling).to(y.scalar_type());
}

at::Tensor effective_weight(const torch::nn::LinearImpl& lin) {
  const LoraPath p = lora_path(lin);
  if (!p || p.a->merged) return lin.weight;
  at::Tensor d = at::mm(p.b->weight, p.a->weight) * p.a->scaling;  // [O, r] x [r, I]
  return lin.weight + d.to(lin.weight.scalar_type());
}

}  // namespace rhine::nn
