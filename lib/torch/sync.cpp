#include "rhine/torch/sync.h"

#include <ATen/ATen.h>

#include <atomic>

#include "rhine/core/error.h"
#include "rhine/torch/cuda.h"

namespace rhine {
namespace {
std::atomic<std::uint64_t> g_syncs{0};
}  // namespace

at::Tensor to_host(const at::Tensor& t) {
  g_syncs.fetch_add(1, std::memory_order_relaxed);
  if (t.device().is_cpu()) return t;
  const cuda::SyncAllowed counted;  // the read a SyncErrorGuard lets pass
  return t.to(at::kCPU);
}

at::Tensor to_device(const at::Tensor& t, c10::Device device) {
  if (!device.is_cuda() || !t.device().is_cpu()) return t.to(device);
  return t.pin_memory().to(device, /*non_blocking=*/true);
}

template <class T>
T cpu_value(const at::Tensor& t) {
  RHINE_CHECK(t.device().is_cpu(), "sync", "cpu_value reads host tensors only", t.device().str(),
              "read device values with rhine::host_value (a counted synchronisation)");
  return t.item<T>();
}

template double cpu_value<double>(const at::Tensor&);
template float cpu_value<float>(const at::Tensor&);
template std::int64_t cpu_value<std::int64_t>(const at::Tensor&);
template bool cpu_value<bool>(const at::Tensor&);

std::uint64_t host_sync_count() { return g_syncs.load(std::memory_order_relaxed); }

}  // namespace rhine
