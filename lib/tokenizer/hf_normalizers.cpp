// tokenizer.json helpers and normalizers (hf_stages.h).
#include <utf8proc.h>

#include <cstring>

#include "hf_stages.h"
#include "rhine/core/error.h"
#include "utf8.h"

namespace rhine::tokenizer {

// --- helpers ------------------------------------------------------------------------------

const ByteLevelTable& ByteLevelTable::get() {
  static const ByteLevelTable table = [] {
    ByteLevelTable t;
    t.cp_to_byte.fill(-1);
    uint32_t n = 0;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      t.byte_to_cp[b] = printable ? b : 0x100 + n++;
    }
    for (uint32_t b = 0; b < 256; ++b) {
      const uint32_t cp = t.byte_to_cp[b];
      t.cp_to_byte[cp] = static_cast<int16_t>(b);
      utf8proc_uint8_t buf[4];
      const auto len = utf8proc_encode_char(static_cast<utf8proc_int32_t>(cp), buf);
      t.byte_to_utf8[b].assign(reinterpret_cast<const char*>(buf), static_cast<std::size_t>(len));
    }
    return t;
  }();
  return table;
}

Pattern::Pattern(const Json& j, const std::string& source) {
  if (j.is_object() && j.contains("String") && j["String"].is_string()) {
    literal_ = j["String"].get<std::string>();
    RHINE_CHECK(!literal_.empty(), "tokenizer", "empty String pattern in " + detail::quote(source), literal_,
                "a pattern needs at least one character");
    return;
  }
  RHINE_CHECK(j.is_object() && j.contains("Regex") && j["Regex"].is_string(), "tokenizer",
              "a pattern in " + detail::quote(source) + " is neither {\"String\": ...} nor {\"Regex\": ...}",
              Verbatim{j.dump().substr(0, 160)}, "compare with a tokenizer.json written by HF tokenizers");
  regex_ = std::make_unique<Regex>(j["Regex"].get<std::string>(), source);
}

void Pattern::find_all(std::string_view text, std::vector<std::pair<uint32_t, uint32_t>>& out) const {
  if (regex_) {
    regex_->find_all(text, out);
    return;
  }
  for (std::size_t at = text.find(literal_); at != std::string_view::npos; at = text.find(literal_, at + literal_.size()))
    out.emplace_back(static_cast<uint32_t>(at), static_cast<uint32_t>(at + literal_.size()));
}

NormalizedString slice(const NormalizedString& s, std::size_t b, std::size_t e) {
  NormalizedString r;
  r.text.assign(s.text, b, e - b);
  r.align.assign(s.align.begin() + static_cast<std::ptrdiff_t>(b), s.align.begin() + static_cast<std::ptrdiff_t>(e) + 1);
  return r;
}

bool sanitize_utf8(NormalizedString& s) {
  std::size_t at = 0;
  for (std::size_t len; at < s.text.size(); at += len)
    if (!utf8::decode_valid(std::string_view(s.text).substr(at), &len)) break;
  if (at == s.text.size()) return false;
  NormalizedBuilder b;
  b.append(std::string_view(s.text).substr(0, at), 0);
  for (std::size_t i = 0; i < at; ++i) b.align[i] = s.align[i];
  for (std::size_t len; at < s.text.size(); at += len) {
    if (utf8::decode_valid(std::string_view(s.text).substr(at), &len)) {
      for (std::size_t i = 0; i < len; ++i) b.append(std::string_view(s.text).substr(at + i, 1), s.align[at + i]);
    } else {
      b.append("\xEF\xBF\xBD", s.align[at]);
    }
  }
  b.finish(s, s.align.back());
  return true;
}

namespace {

bool is_unicode_whitespace(uint32_t c) {  // Rust char::is_whitespace (White_Space)
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) ||
         c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// Next character of valid UTF-8 text at `at`: its code point and length.
inline uint32_t next_cp(std::string_view s, std::size_t at, std::size_t* len) {
  uint32_t cp;
  utf8::decode_valid(s.substr(at), len, &cp);
  return cp;
}

std::string utf8_of(uint32_t cp) {
  utf8proc_uint8_t buf[4];
  const auto n = utf8proc_encode_char(static_cast<utf8proc_int32_t>(cp), buf);
  return std::string(reinterpret_cast<const char*>(buf), static_cast<std::size_t>(n));
}

// Rewrites `s` character by character: fn(cp, builder, original offset) appends the output.
template <typename Fn>
void map_chars(NormalizedString& s, Fn&& fn) {
  NormalizedBuilder b;
  b.text.reserve(s.text.size());
  b.align.reserve(s.text.size() + 1);
  for (std::size_t at = 0, len; at < s.text.size(); at += len) {
    const uint32_t cp = next_cp(s.text, at, &len);
    fn(cp, std::string_view(s.text).substr(at, len), s.align[at], b);
  }
  b.finish(s, s.align.back());
}

std::string utf8proc_run(std::string_view text, int options) {
  utf8proc_uint8_t* out = nullptr;
  const auto n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(text.data()),
                              static_cast<utf8proc_ssize_t>(text.size()), &out,
                              static_cast<utf8proc_option_t>(options));
  RHINE_CHECK(n >= 0, "tokenizer", "utf8proc failed to normalize a text", utf8proc_errmsg(n),
              "the input must be valid UTF-8");
  std::string r(reinterpret_cast<const char*>(out), static_cast<std::size_t>(n));
  std::free(out);
  return r;
}

// A character before which a normalization unit may start: ASCII, or a letter that can
// never be the second element of a canonical composition (all but the Hangul jamo).
bool unit_start(uint32_t cp) {
  if (cp < 0x80) return true;
  if ((cp >= 0x1100 && cp <= 0x11FF) || (cp >= 0xA960 && cp <= 0xA97F) || (cp >= 0xD7B0 && cp <= 0xD7FF)) return false;
  const auto c = utf8proc_category(static_cast<utf8proc_int32_t>(cp));
  return c >= UTF8PROC_CATEGORY_LU && c <= UTF8PROC_CATEGORY_LO;
}

}  // namespace

// --- normalizers --------------------------------------------------------------------------

void UnicodeNormalizer::normalize(NormalizedString& s) const {
  sanitize_utf8(s);  // utf8proc rejects invalid UTF-8
  bool ascii = true;
  for (char c : s.text)
    if (static_cast<unsigned char>(c) >= 0x80) {
      ascii = false;
      break;
    }
  if (ascii) return;
  if (form_ == Form::nfc) {  // every code point below U+0300 is NFC-stable and composes with nothing before it
    bool below = true;
    for (std::size_t at = 0, len; below && at < s.text.size(); at += len) below = next_cp(s.text, at, &len) < 0x300;
    if (below) return;
  }
  int options = UTF8PROC_STABLE;
  switch (form_) {
    case Form::nfc: options |= UTF8PROC_COMPOSE; break;
    case Form::nfd: options |= UTF8PROC_DECOMPOSE; break;
    case Form::nfkc: options |= UTF8PROC_COMPOSE | UTF8PROC_COMPAT; break;
    case Form::nfkd: options |= UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT; break;
  }
  if (utf8proc_run(s.text, options) == s.text) return;  // common case: already normalized
  // Normalize unit by unit (a unit never interacts with its neighbours) so that each
  // output byte aligns to the start of the unit it came from.
  NormalizedBuilder b;
  std::size_t unit = 0;
  auto flush = [&](std::size_t end) {
    if (end == unit) return;
    const std::string_view u = std::string_view(s.text).substr(unit, end - unit);
    if (u.size() == 1) b.append(u, s.align[unit]);
    else b.append(utf8proc_run(u, options), s.align[unit]);
    unit = end;
  };
  for (std::size_t at = 0, len; at < s.text.size(); at += len) {
    const uint32_t cp = next_cp(s.text, at, &len);
    if (unit_start(cp)) flush(at);
  }
  flush(s.text.size());
  b.finish(s, s.align.back());
}

void LowercaseNormalizer::normalize(NormalizedString& s) const {
  map_chars(s, [](uint32_t cp, std::string_view bytes, uint32_t o, NormalizedBuilder& b) {
    if (cp < 0x80) {
      const char c = static_cast<char>(cp >= 'A' && cp <= 'Z' ? cp + 32 : cp);
      b.append(std::string_view(&c, 1), o);
    } else if (cp == 0x130) {  // İ: the one unconditional multi-character lowercase mapping
      b.append("i\xCC\x87", o);
    } else {
      const auto l = static_cast<uint32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(cp)));
      if (l == cp) b.append(bytes, o);
      else b.append(utf8_of(l), o);
    }
  });
}

void StripNormalizer::normalize(NormalizedString& s) const {
  std::size_t b = 0, e = s.text.size();
  if (left_) {
    for (std::size_t len; b < e; b += len)
      if (!is_unicode_whitespace(next_cp(s.text, b, &len))) break;
  }
  if (right_) {
    while (e > b) {
      std::size_t start = e - 1;
      while (start > b && (static_cast<unsigned char>(s.text[start]) & 0xC0) == 0x80) --start;
      std::size_t len;
      if (!is_unicode_whitespace(next_cp(s.text, start, &len))) break;
      e = start;
    }
  }
  if (b == 0 && e == s.text.size()) return;
  s = slice(s, b, e);
}

RegexReplaceNormalizer::RegexReplaceNormalizer(const std::string& regex, std::string content, const std::string& source)
    : regex_(regex, source), content_(std::move(content)) {}

void RegexReplaceNormalizer::normalize(NormalizedString& s) const {
  sanitize_utf8(s);  // PCRE2 needs valid UTF-8
  std::vector<std::pair<uint32_t, uint32_t>> m;
  regex_.find_all(s.text, m);
  if (m.empty()) return;
  NormalizedBuilder b;
  std::size_t at = 0;
  for (const auto& [mb, me] : m) {
    for (; at < mb; ++at) b.append(std::string_view(s.text).substr(at, 1), s.align[at]);
    b.append(content_, s.align[mb]);
    at = me;
  }
  for (; at < s.text.size(); ++at) b.append(std::string_view(s.text).substr(at, 1), s.align[at]);
  b.finish(s, s.align.back());
}

void BertNormalizer::normalize(NormalizedString& s) const {
  if (clean_) {
    map_chars(s, [](uint32_t cp, std::string_view bytes, uint32_t o, NormalizedBuilder& b) {
      if (cp == 0 || cp == 0xFFFD) return;
      if (cp == '\t' || cp == '\n' || cp == '\r' || is_unicode_whitespace(cp)) {
        b.append(" ", o);
        return;
      }
      const auto c = utf8proc_category(static_cast<utf8proc_int32_t>(cp));
      if (c == UTF8PROC_CATEGORY_CC || c == UTF8PROC_CATEGORY_CF || c == UTF8PROC_CATEGORY_CN ||
          c == UTF8PROC_CATEGORY_CO)
        return;
      b.append(bytes, o);
    });
  }
  if (chinese_) {
    map_chars(s, [](uint32_t cp, std::string_view bytes, uint32_t o, NormalizedBuilder& b) {
      const bool cjk = (cp >= 0x4E00 && cp <= 0x9FFF) || (cp >= 0x3400 && cp <= 0x4DBF) ||
                       (cp >= 0x20000 && cp <= 0x2A6DF) || (cp >= 0x2A700 && cp <= 0x2B73F) ||
                       (cp >= 0x2B740 && cp <= 0x2B81F) || (cp >= 0x2B920 && cp <= 0x2CEAF) ||
                       (cp >= 0xF900 && cp <= 0xFAFF) || (cp >= 0x2F800 && cp <= 0x2FA1F);
      if (cjk) b.append(" ", o);
      b.append(bytes, o);
      if (cjk) b.append(" ", o);
    });
  }
  if (strip_accents_) {
    UnicodeNormalizer(UnicodeNormalizer::Form::nfd).normalize(s);
    StripAccentsNormalizer().normalize(s);
  }
  if (lowercase_) LowercaseNormalizer().normalize(s);
}

void StripAccentsNormalizer::normalize(NormalizedString& s) const {
  map_chars(s, [](uint32_t cp, std::string_view bytes, uint32_t o, NormalizedBuilder& b) {
    if (cp >= 0x80 && utf8proc_category(static_cast<utf8proc_int32_t>(cp)) == UTF8PROC_CATEGORY_MN) return;
    b.append(bytes, o);
  });
}

void PrecompiledNormalizer::normalize(NormalizedString& s) const {
  if (map_.empty()) return;
  NormalizedBuilder b;
  for (std::size_t at = 0; at < s.text.size();) {
    std::string_view rep;
    const std::size_t n = map_.longest_match(std::string_view(s.text).substr(at), &rep);
    if (n > 0) {
      b.append(rep, s.align[at]);
      at += n;
    } else {
      std::size_t len;
      if (!utf8::decode_valid(std::string_view(s.text).substr(at), &len)) {
        b.append("\xEF\xBF\xBD", s.align[at]);  // malformed byte -> U+FFFD, as libsentencepiece
        at += 1;
        continue;
      }
      for (std::size_t i = 0; i < len; ++i) b.append(std::string_view(s.text).substr(at + i, 1), s.align[at + i]);
      at += len;
    }
  }
  b.finish(s, s.align.back());
}

}  // namespace rhine::tokenizer
