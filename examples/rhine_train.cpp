// rhine-train: pretrain a small multilingual model on token shards and report
// what a European team watches: per-language held-out bits per byte before and
// after, and a generated sample per language.
//
//   rhine-train examples/configs/demo-dense.json
//
// The config (strict JSON: unknown keys are errors) names the tokenizer, the
// train and held-out shard directories (rhine-prepare), the model (Hugging Face
// config.json keys; vocab_size defaults to the tokenizer's) and the schedule.
// This is the first version of the trainer example; checkpointing, data
// parallelism and MoE/MLA models come with the Trainer (see README, Status).
#include <ATen/ATen.h>
#include <spdlog/spdlog.h>
#include <torch/nn/module.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>

#include "rhine/core/error.h"
#include "rhine/core/json.h"
#include "rhine/core/log.h"
#include "rhine/data/loader.h"
#include "rhine/formats/token_shard.h"
#include "rhine/nn/generate.h"
#include "rhine/nn/model.h"
#include "rhine/optim/adamw.h"
#include "rhine/optim/clip.h"
#include "rhine/optim/schedule.h"
#include "rhine/optim/skip_guard.h"
#include "rhine/tokenizer/tokenizer.h"
#include "rhine/torch/compat.h"
#include "rhine/torch/runtime.h"

namespace {

struct TrainConfig {
  std::string tokenizer, train_shards, heldout_shards;
  rhine::Json model;
  std::int64_t seq_len = 256, batch_size = 16, steps = 300, warmup = 30;
  double lr = 3e-3, min_lr_ratio = 0.1, weight_decay = 0.1, grad_clip = 1.0, mixture_temperature = 1.0;
  std::uint64_t seed = 1;
  std::int64_t eval_tokens = 20000, log_every = 10, sample_tokens = 40;
  bool bf16 = true;
  int threads = 0;

  static TrainConfig from_file(const std::string& path) {
    auto j = rhine::read_json_file(path, "rhine-train");
    rhine::JsonFields f(j, "rhine-train");
    TrainConfig c;
    c.tokenizer = f.require<std::string>("tokenizer");
    c.train_shards = f.require<std::string>("train_shards");
    c.heldout_shards = f.require<std::string>("heldout_shards");
    c.model = *f.raw("model");
    c.seq_len = f.get("seq_len", c.seq_len);
    c.batch_size = f.get("batch_size", c.batch_size);
    c.steps = f.get("steps", c.steps);
    c.warmup = f.get("warmup", c.warmup);
    c.lr = f.get("lr", c.lr);
    c.min_lr_ratio = f.get("min_lr_ratio", c.min_lr_ratio);
    c.weight_decay = f.get("weight_decay", c.weight_decay);
    c.grad_clip = f.get("grad_clip", c.grad_clip);
    c.mixture_temperature = f.get("mixture_temperature", c.mixture_temperature);
    c.seed = f.get("seed", c.seed);
    c.eval_tokens = f.get("eval_tokens", c.eval_tokens);
    c.log_every = f.get("log_every", c.log_every);
    c.sample_tokens = f.get("sample_tokens", c.sample_tokens);
    c.bf16 = f.get("bf16", c.bf16);
    c.threads = f.get("threads", c.threads);
    f.reject_unknown();
    RHINE_CHECK(c.steps > c.warmup && c.warmup >= 0, "rhine-train", "steps must exceed warmup",
                (std::vector<std::int64_t>{c.steps, c.warmup}), "");
    return c;
  }
};

// Held-out documents of one language, as [bos] tokens, up to a token budget.
struct Heldout {
  std::vector<std::vector<std::int64_t>> docs;
  std::uint64_t bytes = 0;  // UTF-8 bytes of the decoded documents
};

std::map<std::string, Heldout> load_heldout(const std::string& dir, const rhine::Tokenizer& tok,
                                            std::int64_t budget) {
  std::map<std::string, Heldout> out;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    if (e.path().extension() != ".tokens") continue;
    auto shard = rhine::TokenShard::open(e.path().string(), true);
    for (const auto& d : shard->docs()) {
      auto& h = out[shard->meta().languages[d.lang]];
      std::int64_t have = 0;
      for (const auto& doc : h.docs) have += static_cast<std::int64_t>(doc.size());
      if (have >= budget || d.n_tokens == 0) continue;
      std::vector<std::int32_t> ids(d.n_tokens);
      for (std::uint32_t i = 0; i < d.n_tokens; ++i) ids[i] = shard->token(d.first_token + i);
      h.bytes += tok.decode(ids).size();
      std::vector<std::int64_t> doc;
      if (tok.bos_id() >= 0) doc.push_back(tok.bos_id());
      doc.insert(doc.end(), ids.begin(), ids.end());
      h.docs.push_back(std::move(doc));
    }
  }
  RHINE_CHECK(!out.empty(), "rhine-train", "no held-out shards", dir, "run rhine-prepare on held-out text");
  return out;
}

// Bits per byte of each language: total cross-entropy (nats) / ln 2 / bytes.
// Tokenizer-independent, so runs with different tokenizers compare.
std::map<std::string, double> evaluate(rhine::nn::CausalLM& lm, const std::map<std::string, Heldout>& heldout,
                                       std::int64_t T, bool bf16) {
  at::NoGradGuard no_grad;
  lm->eval();
  std::map<std::string, double> bpb;
  for (const auto& [lang, h] : heldout) {
    double nats = 0;
    for (const auto& doc : h.docs)
      for (std::size_t start = 0; start + 1 < doc.size(); start += static_cast<std::size_t>(T)) {
        const auto end = std::min(doc.size(), start + static_cast<std::size_t>(T) + 1);
        auto chunk = at::tensor(std::vector<std::int64_t>(doc.begin() + start, doc.begin() + end)).view({1, -1});
        const auto n = chunk.size(1) - 1;
        rhine::nn::ForwardOptions fo;
        fo.labels = chunk.slice(1, 1, n + 1);
        rhine::AutocastGuard autocast(at::kCPU, at::kBFloat16, bf16);
        auto out = lm->forward(chunk.slice(1, 0, n), fo);
        nats += out.stats.ce_loss * static_cast<double>(out.stats.n_tokens);
      }
    bpb[lang] = nats / std::log(2.0) / static_cast<double>(h.bytes);
  }
  lm->train();
  return bpb;
}

}  // namespace

int main(int argc, char** argv) try {
  rhine::init_logging();
  RHINE_CHECK(argc == 2, "rhine-train", "expected one argument, the config file", argc - 1,
              "usage: rhine-train CONFIG.json (see examples/configs/)");
  const auto cfg = TrainConfig::from_file(argv[1]);
  rhine::RuntimeOptions ro;
  ro.threads = cfg.threads;
  ro.seed = cfg.seed;
  ro.device = "cpu";
  auto rt = rhine::init_runtime(ro);
  spdlog::info("{}", rt.describe());

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
  rhine::nn::CausalLM lm(mcfg, mo);
  spdlog::info("model: {} layers, hidden {}, {:.2f}M parameters ({:.2f}M without embeddings)",
               mcfg.num_hidden_layers, mcfg.hidden_size, lm->num_parameters() / 1e6,
               lm->num_parameters(false) / 1e6);

  rhine::DataLoaderOptions lo;
  lo.shards = {cfg.train_shards};
  lo.batch_size = cfg.batch_size;
  lo.seq_len = cfg.seq_len;
  lo.seed = cfg.seed;
  if (tok.bos_id() >= 0) lo.bos_id = tok.bos_id();
  if (tok.eos_id() >= 0) lo.eos_id = tok.eos_id();
  lo.mixture[0].second.temperature = cfg.mixture_temperature;
  rhine::DataLoader loader(lo);
  const auto heldout = load_heldout(cfg.heldout_shards, tok, cfg.eval_tokens);

  rhine::NamedParameters params;
  for (const auto& p : lm->named_parameters()) params.push_back({p.key(), p.value()});
  rhine::AdamWOptions ao;
  ao.lr = cfg.lr;
  ao.beta2 = 0.95;
  ao.weight_decay = cfg.weight_decay;
  rhine::AdamW opt(params, ao);
  const auto schedule = rhine::warmup_cosine(cfg.warmup, cfg.steps, 1.0, cfg.min_lr_ratio);
  rhine::SkipGuard guard;
  spdlog::info("lr {} x {}; mixture {}", cfg.lr, schedule.describe(),
               rhine::describe(lo.mixture[0].second));

  const auto before = evaluate(lm, heldout, cfg.seq_len, cfg.bf16);
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::int64_t> lang_tokens(loader.languages().size(), 0);
  double loss_ema = 0;
  for (std::int64_t step = 0; step < cfg.steps; ++step) {
    auto batch = loader.next();
    for (std::size_t l = 0; l < lang_tokens.size(); ++l) lang_tokens[l] += batch.tokens_per_language[l];
    opt.zero_grad();
    rhine::nn::ForwardOptions fo;
    fo.labels = batch.labels;
    fo.position_ids = batch.position_ids;
    fo.document_mask = true;
    rhine::nn::ForwardOutput out;
    {
      rhine::AutocastGuard autocast(at::kCPU, at::kBFloat16, cfg.bf16);
      out = lm->forward(batch.input_ids, fo);
    }
    out.loss.backward();
    const double norm = rhine::clip_grad_norm(opt.parameters(), cfg.grad_clip);
    const double loss = out.loss.item<double>();
    if (guard.check(loss, norm).accept) {
      opt.set_lr_scale(schedule(step));
      opt.step();
    }
    loss_ema = step == 0 ? loss : 0.9 * loss_ema + 0.1 * loss;
    if ((step + 1) % cfg.log_every == 0 || step + 1 == cfg.steps) {
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const double tps = double(step + 1) * cfg.batch_size * cfg.seq_len / s;
      std::fprintf(stderr, "\rstep %5lld/%lld  loss %.3f  grad-norm %.2f  lr %.2e  %.0f tok/s  ETA %.0fs   ",
                   static_cast<long long>(step + 1), static_cast<long long>(cfg.steps), loss_ema, norm,
                   cfg.lr * schedule(step), tps, s / (step + 1) * (cfg.steps - step - 1));
    }
  }
  std::fprintf(stderr, "\n");
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const auto after = evaluate(lm, heldout, cfg.seq_len, cfg.bf16);

  std::printf("\nPer-language held-out bits per byte (lower is better; tokenizer-independent)\n");
  std::printf("%-6s %14s %10s %10s %8s\n", "lang", "train tokens", "before", "after", "change");
  for (std::size_t l = 0; l < loader.languages().size(); ++l) {
    const auto& lang = loader.languages()[l];
    if (!before.count(lang)) continue;
    std::printf("%-6s %14lld %10.3f %10.3f %7.1f%%\n", lang.c_str(), static_cast<long long>(lang_tokens[l]),
                before.at(lang), after.at(lang), 100.0 * (after.at(lang) / before.at(lang) - 1));
  }
  std::printf("(%lld steps in %.0f s, %.0f tokens/s, %s, %lld skipped steps)\n",
              static_cast<long long>(cfg.steps), seconds, double(cfg.steps) * cfg.batch_size * cfg.seq_len / seconds,
              cfg.bf16 ? "bf16 autocast" : "fp32", static_cast<long long>(guard.n_skipped()));

  std::printf("\nSamples (prompt in [brackets], sampled with temperature 0.7, top-p 0.9)\n");
  for (const auto& [lang, h] : heldout) {
    const auto& doc = h.docs.front();
    std::vector<std::int64_t> prompt(doc.begin(), doc.begin() + std::min<std::size_t>(doc.size(), 6));
    rhine::nn::GenerateOptions g;
    g.max_new_tokens = cfg.sample_tokens;
    g.temperature = 0.7;
    g.top_p = 0.9;
    g.repetition_penalty = 1.2;
    g.seed = cfg.seed;
    if (tok.eos_id() >= 0) g.stop_tokens = {tok.eos_id()};
    auto res = rhine::nn::generate(lm, {prompt}, g);
    auto ids32 = [](const std::vector<std::int64_t>& v) { return std::vector<std::int32_t>(v.begin(), v.end()); };
    rhine::DecodeOptions dec;
    dec.skip_special = true;
    std::string text = tok.decode(ids32(res.tokens[0]), dec);
    for (auto& ch : text)
      if (ch == '\n') ch = ' ';
    std::printf("%s: [%s] %s\n", lang.c_str(), tok.decode(ids32(prompt), dec).c_str(), text.c_str());
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "\n%s\n", e.what());
  return 1;
}
