#include "rhine/optim/muon.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <tuple>
#include <utility>

#include "rhine/core/error.h"
#include "rhine/optim/adamw.h"

namespace rhine {
namespace {

std::string scale_name(MuonScale s) { return s == MuonScale::kMatchAdamW ? "match_adamw" : "spectral"; }

std::string dtype_name(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::BFloat16: return "bf16";
    case c10::ScalarType::Half: return "fp16";
    case c10::ScalarType::Float: return "fp32";
    case c10::ScalarType::Double: return "fp64";
    default: return c10::toString(t);
  }
}

}  // namespace

void MuonOptions::validate() const {
  RHINE_CHECK(std::isfinite(lr) && lr >= 0, "muon", "lr must be finite and >= 0", lr, "e.g. 1e-3");
  RHINE_CHECK(std::isfinite(weight_decay) && weight_decay >= 0, "muon",
              "weight_decay must be finite and >= 0", weight_decay, "e.g. 0.1");
  RHINE_CHECK(momentum >= 0 && momentum < 1, "muon", "momentum must be in [0, 1)", momentum, "e.g. 0.95");
  RHINE_CHECK(ns_steps >= 1 && ns_steps <= 100, "muon", "ns_steps must be in [1, 100]", ns_steps,
              "5 is the usual value");
  RHINE_CHECK(ns_dtype == c10::ScalarType::BFloat16 || ns_dtype == c10::ScalarType::Half ||
                  ns_dtype == c10::ScalarType::Float || ns_dtype == c10::ScalarType::Double,
              "muon", "ns_dtype must be bf16, fp16, fp32 or fp64", dtype_name(ns_dtype), "use bf16");
  RHINE_CHECK(beta1 >= 0 && beta1 < 1, "muon", "beta1 (AdamW groups) must be in [0, 1)", beta1, "e.g. 0.9");
  RHINE_CHECK(beta2 >= 0 && beta2 < 1, "muon", "beta2 (AdamW groups) must be in [0, 1)", beta2, "e.g. 0.95");
  RHINE_CHECK(eps > 0, "muon", "eps (AdamW groups) must be > 0", eps, "e.g. 1e-8");
}

Json MuonOptions::to_json() const {
  return {{"use_muon", use_muon}, {"lr", lr},           {"weight_decay", weight_decay},
          {"momentum", momentum}, {"nesterov", nesterov}, {"ns_steps", ns_steps},
          {"scale", scale_name(scale)}, {"ns_dtype", dtype_name(ns_dtype)},
          {"beta1", beta1},       {"beta2", beta2},     {"eps", eps}};
}

MuonOptions MuonOptions::from_json(const Json& j) {
  JsonFields f(j, "muon");
  MuonOptions o;
  o.use_muon = f.get("use_muon", o.use_muon);
  o.lr = f.get("lr", o.lr);
  o.weight_decay = f.get("weight_decay", o.weight_decay);
  o.momentum = f.get("momentum", o.momentum);
  o.nesterov = f.get("nesterov", o.nesterov);
  o.ns_steps = f.get("ns_steps", o.ns_steps);
  const std::string scale = f.get<std::string>("scale", scale_name(o.scale));
  RHINE_CHECK(scale == "match_adamw" || scale == "spectral", "muon", "unknown scale rule", scale,
              "use \"match_adamw\" or \"spectral\"");
  o.scale = scale == "match_adamw" ? MuonScale::kMatchAdamW : MuonScale::kSpectral;
  const std::string dt = f.get<std::string>("ns_dtype", dtype_name(o.ns_dtype));
  if (dt == "bf16") o.ns_dtype = c10::ScalarType::BFloat16;
  else if (dt == "fp16") o.ns_dtype = c10::ScalarType::Half;
  else if (dt == "fp32") o.ns_dtype = c10::ScalarType::Float;
  else if (dt == "fp64") o.ns_dtype = c10::ScalarType::Double;
  else RHINE_FAIL("muon", "unknown ns_dtype", dt, "use bf16, fp16, fp32 or fp64");
  o.beta1 = f.get("beta1", o.beta1);
  o.beta2 = f.get("beta2", o.beta2);
  o.eps = f.get("eps", o.eps);
  f.reject_unknown();
  o.validate();
  return o;
}

std::vector<ParamGroup<MuonOptions>> muon_groups(const NamedParameters& params,
                                                 const MuonOptions& options,
                                                 const MuonGroupRules& rules) {
  NamedParameters hidden, rest;
  for (const auto& np : params) {
    bool adamw = np.tensor.dim() < 2;
    for (const auto& pat : rules.adamw) adamw = adamw || glob_match(pat, np.name);
    (adamw ? rest : hidden).push_back(np);
  }
  std::vector<ParamGroup<MuonOptions>> groups;
  MuonOptions mo = options;
  mo.use_muon = true;
  if (!hidden.empty()) groups.push_back({"muon", std::move(hidden), mo});
  auto split = split_by_decay(rest, rules.decay);
  MuonOptions ao = options;
  ao.use_muon = false;
  if (!split.decay.empty()) groups.push_back({"adamw_decay", std::move(split.decay), ao});
  ao.weight_decay = 0.0;
  if (!split.no_decay.empty()) groups.push_back({"adamw_no_decay", std::move(split.no_decay), ao});
  return groups;
}

at::Tensor newton_schulz5(const at::Tensor& G, int steps, c10::ScalarType dtype) {
  RHINE_CHECK(G.dim() >= 2, "muon", "newton_schulz5 needs a matrix (or a batch of them)",
              G.sizes().vec(), "flatten the parameter to [rows, cols] first");
  // Coefficients of Keller Jordan's quintic: slope 3.4445 at 0 pulls small
  // singular values up fast; the fixed point band is about [0.7, 1.2].
  constexpr double a = 3.4445, b = -4.7750, c = 2.0315;
  at::Tensor X = G.to(dtype);
  const bool tall = G.size(-2) > G.size(-1);
  if (tall) X = X.transpose(-2, -1);  // [.., A, B] with A <= B: X X^T is the small Gram
  X = X / (at::linalg_vector_norm(X, 2, at::IntArrayRef({-2, -1}), /*keepdim=*/true) + 1e-7);
  for (int i = 0; i < steps; ++i) {
    at::Tensor S = at::matmul(X, X.transpose(-2, -1));  // [.., A, A]
    at::Tensor B = b * S + c * at::matmul(S, S);          // [.., A, A]
    X = a * X + at::matmul(B, X);                         // [.., A, B]
  }
  if (tall) X = X.transpose(-2, -1);
  return X.to(G.scalar_type());
}

double muon_scale(MuonScale rule, int64_t A, int64_t B) {
  if (rule == MuonScale::kMatchAdamW) return 0.2 * std::sqrt(static_cast<double>(std::max(A, B)));
  return std::sqrt(std::max(1.0, static_cast<double>(A) / static_cast<double>(B)));
}

Muon::Muon(std::vector<Group> groups) : GroupedOptimizer(std::move(groups), "muon") {
  for (const auto& g : groups_)
    if (g.options.use_muon)
      for (const auto& np : g.params)
        RHINE_CHECK(np.tensor.dim() >= 2, "muon", "a Muon group holds a parameter with < 2 dims",
                    np.name + " " + std::string(c10::str(np.tensor.sizes())),
                    "put 1-D parameters in a group with use_muon = false (see muon_groups)");
}

void Muon::step_impl() {
  // Pass 1: AdamW groups step; Muon groups update their momentum and collect
  // the update u of each parameter (its rows, under row sharding).
  struct Item {
    at::Tensor* param;
    const MuonOptions* options;
    double lr;
  };
  std::map<std::string, Item> items;
  std::map<std::string, at::Tensor> updates;
  for (auto& group : groups_) {
    const auto& o = group.options;
    const double lr = o.lr * lr_scale();
    for (auto& np : group.params) {
      at::Tensor& p = np.tensor;
      const at::Tensor& g = p.grad();
      if (!g.defined()) continue;
      auto& st = state_of(np.name);
      if (!o.use_muon) {
        if (st.step == 0) {
          st.slots["exp_avg"] = at::zeros_like(p, at::MemoryFormat::Preserve);
          st.slots["exp_avg_sq"] = at::zeros_like(p, at::MemoryFormat::Preserve);
        }
        ++st.step;
        detail::adamw_update_reference(p, g, st.slots.at("exp_avg"), st.slots.at("exp_avg_sq"),
                                       {lr, o.beta1, o.beta2, o.eps, o.weight_decay, st.step});
        continue;
      }
      if (st.step == 0) st.slots["momentum_buffer"] = at::zeros_like(p, at::MemoryFormat::Preserve);
      ++st.step;
      at::Tensor& m = st.slots.at("momentum_buffer");
      m.lerp_(g, 1 - o.momentum);                             // m = beta m + (1-beta) g
      updates[np.name] = o.nesterov ? g.lerp(m, o.momentum) : m;  // (1-beta) g + beta m
      items[np.name] = {&p, &o, lr};
    }
  }

  // Pass 2: orthogonalise whole matrices. Those of one shape and group run as
  // one batch [n, A, B]: a few large matmuls instead of many small ones.
  auto orthogonalise = [&](const std::map<std::string, at::Tensor>& whole) {
    std::map<std::tuple<const MuonOptions*, int64_t, int64_t>, std::vector<std::string>> batches;
    for (const auto& [name, u] : whole) batches[{items.at(name).options, u.size(0), u.size(1)}].push_back(name);
    std::map<std::string, at::Tensor> out;
    for (const auto& [key, names] : batches) {
      const MuonOptions& o = *std::get<0>(key);
      std::vector<at::Tensor> us;
      for (const auto& name : names) us.push_back(whole.at(name));
      at::Tensor O = newton_schulz5(at::stack(us), o.ns_steps, o.ns_dtype);  // [n, A, B]
      for (std::size_t i = 0; i < names.size(); ++i) out[names[i]] = O[static_cast<int64_t>(i)];
    }
    return out;
  };
  std::map<std::string, at::Tensor> result;
  if (shards_) {
    result = shards_->orthogonalise(updates, orthogonalise);
  } else {
    std::map<std::string, at::Tensor> whole;
    for (const auto& [name, u] : updates) whole[name] = u.reshape({u.size(0), u.numel() / u.size(0)});
    result = orthogonalise(whole);
  }

  // Pass 3: apply, scaled by the whole matrix's shape.
  for (auto& [name, item] : items) {
    at::Tensor& p = *item.param;
    const MuonOptions& o = *item.options;
    const auto [A, B] = shards_ ? shards_->whole_shape(name) : std::pair<int64_t, int64_t>{p.size(0), p.numel() / p.size(0)};
    if (o.weight_decay != 0) p.mul_(1 - item.lr * o.weight_decay);
    p.add_(result.at(name).reshape(p.sizes()), -item.lr * muon_scale(o.scale, A, B));
  }
}

}  // namespace rhine
