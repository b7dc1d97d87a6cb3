#pragma once
/// \file
/// ZeRO stage 1 (Rajbhandari et al., arXiv:1910.02054): the optimizer state is
/// partitioned across ranks. Each parameter has one owner rank; a rank builds
/// its optimizer (through a factory, so any Rhine optimizer fits) only over
/// the parameters it owns, steps them with the averaged gradients, and then
/// every owner broadcasts its updated parameters to the others.
///
///     rhine::dist::GradientSync sync(world, params);
///     rhine::dist::ShardedOptimizer opt(world, params, [&](const rhine::NamedParameters& shard) {
///       return std::make_unique<rhine::AdamW>(rhine::decay_groups(shard, adamw_options));
///     });
///     ... backward ...; sync.finish(); rhine::clip_grad_norm(...); opt.step(); opt.zero_grad();
///
/// Memory: with P parameters, AdamW keeps 2 fp32 slots (8 bytes) per
/// parameter; sharded over N ranks each rank holds about 8P/N bytes of state
/// instead of 8P (e.g. 1B parameters on 8 ranks: 1 GB instead of 8 GB per
/// rank). Weights and gradients stay replicated (stage 1 only), so clipping by
/// the global gradient norm works unchanged on every rank. The cost: one extra
/// broadcast of all weights per step (the same volume as the gradients'
/// all-reduce).
///
/// Partition: greedy by size, deterministic: parameters sorted by element
/// count (largest first, ties by position) each go to the rank with the fewest
/// elements so far (ties: lowest rank). Every rank computes the same owners.
/// With one rank, ShardedOptimizer is the factory's optimizer over everything.
///
/// Checkpoints are per rank: state_dict() holds this rank's shard (with the
/// partition it was made with); load it on the same rank of a run with the
/// same world size and parameters. rhine::train::Trainer takes a
/// ShardedOptimizer directly and collects the shards into one checkpoint.

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "rhine/dist/world.h"
#include "rhine/optim/optimizer.h"

namespace rhine::dist {

/// Builds an optimizer over one rank's shard (never called with an empty shard).
using OptimizerFactory = std::function<std::unique_ptr<Optimizer>(const NamedParameters& shard)>;

/// Owner rank of each parameter (see the file comment); `params` order kept.
std::vector<int> partition_parameters(const NamedParameters& params, int world_size);

/// ZeRO-1 over a World (kept by reference; it must outlive this object).
class ShardedOptimizer {
 public:
  ShardedOptimizer(World& world, const NamedParameters& params, const OptimizerFactory& factory);

  /// Steps this rank's shard, then broadcasts every shard from its owner
  /// (same-dtype parameters of one owner flattened into one broadcast).
  /// Gradients must already be averaged over ranks (GradientSync::finish).
  void step();
  /// Drops every parameter's gradient (all parameters, not only the shard).
  void zero_grad();
  /// Forwards to the local optimizer (a schedule's multiplier).
  void set_lr_scale(double scale);
  /// Number of step() calls so far.
  std::int64_t n_steps() const { return n_steps_; }

  /// Owner rank of each parameter, in `params` order.
  const std::vector<int>& owners() const { return owners_; }
  /// All parameters (every rank's), in the order given.
  const NamedParameters& parameters() const { return params_; }
  /// The parameters this rank owns.
  const NamedParameters& shard() const { return shard_; }
  /// The optimizer over shard(); nullptr when this rank owns nothing.
  Optimizer* local() { return local_.get(); }

  /// This rank's optimizer state; meta records rank, world size and the shard's names.
  OptimizerState state_dict() const;
  /// Restores what state_dict() returned on the same rank of an equal run;
  /// throws rhine::Error on a rank, world-size or shard mismatch.
  void load_state_dict(const OptimizerState& state);

 private:
  World* world_;
  NamedParameters params_, shard_;
  std::vector<int> owners_;
  std::unique_ptr<Optimizer> local_;
  std::int64_t n_steps_ = 0;
};

}  // namespace rhine::dist
