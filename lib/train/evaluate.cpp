#include "rhine/train/evaluate.h"

#include <ATen/core/grad_mode.h>
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <cmath>
#include <map>

#include "rhine/core/error.h"
#include "rhine/data/loader.h"
#include "rhine/data/sft.h"
#include "rhine/dist/world.h"
#include "rhine/formats/token_shard.h"
#include "rhine/nn/moe.h"
#include "rhine/tokenizer/tokenizer.h"
#include "rhine/torch/compat.h"
#include "rhine/torch/sync.h"

namespace rhine::train {

HeldoutSet HeldoutSet::from_shards(const HeldoutOptions& options, const Tokenizer& tokenizer) {
  RHINE_CHECK(options.seq_len > 0, "heldout", "seq_len must be positive", options.seq_len, "");
  RHINE_CHECK(options.max_tokens_per_language > 0, "heldout", "max_tokens_per_language must be positive",
              options.max_tokens_per_language, "");
  HeldoutSet set;
  set.seq_len = options.seq_len;
  std::map<std::string, std::int64_t> have;
  for (const auto& path : expand_shard_paths(options.shards)) {
    auto shard = TokenShard::open(path, true);
    for (const auto& d : shard->docs()) {
      const auto& lang = shard->meta().languages.at(d.lang);
      if (have[lang] >= options.max_tokens_per_language || d.n_tokens == 0) continue;
      std::vector<std::int32_t> ids(d.n_tokens);
      for (std::uint32_t i = 0; i < d.n_tokens; ++i) ids[i] = shard->token(d.first_token + i);
      auto& l = set.languages[lang];
      l.bytes += tokenizer.decode(ids).size();
      std::vector<std::int64_t> doc;
      if (tokenizer.bos_id() >= 0) doc.push_back(tokenizer.bos_id());
      doc.insert(doc.end(), ids.begin(), ids.end());
      have[lang] += static_cast<std::int64_t>(ids.size());
      l.docs.push_back(std::move(doc));
    }
  }
  RHINE_CHECK(!set.languages.empty(), "heldout", "no held-out documents in", options.shards,
              "run rhine-prepare on the held-out text and pass its output directory");
  return set;
}

HeldoutSet HeldoutSet::from_sft(const SftExamples& examples, std::int64_t seq_len,
                                std::int64_t max_tokens_per_language) {
  RHINE_CHECK(seq_len > 0, "heldout", "seq_len must be positive", seq_len, "");
  HeldoutSet set;
  set.seq_len = seq_len;
  std::map<std::string, std::int64_t> have;
  for (const auto& ex : examples.examples) {
    const auto& lang = examples.languages.at(static_cast<std::size_t>(ex.language));
    if (have[lang] >= max_tokens_per_language) continue;
    auto& l = set.languages[lang];
    l.docs.emplace_back(ex.tokens.begin(), ex.tokens.end());
    l.targets.push_back(ex.target);
    l.bytes += ex.target_bytes;
    have[lang] += static_cast<std::int64_t>(ex.tokens.size());
  }
  return set;
}

double moe_imbalance(const at::Tensor& counts) {
  if (!counts.defined() || counts.numel() == 0) return 0.0;
  auto c = counts.to(at::kDouble);
  auto mean = c.mean(1).clamp_min(1e-12);
  return cpu_value<double>((std::get<0>(c.max(1)) / mean).mean());
}

Json EvalResult::to_json() const {
  Json j = Json::object();
  for (const auto& [lang, e] : languages) {
    j[lang] = {{"loss", e.loss}, {"bpb", e.bits_per_byte}, {"tokens", e.tokens}, {"bytes", e.bytes}};
    if (e.expert_counts.defined()) j[lang]["moe_imbalance"] = moe_imbalance(e.expert_counts);
  }
  return j;
}

namespace {

// True when the model's forward runs collectives (FSDP hooks, an expert-parallel dispatch):
// then every rank must run every forward pass.
bool forward_is_collective(nn::CausalLM& model) {
  if (model->forward_hooks()) return true;
  for (const auto& moe : model->moe_layers())
    if (moe->expert_dispatch()) return true;
  return false;
}

// One scored window: tokens [start, end) of document `doc`, predicting tokens start+1..end-1.
struct Window {
  std::size_t doc, start, end;
};

}  // namespace

EvalResult evaluate(nn::CausalLM& model, const HeldoutSet& heldout, bool bf16) {
  EvalOptions o;
  o.bf16 = bf16;
  return evaluate(model, heldout, o);
}

EvalResult evaluate(nn::CausalLM& model, const HeldoutSet& heldout, const EvalOptions& options) {
  RHINE_CHECK(options.batch_size >= 1, "evaluate", "batch_size must be >= 1", options.batch_size, "");
  const bool was_training = model->is_training();
  model->eval();
  at::NoGradGuard no_grad;
  const auto device = model->output_weight().device();
  const bool split = options.world != nullptr && options.world->world_size() > 1 && !forward_is_collective(model);
  const int rank = split ? options.world->rank() : 0, ranks = split ? options.world->world_size() : 1;
  const auto n_moe = static_cast<std::int64_t>(model->moe_layers().size());
  const auto T = static_cast<std::size_t>(heldout.seq_len);

  // Per language: nats, tokens, expert counts [n_moe, E] (host), summed over this rank's windows.
  std::vector<std::string> names;
  std::vector<double> sums;  // 2 per language
  std::vector<at::Tensor> counts;
  std::size_t window_index = 0;  // over all languages: the rank split
  for (const auto& [lang, l] : heldout.languages) {
    names.push_back(lang);
    // This rank's windows with at least one target, grouped by length in order of appearance.
    std::map<std::size_t, std::vector<Window>> by_length;
    std::vector<std::size_t> lengths;
    for (std::size_t d = 0; d < l.docs.size(); ++d) {
      const auto& doc = l.docs[d];
      for (std::size_t start = 0; start + 1 < doc.size(); start += T) {
        const auto end = std::min(doc.size(), start + T + 1);
        if (!l.targets.empty()) {
          const auto& tg = l.targets[d];
          if (std::none_of(tg.begin() + static_cast<std::ptrdiff_t>(start + 1), tg.begin() + static_cast<std::ptrdiff_t>(end),
                           [](std::uint8_t t) { return t != 0; }))
            continue;  // nothing scored here
        }
        if (window_index++ % static_cast<std::size_t>(ranks) != static_cast<std::size_t>(rank)) continue;
        auto& group = by_length[end - start];
        if (group.empty()) lengths.push_back(end - start);
        group.push_back({d, start, end});
      }
    }
    // [nats, tokens] and the expert counts stay on the device: one host read per language.
    at::Tensor lang_sums = at::zeros({2}, at::TensorOptions().dtype(at::kDouble).device(device));
    at::Tensor lang_counts;
    for (const auto len : lengths) {
      const auto& group = by_length[len];
      for (std::size_t b0 = 0; b0 < group.size(); b0 += static_cast<std::size_t>(options.batch_size)) {
        const auto b1 = std::min(group.size(), b0 + static_cast<std::size_t>(options.batch_size));
        std::vector<std::int64_t> ids, labels;
        for (std::size_t b = b0; b < b1; ++b) {
          const auto& w = group[b];
          const auto& doc = l.docs[w.doc];
          ids.insert(ids.end(), doc.begin() + static_cast<std::ptrdiff_t>(w.start),
                     doc.begin() + static_cast<std::ptrdiff_t>(w.end) - 1);
          for (std::size_t i = w.start + 1; i < w.end; ++i)
            labels.push_back(l.targets.empty() || l.targets[w.doc][i] ? doc[i] : -100);
        }
        const auto rows = static_cast<std::int64_t>(b1 - b0), n = static_cast<std::int64_t>(len) - 1;
        nn::ForwardOptions fo;
        fo.labels = at::tensor(labels).view({rows, n}).to(device);
        fo.mtp_lambda = 0.0;
        AutocastGuard autocast(device.type(), at::kBFloat16, options.bf16);
        auto out = model->forward(at::tensor(ids).view({rows, n}).to(device), fo);
        const at::Tensor n_t = out.stats.n_tokens.to(at::kDouble);
        lang_sums = lang_sums + at::stack({out.stats.ce_loss.to(at::kDouble) * n_t, n_t});
        if (out.expert_counts.defined())
          lang_counts = lang_counts.defined() ? lang_counts + out.expert_counts : out.expert_counts;
      }
    }
    std::vector<at::Tensor> parts = {lang_sums};
    if (lang_counts.defined()) parts.push_back(lang_counts.reshape({-1}).to(at::kDouble));
    const at::Tensor host = to_host(at::cat(parts)).contiguous();
    sums.push_back(host.data_ptr<double>()[0]);
    sums.push_back(host.data_ptr<double>()[1]);
    counts.push_back(lang_counts.defined()
                         ? host.narrow(0, 2, lang_counts.numel()).view(lang_counts.sizes()).round().to(at::kLong)
                         : at::Tensor());
  }

  // One host all-reduce: [nats, tokens] per language, then every language's expert counts.
  if (split) {
    std::vector<double> flat = sums;
    if (n_moe > 0) {
      for (std::size_t i = 0; i < counts.size(); ++i) {
        // A rank without windows of a language has no counts yet: zeros of the model's shape.
        const std::int64_t E = model->config().n_routed_experts;
        at::Tensor c = counts[i].defined() ? counts[i].to(at::kDouble) : at::zeros({n_moe, E}, at::kDouble);
        RHINE_CHECK(c.size(0) == n_moe && c.size(1) == E, "evaluate", "expert counts of an unexpected shape",
                    c.sizes().vec(), "");
        const double* p = c.contiguous().data_ptr<double>();
        flat.insert(flat.end(), p, p + c.numel());
      }
    }
    flat = options.world->host_sum(flat);
    std::copy(flat.begin(), flat.begin() + static_cast<std::ptrdiff_t>(sums.size()), sums.begin());
    if (n_moe > 0) {
      const std::int64_t E = model->config().n_routed_experts;
      for (std::size_t i = 0; i < counts.size(); ++i) {
        const auto off = static_cast<std::ptrdiff_t>(sums.size() + i * static_cast<std::size_t>(n_moe * E));
        counts[i] = at::tensor(std::vector<double>(flat.begin() + off, flat.begin() + off + n_moe * E))
                        .view({n_moe, E})
                        .round()
                        .to(at::kLong);
      }
    }
  }

  EvalResult result;
  for (std::size_t i = 0; i < names.size(); ++i) {
    const auto& l = heldout.languages.at(names[i]);
    const double nats = sums[2 * i];
    LanguageEval e;
    e.tokens = static_cast<std::int64_t>(sums[2 * i + 1]);
    e.bytes = l.bytes;
    e.loss = e.tokens > 0 ? nats / static_cast<double>(e.tokens) : 0.0;
    e.bits_per_byte = l.bytes > 0 ? nats / std::log(2.0) / static_cast<double>(l.bytes) : 0.0;
    e.expert_counts = counts[i];
    result.languages[names[i]] = e;
  }
  if (was_training) model->train();
  return result;
}

}  // namespace rhine::train
