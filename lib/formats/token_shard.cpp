#include "rhine/formats/token_shard.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <random>

#include "rhine/core/error.h"
#include "rhine/core/file.h"
#include "rhine/core/json.h"

namespace rhine {
namespace {

constexpr char kMagic[8] = {'R', 'H', 'T', 'O', 'K', 'E', 'N', 'S'};
constexpr std::uint32_t kVersion = 1;
constexpr std::size_t kHeaderBytes = 64;
constexpr std::size_t kDocBytes = 16;
constexpr std::uint64_t kMaxMetaBytes = 64ull << 20;

struct Header {
  char magic[8];
  std::uint32_t version;
  std::uint32_t token_bytes;
  std::uint64_t n_tokens;
  std::uint64_t n_docs;
  std::uint64_t meta_bytes;
  std::uint64_t tokens_xxh3;
  std::uint64_t index_xxh3;
  std::uint64_t reserved;
};
static_assert(sizeof(Header) == kHeaderBytes, "token shard header must be 64 bytes");

constexpr std::uint64_t align64(std::uint64_t x) { return (x + 63) & ~std::uint64_t{63}; }

std::uint32_t token_bytes_for(std::uint32_t vocab_size) { return vocab_size <= 65536 ? 2 : 4; }

std::string os_error() { return std::strerror(errno); }

void write_all(int fd, const void* data, std::size_t n, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    RHINE_CHECK(w > 0, "token_shard", "write failed", path, os_error() + "; is the disk full?");
    p += w;
    n -= static_cast<std::size_t>(w);
  }
}

Json meta_to_json(const TokenShardMeta& m) {
  return Json{{"vocab_size", m.vocab_size},
              {"tokenizer", m.tokenizer},
              {"languages", m.languages},
              {"sources", m.sources}};
}

}  // namespace

// ---------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------
struct TokenShardWriter::Impl {
  std::string path, tmp;
  TokenShardMeta meta;
  int fd = -1;
  std::uint32_t token_bytes = 2;
  std::uint64_t n_tokens = 0;
  std::vector<TokenShardDoc> docs;
  std::vector<unsigned char> buffer;  // pending token bytes
  XXH3_state_t* hash = nullptr;
  bool finished = false;

  void flush() {
    if (buffer.empty()) return;
    XXH3_64bits_update(hash, buffer.data(), buffer.size());
    write_all(fd, buffer.data(), buffer.size(), tmp);
    buffer.clear();
  }
};

TokenShardWriter::TokenShardWriter(std::string path, TokenShardMeta meta) : impl_(new Impl) {
  RHINE_CHECK(meta.vocab_size > 0, "token_shard", "vocab_size must be positive", meta.vocab_size,
              "pass the tokenizer's vocabulary size");
  RHINE_CHECK(meta.languages.size() <= 65536 && meta.sources.size() <= 65536, "token_shard",
              "too many languages or sources for 16-bit indices",
              (std::vector<std::size_t>{meta.languages.size(), meta.sources.size()}),
              "split the data into several shards");
  auto& s = *impl_;
  s.path = std::move(path);
  s.meta = std::move(meta);
  s.token_bytes = token_bytes_for(s.meta.vocab_size);
  namespace fs = std::filesystem;
  fs::path target(s.path);
  fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  s.tmp = (dir / ("." + target.filename().string() + ".partial." + std::to_string(::getpid()) + "." +
                  std::to_string(std::random_device{}())))
              .string();
  s.fd = ::open(s.tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  RHINE_CHECK(s.fd >= 0, "token_shard", "cannot create the temporary shard file", s.tmp,
              os_error() + "; check the output directory exists and is writable");
  s.hash = XXH3_createState();
  XXH3_64bits_reset(s.hash);
  const unsigned char zeros[kHeaderBytes] = {};
  write_all(s.fd, zeros, kHeaderBytes, s.tmp);  // the header is written last
}

TokenShardWriter::~TokenShardWriter() {
  if (!impl_) return;
  if (impl_->fd >= 0) ::close(impl_->fd);
  if (!impl_->finished) ::unlink(impl_->tmp.c_str());
  XXH3_freeState(impl_->hash);
}

std::uint16_t TokenShardWriter::source_id(const std::string& name) {
  auto& srcs = impl_->meta.sources;
  for (std::size_t i = 0; i < srcs.size(); ++i)
    if (srcs[i] == name) return static_cast<std::uint16_t>(i);
  RHINE_CHECK(srcs.size() < 65536, "token_shard", "too many sources in one shard", srcs.size(),
              "use fewer distinct source names or smaller shards (--shard-tokens)");
  srcs.push_back(name);
  return static_cast<std::uint16_t>(srcs.size() - 1);
}

void TokenShardWriter::add(const std::int32_t* ids, std::size_t n, std::uint16_t lang,
                           std::uint16_t source) {
  auto& s = *impl_;
  RHINE_CHECK(!s.finished, "token_shard", "add() after finish()", s.path, "create a new writer");
  RHINE_CHECK(lang < s.meta.languages.size(), "token_shard", "language index out of range", lang,
              "the shard declares " + std::to_string(s.meta.languages.size()) + " languages");
  RHINE_CHECK(source < s.meta.sources.size(), "token_shard", "source index out of range", source,
              "the shard declares " + std::to_string(s.meta.sources.size()) + " sources");
  RHINE_CHECK(n <= 0xffffffffu, "token_shard", "document too long for the index", n,
              "split documents above 4G tokens");
  for (std::size_t i = 0; i < n; ++i) {
    const std::int32_t id = ids[i];
    RHINE_CHECK(id >= 0 && static_cast<std::uint32_t>(id) < s.meta.vocab_size, "token_shard",
                "token id outside the vocabulary", id,
                "vocab_size is " + std::to_string(s.meta.vocab_size) + "; check the tokenizer");
    const auto u = static_cast<std::uint32_t>(id);
    s.buffer.push_back(static_cast<unsigned char>(u));
    s.buffer.push_back(static_cast<unsigned char>(u >> 8));
    if (s.token_bytes == 4) {
      s.buffer.push_back(static_cast<unsigned char>(u >> 16));
      s.buffer.push_back(static_cast<unsigned char>(u >> 24));
    }
  }
  s.docs.push_back({s.n_tokens, static_cast<std::uint32_t>(n), lang, source});
  s.n_tokens += n;
  if (s.buffer.size() >= (1u << 20)) s.flush();
}

void TokenShardWriter::finish() {
  auto& s = *impl_;
  RHINE_CHECK(!s.finished, "token_shard", "finish() called twice", s.path, "");
  s.flush();
  Header h{};
  std::memcpy(h.magic, kMagic, sizeof kMagic);
  h.version = kVersion;
  h.token_bytes = s.token_bytes;
  h.n_tokens = s.n_tokens;
  h.n_docs = s.docs.size();
  h.tokens_xxh3 = XXH3_64bits_digest(s.hash);

  const std::uint64_t tokens_end = kHeaderBytes + s.n_tokens * s.token_bytes;
  const std::vector<unsigned char> pad(align64(tokens_end) - tokens_end, 0);
  write_all(s.fd, pad.data(), pad.size(), s.tmp);

  std::vector<unsigned char> tail(s.docs.size() * kDocBytes);
  for (std::size_t i = 0; i < s.docs.size(); ++i) {
    unsigned char* p = tail.data() + i * kDocBytes;
    std::memcpy(p, &s.docs[i].first_token, 8);
    std::memcpy(p + 8, &s.docs[i].n_tokens, 4);
    std::memcpy(p + 12, &s.docs[i].lang, 2);
    std::memcpy(p + 14, &s.docs[i].source, 2);
  }
  const std::string meta = meta_to_json(s.meta).dump();
  tail.insert(tail.end(), meta.begin(), meta.end());
  h.meta_bytes = meta.size();
  h.index_xxh3 = XXH3_64bits(tail.data(), tail.size());
  write_all(s.fd, tail.data(), tail.size(), s.tmp);

  RHINE_CHECK(::pwrite(s.fd, &h, sizeof h, 0) == static_cast<ssize_t>(sizeof h), "token_shard",
              "cannot write the header", s.tmp, os_error());
  RHINE_CHECK(::fsync(s.fd) == 0, "token_shard", "fsync failed", s.tmp, os_error());
  ::close(s.fd);
  s.fd = -1;
  RHINE_CHECK(::rename(s.tmp.c_str(), s.path.c_str()) == 0, "token_shard",
              "cannot rename the finished shard into place", s.path, os_error());
  s.finished = true;
  std::filesystem::path target(s.path);
  fsync_directory(target.has_parent_path() ? target.parent_path().string() : ".");
}

std::uint64_t TokenShardWriter::n_tokens() const { return impl_->n_tokens; }
std::uint64_t TokenShardWriter::n_docs() const { return impl_->docs.size(); }

// ---------------------------------------------------------------------------
// Reader
// ---------------------------------------------------------------------------
std::shared_ptr<const TokenShard> TokenShard::open(const std::string& path, bool verify_tokens) {
  std::shared_ptr<TokenShard> shard(new TokenShard);
  shard->path_ = path;
  const std::string where = "shard " + detail::quote(path);
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  RHINE_CHECK(fd >= 0, "token_shard", "cannot open shard", path, os_error());
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    RHINE_FAIL("token_shard", "not a regular file", path, "pass a .tokens file written by rhine-prepare");
  }
  const auto size = static_cast<std::uint64_t>(st.st_size);
  if (size < kHeaderBytes) {
    ::close(fd);
    RHINE_FAIL("token_shard", where + " is truncated: shorter than the 64-byte header", size,
               "the file is damaged; run rhine-prepare again");
  }
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  RHINE_CHECK(map != MAP_FAILED, "token_shard", "cannot memory-map shard", path, os_error());
  shard->map_ = map;
  shard->map_bytes_ = size;
  const auto* base = static_cast<const unsigned char*>(map);

  Header h;
  std::memcpy(&h, base, sizeof h);
  RHINE_CHECK(std::memcmp(h.magic, kMagic, sizeof kMagic) == 0, "token_shard",
              where + " is not a Rhine token shard (bad magic)", std::string(h.magic, 8),
              "pass a file written by rhine-prepare");
  RHINE_CHECK(h.version == kVersion, "token_shard", where + " has an unsupported version", h.version,
              "this Rhine reads version " + std::to_string(kVersion) + "; re-run rhine-prepare");
  RHINE_CHECK(h.token_bytes == 2 || h.token_bytes == 4, "token_shard",
              where + " has an invalid token width", h.token_bytes, "the file is corrupt");
  // Sizes, checked without overflow: each count is bounded by the file size first.
  RHINE_CHECK(h.n_tokens <= size / h.token_bytes && h.n_docs <= size / kDocBytes &&
                  h.meta_bytes <= kMaxMetaBytes,
              "token_shard", where + " has impossible counts in its header",
              (std::vector<std::uint64_t>{h.n_tokens, h.n_docs, h.meta_bytes}),
              "the file is corrupt or truncated; run rhine-prepare again");
  const std::uint64_t index_off = align64(kHeaderBytes + h.n_tokens * h.token_bytes);
  const std::uint64_t meta_off = index_off + h.n_docs * kDocBytes;
  const std::uint64_t expected = meta_off + h.meta_bytes;
  RHINE_CHECK(size >= expected, "token_shard",
              where + " is truncated: the header promises " + std::to_string(expected) + " bytes",
              size, "the writer was interrupted or the copy is incomplete; run rhine-prepare again");
  RHINE_CHECK(size == expected, "token_shard",
              where + " has trailing bytes after the metadata (expected " + std::to_string(expected) + ")",
              size, "the file is corrupt");
  RHINE_CHECK(XXH3_64bits(base + index_off, expected - index_off) == h.index_xxh3, "token_shard",
              where + " is corrupt: index/metadata checksum mismatch", h.index_xxh3,
              "run rhine-prepare again");

  // Metadata.
  const std::string meta_text(reinterpret_cast<const char*>(base + meta_off), h.meta_bytes);
  Json j = parse_json(meta_text, "token_shard", path);
  JsonFields f(j, "token_shard");
  auto& m = shard->meta_;
  m.vocab_size = f.require<std::uint32_t>("vocab_size");
  m.tokenizer = f.get<std::string>("tokenizer", "");
  m.languages = f.require<std::vector<std::string>>("languages");
  m.sources = f.require<std::vector<std::string>>("sources");
  f.reject_unknown();
  RHINE_CHECK(m.vocab_size > 0 && token_bytes_for(m.vocab_size) == h.token_bytes, "token_shard",
              where + " has a token width that does not match its vocab_size", m.vocab_size,
              "the file is corrupt");

  // Index.
  shard->n_tokens_ = h.n_tokens;
  shard->token_bytes_ = h.token_bytes;
  shard->docs_.resize(h.n_docs);
  std::uint64_t next = 0;
  for (std::uint64_t i = 0; i < h.n_docs; ++i) {
    const unsigned char* p = base + index_off + i * kDocBytes;
    TokenShardDoc& d = shard->docs_[i];
    std::memcpy(&d.first_token, p, 8);
    std::memcpy(&d.n_tokens, p + 8, 4);
    std::memcpy(&d.lang, p + 12, 2);
    std::memcpy(&d.source, p + 14, 2);
    RHINE_CHECK(d.first_token == next, "token_shard",
                where + " has a gap or overlap in its document index at document " + std::to_string(i),
                d.first_token, "expected first_token " + std::to_string(next) + "; the file is corrupt");
    RHINE_CHECK(d.lang < m.languages.size() && d.source < m.sources.size(), "token_shard",
                where + " document " + std::to_string(i) + " refers to an unknown language or source",
                (std::vector<unsigned>{d.lang, d.source}), "the file is corrupt");
    next += d.n_tokens;
  }
  RHINE_CHECK(next == h.n_tokens, "token_shard",
              where + " document index does not cover the tokens exactly", next,
              "expected " + std::to_string(h.n_tokens) + " tokens; the file is corrupt");
  shard->tokens_ = base + kHeaderBytes;

  if (verify_tokens) {
    RHINE_CHECK(XXH3_64bits(shard->tokens_, h.n_tokens * h.token_bytes) == h.tokens_xxh3, "token_shard",
                where + " is corrupt: token checksum mismatch", h.tokens_xxh3, "run rhine-prepare again");
    for (std::uint64_t i = 0; i < h.n_tokens; ++i) {
      const auto id = static_cast<std::uint32_t>(shard->token(i));
      RHINE_CHECK(id < m.vocab_size, "token_shard",
                  where + " holds a token id outside its vocabulary at position " + std::to_string(i),
                  id, "the file is corrupt");
    }
  }
  return shard;
}

TokenShard::~TokenShard() {
  if (map_) ::munmap(map_, map_bytes_);
}

void TokenShard::copy_tokens(std::uint64_t begin, std::uint64_t n, std::int64_t* out) const {
  RHINE_CHECK(begin <= n_tokens_ && n <= n_tokens_ - begin, "token_shard",
              "token range outside the shard", (std::vector<std::uint64_t>{begin, n, n_tokens_}),
              "this is a bug in the caller");
  if (token_bytes_ == 2) {
    const auto* t = reinterpret_cast<const std::uint16_t*>(tokens_) + begin;
    std::copy(t, t + n, out);
  } else {
    const auto* t = reinterpret_cast<const std::uint32_t*>(tokens_) + begin;
    std::copy(t, t + n, out);
  }
}

}  // namespace rhine
