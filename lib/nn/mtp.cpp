// Multi-token prediction modules (docs/architectures.md section 3). Dimension
// letters as in rhine/nn/mtp.h.
#include "rhine/nn/mtp.h"

#include <ATen/ATen.h>

#include "rhine/core/error.h"
#include "rhine/nn/adapter.h"
#include "rhine/torch/compat.h"
#include "build.h"

namespace rhine::nn {

WeightAliasImpl::WeightAliasImpl() { weight = register_buffer("weight", at::empty({0})); }

void WeightAliasImpl::tie(const at::Tensor& target) {
  // set_data swaps in target's storage and metadata while the buffer keeps
  // its own (grad-free) autograd identity: in-place optimizer updates and
  // checkpoint copies into either tensor are seen by both.
  weight.set_data(target);
}

SharedHeadImpl::SharedHeadImpl(const ModelConfig& c) {
  norm = register_module("norm", RMSNorm(c.hidden_size, c.rms_norm_eps));
  head = register_module("head", WeightAlias());
}

MTPLayerImpl::MTPLayerImpl(const ModelConfig& c, std::int64_t layer) : DecoderLayerImpl(c, layer) {
  const auto C = c.hidden_size;
  enorm = register_module("enorm", RMSNorm(C, c.rms_norm_eps));
  hnorm = register_module("hnorm", RMSNorm(C, c.rms_norm_eps));
  eh_proj = register_module("eh_proj", detail::make_linear(2 * C, C, false));
  shared_head = register_module("shared_head", SharedHead(c));
  embed_tokens = register_module("embed_tokens", WeightAlias());
}

std::pair<BlockOutput, at::Tensor> MTPLayerImpl::forward(const at::Tensor& h_prev, const at::Tensor& ids_ahead,
                                                         const at::Tensor& embedding, const at::Tensor& head,
                                                         const AttentionInputs& in, const BalanceLossWeights& balance) {
  at::Tensor e = enorm(at::embedding(embedding, ids_ahead));  // [B, T, C]
  at::Tensor hh = hnorm(h_prev);                             // [B, T, C]
  // Embedding first, as the released weights and every implementation do.
  at::Tensor x = linear(eh_proj, at::cat({e, hh.to(e.scalar_type())}, -1));  // [B, T, C]
  BlockOutput block = DecoderLayerImpl::forward(x, in, nullptr, nullptr, balance);  // h [B, T, C]
  at::Tensor logits = at::linear(shared_head->norm(block.h), rhine::autocast_weight(head));  // [B, T, V]
  return {block, logits};
}

at::Tensor mtp_labels(const at::Tensor& labels, std::int64_t k, std::int64_t ignore_index,
                      const at::Tensor& documents) {
  RHINE_CHECK(labels.dim() == 2 && k >= 1, "mtp", "labels must be [B, T] and depth k >= 1",
              (std::vector<std::int64_t>{labels.dim(), k}), "");
  RHINE_CHECK(!documents.defined() || documents.sizes() == labels.sizes(), "mtp",
              "documents must have the shape of labels", documents.defined() ? documents.sizes().vec() : std::vector<std::int64_t>{},
              "pass each position's document index [B, T]");
  const auto T = labels.size(1);
  at::Tensor out = at::full_like(labels, ignore_index);
  if (k >= T) return out;
  at::Tensor ahead = labels.narrow(1, k, T - k);  // [B, T-k]
  if (documents.defined()) {  // targets in the next document carry no loss
    const at::Tensor same = documents.narrow(1, k, T - k) == documents.narrow(1, 0, T - k);
    ahead = at::where(same, ahead, at::full_like(ahead, ignore_index));
  }
  out.narrow(1, 0, T - k).copy_(ahead);
  return out;
}

at::Tensor mtp_inputs(const at::Tensor& ids, std::int64_t k) { return ids.roll(-k, 1); }

}  // namespace rhine::nn
