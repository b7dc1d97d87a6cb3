#include <catch2/catch.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <filesystem>
#include <string>

#include "rhine/core/error.h"
#include "rhine/core/file.h"
#include "test_util.h"

namespace fs = std::filesystem;
using Catch::Matchers::Contains;

using rhine::test::temp_dir;

TEST_CASE("write_file_atomic replaces contents and leaves no temporary files", "[file]") {
  auto dir = temp_dir("file");
  std::string path = (dir / "x.bin").string();
  std::string data(100000, '\0');
  for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i * 31);
  rhine::write_file_atomic(path, data);
  CHECK(rhine::read_file(path, "test") == data);
  rhine::write_file_atomic(path, "short");
  CHECK(rhine::read_file(path, "test") == "short");
  CHECK(std::distance(fs::directory_iterator(dir), fs::directory_iterator()) == 1);
  fs::remove_all(dir);
}

TEST_CASE("read_file errors name the path and the reason", "[file]") {
  auto dir = temp_dir("file_err");
  CHECK_THROWS_WITH(rhine::read_file((dir / "missing").string(), "tokenizer"),
                    Contains("[tokenizer] cannot open file for reading") && Contains("missing") &&
                        Contains("No such file"));
  CHECK_THROWS_WITH(rhine::read_file(dir.string(), "tokenizer"),
                    Contains("expected a file but found a directory"));
  CHECK_THROWS_WITH(rhine::write_file_atomic((dir / "no" / "such" / "dir").string(), "x"),
                    Contains("[file] cannot create temporary file"));
  fs::remove_all(dir);
}

TEST_CASE("a writer killed with SIGKILL leaves the old or the new file, never a torn one",
          "[file][slow]") {
  auto dir = temp_dir("file_kill");
  std::string path = (dir / "state.bin").string();
  const std::string old_data(1 << 20, 'A');
  const std::string new_data(1 << 20, 'B');
  rhine::write_file_atomic(path, old_data);
  for (int round = 0; round < 20; ++round) {
    pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      for (;;) {
        rhine::write_file_atomic(path, new_data);
        rhine::write_file_atomic(path, old_data);
      }
    }
    ::usleep(1000 + 3000 * round);
    ::kill(pid, SIGKILL);
    int status = 0;
    ::waitpid(pid, &status, 0);
    std::string got = rhine::read_file(path, "test");
    CHECK((got == old_data || got == new_data));
  }
  fs::remove_all(dir);
}
