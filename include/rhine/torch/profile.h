#pragma once
/// \file
/// Traces of training steps: LibTorch's profiler written as a Chrome trace
/// (open it in https://ui.perfetto.dev or chrome://tracing), with Rhine's own
/// named ranges around the parts of a step.
///
/// Ranges (RHINE_RANGE): the Trainer marks "rhine::step", "rhine::forward",
/// "rhine::backward", "rhine::grad_sync", "rhine::clip", "rhine::host_read",
/// "rhine::optimizer" and "rhine::checkpoint"; CausalLM::forward marks "rhine::embed",
/// "rhine::block.<i>", "rhine::lm_head", "rhine::loss" and "rhine::mtp.<k>";
/// dist::World marks each collective ("rhine::all_reduce", ...). A range
/// costs one thread-local check while no profiler runs; its name is built
/// only while one does.
///
/// Backends: on LibTorch 2.x the Kineto profiler (CPU ops and, on a CUDA
/// build, the device's kernels and copies on their streams); on LibTorch 1.13
/// (Debian, built without Kineto) the legacy CPU profiler.
///
///     {
///       rhine::Profiler p("runs/demo/profile/trace.rank0.json");
///       ... steps ...
///     }  // stops and writes the trace (or p.finish())

#include <ATen/record_function.h>

#include <cstdint>
#include <memory>
#include <string>

#include "rhine/core/json.h"

/// A named range in the trace of an active rhine::Profiler, open until the end
/// of the enclosing scope; `name` (a std::string or const char*) is evaluated
/// only while a profiler records.
#define RHINE_RANGE(name) RECORD_USER_SCOPE(name)

namespace rhine {

/// Which steps to trace: the run config's "profile": {"start": N, "steps": K}.
/// Steps count from 1 as in the logs; steps == 0 turns profiling off.
struct ProfileOptions {
  std::int64_t start = 1;
  std::int64_t steps = 0;
  bool enabled() const { return steps > 0; }
  /// Reads {"start", "steps"}; unknown keys and values below 1 are errors
  /// naming `component`.
  static ProfileOptions from_json(const Json& j, const std::string& component);
  Json to_json() const { return {{"start", start}, {"steps", steps}}; }
};

/// Records everything LibTorch runs in this thread (and the autograd and
/// intra-op work it starts) from construction until `finish()` or
/// destruction, then writes a Chrome trace to `path` (parent directories
/// are created). One profiler at a time per process.
class Profiler {
 public:
  explicit Profiler(std::string path);
  ~Profiler();
  Profiler(const Profiler&) = delete;
  Profiler& operator=(const Profiler&) = delete;
  /// Stops recording and writes the trace; returns its path. Only the first call writes.
  const std::string& finish();
  /// "kineto" or "legacy".
  static std::string backend();

 private:
  struct State;
  std::unique_ptr<State> state_;
  std::string path_;
};

}  // namespace rhine
