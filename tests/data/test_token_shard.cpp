#include <catch2/catch.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "rhine/core/error.h"
#include "rhine/core/file.h"
#include "rhine/formats/token_shard.h"
#include "test_util.h"

using Catch::Matchers::Contains;
using rhine::TokenShard;
using rhine::TokenShardMeta;
using rhine::TokenShardWriter;
namespace fs = std::filesystem;

namespace {

TokenShardMeta meta(std::uint32_t vocab) {
  TokenShardMeta m;
  m.vocab_size = vocab;
  m.tokenizer = "test.model";
  m.languages = {"de", "fr"};
  m.sources = {"a.txt", "b.jsonl"};
  return m;
}

// Random documents; returns them for comparison.
std::vector<std::vector<std::int32_t>> write_shard(const std::string& path, std::uint32_t vocab, int n_docs,
                                                   unsigned seed) {
  std::mt19937 gen(seed);
  std::vector<std::vector<std::int32_t>> docs;
  TokenShardWriter w(path, meta(vocab));
  for (int d = 0; d < n_docs; ++d) {
    std::vector<std::int32_t> ids(gen() % 300);  // some documents are empty
    for (auto& id : ids) id = static_cast<std::int32_t>(gen() % vocab);
    w.add(ids, static_cast<std::uint16_t>(d % 2), static_cast<std::uint16_t>((d / 2) % 2));
    docs.push_back(ids);
  }
  w.finish();
  return docs;
}

void flip_byte(const std::string& path, std::uint64_t offset) {
  std::string data = rhine::read_file(path, "test");
  data[offset] = static_cast<char>(data[offset] ^ 0x5a);
  rhine::write_file_atomic(path, data);
}

void truncate_to(const std::string& path, std::uint64_t size) { fs::resize_file(path, size); }

}  // namespace

TEST_CASE("token shards round trip with u16 and u32 ids", "[token_shard]") {
  rhine::test::TempDir dir("shard_rt");
  for (std::uint32_t vocab : {1000u, 65536u, 65537u, 200000u}) {
    INFO("vocab " << vocab);
    auto path = dir.file("s.tokens");
    auto docs = write_shard(path, vocab, 57, vocab);
    auto shard = TokenShard::open(path, /*verify_tokens=*/true);
    CHECK(shard->token_bytes() == (vocab <= 65536 ? 2u : 4u));
    CHECK(shard->meta().languages == std::vector<std::string>{"de", "fr"});
    CHECK(shard->meta().tokenizer == "test.model");
    REQUIRE(shard->n_docs() == docs.size());
    std::uint64_t total = 0;
    for (std::size_t d = 0; d < docs.size(); ++d) {
      const auto& e = shard->docs()[d];
      CHECK(e.lang == d % 2);
      CHECK(e.source == (d / 2) % 2);
      REQUIRE(e.n_tokens == docs[d].size());
      std::vector<std::int64_t> got(e.n_tokens);
      shard->copy_tokens(e.first_token, e.n_tokens, got.data());
      CHECK(std::equal(got.begin(), got.end(), docs[d].begin()));
      total += e.n_tokens;
    }
    CHECK(shard->n_tokens() == total);
  }
}

TEST_CASE("token shard writer rejects bad input", "[token_shard]") {
  rhine::test::TempDir dir("shard_bad_in");
  TokenShardWriter w(dir.file("x.tokens"), meta(100));
  CHECK_THROWS_WITH(w.add({5, 100}, 0, 0), Contains("[token_shard] token id outside the vocabulary, got 100"));
  CHECK_THROWS_WITH(w.add({5}, 2, 0), Contains("language index out of range, got 2"));
  CHECK_THROWS_WITH(w.add({-1}, 0, 0), Contains("token id outside the vocabulary, got -1"));
  CHECK_THROWS_WITH(TokenShardWriter(dir.file("y.tokens"), meta(0)), Contains("vocab_size must be positive"));
  CHECK_THROWS_WITH(TokenShardWriter((dir.path / "missing" / "z.tokens").string(), meta(10)),
                    Contains("cannot create the temporary shard file"));
}

TEST_CASE("an unfinished writer leaves nothing behind", "[token_shard]") {
  rhine::test::TempDir dir("shard_unfinished");
  {
    TokenShardWriter w(dir.file("x.tokens"), meta(100));
    w.add({1, 2, 3}, 0, 0);
  }
  CHECK(fs::is_empty(dir.path));
}

TEST_CASE("corrupt and truncated shards are rejected with the file named", "[token_shard]") {
  rhine::test::TempDir dir("shard_corrupt");
  const auto good = dir.file("good.tokens");
  write_shard(good, 1000, 20, 7);
  const auto size = fs::file_size(good);
  auto copy = [&](const std::string& name) {
    auto p = dir.file(name);
    fs::copy_file(good, p, fs::copy_options::overwrite_existing);
    return p;
  };
  auto p = copy("t1.tokens");
  truncate_to(p, size - 1);
  CHECK_THROWS_WITH(TokenShard::open(p), Contains("t1.tokens\" is truncated: the header promises"));
  p = copy("t2.tokens");
  truncate_to(p, 30);
  CHECK_THROWS_WITH(TokenShard::open(p), Contains("t2.tokens\" is truncated: shorter than the 64-byte header"));
  p = copy("t3.tokens");
  truncate_to(p, 0);
  CHECK_THROWS_WITH(TokenShard::open(p), Contains("is truncated"));
  p = copy("magic.tokens");
  flip_byte(p, 0);
  CHECK_THROWS_WITH(TokenShard::open(p), Contains("magic.tokens\" is not a Rhine token shard"));
  p = copy("version.tokens");
  flip_byte(p, 8);
  CHECK_THROWS_WITH(TokenShard::open(p), Contains("has an unsupported version"));
  p = copy("count.tokens");
  flip_byte(p, 23);  // high byte of n_tokens
  CHECK_THROWS_WITH(TokenShard::open(p), Contains("count.tokens\" has impossible counts"));
  p = copy("index.tokens");
  flip_byte(p, size - 70);  // inside the index or metadata
  CHECK_THROWS_WITH(TokenShard::open(p), Contains("index.tokens\" is corrupt: index/metadata checksum mismatch"));
  p = copy("tokens.tokens");
  flip_byte(p, 64 + 10);  // a token
  CHECK_NOTHROW(TokenShard::open(p));  // the cheap open does not read the tokens
  CHECK_THROWS_WITH(TokenShard::open(p, true), Contains("tokens.tokens\" is corrupt: token checksum mismatch"));
  p = copy("trailing.tokens");
  {
    std::ofstream f(p, std::ios::app | std::ios::binary);
    f << "x";
  }
  CHECK_THROWS_WITH(TokenShard::open(p), Contains("has trailing bytes"));
  CHECK_THROWS_WITH(TokenShard::open(dir.file("absent.tokens")), Contains("cannot open shard"));
  CHECK_THROWS_WITH(TokenShard::open(dir.path.string()), Contains("not a regular file"));
}

TEST_CASE("every single-byte corruption of a small shard is detected or harmless", "[token_shard]") {
  rhine::test::TempDir dir("shard_flip");
  const auto good = dir.file("good.tokens");
  write_shard(good, 300, 6, 3);
  const std::string original = rhine::read_file(good, "test");
  const auto tokens_end = 64 + 2 * TokenShard::open(good)->n_tokens();
  const auto index_begin = (tokens_end + 63) / 64 * 64;
  const auto p = dir.file("flip.tokens");
  int rejected = 0;
  for (std::size_t i = 0; i < original.size(); ++i) {
    std::string data = original;
    data[i] = static_cast<char>(data[i] ^ 0x01);
    rhine::write_file_atomic(p, data);
    try {
      TokenShard::open(p, /*verify_tokens=*/true);
      // Only the reserved header word and the padding after the tokens may
      // change without effect; every other byte is validated or checksummed.
      INFO("flipped byte " << i);
      CHECK(((i >= 56 && i < 64) || (i >= tokens_end && i < index_begin)));
    } catch (const rhine::Error& e) {
      ++rejected;
      CHECK_THAT(e.what(), Contains("[token_shard]"));
    }
  }
  CHECK(rejected > static_cast<int>(original.size()) * 9 / 10);
}

TEST_CASE("a writer killed with SIGKILL never leaves a shard that opens but is wrong",
          "[token_shard][slow]") {
  rhine::test::TempDir dir("shard_kill");
  const auto path = dir.file("k.tokens");
  for (int round = 0; round < 10; ++round) {
    pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      for (;;) write_shard(path, 50000, 4000, 11);
    }
    ::usleep(2000 + 7000 * round);
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
    if (fs::exists(path)) {
      auto shard = TokenShard::open(path, true);  // complete and valid, or absent
      CHECK(shard->n_docs() == 4000);
    }
  }
}
