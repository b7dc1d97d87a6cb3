#include <catch2/catch.hpp>

#include <cstdlib>
#include <string>

#include "rhine/core/error.h"
#include "rhine/core/threads.h"

namespace {
// Sets an environment variable for one scope.
struct EnvGuard {
  std::string name;
  std::string old;
  bool had;
  EnvGuard(const char* n, const char* value) : name(n) {
    const char* o = std::getenv(n);
    had = o != nullptr;
    if (had) old = o;
    if (value)
      ::setenv(n, value, 1);
    else
      ::unsetenv(n);
  }
  ~EnvGuard() {
    if (had)
      ::setenv(name.c_str(), old.c_str(), 1);
    else
      ::unsetenv(name.c_str());
  }
};
}  // namespace

TEST_CASE("default_thread_count uses every CPU unless OMP_NUM_THREADS says otherwise",
          "[threads]") {
  {
    EnvGuard g("OMP_NUM_THREADS", nullptr);
    CHECK(rhine::default_thread_count() == rhine::available_cpus());
    CHECK(rhine::available_cpus() >= 1);
  }
  {
    EnvGuard g("OMP_NUM_THREADS", "3");
    CHECK(rhine::default_thread_count() == 3);
  }
  for (const char* bad : {"0", "-2", "two", "4x"}) {
    EnvGuard g("OMP_NUM_THREADS", bad);
    CHECK_THROWS_WITH(rhine::default_thread_count(),
                      "[threads] OMP_NUM_THREADS must be a positive integer, got \"" + std::string(bad) +
                          "\"; unset it to use all cores, or set e.g. OMP_NUM_THREADS=4");
  }
}
