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
// MASTER_PORT; see docs/dist.md, "Data parallel training"), every rank trains on its share of
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
#include "rhine/dist/world.h"
#include "rhine/nn/generate.h"
#include "rhine/nn/model.h"
#include "rhine/nn/moe.h"
#include "rhine/optim/schedule.h"
#include "rhine/io/checkpoint.h"
#include "rhine/io/hf.h"
#include "rhine/tokenizer/tokenizer.h"
#include "rhine/torch/runtime.h"
#include "rhine/train/evaluate.h"
#include "rhine/train/run.h"
#include "rhine/train/trainer.h"

namespace {

struct TrainConfig {
  std::string tokenizer, train_shards, heldout_shards;
  rhine::Json model;
  double mixture_temperature = 1.0;
  rhine::train::RunOptions run;  // schedule, batch, optimizer, evaluation, checkpoints (rhine/train/run.h)

  static TrainConfig from_file(const std::string& path) {
    auto j = rhine::read_json_file(path, "rhine-train");
    rhine::JsonFields f(j, "rhine-train");
    TrainConfig c;
    c.tokenizer = f.require<std::string>("tokenizer");
    c.train_shards = f.require<std::string>("train_shards");
    c.heldout_shards = f.require<std::string>("heldout_shards");
    c.model = *f.raw("model");
    c.mixture_temperature = f.get("mixture_temperature", c.mixture_temperature);
    c.run.out_dir = "build/demo/run";
    c.run.read(f, "rhine-train");
    f.reject_unknown();
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
  const auto& run = cfg.run;
  auto [world, rt] = rhine::train::start_process(run);

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
  mo.init_seed = run.seed;
  mo.fused_kernels = run.fused_kernels;
  mo.activation_checkpointing = run.activation_checkpointing;
  // Under FSDP the model is built without its weights and each rank draws
  // only its rows (FSDP::initialize): no rank ever holds the whole model.
  mo.defer_init = run.parallel.zero >= 2;
  rhine::nn::CausalLM lm(mcfg, mo);
  if (mo.defer_init) {  // the weights go where FSDP puts them
    at::NoGradGuard no_grad;
    for (auto& [name, b] : lm->state_buffers()) b.set_data(b.to(rt.device));
  } else {
    lm->to(rt.device);
    rhine::nn::pack_expert_weights(*lm);  // the move gave each expert weight its own storage
  }
  if (world.is_main())
    spdlog::info("model: {} {} layers, hidden {}, {:.2f}M parameters ({:.2f}M without embeddings){}", mcfg.model_type,
                 mcfg.num_hidden_layers, mcfg.hidden_size, lm->num_parameters() / 1e6, lm->num_parameters(false) / 1e6,
                 run.activation_checkpointing ? "; activation checkpointing" : "");

  // Data: training mixture and per-language held-out sets.
  auto lo = rhine::train::loader_options(run, {cfg.train_shards}, world, tok);
  lo.mixture[0].second.temperature = cfg.mixture_temperature;
  rhine::DataLoader loader(lo);
  rhine::train::HeldoutOptions ho;
  ho.shards = {cfg.heldout_shards};
  ho.max_tokens_per_language = run.eval_tokens;
  ho.seq_len = run.seq_len;
  const auto heldout = rhine::train::HeldoutSet::from_shards(ho, tok);

  // Optimizer, schedule, data parallelism and Trainer (rhine/train/run.h).
  const auto params = rhine::train::trainable_parameters(lm);
  if (world.is_main())
    spdlog::info("lr {} x {}; {}; mixture {}{}", run.lr, run.schedule().describe(),
                 run.optimizer.describe(params, run.weight_decay), rhine::describe(lo.mixture[0].second),
                 run.describe_parallel(world));
  auto parts = rhine::train::assemble_run(run, world, lm, params, loader, run.trainer_options());
  parts.trainer->set_heldout(&heldout);
  // Each checkpoint carries the tokenizer, so rhine-convert and rhine-generate can take a
  // step-N directory alone.
  parts.trainer->callbacks().save_extra = [&](rhine::io::CheckpointWriter& w) {
    rhine::io::write_tokenizer_files(cfg.tokenizer, w.dir());
  };
  const auto r = parts.trainer->fit();
  // Under FSDP every rank takes part in the samples' forwards (they gather
  // parameters); otherwise only rank 0 goes on.
  const bool all_ranks = parts.fsdp != nullptr && !r.interrupted;
  if (!world.is_main() && !all_ranks) return r.interrupted ? 130 : 0;
  if (r.interrupted) {
    std::printf("interrupted at step %lld; run the same command again to resume\n", static_cast<long long>(r.step));
    return 130;
  }

  // Under FSDP the other ranks only compute; rank 0 prints.
  auto printf_main = [main = world.is_main()](const char* format, auto... args) {
    if (!main) return;
    if constexpr (sizeof...(args) == 0)
      std::fputs(format, stdout);
    else
      std::printf(format, args...);
  };
  printf_main("\nPer-language held-out bits per byte (lower is better; tokenizer-independent)\n");
  printf_main("%-6s %14s %10s %10s %8s\n", "lang", "train tokens", "before", "after", "change");
  for (const auto& [lang, after] : r.last_eval->languages) {
    const auto seen = r.tokens_per_language.count(lang) ? r.tokens_per_language.at(lang) : 0;
    if (r.first_eval) {
      const double before = r.first_eval->languages.at(lang).bits_per_byte;
      printf_main("%-6s %14lld %10.3f %10.3f %7.1f%%\n", lang.c_str(), static_cast<long long>(seen), before,
                  after.bits_per_byte, 100.0 * (after.bits_per_byte / before - 1));
    } else {
      printf_main("%-6s %14lld %10s %10.3f   (resumed at step %lld)\n", lang.c_str(), static_cast<long long>(seen),
                  "-", after.bits_per_byte, static_cast<long long>(r.resumed_from));
    }
  }
  printf_main("(%lld steps, %.0f s in this run, %.0f tokens/s, %s, %lld skipped steps)\n",
              static_cast<long long>(r.step), r.seconds, r.seconds > 0 ? double(r.tokens) / r.seconds : 0.0,
              parts.trainer->options().bf16 ? "bf16 autocast" : "fp32", static_cast<long long>(r.skipped_steps));

  printf_main("\nSamples (prompt in [brackets], sampled with temperature 0.7, top-p 0.9)\n");
  rhine::DecodeOptions dec;
  dec.skip_special = true;
  for (const auto& [lang, h] : heldout.languages) {
    const auto& doc = h.docs.front();
    std::vector<std::int64_t> prompt(doc.begin(), doc.begin() + std::min<std::ptrdiff_t>(doc.size(), 6));
    rhine::nn::GenerateOptions g;
    g.max_new_tokens = run.sample_tokens;
    g.temperature = 0.7;
    g.top_p = 0.9;
    g.repetition_penalty = 1.2;
    g.seed = run.seed;
    if (tok.eos_id() >= 0) g.stop_tokens = {tok.eos_id()};
    g.vocab_limit = tok.vocab_size();  // a padded vocabulary's extra rows are not text
    auto res = rhine::nn::generate(lm, {prompt}, g);
    std::string text = tok.decode(ids32(res.tokens[0]), dec);
    for (auto& ch : text)
      if (ch == '\n') ch = ' ';
    printf_main("%s: [%s] %s\n", lang.c_str(), tok.decode(ids32(prompt), dec).c_str(), text.c_str());
  }
  printf_main("\nRun directory %s: metrics.jsonl, training.svg (loss and per-language bpb), checkpoints/\n",
              run.out_dir.c_str());
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "\n%s\n", e.what());
  return 1;
}
