// rhine-train: pretrain a dense or a DeepSeek-style (MLA + MoE) model on token
// shards and report what a European team watches: per-language held-out bits
// per byte before and after, tokens seen per language, a generated sample per
// language, and a plot of the run.
//
//   rhine-train examples/configs/demo-dense.json
//   rhine-train examples/configs/demo-moe.json
//
// The config (strict JSON: unknown keys are errors) names the tokenizer, the
// train and held-out shard directories (rhine-prepare), the model (Hugging Face
// config.json keys; vocab_size defaults to the tokenizer's) and the schedule.
// The run directory (`out_dir`) receives checkpoints/, metrics.jsonl and
// training.svg; running the same command again resumes from the newest
// complete checkpoint, and Ctrl-C checkpoints before it exits.
//
// Data parallel: started by torchrun or srun (RANK, WORLD_SIZE, MASTER_ADDR,
// MASTER_PORT; see README "Data parallel"), every rank trains on its share of
// each global batch (`batch_size` stays the global row count) over Gloo or
// NCCL; rank 0 prints, evaluates into the log and writes checkpoints.
#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>

#include "rhine/core/error.h"
#include "rhine/core/json.h"
#include "rhine/core/log.h"
#include "rhine/data/loader.h"
#include "rhine/dist/grad_sync.h"
#include "rhine/dist/world.h"
#include "rhine/nn/generate.h"
#include "rhine/nn/model.h"
#include "rhine/optim/adamw.h"
#include "rhine/optim/schedule.h"
#include "rhine/tokenizer/tokenizer.h"
#include "rhine/torch/runtime.h"
#include "rhine/train/evaluate.h"
#include "rhine/train/trainer.h"

namespace {

struct TrainConfig {
  std::string tokenizer, train_shards, heldout_shards, out_dir = "build/demo/run";
  rhine::Json model;
  std::int64_t seq_len = 256, batch_size = 16, grad_accum = 1, steps = 300, warmup = 30;
  double lr = 3e-3, min_lr_ratio = 0.1, weight_decay = 0.1, grad_clip = 1.0, mixture_temperature = 1.0;
  double z_loss = 0.0, router_bias_update_rate = 1e-3, moe_seq_aux_alpha = 0.0, mtp_lambda = 0.3;
  std::uint64_t seed = 1;
  std::int64_t eval_tokens = 20000, eval_every = 0, checkpoint_every = 0, keep_last = 2, log_every = 10;
  std::int64_t sample_tokens = 40;
  bool bf16 = true, resume = true, fused_kernels = true;
  int threads = 0;

  static TrainConfig from_file(const std::string& path) {
    auto j = rhine::read_json_file(path, "rhine-train");
    rhine::JsonFields f(j, "rhine-train");
    TrainConfig c;
    c.tokenizer = f.require<std::string>("tokenizer");
    c.train_shards = f.require<std::string>("train_shards");
    c.heldout_shards = f.require<std::string>("heldout_shards");
    c.out_dir = f.get("out_dir", c.out_dir);
    c.model = *f.raw("model");
    c.seq_len = f.get("seq_len", c.seq_len);
    c.batch_size = f.get("batch_size", c.batch_size);
    c.grad_accum = f.get("grad_accum", c.grad_accum);
    c.steps = f.get("steps", c.steps);
    c.warmup = f.get("warmup", c.warmup);
    c.lr = f.get("lr", c.lr);
    c.min_lr_ratio = f.get("min_lr_ratio", c.min_lr_ratio);
    c.weight_decay = f.get("weight_decay", c.weight_decay);
    c.grad_clip = f.get("grad_clip", c.grad_clip);
    c.mixture_temperature = f.get("mixture_temperature", c.mixture_temperature);
    c.z_loss = f.get("z_loss", c.z_loss);
    c.router_bias_update_rate = f.get("router_bias_update_rate", c.router_bias_update_rate);
    c.moe_seq_aux_alpha = f.get("moe_seq_aux_alpha", c.moe_seq_aux_alpha);
    c.mtp_lambda = f.get("mtp_lambda", c.mtp_lambda);
    c.seed = f.get("seed", c.seed);
    c.eval_tokens = f.get("eval_tokens", c.eval_tokens);
    c.eval_every = f.get("eval_every", c.eval_every);
    c.checkpoint_every = f.get("checkpoint_every", c.checkpoint_every);
    c.keep_last = f.get("keep_last", c.keep_last);
    c.log_every = f.get("log_every", c.log_every);
    c.sample_tokens = f.get("sample_tokens", c.sample_tokens);
    c.bf16 = f.get("bf16", c.bf16);
    c.fused_kernels = f.get("fused_kernels", c.fused_kernels);
    c.resume = f.get("resume", c.resume);
    c.threads = f.get("threads", c.threads);
    f.reject_unknown();
    RHINE_CHECK(c.steps > c.warmup && c.warmup >= 0, "rhine-train", "steps must exceed warmup",
                (std::vector<std::int64_t>{c.steps, c.warmup}), "");
    return c;
  }
};

std::vector<std::int32_t> ids32(const std::vector<std::int64_t>& v) { return {v.begin(), v.end()}; }

}  // namespace

int main(int argc, char** argv) try {
  rhine::init_logging();
  RHINE_CHECK(argc == 2, "rhine-train", "expected one argument, the config file", argc - 1,
              "usage: rhine-train CONFIG.json (see examples/configs/)");
  const auto cfg = TrainConfig::from_file(argv[1]);
  rhine::RuntimeOptions ro;
  ro.threads = cfg.threads;
  ro.seed = cfg.seed;
  auto world = rhine::dist::init_from_env();
  if (world.world_size() > 1 && ro.device == "auto") ro.device = world.backend() == "nccl"
                                                                     ? "cuda:" + std::to_string(world.local_rank())
                                                                     : "cpu";
  auto rt = rhine::init_runtime(ro);
  if (world.is_main()) spdlog::info("{}; {} rank(s), backend {}", rt.describe(), world.world_size(), world.backend());

  // Tokenizer and model.
  auto tok = rhine::Tokenizer::load(cfg.tokenizer);
  rhine::Json model_json = cfg.model;
  if (!model_json.contains("vocab_size")) model_json["vocab_size"] = tok.vocab_size();
  if (!model_json.contains("bos_token_id") && tok.bos_id() >= 0) model_json["bos_token_id"] = tok.bos_id();
  if (!model_json.contains("eos_token_id") && tok.eos_id() >= 0) model_json["eos_token_id"] = tok.eos_id();
  auto mcfg = rhine::nn::ModelConfig::from_json(model_json);
  RHINE_CHECK(mcfg.vocab_size >= tok.vocab_size(), "rhine-train", "model vocab_size is smaller than the tokenizer's",
              mcfg.vocab_size, "remove vocab_size from the model config to take the tokenizer's");
  rhine::nn::CausalLMOptions mo;
  mo.init_seed = cfg.seed;
  mo.fused_kernels = cfg.fused_kernels;
  rhine::nn::CausalLM lm(mcfg, mo);
  lm->to(rt.device);
  if (world.is_main()) spdlog::info("model: {} {} layers, hidden {}, {:.2f}M parameters ({:.2f}M without embeddings)", mcfg.model_type,
               mcfg.num_hidden_layers, mcfg.hidden_size, lm->num_parameters() / 1e6, lm->num_parameters(false) / 1e6);

  // Data: training mixture and per-language held-out sets.
  rhine::DataLoaderOptions lo;
  lo.shards = {cfg.train_shards};
  lo.batch_size = cfg.batch_size;
  lo.seq_len = cfg.seq_len;
  lo.seed = cfg.seed;
  lo.rank = world.rank();
  lo.world_size = world.world_size();
  if (tok.bos_id() >= 0) lo.bos_id = tok.bos_id();
  if (tok.eos_id() >= 0) lo.eos_id = tok.eos_id();
  lo.mixture[0].second.temperature = cfg.mixture_temperature;
  rhine::DataLoader loader(lo);
  rhine::train::HeldoutOptions ho;
  ho.shards = {cfg.heldout_shards};
  ho.max_tokens_per_language = cfg.eval_tokens;
  ho.seq_len = cfg.seq_len;
  const auto heldout = rhine::train::HeldoutSet::from_shards(ho, tok);

  // Optimizer and schedule.
  rhine::NamedParameters params;
  for (const auto& p : lm->named_parameters())
    if (p.value().requires_grad()) params.push_back({p.key(), p.value()});
  rhine::AdamWOptions ao;
  ao.lr = cfg.lr;
  ao.beta2 = 0.95;
  ao.weight_decay = cfg.weight_decay;
  rhine::AdamW opt(params, ao);
  const auto schedule = rhine::warmup_cosine(cfg.warmup, cfg.steps, 1.0, cfg.min_lr_ratio);
  if (world.is_main())
    spdlog::info("lr {} x {}; mixture {}", cfg.lr, schedule.describe(), rhine::describe(lo.mixture[0].second));
  rhine::dist::broadcast_parameters(world, lm->parameters());  // all ranks start equal
  rhine::dist::GradientSync sync(world, params);

  rhine::train::TrainerOptions to;
  to.max_steps = cfg.steps;
  to.grad_accum = static_cast<int>(cfg.grad_accum);
  to.grad_clip = cfg.grad_clip;
  to.bf16 = cfg.bf16;
  to.z_loss = cfg.z_loss;
  to.router_bias_update_rate = cfg.router_bias_update_rate;
  to.moe_seq_aux_alpha = cfg.moe_seq_aux_alpha;
  to.mtp_lambda = cfg.mtp_lambda;
  to.out_dir = cfg.out_dir;
  to.resume = cfg.resume;
  to.eval_every = cfg.eval_every;
  to.checkpoint_every = cfg.checkpoint_every;
  to.keep_last = static_cast<int>(cfg.keep_last);
  to.log_every = cfg.log_every;
  rhine::train::Trainer trainer(lm, opt, schedule, loader, to);
  trainer.set_heldout(&heldout);
  if (world.world_size() > 1) trainer.set_data_parallel(&world, &sync);
  const auto r = trainer.fit();
  if (!world.is_main()) return r.interrupted ? 130 : 0;
  if (r.interrupted) {
    std::printf("interrupted at step %lld; run the same command again to resume\n", static_cast<long long>(r.step));
    return 130;
  }

  std::printf("\nPer-language held-out bits per byte (lower is better; tokenizer-independent)\n");
  std::printf("%-6s %14s %10s %10s %8s\n", "lang", "train tokens", "before", "after", "change");
  for (const auto& [lang, after] : r.last_eval->languages) {
    const auto seen = r.tokens_per_language.count(lang) ? r.tokens_per_language.at(lang) : 0;
    if (r.first_eval) {
      const double before = r.first_eval->languages.at(lang).bits_per_byte;
      std::printf("%-6s %14lld %10.3f %10.3f %7.1f%%\n", lang.c_str(), static_cast<long long>(seen), before,
                  after.bits_per_byte, 100.0 * (after.bits_per_byte / before - 1));
    } else {
      std::printf("%-6s %14lld %10s %10.3f   (resumed at step %lld)\n", lang.c_str(), static_cast<long long>(seen),
                  "-", after.bits_per_byte, static_cast<long long>(r.resumed_from));
    }
  }
  std::printf("(%lld steps, %.0f s in this run, %.0f tokens/s, %s, %lld skipped steps)\n",
              static_cast<long long>(r.step), r.seconds, r.seconds > 0 ? double(r.tokens) / r.seconds : 0.0,
              cfg.bf16 ? "bf16 autocast" : "fp32", static_cast<long long>(r.skipped_steps));

  std::printf("\nSamples (prompt in [brackets], sampled with temperature 0.7, top-p 0.9)\n");
  rhine::DecodeOptions dec;
  dec.skip_special = true;
  for (const auto& [lang, h] : heldout.languages) {
    const auto& doc = h.docs.front();
    std::vector<std::int64_t> prompt(doc.begin(), doc.begin() + std::min<std::ptrdiff_t>(doc.size(), 6));
    rhine::nn::GenerateOptions g;
    g.max_new_tokens = cfg.sample_tokens;
    g.temperature = 0.7;
    g.top_p = 0.9;
    g.repetition_penalty = 1.2;
    g.seed = cfg.seed;
    if (tok.eos_id() >= 0) g.stop_tokens = {tok.eos_id()};
    auto res = rhine::nn::generate(lm, {prompt}, g);
    std::string text = tok.decode(ids32(res.tokens[0]), dec);
    for (auto& ch : text)
      if (ch == '\n') ch = ' ';
    std::printf("%s: [%s] %s\n", lang.c_str(), tok.decode(ids32(prompt), dec).c_str(), text.c_str());
  }
  std::printf("\nRun directory %s: metrics.jsonl, training.svg (loss and per-language bpb), checkpoints/\n",
              cfg.out_dir.c_str());
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "\n%s\n", e.what());
  return 1;
}
