#pragma once
/// \file
/// AdEMAMix (Pagliardini, Ablin, Grangier, arXiv:2409.03137), the optimizer
/// of the Apertus runs: Adam plus a slow, un-bias-corrected EMA of the
/// gradient mixed in with weight alpha. Per parameter, at its step t = 1, 2...:
///
///     m1 <- beta1*m1 + (1-beta1)*g
///     m2 <- beta3(t)*m2 + (1-beta3(t))*g
///     v  <- beta2*v + (1-beta2)*g^2
///     u  <- (m1/(1-beta1^t) + alpha(t)*m2) / (sqrt(v)/sqrt(1-beta2^t) + eps)
///     p  <- p - lr*(u + wd*p)                                (decoupled decay)
///
/// Warm-ups (the paper's schedulers, also in Apertus'
/// megatron/core/optimizer/ademamix.py), both off when their length is 0:
///
///     alpha(t) = alpha * t/T_alpha                                    for t < T_alpha
///     beta3(t) = f^-1((1 - t/T_b3)*f(beta1) + (t/T_b3)*f(beta3))      for t < T_b3
///     f(b) = ln(0.5)/ln(b) - 1,  f^-1(x) = 0.5^(1/(x+1))             (half-life linear)
///
/// and alpha, beta3 afterwards. This is the paper's closed form
/// beta3(t) = exp(ln(beta1) ln(beta3) / ((1-t/T) ln(beta3) + (t/T) ln(beta1)));
/// the paper's code computes f with ln(b + 1e-8), which shifts beta3 ~ 0.9999
/// by about 1e-8 during the warm-up; Rhine follows the paper's formula. State slots: "exp_avg" (m1), "exp_avg_slow"
/// (m2), "exp_avg_sq" (v).

#include <cstdint>
#include <vector>

#include "rhine/optim/optimizer.h"

namespace rhine {

/// Options of one AdEMAMix param group (defaults: the paper's reference code).
struct AdEMAMixOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double beta3 = 0.9999;
  double alpha = 2.0;
  double eps = 1e-8;
  double weight_decay = 0.0;
  /// T_alpha: steps of the linear alpha warm-up (0 = none).
  int64_t alpha_warmup = 0;
  /// T_b3: steps of the half-life-linear beta3 warm-up from beta1 (0 = none).
  int64_t beta3_warmup = 0;

  void validate() const;
  Json to_json() const;
  static AdEMAMixOptions from_json(const Json& j);
};

/// alpha(t) of the file comment (t is the 1-based step).
double ademamix_alpha(const AdEMAMixOptions& o, int64_t t);
/// beta3(t) of the file comment.
double ademamix_beta3(const AdEMAMixOptions& o, int64_t t);

/// AdEMAMix over param groups (reference per-parameter ops).
class AdEMAMix : public GroupedOptimizer<AdEMAMixOptions> {
 public:
  explicit AdEMAMix(std::vector<Group> groups);
  std::string type() const override { return "ademamix"; }

 protected:
  void step_impl() override;
};

}  // namespace rhine
