#pragma once
/// \file
/// The tokenizer pipeline in the Hugging Face shape:
///
///     text -> [added tokens] -> Normalizer -> PreTokenizer -> Model -> PostProcessor
///     ids  -> Decoder -> text
///
/// Each stage is a small interface; `Sequence` combinators chain stages of one kind, and
/// the `make_*` factories build a stage from its `tokenizer.json` object, selected by its
/// `"type"` key (one plain factory per stage, filled in one place: lib/tokenizer/pipeline.cpp).
/// Offsets are byte offsets into the original UTF-8 text, carried through every stage by
/// the alignment of `NormalizedString`.
///
/// Every stage is immutable after construction, so one pipeline may be used by many
/// threads at once.

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "rhine/core/json.h"

namespace rhine::tokenizer {

/// A string being normalized, with the original byte offset of each byte.
/// `align.size() == text.size() + 1`; `align[i]` is the offset in the original text where
/// normalized byte i came from, and `align.back()` is the end of the consumed original text.
struct NormalizedString {
  std::string text;
  std::vector<uint32_t> align;

  NormalizedString() = default;
  /// An unnormalized string whose bytes start at original offset `base`.
  explicit NormalizedString(std::string_view original, uint32_t base = 0);
  /// Original byte range [begin, end) of the normalized bytes [b, e).
  std::pair<uint32_t, uint32_t> original_range(std::size_t b, std::size_t e) const;
};

/// One token produced by a model: its id and its byte range in the model's input.
struct Token {
  int32_t id = 0;
  uint32_t begin = 0, end = 0;
};

/// The result of encoding one text. `offsets[i]` is the original byte range of `ids[i]`
/// (empty ranges for tokens with no surface, such as BOS or byte-fallback continuation bytes).
struct Encoding {
  std::vector<int32_t> ids;
  std::vector<std::pair<uint32_t, uint32_t>> offsets;
  /// 1 for tokens added by the post-processor or matched as special tokens.
  std::vector<uint8_t> special;
};

/// Normalizer stage: rewrites the text in place, keeping the alignment.
class Normalizer {
 public:
  virtual ~Normalizer() = default;
  virtual void normalize(NormalizedString& s) const = 0;
};

/// The normalized text split into pieces that the model encodes independently.
struct PreTokenizedString {
  std::vector<NormalizedString> splits;
};

/// Pre-tokenizer stage: splits (and may rewrite) each piece.
class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  virtual void pre_tokenize(PreTokenizedString& s) const = 0;
};

/// Model stage: maps one normalized piece to tokens (appended to `out`; Token offsets are
/// byte offsets into `text`), and owns the vocabulary.
class Model {
 public:
  virtual ~Model() = default;
  virtual void tokenize(std::string_view text, std::vector<Token>& out) const = 0;
  virtual int32_t vocab_size() const = 0;
  /// The token's string, or "" for an id outside [0, vocab_size).
  virtual std::string_view id_to_token(int32_t id) const = 0;
  /// The id of a token string, or -1 when it is not in the vocabulary.
  virtual int32_t token_to_id(std::string_view token) const = 0;
};

/// Post-processor stage: adds special tokens (BOS/EOS, templates) when asked to.
class PostProcessor {
 public:
  virtual ~PostProcessor() = default;
  virtual void process(Encoding& e, bool add_special) const = 0;
};

/// Decoder stage (HF semantics): rewrites the list of token strings; the final text is
/// their concatenation.
class Decoder {
 public:
  virtual ~Decoder() = default;
  virtual void decode(std::vector<std::string>& tokens) const = 0;
};

/// Applies normalizers in order.
class NormalizerSequence final : public Normalizer {
 public:
  explicit NormalizerSequence(std::vector<std::unique_ptr<Normalizer>> stages);
  void normalize(NormalizedString& s) const override;

 private:
  std::vector<std::unique_ptr<Normalizer>> stages_;
};

/// Applies pre-tokenizers in order.
class PreTokenizerSequence final : public PreTokenizer {
 public:
  explicit PreTokenizerSequence(std::vector<std::unique_ptr<PreTokenizer>> stages);
  void pre_tokenize(PreTokenizedString& s) const override;

 private:
  std::vector<std::unique_ptr<PreTokenizer>> stages_;
};

/// Applies decoders in order.
class DecoderSequence final : public Decoder {
 public:
  explicit DecoderSequence(std::vector<std::unique_ptr<Decoder>> stages);
  void decode(std::vector<std::string>& tokens) const override;

 private:
  std::vector<std::unique_ptr<Decoder>> stages_;
};

/// HF `Prepend`: prepends `prefix` to a non-empty string.
class PrependNormalizer final : public Normalizer {
 public:
  explicit PrependNormalizer(std::string prefix) : prefix_(std::move(prefix)) {}
  void normalize(NormalizedString& s) const override;

 private:
  std::string prefix_;
};

/// HF `Replace` with a literal pattern: replaces every occurrence of `pattern` by `content`.
class ReplaceNormalizer final : public Normalizer {
 public:
  ReplaceNormalizer(std::string pattern, std::string content);
  void normalize(NormalizedString& s) const override;

 private:
  std::string pattern_, content_;
};

/// HF `Replace` decoder with a literal pattern.
class ReplaceDecoder final : public Decoder {
 public:
  ReplaceDecoder(std::string pattern, std::string content);
  void decode(std::vector<std::string>& tokens) const override;

 private:
  std::string pattern_, content_;
};

/// HF `ByteFallback`: runs of `<0xXX>` tokens become their bytes when they form valid
/// UTF-8, else one U+FFFD per byte.
class ByteFallbackDecoder final : public Decoder {
 public:
  void decode(std::vector<std::string>& tokens) const override;
};

/// HF `Fuse`: concatenates all tokens into one.
class FuseDecoder final : public Decoder {
 public:
  void decode(std::vector<std::string>& tokens) const override;
};

/// HF `Strip`: removes up to `start` leading and `stop` trailing copies of `content`
/// from every token.
class StripDecoder final : public Decoder {
 public:
  StripDecoder(std::string content, int start, int stop);
  void decode(std::vector<std::string>& tokens) const override;

 private:
  std::string content_;
  int start_, stop_;
};

/// Adds `bos` in front and/or `eos` at the end when add_special is on (ids < 0: not added).
/// This is what SentencePiece models use (Llama: BOS only).
class BosEosProcessor final : public PostProcessor {
 public:
  BosEosProcessor(int32_t bos, int32_t eos) : bos_(bos), eos_(eos) {}
  void process(Encoding& e, bool add_special) const override;

 private:
  int32_t bos_, eos_;
};

/// Builds a normalizer from its tokenizer.json object (null -> nullptr). Types: Sequence,
/// Prepend, Replace (String or Regex pattern), NFC, NFD, NFKC, NFKD (utf8proc), Lowercase,
/// Strip, StripAccents, BertNormalizer, Precompiled (the SentencePiece charsmap, matched by
/// longest byte prefix as libsentencepiece does). Unknown types throw rhine::Error naming
/// the type and `source`.
std::unique_ptr<Normalizer> make_normalizer(const Json& j, const std::string& source);
/// Builds a pre-tokenizer (null -> nullptr). Types: Sequence, Split (String or Regex
/// pattern, all five behaviours, invert; regexes run on PCRE2 in UTF + UCP mode), ByteLevel
/// (add_prefix_space, use_regex with the GPT-2 pattern), Metaspace (replacement,
/// prepend_scheme first / always / never, split), Digits, Whitespace, WhitespaceSplit,
/// Punctuation.
std::unique_ptr<PreTokenizer> make_pre_tokenizer(const Json& j, const std::string& source);
/// Builds the model: BPE (merges as "a b" strings or [a, b] pairs, byte fallback, unk and
/// fuse_unk, continuing_subword_prefix / end_of_word_suffix, ignore_merges; dropout is
/// ignored), Unigram (run by the SentencePiece Viterbi; `special_tokens` are kept out of
/// the lattice) or WordPiece. A missing "type" is inferred from the vocab as HF does.
std::unique_ptr<Model> make_model(const Json& j, const std::vector<std::string>& special_tokens,
                                  const std::string& source);
/// Builds a post-processor (null -> nullptr). Types: Sequence, TemplateProcessing (single
/// sequences), ByteLevel (offsets only: ids unchanged), BertProcessing, RobertaProcessing.
std::unique_ptr<PostProcessor> make_post_processor(const Json& j, const std::string& source);
/// Builds a decoder (null -> nullptr). Types: Sequence, Replace (String pattern),
/// ByteFallback, Fuse, Strip, ByteLevel, Metaspace, WordPiece.
std::unique_ptr<Decoder> make_decoder(const Json& j, const std::string& source);

/// Finds special tokens (exact strings) in raw text, longest match first, so they are
/// emitted as single ids and never reach the normalizer.
class SpecialTokenMatcher {
 public:
  SpecialTokenMatcher() = default;
  /// Adds a token (empty strings are ignored).
  void add(std::string text, int32_t id);
  bool empty() const { return tokens_.empty(); }
  /// Splits `text` into alternating plain segments and special tokens.
  /// Each part: [begin, end) in `text` and the id (-1 for a plain segment).
  struct Part {
    uint32_t begin, end;
    int32_t id;
  };
  std::vector<Part> split(std::string_view text) const;

 private:
  std::vector<std::pair<std::string, int32_t>> tokens_;  // sorted longest first
};

}  // namespace rhine::tokenizer
