#pragma once
// Helpers of the nn tests: reading the fixtures written by
// tests/fixtures/nn/make_fixtures.py, relative errors, and finite differences.
#include "torch_test.h"

#include <ATen/core/grad_mode.h>
#include <cstring>
#include <limits>
#include <string>

#include "rhine/core/file.h"
#include "rhine/core/json.h"
#include "rhine/nn/model.h"

namespace nn_test {

inline std::string fixture_path(const std::string& name) {
  return std::string(RHINE_SOURCE_DIR) + "/tests/fixtures/nn/" + name;
}

/// ||a - b|| / ||b|| in float64; NaN or Inf never passes (returns +inf).
inline double rel_err(const at::Tensor& a, const at::Tensor& b) {
  auto ad = a.to(at::kDouble), bd = b.to(at::kDouble);
  double e = (ad - bd).norm().item<double>(), r = bd.norm().item<double>();
  if (!std::isfinite(e) || !std::isfinite(r)) return std::numeric_limits<double>::infinity();
  return r == 0 ? e : e / r;
}

/// A tiny model of the fixtures: config, weights (float64) and cases.
struct Fixture {
  rhine::Json meta;
  rhine::nn::ModelConfig config;
  std::string name;

  explicit Fixture(const std::string& n) : name(n) {
    meta = rhine::read_json_file(fixture_path(n + ".json"), "test");
    config = rhine::nn::ModelConfig::from_json(meta["config"]);
  }

  /// Copies the fixture weights into `lm` (converted to float64) and checks
  /// that the parameter names are exactly the fixture's (HF) names.
  void load(rhine::nn::CausalLM& lm) const {
    lm->to(at::kDouble);
    std::string blob = rhine::read_file(fixture_path(name + ".weights.f32"), "test");
    auto all =
        at::from_blob(blob.data(), {static_cast<int64_t>(blob.size() / 4)}, at::kFloat).clone();
    at::NoGradGuard g;
    std::size_t n_params = 0;
    for (auto& p : lm->named_parameters()) {
      INFO("parameter " << p.key());
      REQUIRE(meta["tensors"].contains(p.key()));
      const auto& t = meta["tensors"][p.key()];
      auto shape = t["shape"].get<std::vector<int64_t>>();
      int64_t numel = 1;
      for (auto s : shape) numel *= s;
      REQUIRE(p.value().sizes().vec() == shape);
      p.value().copy_(all.narrow(0, t["offset"].get<int64_t>(), numel).view(shape));
      ++n_params;
    }
    CHECK(n_params == meta["tensors"].size());  // no fixture tensor left over
  }

  /// Expected logits of case `i` (float64).
  at::Tensor logits(std::size_t i) const {
    std::string blob = rhine::read_file(fixture_path(name + ".logits.f64"), "test");
    auto all =
        at::from_blob(blob.data(), {static_cast<int64_t>(blob.size() / 8)}, at::kDouble).clone();
    const auto& c = meta["cases"][i];
    auto shape = c["logits_shape"].get<std::vector<int64_t>>();
    int64_t numel = 1;
    for (auto s : shape) numel *= s;
    return all.narrow(0, c["logits_offset"].get<int64_t>(), numel).view(shape);
  }

  at::Tensor ids(std::size_t i) const { return as_tensor(meta["cases"][i]["ids"]); }

  static at::Tensor as_tensor(const rhine::Json& rows) {
    std::vector<int64_t> flat;
    for (const auto& r : rows)
      for (const auto& v : r) flat.push_back(v.get<int64_t>());
    return at::tensor(flat, at::kLong).view({static_cast<int64_t>(rows.size()), -1});
  }
};

/// Central finite-difference gradient of scalar f() w.r.t. every entry of
/// `x` (float64, modified in place and restored).
template <class F>
at::Tensor numeric_grad(at::Tensor x, F&& f, double h = 1e-6) {
  at::NoGradGuard g;
  auto grad = at::zeros_like(x);
  auto flat = x.view({-1});
  auto gflat = grad.view({-1});
  for (int64_t i = 0; i < flat.numel(); ++i) {
    double orig = flat[i].item<double>();
    flat[i] = orig + h;
    double fp = f();
    flat[i] = orig - h;
    double fm = f();
    flat[i] = orig;
    gflat[i] = (fp - fm) / (2 * h);
  }
  return grad;
}

}  // namespace nn_test
