#pragma once
/// \file
/// Vocabulary extension: add the tokens that shorten a target language's text most to an
/// existing tokenizer, keeping every existing id's meaning, so that a model trained on
/// the base vocabulary can be adapted (its embedding matrix grows by the new rows).
///
///     auto base = rhine::tokenizer::parse_spm_model(rhine::read_file("base.model", "x"), "base.model");
///     auto ext = rhine::tokenizer::extend_vocabulary(base, dutch_lines, {.new_tokens = 2000});
///     rhine::write_file_atomic("nl.model", ext.model_bytes(rhine::read_file("base.model", "x")));
///
/// The method is BPE continued on the target text: the text is segmented by the base
/// tokenizer, and N times the most frequent adjacent pair of pieces inside a word becomes a
/// new piece (the pair's frequency is the number of tokens it saves). Pieces the base's own
/// trainer would not have made are skipped: SentencePiece's rules are read from the model
/// (`split_by_unicode_script`: no piece mixes scripts, so "terug." or "'s" are not added;
/// `split_digits`: digits stay single; `split_by_number`), with Unicode scripts approximated
/// by code point ranges.
///
/// - SentencePiece BPE `.model` (what `rhine-tokenizer train` writes, and the vocabularies of
///   Llama 2, Mistral, EuroLLM, Salamandra): the new pieces are appended with scores below
///   every existing piece, so the base's merges all happen first and the new ones after, in
///   the order they were found: the ids and the segmentation of text without the new pieces
///   stay as they were.
/// - SentencePiece Unigram `.model` and Unigram tokenizer.json (T5 style): the new
///   pieces are appended with a score that is the larger of their log frequency on the
///   target text and the sum of the two pieces they join plus 0.1, so the Viterbi search
///   takes a new piece wherever the pair it joins was the best segmentation. Unlike BPE,
///   text elsewhere may then be segmented differently where a new piece scores higher.
/// - BPE tokenizer.json, byte-level (GPT-2, Llama 3, Qwen, DeepSeek) or with byte fallback
///   (Mistral's and Gemma's tokenizer.json): the new tokens get ids after every existing id
///   (vocabulary and added tokens) and their merges are appended after the base's, in the
///   base's merge format, so the base's merges all apply first. Added tokens missing from
///   the model's vocabulary (Llama 3's specials) are entered there under their ids, as
///   Hugging Face tokenizers numbers added tokens that are not in the vocabulary from its
///   size up and would otherwise move them.
///
/// For a tokenizer.json the text is cut into words by the base's own normalizer and
/// pre-tokenizer (after the added tokens' text is taken out), so no new token spans two
/// pre-tokens.
#include <cstdint>
#include <string>
#include <vector>

#include "rhine/core/json.h"
#include "rhine/tokenizer/sentencepiece.h"

namespace rhine::tokenizer {

/// Options of extend_vocabulary.
struct ExtendOptions {
  /// Pieces to add at most (fewer when no pair is seen min_frequency times).
  std::int32_t new_tokens = 1000;
  /// A pair seen fewer times in the text is not added.
  std::int64_t min_frequency = 2;
  /// Longest new piece in bytes (SentencePiece's own max_sentencepiece_length is 16 characters).
  std::int32_t max_piece_bytes = 32;
  /// Threads for segmenting the text of a SentencePiece base (0: rhine::default_thread_count());
  /// a tokenizer.json base is segmented on one thread.
  int threads = 0;
};

/// The result: the extended model and what each addition saves on the text.
struct VocabExtension {
  SpmModelProto model;                ///< SentencePiece base: base pieces, then the new ones
  Json tokenizer_json;                ///< tokenizer.json base: the extended file (null otherwise)
  std::int32_t base_size = 0;         ///< ids of the base (one past the largest); new ids start here
  std::vector<std::string> added;     ///< the new pieces, in id order
  std::vector<std::int64_t> saved;    ///< tokens each addition saved on the text, when it was added
  std::int64_t tokens_before = 0;     ///< the text's tokens under the base
  /// The extended `.model`: `base_bytes` (the base file, unchanged) followed by the new
  /// pieces, so every other field of the base survives byte for byte.
  std::string model_bytes(const std::string& base_bytes) const;
};

/// Extends `base` (BPE or Unigram) for `texts` (lines of target-language text). Throws
/// rhine::Error "[tokenizer_extend] ..." for another model type, no text, or new_tokens < 1.
VocabExtension extend_vocabulary(const SpmModelProto& base, const std::vector<std::string>& texts,
                                 const ExtendOptions& options = {});

/// Extends a parsed tokenizer.json `base` (BPE or Unigram) for `texts`; the result's
/// tokenizer_json is the extended file (every other key's value as in the base). `source` names the
/// file in errors. Throws rhine::Error "[tokenizer_extend] ..." for another model (WordPiece,
/// WordLevel), a BPE with continuing_subword_prefix / end_of_word_suffix, a Unigram with
/// added tokens past its vocabulary, added-token ids out of range or leaving a hole, no text,
/// or new_tokens < 1.
VocabExtension extend_tokenizer_json(const Json& base, const std::vector<std::string>& texts,
                                     const ExtendOptions& options = {}, const std::string& source = "tokenizer.json");

}  // namespace rhine::tokenizer
