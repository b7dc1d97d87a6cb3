// KV-cached generation. Dimension letters: B prompts, P padded prompt
// length, V vocabulary.
#include "rhine/nn/generate.h"

#include <ATen/core/grad_mode.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <set>

#include "rhine/core/error.h"

namespace rhine::nn {

std::int64_t sample_token(const at::Tensor& logits, const std::vector<std::int64_t>& seen,
                          const GenerateOptions& o, Rng& rng, at::Tensor* processed) {
  RHINE_CHECK(logits.dim() == 1, "generate", "sample_token takes one row of logits [V]",
              logits.sizes().vec(), "");
  RHINE_CHECK(
      o.temperature >= 0 && o.top_p > 0 && o.top_p <= 1 && o.top_k >= 0 && o.repetition_penalty > 0,
      "generate",
      "invalid sampling options (temperature >= 0, 0 < top_p <= 1, top_k >= 0, repetition_penalty "
      "> 0)",
      (std::vector<double>{o.temperature, o.top_p, static_cast<double>(o.top_k),
                           o.repetition_penalty}),
      "");
  at::Tensor l = logits.to(at::kFloat).contiguous().clone();  // [V]
  const std::int64_t V = l.size(0);
  const float ninf = -std::numeric_limits<float>::infinity();
  float* lp = l.data_ptr<float>();
  if (o.repetition_penalty != 1.0) {
    for (std::int64_t t : std::set<std::int64_t>(seen.begin(), seen.end())) {
      if (t < 0 || t >= V) continue;
      lp[t] = lp[t] > 0 ? static_cast<float>(lp[t] / o.repetition_penalty)
                        : static_cast<float>(lp[t] * o.repetition_penalty);
    }
  }
  if (o.temperature == 0.0) {  // greedy: the first maximum, as argmax
    if (processed) *processed = l;
    return std::max_element(lp, lp + V) - lp;
  }
  l.div_(o.temperature);
  if (o.top_k > 0 && o.top_k < V) {
    const float kth = std::get<0>(l.topk(o.top_k)).min().item<float>();
    l.masked_fill_(l < kth, ninf);
  }
  if (o.top_p < 1.0) {
    auto [sorted, order] = l.sort(/*dim=*/0, /*descending=*/true);
    at::Tensor cum = sorted.softmax(0).cumsum(0);
    // Remove a token when the tokens before it already reach top_p; the first
    // token always stays.
    at::Tensor remove = (cum - sorted.softmax(0)) >= o.top_p;
    l.index_put_({order.masked_select(remove)}, ninf);
  }
  if (processed) *processed = l;
  at::Tensor p = l.softmax(0).to(at::kDouble).contiguous();
  const double* pp = p.data_ptr<double>();
  const double u = rng.uniform();
  double acc = 0.0;
  std::int64_t last = -1;
  for (std::int64_t t = 0; t < V; ++t) {
    if (pp[t] <= 0) continue;
    acc += pp[t];
    last = t;
    if (u < acc) return t;
  }
  return last;  // u beyond the rounded total: the last kept token
}

GenerateResult generate(CausalLM& model, const std::vector<std::vector<std::int64_t>>& prompts,
                        const GenerateOptions& o, bool keep_logits) {
  RHINE_CHECK(!prompts.empty(), "generate", "no prompts given", prompts.size(),
              "pass at least one");
  std::int64_t P = 0;
  for (const auto& p : prompts) {
    RHINE_CHECK(!p.empty(), "generate", "a prompt is empty", p.size(),
                "start each prompt with at least one token (e.g. BOS)");
    P = std::max<std::int64_t>(P, static_cast<std::int64_t>(p.size()));
  }
  const auto B = static_cast<std::int64_t>(prompts.size());
  const auto dev = model->output_weight().device();
  const bool was_training = model->is_training();
  model->eval();
  at::NoGradGuard no_grad;

  // Left padding: every row's last prompt token sits at column P - 1.
  at::Tensor ids = at::full({B, P}, o.pad_token_id, at::kLong);
  at::Tensor mask = at::zeros({B, P}, at::kBool);
  for (std::int64_t b = 0; b < B; ++b) {
    const auto n = static_cast<std::int64_t>(prompts[b].size());
    ids[b].narrow(0, P - n, n).copy_(at::tensor(prompts[b], at::kLong));
    mask[b].narrow(0, P - n, n).fill_(true);
  }
  KVCache cache = model->make_cache();
  ForwardOptions f;
  f.cache = &cache;
  f.attention_mask = mask.to(dev);
  f.last_logits_only = true;
  at::Tensor logits = model->forward(ids.to(dev), f).logits.select(1, 0);  // [B, V]

  std::vector<Rng> rngs;
  for (std::int64_t b = 0; b < B; ++b) rngs.emplace_back(o.seed, static_cast<std::uint64_t>(b));
  GenerateResult r;
  r.tokens.resize(B);
  std::vector<std::vector<std::int64_t>> seen = prompts;
  std::vector<bool> done(B, false);
  f.attention_mask.reset();
  for (std::int64_t step = 0; step < o.max_new_tokens; ++step) {
    at::Tensor lc = logits.to(at::kFloat).cpu();
    at::Tensor kept = keep_logits ? at::empty_like(lc) : at::Tensor();
    at::Tensor next = at::full({B, 1}, o.pad_token_id, at::kLong);
    for (std::int64_t b = 0; b < B; ++b) {
      if (done[b]) continue;
      at::Tensor processed;
      const std::int64_t t =
          sample_token(lc[b], seen[b], o, rngs[b], keep_logits ? &processed : nullptr);
      if (keep_logits) kept[b].copy_(processed);
      r.tokens[b].push_back(t);
      seen[b].push_back(t);
      next[b][0] = t;
      if (std::find(o.stop_tokens.begin(), o.stop_tokens.end(), t) != o.stop_tokens.end())
        done[b] = true;
    }
    if (keep_logits) r.step_logits.push_back(kept);
    if (std::all_of(done.begin(), done.end(), [](bool d) { return d; }) ||
        step + 1 == o.max_new_tokens)
      break;
    // Finished rows keep decoding a padding token; their output is ignored.
    logits = model->forward(next.to(dev), f).logits.select(1, 0);
  }
  if (was_training) model->train();
  return r;
}

}  // namespace rhine::nn
