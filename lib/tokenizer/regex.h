#pragma once
// PCRE2 regexes for tokenizer.json patterns (Split, Replace, ByteLevel), internal to
// rhine_tokenizer: UTF + UCP mode so \p{L}, \p{N}, \s follow Unicode, lookahead works, and
// JIT compiled when the platform allows. Never std::regex (no \p{..}).

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace rhine::tokenizer {

/// A compiled pattern. Immutable; `find_all` may be called from many threads at once
/// (match data and JIT stacks are per thread).
class Regex {
 public:
  /// Compiles an HF/Oniguruma-style pattern; throws rhine::Error naming `source` and the
  /// PCRE2 message when it does not compile.
  Regex(const std::string& pattern, const std::string& source);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  /// Appends the [begin, end) byte ranges of the successive non-overlapping, non-empty
  /// matches in `text` (valid UTF-8) to `out`.
  void find_all(std::string_view text, std::vector<std::pair<uint32_t, uint32_t>>& out) const;
  const std::string& pattern() const { return pattern_; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string pattern_;
};

/// The GPT-2 pre-tokenizer pattern (ByteLevel with use_regex).
inline constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

/// `s` with regex metacharacters escaped (HF turns String patterns into escaped regexes).
std::string regex_escape(std::string_view s);

}  // namespace rhine::tokenizer
