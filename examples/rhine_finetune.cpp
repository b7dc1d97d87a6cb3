// rhine-finetune: adapt an existing Hugging Face model (EuroLLM, Salamandra,
// Teuken, Mistral, Apertus, DeepSeek ... or any Rhine checkpoint) to German,
// French or Dutch, and hand the result back as an HF directory.
//
//   rhine-finetune examples/configs/finetune-sft-de.json
//
// Two modes (config key "mode"):
//  - "sft": supervised fine-tuning on JSONL (prompt/response pairs or chat
//    messages, rendered with a chat template; the loss covers the assistant's
//    replies only; rhine/data/sft.h);
//  - "pretrain": continued pretraining on token shards written by rhine-prepare,
//    optionally with a language mixture ("mixture": {"nl": 0.75, "en": 0.25}) that
//    replays the model's original languages beside the new one.
// Full fine-tuning, or LoRA (config key "lora") where only the adapters train.
//
// It prints the held-out loss and bits per byte per language before and after
// (for SFT: on the held-out replies), a sample answer per language, and writes:
//   out_dir/checkpoints/ ...   resumable Trainer checkpoints (run again to resume)
//   out_dir/metrics.jsonl, training.svg
//   export_dir/                the fine-tuned model as an HF directory (LoRA merged)
//   out_dir/adapter/           with LoRA: the adapter in PEFT's layout
//
// Data parallel exactly as rhine-train (torchrun / srun variables).
#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <cstdio>
#include <filesystem>
#include <map>
#include <algorithm>
#include <memory>

#include "rhine/core/error.h"
#include "rhine/core/json.h"
#include "rhine/core/log.h"
#include "rhine/data/loader.h"
#include "rhine/data/sft.h"
#include "rhine/dist/fsdp.h"
#include "rhine/dist/world.h"
#include "rhine/io/checkpoint.h"
#include "rhine/io/hf.h"
#include "rhine/io/lora.h"
#include "rhine/nn/generate.h"
#include "rhine/optim/schedule.h"
#include "rhine/tokenizer/tokenizer.h"
#include "rhine/torch/runtime.h"
#include "rhine/train/evaluate.h"
#include "rhine/train/run.h"
#include "rhine/train/trainer.h"

namespace fs = std::filesystem;

namespace {

constexpr const char* kTool = "rhine-finetune";

struct FinetuneConfig {
  std::string base_model, tokenizer, mode = "sft", export_dir;
  std::vector<std::string> train, heldout;
  rhine::ChatTemplate chat_template;
  std::optional<rhine::io::LoraOptions> lora;
  bool pack = true;
  /// "pretrain": language -> weight of the training mixture (empty: every language of the
  /// shards in proportion to its tokens). Languages without a weight are not drawn.
  std::map<std::string, double> mixture;
  rhine::train::RunOptions run;  // schedule, batch, optimizer, evaluation, checkpoints (rhine/train/run.h)

  /// A required key holding a path or a list of paths.
  static std::vector<std::string> paths(rhine::JsonFields& f, const char* key) {
    const auto* j = f.raw(key);
    RHINE_CHECK(j != nullptr, kTool, fmt::format("required key \"{}\" is missing", key), "",
                "give a file, a directory or a list of them");
    RHINE_CHECK(j->is_string() || j->is_array(), kTool, fmt::format("\"{}\" must be a path or a list of paths", key),
                j->dump(), "");
    if (j->is_string()) return {j->get<std::string>()};
    return j->get<std::vector<std::string>>();
  }

  static FinetuneConfig from_file(const std::string& path) {
    auto j = rhine::read_json_file(path, kTool);
    rhine::JsonFields f(j, kTool);
    FinetuneConfig c;
    c.base_model = f.require<std::string>("base_model");
    c.tokenizer = f.get("tokenizer", c.tokenizer);
    c.mode = f.get("mode", c.mode);
    RHINE_CHECK(c.mode == "sft" || c.mode == "pretrain", kTool, "unknown mode", c.mode, "use \"sft\" or \"pretrain\"");
    c.train = paths(f, "train");
    c.heldout = paths(f, "heldout");
    if (const auto* t = f.raw("chat_template")) {
      if (t->is_string()) {
        c.chat_template = rhine::ChatTemplate::named(t->get<std::string>());
      } else {
        rhine::JsonFields tf(*t, "rhine-finetune chat_template");
        c.chat_template.system = tf.get("system", c.chat_template.system);
        c.chat_template.user = tf.get("user", c.chat_template.user);
        c.chat_template.assistant = tf.get("assistant", c.chat_template.assistant);
        c.chat_template.prefix = tf.get("prefix", c.chat_template.prefix);
        c.chat_template.append_eos = tf.get("append_eos", c.chat_template.append_eos);
        tf.reject_unknown();
      }
    }
    if (const auto* l = f.raw("lora"); l != nullptr && !l->is_null()) {
      rhine::JsonFields lf(*l, "rhine-finetune lora");
      rhine::io::LoraOptions lo;
      lo.rank = lf.get("rank", lo.rank);
      lo.alpha = lf.get("alpha", lo.alpha);
      lo.dropout = lf.get("dropout", lo.dropout);
      lo.target_modules = lf.get("target_modules", lo.target_modules);
      lo.target_regex = lf.get("target_regex", lo.target_regex);
      lf.reject_unknown();
      c.lora = lo;
    }
    c.pack = f.get("pack", c.pack);
    if (const auto* m = f.raw("mixture"); m != nullptr && !m->is_null()) {
      RHINE_CHECK(c.mode == "pretrain", kTool, "\"mixture\" applies to mode \"pretrain\"", c.mode,
                  "remove it, or set \"mode\": \"pretrain\"");
      RHINE_CHECK(m->is_object() && !m->empty(), kTool, "\"mixture\" must map languages to weights", m->dump(),
                  "e.g. {\"nl\": 0.75, \"en\": 0.25} (replay 25% English)");
      for (const auto& [lang, w] : m->items()) {
        RHINE_CHECK(w.is_number() && w.get<double>() >= 0, kTool, "a \"mixture\" weight must be a number >= 0",
                    lang + ": " + w.dump(), "");
        c.mixture[lang] = w.get<double>();
      }
    }
    // Fine-tuning defaults: small learning rate, no weight decay, 512-token rows.
    c.run.out_dir = "runs/finetune";
    c.run.seq_len = 512;
    c.run.batch_size = 8;
    c.run.steps = 200;
    c.run.warmup = 20;
    c.run.lr = 2e-5;
    c.run.weight_decay = 0.0;
    c.run.router_bias_update_rate = 0.0;  // keep a pretrained router's balance as it is
    c.run.read(f, kTool);
    c.export_dir = f.get("export_dir", (fs::path(c.run.out_dir) / "export").string());
    f.reject_unknown();
    return c;
  }
};

/// The tokenizer: the config's, else the base model's tokenizer.json, else its tokenizer.model.
std::string tokenizer_path(const FinetuneConfig& c) {
  if (!c.tokenizer.empty()) return c.tokenizer;
  for (const char* name : {"tokenizer.json", "tokenizer.model"})
    if (fs::exists(fs::path(c.base_model) / name)) return (fs::path(c.base_model) / name).string();
  RHINE_FAIL(kTool, "the base model directory has no tokenizer.json or tokenizer.model", c.base_model,
             "set \"tokenizer\" in the config");
}

std::vector<std::int32_t> ids32(const std::vector<std::int64_t>& v) { return {v.begin(), v.end()}; }

}  // namespace

int main(int argc, char** argv) try {
  rhine::init_logging();
  RHINE_CHECK(argc == 2, kTool, "expected one argument, the config file", argc - 1,
              "usage: rhine-finetune CONFIG.json (see examples/configs/finetune-*.json)");
  const auto cfg = FinetuneConfig::from_file(argv[1]);
  const auto& run = cfg.run;
  auto [world, rt] = rhine::train::start_process(run);
  const bool main_rank = world.is_main();

  // The base model and its tokenizer.
  const auto tok_path = tokenizer_path(cfg);
  auto tok = rhine::Tokenizer::load(tok_path);
  rhine::io::ImportOptions io;
  io.device = rt.device;
  io.model.fused_kernels = run.fused_kernels;
  io.model.activation_checkpointing = run.activation_checkpointing;
  // LoRA under bf16 autocast: the frozen base stays in its stored dtype (a bf16
  // checkpoint stays bf16: nothing updates it, and autocast computes in bf16
  // anyway); the adapters are float32. Full fine-tuning keeps fp32 master weights.
  // Without native bf16 the Trainer computes in fp32 (rhine::resolve_bf16), so
  // the base is loaded in fp32 there.
  const bool bf16 = rhine::resolve_bf16(run.bf16, run.bf16_emulated, rt.device, "rhine-finetune");
  if (cfg.lora && bf16 && run.parallel.zero < 2) io.dtype = std::nullopt;
  // Under FSDP the import streams: the model is built without its weights
  // (LoRA adapters are added to it as they are), and after sharding each rank
  // reads only its rows of the base model's files, so no rank ever holds the
  // whole model.
  const bool stream = run.parallel.zero >= 2;
  rhine::nn::CausalLM lm{nullptr};
  if (stream) {
    io.model.defer_init = true;
    lm = rhine::nn::CausalLM(rhine::io::load_hf_config(cfg.base_model), io.model);
    at::NoGradGuard no_grad;
    for (auto& [name, b] : lm->state_buffers()) b.set_data(b.to(rt.device));  // the weights go where FSDP puts them
  } else {
    lm = rhine::io::load_hf_model(cfg.base_model, io);
  }
  const auto& mcfg = lm->config();
  RHINE_CHECK(mcfg.vocab_size >= tok.vocab_size(), kTool, "the tokenizer has more tokens than the model's vocabulary",
              tok.vocab_size(), fmt::format("model vocab_size {}; use the base model's own tokenizer", mcfg.vocab_size));
  if (cfg.lora) {
    auto lo = *cfg.lora;
    lo.init_seed = run.seed;
    lo.base_model_name_or_path = cfg.base_model;
    const auto adapted = rhine::io::apply_lora(*lm, lo);
    if (main_rank) spdlog::info("LoRA r={} alpha={} on {} modules", lo.rank, lo.alpha, adapted.size());
  }
  const auto params = rhine::train::trainable_parameters(lm);
  std::int64_t trainable = 0;
  for (const auto& p : params) trainable += p.tensor.numel();
  if (main_rank)
    spdlog::info("{} ({} layers, hidden {}): {:.2f}M parameters, {:.2f}M trained; tokenizer {}{}{}", cfg.base_model,
                 mcfg.num_hidden_layers, mcfg.hidden_size, lm->num_parameters() / 1e6, trainable / 1e6, tok_path,
                 run.describe_parallel(world), stream ? "; each rank reads its rows of the base model" : "");

  // Data: the training stream and the per-language held-out set.
  rhine::SftExamples sft_train, sft_heldout;  // before `source`: an SftLoader refers to sft_train
  std::unique_ptr<rhine::BatchSource> source;
  rhine::train::HeldoutSet heldout;
  if (cfg.mode == "sft") {
    rhine::SftOptions so;
    so.chat_template = cfg.chat_template;
    so.max_tokens = run.seq_len + 1;
    so.files = cfg.train;
    sft_train = rhine::load_sft_examples(so, tok);
    so.files = cfg.heldout;
    sft_heldout = rhine::load_sft_examples(so, tok);
    if (main_rank)
      spdlog::info("SFT: {} examples ({} tokens, {} of them targets; {} cut to seq_len+1, {} dropped), languages {}",
                   sft_train.examples.size(), sft_train.tokens, sft_train.target_tokens, sft_train.truncated,
                   sft_train.dropped, fmt::join(sft_train.languages, ", "));
    rhine::SftLoaderOptions lo;
    lo.batch_size = run.batch_size;
    lo.seq_len = run.seq_len;
    lo.pack = cfg.pack;
    lo.pad_id = tok.eos_id() >= 0 ? tok.eos_id() : 0;
    lo.seed = run.seed;
    lo.rank = world.rank();
    lo.world_size = world.world_size();
    source = std::make_unique<rhine::SftLoader>(sft_train, lo);
    heldout = rhine::train::HeldoutSet::from_sft(sft_heldout, run.seq_len, run.eval_tokens);
  } else {
    auto lo = rhine::train::loader_options(run, cfg.train, world, tok);
    if (!cfg.mixture.empty()) {
      lo.mixture[0].second.kind = rhine::MixtureOptions::Kind::weights;
      lo.mixture[0].second.weights = cfg.mixture;
    }
    if (main_rank) spdlog::info("training mixture: {}", rhine::describe(lo.mixture[0].second));
    source = std::make_unique<rhine::DataLoader>(lo);
    rhine::train::HeldoutOptions ho;
    ho.shards = cfg.heldout;
    ho.max_tokens_per_language = run.eval_tokens;
    ho.seq_len = run.seq_len;
    heldout = rhine::train::HeldoutSet::from_shards(ho, tok);
  }

  // Optimizer, schedule, trainer.
  if (main_rank)
    spdlog::info("optimizer: {}{}", run.optimizer.describe(params, run.weight_decay),
                 run.activation_checkpointing ? "; activation checkpointing" : "");
  auto trainer_options = run.trainer_options();
  if (cfg.lora) trainer_options.frozen_source = cfg.base_model;  // checkpoints hold the adapters only
  auto parts = rhine::train::assemble_run(run, world, lm, params, *source, trainer_options,
                                          stream ? cfg.base_model : "");
  parts.trainer->set_heldout(&heldout);
  parts.trainer->callbacks().save_extra = [&](rhine::io::CheckpointWriter& w) {
    rhine::io::write_tokenizer_files(tok_path, w.dir());  // step-N directories carry the tokenizer
  };
  const auto r = parts.trainer->fit();
  // Under FSDP every rank takes part in the samples' forwards and in gathering
  // the weights for the export; otherwise only rank 0 goes on.
  if (!main_rank && (parts.fsdp == nullptr || r.interrupted)) return r.interrupted ? 130 : 0;
  if (r.interrupted) {
    std::printf("interrupted at step %lld; run the same command again to resume\n", static_cast<long long>(r.step));
    return 130;
  }
  auto printf_main = [main_rank](const char* format, auto... args) {
    if (!main_rank) return;
    if constexpr (sizeof...(args) == 0)
      std::fputs(format, stdout);
    else
      std::printf(format, args...);
  };

  printf_main("\nHeld-out %s per language (lower is better)\n",
              cfg.mode == "sft" ? "loss on the replies" : "loss");
  printf_main("%-6s %14s %10s %10s %10s %10s %9s\n", "lang", "train tokens", "loss", "after", "bpb", "after", "change");
  std::int64_t trained = 0;
  for (const auto& [lang, n] : r.tokens_per_language) trained += n;
  std::string gains, forgetting;
  // The languages the mixture weighs most are the target; the rest are replayed or left out.
  double top_weight = 0;
  for (const auto& [lang, w] : cfg.mixture) top_weight = std::max(top_weight, w);
  for (const auto& [lang, after] : r.last_eval->languages) {
    const auto seen = r.tokens_per_language.count(lang) ? r.tokens_per_language.at(lang) : 0;
    if (r.first_eval) {
      const auto& before = r.first_eval->languages.at(lang);
      const double change = after.bits_per_byte - before.bits_per_byte;
      printf_main("%-6s %14lld %10.4f %10.4f %10.4f %10.4f %+9.4f\n", lang.c_str(), static_cast<long long>(seen),
                  before.loss, after.loss, before.bits_per_byte, after.bits_per_byte, change);
      const bool target = cfg.mixture.empty() ? seen > 0 : cfg.mixture.count(lang) && cfg.mixture.at(lang) == top_weight;
      const std::string item = fmt::format(" {} {:+.4f}{}", lang, change,
                                           seen > 0 && trained > 0 && !target
                                               ? fmt::format(" (replayed, {:.0f}% of tokens)", 100.0 * seen / trained)
                                               : "");
      (target ? gains : forgetting) += item;
    } else {
      printf_main("%-6s %14lld %10s %10.4f %10s %10.4f %9s   (resumed at step %lld)\n", lang.c_str(),
                  static_cast<long long>(seen), "-", after.loss, "-", after.bits_per_byte, "-",
                  static_cast<long long>(r.resumed_from));
    }
  }
  if (r.first_eval && cfg.mode == "pretrain")
    printf_main("bits per byte, change: target%s; others (forgetting when positive)%s\n", gains.c_str(),
                forgetting.empty() ? " none" : forgetting.c_str());
  printf_main("(%lld steps, %.0f s in this run, %.0f tokens/s)\n", static_cast<long long>(r.step), r.seconds,
              r.seconds > 0 ? double(r.tokens) / r.seconds : 0.0);

  // One sample per language: the prompt of the first held-out example (SFT) or a document's start.
  printf_main("\nSamples (prompt in [brackets], greedy)\n");
  rhine::DecodeOptions dec;
  dec.skip_special = cfg.mode != "sft";
  for (const auto& [lang, h] : heldout.languages) {
    const auto& doc = h.docs.front();
    std::size_t n = std::min<std::size_t>(doc.size() - 1, 8);
    if (!h.targets.empty()) {  // up to the first reply token
      n = 0;
      while (n + 1 < doc.size() && !h.targets.front()[n]) ++n;
    }
    std::vector<std::int64_t> prompt(doc.begin(), doc.begin() + static_cast<std::ptrdiff_t>(n));
    rhine::nn::GenerateOptions g;
    g.max_new_tokens = run.sample_tokens;
    g.temperature = 0.0;
    g.repetition_penalty = 1.1;
    if (tok.eos_id() >= 0) g.stop_tokens = {tok.eos_id()};
    if (auto end = tok.token_to_id("<|im_end|>"); end >= 0) g.stop_tokens.push_back(end);
    g.vocab_limit = tok.vocab_size();  // a padded vocabulary's extra rows are not text
    auto res = rhine::nn::generate(lm, {prompt}, g);
    std::string p = tok.decode(ids32(prompt), dec), text = tok.decode(ids32(res.tokens[0]), dec);
    for (auto* s : {&p, &text})
      for (auto& ch : *s)
        if (ch == '\n') ch = ' ';
    printf_main("%s: [%s] %s\n", lang.c_str(), p.c_str(), text.c_str());
  }

  if (parts.fsdp) parts.fsdp->unshard();  // the whole weights on every rank, for the export
  if (!main_rank) return 0;
  // Export: the HF directory (LoRA merged into the weights) and, with LoRA, the PEFT adapter.
  if (cfg.lora) {
    const auto adapter = fs::path(run.out_dir) / "adapter";
    rhine::io::PeftSaveOptions po;
    po.overwrite = true;
    rhine::io::save_peft_adapter(*lm, adapter, po);
    printf_main("\nLoRA adapter (PEFT layout): %s\n", adapter.c_str());
    rhine::io::merge_lora(*lm);
  }
  rhine::io::ExportOptions eo;
  eo.overwrite = true;
  eo.tokenizer_from = fs::path(cfg.base_model);
  rhine::io::save_hf_model(lm, cfg.export_dir, eo);
  // A tokenizer given separately replaces the base's in the export, under its HF names.
  if (!cfg.tokenizer.empty()) rhine::io::write_tokenizer_files(tok_path, cfg.export_dir);
  printf_main("Fine-tuned model (HF directory): %s\nRun directory %s: metrics.jsonl, training.svg, checkpoints/\n",
              cfg.export_dir.c_str(), run.out_dir.c_str());
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "\n%s\n", e.what());
  return 1;
}
