// rhine::Tokenizer: file detection, pipeline assembly and the encode / decode drivers.

#include "rhine/tokenizer/tokenizer.h"

#include <atomic>
#include <thread>

#include "rhine/core/error.h"
#include "rhine/core/file.h"
#include "rhine/core/threads.h"

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

  // Normalizes, pre-tokenizes and tokenizes one plain segment [begin, end) of `text`.
  void encode_segment(std::string_view text, uint32_t begin, uint32_t end, Encoding& e,
                      std::vector<Token>& scratch) const {
    NormalizedString ns(text.substr(begin, end - begin), begin);
    if (normalizer) normalizer->normalize(ns);
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

Tokenizer Tokenizer::load(const std::string& path) {
  const std::string bytes = read_file(path, "tokenizer");
  auto ends_with = [&](std::string_view suffix) {
    return path.size() >= suffix.size() && path.compare(path.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  std::size_t first = bytes.find_first_not_of(" \t\r\n");
  const bool looks_json = first != std::string::npos && bytes[first] == '{';
  if (ends_with(".json") || looks_json) {
    RHINE_FAIL("tokenizer", "tokenizer.json files are not supported yet", path,
               "use the SentencePiece .model file for now (tokenizer.json support is the next step of issue 3)");
  }
  // A serialized ModelProto starts with field 1 (pieces), wire type 2: tag byte 0x0A.
  if (ends_with(".model") || (!bytes.empty() && bytes[0] == '\x0A'))
    return from_sentencepiece(parse_spm_model(bytes, path), path);
  RHINE_FAIL("tokenizer", "unknown tokenizer file type", path,
             "pass a SentencePiece .model (tokenizer.model) file");
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
  const int32_t n = impl_->model->vocab_size();
  for (int32_t id : ids) {
    RHINE_CHECK(id >= 0 && id < n, "tokenizer", "cannot decode an id outside the vocabulary of " +
                detail::quote(impl_->source), id, "ids must be in [0, " + std::to_string(n) + ")");
    if (options.skip_special && impl_->special[static_cast<std::size_t>(id)]) continue;
    tokens.emplace_back(impl_->model->id_to_token(id));
  }
  if (impl_->decoder) impl_->decoder->decode(tokens);
  std::string text;
  for (const auto& t : tokens) text += t;
  return text;
}

int32_t Tokenizer::vocab_size() const { return impl_->model->vocab_size(); }
std::string Tokenizer::id_to_token(int32_t id) const { return std::string(impl_->model->id_to_token(id)); }
int32_t Tokenizer::token_to_id(std::string_view token) const { return impl_->model->token_to_id(token); }
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
