#pragma once
/// \file
/// Cross-entropy of a language model over its vocabulary, in three forms with
/// one contract: logits [N, V] (float32, bfloat16, float16 or float64), targets
/// [N] int64 in [0, V) or `ignore_index`. Each returns (ce, z, n):
///   ce: mean of logsumexp(logits_r) - logits_r[t_r] over the counted rows,
///   z:  z_loss * mean(logsumexp(logits_r)^2) over them (PaLM's z-loss; 0 when z_loss = 0),
///   n:  the number of counted rows,
/// all 0-dim tensors on the logits' device (ce and z fp32, fp64 for fp64
/// logits; n int64), so that nothing waits for the host (rhine/torch/sync.h).
/// Targets are checked against [0, V) when they are on the CPU; on a device
/// that check would stall the step, so callers check batches on the host
/// before moving them (rhine::train::Trainer does).
///
/// | function          | memory beyond the logits          | devices | role |
/// |---|---|---|---|
/// | `lm_loss`         | an fp32 copy of [N, V] (+ its grad) | any   | the plain-op reference twin |
/// | `chunked_lm_loss` | fp32 [rows, V] per chunk, lse [N] | any     | the default off the CPU |
/// | `fused_lm_loss` (fused.h) | lse [N]                    | CPU     | the default on the CPU |
///
/// On a 128k vocabulary the fp32 copy of a step's logits is the step's largest
/// tensor (8 x 4096 tokens: 16 GiB); the chunked form never holds more than
/// `chunk_rows` rows of it, forward or backward.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace rhine::nn {

/// The plain-op reference: logsumexp over an fp32 copy of the logits.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lm_loss(const at::Tensor& logits, const at::Tensor& targets,
                                                       std::int64_t ignore_index, double z_loss);

/// Rows per chunk of `chunked_lm_loss` when `chunk_rows` is 0: about 64 MiB
/// of fp32 per chunk (2^24 / V rows, at least 1).
std::int64_t default_loss_chunk_rows(std::int64_t vocab_size);

/// The same loss computed `chunk_rows` rows at a time (0: the default above):
/// forward keeps only lse [N] beside the logits; backward recomputes the
/// softmax chunk by chunk and writes d logits directly in the logits' dtype:
/// d x_rj = w_r / n * (dce * (p_rj - [j == t_r]) + dz * 2 z_loss lse_r p_rj).
/// Twin of `lm_loss` (tests/nn/test_loss.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> chunked_lm_loss(const at::Tensor& logits,
                                                               const at::Tensor& targets,
                                                               std::int64_t ignore_index, double z_loss,
                                                               std::int64_t chunk_rows = 0);

}  // namespace rhine::nn
