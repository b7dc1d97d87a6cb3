#pragma once
/// \file
/// `rhine::Tokenizer`: loads a tokenizer file and runs its pipeline (pipeline.h).
///
///     auto tok = rhine::Tokenizer::load("tokenizer.model");
///     std::vector<int32_t> ids = tok.encode("Grüß Gott, wie geht's?");     // [T]
///     std::string text = tok.decode(ids);
///
/// Supported files: SentencePiece `.model` (Unigram and BPE) and Hugging Face
/// `tokenizer.json` (BPE incl. byte-level and byte-fallback, Unigram, WordPiece; the stages
/// listed in pipeline.h; added tokens matched before the model). A loaded Tokenizer is
/// immutable: every const member may be called from many threads at once; copies share the
/// pipeline.

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
  /// Match the text of special tokens (control pieces such as "<s>", tokenizer.json added
  /// tokens with "special": true) in the input and emit their ids; off = special-token text
  /// is encoded as ordinary text (libsentencepiece; HF's split_special_tokens=True).
  /// Non-special added tokens of a tokenizer.json are always matched.
  bool parse_special = false;
  /// Use the byte-level BPE fast path when the tokenizer has one; false runs the generic
  /// pre-tokenizer and model stages, its reference twin (tests compare the two).
  bool fast_paths = true;
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
  /// (`.model` / protobuf -> SentencePiece, `.json` / a JSON object -> tokenizer.json, with
  /// bos/eos/pad names read from a `tokenizer_config.json` beside it when present). Unknown
  /// or malformed files throw rhine::Error naming the file.
  static Tokenizer load(const std::string& path);
  /// Builds a tokenizer from a parsed tokenizer.json; `config` is the optional parsed
  /// tokenizer_config.json (null: none); `source` names it in errors.
  static Tokenizer from_tokenizer_json(const Json& tokenizer_json, const std::string& source,
                                       const Json& config = Json());
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
  /// "sentencepiece-unigram", "sentencepiece-bpe", "hf-BPE-byte-level" (tokenizer.json with
  /// the byte-level fast path), "hf-BPE", "hf-Unigram", "hf-WordPiece".
  const std::string& kind() const;
  /// The file it was loaded from.
  const std::string& source() const;

  struct Impl;

 private:
  explicit Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  static Tokenizer from_tokenizer_json_unchecked(const Json& j, const std::string& source, const Json& config);
  std::shared_ptr<const Impl> impl_;
};

}  // namespace rhine
