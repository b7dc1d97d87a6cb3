// Encode throughput of Rhine's SentencePiece encoder next to libsentencepiece on the same
// model and text, one thread and all threads, in one run (JSON Lines, see bench.h).
// Links libsentencepiece and therefore not LibTorch.
//
//   bench_tokenizer [--model M.model] [--text FILE] [--vocab 8000] [--type bpe|unigram] [--runs 7]
//                   [--cli-mb 20]
//
// Without --model it trains a SentencePiece model (byte fallback) on --text, by default the
// de/fr/nl/en sample in data/sample (train and held-out pages).
//
// Then the command lines end to end, one core each (sched_setaffinity): `rhine-tokenizer
// encode --threads 1` against `spm_encode --output_format=id` (libsentencepiece's tool, when
// on PATH), stdin a file of --cli-mb MB of the text's lines repeated, stdout a file; the two
// outputs must be byte for byte equal. Line "tokenizer_cli_speedup": spm time / Rhine time.
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>
#include <unistd.h>

#include <sched.h>
#include <sys/wait.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>

#include "bench.h"
#include "rhine/core/file.h"
#include "rhine/core/threads.h"
#include "rhine/tokenizer/tokenizer.h"

namespace fs = std::filesystem;

namespace {

/// Runs argv on one CPU with stdin and stdout redirected to files; seconds, or -1 on failure.
double run_pinned(const std::vector<std::string>& argv, const fs::path& in, const fs::path& out) {
  std::fflush(nullptr);  // else the child's freopen writes our buffered lines again
  const auto t0 = std::chrono::steady_clock::now();
  const pid_t pid = ::fork();
  if (pid == 0) {
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(0, &one);
    ::sched_setaffinity(0, sizeof one, &one);
    if (!std::freopen(in.c_str(), "rb", stdin) || !std::freopen(out.c_str(), "wb", stdout)) ::_exit(126);
    std::freopen("/dev/null", "w", stderr);
    std::vector<char*> av;
    for (const auto& a : argv) av.push_back(const_cast<char*>(a.c_str()));
    av.push_back(nullptr);
    ::execvp(av[0], av.data());
    ::_exit(127);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return -1;
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

bool on_path(const std::string& program) {
  const char* path = std::getenv("PATH");
  std::stringstream dirs(path ? path : "");
  for (std::string d; std::getline(dirs, d, ':');)
    if (!d.empty() && ::access((fs::path(d) / program).c_str(), X_OK) == 0) return true;
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  std::string model, text_path, type = "bpe";
  int vocab = 8000, runs = 7;
  double cli_mb = 20;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--model") model = v;
    else if (k == "--text") text_path = v;
    else if (k == "--vocab") vocab = std::stoi(v);
    else if (k == "--type") type = v;
    else if (k == "--runs") runs = std::stoi(v);
    else if (k == "--cli-mb") cli_mb = std::stod(v);
    else { std::cerr << "[bench_tokenizer] unknown option, got '" << k << "'\n"; return 2; }
  }
  // Text: lines of de/fr/nl/en prose.
  std::vector<std::string> lines;
  std::vector<std::string> files;
  if (!text_path.empty()) {
    files.push_back(text_path);
  } else {
    const fs::path src(RHINE_SOURCE_DIR);
    for (const char* lang : {"de", "fr", "nl", "en"}) {
      files.push_back((src / "data/sample" / (std::string(lang) + ".txt")).string());
      files.push_back((src / "data/sample/heldout" / (std::string(lang) + ".txt")).string());
    }
  }
  std::size_t bytes = 0;
  for (const auto& f : files) {
    std::ifstream in(f);
    std::string line;
    while (std::getline(in, line)) {
      bytes += line.size();
      lines.push_back(line);
    }
  }
  const fs::path tmp = fs::temp_directory_path() / ("rhine_bench_tok_" + std::to_string(::getpid()));
  if (model.empty()) {
    fs::create_directories(tmp);
    std::string all;
    for (const auto& l : lines) (all += l) += '\n';
    rhine::write_file_atomic((tmp / "train.txt").string(), all);
    const auto st = sentencepiece::SentencePieceTrainer::Train(
        "--input=" + (tmp / "train.txt").string() + " --model_prefix=" + (tmp / "m").string() + " --model_type=" + type +
        " --vocab_size=" + std::to_string(vocab) + " --byte_fallback=true --hard_vocab_limit=false --minloglevel=2");
    if (!st.ok()) { std::cerr << "[bench_tokenizer] training failed: " << st.ToString() << "\n"; return 1; }
    model = (tmp / "m.model").string();
  }
  // Repeat the text to at least 1 MB so one run is long enough to time. (Rhine's BPE keeps
  // a word cache; the "cold" rows below load a fresh tokenizer for every run so repeated
  // text cannot flatter it.)
  std::vector<std::string> corpus;
  std::size_t corpus_bytes = 0;
  while (corpus_bytes < (1u << 20) && bytes > 0)
    for (const auto& l : lines) {
      corpus.push_back(l);
      corpus_bytes += l.size();
    }

  sentencepiece::SentencePieceProcessor sp;
  if (!sp.Load(model).ok()) { std::cerr << "[bench_tokenizer] cannot load " << model << "\n"; return 1; }
  const auto tok = rhine::Tokenizer::load(model);

  // Identical ids first: a fast wrong tokenizer is no result.
  std::size_t mismatches = 0, tokens = 0;
  for (const auto& l : lines) {
    std::vector<int> ref;
    sp.Encode(l, &ref);
    const auto got = tok.encode(l);
    tokens += got.size();
    if (std::vector<int>(got.begin(), got.end()) != ref) ++mismatches;
  }
  const int threads = rhine::default_thread_count();
  const nlohmann::json base = {{"model", fs::path(model).filename().string()}, {"kind", tok.kind()},
                               {"vocab", tok.vocab_size()}, {"MB", corpus_bytes / 1e6},
                               {"lines_checked", lines.size()}, {"id_mismatches", mismatches}};
  const double mb = corpus_bytes / 1e6;

  auto spm_run = [&](int n_threads) {
    std::atomic<std::size_t> next{0};
    auto work = [&] {
      std::vector<int> ids;
      for (std::size_t i; (i = next.fetch_add(64)) < corpus.size();)
        for (std::size_t j = i; j < std::min(corpus.size(), i + 64); ++j) sp.Encode(corpus[j], &ids);
    };
    std::vector<std::thread> pool;
    for (int t = 1; t < n_threads; ++t) pool.emplace_back(work);
    work();
    for (auto& t : pool) t.join();
  };
  for (int n : {1, threads}) {
    auto p = base;
    p["threads"] = n;
    p["impl"] = "libsentencepiece";
    const auto s_spm = rhine::bench::time_runs([&] { spm_run(n); }, runs, 1);
    rhine::bench::report_rate("tokenizer_encode", p, s_spm, mb, "MB/s");
    p["impl"] = "rhine";
    const auto s_rhine = rhine::bench::time_runs([&] { (void)tok.encode_batch(corpus, {}, n); }, runs, 1);
    rhine::bench::report_rate("tokenizer_encode", p, s_rhine, mb, "MB/s");
    // Cold: a freshly loaded tokenizer (empty word cache) for every timed run.
    std::vector<double> cold;
    for (int r = 0; r < runs; ++r) {
      const auto fresh = rhine::Tokenizer::load(model);
      const auto t0 = std::chrono::steady_clock::now();
      (void)fresh.encode_batch(corpus, {}, n);
      cold.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(cold.begin(), cold.end());
    const rhine::bench::Stats s_cold{cold[cold.size() / 2], cold.front(), cold.back(), runs};
    p["impl"] = "rhine_cold_cache";
    rhine::bench::report_rate("tokenizer_encode", p, s_cold, mb, "MB/s");
    p.erase("impl");
    nlohmann::json j = {{"name", "tokenizer_encode_speedup"}, {"params", p}, {"median", s_spm.median / s_rhine.median},
                        {"cold_cache", s_spm.median / s_cold.median}, {"unit", "x"}, {"runs", runs}};
    std::printf("%s\n", j.dump().c_str());
  }

  // The command lines end to end, one core each.
  bool cli_equal = true;
#ifdef RHINE_TOKENIZER_CLI
  if (on_path("spm_encode") && cli_mb > 0) {
    fs::create_directories(tmp);
    const fs::path in = tmp / "cli.txt", out_spm = tmp / "spm.ids", out_rhine = tmp / "rhine.ids";
    {
      std::ofstream f(in, std::ios::binary);
      std::size_t written = 0;
      while (written < static_cast<std::size_t>(cli_mb * 1e6) && bytes > 0)
        for (const auto& l : lines) {
          f << l << '\n';
          written += l.size() + 1;
        }
    }
    const double mb_in = static_cast<double>(fs::file_size(in)) / 1e6;
    const std::vector<std::string> spm = {"spm_encode", "--model=" + model, "--output_format=id"};
    const std::vector<std::string> rhine_cmd = {RHINE_TOKENIZER_CLI, "encode", "-t", model, "--threads", "1"};
    std::vector<double> t_spm, t_rhine;
    for (int r = 0; r < runs; ++r) {  // alternating, so drifts in the machine's load hit both
      t_spm.push_back(run_pinned(spm, in, out_spm));
      t_rhine.push_back(run_pinned(rhine_cmd, in, out_rhine));
    }
    cli_equal = rhine::read_file(out_spm.string(), "bench_tokenizer") ==
                rhine::read_file(out_rhine.string(), "bench_tokenizer");
    const bool ok =
        *std::min_element(t_spm.begin(), t_spm.end()) > 0 && *std::min_element(t_rhine.begin(), t_rhine.end()) > 0;
    std::sort(t_spm.begin(), t_spm.end());
    std::sort(t_rhine.begin(), t_rhine.end());
    auto p = base;
    p["MB"] = mb_in;
    p["threads"] = 1;
    p["outputs_equal"] = cli_equal;
    if (ok) {
      p["impl"] = "spm_encode";
      rhine::bench::report_rate("tokenizer_cli_encode", p, {t_spm[t_spm.size() / 2], t_spm.front(), t_spm.back(), runs},
                                mb_in, "MB/s");
      p["impl"] = "rhine-tokenizer";
      rhine::bench::report_rate("tokenizer_cli_encode", p,
                                {t_rhine[t_rhine.size() / 2], t_rhine.front(), t_rhine.back(), runs}, mb_in, "MB/s");
      p.erase("impl");
      nlohmann::json j = {{"name", "tokenizer_cli_speedup"}, {"params", p},
                          {"median", t_spm[t_spm.size() / 2] / t_rhine[t_rhine.size() / 2]}, {"unit", "x"},
                          {"runs", runs}};
      std::printf("%s\n", j.dump().c_str());
    } else {
      std::fprintf(stderr, "[bench_tokenizer] a command-line run failed\n");
      cli_equal = false;
    }
  } else {
    std::fprintf(stderr, "[bench_tokenizer] spm_encode is not on PATH: no command-line comparison\n");
  }
#endif
  if (fs::exists(tmp)) fs::remove_all(tmp);
  return mismatches == 0 && cli_equal ? 0 : 1;
}
