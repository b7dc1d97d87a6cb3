// tokenizer.json models: BPE (with the byte-level fast path), Unigram, WordPiece (hf_stages.h).
#include <algorithm>
#include <charconv>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string_view>
#include <atomic>
#include <mutex>

#include "hf_stages.h"
#include "rhine/core/error.h"
#include "utf8.h"

namespace rhine::tokenizer {

namespace {

// `x` as Hugging Face tokenizers reads it from tokenizer.json. tokenizers parses JSON with
// serde_json's default float parser, which is not always correctly rounded: it turns all the
// significant digits into an integer, rounds that to a double, then divides (or multiplies)
// by a power of ten, rounding a second time. About one Unigram score in seven (275 of the
// 2,000 scores of a vocabulary `tokenizers` trained) then sits one ulp away from the decimal
// in the file, and a search that sums scores can break an exact tie the other way. Rhine
// takes the scores the same way, starting from the shortest decimal that gives `x` back
// (what tokenizers and Python write).
double as_tokenizers_reads(double x) {
  if (!std::isfinite(x)) return x;
  char buf[64];
  const auto [end, ec] = std::to_chars(buf, buf + sizeof buf, x);
  if (ec != std::errc()) return x;
  std::string_view s(buf, static_cast<std::size_t>(end - buf));
  const bool negative = !s.empty() && s.front() == '-';
  if (negative) s.remove_prefix(1);
  std::uint64_t significand = 0;
  int exponent = 0;
  bool fraction = false;
  std::size_t i = 0;
  for (; i < s.size() && s[i] != 'e'; ++i) {
    if (s[i] == '.') {
      fraction = true;
      continue;
    }
    if (significand > (UINT64_MAX - 9) / 10) return x;  // serde's overflow path; shortest output never gets here
    significand = significand * 10 + static_cast<std::uint64_t>(s[i] - '0');
    if (fraction) --exponent;
  }
  if (i < s.size()) exponent += std::atoi(std::string(s.substr(i + 1)).c_str());
  static const auto pow10 = [] {
    std::vector<double> p(309);
    for (int k = 0; k <= 308; ++k) p[static_cast<std::size_t>(k)] = std::strtod(("1e" + std::to_string(k)).c_str(), nullptr);
    return p;
  }();
  double f = static_cast<double>(significand);
  for (;;) {
    const int a = std::abs(exponent);
    if (a <= 308) {
      f = exponent >= 0 ? f * pow10[static_cast<std::size_t>(a)] : f / pow10[static_cast<std::size_t>(a)];
      break;
    }
    if (f == 0.0 || exponent > 0) return x;
    f /= 1e308;
    exponent += 308;
  }
  return negative ? -f : f;
}

// Reads {"token": id, ...} into a dense id -> token table.
std::vector<std::string> read_vocab_object(const Json& v, const char* model, const std::string& source) {
  RHINE_CHECK(v.is_object(), "tokenizer", std::string(model) + " model of " + detail::quote(source) +
              " has no vocab object", Verbatim{v.dump().substr(0, 80)}, "\"vocab\": {\"token\": id, ...}");
  int64_t max_id = -1;
  for (const auto& [tok, id] : v.items()) {
    RHINE_CHECK(id.is_number_integer() && id.get<int64_t>() >= 0 && id.get<int64_t>() < (1 << 28), "tokenizer",
                std::string(model) + " vocab id of " + detail::quote(tok) + " in " + detail::quote(source) +
                " is not an integer in [0, 2^28)", Verbatim{id.dump().substr(0, 40)}, "ids are small non-negative integers");
    max_id = std::max(max_id, id.get<int64_t>());
  }
  // Ids index a dense table: allow holes, not a sparse table of 2^28 entries.
  RHINE_CHECK(max_id < static_cast<int64_t>(4 * v.size() + 1024), "tokenizer", std::string(model) + " vocab of " +
              detail::quote(source) + " has ids far beyond its size", max_id, "vocab ids are 0..size-1");
  std::vector<std::string> vocab(static_cast<std::size_t>(max_id + 1));
  for (const auto& [tok, id] : v.items()) {
    auto& slot = vocab[static_cast<std::size_t>(id.get<int64_t>())];
    RHINE_CHECK(slot.empty(), "tokenizer", std::string(model) + " vocab of " + detail::quote(source) +
                " gives one id to two tokens", id.get<int64_t>(), "every id appears once");
    RHINE_CHECK(!tok.empty(), "tokenizer", std::string(model) + " vocab of " + detail::quote(source) +
                " has an empty token", id.get<int64_t>(), "tokens are non-empty strings");
    slot = tok;
  }
  return vocab;
}

std::string optional_string(const Json& j, const char* key) {
  if (!j.contains(key) || j[key].is_null()) return "";
  return j[key].get<std::string>();
}

bool optional_bool(const Json& j, const char* key, bool fallback = false) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  return j[key].get<bool>();
}

}  // namespace

// --- BPE ----------------------------------------------------------------------------------

// A bounded, sharded word -> tokens cache (no eviction: each shard stops accepting entries
// when half full, as HF tokenizers' cache does). Offsets are relative to the word.
struct BpeModel::Cache {
  static constexpr std::size_t kShards = 64, kSlots = 4096, kMaxWordBytes = 64;
  struct Entry {
    uint64_t hash = 0;
    std::string key;
    std::vector<Token> tokens;
  };
  struct Shard {
    std::mutex mutex;
    std::vector<Entry> slots;
    std::size_t used = 0;
  };
  Shard shards[kShards];

  bool lookup(std::string_view word, uint64_t h, uint32_t base, std::vector<Token>& out) {
    Shard& s = shards[h % kShards];
    std::lock_guard<std::mutex> lock(s.mutex);
    if (s.slots.empty()) return false;
    for (std::size_t i = (h >> 6) % kSlots;; i = (i + 1) % kSlots) {
      const Entry& e = s.slots[i];
      if (e.key.empty()) return false;
      if (e.hash == h && e.key == word) {
        for (const Token& t : e.tokens) out.push_back({t.id, t.begin + base, t.end + base});
        return true;
      }
    }
  }
  void insert(std::string_view word, uint64_t h, uint32_t base, const Token* begin, const Token* end) {
    Shard& s = shards[h % kShards];
    std::lock_guard<std::mutex> lock(s.mutex);
    if (2 * (s.used + 1) > kSlots) return;
    if (s.slots.empty()) s.slots.resize(kSlots);
    for (std::size_t i = (h >> 6) % kSlots;; i = (i + 1) % kSlots) {
      Entry& e = s.slots[i];
      if (e.key.empty()) {
        e.hash = h;
        e.key = std::string(word);
        for (const Token* t = begin; t != end; ++t) e.tokens.push_back({t->id, t->begin - base, t->end - base});
        ++s.used;
        return;
      }
      if (e.hash == h && e.key == word) return;
    }
  }
};

BpeModel::BpeModel(const Json& j, const std::string& source) : cache_(std::make_unique<Cache>()) {
  static std::atomic<uint64_t> next_uid{1};
  uid_ = next_uid.fetch_add(1);
  vocab_ = read_vocab_object(j.at("vocab"), "BPE", source);
  index_.reserve(vocab_.size());
  for (std::size_t id = 0; id < vocab_.size(); ++id)
    if (!vocab_[id].empty()) index_.insert(vocab_[id], static_cast<int32_t>(id));
  prefix_ = optional_string(j, "continuing_subword_prefix");
  suffix_ = optional_string(j, "end_of_word_suffix");
  fuse_unk_ = optional_bool(j, "fuse_unk");
  byte_fallback_ = optional_bool(j, "byte_fallback");
  ignore_merges_ = optional_bool(j, "ignore_merges");
  const std::string unk = optional_string(j, "unk_token");
  if (!unk.empty()) unk_ = index_.find(unk);

  // Merges: "a b" strings (legacy) or ["a", "b"] pairs; rank = index; later duplicates win.
  const Json& merges = j.contains("merges") ? j["merges"] : Json::array();
  RHINE_CHECK(merges.is_array(), "tokenizer", "BPE merges of " + detail::quote(source) + " is not an array",
              Verbatim{merges.dump().substr(0, 80)}, "\"merges\": [\"a b\", ...] or [[\"a\", \"b\"], ...]");
  std::vector<std::pair<int32_t, int32_t>> pairs;
  pairs.reserve(merges.size());
  merged_.reserve(merges.size());
  std::string joined;
  for (std::size_t r = 0; r < merges.size(); ++r) {
    const Json& m = merges[r];
    std::string a, b;
    if (m.is_string()) {
      const std::string& line = m.get_ref<const std::string&>();
      const std::size_t sp = line.find(' ');
      RHINE_CHECK(sp != std::string::npos && line.find(' ', sp + 1) == std::string::npos, "tokenizer",
                  "BPE merge " + std::to_string(r) + " of " + detail::quote(source) + " is not two tokens split by one space",
                  line, "legacy merges are \"left right\"");
      a = line.substr(0, sp);
      b = line.substr(sp + 1);
    } else {
      RHINE_CHECK(m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string(), "tokenizer",
                  "BPE merge " + std::to_string(r) + " of " + detail::quote(source) + " is not a pair of strings",
                  Verbatim{m.dump().substr(0, 80)}, "merges are [\"left\", \"right\"] pairs");
      a = m[0].get<std::string>();
      b = m[1].get<std::string>();
    }
    const int32_t ia = index_.find(a), ib = index_.find(b);
    joined = a + b;
    const int32_t im = index_.find(joined);
    RHINE_CHECK(ia >= 0 && ib >= 0 && im >= 0, "tokenizer", "BPE merge " + std::to_string(r) + " of " +
                detail::quote(source) + " uses a token that is not in the vocab", a + " " + b,
                "both tokens and their concatenation must be in the vocab");
    pairs.emplace_back(ia, ib);
    merged_.push_back(im);
  }
  for (std::size_t r = pairs.size(); r-- > 0;) ranks_.insert(pairs[r].first, pairs[r].second, static_cast<int32_t>(r));

  // Byte tables: <0xXX> pieces (byte fallback) and the byte-level printable characters.
  const auto& table = ByteLevelTable::get();
  bool all_level = true;
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    byte_ids_[static_cast<std::size_t>(b)] = index_.find(name);
    level_ids_[static_cast<std::size_t>(b)] = index_.find(table.byte_to_utf8[static_cast<std::size_t>(b)]);
    all_level = all_level && level_ids_[static_cast<std::size_t>(b)] >= 0;
  }
  byte_level_ready_ = all_level && prefix_.empty() && suffix_.empty() && !byte_fallback_;
  if (byte_level_ready_) {
    // Raw-bytes spelling of every token made only of byte-level characters.
    raw_tokens_.resize(vocab_.size());
    for (std::size_t id = 0; id < vocab_.size(); ++id) {
      const std::string& t = vocab_[id];
      std::string raw;
      bool ok = !t.empty();
      for (std::size_t at = 0, len; ok && at < t.size(); at += len) {
        uint32_t cp;
        ok = utf8::decode_valid(std::string_view(t).substr(at), &len, &cp) && cp < table.cp_to_byte.size() &&
             table.cp_to_byte[cp] >= 0;
        if (ok) raw.push_back(static_cast<char>(table.cp_to_byte[cp]));
      }
      if (ok) raw_tokens_[id] = std::move(raw);
    }
    raw_index_.reserve(vocab_.size());
    for (std::size_t id = 0; id < vocab_.size(); ++id)
      if (!raw_tokens_[id].empty()) raw_index_.insert(raw_tokens_[id], static_cast<int32_t>(id));
  }
}

BpeModel::~BpeModel() = default;

std::string_view BpeModel::id_to_token(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return {};
  return vocab_[static_cast<std::size_t>(id)];
}

void BpeModel::merge(std::vector<Sym>& s) const {
  const std::size_t n = s.size();
  if (n < 2) return;
  if (n <= 64) {
    // Short words: rescan the cached pair ranks (faster than a heap at this size).
    int32_t r[64];
    std::size_t m = n;
    for (std::size_t i = 0; i + 1 < m; ++i) {
      const int32_t k = rank_of(s[i].id, s[i + 1].id);
      r[i] = k < 0 ? INT_MAX : k;
    }
    for (;;) {
      std::size_t best = 0;
      for (std::size_t i = 1; i + 1 < m; ++i)
        if (r[i] < r[best]) best = i;
      if (r[best] == INT_MAX) break;
      s[best].id = merged_[static_cast<std::size_t>(r[best])];
      s[best].end = s[best + 1].end;
      for (std::size_t i = best + 1; i + 1 < m; ++i) s[i] = s[i + 1];
      for (std::size_t i = best; i + 2 < m; ++i) r[i] = r[i + 1];
      --m;
      if (m < 2) break;
      if (best > 0) {
        const int32_t k = rank_of(s[best - 1].id, s[best].id);
        r[best - 1] = k < 0 ? INT_MAX : k;
      }
      if (best + 1 < m) {
        const int32_t k = rank_of(s[best].id, s[best + 1].id);
        r[best] = k < 0 ? INT_MAX : k;
      }
    }
    s.resize(m);
    return;
  }
  // Long words: HF's Word::merge_all (a heap of (rank, position), stale entries skipped).
  struct Entry {
    int32_t rank;
    uint32_t pos;
    bool operator<(const Entry& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  thread_local std::vector<Entry> heap;
  thread_local std::vector<int32_t> prev, next;
  heap.clear();
  prev.resize(n);
  next.resize(n);
  for (std::size_t i = 0; i < n; ++i) {
    prev[i] = static_cast<int32_t>(i) - 1;
    next[i] = i + 1 < n ? static_cast<int32_t>(i + 1) : -1;
  }
  auto push = [&](int32_t pos) {
    if (pos < 0 || next[static_cast<std::size_t>(pos)] < 0) return;
    const int32_t k = rank_of(s[static_cast<std::size_t>(pos)].id, s[static_cast<std::size_t>(next[static_cast<std::size_t>(pos)])].id);
    if (k < 0) return;
    heap.push_back({k, static_cast<uint32_t>(pos)});
    std::push_heap(heap.begin(), heap.end());
  };
  for (std::size_t i = 0; i + 1 < n; ++i) push(static_cast<int32_t>(i));
  std::vector<uint8_t>& dead = *[] { thread_local std::vector<uint8_t> d; return &d; }();
  dead.assign(n, 0);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end());
    const Entry top = heap.back();
    heap.pop_back();
    const std::size_t p = top.pos;
    if (dead[p] || next[p] < 0) continue;
    const auto q = static_cast<std::size_t>(next[p]);
    if (rank_of(s[p].id, s[q].id) != top.rank) continue;
    s[p].id = merged_[static_cast<std::size_t>(top.rank)];
    s[p].end = s[q].end;
    dead[q] = 1;
    next[p] = next[q];
    if (next[q] >= 0) prev[static_cast<std::size_t>(next[q])] = static_cast<int32_t>(p);
    push(prev[p]);
    push(static_cast<int32_t>(p));
  }
  std::size_t m = 0;
  for (std::size_t i = 0; i < n; ++i)
    if (!dead[i]) s[m++] = s[i];
  s.resize(m);
}

void BpeModel::tokenize(std::string_view text, std::vector<Token>& out) const {
  if (text.empty()) return;
  if (ignore_merges_) {
    const int32_t id = index_.find(text);
    if (id >= 0) {
      out.push_back({id, 0, static_cast<uint32_t>(text.size())});
      return;
    }
  }
  const bool cacheable = text.size() <= Cache::kMaxWordBytes;
  const uint64_t h = cacheable ? hash_bytes(text.data(), text.size()) : 0;
  if (cacheable && cache_->lookup(text, h, 0, out)) return;
  thread_local std::vector<Sym> syms;
  thread_local std::string piece;
  syms.clear();
  bool pending_unk = false;  // the last symbol is an unk that may absorb the next unknown char
  for (std::size_t at = 0, len; at < text.size(); at += len) {
    utf8::decode_valid(text.substr(at), &len);
    std::string_view ch = text.substr(at, len);
    const bool last = at + len == text.size();
    int32_t id;
    if (prefix_.empty() && suffix_.empty()) {
      id = index_.find(ch);
    } else {
      piece.clear();
      if (at > 0) piece += prefix_;
      piece += ch;
      if (last) piece += suffix_;
      id = index_.find(piece);
    }
    const auto b = static_cast<uint32_t>(at), e = static_cast<uint32_t>(at + len);
    if (id >= 0) {
      syms.push_back({id, b, e});
      pending_unk = false;
      continue;
    }
    if (byte_fallback_) {
      bool all = true;
      for (std::size_t k = 0; k < len; ++k) all = all && byte_ids_[static_cast<unsigned char>(ch[k])] >= 0;
      if (all) {
        for (std::size_t k = 0; k < len; ++k)
          syms.push_back({byte_ids_[static_cast<unsigned char>(ch[k])], b + static_cast<uint32_t>(k), b + static_cast<uint32_t>(k + 1)});
        pending_unk = false;
        continue;
      }
    }
    if (unk_ < 0) continue;  // no unk token: HF drops the character
    if (fuse_unk_ && pending_unk) {
      syms.back().end = e;
    } else {
      syms.push_back({unk_, b, e});
      pending_unk = true;
    }
  }
  merge(syms);
  const std::size_t first = out.size();
  for (const Sym& s : syms) out.push_back({s.id, s.begin, s.end});
  if (cacheable) cache_->insert(text, h, 0, out.data() + first, out.data() + out.size());
}

void BpeModel::tokenize_bytes(std::string_view raw, uint32_t base, std::vector<Token>& out) const {
  if (raw.empty()) return;
  if (ignore_merges_) {
    const int32_t id = raw_index_.find(raw);
    if (id >= 0) {
      out.push_back({id, base, base + static_cast<uint32_t>(raw.size())});
      return;
    }
  }
  // Word caches: first a per-thread direct-mapped table (no lock; a newer word evicts an
  // older one), then the shared bounded one.
  // It belongs to one model at a time: `uid_` is unique per BpeModel ever built, so a
  // thread that switches models starts from an empty table.
  struct LocalEntry {
    uint64_t hash = 0;
    std::string key;
    std::vector<Token> tokens;  // offsets relative to the word
  };
  struct LocalCache {
    uint64_t owner = 0;
    std::vector<LocalEntry> slots;
  };
  static constexpr std::size_t kLocalSlots = 8192, kLocalMaxBytes = 64;
  thread_local LocalCache locals[2];  // two models in turn on one thread keep their tables
  thread_local int last = 0;
  const bool cacheable = raw.size() <= kLocalMaxBytes;
  uint64_t h = 0;
  LocalEntry* slot = nullptr;
  if (cacheable) {
    if (locals[last].owner != uid_) {
      last = 1 - last;
      if (locals[last].owner != uid_) {
        locals[last].owner = uid_;
        locals[last].slots.assign(kLocalSlots, LocalEntry{});
      }
    }
    LocalCache& local = locals[last];
    h = hash_bytes(raw.data(), raw.size()) | 1;  // never 0 (empty slot)
    slot = &local.slots[(h >> 7) & (kLocalSlots - 1)];
    if (slot->hash == h && slot->key == raw) {
      for (const Token& t : slot->tokens) out.push_back({t.id, t.begin + base, t.end + base});
      return;
    }
    // Then the bounded shared cache (keys prefixed by 0xFF, never in UTF-8, so they cannot
    // collide with the byte-level strings that tokenize() caches there).
    thread_local std::string key;
    key.assign(1, '\xFF');
    key.append(raw);
    const uint64_t hk = hash_bytes(key.data(), key.size());
    const std::size_t first = out.size();
    if (cache_->lookup(key, hk, base, out)) {
      slot->hash = h;
      slot->key.assign(raw);
      slot->tokens.clear();
      for (std::size_t k = first; k < out.size(); ++k) slot->tokens.push_back({out[k].id, out[k].begin - base, out[k].end - base});
      return;
    }
  }
  thread_local std::vector<Sym> syms;
  syms.resize(raw.size());
  for (std::size_t i = 0; i < raw.size(); ++i)
    syms[i] = {level_ids_[static_cast<unsigned char>(raw[i])], base + static_cast<uint32_t>(i), base + static_cast<uint32_t>(i + 1)};
  merge(syms);
  for (const Sym& s : syms) out.push_back({s.id, s.begin, s.end});
  if (slot) {
    slot->hash = h;
    slot->key.assign(raw);
    slot->tokens.clear();
    for (const Sym& s : syms) slot->tokens.push_back({s.id, s.begin - base, s.end - base});
    thread_local std::string key2;
    key2.assign(1, '\xFF');
    key2.append(raw);
    cache_->insert(key2, hash_bytes(key2.data(), key2.size()), 0, slot->tokens.data(), slot->tokens.data() + slot->tokens.size());
  }
}

// --- Unigram ------------------------------------------------------------------------------

UnigramModel::UnigramModel(const Json& j, const std::vector<std::string>& special_tokens, const std::string& source) {
  using T = SpmModelProto::PieceType;
  SpmModelProto m;
  m.model_type = SpmModelProto::ModelType::unigram;
  m.byte_fallback = optional_bool(j, "byte_fallback");
  const Json& v = j.at("vocab");
  RHINE_CHECK(v.is_array() && !v.empty(), "tokenizer", "Unigram vocab of " + detail::quote(source) +
              " is not a non-empty array", Verbatim{v.dump().substr(0, 80)}, "\"vocab\": [[\"piece\", score], ...]");
  RHINE_CHECK(j.contains("unk_id") && j["unk_id"].is_number_integer() && j["unk_id"].get<int64_t>() >= 0 &&
              j["unk_id"].get<int64_t>() < static_cast<int64_t>(v.size()), "tokenizer",
              "Unigram model of " + detail::quote(source) + " needs an unk_id inside the vocab",
              Verbatim{j.contains("unk_id") ? j["unk_id"].dump() : std::string("absent")}, "set \"unk_id\"");
  const auto unk = static_cast<std::size_t>(j["unk_id"].get<int64_t>());
  m.unk_id = static_cast<int32_t>(unk);
  m.pieces.reserve(v.size());
  std::vector<double> scores;  // HF searches with the double scores (SpmUnigramModel)
  scores.reserve(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) {
    RHINE_CHECK(v[i].is_array() && v[i].size() == 2 && v[i][0].is_string() && v[i][1].is_number(), "tokenizer",
                "Unigram vocab entry " + std::to_string(i) + " of " + detail::quote(source) + " is not [piece, score]",
                Verbatim{v[i].dump().substr(0, 80)}, "\"vocab\": [[\"piece\", score], ...]");
    SpmModelProto::Piece p;
    p.piece = v[i][0].get<std::string>();
    p.score = v[i][1].get<float>();
    scores.push_back(as_tokenizers_reads(v[i][1].get<double>()));
    const bool is_byte = p.piece.size() == 6 && p.piece.compare(0, 3, "<0x") == 0 && p.piece[5] == '>' &&
                         std::isxdigit(static_cast<unsigned char>(p.piece[3])) &&
                         std::isxdigit(static_cast<unsigned char>(p.piece[4])) &&
                         !std::islower(static_cast<unsigned char>(p.piece[3])) &&
                         !std::islower(static_cast<unsigned char>(p.piece[4]));
    if (i == unk) p.type = T::unknown;
    else if (m.byte_fallback && is_byte) p.type = T::byte;
    else if (std::find(special_tokens.begin(), special_tokens.end(), p.piece) != special_tokens.end()) p.type = T::control;
    m.pieces.push_back(std::move(p));
  }
  model_ = std::make_unique<SpmUnigramModel>(std::make_shared<const SpmVocab>(m, source), std::move(scores));
}

// --- WordPiece ----------------------------------------------------------------------------

WordPieceModel::WordPieceModel(const Json& j, const std::string& source) {
  vocab_ = read_vocab_object(j.at("vocab"), "WordPiece", source);
  index_.reserve(vocab_.size());
  for (std::size_t id = 0; id < vocab_.size(); ++id)
    if (!vocab_[id].empty()) index_.insert(vocab_[id], static_cast<int32_t>(id));
  prefix_ = j.contains("continuing_subword_prefix") && j["continuing_subword_prefix"].is_string()
                ? j["continuing_subword_prefix"].get<std::string>() : "##";
  const std::string unk = j.contains("unk_token") && j["unk_token"].is_string() ? j["unk_token"].get<std::string>() : "[UNK]";
  unk_ = index_.find(unk);
  RHINE_CHECK(unk_ >= 0, "tokenizer", "WordPiece unk_token of " + detail::quote(source) + " is not in the vocab",
              unk, "add the unk token to the vocab");
  if (j.contains("max_input_chars_per_word") && j["max_input_chars_per_word"].is_number_unsigned())
    max_chars_ = j["max_input_chars_per_word"].get<std::size_t>();
}

std::string_view WordPieceModel::id_to_token(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return {};
  return vocab_[static_cast<std::size_t>(id)];
}

void WordPieceModel::tokenize(std::string_view text, std::vector<Token>& out) const {
  if (text.empty()) return;
  std::vector<std::size_t> starts;  // char boundaries
  for (std::size_t at = 0, len; at < text.size(); at += len) {
    starts.push_back(at);
    utf8::decode_valid(text.substr(at), &len);
  }
  const std::size_t n_chars = starts.size();
  starts.push_back(text.size());
  const auto whole_unk = [&] { out.push_back({unk_, 0, static_cast<uint32_t>(text.size())}); };
  if (n_chars > max_chars_) return whole_unk();
  const std::size_t first = out.size();
  std::string piece;
  for (std::size_t s = 0; s < n_chars;) {
    int32_t found = -1;
    std::size_t e = n_chars;
    for (; e > s; --e) {
      piece.clear();
      if (s > 0) piece += prefix_;
      piece.append(text.substr(starts[s], starts[e] - starts[s]));
      found = index_.find(piece);
      if (found >= 0) break;
    }
    if (found < 0) {
      out.resize(first);
      return whole_unk();
    }
    out.push_back({found, static_cast<uint32_t>(starts[s]), static_cast<uint32_t>(starts[e])});
    s = e;
  }
}

}  // namespace rhine::tokenizer
