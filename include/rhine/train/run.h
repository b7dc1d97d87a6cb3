#pragma once
/// \file
/// A training run assembled from a config: what `rhine-train` and
/// `rhine-finetune` build, so that a program of your own gets the same run.
///
///   - RunOptions: the run keys of a config (schedule, batch, optimizer,
///     evaluation, checkpoints, the skip guard, data parallelism), read
///     strictly from JSON (an unknown key is an error naming it).
///   - make_optimizer: the optimizer of the "optimizer" block over parameter
///     groups, weight decay only on the matrices that should have it.
///   - start_process: the data-parallel world (torchrun/srun variables),
///     threads, seed and device.
///   - assemble_run: broadcast, FSDP or ZeRO-1 or plain data parallel, the
///     optimizer and the Trainer, wired together.
///
///     rhine::JsonFields f(config_json, "my-trainer");
///     rhine::train::RunOptions run;
///     run.read(f, "my-trainer");  // also reads "optimizer", "parallel", "skip_guard"
///     f.reject_unknown();
///     auto [world, runtime] = rhine::train::start_process(run);
///     ... build the model `lm` and a BatchSource `loader` ...
///     auto parts = rhine::train::assemble_run(run, world, lm, rhine::train::trainable_parameters(lm),
///                                             loader, run.trainer_options());
///     parts.trainer->fit();
///
/// The "optimizer" block (all keys optional; `lr` and `weight_decay` are the
/// run's top-level keys, which the schedule scales):
///
///     "optimizer": {"type": "adamw", "beta1": 0.9, "beta2": 0.95, "eps": 1e-8,
///                   "no_decay": ["*norm*", "*bias", "*embed*", "*mlp.gate.weight"]}
///     "optimizer": {"type": "muon", "momentum": 0.95, "nesterov": true, "ns_steps": 5,
///                   "scale": "match_adamw", "adamw": ["*embed*", "*lm_head*", "*norm*"]}
///     "optimizer": {"type": "ademamix", "beta3": 0.9999, "alpha": 8, "alpha_warmup": 1000, ...}
///     "optimizer": {"type": "lion", "beta1": 0.9, "beta2": 0.99}
///
/// Weight decay goes to the "decay" group only: parameters of two or more
/// dimensions not matched by a `no_decay` glob (ParamGroupRules; by default
/// norms, biases, embeddings and the MoE router, "*mlp.gate.weight", go
/// without). Muon (as Moonlight does) orthogonalises the matrices and steps
/// the rest, and the matrices matched by its `adamw` globs, with AdamW.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "rhine/core/json.h"
#include "rhine/data/loader.h"
#include "rhine/dist/world.h"
#include "rhine/nn/model.h"
#include "rhine/optim/ademamix.h"
#include "rhine/optim/adamw.h"
#include "rhine/optim/lion.h"
#include "rhine/optim/muon.h"
#include "rhine/optim/optimizer.h"
#include "rhine/optim/schedule.h"
#include "rhine/optim/skip_guard.h"
#include "rhine/torch/runtime.h"
#include "rhine/train/trainer.h"

namespace rhine {
class Tokenizer;
}
namespace rhine::dist {
class FSDP;
class GradientSync;
class ShardedOptimizer;
}  // namespace rhine::dist

namespace rhine::train {

/// The "optimizer" block: which optimizer, its options, and its groups.
struct OptimizerChoice {
  /// "adamw", "muon", "ademamix" or "lion".
  std::string type = "adamw";
  /// The options of `type` (only that one is used). lr and weight_decay are
  /// set from RunOptions by make_optimizer. AdamW's beta2 defaults to 0.95
  /// here (LLM practice), not torch's 0.999.
  AdamWOptions adamw = [] {
    AdamWOptions o;
    o.beta2 = 0.95;
    return o;
  }();
  MuonOptions muon;
  AdEMAMixOptions ademamix;
  LionOptions lion;
  /// Which parameters get no weight decay (every type).
  ParamGroupRules decay;
  /// Muon: the matrices left to AdamW (MuonGroupRules::adamw).
  std::vector<std::string> muon_adamw = MuonGroupRules{}.adamw;

  /// Reads the block (strict: a key the type does not have is an error).
  static OptimizerChoice from_json(const Json& j, const std::string& component);
  /// "adamw (beta2 0.95), weight decay 0.1 on 24 of 41 tensors" and the like.
  std::string describe(const NamedParameters& params, double weight_decay) const;
};

/// The run keys of a config; the current values are the defaults a program
/// sets before read() (rhine-finetune: a small lr and no weight decay).
struct RunOptions {
  std::string out_dir;
  std::int64_t seq_len = 256, batch_size = 16, grad_accum = 1, steps = 300, warmup = 30;
  /// Peak learning rate of every group (the schedule multiplies it) and the
  /// weight decay of the "decay" group.
  double lr = 3e-3, min_lr_ratio = 0.1, weight_decay = 0.1, grad_clip = 1.0;
  std::uint64_t seed = 1;
  std::int64_t eval_tokens = 20000, eval_every = 0, checkpoint_every = 0, keep_last = 2, log_every = 10;
  std::int64_t sample_tokens = 40;
  bool bf16 = true, resume = true, fused_kernels = true;
  /// "bf16": "always": keep bf16 autocast on CPUs that only emulate bf16
  /// (TrainerOptions::bf16_emulated); "bf16": true leaves such CPUs in fp32.
  bool bf16_emulated = false;
  /// Recompute each block in backward (nn::CausalLMOptions::activation_checkpointing):
  /// the program building the model applies it.
  bool activation_checkpointing = false;
  /// TrainerOptions of the same names.
  double z_loss = 0.0, router_bias_update_rate = 1e-3, moe_seq_aux_alpha = 0.0, mtp_lambda = 0.3;
  /// The "optimizer" block.
  OptimizerChoice optimizer;
  /// The "skip_guard" block (SkipGuardOptions' field names).
  SkipGuardOptions skip_guard;
  /// Data parallel: shard the optimizer state over the ranks (ZeRO-1).
  bool zero1 = false;
  /// The "parallel" block: how the ranks share the model (rhine/dist/fsdp.h).
  ///   {"zero": 3, "fsdp": 4, "reshard_after_forward": true, "param_dtype": "float32", "prefetch": true}
  /// zero 0: plain data parallel; 1: ZeRO-1 (as "zero1": true); 2: FSDP with
  /// replicated parameters; 3: FSDP (parameters, gradients and optimizer
  /// state sharded). "fsdp": the ranks one copy of the model is sharded
  /// over, the world size by default; fewer (dividing it) is hybrid
  /// sharding, world/fsdp copies (FSDPOptions::shard_size). Giving it makes
  /// zero default to 3. "ep": expert parallelism, dividing the fsdp size
  /// (the routed experts partitioned over groups of ep ranks, and each
  /// group's experts sharded over the fsdp/ep ranks in the same place of the
  /// other groups, rhine/dist/expert_parallel.h); ep > 1 needs zero 2 or 3
  /// and makes zero default to 3.
  struct Parallel {
    int zero = 0;
    int fsdp = 0;  ///< 0: not given
    int ep = 1;
    bool reshard_after_forward = true, prefetch = true;
    std::string param_dtype = "float32";
  } parallel;
  /// Intra-op threads (0: LibTorch's default).
  int threads = 0;
  /// The "profile" block: {"start": N, "steps": K} traces steps N..N+K-1 into
  /// out_dir/profile/ (TrainerOptions::profile).
  ProfileOptions profile;

  /// Reads the keys above that `f` holds, checks them, and marks them read
  /// (the caller reads its own keys and then calls f.reject_unknown()).
  void read(JsonFields& f, const std::string& component);
  /// The Trainer's options for these keys.
  TrainerOptions trainer_options() const;
  /// Linear warm-up over `warmup` steps, then cosine to min_lr_ratio at `steps`.
  Schedule schedule() const;
  /// How the run shares the model, for the log ("", "; optimizer state sharded (ZeRO-1)", ...).
  std::string describe_parallel(const dist::World& world) const;
};

/// The optimizer of `run.optimizer` over `params` (lr and weight decay from
/// the run), in groups as the file comment says.
std::unique_ptr<Optimizer> make_optimizer(const RunOptions& run, const NamedParameters& params);

/// The parameters of `lm` that require a gradient, under their names.
NamedParameters trainable_parameters(const nn::CausalLM& lm);

/// Shard-loader options for this run on this rank (BOS/EOS from the tokenizer).
DataLoaderOptions loader_options(const RunOptions& run, std::vector<std::string> shards, const dist::World& world,
                                 const Tokenizer& tok);

/// The process: the data-parallel world (one process when no torchrun/srun
/// variables are set), threads, seed and device (a CUDA device per local
/// rank under NCCL).
struct Process {
  dist::World world;
  RuntimeInfo runtime;
};
Process start_process(const RunOptions& run);

/// The optimizer, gradient sync and Trainer of a run (kept together: the
/// Trainer refers to the others).
struct TrainingRun {
  TrainingRun();
  TrainingRun(TrainingRun&&) noexcept;
  TrainingRun& operator=(TrainingRun&&) noexcept;
  ~TrainingRun();

  std::unique_ptr<dist::FSDP> fsdp;                 ///< parallel.zero 2 or 3
  std::unique_ptr<Optimizer> optimizer;             ///< one of these two
  std::unique_ptr<dist::ShardedOptimizer> sharded;  ///< (zero1 with several ranks)
  std::unique_ptr<dist::GradientSync> sync;
  std::unique_ptr<Trainer> trainer;
};

/// Broadcasts rank 0's weights, then builds: under parallel.zero 2/3 the FSDP
/// and the optimizer over its shards (Muon through FSDP::muon_shards);
/// otherwise the optimizer over `params` (ZeRO-1 sharded when zero1 and
/// several ranks) and the gradient sync; then the Trainer.
/// `import_dir` (FSDP only): an HF directory or checkpoint each rank reads its
/// rows of after sharding (parameters, and the buffers it holds). Under FSDP
/// the model may be built with CausalLMOptions::defer_init: its rows are
/// then read from `import_dir` (streaming import) or, without one, drawn by
/// FSDP::initialize (streaming construction).
TrainingRun assemble_run(const RunOptions& run, dist::World& world, const nn::CausalLM& lm,
                         const NamedParameters& params, BatchSource& source, const TrainerOptions& options,
                         const std::string& import_dir = {});

}  // namespace rhine::train
