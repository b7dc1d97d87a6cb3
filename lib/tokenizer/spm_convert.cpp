// SentencePiece ModelProto -> tokenizer.json (sentencepiece.h), in the shape of HF
// transformers' converters (SpmConverter / LlamaConverter), chosen so that the file encodes
// exactly like the .model: the charsmap as a Precompiled normalizer, remove_extra_whitespaces
// as Replace regexes (leading ' ', runs of ' ', trailing ▁), the dummy prefix and escaping as Prepend("▁") +
// Replace(" " -> "▁") (LlamaConverter's legacy form, no pre-tokenizer), BPE merges derived
// from the piece scores (SentencePieceExtractor).
#include <algorithm>

#include "rhine/core/error.h"
#include "rhine/tokenizer/sentencepiece.h"
#include "utf8.h"

namespace rhine::tokenizer {

namespace {

std::string base64(std::string_view in) {
  static const char* k = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  std::size_t i = 0;
  for (; i + 2 < in.size(); i += 3) {
    const uint32_t v = (static_cast<uint8_t>(in[i]) << 16) | (static_cast<uint8_t>(in[i + 1]) << 8) | static_cast<uint8_t>(in[i + 2]);
    out += k[v >> 18];
    out += k[(v >> 12) & 63];
    out += k[(v >> 6) & 63];
    out += k[v & 63];
  }
  if (i + 1 == in.size()) {
    const uint32_t v = static_cast<uint8_t>(in[i]) << 16;
    out += k[v >> 18];
    out += k[(v >> 12) & 63];
    out += "==";
  } else if (i + 2 == in.size()) {
    const uint32_t v = (static_cast<uint8_t>(in[i]) << 16) | (static_cast<uint8_t>(in[i + 1]) << 8);
    out += k[v >> 18];
    out += k[(v >> 12) & 63];
    out += k[(v >> 6) & 63];
    out += '=';
  }
  return out;
}

}  // namespace

Json spm_to_tokenizer_json(const SpmModelProto& m, const std::string& source) {
  using T = SpmModelProto::PieceType;
  const bool bpe = m.model_type == SpmModelProto::ModelType::bpe;
  RHINE_CHECK(bpe || m.model_type == SpmModelProto::ModelType::unigram, "tokenizer",
              "cannot convert this SentencePiece model_type to tokenizer.json: " + detail::quote(source),
              static_cast<int>(m.model_type), "UNIGRAM (1) and BPE (2) are supported");
  RHINE_CHECK(!m.treat_whitespace_as_suffix && m.escape_whitespaces, "tokenizer",
              "cannot convert " + detail::quote(source) + " to tokenizer.json: whitespace as suffix / unescaped",
              m.treat_whitespace_as_suffix, "HF's Metaspace form needs escape_whitespaces and a prefix ▁");
  const std::string W = "\xE2\x96\x81";
  const auto n = static_cast<int32_t>(m.pieces.size());
  int32_t unk = -1;
  Json added = Json::array();
  for (int32_t id = 0; id < n; ++id) {
    const auto& p = m.pieces[static_cast<std::size_t>(id)];
    if (p.type == T::unknown) unk = id;
    if (p.type == T::control || p.type == T::unknown || p.type == T::user_defined)
      added.push_back({{"id", id}, {"content", p.piece}, {"single_word", false}, {"lstrip", false}, {"rstrip", false},
                       {"normalized", p.type == T::user_defined}, {"special", p.type != T::user_defined}});
  }
  RHINE_CHECK(unk >= 0, "tokenizer", "SentencePiece model " + detail::quote(source) + " has no unknown piece", n,
              "a model needs an <unk> piece");

  // Normalizer (the legacy Llama form, which keeps SentencePiece's rules exactly): charsmap,
  // extra whitespace removed (only ' ', as libsentencepiece), dummy prefix, ' ' -> ▁.
  Json normalizers = Json::array();
  if (!m.precompiled_charsmap.empty())
    normalizers.push_back({{"type", "Precompiled"}, {"precompiled_charsmap", base64(m.precompiled_charsmap)}});
  // remove_extra_whitespaces: leading ' ' dropped, runs of ' ' collapsed, and after
  // escaping every trailing ▁ dropped (literal ones too, as libsentencepiece does).
  if (m.remove_extra_whitespaces) {
    normalizers.push_back({{"type", "Replace"}, {"pattern", {{"Regex", "\\A +"}}}, {"content", ""}});
    normalizers.push_back({{"type", "Replace"}, {"pattern", {{"Regex", " {2,}"}}}, {"content", " "}});
  }
  if (m.add_dummy_prefix) normalizers.push_back({{"type", "Prepend"}, {"prepend", W}});
  normalizers.push_back({{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", W}});
  if (m.remove_extra_whitespaces)
    normalizers.push_back({{"type", "Replace"}, {"pattern", {{"Regex", W + "+\\z"}}}, {"content", ""}});
  Json decoders = Json::array({{{"type", "Replace"}, {"pattern", {{"String", W}}}, {"content", " "}}});
  if (m.byte_fallback) decoders.push_back({{"type", "ByteFallback"}});
  decoders.push_back({{"type", "Fuse"}});
  // libsentencepiece drops the first piece's leading ▁ with a dummy prefix or whitespace removal.
  if (m.add_dummy_prefix || m.remove_extra_whitespaces)
    decoders.push_back({{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}});

  Json model;
  if (bpe) {
    // SentencePieceExtractor: for every piece, each split into two pieces of the vocab
    // (ordered by their ids) is a merge; merges are ordered by the merged piece's score,
    // highest first (stable).
    std::unordered_map<std::string, int32_t> vocab;
    Json jv = Json::object();
    for (int32_t id = 0; id < n; ++id) {
      vocab.emplace(m.pieces[static_cast<std::size_t>(id)].piece, id);
      jv[m.pieces[static_cast<std::size_t>(id)].piece] = id;
    }
    struct Merge {
      int32_t l, r;
      float score;
    };
    std::vector<Merge> merges;
    for (int32_t id = 0; id < n; ++id) {
      const auto& p = m.pieces[static_cast<std::size_t>(id)];
      std::vector<Merge> local;
      for (std::size_t at = 0, len; at < p.piece.size(); at += len) {
        utf8::decode_valid(std::string_view(p.piece).substr(at), &len);
        if (at == 0) continue;
        const auto l = vocab.find(p.piece.substr(0, at)), r = vocab.find(p.piece.substr(at));
        if (l != vocab.end() && r != vocab.end()) local.push_back({l->second, r->second, p.score});
      }
      std::sort(local.begin(), local.end(), [](const Merge& a, const Merge& b) { return a.l != b.l ? a.l < b.l : a.r < b.r; });
      merges.insert(merges.end(), local.begin(), local.end());
    }
    std::stable_sort(merges.begin(), merges.end(), [](const Merge& a, const Merge& b) { return a.score > b.score; });
    Json jm = Json::array();
    for (const auto& mg : merges)
      jm.push_back(Json::array({m.pieces[static_cast<std::size_t>(mg.l)].piece, m.pieces[static_cast<std::size_t>(mg.r)].piece}));
    model = {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", m.pieces[static_cast<std::size_t>(unk)].piece},
             {"continuing_subword_prefix", nullptr}, {"end_of_word_suffix", nullptr}, {"fuse_unk", true},
             {"byte_fallback", m.byte_fallback}, {"ignore_merges", false}, {"vocab", jv}, {"merges", jm}};
  } else {
    Json jv = Json::array();
    for (const auto& p : m.pieces) jv.push_back(Json::array({p.piece, p.score}));
    model = {{"type", "Unigram"}, {"unk_id", unk}, {"byte_fallback", m.byte_fallback}, {"vocab", jv}};
  }
  Json post = nullptr;
  if (m.bos_id >= 0 && m.bos_id < n && m.pieces[static_cast<std::size_t>(m.bos_id)].type == T::control) {
    const std::string bos = m.pieces[static_cast<std::size_t>(m.bos_id)].piece;
    post = {{"type", "TemplateProcessing"},
            {"single", Json::array({{{"SpecialToken", {{"id", bos}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}})},
            {"pair", Json::array({{{"SpecialToken", {{"id", bos}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
                                  {{"SpecialToken", {{"id", bos}, {"type_id", 1}}}}, {{"Sequence", {{"id", "B"}, {"type_id", 1}}}}})},
            {"special_tokens", {{bos, {{"id", bos}, {"ids", Json::array({m.bos_id})}, {"tokens", Json::array({bos})}}}}}};
  }
  return {{"version", "1.0"},
          {"truncation", nullptr},
          {"padding", nullptr},
          {"added_tokens", added},
          {"normalizer", {{"type", "Sequence"}, {"normalizers", normalizers}}},
          {"pre_tokenizer", nullptr},
          {"post_processor", post},
          {"decoder", {{"type", "Sequence"}, {"decoders", decoders}}},
          {"model", model}};
}

}  // namespace rhine::tokenizer
