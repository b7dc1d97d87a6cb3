// The CUDA side of rhine/torch/cuda.h; compiled only with RHINE_WITH_CUDA
// (lib/torch/cuda_stub.cpp otherwise). Links c10_cuda.
#include "rhine/torch/cuda.h"

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>

#include "rhine/core/error.h"
#include "rhine/torch/compat.h"

// Flash attention's own check, exported by libtorch_cuda (2.5+: sdp_params with enable_gqa).
#if RHINE_TORCH_VERSION_AT_LEAST(2, 5) && __has_include(<ATen/native/transformers/cuda/sdp_utils.h>)
#include <ATen/native/transformers/cuda/sdp_utils.h>
#define RHINE_HAS_SDP_FLASH_CHECK 1
#else
#define RHINE_HAS_SDP_FLASH_CHECK 0
#endif

namespace rhine::cuda {

namespace {

constexpr const char* kComponent = "cuda";

c10::DeviceIndex index_of(c10::Device device) {
  RHINE_CHECK(device.is_cuda(), kComponent, "needs a CUDA device, got", device.str(),
              "pass a device such as cuda:0");
  const int n = static_cast<int>(c10::cuda::device_count());
  RHINE_CHECK(n > 0, kComponent, "no CUDA device visible, asked for", device.str(),
              "run on a GPU machine, or check CUDA_VISIBLE_DEVICES and the driver");
  const c10::DeviceIndex i = device.has_index() ? device.index() : c10::cuda::current_device();
  RHINE_CHECK(i >= 0 && i < n, kComponent, "CUDA device index out of range", device.str(),
              "this machine has " + std::to_string(n) + " CUDA device(s)");
  return i;
}

}  // namespace

bool compiled_with_cuda() { return true; }

bool available() { return c10::cuda::device_count() > 0; }

MemoryStats memory_stats(c10::Device device) {
  const auto i = index_of(device);
  const auto s = c10::cuda::CUDACachingAllocator::getDeviceStats(i);
  // Index 0 of each StatArray is the aggregate over small and large pools.
  MemoryStats m;
  m.allocated = s.allocated_bytes[0].current;
  m.peak_allocated = s.allocated_bytes[0].peak;
  m.reserved = s.reserved_bytes[0].current;
  m.peak_reserved = s.reserved_bytes[0].peak;
  cudaDeviceProp prop{};
  RHINE_CHECK(cudaGetDeviceProperties(&prop, i) == cudaSuccess, kComponent,
              "cudaGetDeviceProperties failed for", device.str(), "check the CUDA driver");
  m.total = static_cast<std::int64_t>(prop.totalGlobalMem);
  return m;
}

void reset_peak_memory(c10::Device device) {
  c10::cuda::CUDACachingAllocator::resetPeakStats(index_of(device));
}

void synchronize(c10::Device device) {
  c10::cuda::CUDAGuard guard(index_of(device));
  c10::cuda::device_synchronize();
}

std::string device_name(c10::Device device) {
  const auto i = index_of(device);
  cudaDeviceProp prop{};
  RHINE_CHECK(cudaGetDeviceProperties(&prop, i) == cudaSuccess, kComponent,
              "cudaGetDeviceProperties failed for", device.str(), "check the CUDA driver");
  return std::string(prop.name) + " (sm_" + std::to_string(prop.major) + std::to_string(prop.minor) + ")";
}

bool flash_attention_serves(const at::Tensor& q, double dropout_p) {
#if RHINE_HAS_SDP_FLASH_CHECK
  if (!q.is_cuda()) return false;
  return sdp::can_use_flash_attention(
      sdp::sdp_params{q, q, q, std::nullopt, dropout_p, /*is_causal=*/true, /*enable_gqa=*/false}, /*debug=*/false);
#else
  (void)q, (void)dropout_p;
  return false;
#endif
}

namespace {
// Sets LibTorch's sync debug mode (process-wide); returns the one before.
int swap_sync_mode(c10::cuda::SyncDebugMode mode) {
  auto& state = c10::cuda::warning_state();
  const int previous = static_cast<int>(state.get_sync_debug_mode());
  state.set_sync_debug_mode(mode);
  return previous;
}
}  // namespace

SyncErrorGuard::SyncErrorGuard() : previous_(swap_sync_mode(c10::cuda::SyncDebugMode::L_ERROR)) {}
SyncErrorGuard::~SyncErrorGuard() { swap_sync_mode(static_cast<c10::cuda::SyncDebugMode>(previous_)); }

SyncAllowed::SyncAllowed() : previous_(swap_sync_mode(c10::cuda::SyncDebugMode::L_DISABLED)) {}
SyncAllowed::~SyncAllowed() { swap_sync_mode(static_cast<c10::cuda::SyncDebugMode>(previous_)); }

}  // namespace rhine::cuda
