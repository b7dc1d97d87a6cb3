#pragma once
/// \file
/// What the Trainer consumes: a `Batch` of [b, T] tensors and the
/// `BatchSource` interface that produces them. Two sources ship with Rhine:
/// `DataLoader` (pretraining on token shards, rhine/data/loader.h) and
/// `SftLoader` (supervised fine-tuning on JSONL conversations,
/// rhine/data/sft.h). A program with its own data implements BatchSource.
///
/// Dimension letters: b rows on this rank, T tokens per row.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

namespace rhine {

/// One step's batch for this rank.
struct Batch {
  at::Tensor input_ids;     ///< [b, T] int64
  at::Tensor labels;        ///< [b, T] int64: next token, or -100 (no loss)
  at::Tensor position_ids;  ///< [b, T] int64: restart at row and document starts
  at::Tensor doc_ids;       ///< [b, T] int64: document number within the row
  std::vector<int> row_language;                 ///< [b] index into languages()
  std::vector<std::int64_t> tokens_per_language; ///< input tokens per language (this rank)
  std::int64_t step = 0;                         ///< 0 for the first batch
};

/// A deterministic, resumable stream of batches. The Trainer calls next()
/// grad_accum times per optimizer step and stores state() in each checkpoint;
/// load_state() on a freshly built source with the same data and options must
/// continue with exactly the batches the uninterrupted stream would have
/// produced. In a data-parallel run every rank builds its own source (with its
/// rank) and the states of all ranks must be equal (the Trainer saves rank 0's).
class BatchSource {
 public:
  virtual ~BatchSource() = default;
  /// The next batch.
  virtual Batch next() = 0;
  /// Language names, sorted; Batch::row_language and tokens_per_language index them.
  virtual const std::vector<std::string>& languages() const = 0;
  /// JSON text of the position after the last batch returned by next().
  virtual std::string state() const = 0;
  /// Continues from a state(); throws rhine::Error when it was taken with other data or options.
  virtual void load_state(const std::string& state) = 0;
};

}  // namespace rhine
