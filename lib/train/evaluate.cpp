#include "rhine/train/evaluate.h"

#include <ATen/core/grad_mode.h>
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <cmath>

#include "rhine/core/error.h"
#include "rhine/data/loader.h"
#include "rhine/data/sft.h"
#include "rhine/formats/token_shard.h"
#include "rhine/io/lora.h"
#include "rhine/tokenizer/tokenizer.h"
#include "rhine/torch/compat.h"

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
  return (std::get<0>(c.max(1)) / mean).mean().item<double>();
}

Json EvalResult::to_json() const {
  Json j = Json::object();
  for (const auto& [lang, e] : languages) {
    j[lang] = {{"loss", e.loss}, {"bpb", e.bits_per_byte}, {"tokens", e.tokens}, {"bytes", e.bytes}};
    if (e.expert_counts.defined()) j[lang]["moe_imbalance"] = moe_imbalance(e.expert_counts);
  }
  return j;
}

EvalResult evaluate(nn::CausalLM& model, const HeldoutSet& heldout, bool bf16) {
  const bool was_training = model->is_training();
  model->eval();
  at::NoGradGuard no_grad;
  // Adapters as trained so far (a sharded model's hooks refresh them per block).
  if (io::lora_options(*model) && !model->forward_hooks()) io::refresh_lora(*model);
  const auto device = model->output_weight().device();
  EvalResult result;
  for (const auto& [lang, l] : heldout.languages) {
    double nats = 0.0;
    std::int64_t n_tokens = 0;
    at::Tensor counts;
    for (std::size_t d = 0; d < l.docs.size(); ++d) {
      const auto& doc = l.docs[d];
      const auto T = static_cast<std::size_t>(heldout.seq_len);
      for (std::size_t start = 0; start + 1 < doc.size(); start += T) {
        const auto end = std::min(doc.size(), start + T + 1);
        auto chunk = at::tensor(std::vector<std::int64_t>(doc.begin() + static_cast<std::ptrdiff_t>(start),
                                                          doc.begin() + static_cast<std::ptrdiff_t>(end)))
                         .view({1, -1})
                         .to(device);
        const auto n = chunk.size(1) - 1;
        nn::ForwardOptions fo;
        fo.labels = chunk.slice(1, 1, n + 1);
        if (!l.targets.empty()) {  // score the targets only
          const auto& tg = l.targets[d];
          auto keep = at::tensor(std::vector<std::uint8_t>(tg.begin() + static_cast<std::ptrdiff_t>(start + 1),
                                                           tg.begin() + static_cast<std::ptrdiff_t>(end)))
                          .to(at::kBool)
                          .view({1, -1})
                          .to(device);
          fo.labels = fo.labels->masked_fill(keep.logical_not(), -100);
          if (!keep.any().item<bool>()) continue;
        }
        AutocastGuard autocast(device.type(), at::kBFloat16, bf16);
        auto out = model->forward(chunk.slice(1, 0, n), fo);
        nats += out.stats.ce_loss * static_cast<double>(out.stats.n_tokens);
        n_tokens += out.stats.n_tokens;
        if (out.expert_counts.defined())
          counts = counts.defined() ? counts + out.expert_counts.cpu() : out.expert_counts.cpu();
      }
    }
    LanguageEval e;
    e.tokens = n_tokens;
    e.bytes = l.bytes;
    e.loss = n_tokens > 0 ? nats / static_cast<double>(n_tokens) : 0.0;
    e.bits_per_byte = l.bytes > 0 ? nats / std::log(2.0) / static_cast<double>(l.bytes) : 0.0;
    e.expert_counts = counts;
    result.languages[lang] = e;
  }
  if (was_training) model->train();
  return result;
}

}  // namespace rhine::train
