// rhine-generate end to end: a tiny Llama written as an HF directory (with
// save_hf_model) plus a hand-built SentencePiece BPE tokenizer; the text the
// CLI streams must equal the tokenizer's decoding of what rhine::nn::generate
// returns for the same prompt and options (greedy and seeded sampling), and
// bad arguments must fail with the tool's message.
#include "nn_fixtures.h"

#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>

#include "rhine/core/file.h"
#include "rhine/io/hf.h"
#include "rhine/nn/generate.h"
#include "rhine/nn/model.h"
#include "rhine/tokenizer/sentencepiece.h"
#include "rhine/tokenizer/tokenizer.h"
#include "test_util.h"

namespace {

namespace fs = std::filesystem;
using Spm = rhine::tokenizer::SpmModelProto;

// BPE over "▁" and a-z with byte fallback: <unk> <s> </s>, 256 bytes, 27 pieces.
Spm tiny_bpe() {
  Spm m;
  m.model_type = Spm::ModelType::bpe;
  m.byte_fallback = true;
  m.add_dummy_prefix = true;
  m.pieces.push_back({"<unk>", 0, Spm::PieceType::unknown});
  m.pieces.push_back({"<s>", 0, Spm::PieceType::control});
  m.pieces.push_back({"</s>", 0, Spm::PieceType::control});
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    m.pieces.push_back({name, 0, Spm::PieceType::byte});
  }
  m.pieces.push_back({"\xE2\x96\x81", -1, Spm::PieceType::normal});
  for (char c = 'a'; c <= 'z'; ++c) m.pieces.push_back({std::string(1, c), -2.0f - (c - 'a'), Spm::PieceType::normal});
  return m;
}

struct Run {
  int rc = -1;
  std::string out, err;
};

Run run_cli(const std::string& args, const fs::path& scratch) {
  const fs::path out = scratch / "stdout.txt", err = scratch / "stderr.txt";
  const std::string cmd = std::string(RHINE_GENERATE_EXE) + " " + args + " --threads 1 > " +
                          out.string() + " 2> " + err.string();
  Run r;
  const int status = std::system(cmd.c_str());
  r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.out = rhine::read_file(out.string(), "test");
  r.err = rhine::read_file(err.string(), "test");
  return r;
}

// A tiny random Llama with `vocab` rows written as an HF directory, plus the tokenizer.
rhine::nn::CausalLM write_model(const fs::path& dir, int64_t vocab) {
  auto cfg = rhine::nn::ModelConfig::from_json(rhine::Json{
      {"model_type", "llama"}, {"vocab_size", vocab}, {"hidden_size", 32},
      {"intermediate_size", 64}, {"num_hidden_layers", 2}, {"num_attention_heads", 4},
      {"num_key_value_heads", 2}, {"max_position_embeddings", 256}, {"bos_token_id", 1},
      {"eos_token_id", 2}, {"initializer_range", 0.5}});
  rhine::nn::CausalLMOptions o;
  o.init_seed = 7;
  rhine::nn::CausalLM lm(cfg, o);
  rhine::io::save_hf_model(lm, dir);
  rhine::write_file_atomic((dir / "tokenizer.model").string(),
                           rhine::tokenizer::serialize_spm_model(tiny_bpe()));
  return lm;
}

}  // namespace

TEST_CASE("rhine-generate never picks ids past the tokenizer's vocabulary", "[nn][generate][cli]") {
  rhine::test::TempDir tmp("generate_cli_pad");
  write_model(tmp.path / "tiny", 400);  // 114 padded rows past the tokenizer's 286
  auto r = run_cli("--model " + (tmp.path / "tiny").string() +
                       " --prompt 'abc' --max-new-tokens 40 --temperature 5 --seed 3 --ids",
                   tmp.path);
  INFO(r.err);
  REQUIRE(r.rc == 0);
  const auto at = r.err.find("ids: ");
  REQUIRE(at != std::string::npos);
  std::istringstream in(r.err.substr(at + 5, r.err.find('\n', at) - at - 5));
  int64_t id = 0, n = 0;
  while (in >> id) {
    CHECK(id < 286);
    ++n;
  }
  CHECK(n > 0);
}

TEST_CASE("rhine-generate streams what rhine::nn::generate returns", "[nn][generate][cli][slow]") {
  rhine::test::TempDir tmp("generate_cli");
  const fs::path model_dir = tmp.path / "tiny";
  auto lm = write_model(model_dir, 286);  // as many rows as the tokenizer has ids
  auto tok = rhine::Tokenizer::load((model_dir / "tokenizer.model").string());
  const std::string prompt = "hallo welt";
  rhine::EncodeOptions eo;
  eo.add_special = true;
  auto ids32 = tok.encode(prompt, eo);
  REQUIRE(ids32.front() == 1);  // BOS

  auto expected = [&](const rhine::nn::GenerateOptions& g) {
    auto r = rhine::nn::generate(lm, {std::vector<int64_t>(ids32.begin(), ids32.end())}, g);
    std::vector<int32_t> all(ids32);
    for (auto t : r.tokens[0]) all.push_back(static_cast<int32_t>(t));
    rhine::DecodeOptions d;
    d.skip_special = true;
    return tok.decode(all, d) + "\n";
  };
  rhine::nn::GenerateOptions g;
  g.max_new_tokens = 12;
  g.stop_tokens = {2};
  SECTION("greedy") {
    auto r = run_cli("--model " + model_dir.string() + " --prompt '" + prompt +
                         "' --max-new-tokens 12",
                     tmp.path);
    INFO(r.err);
    REQUIRE(r.rc == 0);
    CHECK(r.out == expected(g));
    CHECK(r.out.rfind(tok.decode(ids32), 0) == 0);  // starts with the prompt
    CHECK(r.err.find("tok/s") != std::string::npos);
  }
  SECTION("seeded sampling, fused kernels, explicit tokenizer") {
    g.temperature = 0.9;
    g.top_k = 50;
    g.top_p = 0.95;
    g.seed = 11;
    auto r = run_cli("--model " + model_dir.string() + " --prompt '" + prompt +
                         "' --max-new-tokens 12 --temperature 0.9 --top-k 50 --top-p 0.95"
                         " --seed 11 --fused --tokenizer " +
                         (model_dir / "tokenizer.model").string(),
                     tmp.path);
    INFO(r.err);
    REQUIRE(r.rc == 0);
    CHECK(r.out == expected(g));
  }
  SECTION("bad arguments fail with the tool's message") {
    auto r = run_cli("--model " + (tmp.path / "missing").string() + " --prompt x", tmp.path);
    CHECK(r.rc == 1);
    CHECK(r.err.find("[rhine-generate] model directory not found") != std::string::npos);
    r = run_cli("--model " + model_dir.string() + " --prompt x --dtype f16", tmp.path);
    CHECK(r.rc != 0);
    fs::remove(model_dir / "tokenizer.model");
    r = run_cli("--model " + model_dir.string() + " --prompt x", tmp.path);
    CHECK(r.rc == 1);
    CHECK(r.err.find("pass --tokenizer FILE") != std::string::npos);
  }
}
