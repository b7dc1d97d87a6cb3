#include "rhine/data/loader.h"

#include <ATen/ATen.h>
#include <glob.h>
#include <spdlog/spdlog.h>
#include <xxhash.h>

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <exception>
#include <filesystem>
#include <map>
#include <mutex>
#include <thread>

#include "rhine/core/error.h"
#include "rhine/core/json.h"
#include "rhine/core/random.h"
#include "rhine/formats/token_shard.h"

namespace rhine {
namespace {

namespace fs = std::filesystem;

constexpr std::int64_t kIgnore = -100;

// Expands files, directories and glob patterns into a sorted list of shards.
std::vector<std::string> expand_shard_paths_impl(const std::vector<std::string>& specs) {
  std::vector<std::string> out;
  for (const auto& spec : specs) {
    std::error_code ec;
    if (fs::is_directory(spec, ec)) {
      for (const auto& e : fs::directory_iterator(spec))
        if (e.is_regular_file() && e.path().extension() == ".tokens") out.push_back(e.path().string());
    } else if (spec.find_first_of("*?[") != std::string::npos) {
      glob_t g{};
      if (::glob(spec.c_str(), 0, nullptr, &g) == 0)
        for (std::size_t i = 0; i < g.gl_pathc; ++i) out.emplace_back(g.gl_pathv[i]);
      ::globfree(&g);
    } else {
      RHINE_CHECK(fs::exists(spec, ec), "loader", "shard not found", spec,
                  "pass .tokens files, directories or glob patterns written by rhine-prepare");
      out.push_back(spec);
    }
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  RHINE_CHECK(!out.empty(), "loader", "no shards found", specs, "run rhine-prepare first, or fix the paths");
  return out;
}

std::uint64_t lang_stream_id(const std::string& lang) { return XXH3_64bits(lang.data(), lang.size()); }

// One language's documents as an infinite stream (see loader.h).
struct Stream {
  std::string lang;
  struct Doc {
    const TokenShard* shard;
    std::uint64_t first;   // first token in the shard
    std::uint32_t n;       // tokens in the shard
    std::uint32_t vlen;    // n + bos + eos
  };
  std::vector<Doc> docs;        // file order
  std::vector<std::uint64_t> file_prefix;  // prefix sums of vlen in file order (size docs+1)
  std::uint64_t total = 0;      // virtual tokens per epoch

  // Cursor (serialised).
  std::int64_t epoch = 0;
  std::uint64_t pos = 0;  // packed: stream position; windows: index into the window order

  // Caches derived from (seed, epoch).
  std::int64_t cached_epoch = -1;
  std::vector<std::uint32_t> order;          // packed: doc order of cached_epoch
  std::vector<std::uint64_t> order_prefix;   // prefix sums over `order`
  std::vector<std::uint64_t> window_order;   // windows: window order of cached_epoch
};

struct Generator {
  DataLoaderOptions opt;
  std::vector<std::shared_ptr<const TokenShard>> shards;
  std::vector<std::string> languages;
  std::vector<std::uint64_t> lang_tokens;
  std::vector<Stream> streams;
  std::vector<std::vector<double>> mix_probs;  // per mixture schedule entry
  Rng rng;
  std::int64_t step = 0;
  std::int64_t T = 0;

  std::uint64_t n_windows(const Stream& s) const { return (s.total - 1) / static_cast<std::uint64_t>(T); }

  // Builds the epoch's permutation for a stream (pure function of seed, language, epoch).
  void ensure_epoch(Stream& s, std::int64_t epoch) const {
    if (s.cached_epoch == epoch) return;
    Rng r(opt.seed ^ lang_stream_id(s.lang), static_cast<std::uint64_t>(epoch) + 1);
    if (opt.mode == DataLoaderOptions::Mode::packed) {
      s.order.resize(s.docs.size());
      for (std::size_t i = 0; i < s.order.size(); ++i) s.order[i] = static_cast<std::uint32_t>(i);
      for (std::size_t i = s.order.size(); i > 1; --i) std::swap(s.order[i - 1], s.order[r.below(i)]);
      s.order_prefix.assign(s.docs.size() + 1, 0);
      for (std::size_t i = 0; i < s.order.size(); ++i)
        s.order_prefix[i + 1] = s.order_prefix[i] + s.docs[s.order[i]].vlen;
    } else {
      s.window_order.resize(n_windows(s));
      for (std::size_t i = 0; i < s.window_order.size(); ++i) s.window_order[i] = i;
      for (std::size_t i = s.window_order.size(); i > 1; --i)
        std::swap(s.window_order[i - 1], s.window_order[r.below(i)]);
    }
    s.cached_epoch = epoch;
  }

  // Token `off` of a document's virtual sequence [bos] tokens [eos].
  std::int64_t virtual_token(const Stream::Doc& d, std::uint32_t off) const {
    if (opt.bos_id) {
      if (off == 0) return *opt.bos_id;
      --off;
    }
    if (off < d.n) return d.shard->token(d.first + off);
    return *opt.eos_id;
  }

  // Fills T + 1 tokens starting at stream position `pos` of `epoch`, walking
  // into following epochs when needed. doc[] gets a number that changes at
  // every document start.
  void fill(Stream& s, std::int64_t epoch, std::uint64_t pos, std::int64_t* tok, std::int64_t* doc) {
    const bool packed = opt.mode == DataLoaderOptions::Mode::packed;
    std::int64_t doc_counter = 0;
    std::int64_t n = 0;
    while (n < T + 1) {
      if (pos >= s.total) {  // only packed rows cross into the next epoch
        pos -= s.total;
        ++epoch;
      }
      if (packed) ensure_epoch(s, epoch);
      const auto& prefix = packed ? s.order_prefix : s.file_prefix;
      // The document containing `pos`: last i with prefix[i] <= pos.
      std::size_t i = static_cast<std::size_t>(std::upper_bound(prefix.begin(), prefix.end(), pos) - prefix.begin()) - 1;
      const Stream::Doc& d = s.docs[packed ? s.order[i] : i];
      std::uint32_t off = static_cast<std::uint32_t>(pos - prefix[i]);
      if (n > 0 && off == 0) ++doc_counter;
      for (; off < d.vlen && n < T + 1; ++off, ++n, ++pos) {
        tok[n] = virtual_token(d, off);
        doc[n] = doc_counter;
      }
    }
  }

  int draw_language(std::int64_t at_step) {
    const auto& p = mix_probs[mixture_index(at_step)];
    double u = rng.uniform(), acc = 0;
    int last = 0;
    for (std::size_t l = 0; l < p.size(); ++l) {
      if (p[l] <= 0) continue;
      acc += p[l];
      last = static_cast<int>(l);
      if (u < acc) return last;
    }
    return last;  // rounding: u just below 1
  }

  std::size_t mixture_index(std::int64_t at_step) const {
    std::size_t k = 0;
    for (std::size_t i = 0; i < opt.mixture.size(); ++i)
      if (opt.mixture[i].first <= at_step) k = i;
    return k;
  }

  Batch make_batch() {
    const std::int64_t B = opt.batch_size, b = B / opt.world_size;
    const std::int64_t lo = opt.rank * b, hi = lo + b;
    auto tokens = at::empty({b, T + 1}, at::kLong);
    auto docs = at::empty({b, T + 1}, at::kLong);
    Batch batch;
    batch.step = step;
    batch.tokens_per_language.assign(languages.size(), 0);
    for (std::int64_t g = 0; g < B; ++g) {
      const int l = draw_language(step);
      Stream& s = streams[l];
      if (g >= lo && g < hi) {
        const std::int64_t row = g - lo;
        std::uint64_t start;
        if (opt.mode == DataLoaderOptions::Mode::packed) {
          start = s.pos;
        } else {
          ensure_epoch(s, s.epoch);
          start = s.window_order[s.pos] * static_cast<std::uint64_t>(T);
        }
        fill(s, s.epoch, start, tokens[row].data_ptr<std::int64_t>(), docs[row].data_ptr<std::int64_t>());
        batch.row_language.push_back(l);
        batch.tokens_per_language[l] += T;
      }
      // Advance the cursor (for rows of other ranks too).
      if (opt.mode == DataLoaderOptions::Mode::packed) {
        s.pos += static_cast<std::uint64_t>(T);
        while (s.pos >= s.total) s.pos -= s.total, ++s.epoch;
      } else if (++s.pos == n_windows(s)) {
        s.pos = 0;
        ++s.epoch;
      }
    }
    using at::indexing::Slice;
    batch.input_ids = tokens.index({Slice(), Slice(0, T)}).contiguous();
    batch.labels = tokens.index({Slice(), Slice(1, T + 1)}).clone();
    auto doc_in = docs.index({Slice(), Slice(0, T)});
    auto doc_next = docs.index({Slice(), Slice(1, T + 1)});
    batch.labels.masked_fill_(doc_in != doc_next, kIgnore);
    batch.doc_ids = doc_in.contiguous();
    // position = index - index of the first token of its document in the row.
    auto idx = at::arange(T, at::kLong).expand({b, T});
    auto starts = at::ones({b, T}, at::kBool);
    if (T > 1)
      starts.index_put_({Slice(), Slice(1, T)},
                        doc_in.index({Slice(), Slice(1, T)}) != doc_in.index({Slice(), Slice(0, T - 1)}));
    auto start_idx = at::where(starts, idx, at::zeros_like(idx));
    batch.position_ids = idx - std::get<0>(at::cummax(start_idx, 1));
    if (opt.goldfish.k > 0) apply_goldfish(batch.input_ids, batch.labels, opt.goldfish);
    ++step;
    return batch;
  }

  std::string fingerprint() const {
    Json j = {{"mode", opt.mode == DataLoaderOptions::Mode::packed ? "packed" : "windows"},
              {"seq_len", opt.seq_len},
              {"batch_size", opt.batch_size},
              {"seed", std::to_string(opt.seed)},
              {"bos", opt.bos_id ? *opt.bos_id : -1},
              {"eos", opt.eos_id ? *opt.eos_id : -1},
              {"languages", languages},
              {"tokens", lang_tokens}};
    return j.dump();
  }

  std::string state_json() const {
    Json streams_j = Json::object();
    for (const auto& s : streams)
      streams_j[s.lang] = {{"epoch", s.epoch}, {"pos", std::to_string(s.pos)}};
    Json rng_j = Json::array();
    for (auto w : rng.state()) rng_j.push_back(std::to_string(w));
    return Json{{"format", "rhine.loader"}, {"version", 1},       {"step", step},
                {"rng", rng_j},             {"streams", streams_j}, {"fingerprint", fingerprint()}}
        .dump();
  }

  void load_state_json(const std::string& text) {
    Json j = parse_json(text, "loader", "loader state");
    JsonFields f(j, "loader");
    RHINE_CHECK(f.require<std::string>("format") == "rhine.loader" && f.require<int>("version") == 1,
                "loader", "not a loader state of this version", Verbatim{text.substr(0, 80)},
                "pass the string DataLoader::state() returned");
    const auto fp = f.require<std::string>("fingerprint");
    RHINE_CHECK(fp == fingerprint(), "loader", "the state was saved with other data or options",
                Verbatim{fp}, "resume with the same shards, seq_len, batch_size, seed, mode and bos/eos as "
                "the saved run (expected " + fingerprint() + ")");
    const auto rng_s = f.require<std::vector<std::string>>("rng");
    RHINE_CHECK(rng_s.size() == 4, "loader", "rng state must have 4 words", rng_s.size(), "");
    Rng::State st;
    for (int i = 0; i < 4; ++i) st[i] = std::stoull(rng_s[i]);
    const auto* streams_j = f.raw("streams");
    const auto new_step = f.require<std::int64_t>("step");
    f.reject_unknown();
    for (auto& s : streams) {
      RHINE_CHECK(streams_j && streams_j->contains(s.lang), "loader", "state lacks a language", s.lang, "");
      JsonFields sf(streams_j->at(s.lang), "loader");
      s.epoch = sf.require<std::int64_t>("epoch");
      s.pos = std::stoull(sf.require<std::string>("pos"));
      sf.reject_unknown();
    }
    rng.set_state(st);
    step = new_step;
  }
};

}  // namespace

// ---------------------------------------------------------------------------
struct DataLoader::Impl {
  Generator gen;  // owned by the producer thread while it runs
  std::string consumed_state;

  struct Item {
    Batch batch;
    std::string state_after;
    std::exception_ptr error;
  };
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Item> queue;
  bool stop = false;
  std::thread worker;

  Item produce() {
    Item it;
    try {
      it.batch = gen.make_batch();
      it.state_after = gen.state_json();
    } catch (...) {
      it.error = std::current_exception();
    }
    return it;
  }

  void start() {
    if (gen.opt.prefetch <= 0) return;
    stop = false;
    worker = std::thread([this] {
      for (;;) {
        {
          std::unique_lock<std::mutex> lock(mu);
          cv.wait(lock, [&] { return stop || static_cast<int>(queue.size()) < gen.opt.prefetch; });
          if (stop) return;
        }
        Item it = produce();
        const bool failed = static_cast<bool>(it.error);
        {
          std::lock_guard<std::mutex> lock(mu);
          queue.push_back(std::move(it));
        }
        cv.notify_all();
        if (failed) return;
      }
    });
  }

  void halt() {
    {
      std::lock_guard<std::mutex> lock(mu);
      stop = true;
    }
    cv.notify_all();
    if (worker.joinable()) worker.join();
    queue.clear();
  }
};

DataLoader::DataLoader(DataLoaderOptions options) : impl_(new Impl) {
  auto& g = impl_->gen;
  g.opt = std::move(options);
  const auto& o = g.opt;
  RHINE_CHECK(o.seq_len > 0, "loader", "seq_len must be positive", o.seq_len, "");
  RHINE_CHECK(o.world_size > 0 && o.rank >= 0 && o.rank < o.world_size, "loader",
              "rank must be in [0, world_size)", (std::vector<int>{o.rank, o.world_size}), "");
  RHINE_CHECK(o.batch_size > 0 && o.batch_size % o.world_size == 0, "loader",
              "batch_size (global rows) must be a positive multiple of world_size",
              (std::vector<std::int64_t>{o.batch_size, o.world_size}), "each rank gets batch_size / world_size rows");
  RHINE_CHECK(!o.mixture.empty() && o.mixture.front().first == 0, "loader",
              "the mixture schedule must start at step 0",
              o.mixture.empty() ? std::int64_t{-1} : o.mixture.front().first, "");
  for (std::size_t i = 1; i < o.mixture.size(); ++i)
    RHINE_CHECK(o.mixture[i].first > o.mixture[i - 1].first, "loader",
                "mixture schedule steps must increase", o.mixture[i].first, "");
  RHINE_CHECK(o.goldfish.k >= 0 && o.goldfish.h > 0, "loader", "goldfish needs k >= 0 and h > 0",
              (std::vector<int>{o.goldfish.k, o.goldfish.h}), "k = 0 turns it off");
  g.T = o.seq_len;

  // Open shards and group documents by language.
  std::map<std::string, Stream> by_lang;
  std::uint32_t vocab = 0;
  for (const auto& path : expand_shard_paths_impl(o.shards)) {
    auto shard = TokenShard::open(path, o.verify);
    vocab = std::max(vocab, shard->meta().vocab_size);
    for (const auto& d : shard->docs()) {
      const auto& lang = shard->meta().languages[d.lang];
      const std::uint32_t vlen = d.n_tokens + (o.bos_id ? 1u : 0u) + (o.eos_id ? 1u : 0u);
      if (vlen == 0) continue;
      auto& s = by_lang[lang];
      s.lang = lang;
      s.docs.push_back({shard.get(), d.first_token, d.n_tokens, vlen});
    }
    g.shards.push_back(std::move(shard));
  }
  for (auto id : {o.bos_id, o.eos_id})
    if (id)
      RHINE_CHECK(*id >= 0 && static_cast<std::uint32_t>(*id) < vocab, "loader",
                  "bos/eos id outside the shards' vocabulary", *id, "vocab_size is " + std::to_string(vocab));
  for (auto& [lang, s] : by_lang) {
    s.file_prefix.assign(s.docs.size() + 1, 0);
    for (std::size_t i = 0; i < s.docs.size(); ++i) s.file_prefix[i + 1] = s.file_prefix[i] + s.docs[i].vlen;
    s.total = s.file_prefix.back();
    RHINE_CHECK(s.total > static_cast<std::uint64_t>(o.seq_len), "loader",
                "language " + lang + " has fewer tokens than one row (seq_len + 1)", s.total,
                "add data for it, lower seq_len, or leave its shards out");
    g.languages.push_back(lang);
    g.lang_tokens.push_back(s.total);
    g.streams.push_back(std::move(s));
  }
  RHINE_CHECK(!g.streams.empty(), "loader", "the shards hold no tokens", o.shards, "run rhine-prepare on non-empty text");

  std::map<std::string, std::uint64_t> sizes;
  for (std::size_t l = 0; l < g.languages.size(); ++l) sizes[g.languages[l]] = g.lang_tokens[l];
  for (const auto& [first, mix] : o.mixture) {
    auto p = mixture_probabilities(mix, sizes);
    std::vector<double> v;
    for (const auto& lang : g.languages) v.push_back(p[lang]);
    g.mix_probs.push_back(std::move(v));
  }
  g.rng = Rng(o.seed, 0x6d6978 /* "mix" */);
  impl_->consumed_state = g.state_json();
  std::string summary;
  for (std::size_t l = 0; l < g.languages.size(); ++l)
    summary += " " + g.languages[l] + "=" + std::to_string(g.lang_tokens[l]);
  spdlog::debug("[loader] {} shards, tokens per language:{}", g.shards.size(), summary);
  impl_->start();
}

DataLoader::~DataLoader() { impl_->halt(); }

Batch DataLoader::next() {
  auto& s = *impl_;
  if (s.gen.opt.prefetch <= 0) {
    auto it = s.produce();
    if (it.error) std::rethrow_exception(it.error);
    s.consumed_state = std::move(it.state_after);
    return std::move(it.batch);
  }
  Impl::Item it;
  {
    std::unique_lock<std::mutex> lock(s.mu);
    s.cv.wait(lock, [&] { return !s.queue.empty(); });
    it = std::move(s.queue.front());
    s.queue.pop_front();
  }
  s.cv.notify_all();
  if (it.error) std::rethrow_exception(it.error);
  s.consumed_state = std::move(it.state_after);
  return std::move(it.batch);
}

const std::vector<std::string>& DataLoader::languages() const { return impl_->gen.languages; }
const std::vector<std::uint64_t>& DataLoader::tokens_per_language() const { return impl_->gen.lang_tokens; }

std::vector<double> DataLoader::probabilities(std::int64_t step) const {
  return impl_->gen.mix_probs[impl_->gen.mixture_index(step)];
}

std::string DataLoader::state() const { return impl_->consumed_state; }

void DataLoader::load_state(const std::string& state) {
  impl_->halt();
  impl_->gen.load_state_json(state);
  impl_->consumed_state = impl_->gen.state_json();
  impl_->start();
}

at::Tensor document_causal_mask(const at::Tensor& doc_ids) {
  RHINE_CHECK(doc_ids.dim() == 2, "loader", "doc_ids must be [b, T]", doc_ids.sizes().vec(), "");
  const auto T = doc_ids.size(1);
  auto same = doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1);  // [b, T, T]
  auto causal = at::ones({T, T}, doc_ids.options().dtype(at::kBool)).tril();
  return (same & causal).unsqueeze(1);  // [b, 1, T, T]
}

void apply_goldfish(const at::Tensor& input_ids, at::Tensor& labels, const GoldfishOptions& o) {
  if (o.k <= 0) return;
  RHINE_CHECK(input_ids.dim() == 2 && labels.sizes() == input_ids.sizes() &&
                  input_ids.scalar_type() == at::kLong && labels.scalar_type() == at::kLong,
              "goldfish", "input_ids and labels must be int64 [b, T] of equal shape", labels.sizes().vec(), "");
  auto in = input_ids.contiguous();
  const auto b = in.size(0), T = in.size(1);
  const std::int64_t* x = in.data_ptr<std::int64_t>();
  auto lab = labels.accessor<std::int64_t, 2>();
  std::vector<std::uint32_t> ctx(static_cast<std::size_t>(o.h));
  for (std::int64_t r = 0; r < b; ++r)
    for (std::int64_t i = o.h - 1; i < T; ++i) {
      // Context: the h tokens ending at position i (they predict label i).
      for (int j = 0; j < o.h; ++j) ctx[j] = static_cast<std::uint32_t>(x[r * T + i - o.h + 1 + j]);
      if (XXH64(ctx.data(), ctx.size() * sizeof(std::uint32_t), o.seed) % static_cast<std::uint64_t>(o.k) == 0)
        lab[r][i] = kIgnore;
    }
}

std::vector<std::string> expand_shard_paths(const std::vector<std::string>& specs) {
  return expand_shard_paths_impl(specs);
}

}  // namespace rhine
