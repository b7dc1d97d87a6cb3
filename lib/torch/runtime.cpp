#include "rhine/torch/runtime.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <torch/cuda.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <vector>

#include "rhine/core/error.h"
#include "rhine/core/threads.h"
#include "rhine/torch/compat.h"

namespace rhine {

std::string RuntimeInfo::describe() const {
  return "LibTorch " + torch_version + ", device " + device.str() + ", " + std::to_string(threads) +
         " thread" + (threads == 1 ? "" : "s") + ", " + std::to_string(cuda_device_count) +
         " CUDA device" + (cuda_device_count == 1 ? "" : "s") +
         (has_fused_attention() ? ", fused attention" : ", math attention");
}

int set_threads(int n) {
  const int want = n > 0 ? n : default_thread_count();
  at::set_num_threads(want);
  return at::get_num_threads();
}

int kernel_threads() {
  // One task per thread; each records the thread that ran it. Compiled like
  // the kernels (lib/CMakeLists.txt): without OpenMP, at::parallel_for is a
  // plain call on this thread.
  const int n = at::get_num_threads();
  std::vector<std::atomic<bool>> ran(static_cast<std::size_t>(std::max(n, 1)));
  at::parallel_for(0, static_cast<int64_t>(n) * 1024, 1024, [&](int64_t, int64_t) {
    const int t = at::get_thread_num();
    if (t >= 0 && t < static_cast<int>(ran.size())) ran[static_cast<std::size_t>(t)] = true;
  });
  return static_cast<int>(std::count_if(ran.begin(), ran.end(), [](const std::atomic<bool>& r) { return r.load(); }));
}

c10::Device select_device(std::string_view spec) {
  const int n_cuda = static_cast<int>(torch::cuda::device_count());
  if (spec == "auto" || spec.empty())
    return n_cuda > 0 ? c10::Device(c10::DeviceType::CUDA, 0) : c10::Device(c10::DeviceType::CPU);
  if (spec == "cpu") return c10::Device(c10::DeviceType::CPU);
  if (spec.substr(0, 4) == "cuda") {
    int index = 0;
    if (spec.size() > 4) {
      RHINE_CHECK(spec[4] == ':' && spec.size() > 5, "device", "malformed CUDA device", spec,
                  "use cuda or cuda:N");
      std::string digits(spec.substr(5));
      char* end = nullptr;
      long v = std::strtol(digits.c_str(), &end, 10);
      RHINE_CHECK(*end == '\0' && v >= 0, "device", "malformed CUDA device index", spec,
                  "use cuda or cuda:N with N >= 0");
      index = static_cast<int>(v);
    }
    RHINE_CHECK(n_cuda > 0, "device", "CUDA requested but this LibTorch sees no CUDA device", spec,
                "use device \"cpu\" or \"auto\", or run on a machine with a CUDA build of LibTorch");
    RHINE_CHECK(index < n_cuda, "device", "CUDA device index out of range", spec,
                "this machine has " + std::to_string(n_cuda) + " CUDA device(s)");
    return c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(index));
  }
  RHINE_FAIL("device", "unknown device", spec, "use auto, cpu, cuda or cuda:N");
}

void seed_everything(std::uint64_t seed) {
  at::manual_seed(seed);  // CPU and, when present, every CUDA generator
}

bool cpuinfo_has_bf16(std::string_view cpuinfo) {
  // The flag lines ("flags" on x86, "Features" on Arm) list words separated by
  // spaces; look for whole words only (avx512_bf16 must not match avx512_bf16x).
  std::istringstream lines{std::string(cpuinfo)};
  std::string line;
  while (std::getline(lines, line)) {
    const auto colon = line.find(':');
    if (colon == std::string::npos) continue;
    const std::string key = line.substr(0, line.find_first_of(" \t:"));
    if (key != "flags" && key != "Features") continue;
    std::istringstream words(line.substr(colon + 1));
    std::string w;
    while (words >> w)
      if (w == "avx512_bf16" || w == "amx_bf16" || w == "bf16") return true;
  }
  return false;
}

bool native_bf16(c10::Device device) {
  if (device.is_cuda()) return true;
  static const bool cpu = [] {
    std::ifstream in("/proc/cpuinfo");  // Linux; elsewhere assume no native bf16
    std::stringstream text;
    text << in.rdbuf();
    return cpuinfo_has_bf16(text.str());
  }();
  return cpu;
}

bool resolve_bf16(bool requested, bool emulated, c10::Device device, std::string_view component) {
  if (!requested) return false;
  if (emulated || native_bf16(device)) return true;
  static std::atomic<bool> warned{false};
  if (!warned.exchange(true))
    spdlog::warn("[{}] bf16 autocast requested, but this CPU has no native bf16 (no avx512_bf16, amx_bf16 or Arm "
                 "bf16 in /proc/cpuinfo): its bf16 matmuls are emulated and far slower than fp32, so this run "
                 "computes in fp32 (same master weights and checkpoints); \"bf16\": \"always\" in the run config "
                 "(TrainerOptions::bf16_emulated) keeps bf16 anyway",
                 component);
  return false;
}

RuntimeInfo init_runtime(const RuntimeOptions& options) {
  RHINE_CHECK(options.threads >= 0, "runtime", "threads must be >= 0 (0 = automatic)",
              options.threads, "");
  RuntimeInfo info;
  info.threads = set_threads(options.threads);
  info.device = select_device(options.device);
  info.torch_version = torch_version();
  info.cuda_device_count = static_cast<int>(torch::cuda::device_count());
  if (options.seed) seed_everything(*options.seed);
  if (options.deterministic) at::globalContext().setDeterministicAlgorithms(true, false);
  return info;
}

}  // namespace rhine
