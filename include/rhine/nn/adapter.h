#pragma once
/// \file
/// The forward side of LoRA (Hu et al. 2021): a low-rank adapter attached to
/// a Linear, and `linear()`, through which every Rhine layer calls its Linear
/// modules. rhine/io/lora.h adds adapters to a model, merges them, and reads
/// and writes PEFT's layout.
///
/// An adapted Linear y = x W^T + b (W [O, I]) carries two children under
/// PEFT's names, `lora_A` (weight A [r, I]) and `lora_B` (weight B [O, r]),
/// and computes
///
///     y = x W^T + b + s * (dropout(x) A^T) B^T,    s = alpha / r
///
/// as PEFT's LoraLayer does: the base weight W is only read (it needs no
/// gradient and keeps its stored dtype, e.g. bf16), the adapter path costs
/// two thin products, and no [O, I] matrix is ever formed. Dropout (training
/// mode only) drops elements of the adapter's input, as PEFT's nn.Dropout.
/// After merge (rhine::io::merge_lora) W holds W + s B A and the path is off.
///
/// Dimension letters: O out features, I in features, r rank.

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>

namespace rhine::nn {

/// One adapter matrix, registered on the adapted Linear as child `lora_A` or
/// `lora_B`, so its parameter is named `<linear>.lora_A.weight` as in PEFT.
/// The A side also holds the adapter's settings and merge state.
class LoraMatrixImpl : public torch::nn::Module {
 public:
  explicit LoraMatrixImpl(at::Tensor w);
  at::Tensor weight;    ///< A [r, I] or B [O, r]
  double scaling = 1;   ///< A only: s = alpha / r
  double dropout = 0;   ///< A only: dropout probability of the adapter input (training mode)
  bool merged = false;  ///< A only: s B A has been added into the Linear's weight
};

/// The adapter of one Linear (both null when it has none).
struct LoraPath {
  LoraMatrixImpl* a = nullptr;
  LoraMatrixImpl* b = nullptr;
  explicit operator bool() const { return a != nullptr && b != nullptr; }
};

/// The adapter attached to `lin`, merged or not.
LoraPath lora_path(const torch::nn::LinearImpl& lin);

/// x W^T + b, plus s (dropout(x) A^T) B^T when `lin` carries an unmerged
/// adapter. The adapter path runs in x's dtype (autocast decides under
/// autocast), so fp32 adapters serve a bf16 base.
at::Tensor linear(torch::nn::LinearImpl& lin, const at::Tensor& x);
inline at::Tensor linear(const torch::nn::Linear& lin, const at::Tensor& x) { return linear(*lin.ptr(), x); }

/// The weight `lin` computes with: W, or W + s B A (no dropout) under an
/// unmerged adapter. For code that reads a Linear's weight directly instead of
/// calling it (MLA's absorbed decoding).
at::Tensor effective_weight(const torch::nn::LinearImpl& lin);

}  // namespace rhine::nn
