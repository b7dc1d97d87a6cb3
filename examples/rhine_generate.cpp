// rhine-generate: text from a model directory through a Rhine tokenizer,
// streamed token by token with a KV cache.
//
//   rhine-generate --model DIR --prompt TEXT [--tokenizer FILE] [--max-new-tokens N]
//                  [--temperature T] [--top-k K] [--top-p P] [--repetition-penalty R]
//                  [--seed S] [--dtype bf16|f32] [--threads N] [--fused] [--ids]
//
// DIR is a Hugging Face model directory (config.json + model.safetensors or
// its shards), a Rhine training checkpoint (`step-N`, which is also one) or a
// Rhine run directory (its newest complete `step-N` is used). The tokenizer
// defaults to DIR's tokenizer.json or tokenizer.model. The prompt gets the
// tokenizer's BOS (as the model saw in training); generation stops at EOS
// (config eos_token_id) or after N tokens. The prompt and the continuation go
// to stdout as they come; the token counts and tokens/s to stderr. Greedy
// when T is 0 (the default). Sampling follows rhine::nn::generate exactly
// (same filters, same seeded stream), so a run is reproducible; ids past the
// tokenizer's vocabulary (padded embedding rows) are never chosen.
#include <ATen/core/grad_mode.h>
#include <CLI/CLI.hpp>

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "rhine/core/error.h"
#include "rhine/core/log.h"
#include "rhine/core/random.h"
#include "rhine/io/checkpoint.h"
#include "rhine/io/hf.h"
#include "rhine/nn/generate.h"
#include "rhine/nn/layers.h"
#include "rhine/nn/model.h"
#include "rhine/tokenizer/tokenizer.h"
#include "rhine/torch/compat.h"
#include "rhine/torch/runtime.h"

namespace fs = std::filesystem;

namespace {

constexpr const char* kTool = "rhine-generate";

// The model directory: DIR itself when it holds config.json, else the newest
// complete checkpoint of a run directory.
fs::path resolve_model_dir(const fs::path& dir) {
  RHINE_CHECK(fs::is_directory(dir), kTool, "model directory not found", dir.string(),
              "pass an HF model directory or a Rhine run / checkpoint directory");
  if (fs::exists(dir / "config.json")) return dir;
  rhine::io::CheckpointOptions o;
  o.dir = dir.string();
  auto latest = rhine::io::CheckpointManager(o).latest();
  RHINE_CHECK(latest.has_value(), kTool, "no config.json and no complete checkpoint in",
              dir.string(), "pass an HF model directory or a Rhine run / checkpoint directory");
  return latest->path;
}

std::string find_tokenizer(const fs::path& model_dir, const fs::path& given) {
  for (const fs::path& d : {model_dir, given, given.parent_path()})
    for (const char* name : {"tokenizer.json", "tokenizer.model"})
      if (!d.empty() && fs::exists(d / name)) return (d / name).string();
  RHINE_FAIL(kTool, "no tokenizer.json or tokenizer.model in", model_dir.string(),
             "pass --tokenizer FILE");
}

// Whether `s` ends inside a UTF-8 sequence or with U+FFFD (a byte-fallback
// character whose remaining bytes are still to come): hold such text back.
bool incomplete_utf8(const std::string& s) {
  if (s.size() >= 3 && s.compare(s.size() - 3, 3, "\xEF\xBF\xBD") == 0) return true;
  for (std::size_t k = 1; k <= std::min<std::size_t>(3, s.size()); ++k) {
    const auto c = static_cast<unsigned char>(s[s.size() - k]);
    if ((c & 0xC0) == 0x80) continue;  // continuation byte: look further back
    const std::size_t need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
    return need > k;
  }
  return false;
}

}  // namespace

int main(int argc, char** argv) try {
  rhine::init_logging();
  std::string model_arg, prompt, tokenizer_path, dtype = "f32", device = "auto";
  rhine::nn::GenerateOptions g;
  g.max_new_tokens = 64;
  int threads = 0;
  bool fused = false, print_ids = false;
  CLI::App app{"rhine-generate: stream text from a Hugging Face model directory or a Rhine checkpoint"};
  app.add_option("--model", model_arg, "HF model directory, Rhine step-N checkpoint or run directory")
      ->required();
  app.add_option("--prompt", prompt, "prompt text")->required();
  app.add_option("--tokenizer", tokenizer_path, "tokenizer.json or tokenizer.model (default: the model directory's)");
  app.add_option("--max-new-tokens", g.max_new_tokens, "tokens to generate at most")->check(CLI::PositiveNumber);
  app.add_option("--temperature", g.temperature, "0 = greedy")->check(CLI::NonNegativeNumber);
  app.add_option("--top-k", g.top_k, "keep the k most likely tokens (0 = all)")->check(CLI::NonNegativeNumber);
  app.add_option("--top-p", g.top_p, "nucleus sampling mass (1 = off)")->check(CLI::Range(0.0, 1.0));
  app.add_option("--repetition-penalty", g.repetition_penalty, "HF/CTRL penalty (1 = off)")
      ->check(CLI::PositiveNumber);
  app.add_option("--seed", g.seed, "sampling seed");
  app.add_option("--dtype", dtype, "model dtype")->check(CLI::IsMember({"f32", "bf16"}));
  app.add_option("--threads", threads, "CPU threads (0 = OMP_NUM_THREADS or all)");
  app.add_option("--device", device, "auto, cpu, cuda or cuda:N");
  app.add_flag("--fused", fused, "use Rhine's fused CPU kernels (RMSNorm, RoPE, SwiGLU)");
  app.add_flag("--ids", print_ids, "also print the generated token ids to stderr");
  CLI11_PARSE(app, argc, argv);

  rhine::RuntimeOptions ro;
  ro.threads = threads;
  ro.device = device;
  const auto runtime = rhine::init_runtime(ro);

  const fs::path dir = resolve_model_dir(model_arg);
  const auto tok = rhine::Tokenizer::load(
      tokenizer_path.empty() ? find_tokenizer(dir, fs::path(model_arg)) : tokenizer_path);

  rhine::io::ImportOptions io;
  io.dtype = dtype == "bf16" ? at::kBFloat16 : at::kFloat;
  io.device = runtime.device;
  io.model.fused_kernels = fused;
  auto t_load = std::chrono::steady_clock::now();
  rhine::nn::CausalLM lm = rhine::io::load_hf_model(dir, io);
  if (fused) rhine::nn::set_fused_kernels(*lm, true);
  lm->eval();
  const auto& config = lm->config();
  const double load_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t_load).count();
  RHINE_CHECK(tok.vocab_size() <= config.vocab_size, kTool,
              "the tokenizer has more tokens than the model's vocabulary",
              std::to_string(tok.vocab_size()) + " > " + std::to_string(config.vocab_size),
              "pass the tokenizer the model was trained with (--tokenizer)");
  g.stop_tokens = config.eos_token_id;
  if (g.stop_tokens.empty() && tok.eos_id() >= 0) g.stop_tokens = {tok.eos_id()};
  g.vocab_limit = tok.vocab_size();  // models often pad the vocabulary past the tokenizer's

  rhine::EncodeOptions eo;
  eo.add_special = true;  // BOS, as in training
  std::vector<std::int32_t> prompt_ids = tok.encode(prompt, eo);
  RHINE_CHECK(!prompt_ids.empty(), kTool, "the prompt encodes to no tokens", prompt,
              "pass a non-empty prompt");
  std::vector<std::int64_t> seen(prompt_ids.begin(), prompt_ids.end());

  // The prompt as the tokenizer reads it back; the continuation is the text
  // that decoding prompt + new tokens adds to it.
  const std::string prompt_text = tok.decode(prompt_ids);
  std::fputs(prompt_text.c_str(), stdout);
  std::fflush(stdout);

  c10::NoGradGuard no_grad;
  const auto dev = runtime.device;
  rhine::nn::KVCache cache = lm->make_cache();
  rhine::nn::ForwardOptions f;
  f.cache = &cache;
  f.last_logits_only = true;
  const auto T = static_cast<std::int64_t>(seen.size());
  f.attention_mask = at::ones({1, T}, at::kBool).to(dev);
  auto t0 = std::chrono::steady_clock::now();
  at::Tensor logits =
      lm->forward(at::tensor(seen, at::kLong).view({1, T}).to(dev), f).logits.select(1, 0);
  f.attention_mask.reset();
  auto t1 = std::chrono::steady_clock::now();
  rhine::Rng rng(g.seed, 0);  // row 0's stream of rhine::nn::generate
  std::vector<std::int32_t> all(prompt_ids);
  std::vector<std::int64_t> generated;
  std::size_t printed = prompt_text.size();
  for (std::int64_t step = 0; step < g.max_new_tokens; ++step) {
    at::Tensor row = logits.to(at::kFloat).cpu()[0];  // [V]
    const std::int64_t next = rhine::nn::sample_token(row, seen, g, rng);
    generated.push_back(next);
    seen.push_back(next);
    all.push_back(static_cast<std::int32_t>(next));
    const bool stop = std::find(g.stop_tokens.begin(), g.stop_tokens.end(), next) !=
                      g.stop_tokens.end();
    rhine::DecodeOptions d;
    d.skip_special = true;
    const std::string text = tok.decode(all, d);
    if ((!incomplete_utf8(text) || stop) && text.size() > printed) {
      std::fwrite(text.data() + printed, 1, text.size() - printed, stdout);
      std::fflush(stdout);
      printed = text.size();
    }
    if (stop || step + 1 == g.max_new_tokens) break;
    logits = lm->forward(at::full({1, 1}, next, at::kLong).to(dev), f).logits.select(1, 0);
  }
  std::fputc('\n', stdout);
  auto t2 = std::chrono::steady_clock::now();
  const double prefill_s = std::chrono::duration<double>(t1 - t0).count();
  const double decode_s = std::chrono::duration<double>(t2 - t1).count();
  if (print_ids) {
    std::string s;
    for (auto id : generated) s += (s.empty() ? "" : " ") + std::to_string(id);
    std::fprintf(stderr, "[%s] ids: %s\n", kTool, s.c_str());
  }
  std::fprintf(stderr,
               "[%s] %s (%s, %lld parameters, loaded in %.2f s); %lld prompt tokens in %.3f s "
               "(%.1f tok/s); %zu new tokens in %.3f s (%.1f tok/s)\n",
               kTool, dir.string().c_str(), dtype.c_str(),
               static_cast<long long>(lm->num_parameters()), load_s, static_cast<long long>(T),
               prefill_s, T / std::max(prefill_s, 1e-9), generated.size(), decode_s,
               generated.size() / std::max(decode_s, 1e-9));
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "%s\n", e.what());
  return 1;
}
