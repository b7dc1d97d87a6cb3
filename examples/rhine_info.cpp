// rhine-info: what this machine and build give Rhine.
//
// Prints Rhine's and LibTorch's versions, the device and thread count Rhine
// picks, and measures fp32 and bf16 matmul throughput, the two numbers that
// decide how fast training runs on a CPU. A very low fp32 figure (a few
// GFLOP/s) means LibTorch fell back to reference BLAS: install
// libopenblas0-openmp (scripts/setup.sh does).
//
// With --gemm MxNxK (repeatable) it also measures those matmul shapes, [M,K] x
// [K,N], in --dtype (fp32 or bf16 tensors, no autocast casts): the ceiling a
// model with those shapes can reach (bench/bench_train.py passes a model's
// own shapes). --json prints one JSON line instead of text.
//
// Usage: rhine-info [--threads N] [--size N] [--gemm MxNxK ...] [--dtype fp32|bf16] [--json]
#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "rhine/core/error.h"
#include "rhine/core/json.h"
#include "rhine/core/log.h"
#include "rhine/rhine.h"
#include "rhine/torch/compat.h"
#include "rhine/torch/runtime.h"

namespace {

// Median GFLOP/s of an n x n x n matmul over a few runs.
double matmul_gflops(int64_t n, bool bf16) {
  auto a = at::randn({n, n}), b = at::randn({n, n});
  std::vector<double> rates;
  for (int rep = 0; rep < 7; ++rep) {
    rhine::AutocastGuard autocast(at::kCPU, at::kBFloat16, bf16);
    auto t0 = std::chrono::steady_clock::now();
    auto c = at::matmul(a, b);
    (void)c.sum().item<float>();
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (rep > 0) rates.push_back(2.0 * n * n * n / s / 1e9);  // first run warms up
  }
  std::sort(rates.begin(), rates.end());
  return rates[rates.size() / 2];
}

// Median GFLOP/s of [m,k] x [k,n] in `dtype`: at least 3 timed runs and 0.3 s.
double gemm_gflops(int64_t m, int64_t n, int64_t k, at::ScalarType dtype) {
  auto a = at::randn({m, k}).to(dtype), b = at::randn({k, n}).to(dtype);
  (void)at::matmul(a, b);  // warm-up
  std::vector<double> rates;
  double total = 0;
  while (rates.size() < 3 || (total < 0.3 && rates.size() < 50)) {
    auto t0 = std::chrono::steady_clock::now();
    auto c = at::matmul(a, b);
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    total += s;
    rates.push_back(2.0 * m * n * k / s / 1e9);
  }
  std::sort(rates.begin(), rates.end());
  return rates[rates.size() / 2];
}

int parse_int(const char* flag, const char* v) {
  char* end = nullptr;
  long n = v ? std::strtol(v, &end, 10) : 0;
  RHINE_CHECK(v && *end == '\0' && n > 0, "rhine-info", std::string(flag) + " needs a positive integer",
              v ? v : "nothing", "e.g. " + std::string(flag) + " 2");
  return static_cast<int>(n);
}

}  // namespace

int main(int argc, char** argv) try {
  rhine::init_logging();
  rhine::RuntimeOptions options;
  int64_t n = 1024;
  bool json = false;
  std::string dtype = "fp32";
  std::vector<std::array<int64_t, 3>> gemms;
  for (int i = 1; i < argc; ++i) {
    const char* next = i + 1 < argc ? argv[i + 1] : nullptr;
    if (!std::strcmp(argv[i], "--threads")) {
      options.threads = parse_int("--threads", next), ++i;
    } else if (!std::strcmp(argv[i], "--size")) {
      n = parse_int("--size", next), ++i;
    } else if (!std::strcmp(argv[i], "--dtype")) {
      RHINE_CHECK(next && (!std::strcmp(next, "fp32") || !std::strcmp(next, "bf16")), "rhine-info",
                  "--dtype must be fp32 or bf16", next ? next : "nothing", "e.g. --dtype bf16");
      dtype = next, ++i;
    } else if (!std::strcmp(argv[i], "--gemm")) {
      long long m = 0, nn = 0, k = 0;
      char tail = 0;
      RHINE_CHECK(next && std::sscanf(next, "%lldx%lldx%lld%c", &m, &nn, &k, &tail) == 3 && m > 0 && nn > 0 && k > 0,
                  "rhine-info", "--gemm needs MxNxK with positive integers", next ? next : "nothing",
                  "e.g. --gemm 2048x1152x384 for [2048,384] x [384,1152]");
      gemms.push_back({m, nn, k}), ++i;
    } else if (!std::strcmp(argv[i], "--json")) {
      json = true;
    } else {
      RHINE_FAIL("rhine-info", "unknown argument", argv[i],
                 "usage: rhine-info [--threads N] [--size N] [--gemm MxNxK ...] [--dtype fp32|bf16] [--json]");
    }
  }
  auto info = rhine::init_runtime(options);
  const at::ScalarType gemm_dtype = dtype == "bf16" ? at::kBFloat16 : at::kFloat;
  const bool native = rhine::native_bf16(c10::Device(c10::DeviceType::CPU));
  if (json) {  // the given shapes only (no headline matmuls): what a bench reads
    rhine::Json out = {{"name", "rhine_info"},     {"rhine", RHINE_VERSION_STRING}, {"torch", info.torch_version},
                       {"threads", info.threads}, {"native_bf16", native},          {"dtype", dtype}};
    out["gemm"] = rhine::Json::array();
    for (const auto& [m, nn, k] : gemms)
      out["gemm"].push_back({{"m", m}, {"n", nn}, {"k", k},
                             {"gflops", gemm_gflops(m, nn, k, gemm_dtype)}});
    std::printf("%s\n", out.dump().c_str());
    return 0;
  }
  std::printf("Rhine %s\n%s\n", RHINE_VERSION_STRING, info.describe().c_str());
  const double fp32 = matmul_gflops(n, false);
  const double bf16 = matmul_gflops(n, true);
  std::printf("matmul %lldx%lldx%lld: fp32 %.1f GFLOP/s, bf16 autocast %.1f GFLOP/s (%.1fx)\n",
              static_cast<long long>(n), static_cast<long long>(n), static_cast<long long>(n), fp32,
              bf16, bf16 / fp32);
  std::printf("native bf16 on this CPU: %s\n",
              native ? "yes (bf16 autocast trains faster than fp32)"
                     : "no (emulated: \"bf16\": true in a run config trains in fp32 here; \"always\" forces bf16)");
  for (const auto& [m, nn, k] : gemms)
    std::printf("gemm [%lld,%lld] x [%lld,%lld] %s: %.1f GFLOP/s\n", static_cast<long long>(m),
                static_cast<long long>(k), static_cast<long long>(k), static_cast<long long>(nn), dtype.c_str(),
                gemm_gflops(m, nn, k, gemm_dtype));
  if (fp32 < 10.0)
    std::printf("warning: fp32 matmul is very slow; LibTorch may be using reference BLAS. "
                "Install libopenblas0-openmp (scripts/setup.sh).\n");
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "%s\n", e.what());
  return 1;
}
