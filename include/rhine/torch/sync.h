#pragma once
/// \file
/// Reading tensor values on the host: the one door through which Rhine's
/// library code does it, so that host synchronisations can be counted.
///
/// On an accelerator, reading a value (`.item()`, `.cpu()`) waits for every
/// kernel queued before it: a step that does it per layer or per micro-batch
/// stalls the device that often. Rhine's rule: statistics stay device tensors
/// and a training step reads them once (rhine::train::Trainer packs the loss,
/// the gradient norm and the MoE counts into one `to_host`). Every read of a
/// value that may live on a device goes through `to_host` or `host_value`,
/// which count it in `host_sync_count()`; tests hold a step to its budget on
/// the CPU, where the same code runs. Tensors that are on the host by
/// construction (a batch before it is moved, a checkpoint being written) are
/// read with `cpu_value`, which refuses a device tensor instead of counting it.
/// On CUDA, `rhine::cuda::SyncErrorGuard` (cuda.h) makes every other host
/// synchronisation an error, LibTorch's own included; `to_host`'s pass.
///
///     const auto before = rhine::host_sync_count();
///     trainer.train_step();
///     assert(rhine::host_sync_count() - before <= 1);

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>

namespace rhine {

/// `t` on the CPU (the same tensor when it is there already); counts one host
/// synchronisation whatever the device, so that CPU runs count what a GPU run
/// would wait for.
at::Tensor to_host(const at::Tensor& t);

/// The value of a one-element tensor, through `to_host` (counted).
template <class T>
T host_value(const at::Tensor& t) {
  return to_host(t).item<T>();
}

/// The value of a one-element tensor that must already be on the CPU (not
/// counted: no device is waited for). Throws rhine::Error for a device tensor.
template <class T>
T cpu_value(const at::Tensor& t);

/// Host synchronisations counted so far in this process (all threads).
std::uint64_t host_sync_count();

/// `t` (a host tensor, such as a batch) on `device` without making the host
/// wait: on CUDA through pinned memory and an asynchronous copy (a plain
/// `.to(cuda)` from pageable memory waits for every kernel queued before it);
/// elsewhere `t.to(device)`.
at::Tensor to_device(const at::Tensor& t, c10::Device device);

extern template double cpu_value<double>(const at::Tensor&);
extern template float cpu_value<float>(const at::Tensor&);
extern template std::int64_t cpu_value<std::int64_t>(const at::Tensor&);
extern template bool cpu_value<bool>(const at::Tensor&);

}  // namespace rhine
