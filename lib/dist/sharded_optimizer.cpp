#include "rhine/dist/sharded_optimizer.h"

#include <ATen/core/grad_mode.h>
#include <ATen/ops/cat.h>

#include <algorithm>
#include <numeric>
#include <utility>

#include "rhine/core/error.h"

namespace rhine::dist {

namespace {
constexpr const char* kComponent = "dist";
}  // namespace

std::vector<int> partition_parameters(const NamedParameters& params, int world_size) {
  RHINE_CHECK(world_size >= 1, kComponent, "world_size must be at least 1", world_size, "");
  std::vector<std::size_t> order(params.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return params[a].tensor.numel() > params[b].tensor.numel();
  });
  std::vector<std::int64_t> load(static_cast<std::size_t>(world_size), 0);
  std::vector<int> owners(params.size(), 0);
  for (std::size_t i : order) {
    const auto r = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
    owners[i] = r;
    load[static_cast<std::size_t>(r)] += params[i].tensor.numel();
  }
  return owners;
}

ShardedOptimizer::ShardedOptimizer(World& world, const NamedParameters& params,
                                   const OptimizerFactory& factory)
    : world_(&world), params_(params), owners_(partition_parameters(params, world.world_size())) {
  RHINE_CHECK(static_cast<bool>(factory), kComponent, "ShardedOptimizer needs an optimizer factory",
              "empty", "pass a lambda building e.g. rhine::AdamW over the shard");
  for (std::size_t i = 0; i < params_.size(); ++i) {
    if (owners_[i] == world.rank()) shard_.push_back(params_[i]);
  }
  if (!shard_.empty()) {
    local_ = factory(shard_);
    RHINE_CHECK(local_ != nullptr, kComponent, "the optimizer factory returned nullptr, rank",
                world.rank(), "return a std::unique_ptr<rhine::Optimizer>");
  }
}

void ShardedOptimizer::step() {
  if (local_) local_->step();
  ++n_steps_;
  if (world_->world_size() == 1) return;
  at::NoGradGuard no_grad;
  // Per owner, one flat broadcast per (dtype, device) in order of first
  // appearance: the same sequence of collectives on every rank.
  for (int owner = 0; owner < world_->world_size(); ++owner) {
    std::vector<std::vector<std::size_t>> groups;
    for (std::size_t i = 0; i < params_.size(); ++i) {
      if (owners_[i] != owner) continue;
      const at::Tensor& t = params_[i].tensor;
      auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& g) {
        const at::Tensor& f = params_[g.front()].tensor;
        return f.scalar_type() == t.scalar_type() && f.device() == t.device();
      });
      if (it == groups.end()) {
        groups.push_back({i});
      } else {
        it->push_back(i);
      }
    }
    for (const auto& g : groups) {
      std::vector<at::Tensor> parts;
      for (std::size_t i : g) parts.push_back(params_[i].tensor.detach().reshape({-1}));
      at::Tensor flat = world_->to_device(at::cat(parts));
      world_->broadcast_(flat, owner);
      if (owner == world_->rank()) continue;  // the owner already holds these values
      std::int64_t offset = 0;
      for (std::size_t i : g) {
        at::Tensor p = params_[i].tensor.detach();
        p.copy_(flat.narrow(0, offset, p.numel()).view(p.sizes()));
        offset += p.numel();
      }
    }
  }
}

void ShardedOptimizer::zero_grad() {
  for (auto& np : params_) np.tensor.mutable_grad() = at::Tensor();
}

void ShardedOptimizer::set_lr_scale(double scale) {
  if (local_) local_->set_lr_scale(scale);
}

OptimizerState ShardedOptimizer::state_dict() const {
  OptimizerState s;
  if (local_) s = local_->state_dict();
  Json names = Json::array();
  for (const auto& np : shard_) names.push_back(np.name);
  s.meta["zero1"] = {{"rank", world_->rank()},
                     {"world_size", world_->world_size()},
                     {"n_steps", n_steps_},
                     {"shard", names}};
  return s;
}

void ShardedOptimizer::load_state_dict(const OptimizerState& state) {
  const Json& m = state.meta;
  RHINE_CHECK(m.is_object() && m.contains("zero1") && m["zero1"].is_object(), kComponent,
              "optimizer state has no zero1 section", Verbatim{m.dump().substr(0, 120)},
              "load a state written by ShardedOptimizer::state_dict()");
  const Json& z = m["zero1"];
  RHINE_CHECK(z.value("world_size", -1) == world_->world_size(), kComponent,
              "ZeRO-1 state was saved with another world size", z.value("world_size", -1),
              "resume with " + std::to_string(z.value("world_size", -1)) + " ranks");
  RHINE_CHECK(z.value("rank", -1) == world_->rank(), kComponent,
              "ZeRO-1 state was saved by another rank", z.value("rank", -1),
              "rank " + std::to_string(world_->rank()) + " must load its own file");
  Json names = Json::array();
  for (const auto& np : shard_) names.push_back(np.name);
  RHINE_CHECK(z.value("shard", Json::array()) == names, kComponent,
              "ZeRO-1 shard differs from the saved one", Verbatim{z.value("shard", Json::array()).dump().substr(0, 120)},
              "use the same model and parameter order as the saved run");
  if (local_) {
    OptimizerState inner = state;
    inner.meta.erase("zero1");
    local_->load_state_dict(inner);
  }
  n_steps_ = z.value("n_steps", std::int64_t{0});
}

}  // namespace rhine::dist
