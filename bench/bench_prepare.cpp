// rhine-prepare throughput: end-to-end MB/s of text (read, repair, tokenize on
// all cores, write shards) next to the tokenizer alone on the same documents,
// so the ratio shows whether prepare is limited by the tokenizer or by I/O.
//
//   bench_prepare TOKENIZER [TEXT ...]     (default text: data/sample/*.txt)
//
// Both sides see the same blank-line separated documents, repeated to at
// least 48 MB so that the tool's fixed costs (process start, tokenizer load,
// manifest) do not dominate the run.
//
// Also reported: the CPU seconds (user + system, all threads) per run of each
// side and their ratio. On a shared machine the wall-clock ratio moves with
// the load; the CPU ratio shows how much work prepare adds to the tokenizer
// (reading, UTF-8 repair, shard writing), the wall ratio how well it hides it.
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "bench.h"
#include "rhine/core/threads.h"
#include "rhine/tokenizer/tokenizer.h"

namespace fs = std::filesystem;

namespace {

// User + system CPU seconds of this process (RUSAGE_SELF) or of its waited-for children.
double cpu_seconds(int who) {
  rusage u{};
  ::getrusage(who, &u);
  auto sec = [](const timeval& t) { return t.tv_sec + t.tv_usec * 1e-6; };
  return sec(u.ru_utime) + sec(u.ru_stime);
}

std::vector<std::string> split_docs(const std::string& text) {
  std::vector<std::string> docs;
  std::string doc;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) {
      if (!doc.empty()) docs.push_back(std::move(doc));
      doc.clear();
    } else {
      if (!doc.empty()) doc += '\n';
      doc += line;
    }
  }
  if (!doc.empty()) docs.push_back(std::move(doc));
  return docs;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: bench_prepare TOKENIZER [TEXT ...]\n");
    return 2;
  }
  const std::string tokenizer = argv[1];
  std::vector<std::string> inputs(argv + 2, argv + argc);
  if (inputs.empty())
    for (const char* l : {"de", "en", "fr", "nl"}) inputs.push_back(std::string(RHINE_SOURCE_DIR) + "/data/sample/" + l + ".txt");

  std::string text;
  for (const auto& p : inputs) {
    std::ifstream f(p);
    std::stringstream s;
    s << f.rdbuf();
    text += s.str() + "\n\n";
  }
  const std::string one = text;
  while (text.size() < (48u << 20)) text += one;
  const auto tmp = fs::temp_directory_path() / ("rhine-bench-prepare-" + std::to_string(::getpid()));
  fs::create_directories(tmp);
  const auto input = tmp / "input.txt";
  std::ofstream(input) << text;
  const double mb = static_cast<double>(text.size()) / 1e6;
  const int threads = rhine::default_thread_count();
  const nlohmann::json params = {{"tokenizer", fs::path(tokenizer).filename().string()},
                                 {"mb", mb},
                                 {"threads", threads}};

  auto tok = rhine::Tokenizer::load(tokenizer);
  const auto docs = split_docs(text);
  const int runs = 3, warmup = 1;
  const double cpu_tok0 = cpu_seconds(RUSAGE_SELF);
  auto s_tok = rhine::bench::time_runs([&] { tok.encode_batch(docs, {}, threads); }, runs, warmup);
  const double cpu_tok = (cpu_seconds(RUSAGE_SELF) - cpu_tok0) / (runs + warmup);
  rhine::bench::report_rate("prepare.tokenizer_only", params, s_tok, mb, "MB/s");

  const std::string cmd = std::string(RHINE_PREPARE) + " -q --lang xx -t " + tokenizer + " -o " +
                          (tmp / "shards").string() + " " + input.string() + " > /dev/null";
  const double cpu_prep0 = cpu_seconds(RUSAGE_CHILDREN);
  auto s_prep = rhine::bench::time_runs(
      [&] {
        if (std::system(cmd.c_str()) != 0) std::fprintf(stderr, "rhine-prepare failed: %s\n", cmd.c_str());
      },
      runs, warmup);
  const double cpu_prep = (cpu_seconds(RUSAGE_CHILDREN) - cpu_prep0) / (runs + warmup);
  rhine::bench::report_rate("prepare.end_to_end", params, s_prep, mb, "MB/s");
  auto line = [&](const char* name, double value, const char* unit) {
    std::printf("%s\n", nlohmann::json({{"name", name}, {"params", params}, {"median", value}, {"unit", unit}})
                            .dump()
                            .c_str());
  };
  line("prepare.end_to_end_vs_tokenizer", s_tok.median / s_prep.median, "ratio (1 = limited by the tokenizer)");
  line("prepare.cpu_tokenizer_only", cpu_tok, "CPU s per run (mean)");
  line("prepare.cpu_end_to_end", cpu_prep, "CPU s per run (mean)");
  line("prepare.cpu_tokenizer_vs_end_to_end", cpu_tok / cpu_prep, "ratio (1 = no work beyond the tokenizer)");
  fs::remove_all(tmp);
  return 0;
}
