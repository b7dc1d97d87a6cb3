// Fused RoPE, SwiGLU and vocabulary cross-entropy (fused and chunked) == their plain-op twins
// (values and gradients, random inputs each run, stated tolerances:
// METHOD ||fused - twin|| / ||twin||, fp64 < 1e-12, fp32 < 1e-5, bf16 < 1e-2;
// NaN never passes), float64 finite differences for every backward, and a
// CausalLM with fused kernels == the plain model (logits and all gradients).
#include "nn_fixtures.h"

#include <cmath>
#include <string>

#include "rhine/core/error.h"
#include "rhine/nn/fused.h"
#include "rhine/nn/layers.h"
#include "rhine/nn/loss.h"
#include "rhine/nn/model.h"

using namespace rhine::nn;
using nn_test::Fixture;
using nn_test::rel_err;

namespace {

double tol_for(at::ScalarType t) {
  return t == at::kDouble ? 1e-12 : t == at::kFloat ? 1e-5 : 1e-2;
}

// RoPE tables of real (yarn-scaled) frequencies at random positions [B, T].
std::pair<at::Tensor, at::Tensor> tables(int64_t B, int64_t T, int64_t D, RopeLayout layout,
                                         at::ScalarType dtype) {
  RopeParameters rope;
  rope.rope_type = "yarn";
  rope.factor = 4.0;
  rope.rope_theta = 10000.0;
  auto freqs = rope_frequencies(rope, D, 4096);
  auto pos = at::randint(0, 8192, {B, T}, at::kLong);
  return rope_cos_sin(freqs, pos, layout, dtype);
}

// x [B, H, T, D] as the transposed view of a [B, T, H, D] projection (the
// layout attention hands to RoPE), in dtype `t`.
at::Tensor rope_input(int64_t B, int64_t H, int64_t T, int64_t D, at::ScalarType t) {
  return at::randn({B, T, H, D}, at::kDouble).to(t).transpose(1, 2);
}

void compare_rope(at::ScalarType t, RopeLayout layout, bool broadcast_b) {
  at::manual_seed(31);
  const int64_t B = 2, H = 3, T = 5, D = 32;
  const auto table_t = t == at::kDouble ? at::kDouble : at::kFloat;
  auto [cos, sin] = tables(broadcast_b ? 1 : B, T, D, layout, table_t);
  auto x0 = rope_input(B, H, T, D, t);
  auto R = at::randn({B, H, T, D}, at::kDouble);
  auto run = [&](bool fused) {
    auto x = x0.detach().clone().requires_grad_(true);
    auto xin = x.transpose(1, 2).contiguous().transpose(1, 2);  // non-contiguous view again
    auto y = fused ? fused_rope(xin, cos, sin, layout) : apply_rope(xin, cos, sin, layout);
    (y.to(at::kDouble) * R).sum().backward();
    return std::make_pair(y, x.grad());
  };
  auto [yf, gf] = run(true);
  auto [yr, gr] = run(false);
  CHECK(yf.scalar_type() == t);
  CHECK(gf.scalar_type() == t);
  CHECK(yf.strides() == x0.strides());  // keeps the [B, T, H, D] storage of its input
  const double tol = tol_for(t);
  CHECK(rel_err(yf, yr) < tol);
  CHECK(rel_err(gf, gr) < tol);
}

}  // namespace

TEST_CASE("fused RoPE equals apply_rope in values and gradients", "[nn][fused][rope]") {
  for (auto layout : {RopeLayout::HalfSplit, RopeLayout::Interleaved}) {
    INFO("interleaved " << (layout == RopeLayout::Interleaved));
    for (auto t : {at::kDouble, at::kFloat, at::kBFloat16}) {
      INFO("dtype " << c10::toString(t));
      compare_rope(t, layout, false);
      compare_rope(t, layout, true);  // cos/sin [1, T, D] broadcast over the batch
    }
  }
}

TEST_CASE("fused RoPE backward: finite differences and rotation by -theta", "[nn][fused][rope][grad]") {
  at::manual_seed(32);
  for (auto layout : {RopeLayout::HalfSplit, RopeLayout::Interleaved}) {
    auto [cos, sin] = tables(2, 3, 8, layout, at::kDouble);
    auto x = at::randn({2, 2, 3, 8}, at::kDouble), R = at::randn({2, 2, 3, 8}, at::kDouble);
    auto xg = x.clone().requires_grad_(true);
    (fused_rope(xg, cos, sin, layout) * R).sum().backward();
    auto num = nn_test::numeric_grad(
        x, [&] { return (fused_rope(x, cos, sin, layout) * R).sum().item<double>(); });
    CHECK(rel_err(xg.grad(), num) < 1e-8);
    // The gradient of a rotation is the rotation back: rope with -sin applied to R.
    CHECK(rel_err(xg.grad(), apply_rope(R, cos, -sin, layout)) < 1e-13);
    // and rotating forth and back is the identity.
    CHECK(rel_err(apply_rope(fused_rope(x, cos, sin, layout), cos, -sin, layout),
                  x * (cos * cos + sin * sin).unsqueeze(1)) < 1e-13);
  }
}

TEST_CASE("fused RoPE falls back to the twin where it does not apply", "[nn][fused][rope]") {
  at::manual_seed(33);
  auto [cos, sin] = tables(1, 4, 8, RopeLayout::HalfSplit, at::kFloat);
  auto x = at::randn({1, 2, 4, 8}).to(at::kHalf);  // fp16: not covered
  CHECK(rel_err(fused_rope(x, cos, sin, RopeLayout::HalfSplit),
                apply_rope(x, cos, sin, RopeLayout::HalfSplit)) == 0.0);
  auto bad = at::randn({1, 2, 4, 6});  // D mismatch: the twin's error
  CHECK_THROWS_WITH(fused_rope(bad, cos, sin, RopeLayout::HalfSplit),
                    Catch::Contains("[rope]"));
}

TEST_CASE("fused SwiGLU equals silu(gate) * up in values and gradients", "[nn][fused][swiglu]") {
  at::manual_seed(41);
  for (auto t : {at::kDouble, at::kFloat, at::kBFloat16}) {
    INFO("dtype " << c10::toString(t));
    // Large |gate| too, where sigmoid saturates; an odd size for the loop tails.
    auto g0 = (at::randn({3, 7, 333}, at::kDouble) * 4).to(t);
    auto u0 = at::randn({3, 7, 333}, at::kDouble).to(t);
    auto R = at::randn({3, 7, 333}, at::kDouble);
    auto run = [&](bool fused) {
      auto g = g0.clone().requires_grad_(true), u = u0.clone().requires_grad_(true);
      auto y = fused ? fused_swiglu(g, u) : at::silu(g) * u;
      (y.to(at::kDouble) * R).sum().backward();
      return std::make_tuple(y, g.grad(), u.grad());
    };
    auto [yf, dgf, duf] = run(true);
    auto [yr, dgr, dur] = run(false);
    CHECK(yf.scalar_type() == t);
    CHECK(dgf.scalar_type() == t);
    CHECK(rel_err(yf, yr) < tol_for(t));
    CHECK(rel_err(dgf, dgr) < tol_for(t));
    CHECK(rel_err(duf, dur) < tol_for(t));
  }
}

TEST_CASE("fused SwiGLU gradient against finite differences (float64)", "[nn][fused][swiglu][grad]") {
  at::manual_seed(42);
  auto g = at::randn({2, 3, 5}, at::kDouble) * 3, u = at::randn({2, 3, 5}, at::kDouble);
  auto R = at::randn({2, 3, 5}, at::kDouble);
  auto gg = g.clone().requires_grad_(true), ug = u.clone().requires_grad_(true);
  (fused_swiglu(gg, ug) * R).sum().backward();
  auto f = [&] { return (fused_swiglu(g, u) * R).sum().item<double>(); };
  CHECK(rel_err(gg.grad(), nn_test::numeric_grad(g, f)) < 1e-8);
  CHECK(rel_err(ug.grad(), nn_test::numeric_grad(u, f)) < 1e-8);
}

TEST_CASE("fused SwiGLU propagates NaN", "[nn][fused][swiglu]") {
  auto g = at::randn({4, 8}), u = at::randn({4, 8});
  g[1][3] = std::nan("");
  auto y = fused_swiglu(g, u);
  CHECK(std::isnan(y[1][3].item<double>()));
  CHECK(at::isfinite(y).sum().item<int64_t>() == 31);
}

namespace {

// The loss forms under test against the reference lm_loss: the fused CPU
// kernel and the chunked form at several chunk sizes (1 row, a ragged 5, the
// default, more rows than there are).
enum class LossForm { Fused, Chunk1, Chunk5, ChunkDefault, ChunkHuge };
const LossForm kForms[] = {LossForm::Fused, LossForm::Chunk1, LossForm::Chunk5, LossForm::ChunkDefault,
                           LossForm::ChunkHuge};

std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_of(LossForm f, const at::Tensor& x, const at::Tensor& tg,
                                                       int64_t ignore_index, double z_loss) {
  switch (f) {
    case LossForm::Fused: return fused_lm_loss(x, tg, ignore_index, z_loss);
    case LossForm::Chunk1: return chunked_lm_loss(x, tg, ignore_index, z_loss, 1);
    case LossForm::Chunk5: return chunked_lm_loss(x, tg, ignore_index, z_loss, 5);
    case LossForm::ChunkDefault: return chunked_lm_loss(x, tg, ignore_index, z_loss);
    case LossForm::ChunkHuge: return chunked_lm_loss(x, tg, ignore_index, z_loss, x.size(0) + 3);
  }
  return {};
}

int64_t count(const at::Tensor& n) {
  CHECK(n.dim() == 0);
  CHECK(n.scalar_type() == at::kLong);
  return n.item<int64_t>();
}

// Loss values, counts and logits gradients of one form vs lm_loss.
void compare_loss(LossForm form, at::ScalarType t, int64_t N, int64_t V, double z_loss) {
  INFO("form " << static_cast<int>(form) << " dtype " << t << " N " << N << " V " << V);
  at::manual_seed(51);
  auto x0 = (at::randn({N, V}, at::kDouble) * 3).to(t);
  auto tg = at::randint(0, V, {N}, at::kLong);
  tg.index_put_({at::randperm(N).narrow(0, 0, N / 4)}, -100);  // a quarter ignored
  const double a = 0.7, b = 1.3;  // weights of ce and z in the total
  auto run = [&](bool reference) {
    auto x = x0.clone().requires_grad_(true);
    auto [ce, z, n] = reference ? lm_loss(x, tg, -100, z_loss) : loss_of(form, x, tg, -100, z_loss);
    (ce * a + z * b).backward();
    return std::make_tuple(ce, z, n, x.grad());
  };
  auto [cef, zf, nf, gf] = run(false);
  auto [cer, zr, nr, gr] = run(true);
  CHECK(count(nf) == count(nr));
  CHECK(count(nr) == N - N / 4);
  CHECK(cef.scalar_type() == cer.scalar_type());
  CHECK(gf.scalar_type() == t);  // no fp32 copy of bf16 logits' gradient
  const double tol = t == at::kDouble ? 1e-12 : 1e-5;
  CHECK(rel_err(cef, cer) < tol);
  CHECK(rel_err(zf, zr) < tol);
  CHECK(rel_err(gf, gr) < tol_for(t));
}

}  // namespace

TEST_CASE("fused and chunked cross-entropy equal lm_loss (values, counts, gradients)", "[nn][fused][loss]") {
  for (const LossForm form : kForms)
    for (double z : {0.0, 1e-2}) {
      INFO("z_loss " << z);
      compare_loss(form, at::kDouble, 24, 101, z);
      compare_loss(form, at::kFloat, 64, 1000, z);
      compare_loss(form, at::kBFloat16, 64, 1000, z);
      compare_loss(form, at::kFloat, 9, 7, z);  // V under one vector of lanes
    }
}

TEST_CASE("the chunked cross-entropy's rows per chunk", "[nn][loss]") {
  CHECK(default_loss_chunk_rows(131072) == 128);  // 64 MiB of fp32 per chunk
  CHECK(default_loss_chunk_rows(8000) == 2097);
  CHECK(default_loss_chunk_rows(std::int64_t{1} << 30) == 1);
  auto x = at::randn({4, 6});
  CHECK_THROWS_WITH(chunked_lm_loss(x, at::zeros({4}, at::kLong), -100, 0.0, -1),
                    Catch::Contains("[lm_loss] chunk_rows must be >= 0"));
}

TEST_CASE("fused and chunked cross-entropy gradients against finite differences (float64)",
          "[nn][fused][loss][grad]") {
  for (const LossForm form : kForms) {
    INFO("form " << static_cast<int>(form));
    at::manual_seed(52);
    auto x = at::randn({5, 9}, at::kDouble) * 2;
    auto tg = at::tensor(std::vector<int64_t>{3, -100, 0, 8, 2}, at::kLong);
    auto f = [&](const at::Tensor& l) {
      auto [ce, z, n] = loss_of(form, l, tg, -100, 0.05);
      return ce * 0.9 + z * 1.7;
    };
    auto xg = x.clone().requires_grad_(true);
    f(xg).backward();
    auto num = nn_test::numeric_grad(x, [&] { return f(x).item<double>(); });
    CHECK(rel_err(xg.grad(), num) < 1e-8);
    CHECK(xg.grad()[1].abs().sum().item<double>() == 0.0);  // the ignored row
  }
}

TEST_CASE("fused and chunked cross-entropy: edge cases and errors", "[nn][fused][loss]") {
  for (const LossForm form : kForms) {
    INFO("form " << static_cast<int>(form));
    SECTION("all ignored: zero loss, zero gradient, count 0 (as lm_loss)") {
      auto x = at::randn({3, 10}).requires_grad_(true);
      auto tg = at::full({3}, -1, at::kLong);
      auto [ce, z, n] = loss_of(form, x, tg, -1, 1e-3);
      CHECK(count(n) == 0);
      CHECK(ce.item<double>() == 0.0);
      (ce + z).backward();
      CHECK(x.grad().abs().sum().item<double>() == 0.0);
    }
    SECTION("a NaN logit gives a NaN loss") {
      auto x = at::randn({3, 40});
      x[1][7] = std::nan("");
      auto [ce, z, n] = loss_of(form, x, at::tensor(std::vector<int64_t>{1, 2, 3}), -100, 0.0);
      CHECK(std::isnan(ce.item<double>()));
    }
    SECTION("targets outside the vocabulary and bad shapes throw") {
      auto x = at::randn({2, 5});
      CHECK_THROWS_WITH(loss_of(form, x, at::tensor(std::vector<int64_t>{1, 5}), -100, 0.0),
                        Catch::Contains("[lm_loss] a target id is outside the vocabulary"));
      CHECK_THROWS_WITH(loss_of(form, x, at::tensor(std::vector<int64_t>{1, 2, 3}), -100, 0.0),
                        Catch::Contains("[lm_loss]"));
    }
  }
}

namespace {

// Logits and all parameter gradients of the plain and the fused model (loss
// through lm_loss resp. fused_lm_loss); `cfg` possibly modified from the
// fixture's. float64: equal to rounding, per parameter. bf16 autocast: the
// fused model must be as close to the float32 model as the plain bf16 model
// is (both carry bf16 rounding noise, rounded at different places).
struct ModelRun {
  at::Tensor logits, grads;  // grads: all parameters', flattened, in named_parameters order
  std::vector<std::pair<std::string, at::Tensor>> named;
};

ModelRun run_model(const Fixture& fx, const ModelConfig& cfg, bool fused, bool bf16,
                   bool float32) {
  CausalLMOptions o;
  o.fused_kernels = fused;
  CausalLM lm(cfg, o);
  set_fused_kernels(*lm, fused);  // what fused_kernels does; explicit for RoPE and SwiGLU
  fx.load(lm);
  if (float32) lm->to(at::kFloat);
  if (fused) {
    int64_t n_fused = 0;
    for (auto& m : lm->modules(false)) {
      if (auto* a = dynamic_cast<AttentionImpl*>(m.get())) n_fused += a->fused;
      if (auto* p = dynamic_cast<MLPImpl*>(m.get())) n_fused += p->fused;
    }
    CHECK(n_fused == 2 * cfg.num_hidden_layers);
  }
  auto ids = fx.ids(0);
  auto labels = ids.roll(-1, 1);
  labels.select(1, labels.size(1) - 1).fill_(-100);
  ModelRun r;
  {
    rhine::AutocastGuard g(at::kCPU, at::kBFloat16, bf16);
    r.logits = lm->forward(ids).logits;
    auto flat = r.logits.reshape({-1, r.logits.size(-1)});
    auto [ce, z, n] = fused ? fused_lm_loss(flat, labels.reshape({-1}), -100, 1e-3)
                            : lm_loss(flat, labels.reshape({-1}), -100, 1e-3);
    (ce + z).backward();
  }
  std::vector<at::Tensor> all;
  for (auto& p : lm->named_parameters()) {
    r.named.emplace_back(p.key(), p.value().grad());
    all.push_back(p.value().grad().flatten().to(at::kDouble));
  }
  r.grads = at::cat(all);
  return r;
}

void compare_models(const Fixture& fx, const ModelConfig& cfg) {
  auto a = run_model(fx, cfg, false, false, false), b = run_model(fx, cfg, true, false, false);
  CHECK(rel_err(b.logits, a.logits) < 1e-12);
  for (std::size_t i = 0; i < a.named.size(); ++i) {
    INFO(a.named[i].first);
    CHECK(rel_err(b.named[i].second, a.named[i].second) < 1e-12);
  }
}

void compare_models_bf16(const Fixture& fx, const ModelConfig& cfg) {
  auto ref = run_model(fx, cfg, false, false, true);
  auto plain = run_model(fx, cfg, false, true, true), fused = run_model(fx, cfg, true, true, true);
  const double e_plain = rel_err(plain.grads, ref.grads), e_fused = rel_err(fused.grads, ref.grads);
  INFO("gradients vs float32: plain bf16 " << e_plain << ", fused bf16 " << e_fused);
  CHECK(e_plain < 0.1);
  CHECK(e_fused < 1.5 * e_plain);
  CHECK(rel_err(fused.grads, plain.grads) < 3e-2);
  CHECK(rel_err(fused.logits, ref.logits) < 1.5 * rel_err(plain.logits, ref.logits));
}

}  // namespace

TEST_CASE("a CausalLM with fused RoPE, SwiGLU and loss equals the plain model", "[nn][fused][model]") {
  for (const char* name : {"llama_tiny", "mistral_tiny"}) {
    INFO(name);
    Fixture fx(name);
    compare_models(fx, fx.config);
    auto inter = fx.config;
    inter.rope_interleave = true;
    compare_models(fx, inter);
    compare_models_bf16(fx, fx.config);  // bf16 autocast, fp32 weights
  }
  SECTION("the fused float64 model still matches the PyTorch reference logits") {
    Fixture fx("llama_tiny");
    CausalLM lm(fx.config);
    set_fused_kernels(*lm, true);
    fx.load(lm);
    CHECK(rel_err(lm->forward(fx.ids(0)).logits, fx.logits(0)) < 1e-12);
  }
}
