// Fused CPU kernels == their plain-op reference twins (values and gradients),
// with stated tolerances (||a - b|| / ||b||; NaN never passes).
#include "nn_fixtures.h"

#include <ATen/Parallel.h>

#include "rhine/nn/fused.h"
#include "rhine/nn/layers.h"

using namespace rhine::nn;
using nn_test::Fixture;
using nn_test::rel_err;

namespace {

// Values and gradients (x and w) of fused vs twin for one input.
void compare_rms(at::ScalarType xt, at::ScalarType wt, std::vector<int64_t> shape, double tol) {
  at::manual_seed(21);
  auto x0 = (at::randn(shape, at::kDouble) * 2 + 0.3).to(xt);
  auto w0 = (at::randn({shape.back()}, at::kDouble) * 0.5 + 1).to(wt);
  auto R = at::randn(shape, at::kDouble);
  auto run = [&](bool fused) {
    auto x = x0.clone().requires_grad_(true), w = w0.clone().requires_grad_(true);
    auto y = fused ? fused_rms_norm(x, w, 1e-5) : rms_norm(x, w, 1e-5);
    (y.to(at::kDouble) * R).sum().backward();
    return std::make_tuple(y, x.grad(), w.grad());
  };
  auto [yf, dxf, dwf] = run(true);
  auto [yr, dxr, dwr] = run(false);
  CHECK(yf.scalar_type() == yr.scalar_type());
  CHECK(dxf.scalar_type() == xt);
  CHECK(dwf.scalar_type() == wt);
  CHECK(rel_err(yf, yr) < tol);
  CHECK(rel_err(dxf, dxr) < tol);
  CHECK(rel_err(dwf, dwr) < tol);
}

}  // namespace

TEST_CASE("fused RMSNorm equals its twin in values and gradients", "[nn][fused]") {
  SECTION("float64, tight") {
    compare_rms(at::kDouble, at::kDouble, {3, 7, 33}, 1e-13);
  }
  SECTION("float32") {
    compare_rms(at::kFloat, at::kFloat, {4, 9, 256}, 1e-5);
  }
  SECTION("bf16 activations, fp32 weight (autocast)") {
    compare_rms(at::kBFloat16, at::kFloat, {4, 9, 256}, 1e-2);
  }
  SECTION("bf16 activations and weight") {
    compare_rms(at::kBFloat16, at::kBFloat16, {2, 5, 64}, 1e-2);
  }
  SECTION("one row, long") {
    compare_rms(at::kFloat, at::kFloat, {1, 4096}, 1e-5);
  }
}

TEST_CASE("fused RMSNorm's weight gradient is bitwise the same for 1, 2, 3, 4 and 8 threads", "[nn][fused]") {
  // The weight gradient sums over rows: in fixed blocks, added in block order.
  const int before = at::get_num_threads();
  at::manual_seed(23);
  for (const auto& shape : {std::vector<int64_t>{16, 128, 256}, std::vector<int64_t>{3, 1000, 64}}) {
    auto x0 = at::randn(shape).to(at::kBFloat16), w = at::randn({shape.back()}) * 0.5 + 1;
    auto R = at::randn(shape);
    at::Tensor reference;
    for (int threads : {1, 2, 3, 4, 8}) {
      at::set_num_threads(threads);
      auto wg = w.clone().requires_grad_(true);
      (fused_rms_norm(x0, wg, 1e-5).to(at::kFloat) * R).sum().backward();
      if (!reference.defined()) reference = wg.grad().clone();
      INFO("threads " << threads << ", rows " << shape[0] * shape[1]);
      CHECK(at::equal(wg.grad(), reference));
    }
  }
  at::set_num_threads(before);
}

TEST_CASE("fused RMSNorm gradient against finite differences (float64)", "[nn][fused][grad]") {
  at::manual_seed(22);
  auto x = at::randn({2, 3, 8}, at::kDouble), w = at::randn({8}, at::kDouble);
  auto R = at::randn({2, 3, 8}, at::kDouble);
  auto xg = x.clone().requires_grad_(true);
  (fused_rms_norm(xg, w, 1e-5) * R).sum().backward();
  auto num = nn_test::numeric_grad(
      x, [&] { return (fused_rms_norm(x, w, 1e-5) * R).sum().item<double>(); });
  CHECK(rel_err(xg.grad(), num) < 1e-8);
}

TEST_CASE("a model with fused kernels matches the plain model", "[nn][fused][model]") {
  Fixture fx("apertus_tiny");
  CausalLMOptions o;
  o.fused_kernels = true;
  CausalLM plain(fx.config), fused(fx.config, o);
  fx.load(plain);
  fx.load(fused);
  ForwardOptions f;
  auto ids = fx.ids(0);
  f.labels = ids.roll(-1, 1);
  auto a = plain->forward(ids, f), b = fused->forward(ids, f);
  CHECK(rel_err(b.logits, fx.logits(0)) < 1e-12);  // against the PyTorch reference too
  a.loss.backward();
  b.loss.backward();
  auto pa = plain->named_parameters(), pb = fused->named_parameters();
  for (auto& p : pa) {
    INFO(p.key());
    CHECK(rel_err(pb[p.key()].grad(), p.value().grad()) < 1e-12);
  }
}
