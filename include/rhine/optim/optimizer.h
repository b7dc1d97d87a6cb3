#pragma once
/// \file
/// Rhine's optimizer base: named parameters in param groups (each with its own
/// options), lazily created per-parameter state, and a state dict made of
/// named tensors plus a small JSON of scalars, so a training checkpoint can
/// store it next to the weights (e.g. in safetensors) and a resumed run
/// continues bit-identically on CPU.
///
/// Why not derive from torch::optim::Optimizer: its per-parameter state is
/// keyed by the address of the TensorImpl (lost across processes), it
/// serialises only through torch::serialize archives (pickle/zip, not named
/// tensors), its header pulls in torch/nn (about 10 s of compile time per
/// file) and its API moved between LibTorch 1.13 and 2.x. Rhine keeps the same
/// shape (options structs, param groups with their own options, lazy state)
/// but keys everything by parameter *name*, which is stable across runs.
///
/// Learning rates: each group has its own `lr`; the update uses
/// `lr * lr_scale()`, so a schedule (rhine/optim/schedule.h) drives every
/// group at once with `optimizer.set_lr_scale(schedule(step))`.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "rhine/core/json.h"

namespace rhine {

/// A parameter with the stable name it has in checkpoints ("model.layers.0.mlp.up_proj.weight").
struct NamedParameter {
  std::string name;
  at::Tensor tensor;
};
using NamedParameters = std::vector<NamedParameter>;

/// Everything an optimizer needs to resume exactly.
///  - `tensors`: "<param name>/<slot>" -> state tensor, each of the parameter's
///    shape (e.g. "lm_head.weight/exp_avg"); safetensors-ready.
///  - `meta`: JSON scalars: optimizer type, step counts per parameter, group
///    names, member names and options, lr scale. Doubles round-trip exactly.
struct OptimizerState {
  std::map<std::string, at::Tensor> tensors;
  Json meta;
};

/// Which implementation an optimizer with a fast path runs (AdamW).
enum class OptimizerImpl {
  kFused,      ///< one pass per element over all tensors of a group (CPU fp32/fp64), else kForeach
  kForeach,    ///< at::_foreach_* ops: few kernel launches per group on CUDA
  kReference,  ///< plain per-parameter ops, the twin the others are tested against
};

/// "fused", "foreach", "reference".
std::string to_string(OptimizerImpl impl);

/// True when `text` matches the glob `pattern` (`*` any run, `?` one character).
bool glob_match(std::string_view pattern, std::string_view text);

/// Which parameters get no weight decay.
struct ParamGroupRules {
  /// Globs matched against the full parameter name; a match goes to the
  /// no-decay group. Defaults cover HF Llama/DeepSeek names (norms, biases,
  /// `embed_tokens`, the MoE router `mlp.gate.weight`).
  std::vector<std::string> no_decay = {"*norm*", "*bias", "*embed*", "*mlp.gate.weight"};
  /// Parameters with fewer than 2 dimensions (norm gains, biases, scalars)
  /// get no decay whatever their name.
  bool no_decay_below_2d = true;
};

/// Parameters split by ParamGroupRules (order of `params` kept in each).
struct DecaySplit {
  NamedParameters decay, no_decay;
};
DecaySplit split_by_decay(const NamedParameters& params, const ParamGroupRules& rules = {});

/// One param group: a name, its parameters and its own options.
template <class Options>
struct ParamGroup {
  std::string name;
  NamedParameters params;
  Options options;
};

/// The groups "decay" (options as given) and "no_decay" (weight_decay = 0);
/// an empty group is left out.
template <class Options>
std::vector<ParamGroup<Options>> decay_groups(const NamedParameters& params, const Options& options,
                                              const ParamGroupRules& rules = {}) {
  auto split = split_by_decay(params, rules);
  std::vector<ParamGroup<Options>> groups;
  if (!split.decay.empty()) groups.push_back({"decay", std::move(split.decay), options});
  if (!split.no_decay.empty()) {
    Options o = options;
    o.weight_decay = 0.0;
    groups.push_back({"no_decay", std::move(split.no_decay), o});
  }
  return groups;
}

/// The base of Rhine's optimizers (AdamW, Muon, AdEMAMix, Lion).
class Optimizer {
 public:
  virtual ~Optimizer() = default;
  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;

  /// Updates every parameter that has a gradient (and bumps its version
  /// counter, as an in-place op does); one without a gradient is left alone
  /// and its state (and per-parameter step) does not advance.
  void step();
  /// Drops all gradients (sets them undefined, like set_to_none).
  void zero_grad();

  /// Multiplies every group's lr (what a schedule sets each step).
  void set_lr_scale(double scale);
  double lr_scale() const { return lr_scale_; }
  /// Number of step() calls so far (saved and restored).
  int64_t n_steps() const { return n_steps_; }
  /// Steps taken by one parameter (0 before its first gradient).
  int64_t param_step(const std::string& name) const;

  /// "adamw", "muon", "ademamix", "lion".
  virtual std::string type() const = 0;
  /// All parameters, group by group.
  std::vector<at::Tensor> parameters() const;

  /// State for a checkpoint: tensors are copies (detached, same device).
  OptimizerState state_dict() const;
  /// Restores a state_dict of an optimizer of the same type with the same
  /// groups and parameter names; group options are restored too. Throws
  /// rhine::Error naming the first mismatch.
  void load_state_dict(const OptimizerState& state);

 protected:
  Optimizer() = default;

  /// Per-parameter state: step count and named slots (exp_avg, ...).
  struct ParamState {
    int64_t step = 0;
    std::map<std::string, at::Tensor> slots;
  };
  /// The state of `name`, created empty on first use.
  ParamState& state_of(const std::string& name) { return state_[name]; }

  virtual void step_impl() = 0;
  /// Runs at the end of step(), after the updated parameters' versions were bumped.
  virtual void after_step() {}
  /// (group name, members) of every group, in order.
  virtual std::vector<std::pair<std::string, const NamedParameters*>> group_views() const = 0;
  virtual Json group_options_json(size_t group) const = 0;
  virtual void set_group_options_json(size_t group, const Json& options) = 0;

 private:
  std::unordered_map<std::string, ParamState> state_;
  double lr_scale_ = 1.0;
  int64_t n_steps_ = 0;
};

/// The Optimizer for one options type; `Options` provides `to_json()`,
/// `static Options from_json(const Json&)` and `validate()`.
template <class Options>
class GroupedOptimizer : public Optimizer {
 public:
  using Group = ParamGroup<Options>;
  /// The groups, in the order given to the constructor.
  const std::vector<Group>& param_groups() const { return groups_; }
  /// A group's options may be changed between steps (like torch's param_groups).
  Options& group_options(size_t group) { return groups_.at(group).options; }

 protected:
  explicit GroupedOptimizer(std::vector<Group> groups, std::string_view component);

  std::vector<std::pair<std::string, const NamedParameters*>> group_views() const override {
    std::vector<std::pair<std::string, const NamedParameters*>> v;
    for (const auto& g : groups_) v.emplace_back(g.name, &g.params);
    return v;
  }
  Json group_options_json(size_t group) const override { return groups_.at(group).options.to_json(); }
  void set_group_options_json(size_t group, const Json& options) override {
    auto o = Options::from_json(options);
    o.validate();
    groups_.at(group).options = o;
  }

  std::vector<Group> groups_;
};

/// Resharding (a run resumed with another partition of its parameters: ZeRO-1
/// owners, FSDP ranks). The metas of optimizers that stepped disjoint parts of
/// one model, merged: param_steps united; type, format, n_steps, lr_scale and
/// groups (with their options) from the first.
Json merge_state_meta(const std::vector<Json>& metas);

/// The state `optimizer` loads from a saved (merged) state: its own groups
/// with the options of the saved group of the same name, the saved step of
/// each of its parameters, and `slot(key)` for every key "<param>/<slot>" of
/// `saved_keys` that belongs to one of its parameters (slot returns the
/// tensor in the shape of this optimizer's parameter: its rows of the saved one).
OptimizerState reshard_state(const Optimizer& optimizer, const Json& merged_meta,
                             const std::vector<std::string>& saved_keys,
                             const std::function<at::Tensor(const std::string& key)>& slot);

namespace detail {
/// Checks groups: non-empty, unique parameter names, defined floating tensors.
void check_param_groups(const std::vector<std::pair<std::string, const NamedParameters*>>& groups,
                        std::string_view component);
}  // namespace detail

template <class Options>
GroupedOptimizer<Options>::GroupedOptimizer(std::vector<Group> groups, std::string_view component)
    : groups_(std::move(groups)) {
  for (const auto& g : groups_) g.options.validate();
  detail::check_param_groups(group_views(), component);
}

}  // namespace rhine
