// KV-cached decoding == full-sequence recomputation; batched left-padded prompts
// == prompts alone; sampling filters against their definitions.
#include "nn_fixtures.h"

#include <ATen/core/grad_mode.h>
#include <map>

#include "rhine/core/random.h"
#include "rhine/nn/generate.h"

using namespace rhine::nn;
using nn_test::Fixture;
using nn_test::rel_err;

TEST_CASE("KV-cached incremental logits equal full-sequence logits", "[nn][generate][cache]") {
  // Mistral's window is 3, so later steps attend past the window edge.
  for (std::string name : {"llama_tiny", "mistral_tiny", "apertus_tiny"}) {
    INFO("fixture " << name);
    Fixture fx(name);
    CausalLM lm(fx.config);
    fx.load(lm);
    lm->eval();
    at::NoGradGuard ng;
    auto ids = fx.ids(0);
    const int64_t T = ids.size(1);
    auto full = lm->forward(ids).logits;  // [B, T, V]
    KVCache cache = lm->make_cache();
    ForwardOptions o;
    o.cache = &cache;
    std::vector<at::Tensor> parts = {lm->forward(ids.narrow(1, 0, 3), o).logits};  // prefill 3
    for (int64_t t = 3; t < T; ++t) parts.push_back(lm->forward(ids.narrow(1, t, 1), o).logits);
    CHECK(cache.length() == T);
    CHECK(rel_err(at::cat(parts, 1), full) < 1e-12);
  }
}

TEST_CASE("left-padded batches decode like prompts alone", "[nn][generate][batch]") {
  Fixture fx("apertus_tiny");
  CausalLM lm(fx.config);
  fx.load(lm);
  std::vector<std::vector<int64_t>> prompts = {{1, 5, 9, 4, 7, 20}, {1, 11}, {1, 3, 8}};
  GenerateOptions g;
  g.max_new_tokens = 6;
  auto batched = generate(lm, prompts, g, /*keep_logits=*/true);
  for (std::size_t b = 0; b < prompts.size(); ++b) {
    INFO("prompt " << b);
    auto alone = generate(lm, {prompts[b]}, g, true);
    CHECK(batched.tokens[b] == alone.tokens[0]);
    for (std::size_t s = 0; s < alone.step_logits.size(); ++s)
      CHECK(rel_err(batched.step_logits[s][b], alone.step_logits[s][0]) < 1e-10);
  }
}

TEST_CASE("greedy decoding picks the argmax of a full recomputation", "[nn][generate]") {
  Fixture fx("mistral_tiny");
  CausalLM lm(fx.config);
  fx.load(lm);
  std::vector<int64_t> prompt = {1, 7, 3, 12};
  GenerateOptions g;
  g.max_new_tokens = 8;
  auto out = generate(lm, {prompt}, g).tokens[0];
  REQUIRE(out.size() == 8u);
  at::NoGradGuard ng;
  std::vector<int64_t> seq = prompt;
  for (int64_t t : out) {
    auto logits = lm->forward(at::tensor(seq, at::kLong).unsqueeze(0)).logits[0][-1];
    CHECK(logits.argmax().item<int64_t>() == t);
    seq.push_back(t);
  }
  // A stop token ends the row right after its first emission.
  std::size_t k = out.size() - 1;
  while (k > 0 && std::find(out.begin(), out.begin() + k, out[k]) != out.begin() + k) --k;
  g.stop_tokens = {out[k]};
  auto stopped = generate(lm, {prompt}, g).tokens[0];
  CHECK(stopped == std::vector<int64_t>(out.begin(), out.begin() + k + 1));
}

TEST_CASE("sampling: seeds, temperature, top-k, top-p, repetition penalty",
          "[nn][generate][sample]") {
  // Probabilities 0.5, 0.3, 0.15, 0.05 as logits.
  auto logits = at::log(at::tensor({0.15, 0.5, 0.05, 0.3}, at::kFloat));
  GenerateOptions o;
  o.temperature = 1.0;
  rhine::Rng rng(42);
  at::Tensor kept;

  SECTION("top-p keeps the smallest set reaching p") {
    o.top_p = 0.8;  // 0.5 + 0.3 reaches 0.8
    sample_token(logits, {}, o, rng, &kept);
    CHECK(at::isfinite(kept).sum().item<int64_t>() == 2);
    CHECK(std::isfinite(kept[1].item<float>()));
    CHECK(std::isfinite(kept[3].item<float>()));
    o.top_p = 0.81;
    sample_token(logits, {}, o, rng, &kept);
    CHECK(at::isfinite(kept).sum().item<int64_t>() == 3);
    o.top_p = 0.01;  // the most likely token always stays
    for (int i = 0; i < 20; ++i) CHECK(sample_token(logits, {}, o, rng) == 1);
  }
  SECTION("top-k keeps exactly k") {
    o.top_k = 2;
    sample_token(logits, {}, o, rng, &kept);
    CHECK(at::isfinite(kept).sum().item<int64_t>() == 2);
    o.top_k = 1;
    for (int i = 0; i < 20; ++i) CHECK(sample_token(logits, {}, o, rng) == 1);
  }
  SECTION("temperature 1 samples the softmax distribution") {
    const int n = 40000;
    std::map<int64_t, int> counts;
    for (int i = 0; i < n; ++i) ++counts[sample_token(logits, {}, o, rng)];
    const std::vector<double> p = {0.15, 0.5, 0.05, 0.3};
    for (int t = 0; t < 4; ++t) {
      INFO("token " << t);
      // 5 standard deviations of a binomial proportion.
      CHECK(std::abs(counts[t] / double(n) - p[t]) < 5 * std::sqrt(p[t] * (1 - p[t]) / n));
    }
    // Temperature scales the logits: T = 0.5 squares and renormalises the probabilities.
    o.temperature = 0.5;
    sample_token(logits, {}, o, rng, &kept);
    auto q = kept.softmax(0).to(at::kDouble);
    auto sq = at::tensor(p, at::kDouble).pow(2);
    CHECK(rel_err(q, sq / sq.sum()) < 1e-6);
  }
  SECTION("repetition penalty divides positive and multiplies negative logits") {
    auto l = at::tensor({2.0f, -1.0f, 0.5f, 3.0f});
    o.temperature = 0.0;
    o.repetition_penalty = 2.0;
    CHECK(sample_token(l, {3, 1, 3}, o, rng, &kept) == 0);  // 3 -> 1.5 < 2
    CHECK(kept[3].item<float>() == 1.5f);
    CHECK(kept[1].item<float>() == -2.0f);
    CHECK(kept[0].item<float>() == 2.0f);
  }
  SECTION("vocab_limit: ids past it are never sampled, the rest as without it") {
    o.temperature = 0.0;
    CHECK(sample_token(logits, {}, o, rng) == 1);
    o.vocab_limit = 1;  // only id 0 is left
    CHECK(sample_token(logits, {}, o, rng, &kept) == 0);
    CHECK(kept.size(0) == 1);
    o.temperature = 1.0;
    o.vocab_limit = 3;  // 0.15, 0.5, 0.05 renormalised
    std::map<int64_t, int> counts;
    for (int i = 0; i < 3000; ++i) ++counts[sample_token(logits, {}, o, rng)];
    CHECK(counts.count(3) == 0);
    CHECK(counts[1] > counts[0]);
    o.vocab_limit = -1;
    CHECK_THROWS_WITH(sample_token(logits, {}, o, rng), Catch::Contains("vocab_limit >= 0"));
  }
  SECTION("same seed, same samples; other seed, other samples") {
    Fixture fx("llama_tiny");
    CausalLM lm(fx.config);
    fx.load(lm);
    GenerateOptions g;
    g.temperature = 1.5;
    g.top_k = 20;
    g.top_p = 0.95;
    g.repetition_penalty = 1.1;
    g.max_new_tokens = 12;
    g.seed = 7;
    auto a = generate(lm, {{1, 2, 3}, {4}}, g).tokens;
    auto b = generate(lm, {{1, 2, 3}, {4}}, g).tokens;
    CHECK(a == b);
    g.seed = 8;
    CHECK(generate(lm, {{1, 2, 3}, {4}}, g).tokens != a);
  }
}

TEST_CASE("batched sampling on the device equals sample_token row by row", "[nn][generate][sample]") {
  // sample_token is the reference twin of sample_tokens (what generate runs).
  at::manual_seed(3);
  const int64_t B = 6, V = 97;
  for (int variant = 0; variant < 8; ++variant) {
    GenerateOptions o;
    o.temperature = variant == 0 || variant == 6 ? 0.0 : 0.7 + 0.2 * variant;
    o.top_k = variant == 2 || variant == 5 ? 10 : 0;
    o.top_p = variant >= 3 ? 0.9 : 1.0;
    o.repetition_penalty = variant % 2 ? 1.3 : 1.0;
    o.vocab_limit = variant >= 6 ? 60 : 0;  // a vocabulary padded past the tokenizer's 60 ids
    INFO("variant " << variant);
    for (int trial = 0; trial < 20; ++trial) {
      const auto logits = at::randn({B, V}, at::kDouble) * 3;
      std::vector<std::vector<int64_t>> seen_ids(B);
      at::Tensor seen = at::zeros({B, V}, at::kBool);
      for (int64_t b = 0; b < B; ++b)
        for (int k = 0; k < 5; ++k) {
          const int64_t t = (b * 31 + k * 17 + trial) % V;
          seen_ids[b].push_back(t);
          seen[b][t] = true;
        }
      std::vector<bool> active(B, true);
      active[2] = trial % 3 != 0;  // a finished row draws nothing
      std::vector<rhine::Rng> a, r;
      for (int64_t b = 0; b < B; ++b) {
        a.emplace_back(100 + trial, b);
        r.emplace_back(100 + trial, b);
      }
      at::Tensor processed;
      const auto got = sample_tokens(logits, seen, active, o, a, &processed);
      for (int64_t b = 0; b < B; ++b) {
        INFO("row " << b);
        if (!active[b]) {
          CHECK(got[b].item<int64_t>() == -1);
          continue;
        }
        at::Tensor want_processed;
        const auto want = sample_token(logits[b], seen_ids[b], o, r[b], &want_processed);
        CHECK(got[b].item<int64_t>() == want);
        CHECK(at::equal(processed[b], want_processed));
        if (o.vocab_limit > 0) CHECK(want < o.vocab_limit);
      }
      // Inactive rows did not advance their generator.
      CHECK(a[2].uniform() == r[2].uniform());
    }
  }
}
