#include "rhine/core/threads.h"

#include <sched.h>

#include <cstdlib>
#include <string>
#include <thread>

#include "rhine/core/error.h"

namespace rhine {

int available_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  unsigned hw = std::thread::hardware_concurrency();
  return hw > 0 ? static_cast<int>(hw) : 1;
}

int default_thread_count() {
  if (const char* env = std::getenv("OMP_NUM_THREADS"); env && *env) {
    char* end = nullptr;
    long n = std::strtol(env, &end, 10);
    RHINE_CHECK(end && *end == '\0' && n > 0 && n <= 4096, "threads",
                "OMP_NUM_THREADS must be a positive integer", env,
                "unset it to use all cores, or set e.g. OMP_NUM_THREADS=4");
    return static_cast<int>(n);
  }
  return available_cpus();
}

}  // namespace rhine
