// Added-token matching (added_tokens.h).
#include "added_tokens.h"

#include <utf8proc.h>

#include "utf8.h"

namespace rhine::tokenizer {

namespace {

uint32_t cp_at(std::string_view s, std::size_t at, std::size_t* len) {
  uint32_t cp;
  utf8::decode_valid(s.substr(at), len, &cp);
  return cp;
}

// Start of the character that ends at `end` (> 0).
std::size_t char_before(std::string_view s, std::size_t end) {
  std::size_t b = end - 1;
  while (b > 0 && (static_cast<unsigned char>(s[b]) & 0xC0) == 0x80) --b;
  return b;
}

bool is_ws(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) ||
         c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

bool is_word_char(uint32_t c) {  // Rust char::is_alphanumeric, plus '_' as HF's \w
  if (c < 0x80) return std::isalnum(static_cast<int>(c)) || c == '_';
  const auto k = utf8proc_category(static_cast<utf8proc_int32_t>(c));
  return (k >= UTF8PROC_CATEGORY_LU && k <= UTF8PROC_CATEGORY_LO) || (k >= UTF8PROC_CATEGORY_ND && k <= UTF8PROC_CATEGORY_NO);
}

}  // namespace

void AddedTokenMatcher::build(std::vector<AddedToken> tokens) {
  tokens_ = std::move(tokens);
  children_.clear();
  terminal_.assign(1, -1);
  for (std::size_t t = 0; t < tokens_.size(); ++t) {
    const std::string& c = tokens_[t].content;
    if (c.empty()) continue;
    first_byte_[static_cast<unsigned char>(c[0])] = true;
    uint32_t node = 0;
    for (char ch : c) {
      const uint64_t key = (static_cast<uint64_t>(node) << 8) | static_cast<unsigned char>(ch);
      auto it = children_.find(key);
      if (it == children_.end()) {
        it = children_.emplace(key, static_cast<uint32_t>(terminal_.size())).first;
        terminal_.push_back(-1);
      }
      node = it->second;
    }
    if (terminal_[node] < 0) terminal_[node] = static_cast<int32_t>(t);  // first of duplicates wins
  }
}

void AddedTokenMatcher::find(std::string_view text, bool with_special, std::vector<Match>& out) const {
  if (tokens_.empty()) return;
  uint32_t floor = 0;  // lstrip never reaches into the previous match
  for (std::size_t at = 0; at < text.size();) {
    if (!first_byte_[static_cast<unsigned char>(text[at])]) {
      ++at;
      continue;
    }
    // Longest token starting here.
    int32_t best = -1;
    std::size_t best_end = 0;
    uint32_t node = 0;
    for (std::size_t k = at; k < text.size(); ++k) {
      const auto it = children_.find((static_cast<uint64_t>(node) << 8) | static_cast<unsigned char>(text[k]));
      if (it == children_.end()) break;
      node = it->second;
      const int32_t t = terminal_[node];
      if (t >= 0 && (with_special || !tokens_[static_cast<std::size_t>(t)].special)) {
        best = t;
        best_end = k + 1;
      }
    }
    if (best >= 0) {
      const AddedToken& tok = tokens_[static_cast<std::size_t>(best)];
      // Only whole characters: a match must end on a character boundary.
      bool ok = best_end == text.size() || (static_cast<unsigned char>(text[best_end]) & 0xC0) != 0x80;
      if (ok && tok.single_word) {
        std::size_t len;
        if (at > 0 && is_word_char(cp_at(text, char_before(text, at), &len))) ok = false;
        if (best_end < text.size() && is_word_char(cp_at(text, best_end, &len))) ok = false;
      }
      if (ok) {
        std::size_t b = at, e = best_end;
        if (tok.lstrip) {
          while (b > floor) {
            const std::size_t p = char_before(text, b);
            std::size_t len;
            if (!is_ws(cp_at(text, p, &len))) break;
            b = p;
          }
        }
        if (tok.rstrip) {
          for (std::size_t len; e < text.size(); e += len)
            if (!is_ws(cp_at(text, e, &len))) break;
        }
        out.push_back({static_cast<uint32_t>(b), static_cast<uint32_t>(e), tok.id});
        floor = static_cast<uint32_t>(e);
        at = e;
        continue;
      }
    }
    std::size_t len;
    cp_at(text, at, &len);
    at += len;
  }
}

}  // namespace rhine::tokenizer
