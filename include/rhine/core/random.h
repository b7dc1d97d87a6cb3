#pragma once
/// \file
/// A small, fast random generator whose whole state saves and restores
/// exactly (for samplers and data loaders that must resume bit-identically),
/// and the seeding rule Rhine uses everywhere: one user seed, split into
/// independent streams by SplitMix64.

#include <array>
#include <cstdint>
#include <limits>

namespace rhine {

/// One step of SplitMix64 (Steele, Lea, Flood 2014): advances `state` and
/// returns the next output. Used to expand seeds.
std::uint64_t splitmix64(std::uint64_t& state);

/// xoshiro256** 1.0 (Blackman and Vigna). Satisfies UniformRandomBitGenerator.
class Rng {
 public:
  using result_type = std::uint64_t;
  using State = std::array<std::uint64_t, 4>;

  /// Seeds the four state words from SplitMix64 started at
  /// `seed ^ (stream * golden ratio)`, so (seed, stream) pairs give
  /// independent sequences (e.g. stream = rank or worker id).
  explicit Rng(std::uint64_t seed = 0, std::uint64_t stream = 0);

  result_type operator()();
  static constexpr result_type min() { return 0; }
  static constexpr result_type max() { return std::numeric_limits<result_type>::max(); }

  /// Uniform double in [0, 1) with 53 random bits.
  double uniform();
  /// Uniform integer in [0, n), unbiased (Lemire's method); n must be > 0.
  std::uint64_t below(std::uint64_t n);

  const State& state() const { return s_; }
  /// Restores a state taken with state(); rejects the all-zero state.
  void set_state(const State& s);

 private:
  State s_{};
};

}  // namespace rhine
