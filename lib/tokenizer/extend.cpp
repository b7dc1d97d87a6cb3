#include "rhine/tokenizer/extend.h"

#include <algorithm>
#include <cstring>
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

VocabExtension extend_vocabulary(const SpmModelProto& base, const std::vector<std::string>& texts,
                                 const ExtendOptions& options) {
  RHINE_CHECK(base.model_type == SpmModelProto::ModelType::bpe, kComponent,
              "vocabulary extension continues BPE merges; the base model type is",
              static_cast<int>(base.model_type),
              "extend a SentencePiece BPE model (model_type 2); for a Unigram model train a new tokenizer with "
              "rhine-tokenizer train");
  RHINE_CHECK(options.new_tokens >= 1, kComponent, "new_tokens must be at least 1", options.new_tokens, "");
  RHINE_CHECK(!texts.empty(), kComponent, "no target-language text to extend the vocabulary for", texts.size(),
              "pass lines of text in the languages the model is adapted to");

  VocabExtension ext;
  ext.model = base;
  ext.base_size = static_cast<std::int32_t>(base.pieces.size());
  std::vector<std::string> str;
  std::vector<bool> mergeable;
  std::unordered_set<std::string> existing;
  float floor = 0.0f;
  for (const auto& p : base.pieces) {
    str.push_back(p.piece);
    mergeable.push_back(p.type == SpmModelProto::PieceType::normal);
    existing.insert(p.piece);
    if (p.type == SpmModelProto::PieceType::normal) floor = std::min(floor, p.score);
  }

  // Segment the text with the base and cut it into words: a word starts at a piece that
  // starts with the whitespace mark (ends with it, for suffix models); pieces that are not
  // normal (bytes, unknown, user-defined, control) stand alone.
  const Tokenizer tok = Tokenizer::from_sentencepiece(base, "the base tokenizer");
  const auto ids = tok.encode_batch(texts, {}, options.threads);
  std::unordered_map<std::string, std::int64_t> counts_by_word;
  auto flush = [&](std::vector<std::int32_t>& w) {
    if (w.size() > 1)
      counts_by_word[std::string(reinterpret_cast<const char*>(w.data()), w.size() * sizeof(std::int32_t))] += 1;
    w.clear();
  };
  for (const auto& line : ids) {
    ext.tokens_before += static_cast<std::int64_t>(line.size());
    std::vector<std::int32_t> w;
    for (std::size_t i = 0; i < line.size(); ++i) {
      const std::int32_t id = line[i];
      const std::string& s = str[static_cast<std::size_t>(id)];
      if (!mergeable[static_cast<std::size_t>(id)]) {
        flush(w);
        continue;
      }
      const bool starts = base.treat_whitespace_as_suffix
                              ? i > 0 && ends_with_space(str[static_cast<std::size_t>(line[i - 1])])
                              : s.rfind(kSpace, 0) == 0;
      if (starts) flush(w);
      w.push_back(id);
    }
    flush(w);
  }
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

  std::unordered_set<std::uint64_t> banned;
  while (static_cast<std::int32_t>(ext.added.size()) < options.new_tokens && !heap.empty()) {
    const auto [c, k] = heap.top();
    heap.pop();
    auto it = count.find(k);
    if (it == count.end() || it->second != c || banned.count(k)) continue;  // stale
    if (c < options.min_frequency) break;
    const auto a = static_cast<std::int32_t>(k >> 32), b = static_cast<std::int32_t>(k & 0xffffffffu);
    std::string merged = str[static_cast<std::size_t>(a)] + str[static_cast<std::size_t>(b)];
    if (existing.count(merged) || static_cast<std::int32_t>(merged.size()) > options.max_piece_bytes ||
        !valid_piece(merged, base)) {
      banned.insert(k);  // the base has this string (under another type), too long, or against the trainer's rules
      continue;
    }
    const auto id = static_cast<std::int32_t>(str.size());
    str.push_back(merged);
    mergeable.push_back(true);
    existing.insert(merged);
    ext.added.push_back(merged);
    ext.saved.push_back(c);
    SpmModelProto::Piece p;
    p.piece = merged;
    p.score = floor - 1.0f - static_cast<float>(ext.added.size() - 1);  // after every base merge, in found order
    p.type = SpmModelProto::PieceType::normal;
    ext.model.pieces.push_back(std::move(p));

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
  return ext;
}

}  // namespace rhine::tokenizer
