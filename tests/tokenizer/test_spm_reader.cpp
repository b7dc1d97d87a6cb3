// The SentencePiece .model reader on malformed input: every failure is a rhine::Error that
// names the file and the field, never a crash or an out-of-bounds read.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <filesystem>

#include "rhine/core/error.h"
#include "rhine/core/file.h"
#include "rhine/tokenizer/tokenizer.h"

using Catch::Matchers::Contains;
using rhine::tokenizer::SpmModelProto;
namespace fs = std::filesystem;

namespace {

SpmModelProto small_model() {
  using T = SpmModelProto::PieceType;
  SpmModelProto m;
  m.model_type = SpmModelProto::ModelType::bpe;
  m.pieces = {{"<unk>", 0, T::unknown}, {"<s>", 0, T::control}, {"</s>", 0, T::control},
              {"\xE2\x96\x81", -1, T::normal}, {"a", -2, T::normal}, {"b", -3, T::normal}, {"ab", -0.5f, T::normal}};
  return m;
}

}  // namespace

TEST_CASE("serialize/parse round trip keeps every field", "[spm_reader]") {
  auto m = small_model();
  m.byte_fallback = false;
  m.add_dummy_prefix = false;
  m.remove_extra_whitespaces = false;
  m.pad_id = 3;
  m.unk_surface = "?";
  m.split_by_unicode_script = false;
  m.split_digits = true;
  const auto p = rhine::tokenizer::parse_spm_model(rhine::tokenizer::serialize_spm_model(m), "mem");
  REQUIRE(p.pieces.size() == m.pieces.size());
  for (std::size_t i = 0; i < m.pieces.size(); ++i) {
    CHECK(p.pieces[i].piece == m.pieces[i].piece);
    CHECK(p.pieces[i].score == m.pieces[i].score);
    CHECK(p.pieces[i].type == m.pieces[i].type);
  }
  CHECK(p.model_type == m.model_type);
  CHECK(!p.add_dummy_prefix);
  CHECK(!p.remove_extra_whitespaces);
  CHECK(p.escape_whitespaces);
  CHECK(p.pad_id == 3);
  CHECK(p.unk_surface == "?");
  CHECK(!p.split_by_unicode_script);
  CHECK(p.split_by_number);
  CHECK(p.split_digits);
}

TEST_CASE("every truncation of a model is rejected cleanly", "[spm_reader]") {
  const std::string good = rhine::tokenizer::serialize_spm_model(small_model());
  std::size_t errors = 0;
  for (std::size_t n = 0; n < good.size(); ++n) {
    try {
      auto m = rhine::tokenizer::parse_spm_model(std::string_view(good).substr(0, n), "cut.model");
      (void)rhine::Tokenizer::from_sentencepiece(m, "cut.model");
    } catch (const rhine::Error& e) {
      CHECK_THAT(e.what(), Contains("cut.model"));
      ++errors;
    }
  }
  // A cut at a field boundary may still be a valid (smaller) model; most cuts are not.
  CHECK(errors > good.size() / 2);
}

TEST_CASE("malformed fields are named in the error", "[spm_reader]") {
  auto parse = [](const std::string& bytes) { return rhine::tokenizer::parse_spm_model(bytes, "bad.model"); };
  // pieces[0] = {piece: "x", score with wire type 0 instead of 5}
  CHECK_THROWS_WITH(parse(std::string("\x0A\x05\x0A\x01x\x10\x01", 7)), Contains("bad.model") && Contains("score"));
  // type out of range
  CHECK_THROWS_WITH(parse(std::string("\x0A\x05\x0A\x01x\x18\x09", 7)), Contains("pieces[0]") && Contains("type"));
  // length running past the end
  CHECK_THROWS_WITH(parse(std::string("\x0A\x7F\x0A\x01x", 5)), Contains("runs past the end"));
  // overlong varint
  CHECK_THROWS_WITH(parse(std::string("\x48\xFF\xFF\xFF\xFF\xFF\xFF\xFF\xFF\xFF\xFF\x01", 12)), Contains("varint"));
  // wire type 3 (groups) is not supported
  CHECK_THROWS_WITH(parse(std::string("\x0B", 1)), Contains("wire type"));
  CHECK_THROWS_WITH(parse(""), Contains("empty"));
  // a text file
  CHECK_THROWS_AS(parse("hello world, this is not a model\n"), rhine::Error);
}

TEST_CASE("invalid vocabularies are rejected with the reason", "[spm_reader]") {
  using T = SpmModelProto::PieceType;
  auto m = small_model();
  m.pieces[0].type = T::normal;  // no <unk>
  CHECK_THROWS_WITH(rhine::Tokenizer::from_sentencepiece(m, "v.model"), Contains("UNKNOWN") && Contains("v.model"));
  m = small_model();
  m.pieces.push_back({"a", 0, T::normal});
  CHECK_THROWS_WITH(rhine::Tokenizer::from_sentencepiece(m, "v.model"), Contains("duplicate"));
  m = small_model();
  m.byte_fallback = true;
  CHECK_THROWS_WITH(rhine::Tokenizer::from_sentencepiece(m, "v.model"), Contains("byte_fallback"));
  m = small_model();
  m.pieces.push_back({"<0xZZ>", 0, T::byte});
  CHECK_THROWS_WITH(rhine::Tokenizer::from_sentencepiece(m, "v.model"), Contains("BYTE"));
  m = small_model();
  m.model_type = SpmModelProto::ModelType::word;
  CHECK_THROWS_WITH(rhine::Tokenizer::from_sentencepiece(m, "v.model"), Contains("model_type"));
  m = small_model();
  m.precompiled_charsmap = std::string("\xFF\xFF\x00\x00" "abc", 7);
  CHECK_THROWS_WITH(rhine::Tokenizer::from_sentencepiece(m, "v.model"), Contains("precompiled_charsmap"));
}

TEST_CASE("Tokenizer::load rejects unknown and unsupported files", "[spm_reader]") {
  const auto dir = fs::temp_directory_path() / ("rhine_tok_load_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  rhine::write_file_atomic((dir / "notes.txt").string(), "just text");
  CHECK_THROWS_WITH(rhine::Tokenizer::load((dir / "notes.txt").string()),
                    Contains("unknown tokenizer file type") && Contains("notes.txt"));
  rhine::write_file_atomic((dir / "tokenizer.json").string(), "{\"version\": \"1.0\"}");
  CHECK_THROWS_WITH(rhine::Tokenizer::load((dir / "tokenizer.json").string()), Contains("tokenizer.json"));
  rhine::write_file_atomic((dir / "broken.model").string(), std::string("\x0A\x20\x0A", 3));
  CHECK_THROWS_WITH(rhine::Tokenizer::load((dir / "broken.model").string()), Contains("broken.model"));
  CHECK_THROWS_WITH(rhine::Tokenizer::load((dir / "missing.model").string()), Contains("missing.model"));
  fs::remove_all(dir);
}
