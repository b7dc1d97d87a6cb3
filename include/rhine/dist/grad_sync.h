#pragma once
/// \file
/// Gradient averaging over ranks, DDP-style: gradients are flattened into
/// buckets of about `bucket_bytes`, and each bucket's all-reduce is launched
/// from per-parameter hooks as soon as all its gradients are ready, so the
/// communication of late layers overlaps the backward of early ones.
///
///     rhine::dist::GradientSync sync(world, params);      // registers the hooks
///     for (int micro = 0; micro < accum; ++micro) {
///       auto guard = micro + 1 < accum ? sync.no_sync() : rhine::dist::NoSyncGuard{};
///       auto out = model->forward(batch.input_ids, {...});
///       (out.loss / accum).backward();                    // buckets launch during backward
///     }
///     sync.finish();                                      // wait; grads now averaged
///     optimizer.step();
///
/// After finish(), every parameter's gradient is the mean over ranks of the
/// gradients accumulated locally since the last finish(); a parameter that got
/// no gradient on a rank counts as zero there, and gets a (zero) gradient when
/// it got none anywhere, so all ranks always step the same parameters.
///
/// Hooks: LibTorch's post hooks on each parameter's gradient accumulator (the
/// AccumulateGrad node, as c10d's Reducer uses), which run after `.grad` was
/// updated; available on LibTorch 1.13 and 2.x alike. Buckets hold parameters
/// in reverse order (the order backward produces gradients) and are launched
/// strictly in bucket order, so every rank issues the same collectives in the
/// same order whatever order its hooks fire in.
///
/// Exactness: each gradient element is summed over ranks by the backend and
/// divided by world_size once, exactly as the per-parameter twin
/// `sync_gradients_reference` does: both give bitwise equal gradients (tested).

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "rhine/dist/world.h"
#include "rhine/optim/optimizer.h"

namespace rhine::dist {

/// Options of GradientSync.
struct GradientSyncOptions {
  /// Bucket capacity (PyTorch DDP's default bucket_cap_mb = 25). A parameter
  /// larger than this gets a bucket of its own.
  std::int64_t bucket_bytes = 25ll * 1024 * 1024;
  /// Launch buckets from gradient hooks during backward; false: all buckets in finish().
  bool overlap = true;
};

class GradientSync;

/// While alive, backward passes only accumulate gradients locally (no
/// communication): gradient-accumulation micro-steps. A default-constructed
/// guard does nothing.
class NoSyncGuard {
 public:
  NoSyncGuard() = default;
  ~NoSyncGuard();
  NoSyncGuard(NoSyncGuard&& other) noexcept;
  NoSyncGuard& operator=(NoSyncGuard&& other) noexcept;
  NoSyncGuard(const NoSyncGuard&) = delete;
  NoSyncGuard& operator=(const NoSyncGuard&) = delete;

 private:
  friend class GradientSync;
  explicit NoSyncGuard(GradientSync* sync);
  GradientSync* sync_ = nullptr;
  bool previous_ = true;
};

/// Averages gradients over the ranks of a World, bucketed and overlapped with
/// backward. Keeps a reference to `world`, which must outlive it. With one
/// rank it registers nothing and finish() returns at once.
class GradientSync {
 public:
  /// `params`: the trainable parameters, identical in order, shapes and
  /// dtypes on every rank (each at most once; frozen ones left out).
  GradientSync(World& world, const NamedParameters& params, const GradientSyncOptions& options = {});
  ~GradientSync();
  GradientSync(GradientSync&&) noexcept;
  GradientSync& operator=(GradientSync&&) noexcept;
  GradientSync(const GradientSync&) = delete;
  GradientSync& operator=(const GradientSync&) = delete;

  /// Launches the buckets not launched yet, waits for all of them and writes
  /// the averaged gradients back. Call once after the last backward of a step.
  /// Throws rhine::Error (see World) when a rank is dead or too slow.
  void finish();

  /// Turns communication during backward on or off (see NoSyncGuard).
  void set_sync_enabled(bool enabled);
  bool sync_enabled() const;
  /// Accumulation micro-step: no communication while the guard lives.
  NoSyncGuard no_sync() { return NoSyncGuard(this); }

  /// Parameter indices (into `params`) of each bucket, in launch order.
  std::vector<std::vector<std::size_t>> buckets() const;
  /// How many buckets the last finish() found already launched by hooks
  /// during backward (the overlapped ones).
  std::size_t last_overlapped_buckets() const;

 private:
  struct State;
  struct Hook;  ///< the post hook on each parameter's gradient accumulator
  std::shared_ptr<State> state_;
};

/// The plain twin of GradientSync: after backward, one blocking all-reduce per
/// parameter (in order), divided by world_size; a missing gradient counts as
/// zero and is created. The reference GradientSync is tested against.
void sync_gradients_reference(World& world, const NamedParameters& params);

}  // namespace rhine::dist
