#pragma once
/// \file
/// Fused CPU kernels for memory-bound chains that eager LibTorch runs as many
/// passes. Each has a plain-op reference twin (the fallback and the test
/// oracle) and is a custom autograd function (forward and backward fused).
///
/// So far: RMSNorm (twin: rhine::nn::rms_norm in layers.h). RoPE, SwiGLU and
/// the vocabulary cross-entropy are not fused yet.

#include <ATen/core/Tensor.h>

namespace rhine::nn {

/// RMSNorm in one pass per row forward and one backward, with HF semantics:
/// y = w * cast_to_x_dtype(x * rsqrt(mean(x^2) + eps)), statistics in fp32
/// (fp64 for fp64 inputs). x [..., N] (float32, bfloat16 or float64), w [N].
/// Output dtype: promote(x, w), as the twin. CPU only; other devices (and
/// inputs it does not cover) fall back to the twin.
at::Tensor fused_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

}  // namespace rhine::nn
