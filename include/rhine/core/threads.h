#pragma once
/// \file
/// How many threads Rhine uses by default (torch-free; the LibTorch layer
/// applies it in `rhine::init_runtime`).

namespace rhine {

/// The thread count to use when the user did not choose one: OMP_NUM_THREADS
/// when set to a positive integer, otherwise the CPUs this process may run on
/// (sched_getaffinity, so containers and taskset are respected).
/// Throws rhine::Error when OMP_NUM_THREADS is set but not a positive integer.
int default_thread_count();

/// CPUs this process may run on (at least 1).
int available_cpus();

}  // namespace rhine
