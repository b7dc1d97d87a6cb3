#include "rhine/optim/clip.h"

#include <ATen/core/grad_mode.h>
#include <ATen/ATen.h>

#include <cmath>

#include "rhine/core/error.h"

namespace rhine {

at::Tensor grad_norm(const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> norms;
  for (const auto& p : params) {
    const at::Tensor& g = p.grad();
    if (!g.defined()) continue;
    // Reduce in at least fp32 (a bf16 gradient is summed in fp32).
    const auto dt = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    norms.push_back(at::linalg_vector_norm(g, 2, at::OptionalIntArrayRef{}, false, dt).to(at::kDouble));
  }
  if (norms.empty()) return at::zeros({}, at::TensorOptions().dtype(at::kDouble));
  // Different devices: gather the per-tensor norms on the first one's device.
  for (auto& n : norms) n = n.to(norms.front().device());
  return at::linalg_vector_norm(at::stack(norms), 2);
}

at::Tensor clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm) {
  RHINE_CHECK(max_norm > 0 && std::isfinite(max_norm), "clip", "max_norm must be finite and > 0",
              max_norm, "e.g. 1.0");
  at::NoGradGuard no_grad;
  at::Tensor total = grad_norm(params);
  // min(1, max_norm / (total + 1e-6)), and 1 for a non-finite norm: decided on
  // the device, so clipping never waits for the host.
  at::Tensor coef = (max_norm / (total + 1e-6)).clamp_max(1.0);
  coef = at::where(at::isfinite(total), coef, at::ones_like(coef));
  for (const auto& p : params) {
    at::Tensor g = p.grad();
    if (g.defined()) g.mul_(coef.to(g.device()));
  }
  return total;
}

}  // namespace rhine
