// Parity of Rhine's tokenizer.json encoder with the Hugging Face `tokenizers` library (the Rust
// implementation transformers uses) on the real tokenizer.json files of Mistral-7B, Llama 3,
// DeepSeek-V3, Qwen3 and Gemma 3, run through tests/tokenizer/hf_encode.py.
//
// References (docs/testing.md), neither in the repository:
//   - RHINE_REFERENCE_DIR: a folder holding tokenizers.tar.xz (tokenizers/<name>/tokenizer.json)
//     or its unpacked tokenizers/ folder; the archive is unpacked once into the build tree;
//   - a Python with the `tokenizers` module: the CMake cache variable RHINE_PYTHON
//     (scripts/build.sh passes the project's virtual environment), or the environment variable
//     RHINE_PYTHON, which overrides it.
// Without them the test reports Skipped (RHINE_SKIP_TEST), or fails under
// RHINE_REQUIRE_REFERENCES=1. A reference that is present but broken is a failure.
//
// Text: every line of the de/fr/nl/en sample and held-out pages (data/sample) plus a
// hand-made list of hard cases. Both sides match added tokens in the text (HF always does;
// Rhine with parse_special), once without special tokens and once with the post-processor's
// (add_special_tokens=True / EncodeOptions::add_special); and Rhine decodes HF's ids to HF's text.
// Invalid UTF-8 is not among the cases: Python strings cannot carry it to the library.
#include <catch2/catch.hpp>

#include <unistd.h>
#include <utf8proc.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "rhine/core/json.h"
#include "rhine/tokenizer/tokenizer.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace {

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
std::string quoted(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

/// The last non-empty line of s (the error of a Python traceback, a version).
std::string last_line(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ')) s.pop_back();
  const auto nl = s.rfind('\n');
  return nl == std::string::npos ? s : s.substr(nl + 1);
}

struct RefTokenizer {
  const char* name;  // folder in tokenizers/
  bool lossless;     // decode(encode(x)) == x for normal text (NFC text for an NFC normalizer)
  bool nfc;
};

const std::vector<RefTokenizer> kReferences = {
    {"mistral-7b", true, false}, {"llama3", true, false}, {"deepseek_v3", true, false},
    {"qwen3", true, true},       {"gemma3", true, false}};

const char* kProvideReferences =
    "set RHINE_REFERENCE_DIR to a folder holding tokenizers.tar.xz or its unpacked tokenizers/ folder "
    "(tokenizers/<name>/tokenizer.json for mistral-7b, llama3, deepseek_v3, qwen3, gemma3; docs/testing.md)";

/// The Python to run hf_encode.py with: $RHINE_PYTHON, else the CMake cache variable.
std::string reference_python() {
  if (const char* env = std::getenv("RHINE_PYTHON"); env && *env) return env;
  return RHINE_PYTHON_DEFAULT;
}

/// Unpacks the tokenizers/ folder of `archive` into the build tree, once per archive
/// version; returns the unpacked tokenizers/ folder.
fs::path unpack_references(const fs::path& archive) {
  const fs::path root = fs::path(RHINE_TEST_WORK_DIR) / "references";
  const fs::path dest = root / "tokenizers";
  const fs::path stamp_file = root / "tokenizers.stamp";
  const std::string stamp = fs::absolute(archive).string() + " " + std::to_string(fs::file_size(archive)) + " " +
                            std::to_string(fs::last_write_time(archive).time_since_epoch().count());
  {
    std::ifstream in(stamp_file);
    std::string old;
    if (in && std::getline(in, old) && old == stamp && fs::is_directory(dest)) return dest;
  }
  const fs::path tmp = root / (".unpack-" + std::to_string(::getpid()));
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  const auto [status, out] = rhine::test::run_command("tar -xJf " + quoted(archive.string()) + " -C " + quoted(tmp.string()) +
                                         " tokenizers 2>&1");
  INFO("unpacking " << archive.string() << ": " << out);
  REQUIRE(status == 0);
  fs::remove_all(dest);
  fs::rename(tmp / "tokenizers", dest);
  fs::remove_all(tmp);
  std::ofstream(stamp_file) << stamp << "\n";
  return dest;
}

/// One output line of hf_encode.py: ids without and with special tokens, and the decoded ids.
struct HfResult {
  std::vector<int32_t> ids, special;
  std::string decoded;
};

HfResult parse_result(const std::string& line) {
  const auto j = rhine::Json::parse(line);
  HfResult r;
  for (const auto& v : j.at("ids")) r.ids.push_back(v.get<int32_t>());
  for (const auto& v : j.at("special")) r.special.push_back(v.get<int32_t>());
  r.decoded = j.at("decoded").get<std::string>();
  return r;
}

std::string ids_text(const std::vector<int32_t>& ids) {
  std::string s = "[";
  for (std::size_t k = 0; k < ids.size(); ++k) s += (k ? ", " : "") + std::to_string(ids[k]);
  return s + "]";
}

}  // namespace

TEST_CASE("tokenizer.json parity with Hugging Face tokenizers on real files", "[tokenizer_json][slow]") {
  // The references: what is missing is a skip, named with how to provide it.
  std::vector<std::string> missing;
  fs::path reference_dir, archive;
  if (const char* env = std::getenv("RHINE_REFERENCE_DIR"); env && *env) {
    reference_dir = env;
    archive = reference_dir / "tokenizers.tar.xz";
    if (!fs::is_directory(reference_dir / "tokenizers") && !fs::is_regular_file(archive))
      missing.push_back("the reference tokenizer.json files: RHINE_REFERENCE_DIR=" + reference_dir.string() +
                        " holds neither tokenizers/ nor tokenizers.tar.xz; " + kProvideReferences);
  } else {
    missing.push_back(std::string("the reference tokenizer.json files: RHINE_REFERENCE_DIR is not set; ") +
                      kProvideReferences);
  }
  const fs::path script = fs::path(RHINE_SOURCE_DIR) / "tests/tokenizer/hf_encode.py";
  const std::string python = reference_python();
  std::string hf_version;
  if (python.empty()) {
    missing.push_back(
        "a Python with the Hugging Face tokenizers library: RHINE_PYTHON is not set; configure with "
        "-DRHINE_PYTHON=<venv>/bin/python (scripts/build.sh passes the project's virtual environment) "
        "or set the environment variable RHINE_PYTHON");
  } else if (::access(python.c_str(), X_OK) != 0) {
    missing.push_back("a Python with the Hugging Face tokenizers library: RHINE_PYTHON=" + python +
                      " is not an executable; point it to <venv>/bin/python of the project's virtual environment");
  } else {
    const auto [status, out] = rhine::test::run_command(quoted(python) + " " + quoted(script.string()) + " --version 2>&1");
    if (status != 0)
      missing.push_back("the Hugging Face tokenizers library: " + python + " cannot import it (" + last_line(out) +
                        "); pip install tokenizers into that environment");
    else
      hf_version = last_line(out);
  }
  if (!missing.empty()) {
    std::string reason = "tokenizer.json parity with Hugging Face tokenizers needs ";
    for (std::size_t i = 0; i < missing.size(); ++i) reason += (i ? "; and " : "") + missing[i];
    RHINE_SKIP_TEST(reason);
  }
  const fs::path tokenizers =
      fs::is_directory(reference_dir / "tokenizers") ? reference_dir / "tokenizers" : unpack_references(archive);

  std::vector<std::string> lines;
  const fs::path data = fs::path(RHINE_SOURCE_DIR) / "data/sample";
  for (const char* lang : {"de", "fr", "nl", "en"}) {
    for (const auto& l : read_lines(data / (std::string(lang) + ".txt"))) lines.push_back(l);
    for (const auto& l : read_lines(data / "heldout" / (std::string(lang) + ".txt"))) lines.push_back(l);
  }
  const std::size_t n_prose = lines.size();
  for (const auto& h : hard_cases()) lines.push_back(h);
  REQUIRE(n_prose > 10000);

  const rhine::test::TempDir dir("hf_parity");
  const fs::path input = dir.path / "lines.jsonl";
  {
    std::ofstream out(input);
    for (const auto& l : lines) out << rhine::Json(l).dump() << "\n";
  }
  std::size_t total_mismatch = 0;
  for (const auto& r : kReferences) {
    const fs::path file = tokenizers / r.name / "tokenizer.json";
    INFO("reference " << file.string());
    REQUIRE(fs::is_regular_file(file));  // present but incomplete: a broken reference fails
    const fs::path output = dir.path / (std::string(r.name) + ".ids");
    const std::string cmd = quoted(python) + " " + quoted(script.string()) + " " + quoted(file.string()) + " " +
                            quoted(input.string()) + " > " + quoted(output.string());
    REQUIRE(std::system(cmd.c_str()) == 0);
    std::vector<HfResult> expected;
    {
      std::ifstream in(output);
      for (std::string l; std::getline(in, l);) expected.push_back(parse_result(l));
    }
    REQUIRE(expected.size() == lines.size());
    const auto tok = rhine::Tokenizer::load(file.string());
    rhine::EncodeOptions o, with_special;
    o.parse_special = true;
    with_special.parse_special = true;
    with_special.add_special = true;
    std::size_t mismatch = 0, special_mismatch = 0, decode_mismatch = 0, roundtrip_checked = 0, roundtrip_bad = 0,
                n_tokens = 0;
    for (std::size_t i = 0; i < lines.size(); ++i) {
      const auto got = tok.encode(lines[i], o);
      n_tokens += got.size();
      if (got != expected[i].ids) {
        if (++mismatch <= 5)
          WARN(r.name << " line " << i << ": " << rhine::Json(lines[i]).dump() << "\n  rhine: " << ids_text(got)
                      << "\n  hf:    " << ids_text(expected[i].ids));
      }
      // With the post-processor's special tokens (add_special_tokens=True).
      const auto got_special = tok.encode(lines[i], with_special);
      if (got_special != expected[i].special && ++special_mismatch <= 5)
        WARN(r.name << " line " << i << " with special tokens: " << rhine::Json(lines[i]).dump()
                    << "\n  rhine: " << ids_text(got_special) << "\n  hf:    " << ids_text(expected[i].special));
      // decode(ids) of HF's own ids, special tokens kept.
      const std::string decoded = tok.decode(expected[i].ids);
      if (decoded != expected[i].decoded && ++decode_mismatch <= 5)
        WARN(r.name << " decode of line " << i << ": rhine " << rhine::Json(decoded).dump() << "\n  hf:    "
                    << rhine::Json(expected[i].decoded).dump());
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
          WARN(r.name << " round trip line " << i << ": " << lines[i] << " -> " << tok.decode(tok.encode(lines[i], o)));
      }
    }
    std::printf("[hf_parity] %-12s %s: %zu lines (%zu prose + %zu hard cases), %zu tokens, %zu mismatches "
                "against tokenizers %s (%zu with special tokens, %zu decodes); round trip %zu lines, %zu differ\n",
                r.name, tok.kind().c_str(), lines.size(), n_prose, lines.size() - n_prose, n_tokens, mismatch,
                hf_version.c_str(), special_mismatch, decode_mismatch, roundtrip_checked, roundtrip_bad);
    CHECK(mismatch == 0);
    CHECK(special_mismatch == 0);
    CHECK(decode_mismatch == 0);
    CHECK(roundtrip_bad == 0);
    total_mismatch += mismatch;
  }
  CHECK(total_mismatch == 0);
}
