#pragma once
/// \file
/// Token shards: the pre-tokenized training data that `rhine-prepare` writes
/// and Rhine's data loader memory-maps. Torch-free.
///
/// File layout (little-endian; tokens and index start at multiples of 64 bytes):
///
///     offset 0     fixed header, 64 bytes:
///                  char[8] magic "RHTOKENS"; u32 version (1); u32 token_bytes (2 or 4);
///                  u64 n_tokens; u64 n_docs; u64 meta_bytes;
///                  u64 tokens_xxh3; u64 index_xxh3 (XXH3-64 of the index and the metadata);
///                  u64 reserved (0)
///     64           tokens: n_tokens x u16 or u32 (u16 when vocab_size <= 65536)
///     ...          document index: n_docs x {u64 first_token; u32 n_tokens; u16 lang; u16 source}
///     ...          metadata: JSON {"vocab_size", "tokenizer", "languages": [...], "sources": [...]}
///
/// Documents are contiguous and in order: doc i covers tokens
/// [first_token_i, first_token_i + n_tokens_i) and first_token_{i+1} follows it.
/// `lang` and `source` index the metadata's "languages" and "sources" tables.
/// The writer works in a temporary file and renames it into place only when
/// complete, so a killed `rhine-prepare` never leaves a torn shard behind.

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace rhine {

/// Metadata of a shard (the JSON section).
struct TokenShardMeta {
  /// Largest token id + 1 the tokenizer can produce; decides u16 vs u32.
  std::uint32_t vocab_size = 0;
  /// Free text naming the tokenizer (file name, hash), for provenance.
  std::string tokenizer;
  /// Language codes ("de", "fr", ...); documents refer to them by index.
  std::vector<std::string> languages;
  /// Source names (file or corpus names); documents refer to them by index.
  std::vector<std::string> sources;
};

/// One document's entry in the index.
struct TokenShardDoc {
  std::uint64_t first_token = 0;
  std::uint32_t n_tokens = 0;
  std::uint16_t lang = 0;
  std::uint16_t source = 0;
};

/// Writes one shard. Call `add` per document, then `finish`. Destroying a
/// writer without `finish` discards the temporary file.
class TokenShardWriter {
 public:
  /// Starts writing `path` (through a temporary file next to it).
  /// Throws when vocab_size is 0 or above 2^32, or the directory is not writable.
  TokenShardWriter(std::string path, TokenShardMeta meta);
  ~TokenShardWriter();
  TokenShardWriter(const TokenShardWriter&) = delete;
  TokenShardWriter& operator=(const TokenShardWriter&) = delete;

  /// Appends one document. Ids must be < vocab_size; lang and source must
  /// index the metadata tables; documents may be empty.
  void add(const std::int32_t* ids, std::size_t n, std::uint16_t lang, std::uint16_t source);
  void add(const std::vector<std::int32_t>& ids, std::uint16_t lang, std::uint16_t source) {
    add(ids.data(), ids.size(), lang, source);
  }

  /// The index of source `name` in this shard's source table, appending it
  /// when new (sources need not all be declared up front). Throws past 65,536.
  std::uint16_t source_id(const std::string& name);

  /// Writes index, metadata and header, fsyncs and renames into place.
  void finish();

  std::uint64_t n_tokens() const;
  std::uint64_t n_docs() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// A memory-mapped, validated shard. Thread-safe for reading.
class TokenShard {
 public:
  /// Opens and validates `path`: magic, version, token width vs vocab size,
  /// exact file size, index contiguity, table indices, the index/metadata
  /// checksum, and (when `verify_tokens`) the tokens' checksum and that every
  /// id is < vocab_size. Errors name the file and what is wrong; a truncated
  /// file is reported as truncated.
  static std::shared_ptr<const TokenShard> open(const std::string& path, bool verify_tokens = false);
  ~TokenShard();
  TokenShard(const TokenShard&) = delete;
  TokenShard& operator=(const TokenShard&) = delete;

  const std::string& path() const { return path_; }
  const TokenShardMeta& meta() const { return meta_; }
  std::uint64_t n_tokens() const { return n_tokens_; }
  std::uint64_t n_docs() const { return docs_.size(); }
  const std::vector<TokenShardDoc>& docs() const { return docs_; }
  /// 2 or 4.
  std::uint32_t token_bytes() const { return token_bytes_; }

  /// Token `i` of the shard (i < n_tokens).
  std::int32_t token(std::uint64_t i) const {
    return token_bytes_ == 2 ? static_cast<std::int32_t>(reinterpret_cast<const std::uint16_t*>(tokens_)[i])
                             : static_cast<std::int32_t>(reinterpret_cast<const std::uint32_t*>(tokens_)[i]);
  }
  /// Copies tokens [begin, begin + n) into out (widened to int64, what LibTorch wants).
  void copy_tokens(std::uint64_t begin, std::uint64_t n, std::int64_t* out) const;

 private:
  TokenShard() = default;
  std::string path_;
  TokenShardMeta meta_;
  std::uint64_t n_tokens_ = 0;
  std::uint32_t token_bytes_ = 2;
  std::vector<TokenShardDoc> docs_;
  const unsigned char* tokens_ = nullptr;
  void* map_ = nullptr;
  std::size_t map_bytes_ = 0;
};

}  // namespace rhine
