// Data loader throughput: tokens/s of assembled batches, packed and windows,
// with and without the prefetch thread, on synthetic shards (4 languages,
// 8M tokens, documents of 50..2000 tokens). Prints JSON Lines (bench.h).
#include <ATen/ATen.h>
#include <unistd.h>

#include <filesystem>
#include <random>

#include "bench.h"
#include "rhine/data/loader.h"
#include "rhine/formats/token_shard.h"
#include "rhine/torch/runtime.h"

int main() {
  auto info = rhine::init_runtime({});
  namespace fs = std::filesystem;
  const auto dir = fs::temp_directory_path() / ("rhine_bench_loader_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  std::mt19937 gen(1);
  const std::vector<std::string> langs = {"de", "en", "fr", "nl"};
  for (std::size_t l = 0; l < langs.size(); ++l) {
    rhine::TokenShardMeta m;
    m.vocab_size = 32000;
    m.languages = {langs[l]};
    m.sources = {"synthetic"};
    rhine::TokenShardWriter w((dir / (langs[l] + ".tokens")).string(), m);
    std::uint64_t n = 0;
    while (n < 2'000'000) {
      std::vector<std::int32_t> doc(50 + gen() % 1950);
      for (auto& t : doc) t = static_cast<std::int32_t>(gen() % 32000);
      w.add(doc, 0, 0);
      n += doc.size();
    }
    w.finish();
  }
  for (auto mode : {rhine::DataLoaderOptions::Mode::packed, rhine::DataLoaderOptions::Mode::windows})
    for (int prefetch : {0, 2}) {
      rhine::DataLoaderOptions o;
      o.shards = {dir.string()};
      o.batch_size = 16;
      o.seq_len = 1024;
      o.mode = mode;
      o.prefetch = prefetch;
      o.eos_id = 2;
      o.mixture[0].second.temperature = 3;
      rhine::DataLoader loader(o);
      const int steps = 20;
      auto s = rhine::bench::time_runs([&] {
        for (int i = 0; i < steps; ++i) (void)loader.next();
      }, 7, 1);
      rhine::bench::report_rate("loader_tokens_per_s",
                                {{"mode", mode == rhine::DataLoaderOptions::Mode::packed ? "packed" : "windows"},
                                 {"prefetch", prefetch}, {"batch_size", o.batch_size}, {"seq_len", o.seq_len},
                                 {"threads", info.threads}},
                                s, double(steps) * o.batch_size * o.seq_len, "tokens/s");
    }
  fs::remove_all(dir);
  return 0;
}
