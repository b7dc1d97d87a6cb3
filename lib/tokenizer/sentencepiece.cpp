// SentencePiece normalizer, models and decoder, following libsentencepiece
// 0.1.97 (normalizer.cc, unigram_model.cc EncodeOptimized, bpe_model.cc,
// sentencepiece_processor.cc PopulateSentencePieceText / Decode) so that ids
// match it exactly. Tests compare against libsentencepiece itself.

#include "rhine/tokenizer/sentencepiece.h"

#include <algorithm>
#include <cfloat>
#include <cstring>
#include <mutex>
#include <queue>

#include "rhine/core/error.h"
#include "hash_index.h"
#include "utf8.h"

namespace rhine::tokenizer {
namespace {

constexpr const char* kComponent = "spm_model";
constexpr std::string_view kSpace = "\xE2\x96\x81";  // U+2581 LOWER ONE EIGHTH BLOCK
constexpr std::string_view kReplacement = "\xEF\xBF\xBD";

uint32_t load_u32(const char* p) {
  return static_cast<uint32_t>(static_cast<uint8_t>(p[0])) | static_cast<uint32_t>(static_cast<uint8_t>(p[1])) << 8 |
         static_cast<uint32_t>(static_cast<uint8_t>(p[2])) << 16 | static_cast<uint32_t>(static_cast<uint8_t>(p[3])) << 24;
}

// darts-clone unit accessors.
inline bool unit_has_leaf(uint32_t u) { return (u >> 8) & 1; }
inline uint32_t unit_value(uint32_t u) { return u & 0x7FFFFFFFu; }
inline uint32_t unit_label(uint32_t u) { return u & 0x800000FFu; }
inline uint32_t unit_offset(uint32_t u) { return (u >> 10) << ((u & 0x200u) >> 6); }

bool is_byte_piece_name(std::string_view s, uint8_t* b) {
  // "<0xXX>" with uppercase hex, as ByteToPiece writes it.
  if (s.size() != 6 || s.substr(0, 3) != "<0x" || s[5] != '>') return false;
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  const int hi = hex(s[3]), lo = hex(s[4]);
  if (hi < 0 || lo < 0) return false;
  *b = static_cast<uint8_t>(hi * 16 + lo);
  return true;
}

}  // namespace

// --- CharsMap --------------------------------------------------------------------------

CharsMap::CharsMap(std::string_view blob, const std::string& source) {
  auto bad = [&](const std::string& what, auto value) {
    RHINE_FAIL(kComponent,
               "malformed SentencePiece model " + detail::quote(source) + ": normalizer_spec.precompiled_charsmap: " + what,
               value, "the normalization rules are corrupt; re-export the model with spm_train");
  };
  if (blob.empty()) return;
  if (blob.size() < 4) bad("shorter than its 4-byte header", blob.size());
  const uint32_t trie_size = load_u32(blob.data());
  if (trie_size > blob.size() - 4) bad("trie size runs past the end of the blob", trie_size);
  if (trie_size % 4 != 0 || trie_size == 0) bad("trie size must be a positive multiple of 4", trie_size);
  units_.resize(trie_size / 4);
  for (std::size_t i = 0; i < units_.size(); ++i) units_[i] = load_u32(blob.data() + 4 + 4 * i);
  strings_ = std::string(blob.substr(4 + trie_size));
  // Replacement strings are read up to their NUL: make sure the last one is terminated.
  strings_.push_back('\0');
}

std::size_t CharsMap::longest_match(std::string_view s, std::string_view* replacement) const {
  // darts-clone commonPrefixSearch with an explicit length, keeping the longest result.
  const std::size_t n_units = units_.size();
  if (n_units == 0) return 0;
  std::size_t pos = unit_offset(units_[0]);
  std::size_t best_len = 0;
  uint32_t best_value = 0;
  for (std::size_t i = 0; i < s.size(); ++i) {
    const auto c = static_cast<uint8_t>(s[i]);
    pos ^= c;
    if (pos >= n_units) return best_len ? (*replacement = std::string_view(strings_.data() + best_value), best_len) : 0;
    const uint32_t u = units_[pos];
    if (unit_label(u) != c) break;
    pos ^= unit_offset(u);
    if (pos >= n_units) break;
    if (unit_has_leaf(u)) {
      const uint32_t v = unit_value(units_[pos]);
      if (v < strings_.size()) {  // out-of-range values of a corrupt map are ignored
        best_len = i + 1;
        best_value = v;
      }
    }
  }
  if (best_len) *replacement = std::string_view(strings_.data() + best_value);
  return best_len;
}

// --- PrefixMatcher ----------------------------------------------------------------------

PrefixMatcher::PrefixMatcher(const std::vector<std::string>& strings) {
  for (const auto& s : strings) {
    if (s.empty()) continue;
    max_len_ = std::max(max_len_, s.size());
    first_byte_[static_cast<uint8_t>(s[0])] = true;
    for (std::size_t n = 1; n < s.size(); ++n) set_.emplace(s.substr(0, n), false);
    set_[s] = true;
  }
}

std::size_t PrefixMatcher::longest(std::string_view s) const {
  if (s.empty() || !first_byte_[static_cast<uint8_t>(s[0])]) return 0;
  std::size_t best = 0;
  std::string key;
  const std::size_t limit = std::min(max_len_, s.size());
  for (std::size_t n = 1; n <= limit; ++n) {
    key.assign(s.data(), n);
    auto it = set_.find(key);
    if (it == set_.end()) break;
    if (it->second) best = n;
  }
  return best;
}

// --- SpmNormalizer ---------------------------------------------------------------------

SpmNormalizer::SpmNormalizer(const SpmModelProto& m, const std::string& source)
    : charsmap_(m.precompiled_charsmap, source),
      add_dummy_prefix_(m.add_dummy_prefix),
      remove_extra_whitespaces_(m.remove_extra_whitespaces),
      escape_whitespaces_(m.escape_whitespaces),
      suffix_(m.treat_whitespace_as_suffix) {
  std::vector<std::string> user;
  for (const auto& p : m.pieces)
    if (p.type == SpmModelProto::PieceType::user_defined) user.push_back(p.piece);
  user_defined_ = PrefixMatcher(user);
}

void SpmNormalizer::normalize(NormalizedString& s) const {
  const std::string_view in = s.text;
  const std::vector<uint32_t>& in_align = s.align;
  std::string out;
  std::vector<uint32_t> align;
  out.reserve(in.size() * 3 / 2 + 8);
  align.reserve(in.size() * 3 / 2 + 8);

  // NormalizePrefix: user-defined symbol verbatim, else the longest charsmap rule, else one
  // UTF-8 character (an invalid byte becomes U+FFFD and consumes one byte).
  auto prefix = [&](std::size_t at, std::string_view* rep) -> std::size_t {
    const std::string_view rest = in.substr(at);
    if (!user_defined_.empty()) {
      const std::size_t n = user_defined_.longest(rest);
      if (n) {
        *rep = rest.substr(0, n);
        return n;
      }
    }
    if (!charsmap_.empty()) {
      const std::size_t n = charsmap_.longest_match(rest, rep);
      if (n) return n;
    }
    std::size_t len;
    if (!utf8::decode_valid(rest, &len)) {
      *rep = kReplacement;
      return 1;
    }
    *rep = rest.substr(0, len);
    return len;
  };

  std::size_t at = 0;
  // `consumed` is the original offset of the input position `at`.
  auto orig = [&](std::size_t i) { return in_align[i]; };
  if (remove_extra_whitespaces_) {
    while (at < in.size()) {
      std::string_view rep;
      const std::size_t n = prefix(at, &rep);
      if (rep != " ") break;
      at += n;
    }
  }
  if (at >= in.size()) {
    s.text.clear();
    s.align.assign(1, orig(in.size()));
    return;
  }
  auto add_ws = [&](uint32_t consumed) {
    if (escape_whitespaces_) {
      out.append(kSpace);
      align.insert(align.end(), 3, consumed);
    } else {
      out.push_back(' ');
      align.push_back(consumed);
    }
  };
  if (!suffix_ && add_dummy_prefix_) add_ws(orig(at));

  bool prev_space = remove_extra_whitespaces_;
  while (at < in.size()) {
    std::string_view rep;
    const std::size_t n = prefix(at, &rep);
    const uint32_t consumed = orig(at);
    if (prev_space)
      while (!rep.empty() && rep.front() == ' ') rep.remove_prefix(1);
    if (!rep.empty()) {
      for (char c : rep) {
        if (escape_whitespaces_ && c == ' ') {
          out.append(kSpace);
          align.insert(align.end(), 3, consumed);
        } else {
          out.push_back(c);
          align.push_back(consumed);
        }
      }
      prev_space = rep.back() == ' ';
    }
    at += n;
    if (!remove_extra_whitespaces_) prev_space = false;
  }
  uint32_t consumed = orig(in.size());
  if (remove_extra_whitespaces_) {
    const std::string_view space = escape_whitespaces_ ? kSpace : std::string_view(" ");
    while (out.size() >= space.size() && std::string_view(out).substr(out.size() - space.size()) == space) {
      const std::size_t length = out.size() - space.size();
      consumed = align[length];
      out.resize(length);
      align.resize(length);
    }
  }
  if (suffix_ && add_dummy_prefix_) add_ws(consumed);
  align.push_back(consumed);
  s.text = std::move(out);
  s.align = std::move(align);
}

// --- SpmVocab --------------------------------------------------------------------------

SpmVocab::SpmVocab(const SpmModelProto& m, const std::string& source)
    : pieces_(m.pieces), unk_id_(-1), byte_fallback_(m.byte_fallback) {
  using T = SpmModelProto::PieceType;
  auto bad = [&](const std::string& what, const auto& value, const std::string& hint) {
    RHINE_FAIL(kComponent, "invalid SentencePiece model " + detail::quote(source) + ": " + what, value, hint);
  };
  std::fill(std::begin(byte_ids_), std::end(byte_ids_), -1);
  matchable_ = std::make_unique<StringIndex>();
  reserved_ = std::make_unique<StringIndex>();
  matchable_->reserve(pieces_.size());
  std::vector<std::string> user;
  int n_bytes = 0;
  for (std::size_t i = 0; i < pieces_.size(); ++i) {
    const auto& p = pieces_[i];
    const auto id = static_cast<int32_t>(i);
    if (p.piece.empty()) bad("pieces[" + std::to_string(i) + "].piece is empty", p.piece, "every piece needs a non-empty string");
    const bool matchable = p.type == T::normal || p.type == T::user_defined || p.type == T::unused;
    auto& table = matchable ? *matchable_ : *reserved_;
    if (!table.insert(std::string_view(pieces_[i].piece), id))
      bad("pieces[" + std::to_string(i) + "].piece is a duplicate", p.piece, "piece strings must be unique");
    if (p.type == T::user_defined) user.push_back(p.piece);
    if (p.type == T::unknown) {
      if (unk_id_ >= 0) bad("more than one piece has type UNKNOWN", p.piece, "a model has exactly one <unk> piece");
      unk_id_ = id;
    }
    if (p.type == T::byte) {
      uint8_t b;
      if (!is_byte_piece_name(p.piece, &b))
        bad("pieces[" + std::to_string(i) + "] has type BYTE but is not named <0xXX>", p.piece, "byte pieces are <0x00>..<0xFF>");
      byte_ids_[b] = id;
      ++n_bytes;
    }
  }
  if (unk_id_ < 0) bad("no piece has type UNKNOWN (trainer_spec.unk_id)", m.unk_id, "a model needs an <unk> piece");
  if (byte_fallback_ && n_bytes != 256)
    bad("trainer_spec.byte_fallback is on but the number of BYTE pieces is not 256", n_bytes, "byte fallback needs <0x00>..<0xFF>");
  user_defined_ = PrefixMatcher(user);
  for (const auto& p : pieces_) {
    const bool matchable = p.type == T::normal || p.type == T::user_defined || p.type == T::unused;
    if (!matchable && matchable_->find(p.piece) >= 0) overlap_ = true;
  }
}

SpmVocab::~SpmVocab() = default;

int32_t SpmVocab::find_matchable(std::string_view piece) const { return matchable_->find(piece); }

int32_t SpmVocab::find_any(std::string_view piece) const {
  const int32_t id = reserved_->find(piece);
  return id >= 0 ? id : matchable_->find(piece);
}

int32_t SpmVocab::piece_to_id(std::string_view piece) const {
  const int32_t id = find_any(piece);
  return id < 0 ? unk_id_ : id;
}

// --- SpmModel ---------------------------------------------------------------------------

std::string_view SpmModel::id_to_token(int32_t id) const {
  if (id < 0 || id >= vocab_->size()) return {};
  return vocab_->piece(id);
}

void SpmModel::emit(std::string_view text, uint32_t begin, uint32_t end, uint32_t base, int32_t id, bool& prev_unk,
                    std::vector<Token>& out) const {
  const auto type = vocab_->type(id);
  const bool is_unk = type == SpmModelProto::PieceType::unknown;
  if (type == SpmModelProto::PieceType::control) {
    out.push_back({id, base + begin, base + begin});
  } else if (is_unk && vocab_->byte_fallback()) {
    // One <0xXX> per byte; the last one carries the surface.
    for (uint32_t i = begin; i < end; ++i) {
      const bool last = i + 1 == end;
      out.push_back({vocab_->byte_id(static_cast<uint8_t>(text[i])), base + begin, base + (last ? end : begin)});
    }
  } else if (is_unk && prev_unk && !out.empty()) {
    out.back().end = base + end;  // fuse runs of unknown pieces (possibly across words)
  } else {
    out.push_back({id, base + begin, base + end});
  }
  prev_unk = is_unk;
}

// --- Unigram -----------------------------------------------------------------------------

// A byte trie over the matchable pieces: 256-way tables at the root and at every node with
// many children, sorted edge lists elsewhere. Each node carries what Viterbi needs (id,
// score, type) so the hot loop never touches the piece strings.
struct SpmUnigramModel::Trie {
  struct Node {
    uint32_t edge_begin = 0, edge_count = 0;
    int32_t value = -1;  // piece id ending here
    int32_t dense = -1;  // index of a 256-entry child table, or -1
    double score = 0;    // the piece's float score, or its double score in HF mode
    SpmModelProto::PieceType type = SpmModelProto::PieceType::normal;
  };
  struct Edge {
    uint8_t byte;
    uint32_t child;
  };
  static constexpr uint32_t kDenseFrom = 12;
  std::vector<Node> nodes;
  std::vector<Edge> edges;
  std::vector<uint32_t> dense;  // 256 children per table, 0 = none

  Trie(const SpmVocab& v, const std::vector<double>& f64_scores) {
    std::vector<std::pair<std::string_view, int32_t>> items;
    for (int32_t id = 0; id < v.size(); ++id) {
      const auto t = v.type(id);
      // HF's Unigram (f64 scores) matches every vocabulary entry, byte and control pieces too.
      if (t == SpmModelProto::PieceType::normal || t == SpmModelProto::PieceType::user_defined ||
          t == SpmModelProto::PieceType::unused || !f64_scores.empty())
        items.emplace_back(v.piece(id), id);
    }
    std::sort(items.begin(), items.end());
    nodes.emplace_back();  // root
    build(0, items, 0, items.size(), 0);
    for (uint32_t n = 0; n < nodes.size(); ++n) {
      Node& node = nodes[n];
      if (node.value >= 0) {
        node.score = f64_scores.empty() ? static_cast<double>(v.score(node.value))
                                        : f64_scores[static_cast<std::size_t>(node.value)];
        node.type = v.type(node.value);
      }
      if (n == 0 || node.edge_count >= kDenseFrom) {
        node.dense = static_cast<int32_t>(dense.size() / 256);
        dense.resize(dense.size() + 256, 0);
        for (uint32_t e = node.edge_begin; e < node.edge_begin + node.edge_count; ++e)
          dense[static_cast<std::size_t>(node.dense) * 256 + edges[e].byte] = edges[e].child;
      }
    }
  }

  // items[lo, hi) share the prefix of length `depth`; node is their trie node.
  void build(uint32_t node, const std::vector<std::pair<std::string_view, int32_t>>& items, std::size_t lo,
             std::size_t hi, std::size_t depth) {
    if (lo < hi && items[lo].first.size() == depth) {
      nodes[node].value = items[lo].second;
      ++lo;
    }
    std::vector<std::pair<uint8_t, std::pair<std::size_t, std::size_t>>> groups;
    for (std::size_t i = lo; i < hi;) {
      const auto b = static_cast<uint8_t>(items[i].first[depth]);
      std::size_t j = i + 1;
      while (j < hi && static_cast<uint8_t>(items[j].first[depth]) == b) ++j;
      groups.push_back({b, {i, j}});
      i = j;
    }
    const auto edge_begin = static_cast<uint32_t>(edges.size());
    nodes[node].edge_begin = edge_begin;
    nodes[node].edge_count = static_cast<uint32_t>(groups.size());
    for (const auto& g : groups) {
      edges.push_back({g.first, static_cast<uint32_t>(nodes.size())});
      nodes.emplace_back();
    }
    for (std::size_t k = 0; k < groups.size(); ++k)
      build(edges[edge_begin + k].child, items, groups[k].second.first, groups[k].second.second, depth + 1);
  }

  // The child of `node` by byte `b`, or 0 when there is none.
  uint32_t child(uint32_t node, uint8_t b) const {
    const Node& n = nodes[node];
    if (n.dense >= 0) return dense[static_cast<std::size_t>(n.dense) * 256 + b];
    for (uint32_t e = n.edge_begin, end = n.edge_begin + n.edge_count; e < end; ++e) {
      if (edges[e].byte == b) return edges[e].child;
      if (edges[e].byte > b) break;
    }
    return 0;
  }
};

SpmUnigramModel::SpmUnigramModel(std::shared_ptr<const SpmVocab> vocab, std::vector<double> f64_scores)
    : SpmModel(std::move(vocab)) {
  RHINE_CHECK(f64_scores.empty() || f64_scores.size() == static_cast<std::size_t>(vocab_->size()), "tokenizer",
              "Unigram double scores must be one per piece", f64_scores.size(), "");
  trie_ = std::make_unique<Trie>(*vocab_, f64_scores);
  f64_ = !f64_scores.empty();
  if (f64_) f64_unk_score_ = *std::min_element(f64_scores.begin(), f64_scores.end()) - 10.0;
  min_score_ = FLT_MAX;
  max_score_ = FLT_MIN;
  for (int32_t id = 0; id < vocab_->size(); ++id) {
    if (vocab_->type(id) != SpmModelProto::PieceType::normal) continue;
    min_score_ = std::min(min_score_, vocab_->score(id));
    max_score_ = std::max(max_score_, vocab_->score(id));
  }
  if (min_score_ == FLT_MAX) min_score_ = 0;
  if (max_score_ == FLT_MIN) max_score_ = 0;
}

SpmUnigramModel::~SpmUnigramModel() = default;

void SpmUnigramModel::tokenize(std::string_view text, std::vector<Token>& out) const {
  using T = SpmModelProto::PieceType;
  constexpr float kUnkPenalty = 10.0f;
  // score: double, holding a float-rounded value in SentencePiece mode (so comparisons are
  // libsentencepiece's float-vs-double ones) and the exact sum in HF mode.
  struct Best {
    int32_t id = -1;
    double score = 0;
    int32_t starts_at = -1;
  };
  const auto size = static_cast<int32_t>(text.size());
  if (size == 0) return;
  const float unk_score = min_score_ - kUnkPenalty;
  thread_local std::vector<Best> best;
  best.assign(static_cast<std::size_t>(size) + 1, Best{});
  int32_t starts_at = 0;
  while (starts_at < size) {
    const double score_here = best[starts_at].score;
    bool has_single = false;
    const int32_t mblen = std::min<int32_t>(utf8::one_char_len(static_cast<uint8_t>(text[starts_at])), size - starts_at);
    uint32_t node = 0;
    for (int32_t key = starts_at; key < size;) {
      node = trie_->child(node, static_cast<uint8_t>(text[key]));
      ++key;
      if (node == 0) break;
      const Trie::Node& tn = trie_->nodes[node];
      const int32_t id = tn.value;
      if (id < 0) continue;
      const auto type = tn.type;
      if (type == T::unused) continue;
      const int32_t length = key - starts_at;
      // libsentencepiece writes `user ? length * max_score_ - 0.1 : score`: the double literal
      // makes the whole candidate a double, compared with the stored float. Same here, so that
      // near-ties resolve identically.
      const double sc = type == T::user_defined ? static_cast<double>(static_cast<float>(length) * max_score_) - 0.1
                                                : tn.score;
      const double cand = sc + score_here;
      Best& target = best[key];
      if (target.starts_at == -1 || cand > target.score) {
        target.score = f64_ ? cand : static_cast<double>(static_cast<float>(cand));
        target.starts_at = starts_at;
        target.id = id;
      }
      if (!has_single && length == mblen) has_single = true;
    }
    if (!has_single) {
      Best& target = best[starts_at + mblen];
      const double cand = f64_ ? f64_unk_score_ + score_here
                               : static_cast<double>(unk_score + static_cast<float>(score_here));
      if (target.starts_at == -1 || cand > target.score) {
        target.score = cand;
        target.starts_at = starts_at;
        target.id = vocab_->unk_id();
      }
    }
    starts_at += mblen;
  }
  // Backtrack, then emit in order.
  thread_local std::vector<std::pair<int32_t, int32_t>> path;  // (starts_at, end)
  path.clear();
  for (int32_t end = size; end > 0; end = best[end].starts_at) path.emplace_back(best[end].starts_at, end);
  bool prev_unk = false;
  for (auto it = path.rbegin(); it != path.rend(); ++it)
    emit(text, static_cast<uint32_t>(it->first), static_cast<uint32_t>(it->second), 0, best[it->second].id, prev_unk,
         out);
}

// --- BPE -------------------------------------------------------------------------------

SpmBpeModel::SpmBpeModel(std::shared_ptr<const SpmVocab> vocab) : SpmModel(std::move(vocab)) {
  using T = SpmModelProto::PieceType;
  split_words_ = true;
  use_pairs_ = true;
  pairs_ = std::make_unique<PairIndex>();
  for (int32_t id = 0; id < vocab_->size(); ++id) {
    const auto t = vocab_->type(id);
    if (t == T::unused) has_unused_ = true;
    if (t != T::normal && t != T::unused && t != T::user_defined) continue;
    const std::string_view p = vocab_->piece(id);
    if (t != T::user_defined && p.find(kSpace, 1) != std::string_view::npos) split_words_ = false;
    for (std::size_t k = 0; k < p.size();) {
      const std::size_t n = std::min<std::size_t>(utf8::one_char_len(static_cast<uint8_t>(p[k])), p.size() - k);
      if (vocab_->find_matchable(p.substr(k, n)) < 0) use_pairs_ = false;
      if (k > 0) {
        const int32_t l = vocab_->find_matchable(p.substr(0, k)), r = vocab_->find_matchable(p.substr(k));
        if (l >= 0 && r >= 0) pairs_->insert(l, r, id);
      }
      k += n;
    }
  }
  for (int c = 0; c < 128; ++c) {
    const char ch = static_cast<char>(c);
    ascii_ids_[c] = vocab_->find_matchable(std::string_view(&ch, 1));
  }
  cache_ = std::make_unique<WordCache>();
}

// A bounded, sharded word -> tokens cache. Each shard is a fixed open-addressing table that
// stops accepting entries when half full (like HF tokenizers' cache): no eviction, no
// unbounded growth, one mutex per shard.
struct SpmBpeModel::WordCache {
  static constexpr std::size_t kShards = 32, kSlots = 2048, kMaxWordBytes = 48;
  struct Entry {
    uint64_t hash = 0;
    std::string key;
    std::vector<Token> tokens;  // offsets relative to the word
    bool first_unk = false, last_unk = false;
  };
  struct Shard {
    std::mutex mutex;
    std::vector<Entry> slots;  // allocated on first insert
    std::size_t used = 0;
  };
  Shard shards[kShards];

  // Copies the cached tokens of `word` into `out`; false on a miss.
  bool lookup(std::string_view word, uint64_t h, std::vector<Token>& out, bool& first_unk, bool& last_unk) {
    Shard& s = shards[h % kShards];
    std::lock_guard<std::mutex> lock(s.mutex);
    if (s.slots.empty()) return false;
    for (std::size_t i = (h >> 6) % kSlots;; i = (i + 1) % kSlots) {
      const Entry& e = s.slots[i];
      if (e.key.empty()) return false;
      if (e.hash == h && e.key == word) {
        out.insert(out.end(), e.tokens.begin(), e.tokens.end());
        first_unk = e.first_unk;
        last_unk = e.last_unk;
        return true;
      }
    }
  }
  void insert(std::string_view word, uint64_t h, const Token* begin, const Token* end, bool first_unk, bool last_unk) {
    Shard& s = shards[h % kShards];
    std::lock_guard<std::mutex> lock(s.mutex);
    if (2 * (s.used + 1) > kSlots) return;
    if (s.slots.empty()) s.slots.resize(kSlots);
    for (std::size_t i = (h >> 6) % kSlots;; i = (i + 1) % kSlots) {
      Entry& e = s.slots[i];
      if (e.key.empty()) {
        e.hash = h;
        e.key = std::string(word);
        e.tokens.assign(begin, end);
        e.first_unk = first_unk;
        e.last_unk = last_unk;
        ++s.used;
        return;
      }
      if (e.hash == h && e.key == word) return;
    }
  }
};

SpmBpeModel::~SpmBpeModel() = default;

void SpmBpeModel::tokenize_word(std::string_view text, uint32_t base, std::vector<Token>& out, bool& prev_unk) const {
  // Unk fusing and byte fallback look at the previous token only through `prev_unk`, so a
  // word's tokens computed with prev_unk = false are exact unless the word starts with an
  // unknown piece that would fuse with a preceding one.
  if (text.size() > WordCache::kMaxWordBytes) {
    tokenize_segment(text, base, out, prev_unk);
    return;
  }
  const uint64_t h = hash_bytes(text.data(), text.size());
  const std::size_t first = out.size();
  bool first_unk = false, last_unk = false;
  if (cache_->lookup(text, h, out, first_unk, last_unk)) {
    if (!(prev_unk && first_unk && !vocab_->byte_fallback())) {
      for (std::size_t k = first; k < out.size(); ++k) {
        out[k].begin += base;
        out[k].end += base;
      }
      prev_unk = last_unk;
      return;
    }
    out.resize(first);
    tokenize_segment(text, base, out, prev_unk);
    return;
  }
  bool unk = false;
  tokenize_segment(text, 0, out, unk);
  const auto unk_id = vocab_->unk_id();
  const bool byte_fb = vocab_->byte_fallback();
  if (out.size() > first) {
    // With byte fallback, unknown pieces became <0xXX> tokens and never fuse.
    first_unk = !byte_fb && out[first].id == unk_id;
    cache_->insert(text, h, out.data() + first, out.data() + out.size(), first_unk, unk);
  }
  if (prev_unk && first_unk) {  // fuse with the unk before this word, as emit() would have
    out.resize(first);
    bool p = true;
    tokenize_segment(text, base, out, p);
    prev_unk = p;
    return;
  }
  for (std::size_t k = first; k < out.size(); ++k) {
    out[k].begin += base;
    out[k].end += base;
  }
  prev_unk = unk;
}

void SpmBpeModel::tokenize(std::string_view text, std::vector<Token>& out) const {
  bool prev_unk = false;
  if (!split_words_) {
    tokenize_segment(text, 0, out, prev_unk);
    return;
  }
  // Merges never cross the start of a word (U+2581 as its own symbol), so each word is
  // merged on its own: same result, smaller heaps. User-defined symbols are frozen and
  // may contain U+2581 anywhere, so a cut is only made where no user symbol starts before.
  const auto& user = vocab_->user_defined();
  std::size_t seg_begin = 0, at = 0;
  while (at < text.size()) {
    std::size_t n = user.empty() ? 0 : user.longest(text.substr(at));
    if (n == 0) {
      if (at > seg_begin && text.compare(at, 3, kSpace) == 0) {
        tokenize_word(text.substr(seg_begin, at - seg_begin), static_cast<uint32_t>(seg_begin), out, prev_unk);
        seg_begin = at;
      }
      n = std::min<std::size_t>(utf8::one_char_len(static_cast<uint8_t>(text[at])), text.size() - at);
    }
    at += n;
  }
  if (seg_begin < text.size()) tokenize_word(text.substr(seg_begin), static_cast<uint32_t>(seg_begin), out, prev_unk);
}

namespace {
struct BpeSymbol {
  int32_t prev, next;
  uint32_t begin, len;
  int32_t id;
  bool freeze;
};
struct BpePair {
  float score;
  int32_t left, right;
  uint32_t size;
  int32_t id;
};
// libsentencepiece's SymbolPairComparator: higher score first, then the leftmost pair.
struct BpePairLess {
  bool operator()(const BpePair& a, const BpePair& b) const {
    return a.score < b.score || (a.score == b.score && a.left > b.left);
  }
};
}  // namespace

void SpmBpeModel::tokenize_segment(std::string_view text, uint32_t base, std::vector<Token>& out,
                                   bool& prev_unk) const {
  using T = SpmModelProto::PieceType;
  // Scratch reused across calls on the same thread (the model itself stays immutable).
  thread_local std::vector<BpeSymbol> symbols;
  thread_local std::vector<BpePair> heap;
  symbols.clear();
  heap.clear();
  const auto& user = vocab_->user_defined();
  for (std::size_t at = 0; at < text.size();) {
    std::size_t n = user.empty() ? 0 : user.longest(text.substr(at));
    const bool freeze = n > 0;
    const auto b = static_cast<uint8_t>(text[at]);
    if (!freeze) n = std::min<std::size_t>(utf8::one_char_len(b), text.size() - at);
    const int32_t id = (n == 1 && b < 128) ? ascii_ids_[b] : vocab_->find_matchable(text.substr(at, n));
    const auto index = static_cast<int32_t>(symbols.size());
    symbols.push_back({index - 1, at + n < text.size() ? index + 1 : -1, static_cast<uint32_t>(at),
                       static_cast<uint32_t>(n), id, freeze});
    at += n;
  }
  if (symbols.empty()) return;

  // Unused pieces met while merging -> the two parts they were made of.
  std::vector<std::pair<std::string_view, std::pair<std::string_view, std::string_view>>> rev_merge;
  auto maybe_add = [&](int32_t left, int32_t right) {
    if (left == -1 || right == -1) return;
    const BpeSymbol& l = symbols[left];
    const BpeSymbol& r = symbols[right];
    if (l.freeze || r.freeze) return;
    int32_t id;
    if (use_pairs_) {
      if (l.id < 0 || r.id < 0) return;
      id = pairs_->find(l.id, r.id);
    } else {
      id = vocab_->find_matchable(text.substr(l.begin, l.len + r.len));
    }
    if (id < 0) return;
    heap.push_back({vocab_->score(id), left, right, l.len + r.len, id});
    std::push_heap(heap.begin(), heap.end(), BpePairLess{});
    if (has_unused_ && vocab_->type(id) == T::unused) {
      const std::string_view piece = text.substr(l.begin, l.len + r.len);
      const std::string_view ls = text.substr(l.begin, l.len), rs = text.substr(r.begin, r.len);
      auto it = std::find_if(rev_merge.begin(), rev_merge.end(), [&](const auto& e) { return e.first == piece; });
      if (it == rev_merge.end())
        rev_merge.push_back({piece, {ls, rs}});
      else
        it->second = {ls, rs};  // libsentencepiece's map keeps the last split seen
    }
  };
  for (std::size_t i = 1; i < symbols.size(); ++i) maybe_add(static_cast<int32_t>(i - 1), static_cast<int32_t>(i));

  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), BpePairLess{});
    const BpePair top = heap.back();
    heap.pop_back();
    BpeSymbol& l = symbols[top.left];
    BpeSymbol& r = symbols[top.right];
    // Stale: a side was merged away or grew (symbols only grow, so equal sizes mean both
    // sides are unchanged and `top.id` is still the merged piece).
    if (l.len == 0 || r.len == 0 || l.len + r.len != top.size) continue;
    l.len += r.len;
    l.id = top.id;
    l.next = r.next;
    if (r.next >= 0) symbols[r.next].prev = top.left;
    r.len = 0;
    maybe_add(l.prev, top.left);
    maybe_add(top.left, l.next);
  }

  // Resegment unused pieces into their parts, recursively (rare: only with UNUSED pieces).
  auto resegment = [&](auto&& self, std::string_view w, uint32_t begin) -> void {
    const int32_t id = vocab_->piece_to_id(w);
    if (vocab_->type(id) == T::unused) {
      auto it = std::find_if(rev_merge.begin(), rev_merge.end(), [&](const auto& e) { return e.first == w; });
      if (it != rev_merge.end()) {
        self(self, it->second.first, begin);
        self(self, it->second.second, begin + static_cast<uint32_t>(it->second.first.size()));
        return;
      }
    }
    emit(text, begin, begin + static_cast<uint32_t>(w.size()), base, id, prev_unk, out);
  };
  const bool direct = !has_unused_ && !vocab_->has_overlap();
  for (int32_t i = 0; i != -1; i = symbols[i].next) {
    const BpeSymbol& sym = symbols[i];
    if (direct && sym.id >= 0)
      emit(text, sym.begin, sym.begin + sym.len, base, sym.id, prev_unk, out);
    else
      resegment(resegment, text.substr(sym.begin, sym.len), sym.begin);
  }
}

// --- decoder -------------------------------------------------------------------------------

SpmDecoder::SpmDecoder(std::shared_ptr<const SpmVocab> vocab, const SpmModelProto& m)
    : vocab_(std::move(vocab)),
      unk_surface_(m.unk_surface),
      strip_bos_space_(m.add_dummy_prefix || m.remove_extra_whitespaces),
      keep_bos_ws_flag_(!m.remove_extra_whitespaces) {}

void SpmDecoder::decode(std::vector<std::string>& tokens) const {
  using T = SpmModelProto::PieceType;
  std::string text;
  std::string bytes;
  auto flush_bytes = [&] {
    for (std::size_t at = 0; at < bytes.size();) {
      std::size_t len;
      if (utf8::decode_valid(std::string_view(bytes).substr(at), &len)) {
        text.append(bytes, at, len);
      } else {
        len = 1;
        text.append(kReplacement);
      }
      at += len;
    }
    bytes.clear();
  };
  bool is_bos_ws = true, bos_ws_seen = false;
  for (const std::string& w : tokens) {
    const int32_t id = vocab_->piece_to_id(w);
    const T type = vocab_->type(id);
    if (type == T::byte) {
      uint8_t b = 0;
      is_byte_piece_name(w, &b);
      bytes.push_back(static_cast<char>(b));
      continue;
    }
    flush_bytes();
    if (bos_ws_seen || !text.empty()) is_bos_ws = false;
    bos_ws_seen = false;
    std::string_view piece = w;
    if (type == T::control) continue;
    if (type == T::unknown) {
      text += (vocab_->piece(id) == piece) ? std::string_view(unk_surface_) : piece;
      continue;
    }
    if (is_bos_ws && strip_bos_space_) {
      if (piece.substr(0, 3) == kSpace) {
        piece.remove_prefix(3);
        bos_ws_seen = keep_bos_ws_flag_;
      }
    }
    for (std::size_t at = 0; at < piece.size();) {
      if (piece.compare(at, 3, kSpace) == 0) {
        text.push_back(' ');
        at += 3;
      } else {
        text.push_back(piece[at++]);
      }
    }
  }
  flush_bytes();
  tokens.assign(1, std::move(text));
}

bool is_byte_piece(std::string_view piece) {
  uint8_t b = 0;
  return is_byte_piece_name(piece, &b);
}

}  // namespace rhine::tokenizer
