#include "rhine/optim/schedule.h"

#include <cmath>
#include <cstdio>

#include "rhine/core/error.h"

namespace rhine {
namespace {

std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.6g", v);
  return buf;
}

void check_steps(int64_t steps, const char* what) {
  RHINE_CHECK(steps >= 1, "schedule", std::string(what) + " needs steps >= 1", steps,
              "use constant() for a piece of no length");
}

}  // namespace

Schedule::Schedule() : Schedule([](int64_t) { return 1.0; }, "constant(1)") {}

Schedule::Schedule(std::function<double(int64_t)> fn, std::string text)
    : fn_(std::make_shared<const std::function<double(int64_t)>>(std::move(fn))),
      text_(std::move(text)) {}

double Schedule::operator()(int64_t step) const {
  RHINE_CHECK(step >= 0, "schedule", "step must be >= 0", step, "steps count from 0");
  return (*fn_)(step);
}

Schedule Schedule::then(int64_t at, const Schedule& next) const {
  RHINE_CHECK(at >= 0, "schedule", "then() needs a switch step >= 0", at, "e.g. the warmup length");
  auto a = fn_, b = next.fn_;
  return Schedule([a, b, at](int64_t t) { return t < at ? (*a)(t) : (*b)(t - at); },
                  text_ + " until " + std::to_string(at) + " | " + next.text_);
}

Schedule operator*(const Schedule& a, const Schedule& b) {
  return Schedule([a, b](int64_t t) { return a(t) * b(t); },
                  "(" + a.describe() + ") * (" + b.describe() + ")");
}

std::ostream& operator<<(std::ostream& os, const Schedule& s) { return os << s.describe(); }

Schedule constant(double value) {
  return Schedule([value](int64_t) { return value; }, "constant(" + num(value) + ")");
}

Schedule linear(int64_t steps, double from, double to) {
  return decay(steps, from, to, DecayShape::kLinear);
}

Schedule cosine(int64_t steps, double from, double to) {
  return decay(steps, from, to, DecayShape::kCosine);
}

Schedule decay(int64_t steps, double from, double to, DecayShape shape) {
  check_steps(steps, "a decay/linear piece");
  const double pi = std::acos(-1.0);
  return Schedule(
      [=](int64_t t) {
        if (t >= steps) return to;
        if (t <= 0) return from;  // exact, whatever the rounding of the shapes below
        const double r = static_cast<double>(t) / static_cast<double>(steps);
        switch (shape) {
          case DecayShape::kLinear: return from + (to - from) * r;
          case DecayShape::kOneMinusSqrt: return to + (from - to) * (1 - std::sqrt(r));
          case DecayShape::kCosine: return to + (from - to) * 0.5 * (1 + std::cos(pi * r));
        }
        return to;
      },
      to_string(shape) + "(" + num(from) + " -> " + num(to) + ", " + std::to_string(steps) + ")");
}

Schedule multi_step(double base, std::vector<std::pair<int64_t, double>> milestones) {
  std::string text = "multi_step(" + num(base);
  for (size_t i = 0; i < milestones.size(); ++i) {
    RHINE_CHECK(milestones[i].first >= 0 && (i == 0 || milestones[i].first > milestones[i - 1].first),
                "schedule", "multi_step milestones must be >= 0 and strictly increasing",
                milestones[i].first, "sort the milestones");
    text += ", x" + num(milestones[i].second) + " at " + std::to_string(milestones[i].first);
  }
  return Schedule(
      [base, milestones](int64_t t) {
        double f = 1.0;
        for (const auto& [s, factor] : milestones)
          if (t >= s) f = factor;
        return base * f;
      },
      text + ")");
}

Schedule wsd(const WsdOptions& o) {
  RHINE_CHECK(o.warmup >= 0 && o.stable >= 0 && o.decay >= 0, "schedule",
              "wsd lengths must be >= 0", (std::vector<int64_t>{o.warmup, o.stable, o.decay}),
              "warmup, stable, decay steps");
  Schedule s = constant(o.peak);
  if (o.decay > 0) s = s.then(o.stable, decay(o.decay, o.peak, o.floor, o.shape).then(o.decay, constant(o.floor)));
  else s = s.then(o.stable, constant(o.floor));
  if (o.warmup > 0) s = linear(o.warmup, o.start, o.peak).then(o.warmup, s);
  return Schedule([s](int64_t t) { return s(t); }, "wsd[" + s.describe() + "]");
}

Schedule warmup_cosine(int64_t warmup, int64_t total, double peak, double floor) {
  RHINE_CHECK(total > warmup && warmup >= 0, "schedule", "warmup_cosine needs total > warmup >= 0",
              (std::vector<int64_t>{warmup, total}), "total counts the warmup steps too");
  Schedule c = cosine(total - warmup, peak, floor);
  return warmup > 0 ? linear(warmup, 0.0, peak).then(warmup, c) : c;
}

Schedule schedule_from_json(const Json& j) {
  JsonFields f(j, "schedule");
  const auto type = f.require<std::string>("type");
  Schedule s;
  if (type == "constant") {
    s = constant(f.require<double>("value"));
  } else if (type == "linear" || type == "cosine" || type == "decay") {
    const auto steps = f.require<int64_t>("steps");
    const auto from = f.require<double>("from"), to = f.require<double>("to");
    const auto shape = type == "decay" ? decay_shape_from_string(f.require<std::string>("shape"))
                       : type == "linear" ? DecayShape::kLinear
                                          : DecayShape::kCosine;
    s = decay(steps, from, to, shape);
  } else if (type == "multi_step") {
    s = multi_step(f.require<double>("base"),
                   f.require<std::vector<std::pair<int64_t, double>>>("milestones"));
  } else if (type == "wsd") {
    WsdOptions o;
    o.warmup = f.get("warmup", o.warmup);
    o.stable = f.require<int64_t>("stable");
    o.decay = f.get("decay", o.decay);
    o.start = f.get("start", o.start);
    o.peak = f.get("peak", o.peak);
    o.floor = f.get("floor", o.floor);
    o.shape = decay_shape_from_string(f.get<std::string>("shape", to_string(o.shape)));
    s = wsd(o);
  } else if (type == "warmup_cosine") {
    s = warmup_cosine(f.require<int64_t>("warmup"), f.require<int64_t>("total"),
                      f.get("peak", 1.0), f.get("floor", 0.0));
  } else {
    RHINE_FAIL("schedule", "unknown schedule type", type,
               "use constant, linear, cosine, decay, multi_step, wsd or warmup_cosine");
  }
  f.reject_unknown();
  return s;
}

std::string to_string(DecayShape shape) {
  switch (shape) {
    case DecayShape::kLinear: return "linear";
    case DecayShape::kOneMinusSqrt: return "1-sqrt";
    case DecayShape::kCosine: return "cosine";
  }
  return "?";
}

DecayShape decay_shape_from_string(const std::string& s) {
  if (s == "linear") return DecayShape::kLinear;
  if (s == "1-sqrt") return DecayShape::kOneMinusSqrt;
  if (s == "cosine") return DecayShape::kCosine;
  RHINE_FAIL("schedule", "unknown decay shape", s, "use \"linear\", \"1-sqrt\" or \"cosine\"");
}

}  // namespace rhine
