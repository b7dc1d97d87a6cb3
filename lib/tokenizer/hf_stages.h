#pragma once
// The tokenizer.json stages (HF tokenizers semantics), internal to rhine_tokenizer: the
// public way to build them is the make_* factories of pipeline.h, selected by "type".

#include <array>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "hash_index.h"
#include "regex.h"
#include "rhine/tokenizer/pipeline.h"
#include "rhine/tokenizer/sentencepiece.h"

namespace rhine::tokenizer {

// --- helpers ------------------------------------------------------------------------------

/// The GPT-2 byte <-> printable character table (`bytes_char`): bytes !..~, ¡..¬, ®..ÿ map
/// to themselves, the other 68 bytes to U+0100 + n in increasing order.
struct ByteLevelTable {
  std::array<uint32_t, 256> byte_to_cp{};
  std::array<int16_t, 0x144> cp_to_byte{};  // -1 where no byte maps
  std::array<std::string, 256> byte_to_utf8;
  static const ByteLevelTable& get();
};

/// A Split/Replace pattern: a literal string or a PCRE2 regex.
class Pattern {
 public:
  Pattern(const Json& j, const std::string& source);  // {"String": s} or {"Regex": r}
  /// Appends the non-empty matches of `text` (valid UTF-8).
  void find_all(std::string_view text, std::vector<std::pair<uint32_t, uint32_t>>& out) const;

 private:
  std::string literal_;
  std::unique_ptr<Regex> regex_;
};

/// Builds a NormalizedString piece by piece, each appended byte aligned to an original offset.
struct NormalizedBuilder {
  std::string text;
  std::vector<uint32_t> align;
  void append(std::string_view bytes, uint32_t original) {
    text.append(bytes);
    align.insert(align.end(), bytes.size(), original);
  }
  /// Moves the result into `s`, its end aligned to `end`.
  void finish(NormalizedString& s, uint32_t end) {
    align.push_back(end);
    s.text = std::move(text);
    s.align = std::move(align);
  }
};

/// Bytes [b, e) of `s` as their own NormalizedString (alignment kept).
NormalizedString slice(const NormalizedString& s, std::size_t b, std::size_t e);

/// Replaces invalid UTF-8 by U+FFFD (each replacement aligned to its byte); returns false
/// when `s` was already valid (and leaves it untouched).
bool sanitize_utf8(NormalizedString& s);

// --- normalizers --------------------------------------------------------------------------

/// NFC / NFD / NFKC / NFKD via utf8proc.
class UnicodeNormalizer final : public Normalizer {
 public:
  enum class Form { nfc, nfd, nfkc, nfkd };
  explicit UnicodeNormalizer(Form form) : form_(form) {}
  void normalize(NormalizedString& s) const override;

 private:
  Form form_;
};

/// HF `Lowercase` (Unicode simple lowercase mapping per character).
class LowercaseNormalizer final : public Normalizer {
 public:
  void normalize(NormalizedString& s) const override;
};

/// HF `Strip`: removes leading / trailing Unicode whitespace.
class StripNormalizer final : public Normalizer {
 public:
  StripNormalizer(bool left, bool right) : left_(left), right_(right) {}
  void normalize(NormalizedString& s) const override;

 private:
  bool left_, right_;
};

/// HF `Replace` with a regex pattern.
class RegexReplaceNormalizer final : public Normalizer {
 public:
  RegexReplaceNormalizer(const std::string& regex, std::string content, const std::string& source);
  void normalize(NormalizedString& s) const override;

 private:
  Regex regex_;
  std::string content_;
};

/// HF `BertNormalizer`: clean_text, handle_chinese_chars, strip_accents, lowercase.
class BertNormalizer final : public Normalizer {
 public:
  BertNormalizer(bool clean_text, bool chinese_chars, bool strip_accents, bool lowercase)
      : clean_(clean_text), chinese_(chinese_chars), strip_accents_(strip_accents), lowercase_(lowercase) {}
  void normalize(NormalizedString& s) const override;

 private:
  bool clean_, chinese_, strip_accents_, lowercase_;
};

/// HF `StripAccents`: removes combining marks (Mn) (use after NFD/NFKD).
class StripAccentsNormalizer final : public Normalizer {
 public:
  void normalize(NormalizedString& s) const override;
};

/// HF `Precompiled`: the SentencePiece charsmap (longest match on bytes, as libsentencepiece).
class PrecompiledNormalizer final : public Normalizer {
 public:
  PrecompiledNormalizer(std::string_view blob, const std::string& source) : map_(blob, source) {}
  void normalize(NormalizedString& s) const override;

 private:
  CharsMap map_;
};

// --- pre-tokenizers -----------------------------------------------------------------------

enum class SplitBehavior { removed, isolated, merged_with_previous, merged_with_next, contiguous };

/// Splits every piece at the matches of a pattern (HF `Split`).
class SplitPreTokenizer final : public PreTokenizer {
 public:
  SplitPreTokenizer(std::unique_ptr<Pattern> pattern, SplitBehavior behavior, bool invert)
      : pattern_(std::move(pattern)), behavior_(behavior), invert_(invert) {}
  void pre_tokenize(PreTokenizedString& s) const override;
  /// The pieces [b, e) of `text` (without applying them).
  void split_ranges(std::string_view text, std::vector<std::pair<uint32_t, uint32_t>>& out) const;
  bool isolated_regex() const { return behavior_ == SplitBehavior::isolated && !invert_; }

 private:
  std::unique_ptr<Pattern> pattern_;
  SplitBehavior behavior_;
  bool invert_;
};

/// HF `ByteLevel`: optional prefix space, optional GPT-2 split, then bytes -> printable chars.
class ByteLevelPreTokenizer final : public PreTokenizer {
 public:
  ByteLevelPreTokenizer(bool add_prefix_space, bool use_regex, const std::string& source);
  void pre_tokenize(PreTokenizedString& s) const override;
  bool add_prefix_space() const { return add_prefix_space_; }
  const SplitPreTokenizer* regex_split() const { return split_.get(); }

 private:
  bool add_prefix_space_;
  std::unique_ptr<SplitPreTokenizer> split_;
};

/// HF `Metaspace`: ' ' -> replacement, optional prefix, optional split before each replacement.
class MetaspacePreTokenizer final : public PreTokenizer {
 public:
  enum class Prepend { always, first, never };
  MetaspacePreTokenizer(std::string replacement, Prepend prepend, bool split)
      : replacement_(std::move(replacement)), prepend_(prepend), split_(split) {}
  void pre_tokenize(PreTokenizedString& s) const override;

 private:
  std::string replacement_;
  Prepend prepend_;
  bool split_;
};

/// HF `Digits`, `Whitespace`, `WhitespaceSplit`, `Punctuation`: character-class splits.
class CharClassPreTokenizer final : public PreTokenizer {
 public:
  enum class Kind { digits, digits_individual, whitespace, whitespace_split, punctuation };
  CharClassPreTokenizer(Kind kind, SplitBehavior behavior) : kind_(kind), behavior_(behavior) {}
  void pre_tokenize(PreTokenizedString& s) const override;

 private:
  Kind kind_;
  SplitBehavior behavior_;
};

// --- models -------------------------------------------------------------------------------

/// HF `BPE`: merges by rank (lowest first, ties to the left) on the characters of each piece;
/// byte fallback, unk (fused or not), continuing_subword_prefix / end_of_word_suffix,
/// ignore_merges. Byte-level vocabularies also get a raw-bytes fast path (tokenize_bytes).
class BpeModel final : public Model {
 public:
  BpeModel(const Json& j, const std::string& source);
  ~BpeModel() override;
  void tokenize(std::string_view text, std::vector<Token>& out) const override;
  int32_t vocab_size() const override { return static_cast<int32_t>(vocab_.size()); }
  std::string_view id_to_token(int32_t id) const override;
  int32_t token_to_id(std::string_view token) const override { return index_.find(token); }
  int32_t unk_id() const { return unk_; }

  /// True when every byte's printable character is a token and no prefix, suffix or byte
  /// fallback applies: then tokenize_bytes(raw) == tokenize(byte_level(raw)).
  bool byte_level_ready() const { return byte_level_ready_; }
  /// Encodes raw bytes as if mapped by ByteLevel first; offsets are `base` + byte positions.
  void tokenize_bytes(std::string_view raw, uint32_t base, std::vector<Token>& out) const;

  struct Sym {
    int32_t id;
    uint32_t begin, end;
  };

 private:
  void merge(std::vector<Sym>& syms) const;
  int32_t rank_of(int32_t a, int32_t b) const { return ranks_.find(a, b); }

  std::vector<std::string> vocab_;  // by id ("" for holes)
  StringIndex index_;               // token -> id
  StringIndex raw_index_;           // byte-level tokens as raw bytes -> id
  std::vector<std::string> raw_tokens_;
  PairIndex ranks_;                 // (left id, right id) -> rank
  std::vector<int32_t> merged_;     // rank -> merged id
  int32_t unk_ = -1;
  std::string prefix_, suffix_;
  bool fuse_unk_ = false, byte_fallback_ = false, ignore_merges_ = false, byte_level_ready_ = false;
  std::array<int32_t, 256> byte_ids_{};      // id of <0xXX> (byte fallback), -1 if absent
  std::array<int32_t, 256> level_ids_{};     // id of the byte's printable char (byte level)
  struct Cache;
  std::unique_ptr<Cache> cache_;  // shared word cache of tokenize()
  uint64_t uid_ = 0;              // identifies this model to tokenize_bytes' per-thread cache
};

/// HF `Unigram`, run by the SentencePiece Viterbi (SpmUnigramModel) on the same pieces in
/// HF's double precision.
class UnigramModel final : public Model {
 public:
  UnigramModel(const Json& j, const std::vector<std::string>& special_tokens, const std::string& source);
  void tokenize(std::string_view text, std::vector<Token>& out) const override { model_->tokenize(text, out); }
  int32_t vocab_size() const override { return model_->vocab_size(); }
  std::string_view id_to_token(int32_t id) const override { return model_->id_to_token(id); }
  int32_t token_to_id(std::string_view token) const override { return model_->token_to_id(token); }
  int32_t unk_id() const { return model_->vocab().unk_id(); }

 private:
  std::unique_ptr<SpmUnigramModel> model_;
};

/// HF `WordPiece`: greedy longest match first with a continuing-subword prefix.
class WordPieceModel final : public Model {
 public:
  WordPieceModel(const Json& j, const std::string& source);
  void tokenize(std::string_view text, std::vector<Token>& out) const override;
  int32_t vocab_size() const override { return static_cast<int32_t>(vocab_.size()); }
  std::string_view id_to_token(int32_t id) const override;
  int32_t token_to_id(std::string_view token) const override { return index_.find(token); }
  int32_t unk_id() const { return unk_; }

 private:
  std::vector<std::string> vocab_;
  StringIndex index_;
  std::string prefix_;
  int32_t unk_ = -1;
  std::size_t max_chars_ = 100;
};

// --- post-processors ----------------------------------------------------------------------

/// HF `TemplateProcessing` (single sequences): special pieces around $A.
class TemplateProcessor final : public PostProcessor {
 public:
  TemplateProcessor(const Json& j, const std::string& source);
  void process(Encoding& e, bool add_special) const override;
  /// Ids of the special pieces before / after $A (BOS / EOS candidates).
  const std::vector<int32_t>& prefix() const { return prefix_; }
  const std::vector<int32_t>& suffix() const { return suffix_; }

 private:
  std::vector<int32_t> prefix_, suffix_;
};

/// Applies post-processors in order (HF `Sequence`); ByteLevel / no-op ones are dropped.
class PostProcessorSequence final : public PostProcessor {
 public:
  explicit PostProcessorSequence(std::vector<std::unique_ptr<PostProcessor>> stages) : stages_(std::move(stages)) {}
  void process(Encoding& e, bool add_special) const override {
    for (const auto& p : stages_) p->process(e, add_special);
  }

 private:
  std::vector<std::unique_ptr<PostProcessor>> stages_;
};

/// Offsets-only post-processors (HF `ByteLevel` trim_offsets): ids unchanged.
class NoOpProcessor final : public PostProcessor {
 public:
  void process(Encoding&, bool) const override {}
};

// --- decoders -----------------------------------------------------------------------------

/// HF `ByteLevel` decoder: printable chars -> bytes (tokens that do not map stay as they
/// are), then UTF-8 with U+FFFD for invalid sequences.
class ByteLevelDecoder final : public Decoder {
 public:
  void decode(std::vector<std::string>& tokens) const override;
};

/// HF `Metaspace` decoder: replacement -> ' ', the first token's leading space dropped
/// unless prepend_scheme is never.
class MetaspaceDecoder final : public Decoder {
 public:
  MetaspaceDecoder(std::string replacement, bool strip_first)
      : replacement_(std::move(replacement)), strip_first_(strip_first) {}
  void decode(std::vector<std::string>& tokens) const override;

 private:
  std::string replacement_;
  bool strip_first_;
};

/// HF `WordPiece` decoder: drops the prefix of continuation tokens, spaces between words.
class WordPieceDecoder final : public Decoder {
 public:
  WordPieceDecoder(std::string prefix, bool cleanup) : prefix_(std::move(prefix)), cleanup_(cleanup) {}
  void decode(std::vector<std::string>& tokens) const override;

 private:
  std::string prefix_;
  bool cleanup_;
};

}  // namespace rhine::tokenizer
