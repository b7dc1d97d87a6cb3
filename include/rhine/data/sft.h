#pragma once
/// \file
/// Batches of supervised fine-tuning examples for the Trainer.
///
///     auto examples = rhine::load_sft_examples(o, tokenizer);   // rhine/tokenizer/chat.h
///     rhine::SftLoaderOptions lo;  lo.batch_size = 8;  lo.seq_len = 512;
///     rhine::SftLoader loader(examples, lo);                     // a BatchSource
///
/// Dimension letters: b rows on this rank, T tokens per row.

#include <cstdint>
#include <string>
#include <vector>

#include "rhine/data/batch.h"
#include "rhine/tokenizer/chat.h"

namespace rhine {

/// Options of SftLoader.
struct SftLoaderOptions {
  /// Global rows per step (all ranks); a multiple of world_size.
  std::int64_t batch_size = 8;
  /// Tokens per row (T); examples longer than T + 1 tokens are cut.
  std::int64_t seq_len = 512;
  /// Several examples per row (document boundaries as DataLoader's packed
  /// mode); off = one example per row.
  bool pack = true;
  /// Filler of unused positions (its labels are -100).
  std::int32_t pad_id = 0;
  std::uint64_t seed = 0;
  int rank = 0;
  int world_size = 1;
};

/// Batches of SFT examples for the Trainer. Each epoch visits the examples in
/// a fresh seeded shuffle; rows are filled greedily in that order (an example
/// that does not fit starts the next row). A row's example of tokens
/// x_0..x_n contributes inputs x_0..x_{n-1} and labels x_1..x_n, a label
/// being -100 where x_t is not a target. position_ids restart at every
/// example, so the Trainer's per-document attention keeps examples apart.
/// Every rank builds the same global rows and keeps rows [r * b, (r + 1) * b);
/// the state (epoch, position) is equal on all ranks.
class SftLoader : public BatchSource {
 public:
  /// Keeps a reference to `examples` (it must outlive the loader).
  SftLoader(const SftExamples& examples, SftLoaderOptions options);

  Batch next() override;
  const std::vector<std::string>& languages() const override;
  std::string state() const override;
  void load_state(const std::string& state) override;

  /// Epochs started so far (1 during the first).
  std::int64_t epoch() const { return epoch_; }

 private:
  void start_epoch();
  const SftExamples& data_;
  SftLoaderOptions o_;
  std::vector<std::size_t> order_;
  std::int64_t epoch_ = 0, cursor_ = 0, step_ = 0;
};

}  // namespace rhine
