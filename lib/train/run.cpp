#include "rhine/train/run.h"

#include <ATen/core/grad_mode.h>
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>

#include "rhine/core/error.h"
#include "rhine/dist/fsdp.h"
#include "rhine/dist/grad_sync.h"
#include "rhine/dist/sharded_optimizer.h"
#include "rhine/io/row_shards.h"
#include "rhine/tokenizer/tokenizer.h"

namespace rhine::train {

namespace {

/// `defaults` (an options struct's to_json) with the block's keys laid over it.
Json overlay(Json defaults, const Json& block) {
  for (const auto& [key, value] : block.items())
    if (key != "type" && key != "no_decay" && key != "adamw") defaults[key] = value;
  return defaults;
}

}  // namespace

OptimizerChoice OptimizerChoice::from_json(const Json& j, const std::string& component) {
  const std::string c = component + " optimizer";
  RHINE_CHECK(j.is_object(), c, "the \"optimizer\" block must be an object, got", j.dump(),
              R"(e.g. {"type": "adamw", "beta2": 0.95})");
  OptimizerChoice o;
  o.type = j.value("type", o.type);
  RHINE_CHECK(o.type == "adamw" || o.type == "muon" || o.type == "ademamix" || o.type == "lion", c,
              "unknown optimizer type", o.type, "use \"adamw\", \"muon\", \"ademamix\" or \"lion\"");
  for (const char* key : {"lr", "weight_decay"})
    RHINE_CHECK(!j.contains(key), c, fmt::format("\"{}\" belongs to the run, not to the optimizer block", key),
                j.at(key).dump(), fmt::format("set the top-level \"{}\" (the schedule scales lr)", key));
  if (j.contains("no_decay")) {
    RHINE_CHECK(j.at("no_decay").is_array(), c, "\"no_decay\" must be a list of globs, got", j.at("no_decay").dump(),
                R"(e.g. ["*norm*", "*bias", "*embed*"])");
    o.decay.no_decay = j.at("no_decay").get<std::vector<std::string>>();
  }
  if (j.contains("adamw")) {
    RHINE_CHECK(o.type == "muon", c, "\"adamw\" (the matrices Muon leaves to AdamW) is a Muon key; type is",
                o.type, "remove it or set \"type\": \"muon\"");
    RHINE_CHECK(j.at("adamw").is_array(), c, "\"adamw\" must be a list of globs, got", j.at("adamw").dump(),
                R"(e.g. ["*embed*", "*lm_head*", "*norm*"])");
    o.muon_adamw = j.at("adamw").get<std::vector<std::string>>();
  }
  try {
    if (o.type == "adamw") o.adamw = AdamWOptions::from_json(overlay(o.adamw.to_json(), j));
    if (o.type == "muon") o.muon = MuonOptions::from_json(overlay(o.muon.to_json(), j));
    if (o.type == "ademamix") o.ademamix = AdEMAMixOptions::from_json(overlay(o.ademamix.to_json(), j));
    if (o.type == "lion") o.lion = LionOptions::from_json(overlay(o.lion.to_json(), j));
  } catch (const Error& e) {
    RHINE_FAIL(c, std::string("invalid options for ") + o.type, e.what(),
               "see include/rhine/optim/" + o.type + ".h for its options");
  }
  return o;
}

std::string OptimizerChoice::describe(const NamedParameters& params, double weight_decay) const {
  const auto split = split_by_decay(params, decay);
  std::string what = type;
  if (type == "adamw") what = fmt::format("adamw (beta1 {}, beta2 {})", adamw.beta1, adamw.beta2);
  if (type == "muon") {
    MuonGroupRules rules;
    rules.adamw = muon_adamw;
    std::size_t n = 0;
    for (const auto& g : muon_groups(params, muon, rules))
      if (g.options.use_muon) n = g.params.size();
    what = fmt::format("muon on {} matrices (momentum {}), adamw on the rest", n, muon.momentum);
  }
  if (type == "ademamix") what = fmt::format("ademamix (beta3 {}, alpha {})", ademamix.beta3, ademamix.alpha);
  if (type == "lion") what = fmt::format("lion (beta1 {}, beta2 {})", lion.beta1, lion.beta2);
  return fmt::format("{}, weight decay {} on {} of {} tensors", what, weight_decay, split.decay.size(), params.size());
}

void RunOptions::read(JsonFields& f, const std::string& component) {
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
  if (const Json* b = f.raw("bf16"); b && !b->is_null()) {
    // true: bf16 autocast where the device computes bf16 natively (fp32 with
    // a warning elsewhere); "always": also where the CPU only emulates it.
    RHINE_CHECK(b->is_boolean() || (b->is_string() && b->get<std::string>() == "always"), component,
                "\"bf16\" must be true, false or \"always\", got", b->dump(),
                "true uses bf16 autocast where the hardware has bf16; \"always\" also on CPUs that emulate it");
    bf16 = b->is_string() || b->get<bool>();
    bf16_emulated = b->is_string();
  }
  resume = f.get("resume", resume);
  fused_kernels = f.get("fused_kernels", fused_kernels);
  activation_checkpointing = f.get("activation_checkpointing", activation_checkpointing);
  threads = f.get("threads", threads);
  z_loss = f.get("z_loss", z_loss);
  router_bias_update_rate = f.get("router_bias_update_rate", router_bias_update_rate);
  moe_seq_aux_alpha = f.get("moe_seq_aux_alpha", moe_seq_aux_alpha);
  mtp_lambda = f.get("mtp_lambda", mtp_lambda);
  zero1 = f.get("zero1", zero1);
  if (const Json* o = f.raw("optimizer")) optimizer = OptimizerChoice::from_json(*o, component);
  if (const Json* s = f.raw("skip_guard")) skip_guard = SkipGuardOptions::from_json(*s, component + " skip_guard");
  if (const Json* p = f.raw("profile")) profile = ProfileOptions::from_json(*p, component + " profile");
  if (const Json* p = f.raw("parallel")) {
    JsonFields pf(*p, component + " parallel");
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
  RHINE_CHECK(!(zero1 && parallel.zero > 1), component, "\"zero1\": true contradicts parallel.zero", parallel.zero,
              "drop \"zero1\" and keep the parallel block");
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
  RHINE_CHECK(lr >= 0 && weight_decay >= 0, component, "lr and weight_decay must be >= 0",
              (std::vector<double>{lr, weight_decay}), "");
}

TrainerOptions RunOptions::trainer_options() const {
  TrainerOptions to;
  to.max_steps = steps;
  to.grad_accum = static_cast<int>(grad_accum);
  to.grad_clip = grad_clip;
  to.bf16 = bf16;
  to.bf16_emulated = bf16_emulated;
  to.out_dir = out_dir;
  to.resume = resume;
  to.eval_every = eval_every;
  // An evaluation pass holds no more windows than a training micro-batch has
  // rows (same length): with a large vocabulary the logits of a pass are the
  // largest tensor, and evaluation should not need more memory than a step.
  to.eval_batch_size = std::min<std::int64_t>(to.eval_batch_size, batch_size);
  to.checkpoint_every = checkpoint_every;
  to.keep_last = static_cast<int>(keep_last);
  to.log_every = log_every;
  to.z_loss = z_loss;
  to.router_bias_update_rate = router_bias_update_rate;
  to.moe_seq_aux_alpha = moe_seq_aux_alpha;
  to.mtp_lambda = mtp_lambda;
  to.skip = skip_guard;
  to.profile = profile;
  return to;
}

Schedule RunOptions::schedule() const { return warmup_cosine(warmup, steps, 1.0, min_lr_ratio); }

std::string RunOptions::describe_parallel(const dist::World& world) const {
  const int fsdp_size = parallel.fsdp > 0 ? parallel.fsdp : world.world_size();
  if (parallel.zero >= 2) {
    const int ep_sharded = fsdp_size / parallel.ep;
    return fmt::format(
        "; FSDP ZeRO-{} over {} rank(s){}{}, gathers in {}{}", parallel.zero, fsdp_size,
        parallel.fsdp > 0 && parallel.fsdp < world.world_size()
            ? fmt::format(" x {} copies (hybrid)", world.world_size() / parallel.fsdp)
            : "",
        parallel.zero == 3 && !parallel.reshard_after_forward ? " (kept after forward)" : "", parallel.param_dtype,
        parallel.ep > 1 ? fmt::format(", routed experts over {} ranks (EP){}", parallel.ep,
                                      ep_sharded > 1 ? fmt::format(", each EP rank's sharded over {} (EDP)", ep_sharded)
                                                     : "")
                        : "");
  }
  return zero1 && world.world_size() > 1 ? "; optimizer state sharded (ZeRO-1)" : "";
}

std::unique_ptr<Optimizer> make_optimizer(const RunOptions& run, const NamedParameters& params) {
  const auto& c = run.optimizer;
  if (c.type == "muon") {
    MuonOptions o = c.muon;
    o.lr = run.lr, o.weight_decay = run.weight_decay;
    MuonGroupRules rules;
    rules.adamw = c.muon_adamw;
    rules.decay = c.decay;
    return std::make_unique<Muon>(muon_groups(params, o, rules));
  }
  if (c.type == "ademamix") {
    AdEMAMixOptions o = c.ademamix;
    o.lr = run.lr, o.weight_decay = run.weight_decay;
    return std::make_unique<AdEMAMix>(decay_groups(params, o, c.decay));
  }
  if (c.type == "lion") {
    LionOptions o = c.lion;
    o.lr = run.lr, o.weight_decay = run.weight_decay;
    return std::make_unique<Lion>(decay_groups(params, o, c.decay));
  }
  RHINE_CHECK(c.type == "adamw", "run", "unknown optimizer type", c.type, "use adamw, muon, ademamix or lion");
  AdamWOptions o = c.adamw;
  o.lr = run.lr, o.weight_decay = run.weight_decay;
  return std::make_unique<AdamW>(decay_groups(params, o, c.decay));
}

NamedParameters trainable_parameters(const nn::CausalLM& lm) {
  NamedParameters params;
  for (const auto& p : lm->named_parameters())
    if (p.value().requires_grad()) params.push_back({p.key(), p.value()});
  return params;
}

DataLoaderOptions loader_options(const RunOptions& run, std::vector<std::string> shards, const dist::World& world,
                                 const Tokenizer& tok) {
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

Process start_process(const RunOptions& run) {
  RuntimeOptions ro;
  ro.threads = run.threads;
  ro.seed = run.seed;
  Process p{dist::init_from_env(), {}};
  if (p.world.world_size() > 1 && ro.device == "auto")
    ro.device = p.world.backend() == "nccl" ? "cuda:" + std::to_string(p.world.local_rank()) : "cpu";
  p.runtime = init_runtime(ro);
  if (p.world.is_main())
    spdlog::info("{}; {} rank(s), backend {}", p.runtime.describe(), p.world.world_size(), p.world.backend());
  return p;
}

TrainingRun::TrainingRun() = default;
TrainingRun::TrainingRun(TrainingRun&&) noexcept = default;
TrainingRun& TrainingRun::operator=(TrainingRun&&) noexcept = default;
TrainingRun::~TrainingRun() {
  trainer.reset();  // it refers to the others
}

TrainingRun assemble_run(const RunOptions& run, dist::World& world, const nn::CausalLM& lm,
                         const NamedParameters& params, BatchSource& source, const TrainerOptions& options,
                         const std::string& import_dir) {
  TrainingRun t;
  RHINE_CHECK(import_dir.empty() || run.parallel.zero >= 2, "run", "a sharded import needs FSDP, got parallel.zero",
              run.parallel.zero, "load the model whole (io::load_hf_model) without FSDP");
  RHINE_CHECK(!lm->options.defer_init || run.parallel.zero >= 2, "run",
              "a model built with defer_init is only materialised by FSDP, got parallel.zero", run.parallel.zero,
              "build it without defer_init");
  if (!lm->options.defer_init) dist::broadcast_parameters(world, lm->parameters());  // all ranks start equal
  if (run.parallel.zero >= 2) {
    const int shard = run.parallel.fsdp > 0 ? run.parallel.fsdp : world.world_size();
    RHINE_CHECK(world.world_size() % shard == 0, "run", "parallel.fsdp must divide the number of ranks, got",
                run.parallel.fsdp,
                fmt::format("WORLD_SIZE is {}; fsdp ranks share one copy of the model, WORLD_SIZE / fsdp copies",
                            world.world_size()));
    RHINE_CHECK(shard % run.parallel.ep == 0, "run", "parallel.ep must divide the fsdp size (the ranks of one copy), got",
                run.parallel.ep, fmt::format("fsdp is {} (WORLD_SIZE {})", shard, world.world_size()));
    dist::FSDPOptions fo;
    fo.shard_size = shard;
    fo.expert_parallel = run.parallel.ep;
    fo.zero_stage = run.parallel.zero;
    fo.reshard_after_forward = run.parallel.reshard_after_forward;
    fo.prefetch = run.parallel.prefetch;
    fo.param_dtype = run.parallel.param_dtype == "bfloat16" ? c10::kBFloat16 : c10::kFloat;
    t.fsdp = std::make_unique<dist::FSDP>(world, lm, fo);
    if (lm->options.defer_init && import_dir.empty()) t.fsdp->initialize();  // from scratch: this rank's rows
    if (!import_dir.empty()) {                                                // each rank reads its rows only
      const auto reader = io::RowReader::open(import_dir);
      t.fsdp->load_parameters(reader);
      at::NoGradGuard no_grad;
      nn::CausalLM model = lm;  // (a handle: the same model)
      for (auto& [name, b] : model->state_buffers())
        if (reader.contains(name)) b.copy_(reader.whole(name));
    }
    t.optimizer = make_optimizer(run, t.fsdp->parameters());
    if (auto* muon = dynamic_cast<Muon*>(t.optimizer.get())) muon->set_shards(t.fsdp->muon_shards());
    dist::FSDP::check_optimizer(*t.optimizer);
    t.trainer = std::make_unique<Trainer>(lm, *t.optimizer, run.schedule(), source, options);
    t.trainer->set_fsdp(&world, t.fsdp.get());
    return t;
  }
  t.sync = std::make_unique<dist::GradientSync>(world, params);
  if (run.zero1 && world.world_size() > 1) {
    t.sharded = std::make_unique<dist::ShardedOptimizer>(
        world, params, [run](const NamedParameters& shard) { return make_optimizer(run, shard); });
    t.trainer = std::make_unique<Trainer>(lm, *t.sharded, run.schedule(), source, options);
  } else {
    t.optimizer = make_optimizer(run, params);
    t.trainer = std::make_unique<Trainer>(lm, *t.optimizer, run.schedule(), source, options);
  }
  if (world.world_size() > 1) t.trainer->set_data_parallel(&world, t.sync.get());
  return t;
}

}  // namespace rhine::train
