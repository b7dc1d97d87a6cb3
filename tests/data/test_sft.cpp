// SFT data: chat rendering and loss masks against hand-written expectations,
// errors naming file and line, and the SftLoader's packing, resume and rank
// sharding.
#include <ATen/ops/cat.h>
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "rhine/core/error.h"
#include "rhine/core/json.h"
#include "rhine/data/sft.h"
#include "rhine/tokenizer/tokenizer.h"

namespace {

// A character-level tokenizer.json: one token per printable ASCII character
// and "\n" (id = code), plus four special tokens, so expected ids and targets
// can be written down by hand.
constexpr int kImStart = 200, kImEnd = 201, kBos = 202, kEos = 203;

// With `merge_newline_b`, BPE also merges "\n" + "B" into one token (id 300),
// like SentencePiece folding a newline into the next word's "▁".
rhine::Tokenizer char_tokenizer(bool merge_newline_b = false) {
  rhine::Json vocab = rhine::Json::object();
  vocab["\n"] = 10;
  for (int c = 32; c < 127; ++c) vocab[std::string(1, static_cast<char>(c))] = c;
  auto added = [](int id, const char* text) {
    return rhine::Json{{"id", id},         {"content", text},    {"single_word", false}, {"lstrip", false},
                       {"rstrip", false}, {"normalized", false}, {"special", true}};
  };
  for (auto [id, t] : {std::pair{kImStart, "<|im_start|>"}, {kImEnd, "<|im_end|>"}, {kBos, "<s>"}, {kEos, "</s>"}})
    vocab[t] = id;
  rhine::Json merges = rhine::Json::array();
  if (merge_newline_b) {
    vocab["\nB"] = 300;
    merges.push_back({"\n", "B"});
  }
  rhine::Json j = {{"version", "1.0"},
                   {"truncation", nullptr},
                   {"padding", nullptr},
                   {"added_tokens",
                    rhine::Json::array({added(kImStart, "<|im_start|>"), added(kImEnd, "<|im_end|>"),
                                        added(kBos, "<s>"), added(kEos, "</s>")})},
                   {"normalizer", nullptr},
                   {"pre_tokenizer", nullptr},
                   {"post_processor", nullptr},
                   {"decoder", nullptr},
                   {"model",
                    {{"type", "BPE"},
                     {"dropout", nullptr},
                     {"unk_token", nullptr},
                     {"continuing_subword_prefix", nullptr},
                     {"end_of_word_suffix", nullptr},
                     {"fuse_unk", false},
                     {"byte_fallback", false},
                     {"vocab", vocab},
                     {"merges", merges}}}};
  return rhine::Tokenizer::from_tokenizer_json(j, "test", {{"bos_token", "<s>"}, {"eos_token", "</s>"}});
}

// Expected (ids, targets) from pieces: a special token's text is one id, other text one id per character.
std::pair<std::vector<std::int32_t>, std::vector<std::uint8_t>> expect(
    const std::vector<std::pair<std::string, int>>& pieces) {
  const std::map<std::string, int> special = {
      {"<|im_start|>", kImStart}, {"<|im_end|>", kImEnd}, {"<s>", kBos}, {"</s>", kEos}};
  std::vector<std::int32_t> ids;
  std::vector<std::uint8_t> target;
  for (const auto& [text, t] : pieces) {
    if (special.count(text)) {
      ids.push_back(special.at(text));
      target.push_back(static_cast<std::uint8_t>(t));
      continue;
    }
    for (char c : text) {
      ids.push_back(static_cast<unsigned char>(c));
      target.push_back(static_cast<std::uint8_t>(t));
    }
  }
  return {ids, target};
}

std::filesystem::path temp_dir(const std::string& name) {
  auto d = std::filesystem::temp_directory_path() / ("rhine_test_sft_" + name);
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d;
}

}  // namespace

TEST_CASE("sft: ChatML conversation, loss on the assistant's replies and their end marker", "[sft]") {
  const auto tok = char_tokenizer();
  rhine::SftOptions o;  // chatml
  const std::string line = R"({"messages": [{"role": "system", "content": "Sei kurz."},
      {"role": "user", "content": "Hallo?"}, {"role": "assistant", "content": "Hi!"},
      {"role": "user", "content": "Und?"}, {"role": "assistant", "content": "Gut."}]})";
  const auto ex = rhine::tokenize_sft_example(line, o, tok);
  const auto [ids, target] = expect({{"<s>", 0},
                                     {"<|im_start|>", 0}, {"system\nSei kurz.", 0}, {"<|im_end|>", 0}, {"\n", 0},
                                     {"<|im_start|>", 0}, {"user\nHallo?", 0}, {"<|im_end|>", 0}, {"\n", 0},
                                     {"<|im_start|>", 0}, {"assistant\n", 0},
                                     {"Hi!", 1}, {"<|im_end|>", 1}, {"\n", 1},
                                     {"<|im_start|>", 0}, {"user\nUnd?", 0}, {"<|im_end|>", 0}, {"\n", 0},
                                     {"<|im_start|>", 0}, {"assistant\n", 0},
                                     {"Gut.", 1}, {"<|im_end|>", 1}, {"\n", 1}});
  CHECK(ex.tokens == ids);
  CHECK(ex.target == target);
  CHECK(ex.target_bytes == std::string("Hi!<|im_end|>\nGut.<|im_end|>\n").size());
}

TEST_CASE("sft: plain template with EOS after the reply, prompt/response and text lines", "[sft]") {
  const auto tok = char_tokenizer();
  rhine::SftOptions o;
  o.chat_template = rhine::ChatTemplate::named("plain");
  {
    const auto ex = rhine::tokenize_sft_example(R"({"prompt": "Frage", "response": "Antwort"})", o, tok);
    const auto [ids, target] = expect({{"<s>", 0}, {"Frage\n", 0}, {"Antwort", 1}, {"</s>", 1}});
    CHECK(ex.tokens == ids);
    CHECK(ex.target == target);
  }
  {  // two turns: EOS after each reply, the text between tokenized piecewise
    const auto ex = rhine::tokenize_sft_example(
        R"({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                         {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]})",
        o, tok);
    const auto [ids, target] =
        expect({{"<s>", 0}, {"a\n", 0}, {"b", 1}, {"</s>", 1}, {"c\n", 0}, {"d", 1}, {"</s>", 1}});
    CHECK(ex.tokens == ids);
    CHECK(ex.target == target);
  }
  {  // a token merging the separator with the reply's first character belongs to the reply
    const auto merging = char_tokenizer(true);
    const auto ex = rhine::tokenize_sft_example(R"({"prompt": "a", "response": "Bc"})", o, merging);
    CHECK(ex.tokens == std::vector<std::int32_t>{kBos, 'a', 300, 'c', kEos});
    CHECK(ex.target == std::vector<std::uint8_t>{0, 0, 1, 1, 1});
  }
  {
    o.add_bos = false;
    const auto ex = rhine::tokenize_sft_example(R"({"text": "xyz"})", o, tok);
    const auto [ids, target] = expect({{"xyz", 1}});
    CHECK(ex.tokens == ids);
    CHECK(ex.target == target);
  }
}

TEST_CASE("sft: bad lines fail with the file and line named", "[sft]") {
  const auto tok = char_tokenizer();
  rhine::SftOptions o;
  CHECK_THROWS_WITH(rhine::tokenize_sft_example(R"({"messages": [{"role": "user", "content": "x"}]})", o, tok),
                    Catch::Contains("without an assistant message"));
  CHECK_THROWS_WITH(rhine::tokenize_sft_example(
                        R"({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]})",
                        o, tok),
                    Catch::Contains("unknown message role") && Catch::Contains("robot"));
  CHECK_THROWS_WITH(rhine::tokenize_sft_example(R"({"question": "x"})", o, tok), Catch::Contains("\"messages\""));
  rhine::ChatTemplate bad;
  bad.user = "no placeholder";
  CHECK_THROWS_WITH(bad.validate(), Catch::Contains("{content}"));

  const auto dir = temp_dir("bad");
  std::ofstream(dir / "a.jsonl") << R"({"prompt": "p", "response": "r"})" << "\n\n"
                                 << "{\"prompt\": \"p\", \"response\": \"\xff\xfe\"}\n";
  o.files = {(dir / "a.jsonl").string()};
  CHECK_THROWS_WITH(rhine::load_sft_examples(o, tok), Catch::Contains("a.jsonl:3") && Catch::Contains("[sft]"));
  std::ofstream(dir / "a.jsonl") << R"({"prompt": "p", "response": "r"})" << "\n{not json\n";
  CHECK_THROWS_WITH(rhine::load_sft_examples(o, tok), Catch::Contains("a.jsonl:2"));
  {  // an empty text has nothing to learn: dropped and counted, never an out-of-range access
     // (an empty reply still teaches the end-of-turn marker and is kept)
    std::ofstream(dir / "b.jsonl") << R"({"text": ""})" << "\n" << R"({"prompt": "", "response": ""})" << "\n"
                                   << R"({"prompt": "p", "response": "r"})" << "\n";
    auto e = o;
    e.files = {(dir / "b.jsonl").string()};
    e.add_bos = false;
    const auto r = rhine::load_sft_examples(e, tok);
    CHECK(r.examples.size() == 2);
    CHECK(r.dropped == 1);
  }
  o.files = {(dir / "missing.jsonl").string()};
  CHECK_THROWS_WITH(rhine::load_sft_examples(o, tok), Catch::Contains("not found"));
}

namespace {

// A dataset of n examples with distinct token patterns and mixed lengths and languages.
rhine::SftExamples make_examples(const rhine::Tokenizer& tok, int n, const std::filesystem::path& dir) {
  std::ofstream f(dir / "d.jsonl");
  for (int i = 0; i < n; ++i) {
    std::string prompt(static_cast<std::size_t>(1 + i % 7), static_cast<char>('a' + i % 26));
    std::string reply(static_cast<std::size_t>(2 + (i * 5) % 11), static_cast<char>('A' + i % 26));
    f << rhine::Json{{"prompt", prompt + std::to_string(i)}, {"response", reply}, {"lang", i % 3 ? "de" : "nl"}}.dump()
      << "\n";
  }
  f.close();
  rhine::SftOptions o;
  o.files = {dir.string()};
  o.max_tokens = 40;
  return rhine::load_sft_examples(o, tok);
}

// The examples in a batch: per row, the runs of positions between restarts that carry any label.
std::vector<std::vector<std::int64_t>> docs_of(const rhine::Batch& b) {
  std::vector<std::vector<std::int64_t>> docs;
  const auto ids = b.input_ids.contiguous(), pos = b.position_ids.contiguous(), lab = b.labels.contiguous();
  for (std::int64_t r = 0; r < ids.size(0); ++r)
    for (std::int64_t t = 0; t < ids.size(1); ++t) {
      if (pos[r][t].item<std::int64_t>() == 0) docs.emplace_back();
      docs.back().push_back(ids[r][t].item<std::int64_t>());
      docs.back().push_back(lab[r][t].item<std::int64_t>());
    }
  return docs;
}

}  // namespace

TEST_CASE("sft: loader packs every example exactly once per epoch, inputs and masked labels intact", "[sft]") {
  const auto tok = char_tokenizer();
  const auto data = make_examples(tok, 60, temp_dir("pack"));
  REQUIRE(data.examples.size() == 60);
  CHECK(data.languages == std::vector<std::string>{"de", "nl"});
  // What each example must look like in a row: (input, label) pairs.
  std::multiset<std::vector<std::int64_t>> want;
  for (const auto& ex : data.examples) {
    std::vector<std::int64_t> d;
    for (std::size_t t = 0; t + 1 < ex.tokens.size(); ++t) {
      d.push_back(ex.tokens[t]);
      d.push_back(ex.target[t + 1] ? ex.tokens[t + 1] : -100);
    }
    want.insert(d);
  }
  for (bool pack : {true, false}) {
    rhine::SftLoaderOptions lo;
    lo.batch_size = 4;
    lo.seq_len = 48;
    lo.pack = pack;
    lo.pad_id = kEos;
    rhine::SftLoader loader(data, lo);
    std::multiset<std::vector<std::int64_t>> got;
    std::int64_t label_tokens = 0;
    while (loader.epoch() == 1) {
      const auto b = loader.next();
      label_tokens += b.labels.ne(-100).sum().item<std::int64_t>();
      for (auto& d : docs_of(b)) {
        bool has_label = false;
        for (std::size_t i = 1; i < d.size(); i += 2) has_label |= d[i] != -100;
        if (has_label) got.insert(std::move(d));  // padding runs carry no label
      }
    }
    // The last batch of the epoch may start epoch 2: drop those examples from the count.
    CHECK(got.size() >= want.size());
    for (const auto& d : want) CHECK(got.count(d) >= want.count(d));
    std::int64_t want_labels = 0;
    for (const auto& ex : data.examples)
      for (std::size_t t = 1; t < ex.target.size(); ++t) want_labels += ex.target[t];
    CHECK(label_tokens >= want_labels);
  }
}

TEST_CASE("sft: loader resume continues the same batches, two ranks split the global rows", "[sft]") {
  const auto tok = char_tokenizer();
  const auto data = make_examples(tok, 37, temp_dir("resume"));
  rhine::SftLoaderOptions lo;
  lo.batch_size = 4;
  lo.seq_len = 32;
  lo.seed = 7;
  rhine::SftLoader full(data, lo);
  std::vector<rhine::Batch> ref;
  std::string state_at_5;
  for (int i = 0; i < 25; ++i) {  // several epochs
    ref.push_back(full.next());
    if (i == 4) state_at_5 = full.state();
  }
  CHECK(full.epoch() > 2);
  rhine::SftLoader resumed(data, lo);
  resumed.load_state(state_at_5);
  for (int i = 5; i < 25; ++i) {
    const auto b = resumed.next();
    CHECK(b.input_ids.equal(ref[static_cast<std::size_t>(i)].input_ids));
    CHECK(b.labels.equal(ref[static_cast<std::size_t>(i)].labels));
    CHECK(b.position_ids.equal(ref[static_cast<std::size_t>(i)].position_ids));
  }
  auto other = lo;
  other.seq_len = 64;
  rhine::SftLoader mismatched(data, other);
  CHECK_THROWS_WITH(mismatched.load_state(state_at_5), Catch::Contains("seq_len"));

  std::vector<rhine::SftLoader> ranks;
  ranks.reserve(2);
  for (int r = 0; r < 2; ++r) {
    auto o = lo;
    o.rank = r;
    o.world_size = 2;
    ranks.emplace_back(data, o);  // reserved: no reallocation
  }
  for (std::size_t i = 0; i < 10; ++i) {
    const auto a = ranks[0].next(), b = ranks[1].next();
    CHECK(at::cat({a.input_ids, b.input_ids}).equal(ref[i].input_ids));
    CHECK(at::cat({a.labels, b.labels}).equal(ref[i].labels));
    CHECK(ranks[0].state() == ranks[1].state());
  }
}
