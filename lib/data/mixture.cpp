#include "rhine/data/mixture.h"

#include <algorithm>
#include <cmath>
#include <sstream>

#include "rhine/core/error.h"

namespace rhine {

std::map<std::string, double> mixture_probabilities(const MixtureOptions& o,
                                                    const std::map<std::string, std::uint64_t>& tokens) {
  RHINE_CHECK(!tokens.empty(), "mixture", "no languages to mix", 0, "the data loader found no shards");
  std::map<std::string, double> p;
  switch (o.kind) {
    case MixtureOptions::Kind::weights:
      for (const auto& [lang, w] : o.weights) {
        RHINE_CHECK(w >= 0 && std::isfinite(w), "mixture", "weight of " + lang + " must be finite and >= 0", w, "");
        RHINE_CHECK(tokens.count(lang), "mixture", "a weight is given for a language without data", lang,
                    "remove it or add shards of that language");
      }
      for (const auto& [lang, n] : tokens) {
        auto it = o.weights.find(lang);
        p[lang] = it == o.weights.end() ? 0.0 : it->second;
      }
      break;
    case MixtureOptions::Kind::temperature:
      RHINE_CHECK(o.temperature > 0 && std::isfinite(o.temperature), "mixture", "temperature must be > 0",
                  o.temperature, "use 1 for proportional sampling, larger values to flatten");
      for (const auto& [lang, n] : tokens) p[lang] = std::pow(static_cast<double>(n), 1.0 / o.temperature);
      break;
    case MixtureOptions::Kind::unimax: {
      RHINE_CHECK(o.unimax_budget_tokens > 0, "mixture", "unimax needs a positive token budget",
                  o.unimax_budget_tokens, "set it to the number of tokens the run will train on");
      RHINE_CHECK(o.unimax_max_epochs > 0, "mixture", "unimax max_epochs must be > 0", o.unimax_max_epochs, "");
      std::vector<std::pair<std::uint64_t, std::string>> by_size;
      for (const auto& [lang, n] : tokens) by_size.emplace_back(n, lang);
      std::sort(by_size.begin(), by_size.end());
      double remaining = o.unimax_budget_tokens;
      std::size_t left = by_size.size();
      for (const auto& [n, lang] : by_size) {
        const double share = remaining / static_cast<double>(left--);
        const double alloc = std::min(share, o.unimax_max_epochs * static_cast<double>(n));
        p[lang] = alloc;
        remaining -= alloc;
      }
      break;
    }
  }
  double total = 0;
  for (const auto& [lang, v] : p) total += v;
  RHINE_CHECK(total > 0, "mixture", "every language has probability 0", describe(o),
              "give at least one language with data a positive weight");
  for (auto& [lang, v] : p) v /= total;
  return p;
}

std::string describe(const MixtureOptions& o) {
  std::ostringstream s;
  switch (o.kind) {
    case MixtureOptions::Kind::weights:
      s << "weights";
      for (const auto& [lang, w] : o.weights) s << ' ' << lang << '=' << w;
      break;
    case MixtureOptions::Kind::temperature: s << "temperature T=" << o.temperature; break;
    case MixtureOptions::Kind::unimax:
      s << "unimax budget=" << o.unimax_budget_tokens << " max_epochs=" << o.unimax_max_epochs;
      break;
  }
  return s.str();
}

}  // namespace rhine
