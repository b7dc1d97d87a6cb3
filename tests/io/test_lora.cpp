// LoRA: the adapted Linear against PEFT's formula W x + b + s B (A x) in plain
// ops (dropout per input element), merged vs adapter-path logits,
// finite-difference gradients of A and B, only adapter gradients, a bf16 base
// under autocast against an fp32 one, merge/unmerge, and the PEFT files checked by the
// independent python reader (tests/fixtures/hf/check_hf_dir.py).
#include "torch_test.h"

#include <ATen/core/grad_mode.h>
#include <torch/nn/modules/linear.h>

#include <filesystem>

#include "io/io_test_util.h"
#include "rhine/core/error.h"
#include "rhine/core/file.h"
#include "rhine/core/json.h"
#include "rhine/io/hf.h"
#include "rhine/io/lora.h"
#include "rhine/nn/adapter.h"
#include "rhine/torch/compat.h"
#include "test_util.h"

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using io_test::hf_fixture;

namespace {

rhine::nn::CausalLM llama64() {
  rhine::io::ImportOptions o;
  o.dtype = at::kDouble;
  return rhine::io::load_hf_model(hf_fixture("llama"), o);
}

// Gives every lora_B non-zero values (a fresh adapter is the identity).
void randomize_b(torch::nn::Module& m, std::uint64_t seed) {
  at::NoGradGuard g;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  for (auto& p : m.named_parameters())
    if (p.key().find(".lora_B.") != std::string::npos) p.value().normal_(0.0, 0.3, gen);
}

struct OneLinear : torch::nn::Module {
  OneLinear() { proj = register_module("proj", torch::nn::Linear(6, 5)); }
  torch::nn::Linear proj{nullptr};
};

}  // namespace

TEST_CASE("an adapted Linear computes PEFT's W x + b + (alpha/r) B A x", "[io][lora]") {
  OneLinear m;
  m.to(at::kDouble);
  rhine::io::LoraOptions o;
  o.rank = 3;
  o.alpha = 6.0;
  o.target_modules = {"proj"};
  o.init_seed = 5;
  auto names = rhine::io::apply_lora(m, o);
  REQUIRE(names == std::vector<std::string>{"proj"});
  auto params = m.named_parameters();
  at::Tensor W = params["proj.weight"], b = params["proj.bias"], A = params["proj.lora_A.weight"],
             B = params["proj.lora_B.weight"];
  CHECK(A.sizes() == at::IntArrayRef({3, 6}));
  CHECK(B.sizes() == at::IntArrayRef({5, 3}));
  CHECK(at::equal(B, at::zeros_like(B)));                    // B starts at zero
  CHECK(A.abs().max().item<double>() <= 1.0 / std::sqrt(6.0));  // kaiming_uniform(a=sqrt(5)) bound
  CHECK(A.abs().max().item<double>() > 0.0);
  randomize_b(m, 1);
  at::Tensor x = at::randn({4, 6}, at::kDouble);
  at::Tensor want = at::matmul(x, W.t()) + b + 2.0 * at::matmul(at::matmul(x, A.t()), B.t());  // [4, 5]
  CHECK(io_test::rel_err(rhine::nn::linear(m.proj, x), want) < 1e-14);  // how Rhine's layers call a Linear
  // Same seed, same A.
  OneLinear m2;
  m2.to(at::kDouble);
  rhine::io::apply_lora(m2, o);
  CHECK(at::equal(m2.named_parameters()["proj.lora_A.weight"], A));
}

TEST_CASE("LoRA on a model: adapter logits == merged logits, unmerge restores the weights", "[io][lora]") {
  auto lm = llama64();
  auto base = llama64();
  const auto ids = io_test::read_ids(hf_fixture("llama") / "ids.txt");
  rhine::io::LoraOptions o;
  o.rank = 4;
  o.alpha = 8.0;
  o.target_modules = {"q_proj", "v_proj", "down_proj"};
  o.init_seed = 7;
  auto names = rhine::io::apply_lora(*lm, o);
  CHECK(names.size() == 6);
  CHECK(names[0] == "model.layers.0.self_attn.q_proj");
  // A fresh adapter changes nothing.
  for (const auto& row : ids) CHECK(at::equal(io_test::logits_of(lm, row), io_test::logits_of(base, row)));
  randomize_b(*lm, 3);

  // Reference: a plain model whose weights are W + (alpha/r) B A, computed here.
  auto ref = llama64();
  {
    at::NoGradGuard g;
    auto p = lm->named_parameters();
    auto rp = ref->named_parameters();
    for (const auto& n : names)
      rp[n + ".weight"].add_(2.0 * at::mm(p[n + ".lora_B.weight"], p[n + ".lora_A.weight"]));
  }
  std::vector<at::Tensor> adapter_logits;
  for (const auto& row : ids) {
    adapter_logits.push_back(io_test::logits_of(lm, row));
    CHECK(io_test::rel_err(adapter_logits.back(), io_test::logits_of(ref, row)) < 1e-12);
    CHECK(io_test::rel_err(adapter_logits.back(), io_test::logits_of(base, row)) > 1e-3);  // it did something
  }
  CHECK(rhine::io::has_unmerged_lora(*lm));
  rhine::io::merge_lora(*lm);
  CHECK_FALSE(rhine::io::has_unmerged_lora(*lm));
  for (std::size_t i = 0; i < ids.size(); ++i)
    CHECK(io_test::rel_err(io_test::logits_of(lm, ids[i]), adapter_logits[i]) < 1e-12);
  {
    auto p = lm->named_parameters();
    auto bp = base->named_parameters();
    for (const auto& n : names) CHECK(io_test::rel_err(p[n + ".weight"], bp[n + ".weight"]) > 1e-3);
  }
  rhine::io::unmerge_lora(*lm);
  {
    auto p = lm->named_parameters();
    auto bp = base->named_parameters();
    for (const auto& n : names) CHECK(io_test::rel_err(p[n + ".weight"], bp[n + ".weight"]) < 1e-14);
  }
  for (std::size_t i = 0; i < ids.size(); ++i)
    CHECK(io_test::rel_err(io_test::logits_of(lm, ids[i]), adapter_logits[i]) < 1e-12);
}

TEST_CASE("only adapter parameters get gradients and they match finite differences", "[io][lora]") {
  auto lm = llama64();
  rhine::io::LoraOptions o;
  o.rank = 2;
  o.alpha = 4.0;
  o.target_regex = R"(model\.layers\.1\.self_attn\.(q|v)_proj)";
  o.init_seed = 9;
  auto names = rhine::io::apply_lora(*lm, o);
  REQUIRE(names.size() == 2);
  randomize_b(*lm, 4);
  for (const auto& p : lm->named_parameters()) {
    INFO(p.key());
    CHECK(p.value().requires_grad() == (p.key().find(".lora_") != std::string::npos));
  }
  CHECK(rhine::io::lora_parameters(*lm).size() == 4);
  auto ids = at::tensor(io_test::read_ids(hf_fixture("llama") / "ids.txt")[0], at::kLong).view({1, -1});
  at::Tensor proj = at::randn({1, ids.size(1), 32}, at::kDouble);
  auto loss_fn = [&]() { return (lm->forward(ids).logits * proj).sum(); };
  loss_fn().backward();
  for (const auto& p : lm->named_parameters()) {
    INFO(p.key());
    const bool adapter = p.key().find(".lora_") != std::string::npos;
    if (adapter) {
      REQUIRE(p.value().grad().defined());
      CHECK(p.value().grad().abs().sum().item<double>() > 0);
    } else {
      CHECK((!p.value().grad().defined() || p.value().grad().abs().sum().item<double>() == 0));
    }
  }
  for (const auto& n : names) {
    for (const char* which : {".lora_A.weight", ".lora_B.weight"}) {
      INFO(n << which);
      at::Tensor t = lm->named_parameters()[n + which];
      at::Tensor analytic = t.grad().clone();
      at::Tensor numeric = at::zeros_like(t);
      {
        at::NoGradGuard g;
        auto flat = t.view({-1});
        for (std::int64_t i = 0; i < flat.numel(); ++i) {
          const double v = flat[i].item<double>(), h = 1e-6;
          flat[i] = v + h;
          const double fp = loss_fn().item<double>();
          flat[i] = v - h;
          const double fm = loss_fn().item<double>();
          flat[i] = v;
          numeric.view({-1})[i] = (fp - fm) / (2 * h);
        }
      }
      CHECK(io_test::rel_err(analytic, numeric) < 1e-6);
    }
  }
}

TEST_CASE("new adapter values act at once, and dropout drops adapter inputs only in training", "[io][lora]") {
  auto lm = llama64();
  rhine::io::LoraOptions o;
  o.target_modules = {"q_proj"};
  o.init_seed = 1;
  rhine::io::apply_lora(*lm, o);
  randomize_b(*lm, 2);
  const auto row = io_test::read_ids(hf_fixture("llama") / "ids.txt")[0];
  at::Tensor before = io_test::logits_of(lm, row);
  {
    at::NoGradGuard g;
    for (auto& p : rhine::io::lora_parameters(*lm)) p.add_(0.01);
  }
  CHECK(io_test::rel_err(io_test::logits_of(lm, row), before) > 1e-6);

  // PEFT's lora_dropout: y = x W^T + b + s B A dropout(x), one mask element per input element.
  OneLinear m;
  m.to(at::kDouble);
  rhine::io::LoraOptions d;
  d.rank = 2;
  d.alpha = 2.0;
  d.dropout = 0.5;
  d.target_modules = {"proj"};
  rhine::io::apply_lora(m, d);
  randomize_b(m, 3);
  auto p = m.named_parameters();
  const at::Tensor W = p["proj.weight"], b = p["proj.bias"], A = p["proj.lora_A.weight"], B = p["proj.lora_B.weight"];
  at::Tensor x = at::randn({64, 6}, at::kDouble);
  m.eval();
  const at::Tensor no_dropout = at::matmul(x, W.t()) + b + at::matmul(at::matmul(x, A.t()), B.t());
  CHECK(io_test::rel_err(rhine::nn::linear(m.proj, x), no_dropout) < 1e-14);
  m.train();
  at::Tensor y = rhine::nn::linear(m.proj, x);
  at::Tensor lora = y - at::matmul(x, W.t()) - b;             // [64, 5]
  at::Tensor full = at::matmul(at::matmul(x, A.t()), B.t());  // without dropout
  CHECK(io_test::rel_err(lora, full) > 0.1);                  // something was dropped
  // The mask is nn.Dropout's on x (0 or 1/(1-p) per element), drawn from the global generator.
  {
    at::manual_seed(11);
    at::Tensor y1 = rhine::nn::linear(m.proj, x);
    at::manual_seed(11);
    at::Tensor mask = at::dropout(at::ones_like(x), 0.5, true);      // what the layer draws: 0 or 2
    at::Tensor want = at::matmul(x, W.t()) + b + at::matmul(at::matmul(x * mask, A.t()), B.t());
    CHECK(io_test::rel_err(y1, want) < 1e-14);
    CHECK(mask.eq(0).sum().item<std::int64_t>() > 100);               // per element, not per feature
    CHECK(mask.eq(0).sum().item<std::int64_t>() < 284);
  }
}

TEST_CASE("a bf16 base trains its float32 adapters under autocast and never gets a gradient", "[io][lora]") {
  rhine::io::ImportOptions bf;
  bf.dtype = at::kBFloat16;
  auto lm = rhine::io::load_hf_model(hf_fixture("llama"), bf);
  rhine::io::ImportOptions f32;
  f32.dtype = at::kFloat;
  auto ref = rhine::io::load_hf_model(hf_fixture("llama"), f32);
  {  // the same (bf16-rounded) base values in both
    at::NoGradGuard g;
    auto rp = ref->named_parameters();
    for (const auto& q : lm->named_parameters()) rp[q.key()].copy_(q.value());
  }
  rhine::io::LoraOptions o;
  o.rank = 4;
  o.target_modules = {"q_proj", "v_proj", "down_proj"};
  o.init_seed = 3;
  rhine::io::apply_lora(*lm, o);
  rhine::io::apply_lora(*ref, o);
  randomize_b(*lm, 6);
  randomize_b(*ref, 6);
  for (const auto& q : lm->named_parameters()) {
    INFO(q.key());
    const bool adapter = rhine::io::is_lora_parameter(q.key());
    CHECK(q.value().scalar_type() == (adapter ? at::kFloat : at::kBFloat16));
  }
  auto ids = at::tensor(io_test::read_ids(hf_fixture("llama") / "ids.txt")[0], at::kLong).view({1, -1});
  rhine::nn::ForwardOptions fo;
  fo.labels = ids;
  at::Tensor loss, ref_loss;
  {
    rhine::AutocastGuard cast(at::kCPU, at::kBFloat16, true);
    loss = lm->forward(ids, fo).loss;
    ref_loss = ref->forward(ids, fo).loss;
  }
  loss.backward();
  ref_loss.backward();
  // An fp32 base under autocast multiplies the same bf16 values; what differs
  // is the residual stream, bf16 here (from the bf16 embedding) as in HF with
  // torch_dtype=bfloat16. The exact gradients are the finite-difference test's.
  CHECK(std::abs(loss.item<double>() - ref_loss.item<double>()) < 2e-2 * std::abs(ref_loss.item<double>()));
  auto rp = ref->named_parameters();
  for (const auto& q : lm->named_parameters()) {
    INFO(q.key());
    if (rhine::io::is_lora_parameter(q.key())) {
      REQUIRE(q.value().grad().defined());
      CHECK(q.value().grad().scalar_type() == at::kFloat);
      CHECK(io_test::rel_err(q.value().grad(), rp[q.key()].grad()) < 0.2);
    } else {
      CHECK_FALSE(q.value().grad().defined());
    }
  }
  // Merging writes into the bf16 base; the merged model keeps bf16.
  rhine::io::merge_lora(*lm);
  for (const auto& q : lm->named_parameters())
    if (!rhine::io::is_lora_parameter(q.key())) CHECK(q.value().scalar_type() == at::kBFloat16);
}

TEST_CASE("PEFT adapter files: names and shapes per PEFT, reload, merged HF export", "[io][lora]") {
  rhine::test::TempDir tmp("lora_peft");
  auto lm = llama64();
  rhine::io::LoraOptions o;
  o.rank = 4;
  o.alpha = 16.0;
  o.dropout = 0.05;
  o.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"};
  o.base_model_name_or_path = "tests/fixtures/hf/llama";
  o.init_seed = 3;
  rhine::io::apply_lora(*lm, o);
  randomize_b(*lm, 5);
  lm->eval();
  const fs::path adapter = tmp.path / "adapter";
  rhine::io::save_peft_adapter(*lm, adapter);
  auto report = io_test::python_check("peft '" + adapter.string() + "' '" + hf_fixture("llama").string() + "'");
  INFO(report.dump());
  CHECK(report["problems"].empty());
  CHECK(report["n_tensors"] == 20);  // 2 layers x 5 modules x (A, B)
  auto cfg = rhine::read_json_file((adapter / "adapter_config.json").string(), "test");
  CHECK(cfg["r"] == 4);
  CHECK(cfg["lora_alpha"] == 16.0);
  CHECK(cfg["lora_dropout"] == 0.05);
  CHECK(cfg["base_model_name_or_path"] == "tests/fixtures/hf/llama");

  // Regex targets are written as PEFT's string form and read back the same.
  auto r = llama64();
  rhine::io::LoraOptions ro;
  ro.target_regex = R"(.*\.mlp\.(up|down)_proj)";
  rhine::io::apply_lora(*r, ro);
  rhine::io::save_peft_adapter(*r, tmp.path / "regex");
  auto rr = io_test::python_check("peft '" + (tmp.path / "regex").string() + "' '" + hf_fixture("llama").string() + "'");
  INFO(rr.dump());
  CHECK(rr["problems"].empty());
  CHECK(rr["n_tensors"] == 8);

  // Reload into a fresh model: identical logits.
  auto fresh = llama64();
  fresh->eval();
  auto lo = rhine::io::load_peft_adapter(*fresh, adapter);
  CHECK(lo.rank == 4);
  CHECK(lo.target_modules == o.target_modules);
  const auto ids = io_test::read_ids(hf_fixture("llama") / "ids.txt");
  for (const auto& row : ids) CHECK(at::equal(io_test::logits_of(fresh, row), io_test::logits_of(lm, row)));

  // Merged export: refused while unmerged, then a plain HF model with the same logits.
  CHECK_THROWS_WITH(rhine::io::save_hf_model(lm, tmp.path / "merged"),
                    Contains("[hf_export] the model carries unmerged LoRA adapters") && Contains("merge_lora"));
  rhine::io::merge_lora(*lm);
  rhine::io::save_hf_model(lm, tmp.path / "merged");
  auto mr = io_test::python_check("model '" + (tmp.path / "merged").string() + "'");
  INFO(mr.dump());
  CHECK(mr["problems"].empty());
  rhine::io::ImportOptions f64;
  f64.dtype = at::kDouble;
  auto merged = rhine::io::load_hf_model(tmp.path / "merged", f64);
  for (const auto& row : ids) CHECK(at::equal(io_test::logits_of(merged, row), io_test::logits_of(lm, row)));

  // Errors.
  auto m = llama64();
  rhine::io::LoraOptions bad;
  bad.target_modules = {"nope_proj"};
  CHECK_THROWS_WITH(rhine::io::apply_lora(*m, bad),
                    Contains("[lora] no Linear module matches the targets") && Contains("model.layers.0.self_attn.q_proj"));
  bad.target_modules = {"q_proj"};
  bad.rank = 0;
  CHECK_THROWS_WITH(rhine::io::apply_lora(*m, bad), Contains("[lora] rank must be at least 1"));
  rhine::write_file_atomic((adapter / "adapter_config.json").string(),
                           R"({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "use_dora": true})");
  CHECK_THROWS_WITH(rhine::io::load_peft_adapter(*m, adapter), Contains("[lora] use_dora is not supported"));
  rhine::write_file_atomic((adapter / "adapter_config.json").string(),
                           R"({"peft_type": "LORA", "r": 4, "lora_alpha": 16, "target_modules": ["q_proj"]})");
  CHECK_THROWS_WITH(rhine::io::load_peft_adapter(*m, adapter),
                    Contains("[lora] 0 missing and 16 unexpected adapter tensors") &&
                        Contains("base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"));
}
