#pragma once
/// \file
/// Growing a model's vocabulary: the rows of the input embedding and the output head for the
/// tokens an extended tokenizer adds (rhine/tokenizer/extend.h, `rhine-tokenizer extend`),
/// and the HF directory of the resized model (`rhine-convert extend-vocab`).
///
///     rhine::io::VocabResizeOptions o;
///     o.init = "mean";
///     rhine::io::extend_hf_vocabulary("base_model/", "base_model-nl/", "tok-nl.model", o);
///
/// Initialisations of a new token's rows (`init`):
/// - "mean" (FVT, Gee et al. 2022, "Fast Vocabulary Transfer"): the mean of the base rows of
///   the base pieces that spell the new token (its fewest-pieces segmentation into base
///   pieces; bytes for characters the base lacks). The same for the head's rows.
/// - "focus" (FOCUS, Dobler and de Melo 2023): auxiliary token vectors are trained on
///   target-language text (`focus_text`) tokenized with the extended tokenizer, fastText-style
///   (skip-gram with negative sampling, each token's vector the mean of its own vector and
///   hashed character 3..6-gram vectors); a new token's row is then the weighted sum of base
///   rows with weights sparsemax(cosine similarities of its auxiliary vector to the base
///   tokens'), so a few base tokens used in similar contexts or spelled alike carry it. Base
///   tokens seen fewer than `focus_min_count` times are not candidates; a new token seen fewer
///   times falls back to "mean". The same weights serve the head's rows.
/// - "random": normal with the mean and standard deviation of the base rows (per matrix),
///   the baseline the others are measured against.
///
/// extend_hf_vocabulary writes, beside the model, `vocab_init.json`: for every new token the
/// base ids and weights its rows were made from (empty lists under "random").
#include <cstdint>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

namespace rhine {
class Tokenizer;
}

namespace rhine::io {

/// Options of extend_hf_vocabulary.
struct VocabResizeOptions {
  /// "mean", "focus" or "random" (see the file comment).
  std::string init = "mean";
  /// Seed of "random".
  std::uint64_t seed = 1;
  /// The tokenizer the model was trained with; default: `dir`'s tokenizer.model, else its
  /// tokenizer.json.
  std::filesystem::path base_tokenizer;
  /// Replace an existing output directory.
  bool overwrite = false;
  /// "focus": files of target-language text, one line per sentence or paragraph.
  std::vector<std::filesystem::path> focus_text;
  /// "focus": size of the auxiliary vectors, passes over the text, context window (tokens
  /// each side, at most), negative samples per context token.
  int focus_dim = 100, focus_epochs = 10, focus_window = 5, focus_negatives = 5;
  /// "focus": fewest occurrences in the text for a token to take part.
  std::int64_t focus_min_count = 3;
};

/// One new row: the base rows it is made of and their weights (row = sum w * base[id]).
using RowRecipe = std::vector<std::pair<std::int32_t, float>>;

/// Sparsemax (Martins and Astudillo 2016): the Euclidean projection of `z` onto the
/// probability simplex, max(z - tau, 0) with tau such that the result sums to 1.
std::vector<float> sparsemax(const std::vector<float>& z);

/// Auxiliary token vectors of "focus".
struct TokenVectors {
  int dim = 0;
  std::vector<float> vectors;        ///< [vocab, dim], unit length (zero for a token never seen)
  std::vector<std::int64_t> counts;  ///< occurrences of each token in the text
};

/// fastText-style skip-gram with negative sampling over `corpus` (token id sequences of a
/// vocabulary whose strings are `tokens`), with the options' focus_* sizes and `seed`;
/// deterministic for a seed. A token's vector is the mean of its own input vector and its
/// character n-gram vectors (n = 3..6 over code points, "<" and ">" around the token,
/// SentencePiece's word mark read as "<"), normalised to unit length.
TokenVectors train_token_vectors(const std::vector<std::vector<std::int32_t>>& corpus,
                                 const std::vector<std::string>& tokens, const VocabResizeOptions& options);

/// FOCUS recipes for tokens base_size .. aux.counts.size() - 1: sparsemax over the cosine
/// similarities to the base tokens that are `candidate` and seen >= min_count times; a new
/// token seen fewer times gets `fallback[i]`.
std::vector<RowRecipe> focus_recipes(const TokenVectors& aux, std::int32_t base_size, const std::vector<bool>& candidate,
                                     std::int64_t min_count, const std::vector<RowRecipe>& fallback);

/// For each token of `extended` with id >= base.vocab_size(): the base ids that spell it,
/// fewest pieces first (ties: the higher-scoring, i.e. lower-id, pieces). Throws
/// rhine::Error "[vocab_resize] ..." when `extended` does not keep the base's tokens
/// (a different tokenizer) or a new token cannot be spelled.
std::vector<std::vector<std::int32_t>> base_pieces_of_new_tokens(const Tokenizer& base, const Tokenizer& extended);

/// The recipes of the new tokens' rows under options.init ("mean": equal weights over
/// base_pieces_of_new_tokens; "focus": focus_recipes, which reads options.focus_text;
/// "random": empty recipes).
std::vector<RowRecipe> new_row_recipes(const Tokenizer& base, const Tokenizer& extended, const VocabResizeOptions& options);

/// `weight` [V, C] with rows first .. first + recipes.size() - 1 made from `recipes`
/// (new_row_recipes; random normal rows under "random"): grown to [max(V, first + new), C] where needed
/// (rows the model had past `first`, padding of a rounded-up vocabulary, are overwritten).
/// Rows below `first` are unchanged; dtype and device kept.
at::Tensor grow_rows(const at::Tensor& weight, std::int64_t first, const std::vector<RowRecipe>& recipes,
                     const VocabResizeOptions& options);

/// Writes HF directory `out`: the model of `dir` with vocab_size grown to the extended
/// tokenizer's size (padding rows past the base tokenizer's end are kept where the model had
/// them), embedding, head and MTP copies grown by grow_rows, config.json's vocab_size
/// updated (other keys kept), the extended tokenizer under its HF names (a `.model` as
/// tokenizer.model plus tokenizer.json, a tokenizer.json as tokenizer.json:
/// write_tokenizer_files of rhine/io/hf.h), and vocab_init.json (the recipes). Returns the new vocab_size.
std::int64_t extend_hf_vocabulary(const std::filesystem::path& dir, const std::filesystem::path& out,
                                  const std::filesystem::path& extended_tokenizer, const VocabResizeOptions& options = {});

}  // namespace rhine::io
