// KV-cached generation. Dimension letters: B prompts, P padded prompt
// length, V vocabulary.
#include "rhine/nn/generate.h"

#include <ATen/core/grad_mode.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <set>

#include "rhine/core/error.h"
#include "rhine/torch/sync.h"

namespace rhine::nn {

namespace {

void check_sampling_options(const GenerateOptions& o) {
  RHINE_CHECK(
      o.temperature >= 0 && o.top_p > 0 && o.top_p <= 1 && o.top_k >= 0 && o.repetition_penalty > 0 &&
          o.vocab_limit >= 0,
      "generate",
      "invalid sampling options (temperature >= 0, 0 < top_p <= 1, top_k >= 0, repetition_penalty "
      "> 0, vocab_limit >= 0)",
      (std::vector<double>{o.temperature, o.top_p, static_cast<double>(o.top_k),
                           o.repetition_penalty, static_cast<double>(o.vocab_limit)}),
      "");
}

// The logits of the ids that may be sampled: [..., 0, vocab_limit).
at::Tensor sampled_columns(const at::Tensor& t, const GenerateOptions& o) {
  return o.vocab_limit > 0 && o.vocab_limit < t.size(-1) ? t.narrow(-1, 0, o.vocab_limit) : t;
}

}  // namespace

std::int64_t sample_token(const at::Tensor& logits, const std::vector<std::int64_t>& seen,
                          const GenerateOptions& o, Rng& rng, at::Tensor* processed) {
  RHINE_CHECK(logits.dim() == 1, "generate", "sample_token takes one row of logits [V]",
              logits.sizes().vec(), "");
  check_sampling_options(o);
  at::Tensor l = sampled_columns(logits, o).to(at::kFloat).contiguous().clone();  // [V]
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
    const float kth = cpu_value<float>(std::get<0>(l.topk(o.top_k)).min());
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

at::Tensor sample_tokens(const at::Tensor& logits, const at::Tensor& seen, const std::vector<bool>& active,
                         const GenerateOptions& o, std::vector<Rng>& rngs, at::Tensor* processed) {
  RHINE_CHECK(logits.dim() == 2 && seen.sizes() == logits.sizes() &&
                  static_cast<std::int64_t>(active.size()) == logits.size(0) &&
                  static_cast<std::int64_t>(rngs.size()) == logits.size(0),
              "generate", "sample_tokens takes logits [B, V], seen [B, V], B active flags and B generators",
              logits.sizes().vec(), "");
  check_sampling_options(o);
  const auto B = logits.size(0), V = sampled_columns(logits, o).size(1);
  const float ninf = -std::numeric_limits<float>::infinity();
  at::Tensor l = sampled_columns(logits, o).to(at::kFloat).contiguous();  // [B, V]
  if (o.repetition_penalty != 1.0) {
    // As sample_token: the division / product in double, rounded to float.
    const at::Tensor ld = l.to(at::kDouble);
    const at::Tensor pen = at::where(l > 0, ld / o.repetition_penalty, ld * o.repetition_penalty).to(at::kFloat);
    l = at::where(sampled_columns(seen, o), pen, l);
  }
  const auto fallback = at::full({B}, -1, l.options().dtype(at::kLong));
  if (o.temperature == 0.0) {  // greedy: the first maximum
    if (processed) *processed = l;
    at::Tensor next = l.argmax(-1);
    return at::where(at::tensor(std::vector<std::uint8_t>(active.begin(), active.end())).to(l.device()).to(at::kBool),
                     next, fallback);
  }
  l = l / o.temperature;
  if (o.top_k > 0 && o.top_k < V) {
    const at::Tensor kth = std::get<0>(l.topk(o.top_k, -1)).amin(-1, /*keepdim=*/true);  // [B, 1]
    l = l.masked_fill(l < kth, ninf);
  }
  if (o.top_p < 1.0) {
    auto [sorted, order] = l.sort(/*dim=*/-1, /*descending=*/true);
    const at::Tensor sp = sorted.softmax(-1);
    const at::Tensor remove = (sp.cumsum(-1) - sp) >= o.top_p;  // [B, V] in sorted order
    l = l.scatter(-1, order, sorted.masked_fill(remove, ninf));
  }
  if (processed) *processed = l;
  const at::Tensor p = l.softmax(-1).to(at::kDouble);  // [B, V]
  std::vector<double> u(static_cast<std::size_t>(B), 2.0);  // inactive rows: any value
  for (std::int64_t b = 0; b < B; ++b)
    if (active[static_cast<std::size_t>(b)]) u[static_cast<std::size_t>(b)] = rngs[static_cast<std::size_t>(b)].uniform();
  const at::Tensor uu = at::tensor(u, at::kDouble).to(l.device()).unsqueeze(1);  // [B, 1]
  // The first token whose running total exceeds u (its probability is then > 0); past the
  // rounded total, the last token with probability > 0.
  const at::Tensor idx = (p.cumsum(-1) <= uu).sum(-1);  // [B]
  const at::Tensor last = (at::arange(V, idx.options()).unsqueeze(0) * (p > 0)).amax(-1);
  const at::Tensor next = at::where(idx < V, idx, last);
  return at::where(at::tensor(std::vector<std::uint8_t>(active.begin(), active.end())).to(l.device()).to(at::kBool),
                   next, fallback);
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
  if (!cpu_value<bool>(mask.all())) f.attention_mask = mask.to(dev);  // only when a row is padded
  f.last_logits_only = true;
  at::Tensor logits = model->forward(ids.to(dev), f).logits.select(1, 0);  // [B, V]

  std::vector<Rng> rngs;
  for (std::int64_t b = 0; b < B; ++b) rngs.emplace_back(o.seed, static_cast<std::uint64_t>(b));
  GenerateResult r;
  r.tokens.resize(B);
  // Tokens the repetition penalty applies to: the prompts, then every emitted token.
  const auto V = logits.size(-1);
  at::Tensor seen = at::zeros({B, V}, at::kBool);
  if (o.repetition_penalty != 1.0) {
    auto* sp = seen.data_ptr<bool>();
    for (std::int64_t b = 0; b < B; ++b)
      for (const std::int64_t t : prompts[static_cast<std::size_t>(b)])
        if (t >= 0 && t < V) sp[b * V + t] = true;
  }
  seen = seen.to(dev);
  std::vector<bool> done(B, false);
  f.attention_mask.reset();
  for (std::int64_t step = 0; step < o.max_new_tokens; ++step) {
    std::vector<bool> active(done.size());
    for (std::size_t b = 0; b < done.size(); ++b) active[b] = !done[b];
    at::Tensor processed;
    const at::Tensor chosen = sample_tokens(logits, seen, active, o, rngs, keep_logits ? &processed : nullptr);  // [B]
    const at::Tensor chosen_host = to_host(chosen);  // the step's one synchronisation
    const auto* c = chosen_host.data_ptr<std::int64_t>();
    if (keep_logits) r.step_logits.push_back(to_host(processed));
    for (std::int64_t b = 0; b < B; ++b) {
      if (done[static_cast<std::size_t>(b)]) continue;
      r.tokens[static_cast<std::size_t>(b)].push_back(c[b]);
      if (std::find(o.stop_tokens.begin(), o.stop_tokens.end(), c[b]) != o.stop_tokens.end())
        done[static_cast<std::size_t>(b)] = true;
    }
    if (std::all_of(done.begin(), done.end(), [](bool d) { return d; }) || step + 1 == o.max_new_tokens) break;
    // Finished rows keep decoding a padding token; their output is ignored.
    const at::Tensor next = at::where(chosen < 0, at::full_like(chosen, o.pad_token_id), chosen).unsqueeze(1);
    if (o.repetition_penalty != 1.0) {  // emitted tokens join the penalised set (finished rows: unchanged)
      const at::Tensor at_next = next.clamp(0, V - 1);
      seen.scatter_(1, at_next, seen.gather(1, at_next).logical_or((chosen >= 0).unsqueeze(1)));
    }
    logits = model->forward(next, f).logits.select(1, 0);
  }
  if (was_training) model->train();
  return r;
}

}  // namespace rhine::nn
