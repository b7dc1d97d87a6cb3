// rhine::plan (the rhine-plan planner): parameter shapes and counts against
// constructed models of every architecture, per-rank shards against a real
// 2-rank FSDP, the memory and time formulas on hand-computed cases, and the
// errors for bad layouts and configs.
#include "torch_test.h"  // LibTorch, then Catch (its CHECK, not glog's)

#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "rhine/core/error.h"
#include "rhine/core/json.h"
#include "rhine/dist/sharded_optimizer.h"
#include "rhine/nn/model.h"
#include "rhine/plan/plan.h"
#include "ranks.h"
#include "test_util.h"
#include "tiny_config.h"

namespace {

using rhine::nn::ModelConfig;
using rhine::plan::Layout;

std::string source(const std::string& rel) { return std::string(RHINE_SOURCE_DIR) + "/" + rel; }

/// Variants of the tiny configs that exercise every branch of the shapes.
std::vector<std::pair<std::string, ModelConfig>> configs_under_test() {
  std::vector<std::pair<std::string, ModelConfig>> out;
  for (const char* arch : {"llama", "mistral", "apertus", "deepseek_v2", "deepseek_v3"})
    out.emplace_back(arch, rhine::test::tiny_config(arch));
  auto tied = rhine::test::tiny_config("llama");
  tied.tie_word_embeddings = true;
  tied.attention_bias = true;
  tied.mlp_bias = true;
  out.emplace_back("llama tied + biases", tied);
  auto apertus = rhine::test::tiny_config("apertus");
  apertus.hidden_act = "xielu";
  apertus.qk_norm = true;
  apertus.mlp_bias = true;
  out.emplace_back("apertus xielu + qk_norm", apertus);
  auto v3 = rhine::test::tiny_config("deepseek_v3");
  v3.q_lora_rank.reset();
  v3.n_shared_experts = 0;
  v3.num_hidden_layers = 4;
  v3.moe_layer_freq = 2;
  v3.num_nextn_predict_layers = 2;
  v3.attention_bias = true;
  v3.tie_word_embeddings = true;
  out.emplace_back("deepseek_v3 no q_lora, freq 2, MTP 2, tied", v3);
  auto v2 = rhine::test::tiny_config("deepseek_v2");
  v2.n_shared_experts = 2;
  v2.first_k_dense_replace = 0;
  out.emplace_back("deepseek_v2 2 shared, all MoE", v2);
  return out;
}

bool near(double a, double b, double rel = 1e-12) { return std::abs(a - b) <= rel * std::max(1.0, std::abs(b)); }

}  // namespace

TEST_CASE("parameter shapes are a constructed CausalLM's named parameters, in order", "[plan]") {
  for (const auto& [what, config] : configs_under_test()) {
    INFO(what);
    rhine::nn::CausalLM lm(config);
    const auto shapes = rhine::plan::parameter_shapes(config);
    const auto real = lm->named_parameters();
    REQUIRE(shapes.size() == real.size());
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      INFO(real[i].key());
      CHECK(shapes[i].name == real[i].key());
      CHECK(shapes[i].shape == real[i].value().sizes().vec());
    }
    const auto n = rhine::plan::count_parameters(config);
    CHECK(n.total == lm->num_parameters());
    CHECK(n.total == rhine::nn::parameter_count(config));
    CHECK(n.total - n.embedding == lm->num_parameters(false));
    CHECK(n.active == rhine::nn::active_parameter_count(config));
    std::int64_t routed = 0;
    for (const auto& p : lm->named_parameters())
      if (p.key().find(".mlp.experts.") != std::string::npos) routed += p.value().numel();
    CHECK(n.routed_experts == routed);
  }
}

TEST_CASE("parameter counts of real configs: the demo model built, DeepSeek-V3 671B / 37B", "[plan]") {
  // The demo MoE model (MLA, 8 routed + 1 shared experts, MTP), built.
  auto run = rhine::read_json_file(source("examples/configs/demo-moe.json"), "test");
  auto model = run["model"];
  model["vocab_size"] = 8000;
  const auto demo = ModelConfig::from_json(model);
  rhine::nn::CausalLM lm(demo);
  CHECK(rhine::plan::count_parameters(demo).total == lm->num_parameters());

  // DeepSeek-V3 (not built): 671B without the MTP module and 37B activated
  // (the technical report's figures; 37B counts the input embedding out, as
  // tests/nn/test_mtp.cpp does), 11.6B more for the MTP module (its embedding
  // and head are the model's).
  const auto v3 = ModelConfig::from_file(source("tests/fixtures/nn/configs/deepseek-v3.json"));
  const auto n = rhine::plan::count_parameters(v3);
  CHECK(n.total == rhine::nn::parameter_count(v3));
  CHECK(n.active == rhine::nn::active_parameter_count(v3));
  CHECK(std::round((n.total - n.mtp) / 1e9) == 671);
  CHECK((n.active - v3.vocab_size * v3.hidden_size) / 1e9 == Approx(37).margin(0.5));
  CHECK(std::round(n.mtp / 1e9) == 12);  // one MoE block + eh_proj + norms (the embedding and head are shared)
}

TEST_CASE("per-rank shards equal FSDP::memory() of a real 2-rank ZeRO-3 run", "[plan]") {
  for (const char* arch : {"llama", "deepseek_v3"}) {
    INFO(arch);
    rhine::test::TempDir dir("plan_fsdp");
    const auto exits = rhine::test::run_ranks(RHINE_PLAN_WORKER, dir, "w", 2, {"--arch", arch});
    REQUIRE(rhine::test::all_ok(exits));
    std::int64_t largest_shard = 0, model = 0, largest_unit = 0;
    for (int r = 0; r < 2; ++r) {
      const auto j = rhine::read_json_file(dir.file("w.rank" + std::to_string(r) + ".json"), "test");
      largest_shard = std::max(largest_shard, j["shard_elements"].get<std::int64_t>());
      model = j["model_elements"].get<std::int64_t>();
      largest_unit = j["largest_unit_elements"].get<std::int64_t>();
    }
    const auto config = rhine::test::tiny_config(arch);
    Layout l;
    l.zero = 3;
    l.fsdp = 2;
    l.bf16 = false;
    l.device = "cpu";
    const auto p = rhine::plan::plan(config, l);
    CHECK(p.params.total == model);
    CHECK(p.memory.parameters == 4.0 * static_cast<double>(largest_shard));  // fp32 shards, the larger rank
    CHECK(p.memory.optimizer == 8.0 * static_cast<double>(largest_shard));
    CHECK(std::max(p.params.largest_block, p.params.root_unit) == largest_unit);
  }
}

TEST_CASE("ZeRO-1's optimizer share is dist::ShardedOptimizer's partition", "[plan]") {
  const auto config = rhine::test::tiny_config("deepseek_v2");
  rhine::nn::CausalLM lm(config);
  rhine::NamedParameters params;
  for (const auto& p : lm->named_parameters()) params.push_back({p.key(), p.value()});
  for (int n : {2, 3, 4}) {
    const auto owners = rhine::dist::partition_parameters(params, n);
    std::vector<std::int64_t> load(static_cast<std::size_t>(n), 0);
    for (std::size_t i = 0; i < params.size(); ++i) load[static_cast<std::size_t>(owners[i])] += params[i].tensor.numel();
    Layout l;
    l.zero = 1;
    l.dp = n;
    const auto p = rhine::plan::plan(config, l);
    CHECK(p.memory.optimizer == 8.0 * static_cast<double>(*std::max_element(load.begin(), load.end())));
    CHECK(p.memory.parameters == 4.0 * static_cast<double>(p.params.total));  // weights stay whole
  }
}

TEST_CASE("memory formulas on a hand-computed model", "[plan]") {
  // llama tiny: V 32, C 16, I 24, L 2, H = Hkv = 2, D 8, untied.
  // P = 512 (embed) + 2 x (32 norms + 1024 attention + 1152 MLP) + 16 + 512 (head) = 5456.
  const auto c = rhine::test::tiny_config("llama");
  REQUIRE(rhine::plan::count_parameters(c).total == 5456);
  Layout l;
  l.bf16 = false;
  l.seq_len = 8;
  l.micro_batch = 2;
  l.dp = 2;
  l.device = "cpu";
  // Activations per token, fp32 (docs/plan.md): block = 2 x 3 x 4C (norms)
  // + 4(HD + 2HkvD) + 4(HD + HkvD) + 4HD + 4H + 4HD + 16I = 1224; x 2 blocks
  // + head 3 x 4C + 12V = 576 -> 3024.
  CHECK(rhine::plan::activation_bytes_per_token(c, l) == 3024);
  l.bf16 = true;  // a = 2, the norms' bf16 copies: 448 + 232 + 192 = 872 per block, head 192 + 10V
  CHECK(rhine::plan::activation_bytes_per_token(c, l) == 2 * 872 + 512);
  l.bf16 = false;
  l.activation_checkpointing = true;  // block inputs (4C each) + one block + head
  CHECK(rhine::plan::activation_bytes_per_token(c, l) == 2 * 4 * 16 + 1224 + 576);
  l.activation_checkpointing = false;

  auto p = rhine::plan::plan(c, l);  // data parallel on 2 ranks
  CHECK(p.memory.parameters == 4 * 5456);
  CHECK(p.memory.gradients == 4 * 5456);
  CHECK(p.memory.communication == 4 * 5456);  // GradientSync's buckets
  CHECK(p.memory.optimizer == 8 * 5456);
  CHECK(p.memory.activations == 3024 * 16);
  const double baseline = rhine::plan::device_kind("cpu").baseline_bytes;
  CHECK(near(p.memory.peak_bytes, baseline + 20 * 5456 + 3024 * 16));
  l.dp = 1;
  CHECK(rhine::plan::plan(c, l).memory.communication == 0);  // one rank: no buckets

  // ZeRO-3 on 2 ranks: every parameter's rows halve (all row counts are even here).
  l.zero = 3;
  l.fsdp = 2;
  p = rhine::plan::plan(c, l);
  CHECK(p.memory.parameters == 4 * 5456 / 2);
  CHECK(p.memory.optimizer == 8 * 5456 / 2);
  const double root = 512 + 16 + 512, block = 2208;
  CHECK(p.memory.gradients == 4 * 5456 / 2 + 4 * root);
  CHECK(p.memory.communication == 8 * block + 4 * (root + 2 * block));
  l.param_dtype = "bfloat16";  // gathered in 2 bytes
  CHECK(rhine::plan::plan(c, l).memory.communication == 8 * block + 2 * (root + 2 * block));
  l.param_dtype = "float32";
  l.grad_accum = 4;  // no_sync's full-size accumulators
  CHECK(rhine::plan::plan(c, l).memory.gradients == 4 * 5456 / 2 + 4 * root + 4 * 5456);
  l.grad_accum = 1;
  l.zero = 2;  // replicated gathered weights on top of the shards
  CHECK(rhine::plan::plan(c, l).memory.parameters == 4 * 5456 / 2 + 4 * 5456);

  // An odd row count: 3 ranks keep ceil(R/3) rows on rank 0.
  l.zero = 3;
  l.fsdp = 3;
  double shard = 0;
  for (const auto& s : rhine::plan::parameter_shapes(c)) shard += std::ceil(s.shape[0] / 3.0) * (s.numel() / s.shape[0]);
  CHECK(rhine::plan::plan(c, l).memory.parameters == 4 * shard);
  CHECK(shard > 5456 / 3.0);
}

TEST_CASE("expert parallelism divides the routed experts, MoE memory and all-to-all", "[plan]") {
  const auto c = rhine::test::tiny_config("deepseek_v3");  // 4 routed experts
  const auto n = rhine::plan::count_parameters(c);
  Layout l;
  l.zero = 3;
  l.fsdp = 4;
  l.device = "cpu";
  const auto no_ep = rhine::plan::plan(c, l);
  l.ep = 4;
  const auto ep = rhine::plan::plan(c, l);
  // Experts: E/ep whole per rank instead of ceil-row shards of every expert;
  // they are no longer gathered, and tokens travel by all-to-all instead.
  CHECK(ep.memory.communication < no_ep.memory.communication);
  CHECK(ep.time.all_to_all_bytes > 0);
  CHECK(no_ep.time.all_to_all_bytes == 0);
  CHECK(ep.time.all_gather_bytes < no_ep.time.all_gather_bytes);
  double expert_rows_per_rank = 0;
  for (const auto& s : rhine::plan::parameter_shapes(c))
    if (s.kind == rhine::plan::ParamKind::kRoutedExpert) expert_rows_per_rank += s.numel();
  CHECK(expert_rows_per_rank == n.routed_experts);
  l.zero = 0;
  l.fsdp = 1;
  l.dp = 4;
  const auto dp_ep = rhine::plan::plan(c, l);  // data parallel: a rank holds its E/ep experts whole
  CHECK(near(dp_ep.memory.parameters, 4.0 * (n.total - n.routed_experts + n.routed_experts / 4.0)));
}

TEST_CASE("step time, tokens/s and MFU follow the stated formulas", "[plan]") {
  const auto c = rhine::test::tiny_config("llama");
  Layout l;
  l.seq_len = 8;
  l.micro_batch = 2;
  l.grad_accum = 3;
  l.dp = 2;
  l.device = "H100";
  const auto p = rhine::plan::plan(c, l);
  // F = 6 x (active 5456 - embedding 512) + 6 L H (D + D) T = 29664 + 3072.
  CHECK(p.time.model_flops_per_token == 32736);
  const double tokens_rank = 2 * 8 * 3;
  CHECK(near(p.time.compute_s, tokens_rank * 32736 / (989.4e12 * 0.5)));
  // Data parallel: one all-reduce of fp32 gradients per step, ring 2(n-1)/n x 4P, over NVLink.
  CHECK(near(p.time.all_reduce_bytes, 4.0 * 5456));
  CHECK(near(p.time.overlapped_s, 4.0 * 5456 / 450e9));
  CHECK(near(p.time.step_s, std::max(p.time.compute_s, p.time.overlapped_s) + p.time.exposed_s));
  CHECK(near(p.time.tokens_per_s, 2 * tokens_rank / p.time.step_s));
  CHECK(p.time.mfu <= 0.5 + 1e-12);
  // Checkpointing recomputes the forward: 4/3 the compute, the same model FLOPs.
  l.activation_checkpointing = true;
  const auto q = rhine::plan::plan(c, l);
  CHECK(near(q.time.compute_s, p.time.compute_s * 4 / 3));
  CHECK(q.time.model_flops_per_token == p.time.model_flops_per_token);
  // Across nodes: 16 ranks of 8 per node use the slower link.
  l.activation_checkpointing = false;
  l.dp = 16;
  const auto r = rhine::plan::plan(c, l);
  CHECK(near(r.time.overlapped_s, 2.0 * 15 / 16 * 4 * 5456 / 50e9));
}

TEST_CASE("bad layouts and device kinds are refused with the value and a hint", "[plan]") {
  const auto c = rhine::test::tiny_config("llama");
  auto message = [&](const Layout& l) {
    try {
      rhine::plan::plan(c, l);
    } catch (const rhine::Error& e) {
      CHECK(e.component() == "plan");
      return std::string(e.what());
    }
    return std::string("no error");
  };
  Layout l;
  l.device = "B200";
  CHECK_THAT(message(l), Catch::Contains("[plan] unknown device kind, got \"B200\"; known: H100, H200, GH200"));
  CHECK(rhine::plan::device_kind("mi300a").name == "MI300A");  // names are case-insensitive
  l = Layout{};
  l.fsdp = 4;  // zero 0
  CHECK_THAT(message(l), Catch::Contains("fsdp > 1 shards parameters and needs zero 2 or 3: fsdp, got 4"));
  l = Layout{};
  l.zero = 3;
  l.fsdp = 4;
  l.ep = 3;
  CHECK_THAT(message(l), Catch::Contains("ep must divide the number of ranks"));
  l.ep = 2;
  CHECK_THAT(message(l), Catch::Contains("expert parallelism needs an MoE model"));
  l = Layout{};
  l.zero = 5;
  CHECK_THAT(message(l), Catch::Contains("zero must be 0, 1, 2 or 3, got 5"));
  l = Layout{};
  l.param_dtype = "float16";
  CHECK_THAT(message(l), Catch::Contains("param_dtype must be"));
  l = Layout{};
  l.micro_batch = 0;
  CHECK_THAT(message(l), Catch::Contains("must be >= 1"));
  const auto moe = rhine::test::tiny_config("deepseek_v3");  // 4 experts
  l = Layout{};
  l.dp = 8;
  l.ep = 8;
  try {
    rhine::plan::plan(moe, l);
    FAIL("ep 8 with 4 experts was accepted");
  } catch (const rhine::Error& e) {
    CHECK_THAT(std::string(e.what()), Catch::Contains("ep must divide n_routed_experts, got \"ep 8 with 4 experts\""));
  }
}

TEST_CASE("a published layout: Llama 3.1 8B under FSDP on 8 H100", "[plan]") {
  const auto c = ModelConfig::from_file(source("tools/plan_configs/llama-3.1-8b.json"));
  const auto n = rhine::plan::count_parameters(c);
  CHECK(n.total == 8030261248);  // Llama 3.1 8B's published parameter count
  Layout l;
  l.zero = 3;
  l.fsdp = 8;
  l.seq_len = 8192;
  l.micro_batch = 2;
  l.param_dtype = "bfloat16";
  const auto p = rhine::plan::plan(c, l);
  // 16 bytes of state per parameter over 8 ranks.
  CHECK(near(p.memory.parameters + p.memory.optimizer, 12.0 * n.total / 8, 1e-3));
  CHECK(p.memory.fits == (p.memory.peak_bytes <= 80e9));
  const auto j = p.to_json();
  CHECK(j["memory_per_rank_bytes"]["peak"].get<double>() == p.memory.peak_bytes);
  CHECK(j["time"]["mfu"].get<double>() == p.time.mfu);
  CHECK_THAT(p.to_text(), Catch::Contains("memory per rank (GB)"));
}

#ifdef RHINE_PLAN_EXE
namespace {
/// Runs rhine-plan with `args`; returns (exit code, stdout + stderr).
std::pair<int, std::string> run_plan(const std::string& args) {
  const std::string cmd = std::string(RHINE_PLAN_EXE) + " " + args + " 2>&1";
  FILE* f = ::popen(cmd.c_str(), "r");
  REQUIRE(f != nullptr);
  std::string out;
  char buf[4096];
  while (std::size_t k = std::fread(buf, 1, sizeof buf, f)) out.append(buf, k);
  const int st = ::pclose(f);
  return {WEXITSTATUS(st), out};
}
}  // namespace

TEST_CASE("rhine-plan reads config.json and run configs, prints JSON, and explains bad input", "[plan]") {
  auto [rc, out] = run_plan(source("tools/plan_configs/llama-3.1-8b.json") +
                            " --fsdp 8 --seq 8192 --micro-batch 2 --param-dtype bf16 --gpu H100 --json");
  REQUIRE(rc == 0);
  const auto j = rhine::Json::parse(out);
  CHECK(j["layout"]["zero"] == 3);  // --fsdp implies ZeRO-3
  CHECK(j["layout"]["fsdp"] == 8);
  CHECK(j["model"]["parameters"] == 8030261248LL);

  // A rhine-train run config: model inline, vocab from --vocab, parallel block, batch over ranks.
  rhine::test::TempDir dir("plan_cli");
  auto run = rhine::read_json_file(source("examples/configs/demo-moe.json"), "test");
  run["parallel"] = {{"zero", 3}, {"param_dtype", "bfloat16"}};
  run["tokenizer"] = dir.file("missing.model");
  {
    std::ofstream f(dir.file("run.json"));
    f << run.dump();
  }
  std::tie(rc, out) = run_plan(dir.file("run.json") + " --dp 4 --gpu cpu --json --vocab 8000");
  REQUIRE(rc == 0);
  const auto r = rhine::Json::parse(out);
  CHECK(r["layout"]["fsdp"] == 4);         // zero 3 without "fsdp": every rank shards
  CHECK(r["layout"]["dp"] == 1);
  CHECK(r["layout"]["micro_batch"] == 4);  // batch_size 16 over 4 ranks
  CHECK(r["layout"]["seq_len"] == 128);
  CHECK(r["layout"]["param_dtype"] == "bfloat16");

  std::tie(rc, out) = run_plan(dir.file("run.json") + " --dp 4");  // no vocab_size, no tokenizer
  CHECK(rc == 1);
  CHECK_THAT(out, Catch::Contains("[rhine-plan]") && Catch::Contains("--vocab"));
  std::tie(rc, out) = run_plan(source("tools/plan_configs/llama-3.1-8b.json") + " --gpu TPUv5");
  CHECK(rc == 1);
  CHECK_THAT(out, Catch::Contains("[plan] unknown device kind, got \"TPUv5\""));
  {
    std::ofstream f(dir.file("broken.json"));
    f << "{\"hidden_size\": 64,";
  }
  std::tie(rc, out) = run_plan(dir.file("broken.json"));
  CHECK(rc == 1);
  CHECK_THAT(out, Catch::Contains("[rhine-plan]") && Catch::Contains("broken.json"));
  {
    std::ofstream f(dir.file("bad.json"));
    f << R"({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 3, "vocab_size": 10})";
  }
  std::tie(rc, out) = run_plan(dir.file("bad.json"));
  CHECK(rc == 1);
  CHECK_THAT(out, Catch::Contains("[model_config]"));
}
#endif
