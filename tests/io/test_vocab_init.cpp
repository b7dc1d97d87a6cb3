// FOCUS initialisation pieces (rhine/io/vocab.h): sparsemax against an independent
// projection onto the simplex (bisection on tau), the auxiliary vectors on a corpus whose
// structure is known, and the recipes (support, weights, fallback). The whole path against
// transformers is oracle.extend_vocab (tests/io/vocab_test.sh).
#include "torch_test.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "rhine/core/error.h"
#include "rhine/core/random.h"
#include "rhine/io/vocab.h"

using rhine::io::RowRecipe;
using rhine::io::VocabResizeOptions;

namespace {

// The projection of z onto the simplex by bisection on tau (sum max(z - tau, 0) = 1).
std::vector<double> project_by_bisection(const std::vector<float>& z) {
  double lo = *std::min_element(z.begin(), z.end()) - 1.0, hi = *std::max_element(z.begin(), z.end());
  for (int i = 0; i < 200; ++i) {
    const double mid = (lo + hi) / 2;
    double s = 0;
    for (float x : z) s += std::max(0.0, x - mid);
    (s > 1 ? lo : hi) = mid;
  }
  std::vector<double> p;
  for (float x : z) p.push_back(std::max(0.0, x - lo));
  return p;
}

float cosine(const rhine::io::TokenVectors& v, int a, int b) {
  float dot = 0;
  for (int k = 0; k < v.dim; ++k) dot += v.vectors[a * v.dim + k] * v.vectors[b * v.dim + k];
  return dot;
}

}  // namespace

TEST_CASE("sparsemax is the projection onto the simplex", "[vocab_init]") {
  CHECK(rhine::io::sparsemax({0.5f, 0.5f}) == std::vector<float>{0.5f, 0.5f});
  CHECK(rhine::io::sparsemax({3.0f, 1.0f, 0.0f}) == std::vector<float>{1.0f, 0.0f, 0.0f});
  // Support: the top 3 (1 + 3 * 0.4 > 1.8, 1 + 4 * -0.2 < 1.6), tau = (1.8 - 1) / 3.
  const auto p = rhine::io::sparsemax({0.9f, 0.5f, 0.4f, -0.2f});
  CHECK(std::abs(p[0] - (0.9f - 0.8f / 3)) < 1e-6f);
  CHECK(std::abs(p[2] - (0.4f - 0.8f / 3)) < 1e-6f);
  CHECK(p[3] == 0.0f);
  rhine::Rng rng(7);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<float> z(1 + rng.below(300));
    const double scale = trial % 3 == 0 ? 0.05 : trial % 3 == 1 ? 1.0 : 20.0;
    for (float& x : z) x = static_cast<float>((rng.uniform() * 2 - 1) * scale);
    const auto got = rhine::io::sparsemax(z);
    const auto want = project_by_bisection(z);
    double sum = 0;
    for (std::size_t i = 0; i < z.size(); ++i) {
      REQUIRE(got[i] >= 0.0f);
      REQUIRE(std::abs(got[i] - want[i]) < 1e-5);
      sum += got[i];
    }
    REQUIRE(std::abs(sum - 1.0) < 1e-5);
  }
}

TEST_CASE("the auxiliary vectors put tokens used alike close together", "[vocab_init]") {
  // Tokens 0..2 are "subjects": kat and poes always stand between words of set X (4..103),
  // auto between words of set Y (104..203); around them 8 fillers (204..703). Token 3 (a
  // byte piece) never occurs.
  std::vector<std::string> strings = {"\xE2\x96\x81" "kat", "\xE2\x96\x81" "poes", "\xE2\x96\x81" "auto", "<0x41>"};
  for (int i = 4; i < 704; ++i) strings.push_back(std::to_string(100000 + i));  // "100004", ...
  std::vector<std::vector<std::int32_t>> corpus;
  rhine::Rng rng(3);
  for (int i = 0; i < 8000; ++i) {
    const auto subject = static_cast<std::int32_t>(rng.below(3));
    const std::int32_t set = subject < 2 ? 4 : 104;
    std::vector<std::int32_t> line;
    for (int k = 0; k < 4; ++k) line.push_back(static_cast<std::int32_t>(204 + rng.below(500)));
    for (int k = 0; k < 2; ++k) line.push_back(static_cast<std::int32_t>(set + rng.below(100)));
    line.push_back(subject);
    for (int k = 0; k < 2; ++k) line.push_back(static_cast<std::int32_t>(set + rng.below(100)));
    for (int k = 0; k < 4; ++k) line.push_back(static_cast<std::int32_t>(204 + rng.below(500)));
    corpus.push_back(std::move(line));
  }
  VocabResizeOptions o;
  o.focus_dim = 16, o.focus_epochs = 5;
  const auto v = rhine::io::train_token_vectors(corpus, strings, o);
  REQUIRE(v.dim == 16);
  CHECK(v.counts[0] + v.counts[1] + v.counts[2] == 8000);
  CHECK(v.counts[3] == 0);
  CHECK(std::all_of(v.vectors.begin() + 3 * 16, v.vectors.begin() + 4 * 16, [](float x) { return x == 0.0f; }));
  for (int t : {0, 1, 2}) CHECK(std::abs(cosine(v, t, t) - 1.0f) < 1e-5f);
  INFO("cos(kat, poes) " << cosine(v, 0, 1) << ", cos(kat, auto) " << cosine(v, 0, 2));
  CHECK(cosine(v, 0, 1) > cosine(v, 0, 2) + 0.3f);  // here 0.991 vs 0.026
  // Deterministic for a seed; another seed gives other vectors.
  CHECK(rhine::io::train_token_vectors(corpus, strings, o).vectors == v.vectors);
  o.seed = 2;
  CHECK(rhine::io::train_token_vectors(corpus, strings, o).vectors != v.vectors);
}

TEST_CASE("FOCUS recipes: sparsemax over candidates, fallback for rare tokens", "[vocab_init]") {
  // 4 base tokens, 2 new ones; vectors chosen by hand (unit length, dim 2).
  rhine::io::TokenVectors aux;
  aux.dim = 2;
  const float s = std::sqrt(0.5f);
  aux.vectors = {1, 0, 0, 1, s, s, -1, 0, /*new 4*/ 1, 0, /*new 5*/ 0, 1};
  aux.counts = {10, 10, 10, 1, 5, 1};
  const std::vector<RowRecipe> fallback = {{{0, 0.5f}, {1, 0.5f}}, {{2, 1.0f}}};
  const auto r = rhine::io::focus_recipes(aux, 4, {true, true, false, true}, 3, fallback);
  REQUIRE(r.size() == 2);
  // New 4 = (1, 0): cosines to the candidates 0 (1), 1 (0); token 2 is not a candidate and 3
  // is too rare. sparsemax(1, 0) = (1, 0).
  REQUIRE(r[0].size() == 1);
  CHECK(r[0][0].first == 0);
  CHECK(r[0][0].second == 1.0f);
  CHECK(r[1] == fallback[1]);  // seen once: falls back
  // Two candidates at equal similarity share the weight.
  aux.vectors[8] = s, aux.vectors[9] = s;
  const auto r2 = rhine::io::focus_recipes(aux, 4, {true, true, false, true}, 3, fallback);
  REQUIRE(r2[0].size() == 2);
  CHECK(std::abs(r2[0][0].second - 0.5f) < 1e-6f);
  CHECK_THROWS_AS(rhine::io::focus_recipes(aux, 4, {true, true, false, true}, 3, {}), rhine::Error);
}
