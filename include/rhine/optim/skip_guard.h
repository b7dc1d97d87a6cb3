#pragma once
/// \file
/// A guard that refuses an optimizer step on a loss or gradient-norm spike:
///  - non-finite loss or grad norm (NaN, inf): always skipped;
///  - outlier: value > mean + n_sigma * max(std, min_std_fraction * |mean|)
///    over the last `window` accepted values (population std), checked once
///    `min_history` values are in. The floor keeps a nearly constant series
///    (std ~ 0) from flagging every tiny rise.
/// Early training is not judged: while the loss falls fast and the learning
/// rate warms up, the series is far from stationary and a sigma test flags
/// healthy steps (the demo skipped its steps 28-32, gradient norms of 4-6
/// against a falling mean near 1, at the end of its 30-step warm-up). So the
/// test starts only after `min_history` accepted steps, half the window by
/// default, as OLMo-core's skip-step optimizer waits for half its interval.
/// Skipped values never enter the window. After `max_consecutive_outliers`
/// outlier skips in a row the next outlier is accepted (and logged), so a
/// lasting level shift (e.g. after an lr change) cannot stall training.
/// Torch-free; its state is a small JSON that restores exactly.
///
///     double norm = rhine::host_value<double>(rhine::clip_grad_norm(params, 1.0));
///     if (guard.check(loss, norm).accept) optimizer.step();

#include <cstdint>
#include <deque>
#include <string>

#include "rhine/core/json.h"

namespace rhine {

/// Options of SkipGuard.
struct SkipGuardOptions {
  int64_t window = 100;
  double n_sigma = 6.0;
  /// Accepted steps before the outlier test starts (half the window).
  int64_t min_history = 50;
  int64_t max_consecutive_outliers = 10;
  /// Floor of the std, as a fraction of |mean|.
  double min_std_fraction = 0.01;
  bool check_loss = true;
  bool check_grad_norm = true;

  void validate() const;
  /// Strict (unknown keys are rejected), validated; absent keys keep the defaults.
  static SkipGuardOptions from_json(const Json& j, const std::string& component = "skip_guard");
};

/// What SkipGuard::check decided.
struct SkipDecision {
  bool accept = true;
  /// "" when accepted, else e.g. "grad_norm 53.1 > mean 1.02 + 6 sigma (threshold 2.3)".
  std::string reason;
};

/// Decides whether a step may be taken; counts skips.
class SkipGuard {
 public:
  explicit SkipGuard(const SkipGuardOptions& options = {});

  /// Judges one step's loss and pre-clip gradient norm; an accepted step's
  /// values join the windows.
  SkipDecision check(double loss, double grad_norm);

  /// Counters: steps judged, skipped (all reasons), non-finite, outliers.
  int64_t n_checked() const { return n_checked_; }
  int64_t n_skipped() const { return n_skipped_; }
  int64_t n_nonfinite() const { return n_nonfinite_; }
  int64_t n_outliers() const { return n_outliers_; }

  /// Windows and counters; doubles round-trip exactly.
  Json state() const;
  void load_state(const Json& state);

 private:
  bool is_outlier(const std::deque<double>& w, double x, std::string& why, const char* what) const;
  void push(std::deque<double>& w, double x);

  SkipGuardOptions o_;
  std::deque<double> losses_, norms_;
  int64_t n_checked_ = 0, n_skipped_ = 0, n_nonfinite_ = 0, n_outliers_ = 0, consecutive_ = 0;
};

}  // namespace rhine
