#pragma once
/// \file
/// Fused CPU kernels for memory-bound chains that eager LibTorch runs as many
/// passes. Each is a custom autograd function (forward and backward fused),
/// computes in fp32 (fp64 for fp64 inputs) whatever the storage dtype, runs
/// over rows with at::parallel_for, and has a plain-op reference twin (the
/// fallback for inputs it does not cover, and the test oracle):
///
/// | kernel           | twin                          | saves for backward        |
/// |------------------|-------------------------------|---------------------------|
/// | fused_rms_norm   | rms_norm (layers.h)           | x, w, rstd [R]            |
/// | fused_rope       | apply_rope (layers.h)         | cos, sin (the tables)     |
/// | fused_swiglu     | at::silu(gate) * up           | gate, up                  |
/// | fused_lm_loss    | lm_loss (loss.h)              | logits (as given), lse [N]|
///
/// `CausalLMOptions::fused_kernels` (set_fused_kernels in layers.h) switches
/// RMSNorm, RoPE and SwiGLU on in a model.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace rhine::nn {

enum class RopeLayout;  // layers.h

/// RMSNorm in one pass per row forward and one backward, with HF semantics:
/// y = w * cast_to_x_dtype(x * rsqrt(mean(x^2) + eps)), statistics in fp32
/// (fp64 for fp64 inputs). x [..., N] (float32, bfloat16 or float64), w [N].
/// Output dtype: promote(x, w), as the twin. CPU only; other devices (and
/// inputs it does not cover) fall back to the twin.
at::Tensor fused_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

/// RoPE in one pass: y = x * cos + rotate(x) * sin, with rotate the layout's
/// pair rotation (HalfSplit: (j, j + D/2); Interleaved: (2j, 2j + 1)).
/// x [B, H, T, D] (float32, bfloat16 or float64; any strides with the last
/// dimension dense, e.g. the transposed view of a projection), cos/sin
/// [B or 1, T, D] float32/float64 tables as rope_cos_sin returns them.
/// Returns a new tensor with x's dtype and memory layout; x is not modified.
/// Computed in fp32 (fp64) and rounded once, where the twin casts cos/sin to
/// x's dtype first (bf16 results differ from the twin by bf16 rounding).
/// Backward: dx = the rotation by -theta of dy (the transpose of the
/// rotation); no gradient flows into cos/sin (tables that need one, or other
/// devices, fall back to the twin).
at::Tensor fused_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      RopeLayout layout);

/// SwiGLU's gate: silu(gate) * up in one pass, elementwise. gate, up [..., I]
/// of one shape and one dtype (float32, bfloat16 or float64) -> [..., I] in
/// that dtype. Backward: dgate = dy * up * s * (1 + gate * (1 - s)),
/// dup = dy * gate * s with s = sigmoid(gate). Other shapes, dtypes or
/// devices fall back to the twin at::silu(gate) * up.
at::Tensor fused_swiglu(const at::Tensor& gate, const at::Tensor& up);

/// Cross-entropy over the vocabulary with ignore_index and optional z-loss,
/// the contract of lm_loss (loss.h): logits [N, V] (float32, bfloat16 or
/// float64; computed in fp32, fp64 for fp64), targets [N] int64. Returns
/// (ce mean over counted tokens, z_loss * mean(lse^2) over counted tokens,
/// counted tokens as 0-dim int64); both losses are 0-dim fp32 (fp64 for fp64 logits). One
/// pass per row forward (max, sum exp, pick) saving only lse [N]; backward
/// writes d logits = (softmax - onehot) * dce / n + softmax * 2 z lse dz / n
/// directly in the logits' dtype (no fp32 copy of bf16 logits is made).
/// Other devices and dtypes fall back to chunked_lm_loss (loss.h).
/// Throws `[lm_loss] ...` for bad shapes or a target outside [0, V).
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_lm_loss(const at::Tensor& logits, const at::Tensor& targets,
                                                             std::int64_t ignore_index, double z_loss);

}  // namespace rhine::nn
