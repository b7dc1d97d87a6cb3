// rhine-plan: per-rank memory and an estimated step time, tokens/s and MFU for
// a model under a layout on a device kind (rhine/plan/plan.h; the formulas and
// the device table in docs/plan.md).
//
//   rhine-plan CONFIG.json [--dp N] [--fsdp N] [--ep N] [--zero 0|1|2|3]
//              [--seq N] [--micro-batch N] [--accum N] [--checkpointing]
//              [--fp32] [--param-dtype bf16|fp32] [--keep-after-forward]
//              [--gpu H100|H200|GH200|GH200-144|MI250X|MI300A|cpu] [--efficiency F]
//              [--vocab N] [--json]
//   rhine-plan --list-devices
//
// CONFIG.json is a Hugging Face config.json, a model directory holding one, or
// a run config of rhine-train / rhine-finetune: its "model" (an object of
// config.json keys, or a path), or its "base_model" directory, gives the
// model; seq_len, batch_size (global rows per micro-step), grad_accum, bf16,
// zero1 and the "parallel" block {zero, fsdp, ep, reshard_after_forward,
// param_dtype} give the layout (run config: zero 2/3 shard over fsdp ranks,
// or --dp ranks when fsdp is left out). Flags override the file. A run
// config's model without vocab_size takes it from its tokenizer, or --vocab.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>

#include "rhine/core/error.h"
#include "rhine/core/json.h"
#include "rhine/nn/config.h"
#include "rhine/plan/plan.h"
#include "rhine/tokenizer/tokenizer.h"

namespace fs = std::filesystem;

namespace {

constexpr const char* kTool = "rhine-plan";

/// config.json of `path`: the file itself or `path`/config.json.
std::string config_file(const std::string& path) {
  if (fs::is_directory(path)) {
    const auto f = fs::path(path) / "config.json";
    RHINE_CHECK(fs::exists(f), kTool, "the model directory has no config.json", path,
                "pass a config.json, a model directory or a run config");
    return f.string();
  }
  return path;
}

struct Input {
  rhine::nn::ModelConfig model;
  rhine::plan::Layout layout;
  std::optional<std::int64_t> global_batch;  ///< a run config's batch_size
  bool fsdp_given = false;
};

/// Reads a config.json or a run config (the keys rhine/train/run.h reads).
Input read_input(const std::string& path, std::optional<std::int64_t> vocab) {
  Input in;
  const std::string file = config_file(path);
  rhine::Json j = rhine::read_json_file(file, kTool);
  RHINE_CHECK(j.is_object(), kTool, "the config is not a JSON object", file, "pass a config.json or a run config");
  const bool run = j.contains("model") || j.contains("base_model");
  if (!run) {
    if (vocab) j["vocab_size"] = *vocab;
    in.model = rhine::nn::ModelConfig::from_json(j);
    return in;
  }
  rhine::Json model;
  if (j.contains("model") && j["model"].is_object()) {
    model = j["model"];
  } else {
    const std::string rel = j.contains("model") ? j["model"].get<std::string>() : j["base_model"].get<std::string>();
    fs::path p(rel);
    if (p.is_relative() && !fs::exists(p)) p = fs::path(file).parent_path() / p;
    model = rhine::read_json_file(config_file(p.string()), kTool);
  }
  if (vocab) {
    model["vocab_size"] = *vocab;
  } else if (!model.contains("vocab_size")) {
    const std::string tok = j.value("tokenizer", std::string());
    RHINE_CHECK(!tok.empty() && fs::exists(tok), kTool,
                "the run config's model has no vocab_size and its tokenizer is not at hand: tokenizer", tok,
                "pass --vocab N (rhine-train takes the tokenizer's vocabulary size)");
    model["vocab_size"] = rhine::Tokenizer::load(tok).vocab_size();
  }
  in.model = rhine::nn::ModelConfig::from_json(model);
  auto& l = in.layout;
  l.seq_len = j.value("seq_len", l.seq_len);
  l.grad_accum = j.value("grad_accum", l.grad_accum);
  l.bf16 = j.value("bf16", true);
  l.activation_checkpointing = j.value("activation_checkpointing", l.activation_checkpointing);
  if (j.contains("batch_size")) in.global_batch = j["batch_size"].get<std::int64_t>();
  if (j.value("zero1", false)) l.zero = 1;
  if (j.contains("parallel")) {
    rhine::JsonFields pf(j["parallel"], std::string(kTool) + " parallel");
    const int fsdp = pf.get("fsdp", 0);
    l.zero = pf.get("zero", fsdp > 0 ? 3 : l.zero);
    l.ep = pf.get("ep", l.ep);
    l.reshard_after_forward = pf.get("reshard_after_forward", l.reshard_after_forward);
    pf.get("prefetch", true);
    l.param_dtype = pf.get("param_dtype", l.param_dtype);
    pf.reject_unknown();
    if (fsdp > 0) {
      l.fsdp = fsdp;
      in.fsdp_given = true;
    }
  }
  return in;
}

std::string dtype_name(const std::string& s) {
  if (s == "bf16" || s == "bfloat16") return "bfloat16";
  if (s == "fp32" || s == "f32" || s == "float32") return "float32";
  RHINE_FAIL(kTool, "--param-dtype must be bf16 or fp32", s, "the dtype FSDP gathers weights in");
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"rhine-plan: per-rank memory, step time, tokens/s and MFU of a layout (docs/plan.md)"};
  std::string config;
  std::optional<int> dp, fsdp, ep, zero;
  std::optional<std::int64_t> seq, micro_batch, accum, vocab;
  std::optional<std::string> param_dtype;
  std::string gpu = "H100";
  double efficiency = 0.5;
  bool checkpointing = false, fp32 = false, keep = false, json = false, list = false;
  app.add_option("config", config, "config.json, a model directory, or a rhine-train/rhine-finetune run config");
  app.add_option("--dp", dp, "data-parallel replicas (zero 0/1: the ranks; zero 2/3: replicas of the fsdp group)");
  app.add_option("--fsdp", fsdp, "ranks that shard (zero 2/3)");
  app.add_option("--ep", ep, "expert-parallel degree");
  app.add_option("--zero", zero, "0 data parallel, 1 ZeRO-1, 2 FSDP ZeRO-2, 3 FSDP ZeRO-3 (default 3 with --fsdp)");
  app.add_option("--seq", seq, "tokens per row (sequence length)");
  app.add_option("--micro-batch", micro_batch, "rows per rank and micro-step");
  app.add_option("--accum", accum, "micro-steps per optimizer step");
  app.add_flag("--checkpointing", checkpointing, "activation checkpointing");
  app.add_flag("--fp32", fp32, "fp32 activations (no bf16 autocast)");
  app.add_option("--param-dtype", param_dtype, "FSDP's gathered weights: bf16 or fp32");
  app.add_flag("--keep-after-forward", keep, "ZeRO-3: keep gathered blocks until backward");
  app.add_option("--gpu,--device", gpu, "device kind (--list-devices)");
  app.add_option("--efficiency", efficiency, "fraction of peak FLOP/s the matmuls reach (assumed)");
  app.add_option("--vocab", vocab, "vocab_size, when the config has none");
  app.add_flag("--json", json, "print JSON");
  app.add_flag("--list-devices", list, "print the device table");
  CLI11_PARSE(app, argc, argv);
  try {
    if (list) {
      std::printf("%-10s %9s %11s %12s %12s %6s  %s\n", "kind", "memory GB", "peak TFLOP/s", "intra GB/s", "inter GB/s",
                  "/node", "what");
      for (const auto& k : rhine::plan::device_kinds())
        std::printf("%-10s %9.0f %11.1f %12.1f %12.1f %6d  %s\n", k.name.c_str(), k.memory_bytes / 1e9,
                    k.peak_flops / 1e12, k.intra_node_bytes_per_s / 1e9, k.inter_node_bytes_per_s / 1e9,
                    k.devices_per_node, k.description.c_str());
      return 0;
    }
    RHINE_CHECK(!config.empty(), kTool, "expected a config file", "nothing",
                "usage: rhine-plan CONFIG.json [--fsdp 8 --seq 8192 --micro-batch 2 --gpu H100] (--help)");
    Input in = read_input(config, vocab);
    auto& l = in.layout;
    if (zero) l.zero = *zero;
    else if (fsdp && l.zero < 2) l.zero = 3;
    if (fsdp) {
      l.fsdp = *fsdp;
      in.fsdp_given = true;
    }
    if (dp) l.dp = *dp;
    // A run config under zero 2/3 without "fsdp": the ranks (--dp) all shard, as rhine-train does.
    if (l.zero >= 2 && !in.fsdp_given && dp) {
      l.fsdp = *dp;
      l.dp = 1;
    }
    if (ep) l.ep = *ep;
    if (seq) l.seq_len = *seq;
    if (accum) l.grad_accum = *accum;
    if (micro_batch) {
      l.micro_batch = *micro_batch;
    } else if (in.global_batch) {
      RHINE_CHECK(*in.global_batch % l.ranks() == 0, kTool, "the run config's batch_size must divide by the ranks",
                  std::to_string(*in.global_batch) + " rows over " + std::to_string(l.ranks()) + " ranks",
                  "pick --dp/--fsdp dividing batch_size, or pass --micro-batch");
      l.micro_batch = *in.global_batch / l.ranks();
    }
    if (checkpointing) l.activation_checkpointing = true;
    if (fp32) l.bf16 = false;
    if (param_dtype) l.param_dtype = dtype_name(*param_dtype);
    if (keep) l.reshard_after_forward = false;
    l.device = gpu;
    l.compute_efficiency = efficiency;
    const auto p = rhine::plan::plan(in.model, l);
    if (json)
      std::printf("%s\n", p.to_json().dump(2).c_str());
    else
      std::printf("%s", p.to_text().c_str());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
