#pragma once
/// \file
/// Global gradient-norm clipping, as torch.nn.utils.clip_grad_norm_ (L2):
/// total = ||(||g_1||, ..., ||g_n||)||_2 over every defined gradient; when
/// max_norm / (total + 1e-6) < 1 every gradient is multiplied by it.

#include <ATen/core/Tensor.h>

#include <vector>

namespace rhine {

/// The global L2 norm of the gradients of `params` (undefined gradients are
/// skipped; 0 when there are none), as a float64 scalar tensor on the first
/// gradient's device. Per-tensor norms in the gradient's dtype (fp32 or
/// wider), combined in float64. Nothing is read on the host: call
/// rhine::host_value<double>(norm) (rhine/torch/sync.h) when the value is needed.
at::Tensor grad_norm(const std::vector<at::Tensor>& params);

/// Clips the gradients of `params` to global norm `max_norm` (> 0) and returns
/// the norm *before* clipping (as `grad_norm`). The factor is computed on the
/// device, as torch.nn.utils.clip_grad_norm_ does (no host synchronisation). A
/// non-finite norm leaves the gradients as they are (let SkipGuard refuse the step).
at::Tensor clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm);

}  // namespace rhine
