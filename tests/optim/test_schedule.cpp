// Schedules (exact values at boundary steps), gradient clipping against a
// direct float64 norm, and the skip-step guard.
#include "torch_test.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <limits>
#include <sstream>
#include <vector>

#include "rhine/core/error.h"
#include "rhine/optim/clip.h"
#include "rhine/optim/schedule.h"
#include "rhine/optim/skip_guard.h"

using Catch::Matchers::Contains;

TEST_CASE("linear, cosine and decay pieces are exact at their boundaries", "[schedule]") {
  auto lin = rhine::linear(100, 0.0, 3e-4);
  CHECK(lin(0) == 0.0);
  CHECK(lin(50) == 1.5e-4);
  CHECK(lin(100) == 3e-4);
  CHECK(lin(10'000) == 3e-4);
  auto cos = rhine::cosine(1000, 3e-4, 3e-5);
  CHECK(cos(0) == 3e-4);
  CHECK(cos(500) == Approx(1.65e-4).epsilon(1e-14));
  CHECK(cos(1000) == 3e-5);
  CHECK(cos(5000) == 3e-5);
  auto sq = rhine::decay(400, 1.0, 0.1, rhine::DecayShape::kOneMinusSqrt);
  CHECK(sq(0) == 1.0);
  CHECK(sq(100) == Approx(0.1 + 0.9 * 0.5).epsilon(1e-15));  // r = 1/4, 1 - sqrt(r) = 1/2
  CHECK(sq(400) == 0.1);
  CHECK(rhine::decay(400, 1.0, 0.1, rhine::DecayShape::kLinear)(100) == Approx(0.775).epsilon(1e-15));
  CHECK_THROWS_WITH(rhine::linear(0, 0, 1), Contains("[schedule] a decay/linear piece needs steps >= 1"));
  CHECK_THROWS_WITH(lin(-1), Contains("step must be >= 0"));
}

TEST_CASE("WSD: warmup, stable and 1-sqrt / linear cooldown hit their boundaries exactly", "[schedule]") {
  rhine::WsdOptions o;
  o.warmup = 100, o.stable = 800, o.decay = 100, o.peak = 1e-3, o.floor = 1e-5;
  auto s = rhine::wsd(o);
  CHECK(s(0) == 0.0);
  CHECK(s(1) == 1e-5);
  CHECK(s(100) == 1e-3);   // first stable step
  CHECK(s(899) == 1e-3);   // last stable step
  CHECK(s(900) == 1e-3);   // decay r = 0
  CHECK(s(925) == Approx(1e-5 + (1e-3 - 1e-5) * 0.5).epsilon(1e-14));
  CHECK(s(1000) == 1e-5);  // decay done
  CHECK(s(123456) == 1e-5);
  o.shape = rhine::DecayShape::kLinear;
  CHECK(rhine::wsd(o)(950) == Approx(1e-5 + (1e-3 - 1e-5) * 0.5).epsilon(1e-14));
  CHECK(rhine::wsd(o).describe() ==
        "wsd[linear(0 -> 0.001, 100) until 100 | constant(0.001) until 800 | "
        "linear(0.001 -> 1e-05, 100) until 100 | constant(1e-05)]");
  o.warmup = 0, o.decay = 0;
  CHECK(rhine::wsd(o)(799) == 1e-3);
  CHECK(rhine::wsd(o)(800) == 1e-5);
}

TEST_CASE("multi-step, warmup-cosine and composition", "[schedule]") {
  // DeepSeek LLM's multi-step: 31.6% of peak after 80% of training, 10% after 90%.
  auto ms = rhine::multi_step(4.2e-4, {{800, 0.316}, {900, 0.1}});
  CHECK(ms(0) == 4.2e-4);
  CHECK(ms(799) == 4.2e-4);
  CHECK(ms(800) == 4.2e-4 * 0.316);
  CHECK(ms(899) == 4.2e-4 * 0.316);
  CHECK(ms(900) == 4.2e-4 * 0.1);
  CHECK_THROWS_WITH(rhine::multi_step(1, {{10, 0.5}, {10, 0.1}}), Contains("strictly increasing"));

  auto wc = rhine::warmup_cosine(10, 110, 2.0, 0.2);
  CHECK(wc(0) == 0.0);
  CHECK(wc(5) == 1.0);
  CHECK(wc(10) == 2.0);
  CHECK(wc(60) == Approx(1.1).epsilon(1e-14));
  CHECK(wc(110) == 0.2);

  auto prod = rhine::linear(10, 0.0, 1.0) * rhine::constant(3e-4);
  CHECK(prod(5) == 0.5 * 3e-4);
  auto chain = rhine::constant(1.0).then(5, rhine::constant(2.0)).then(10, rhine::constant(3.0));
  CHECK(chain(4) == 1.0);
  CHECK(chain(5) == 2.0);
  CHECK(chain(10) == 3.0);
  std::ostringstream os;
  os << prod;
  CHECK(os.str() == "(linear(0 -> 1, 10)) * (constant(0.0003))");
  CHECK(rhine::decay_shape_from_string("1-sqrt") == rhine::DecayShape::kOneMinusSqrt);
  CHECK_THROWS_WITH(rhine::decay_shape_from_string("sqrt"), Contains("unknown decay shape"));
}

TEST_CASE("schedules from JSON configs equal the ones built in code", "[schedule]") {
  using rhine::Json;
  auto w = rhine::schedule_from_json(Json::parse(
      R"({"type": "wsd", "warmup": 10, "stable": 80, "decay": 10, "peak": 2.0, "floor": 0.2, "shape": "linear"})"));
  auto ref = rhine::wsd({10, 80, 10, 0.0, 2.0, 0.2, rhine::DecayShape::kLinear});
  for (int64_t t : {0, 5, 10, 89, 90, 95, 100, 200}) CHECK(w(t) == ref(t));
  CHECK(w.describe() == ref.describe());
  auto ms = rhine::schedule_from_json(Json::parse(R"({"type": "multi_step", "base": 1.0, "milestones": [[5, 0.5], [9, 0.25]]})"));
  CHECK(ms(4) == 1.0);
  CHECK(ms(5) == 0.5);
  CHECK(ms(9) == 0.25);
  CHECK(rhine::schedule_from_json(Json::parse(R"({"type": "decay", "steps": 4, "from": 1, "to": 0, "shape": "1-sqrt"})"))(1) == 0.5);
  CHECK(rhine::schedule_from_json(Json::parse(R"({"type": "warmup_cosine", "warmup": 2, "total": 12})"))(2) == 1.0);
  CHECK_THROWS_WITH(rhine::schedule_from_json(Json::parse(R"({"type": "cosine", "steps": 4, "from": 1, "too": 0})")),
                    Contains("[schedule]"));
  CHECK_THROWS_WITH(rhine::schedule_from_json(Json::parse(R"({"type": "exp"})")),
                    Contains("[schedule] unknown schedule type, got \"exp\""));
}

TEST_CASE("clip_grad_norm returns the pre-clip norm of a direct float64 computation", "[clip]") {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(5);
  std::vector<at::Tensor> ps;
  for (auto shape : {std::vector<int64_t>{300, 7}, {11}, {4, 5, 6}, {1}}) {
    auto p = at::zeros(shape).requires_grad_(true);
    p.mutable_grad() = at::randn(shape, gen) * 3.0;
    ps.push_back(p);
  }
  ps.push_back(at::zeros({3}).requires_grad_(true));  // no gradient: skipped
  ps.push_back(at::zeros({9}, at::kBFloat16).requires_grad_(true));
  ps.back().mutable_grad() = at::randn({9}, gen).to(at::kBFloat16);

  auto direct = [&] {  // sum of squares over every element, in float64, element by element
    double s = 0;
    for (const auto& p : ps) {
      if (!p.grad().defined()) continue;
      auto g = p.grad().to(at::kDouble).contiguous();
      for (int64_t i = 0; i < g.numel(); ++i) s += g.data_ptr<double>()[i] * g.data_ptr<double>()[i];
    }
    return std::sqrt(s);
  };
  const double before = direct();
  CHECK(rhine::grad_norm(ps).item<double>() == Approx(before).epsilon(1e-6));
  CHECK(rhine::clip_grad_norm(ps, 1e6).item<double>() == Approx(before).epsilon(1e-6));  // no clipping
  CHECK(direct() == before);
  const double returned = rhine::clip_grad_norm(ps, 2.5).item<double>();
  CHECK(returned == Approx(before).epsilon(1e-6));
  CHECK(direct() == Approx(2.5).epsilon(1e-2));  // bf16 gradient rounds on scaling
  CHECK(rhine::grad_norm({ps[0], ps[1], ps[2], ps[3]}).item<double>() <= 2.5);

  ps[1].grad()[3] = std::numeric_limits<float>::infinity();
  auto copy = ps[0].grad().clone();
  CHECK(std::isinf(rhine::clip_grad_norm(ps, 1.0).item<double>()));
  CHECK(at::equal(copy, ps[0].grad()));  // left alone
  CHECK_THROWS_WITH(rhine::clip_grad_norm(ps, 0.0), Contains("[clip] max_norm must be finite and > 0"));
  CHECK(rhine::grad_norm({at::zeros({2})}).item<double>() == 0.0);
}

TEST_CASE("SkipGuard skips non-finite values and spikes, counts them, and restores exactly", "[skip_guard]") {
  rhine::SkipGuardOptions o;
  o.window = 50, o.min_history = 10, o.n_sigma = 6.0, o.max_consecutive_outliers = 3;
  rhine::SkipGuard g(o);
  auto noisy = [](int k) { return 2.0 + 0.1 * std::sin(1.7 * k); };  // std about 0.07
  for (int k = 0; k < 10; ++k) CHECK(g.check(noisy(k) * (k == 5 ? 100 : 1), 1.0).accept);  // too early to judge
  // A constant grad norm (std 0) does not flag a 1% rise: the std floor is 1% of the mean.
  for (int k = 10; k < 30; ++k) CHECK(g.check(noisy(k), 1.0 + 0.01 * (k % 3)).accept);
  // The 100x spike at k = 5 is in g's window (mean 6.9, std 21), so judge with a clean guard.
  rhine::SkipGuard clean(o);
  for (int k = 0; k < 30; ++k) REQUIRE(clean.check(noisy(k), 1.0 + 0.01 * (k % 3)).accept);
  auto d = clean.check(50.0, 1.0);
  CHECK_FALSE(d.accept);
  CHECK_THAT(d.reason, Contains("loss 50 > mean"));
  CHECK_FALSE(clean.check(2.0, 40.0).accept);
  CHECK_THAT(clean.check(2.0, 40.0).reason, Contains("grad_norm 40"));
  CHECK_FALSE(clean.check(std::nan(""), 1.0).accept);
  CHECK(clean.check(std::nan(""), 1.0).reason == "non-finite loss");
  CHECK(clean.check(2.0, std::numeric_limits<double>::infinity()).reason == "non-finite grad_norm");
  CHECK(clean.n_skipped() == 6);
  CHECK(clean.n_outliers() == 3);
  CHECK(clean.n_nonfinite() == 3);
  CHECK(clean.check(noisy(31), 1.01).accept);  // normal values pass again

  // Save, restore, and both judge the same future identically.
  rhine::SkipGuard restored(o);
  restored.load_state(rhine::Json::parse(clean.state().dump()));
  CHECK(restored.state() == clean.state());
  for (int k = 0; k < 20; ++k) {
    const double loss = noisy(40 + k) + (k == 7 ? 3.0 : 0.0);
    CHECK(restored.check(loss, 1.0).accept == clean.check(loss, 1.0).accept);
  }
  CHECK(restored.state() == clean.state());

  // A lasting level shift is accepted after max_consecutive_outliers skips.
  for (int k = 0; k < 3; ++k) CHECK_FALSE(clean.check(20.0, 1.0).accept);
  CHECK(clean.check(20.0, 1.0).accept);  // the 4th in a row goes through

  o.min_history = 1;
  CHECK_THROWS_WITH(rhine::SkipGuard(o), Contains("[skip_guard] min_history must be in [2, window]"));
}

TEST_CASE("SkipGuard's defaults leave early training alone and judge once half the window is in", "[skip_guard]") {
  // Early training as the demo logs it: the gradient norm falls from 1.6
  // towards 1 while the lr warms up, with a bump to 4.2 at step 28.
  auto early = [](int k) { return 1.0 + 0.6 * std::exp(-k / 8.0) + 0.05 * std::sin(1.3 * k); };
  rhine::SkipGuard g;  // defaults: window 100, min_history 50
  for (int k = 0; k < 50; ++k) CHECK(g.check(9.0 - 0.01 * k, k == 28 ? 4.2 : early(k)).accept);
  // After 50 accepted steps a spike is judged (threshold about 3.9 here).
  CHECK_FALSE(g.check(8.5, 6.0).accept);
  CHECK(g.n_outliers() == 1);
  // With the old min_history of 20 the healthy bump at step 28 was skipped.
  rhine::SkipGuardOptions o;
  o.min_history = 20;
  rhine::SkipGuard eager(o);
  int skipped = 0;
  for (int k = 0; k < 50; ++k) skipped += eager.check(9.0 - 0.01 * k, k == 28 ? 4.2 : early(k)).accept ? 0 : 1;
  CHECK(skipped == 1);
}
