// Training checkpoint directories (rhine/io/checkpoint.h): commit, rotation,
// incomplete and damaged checkpoints, and crash safety against real SIGKILLs.
#include <catch2/catch.hpp>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include "rhine/core/error.h"
#include "rhine/io/checkpoint.h"
#include "test_util.h"

namespace fs = std::filesystem;
using rhine::io::CheckpointManager;
using rhine::io::CheckpointOptions;

namespace {

void write(const std::string& path, const std::string& text) { std::ofstream(path, std::ios::binary) << text; }

std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

std::vector<std::int64_t> steps(const CheckpointManager& m) {
  std::vector<std::int64_t> out;
  for (const auto& c : m.list()) out.push_back(c.step);
  return out;
}

}  // namespace

TEST_CASE("checkpoint: commit publishes step-N with a marker, rotation keeps the last N", "[checkpoint]") {
  rhine::test::TempDir tmp("checkpoint");
  CheckpointOptions o;
  o.dir = (tmp.path / "ckpt").string();
  o.keep_last = 2;
  CheckpointManager m(o);
  CHECK_FALSE(m.latest().has_value());
  for (std::int64_t s : {10, 20, 30}) {
    auto w = m.begin(s);
    write(w.path("model.bin"), "weights " + std::to_string(s));
    const auto p = w.commit();
    CHECK(p.filename() == CheckpointManager::dir_name(s));
    CHECK(fs::exists(p / "COMPLETE.json"));
  }
  CHECK(steps(m) == std::vector<std::int64_t>{20, 30});
  REQUIRE(m.latest());
  CHECK(m.latest()->step == 30);
  CHECK(slurp(m.latest()->path / "model.bin") == "weights 30");
  // Nothing but the checkpoints is left in the directory.
  std::size_t n = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(o.dir)) ++n;
  CHECK(n == 2);
}

TEST_CASE("checkpoint: keep_every protects multiples, keep_last 0 keeps all", "[checkpoint]") {
  rhine::test::TempDir tmp("checkpoint");
  CheckpointOptions o;
  o.dir = tmp.path.string();
  o.keep_last = 1;
  o.keep_every = 100;
  CheckpointManager m(o);
  for (std::int64_t s : {50, 100, 150, 200, 250}) {
    auto w = m.begin(s);
    write(w.path("x"), "x");
    w.commit();
  }
  CHECK(steps(m) == std::vector<std::int64_t>{100, 200, 250});
  o.keep_last = 0;
  CheckpointManager all(o);
  for (std::int64_t s : {300, 350}) {
    auto w = all.begin(s);
    write(w.path("x"), "x");
    w.commit();
  }
  CHECK(steps(all) == std::vector<std::int64_t>{100, 200, 250, 300, 350});
}

TEST_CASE("checkpoint: an uncommitted writer leaves nothing, saving a step again replaces it", "[checkpoint]") {
  rhine::test::TempDir tmp("checkpoint");
  CheckpointManager m({tmp.path.string(), 3, 0, true});
  {
    auto w = m.begin(5);
    write(w.path("a"), "half");
    CHECK(fs::exists(w.dir()));
  }
  CHECK(fs::is_empty(tmp.path));
  for (const char* text : {"first", "second"}) {
    auto w = m.begin(7);
    write(w.path("a"), text);
    w.commit();
  }
  REQUIRE(steps(m) == std::vector<std::int64_t>{7});
  CHECK(slurp(m.latest()->path / "a") == "second");
}

TEST_CASE("checkpoint: incomplete and damaged checkpoints are ignored", "[checkpoint]") {
  rhine::test::TempDir tmp("checkpoint");
  CheckpointOptions o;
  o.dir = tmp.path.string();
  o.keep_last = 0;
  CheckpointManager m(o);
  for (std::int64_t s : {1, 2, 3, 4}) {
    auto w = m.begin(s);
    write(w.path("data.bin"), std::string(1000, static_cast<char>('a' + s)));
    w.commit();
  }
  const auto dir = [&](int s) { return tmp.path / CheckpointManager::dir_name(s); };
  fs::remove(dir(4) / "COMPLETE.json");                          // killed before the marker
  fs::resize_file(dir(3) / "data.bin", 10);                      // truncated
  write((dir(2) / "data.bin").string(), std::string(1000, 'z'));  // same size, other bytes
  fs::create_directory(tmp.path / "step-00000009");              // empty
  fs::create_directory(tmp.path / ".tmp-step-00000010-123");     // a killed writer's leftover
  fs::create_directory(tmp.path / "step-x");                     // not a checkpoint name

  CHECK(CheckpointManager::check(dir(4), false).find("no COMPLETE.json") != std::string::npos);
  CHECK(CheckpointManager::check(dir(3), false).find("has 10 bytes") != std::string::npos);
  CHECK(CheckpointManager::check(dir(2), false).empty());  // sizes alone cannot see it
  CHECK(CheckpointManager::check(dir(2), true).find("checksum mismatch in data.bin") != std::string::npos);
  CHECK(steps(m) == std::vector<std::int64_t>{1, 2});
  o.verify_checksums = true;
  CheckpointManager verifying(o);
  CHECK(steps(verifying) == std::vector<std::int64_t>{1});
  CHECK(verifying.remove_leftovers() == 1);
  CHECK_FALSE(fs::exists(tmp.path / ".tmp-step-00000010-123"));

  write((dir(1) / "COMPLETE.json").string(), "{\"format\": \"rhine-checkpoint\", \"files\": [{\"name\": \"../x\", \"bytes\": 1}]}");
  CHECK(CheckpointManager::check(dir(1), false).find("invalid file") != std::string::npos);
  write((dir(1) / "COMPLETE.json").string(), "not json");
  CHECK(CheckpointManager::check(dir(1), false).find("unreadable") != std::string::npos);
}

TEST_CASE("checkpoint: bad names and options are clear errors", "[checkpoint]") {
  rhine::test::TempDir tmp("checkpoint");
  CHECK_THROWS_WITH(CheckpointManager({"", 3, 0, false}), Catch::Contains("[checkpoint] checkpoint directory is empty"));
  CHECK_THROWS_WITH(CheckpointManager({tmp.path.string(), -1, 0, false}), Catch::Contains("keep_last"));
  CheckpointManager m({tmp.path.string(), 3, 0, false});
  auto w = m.begin(1);
  CHECK_THROWS_WITH(w.path("sub/file"), Catch::Contains("plain file name"));
  CHECK_THROWS_WITH(w.path("COMPLETE.json"), Catch::Contains("reserved"));
  fs::create_directory(w.dir() / "nested");
  CHECK_THROWS_WITH(w.commit(), Catch::Contains("plain files only"));
}

// The crash-safety contract: kill -9 a writer at random moments, many times;
// every time the newest checkpoint found is complete, verified and correct.
TEST_CASE("checkpoint: SIGKILL at random moments never leaves a corrupt checkpoint", "[checkpoint][slow]") {
  rhine::test::TempDir tmp("checkpoint");
  const std::string dir = (tmp.path / "ckpt").string();
  fs::create_directories(dir);
  std::mt19937 rng(std::random_device{}());
  std::uniform_int_distribution<int> delay_ms(0, 300);
  int kills = 0, interrupted_writes = 0;
  std::int64_t newest = -1;
  for (int round = 0; round < 40; ++round) {
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      ::execl(RHINE_CHECKPOINT_WORKER, RHINE_CHECKPOINT_WORKER, dir.c_str(), "2", static_cast<char*>(nullptr));
      ::_exit(127);
    }
    // Wait until the worker is writing (process start-up loads LibTorch), then
    // kill it a random moment later.
    for (int i = 0; i < 2000; ++i) {
      bool writing = false;
      for (const auto& e : fs::directory_iterator(dir))
        writing |= e.path().filename().string().rfind(".tmp-", 0) == 0;
      if (writing) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    // Every fourth round lives longer, so that the run makes progress even on a slow disk.
    std::this_thread::sleep_for(std::chrono::milliseconds(round % 4 == 3 ? 500 + 4 * delay_ms(rng) : delay_ms(rng)));
    ::kill(pid, SIGKILL);
    int status = 0;
    ::waitpid(pid, &status, 0);
    REQUIRE(WIFSIGNALED(status));  // it was still running (never exits by itself)
    ++kills;
    for (const auto& e : fs::directory_iterator(dir))
      if (e.path().filename().string().rfind(".tmp-", 0) == 0) {
        ++interrupted_writes;
        break;
      }
    CheckpointManager m({dir, 2, 0, true});
    const auto all = m.list();
    // Once a checkpoint existed, one always exists.
    if (newest >= 0) REQUIRE_FALSE(all.empty());
    for (const auto& c : all) {
      INFO("round " << round << ", " << c.path);
      CHECK(CheckpointManager::check(c.path, true).empty());
      const auto n = 1000 + static_cast<std::size_t>(c.step * 7919 % 400000);
      const auto a = slurp(c.path / "a.bin");
      REQUIRE(a.size() == n);
      bool same = true;
      for (std::size_t i = 0; i < n; ++i)
        same &= a[i] == static_cast<char>((i * 31 + static_cast<std::size_t>(c.step)) & 255);
      CHECK(same);
      CHECK(slurp(c.path / "b.json") == "{\"step\": " + std::to_string(c.step) + "}\n");
    }
    if (!all.empty()) {
      CHECK(all.back().step >= newest);  // progress is never lost
      newest = all.back().step;
    }
  }
  INFO("kills " << kills << ", writes interrupted " << interrupted_writes << ", newest step " << newest);
  CHECK(kills == 40);
  CHECK(interrupted_writes > 0);  // the test did hit writes in progress
  CHECK(newest > 0);
}
