#pragma once
/// \file
/// The training data loader: memory-mapped token shards in, batches of
/// [b, T] LibTorch tensors out, with a per-language mixture, exact resume and
/// data-parallel sharding.
///
/// Dimension letters: B global rows per step (all ranks), b = B / world_size
/// rows on this rank, T tokens per row (seq_len).
///
/// How rows are made. Each language is a stream of documents. A document
/// contributes `[bos] tokens [eos]` (bos/eos only when set). Rows are chunks of
/// T + 1 consecutive stream tokens; consecutive chunks overlap by one token, so
/// every token is an input exactly once and a label exactly once per epoch.
///  - Mode::packed: the documents of each epoch are shuffled and the stream is
///    read front to back (documents packed into rows).
///  - Mode::windows: the stream is in file order and the chunks (windows) are
///    visited in a shuffled order each epoch.
/// Both modes return document boundaries: `doc_ids` numbers the documents
/// within a row, `position_ids` restart at 0 at the row start and at every
/// document start, and the label of a position whose next token belongs to
/// another document is -100 (with per-document attention the model cannot
/// see across the boundary, so there is nothing to learn there).
///
/// Mixture. Before each global row the loader draws its language from the
/// active MixtureOptions (see mixture.h); a schedule of mixtures switches at
/// given steps (curriculum). Streams are infinite: a language that runs out
/// starts its next epoch with a new shuffle.
///
/// Determinism and resume. Everything derives from `seed`: the row sequence is
/// a pure function of (options, shards, seed). `state()` captures it after the
/// last batch returned; `load_state()` on a new loader continues with exactly
/// the batches the uninterrupted run would have produced.
///
/// Data parallel. All ranks walk the same global sequence of B rows per step;
/// rank r materialises rows [r * b, (r + 1) * b). The ranks' rows are disjoint
/// and together equal the single-process stream.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "rhine/data/batch.h"
#include "rhine/data/mixture.h"

namespace rhine {

/// Goldfish loss (Hans et al., NeurIPS 2024), Apertus' memorisation control:
/// the label of a position is dropped when a hash of the `h` tokens ending at
/// that position falls in 1/k of the hash space, so the model never sees every
/// token of a long passage as a target. The same context always drops the same
/// label, also across epochs and duplicates.
struct GoldfishOptions {
  /// Drop 1 in k labels (0: off).
  int k = 0;
  /// Context length hashed.
  int h = 13;
  std::uint64_t seed = 0;
};

/// Options of the DataLoader.
struct DataLoaderOptions {
  enum class Mode { packed, windows };
  /// Shard files (.tokens), directories (every *.tokens inside) or glob patterns.
  std::vector<std::string> shards;
  /// Global rows per step (all ranks together); a multiple of world_size.
  std::int64_t batch_size = 8;
  /// Tokens per row (T).
  std::int64_t seq_len = 256;
  Mode mode = Mode::packed;
  /// Mixture schedule: (first step, mixture) pairs in increasing step order,
  /// the first at step 0.
  std::vector<std::pair<std::int64_t, MixtureOptions>> mixture = {{0, MixtureOptions{}}};
  /// Inserted before / after every document when set.
  std::optional<std::int32_t> bos_id, eos_id;
  std::uint64_t seed = 0;
  int rank = 0;
  int world_size = 1;
  /// Batches prepared ahead by a background thread (0: prepare in next()).
  int prefetch = 2;
  GoldfishOptions goldfish;
  /// Verify every shard's token checksum when opening (reads all data once).
  bool verify = false;
};

/// The shard loader (a BatchSource; see the file comment).
class DataLoader : public BatchSource {
 public:
  explicit DataLoader(DataLoaderOptions options);
  ~DataLoader() override;
  DataLoader(const DataLoader&) = delete;
  DataLoader& operator=(const DataLoader&) = delete;

  /// The next batch.
  Batch next() override;

  /// Languages found in the shards, sorted; Batch fields index this list.
  const std::vector<std::string>& languages() const override;
  /// Tokens per language in the shards (counting bos/eos), indexed like languages().
  const std::vector<std::uint64_t>& tokens_per_language() const;
  /// Mixture probabilities in effect at `step`, indexed like languages().
  std::vector<double> probabilities(std::int64_t step) const;

  /// JSON text of the position after the last batch returned by next().
  std::string state() const override;
  /// Continues from a state(); throws when it was taken with other data or options.
  void load_state(const std::string& state) override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// Expands shard specs (files, directories: every *.tokens inside, glob
/// patterns) into a sorted, de-duplicated list; throws when nothing is found.
std::vector<std::string> expand_shard_paths(const std::vector<std::string>& specs);

/// The attention mask for packed rows: [b, 1, T, T] bool, true where query i
/// may see key j (same document and j <= i). doc_ids: [b, T].
at::Tensor document_causal_mask(const at::Tensor& doc_ids);

/// Drops labels in place following the goldfish rule. input_ids, labels: [b, T] int64.
void apply_goldfish(const at::Tensor& input_ids, at::Tensor& labels, const GoldfishOptions& options);

}  // namespace rhine
