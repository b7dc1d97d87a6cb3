#include "rhine/optim/lion.h"

#include <ATen/ATen.h>

#include <cmath>

#include "rhine/core/error.h"

namespace rhine {

void LionOptions::validate() const {
  RHINE_CHECK(std::isfinite(lr) && lr >= 0, "lion", "lr must be finite and >= 0", lr, "e.g. 1e-4");
  RHINE_CHECK(beta1 >= 0 && beta1 <= 1, "lion", "beta1 must be in [0, 1]", beta1, "e.g. 0.9");
  RHINE_CHECK(beta2 >= 0 && beta2 < 1, "lion", "beta2 must be in [0, 1)", beta2, "e.g. 0.99");
  RHINE_CHECK(std::isfinite(weight_decay) && weight_decay >= 0, "lion",
              "weight_decay must be finite and >= 0", weight_decay, "e.g. 1.0");
}

Json LionOptions::to_json() const {
  return {{"lr", lr}, {"beta1", beta1}, {"beta2", beta2}, {"weight_decay", weight_decay}};
}

LionOptions LionOptions::from_json(const Json& j) {
  JsonFields f(j, "lion");
  LionOptions o;
  o.lr = f.get("lr", o.lr);
  o.beta1 = f.get("beta1", o.beta1);
  o.beta2 = f.get("beta2", o.beta2);
  o.weight_decay = f.get("weight_decay", o.weight_decay);
  f.reject_unknown();
  o.validate();
  return o;
}

Lion::Lion(std::vector<Group> groups) : GroupedOptimizer(std::move(groups), "lion") {}

void Lion::step_impl() {
  for (auto& group : groups_) {
    const auto& o = group.options;
    const double lr = o.lr * lr_scale();
    for (auto& np : group.params) {
      at::Tensor& p = np.tensor;
      const at::Tensor& g = p.grad();
      if (!g.defined()) continue;
      auto& st = state_of(np.name);
      if (st.step == 0) st.slots["exp_avg"] = at::zeros_like(p, at::MemoryFormat::Preserve);
      ++st.step;
      at::Tensor& m = st.slots.at("exp_avg");
      if (o.weight_decay != 0) p.mul_(1 - lr * o.weight_decay);
      at::Tensor c = (m * o.beta1).add_(g, 1 - o.beta1);  // interpolation for the update
      p.add_(c.sign_(), -lr);
      m.mul_(o.beta2).add_(g, 1 - o.beta2);               // momentum with beta2
    }
  }
}

}  // namespace rhine
