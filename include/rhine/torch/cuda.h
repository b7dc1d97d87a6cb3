#pragma once
/// \file
/// What Rhine asks of a CUDA device beyond LibTorch's device-generic API:
/// the caching allocator's memory statistics (per-rank memory in the Trainer's
/// metrics, the GPU benchmarks), synchronisation for timing, and the device's
/// name. Compiled from lib/torch/cuda.cpp when Rhine is built with
/// RHINE_WITH_CUDA (against a CUDA LibTorch); otherwise lib/torch/cuda_stub.cpp
/// supplies the same functions, where `compiled_with_cuda()` is false and the
/// others throw a rhine::Error saying how to build with CUDA.

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

}  // namespace rhine::cuda
