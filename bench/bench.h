#pragma once
// Rhine's benchmark convention: each benchmark is a program that prints one
// JSON object per measurement on its own line (JSON Lines), e.g.
//   {"name":"attention","params":{"T":256,"dtype":"bf16"},"median":1.2,"min":1.1,"max":1.4,
//    "unit":"ms","runs":15}
// so results from different runs and machines can be compared by script.
// Timed tests are never asserted: compare medians and ratios side by side.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace rhine::bench {

struct Stats {
  double median = 0, min = 0, max = 0;
  int runs = 0;
};

/// Times `fn` (after `warmup` untimed calls) `runs` times; seconds.
inline Stats time_runs(const std::function<void()>& fn, int runs = 15, int warmup = 2) {
  for (int i = 0; i < warmup; ++i) fn();
  std::vector<double> t;
  for (int i = 0; i < runs; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    fn();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return {t[t.size() / 2], t.front(), t.back(), runs};
}

/// Prints one measurement line. `scale` converts seconds to `unit` (e.g. 1e3 for ms);
/// for rates pass the already-converted values through `report_value`.
inline void report(const std::string& name, const nlohmann::json& params, const Stats& s,
                   const std::string& unit, double scale) {
  nlohmann::json j = {{"name", name},       {"params", params},       {"median", s.median * scale},
                      {"min", s.min * scale}, {"max", s.max * scale}, {"unit", unit},
                      {"runs", s.runs}};
  std::printf("%s\n", j.dump().c_str());
  std::fflush(stdout);
}

/// Reports a rate (work / seconds): median of the rate is work / median time,
/// min rate is work / max time.
inline void report_rate(const std::string& name, const nlohmann::json& params, const Stats& s,
                        double work, const std::string& unit) {
  nlohmann::json j = {{"name", name},         {"params", params},         {"median", work / s.median},
                      {"min", work / s.max},  {"max", work / s.min},      {"unit", unit},
                      {"runs", s.runs}};
  std::printf("%s\n", j.dump().c_str());
  std::fflush(stdout);
}

}  // namespace rhine::bench
