// tokenizer.json pre-tokenizers (hf_stages.h), with HF tokenizers' split behaviours.
#include <utf8proc.h>

#include "hf_stages.h"
#include "rhine/core/error.h"
#include "utf8.h"

namespace rhine::tokenizer {

namespace {

using Ranges = std::vector<std::pair<uint32_t, uint32_t>>;

// HF `NormalizedString::split`: `matches` are the pattern's non-empty matches in order;
// appends the pieces to keep (non-empty) to `out`.
void apply_behavior(uint32_t n, const Ranges& matches, bool invert, SplitBehavior behavior, Ranges& out) {
  struct Part {
    uint32_t b, e;
    bool match;
  };
  thread_local std::vector<Part> parts;
  parts.clear();
  uint32_t prev = 0;
  for (const auto& [b, e] : matches) {
    if (b > prev) parts.push_back({prev, b, invert});
    parts.push_back({b, e, !invert});
    prev = e;
  }
  if (prev < n) parts.push_back({prev, n, invert});
  const std::size_t first = out.size();
  switch (behavior) {
    case SplitBehavior::removed:
      for (const auto& p : parts)
        if (!p.match) out.emplace_back(p.b, p.e);
      break;
    case SplitBehavior::isolated:
      for (const auto& p : parts) out.emplace_back(p.b, p.e);
      break;
    case SplitBehavior::merged_with_previous: {
      bool previous_match = false;
      for (const auto& p : parts) {
        if (p.match && !previous_match && out.size() > first) out.back().second = p.e;
        else out.emplace_back(p.b, p.e);
        previous_match = p.match;
      }
      break;
    }
    case SplitBehavior::merged_with_next: {
      bool previous_match = false;
      for (std::size_t i = parts.size(); i-- > 0;) {
        const auto& p = parts[i];
        if (p.match && !previous_match && out.size() > first) out.back().first = p.b;
        else out.emplace_back(p.b, p.e);
        previous_match = p.match;
      }
      std::reverse(out.begin() + static_cast<std::ptrdiff_t>(first), out.end());
      break;
    }
    case SplitBehavior::contiguous: {
      int previous = -1;
      for (const auto& p : parts) {
        if (previous == static_cast<int>(p.match) && out.size() > first) out.back().second = p.e;
        else out.emplace_back(p.b, p.e);
        previous = p.match;
      }
      break;
    }
  }
}

// Replaces each split by its pieces (empty pieces dropped).
template <typename Fn>
void split_each(PreTokenizedString& s, Fn&& pieces_of) {
  std::vector<NormalizedString> out;
  out.reserve(s.splits.size());
  Ranges pieces;
  for (auto& split : s.splits) {
    pieces.clear();
    pieces_of(split, pieces);
    if (pieces.size() == 1 && pieces[0].first == 0 && pieces[0].second == split.text.size()) {
      out.push_back(std::move(split));
      continue;
    }
    for (const auto& [b, e] : pieces)
      if (e > b) out.push_back(slice(split, b, e));
  }
  s.splits = std::move(out);
}

bool is_whitespace_cp(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) ||
         c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

}  // namespace

void SplitPreTokenizer::split_ranges(std::string_view text, Ranges& out) const {
  thread_local Ranges matches;
  matches.clear();
  pattern_->find_all(text, matches);
  apply_behavior(static_cast<uint32_t>(text.size()), matches, invert_, behavior_, out);
}

void SplitPreTokenizer::pre_tokenize(PreTokenizedString& s) const {
  split_each(s, [&](const NormalizedString& n, Ranges& pieces) { split_ranges(n.text, pieces); });
}

ByteLevelPreTokenizer::ByteLevelPreTokenizer(bool add_prefix_space, bool use_regex, const std::string& source)
    : add_prefix_space_(add_prefix_space) {
  if (use_regex)
    split_ = std::make_unique<SplitPreTokenizer>(std::make_unique<Pattern>(Json{{"Regex", kGpt2Pattern}}, source),
                                                 SplitBehavior::isolated, false);
}

void ByteLevelPreTokenizer::pre_tokenize(PreTokenizedString& s) const {
  if (add_prefix_space_)
    for (auto& split : s.splits)
      if (split.text.empty() || split.text[0] != ' ') {
        split.text.insert(0, 1, ' ');
        split.align.insert(split.align.begin(), split.align.front());
      }
  if (split_) split_->pre_tokenize(s);
  const auto& table = ByteLevelTable::get();
  for (auto& split : s.splits) {
    NormalizedBuilder b;
    b.text.reserve(split.text.size() * 2);
    for (std::size_t i = 0; i < split.text.size(); ++i)
      b.append(table.byte_to_utf8[static_cast<unsigned char>(split.text[i])], split.align[i]);
    b.finish(split, split.align.back());
  }
}

void MetaspacePreTokenizer::pre_tokenize(PreTokenizedString& s) const {
  for (auto& split : s.splits) {
    NormalizedBuilder b;
    for (std::size_t i = 0; i < split.text.size(); ++i) {
      if (split.text[i] == ' ') b.append(replacement_, split.align[i]);
      else b.append(std::string_view(split.text).substr(i, 1), split.align[i]);
    }
    b.finish(split, split.align.back());
    const bool starts = split.text.compare(0, replacement_.size(), replacement_) == 0;
    if (!starts && (prepend_ == Prepend::always || (prepend_ == Prepend::first && split.align.front() == 0))) {
      split.text.insert(0, replacement_);
      split.align.insert(split.align.begin(), replacement_.size(), split.align.front());
    }
  }
  if (!split_) return;
  split_each(s, [&](const NormalizedString& n, Ranges& pieces) {
    thread_local Ranges matches;
    matches.clear();
    for (std::size_t at = n.text.find(replacement_); at != std::string::npos;
         at = n.text.find(replacement_, at + replacement_.size()))
      matches.emplace_back(static_cast<uint32_t>(at), static_cast<uint32_t>(at + replacement_.size()));
    apply_behavior(static_cast<uint32_t>(n.text.size()), matches, false, SplitBehavior::merged_with_next, pieces);
  });
}

void CharClassPreTokenizer::pre_tokenize(PreTokenizedString& s) const {
  split_each(s, [&](const NormalizedString& n, Ranges& pieces) {
    thread_local Ranges matches;
    matches.clear();
    for (std::size_t at = 0, len; at < n.text.size(); at += len) {
      uint32_t cp;
      utf8::decode_valid(std::string_view(n.text).substr(at), &len, &cp);
      bool hit = false;
      const auto c = utf8proc_category(static_cast<utf8proc_int32_t>(cp));
      switch (kind_) {
        case Kind::digits:
        case Kind::digits_individual:
          hit = c == UTF8PROC_CATEGORY_ND || c == UTF8PROC_CATEGORY_NL || c == UTF8PROC_CATEGORY_NO;
          break;
        case Kind::whitespace_split: hit = is_whitespace_cp(cp); break;
        case Kind::punctuation:
          hit = (cp < 0x80 && std::ispunct(static_cast<int>(cp))) ||
                (c >= UTF8PROC_CATEGORY_PC && c <= UTF8PROC_CATEGORY_PO);
          break;
        case Kind::whitespace: break;
      }
      if (hit) matches.emplace_back(static_cast<uint32_t>(at), static_cast<uint32_t>(at + len));
    }
    SplitBehavior behavior = behavior_;
    if (kind_ == Kind::digits) behavior = SplitBehavior::contiguous;
    if (kind_ == Kind::digits_individual) behavior = SplitBehavior::isolated;
    if (kind_ == Kind::whitespace_split) behavior = SplitBehavior::removed;
    apply_behavior(static_cast<uint32_t>(n.text.size()), matches, false, behavior, pieces);
  });
}

}  // namespace rhine::tokenizer
