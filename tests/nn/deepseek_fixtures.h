#pragma once
// Helpers of the DeepSeek tests (test_mla.cpp, test_moe.cpp, test_mtp.cpp):
// loading the fixtures of tests/fixtures/nn/make_deepseek_fixtures.py, whose
// tensor index covers parameters AND buffers (e_score_correction_bias, the MTP
// embedding/head copies).
#include <ATen/core/grad_mode.h>
#include <set>

#include "nn_fixtures.h"
#include "rhine/nn/mtp.h"

namespace nn_test {

/// Copies every fixture tensor into `lm` (float64) by HF name, parameters and
/// buffers, and checks that names and shapes match one to one.
inline void load_deepseek(const Fixture& fx, rhine::nn::CausalLM& lm) {
  lm->to(at::kDouble);
  std::string blob = rhine::read_file(fixture_path(fx.name + ".weights.f32"), "test");
  auto all = at::from_blob(blob.data(), {static_cast<int64_t>(blob.size() / 4)}, at::kFloat)
                 .to(at::kDouble);
  at::NoGradGuard g;
  std::set<std::string> used;
  auto put = [&](const std::string& name, at::Tensor t) {
    INFO("tensor " << name);
    REQUIRE(fx.meta["tensors"].contains(name));
    const auto& e = fx.meta["tensors"][name];
    auto shape = e["shape"].get<std::vector<int64_t>>();
    int64_t numel = 1;
    for (auto s : shape) numel *= s;
    REQUIRE(t.sizes().vec() == shape);
    t.copy_(all.narrow(0, e["offset"].get<int64_t>(), numel).view(shape));
    used.insert(name);
  };
  for (auto& p : lm->named_parameters()) put(p.key(), p.value());
  for (auto& b : lm->named_buffers()) put(b.key(), b.value());
  CHECK(used.size() == fx.meta["tensors"].size());  // no fixture tensor left over
}

/// A DeepSeek fixture model in float64, eval mode.
inline rhine::nn::CausalLM deepseek_model(const Fixture& fx) {
  rhine::nn::CausalLM lm(fx.config);
  load_deepseek(fx, lm);
  lm->eval();
  return lm;
}

}  // namespace nn_test
