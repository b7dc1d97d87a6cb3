#pragma once
// What rhine-train and rhine-finetune share: the config keys of a training run
// (schedule, batch, evaluation, checkpoints), the process setup (threads,
// seed, data-parallel world from torchrun/srun variables) and the
// TrainerOptions, AdamW (optionally ZeRO-1 sharded) and Trainer those keys describe. Each program reads its own
// keys (model, data) and then RunConfig::read for the rest.
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "rhine/core/error.h"
#include "rhine/core/json.h"
#include "rhine/data/loader.h"
#include "rhine/dist/fsdp.h"
#include "rhine/dist/grad_sync.h"
#include "rhine/dist/sharded_optimizer.h"
#include "rhine/dist/world.h"
#include "rhine/optim/adamw.h"
#include "rhine/optim/schedule.h"
#include "rhine/tokenizer/tokenizer.h"
#include "rhine/torch/runtime.h"
#include "rhine/train/trainer.h"

namespace rhine::examples {

struct RunConfig {
  std::string out_dir;
  std::int64_t seq_len = 256, batch_size = 16, grad_accum = 1, steps = 300, warmup = 30;
  double lr = 3e-3, min_lr_ratio = 0.1, weight_decay = 0.1, grad_clip = 1.0;
  std::uint64_t seed = 1;
  std::int64_t eval_tokens = 20000, eval_every = 0, checkpoint_every = 0, keep_last = 2, log_every = 10;
  std::int64_t sample_tokens = 40;
  bool bf16 = true, resume = true, fused_kernels = true;
  /// Data parallel: shard AdamW's state over the ranks (ZeRO-1).
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
  int threads = 0;

  /// Reads the keys above that `f` holds (the current values are the defaults).
  void read(JsonFields& f, const char* component) {
    out_dir = f.get("out_dir", out_dir);
    seq_len = f.get("seq_len", seq_len);
    batch_size = f.get("batch_size", batch_size);
    grad_accum = f.get("grad_accum", grad_accum);
    steps = f.get("steps", steps);
    warmup = f.get("warmup", warmup);
    lr = f.get("lr", lr);
    min_lr_ratio = f.get("min_lr_ratio", min_lr_ratio);
    weight_decay = f.get("weight_decay", weight_decay);
    grad_clip = f.get("grad_clip", grad_clip);
    seed = f.get("seed", seed);
    eval_tokens = f.get("eval_tokens", eval_tokens);
    eval_every = f.get("eval_every", eval_every);
    checkpoint_every = f.get("checkpoint_every", checkpoint_every);
    keep_last = f.get("keep_last", keep_last);
    log_every = f.get("log_every", log_every);
    sample_tokens = f.get("sample_tokens", sample_tokens);
    bf16 = f.get("bf16", bf16);
    resume = f.get("resume", resume);
    fused_kernels = f.get("fused_kernels", fused_kernels);
    threads = f.get("threads", threads);
    zero1 = f.get("zero1", zero1);
    if (const Json* p = f.raw("parallel")) {
      JsonFields pf(*p, std::string(component) + " parallel");
      parallel.fsdp = pf.get("fsdp", parallel.fsdp);
      parallel.ep = pf.get("ep", parallel.ep);
      parallel.zero = pf.get("zero", parallel.fsdp > 0 || parallel.ep > 1 ? 3 : parallel.zero);
      parallel.reshard_after_forward = pf.get("reshard_after_forward", parallel.reshard_after_forward);
      parallel.prefetch = pf.get("prefetch", parallel.prefetch);
      parallel.param_dtype = pf.get("param_dtype", parallel.param_dtype);
      pf.reject_unknown();
    }
    RHINE_CHECK(parallel.zero >= 0 && parallel.zero <= 3, component, "parallel.zero must be 0, 1, 2 or 3, got",
                parallel.zero, "0 data parallel, 1 optimizer state sharded, 2 + gradients, 3 + parameters (FSDP)");
    RHINE_CHECK(!(zero1 && parallel.zero > 1), component, "\"zero1\": true contradicts parallel.zero",
                parallel.zero, "drop \"zero1\" and keep the parallel block");
    if (zero1) parallel.zero = std::max(parallel.zero, 1);
    zero1 = parallel.zero == 1;
    RHINE_CHECK(parallel.ep >= 1 && (parallel.ep == 1 || parallel.zero >= 2), component,
                "parallel.ep > 1 (expert parallelism) needs parallel.zero 2 or 3, got",
                fmt::format("ep {} with zero {}", parallel.ep, parallel.zero),
                "expert parallelism runs under FSDP: set \"zero\": 3 (or 2), or leave ep out");
    RHINE_CHECK(parallel.param_dtype == "float32" || parallel.param_dtype == "bfloat16", component,
                "parallel.param_dtype must be \"float32\" or \"bfloat16\", got", parallel.param_dtype, "");
    RHINE_CHECK(steps > warmup && warmup >= 0, component, "steps must exceed warmup",
                (std::vector<std::int64_t>{steps, warmup}), "");
  }

  /// The Trainer's options for these keys.
  train::TrainerOptions trainer_options() const {
    train::TrainerOptions to;
    to.max_steps = steps;
    to.grad_accum = static_cast<int>(grad_accum);
    to.grad_clip = grad_clip;
    to.bf16 = bf16;
    to.out_dir = out_dir;
    to.resume = resume;
    to.eval_every = eval_every;
    to.checkpoint_every = checkpoint_every;
    to.keep_last = static_cast<int>(keep_last);
    to.log_every = log_every;
    return to;
  }

  /// AdamW (beta2 0.95) over `params` and a linear-warmup cosine schedule to min_lr_ratio.
  AdamWOptions adamw_options() const {
    AdamWOptions ao;
    ao.lr = lr;
    ao.beta2 = 0.95;
    ao.weight_decay = weight_decay;
    return ao;
  }
  Schedule schedule() const { return warmup_cosine(warmup, steps, 1.0, min_lr_ratio); }
};

/// How the run shares the model, for the log ("", "; optimizer state sharded (ZeRO-1)", ...).
inline std::string describe_parallel(const RunConfig& run, const dist::World& world) {
  const int ep_sharded = (run.parallel.fsdp > 0 ? run.parallel.fsdp : world.world_size()) / run.parallel.ep;
  if (run.parallel.zero >= 2)
    return fmt::format("; FSDP ZeRO-{} over {} rank(s){}{}, gathers in {}{}", run.parallel.zero,
                       run.parallel.fsdp > 0 ? run.parallel.fsdp : world.world_size(),
                       run.parallel.fsdp > 0 && run.parallel.fsdp < world.world_size()
                           ? fmt::format(" x {} copies (hybrid)", world.world_size() / run.parallel.fsdp)
                           : "",
                       run.parallel.zero == 3 && !run.parallel.reshard_after_forward ? " (kept after forward)" : "",
                       run.parallel.param_dtype,
                       run.parallel.ep > 1
                           ? fmt::format(", routed experts over {} ranks (EP){}", run.parallel.ep,
                                         ep_sharded > 1 ? fmt::format(", each EP rank's sharded over {} (EDP)", ep_sharded)
                                                        : "")
                           : "");
  return run.zero1 && world.world_size() > 1 ? "; optimizer state sharded (ZeRO-1)" : "";
}

/// Shard-loader options for this run on this rank (BOS/EOS from the tokenizer).
inline DataLoaderOptions loader_options(const RunConfig& run, std::vector<std::string> shards,
                                        const dist::World& world, const Tokenizer& tok) {
  DataLoaderOptions lo;
  lo.shards = std::move(shards);
  lo.batch_size = run.batch_size;
  lo.seq_len = run.seq_len;
  lo.seed = run.seed;
  lo.rank = world.rank();
  lo.world_size = world.world_size();
  if (tok.bos_id() >= 0) lo.bos_id = tok.bos_id();
  if (tok.eos_id() >= 0) lo.eos_id = tok.eos_id();
  return lo;
}

/// The optimizer, gradient sync and Trainer of a run (kept together: the
/// Trainer refers to the others).
struct TrainerParts {
  std::unique_ptr<dist::FSDP> fsdp;                 // parallel.zero 2 or 3
  std::unique_ptr<AdamW> adamw;                     // one of these two
  std::unique_ptr<dist::ShardedOptimizer> sharded;  // (RunConfig::zero1 with several ranks)
  std::unique_ptr<dist::GradientSync> sync;
  std::unique_ptr<train::Trainer> trainer;
};

/// Broadcasts rank 0's weights, then builds: under parallel.zero 2/3 the FSDP
/// and AdamW over its shards; otherwise AdamW over `params` (sharded when
/// zero1 and several ranks) and the gradient sync; then the Trainer.
/// `import_dir` (FSDP only): an HF directory or checkpoint each rank reads its
/// rows of after sharding (parameters, and the buffers it holds). Under FSDP
/// the model may be built with CausalLMOptions::defer_init: its rows are
/// then read from `import_dir` (streaming import) or, without one, drawn by
/// FSDP::initialize (streaming construction).
inline TrainerParts make_trainer(const RunConfig& run, dist::World& world, const nn::CausalLM& lm,
                                 const NamedParameters& params, BatchSource& source, const train::TrainerOptions& to,
                                 const std::string& import_dir = {}) {
  TrainerParts t;
  RHINE_CHECK(import_dir.empty() || run.parallel.zero >= 2, "run", "a sharded import needs FSDP, got parallel.zero",
              run.parallel.zero, "load the model whole (io::load_hf_model) without FSDP");
  RHINE_CHECK(!lm->options.defer_init || run.parallel.zero >= 2, "run",
              "a model built with defer_init is only materialised by FSDP, got parallel.zero", run.parallel.zero,
              "build it without defer_init");
  if (!lm->options.defer_init) dist::broadcast_parameters(world, lm->parameters());  // all ranks start equal
  if (run.parallel.zero >= 2) {
    const int shard = run.parallel.fsdp > 0 ? run.parallel.fsdp : world.world_size();
    RHINE_CHECK(world.world_size() % shard == 0, "run", "parallel.fsdp must divide the number of ranks, got",
                run.parallel.fsdp, "WORLD_SIZE is " + std::to_string(world.world_size()) +
                                       "; fsdp ranks share one copy of the model, WORLD_SIZE / fsdp copies");
    RHINE_CHECK(shard % run.parallel.ep == 0, "run",
                "parallel.ep must divide the fsdp size (the ranks of one copy), got", run.parallel.ep,
                "fsdp is " + std::to_string(shard) + " (WORLD_SIZE " + std::to_string(world.world_size()) + ")");
    dist::FSDPOptions fo;
    fo.shard_size = shard;
    fo.expert_parallel = run.parallel.ep;
    fo.zero_stage = run.parallel.zero;
    fo.reshard_after_forward = run.parallel.reshard_after_forward;
    fo.prefetch = run.parallel.prefetch;
    fo.param_dtype = run.parallel.param_dtype == "bfloat16" ? c10::kBFloat16 : c10::kFloat;
    t.fsdp = std::make_unique<dist::FSDP>(world, lm, fo);
    if (lm->options.defer_init && import_dir.empty()) t.fsdp->initialize();  // from scratch: this rank's rows
    if (!import_dir.empty()) {  // each rank reads its rows only
      const auto reader = io::RowReader::open(import_dir);
      t.fsdp->load_parameters(reader);
      at::NoGradGuard no_grad;
      nn::CausalLM model = lm;  // (a handle: the same model)
      for (auto& [name, b] : model->state_buffers())
        if (reader.contains(name)) b.copy_(reader.whole(name));
    }
    t.adamw = std::make_unique<AdamW>(t.fsdp->parameters(), run.adamw_options());
    t.trainer = std::make_unique<train::Trainer>(lm, *t.adamw, run.schedule(), source, to);
    t.trainer->set_fsdp(&world, t.fsdp.get());
    return t;
  }
  t.sync = std::make_unique<dist::GradientSync>(world, params);
  if (run.zero1 && world.world_size() > 1) {
    const auto ao = run.adamw_options();
    t.sharded = std::make_unique<dist::ShardedOptimizer>(
        world, params, [ao](const NamedParameters& shard) { return std::make_unique<AdamW>(shard, ao); });
    t.trainer = std::make_unique<train::Trainer>(lm, *t.sharded, run.schedule(), source, to);
  } else {
    t.adamw = std::make_unique<AdamW>(params, run.adamw_options());
    t.trainer = std::make_unique<train::Trainer>(lm, *t.adamw, run.schedule(), source, to);
  }
  if (world.world_size() > 1) t.trainer->set_data_parallel(&world, t.sync.get());
  return t;
}

/// The process: the data-parallel world (one process when no torchrun/srun
/// variables are set), then threads, seed and device (a CUDA device per local
/// rank under NCCL).
struct Process {
  dist::World world;
  RuntimeInfo runtime;
};

inline Process start_process(const RunConfig& c) {
  RuntimeOptions ro;
  ro.threads = c.threads;
  ro.seed = c.seed;
  Process p{dist::init_from_env(), {}};
  if (p.world.world_size() > 1 && ro.device == "auto")
    ro.device = p.world.backend() == "nccl" ? "cuda:" + std::to_string(p.world.local_rank()) : "cpu";
  p.runtime = init_runtime(ro);
  if (p.world.is_main())
    spdlog::info("{}; {} rank(s), backend {}", p.runtime.describe(), p.world.world_size(), p.world.backend());
  return p;
}

}  // namespace rhine::examples
