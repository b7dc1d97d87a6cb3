#pragma once
// Multi-process helpers of the dist tests: start N worker processes on
// 127.0.0.1 with torchrun's rendezvous variables, wait for them (killing
// stragglers), and compare the float64 parameter files they write.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "test_util.h"

extern char** environ;

namespace rhine::test {

// --- process helpers ---------------------------------------------------------
/// Starts the worker with `args` and the rendezvous variables of (rank, n, port)
/// (n = 0: none, a single process); its output goes to LOG.
inline pid_t spawn_worker(const std::string& worker, const std::vector<std::string>& args, int rank, int n,
                          int port, const std::string& log) {
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e) {
    std::string kv = *e;
    std::string key = kv.substr(0, kv.find('='));
    if (key == "RANK" || key == "WORLD_SIZE" || key == "LOCAL_RANK" || key == "MASTER_ADDR" ||
        key == "MASTER_PORT" || key == "OMP_NUM_THREADS" || key.rfind("SLURM_", 0) == 0)
      continue;
    env.push_back(kv);
  }
  env.push_back("OMP_NUM_THREADS=1");
  // Every multi-rank test runs with the strict device check: a host tensor on
  // the device group fails here as it would under NCCL.
  env.push_back("RHINE_DIST_STRICT_DEVICE=1");
  if (n > 0) {
    env.push_back("RANK=" + std::to_string(rank));
    env.push_back("LOCAL_RANK=" + std::to_string(rank));
    env.push_back("WORLD_SIZE=" + std::to_string(n));
    env.push_back("MASTER_ADDR=127.0.0.1");
    env.push_back("MASTER_PORT=" + std::to_string(port));
  }
  std::vector<std::string> argv_s{worker};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
      ::dup2(fd, 1);
      ::dup2(fd, 2);
    }
    std::vector<char*> av, ev;
    for (auto& s : argv_s) av.push_back(s.data());
    av.push_back(nullptr);
    for (auto& s : env) ev.push_back(s.data());
    ev.push_back(nullptr);
    ::execve(av[0], av.data(), ev.data());
    std::_Exit(127);
  }
  return pid;
}

struct Exit {
  int code = -1;         ///< exit status, or -1 when killed for running too long
  double seconds = 0;    ///< from start to exit
};

/// Waits for every pid (at most `limit_s` in all), killing stragglers; with
/// `kill_after_first`, the others are killed as soon as one has exited.
inline std::vector<Exit> wait_all(const std::vector<pid_t>& pids, double limit_s, bool kill_after_first = false) {
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<Exit> out(pids.size());
  std::vector<bool> done(pids.size(), false);
  size_t left = pids.size();
  while (left > 0) {
    for (size_t i = 0; i < pids.size(); ++i) {
      if (done[i]) continue;
      int st = 0;
      if (::waitpid(pids[i], &st, WNOHANG) == pids[i]) {
        done[i] = true;
        --left;
        out[i].code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        out[i].seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      }
    }
    const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (el > limit_s || (kill_after_first && left < pids.size() && left > 0)) {
      for (size_t i = 0; i < pids.size(); ++i) {
        if (done[i]) continue;
        ::kill(pids[i], SIGKILL);
        ::waitpid(pids[i], nullptr, 0);
        out[i].code = -1;
        out[i].seconds = el;
      }
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return out;
}

inline std::string slurp(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

/// Runs n ranks (n = 0: one process without rendezvous variables) with `args`
/// and output prefix dir/name; returns their exits.
inline std::vector<Exit> run_ranks(const std::string& worker, const rhine::test::TempDir& dir,
                                   const std::string& name, int n, std::vector<std::string> args,
                                   double limit_s = 120, bool kill_after_first = false) {
  const std::string prefix = dir.file(name);
  args.push_back("--out");
  args.push_back(prefix);
  const int port = n > 0 ? rhine::test::free_port() : 0;
  std::vector<pid_t> pids;
  for (int r = 0; r < std::max(n, 1); ++r)
    pids.push_back(spawn_worker(worker, args, r, n, port, prefix + ".rank" + std::to_string(r) + ".log"));
  auto exits = wait_all(pids, limit_s, kill_after_first);
  for (int r = 0; r < static_cast<int>(exits.size()); ++r) {
    if (exits[static_cast<size_t>(r)].code != 0) {
      UNSCOPED_INFO(name << " rank " << r << " exit " << exits[static_cast<size_t>(r)].code << " log:\n"
                         << slurp(prefix + ".rank" + std::to_string(r) + ".log"));
    }
  }
  return exits;
}

inline std::vector<double> read_params(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  REQUIRE(f.good());
  std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::vector<double> v(bytes.size() / 8);
  std::memcpy(v.data(), bytes.data(), v.size() * 8);
  return v;
}

/// ||a - b|| / ||b|| and max |a - b|; NaN never passes (comparisons fail).
inline std::pair<double, double> diff(const std::vector<double>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double num = 0, den = 0, mx = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = a[i] - b[i];
    num += d * d;
    den += b[i] * b[i];
    mx = std::max(mx, std::abs(d));
    if (std::isnan(a[i]) || std::isnan(b[i])) mx = NAN;
  }
  return {std::sqrt(num / den), mx};
}

inline bool all_ok(const std::vector<Exit>& exits) {
  for (const auto& e : exits)
    if (e.code != 0) return false;
  return true;
}

}  // namespace rhine::test
