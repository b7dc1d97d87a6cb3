#pragma once
// UTF-8 helpers with libsentencepiece's exact semantics (string_util.h), internal to
// rhine_tokenizer.

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace rhine::tokenizer::utf8 {

/// Length of the character whose lead byte is `b` (1 for continuation bytes), as
/// SentencePiece's OneCharLen.
inline int one_char_len(uint8_t b) { return "\1\1\1\1\1\1\1\1\1\1\1\1\2\2\3\4"[b >> 4]; }

inline bool is_trail(uint8_t b) { return (b & 0xC0) == 0x80; }
inline bool is_valid_codepoint(uint32_t c) { return c < 0xD800 || (c >= 0xE000 && c <= 0x10FFFF); }

/// Decodes the first character of `s` (non-empty). Returns true when it is valid UTF-8
/// (shortest form, no surrogates); `*len` is its length, or 1 when invalid.
/// (SentencePiece's IsValidDecodeUTF8.)
inline bool decode_valid(std::string_view s, std::size_t* len, uint32_t* cp_out = nullptr) {
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  const std::size_t n = s.size();
  uint32_t cp = 0xFFFD;
  bool ok = false;
  if (p[0] < 0x80) {
    *len = 1;
    if (cp_out) *cp_out = p[0];
    return true;
  } else if (n >= 2 && (p[0] & 0xE0) == 0xC0) {
    cp = ((p[0] & 0x1Fu) << 6) | (p[1] & 0x3Fu);
    ok = is_trail(p[1]) && cp >= 0x80 && is_valid_codepoint(cp);
    *len = 2;
  } else if (n >= 3 && (p[0] & 0xF0) == 0xE0) {
    cp = ((p[0] & 0x0Fu) << 12) | ((p[1] & 0x3Fu) << 6) | (p[2] & 0x3Fu);
    ok = is_trail(p[1]) && is_trail(p[2]) && cp >= 0x800 && is_valid_codepoint(cp);
    *len = 3;
  } else if (n >= 4 && (p[0] & 0xF8) == 0xF0) {
    cp = ((p[0] & 0x07u) << 18) | ((p[1] & 0x3Fu) << 12) | ((p[2] & 0x3Fu) << 6) | (p[3] & 0x3Fu);
    ok = is_trail(p[1]) && is_trail(p[2]) && is_trail(p[3]) && cp >= 0x10000 && is_valid_codepoint(cp);
    *len = 4;
  }
  if (!ok) {
    *len = 1;
    cp = 0xFFFD;
  }
  if (cp_out) *cp_out = cp;
  return ok;
}

}  // namespace rhine::tokenizer::utf8
