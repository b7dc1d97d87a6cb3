// FOCUS initialisation of new vocabulary rows (rhine/io/vocab.h): fastText-style auxiliary
// token vectors, sparsemax, and the weighted recipes. Plain C++ (no tensors): the vectors are
// small and the training loop is the classic word2vec one.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "rhine/core/error.h"
#include "rhine/core/random.h"
#include "rhine/io/vocab.h"
#include "rhine/tokenizer/sentencepiece.h"

namespace rhine::io {
namespace {

constexpr const char* kComponent = "vocab_resize";
constexpr std::uint32_t kBuckets = 100003;  // hashed character n-gram rows (prime, as fastText's)

// fastText's hash (FNV-1a, 32 bits, over bytes).
std::uint32_t fnv1a(std::string_view s) {
  std::uint32_t h = 2166136261u;
  for (char c : s) h = (h ^ static_cast<std::uint32_t>(static_cast<std::int8_t>(c))) * 16777619u;
  return h;
}

// The character n-grams (n = 3..6, over code points) of "<token>", a word mark at the start
// (SentencePiece's U+2581, byte-level BPE's U+0120 for a space) standing for "<" (a word
// start); byte pieces and empty tokens have none.
std::vector<std::uint32_t> ngram_buckets(const std::string& token) {
  if (token.empty() || tokenizer::is_byte_piece(token)) return {};
  std::size_t skip = 0;
  for (std::string_view mark : {std::string_view("\xE2\x96\x81"), std::string_view("\xC4\xA0")})
    if (token.compare(0, mark.size(), mark) == 0) skip = mark.size();
  std::string w = "<";
  w.append(token, skip, std::string::npos);
  w.push_back('>');
  std::vector<std::size_t> starts;  // code point starts, and the end
  for (std::size_t i = 0; i < w.size(); ++i)
    if ((static_cast<unsigned char>(w[i]) & 0xC0) != 0x80) starts.push_back(i);
  starts.push_back(w.size());
  const std::size_t n_cp = starts.size() - 1;
  std::vector<std::uint32_t> out;
  for (std::size_t i = 0; i < n_cp; ++i)
    for (std::size_t n = 3; n <= 6 && i + n <= n_cp; ++n) {
      if (n == n_cp) continue;  // the whole "<token>" is the token's own row
      out.push_back(fnv1a(std::string_view(w).substr(starts[i], starts[i + n] - starts[i])) % kBuckets);
    }
  return out;
}

}  // namespace

std::vector<float> sparsemax(const std::vector<float>& z) {
  if (z.empty()) return {};
  std::vector<float> s = z;
  std::sort(s.begin(), s.end(), std::greater<float>());
  double cum = 0, tau = 0;
  for (std::size_t k = 0; k < s.size(); ++k) {
    cum += s[k];
    // k + 1 is in the support while 1 + (k + 1) s_k > sum of the top k + 1.
    if (1.0 + static_cast<double>(k + 1) * s[k] > cum) tau = (cum - 1.0) / static_cast<double>(k + 1);
  }
  std::vector<float> p(z.size());
  for (std::size_t i = 0; i < z.size(); ++i) p[i] = static_cast<float>(std::max(0.0, z[i] - tau));
  return p;
}

TokenVectors train_token_vectors(const std::vector<std::vector<std::int32_t>>& corpus,
                                 const std::vector<std::string>& tokens, const VocabResizeOptions& o) {
  RHINE_CHECK(o.focus_dim > 0 && o.focus_epochs > 0 && o.focus_window > 0 && o.focus_negatives > 0, kComponent,
              "focus_dim, focus_epochs, focus_window and focus_negatives must be positive",
              std::to_string(o.focus_dim) + ", " + std::to_string(o.focus_epochs) + ", " + std::to_string(o.focus_window) +
                  ", " + std::to_string(o.focus_negatives),
              "e.g. 100, 10, 5, 5");
  const auto V = static_cast<std::int64_t>(tokens.size());
  const int d = o.focus_dim;
  TokenVectors out;
  out.dim = d;
  out.counts.assign(V, 0);
  std::int64_t total = 0;
  for (const auto& line : corpus)
    for (std::int32_t id : line) {
      RHINE_CHECK(id >= 0 && id < V, kComponent, "a token id of the text is outside the vocabulary", id,
                  "vocabulary size " + std::to_string(V));
      ++out.counts[id], ++total;
    }
  RHINE_CHECK(total > 0, kComponent, "no text to train the FOCUS vectors on", total, "pass target-language text (--text)");

  // Rows: the tokens' own input vectors, then the n-gram buckets; per token its row list.
  std::vector<std::vector<std::uint32_t>> rows(V);
  for (std::int64_t t = 0; t < V; ++t) {
    rows[t].push_back(static_cast<std::uint32_t>(t));
    if (out.counts[t] > 0)
      for (std::uint32_t b : ngram_buckets(tokens[t])) rows[t].push_back(static_cast<std::uint32_t>(V) + b);
  }
  Rng rng(o.seed, /*stream=*/0x466f637573ull);
  std::vector<float> in(static_cast<std::size_t>(V + kBuckets) * d), ctx(static_cast<std::size_t>(V) * d, 0.0f);
  for (float& x : in) x = static_cast<float>((rng.uniform() - 0.5) / d);
  // Negatives from counts^0.75 (word2vec's table), frequent tokens subsampled at 1e-4.
  std::vector<double> cdf(V);
  double acc = 0;
  for (std::int64_t t = 0; t < V; ++t) cdf[t] = acc += std::pow(static_cast<double>(out.counts[t]), 0.75);
  auto negative = [&] {
    const auto at = std::upper_bound(cdf.begin(), cdf.end(), rng.uniform() * acc) - cdf.begin();
    return static_cast<std::int32_t>(std::min<std::ptrdiff_t>(at, V - 1));  // rounding never runs past the end
  };
  std::vector<double> keep(V, 1.0);
  for (std::int64_t t = 0; t < V; ++t)
    if (out.counts[t] > 0) {
      const double f = static_cast<double>(out.counts[t]) / static_cast<double>(total) / 1e-4;
      keep[t] = std::min(1.0, std::sqrt(1.0 / f) + 1.0 / f);
    }

  const double lr0 = 0.05, steps = static_cast<double>(total) * o.focus_epochs;
  double done = 0;
  std::vector<float> h(d), grad(d);
  std::vector<std::int32_t> sent;
  for (int epoch = 0; epoch < o.focus_epochs; ++epoch)
    for (const auto& line : corpus) {
      sent.clear();
      for (std::int32_t id : line)
        if (rng.uniform() < keep[id]) sent.push_back(id);
      done += static_cast<double>(line.size());
      const float lr = static_cast<float>(lr0 * std::max(1e-4, 1.0 - done / steps));
      for (std::size_t i = 0; i < sent.size(); ++i) {
        const auto& r = rows[sent[i]];
        std::fill(h.begin(), h.end(), 0.0f);
        for (std::uint32_t row : r)
          for (int k = 0; k < d; ++k) h[k] += in[static_cast<std::size_t>(row) * d + k];
        for (float& x : h) x /= static_cast<float>(r.size());
        const auto b = static_cast<std::size_t>(1 + rng.below(static_cast<std::uint64_t>(o.focus_window)));
        for (std::size_t j = i >= b ? i - b : 0; j <= std::min(sent.size() - 1, i + b); ++j) {
          if (j == i) continue;
          std::fill(grad.begin(), grad.end(), 0.0f);
          for (int n = 0; n <= o.focus_negatives; ++n) {
            const std::int32_t target = n == 0 ? sent[j] : negative();
            if (n > 0 && target == sent[j]) continue;
            float* c = &ctx[static_cast<std::size_t>(target) * d];
            float dot = 0;
            for (int k = 0; k < d; ++k) dot += h[k] * c[k];
            const float sig = 1.0f / (1.0f + std::exp(-std::clamp(dot, -20.0f, 20.0f)));
            const float g = lr * ((n == 0 ? 1.0f : 0.0f) - sig);
            for (int k = 0; k < d; ++k) grad[k] += g * c[k], c[k] += g * h[k];
          }
          for (std::uint32_t row : r)
            for (int k = 0; k < d; ++k) in[static_cast<std::size_t>(row) * d + k] += grad[k];
        }
      }
    }

  out.vectors.assign(static_cast<std::size_t>(V) * d, 0.0f);
  for (std::int64_t t = 0; t < V; ++t) {
    if (out.counts[t] == 0) continue;
    float* v = &out.vectors[static_cast<std::size_t>(t) * d];
    for (std::uint32_t row : rows[t])
      for (int k = 0; k < d; ++k) v[k] += in[static_cast<std::size_t>(row) * d + k];
    double norm = 0;
    for (int k = 0; k < d; ++k) norm += static_cast<double>(v[k]) * v[k];
    if (norm > 0)
      for (int k = 0; k < d; ++k) v[k] = static_cast<float>(v[k] / std::sqrt(norm));
  }
  return out;
}

std::vector<RowRecipe> focus_recipes(const TokenVectors& aux, std::int32_t base_size, const std::vector<bool>& candidate,
                                     std::int64_t min_count, const std::vector<RowRecipe>& fallback) {
  const auto V = static_cast<std::int32_t>(aux.counts.size());
  RHINE_CHECK(base_size >= 0 && base_size <= V && static_cast<std::int32_t>(candidate.size()) >= base_size &&
                  static_cast<std::int32_t>(fallback.size()) == V - base_size,
              kComponent, "focus_recipes: sizes disagree", base_size,
              "vocabulary " + std::to_string(V) + ", fallback " + std::to_string(fallback.size()));
  RHINE_CHECK(min_count >= 1, kComponent, "focus_min_count must be at least 1", min_count,
              "a token never seen has no vector to compare");
  const int d = aux.dim;
  std::vector<std::int32_t> pool;
  for (std::int32_t t = 0; t < base_size; ++t)
    if (candidate[t] && aux.counts[t] >= min_count) pool.push_back(t);
  std::vector<RowRecipe> out;
  std::vector<float> sims(pool.size());
  for (std::int32_t t = base_size; t < V; ++t) {
    if (aux.counts[t] < min_count || pool.empty()) {
      out.push_back(fallback[t - base_size]);
      continue;
    }
    const float* v = &aux.vectors[static_cast<std::size_t>(t) * d];
    for (std::size_t i = 0; i < pool.size(); ++i) {
      const float* u = &aux.vectors[static_cast<std::size_t>(pool[i]) * d];
      float dot = 0;
      for (int k = 0; k < d; ++k) dot += u[k] * v[k];
      sims[i] = dot;
    }
    const std::vector<float> w = sparsemax(sims);
    RowRecipe r;
    for (std::size_t i = 0; i < pool.size(); ++i)
      if (w[i] > 0) r.emplace_back(pool[i], w[i]);
    std::sort(r.begin(), r.end(), [](const auto& a, const auto& b) { return a.second > b.second; });
    out.push_back(std::move(r));
  }
  return out;
}

}  // namespace rhine::io
