#pragma once
// Runs the independent safetensors reader (tests/fixtures/safetensors/read_safetensors.py,
// plain python3) on a file and returns its JSON report. Include after Catch.
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <string>

#include "rhine/core/json.h"
#include "test_util.h"

namespace rhine::test {

inline bool have_python() { return ::access("/usr/bin/python3", X_OK) == 0; }

/// Why a test skips the independent re-read (RHINE_SKIP_TEST / RHINE_SKIP_PART) without it.
inline constexpr const char* kNoPythonReason =
    "/usr/bin/python3 is missing: the independent safetensors reader "
    "(tests/fixtures/safetensors/read_safetensors.py, plain Python 3, no packages) did not re-read the file; "
    "install Debian's python3 (scripts/setup.sh does)";

inline rhine::Json python_read_safetensors(const std::string& path) {
  const auto script = std::filesystem::path(RHINE_SOURCE_DIR) / "tests" / "fixtures" / "safetensors" /
                      "read_safetensors.py";
  const std::string cmd = "/usr/bin/python3 " + script.string() + " '" + path + "'";
  const auto [status, out] = rhine::test::run_command(cmd);
  INFO(cmd << "\n" << out);
  REQUIRE(status == 0);
  return rhine::Json::parse(out);
}

}  // namespace rhine::test
