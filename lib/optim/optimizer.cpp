#include "rhine/optim/optimizer.h"

#include <ATen/core/grad_mode.h>
#include <ATen/ATen.h>

#include <cmath>
#include <set>

#include "rhine/core/error.h"

namespace rhine {

std::string to_string(OptimizerImpl impl) {
  switch (impl) {
    case OptimizerImpl::kFused: return "fused";
    case OptimizerImpl::kForeach: return "foreach";
    case OptimizerImpl::kReference: return "reference";
  }
  return "?";
}

bool glob_match(std::string_view pattern, std::string_view text) {
  // Iterative matcher with one backtrack point (the last '*').
  size_t p = 0, t = 0, star = std::string_view::npos, mark = 0;
  while (t < text.size()) {
    if (p < pattern.size() && (pattern[p] == '?' || pattern[p] == text[t])) {
      ++p, ++t;
    } else if (p < pattern.size() && pattern[p] == '*') {
      star = p++, mark = t;
    } else if (star != std::string_view::npos) {
      p = star + 1, t = ++mark;
    } else {
      return false;
    }
  }
  while (p < pattern.size() && pattern[p] == '*') ++p;
  return p == pattern.size();
}

DecaySplit split_by_decay(const NamedParameters& params, const ParamGroupRules& rules) {
  DecaySplit out;
  for (const auto& np : params) {
    bool no_decay = rules.no_decay_below_2d && np.tensor.defined() && np.tensor.dim() < 2;
    for (const auto& pat : rules.no_decay) no_decay = no_decay || glob_match(pat, np.name);
    (no_decay ? out.no_decay : out.decay).push_back(np);
  }
  return out;
}

namespace detail {
void check_param_groups(const std::vector<std::pair<std::string, const NamedParameters*>>& groups,
                        std::string_view component) {
  const std::string c(component);
  RHINE_CHECK(!groups.empty(), c, "an optimizer needs at least one param group", 0,
              "pass the model's named parameters");
  std::set<std::string> names, group_names;
  for (const auto& [gname, params] : groups) {
    RHINE_CHECK(group_names.insert(gname).second, c, "param group names must be unique", gname,
                "rename one of the groups");
    for (const auto& np : *params) {
      RHINE_CHECK(!np.name.empty() && np.name.find('/') == std::string::npos, c,
                  "parameter names must be non-empty and free of '/'", np.name,
                  "'/' separates parameter and slot in the state dict");
      RHINE_CHECK(names.insert(np.name).second, c, "parameter appears twice", np.name,
                  "each parameter may belong to one group only");
      RHINE_CHECK(np.tensor.defined() && at::isFloatingType(np.tensor.scalar_type()), c,
                  "parameter must be a defined floating-point tensor", np.name,
                  "optimizers update float parameters only");
    }
  }
}
}  // namespace detail

void Optimizer::step() {
  at::NoGradGuard no_grad;
  step_impl();
  // The fused kernels write through data pointers; bump each updated
  // parameter's version as an in-place op would, so that code holding a copy
  // (ZeRO-2's replicated parameters, rhine/dist/fsdp.h) sees the change.
  for (const auto& p : parameters())
    if (p.grad().defined()) p.unsafeGetTensorImpl()->bump_version();
  ++n_steps_;
  after_step();
}

void Optimizer::zero_grad() {
  for (auto& p : parameters()) {
    if (p.grad().defined()) p.mutable_grad() = at::Tensor();
  }
}

void Optimizer::set_lr_scale(double scale) {
  RHINE_CHECK(std::isfinite(scale) && scale >= 0, "optim", "lr scale must be finite and >= 0",
              scale, "check the schedule");
  lr_scale_ = scale;
}

int64_t Optimizer::param_step(const std::string& name) const {
  auto it = state_.find(name);
  return it == state_.end() ? 0 : it->second.step;
}

std::vector<at::Tensor> Optimizer::parameters() const {
  std::vector<at::Tensor> out;
  for (const auto& [name, params] : group_views())
    for (const auto& np : *params) out.push_back(np.tensor);
  return out;
}

OptimizerState Optimizer::state_dict() const {
  OptimizerState s;
  Json groups = Json::array(), steps = Json::object();
  const auto views = group_views();
  for (size_t i = 0; i < views.size(); ++i) {
    Json names = Json::array();
    for (const auto& np : *views[i].second) {
      names.push_back(np.name);
      auto it = state_.find(np.name);
      if (it == state_.end() || it->second.step == 0) continue;
      steps[np.name] = it->second.step;
      for (const auto& [slot, t] : it->second.slots) s.tensors[np.name + "/" + slot] = t.detach().clone();
    }
    groups.push_back({{"name", views[i].first}, {"params", names}, {"options", group_options_json(i)}});
  }
  s.meta = {{"type", type()},         {"format", 1},           {"n_steps", n_steps_},
            {"lr_scale", lr_scale_}, {"groups", groups},      {"param_steps", steps}};
  return s;
}

void Optimizer::load_state_dict(const OptimizerState& s) {
  const std::string c = type();
  const Json& m = s.meta;
  RHINE_CHECK(m.is_object() && m.contains("type") && m.contains("groups") && m["groups"].is_array() &&
                  m.contains("param_steps") && m["param_steps"].is_object() &&
                  m.contains("n_steps") && m["n_steps"].is_number_integer() &&
                  m.contains("lr_scale") && m["lr_scale"].is_number(),
              c, "optimizer state lacks type, groups, param_steps, n_steps or lr_scale",
              Verbatim{m.dump().substr(0, 120)}, "pass what state_dict() returned");
  RHINE_CHECK(m.at("type") == type(), c, "optimizer state is for another optimizer",
              m.at("type").dump(), "load it into a " + m.at("type").dump() + " optimizer");
  RHINE_CHECK(m.value("format", 0) == 1, c, "unknown optimizer state format", m.value("format", 0),
              "this Rhine reads format 1");
  const auto views = group_views();
  const Json& groups = m.at("groups");
  RHINE_CHECK(groups.size() == views.size(), c, "number of param groups differs from the saved state",
              groups.size(), "build the optimizer with the same groups as the saved run (" +
                                 std::to_string(views.size()) + " here)");
  std::map<std::string, const at::Tensor*> by_name;
  for (size_t i = 0; i < views.size(); ++i) {
    const Json& g = groups[i];
    RHINE_CHECK(g.at("name") == views[i].first, c, "param group name differs from the saved state",
                g.at("name").dump(), "expected \"" + views[i].first + "\" at position " + std::to_string(i));
    const Json& names = g.at("params");
    RHINE_CHECK(names.size() == views[i].second->size(), c,
                "param group " + views[i].first + " has a different number of parameters than saved",
                names.size(), "saved and current models must have the same parameters");
    for (size_t k = 0; k < names.size(); ++k) {
      const auto& np = (*views[i].second)[k];
      RHINE_CHECK(names[k] == np.name, c, "parameter differs from the saved state", names[k].dump(),
                  "expected \"" + np.name + "\" in group " + views[i].first);
      by_name[np.name] = &np.tensor;
    }
  }
  // Everything checked that can be; now rebuild the state.
  std::unordered_map<std::string, ParamState> state;
  for (const auto& [name, step] : m.at("param_steps").items()) {
    RHINE_CHECK(by_name.count(name), c, "saved state names an unknown parameter", name,
                "saved and current models must have the same parameters");
    state[name].step = step.get<int64_t>();
  }
  for (const auto& [key, t] : s.tensors) {
    const auto slash = key.rfind('/');
    RHINE_CHECK(slash != std::string::npos, c, "state tensor name must be <param>/<slot>", key,
                "pass what state_dict() returned");
    const std::string name = key.substr(0, slash), slot = key.substr(slash + 1);
    auto it = state.find(name);
    RHINE_CHECK(it != state.end(), c, "state tensor for a parameter without a saved step", key,
                "the state dict is incomplete");
    const at::Tensor& p = *by_name.at(name);
    RHINE_CHECK(t.sizes() == p.sizes(), c, "state tensor shape differs from its parameter",
                key + " " + std::string(c10::str(t.sizes())), "expected " + std::string(c10::str(p.sizes())));
    it->second.slots[slot] = t.detach().to(p.device()).clone();
  }
  for (size_t i = 0; i < views.size(); ++i) set_group_options_json(i, groups[i].at("options"));
  state_ = std::move(state);
  n_steps_ = m.at("n_steps").get<int64_t>();
  lr_scale_ = m.at("lr_scale").get<double>();
}

Json merge_state_meta(const std::vector<Json>& metas) {
  RHINE_CHECK(!metas.empty(), "optim", "no optimizer state to merge", 0, "pass every rank's meta");
  Json out = metas.front();
  for (std::size_t r = 1; r < metas.size(); ++r) {
    RHINE_CHECK(metas[r].value("type", "") == out.value("type", ""), "optim",
                "the parts of a sharded optimizer state come from different optimizers", metas[r].value("type", ""),
                "expected " + out.value("type", ""));
    for (const auto& [name, step] : metas[r].at("param_steps").items()) out["param_steps"][name] = step;
  }
  return out;
}

OptimizerState reshard_state(const Optimizer& optimizer, const Json& merged_meta,
                             const std::vector<std::string>& saved_keys,
                             const std::function<at::Tensor(const std::string& key)>& slot) {
  OptimizerState s = optimizer.state_dict();  // this optimizer's own groups and names
  Json& m = s.meta;
  const std::string c = optimizer.type();
  RHINE_CHECK(merged_meta.value("type", "") == c, c, "the saved optimizer state is for another optimizer",
              merged_meta.value("type", ""), "resume with the optimizer of the saved run");
  std::map<std::string, Json> saved_options;
  for (const auto& g : merged_meta.at("groups")) saved_options[g.at("name").get<std::string>()] = g.at("options");
  std::set<std::string> mine;
  for (auto& g : m["groups"]) {
    auto it = saved_options.find(g.at("name").get<std::string>());
    RHINE_CHECK(it != saved_options.end(), c, "the saved state has no param group named", g.at("name").dump(),
                "build the optimizer with the groups of the saved run");
    g["options"] = it->second;
    for (const auto& n : g.at("params")) mine.insert(n.get<std::string>());
  }
  m["param_steps"] = Json::object();
  for (const auto& [name, step] : merged_meta.at("param_steps").items())
    if (mine.count(name)) m["param_steps"][name] = step;
  m["n_steps"] = merged_meta.at("n_steps");
  m["lr_scale"] = merged_meta.at("lr_scale");
  s.tensors.clear();
  for (const auto& key : saved_keys) {
    const auto slash = key.rfind('/');
    if (slash == std::string::npos || !mine.count(key.substr(0, slash))) continue;
    s.tensors[key] = slot(key);
  }
  return s;
}

}  // namespace rhine
