#pragma once
/// \file
/// What Rhine asks of a CUDA device beyond LibTorch's device-generic API:
/// the caching allocator's memory statistics (per-rank memory in the Trainer's
/// metrics, the GPU benchmarks), synchronisation for timing, the device's
/// name, whether LibTorch's flash-attention kernel serves a query, and guards
/// that make host synchronisations errors (the tests of "no hidden sync").
/// Compiled from lib/torch/cuda.cpp when Rhine is built with RHINE_WITH_CUDA
/// (against a CUDA LibTorch); otherwise lib/torch/cuda_stub.cpp supplies the
/// same functions, where `compiled_with_cuda()`, `available()` and
/// `flash_attention_serves()` are false, SyncAllowed does nothing, and the
/// others throw a rhine::Error saying how to build with CUDA.

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <string>

namespace rhine::cuda {

/// True when this Rhine was built with RHINE_WITH_CUDA.
bool compiled_with_cuda();

/// True when Rhine was built with CUDA and LibTorch sees at least one device.
bool available();

/// Bytes held by LibTorch's CUDA caching allocator on one device.
struct MemoryStats {
  std::int64_t allocated = 0;       ///< in live tensors now
  std::int64_t reserved = 0;        ///< cached by the allocator now (allocated + free blocks)
  std::int64_t peak_allocated = 0;  ///< highest `allocated` since the last reset_peak_memory
  std::int64_t peak_reserved = 0;   ///< highest `reserved` since the last reset_peak_memory
  std::int64_t total = 0;           ///< the device's memory
};

/// The allocator's statistics for `device` (a CUDA device). Throws rhine::Error
/// for a non-CUDA device or a Rhine built without CUDA.
MemoryStats memory_stats(c10::Device device);

/// Starts the peaks of memory_stats(device) afresh.
void reset_peak_memory(c10::Device device);

/// Waits until every kernel queued on `device` has finished (before reading a clock).
void synchronize(c10::Device device);

/// The device's name and compute capability, e.g. "NVIDIA H200 (sm_90)".
std::string device_name(c10::Device device);

/// True when LibTorch's flash-attention kernel takes `q` as query, key and
/// value (causal, dropout `dropout_p`): a CUDA tensor on a device, dtype and
/// head dim the kernel serves, flash not switched off. This asks flash's own
/// check (sdp::can_use_flash_attention), not LibTorch's backend choice, which
/// may prefer cuDNN's kernel (as 2.11 does on Hopper with cuDNN 9.15+) while
/// flash would serve too. False for a non-CUDA tensor or without CUDA.
bool flash_attention_serves(const at::Tensor& q, double dropout_p);

/// While alive, every CUDA call that makes the host wait for the device throws
/// (LibTorch's sync debug mode "error", Python's
/// torch.cuda.set_sync_debug_mode("error")): a blocking copy to the host
/// (.item(), .cpu()), a stream or device synchronize, including those inside
/// LibTorch's own ops, except Rhine's counted reads (rhine::to_host and
/// rhine::host_value, which open a SyncAllowed scope). The check that a step
/// has no hidden synchronisation on CUDA, where rhine::host_sync_count() sees
/// only Rhine's own. Process-wide; restores the previous mode on exit. Throws
/// rhine::Error without CUDA.
class SyncErrorGuard {
 public:
  SyncErrorGuard();
  ~SyncErrorGuard();
  SyncErrorGuard(const SyncErrorGuard&) = delete;
  SyncErrorGuard& operator=(const SyncErrorGuard&) = delete;

 private:
  int previous_ = 0;
};

/// Lets host synchronisations pass inside its scope, under a SyncErrorGuard
/// (rhine::to_host opens one: a counted read is an allowed one). Restores the
/// previous mode on exit; does nothing without CUDA.
class SyncAllowed {
 public:
  SyncAllowed();
  ~SyncAllowed();
  SyncAllowed(const SyncAllowed&) = delete;
  SyncAllowed& operator=(const SyncAllowed&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace rhine::cuda
