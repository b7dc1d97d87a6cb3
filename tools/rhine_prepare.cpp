// rhine-prepare: text -> token shards (torch-free).
//
//   rhine-prepare --tokenizer tok.model --out shards/ de=data/sample/de.txt fr=data/sample/fr.txt
//   rhine-prepare --tokenizer tok.model --out shards/ corpus/train/*.jsonl
//   rhine-prepare --verify shards/
//
// Inputs: LANG=PATH or PATH, where PATH is a file, a directory (its .txt and
// .jsonl files) or a glob. `.txt`: documents separated by blank lines (or one
// document per file with --doc-per-file). `.jsonl`: one document per line with
// a text field and optional lang, source and licence (or license) fields
// (others are ignored). The source recorded per document is the JSONL source,
// else the input file's name; manifest.json lists per source its documents,
// tokens and the licences its records named. The language of a document comes
// from the JSONL field, else LANG=, else --lang.
//
// Invalid UTF-8 is repaired (each bad byte becomes U+FFFD) and counted.
// Output: OUT/<lang>-NNNNN.tokens (see rhine/formats/token_shard.h), at most
// --shard-tokens tokens each, and OUT/manifest.json. Shards are written through
// temporary files and renamed when complete; a run that is killed leaves only
// complete shards and no manifest. Running again restarts cleanly: stale
// temporary files are removed and the shards are written anew.
//
// Three stages run at once, connected by bounded queues, so that the cores do
// not idle while files are read or shards written:
//   read   (a thread)       streams the input files line by line, splits them
//                           into documents, repairs UTF-8, and groups the
//                           documents into batches of --batch-docs;
//   encode (the main thread) tokenizes batch i on --threads threads;
//   write  (a thread)       appends the ids of batch i-1 to the shards, keeps
//                           the counts and draws the progress bar.
// Batches keep their order, so the shards and the manifest are the same bytes
// as when the stages run one after the other. Each queue holds one batch, so
// at most five batches exist at once (one per stage, one per queue). An error
// in any stage stops the other two and is reported by main.
#include <CLI/CLI.hpp>
#include <glob.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "rhine/core/error.h"
#include "rhine/core/file.h"
#include "rhine/core/json.h"
#include "rhine/core/log.h"
#include "rhine/core/threads.h"
#include "rhine/formats/token_shard.h"
#include "rhine/tokenizer/tokenizer.h"

namespace fs = std::filesystem;

namespace {

struct Options {
  std::string tokenizer, out, default_lang, text_field = "text", lang_field = "lang";
  std::vector<std::string> inputs;
  std::uint64_t shard_tokens = 100'000'000;
  std::size_t batch_docs = 2048;
  std::size_t batch_bytes = 64u << 20;  // a batch also ends at this much text (bounds memory)
  int threads = 0;
  bool doc_per_file = false;
  bool quiet = false;
};

struct Document {
  std::string text, lang;
  std::string source;   // JSONL source field, else the input file's name
  std::string licence;  // JSONL licence (or license) field, else ""
};

// Length (1..4) of the valid UTF-8 sequence at p[i], or 0 when the byte at i
// starts none: truncated or stray continuation bytes, overlong forms,
// surrogates and values above U+10FFFF are invalid.
std::size_t utf8_sequence(const unsigned char* p, std::size_t i, std::size_t n) {
  const unsigned char c = p[i];
  const std::size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
  if (len <= 1) return len;
  if (i + len > n) return 0;
  for (std::size_t k = 1; k < len; ++k)
    if ((p[i + k] & 0xc0) != 0x80) return 0;
  std::uint32_t cp = c & (0x7f >> len);
  for (std::size_t k = 1; k < len; ++k) cp = (cp << 6) | (p[i + k] & 0x3f);
  const bool ok = !(len == 2 && cp < 0x80) && !(len == 3 && cp < 0x800) && !(len == 4 && cp < 0x10000) &&
                  !(cp >= 0xd800 && cp <= 0xdfff) && cp <= 0x10ffff;
  return ok ? len : 0;
}

// Replaces invalid UTF-8 sequences by U+FFFD (one per bad byte); returns the
// number replaced. Valid text, the common case, is only scanned, not copied.
std::size_t repair_utf8(std::string& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const std::size_t n = s.size();
  std::size_t i = 0;
  while (i < n) {
    std::uint64_t word;  // eight ASCII bytes at a time
    if (i + 8 <= n && (std::memcpy(&word, p + i, 8), (word & 0x8080808080808080ull) == 0)) {
      i += 8;
      continue;
    }
    const std::size_t len = utf8_sequence(p, i, n);
    if (len == 0) break;
    i += len;
  }
  if (i == n) return 0;
  std::size_t bad = 0;
  std::string out(s, 0, i);
  out.reserve(n + 16);
  while (i < n) {
    const std::size_t len = utf8_sequence(p, i, n);
    if (len > 0) {
      out.append(s, i, len);
      i += len;
    } else {
      out += "\xef\xbf\xbd";
      ++bad;
      ++i;
    }
  }
  s.swap(out);
  return bad;
}

// Expands one input spec into (language, file) pairs.
std::vector<std::pair<std::string, std::string>> expand_input(const std::string& spec) {
  std::string lang, path = spec;
  if (auto eq = spec.find('='); eq != std::string::npos && eq > 0 && spec.find('/') > eq) {
    lang = spec.substr(0, eq);
    path = spec.substr(eq + 1);
  }
  std::vector<std::string> files;
  std::error_code ec;
  if (fs::is_directory(path, ec)) {
    for (const auto& e : fs::directory_iterator(path)) {
      auto ext = e.path().extension();
      if (e.is_regular_file() && (ext == ".txt" || ext == ".jsonl")) files.push_back(e.path().string());
    }
  } else if (path.find_first_of("*?[") != std::string::npos) {
    glob_t g{};
    if (::glob(path.c_str(), 0, nullptr, &g) == 0)
      for (std::size_t i = 0; i < g.gl_pathc; ++i) files.emplace_back(g.gl_pathv[i]);
    ::globfree(&g);
  } else {
    RHINE_CHECK(fs::is_regular_file(path, ec), "rhine-prepare", "input not found", path,
                "pass LANG=FILE, a directory or a glob");
    files.push_back(path);
  }
  RHINE_CHECK(!files.empty(), "rhine-prepare", "input matched no .txt or .jsonl file", spec, "");
  std::sort(files.begin(), files.end());
  std::vector<std::pair<std::string, std::string>> out;
  for (auto& f : files) out.emplace_back(lang, f);
  return out;
}

// Hands out the lines of a file (without their '\n'), reading it in blocks so
// that files larger than memory stream through.
class LineReader {
 public:
  explicit LineReader(const std::string& path) : path_(path), f_(std::fopen(path.c_str(), "rbe")) {
    RHINE_CHECK(f_ != nullptr, "rhine-prepare", "cannot open input file", path,
                std::string(std::strerror(errno)) + "; check the path and its permissions");
  }
  ~LineReader() {
    std::fclose(f_);
    std::free(buf_);
  }
  LineReader(const LineReader&) = delete;
  LineReader& operator=(const LineReader&) = delete;

  /// The next line, valid until the next call; false at the end of the file.
  bool next(std::string_view& line) {
    errno = 0;
    const ssize_t n = ::getline(&buf_, &cap_, f_);
    if (n < 0) {
      RHINE_CHECK(!std::ferror(f_), "rhine-prepare", "read error", path_, std::strerror(errno));
      return false;
    }
    offset_ += static_cast<std::uint64_t>(n);
    line = std::string_view(buf_, static_cast<std::size_t>(n));
    if (!line.empty() && line.back() == '\n') line.remove_suffix(1);
    return true;
  }
  /// Bytes of the file handed out so far.
  std::uint64_t offset() const { return offset_; }

 private:
  std::string path_;
  std::FILE* f_;
  char* buf_ = nullptr;
  std::size_t cap_ = 0;
  std::uint64_t offset_ = 0;
};

struct ReadCounts {
  std::size_t repaired = 0;  // invalid UTF-8 bytes replaced
  std::size_t skipped = 0;   // JSONL records without text or with broken JSON
};

// Streams the documents of one file to `emit(doc, bytes)`, where `bytes` is how
// far into the file reading has got. Stops early (returning false) when emit
// returns false.
bool read_documents(const std::string& lang, const std::string& path, const Options& o, ReadCounts& counts,
                    const std::function<bool(Document&&, std::uint64_t)>& emit) {
  const std::string file_name = fs::path(path).filename().string();
  auto make = [&](std::string t, std::string l, std::string source = {}, std::string licence = {}) {
    counts.repaired += repair_utf8(t);
    repair_utf8(source);
    repair_utf8(licence);
    if (l.empty()) l = lang.empty() ? o.default_lang : lang;
    RHINE_CHECK(!l.empty(), "rhine-prepare", "document without a language", path,
                "give LANG=PATH, a JSONL lang field, or --lang");
    return Document{std::move(t), std::move(l), source.empty() ? file_name : std::move(source), std::move(licence)};
  };
  if (fs::path(path).extension() == ".jsonl") {
    LineReader in(path);
    for (std::string_view line; in.next(line);) {
      if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
      rhine::Json j;
      try {
        j = rhine::Json::parse(line);
      } catch (const rhine::Json::exception&) {
        ++counts.skipped;  // a broken line is skipped and counted, never fatal
        continue;
      }
      if (!j.is_object() || !j.contains(o.text_field) || !j[o.text_field].is_string()) {
        ++counts.skipped;
        continue;
      }
      auto field = [&](const char* key) {
        return j.contains(key) && j[key].is_string() ? j[key].get<std::string>() : std::string();
      };
      std::string licence = field("licence");
      if (licence.empty()) licence = field("license");
      std::string text = j[o.text_field].get<std::string>();
      if (text.empty()) continue;
      if (!emit(make(std::move(text), field(o.lang_field.c_str()), field("source"), licence), in.offset()))
        return false;
    }
  } else if (o.doc_per_file) {
    std::string text = rhine::read_file(path, "rhine-prepare");
    const std::uint64_t size = text.size();
    if (!text.empty() && !emit(make(std::move(text), ""), size)) return false;
  } else {
    // Blank-line separated documents.
    LineReader in(path);
    std::string doc;
    for (std::string_view line; in.next(line);) {
      if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
      if (line.find_first_not_of(" \t") != std::string_view::npos) {
        if (!doc.empty()) doc += '\n';
        doc += line;
      } else if (!doc.empty()) {
        if (!emit(make(std::move(doc), ""), in.offset())) return false;
        doc.clear();
      }
    }
    if (!doc.empty() && !emit(make(std::move(doc), ""), in.offset())) return false;
  }
  return true;
}

// A bounded FIFO between two pipeline stages (one producer, one consumer).
template <class T>
class Channel {
 public:
  explicit Channel(std::size_t capacity) : capacity_(capacity) {}

  /// Blocks while full; false when the channel was cancelled (the item is dropped).
  bool push(T item) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return cancelled_ || items_.size() < capacity_; });
    if (cancelled_) return false;
    items_.push_back(std::move(item));
    cv_.notify_all();
    return true;
  }
  /// Blocks while empty; false once closed and drained, or cancelled.
  bool pop(T& item) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return cancelled_ || closed_ || !items_.empty(); });
    if (cancelled_ || items_.empty()) return false;
    item = std::move(items_.front());
    items_.pop_front();
    cv_.notify_all();
    return true;
  }
  /// The producer is done: pop drains what is queued, then returns false.
  void close() {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
    cv_.notify_all();
  }
  /// Stops both ends now (after an error): push and pop return false.
  void cancel() {
    std::lock_guard<std::mutex> lock(mu_);
    cancelled_ = true;
    items_.clear();
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<T> items_;
  std::size_t capacity_;
  bool closed_ = false, cancelled_ = false;
};

// Documents on their way through the pipeline, in input order.
struct Batch {
  std::vector<std::string> texts;               // [n], released once encoded
  std::vector<Document> docs;                   // [n] lang, source, licence (text moved to texts)
  std::vector<std::vector<std::int32_t>> ids;   // [n][tokens], filled by the encode stage
  std::uint64_t input_bytes = 0;                // input read up to the end of this batch (progress)
};

// Shards of one language, rotated at --shard-tokens.
struct LangOutput {
  std::unique_ptr<rhine::TokenShardWriter> writer;
  int index = 0;
  std::uint64_t tokens = 0, docs = 0;
};

std::string shard_name(const std::string& lang, int index) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "-%05d.tokens", index);
  return lang + buf;
}

// Prints every document of every shard: "lang<TAB>source<TAB>id id id".
int dump(const std::string& dir) {
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".tokens") files.push_back(e.path().string());
  std::sort(files.begin(), files.end());
  for (const auto& f : files) {
    auto s = rhine::TokenShard::open(f, /*verify_tokens=*/true);
    for (const auto& d : s->docs()) {
      std::string line = s->meta().languages[d.lang] + "\t" + s->meta().sources[d.source] + "\t";
      for (std::uint32_t i = 0; i < d.n_tokens; ++i)
        line += (i ? " " : "") + std::to_string(s->token(d.first_token + i));
      std::puts(line.c_str());
    }
  }
  return 0;
}

int verify(const std::string& dir) {
  std::uint64_t tokens = 0, docs = 0, n = 0;
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".tokens") files.push_back(e.path().string());
  std::sort(files.begin(), files.end());
  RHINE_CHECK(!files.empty(), "rhine-prepare", "no .tokens files to verify", dir, "");
  for (const auto& f : files) {
    auto s = rhine::TokenShard::open(f, /*verify_tokens=*/true);
    std::printf("%s: %llu docs, %llu tokens, vocab %u, languages", f.c_str(),
                static_cast<unsigned long long>(s->n_docs()), static_cast<unsigned long long>(s->n_tokens()),
                s->meta().vocab_size);
    for (const auto& l : s->meta().languages) std::printf(" %s", l.c_str());
    std::printf("\n");
    tokens += s->n_tokens();
    docs += s->n_docs();
    ++n;
  }
  std::printf("ok: %llu shards, %llu docs, %llu tokens\n", static_cast<unsigned long long>(n),
              static_cast<unsigned long long>(docs), static_cast<unsigned long long>(tokens));
  return 0;
}

int prepare(const Options& o) {
  auto tok = rhine::Tokenizer::load(o.tokenizer);
  const int threads = o.threads > 0 ? o.threads : rhine::default_thread_count();
  fs::create_directories(o.out);
  for (const auto& e : fs::directory_iterator(o.out)) {  // restart cleanly
    const auto name = e.path().filename().string();
    if (name.find(".partial.") != std::string::npos || name == "manifest.json") fs::remove(e.path());
  }

  std::vector<std::pair<std::string, std::string>> files;
  std::uint64_t total_bytes = 0;
  for (const auto& spec : o.inputs)
    for (auto& f : expand_input(spec)) {
      total_bytes += fs::file_size(f.second);
      files.push_back(std::move(f));
    }

  // Owned by the write stage while the pipeline runs (read by main after it ends).
  std::map<std::string, LangOutput> outs;
  std::size_t n_docs = 0;
  std::uint64_t done_bytes = 0;
  const auto t0 = std::chrono::steady_clock::now();
  auto last_print = t0;
  auto progress = [&](bool final) {
    if (o.quiet) return;
    auto now = std::chrono::steady_clock::now();
    if (!final && now - last_print < std::chrono::milliseconds(500)) return;
    last_print = now;
    const double s = std::max(1e-9, std::chrono::duration<double>(now - t0).count());
    const std::uint64_t done = std::min(done_bytes, total_bytes);  // a file may grow while read
    const double mbs = done / s / 1e6;
    const double eta = mbs > 0 ? (total_bytes - done) / 1e6 / mbs : 0;
    const double frac = total_bytes ? double(done) / total_bytes : 1;
    const int w = 30, filled = static_cast<int>(frac * w);
    std::fprintf(stderr, "\r[%.*s%*s] %5.1f%%  %zu docs  %.0f docs/s  %.2f MB/s  ETA %.0fs   ", filled,
                 "##############################", w - filled, "", 100 * frac, n_docs, n_docs / s, mbs, eta);
    if (final) std::fprintf(stderr, "\n");
  };

  // Per source: documents, tokens and the licence records named (manifest.json).
  struct SourceInfo {
    std::uint64_t docs = 0, tokens = 0;
    std::set<std::string> licences;
  };
  std::map<std::string, SourceInfo> source_info;
  auto writer_for = [&](const std::string& lang, const std::string& source) -> std::pair<LangOutput*, std::uint16_t> {
    auto& lo = outs[lang];
    if (!lo.writer || lo.writer->n_tokens() >= o.shard_tokens) {
      if (lo.writer) lo.writer->finish(), ++lo.index;
      rhine::TokenShardMeta m;
      m.vocab_size = static_cast<std::uint32_t>(tok.vocab_size());
      m.tokenizer = fs::path(o.tokenizer).filename().string();
      m.languages = {lang};
      lo.writer = std::make_unique<rhine::TokenShardWriter>((fs::path(o.out) / shard_name(lang, lo.index)).string(), m);
    }
    return {&lo, lo.writer->source_id(source)};
  };

  // The three stages (see the top of the file). The first error stops all of them.
  ReadCounts counts;  // owned by the read stage
  Channel<Batch> to_encode(1), to_write(1);
  std::mutex error_mu;
  std::exception_ptr error;
  auto fail = [&](std::exception_ptr e) {
    {
      std::lock_guard<std::mutex> lock(error_mu);
      if (!error) error = e;
    }
    to_encode.cancel();
    to_write.cancel();
  };

  auto read_stage = [&] {
    try {
      Batch batch;
      std::size_t text_bytes = 0;
      std::uint64_t files_bytes = 0;  // of the files read completely
      auto send = [&](std::uint64_t input_bytes) {
        batch.input_bytes = input_bytes;
        text_bytes = 0;
        return to_encode.push(std::exchange(batch, Batch()));
      };
      for (const auto& [lang, path] : files) {
        const bool more = read_documents(lang, path, o, counts, [&](Document&& d, std::uint64_t offset) {
          text_bytes += d.text.size();
          batch.texts.push_back(std::move(d.text));
          batch.docs.push_back(std::move(d));
          if (batch.texts.size() < o.batch_docs && text_bytes < o.batch_bytes) return true;
          return send(files_bytes + offset);
        });
        if (!more) return;  // cancelled
        files_bytes += fs::file_size(path);
      }
      if (!batch.texts.empty() && !send(files_bytes)) return;
      to_encode.close();
    } catch (...) {
      fail(std::current_exception());
    }
  };

  auto write_stage = [&] {
    try {
      for (Batch b; to_write.pop(b);) {
        for (std::size_t i = 0; i < b.docs.size(); ++i) {
          const Document& d = b.docs[i];
          const auto& ids = b.ids[i];
          auto [lo, src] = writer_for(d.lang, d.source);
          lo->writer->add(ids, 0, src);
          auto& si = source_info[d.source];
          ++si.docs;
          si.tokens += ids.size();
          if (!d.licence.empty()) si.licences.insert(d.licence);
          lo->tokens += ids.size();
          ++lo->docs;
          ++n_docs;
        }
        done_bytes = b.input_bytes;
        progress(false);
      }
    } catch (...) {
      fail(std::current_exception());
    }
  };

  std::thread reader, writer;
  try {
    reader = std::thread(read_stage);
    writer = std::thread(write_stage);
    for (Batch b; to_encode.pop(b);) {  // the encode stage
      b.ids = tok.encode_batch(b.texts, {}, threads);
      std::vector<std::string>().swap(b.texts);
      if (!to_write.push(std::move(b))) break;
    }
    to_write.close();
  } catch (...) {
    fail(std::current_exception());
  }
  if (reader.joinable()) reader.join();
  if (writer.joinable()) writer.join();
  if (error) std::rethrow_exception(error);
  const std::size_t repaired = counts.repaired, skipped = counts.skipped;
  done_bytes = total_bytes;
  progress(true);

  rhine::Json manifest = {{"tokenizer", o.tokenizer}, {"vocab_size", tok.vocab_size()}, {"languages", rhine::Json::object()},
                          {"repaired_utf8_bytes", repaired}, {"skipped_records", skipped}};
  for (auto& [lang, lo] : outs) {
    if (lo.writer) lo.writer->finish();
    manifest["languages"][lang] = {{"docs", lo.docs}, {"tokens", lo.tokens}, {"shards", lo.index + 1}};
    std::printf("%s: %llu docs, %llu tokens, %d shard(s)\n", lang.c_str(), static_cast<unsigned long long>(lo.docs),
                static_cast<unsigned long long>(lo.tokens), lo.index + 1);
  }
  manifest["sources"] = rhine::Json::object();
  for (const auto& [name, si] : source_info)
    manifest["sources"][name] = {{"docs", si.docs}, {"tokens", si.tokens},
                                 {"licences", std::vector<std::string>(si.licences.begin(), si.licences.end())}};
  rhine::write_json_file((fs::path(o.out) / "manifest.json").string(), manifest);
  if (repaired) std::printf("repaired %zu invalid UTF-8 bytes\n", repaired);
  if (skipped) std::printf("skipped %zu JSONL records without a text field or with broken JSON\n", skipped);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  std::string verify_dir, dump_dir;
  CLI::App app{"rhine-prepare: tokenize text into Rhine token shards"};
  app.add_option("inputs", o.inputs, "LANG=PATH or PATH (.txt, .jsonl, directory or glob)");
  app.add_option("--tokenizer,-t", o.tokenizer, "tokenizer file (.model)");
  app.add_option("--out,-o", o.out, "output directory");
  app.add_option("--lang", o.default_lang, "language of documents that name none");
  app.add_option("--shard-tokens", o.shard_tokens, "tokens per shard before starting a new one")->capture_default_str();
  app.add_option("--threads", o.threads, "encoding threads (0: all CPUs)");
  app.add_option("--batch-docs", o.batch_docs, "documents encoded per batch (the output does not depend on it)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--text-field", o.text_field, "JSONL text field")->capture_default_str();
  app.add_option("--lang-field", o.lang_field, "JSONL language field")->capture_default_str();
  app.add_flag("--doc-per-file", o.doc_per_file, ".txt files are one document each (default: blank-line separated)");
  app.add_flag("--quiet,-q", o.quiet, "no progress bar");
  app.add_option("--verify", verify_dir, "check every shard in a directory (checksums, ids) and print counts");
  app.add_option("--dump", dump_dir, "print every document of the shards in a directory as ids");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    rhine::init_logging();
    if (!verify_dir.empty()) return verify(verify_dir);
    if (!dump_dir.empty()) return dump(dump_dir);
    RHINE_CHECK(!o.tokenizer.empty() && !o.out.empty() && !o.inputs.empty(), "rhine-prepare",
                "missing arguments", std::string(), "usage: rhine-prepare --tokenizer FILE --out DIR INPUT...");
    return prepare(o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "\n%s\n", e.what());
    return 1;
  }
}
