// tokenizer.json post-processors and decoders (hf_stages.h).
#include "hf_stages.h"
#include "rhine/core/error.h"
#include "utf8.h"

namespace rhine::tokenizer {

namespace {

// UTF-8 with each maximal invalid subpart replaced by one U+FFFD (Rust from_utf8_lossy,
// WHATWG TextDecoder).
std::string utf8_lossy(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  for (std::size_t i = 0; i < s.size();) {
    std::size_t len;
    if (utf8::decode_valid(s.substr(i), &len)) {
      out.append(s.substr(i, len));
      i += len;
      continue;
    }
    const unsigned char c = p[i];
    std::size_t need = 0;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) need = 1;
    else if (c >= 0xE0 && c <= 0xEF) {
      need = 2;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      need = 3;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    }
    std::size_t k = 1;
    for (; need > 0 && k <= need && i + k < s.size(); ++k) {
      const unsigned char t = p[i + k];
      if (t < lo || t > hi) break;
      lo = 0x80;
      hi = 0xBF;
    }
    out += "\xEF\xBF\xBD";
    i += k;
  }
  return out;
}

}  // namespace

TemplateProcessor::TemplateProcessor(const Json& j, const std::string& source) {
  const Json& single = j.at("single");
  const Json& specials = j.contains("special_tokens") ? j["special_tokens"] : Json::object();
  RHINE_CHECK(single.is_array(), "tokenizer", "TemplateProcessing.single of " + detail::quote(source) + " is not an array",
              Verbatim{single.dump().substr(0, 80)}, "a list of {\"SpecialToken\"} and {\"Sequence\"} items");
  bool seen_a = false;
  for (const Json& item : single) {
    if (item.contains("Sequence")) {
      seen_a = true;
      continue;
    }
    const Json& st = item.at("SpecialToken");
    const std::string name = st.at("id").get<std::string>();
    RHINE_CHECK(specials.contains(name), "tokenizer", "TemplateProcessing of " + detail::quote(source) +
                " names a special token missing from special_tokens", name, "list it in special_tokens");
    for (const Json& id : specials[name].at("ids")) (seen_a ? suffix_ : prefix_).push_back(id.get<int32_t>());
  }
}

void TemplateProcessor::process(Encoding& e, bool add_special) const {
  if (!add_special || (prefix_.empty() && suffix_.empty())) return;
  const uint32_t end = e.offsets.empty() ? 0 : e.offsets.back().second;
  e.ids.insert(e.ids.begin(), prefix_.begin(), prefix_.end());
  e.offsets.insert(e.offsets.begin(), prefix_.size(), {0, 0});
  e.special.insert(e.special.begin(), prefix_.size(), 1);
  e.ids.insert(e.ids.end(), suffix_.begin(), suffix_.end());
  e.offsets.insert(e.offsets.end(), suffix_.size(), {end, end});
  e.special.insert(e.special.end(), suffix_.size(), 1);
}

void ByteLevelDecoder::decode(std::vector<std::string>& tokens) const {
  const auto& table = ByteLevelTable::get();
  std::string bytes;
  for (const auto& t : tokens) {
    const std::size_t mark = bytes.size();
    bool ok = true;
    for (std::size_t at = 0, len; at < t.size(); at += len) {
      uint32_t cp;
      if (!utf8::decode_valid(std::string_view(t).substr(at), &len, &cp) || cp >= table.cp_to_byte.size() ||
          table.cp_to_byte[cp] < 0) {
        ok = false;
        break;
      }
      bytes.push_back(static_cast<char>(table.cp_to_byte[cp]));
    }
    if (!ok) {
      bytes.resize(mark);
      bytes += t;
    }
  }
  tokens.assign(1, utf8_lossy(bytes));
}

void MetaspaceDecoder::decode(std::vector<std::string>& tokens) const {
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    std::string out;
    const std::string& t = tokens[i];
    for (std::size_t at = 0; at < t.size();) {
      if (!replacement_.empty() && t.compare(at, replacement_.size(), replacement_) == 0) {
        out.push_back(' ');
        at += replacement_.size();
      } else {
        out.push_back(t[at++]);
      }
    }
    if (i == 0 && strip_first_ && !out.empty() && out[0] == ' ') out.erase(0, 1);
    tokens[i] = std::move(out);
  }
}

void WordPieceDecoder::decode(std::vector<std::string>& tokens) const {
  auto replace_all = [](std::string& s, std::string_view from, std::string_view to) {
    for (std::size_t at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size()))
      s.replace(at, from.size(), to);
  };
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    std::string& t = tokens[i];
    if (i != 0) {
      if (!prefix_.empty() && t.compare(0, prefix_.size(), prefix_) == 0) t.erase(0, prefix_.size());
      else t.insert(0, 1, ' ');
    }
    if (cleanup_) {
      replace_all(t, " .", ".");
      replace_all(t, " ?", "?");
      replace_all(t, " !", "!");
      replace_all(t, " ,", ",");
      replace_all(t, " ' ", "'");
      replace_all(t, " n't", "n't");
      replace_all(t, " 'm", "'m");
      replace_all(t, " do not", " don't");
      replace_all(t, " 's", "'s");
      replace_all(t, " 've", "'ve");
      replace_all(t, " 're", "'re");
    }
  }
}

}  // namespace rhine::tokenizer
