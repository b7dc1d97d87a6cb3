// rhine::Tokenizer: file detection, pipeline assembly and the encode / decode drivers.

#include "rhine/tokenizer/tokenizer.h"

#include <atomic>
#include <filesystem>
#include <thread>
#include <unordered_map>

#include "added_tokens.h"
#include "hf_stages.h"
#include "rhine/core/error.h"
#include "rhine/core/file.h"
#include "rhine/core/threads.h"
#include "utf8.h"

namespace rhine {

using namespace rhine::tokenizer;

struct Tokenizer::Impl {
  std::string source, kind;
  std::unique_ptr<Normalizer> normalizer;
  std::unique_ptr<PreTokenizer> pre_tokenizer;
  std::unique_ptr<Model> model;
  std::unique_ptr<PostProcessor> post_processor;       // add_special without EOS
  std::unique_ptr<PostProcessor> post_processor_eos;   // add_special with add_eos
  std::unique_ptr<Decoder> decoder;
  SpecialTokenMatcher special_tokens;
  std::vector<uint8_t> special;  // per id: 1 for special tokens
  int32_t bos = -1, eos = -1, unk = -1, pad = -1;

  // tokenizer.json only.
  bool hf = false;
  int32_t n_vocab = 0;  // model vocab and added tokens
  AddedTokenMatcher added;             // "normalized": false, matched on the raw text
  AddedTokenMatcher added_normalized;  // "normalized": true, matched on normalized text
  std::unordered_map<int32_t, std::string> added_by_id;
  std::unordered_map<std::string, int32_t> added_by_content;
  // Byte-level BPE fast path: the Split regexes (Isolated) then raw-bytes BPE, replacing the
  // generic pre-tokenizer + model stages (which stay as its reference twin).
  const BpeModel* fast_bpe = nullptr;
  bool nfc_only = false;  // the normalizer is exactly NFC
  std::vector<std::unique_ptr<SplitPreTokenizer>> fast_splits;

  // Pre-tokenizes and tokenizes one normalized piece (tokenizer.json).
  void encode_normalized(NormalizedString ns, Encoding& e, std::vector<Token>& scratch, bool fast) const {
    if (ns.text.empty()) return;
    if (fast_bpe && fast) {
      thread_local std::vector<std::pair<uint32_t, uint32_t>> cur, next, tmp;
      cur.assign(1, {0u, static_cast<uint32_t>(ns.text.size())});
      for (const auto& split : fast_splits) {
        next.clear();
        for (const auto& [b, e2] : cur) {
          tmp.clear();
          split->split_ranges(std::string_view(ns.text).substr(b, e2 - b), tmp);
          for (const auto& [x, y] : tmp)
            if (y > x) next.emplace_back(b + x, b + y);
        }
        std::swap(cur, next);
      }
      scratch.clear();
      for (const auto& [b, e2] : cur) fast_bpe->tokenize_bytes(std::string_view(ns.text).substr(b, e2 - b), b, scratch);
      append(ns, scratch, e);
      return;
    }
    pre_tokenize_and_tokenize(std::move(ns), e, scratch);
  }

  // Normalizes one segment between raw added-token matches, then splits it at the added
  // tokens that match normalized text ("normalized": true), as HF tokenizers does.
  void encode_plain(std::string_view text, uint32_t begin, uint32_t end, Encoding& e, std::vector<Token>& scratch,
                    const EncodeOptions& o) const {
    if (end <= begin) return;
    if (fast_bpe && o.fast_paths && added_normalized.empty() && (!normalizer || nfc_only)) {
      // Byte-level fast path straight on the input bytes when normalization cannot change
      // them (no normalizer, or NFC on text below U+0300): no NormalizedString, offsets are
      // input positions.
      const std::string_view seg = text.substr(begin, end - begin);
      bool plain = true;
      for (std::size_t at = 0, len; plain && at < seg.size(); at += len) {
        const auto c = static_cast<unsigned char>(seg[at]);
        if (c < 0x80) {
          len = 1;
          continue;
        }
        uint32_t cp;
        plain = utf8::decode_valid(seg.substr(at), &len, &cp) && (!nfc_only || cp < 0x300);
      }
      if (plain) {
        thread_local std::vector<std::pair<uint32_t, uint32_t>> cur, next, tmp;
        cur.assign(1, {0u, static_cast<uint32_t>(seg.size())});
        for (const auto& split : fast_splits) {
          next.clear();
          for (const auto& [b, e2] : cur) {
            tmp.clear();
            split->split_ranges(seg.substr(b, e2 - b), tmp);
            for (const auto& [x, y] : tmp)
              if (y > x) next.emplace_back(b + x, b + y);
          }
          std::swap(cur, next);
        }
        scratch.clear();
        for (const auto& [b, e2] : cur) fast_bpe->tokenize_bytes(seg.substr(b, e2 - b), begin + b, scratch);
        for (const Token& t : scratch) {
          e.ids.push_back(t.id);
          e.offsets.emplace_back(t.begin, t.end);
          e.special.push_back(0);
        }
        return;
      }
    }
    NormalizedString ns(text.substr(begin, end - begin), begin);
    if (normalizer) normalizer->normalize(ns);
    sanitize_utf8(ns);
    if (added_normalized.empty()) return encode_normalized(std::move(ns), e, scratch, o.fast_paths);
    std::vector<AddedTokenMatcher::Match> matches;
    added_normalized.find(ns.text, o.parse_special, matches);
    if (matches.empty()) return encode_normalized(std::move(ns), e, scratch, o.fast_paths);
    uint32_t at = 0;
    for (const auto& m : matches) {
      if (m.begin > at) encode_normalized(slice(ns, at, m.begin), e, scratch, o.fast_paths);
      e.ids.push_back(m.id);
      e.offsets.push_back(ns.original_range(m.begin, m.end));
      e.special.push_back(special[static_cast<std::size_t>(m.id)]);
      at = m.end;
    }
    if (at < ns.text.size()) encode_normalized(slice(ns, at, ns.text.size()), e, scratch, o.fast_paths);
  }

  Encoding encode_hf(std::string_view text, const EncodeOptions& o) const {
    // Invalid UTF-8 is tolerated up to the normalizer (which may map it, as Precompiled does
    // like libsentencepiece) and replaced by U+FFFD after it (encode_plain).
    Encoding e;
    e.ids.reserve(text.size() / 3 + 4);
    e.offsets.reserve(text.size() / 3 + 4);
    e.special.reserve(text.size() / 3 + 4);
    thread_local std::vector<Token> scratch;
    auto segment = [&](uint32_t b, uint32_t en) { encode_plain(text, b, en, e, scratch, o); };
    thread_local std::vector<AddedTokenMatcher::Match> matches;
    matches.clear();
    added.find(text, o.parse_special, matches);
    uint32_t at = 0;
    for (const auto& m : matches) {
      segment(at, m.begin);
      e.ids.push_back(m.id);
      e.offsets.push_back({m.begin, m.end});
      e.special.push_back(special[static_cast<std::size_t>(m.id)]);
      at = m.end;
    }
    segment(at, static_cast<uint32_t>(text.size()));
    if (post_processor) post_processor->process(e, o.add_special);
    return e;
  }

  // Normalizes, pre-tokenizes and tokenizes one plain segment [begin, end) of `text`.
  void encode_segment(std::string_view text, uint32_t begin, uint32_t end, Encoding& e,
                      std::vector<Token>& scratch) const {
    NormalizedString ns(text.substr(begin, end - begin), begin);
    if (normalizer) normalizer->normalize(ns);
    pre_tokenize_and_tokenize(std::move(ns), e, scratch);
  }

  // The generic stages after normalization: pre-tokenizer (if any), then the model.
  void pre_tokenize_and_tokenize(NormalizedString ns, Encoding& e, std::vector<Token>& scratch) const {
    if (!pre_tokenizer) {
      scratch.clear();
      model->tokenize(ns.text, scratch);
      append(ns, scratch, e);
      return;
    }
    PreTokenizedString pts;
    pts.splits.push_back(std::move(ns));
    pre_tokenizer->pre_tokenize(pts);
    for (const auto& split : pts.splits) {
      scratch.clear();
      model->tokenize(split.text, scratch);
      append(split, scratch, e);
    }
  }

  static void append(const NormalizedString& ns, const std::vector<Token>& tokens, Encoding& e) {
    for (const Token& t : tokens) {
      e.ids.push_back(t.id);
      e.offsets.push_back(ns.original_range(t.begin, t.end));
      e.special.push_back(0);
    }
  }

  Encoding encode(std::string_view text, const EncodeOptions& o) const {
    if (hf) return encode_hf(text, o);
    Encoding e;
    std::vector<Token> scratch;
    if (o.parse_special && !special_tokens.empty()) {
      for (const auto& part : special_tokens.split(text)) {
        if (part.id >= 0) {
          e.ids.push_back(part.id);
          e.offsets.push_back({part.begin, part.end});
          e.special.push_back(1);
        } else {
          encode_segment(text, part.begin, part.end, e, scratch);
        }
      }
    } else {
      encode_segment(text, 0, static_cast<uint32_t>(text.size()), e, scratch);
    }
    const PostProcessor* pp = o.add_eos ? post_processor_eos.get() : post_processor.get();
    if (pp) pp->process(e, o.add_special);
    return e;
  }
};

Tokenizer Tokenizer::from_sentencepiece(const SpmModelProto& m, const std::string& source) {
  using T = SpmModelProto::PieceType;
  RHINE_CHECK(m.model_type == SpmModelProto::ModelType::unigram || m.model_type == SpmModelProto::ModelType::bpe,
              "tokenizer", "unsupported SentencePiece model_type in " + detail::quote(source),
              static_cast<int>(m.model_type), "Rhine reads UNIGRAM (1) and BPE (2) models");
  auto impl = std::make_shared<Impl>();
  impl->source = source;
  auto vocab = std::make_shared<const SpmVocab>(m, source);
  impl->normalizer = std::make_unique<SpmNormalizer>(m, source);
  if (m.model_type == SpmModelProto::ModelType::unigram) {
    impl->model = std::make_unique<SpmUnigramModel>(vocab);
    impl->kind = "sentencepiece-unigram";
  } else {
    impl->model = std::make_unique<SpmBpeModel>(vocab);
    impl->kind = "sentencepiece-bpe";
  }
  impl->decoder = std::make_unique<SpmDecoder>(vocab, m);
  // Special ids as libsentencepiece reports them: the id must exist and be a control piece
  // (bos/eos/pad) or the unknown piece.
  auto control_or_none = [&](int32_t id) {
    return id >= 0 && id < vocab->size() && vocab->type(id) == T::control ? id : -1;
  };
  impl->bos = control_or_none(m.bos_id);
  impl->eos = control_or_none(m.eos_id);
  impl->pad = control_or_none(m.pad_id);
  impl->unk = vocab->unk_id();
  impl->post_processor = std::make_unique<BosEosProcessor>(impl->bos, -1);
  impl->post_processor_eos = std::make_unique<BosEosProcessor>(impl->bos, impl->eos);
  impl->special.assign(static_cast<std::size_t>(vocab->size()), 0);
  for (int32_t id = 0; id < vocab->size(); ++id) {
    if (vocab->type(id) == T::control || vocab->type(id) == T::unknown) {
      impl->special[static_cast<std::size_t>(id)] = 1;
      impl->special_tokens.add(std::string(vocab->piece(id)), id);
    }
  }
  return Tokenizer(std::move(impl));
}

Tokenizer Tokenizer::from_tokenizer_json(const Json& j, const std::string& source, const Json& config) {
  try {
    return from_tokenizer_json_unchecked(j, source, config);
  } catch (const Json::exception& e) {  // a key of the wrong JSON type somewhere
    RHINE_FAIL("tokenizer", "malformed tokenizer.json " + detail::quote(source), Verbatim{e.what()},
               "compare with a tokenizer.json written by HF tokenizers");
  }
}

Tokenizer Tokenizer::from_tokenizer_json_unchecked(const Json& j, const std::string& source, const Json& config) {
  RHINE_CHECK(j.is_object() && j.contains("model"), "tokenizer", "not a tokenizer.json: no \"model\" object in " +
              detail::quote(source), Verbatim{j.dump().substr(0, 80)}, "a Hugging Face tokenizer.json has a \"model\" key");
  auto impl = std::make_shared<Impl>();
  impl->source = source;
  impl->hf = true;
  const auto get = [&](const char* key) -> const Json& {
    static const Json null;
    return j.contains(key) ? j[key] : null;
  };
  // Added tokens first: special ones are kept out of a Unigram lattice.
  std::vector<AddedToken> added;
  std::vector<std::string> special_strings;
  const Json& at = get("added_tokens");
  RHINE_CHECK(at.is_null() || at.is_array(), "tokenizer", "added_tokens of " + detail::quote(source) + " is not an array",
              Verbatim{at.dump().substr(0, 80)}, "\"added_tokens\": [{\"id\": 0, \"content\": \"<s>\", ...}]");
  try {
    if (at.is_array())
      for (const Json& t : at) {
        AddedToken a;
        a.id = t.at("id").get<int32_t>();
        a.content = t.at("content").get<std::string>();
        RHINE_CHECK(a.id >= 0 && a.id < (1 << 24), "tokenizer", "added token id out of range in " + detail::quote(source),
                    a.id, "ids are small non-negative integers");
        RHINE_CHECK(!a.content.empty(), "tokenizer", "empty added token in " + detail::quote(source), a.id,
                    "added tokens need content");
        a.special = t.value("special", false);
        a.lstrip = t.value("lstrip", false);
        a.rstrip = t.value("rstrip", false);
        a.single_word = t.value("single_word", false);
        a.normalized = t.value("normalized", !a.special) && !j.value("normalizer", Json()).is_null();
        if (a.special) special_strings.push_back(a.content);
        added.push_back(std::move(a));
      }
  } catch (const Json::exception& e) {
    RHINE_FAIL("tokenizer", "malformed added_tokens in " + detail::quote(source), Verbatim{e.what()},
               "each entry has id, content, special, lstrip, rstrip, single_word, normalized");
  }
  impl->model = make_model(j["model"], special_strings, source);
  impl->normalizer = make_normalizer(get("normalizer"), source);
  impl->pre_tokenizer = make_pre_tokenizer(get("pre_tokenizer"), source);
  impl->post_processor = make_post_processor(get("post_processor"), source);
  impl->decoder = make_decoder(get("decoder"), source);

  const Json& model = j["model"];
  const std::string type = model.contains("type") && model["type"].is_string() ? model["type"].get<std::string>() : "BPE";
  impl->kind = "hf-" + type;
  impl->n_vocab = impl->model->vocab_size();
  for (const auto& a : added) {
    // Added ids extend the model's (dense) table: holes allowed, not a sparse table of 2^24.
    RHINE_CHECK(static_cast<std::size_t>(a.id) < 4 * (static_cast<std::size_t>(impl->model->vocab_size()) + added.size()) + 1024,
                "tokenizer", "added token id far beyond the vocabulary of " + detail::quote(source), a.id,
                "added tokens take the ids after the model's vocab");
    impl->n_vocab = std::max(impl->n_vocab, a.id + 1);
  }
  impl->special.assign(static_cast<std::size_t>(impl->n_vocab), 0);
  for (const auto& a : added) {
    impl->added_by_id.emplace(a.id, a.content);
    impl->added_by_content.emplace(a.content, a.id);
    if (a.special) impl->special[static_cast<std::size_t>(a.id)] = 1;
  }
  std::vector<AddedToken> raw_added, norm_added;
  for (auto& a : added) (a.normalized ? norm_added : raw_added).push_back(std::move(a));
  impl->added.build(std::move(raw_added));
  impl->added_normalized.build(std::move(norm_added));
  if (auto* bpe = dynamic_cast<const BpeModel*>(impl->model.get())) {
    impl->unk = bpe->unk_id();
    if (bpe->byte_level_ready()) {
      // Fast path for [Split(Isolated)..., ByteLevel(no prefix space)] pre-tokenizers.
      const Json& pt = get("pre_tokenizer");
      std::vector<const Json*> stages;
      if (pt.is_object() && pt.value("type", "") == "Sequence" && pt.contains("pretokenizers") && pt["pretokenizers"].is_array())
        for (const Json& s : pt["pretokenizers"]) stages.push_back(&s);
      else if (pt.is_object())
        stages.push_back(&pt);
      bool ok = !stages.empty();
      std::vector<std::unique_ptr<SplitPreTokenizer>> splits;
      for (std::size_t i = 0; ok && i < stages.size(); ++i) {
        const Json& s = *stages[i];
        const std::string t = s.value("type", "");
        const bool last = i + 1 == stages.size();
        if (!last && t == "Split" && s.value("behavior", "") == "Isolated" && !s.value("invert", false)) {
          splits.push_back(std::make_unique<SplitPreTokenizer>(std::make_unique<Pattern>(s.at("pattern"), source),
                                                               SplitBehavior::isolated, false));
        } else if (last && t == "ByteLevel" && !s.value("add_prefix_space", true)) {
          if (s.value("use_regex", true))
            splits.push_back(std::make_unique<SplitPreTokenizer>(
                std::make_unique<Pattern>(Json{{"Regex", kGpt2Pattern}}, source), SplitBehavior::isolated, false));
        } else {
          ok = false;
        }
      }
      const Json& nj = get("normalizer");
      impl->nfc_only = nj.is_object() && nj.value("type", "") == "NFC";
      if (ok) {
        impl->fast_bpe = bpe;
        impl->fast_splits = std::move(splits);
        impl->kind += "-byte-level";
      }
    }
  } else if (auto* uni = dynamic_cast<const UnigramModel*>(impl->model.get())) {
    impl->unk = uni->unk_id();
  } else if (auto* wp = dynamic_cast<const WordPieceModel*>(impl->model.get())) {
    impl->unk = wp->unk_id();
  }
  // BOS / EOS: the template's special pieces, or tokenizer_config.json's names.
  if (auto* tp = dynamic_cast<const TemplateProcessor*>(impl->post_processor.get())) {
    if (!tp->prefix().empty()) impl->bos = tp->prefix().front();
    if (!tp->suffix().empty()) impl->eos = tp->suffix().back();
  }
  const Impl& ref = *impl;
  auto named = [&](const char* key) -> int32_t {
    if (!config.is_object() || !config.contains(key)) return -1;
    const Json& v = config[key];
    std::string name;
    if (v.is_string()) name = v.get<std::string>();
    else if (v.is_object() && v.contains("content") && v["content"].is_string()) name = v["content"].get<std::string>();
    if (name.empty()) return -1;
    const auto it = ref.added_by_content.find(name);
    return it != ref.added_by_content.end() ? it->second : ref.model->token_to_id(name);
  };
  if (impl->bos < 0) impl->bos = named("bos_token");
  if (impl->eos < 0) impl->eos = named("eos_token");
  impl->pad = named("pad_token");
  if (impl->unk < 0) impl->unk = named("unk_token");
  return Tokenizer(std::move(impl));
}

Tokenizer Tokenizer::load(const std::string& path) {
  const std::string bytes = read_file(path, "tokenizer");
  auto ends_with = [&](std::string_view suffix) {
    return path.size() >= suffix.size() && path.compare(path.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  std::size_t first = bytes.find_first_not_of(" \t\r\n");
  const bool looks_json = first != std::string::npos && bytes[first] == '{';
  if (ends_with(".json") || looks_json) {
    Json config;
    const auto config_path = std::filesystem::path(path).parent_path() / "tokenizer_config.json";
    std::error_code ec;
    if (std::filesystem::path(path).filename() != "tokenizer_config.json" && std::filesystem::is_regular_file(config_path, ec)) {
      try {
        config = read_json_file(config_path.string(), "tokenizer");
      } catch (const Error&) {
        config = Json();  // optional: only names bos/eos/pad
      }
    }
    return from_tokenizer_json(parse_json(bytes, "tokenizer", path), path, config);
  }
  // A serialized ModelProto starts with field 1 (pieces), wire type 2: tag byte 0x0A.
  if (ends_with(".model") || (!bytes.empty() && bytes[0] == '\x0A'))
    return from_sentencepiece(parse_spm_model(bytes, path), path);
  RHINE_FAIL("tokenizer", "unknown tokenizer file type", path,
             "pass a SentencePiece .model (tokenizer.model) or a Hugging Face tokenizer.json file");
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, const EncodeOptions& options) const {
  return impl_->encode(text, options).ids;
}

Encoding Tokenizer::encode_with_offsets(std::string_view text, const EncodeOptions& options) const {
  return impl_->encode(text, options);
}

std::vector<std::vector<int32_t>> Tokenizer::encode_batch(const std::vector<std::string>& texts,
                                                          const EncodeOptions& options, int threads) const {
  std::vector<std::vector<int32_t>> out(texts.size());
  if (threads <= 0) threads = default_thread_count();
  threads = static_cast<int>(std::min<std::size_t>(static_cast<std::size_t>(threads), std::max<std::size_t>(1, texts.size() / 16)));
  if (threads <= 1) {
    for (std::size_t i = 0; i < texts.size(); ++i) out[i] = encode(texts[i], options);
    return out;
  }
  // Work stealing by chunks of 16 texts; errors are rethrown on the caller's thread.
  std::atomic<std::size_t> next{0};
  std::exception_ptr error;
  std::atomic<bool> failed{false};
  auto work = [&] {
    try {
      for (;;) {
        const std::size_t begin = next.fetch_add(16);
        if (begin >= texts.size() || failed.load()) return;
        const std::size_t end = std::min(texts.size(), begin + 16);
        for (std::size_t i = begin; i < end; ++i) out[i] = impl_->encode(texts[i], options).ids;
      }
    } catch (...) {
      if (!failed.exchange(true)) error = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);
  return out;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, const DecodeOptions& options) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  const int32_t n = vocab_size();
  for (int32_t id : ids) {
    RHINE_CHECK(id >= 0 && id < n, "tokenizer", "cannot decode an id outside the vocabulary of " +
                detail::quote(impl_->source), id, "ids must be in [0, " + std::to_string(n) + ")");
    if (options.skip_special && impl_->special[static_cast<std::size_t>(id)]) continue;
    tokens.push_back(id_to_token(id));
  }
  if (impl_->decoder) impl_->decoder->decode(tokens);
  std::string text;
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    if (impl_->hf && !impl_->decoder && i > 0) text += ' ';  // HF joins with spaces without a decoder
    text += tokens[i];
  }
  return text;
}

int32_t Tokenizer::vocab_size() const { return impl_->hf ? impl_->n_vocab : impl_->model->vocab_size(); }
std::string Tokenizer::id_to_token(int32_t id) const {
  if (impl_->hf) {
    const auto it = impl_->added_by_id.find(id);
    if (it != impl_->added_by_id.end()) return it->second;
  }
  return std::string(impl_->model->id_to_token(id));
}
int32_t Tokenizer::token_to_id(std::string_view token) const {
  if (impl_->hf) {
    const auto it = impl_->added_by_content.find(std::string(token));
    if (it != impl_->added_by_content.end()) return it->second;
  }
  return impl_->model->token_to_id(token);
}
int32_t Tokenizer::bos_id() const { return impl_->bos; }
int32_t Tokenizer::eos_id() const { return impl_->eos; }
int32_t Tokenizer::unk_id() const { return impl_->unk; }
int32_t Tokenizer::pad_id() const { return impl_->pad; }
bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && static_cast<std::size_t>(id) < impl_->special.size() && impl_->special[static_cast<std::size_t>(id)];
}
const std::string& Tokenizer::kind() const { return impl_->kind; }
const std::string& Tokenizer::source() const { return impl_->source; }

}  // namespace rhine
