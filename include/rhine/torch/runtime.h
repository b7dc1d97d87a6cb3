#pragma once
/// \file
/// Process-wide LibTorch setup: threads, device, seeds, determinism.
/// Call `init_runtime` once at the start of a program (before heavy work).

#include <c10/core/Device.h>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace rhine {

/// Options of `init_runtime`. Defaults: all cores, the best device, no seeding.
struct RuntimeOptions {
  /// Intra-op threads; 0 means OMP_NUM_THREADS when set, else every CPU this
  /// process may use (LibTorch itself would start with 1 here).
  int threads = 0;
  /// "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
  std::string device = "auto";
  /// Seed for LibTorch's CPU and CUDA generators (unset: leave them alone).
  std::optional<std::uint64_t> seed;
  /// Ask LibTorch for deterministic algorithms (errors on ops that have none).
  bool deterministic = false;
};

/// What `init_runtime` set up.
struct RuntimeInfo {
  int threads = 1;
  c10::Device device = c10::Device(c10::DeviceType::CPU);
  std::string torch_version;
  int cuda_device_count = 0;
  /// One line for logs: "LibTorch 1.13.1, cpu, 2 threads, ...".
  std::string describe() const;
};

/// Applies the options (threads, seed, determinism) and resolves the device.
RuntimeInfo init_runtime(const RuntimeOptions& options = {});

/// Sets LibTorch's intra-op thread count; n <= 0 means `default_thread_count()`.
/// Returns the count in effect.
int set_threads(int n);

/// How many threads an `at::parallel_for` over a large range uses inside
/// Rhine's own compiled kernels (the fused CPU kernels, the fused AdamW pass):
/// LibTorch's intra-op thread count, as long as the library was compiled with
/// LibTorch's threading (OpenMP, which the build finds); 1 means those kernels
/// run on the calling thread alone.
int kernel_threads();

/// Parses a device spec ("auto", "cpu", "cuda", "cuda:N"); throws rhine::Error
/// for bad specs and for CUDA requests on a machine without CUDA.
c10::Device select_device(std::string_view spec = "auto");

/// Seeds LibTorch's default CPU generator and every CUDA generator.
void seed_everything(std::uint64_t seed);

/// Whether `device` computes bf16 matmuls in hardware: every CUDA device, and
/// CPUs whose flags name avx512_bf16 or amx_bf16 (x86) or bf16 (Arm, e.g.
/// Grace). Other CPUs emulate bf16 through conversions: correct, but far
/// slower than fp32 itself (26x for a 1024^3 matmul under autocast on a
/// 2-core AVX2 EPYC, LibTorch 1.13: rhine-info), so bf16 autocast there is a trap.
bool native_bf16(c10::Device device);
/// The same test on the text of /proc/cpuinfo (exposed for tests).
bool cpuinfo_has_bf16(std::string_view cpuinfo);

/// Whether a program should run bf16 autocast on `device`: `requested`, and
/// either the device computes bf16 natively or `emulated` allows it anyway.
/// When it turns a request down it logs one warning naming `component`, the
/// reason and the override ("bf16": "always" in a run config).
bool resolve_bf16(bool requested, bool emulated, c10::Device device, std::string_view component);

}  // namespace rhine
