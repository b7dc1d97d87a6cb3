#include "rhine/data/sft.h"

#include <ATen/ops/from_blob.h>
#include <fmt/format.h>

#include <algorithm>

#include "rhine/core/error.h"
#include "rhine/core/json.h"
#include "rhine/core/random.h"

namespace rhine {
namespace {
constexpr const char* kComponent = "sft";
}  // namespace

// --- SftLoader ------------------------------------------------------------------

SftLoader::SftLoader(const SftExamples& examples, SftLoaderOptions options) : data_(examples), o_(options) {
  RHINE_CHECK(!data_.examples.empty(), kComponent, "no examples", 0, "");
  RHINE_CHECK(o_.world_size >= 1 && o_.rank >= 0 && o_.rank < o_.world_size, kComponent, "bad rank / world size",
              fmt::format("{}/{}", o_.rank, o_.world_size), "");
  RHINE_CHECK(o_.batch_size > 0 && o_.batch_size % o_.world_size == 0, kComponent,
              "batch_size must be a positive multiple of world_size", o_.batch_size, "");
  RHINE_CHECK(o_.seq_len >= 1, kComponent, "seq_len must be positive", o_.seq_len, "");
  start_epoch();
}

void SftLoader::start_epoch() {
  ++epoch_;
  cursor_ = 0;
  order_.resize(data_.examples.size());
  for (std::size_t i = 0; i < order_.size(); ++i) order_[i] = i;
  Rng rng(o_.seed, 0x736674 /* "sft" */ + static_cast<std::uint64_t>(epoch_));
  for (std::size_t i = order_.size(); i > 1; --i) std::swap(order_[i - 1], order_[rng.below(i)]);
}

const std::vector<std::string>& SftLoader::languages() const { return data_.languages; }

Batch SftLoader::next() {
  const std::int64_t B = o_.batch_size, T = o_.seq_len;
  const std::int64_t b = B / o_.world_size, r0 = o_.rank * b;
  std::vector<std::int64_t> ids(static_cast<std::size_t>(b * T), o_.pad_id), labels(ids.size(), -100),
      pos(ids.size(), 0), doc(ids.size(), 0);
  Batch batch;
  batch.row_language.assign(static_cast<std::size_t>(b), 0);
  batch.tokens_per_language.assign(data_.languages.size(), 0);
  for (std::int64_t row = 0; row < B; ++row) {
    // Every rank walks all rows (cheap: sizes only) and fills its own.
    const bool mine = row >= r0 && row < r0 + b;
    std::int64_t used = 0, n_docs = 0;
    while (used < T) {
      if (cursor_ == static_cast<std::int64_t>(order_.size())) start_epoch();
      const auto& ex = data_.examples[order_[static_cast<std::size_t>(cursor_)]];
      // Positions this example needs: tokens - 1 (inputs x_0..x_{n-1}), cut to a row.
      const std::int64_t need = std::min<std::int64_t>(static_cast<std::int64_t>(ex.tokens.size()) - 1, T);
      if (used > 0 && (!o_.pack || used + need > T)) break;
      ++cursor_;
      if (mine) {
        const std::int64_t base = (row - r0) * T + used;
        for (std::int64_t t = 0; t < need; ++t) {
          const auto i = static_cast<std::size_t>(base + t);
          ids[i] = ex.tokens[static_cast<std::size_t>(t)];
          if (ex.target[static_cast<std::size_t>(t + 1)]) labels[i] = ex.tokens[static_cast<std::size_t>(t + 1)];
          pos[i] = t;
          doc[i] = n_docs;
        }
        if (n_docs == 0) batch.row_language[static_cast<std::size_t>(row - r0)] = ex.language;
        batch.tokens_per_language[static_cast<std::size_t>(ex.language)] += need;
      }
      used += need;
      ++n_docs;
    }
    if (mine)  // padding: its own "document" with restarting positions and no labels
      for (std::int64_t t = used; t < T; ++t) {
        const auto i = static_cast<std::size_t>((row - r0) * T + t);
        pos[i] = t - used;
        doc[i] = n_docs;
      }
  }
  auto make = [&](std::vector<std::int64_t>& v) {
    return at::from_blob(v.data(), {b, T}, at::TensorOptions().dtype(at::kLong)).clone();
  };
  batch.input_ids = make(ids);
  batch.labels = make(labels);
  batch.position_ids = make(pos);
  batch.doc_ids = make(doc);
  batch.step = step_++;
  return batch;
}

std::string SftLoader::state() const {
  // epoch and cursor pin the position (the shuffle of an epoch derives from seed and epoch).
  return Json{{"type", "sft"},         {"epoch", epoch_},          {"cursor", cursor_},
              {"step", step_},         {"seed", o_.seed},          {"examples", data_.examples.size()},
              {"batch_size", o_.batch_size}, {"seq_len", o_.seq_len}, {"pack", o_.pack}}
      .dump();
}

void SftLoader::load_state(const std::string& state) {
  const Json j = Json::parse(state);
  RHINE_CHECK(j.value("type", "") == "sft", kComponent, "not an SftLoader state", state.substr(0, 100),
              "resume with the data source of the original run");
  const Json current = Json::parse(this->state());
  for (const char* k : {"seed", "examples", "batch_size", "seq_len", "pack"}) {
    const Json& mine = current.at(k);
    RHINE_CHECK(j.at(k) == mine, kComponent, fmt::format("the state was taken with another {}", k), j.at(k).dump(),
                fmt::format("this loader has {}; resume with the original data and options", mine.dump()));
  }
  const auto epoch = j.at("epoch").get<std::int64_t>();
  epoch_ = epoch - 1;
  start_epoch();  // rebuilds that epoch's shuffle
  cursor_ = j.at("cursor").get<std::int64_t>();
  step_ = j.at("step").get<std::int64_t>();
}

}  // namespace rhine
