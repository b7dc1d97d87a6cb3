#pragma once
// tokenizer.json `added_tokens` matching, internal to rhine_tokenizer: leftmost-longest
// matches on the raw text, before normalization (as HF tokenizers does for special and
// non-normalized tokens, and @lenml/tokenizers for all of them), with lstrip / rstrip /
// single_word.

#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace rhine::tokenizer {

struct AddedToken {
  std::string content;
  int32_t id = 0;
  bool special = false, lstrip = false, rstrip = false, single_word = false, normalized = false;
};

class AddedTokenMatcher {
 public:
  void build(std::vector<AddedToken> tokens);
  bool empty() const { return tokens_.empty(); }
  const std::vector<AddedToken>& tokens() const { return tokens_; }

  /// One match: bytes [begin, end) of the text (whitespace absorbed by lstrip / rstrip
  /// included) and the token's id.
  struct Match {
    uint32_t begin, end;
    int32_t id;
  };
  /// Matches in `text` (valid UTF-8), left to right; special tokens only when `with_special`.
  void find(std::string_view text, bool with_special, std::vector<Match>& out) const;

 private:
  // Byte trie: child of (node, byte) in a hash map; terminal[node] = token index or -1.
  std::unordered_map<uint64_t, uint32_t> children_;
  std::vector<int32_t> terminal_;
  bool first_byte_[256] = {};
  std::vector<AddedToken> tokens_;
};

}  // namespace rhine::tokenizer
