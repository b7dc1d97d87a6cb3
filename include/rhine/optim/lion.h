#pragma once
/// \file
/// Lion (Chen et al., "Symbolic Discovery of Optimization Algorithms",
/// arXiv:2302.06675, Algorithm 2), per parameter:
///
///     c <- beta1*m + (1-beta1)*g
///     p <- p*(1 - lr*wd) - lr*sign(c)
///     m <- beta2*m + (1-beta2)*g
///
/// Lion's update has unit magnitude per element: use an lr 3-10x smaller and
/// a weight decay 3-10x larger than for AdamW (the paper's advice).
/// State slot: "exp_avg" (m).

#include <vector>

#include "rhine/optim/optimizer.h"

namespace rhine {

/// Options of one Lion param group (defaults: the paper's).
struct LionOptions {
  double lr = 1e-4;
  double beta1 = 0.9;
  double beta2 = 0.99;
  double weight_decay = 0.0;

  void validate() const;
  Json to_json() const;
  static LionOptions from_json(const Json& j);
};

/// Lion over param groups (reference per-parameter ops).
class Lion : public GroupedOptimizer<LionOptions> {
 public:
  explicit Lion(std::vector<Group> groups);
  std::string type() const override { return "lion"; }

 protected:
  void step_impl() override;
};

}  // namespace rhine
