// rhine-info: what this machine and build give Rhine.
//
// Prints Rhine's and LibTorch's versions, the device and thread count Rhine
// picks, and measures fp32 and bf16 matmul throughput, the two numbers that
// decide how fast training runs on a CPU. A very low fp32 figure (a few
// GFLOP/s) means LibTorch fell back to reference BLAS: install
// libopenblas0-openmp (scripts/setup.sh does).
//
// Usage: rhine-info [--threads N] [--size N]
#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "rhine/core/error.h"
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
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--threads"))
      options.threads = parse_int("--threads", i + 1 < argc ? argv[++i] : nullptr);
    else if (!std::strcmp(argv[i], "--size"))
      n = parse_int("--size", i + 1 < argc ? argv[++i] : nullptr);
    else
      RHINE_FAIL("rhine-info", "unknown argument", argv[i], "usage: rhine-info [--threads N] [--size N]");
  }
  auto info = rhine::init_runtime(options);
  std::printf("Rhine %s\n%s\n", RHINE_VERSION_STRING, info.describe().c_str());
  const double fp32 = matmul_gflops(n, false);
  const double bf16 = matmul_gflops(n, true);
  std::printf("matmul %lldx%lldx%lld: fp32 %.1f GFLOP/s, bf16 autocast %.1f GFLOP/s (%.1fx)\n",
              static_cast<long long>(n), static_cast<long long>(n), static_cast<long long>(n), fp32,
              bf16, bf16 / fp32);
  if (fp32 < 10.0)
    std::printf("warning: fp32 matmul is very slow; LibTorch may be using reference BLAS. "
                "Install libopenblas0-openmp (scripts/setup.sh).\n");
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "%s\n", e.what());
  return 1;
}
