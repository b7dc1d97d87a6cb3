#pragma once
/// \file
/// Language mixtures: how often the data loader draws each language.
///
/// Three rules, all returning probabilities over languages from the number of
/// tokens each language has:
///  - weights:     p_l = w_l / sum w (languages without a weight get 0);
///  - temperature: p_l ~ n_l^(1/T). T = 1 samples in proportion to size,
///                 larger T flattens towards uniform (T = 3..5 is common for
///                 multilingual pretraining, e.g. XLM-R uses alpha = 1/T = 0.3);
///  - unimax:      UniMax (Chung et al., ICLR 2023, Algorithm 1): spread a token
///                 budget uniformly over languages, but give no language more
///                 than `max_epochs` passes over its data; what a small language
///                 cannot use goes to the larger ones. Languages are visited from
///                 the smallest: each gets min(remaining / languages left,
///                 max_epochs * n_l).

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace rhine {

/// Options of `mixture_probabilities`.
struct MixtureOptions {
  enum class Kind { weights, temperature, unimax };
  Kind kind = Kind::temperature;
  /// For `weights`: language -> non-negative weight.
  std::map<std::string, double> weights;
  /// For `temperature`: T > 0.
  double temperature = 1.0;
  /// For `unimax`: the training budget in tokens (all languages) and the cap
  /// on passes over each language's data.
  double unimax_budget_tokens = 0;
  double unimax_max_epochs = 1.0;
};

/// Probabilities per language (summing to 1) for the given token counts.
/// Throws rhine::Error for bad options (negative weights, a weight for a
/// language that has no data, T <= 0, a zero budget, all probabilities 0).
std::map<std::string, double> mixture_probabilities(const MixtureOptions& options,
                                                    const std::map<std::string, std::uint64_t>& tokens);

/// "temperature T=3", "weights de=0.4 en=0.6", "unimax budget=1e9 max_epochs=4".
std::string describe(const MixtureOptions& options);

}  // namespace rhine
