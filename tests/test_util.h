#pragma once
// Helpers shared by Rhine's tests (torch-free).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

// ---- Honest skips (docs/testing.md) ------------------------------------------------------
// A test that cannot do its work here because a reference is missing (a program, a Python
// module, a data file that is not in the repository) must not report "passed". It says
//
//   RHINE_SKIP_TEST("what is missing; how to provide it");  // ends the test case here
//   RHINE_SKIP_PART("what is missing; how to provide it");  // the rest of the test runs
//
// and the Catch main (catch_main.cpp) prints, when the test case ends without a failure,
//
//   RHINE_TEST_SKIPPED: <reason> [<test case>]
//
// on stdout. Every ctest test carries SKIP_REGULAR_EXPRESSION on that marker
// (tests/CMakeLists.txt), so ctest lists it as "Skipped", not "Passed". A test case that failed
// anywhere prints no marker and stays "Failed". With RHINE_REQUIRE_REFERENCES=1 in the
// environment a skip is a failure instead (for machines that must hold every reference).
// Call the macros from the TEST_CASE body itself (RHINE_SKIP_TEST returns from the enclosing
// function). Shell-script tests use tests/skip.sh, which prints the same marker.
#define RHINE_SKIP_TEST(reason)                                                       \
  do {                                                                                \
    const std::string rhine_skip_reason_(reason);                                     \
    if (::rhine::test::references_required())                                         \
      FAIL(::rhine::test::missing_reference_message(rhine_skip_reason_));             \
    ::rhine::test::record_skip(rhine_skip_reason_);                                   \
    return;                                                                           \
  } while (false)

#define RHINE_SKIP_PART(reason)                                                       \
  do {                                                                                \
    const std::string rhine_skip_reason_(reason);                                     \
    if (::rhine::test::references_required())                                         \
      FAIL_CHECK(::rhine::test::missing_reference_message(rhine_skip_reason_));       \
    else                                                                              \
      ::rhine::test::record_skip(rhine_skip_reason_);                                 \
  } while (false)

namespace rhine::test {

/// The line prefix that makes ctest report a test as skipped (SKIP_REGULAR_EXPRESSION).
inline constexpr const char* kSkipMarker = "RHINE_TEST_SKIPPED:";

/// True when RHINE_REQUIRE_REFERENCES=1: skips become failures.
inline bool references_required() {
  const char* v = std::getenv("RHINE_REQUIRE_REFERENCES");
  return v != nullptr && std::string(v) == "1";
}

/// The failure message of a skip under RHINE_REQUIRE_REFERENCES=1.
inline std::string missing_reference_message(const std::string& reason) {
  return "missing reference: " + reason +
         "\n(RHINE_REQUIRE_REFERENCES=1 turns skips into failures; without it this test reports Skipped)";
}

/// The skip reasons of the running test case (printed and cleared by catch_main.cpp).
inline std::vector<std::string>& skip_reasons() {
  static std::vector<std::string> reasons;
  return reasons;
}

inline void record_skip(const std::string& reason) {
  auto& r = skip_reasons();
  if (std::find(r.begin(), r.end(), reason) == r.end()) r.push_back(reason);
}

/// A fresh, empty directory /tmp/rhine_<tag>_<pid> (created now; the caller removes it).
inline std::filesystem::path temp_dir(const std::string& tag) {
  auto d = std::filesystem::temp_directory_path() / ("rhine_" + tag + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d;
}

/// A fresh directory under /tmp, removed when the object goes.
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& tag) : path(temp_dir(tag)) {}
  ~TempDir() { std::filesystem::remove_all(path); }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

/// Lower-case hex of n bytes (to compare raw tensor bytes with fixtures).
inline std::string hex(const void* data, std::size_t n) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  const auto* p = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < n; ++i) {
    out += digits[p[i] >> 4];
    out += digits[p[i] & 15];
  }
  return out;
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for a TCPStore in multi-rank tests).
inline int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  const bool ok = fd >= 0 && ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
                  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0;
  if (fd >= 0) ::close(fd);
  if (!ok) throw std::runtime_error("free_port: cannot bind a socket on 127.0.0.1");
  return ntohs(addr.sin_port);
}

/// Runs a shell command; returns its exit status (as pclose gives it) and standard output.
inline std::pair<int, std::string> run_command(const std::string& cmd) {
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) return {-1, ""};
  std::string out;
  char buf[4096];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  return {::pclose(p), out};
}

}  // namespace rhine::test
