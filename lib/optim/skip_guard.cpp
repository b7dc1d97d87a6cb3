#include "rhine/optim/skip_guard.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "rhine/core/error.h"

namespace rhine {

void SkipGuardOptions::validate() const {
  RHINE_CHECK(window >= 2, "skip_guard", "window must be >= 2", window, "e.g. 100");
  RHINE_CHECK(min_history >= 2 && min_history <= window, "skip_guard",
              "min_history must be in [2, window]", min_history, "e.g. 20");
  RHINE_CHECK(n_sigma > 0, "skip_guard", "n_sigma must be > 0", n_sigma, "e.g. 6");
  RHINE_CHECK(min_std_fraction >= 0, "skip_guard", "min_std_fraction must be >= 0", min_std_fraction,
              "e.g. 0.01");
  RHINE_CHECK(max_consecutive_outliers >= 0, "skip_guard", "max_consecutive_outliers must be >= 0",
              max_consecutive_outliers, "e.g. 10");
}

SkipGuardOptions SkipGuardOptions::from_json(const Json& j, const std::string& component) {
  JsonFields f(j, component);
  SkipGuardOptions o;
  o.window = f.get("window", o.window);
  o.n_sigma = f.get("n_sigma", o.n_sigma);
  o.min_history = f.get("min_history", o.min_history);
  o.max_consecutive_outliers = f.get("max_consecutive_outliers", o.max_consecutive_outliers);
  o.min_std_fraction = f.get("min_std_fraction", o.min_std_fraction);
  o.check_loss = f.get("check_loss", o.check_loss);
  o.check_grad_norm = f.get("check_grad_norm", o.check_grad_norm);
  f.reject_unknown();
  o.validate();
  return o;
}

SkipGuard::SkipGuard(const SkipGuardOptions& options) : o_(options) { o_.validate(); }

bool SkipGuard::is_outlier(const std::deque<double>& w, double x, std::string& why,
                           const char* what) const {
  if (static_cast<int64_t>(w.size()) < o_.min_history) return false;
  double mean = 0;
  for (double v : w) mean += v;
  mean /= static_cast<double>(w.size());
  double var = 0;
  for (double v : w) var += (v - mean) * (v - mean);
  const double sd = std::max(std::sqrt(var / static_cast<double>(w.size())),
                             o_.min_std_fraction * std::abs(mean));
  const double threshold = mean + o_.n_sigma * sd;
  if (x <= threshold) return false;
  char buf[200];
  std::snprintf(buf, sizeof buf, "%s %.6g > mean %.6g + %g sigma (threshold %.6g)", what, x, mean,
                o_.n_sigma, threshold);
  why = buf;
  return true;
}

void SkipGuard::push(std::deque<double>& w, double x) {
  w.push_back(x);
  while (static_cast<int64_t>(w.size()) > o_.window) w.pop_front();
}

SkipDecision SkipGuard::check(double loss, double grad_norm) {
  ++n_checked_;
  SkipDecision d;
  if ((o_.check_loss && !std::isfinite(loss)) || (o_.check_grad_norm && !std::isfinite(grad_norm))) {
    ++n_skipped_, ++n_nonfinite_;
    d.accept = false;
    d.reason = "non-finite " + std::string(!std::isfinite(loss) ? "loss" : "grad_norm");
    return d;
  }
  std::string why;
  const bool outlier = (o_.check_loss && is_outlier(losses_, loss, why, "loss")) ||
                       (o_.check_grad_norm && is_outlier(norms_, grad_norm, why, "grad_norm"));
  if (outlier) {
    if (consecutive_ < o_.max_consecutive_outliers) {
      ++consecutive_, ++n_skipped_, ++n_outliers_;
      d.accept = false;
      d.reason = why;
      return d;
    }
    spdlog::warn("[skip_guard] {} outliers in a row; accepting this one ({})", consecutive_, why);
  }
  consecutive_ = 0;
  if (o_.check_loss) push(losses_, loss);
  if (o_.check_grad_norm) push(norms_, grad_norm);
  return d;
}

Json SkipGuard::state() const {
  return {{"losses", std::vector<double>(losses_.begin(), losses_.end())},
          {"grad_norms", std::vector<double>(norms_.begin(), norms_.end())},
          {"n_checked", n_checked_},
          {"n_skipped", n_skipped_},
          {"n_nonfinite", n_nonfinite_},
          {"n_outliers", n_outliers_},
          {"consecutive", consecutive_}};
}

void SkipGuard::load_state(const Json& state) {
  JsonFields f(state, "skip_guard");
  auto losses = f.require<std::vector<double>>("losses");
  auto norms = f.require<std::vector<double>>("grad_norms");
  n_checked_ = f.require<int64_t>("n_checked");
  n_skipped_ = f.require<int64_t>("n_skipped");
  n_nonfinite_ = f.require<int64_t>("n_nonfinite");
  n_outliers_ = f.require<int64_t>("n_outliers");
  consecutive_ = f.require<int64_t>("consecutive");
  f.reject_unknown();
  losses_.assign(losses.begin(), losses.end());
  norms_.assign(norms.begin(), norms.end());
}

}  // namespace rhine
