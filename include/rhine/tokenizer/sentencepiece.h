#pragma once
/// \file
/// SentencePiece `.model` files read by Rhine itself (no libsentencepiece: it cannot share
/// a process with LibTorch). The file is a serialized `sentencepiece.ModelProto` (proto2);
/// `parse_spm_model` decodes the protobuf wire format by hand with every length and
/// offset bounds-checked. The stages below reproduce libsentencepiece 0.1.97's encoder:
/// the normalizer (precompiled charsmap, whitespace rules), Unigram (Viterbi) and BPE
/// (score-ordered merges), byte fallback, user-defined and control pieces, unk fusing.

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "rhine/core/json.h"

#include "rhine/tokenizer/pipeline.h"

namespace rhine::tokenizer {

class StringIndex;  // internal hash tables (lib/tokenizer/hash_index.h)
class PairIndex;

/// The parts of `sentencepiece.ModelProto` that encoding and decoding need, with the
/// proto's defaults for absent fields.
struct SpmModelProto {
  /// ModelProto.SentencePiece.Type
  enum class PieceType : int { normal = 1, unknown = 2, control = 3, user_defined = 4, unused = 5, byte = 6 };
  enum class ModelType : int { unigram = 1, bpe = 2, word = 3, character = 4 };
  struct Piece {
    std::string piece;
    float score = 0;
    PieceType type = PieceType::normal;
  };
  std::vector<Piece> pieces;
  // TrainerSpec
  ModelType model_type = ModelType::unigram;
  bool byte_fallback = false;
  bool treat_whitespace_as_suffix = false;
  /// The trainer's piece rules (they shape which pieces exist, not how text is encoded;
  /// vocabulary extension follows them): no piece mixes Unicode scripts, digits stand alone.
  bool split_by_unicode_script = true, split_by_number = true, split_digits = false;
  int32_t unk_id = 0, bos_id = 1, eos_id = 2, pad_id = -1;
  std::string unk_surface = " \xE2\x81\x87 ";
  // NormalizerSpec
  std::string normalizer_name;
  std::string precompiled_charsmap;
  bool add_dummy_prefix = true;
  bool remove_extra_whitespaces = true;
  bool escape_whitespaces = true;
  /// True when a denormalizer_spec with rules is present (not applied by Rhine's decode).
  bool has_denormalizer = false;
};

/// Parses a serialized ModelProto. `source` (usually the path) names the file in errors,
/// which also name the field that was malformed. Never reads out of bounds.
SpmModelProto parse_spm_model(std::string_view bytes, const std::string& source);

/// Serializes the fields of `SpmModelProto` back to the wire format (used by tests to
/// build small in-memory models and malformed variants).
std::string serialize_spm_model(const SpmModelProto& m);

/// Whether `piece` names a byte-fallback piece, "<0xXX>" with uppercase hex as SentencePiece
/// (and the tokenizer.json files converted from it) writes them.
bool is_byte_piece(std::string_view piece);

/// The tokenizer.json equivalent of a SentencePiece model, in the shape of HF transformers'
/// converters: the charsmap as a `Precompiled` normalizer, remove_extra_whitespaces as
/// Replace regexes (leading ' ', runs of ' ', trailing ▁), the dummy prefix and whitespace escaping as
/// Prepend("▁") + Replace(" " -> "▁") (LlamaConverter's legacy form; no pre-tokenizer),
/// control / unknown / user-defined pieces as added tokens,
/// BPE merges derived from the piece scores (SentencePieceExtractor), BOS via
/// TemplateProcessing. Rhine encodes the result exactly as the `.model` (tested against
/// libsentencepiece). Throws rhine::Error for model types or whitespace modes that have
/// no tokenizer.json form (WORD / CHAR, treat_whitespace_as_suffix).
Json spm_to_tokenizer_json(const SpmModelProto& m, const std::string& source);

/// The precompiled_charsmap: a darts-clone double array (u32 little-endian units) whose
/// leaves index NUL-terminated replacement strings.
class CharsMap {
 public:
  CharsMap() = default;
  /// Validates the blob; throws rhine::Error naming `source` when malformed.
  CharsMap(std::string_view blob, const std::string& source);
  bool empty() const { return units_.empty(); }
  /// Longest rule matching a prefix of `s`: its length in bytes (0 if none) and the
  /// replacement (set only when the length is > 0).
  std::size_t longest_match(std::string_view s, std::string_view* replacement) const;

 private:
  std::vector<uint32_t> units_;
  std::string strings_;
};

/// Longest-prefix matcher over a fixed set of strings (user-defined symbols).
class PrefixMatcher {
 public:
  PrefixMatcher() = default;
  explicit PrefixMatcher(const std::vector<std::string>& strings);
  bool empty() const { return max_len_ == 0; }
  /// Length of the longest string that is a prefix of `s`, or 0.
  std::size_t longest(std::string_view s) const;

 private:
  std::unordered_map<std::string, bool> set_;  // value: true when it is a whole string
  std::size_t max_len_ = 0;
  bool first_byte_[256] = {};  // quick rejection: no string starts with this byte
};

/// SentencePiece's normalizer (`normalizer.cc`): charsmap rules, user-defined symbols kept
/// verbatim, remove_extra_whitespaces, escape_whitespaces (' ' -> U+2581), dummy prefix.
class SpmNormalizer final : public Normalizer {
 public:
  SpmNormalizer(const SpmModelProto& m, const std::string& source);
  void normalize(NormalizedString& s) const override;

 private:
  CharsMap charsmap_;
  PrefixMatcher user_defined_;
  bool add_dummy_prefix_, remove_extra_whitespaces_, escape_whitespaces_, suffix_;
};

/// Vocabulary shared by the SentencePiece models: piece strings, scores, types and the
/// id lookups of `ModelInterface::InitializePieces`.
class SpmVocab {
 public:
  SpmVocab(const SpmModelProto& m, const std::string& source);
  ~SpmVocab();
  SpmVocab(const SpmVocab&) = delete;  // the indexes point into pieces_
  SpmVocab& operator=(const SpmVocab&) = delete;
  int32_t size() const { return static_cast<int32_t>(pieces_.size()); }
  std::string_view piece(int32_t id) const { return pieces_[static_cast<std::size_t>(id)].piece; }
  float score(int32_t id) const { return pieces_[static_cast<std::size_t>(id)].score; }
  SpmModelProto::PieceType type(int32_t id) const { return pieces_[static_cast<std::size_t>(id)].type; }
  /// Matchable pieces (normal, user-defined, unused) only; -1 if absent.
  int32_t find_matchable(std::string_view piece) const;
  /// `PieceToId`: reserved (control, unknown, byte) first, then matchable, else unk_id.
  int32_t piece_to_id(std::string_view piece) const;
  /// -1 if absent from both tables.
  int32_t find_any(std::string_view piece) const;
  /// True when some string is both a reserved and a matchable piece.
  bool has_overlap() const { return overlap_; }
  int32_t unk_id() const { return unk_id_; }
  bool byte_fallback() const { return byte_fallback_; }
  /// Id of `<0xXX>` (valid only with byte_fallback).
  int32_t byte_id(uint8_t b) const { return byte_ids_[b]; }
  const PrefixMatcher& user_defined() const { return user_defined_; }

 private:
  std::vector<SpmModelProto::Piece> pieces_;
  std::unique_ptr<StringIndex> matchable_, reserved_;
  int32_t unk_id_ = 0;
  bool byte_fallback_ = false;
  int32_t byte_ids_[256] = {};
  PrefixMatcher user_defined_;
  bool overlap_ = false;
};

/// Base of the two SentencePiece models: vocabulary access, and the mapping of raw
/// model output to ids (byte fallback, unk fusing: `PopulateSentencePieceText`).
class SpmModel : public Model {
 public:
  explicit SpmModel(std::shared_ptr<const SpmVocab> vocab) : vocab_(std::move(vocab)) {}
  int32_t vocab_size() const override { return vocab_->size(); }
  std::string_view id_to_token(int32_t id) const override;
  int32_t token_to_id(std::string_view token) const override { return vocab_->find_any(token); }
  const SpmVocab& vocab() const { return *vocab_; }

 protected:
  /// Appends one raw piece [begin, end) of `text` with its id (unk_id when unknown),
  /// applying byte fallback or fusing it with a preceding unk token. Token offsets are
  /// `base` + positions in `text`.
  void emit(std::string_view text, uint32_t begin, uint32_t end, uint32_t base, int32_t id, bool& prev_unk,
            std::vector<Token>& out) const;
  std::shared_ptr<const SpmVocab> vocab_;
};

/// SentencePiece Unigram (`unigram_model.cc EncodeOptimized`): Viterbi over byte positions
/// in float arithmetic, user-defined bonus, unk at min_score - 10.
///
/// With `f64_scores` (one per piece) it is Hugging Face's Unigram instead (`encode_optimized`
/// of the tokenizers crate): the same search over the given double scores, summed and kept in
/// double, every piece matchable (byte and control pieces too), unk at the minimum over all
/// pieces - 10. The two differ only where path scores
/// tie in one precision and not in the other (e.g. "..." + "." against "." + "...").
class SpmUnigramModel final : public SpmModel {
 public:
  explicit SpmUnigramModel(std::shared_ptr<const SpmVocab> vocab, std::vector<double> f64_scores = {});
  ~SpmUnigramModel() override;
  void tokenize(std::string_view text, std::vector<Token>& out) const override;

 private:
  struct Trie;
  std::unique_ptr<Trie> trie_;
  float min_score_ = 0, max_score_ = 0;
  bool f64_ = false;          // HF's double-precision search (see the class comment)
  double f64_unk_score_ = 0;  // its unk score
};

/// SentencePiece BPE (`bpe_model.cc`): merges chosen by piece score (max-heap, ties to the
/// left), user-defined symbols frozen, unused pieces resegmented.
class SpmBpeModel final : public SpmModel {
 public:
  explicit SpmBpeModel(std::shared_ptr<const SpmVocab> vocab);
  ~SpmBpeModel() override;
  void tokenize(std::string_view text, std::vector<Token>& out) const override;

 private:
  void tokenize_segment(std::string_view text, uint32_t base, std::vector<Token>& out,
                        bool& prev_unk) const;
  void tokenize_word(std::string_view text, uint32_t base, std::vector<Token>& out, bool& prev_unk) const;
  /// True when no matchable non-user-defined piece holds U+2581 after its first byte, so
  /// merges never cross a word start and each word can be merged on its own.
  bool split_words_ = false;
  /// (left id, right id) -> merged id for every matchable piece and split point. Used when
  /// every character of every piece is itself a piece (true for trained models), so every
  /// symbol that can take part in a merge has an id; otherwise merges look up strings.
  std::unique_ptr<PairIndex> pairs_;
  bool use_pairs_ = false;
  bool has_unused_ = false;
  int32_t ascii_ids_[128];
  /// Results of recent words (exact: a word's tokens do not depend on its neighbours when
  /// split_words_ holds). Internal, thread-safe, bounded.
  struct WordCache;
  std::unique_ptr<WordCache> cache_;
};

/// SentencePiece's decoder (`SentencePieceProcessor::Decode`): control pieces vanish,
/// unk becomes unk_surface, byte pieces are gathered into UTF-8 (U+FFFD per invalid byte),
/// U+2581 becomes ' ' and the dummy-prefix space is removed.
class SpmDecoder final : public Decoder {
 public:
  /// Like libsentencepiece, token strings are mapped back to ids with `piece_to_id`.
  SpmDecoder(std::shared_ptr<const SpmVocab> vocab, const SpmModelProto& m);
  void decode(std::vector<std::string>& tokens) const override;

 private:
  std::shared_ptr<const SpmVocab> vocab_;
  std::string unk_surface_;
  bool strip_bos_space_, keep_bos_ws_flag_;
};

}  // namespace rhine::tokenizer
