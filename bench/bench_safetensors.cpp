// Loading a large safetensors checkpoint: time and peak memory, memory-mapped
// (zero-copy) versus copied, against the size on disk. Writes a random
// checkpoint of about SIZE_MB (default 2048) MiB to /tmp, measures each mode in
// a fresh child process (so VmHWM is that mode's own peak), deletes the file.
//
//   build-st/bench/bench_safetensors [SIZE_MB]
//
// The page cache is warm (the file was just written): this measures mapping
// and touching pages, not the disk. Prints JSON Lines (see bench.h).
#include <ATen/ATen.h>

#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "bench.h"
#include "rhine/io/safetensors.h"

namespace {

// A field of /proc/self/status in KiB (VmHWM, VmRSS, RssAnon, RssFile).
double status_mib(const std::string& key) {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind(key + ":", 0) == 0) return std::stod(line.substr(key.size() + 1)) / 1024.0;
  return -1;
}

void report_value(const std::string& name, const nlohmann::json& params, double v, const std::string& unit) {
  rhine::bench::report(name, params, {v, v, v, 1}, unit, 1.0);
}

// One mode, run in a child process.
void measure(const std::string& path, bool copy, double file_mib) {
  rhine::TensorLoadOptions o;
  o.copy = copy;
  const nlohmann::json params = {{"mode", copy ? "copy" : "mmap"}, {"file_mib", file_mib}};
  const double base_hwm = status_mib("VmHWM");
  auto s = rhine::bench::time_runs([&] { (void)rhine::load_safetensors(path, o); }, 5, 1);
  rhine::bench::report("safetensors_load", params, s, "ms", 1e3);

  auto t0 = std::chrono::steady_clock::now();
  auto m = rhine::load_safetensors(path, o);
  double checksum = 0;
  for (auto& [name, t] : m) checksum += t.sum().item<double>();  // touch every page
  const double touch = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  report_value("safetensors_load_and_read_all", params, touch * 1e3, "ms");
  report_value("peak_rss_over_start", params, status_mib("VmHWM") - base_hwm, "MiB");
  report_value("rss_anon_after_read_all", params, status_mib("RssAnon"), "MiB");
  report_value("rss_file_after_read_all", params, status_mib("RssFile"), "MiB");
  if (checksum == 42.4242) std::printf("#\n");  // keep the sum alive
}

}  // namespace

int main(int argc, char** argv) {
  const std::int64_t size_mb = argc > 1 ? std::atoll(argv[1]) : 2048;
  const std::string path = "/tmp/rhine_bench_safetensors_" + std::to_string(::getpid()) + ".safetensors";
  {
    // 64 MiB bf16 tensors like a checkpoint's layers. All point at one chunk of
    // random values in [1, 2): the file's size is what matters, not its variety.
    const std::int64_t chunk = 64ll << 20;
    const std::int64_t n = std::max<std::int64_t>(1, (size_mb << 20) / chunk);
    std::vector<std::uint16_t> data(chunk / 2);
    std::mt19937_64 rng(1);
    for (auto& x : data) x = static_cast<std::uint16_t>(0x3f80 | (rng() & 0x7f));
    std::vector<rhine::SafetensorsTensor> ts;
    for (std::int64_t i = 0; i < n; ++i)
      ts.push_back({"model.layers." + std::to_string(i) + ".weight", rhine::SafetensorsDtype::BF16,
                    {chunk / 2 / 4096, 4096}, data.data(), static_cast<std::size_t>(chunk)});
    auto t0 = std::chrono::steady_clock::now();
    rhine::write_safetensors(path, ts);
    const double w = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    report_value("safetensors_write", {{"file_mib", static_cast<double>(n * chunk) / (1 << 20)}}, w * 1e3, "ms");
  }
  const double file_mib = static_cast<double>(std::filesystem::file_size(path)) / (1 << 20);
  for (bool copy : {false, true}) {
    pid_t pid = ::fork();
    if (pid == 0) {
      measure(path, copy, file_mib);
      std::fflush(stdout);
      ::_exit(0);
    }
    int status = 0;
    ::waitpid(pid, &status, 0);
  }
  std::filesystem::remove(path);
  return 0;
}
