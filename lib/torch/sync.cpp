#include "rhine/torch/sync.h"

#include <ATen/ATen.h>

#include <atomic>

#include "rhine/core/error.h"

namespace rhine {
namespace {
std::atomic<std::uint64_t> g_syncs{0};
}  // namespace

at::Tensor to_host(const at::Tensor& t) {
  g_syncs.fetch_add(1, std::memory_order_relaxed);
  return t.device().is_cpu() ? t : t.to(at::kCPU);
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
