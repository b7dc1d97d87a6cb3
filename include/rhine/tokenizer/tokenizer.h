#pragma once
/// \file
/// `rhine::Tokenizer`: loads a tokenizer file and runs its pipeline (pipeline.h).
///
///     auto tok = rhine::Tokenizer::load("tokenizer.model");
///     std::vector<int32_t> ids = tok.encode("Grüß Gott, wie geht's?");     // [T]
///     std::string text = tok.decode(ids);
///
/// Supported files: SentencePiece `.model` (Unigram and BPE). `tokenizer.json` is detected
/// and rejected with a clear error until its reader lands. A loaded Tokenizer is immutable:
/// every const member may be called from many threads at once; copies share the pipeline.

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "rhine/tokenizer/pipeline.h"
#include "rhine/tokenizer/sentencepiece.h"

namespace rhine {

/// Options of one encode call.
struct EncodeOptions {
  /// Let the post-processor add special tokens (SentencePiece models: BOS, as Llama's
  /// `add_bos_token`; EOS only with `add_eos`).
  bool add_special = false;
  /// Also add EOS (SentencePiece models) when add_special is on.
  bool add_eos = false;
  /// Match the text of special tokens (control pieces such as "<s>") in the input and emit
  /// their ids; off = special-token text is encoded as ordinary text (libsentencepiece).
  bool parse_special = false;
};

/// Options of one decode call.
struct DecodeOptions {
  /// Drop special tokens (control, unknown-type reserved pieces) before decoding.
  bool skip_special = false;
};

/// A loaded tokenizer. Cheap to copy (shared, immutable state).
class Tokenizer {
 public:
  /// Loads a tokenizer file; the kind is detected from the file name and contents
  /// (`.model` / protobuf -> SentencePiece). Unknown or malformed files throw rhine::Error
  /// naming the file.
  static Tokenizer load(const std::string& path);
  /// Builds a tokenizer from a parsed SentencePiece model; `source` names it in errors.
  static Tokenizer from_sentencepiece(const tokenizer::SpmModelProto& model, const std::string& source);

  /// Token ids of `text` ([T]).
  std::vector<int32_t> encode(std::string_view text, const EncodeOptions& options = {}) const;
  /// Ids with original byte offsets ([T] each).
  tokenizer::Encoding encode_with_offsets(std::string_view text, const EncodeOptions& options = {}) const;
  /// Encodes many texts on `threads` threads (0: rhine::default_thread_count()); result i
  /// belongs to texts[i].
  std::vector<std::vector<int32_t>> encode_batch(const std::vector<std::string>& texts,
                                                 const EncodeOptions& options = {}, int threads = 0) const;
  /// Text of `ids`; throws rhine::Error for an id outside [0, vocab_size).
  std::string decode(const std::vector<int32_t>& ids, const DecodeOptions& options = {}) const;

  int32_t vocab_size() const;
  /// The token string of `id` ("" when out of range).
  std::string id_to_token(int32_t id) const;
  /// The id of a token string, or -1.
  int32_t token_to_id(std::string_view token) const;
  /// Special ids; -1 when the tokenizer has none.
  int32_t bos_id() const;
  int32_t eos_id() const;
  int32_t unk_id() const;
  int32_t pad_id() const;
  /// True for control / special tokens.
  bool is_special(int32_t id) const;
  /// "sentencepiece-unigram", "sentencepiece-bpe", ...
  const std::string& kind() const;
  /// The file it was loaded from.
  const std::string& source() const;

  struct Impl;

 private:
  explicit Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<const Impl> impl_;
};

}  // namespace rhine
