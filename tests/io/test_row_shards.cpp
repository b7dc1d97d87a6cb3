// Row-sharded tensor files (rhine/io/row_shards.h): pieces written by several
// "ranks" read back as any row range, plain safetensors read the same way,
// and every inconsistency refused with an error naming the tensor.
#include <ATen/ATen.h>
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>

#include "rhine/core/error.h"
#include "rhine/core/json.h"
#include "rhine/io/hf.h"
#include "rhine/io/row_shards.h"
#include "rhine/nn/model.h"
#include "rhine/io/safetensors.h"
#include "test_util.h"
#include "tiny_config.h"

using Catch::Matchers::Contains;
using rhine::io::RowPiece;
using rhine::io::RowReader;

namespace {

/// Writes `tensors` as `n` ranks would under FSDP's rule (rank r: rows
/// [r*ceil(R/n), ...)), then the index.
void write_sharded(const std::string& dir, const std::map<std::string, at::Tensor>& tensors, int n) {
  std::vector<rhine::Json> descs;
  for (int r = 0; r < n; ++r) {
    std::vector<RowPiece> pieces;
    for (const auto& [name, t] : tensors) {
      const std::int64_t R = t.dim() == 0 ? 1 : t.size(0), per = (R + n - 1) / n;
      const std::int64_t a = std::min(R, r * per), b = std::min(R, a + per);
      if (a == b) continue;
      pieces.push_back({name, t.dim() == 0 ? t : t.narrow(0, a, b - a), t.sizes().vec(), a});
    }
    descs.push_back(rhine::io::write_row_shard(dir, r, n, pieces));
  }
  rhine::io::write_row_index(dir, descs, {{"step", 7}});
}

}  // namespace

TEST_CASE("Row shards written by 3 ranks read back as any row range", "[row_shards]") {
  rhine::test::TempDir dir("row_shards");
  std::map<std::string, at::Tensor> tensors = {
      {"w", at::arange(7 * 3, at::kFloat).view({7, 3})},
      {"b", at::arange(2, at::kDouble)},  // fewer rows than ranks: rank 2 has none
      {"s", at::scalar_tensor(4.5, at::kFloat)},
      {"h", at::arange(10, at::kFloat).to(at::kBFloat16).view({5, 2})}};
  write_sharded(dir.path.string(), tensors, 3);
  CHECK(std::filesystem::exists(dir.file("shard-00002-of-00003.safetensors")));
  auto reader = RowReader::open(dir.path.string());
  CHECK(reader.row_sharded());
  CHECK(reader.meta()["step"] == 7);
  CHECK(reader.names() == std::vector<std::string>{"b", "h", "s", "w"});
  for (const auto& [name, t] : tensors) {
    INFO(name);
    CHECK(reader.shape(name) == t.sizes().vec());
    CHECK(reader.whole(name).equal(t));
    const std::int64_t R = reader.num_rows(name);
    for (std::int64_t a = 0; a <= R; ++a)
      for (std::int64_t b = a; b <= R && t.dim() > 0; ++b) CHECK(reader.rows(name, a, b).equal(t.narrow(0, a, b - a)));
  }
  CHECK_THROWS_WITH(reader.rows("w", 2, 8), Contains("[row_shards]") && Contains("out of bounds"));
  CHECK_THROWS_WITH(reader.shape("nope"), Contains("no tensor named nope"));

  // Plain safetensors: each tensor is one piece of all its rows.
  rhine::save_safetensors(dir.file("plain.safetensors"), tensors);
  auto plain = RowReader::open(dir.file("plain.safetensors"));
  CHECK(!plain.row_sharded());
  CHECK(plain.rows("w", 3, 6).equal(tensors["w"].narrow(0, 3, 3)));
}

TEST_CASE("Row shards refuse overlapping, missing and inconsistent pieces", "[row_shards]") {
  rhine::test::TempDir dir("row_shards_bad");
  const std::string d = dir.path.string();
  at::Tensor w = at::arange(12, at::kFloat).view({4, 3});
  auto a = rhine::io::write_row_shard(d, 0, 2, {{"w", w.narrow(0, 0, 3), {4, 3}, 0}});
  auto b = rhine::io::write_row_shard(d, 1, 2, {{"w", w.narrow(0, 2, 2), {4, 3}, 2}});
  CHECK_THROWS_WITH(rhine::io::write_row_index(d, {a, b}), Contains("overlap or leave rows out") && Contains("w"));
  auto c = rhine::io::write_row_shard(d, 1, 2, {{"w", w.narrow(0, 3, 1), {4, 3}, 3}});
  rhine::io::write_row_index(d, {a, c});
  CHECK(RowReader::open(d).whole("w").equal(w));
  auto short_piece = rhine::io::write_row_shard(d, 1, 2, {});
  CHECK_THROWS_WITH(rhine::io::write_row_index(d, {a, short_piece}), Contains("end before its last row"));
  auto other = rhine::io::write_row_shard(d, 1, 2, {{"w", at::zeros({1, 2}), {4, 2}, 3}});
  CHECK_THROWS_WITH(rhine::io::write_row_index(d, {a, other}), Contains("disagree on the shape"));
  CHECK_THROWS_WITH(rhine::io::write_row_shard(d, 0, 2, {{"w", w, {3, 3}, 0}}), Contains("does not fit"));
  CHECK_THROWS_WITH(rhine::io::write_row_shard(d, 0, 2, {{"w", w, {4, 3}, 0}, {"w", w, {4, 3}, 0}}),
                    Contains("given twice"));
  // A damaged index (a piece missing) is refused when read.
  rhine::io::write_row_index(d, {a, c});
  auto idx = rhine::read_json_file(dir.file("shards.json"), "test");
  idx["tensors"]["w"]["pieces"].erase(1);
  std::ofstream(dir.file("shards.json")) << idx.dump();
  CHECK_THROWS_WITH(RowReader::open(d), Contains("damaged") && Contains("w"));
  // Fields of the wrong type, pieces naming files outside the directory: [row_shards] errors.
  for (const std::string bad : {R"({"format": "rhine-row-shards", "version": 1, "tensors": {"w": {"shape": "x"}}})",
                                R"({"format": "rhine-row-shards", "version": 1, "tensors": {"w": {"shape": [4, 3], "pieces": [{"file": "../x", "rows": [0, 4]}]}}})",
                                R"({"format": "rhine-row-shards", "version": 1, "tensors": {"w": {"shape": [4, 3], "pieces": [{"rows": [0]}]}}})",
                                R"({"format": "rhine-row-shards", "version": 1, "tensors": {"w": {"shape": [5, 3], "pieces": [{"file": "shard-00000-of-00002.safetensors", "rows": [0, 5]}]}}})",
                                R"({"format": "other"})", R"([1, 2])"}) {
    INFO(bad);
    std::ofstream(dir.file("shards.json")) << bad;
    CHECK_THROWS_WITH(RowReader::open(d), Contains("[row_shards]"));
  }
}

TEST_CASE("A row-sharded checkpoint exports to the HF directory save_hf_model writes, tensor by tensor", "[row_shards]") {
  for (const bool deepseek : {false, true}) {
    INFO((deepseek ? "deepseek_v3 with MTP" : "llama, tied embeddings"));
    rhine::nn::ModelConfig c = rhine::test::tiny_config(deepseek ? "deepseek_v3" : "llama");
    c.tie_word_embeddings = !deepseek;
    c.validate();
    rhine::nn::CausalLMOptions mo;
    mo.init_seed = 5;
    rhine::nn::CausalLM lm(c, mo);
    {
      at::NoGradGuard g;
      for (auto& [name, b] : lm->state_buffers()) b.copy_(at::randn(b.sizes()));  // router biases != 0
    }
    rhine::test::TempDir dir("row_shards_export");
    const std::string step = dir.file("step");
    std::filesystem::create_directories(step);
    std::map<std::string, at::Tensor> params, buffers;
    for (const auto& p : lm->named_parameters()) params[p.key()] = p.value().detach();
    for (const auto& [name, b] : lm->state_buffers()) buffers[name] = b;
    write_sharded(step, params, 3);
    rhine::save_safetensors(step + "/buffers.safetensors", buffers);
    lm->config().save(step + "/config.json");
    for (const bool bf16 : {false, true}) {
      rhine::io::ExportOptions eo;
      eo.max_shard_bytes = 3000;  // several output shards: streamed one at a time
      if (bf16) eo.dtype = at::kBFloat16;
      const std::string a = dir.file(bf16 ? "a16" : "a32"), b = dir.file(bf16 ? "b16" : "b32");
      rhine::io::export_row_shards_to_hf(step, a, eo);
      rhine::io::save_hf_model(lm, b, eo);
      CHECK(std::filesystem::exists(a + "/model.safetensors.index.json"));
      const auto ta = rhine::load_safetensors(a), tb = rhine::load_safetensors(b);
      REQUIRE(ta.size() == tb.size());
      for (const auto& [name, t] : tb) {
        INFO(name);
        REQUIRE(ta.count(name));
        CHECK(ta.at(name).scalar_type() == t.scalar_type());
        CHECK(ta.at(name).equal(t));
      }
      CHECK(rhine::read_json_file(a + "/config.json", "test") == rhine::read_json_file(b + "/config.json", "test"));
    }
  }
  rhine::test::TempDir plain("row_shards_export_plain");
  CHECK_THROWS_WITH(rhine::io::export_row_shards_to_hf(plain.path, plain.file("out")), Contains("[hf"));
}
