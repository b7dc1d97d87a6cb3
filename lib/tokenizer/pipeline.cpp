// Pipeline stages shared by every tokenizer format, and the factories that build them
// from tokenizer.json objects (one place that lists every "type").

#include "rhine/tokenizer/pipeline.h"

#include <algorithm>

#include "rhine/core/error.h"
#include "utf8.h"

namespace rhine::tokenizer {

NormalizedString::NormalizedString(std::string_view original, uint32_t base) : text(original) {
  align.resize(text.size() + 1);
  for (std::size_t i = 0; i <= text.size(); ++i) align[i] = base + static_cast<uint32_t>(i);
}

std::pair<uint32_t, uint32_t> NormalizedString::original_range(std::size_t b, std::size_t e) const {
  if (b >= e) return {align[b], align[b]};
  return {align[b], std::max(align[b], align[e])};
}

NormalizerSequence::NormalizerSequence(std::vector<std::unique_ptr<Normalizer>> stages) : stages_(std::move(stages)) {}
void NormalizerSequence::normalize(NormalizedString& s) const {
  for (const auto& n : stages_) n->normalize(s);
}

PreTokenizerSequence::PreTokenizerSequence(std::vector<std::unique_ptr<PreTokenizer>> stages)
    : stages_(std::move(stages)) {}
void PreTokenizerSequence::pre_tokenize(PreTokenizedString& s) const {
  for (const auto& p : stages_) p->pre_tokenize(s);
}

DecoderSequence::DecoderSequence(std::vector<std::unique_ptr<Decoder>> stages) : stages_(std::move(stages)) {}
void DecoderSequence::decode(std::vector<std::string>& tokens) const {
  for (const auto& d : stages_) d->decode(tokens);
}

void PrependNormalizer::normalize(NormalizedString& s) const {
  if (s.text.empty()) return;
  s.text.insert(0, prefix_);
  s.align.insert(s.align.begin(), prefix_.size(), s.align.front());
}

ReplaceNormalizer::ReplaceNormalizer(std::string pattern, std::string content)
    : pattern_(std::move(pattern)), content_(std::move(content)) {
  RHINE_CHECK(!pattern_.empty(), "tokenizer", "Replace normalizer needs a non-empty pattern", pattern_,
              "set pattern.String");
}

void ReplaceNormalizer::normalize(NormalizedString& s) const {
  std::string out;
  std::vector<uint32_t> align;
  out.reserve(s.text.size());
  align.reserve(s.text.size() + 1);
  for (std::size_t at = 0; at < s.text.size();) {
    if (s.text.compare(at, pattern_.size(), pattern_) == 0) {
      out += content_;
      align.insert(align.end(), content_.size(), s.align[at]);
      at += pattern_.size();
    } else {
      out.push_back(s.text[at]);
      align.push_back(s.align[at]);
      ++at;
    }
  }
  align.push_back(s.align.back());
  s.text = std::move(out);
  s.align = std::move(align);
}

ReplaceDecoder::ReplaceDecoder(std::string pattern, std::string content)
    : pattern_(std::move(pattern)), content_(std::move(content)) {
  RHINE_CHECK(!pattern_.empty(), "tokenizer", "Replace decoder needs a non-empty pattern", pattern_,
              "set pattern.String");
}

void ReplaceDecoder::decode(std::vector<std::string>& tokens) const {
  for (auto& t : tokens) {
    std::string out;
    for (std::size_t at = 0; at < t.size();) {
      if (t.compare(at, pattern_.size(), pattern_) == 0) {
        out += content_;
        at += pattern_.size();
      } else {
        out.push_back(t[at++]);
      }
    }
    t = std::move(out);
  }
}

void ByteFallbackDecoder::decode(std::vector<std::string>& tokens) const {
  std::vector<std::string> out;
  std::string bytes;
  std::size_t n_byte_tokens = 0;
  auto flush = [&] {
    if (n_byte_tokens == 0) return;
    // Valid UTF-8 as a whole -> one string; otherwise one U+FFFD per byte token (HF).
    bool valid = true;
    for (std::size_t at = 0; at < bytes.size();) {
      std::size_t len;
      if (!utf8::decode_valid(std::string_view(bytes).substr(at), &len)) {
        valid = false;
        break;
      }
      at += len;
    }
    if (valid) {
      out.push_back(bytes);
    } else {
      for (std::size_t i = 0; i < n_byte_tokens; ++i) out.emplace_back("\xEF\xBF\xBD");
    }
    bytes.clear();
    n_byte_tokens = 0;
  };
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  for (auto& t : tokens) {
    if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>' && hex(t[3]) >= 0 && hex(t[4]) >= 0) {
      bytes.push_back(static_cast<char>(hex(t[3]) * 16 + hex(t[4])));
      ++n_byte_tokens;
    } else {
      flush();
      out.push_back(std::move(t));
    }
  }
  flush();
  tokens = std::move(out);
}

void FuseDecoder::decode(std::vector<std::string>& tokens) const {
  std::string all;
  for (const auto& t : tokens) all += t;
  tokens.assign(1, std::move(all));
}

StripDecoder::StripDecoder(std::string content, int start, int stop)
    : content_(std::move(content)), start_(start), stop_(stop) {}

void StripDecoder::decode(std::vector<std::string>& tokens) const {
  if (content_.empty()) return;
  for (auto& t : tokens) {
    std::size_t b = 0, e = t.size();
    for (int i = 0; i < start_ && t.compare(b, content_.size(), content_) == 0 && b + content_.size() <= e; ++i)
      b += content_.size();
    for (int i = 0; i < stop_ && e >= b + content_.size() && t.compare(e - content_.size(), content_.size(), content_) == 0; ++i)
      e -= content_.size();
    t = t.substr(b, e - b);
  }
}

void BosEosProcessor::process(Encoding& e, bool add_special) const {
  if (!add_special) return;
  if (bos_ >= 0) {
    e.ids.insert(e.ids.begin(), bos_);
    e.offsets.insert(e.offsets.begin(), {0, 0});
    e.special.insert(e.special.begin(), 1);
  }
  if (eos_ >= 0) {
    const uint32_t end = e.offsets.empty() ? 0 : e.offsets.back().second;
    e.ids.push_back(eos_);
    e.offsets.push_back({end, end});
    e.special.push_back(1);
  }
}

// --- factories --------------------------------------------------------------------------

namespace {

std::string type_of(const Json& j, const char* stage, const std::string& source) {
  RHINE_CHECK(j.is_object() && j.contains("type") && j["type"].is_string(), "tokenizer",
              std::string("a ") + stage + " in " + detail::quote(source) + " has no string \"type\"",
              Verbatim{j.dump().substr(0, 160)}, "each stage is an object with a \"type\" key");
  return j["type"].get<std::string>();
}

std::string literal_pattern(const Json& j, const std::string& type, const std::string& source) {
  const Json& p = j.at("pattern");
  RHINE_CHECK(p.is_object() && p.contains("String") && p["String"].is_string(), "tokenizer",
              type + " in " + detail::quote(source) + " has a pattern Rhine cannot read yet",
              Verbatim{p.dump().substr(0, 160)}, "only {\"String\": ...} patterns are supported so far");
  return p["String"].get<std::string>();
}

[[noreturn]] void unknown_type(const char* stage, const std::string& type, const std::string& source,
                               const char* known) {
  RHINE_FAIL("tokenizer", std::string("unsupported ") + stage + " type in " + detail::quote(source), type,
             std::string("supported so far: ") + known);
}

}  // namespace

std::unique_ptr<Normalizer> make_normalizer(const Json& j, const std::string& source) {
  if (j.is_null()) return nullptr;
  const std::string type = type_of(j, "normalizer", source);
  try {
    if (type == "Sequence") {
      std::vector<std::unique_ptr<Normalizer>> stages;
      for (const auto& s : j.at("normalizers"))
        if (auto n = make_normalizer(s, source)) stages.push_back(std::move(n));
      return std::make_unique<NormalizerSequence>(std::move(stages));
    }
    if (type == "Prepend") return std::make_unique<PrependNormalizer>(j.at("prepend").get<std::string>());
    if (type == "Replace")
      return std::make_unique<ReplaceNormalizer>(literal_pattern(j, type, source), j.at("content").get<std::string>());
  } catch (const Json::exception& e) {
    RHINE_FAIL("tokenizer", "malformed " + type + " normalizer in " + detail::quote(source), Verbatim{e.what()},
               "compare with a tokenizer.json written by HF tokenizers");
  }
  unknown_type("normalizer", type, source, "Sequence, Prepend, Replace");
}

std::unique_ptr<PreTokenizer> make_pre_tokenizer(const Json& j, const std::string& source) {
  if (j.is_null()) return nullptr;
  const std::string type = type_of(j, "pre_tokenizer", source);
  try {
    if (type == "Sequence") {
      std::vector<std::unique_ptr<PreTokenizer>> stages;
      for (const auto& s : j.at("pretokenizers"))
        if (auto p = make_pre_tokenizer(s, source)) stages.push_back(std::move(p));
      return std::make_unique<PreTokenizerSequence>(std::move(stages));
    }
  } catch (const Json::exception& e) {
    RHINE_FAIL("tokenizer", "malformed " + type + " pre_tokenizer in " + detail::quote(source), Verbatim{e.what()},
               "compare with a tokenizer.json written by HF tokenizers");
  }
  unknown_type("pre_tokenizer", type, source, "Sequence");
}

std::unique_ptr<Decoder> make_decoder(const Json& j, const std::string& source) {
  if (j.is_null()) return nullptr;
  const std::string type = type_of(j, "decoder", source);
  try {
    if (type == "Sequence") {
      std::vector<std::unique_ptr<Decoder>> stages;
      for (const auto& s : j.at("decoders"))
        if (auto d = make_decoder(s, source)) stages.push_back(std::move(d));
      return std::make_unique<DecoderSequence>(std::move(stages));
    }
    if (type == "Replace")
      return std::make_unique<ReplaceDecoder>(literal_pattern(j, type, source), j.at("content").get<std::string>());
    if (type == "ByteFallback") return std::make_unique<ByteFallbackDecoder>();
    if (type == "Fuse") return std::make_unique<FuseDecoder>();
    if (type == "Strip")
      return std::make_unique<StripDecoder>(j.at("content").get<std::string>(), j.at("start").get<int>(),
                                            j.at("stop").get<int>());
  } catch (const Json::exception& e) {
    RHINE_FAIL("tokenizer", "malformed " + type + " decoder in " + detail::quote(source), Verbatim{e.what()},
               "compare with a tokenizer.json written by HF tokenizers");
  }
  unknown_type("decoder", type, source, "Sequence, Replace, ByteFallback, Fuse, Strip");
}

// --- special tokens ---------------------------------------------------------------------

void SpecialTokenMatcher::add(std::string text, int32_t id) {
  if (text.empty()) return;
  tokens_.emplace_back(std::move(text), id);
  std::stable_sort(tokens_.begin(), tokens_.end(),
                   [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
}

std::vector<SpecialTokenMatcher::Part> SpecialTokenMatcher::split(std::string_view text) const {
  std::vector<Part> parts;
  std::size_t plain_begin = 0;
  for (std::size_t at = 0; at < text.size();) {
    const std::pair<std::string, int32_t>* hit = nullptr;
    for (const auto& t : tokens_)
      if (text.compare(at, t.first.size(), t.first) == 0) {
        hit = &t;
        break;
      }
    if (!hit) {
      ++at;
      continue;
    }
    if (at > plain_begin) parts.push_back({static_cast<uint32_t>(plain_begin), static_cast<uint32_t>(at), -1});
    parts.push_back({static_cast<uint32_t>(at), static_cast<uint32_t>(at + hit->first.size()), hit->second});
    at += hit->first.size();
    plain_begin = at;
  }
  if (plain_begin < text.size())
    parts.push_back({static_cast<uint32_t>(plain_begin), static_cast<uint32_t>(text.size()), -1});
  return parts;
}

}  // namespace rhine::tokenizer
