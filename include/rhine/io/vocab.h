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
/// - "random": normal with the mean and standard deviation of the base rows (per matrix),
///   the baseline the others are measured against.
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

namespace rhine {
class Tokenizer;
}

namespace rhine::io {

/// Options of extend_hf_vocabulary.
struct VocabResizeOptions {
  /// "mean" or "random" (see the file comment).
  std::string init = "mean";
  /// Seed of "random".
  std::uint64_t seed = 1;
  /// The tokenizer the model was trained with; default: `dir`'s tokenizer.model.
  std::filesystem::path base_tokenizer;
  /// Replace an existing output directory.
  bool overwrite = false;
};

/// For each token of `extended` with id >= base.vocab_size(): the base ids that spell it,
/// fewest pieces first (ties: the higher-scoring, i.e. lower-id, pieces). Throws
/// rhine::Error "[vocab_resize] ..." when `extended` does not keep the base's tokens
/// (a different tokenizer) or a new token cannot be spelled.
std::vector<std::vector<std::int32_t>> base_pieces_of_new_tokens(const Tokenizer& base, const Tokenizer& extended);

/// `weight` [V, C] with rows first .. first + pieces.size() - 1 initialised by `init` from
/// `pieces` (base_pieces_of_new_tokens): grown to [max(V, first + new), C] where needed
/// (rows the model had past `first`, padding of a rounded-up vocabulary, are overwritten).
/// Rows below `first` are unchanged; dtype and device kept.
at::Tensor grow_rows(const at::Tensor& weight, std::int64_t first, const std::vector<std::vector<std::int32_t>>& pieces,
                     const VocabResizeOptions& options);

/// Writes HF directory `out`: the model of `dir` with vocab_size grown to the extended
/// tokenizer's size (padding rows past the base tokenizer's end are kept where the model had
/// them), embedding, head and MTP copies grown by grow_rows, config.json's vocab_size
/// updated (other keys kept), and the extended tokenizer as tokenizer.model and
/// tokenizer.json. Returns the new vocab_size.
std::int64_t extend_hf_vocabulary(const std::filesystem::path& dir, const std::filesystem::path& out,
                                  const std::filesystem::path& extended_tokenizer, const VocabResizeOptions& options = {});

}  // namespace rhine::io
