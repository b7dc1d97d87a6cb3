// rhine/torch/cuda.h for a Rhine built without RHINE_WITH_CUDA: the same
// functions, reporting that CUDA is not compiled in (lib/torch/cuda.cpp is the
// real one).
#include "rhine/torch/cuda.h"

#include "rhine/core/error.h"

namespace rhine::cuda {

namespace {
[[noreturn]] void not_built(c10::Device device) {
  RHINE_FAIL("cuda", "this Rhine was built without CUDA, asked for", device.str(),
             "build against a CUDA LibTorch with -DRHINE_WITH_CUDA=ON (scripts/build.sh --torch=wheel)");
}
}  // namespace

bool compiled_with_cuda() { return false; }
bool available() { return false; }
MemoryStats memory_stats(c10::Device device) { not_built(device); }
void reset_peak_memory(c10::Device device) { not_built(device); }
void synchronize(c10::Device device) { not_built(device); }
std::string device_name(c10::Device device) { not_built(device); }
bool flash_attention_serves(const at::Tensor&, double) { return false; }
SyncErrorGuard::SyncErrorGuard() { not_built(c10::Device(c10::DeviceType::CUDA)); }
SyncErrorGuard::~SyncErrorGuard() = default;
SyncAllowed::SyncAllowed() = default;
SyncAllowed::~SyncAllowed() = default;

}  // namespace rhine::cuda
