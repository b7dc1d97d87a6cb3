// Hugging Face transformers as the oracle of Rhine's models, one test case per architecture
// variant (tests/oracle/hf_models.py lists them and what each exercises):
//
//   1. transformers builds a small random model and save_pretrained()s it (safetensors);
//   2. Rhine imports it: float32 logits and the loss with labels match transformers' float32
//      run (relative error < 1e-5), float64 logits match transformers' float64 run (< 1e-6:
//      transformers keeps RMSNorm and the router in float32 even then);
//   3. greedy generation with Rhine's KV cache gives transformers' `generate` tokens (32);
//   4. Rhine trains the model 3 AdamW steps and exports it; transformers loads the export
//      and its logits match Rhine's (< 1e-5).
//
// Relative error: ||a - b|| / ||b|| over the whole tensor (io_test::rel_err).
// Needs the project's Python environment (RHINE_PYTHON, or the CMake cache variable that
// scripts/build.sh sets) with transformers; without it every case reports Skipped, and
// fails under RHINE_REQUIRE_REFERENCES=1 (docs/testing.md).
#include "torch_test.h"

#include <ATen/core/grad_mode.h>

#include <filesystem>
#include <string>

#include "io/io_test_util.h"
#include "oracle/oracle_util.h"
#include "rhine/core/json.h"
#include "rhine/io/hf.h"
#include "rhine/io/safetensors.h"
#include "rhine/nn/generate.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace {

/// Labels Rhine takes (already shifted): ids[:, 1:] and ignore_index at the end, which is
/// what transformers' loss computes from labels = input_ids.
at::Tensor shifted_labels(const at::Tensor& ids) {
  at::Tensor labels = at::full_like(ids, -100);
  labels.narrow(1, 0, ids.size(1) - 1).copy_(ids.narrow(1, 1, ids.size(1) - 1));
  return labels;
}

void check_variant(const std::string& variant) {
  rhine::test::TempDir tmp("oracle_" + variant);
  oracle::run("hf_models.py", "make " + variant + " " + tmp.path.string());
  const fs::path model_dir = tmp.path / "model";
  const auto ref = rhine::load_safetensors((tmp.path / "reference.safetensors").string());
  const at::Tensor ids = ref.at("input_ids");

  // 2. Import: logits and loss.
  auto lm = rhine::io::load_hf_model(model_dir);
  {
    at::NoGradGuard g;
    lm->eval();
    rhine::nn::ForwardOptions fo;
    fo.labels = shifted_labels(ids);
    fo.mtp_lambda = 0;
    auto out = lm->forward(ids, fo);
    const double e = io_test::rel_err(out.logits, ref.at("logits"));
    INFO("float32 logits, relative error " << e);
    CHECK(e < 1e-5);
    const double loss = out.loss.item<double>(), want = ref.at("loss").item<double>();
    INFO("loss " << loss << " vs transformers " << want);
    CHECK(std::abs(loss - want) <= 1e-5 * std::abs(want));
  }
  {
    rhine::io::ImportOptions f64;
    f64.dtype = at::kDouble;
    auto lm64 = rhine::io::load_hf_model(model_dir, f64);
    lm64->eval();
    at::Tensor logits64;
    {
      at::NoGradGuard g;
      logits64 = lm64->forward(ids).logits;
    }
    const double e = io_test::rel_err(logits64, ref.at("logits64"));
    INFO("float64 logits, relative error " << e);
    CHECK(e < 1e-6);

    // 3. Greedy generation with the cache, in float64 as the reference ran it.
    const at::Tensor prompt = ref.at("prompt");
    std::vector<std::int64_t> p(prompt.data_ptr<std::int64_t>(), prompt.data_ptr<std::int64_t>() + prompt.numel());
    rhine::nn::GenerateOptions go;
    go.max_new_tokens = 32;
    auto gen = rhine::nn::generate(lm64, {p}, go);
    const at::Tensor want = ref.at("generated")[0];
    REQUIRE(gen.tokens.at(0).size() == 32);
    std::vector<std::int64_t> w(want.data_ptr<std::int64_t>(), want.data_ptr<std::int64_t>() + want.numel());
    CHECK(gen.tokens[0] == w);
  }

  // transformers' save_pretrained drops DeepSeek-V3's MTP module: with the config's (and
  // DeepseekV3Config's default) num_nextn_predict_layers = 1 the import says so and how to go on.
  if (variant == "deepseek_v3") {
    const fs::path mtp_dir = tmp.path / "model_mtp";
    fs::create_directories(mtp_dir);
    for (const auto& e : fs::directory_iterator(model_dir)) fs::copy_file(e.path(), mtp_dir / e.path().filename());
    auto cfg = rhine::read_json_file((mtp_dir / "config.json").string(), "test");
    cfg["num_nextn_predict_layers"] = 1;
    rhine::write_json_file((mtp_dir / "config.json").string(), cfg);
    const std::string hint = R"x(allowed_missing = {R"(model\.layers\.2\..*)"})x";
    CHECK_THROWS_WITH(rhine::io::load_hf_model(mtp_dir),
                      Catch::Matchers::Contains("holds no MTP module") && Catch::Matchers::Contains(hint));
    rhine::io::ImportOptions fresh;
    fresh.allowed_missing = {R"(model\.layers\.2\..*)"};
    auto with_mtp = rhine::io::load_hf_model(mtp_dir, fresh);
    at::NoGradGuard g;
    with_mtp->eval();
    CHECK(io_test::rel_err(with_mtp->forward(ids).logits, ref.at("logits")) < 1e-5);
  }

  // 4. Train a few steps, export, let transformers load the export.
  oracle::train_steps(lm, ids, shifted_labels(ids), 3);
  at::Tensor trained;
  {
    at::NoGradGuard g;
    trained = lm->forward(ids).logits;
  }
  INFO("training moved the logits by " << io_test::rel_err(trained, ref.at("logits")));
  CHECK(io_test::rel_err(trained, ref.at("logits")) > 1e-3);
  rhine::io::save_hf_model(lm, tmp.path / "export");
  rhine::save_safetensors(tmp.file("in.safetensors"), {{"input_ids", ids}});
  oracle::run("hf_models.py", "logits " + variant + " " + (tmp.path / "export").string() + " " + tmp.file("in.safetensors") + " " +
             tmp.file("out.safetensors"));
  const auto back = rhine::load_safetensors(tmp.file("out.safetensors"));
  const double e = io_test::rel_err(trained, back.at("logits"));
  INFO("transformers on Rhine's export, relative error " << e);
  CHECK(e < 1e-5);
}

}  // namespace

#define RHINE_ORACLE_CASE(variant)                                                         \
  TEST_CASE("transformers oracle: " variant, "[oracle][slow]") {                           \
    static const std::string why = oracle::missing("hf_models.py", "transformers");        \
    if (!why.empty()) RHINE_SKIP_TEST(why);                                                \
    check_variant(variant);                                                                \
  }

RHINE_ORACLE_CASE("llama")
RHINE_ORACLE_CASE("mistral")
RHINE_ORACLE_CASE("apertus")
RHINE_ORACLE_CASE("deepseek_v2")
RHINE_ORACLE_CASE("deepseek_v2_top1")
RHINE_ORACLE_CASE("deepseek_v2_norm")
RHINE_ORACLE_CASE("deepseek_v3")
