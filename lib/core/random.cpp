#include "rhine/core/random.h"

#include "rhine/core/error.h"

namespace rhine {
namespace {

__extension__ typedef unsigned __int128 u128;  // GCC/Clang builtin

constexpr std::uint64_t rotl(std::uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

}  // namespace

std::uint64_t splitmix64(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

Rng::Rng(std::uint64_t seed, std::uint64_t stream) {
  std::uint64_t sm = seed ^ (stream * 0x9e3779b97f4a7c15ULL);
  for (auto& w : s_) w = splitmix64(sm);
}

Rng::result_type Rng::operator()() {
  const std::uint64_t result = rotl(s_[1] * 5, 7) * 9;
  const std::uint64_t t = s_[1] << 17;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = rotl(s_[3], 45);
  return result;
}

double Rng::uniform() { return static_cast<double>((*this)() >> 11) * 0x1.0p-53; }

std::uint64_t Rng::below(std::uint64_t n) {
  RHINE_CHECK(n > 0, "rng", "below(n) needs n > 0", n, "this is a bug in the caller");
  // Lemire (2019): multiply-shift with rejection of the biased low range.
  u128 m = static_cast<u128>((*this)()) * n;
  auto low = static_cast<std::uint64_t>(m);
  if (low < n) {
    const std::uint64_t threshold = (0 - n) % n;
    while (low < threshold) {
      m = static_cast<u128>((*this)()) * n;
      low = static_cast<std::uint64_t>(m);
    }
  }
  return static_cast<std::uint64_t>(m >> 64);
}

void Rng::set_state(const State& s) {
  RHINE_CHECK(s[0] | s[1] | s[2] | s[3], "rng", "xoshiro256** state must not be all zero",
              "0 0 0 0", "restore a state saved by Rng::state()");
  s_ = s;
}

}  // namespace rhine
