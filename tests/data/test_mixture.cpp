#include "torch_test.h"

#include <cmath>

#include "rhine/core/error.h"
#include "rhine/data/mixture.h"

using Catch::Matchers::Contains;
using rhine::MixtureOptions;

TEST_CASE("mixture weights are normalised and missing languages get 0", "[mixture]") {
  MixtureOptions o;
  o.kind = MixtureOptions::Kind::weights;
  o.weights = {{"de", 3}, {"fr", 1}};
  auto p = rhine::mixture_probabilities(o, {{"de", 10}, {"fr", 1000}, {"nl", 5}});
  CHECK(p["de"] == Approx(0.75));
  CHECK(p["fr"] == Approx(0.25));
  CHECK(p["nl"] == 0.0);
  o.weights = {{"de", 1}, {"xx", 1}};
  CHECK_THROWS_WITH(rhine::mixture_probabilities(o, {{"de", 10}}),
                    Contains("[mixture] a weight is given for a language without data, got \"xx\""));
  o.weights = {{"de", -1}};
  CHECK_THROWS_WITH(rhine::mixture_probabilities(o, {{"de", 10}}), Contains("must be finite and >= 0"));
  o.weights = {{"de", 0}};
  CHECK_THROWS_WITH(rhine::mixture_probabilities(o, {{"de", 10}}), Contains("every language has probability 0"));
}

TEST_CASE("temperature sampling p ~ n^(1/T)", "[mixture]") {
  MixtureOptions o;
  o.temperature = 2;
  auto p = rhine::mixture_probabilities(o, {{"en", 900}, {"nl", 100}});
  // sqrt(900) : sqrt(100) = 30 : 10
  CHECK(p["en"] == Approx(0.75));
  CHECK(p["nl"] == Approx(0.25));
  o.temperature = 1;
  p = rhine::mixture_probabilities(o, {{"en", 900}, {"nl", 100}});
  CHECK(p["en"] == Approx(0.9));
  o.temperature = 1e9;  // -> uniform
  p = rhine::mixture_probabilities(o, {{"en", 900}, {"nl", 100}});
  CHECK(p["en"] == Approx(0.5).epsilon(1e-6));
  o.temperature = 0;
  CHECK_THROWS_WITH(rhine::mixture_probabilities(o, {{"en", 1}}), Contains("temperature must be > 0"));
  CHECK(rhine::describe(o) == "temperature T=0");
}

TEST_CASE("UniMax caps small languages at max_epochs and spreads the rest uniformly", "[mixture]") {
  // Worked by hand (Chung et al. 2023, Algorithm 1), budget 1000, 2 epochs max:
  //   nl (50 tokens):  share 1000/3 = 333.3, cap 100 -> 100; remaining 900
  //   fr (300):        share 900/2 = 450, cap 600 -> 450;   remaining 450
  //   en (5000):       share 450/1 = 450 -> 450
  MixtureOptions o;
  o.kind = MixtureOptions::Kind::unimax;
  o.unimax_budget_tokens = 1000;
  o.unimax_max_epochs = 2;
  auto p = rhine::mixture_probabilities(o, {{"en", 5000}, {"fr", 300}, {"nl", 50}});
  CHECK(p["nl"] == Approx(0.10));
  CHECK(p["fr"] == Approx(0.45));
  CHECK(p["en"] == Approx(0.45));
  o.unimax_budget_tokens = 0;
  CHECK_THROWS_WITH(rhine::mixture_probabilities(o, {{"en", 1}}), Contains("unimax needs a positive token budget"));
}
