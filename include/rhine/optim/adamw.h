#pragma once
/// \file
/// AdamW (Loshchilov & Hutter, arXiv:1711.05101) with decoupled weight decay,
/// in exactly LibTorch's formulation (torch::optim::AdamW, amsgrad off), per
/// parameter p with gradient g at its step t = 1, 2, ...:
///
///     p  <- p * (1 - lr*wd)
///     m  <- beta1*m + (1-beta1)*g                v <- beta2*v + (1-beta2)*g^2
///     p  <- p - lr/(1-beta1^t) * m / (sqrt(v)/sqrt(1-beta2^t) + eps)
///
/// lr is the group's lr times Optimizer::lr_scale(). State slots: "exp_avg"
/// (m) and "exp_avg_sq" (v), of the parameter's shape and dtype.
///
/// Implementations (OptimizerImpl): kReference runs the formula above with one
/// ATen op per line per parameter and matches torch::optim::AdamW bit for bit;
/// kForeach runs the same ops as at::_foreach_* over a whole group (CUDA:
/// multi-tensor kernels, a handful of launches per group; CPU: equal to the
/// reference); kFused makes one pass over every element of all contiguous
/// fp32/fp64 CPU parameters of a group (read p, g, m, v once, write p, m, v
/// once, threads over chunks), everything else goes the foreach way. The
/// fused pass rounds differently from ATen's vector kernels: relative
/// difference to the reference stays near fp32 epsilon per step (tested).

#include <cstdint>
#include <vector>

#include "rhine/optim/optimizer.h"
#include "rhine/torch/compat.h"

namespace rhine {

/// Options of one AdamW param group (defaults: torch::optim::AdamWOptions).
struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  /// Decoupled: p <- p*(1 - lr*weight_decay) before the Adam update.
  double weight_decay = 1e-2;

  /// Throws rhine::Error for lr < 0, betas outside [0, 1), eps <= 0, wd < 0.
  void validate() const;
  Json to_json() const;
  /// Strict: unknown keys are rejected.
  static AdamWOptions from_json(const Json& j);
};

/// AdamW over param groups; see the file comment for the update.
class AdamW : public GroupedOptimizer<AdamWOptions> {
 public:
  explicit AdamW(std::vector<Group> groups, OptimizerImpl impl = OptimizerImpl::kFused);
  /// One group "default" holding `params`.
  AdamW(const NamedParameters& params, const AdamWOptions& options,
        OptimizerImpl impl = OptimizerImpl::kFused);

  std::string type() const override { return "adamw"; }
  OptimizerImpl impl() const { return impl_; }
  void set_impl(OptimizerImpl impl) { impl_ = impl; }

  /// Has every step also write the copy in `dtype` (bf16 or fp16; Undefined
  /// turns it off) of each updated fp32 parameter a layer asked for
  /// (rhine::autocast_weight records the requests) into `weight_copies()`: with
  /// kFused on the CPU in the update's own pass (bf16; one read of the
  /// weight fewer per step than a cast in the next forward), elsewhere by
  /// a cast right after the update. Under rhine::AutocastStep(true, &copies)
  /// the layers take these copies instead of casting the weights
  /// (rhine::autocast_weight); the Trainer sets this up under bf16
  /// (TrainerOptions::optimizer_writes_copies). The copies are not state:
  /// not saved, remade by the next step.
  void set_weight_copies(c10::ScalarType dtype);
  const WeightCopies& weight_copies() const { return copies_; }

 protected:
  void step_impl() override;
  void after_step() override;

 private:
  OptimizerImpl impl_;
  c10::ScalarType copy_dtype_ = c10::ScalarType::Undefined;
  WeightCopies copies_;
  std::vector<at::Tensor> written_;  // weights whose copies this step wrote

};

namespace detail {
/// Hyper-parameters of one AdamW step for one parameter.
struct AdamWStep {
  double lr, beta1, beta2, eps, weight_decay;
  int64_t step;  ///< 1-based, already incremented
};
/// The reference update of one parameter (shared by AdamW and Muon's AdamW groups).
void adamw_update_reference(at::Tensor& p, const at::Tensor& g, at::Tensor& exp_avg,
                            at::Tensor& exp_avg_sq, const AdamWStep& s);
/// The fused / foreach update of several parameters sharing lr, betas, eps, wd
/// (steps may differ per parameter).
void adamw_update_multi(std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                        std::vector<at::Tensor>& exp_avgs, std::vector<at::Tensor>& exp_avg_sqs,
                        const AdamWStep& hyper, const std::vector<int64_t>& steps,
                        OptimizerImpl impl, const std::vector<at::Tensor>& copies = {});
}  // namespace detail

}  // namespace rhine
