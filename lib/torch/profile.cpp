// Chrome traces of LibTorch's profiler (see rhine/torch/profile.h): Kineto on
// LibTorch 2.x, the legacy profiler on 1.13 (Debian's build has no Kineto).
#include "rhine/torch/profile.h"

#include "rhine/torch/compat.h"  // RHINE_TORCH_VERSION_AT_LEAST

#if RHINE_TORCH_VERSION_AT_LEAST(2, 0)
#include <torch/csrc/autograd/profiler_kineto.h>
#else
#include <torch/csrc/autograd/profiler_legacy.h>
#endif

#include <atomic>
#include <filesystem>
#include <set>

#include "rhine/core/error.h"
#include "rhine/torch/cuda.h"

namespace rhine {
namespace {
std::atomic<bool> g_active{false};
}  // namespace

ProfileOptions ProfileOptions::from_json(const Json& j, const std::string& component) {
  JsonFields f(j, component);
  ProfileOptions o;
  o.start = f.get("start", o.start);
  o.steps = f.get("steps", o.steps);
  f.reject_unknown();
  RHINE_CHECK(o.start >= 1 && o.steps >= 1, component, "profile needs start >= 1 and steps >= 1, got",
              o.to_json().dump(), "e.g. {\"start\": 10, \"steps\": 3} traces steps 10-12 (after the warm-up)");
  return o;
}

#if RHINE_TORCH_VERSION_AT_LEAST(2, 0)
struct Profiler::State {
  bool running = false;
};

Profiler::Profiler(std::string path) : state_(std::make_unique<State>()), path_(std::move(path)) {
  RHINE_CHECK(!g_active.exchange(true), "profile", "a profiler is already recording", path_,
              "finish the running one first");
  namespace prof = torch::profiler::impl;
  const prof::ProfilerConfig config(prof::ProfilerState::KINETO, /*report_input_shapes=*/true);
  std::set<prof::ActivityType> activities{prof::ActivityType::CPU};
  if (cuda::available()) activities.insert(prof::ActivityType::CUDA);
  try {
    torch::autograd::profiler::prepareProfiler(config, activities);
    torch::autograd::profiler::enableProfiler(config, activities);
  } catch (...) {
    g_active = false;
    throw;
  }
  state_->running = true;
}

const std::string& Profiler::finish() {
  if (!state_->running) return path_;
  state_->running = false;
  auto result = torch::autograd::profiler::disableProfiler();
  g_active = false;
  const auto parent = std::filesystem::path(path_).parent_path();
  if (!parent.empty()) std::filesystem::create_directories(parent);
  result->save(path_);
  return path_;
}

std::string Profiler::backend() { return "kineto"; }
#else
struct Profiler::State {
  std::unique_ptr<torch::autograd::profiler::RecordProfile> record;
};

Profiler::Profiler(std::string path) : state_(std::make_unique<State>()), path_(std::move(path)) {
  RHINE_CHECK(!g_active.exchange(true), "profile", "a profiler is already recording", path_,
              "finish the running one first");
  const auto parent = std::filesystem::path(path_).parent_path();
  if (!parent.empty()) std::filesystem::create_directories(parent);
  // Opens the file now, writes it when destroyed.
  try {
    state_->record = std::make_unique<torch::autograd::profiler::RecordProfile>(path_);
  } catch (...) {
    g_active = false;
    throw;
  }
}

const std::string& Profiler::finish() {
  if (!state_->record) return path_;
  state_->record.reset();
  g_active = false;
  return path_;
}

std::string Profiler::backend() { return "legacy"; }
#endif

Profiler::~Profiler() {
  try {
    finish();
  } catch (...) {  // a destructor must not throw; finish() reports errors when called directly
    g_active = false;
  }
}

}  // namespace rhine
