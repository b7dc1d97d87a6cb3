#include "rhine/optim/ademamix.h"

#include <ATen/ATen.h>

#include <cmath>

#include "rhine/core/error.h"

namespace rhine {

void AdEMAMixOptions::validate() const {
  const char* c = "ademamix";
  RHINE_CHECK(std::isfinite(lr) && lr >= 0, c, "lr must be finite and >= 0", lr, "e.g. 1e-3");
  RHINE_CHECK(beta1 >= 0 && beta1 < 1, c, "beta1 must be in [0, 1)", beta1, "e.g. 0.9");
  RHINE_CHECK(beta2 >= 0 && beta2 < 1, c, "beta2 must be in [0, 1)", beta2, "e.g. 0.999");
  RHINE_CHECK(beta3 > 0 && beta3 < 1, c, "beta3 must be in (0, 1)", beta3, "e.g. 0.9999");
  RHINE_CHECK(std::isfinite(alpha) && alpha >= 0, c, "alpha must be finite and >= 0", alpha, "e.g. 5");
  RHINE_CHECK(eps > 0, c, "eps must be > 0", eps, "e.g. 1e-8");
  RHINE_CHECK(std::isfinite(weight_decay) && weight_decay >= 0, c,
              "weight_decay must be finite and >= 0", weight_decay, "e.g. 0.1");
  RHINE_CHECK(alpha_warmup >= 0, c, "alpha_warmup must be >= 0", alpha_warmup, "0 turns it off");
  RHINE_CHECK(beta3_warmup >= 0, c, "beta3_warmup must be >= 0", beta3_warmup, "0 turns it off");
  RHINE_CHECK(beta3_warmup == 0 || beta1 > 0, c, "the beta3 warm-up starts at beta1, which must be > 0",
              beta1, "set beta1 > 0 or beta3_warmup = 0");
}

Json AdEMAMixOptions::to_json() const {
  return {{"lr", lr},       {"beta1", beta1}, {"beta2", beta2},
          {"beta3", beta3}, {"alpha", alpha}, {"eps", eps},
          {"weight_decay", weight_decay}, {"alpha_warmup", alpha_warmup},
          {"beta3_warmup", beta3_warmup}};
}

AdEMAMixOptions AdEMAMixOptions::from_json(const Json& j) {
  JsonFields f(j, "ademamix");
  AdEMAMixOptions o;
  o.lr = f.get("lr", o.lr);
  o.beta1 = f.get("beta1", o.beta1);
  o.beta2 = f.get("beta2", o.beta2);
  o.beta3 = f.get("beta3", o.beta3);
  o.alpha = f.get("alpha", o.alpha);
  o.eps = f.get("eps", o.eps);
  o.weight_decay = f.get("weight_decay", o.weight_decay);
  o.alpha_warmup = f.get("alpha_warmup", o.alpha_warmup);
  o.beta3_warmup = f.get("beta3_warmup", o.beta3_warmup);
  f.reject_unknown();
  o.validate();
  return o;
}

double ademamix_alpha(const AdEMAMixOptions& o, int64_t t) {
  if (o.alpha_warmup > 0 && t < o.alpha_warmup) {
    const double a = static_cast<double>(t) / static_cast<double>(o.alpha_warmup);
    return (1.0 - a) * 0.0 + a * o.alpha;
  }
  return o.alpha;
}

double ademamix_beta3(const AdEMAMixOptions& o, int64_t t) {
  if (o.beta3_warmup > 0 && t < o.beta3_warmup) {
    // Linear in the half-life f(b) = ln(0.5)/ln(b) - 1, as in the paper (its
    // code adds 1e-8 to b inside the log, which moves beta3 ~ 0.9999 visibly).
    auto f = [](double beta) { return std::log(0.5) / std::log(beta) - 1; };
    auto f_inv = [](double x) { return std::pow(0.5, 1.0 / (x + 1)); };
    const double a = static_cast<double>(t) / static_cast<double>(o.beta3_warmup);
    return f_inv((1.0 - a) * f(o.beta1) + a * f(o.beta3));
  }
  return o.beta3;
}

AdEMAMix::AdEMAMix(std::vector<Group> groups) : GroupedOptimizer(std::move(groups), "ademamix") {}

void AdEMAMix::step_impl() {
  for (auto& group : groups_) {
    const auto& o = group.options;
    const double lr = o.lr * lr_scale();
    for (auto& np : group.params) {
      at::Tensor& p = np.tensor;
      const at::Tensor& g = p.grad();
      if (!g.defined()) continue;
      auto& st = state_of(np.name);
      if (st.step == 0) {
        for (const char* slot : {"exp_avg", "exp_avg_slow", "exp_avg_sq"})
          st.slots[slot] = at::zeros_like(p, at::MemoryFormat::Preserve);
      }
      const int64_t t = ++st.step;
      at::Tensor &m1 = st.slots.at("exp_avg"), &m2 = st.slots.at("exp_avg_slow"),
                 &v = st.slots.at("exp_avg_sq");
      const double bc1 = 1 - std::pow(o.beta1, t), bc2 = 1 - std::pow(o.beta2, t);
      const double alpha = ademamix_alpha(o, t), beta3 = ademamix_beta3(o, t);
      m1.mul_(o.beta1).add_(g, 1 - o.beta1);
      m2.mul_(beta3).add_(g, 1 - beta3);
      v.mul_(o.beta2).addcmul_(g, g, 1 - o.beta2);
      at::Tensor denom = (v.sqrt() / std::sqrt(bc2)).add_(o.eps);
      at::Tensor update = (m1 / bc1).add_(m2, alpha).div_(denom);
      if (o.weight_decay != 0) update.add_(p, o.weight_decay);
      p.add_(update, -lr);
    }
  }
}

}  // namespace rhine
