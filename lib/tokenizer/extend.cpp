#include "rhine/tokenizer/extend.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <queue>
#include <unordered_map>
#include <unordered_set>

#include <utf8proc.h>

#include "rhine/core/error.h"
#include "rhine/tokenizer/tokenizer.h"
#include "utf8.h"

namespace rhine::tokenizer {
namespace {

constexpr const char* kComponent = "tokenizer_extend";
constexpr std::string_view kSpace = "\xE2\x96\x81";  // U+2581, SentencePiece's whitespace mark

bool ends_with_space(std::string_view piece) {
  return piece.size() >= kSpace.size() && piece.substr(piece.size() - kSpace.size()) == kSpace;
}

struct Word {
  std::vector<std::int32_t> s;  // piece ids
  std::int64_t n = 0;           // occurrences in the text
};

// Unicode script classes, approximating SentencePiece's unicode_script::GetScript by code
// point ranges: letters by script (Hiragana and Katakana merged into Han, as SentencePiece
// does), combining marks inherit the previous character's, everything else (digits,
// punctuation, symbols) is Common.
constexpr int kAnyScript = -1, kInherited = -2, kCommon = 0;
int script_of(std::uint32_t c) {
  const auto cat = utf8proc_category(static_cast<utf8proc_int32_t>(c));
  if (cat == UTF8PROC_CATEGORY_MN || cat == UTF8PROC_CATEGORY_MC || cat == UTF8PROC_CATEGORY_ME) return kInherited;
  if (cat < UTF8PROC_CATEGORY_LU || cat > UTF8PROC_CATEGORY_LO) return kCommon;
  struct Range { std::uint32_t lo, hi; int script; };
  static const Range ranges[] = {
      {0x0041, 0x024F, 1},   {0x1E00, 0x1EFF, 1},   {0x2C60, 0x2C7F, 1},  {0xA720, 0xA7FF, 1},  {0xFF21, 0xFF5A, 1},
      {0x0370, 0x03FF, 2},   {0x1F00, 0x1FFF, 2},   {0x0400, 0x052F, 3},  {0x1C80, 0x1C8F, 3},  {0x2DE0, 0x2DFF, 3},
      {0xA640, 0xA69F, 3},   {0x0530, 0x058F, 4},   {0x0590, 0x05FF, 5},  {0x0600, 0x06FF, 6},  {0x0750, 0x077F, 6},
      {0x0900, 0x097F, 7},   {0x0E00, 0x0E7F, 8},   {0x10A0, 0x10FF, 9},  {0x1100, 0x11FF, 10}, {0xAC00, 0xD7AF, 10},
      {0x3130, 0x318F, 10},  {0x3040, 0x30FF, 11},  {0x3400, 0x4DBF, 11}, {0x4E00, 0x9FFF, 11}, {0xF900, 0xFAFF, 11},
      {0x20000, 0x3FFFF, 11}, {0xFF66, 0xFF9F, 11}};
  for (const auto& r : ranges)
    if (c >= r.lo && c <= r.hi) return r.script;
  return 1000 + static_cast<int>(c >> 7);  // another script: its 128-code-point block
}

bool is_decimal(std::uint32_t c) {
  return utf8proc_category(static_cast<utf8proc_int32_t>(c)) == UTF8PROC_CATEGORY_ND;
}

// SentencePiece's TrainerInterface::IsValidSentencePiece for the rules a merge of two valid
// pieces can break: no mixed scripts (split_by_unicode_script), a decimal digit only as a
// piece of its own (split_digits), digits compatible with anything unless split_by_number.
bool valid_piece(std::string_view piece, const SpmModelProto& m) {
  std::vector<std::uint32_t> cps;
  for (std::size_t i = 0; i < piece.size();) {
    std::size_t len = 1;
    std::uint32_t cp = 0xFFFD;
    if (!utf8::decode_valid(piece.substr(i), &len, &cp)) return false;
    cps.push_back(cp);
    i += len;
  }
  int prev = kAnyScript;
  for (std::uint32_t c : cps) {
    if (c == 0x2581) continue;  // the whitespace mark: its position is the word splitting's business
    int s = script_of(c);
    if (s == kInherited) s = prev;
    if (is_decimal(c)) {
      if (!m.split_by_number) s = kAnyScript;
      if (m.split_digits && cps.size() > 1) return false;
    }
    if (m.split_by_unicode_script && s != kAnyScript && prev != kAnyScript && prev != s) return false;
    prev = s;
  }
  return true;
}

std::uint64_t key(std::int32_t a, std::int32_t b) {
  return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(a)) << 32) | static_cast<std::uint32_t>(b);
}

void put_varint(std::string& out, std::uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}

}  // namespace

std::string VocabExtension::model_bytes(const std::string& base_bytes) const {
  std::string out = base_bytes;
  for (std::size_t i = 0; i < added.size(); ++i) {
    const auto& p = model.pieces[static_cast<std::size_t>(base_size) + i];
    std::string msg;
    msg.push_back(0x0a);  // SentencePiece.piece = 1 (string)
    put_varint(msg, p.piece.size());
    msg += p.piece;
    msg.push_back(0x15);  // score = 2 (float)
    char f[4];
    std::memcpy(f, &p.score, 4);
    msg.append(f, 4);
    msg.push_back(0x18);  // type = 3 (enum)
    put_varint(msg, static_cast<std::uint64_t>(p.type));
    out.push_back(0x0a);  // ModelProto.pieces = 1 (repeated message): appended after the base's fields
    put_varint(out, msg.size());
    out += msg;
  }
  return out;
}

namespace {

// The base vocabulary as the merge loop sees it: strings by id (holes: ""), whether a piece
// may take part in a merge, and every string the tokenizer already has.
struct MergeVocab {
  std::vector<std::string> str;
  std::vector<bool> mergeable;
  std::unordered_set<std::string> existing;
};

// Words of the segmented text (piece ids, as bytes) and their occurrences.
using WordCounts = std::unordered_map<std::string, std::int64_t>;

// Cuts one segmented piece of text into words and counts them: a word starts at a piece that
// starts with the whitespace mark (`mark_starts`) and ends after a piece that ends with it
// (`mark_ends`: SentencePiece's suffix models; and, with mark_starts, tokenizer.json BPEs
// trained without a pre-tokenizer, whose pieces can end with the mark: there the mark alone
// starts a word); pieces that may not merge stand alone.
void count_words(const std::vector<std::int32_t>& line, const MergeVocab& v, bool mark_starts, bool mark_ends,
                 WordCounts& counts) {
  std::vector<std::int32_t> w;
  auto flush = [&] {
    if (w.size() > 1) counts[std::string(reinterpret_cast<const char*>(w.data()), w.size() * sizeof(std::int32_t))] += 1;
    w.clear();
  };
  for (std::int32_t id : line) {
    const auto i = static_cast<std::size_t>(id);
    if (i >= v.str.size() || !v.mergeable[i]) {
      flush();
      continue;
    }
    const std::string& s = v.str[i];
    if (mark_starts && s.rfind(kSpace, 0) == 0) flush();
    w.push_back(id);
    if (mark_ends && ends_with_space(s) && (!mark_starts || s.size() > kSpace.size())) flush();
  }
  flush();
}

// What the merge loop found: the new pieces in id order (ids v.str.size() ...), the pair of
// ids each merges, and the tokens each saved on the text when it was added.
struct NewMerges {
  std::vector<std::string> added;
  std::vector<std::pair<std::int32_t, std::int32_t>> pairs;
  std::vector<std::int64_t> saved;
};

// BPE continued on the counted words: N times the most frequent adjacent pair whose merged
// string is new, short enough and `valid` becomes a piece.
template <typename Valid>
NewMerges continue_bpe(const WordCounts& counts_by_word, MergeVocab v, const ExtendOptions& options, Valid valid) {
  std::vector<Word> words;
  words.reserve(counts_by_word.size());
  for (const auto& [k, n] : counts_by_word) {
    Word w;
    w.s.resize(k.size() / sizeof(std::int32_t));
    std::memcpy(w.s.data(), k.data(), k.size());
    w.n = n;
    words.push_back(std::move(w));
  }
  std::sort(words.begin(), words.end(), [](const Word& a, const Word& b) { return a.s < b.s; });  // determinism

  // Pair counts, the words each pair occurs in, and a max-heap of (count, pair) whose stale
  // entries are skipped when popped.
  std::unordered_map<std::uint64_t, std::int64_t> count;
  std::unordered_map<std::uint64_t, std::vector<std::int32_t>> where;
  using Entry = std::pair<std::int64_t, std::uint64_t>;
  auto worse = [](const Entry& a, const Entry& b) { return a.first != b.first ? a.first < b.first : a.second > b.second; };
  std::priority_queue<Entry, std::vector<Entry>, decltype(worse)> heap(worse);
  auto add_pairs = [&](std::int32_t wi, std::int64_t sign) {
    const Word& w = words[static_cast<std::size_t>(wi)];
    for (std::size_t i = 0; i + 1 < w.s.size(); ++i) {
      const auto k = key(w.s[i], w.s[i + 1]);
      auto& c = count[k];
      c += sign * w.n;
      if (sign > 0) where[k].push_back(wi);
      heap.push({c, k});
    }
  };
  for (std::int32_t wi = 0; wi < static_cast<std::int32_t>(words.size()); ++wi) add_pairs(wi, +1);

  NewMerges out;
  std::unordered_set<std::uint64_t> banned;
  while (static_cast<std::int32_t>(out.added.size()) < options.new_tokens && !heap.empty()) {
    const auto [c, k] = heap.top();
    heap.pop();
    auto it = count.find(k);
    if (it == count.end() || it->second != c || banned.count(k)) continue;  // stale
    if (c < options.min_frequency) break;
    const auto a = static_cast<std::int32_t>(k >> 32), b = static_cast<std::int32_t>(k & 0xffffffffu);
    std::string merged = v.str[static_cast<std::size_t>(a)] + v.str[static_cast<std::size_t>(b)];
    if (v.existing.count(merged) || static_cast<std::int32_t>(merged.size()) > options.max_piece_bytes ||
        !valid(merged)) {
      banned.insert(k);  // the base has this string (under another type), too long, or against the trainer's rules
      continue;
    }
    const auto id = static_cast<std::int32_t>(v.str.size());
    v.str.push_back(merged);
    v.mergeable.push_back(true);
    v.existing.insert(merged);
    out.added.push_back(std::move(merged));
    out.pairs.emplace_back(a, b);
    out.saved.push_back(c);

    std::vector<std::int32_t> ws = std::move(where[k]);
    where.erase(k);
    std::sort(ws.begin(), ws.end());
    ws.erase(std::unique(ws.begin(), ws.end()), ws.end());
    for (std::int32_t wi : ws) {
      Word& w = words[static_cast<std::size_t>(wi)];
      bool hit = false;
      for (std::size_t i = 0; i + 1 < w.s.size(); ++i) hit = hit || (w.s[i] == a && w.s[i + 1] == b);
      if (!hit) continue;
      add_pairs(wi, -1);
      std::vector<std::int32_t> s;
      for (std::size_t i = 0; i < w.s.size(); ++i) {
        if (i + 1 < w.s.size() && w.s[i] == a && w.s[i + 1] == b) {
          s.push_back(id);
          ++i;
        } else {
          s.push_back(w.s[i]);
        }
      }
      w.s = std::move(s);
      add_pairs(wi, +1);
    }
    count.erase(k);
  }
  return out;
}

// Scores of new Unigram pieces: the larger of the piece's log frequency on the target text
// (count when added / the text's tokens: one maximum-likelihood step of the unigram model)
// and the sum of the two pieces it joins plus kUnigramMargin, so the Viterbi search prefers
// the new piece to the pair it replaces wherever that pair was the best segmentation.
constexpr double kUnigramMargin = 0.1;
std::vector<float> unigram_scores(const NewMerges& m, std::vector<double> scores, std::int64_t tokens) {
  std::vector<float> out;
  for (std::size_t i = 0; i < m.added.size(); ++i) {
    const double joined = scores[static_cast<std::size_t>(m.pairs[i].first)] +
                          scores[static_cast<std::size_t>(m.pairs[i].second)] + kUnigramMargin;
    const double frequency = std::log(static_cast<double>(m.saved[i]) / static_cast<double>(std::max<std::int64_t>(tokens, 1)));
    scores.push_back(std::max(joined, frequency));
    out.push_back(static_cast<float>(scores.back()));
  }
  return out;
}

void check_common(const ExtendOptions& options, const std::vector<std::string>& texts) {
  RHINE_CHECK(options.new_tokens >= 1, kComponent, "new_tokens must be at least 1", options.new_tokens, "");
  RHINE_CHECK(!texts.empty(), kComponent, "no target-language text to extend the vocabulary for", texts.size(),
              "pass lines of text in the languages the model is adapted to");
}

}  // namespace

VocabExtension extend_vocabulary(const SpmModelProto& base, const std::vector<std::string>& texts,
                                 const ExtendOptions& options) {
  const bool unigram = base.model_type == SpmModelProto::ModelType::unigram;
  RHINE_CHECK(base.model_type == SpmModelProto::ModelType::bpe || unigram, kComponent,
              "vocabulary extension takes a BPE or Unigram model; the base model type is",
              static_cast<int>(base.model_type), "extend a SentencePiece BPE (model_type 2) or Unigram (1) model");
  check_common(options, texts);

  VocabExtension ext;
  ext.model = base;
  ext.base_size = static_cast<std::int32_t>(base.pieces.size());
  MergeVocab v;
  std::vector<double> scores;
  float floor = 0.0f;
  for (const auto& p : base.pieces) {
    v.str.push_back(p.piece);
    v.mergeable.push_back(p.type == SpmModelProto::PieceType::normal);
    v.existing.insert(p.piece);
    scores.push_back(p.score);
    if (p.type == SpmModelProto::PieceType::normal) floor = std::min(floor, p.score);
  }
  const Tokenizer tok = Tokenizer::from_sentencepiece(base, "the base tokenizer");
  WordCounts words;
  for (const auto& line : tok.encode_batch(texts, {}, options.threads)) {
    ext.tokens_before += static_cast<std::int64_t>(line.size());
    count_words(line, v, !base.treat_whitespace_as_suffix, base.treat_whitespace_as_suffix, words);
  }
  const NewMerges m = continue_bpe(words, std::move(v), options, [&](const std::string& s) { return valid_piece(s, base); });
  const std::vector<float> new_scores = unigram ? unigram_scores(m, scores, ext.tokens_before) : std::vector<float>();
  for (std::size_t i = 0; i < m.added.size(); ++i) {
    SpmModelProto::Piece p;
    p.piece = m.added[i];
    // BPE: after every base merge, in found order; Unigram: see unigram_scores.
    p.score = unigram ? new_scores[i] : floor - 1.0f - static_cast<float>(i);
    p.type = SpmModelProto::PieceType::normal;
    ext.model.pieces.push_back(std::move(p));
  }
  ext.added = m.added;
  ext.saved = m.saved;
  return ext;
}

VocabExtension extend_tokenizer_json(const Json& base, const std::vector<std::string>& texts,
                                     const ExtendOptions& options, const std::string& source) {
  check_common(options, texts);
  RHINE_CHECK(base.is_object() && base.contains("model") && base["model"].is_object(), kComponent,
              "not a tokenizer.json (no \"model\" object)", source, "pass a Hugging Face tokenizer.json");
  const Json& model = base["model"];
  const std::string type = model.contains("type") && model["type"].is_string() ? model["type"].get<std::string>() : "";
  const bool unigram = type == "Unigram";
  RHINE_CHECK(type == "BPE" || unigram, kComponent, "vocabulary extension takes a BPE or Unigram model; the tokenizer.json model is",
              type.empty() ? std::string("(no type)") : type,
              "extend a BPE (byte-level or with byte fallback) or Unigram tokenizer.json, or a SentencePiece .model");
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
    RHINE_CHECK(!model.contains(k) || model[k].is_null() || model[k].get<std::string>().empty(), kComponent,
                std::string("a BPE with a ") + k + " is not supported", source,
                "extend a byte-level or byte-fallback BPE (the LLM tokenizers)");
  std::function<bool(const Json&)> byte_level_stage = [&](const Json& j) {
    if (!j.is_object()) return false;
    if (j.contains("type") && j["type"] == "ByteLevel") return true;
    for (const char* k : {"pretokenizers", "decoders"})
      if (j.contains(k) && j[k].is_array())
        for (const Json& x : j[k])
          if (byte_level_stage(x)) return true;
    return false;
  };
  const bool byte_level = (base.contains("pre_tokenizer") && byte_level_stage(base["pre_tokenizer"])) ||
                          (base.contains("decoder") && byte_level_stage(base["decoder"]));

  // The base's stages (normalizer, pre-tokenizer, model) to cut the text into the words
  // the model sees, after the added tokens' text is taken out (lstrip / rstrip aside).
  const Json& added_tokens = base.contains("added_tokens") ? base["added_tokens"] : Json::array();
  std::vector<std::string> added_text;
  std::vector<std::int64_t> added_id;
  for (const Json& t : added_tokens) {
    RHINE_CHECK(t.is_object() && t.contains("content") && t["content"].is_string() && t.contains("id") &&
                    t["id"].is_number_integer(),
                kComponent, "an added token of " + source + " lacks a string \"content\" or an integer \"id\"",
                Verbatim{t.dump().substr(0, 80)}, "each added token is {\"id\": N, \"content\": \"...\", ...}");
    added_text.push_back(t["content"].get<std::string>());
    added_id.push_back(t["id"].get<std::int64_t>());
  }
  const auto normalizer = make_normalizer(base.contains("normalizer") ? base["normalizer"] : Json(), source);
  const auto pre = make_pre_tokenizer(base.contains("pre_tokenizer") ? base["pre_tokenizer"] : Json(), source);
  const auto base_model = make_model(model, added_text, source);
  const std::int64_t model_size = base_model->vocab_size();

  // Every id the base has: the model's and the added tokens'. tokenizers numbers added tokens
  // that are not in the model's vocabulary from its size up (the ids in the file are not
  // read), so the ids must leave no hole, and a Unigram's added tokens must lie inside its
  // vocabulary (its ids are positions in a list).
  std::int64_t size = model_size;
  for (std::int64_t id : added_id) {
    RHINE_CHECK(id >= 0 && id < model_size + static_cast<std::int64_t>(added_id.size()), kComponent,
                "an added token's id of " + source + " is outside the vocabulary and the added tokens", id,
                "ids run from 0 to " + std::to_string(model_size + static_cast<std::int64_t>(added_id.size()) - 1));
    size = std::max(size, id + 1);
  }
  RHINE_CHECK(!unigram || size == model_size, kComponent, "added tokens after the Unigram vocabulary are not supported",
              source, "the vocabulary has " + std::to_string(model_size) + " pieces, the ids reach " + std::to_string(size - 1));
  MergeVocab v;
  v.str.assign(static_cast<std::size_t>(size), "");
  v.mergeable.assign(static_cast<std::size_t>(size), false);
  std::vector<bool> covered(static_cast<std::size_t>(size), false);
  std::vector<double> scores(static_cast<std::size_t>(size), 0.0);  // Unigram: the pieces' log probabilities
  std::int64_t unk_id = -1;
  if (unigram && model.contains("unk_id") && model["unk_id"].is_number_integer()) unk_id = model["unk_id"].get<std::int64_t>();
  if (!unigram && model.contains("unk_token") && model["unk_token"].is_string())
    unk_id = base_model->token_to_id(model["unk_token"].get<std::string>());
  for (std::int32_t id = 0; id < model_size; ++id) {
    const std::string s(base_model->id_to_token(id));
    if (s.empty()) continue;
    const auto i = static_cast<std::size_t>(id);
    v.str[i] = s;
    v.mergeable[i] = id != unk_id && !is_byte_piece(s);
    v.existing.insert(s);
    covered[i] = true;
    if (unigram) scores[i] = model["vocab"][i][1].get<double>();
  }
  for (std::size_t k = 0; k < added_id.size(); ++k) {
    const auto i = static_cast<std::size_t>(added_id[k]);
    v.mergeable[i] = false;
    covered[i] = true;
    v.existing.insert(added_text[k]);
  }
  const auto hole = std::find(covered.begin(), covered.end(), false);
  RHINE_CHECK(hole == covered.end(), kComponent, "the base's ids have a hole (neither vocabulary nor added token) at",
              hole - covered.begin(), source + ": tokenizers would renumber the added tokens after an extension");

  VocabExtension ext;
  ext.base_size = static_cast<std::int32_t>(size);
  WordCounts words;
  std::vector<Token> pieces;
  std::vector<std::int32_t> ids;
  SpecialTokenMatcher added_matcher;  // added tokens are split out of the text first, as encoding does
  for (std::size_t i = 0; i < added_text.size(); ++i) added_matcher.add(added_text[i], static_cast<std::int32_t>(i));
  std::vector<std::string> segments;
  for (const std::string& text_line : texts) {
    segments.clear();
    for (const auto& part : added_matcher.split(text_line)) {
      if (part.id >= 0) ++ext.tokens_before;
      else segments.push_back(text_line.substr(part.begin, part.end - part.begin));
    }
    for (const std::string& segment : segments) {
      NormalizedString ns(segment);
      if (normalizer) normalizer->normalize(ns);
      PreTokenizedString pts;
      pts.splits.push_back(std::move(ns));
      if (pre) pre->pre_tokenize(pts);
      for (const auto& split : pts.splits) {
        pieces.clear(), ids.clear();
        base_model->tokenize(split.text, pieces);
        for (const Token& t : pieces) ids.push_back(t.id);
        ext.tokens_before += static_cast<std::int64_t>(ids.size());
        count_words(ids, v, true, true, words);
      }
    }
  }
  // Merges are written as the base writes them: "a b" strings, where a piece with a space
  // cannot be named (tokenizers splits on the space), or [a, b] pairs (also for no merges).
  const Json no_merges = Json::array();
  const Json& base_merges = !unigram && model.contains("merges") ? model["merges"] : no_merges;
  const bool pair_form = base_merges.empty() || base_merges[0].is_array();
  // Byte-level pieces are spelled in GPT-2's byte alphabet, so scripts cannot be read off
  // them (the pre-tokenizer's split regex already keeps letters, digits and punctuation
  // apart); other models (SentencePiece converted) follow SentencePiece's default rules.
  const SpmModelProto spm_defaults;
  const NewMerges m = continue_bpe(words, std::move(v), options, [&](const std::string& s) {
    if (!unigram && !pair_form && s.find(' ') != std::string::npos) return false;
    return byte_level || valid_piece(s, spm_defaults);
  });
  ext.added = m.added;
  ext.saved = m.saved;

  ext.tokenizer_json = base;
  Json& out_model = ext.tokenizer_json["model"];
  Json& vocab = out_model["vocab"];
  if (unigram) {  // the vocabulary is a list of [piece, score]: ids are positions
    const std::vector<float> new_scores = unigram_scores(m, scores, ext.tokens_before);
    for (std::size_t i = 0; i < m.added.size(); ++i) vocab.push_back(Json::array({m.added[i], new_scores[i]}));
    return ext;
  }
  for (std::size_t k = 0; k < added_id.size(); ++k)  // see above: added tokens keep their ids
    if (!vocab.contains(added_text[k])) vocab[added_text[k]] = added_id[k];
  Json merges = base_merges;  // the base's, then the new ones
  auto name = [&](std::int32_t id) {
    return id < ext.base_size ? std::string(base_model->id_to_token(id)) : m.added[static_cast<std::size_t>(id - ext.base_size)];
  };
  for (std::size_t i = 0; i < m.added.size(); ++i) {
    vocab[m.added[i]] = ext.base_size + static_cast<std::int32_t>(i);
    const std::string a = name(m.pairs[i].first), b = name(m.pairs[i].second);
    if (pair_form) merges.push_back(Json::array({a, b}));
    else merges.push_back(a + " " + b);
  }
  out_model["merges"] = std::move(merges);
  return ext;
}

}  // namespace rhine::tokenizer
