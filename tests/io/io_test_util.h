#pragma once
// Helpers of the HF import/export and LoRA tests: the fixture directories of
// tests/fixtures/hf/make_fixtures.py, their ids and reference logits, and the
// independent checker tests/fixtures/hf/check_hf_dir.py. Include after torch_test.h.
#include <ATen/core/grad_mode.h>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "rhine/core/json.h"
#include "test_util.h"
#include "rhine/io/safetensors.h"
#include "rhine/nn/model.h"

namespace io_test {

namespace fs = std::filesystem;

inline fs::path hf_fixture(const std::string& name) {
  return fs::path(RHINE_SOURCE_DIR) / "tests" / "fixtures" / "hf" / name;
}

/// Token ids of ids.txt: one sequence per line.
inline std::vector<std::vector<std::int64_t>> read_ids(const fs::path& file) {
  std::ifstream in(file);
  std::vector<std::vector<std::int64_t>> rows;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream s(line);
    std::vector<std::int64_t> row;
    std::int64_t v;
    while (s >> v) row.push_back(v);
    rows.push_back(row);
  }
  return rows;
}

/// Logits [T, V] of one sequence, in the model's dtype.
inline at::Tensor logits_of(rhine::nn::CausalLM& lm, const std::vector<std::int64_t>& row) {
  at::NoGradGuard g;
  auto ids = at::tensor(row, at::kLong).view({1, -1});
  return lm->forward(ids).logits[0];
}

/// ||a - b|| / ||b|| in float64; NaN/Inf -> +inf.
inline double rel_err(const at::Tensor& a, const at::Tensor& b) {
  auto ad = a.to(at::kDouble), bd = b.to(at::kDouble);
  double e = (ad - bd).norm().item<double>(), r = bd.norm().item<double>();
  if (!std::isfinite(e) || !std::isfinite(r)) return std::numeric_limits<double>::infinity();
  return r == 0 ? e : e / r;
}

/// Runs tests/fixtures/hf/check_hf_dir.py with `args`; returns its JSON report.
inline rhine::Json python_check(const std::string& args) {
  const auto script = hf_fixture("check_hf_dir.py");
  const std::string cmd = "/usr/bin/python3 " + script.string() + " " + args;
  const auto [status, out] = rhine::test::run_command(cmd);
  INFO(cmd << "\n" << out);
  REQUIRE(status == 0);
  return rhine::Json::parse(out);
}

}  // namespace io_test
