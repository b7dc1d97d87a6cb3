#include "rhine/io/vocab.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <limits>

#include "rhine/core/error.h"
#include "rhine/core/file.h"
#include "rhine/core/json.h"
#include "rhine/core/random.h"
#include "rhine/formats/safetensors.h"
#include "rhine/io/hf.h"
#include "rhine/io/safetensors.h"
#include "rhine/tokenizer/sentencepiece.h"
#include "rhine/tokenizer/tokenizer.h"

namespace rhine::io {
namespace {

namespace fs = std::filesystem;
constexpr const char* kComponent = "vocab_resize";

// The fewest base pieces that spell `text` exactly, byte pieces only where no other piece
// covers a character (a byte costs as much as 1000 pieces); ties go to the segmentation whose
// last piece has the lower id (SentencePiece BPE: the earlier merge).
std::vector<std::int32_t> spell(const Tokenizer& base, const std::string& text) {
  const std::size_t n = text.size();
  constexpr int kInf = std::numeric_limits<int>::max() / 2;
  std::vector<int> cost(n + 1, kInf);
  std::vector<std::pair<std::size_t, std::int32_t>> back(n + 1, {0, -1});
  cost[0] = 0;
  auto better = [&](std::size_t end, std::size_t start, std::int32_t id, int step) {
    const int c = cost[start] + step;
    if (c < cost[end] || (c == cost[end] && id < back[end].second)) cost[end] = c, back[end] = {start, id};
  };
  for (std::size_t i = 0; i < n; ++i) {
    if (cost[i] >= kInf) continue;
    for (std::size_t len = 1; i + len <= n && len <= 64; ++len) {
      const std::int32_t id = base.token_to_id(std::string_view(text).substr(i, len));
      if (id >= 0 && !base.is_special(id) && !tokenizer::is_byte_piece(base.id_to_token(id))) better(i + len, i, id, 1);
    }
    char hex[8];  // byte fallback: <0xAB>
    std::snprintf(hex, sizeof hex, "<0x%02X>", static_cast<unsigned char>(text[i]));
    if (const std::int32_t id = base.token_to_id(hex); id >= 0) better(i + 1, i, id, 1000);
  }
  RHINE_CHECK(cost[n] < kInf, kComponent, "a new token cannot be spelled with the base's pieces", text,
              "the base tokenizer lacks its characters and has no byte fallback");
  std::vector<std::int32_t> ids;
  for (std::size_t at = n; at > 0; at = back[at].first) ids.push_back(back[at].second);
  std::reverse(ids.begin(), ids.end());
  return ids;
}

}  // namespace

std::vector<std::vector<std::int32_t>> base_pieces_of_new_tokens(const Tokenizer& base, const Tokenizer& extended) {
  const std::int32_t nb = base.vocab_size(), ne = extended.vocab_size();
  RHINE_CHECK(ne >= nb, kComponent, "the extended tokenizer has fewer tokens than the base", ne,
              "base has " + std::to_string(nb));
  for (std::int32_t i = 0; i < nb; ++i)
    RHINE_CHECK(base.id_to_token(i) == extended.id_to_token(i), kComponent,
                "the extended tokenizer does not keep the base's token at id " + std::to_string(i),
                extended.id_to_token(i), "expected '" + base.id_to_token(i) + "'; extend with rhine-tokenizer extend");
  std::vector<std::vector<std::int32_t>> out;
  for (std::int32_t i = nb; i < ne; ++i) out.push_back(spell(base, extended.id_to_token(i)));
  return out;
}

std::vector<RowRecipe> new_row_recipes(const Tokenizer& base, const Tokenizer& extended,
                                       const VocabResizeOptions& options) {
  RHINE_CHECK(options.init == "mean" || options.init == "focus" || options.init == "random", kComponent,
              "unknown initialisation", options.init, "use \"mean\", \"focus\" or \"random\"");
  const auto pieces = base_pieces_of_new_tokens(base, extended);
  std::vector<RowRecipe> mean;
  for (const auto& ids : pieces) {
    RowRecipe r;
    for (std::int32_t id : ids) r.emplace_back(id, 1.0f / static_cast<float>(ids.size()));
    mean.push_back(std::move(r));
  }
  if (options.init == "mean") return mean;
  if (options.init == "random") return std::vector<RowRecipe>(pieces.size());
  RHINE_CHECK(!options.focus_text.empty(), kComponent, "init \"focus\" needs target-language text", "no focus_text",
              "pass --text FILE (e.g. the Dutch training text)");
  std::vector<std::string> lines;
  for (const auto& f : options.focus_text) {
    const std::string text = read_file(f.string(), kComponent);
    for (std::size_t at = 0; at < text.size();) {
      std::size_t end = text.find('\n', at);
      if (end == std::string::npos) end = text.size();
      std::size_t stop = end;
      if (stop > at && text[stop - 1] == '\r') --stop;  // CRLF files
      if (stop > at) lines.push_back(text.substr(at, stop - at));
      at = end + 1;
    }
  }
  const auto corpus = extended.encode_batch(lines);
  std::vector<std::string> strings(extended.vocab_size());
  std::vector<bool> candidate(base.vocab_size());
  for (std::int32_t t = 0; t < extended.vocab_size(); ++t) {
    strings[t] = extended.id_to_token(t);
    if (t < base.vocab_size()) candidate[t] = !base.is_special(t) && !tokenizer::is_byte_piece(strings[t]);
  }
  const TokenVectors aux = train_token_vectors(corpus, strings, options);
  return focus_recipes(aux, base.vocab_size(), candidate, options.focus_min_count, mean);
}

at::Tensor grow_rows(const at::Tensor& weight, std::int64_t first, const std::vector<RowRecipe>& recipes,
                     const VocabResizeOptions& options) {
  RHINE_CHECK(weight.dim() == 2 && first >= 0 && first <= weight.size(0), kComponent,
              "grow_rows takes a [V, C] matrix and a first row <= V", weight.sizes().vec(), "first " + std::to_string(first));
  const auto n = static_cast<std::int64_t>(recipes.size());
  const std::int64_t rows = std::max(weight.size(0), first + n);
  at::Tensor w32 = weight.to(at::kFloat);
  at::Tensor out = at::zeros({rows, weight.size(1)}, w32.options());
  out.narrow(0, 0, weight.size(0)).copy_(w32);
  if (n == 0) return out.to(weight.scalar_type());
  at::Tensor base = w32.narrow(0, 0, first);
  at::Tensor fresh;
  if (options.init == "random") {
    at::Generator gen = at::detail::createCPUGenerator(options.seed);
    fresh = at::randn({n, weight.size(1)}, gen, at::TensorOptions().dtype(at::kFloat)).to(w32.device());
    fresh = fresh * base.std() + base.mean();
  } else {
    std::vector<at::Tensor> made;
    for (const auto& r : recipes) {
      RHINE_CHECK(!r.empty(), kComponent, "a new row has no recipe", options.init, "use new_row_recipes");
      std::vector<std::int64_t> ids;
      std::vector<float> w;
      for (const auto& [id, weight_of] : r) {
        RHINE_CHECK(id >= 0 && id < first, kComponent, "a base piece id is outside the base rows", id,
                    "first new row is " + std::to_string(first));
        ids.push_back(id), w.push_back(weight_of);
      }
      const at::Tensor rows_of = base.index_select(0, at::tensor(ids, at::kLong).to(w32.device()));
      made.push_back((rows_of * at::tensor(w).to(w32.device()).unsqueeze(1)).sum(0));
    }
    fresh = at::stack(made, 0);
  }
  out.narrow(0, first, n).copy_(fresh);
  return out.to(weight.scalar_type());
}

std::int64_t extend_hf_vocabulary(const fs::path& dir, const fs::path& out, const fs::path& extended_tokenizer,
                                  const VocabResizeOptions& options) {
  fs::path base_path = options.base_tokenizer;
  if (base_path.empty()) base_path = fs::exists(dir / "tokenizer.model") ? dir / "tokenizer.model" : dir / "tokenizer.json";
  RHINE_CHECK(fs::is_regular_file(base_path), kComponent, "no base tokenizer at", base_path.string(),
              "pass the tokenizer the model was trained with (--base-tokenizer)");
  const Tokenizer base = Tokenizer::load(base_path.string()), ext = Tokenizer::load(extended_tokenizer.string());
  const auto recipes = new_row_recipes(base, ext, options);
  Json config = read_json_file((dir / "config.json").string(), kComponent);
  const std::int64_t old_v = config.at("vocab_size").get<std::int64_t>();
  RHINE_CHECK(old_v >= base.vocab_size(), kComponent, "the base tokenizer has more tokens than the model's vocab_size",
              base.vocab_size(), "vocab_size is " + std::to_string(old_v) + "; pass the model's own tokenizer");
  const std::int64_t new_v = std::max<std::int64_t>(old_v, ext.vocab_size());

  std::map<std::string, at::Tensor> tensors = load_safetensors(dir.string());
  std::int64_t grown = 0;
  for (auto& [name, t] : tensors) {
    auto ends_with = [&](std::string_view tail) {
      return name.size() >= tail.size() && name.compare(name.size() - tail.size(), tail.size(), tail) == 0;
    };
    // The embedding, the head, and DeepSeek's MTP copies of both.
    const bool vocab_matrix =
        name == "lm_head.weight" || ends_with("embed_tokens.weight") || ends_with("shared_head.head.weight");
    if (!vocab_matrix) continue;
    RHINE_CHECK(t.dim() == 2 && t.size(0) == old_v, kComponent, "a vocabulary matrix does not have vocab_size rows",
                name, "shape " + std::to_string(t.size(0)) + " rows, vocab_size " + std::to_string(old_v));
    t = grow_rows(t, base.vocab_size(), recipes, options);
    ++grown;
  }
  RHINE_CHECK(grown > 0, kComponent, "no embedding matrix found in", dir.string(), "");
  config["vocab_size"] = new_v;
  write_directory_atomic(out, options.overwrite, [&](const fs::path& tmp) {
    save_safetensors_checkpoint(tmp.string(), tensors);
    write_json_file((tmp / "config.json").string(), config);
    Json made = Json::array();
    for (std::size_t i = 0; i < recipes.size(); ++i) {
      Json from = Json::array();
      for (const auto& [id, w] : recipes[i]) from.push_back(Json::array({id, w}));
      const auto id = static_cast<std::int32_t>(base.vocab_size() + static_cast<std::int64_t>(i));
      made.push_back({{"id", id}, {"token", ext.id_to_token(id)}, {"from", std::move(from)}});
    }
    write_json_file((tmp / "vocab_init.json").string(), Json{{"init", options.init}, {"tokens", std::move(made)}});
    // The rest of the tokenizer files as they were; not the tokenizer itself (written next)
    // nor added_tokens.json, whose ids past the base's end now name new pieces.
    for (const std::string& f : hf_tokenizer_files())
      if (f != "tokenizer.json" && f != "tokenizer.model" && f != "added_tokens.json" && fs::exists(dir / f))
        fs::copy_file(dir / f, tmp / f);
    write_tokenizer_files(extended_tokenizer, tmp);
  }, kComponent);
  return new_v;
}

}  // namespace rhine::io
