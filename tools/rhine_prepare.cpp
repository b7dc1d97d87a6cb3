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
#include <CLI/CLI.hpp>
#include <glob.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <set>
#include <string>
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
  int threads = 0;
  bool doc_per_file = false;
  bool quiet = false;
};

struct Document {
  std::string text, lang;
  std::string source;   // JSONL source field, else the input file's name
  std::string licence;  // JSONL licence (or license) field, else ""
};

// Replaces invalid UTF-8 sequences by U+FFFD; returns the number replaced.
std::size_t repair_utf8(std::string& s) {
  std::size_t bad = 0;
  std::string out;
  out.reserve(s.size());
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const std::size_t n = s.size();
  for (std::size_t i = 0; i < n;) {
    unsigned char c = p[i];
    std::size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    bool ok = len > 0 && i + len <= n;
    for (std::size_t k = 1; ok && k < len; ++k) ok = (p[i + k] & 0xc0) == 0x80;
    if (ok && len > 1) {
      std::uint32_t cp = c & (0x7f >> len);
      for (std::size_t k = 1; k < len; ++k) cp = (cp << 6) | (p[i + k] & 0x3f);
      // Overlong forms, surrogates and values above U+10FFFF are invalid too.
      ok = !(len == 2 && cp < 0x80) && !(len == 3 && cp < 0x800) && !(len == 4 && cp < 0x10000) &&
           !(cp >= 0xd800 && cp <= 0xdfff) && cp <= 0x10ffff;
    }
    if (ok) {
      out.append(s, i, len);
      i += len;
    } else {
      out += "\xef\xbf\xbd";
      ++bad;
      ++i;
    }
  }
  if (bad) s.swap(out);
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

// Reads the documents of one file.
std::vector<Document> read_documents(const std::string& lang, const std::string& path, const Options& o,
                                     std::size_t& repaired, std::size_t& skipped) {
  std::string text = rhine::read_file(path, "rhine-prepare");
  std::vector<Document> docs;
  const std::string file_name = fs::path(path).filename().string();
  auto push = [&](std::string t, std::string l, std::string source = {}, std::string licence = {}) {
    if (t.empty()) return;
    repaired += repair_utf8(t);
    repair_utf8(source);
    repair_utf8(licence);
    if (l.empty()) l = lang.empty() ? o.default_lang : lang;
    RHINE_CHECK(!l.empty(), "rhine-prepare", "document without a language", path,
                "give LANG=PATH, a JSONL lang field, or --lang");
    docs.push_back({std::move(t), std::move(l), source.empty() ? file_name : std::move(source), std::move(licence)});
  };
  if (fs::path(path).extension() == ".jsonl") {
    std::size_t line_no = 0, pos = 0;
    while (pos < text.size()) {
      std::size_t end = text.find('\n', pos);
      if (end == std::string::npos) end = text.size();
      std::string_view line(text.data() + pos, end - pos);
      pos = end + 1;
      ++line_no;
      if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
      rhine::Json j;
      try {
        j = rhine::Json::parse(line);
      } catch (const rhine::Json::exception&) {
        ++skipped;  // a broken line is skipped and counted, never fatal
        continue;
      }
      if (!j.is_object() || !j.contains(o.text_field) || !j[o.text_field].is_string()) {
        ++skipped;
        continue;
      }
      auto field = [&](const char* key) {
        return j.contains(key) && j[key].is_string() ? j[key].get<std::string>() : std::string();
      };
      std::string licence = field("licence");
      if (licence.empty()) licence = field("license");
      push(j[o.text_field].get<std::string>(), field(o.lang_field.c_str()), field("source"), licence);
    }
  } else if (o.doc_per_file) {
    push(std::move(text), "");
  } else {
    // Blank-line separated documents.
    std::string doc;
    std::size_t pos = 0;
    while (pos <= text.size()) {
      std::size_t end = text.find('\n', pos);
      if (end == std::string::npos) end = text.size();
      std::string_view line(text.data() + pos, end - pos);
      if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
      if (line.find_first_not_of(" \t") == std::string_view::npos) {
        push(std::move(doc), "");
        doc.clear();
      } else {
        if (!doc.empty()) doc += '\n';
        doc += line;
      }
      pos = end + 1;
    }
    push(std::move(doc), "");
  }
  return docs;
}

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

  std::map<std::string, LangOutput> outs;
  std::size_t repaired = 0, skipped = 0, n_docs = 0;
  std::uint64_t done_bytes = 0;
  const auto t0 = std::chrono::steady_clock::now();
  auto last_print = t0;
  auto progress = [&](bool final) {
    if (o.quiet) return;
    auto now = std::chrono::steady_clock::now();
    if (!final && now - last_print < std::chrono::milliseconds(500)) return;
    last_print = now;
    const double s = std::max(1e-9, std::chrono::duration<double>(now - t0).count());
    const double mbs = done_bytes / s / 1e6;
    const double eta = mbs > 0 ? (total_bytes - done_bytes) / 1e6 / mbs : 0;
    const double frac = total_bytes ? double(done_bytes) / total_bytes : 1;
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

  for (const auto& [lang, path] : files) {
    auto docs = read_documents(lang, path, o, repaired, skipped);
    for (std::size_t begin = 0; begin < docs.size(); begin += o.batch_docs) {
      const std::size_t end = std::min(docs.size(), begin + o.batch_docs);
      std::vector<std::string> texts;
      for (std::size_t i = begin; i < end; ++i) texts.push_back(docs[i].text);
      auto ids = tok.encode_batch(texts, {}, threads);
      for (std::size_t i = begin; i < end; ++i) {
        auto [lo, src] = writer_for(docs[i].lang, docs[i].source);
        lo->writer->add(ids[i - begin], 0, src);
        auto& si = source_info[docs[i].source];
        ++si.docs;
        si.tokens += ids[i - begin].size();
        if (!docs[i].licence.empty()) si.licences.insert(docs[i].licence);
        lo->tokens += ids[i - begin].size();
        ++lo->docs;
        ++n_docs;
      }
      progress(false);
    }
    done_bytes += fs::file_size(path);
    progress(false);
  }
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
