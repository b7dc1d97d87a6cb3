// peft as the oracle of Rhine's LoRA adapters, on a dense (llama) and an MLA + MoE
// (deepseek_v3) model built by transformers (tests/oracle/peft_adapters.py):
//
//   1. an adapter trained and saved by peft loads into Rhine (load_peft_adapter) and gives
//      peft's logits (relative error < 1e-5);
//   2. Rhine's merge of it equals peft's merge_and_unload() tensor by tensor (< 1e-6), and so
//      does Rhine's HF export of the merged model;
//   3. an adapter Rhine trains and saves (save_peft_adapter) loads with
//      PeftModel.from_pretrained and gives Rhine's logits (< 1e-5).
//
// Needs the project's Python environment with peft; Skipped without it (docs/testing.md).
#include "torch_test.h"

#include <ATen/core/grad_mode.h>

#include <filesystem>
#include <string>

#include "io/io_test_util.h"
#include "oracle/oracle_util.h"
#include "rhine/io/hf.h"
#include "rhine/io/lora.h"
#include "rhine/io/safetensors.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace {

at::Tensor logits(rhine::nn::CausalLM& lm, const at::Tensor& ids) {
  at::NoGradGuard g;
  lm->eval();
  return lm->forward(ids).logits;
}

/// Every tensor of `want` (a safetensors file) is in `got` with a relative error < tol.
void check_same_weights(const std::map<std::string, at::Tensor>& got, const fs::path& want_file, double tol) {
  const auto want = rhine::load_safetensors(want_file.string());
  REQUIRE(got.size() == want.size());
  for (const auto& [name, w] : want) {
    INFO(name);
    REQUIRE(got.count(name) == 1);
    const double e = io_test::rel_err(got.at(name), w);
    INFO("relative error " << e);
    CHECK(e < tol);
  }
}

void check_variant(const std::string& variant, const std::vector<std::string>& targets) {
  rhine::test::TempDir tmp("peft_" + variant);
  oracle::run("peft_adapters.py", "make " + variant + " " + tmp.path.string());
  const auto ref = rhine::load_safetensors((tmp.path / "reference.safetensors").string());
  const at::Tensor ids = ref.at("input_ids");
  const fs::path base = tmp.path / "base";

  // 1. peft's adapter in Rhine.
  auto lm = rhine::io::load_hf_model(base);
  const auto options = rhine::io::load_peft_adapter(*lm, tmp.path / "peft_adapter");
  CHECK(options.rank == 4);
  CHECK(options.alpha == 12.0);
  {
    const double e = io_test::rel_err(logits(lm, ids), ref.at("logits"));
    INFO("peft's adapter in Rhine, relative error " << e);
    CHECK(e < 1e-5);
  }

  // 2. Merged: in memory and as exported, against merge_and_unload().
  rhine::io::merge_lora(*lm);
  std::map<std::string, at::Tensor> merged;
  for (auto& [name, t] : rhine::io::hf_state_dict(*lm)) merged[name] = t;
  check_same_weights(merged, tmp.path / "merged" / "model.safetensors", 1e-6);
  rhine::io::save_hf_model(lm, tmp.path / "rhine_merged");
  check_same_weights(rhine::load_safetensors((tmp.path / "rhine_merged" / "model.safetensors").string()),
                     tmp.path / "merged" / "model.safetensors", 1e-6);

  // 3. Rhine's adapter in peft: a fresh base, adapters on other modules, 3 AdamW steps.
  auto mine = rhine::io::load_hf_model(base);
  rhine::io::LoraOptions lo;
  lo.rank = 8;
  lo.alpha = 4;
  lo.target_modules = targets;
  lo.init_seed = 5;
  rhine::io::apply_lora(*mine, lo);
  oracle::train_steps(mine, ids, ids, 3);  // any targets: the adapter only has to move
  const at::Tensor trained = logits(mine, ids);
  CHECK(io_test::rel_err(trained, logits(lm, ids)) > 1e-3);  // not peft's adapter
  rhine::io::save_peft_adapter(*mine, tmp.path / "rhine_adapter");
  rhine::save_safetensors(tmp.file("in.safetensors"), {{"input_ids", ids}});
  oracle::run("peft_adapters.py", "logits " + variant + " " + base.string() + " " +
                                      (tmp.path / "rhine_adapter").string() + " " + tmp.file("in.safetensors") +
                                      " " + tmp.file("out.safetensors"));
  const double e = io_test::rel_err(trained, rhine::load_safetensors(tmp.file("out.safetensors")).at("logits"));
  INFO("Rhine's adapter in peft, relative error " << e);
  CHECK(e < 1e-5);
}

}  // namespace

TEST_CASE("peft oracle: llama adapters both ways, merged equal", "[oracle][slow]") {
  static const std::string why = oracle::missing("peft_adapters.py", "peft");
  if (!why.empty()) RHINE_SKIP_TEST(why);
  check_variant("llama", {"k_proj", "o_proj", "gate_proj", "up_proj"});
}

TEST_CASE("peft oracle: deepseek_v3 (MLA) adapters both ways, merged equal", "[oracle][slow]") {
  static const std::string why = oracle::missing("peft_adapters.py", "peft");
  if (!why.empty()) RHINE_SKIP_TEST(why);
  // No MLP projections: transformers 5 fuses the experts' gate and up projections, and peft
  // then maps up_proj/gate_proj targets onto them (it refuses up_proj alone).
  check_variant("deepseek_v3", {"q_a_proj", "kv_a_proj_with_mqa", "o_proj"});
}
