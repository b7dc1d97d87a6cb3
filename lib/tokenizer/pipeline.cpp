// Pipeline stages shared by every tokenizer format, and the factories that build them
// from tokenizer.json objects (one place that lists every "type").

#include "rhine/tokenizer/pipeline.h"

#include <algorithm>

#include "hf_stages.h"
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

std::string base64_decode(const std::string& in, const std::string& source) {
  auto value = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+' || c == '-') return 62;
    if (c == '/' || c == '_') return 63;
    return -1;
  };
  std::string out;
  uint32_t acc = 0;
  int bits = 0;
  for (char c : in) {
    if (c == '=' || c == '\n' || c == '\r') continue;
    const int v = value(c);
    RHINE_CHECK(v >= 0, "tokenizer", "precompiled_charsmap of " + detail::quote(source) + " is not base64",
                std::string(1, c), "the charsmap is the base64 of the SentencePiece blob");
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<char>((acc >> bits) & 0xFF));
    }
  }
  return out;
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
    if (type == "Replace") {
      const Json& p = j.at("pattern");
      if (p.is_object() && p.contains("Regex"))
        return std::make_unique<RegexReplaceNormalizer>(p["Regex"].get<std::string>(), j.at("content").get<std::string>(),
                                                        source);
      return std::make_unique<ReplaceNormalizer>(literal_pattern(j, type, source), j.at("content").get<std::string>());
    }
    if (type == "NFC") return std::make_unique<UnicodeNormalizer>(UnicodeNormalizer::Form::nfc);
    if (type == "NFD") return std::make_unique<UnicodeNormalizer>(UnicodeNormalizer::Form::nfd);
    if (type == "NFKC") return std::make_unique<UnicodeNormalizer>(UnicodeNormalizer::Form::nfkc);
    if (type == "NFKD") return std::make_unique<UnicodeNormalizer>(UnicodeNormalizer::Form::nfkd);
    if (type == "Lowercase") return std::make_unique<LowercaseNormalizer>();
    if (type == "StripAccents") return std::make_unique<StripAccentsNormalizer>();
    if (type == "Strip")
      return std::make_unique<StripNormalizer>(j.value("strip_left", true), j.value("strip_right", true));
    if (type == "BertNormalizer") {
      const bool lowercase = j.value("lowercase", true);
      const bool strip = j.contains("strip_accents") && !j["strip_accents"].is_null() ? j["strip_accents"].get<bool>() : lowercase;
      return std::make_unique<BertNormalizer>(j.value("clean_text", true), j.value("handle_chinese_chars", true), strip,
                                              lowercase);
    }
    if (type == "Precompiled") {
      const Json& c = j.at("precompiled_charsmap");
      if (c.is_null()) return nullptr;
      return std::make_unique<PrecompiledNormalizer>(base64_decode(c.get<std::string>(), source), source);
    }
  } catch (const Json::exception& e) {
    RHINE_FAIL("tokenizer", "malformed " + type + " normalizer in " + detail::quote(source), Verbatim{e.what()},
               "compare with a tokenizer.json written by HF tokenizers");
  }
  unknown_type("normalizer", type, source,
               "Sequence, Prepend, Replace, NFC, NFD, NFKC, NFKD, Lowercase, Strip, StripAccents, BertNormalizer, Precompiled");
}

namespace {

SplitBehavior behavior_of(const Json& j, const std::string& source, const char* fallback) {
  const std::string b = j.contains("behavior") && j["behavior"].is_string() ? j["behavior"].get<std::string>() : fallback;
  if (b == "Removed") return SplitBehavior::removed;
  if (b == "Isolated") return SplitBehavior::isolated;
  if (b == "MergedWithPrevious") return SplitBehavior::merged_with_previous;
  if (b == "MergedWithNext") return SplitBehavior::merged_with_next;
  if (b == "Contiguous") return SplitBehavior::contiguous;
  RHINE_FAIL("tokenizer", "unknown split behavior in " + detail::quote(source), b,
             "one of Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous");
}

}  // namespace

std::unique_ptr<PreTokenizer> make_pre_tokenizer(const Json& j, const std::string& source) {
  if (j.is_null()) return nullptr;
  const std::string type = type_of(j, "pre_tokenizer", source);
  using K = CharClassPreTokenizer::Kind;
  try {
    if (type == "Sequence") {
      std::vector<std::unique_ptr<PreTokenizer>> stages;
      for (const auto& s : j.at("pretokenizers"))
        if (auto p = make_pre_tokenizer(s, source)) stages.push_back(std::move(p));
      return std::make_unique<PreTokenizerSequence>(std::move(stages));
    }
    if (type == "Split")
      return std::make_unique<SplitPreTokenizer>(std::make_unique<Pattern>(j.at("pattern"), source),
                                                 behavior_of(j, source, "Isolated"), j.value("invert", false));
    if (type == "ByteLevel")
      return std::make_unique<ByteLevelPreTokenizer>(j.value("add_prefix_space", true), j.value("use_regex", true), source);
    if (type == "Metaspace") {
      const std::string rep = j.value("replacement", std::string("\xE2\x96\x81"));
      RHINE_CHECK(!rep.empty(), "tokenizer", "Metaspace replacement in " + detail::quote(source) + " is empty", rep,
                  "usually \"\xE2\x96\x81\"");
      std::string scheme = j.contains("prepend_scheme") && j["prepend_scheme"].is_string()
                               ? j["prepend_scheme"].get<std::string>() : "always";
      if (j.contains("add_prefix_space") && j["add_prefix_space"].is_boolean() && !j["add_prefix_space"].get<bool>())
        scheme = "never";
      using P = MetaspacePreTokenizer::Prepend;
      const P p = scheme == "first" ? P::first : scheme == "never" ? P::never : P::always;
      RHINE_CHECK(scheme == "first" || scheme == "never" || scheme == "always", "tokenizer",
                  "unknown Metaspace prepend_scheme in " + detail::quote(source), scheme, "first, always or never");
      return std::make_unique<MetaspacePreTokenizer>(rep, p, j.value("split", true));
    }
    if (type == "Digits")
      return std::make_unique<CharClassPreTokenizer>(j.value("individual_digits", false) ? K::digits_individual : K::digits,
                                                     SplitBehavior::isolated);
    if (type == "Whitespace")
      return std::make_unique<SplitPreTokenizer>(std::make_unique<Pattern>(Json{{"Regex", R"(\w+|[^\w\s]+)"}}, source),
                                                 SplitBehavior::removed, true);
    if (type == "WhitespaceSplit")
      return std::make_unique<CharClassPreTokenizer>(K::whitespace_split, SplitBehavior::removed);
    if (type == "Punctuation")
      return std::make_unique<CharClassPreTokenizer>(K::punctuation, behavior_of(j, source, "Isolated"));
    if (type == "BertPreTokenizer") {
      // HF: split on whitespace (removed), then isolate punctuation, with the same character
      // classes as WhitespaceSplit and Punctuation.
      std::vector<std::unique_ptr<PreTokenizer>> stages;
      stages.push_back(std::make_unique<CharClassPreTokenizer>(K::whitespace_split, SplitBehavior::removed));
      stages.push_back(std::make_unique<CharClassPreTokenizer>(K::punctuation, SplitBehavior::isolated));
      return std::make_unique<PreTokenizerSequence>(std::move(stages));
    }
  } catch (const Json::exception& e) {
    RHINE_FAIL("tokenizer", "malformed " + type + " pre_tokenizer in " + detail::quote(source), Verbatim{e.what()},
               "compare with a tokenizer.json written by HF tokenizers");
  }
  unknown_type("pre_tokenizer", type, source,
               "Sequence, Split, ByteLevel, Metaspace, Digits, Whitespace, WhitespaceSplit, Punctuation, "
               "BertPreTokenizer");
}

std::unique_ptr<Model> make_model(const Json& j, const std::vector<std::string>& special_tokens, const std::string& source) {
  RHINE_CHECK(j.is_object(), "tokenizer", "the model of " + detail::quote(source) + " is not an object",
              Verbatim{j.dump().substr(0, 80)}, "\"model\": {\"type\": \"BPE\", ...}");
  // Old files have no "type": infer it as HF does from the shape of the vocab.
  std::string type = j.contains("type") && j["type"].is_string() ? j["type"].get<std::string>() : "";
  if (type.empty() && j.contains("vocab")) {
    if (j["vocab"].is_array()) type = "Unigram";
    else if (j.contains("merges")) type = "BPE";
    else if (j.contains("continuing_subword_prefix")) type = "WordPiece";
  }
  try {
    if (type == "BPE") return std::make_unique<BpeModel>(j, source);
    if (type == "Unigram") return std::make_unique<UnigramModel>(j, special_tokens, source);
    if (type == "WordPiece") return std::make_unique<WordPieceModel>(j, source);
  } catch (const Json::exception& e) {
    RHINE_FAIL("tokenizer", "malformed " + type + " model in " + detail::quote(source), Verbatim{e.what()},
               "compare with a tokenizer.json written by HF tokenizers");
  }
  unknown_type("model", type, source, "BPE, Unigram, WordPiece");
}

std::unique_ptr<PostProcessor> make_post_processor(const Json& j, const std::string& source) {
  if (j.is_null()) return nullptr;
  const std::string type = type_of(j, "post_processor", source);
  try {
    if (type == "Sequence") {
      std::vector<std::unique_ptr<PostProcessor>> stages;
      for (const auto& s : j.at("processors"))
        if (auto p = make_post_processor(s, source)) stages.push_back(std::move(p));
      return std::make_unique<PostProcessorSequence>(std::move(stages));
    }
    if (type == "TemplateProcessing") return std::make_unique<TemplateProcessor>(j, source);
    if (type == "ByteLevel") return std::make_unique<NoOpProcessor>();
    if (type == "BertProcessing" || type == "RobertaProcessing") {
      const Json& cls = j.at("cls");
      const Json& sep = j.at("sep");
      return std::make_unique<BosEosProcessor>(cls.at(1).get<int32_t>(), sep.at(1).get<int32_t>());
    }
  } catch (const Json::exception& e) {
    RHINE_FAIL("tokenizer", "malformed " + type + " post_processor in " + detail::quote(source), Verbatim{e.what()},
               "compare with a tokenizer.json written by HF tokenizers");
  }
  unknown_type("post_processor", type, source, "Sequence, TemplateProcessing, ByteLevel, BertProcessing, RobertaProcessing");
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
    if (type == "ByteLevel") return std::make_unique<ByteLevelDecoder>();
    if (type == "Metaspace") {
      std::string scheme = j.contains("prepend_scheme") && j["prepend_scheme"].is_string()
                               ? j["prepend_scheme"].get<std::string>() : "always";
      if (j.contains("add_prefix_space") && j["add_prefix_space"].is_boolean() && !j["add_prefix_space"].get<bool>())
        scheme = "never";
      return std::make_unique<MetaspaceDecoder>(j.value("replacement", std::string("\xE2\x96\x81")), scheme != "never");
    }
    if (type == "WordPiece")
      return std::make_unique<WordPieceDecoder>(j.value("prefix", std::string("##")), j.value("cleanup", true));
  } catch (const Json::exception& e) {
    RHINE_FAIL("tokenizer", "malformed " + type + " decoder in " + detail::quote(source), Verbatim{e.what()},
               "compare with a tokenizer.json written by HF tokenizers");
  }
  unknown_type("decoder", type, source, "Sequence, Replace, ByteFallback, Fuse, Strip, ByteLevel, Metaspace, WordPiece");
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
