#pragma once
/// \file
/// Learning-rate schedules as pure functions of the step, composable and
/// printable. `step` is the number of optimizer steps already taken (0 for
/// the first update); a trainer calls
///
///     optimizer.set_lr_scale(schedule(optimizer.n_steps()));
///     optimizer.step();
///
/// Shapes (T = length of the piece, t = step within it, a -> b = from, to):
///   constant(v)            v
///   linear(T, a, b)        a + (b-a)*t/T for t < T, b afterwards
///   cosine(T, a, b)        b + (a-b)*(1 + cos(pi*t/T))/2 for t < T, b afterwards
///   decay(T, a, b, shape)  b + (a-b)*c(t/T), c(r) = 1-r (linear), 1-sqrt(r)
///                          (1-sqrt, Hägele et al. arXiv:2405.18392) or
///                          (1+cos(pi*r))/2 (cosine); b afterwards
///   multi_step(v, {(s_i, f_i)})  v * f_k with s_k the last milestone <= step (v before s_1)
///   a.then(T, b)           a(t) for t < T, b(t - T) afterwards
///   a * b                  a(t) * b(t)
///   wsd(o)                 linear warmup, stable at peak, decay to floor (Megatron's
///                          --lr-decay-style WSD): linear(W, start, peak).then(W, constant(peak))
///                          .then(W+S, decay(D, peak, floor, shape)), floor after W+S+D
///
/// Boundary values are exact: linear/decay/cosine give a at t = 0 and b at t >= T
/// bit for bit. `describe()` prints the composition, e.g.
/// "linear(0 -> 1, 100) | constant(1) until 1000 | 1-sqrt(1 -> 0.1, 200)".

#include <cstdint>
#include <functional>
#include <memory>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "rhine/core/json.h"

namespace rhine {

/// Shape of a decay piece.
enum class DecayShape { kLinear, kOneMinusSqrt, kCosine };

/// A schedule: double value of the step; cheap to copy, immutable.
class Schedule {
 public:
  /// The constant 1.
  Schedule();
  Schedule(std::function<double(int64_t)> fn, std::string text);

  /// The value at `step` (>= 0).
  double operator()(int64_t step) const;
  /// How the schedule was built, e.g. "linear(0 -> 1, 100) | constant(1)".
  const std::string& describe() const { return text_; }

  /// This schedule for steps < `at`, then `next` counted from 0 at `at`.
  Schedule then(int64_t at, const Schedule& next) const;

 private:
  std::shared_ptr<const std::function<double(int64_t)>> fn_;
  std::string text_;
};

/// Pointwise product (e.g. a warmup factor times a decay).
Schedule operator*(const Schedule& a, const Schedule& b);
std::ostream& operator<<(std::ostream& os, const Schedule& s);

Schedule constant(double value);
/// Linear from `from` (t = 0) to `to` (t >= steps); steps >= 1.
Schedule linear(int64_t steps, double from, double to);
/// Half-cosine from `from` to the floor `to` over `steps`, `to` afterwards.
Schedule cosine(int64_t steps, double from, double to);
/// A decay piece of the given shape from `from` to `to` over `steps`.
Schedule decay(int64_t steps, double from, double to, DecayShape shape);
/// `base` times the factor of the last milestone passed: {(step_i, factor_i)},
/// steps strictly increasing (DeepSeek LLM: {(0.8 T, 0.316), (0.9 T, 0.1)}).
Schedule multi_step(double base, std::vector<std::pair<int64_t, double>> milestones);

/// Options of `wsd`.
struct WsdOptions {
  int64_t warmup = 0;  ///< W, linear from `start` to `peak` (0 = none)
  int64_t stable = 0;  ///< S, constant `peak`
  int64_t decay = 0;   ///< D, from `peak` to `floor` (0 = none)
  double start = 0.0;
  double peak = 1.0;
  double floor = 0.0;
  DecayShape shape = DecayShape::kOneMinusSqrt;
};
/// Warmup-stable-decay (trapezoid) schedule.
Schedule wsd(const WsdOptions& o);
/// Linear warmup from 0 over `warmup` steps to `peak`, then cosine to `floor`
/// at step `total` (the Llama / DeepSeek-V2 recipe); `total` > `warmup`.
Schedule warmup_cosine(int64_t warmup, int64_t total, double peak, double floor);

/// A schedule from a training config (strict: unknown keys are rejected):
///   {"type": "constant", "value": v}
///   {"type": "linear" | "cosine", "steps": T, "from": a, "to": b}
///   {"type": "decay", "steps": T, "from": a, "to": b, "shape": "linear" | "1-sqrt" | "cosine"}
///   {"type": "multi_step", "base": v, "milestones": [[step, factor], ...]}
///   {"type": "wsd", "warmup": W, "stable": S, "decay": D, "start": 0, "peak": 1, "floor": 0,
///    "shape": "1-sqrt"}
///   {"type": "warmup_cosine", "warmup": W, "total": T, "peak": 1, "floor": 0}
Schedule schedule_from_json(const Json& j);

/// "linear", "1-sqrt", "cosine".
std::string to_string(DecayShape shape);
/// Parses "linear", "1-sqrt", "cosine" (rhine::Error otherwise).
DecayShape decay_shape_from_string(const std::string& s);

}  // namespace rhine
