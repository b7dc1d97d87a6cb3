#pragma once
// The fixed global batch the dist workers train on (dist_worker.cpp,
// fsdp_worker.cpp): B rows of T + 1 pseudo-random tokens, the same on every
// rank and in every process, so N ranks and one process see the same data.
#include <ATen/ops/from_blob.h>

#include <cstdint>
#include <vector>

namespace rhine::test {

/// Token t of row i of the global batch.
inline std::int64_t global_batch_token(std::int64_t i, std::int64_t t, std::int64_t vocab) {
  std::uint64_t x = static_cast<std::uint64_t>(i) * 1000003u + static_cast<std::uint64_t>(t) * 7919u + 12345u;
  x ^= x >> 13;
  x *= 0x9E3779B97F4A7C15ull;
  x ^= x >> 29;
  return static_cast<std::int64_t>(x % static_cast<std::uint64_t>(vocab));
}

/// Rows [first, first + b) of the global batch: [b, T + 1] int64.
inline at::Tensor global_batch_rows(std::int64_t first, std::int64_t b, std::int64_t T, std::int64_t vocab) {
  std::vector<std::int64_t> rows(static_cast<std::size_t>(b * (T + 1)));
  for (std::int64_t i = 0; i < b; ++i)
    for (std::int64_t t = 0; t <= T; ++t)
      rows[static_cast<std::size_t>(i * (T + 1) + t)] = global_batch_token(first + i, t, vocab);
  return at::from_blob(rows.data(), {b, T + 1}, at::kLong).clone();
}

}  // namespace rhine::test
