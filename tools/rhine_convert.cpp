// rhine-convert: Hugging Face model directories <-> Rhine training checkpoints,
// dtype changes, and the porter's question "do my logits match?".
//
//   rhine-convert hf-to-rhine --model HF_DIR --out RUN_DIR [--step N]
//   rhine-convert rhine-to-hf --checkpoint RUN_DIR|STEP_DIR --out HF_DIR [--dtype bf16] [--tokenizer-from DIR]
//   rhine-convert dtype --model HF_DIR --out HF_DIR --to bf16|f16|f32
//   rhine-convert logits --model HF_DIR --ids FILE --out OUT.safetensors
//   rhine-convert extend-vocab --model HF_DIR|STEP_DIR --tokenizer EXTENDED.model --out HF_DIR
//       [--init mean|focus|random] [--text TARGET.txt ...] [--base-tokenizer BASE.model]
//   rhine-convert to-gguf --model HF_DIR|STEP_DIR --out FILE.gguf [--type f32|f16|bf16|q8_0] [--tokenizer FILE]
//
// A training checkpoint written here is a complete `step-N` directory of
// rhine/io/checkpoint.h holding config.json, model.safetensors (the float32
// weights under their HF names), generation_config.json and the tokenizer
// files; optimizer and loader state start fresh. rhine-to-hf reads
// config.json + model.safetensors of the newest complete checkpoint of a run
// directory (or of the given step directory); a sharded checkpoint of an FSDP
// run (shards.json) is exported tensor by tensor, never whole in memory.
//
// logits: runs the model in float32 on the token ids in FILE (one sequence
// per line, space-separated) and writes each sequence's logits as a float32
// tensor `logits.N` [T, vocab], N counting lines from 0.
//
// extend-vocab: the model grown to an extended tokenizer's vocabulary (rhine-tokenizer
// extend), the new rows of its embedding and head initialised (rhine/io/vocab.h).
//
// to-gguf: a Llama / Mistral model with its vocabulary as one
// GGUF file for llama.cpp (rhine/io/gguf.h says what is written).
#include <ATen/core/grad_mode.h>
#include <CLI/CLI.hpp>

#include <ATen/ATen.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "rhine/core/error.h"
#include "rhine/core/file.h"
#include "rhine/core/json.h"
#include "rhine/core/log.h"
#include "rhine/io/checkpoint.h"
#include "rhine/io/gguf.h"
#include "rhine/io/hf.h"
#include "rhine/io/safetensors.h"
#include "rhine/io/vocab.h"
#include "rhine/torch/runtime.h"

namespace fs = std::filesystem;

namespace {

constexpr const char* kTool = "rhine-convert";
std::vector<std::vector<std::int64_t>> read_ids(const std::string& path, std::int64_t vocab) {
  const std::string text = rhine::read_file(path, kTool);
  std::vector<std::vector<std::int64_t>> rows;
  std::istringstream in(text);
  std::string line;
  std::size_t n = 0;
  while (std::getline(in, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    std::vector<std::int64_t> row;
    std::istringstream ls(line);
    std::string tok;
    while (ls >> tok) {
      std::size_t used = 0;
      long long v = 0;
      try {
        v = std::stoll(tok, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      RHINE_CHECK(used == tok.size(), kTool, "not a token id on line " + std::to_string(n) + " of " + path, tok,
                  "one sequence per line, ids separated by spaces");
      RHINE_CHECK(v >= 0 && v < vocab, kTool, "token id out of range on line " + std::to_string(n) + " of " + path,
                  v, "ids must be in [0, " + std::to_string(vocab) + ")");
      row.push_back(v);
    }
    RHINE_CHECK(!row.empty(), kTool, "empty line in " + path, "line " + std::to_string(n),
                "every line is one sequence of at least one id");
    rows.push_back(std::move(row));
    ++n;
  }
  RHINE_CHECK(!rows.empty(), kTool, "no sequences in", path, "one sequence per line");
  return rows;
}

int cmd_logits(const std::string& model, const std::string& ids_file, const std::string& out, bool fp8) {
  rhine::io::ImportOptions io;
  io.dtype = at::kFloat;
  io.dequantize_fp8 = fp8;
  auto lm = rhine::io::load_hf_model(model, io);
  lm->eval();
  const auto rows = read_ids(ids_file, lm->config().vocab_size);
  std::map<std::string, at::Tensor> logits;
  at::NoGradGuard no_grad;
  for (std::size_t i = 0; i < rows.size(); ++i) {
    at::Tensor ids = at::tensor(rows[i], at::kLong).view({1, -1});  // [1, T]
    logits["logits." + std::to_string(i)] = lm->forward(ids).logits[0].to(at::kFloat).contiguous();  // [T, V]
  }
  rhine::save_safetensors(out, logits);
  std::printf("wrote %zu sequences of logits [T, %lld] to %s\n", rows.size(),
              static_cast<long long>(lm->config().vocab_size), out.c_str());
  return 0;
}

int cmd_dtype(const std::string& model, const std::string& out, const std::string& to, bool overwrite,
              std::uint64_t shard) {
  const at::ScalarType dt = rhine::io::parse_hf_dtype(to);
  rhine::io::ImportOptions io;
  io.dtype = dt;
  auto lm = rhine::io::load_hf_model(model, io);
  rhine::io::ExportOptions eo;
  eo.dtype = dt;
  eo.overwrite = overwrite;
  eo.max_shard_bytes = shard;
  eo.tokenizer_from = model;
  auto files = rhine::io::save_hf_model(lm, out, eo);
  std::printf("wrote %s (%s, %zu files)\n", out.c_str(), rhine::io::hf_dtype_name(dt).c_str(), files.size());
  return 0;
}

int cmd_hf_to_rhine(const std::string& model, const std::string& out, std::int64_t step, bool fp8) {
  rhine::io::ImportOptions io;
  io.dequantize_fp8 = fp8;
  auto lm = rhine::io::load_hf_model(model, io);  // float32 master weights
  rhine::io::CheckpointOptions co;
  co.dir = out;
  co.keep_last = 0;
  rhine::io::CheckpointManager mgr(co);
  auto w = mgr.begin(step);
  std::map<std::string, at::Tensor> tensors;
  for (auto& [name, t] : rhine::io::hf_state_dict(*lm)) tensors[name] = t;
  rhine::save_safetensors(w.path("model.safetensors"), tensors);
  lm->config().save(w.path("config.json"));
  for (const std::string& f : rhine::io::hf_tokenizer_files())
    if (fs::is_regular_file(fs::path(model) / f))
      rhine::write_file_atomic(w.path(f), rhine::read_file((fs::path(model) / f).string(), kTool));
  const fs::path done = w.commit();
  std::printf("wrote %s (%zu tensors)\n", done.c_str(), tensors.size());
  return 0;
}

int cmd_rhine_to_hf(const std::string& checkpoint, const std::string& out, const std::string& dtype,
                    const std::string& tokenizer_from, bool overwrite, std::uint64_t shard) {
  fs::path step_dir = checkpoint;
  if (!fs::exists(step_dir / "config.json")) {
    rhine::io::CheckpointOptions co;
    co.dir = checkpoint;
    RHINE_CHECK(fs::is_directory(checkpoint), kTool, "no such checkpoint directory", checkpoint,
                "pass a run directory (its newest checkpoint is used) or a step-N directory");
    auto latest = rhine::io::CheckpointManager(co).latest();
    RHINE_CHECK(latest.has_value(), kTool, "no complete checkpoint in", checkpoint,
                "pass a run directory with step-N checkpoints, or a step directory holding config.json");
    step_dir = latest->path;
  } else {
    const std::string why = rhine::io::CheckpointManager::check(step_dir, /*verify_checksums=*/true);
    RHINE_CHECK(why.empty(), kTool, "incomplete or damaged checkpoint " + step_dir.string(), why,
                "use another step");
  }
  rhine::io::ExportOptions eo;
  if (!dtype.empty()) eo.dtype = rhine::io::parse_hf_dtype(dtype);
  eo.overwrite = overwrite;
  eo.max_shard_bytes = shard;
  eo.tokenizer_from = tokenizer_from.empty() ? step_dir : fs::path(tokenizer_from);
  if (fs::exists(step_dir / "shards.json")) {  // an FSDP checkpoint: tensor by tensor, never the whole model
    auto files = rhine::io::export_row_shards_to_hf(step_dir, out, eo);
    std::printf("wrote %s from the sharded checkpoint %s (%zu files)\n", out.c_str(), step_dir.c_str(), files.size());
    return 0;
  }
  RHINE_CHECK(fs::exists(step_dir / "model.safetensors"), kTool, "the checkpoint holds no model.safetensors",
              step_dir.string(), "rhine-to-hf reads config.json + model.safetensors of a checkpoint");
  if (fs::exists(step_dir / "trainer.json")) {
    const auto state = rhine::read_json_file((step_dir / "trainer.json").string(), kTool);
    RHINE_CHECK(!state.contains("frozen"), kTool,
                "the checkpoint holds only the trained parameters (e.g. LoRA adapters) of a run on a frozen base",
                state.contains("frozen") ? state["frozen"].value("source", std::string("?")) : std::string(),
                "rhine-finetune writes the merged HF model (export_dir) and the PEFT adapter (out_dir/adapter) at "
                "the end of a run; to resume, run it again with the same base model");
  }
  auto lm = rhine::io::load_hf_model(step_dir);
  auto files = rhine::io::save_hf_model(lm, out, eo);
  std::printf("wrote %s from %s (%zu files)\n", out.c_str(), step_dir.c_str(), files.size());
  return 0;
}

int cmd_extend_vocab(const std::string& model, const std::string& out, const std::string& tokenizer,
                     const rhine::io::VocabResizeOptions& o) {
  const auto v = rhine::io::extend_hf_vocabulary(model, out, tokenizer, o);
  std::printf("wrote %s: vocab_size %lld, new rows initialised by \"%s\"\n", out.c_str(), static_cast<long long>(v),
              o.init.c_str());
  return 0;
}

int cmd_to_gguf(const std::string& model, const std::string& out, const std::string& type,
               const std::string& tokenizer) {
  rhine::io::GgufExportOptions o;
  const auto t = rhine::ggml_type_from_name(type);
  RHINE_CHECK(t.has_value(), kTool, "unknown GGUF type", type, "use f32, f16, bf16 or q8_0");
  o.type = *t;
  if (!tokenizer.empty()) o.tokenizer = tokenizer;
  const auto r = rhine::io::export_hf_to_gguf(model, out, o);
  std::printf("wrote %s: %lld tensors, %lld parameters, %.1f MB of tensor data (%s), vocabulary %lld (%lld padding)\n",
              out.c_str(), static_cast<long long>(r.tensors), static_cast<long long>(r.parameters),
              static_cast<double>(r.tensor_bytes) / 1e6, type.c_str(), static_cast<long long>(r.vocab),
              static_cast<long long>(r.padded_tokens));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"rhine-convert: HF model directories <-> Rhine checkpoints, dtypes, logits, vocabulary growth, GGUF"};
  app.require_subcommand(1);
  int threads = 0;
  app.add_option("--threads", threads, "LibTorch threads (0: default)");

  std::string model, out, ids, checkpoint, dtype, to, tokenizer_from;
  std::int64_t step = 0;
  bool overwrite = false, fp8 = false;
  std::uint64_t shard = 5'000'000'000;

  auto* h2r = app.add_subcommand("hf-to-rhine", "HF directory -> Rhine training checkpoint (step-N)");
  h2r->add_option("--model", model, "HF model directory")->required();
  h2r->add_option("--out", out, "run directory of checkpoints")->required();
  h2r->add_option("--step", step, "step number of the checkpoint")->capture_default_str();
  h2r->add_flag("--dequantize-fp8", fp8, "decode float8 block-scaled weights");

  auto* r2h = app.add_subcommand("rhine-to-hf", "Rhine training checkpoint -> HF directory");
  r2h->add_option("--checkpoint", checkpoint, "run directory (newest checkpoint) or step-N directory")->required();
  r2h->add_option("--out", out, "HF output directory")->required();
  r2h->add_option("--dtype", dtype, "float32, bfloat16/bf16, float16/f16 (default: as stored)");
  r2h->add_option("--tokenizer-from", tokenizer_from, "copy tokenizer files from here (default: the checkpoint)");
  r2h->add_flag("--overwrite", overwrite, "replace an existing output directory");
  r2h->add_option("--max-shard-bytes", shard, "shard above this many bytes (0: one file)")->capture_default_str();

  auto* dt = app.add_subcommand("dtype", "HF directory -> HF directory in another dtype");
  dt->add_option("--model", model, "HF model directory")->required();
  dt->add_option("--out", out, "HF output directory")->required();
  dt->add_option("--to", to, "bf16, f16 or f32")->required();
  dt->add_flag("--overwrite", overwrite, "replace an existing output directory");
  dt->add_option("--max-shard-bytes", shard, "shard above this many bytes (0: one file)")->capture_default_str();

  auto* lg = app.add_subcommand("logits", "float32 logits of token id sequences (one per line)");
  lg->add_option("--model", model, "HF model directory")->required();
  lg->add_option("--ids", ids, "token ids: one sequence per line, space-separated")->required();
  lg->add_option("--out", out, "output .safetensors (tensors logits.N [T, vocab])")->required();
  lg->add_flag("--dequantize-fp8", fp8, "decode float8 block-scaled weights");

  rhine::io::VocabResizeOptions vo;
  std::string base_tok;
  auto* ev = app.add_subcommand("extend-vocab", "grow a model to an extended tokenizer (rhine-tokenizer extend)");
  ev->add_option("--model", model, "HF model directory or Rhine step-N checkpoint")->required();
  ev->add_option("--tokenizer", tokenizer_from, "the extended tokenizer (.model or tokenizer.json from rhine-tokenizer extend)")->required();
  ev->add_option("--out", out, "HF output directory")->required();
  ev->add_option("--base-tokenizer", base_tok, "the tokenizer the model was trained with (default: the model's tokenizer.model, else its tokenizer.json)");
  ev->add_option("--init", vo.init,
                 "new rows: mean (of the base pieces spelling the token), focus (similar base tokens, weighted; "
                 "needs --text) or random")
      ->capture_default_str();
  std::vector<std::string> focus_text;
  ev->add_option("--text", focus_text, "--init focus: target-language text files the auxiliary vectors learn from");
  ev->add_option("--focus-epochs", vo.focus_epochs, "--init focus: passes over the text")->capture_default_str();
  ev->add_option("--seed", vo.seed, "seed of --init random")->capture_default_str();
  ev->add_flag("--overwrite", vo.overwrite, "replace an existing output directory");

  std::string gguf_type = "f16";
  auto* gg = app.add_subcommand("to-gguf", "Llama / Mistral HF directory -> GGUF file for llama.cpp");
  gg->add_option("--model", model, "HF model directory or Rhine step-N checkpoint")->required();
  gg->add_option("--out", out, "output .gguf file")->required();
  gg->add_option("--type", gguf_type, "type of the weight matrices: f32, f16, bf16 or q8_0")->capture_default_str();
  gg->add_option("--tokenizer", tokenizer_from, "SentencePiece .model or byte-level BPE tokenizer.json (default: the model directory's)");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    rhine::init_logging();
    rhine::set_threads(threads);
    if (*h2r) return cmd_hf_to_rhine(model, out, step, fp8);
    if (*r2h) return cmd_rhine_to_hf(checkpoint, out, dtype, tokenizer_from, overwrite, shard);
    if (*dt) return cmd_dtype(model, out, to, overwrite, shard);
    if (*ev) {
      vo.base_tokenizer = base_tok;
      vo.focus_text.assign(focus_text.begin(), focus_text.end());
      return cmd_extend_vocab(model, out, tokenizer_from, vo);
    }
    if (*gg) return cmd_to_gguf(model, out, gguf_type, tokenizer_from);
    return cmd_logits(model, ids, out, fp8);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
