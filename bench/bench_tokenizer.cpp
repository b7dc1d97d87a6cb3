// Encode throughput of Rhine's SentencePiece encoder next to libsentencepiece on the same
// model and text, one thread and all threads, in one run (JSON Lines, see bench.h).
// Links libsentencepiece and therefore not LibTorch.
//
//   bench_tokenizer [--model M.model] [--text FILE] [--vocab 8000] [--type bpe|unigram] [--runs 7]
//
// Without --model it trains a SentencePiece model (byte fallback) on --text, by default the
// de/fr/nl/en sample in data/sample (train and held-out pages).
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <thread>

#include "bench.h"
#include "rhine/core/file.h"
#include "rhine/core/threads.h"
#include "rhine/tokenizer/tokenizer.h"

namespace fs = std::filesystem;

int main(int argc, char** argv) {
  std::string model, text_path, type = "bpe";
  int vocab = 8000, runs = 7;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--model") model = v;
    else if (k == "--text") text_path = v;
    else if (k == "--vocab") vocab = std::stoi(v);
    else if (k == "--type") type = v;
    else if (k == "--runs") runs = std::stoi(v);
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
  if (fs::exists(tmp)) fs::remove_all(tmp);
  return mismatches == 0 ? 0 : 1;
}
