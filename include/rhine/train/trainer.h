#pragma once
/// \file
/// `Trainer`: the training loop downstream programs reuse. It composes what
/// the caller built - a model, an optimizer, a learning-rate schedule, a data
/// loader and optional held-out sets - and adds the parts every run needs:
/// gradient accumulation, bf16 autocast over fp32 master weights, clipping and
/// the skip-step guard, MoE router-bias updates, periodic per-language
/// evaluation, crash-safe checkpoints (every N steps and on SIGINT/SIGTERM),
/// exact resume, a terminal progress line, a metrics JSONL file and an SVG
/// plot. Nothing is global: two Trainers can run in one process.
///
///     rhine::train::TrainerOptions o;
///     o.max_steps = 600;
///     o.out_dir = "runs/demo";          // checkpoints/, metrics.jsonl, training.svg
///     rhine::train::Trainer trainer(lm, optimizer, schedule, loader, o);
///     trainer.set_heldout(&heldout);    // per-language loss and bits per byte
///     auto result = trainer.fit();      // resumes from runs/demo/checkpoints if present
///
/// One optimizer step = `grad_accum` micro-batches (each one BatchSource::next()).
/// The loss of a step is the mean cross-entropy over all counted tokens of its
/// micro-batches (micro-batch losses weighted by their token counts), so
/// accumulating k batches of b rows equals one batch of k*b rows.
///
/// Checkpoint contents (a directory committed by rhine::io::CheckpointManager):
///
///     config.json            the model's HF config (the directory is also an HF model dir)
///     model.safetensors      parameters and buffers under their HF names, in their dtype
///     optimizer.safetensors  optimizer state tensors ("<param>/<slot>") and LibTorch's CPU RNG ("rng/cpu")
///     trainer.json           step, optimizer scalars, loader position, skip-guard windows,
///                            tokens seen per language, elapsed time
///
/// Under FSDP (set_fsdp) nothing is gathered: model.safetensors and
/// optimizer.safetensors give way to one shard-RRRRR-of-NNNNN.safetensors per
/// rank (its rows of every parameter and optimizer slot) plus shards.json,
/// and buffers.safetensors holds the router biases and the RNG (see
/// docs/parallel.md). Either kind loads into either kind of run.
///
/// Resume is exact on CPU: with the same thread count, resuming from step k
/// gives bitwise the losses and parameters of an uninterrupted run
/// (tests/train/test_trainer.cpp checks it with kill -9).

#include <ATen/core/Tensor.h>

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "rhine/core/json.h"
#include "rhine/data/batch.h"
#include "rhine/nn/model.h"
#include "rhine/optim/optimizer.h"
#include "rhine/optim/schedule.h"
#include "rhine/optim/skip_guard.h"
#include "rhine/torch/profile.h"
#include "rhine/train/evaluate.h"

namespace rhine::io {
class CheckpointWriter;
}
namespace rhine::dist {
class World;
class GradientSync;
class ShardedOptimizer;
class FSDP;
}

namespace rhine::train {

/// Options of Trainer (every field has a usable default except max_steps).
struct TrainerOptions {
  /// Optimizer steps to reach (a resumed run continues up to it).
  std::int64_t max_steps = 1000;
  /// Micro-batches (BatchSource::next() calls) per optimizer step.
  int grad_accum = 1;
  /// Global gradient-norm clip; 0 disables clipping (the norm is still logged).
  double grad_clip = 1.0;
  /// bf16 autocast for forward (CPU and CUDA); parameters and optimizer stay
  /// fp32. On a CPU without native bf16 (rhine::native_bf16) the Trainer runs
  /// fp32 instead and warns once, unless bf16_emulated; options() tells
  /// which precision it chose.
  bool bf16 = true;
  /// Keep bf16 autocast even where the CPU only emulates bf16 (correct, but
  /// its matmuls are far slower than fp32); tests use it to cover the bf16 path.
  bool bf16_emulated = false;
  /// Under bf16: cast each weight to bf16 once per optimizer step, reused by
  /// every micro-batch (rhine::AutocastStep), instead of once per micro-batch.
  /// false is the twin it is tested against. Not used with FSDP, whose
  /// gathers give the weights new storage (param_dtype bf16 gathers bf16).
  bool cast_once_per_step = true;
  /// With cast_once_per_step and AdamW: the optimizer writes each weight's
  /// bf16 copy in its update (AdamW::set_weight_copies) and the next step's
  /// forward uses it, so no weight is cast in the forward after the first
  /// step. false: the forward casts once per step (the twin it is tested
  /// against; bitwise equal).
  bool optimizer_writes_copies = true;
  /// z-loss weight (PaLM), passed to the model.
  double z_loss = 0.0;
  /// Per-document attention inside packed rows (uses Batch::position_ids).
  bool document_mask = true;

  /// Run directory: checkpoints/, metrics.jsonl, training.svg. "" = none of them.
  std::string out_dir;
  /// Checkpoint every N steps (0: only at the end and on SIGINT/SIGTERM).
  std::int64_t checkpoint_every = 0;
  /// Complete checkpoints kept (rotation); 0 keeps all.
  int keep_last = 3;
  /// Start from the newest complete checkpoint in out_dir/checkpoints when there is one.
  bool resume = true;
  /// On SIGINT/SIGTERM: finish the current step, checkpoint, return from fit()
  /// with `interrupted` set. A second signal during that save is ignored.
  bool checkpoint_on_signal = true;
  /// Where the parameters that need no gradient come from (e.g. a LoRA run's
  /// base model directory). Checkpoints hold only the trained parameters, the
  /// buffers and optimizer state; they record this and a fingerprint of the
  /// frozen values, and resuming checks the fingerprint.
  std::string frozen_source;
  /// Write a final checkpoint when fit() reaches max_steps.
  bool checkpoint_at_end = true;

  /// Evaluate the held-out set every N steps (0: only at start and end).
  std::int64_t eval_every = 0;
  /// Evaluate before the first step of a fresh run (the "before" numbers).
  bool eval_at_start = true;
  /// Held-out windows per forward pass (EvalOptions::batch_size). Under data
  /// parallelism the windows are split over the ranks.
  std::int64_t eval_batch_size = 8;

  /// Metrics line (JSONL) and log line every N steps.
  std::int64_t log_every = 10;
  /// The terminal progress line on stderr (redrawn in place on a TTY).
  bool progress = true;

  /// Skip-step guard (non-finite and spiking loss / grad norm).
  SkipGuardOptions skip;
  /// Stop with an error after this many consecutive steps with a non-finite
  /// loss or gradient norm (the last checkpoint stays intact; nothing is saved
  /// from the bad state). Outlier skips do not count: SkipGuard accepts an
  /// outlier after SkipGuardOptions::max_consecutive_outliers.
  std::int64_t max_consecutive_skips = 5;

  /// MoE aux-loss-free balancing: gamma of `b += gamma * sign(mean_load - load)`
  /// applied after every optimizer step with the step's expert counts summed
  /// over micro-batches and ranks (0: off; ignored for dense models).
  double router_bias_update_rate = 1e-3;
  /// MoE balance losses (nn::ForwardOptions): sequence-wise (V3 1e-4) and
  /// V2's expert-level (0.003) weights; 0 = off.
  double moe_seq_aux_alpha = 0.0;
  double moe_expert_aux_alpha = 0.0;
  /// Multi-token prediction loss weight lambda (models with MTP layers).
  double mtp_lambda = 0.3;

  /// Trace steps start .. start + steps - 1 with LibTorch's profiler into
  /// out_dir/profile/trace.rank<r>.json (a Chrome trace with Rhine's ranges,
  /// rhine/torch/profile.h); needs out_dir. steps 0: off.
  ProfileOptions profile;

  void validate() const;
};

/// What one optimizer step did (passed to callbacks; logged to metrics.jsonl).
struct StepMetrics {
  std::int64_t step = 0;        ///< 1-based: the number of optimizer steps taken after this one
  double loss = 0.0;            ///< total loss (ce + z + aux terms), token-weighted over micro-batches
  double ce_loss = 0.0;         ///< mean cross-entropy over counted tokens
  double aux_loss = 0.0;        ///< MoE balance losses (part of loss)
  double mtp_loss = 0.0;        ///< weighted MTP loss (part of loss)
  /// MoE balance: mean over MoE layers of max(expert load) / mean(expert load)
  /// this step (1 = perfectly balanced; 0 for dense models).
  double moe_imbalance = 0.0;
  double grad_norm = 0.0;       ///< global norm before clipping
  double lr = 0.0;              ///< learning-rate scale from the schedule (multiplies each group's lr)
  bool skipped = false;         ///< the guard refused the update
  std::string skip_reason;
  std::int64_t tokens = 0;      ///< input tokens of the step (all micro-batches, this rank)
  double tokens_per_second = 0.0;  ///< this step's
  double elapsed_seconds = 0.0;    ///< wall time of this run so far (resumed runs add up)
  std::map<std::string, std::int64_t> tokens_per_language;  ///< this step's
};

/// What fit() returns.
struct TrainResult {
  std::int64_t step = 0;            ///< steps done in total (resumed included)
  std::int64_t resumed_from = -1;   ///< checkpoint step resumed from, -1 for a fresh run
  bool interrupted = false;         ///< stopped by SIGINT/SIGTERM (checkpoint written)
  std::int64_t skipped_steps = 0;
  double seconds = 0.0;             ///< wall time of this fit() call
  std::int64_t tokens = 0;          ///< tokens trained on in this fit() call
  std::optional<EvalResult> first_eval, last_eval;
  std::map<std::string, std::int64_t> tokens_per_language;  ///< whole run
};

/// User hooks; every member may be empty.
struct Callbacks {
  /// Sees (and may change) each micro-batch before the forward: label masks
  /// for SFT, augmentation, tests that inject faults.
  std::function<void(Batch&)> on_batch;
  /// After every optimizer step (taken or skipped).
  std::function<void(const StepMetrics&)> on_step;
  /// After every evaluation.
  std::function<void(std::int64_t step, const EvalResult&)> on_eval;
  /// After a checkpoint was committed.
  std::function<void(const std::filesystem::path&)> on_checkpoint;
  /// Extra files of the user's own into each checkpoint (before commit).
  std::function<void(io::CheckpointWriter&)> save_extra;
  /// Reads them back on resume (the checkpoint directory).
  std::function<void(const std::filesystem::path&)> load_extra;
};

class Trainer {
 public:
  /// The trainer keeps references to `optimizer` and `loader` (a DataLoader,
  /// an SftLoader or your own BatchSource): they must outlive it. `model` is a
  /// shared holder.
  Trainer(nn::CausalLM model, Optimizer& optimizer, Schedule schedule, BatchSource& loader,
          TrainerOptions options);
  /// ZeRO-1: the optimizer state is sharded over the ranks
  /// (rhine/dist/sharded_optimizer.h). Call set_data_parallel() with the same
  /// World before fit(). Checkpoints stay one directory: at save time every
  /// rank's shard is collected on rank 0 into optimizer.safetensors (the
  /// same "<param>/<slot>" names as without sharding), and trainer.json keeps
  /// each rank's optimizer scalars; resume needs the same world size.
  Trainer(nn::CausalLM model, dist::ShardedOptimizer& optimizer, Schedule schedule, BatchSource& loader,
          TrainerOptions options);
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  /// Held-out data evaluated per language (nullptr: no evaluation). Not owned.
  void set_heldout(const HeldoutSet* heldout);
  /// Data-parallel training (rhine/dist/): `sync` averages gradients over
  /// `world` (both not owned, outliving the trainer). The caller builds the
  /// loader with the world's rank and size and broadcasts the parameters
  /// before fit(). Step losses, token counts and the stop-on-signal decision
  /// are reduced over ranks, so every rank takes the same steps; evaluation
  /// splits the held-out windows over the ranks; rank 0 alone
  /// prints, writes metrics.jsonl, the plot and checkpoints (the others wait
  /// at a barrier); every rank resumes from the same checkpoint directory
  /// (a shared filesystem).
  void set_data_parallel(dist::World* world, dist::GradientSync* sync);
  /// Fully sharded training (rhine/dist/fsdp.h): `fsdp` sharded the model
  /// over `world` and the optimizer steps fsdp->parameters() (both not owned).
  /// Gradients go through fsdp (no_sync, finish, clipping over shards), every
  /// rank evaluates (forwards are collective), and checkpoints are sharded:
  /// each rank writes its rows (parameters and optimizer state) into the
  /// checkpoint directory, rank 0 the rest (config.json, buffers.safetensors
  /// with the router biases and the RNG, trainer.json, shards.json). Resume
  /// reads this rank's rows whatever layout wrote the checkpoint: FSDP with
  /// any number of ranks, or a plain (one process, data parallel, ZeRO-1) one.
  void set_fsdp(dist::World* world, dist::FSDP* fsdp);
  Callbacks& callbacks() { return callbacks_; }

  /// Resumes when possible, then trains up to max_steps.
  TrainResult fit();

  /// Writes a checkpoint of the current state now (out_dir must be set).
  std::filesystem::path save_checkpoint();
  /// Restores a checkpoint directory written by save_checkpoint(). A sharded
  /// (FSDP) checkpoint also loads into an unsharded run, and a plain one into
  /// an FSDP run, with any number of ranks (the loader state is global).
  void load_checkpoint(const std::filesystem::path& dir);

  /// Optimizer steps taken so far.
  std::int64_t step() const { return step_; }
  const TrainerOptions& options() const { return o_; }

 private:
  Trainer(nn::CausalLM model, Optimizer* optimizer, dist::ShardedOptimizer* sharded, Schedule schedule,
          BatchSource& loader, TrainerOptions options);
  StepMetrics train_step();
  // The optimizer calls, plain or sharded.
  void optimizer_zero_grad();
  void optimizer_step(double lr_scale);
  std::vector<at::Tensor> trained_parameters() const;
  /// Collective under ZeRO-1: rank 0 gets every rank's state (tensors merged,
  /// meta {"zero1_shards": [...]}); the others get an empty state.
  OptimizerState gather_optimizer_state();
  std::filesystem::path save_sharded_checkpoint();
  void load_sharded_checkpoint(const std::filesystem::path& dir);
  /// trainer.json: step, `optimizer_meta`, loader position, skip guard, time, token counts.
  Json run_state_json(const Json& optimizer_meta) const;
  /// Restores what run_state_json wrote (all but the optimizer).
  void restore_run_state(const Json& state, const std::filesystem::path& dir);
  bool is_main() const;
  int world_size() const;
  /// Sums `values` over ranks in place (no-op for one process).
  void sum_over_ranks(std::vector<double>& values);
  void barrier();
  EvalResult run_eval();
  void log_step(const StepMetrics& m);
  void log_eval(const EvalResult& r);

  nn::CausalLM model_;
  Optimizer* optimizer_ = nullptr;             // exactly one of these two is set
  dist::ShardedOptimizer* sharded_ = nullptr;
  Schedule schedule_;
  BatchSource& loader_;
  TrainerOptions o_;
  Callbacks callbacks_;
  const HeldoutSet* heldout_ = nullptr;
  dist::World* world_ = nullptr;
  dist::GradientSync* sync_ = nullptr;
  dist::FSDP* fsdp_ = nullptr;
  SkipGuard guard_;

  Json frozen_fingerprint_;  // of the frozen parameters, computed at the first checkpoint save or load
  std::int64_t step_ = 0;
  std::int64_t consecutive_skips_ = 0;
  double elapsed_before_ = 0.0;  // seconds of earlier (resumed) runs
  double step_seconds_ = 0.0;    // time inside train_step() in this fit() (for the ETA)
  std::int64_t steps_this_run_ = 0;
  std::map<std::string, std::int64_t> tokens_per_language_;

  struct Files;
  std::unique_ptr<Files> files_;  // checkpoint manager, metrics file, progress line
};

/// Parameters and buffers of `model` under their HF names (what model.safetensors
/// holds). `frozen` = false leaves out the parameters that need no gradient
/// (a LoRA run's base): what a run checkpoint holds.
std::map<std::string, at::Tensor> model_state(const nn::CausalLM& model, bool frozen = true);
/// Copies `state` into the model's parameters and buffers. Missing or
/// unexpected names and shape mismatches are one error listing them.
/// `frozen` = false expects no parameter that needs no gradient.
void load_model_state(nn::CausalLM& model, const std::map<std::string, at::Tensor>& state, bool frozen = true);
/// Identifies the values of the parameters that need no gradient, so that a
/// checkpoint without them can check it resumes on the same base:
/// {"tensors", "elements", "l1", "l2"} (float64 norms over all of them).
/// Null when every parameter trains.
Json frozen_fingerprint(const nn::CausalLM& model);
/// True when two frozen_fingerprint values describe the same parameters
/// (norms equal to 1e-9 relative, which allows another summation order).
bool same_frozen_parameters(const Json& a, const Json& b);

}  // namespace rhine::train
