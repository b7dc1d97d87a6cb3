// Vocabulary extension (rhine/tokenizer/extend.h): the incremental merge loop against a
// plain twin that recounts every pair each round, the written .model read back, and the
// refusals. libsentencepiece and tokenizers read the extended files in
// tests/oracle/tokenizer_test.sh (section 3).
#include <catch2/catch.hpp>

#include <map>
#include <random>
#include <set>

#include "rhine/core/error.h"
#include "rhine/tokenizer/extend.h"
#include "rhine/tokenizer/tokenizer.h"

using Catch::Matchers::Contains;
using rhine::tokenizer::SpmModelProto;

namespace {

const std::string kSpace = "\xE2\x96\x81";

// Characters only (and "▁x" for a few x): every multi-character piece is new.
SpmModelProto char_model() {
  using T = SpmModelProto::PieceType;
  SpmModelProto m;
  m.model_type = SpmModelProto::ModelType::bpe;
  m.pieces = {{"<unk>", 0, T::unknown}, {"<s>", 0, T::control}, {"</s>", 0, T::control}, {kSpace, -1, T::normal}};
  float score = -2;
  for (char c = 'a'; c <= 'h'; ++c) m.pieces.push_back({std::string(1, c), score--, T::normal});
  for (char c = 'a'; c <= 'd'; ++c) m.pieces.push_back({kSpace + std::string(1, c), score--, T::normal});
  m.pieces.push_back({"ab", score--, T::user_defined});  // a string the base has, not as a normal piece
  return m;
}

std::vector<std::string> text(std::uint32_t seed) {
  std::mt19937 rng(seed);
  const std::vector<std::string> vocab = {"abc", "cab", "bad", "fed", "deaf", "head", "ace", "bead", "cafe", "dab",
                                          "gehab", "hagbe"};
  std::discrete_distribution<int> pick({9, 7, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1});
  std::vector<std::string> lines;
  for (int l = 0; l < 200; ++l) {
    std::string s;
    for (int w = 0; w < 8; ++w) s += (w ? " " : "") + vocab[static_cast<std::size_t>(pick(rng))];
    lines.push_back(s);
  }
  return lines;
}

std::int64_t token_count(const rhine::Tokenizer& tok, const std::vector<std::string>& lines) {
  std::int64_t n = 0;
  for (const auto& l : lines) n += static_cast<std::int64_t>(tok.encode(l).size());
  return n;
}

// The twin: the same words, every pair recounted each round.
std::pair<std::vector<std::string>, std::vector<std::int64_t>> plain_extension(const SpmModelProto& m,
                                                                               const std::vector<std::string>& lines,
                                                                               int n) {
  const auto tok = rhine::Tokenizer::from_sentencepiece(m, "twin");
  std::vector<std::string> str;
  std::set<std::string> existing;
  for (const auto& p : m.pieces) str.push_back(p.piece), existing.insert(p.piece);
  std::vector<std::vector<std::int32_t>> words;
  for (const auto& line : lines) {
    std::vector<std::int32_t> w;
    for (auto id : tok.encode(line)) {
      if (m.pieces[static_cast<std::size_t>(id)].type != SpmModelProto::PieceType::normal) {
        if (w.size() > 1) words.push_back(w);
        w.clear();
        continue;
      }
      if (str[static_cast<std::size_t>(id)].rfind(kSpace, 0) == 0) {
        if (w.size() > 1) words.push_back(w);
        w.clear();
      }
      w.push_back(id);
    }
    if (w.size() > 1) words.push_back(w);
  }
  std::vector<std::string> added;
  std::vector<std::int64_t> saved;
  std::set<std::pair<std::int32_t, std::int32_t>> banned;
  while (static_cast<int>(added.size()) < n) {
    std::map<std::pair<std::int32_t, std::int32_t>, std::int64_t> count;
    for (const auto& w : words)
      for (std::size_t i = 0; i + 1 < w.size(); ++i) count[{w[i], w[i + 1]}] += 1;
    std::pair<std::int32_t, std::int32_t> best{-1, -1};
    std::int64_t bc = 0;
    for (const auto& [p, c] : count)  // ascending (a, b): the first of the largest count wins
      if (!banned.count(p) && c > bc) best = p, bc = c;
    if (bc < 2) break;
    const std::string merged = str[static_cast<std::size_t>(best.first)] + str[static_cast<std::size_t>(best.second)];
    if (existing.count(merged)) {
      banned.insert(best);
      continue;
    }
    const auto id = static_cast<std::int32_t>(str.size());
    str.push_back(merged), existing.insert(merged), added.push_back(merged), saved.push_back(bc);
    for (auto& w : words) {
      std::vector<std::int32_t> s;
      for (std::size_t i = 0; i < w.size(); ++i) {
        if (i + 1 < w.size() && w[i] == best.first && w[i + 1] == best.second) s.push_back(id), ++i;
        else s.push_back(w[i]);
      }
      w = s;
    }
  }
  return {added, saved};
}

}  // namespace

TEST_CASE("extend: the incremental merge loop adds what the plain twin adds", "[tokenizer][extend]") {
  const auto m = char_model();
  for (std::uint32_t seed : {1u, 2u, 3u}) {
    const auto lines = text(seed);
    rhine::tokenizer::ExtendOptions o;
    o.new_tokens = 25;
    o.threads = 1;
    const auto ext = rhine::tokenizer::extend_vocabulary(m, lines, o);
    const auto [added, saved] = plain_extension(m, lines, 25);
    CHECK(ext.added == added);
    CHECK(ext.saved == saved);
    CHECK(std::find(ext.added.begin(), ext.added.end(), "ab") == ext.added.end());  // the base has "ab"
    REQUIRE(ext.model.pieces.size() == m.pieces.size() + ext.added.size());
    for (std::size_t i = 1; i < ext.added.size(); ++i)  // below every base piece, in the order found
      CHECK(ext.model.pieces[m.pieces.size() + i].score < ext.model.pieces[m.pieces.size() + i - 1].score);
    CHECK(ext.model.pieces[m.pieces.size()].score < -13);  // the lowest normal base piece: -13

    // The extended model: fewer tokens, and the base's ids for text the new pieces do not touch.
    const auto before = rhine::Tokenizer::from_sentencepiece(m, "base");
    const auto after = rhine::Tokenizer::from_sentencepiece(ext.model, "extended");
    CHECK(token_count(before, lines) == ext.tokens_before);
    CHECK(token_count(after, lines) < ext.tokens_before);
    CHECK(after.encode("dg cg") == before.encode("dg cg"));  // "dg", "cg" never occur in the text
  }
}

TEST_CASE("extend: model_bytes appends the new pieces to the base file unchanged", "[tokenizer][extend]") {
  const auto m = char_model();
  const std::string base_bytes = rhine::tokenizer::serialize_spm_model(m);
  rhine::tokenizer::ExtendOptions o;
  o.new_tokens = 5;
  const auto ext = rhine::tokenizer::extend_vocabulary(m, text(4), o);
  const std::string bytes = ext.model_bytes(base_bytes);
  CHECK(bytes.compare(0, base_bytes.size(), base_bytes) == 0);
  const auto back = rhine::tokenizer::parse_spm_model(bytes, "ext.model");
  REQUIRE(back.pieces.size() == ext.model.pieces.size());
  for (std::size_t i = 0; i < back.pieces.size(); ++i) {
    CHECK(back.pieces[i].piece == ext.model.pieces[i].piece);
    CHECK(back.pieces[i].score == ext.model.pieces[i].score);
    CHECK(back.pieces[i].type == ext.model.pieces[i].type);
  }
  CHECK(back.model_type == m.model_type);
}

TEST_CASE("extend: refusals name the problem", "[tokenizer][extend]") {
  auto m = char_model();
  rhine::tokenizer::ExtendOptions o;
  CHECK_THROWS_WITH(rhine::tokenizer::extend_vocabulary(m, {}, o), Contains("no target-language text"));
  o.new_tokens = 0;
  CHECK_THROWS_WITH(rhine::tokenizer::extend_vocabulary(m, text(1), o), Contains("new_tokens"));
  o.new_tokens = 3;
  m.model_type = SpmModelProto::ModelType::word;
  CHECK_THROWS_WITH(rhine::tokenizer::extend_vocabulary(m, text(1), o), Contains("takes a BPE or Unigram model"));
  // Fewer additions than asked when no pair repeats.
  m.model_type = SpmModelProto::ModelType::bpe;
  o.new_tokens = 100;
  const auto ext = rhine::tokenizer::extend_vocabulary(m, {"abc"}, o);
  CHECK(ext.added.empty());
}

TEST_CASE("extend: new pieces follow the base trainer's rules (scripts, digits)", "[tokenizer][extend]") {
  using T = SpmModelProto::PieceType;
  auto m = char_model();
  m.pieces.push_back({".", -20, T::normal});
  m.pieces.push_back({"1", -21, T::normal});
  m.pieces.push_back({"\xCE\xB1", -22, T::normal});  // Greek alpha
  const std::vector<std::string> lines(50, "abc. cab1 ab\xCE\xB1 11 ..");
  rhine::tokenizer::ExtendOptions o;
  o.new_tokens = 50;
  m.split_digits = true;
  auto ext = rhine::tokenizer::extend_vocabulary(m, lines, o);
  REQUIRE(!ext.added.empty());
  for (const auto& piece : ext.added) {
    INFO(piece);
    const std::string p = piece.rfind(kSpace, 0) == 0 ? piece.substr(kSpace.size()) : piece;  // "▁" goes with anything
    CHECK(piece.find('1') == std::string::npos);  // split_digits: digits stay single
    const bool has_dot = p.find('.') != std::string::npos, has_alpha = p.find("\xCE\xB1") != std::string::npos;
    CHECK((!has_dot || p.find_first_not_of(".") == std::string::npos));  // "." only with "."
    CHECK((!has_alpha || p == "\xCE\xB1"));                              // no Latin + Greek
  }
  CHECK(std::find(ext.added.begin(), ext.added.end(), kSpace + "..") != ext.added.end());  // Common + Common: one script
  m.split_digits = false;
  m.split_by_number = false;  // digits then join anything
  ext = rhine::tokenizer::extend_vocabulary(m, lines, o);
  CHECK(std::find(ext.added.begin(), ext.added.end(), kSpace + "11") != ext.added.end());
}

TEST_CASE("extend: a tokenizer.json base gets the additions its .model twin gets", "[tokenizer][extend]") {
  // The same BPE as a SentencePiece model and as the tokenizer.json converted from it: the same
  // pieces are added; the tokenizer.json keeps its ids, appends one merge per new token, and
  // encodes as the extended .model does. (Without the user-defined "ab": a tokenizer.json
  // holds it as an added token, split out before normalization, which segments differently.)
  auto m = char_model();
  m.pieces.pop_back();
  const rhine::Json base = rhine::tokenizer::spm_to_tokenizer_json(m, "char.model");
  rhine::tokenizer::ExtendOptions o;
  o.new_tokens = 25;
  o.threads = 1;
  const auto lines = text(5);
  const auto from_model = rhine::tokenizer::extend_vocabulary(m, lines, o);
  const auto from_json = rhine::tokenizer::extend_tokenizer_json(base, lines, o, "char.json");
  CHECK(from_json.added == from_model.added);
  CHECK(from_json.saved == from_model.saved);
  CHECK(from_json.tokens_before == from_model.tokens_before);
  CHECK(from_json.base_size == static_cast<std::int32_t>(m.pieces.size()));
  const rhine::Json& out = from_json.tokenizer_json;
  CHECK(out["model"]["merges"].size() == base["model"]["merges"].size() + from_json.added.size());
  for (std::size_t i = 0; i < from_json.added.size(); ++i)
    CHECK(out["model"]["vocab"][from_json.added[i]] == from_json.base_size + static_cast<std::int32_t>(i));
  const auto by_json = rhine::Tokenizer::from_tokenizer_json(out, "extended.json");
  const auto by_model = rhine::Tokenizer::from_sentencepiece(from_model.model, "extended.model");
  for (const auto& l : lines) REQUIRE(by_json.encode(l) == by_model.encode(l));

  rhine::Json wordpiece = base;
  wordpiece["model"] = {{"type", "WordPiece"}, {"vocab", rhine::Json::object()}};
  CHECK_THROWS_WITH(rhine::tokenizer::extend_tokenizer_json(wordpiece, lines, o), Contains("takes a BPE or Unigram model"));
  rhine::Json prefixed = base;
  prefixed["model"]["continuing_subword_prefix"] = "##";
  CHECK_THROWS_WITH(rhine::tokenizer::extend_tokenizer_json(prefixed, lines, o), Contains("continuing_subword_prefix"));
  CHECK_THROWS_WITH(rhine::tokenizer::extend_tokenizer_json(rhine::Json::array(), lines, o), Contains("not a tokenizer.json"));
}

TEST_CASE("extend: Unigram bases, .model and its tokenizer.json", "[tokenizer][extend]") {
  // A character Unigram model: the new pieces beat the pair they join (score >= the two
  // pieces' sum + 0.1), the text gets shorter, and the tokenizer.json converted from the
  // .model gets the same pieces and scores and encodes as the extended .model.
  auto m = char_model();
  m.pieces.pop_back();
  m.model_type = SpmModelProto::ModelType::unigram;
  std::map<std::string, float> score;
  for (const auto& p : m.pieces) score[p.piece] = p.score;
  rhine::tokenizer::ExtendOptions o;
  o.new_tokens = 20;
  o.threads = 1;
  const auto lines = text(6);
  const auto ext = rhine::tokenizer::extend_vocabulary(m, lines, o);
  REQUIRE(ext.added.size() == 20);
  for (std::size_t i = 0; i < ext.added.size(); ++i) {
    const auto& p = ext.model.pieces[m.pieces.size() + i];
    bool beats_a_split = false;
    for (std::size_t cut = 1; cut < p.piece.size(); ++cut) {
      const auto a = score.find(p.piece.substr(0, cut)), b = score.find(p.piece.substr(cut));
      if (a != score.end() && b != score.end()) beats_a_split = beats_a_split || p.score >= a->second + b->second + 0.1f - 1e-5f;
    }
    CHECK(beats_a_split);
    score[p.piece] = p.score;
  }
  const auto before = rhine::Tokenizer::from_sentencepiece(m, "base");
  const auto after = rhine::Tokenizer::from_sentencepiece(ext.model, "extended");
  CHECK(token_count(before, lines) == ext.tokens_before);
  CHECK(token_count(after, lines) < ext.tokens_before);

  const rhine::Json base = rhine::tokenizer::spm_to_tokenizer_json(m, "char.model");
  const auto from_json = rhine::tokenizer::extend_tokenizer_json(base, lines, o, "char.json");
  CHECK(from_json.added == ext.added);
  const rhine::Json& vocab = from_json.tokenizer_json["model"]["vocab"];
  REQUIRE(vocab.size() == ext.model.pieces.size());
  for (std::size_t i = m.pieces.size(); i < vocab.size(); ++i) CHECK(vocab[i][1].get<float>() == ext.model.pieces[i].score);
  const auto by_json = rhine::Tokenizer::from_tokenizer_json(from_json.tokenizer_json, "extended.json");
  for (const auto& l : lines) REQUIRE(by_json.encode(l) == after.encode(l));
}

TEST_CASE("extend: tokenizer.json ids, merge forms and refusals", "[tokenizer][extend]") {
  // A BPE over "a".."d" and " " whose special token lies past the vocabulary (as Llama 3's):
  // the special keeps its id (entered into the vocabulary), new ids follow it, merges keep
  // the base's form; "<unk>" never merges; holes and bad ids are refused.
  rhine::Json base = {
      {"version", "1.0"},
      {"normalizer", nullptr},
      {"pre_tokenizer", nullptr},
      {"added_tokens", {{{"id", 6}, {"content", "<|s|>"}, {"special", true}, {"single_word", false}, {"lstrip", false},
                         {"rstrip", false}, {"normalized", false}}}},
      {"model",
       {{"type", "BPE"}, {"unk_token", "<unk>"}, {"merges", rhine::Json::array({rhine::Json::array({"a", "b"})})},
        {"vocab", {{"<unk>", 0}, {"a", 1}, {"b", 2}, {"c", 3}, {"d", 4}, {"ab", 5}}}}}};
  std::vector<std::string> lines;
  for (int i = 0; i < 50; ++i) lines.push_back(i % 2 ? "abcd<|s|>abcdx" : "cdab<|s|>");  // "x" is unknown
  rhine::tokenizer::ExtendOptions o;
  o.new_tokens = 3;
  const auto ext = rhine::tokenizer::extend_tokenizer_json(base, lines, o, "t.json");
  CHECK(ext.base_size == 7);
  REQUIRE(ext.added.size() == 3);
  const rhine::Json& vocab = ext.tokenizer_json["model"]["vocab"];
  CHECK(vocab["<|s|>"] == 6);
  for (std::size_t i = 0; i < 3; ++i) {
    CHECK(vocab[ext.added[i]] == 7 + static_cast<int>(i));
    CHECK(ext.added[i].find("<unk>") == std::string::npos);
  }
  const rhine::Json& merges = ext.tokenizer_json["model"]["merges"];
  REQUIRE(merges.size() == 4);
  CHECK(merges[0] == rhine::Json::array({"a", "b"}));
  for (std::size_t i = 1; i < 4; ++i) CHECK(merges[i].is_array());
  const auto tok = rhine::Tokenizer::from_tokenizer_json(ext.tokenizer_json, "extended.json");
  rhine::EncodeOptions special;
  special.parse_special = true;
  CHECK(tok.encode("<|s|>", special) == std::vector<std::int32_t>{6});
  CHECK(tok.encode(lines[1], special).size() < rhine::Tokenizer::from_tokenizer_json(base, "t.json").encode(lines[1], special).size());

  rhine::Json legacy = base;  // "a b" strings: kept as strings
  legacy["model"]["merges"] = rhine::Json::array({"a b"});
  const auto ext2 = rhine::tokenizer::extend_tokenizer_json(legacy, lines, o, "t.json");
  for (const auto& m : ext2.tokenizer_json["model"]["merges"]) CHECK(m.is_string());

  rhine::Json hole = base;
  hole["model"]["vocab"]["ab"] = 6;  // nothing at 5
  hole["added_tokens"][0]["id"] = 7;
  CHECK_THROWS_WITH(rhine::tokenizer::extend_tokenizer_json(hole, lines, o, "t.json"), Contains("hole"));
  hole["added_tokens"][0]["id"] = -1;
  CHECK_THROWS_WITH(rhine::tokenizer::extend_tokenizer_json(hole, lines, o, "t.json"), Contains("outside the vocabulary"));
  rhine::Json unigram = {{"added_tokens", {{{"id", 3}, {"content", "<s>"}, {"special", true}}}},
                         {"model", {{"type", "Unigram"}, {"unk_id", 0}, {"vocab", rhine::Json::array({rhine::Json::array({"<unk>", 0.0}), rhine::Json::array({"a", -1.0}),
                                                                 rhine::Json::array({"b", -1.0})})}}}};
  CHECK_THROWS_WITH(rhine::tokenizer::extend_tokenizer_json(unigram, lines, o, "u.json"), Contains("after the Unigram vocabulary"));
}
