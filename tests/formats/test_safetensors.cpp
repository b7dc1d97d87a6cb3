// Safetensors, torch-free: fixtures written by an independent Python writer
// (tests/fixtures/safetensors/make_fixtures.py) read bit-exactly; Rhine's files
// re-read by an independent Python reader (read_safetensors.py, plain python3);
// a corpus of malformed files, each rejected with its own message.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "rhine/core/error.h"
#include "rhine/core/file.h"
#include "rhine/core/json.h"
#include "rhine/formats/safetensors.h"
#include "formats/python_reader.h"
#include "test_util.h"

namespace fs = std::filesystem;
using Catch::Matchers::Contains;

namespace {

const fs::path kFixtures = fs::path(RHINE_SOURCE_DIR) / "tests" / "fixtures" / "safetensors";

std::string u64le(std::uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return s;
}

// A file from header text and `buffer` bytes of data.
std::string make_file(const std::string& header, std::size_t buffer) {
  return u64le(header.size()) + header + std::string(buffer, '\x5a');
}

// Compares every tensor of `expected` (fixture JSON) with what the reader sees.
void check_against_expected(const rhine::SafetensorsCheckpoint& c, const rhine::Json& expected) {
  CHECK(c.size() == expected["tensors"].size());
  for (const auto& [name, e] : expected["tensors"].items()) {
    INFO("tensor " << name);
    REQUIRE(c.contains(name));
    rhine::SafetensorsView v = c.at(name);
    CHECK(rhine::dtype_name(v.dtype()) == e["dtype"].get<std::string>());
    CHECK(v.shape() == e["shape"].get<std::vector<std::int64_t>>());
    if (e.contains("hex")) CHECK(rhine::test::hex(v.data, v.nbytes()) == e["hex"].get<std::string>());
  }
}

}  // namespace

TEST_CASE("dtype names, sizes and lookups follow the spec", "[safetensors]") {
  using D = rhine::SafetensorsDtype;
  for (const char* n : {"BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64",
                        "I64", "U64", "C64", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ",
                        "F8_E5M2FNUZ", "F4", "F6_E2M3", "F6_E3M2"}) {
    auto d = rhine::dtype_from_name(n);
    REQUIRE(d.has_value());
    CHECK(rhine::dtype_name(*d) == n);
  }
  CHECK_FALSE(rhine::dtype_from_name("F33").has_value());
  CHECK_FALSE(rhine::dtype_from_name("f32").has_value());
  CHECK(rhine::dtype_bits(D::BF16) == 16);
  CHECK(rhine::dtype_bits(D::C64) == 64);
  CHECK(rhine::dtype_bits(D::F4) == 4);
  CHECK(rhine::dtype_bits(D::F6_E3M2) == 6);
  CHECK(rhine::is_float8(D::F8_E8M0));
  CHECK_FALSE(rhine::is_float8(D::U8));
}

TEST_CASE("files written by an independent writer read bit-exactly, zero-copy", "[safetensors]") {
  for (const char* stem : {"dtypes", "unaligned"}) {
    INFO(stem);
    const std::string path = (kFixtures / (std::string(stem) + ".safetensors")).string();
    auto expected = rhine::read_json_file((kFixtures / (std::string(stem) + ".expected.json")).string(), "test");
    auto c = rhine::SafetensorsCheckpoint::open(path);
    check_against_expected(c, expected);
    auto f = rhine::SafetensorsFile::open(path);
    CHECK(rhine::Json(f->metadata()) == expected["metadata"]);
    // Views point into the mapping: zero-copy.
    for (const auto& name : f->names()) {
      auto v = f->at(name);
      CHECK(v.data >= f->mapping());
      CHECK(v.data + v.nbytes() <= f->mapping() + f->mapping_size());
    }
    // Entries come back sorted by offset whatever order the header lists them in.
    for (std::size_t i = 1; i < f->entries().size(); ++i)
      CHECK(f->entries()[i - 1].end == f->entries()[i].begin);
  }
  auto f = rhine::SafetensorsFile::open((kFixtures / "dtypes.safetensors").string());
  CHECK(f->at("scalar").shape().empty());
  CHECK(f->at("scalar").numel() == 1);
  CHECK(f->at("empty").numel() == 0);
  CHECK(f->at("empty").nbytes() == 0);
  CHECK_THROWS_WITH(f->at("f32.matrx"), Contains("[safetensors] no such tensor in ") &&
                                            Contains("dtypes.safetensors") && Contains("\"f32.matrx\"") &&
                                            Contains("did you mean \"f32.matrix\""));
  CHECK_FALSE(f->find("nope").has_value());
}

TEST_CASE("an independently written sharded checkpoint resolves names across shards", "[safetensors]") {
  auto expected = rhine::read_json_file((kFixtures / "sharded.expected.json").string(), "test");
  for (auto p : {kFixtures / "sharded", kFixtures / "sharded" / "model.safetensors.index.json"}) {
    auto c = rhine::SafetensorsCheckpoint::open(p.string());
    CHECK(c.files().size() == 2);
    check_against_expected(c, expected);
    CHECK(c.file_of("lm_head.weight")->path().find("model-00002-of-00002") != std::string::npos);
    CHECK(c.index_metadata().at("total_size") == "224");
  }
}

TEST_CASE("the fp8 fixture parses with every float8 dtype", "[safetensors]") {
  auto expected = rhine::read_json_file((kFixtures / "fp8.expected.json").string(), "test");
  auto c = rhine::SafetensorsCheckpoint::open((kFixtures / "fp8.safetensors").string());
  check_against_expected(c, expected);
  auto v = c.at("all.f8_e4m3");
  for (int b = 0; b < 256; ++b) CHECK(static_cast<int>(v.data[b]) == b);
}

TEST_CASE("the writer's files follow the spec and the independent reader agrees", "[safetensors]") {
  auto dir = rhine::test::temp_dir("st_write");
  std::vector<float> f32{1.5f, -2.0f, 3.25f, 0.0f, 1e-30f, -7.0f};
  std::vector<std::uint16_t> bf16{0x3f80, 0xc000, 0x7f80};
  std::vector<std::int64_t> i64{-1, 1LL << 40};
  std::vector<std::uint8_t> u8{1, 2, 3, 4, 5};
  std::vector<std::uint8_t> f8{0x00, 0x7e, 0x80};
  std::vector<double> scalar{2.5};
  std::vector<rhine::SafetensorsTensor> ts{
      {"z.f32", rhine::SafetensorsDtype::F32, {2, 3}, f32.data(), 24},
      {"a.bf16", rhine::SafetensorsDtype::BF16, {3}, bf16.data(), 6},
      {"m.i64", rhine::SafetensorsDtype::I64, {2}, i64.data(), 16},
      {"u8", rhine::SafetensorsDtype::U8, {5}, u8.data(), 5},
      {"f8", rhine::SafetensorsDtype::F8_E4M3, {3, 1}, f8.data(), 3},
      {"scalar", rhine::SafetensorsDtype::F64, {}, scalar.data(), 8},
      {"empty", rhine::SafetensorsDtype::F32, {0, 7}, nullptr, 0},
  };
  rhine::SafetensorsWriteOptions o;
  o.metadata["step"] = "12";
  const std::string path = (dir / "out.safetensors").string();
  rhine::write_safetensors(path, ts, o);
  CHECK(std::distance(fs::directory_iterator(dir), fs::directory_iterator()) == 1);  // no temp left

  const std::string bytes = rhine::read_file(path, "test");
  CHECK(bytes == rhine::serialize_safetensors(ts, o));  // deterministic
  std::uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  CHECK((8 + n) % 8 == 0);
  CHECK(bytes.substr(8, 26) == "{\"__metadata__\":{\"format\":");
  // Widest dtype first, then by name: offsets follow that order.
  auto f = rhine::SafetensorsFile::open(path);
  std::vector<std::string> order;
  for (const auto& e : f->entries()) order.push_back(e.name);
  CHECK(order == std::vector<std::string>{"m.i64", "scalar", "empty", "z.f32", "a.bf16", "f8", "u8"});
  CHECK(f->metadata() == std::map<std::string, std::string>{{"format", "pt"}, {"step", "12"}});
  for (const auto& t : ts) {
    auto v = f->at(t.name);
    CHECK(rhine::test::hex(v.data, v.nbytes()) == rhine::test::hex(t.data, t.nbytes));
    CHECK(v.shape() == t.shape);
    CHECK(v.dtype() == t.dtype);
    // Every tensor is aligned to its element size inside the file.
    CHECK(static_cast<std::size_t>(v.data - f->mapping()) % std::max<std::size_t>(1, rhine::dtype_bits(t.dtype) / 8) == 0);
  }

  if (!rhine::test::have_python()) RHINE_SKIP_TEST(rhine::test::kNoPythonReason);
  auto py = rhine::test::python_read_safetensors(path);
  CHECK(py["problems"].empty());
  INFO(py["problems"].dump());
  CHECK(py["metadata"]["step"] == "12");
  for (const auto& t : ts) {
    INFO(t.name);
    const auto& e = py["tensors"][t.name];
    CHECK(e["dtype"] == std::string(rhine::dtype_name(t.dtype)));
    CHECK(e["shape"].get<std::vector<std::int64_t>>() == t.shape);
    CHECK(e["hex"] == rhine::test::hex(t.data, t.nbytes));
  }
  fs::remove_all(dir);
}

TEST_CASE("the writer rejects bad input before touching the disk", "[safetensors]") {
  std::vector<float> x(4);
  using T = rhine::SafetensorsTensor;
  auto F32 = rhine::SafetensorsDtype::F32;
  CHECK_THROWS_WITH(rhine::serialize_safetensors({T{"a", F32, {4}, x.data(), 16}, T{"a", F32, {4}, x.data(), 16}}),
                    Contains("duplicate tensor name") && Contains("\"a\""));
  CHECK_THROWS_WITH(rhine::serialize_safetensors({T{"a", F32, {3}, x.data(), 16}}),
                    Contains("byte size does not match shape [3]") && Contains("\"a\""));
  CHECK_THROWS_WITH(rhine::serialize_safetensors({T{"", F32, {4}, x.data(), 16}}), Contains("empty name"));
  CHECK_THROWS_WITH(rhine::serialize_safetensors({T{"__metadata__", F32, {4}, x.data(), 16}}),
                    Contains("reserved"));
  CHECK_THROWS_WITH(rhine::serialize_safetensors({T{"a", F32, {-4}, x.data(), 16}}),
                    Contains("negative dimension"));
  CHECK_THROWS_WITH(rhine::serialize_safetensors({T{"a", rhine::SafetensorsDtype::F4, {3}, x.data(), 1}}),
                    Contains("byte size does not match"));
  CHECK_THROWS_WITH(rhine::write_safetensors("/nonexistent_dir_rhine/x.safetensors", {T{"a", F32, {4}, x.data(), 16}}),
                    Contains("cannot create temporary file"));
}

TEST_CASE("sharded checkpoints round-trip through the index", "[safetensors]") {
  auto dir = rhine::test::temp_dir("st_shards");
  std::vector<std::vector<float>> data;
  std::vector<rhine::SafetensorsTensor> ts;
  for (int i = 0; i < 7; ++i) {
    data.emplace_back(10 + i, static_cast<float>(i));
    ts.push_back({"layer." + std::to_string(i) + ".w", rhine::SafetensorsDtype::F32,
                  {static_cast<std::int64_t>(10 + i)}, data.back().data(), 4 * (10u + i)});
  }
  rhine::SafetensorsWriteOptions o;
  o.max_shard_bytes = 80;  // 40..64 bytes per tensor: no two fit in one shard
  auto files = rhine::write_safetensors_checkpoint(dir.string(), ts, o);
  REQUIRE(files.size() == 8);
  CHECK(files[0] == "model-00001-of-00007.safetensors");
  CHECK(files.back() == "model.safetensors.index.json");
  auto index = rhine::read_json_file((dir / "model.safetensors.index.json").string(), "test");
  CHECK(index["metadata"]["total_size"] == 4 * (10 + 11 + 12 + 13 + 14 + 15 + 16));
  CHECK(index["weight_map"]["layer.6.w"] == "model-00007-of-00007.safetensors");
  auto c = rhine::SafetensorsCheckpoint::open(dir.string());
  CHECK(c.size() == 7);
  CHECK(c.files().size() == 7);
  for (const auto& t : ts) CHECK(rhine::test::hex(c.at(t.name).data, c.at(t.name).nbytes()) == rhine::test::hex(t.data, t.nbytes));
  if (rhine::test::have_python()) {
    for (std::size_t k = 0; k + 1 < files.size(); ++k)
      CHECK(rhine::test::python_read_safetensors((dir / files[k]).string())["problems"].empty());
  } else {
    RHINE_SKIP_PART(rhine::test::kNoPythonReason);
  }

  // Unsharded: model.safetensors, and a stale index disappears.
  o.max_shard_bytes = 0;
  files = rhine::write_safetensors_checkpoint(dir.string(), ts, o);
  CHECK(files == std::vector<std::string>{"model.safetensors"});
  CHECK_FALSE(fs::exists(dir / "model.safetensors.index.json"));
  CHECK(rhine::SafetensorsCheckpoint::open(dir.string()).files().size() == 1);
  fs::remove_all(dir);
}

TEST_CASE("bad shard indexes are rejected naming index, shard and tensor", "[safetensors]") {
  auto dir = rhine::test::temp_dir("st_badindex");
  std::vector<float> x{1, 2};
  rhine::write_safetensors((dir / "a.safetensors").string(),
                           {{"w", rhine::SafetensorsDtype::F32, {2}, x.data(), 8},
                            {"v", rhine::SafetensorsDtype::F32, {2}, x.data(), 8}});
  const std::string index = (dir / "model.safetensors.index.json").string();
  auto write_index = [&](const rhine::Json& j) { rhine::write_json_file(index, j); };

  write_index({{"weight_map", {{"w", "a.safetensors"}, {"v", "a.safetensors"}, {"u", "a.safetensors"}}}});
  CHECK_THROWS_WITH(rhine::SafetensorsCheckpoint::open(dir.string()),
                    Contains("maps a tensor to a shard that does not hold it") && Contains("\"u\"") &&
                        Contains("a.safetensors") && Contains(index));
  write_index({{"weight_map", {{"w", "a.safetensors"}}}});
  CHECK_THROWS_WITH(rhine::SafetensorsCheckpoint::open(dir.string()),
                    Contains("holds a tensor the index does not list") && Contains("\"v\""));
  write_index({{"weight_map", {{"w", "../a.safetensors"}}}});
  CHECK_THROWS_WITH(rhine::SafetensorsCheckpoint::open(dir.string()), Contains("relative path inside"));
  write_index({{"weight_map", {{"w", 3}}}});
  CHECK_THROWS_WITH(rhine::SafetensorsCheckpoint::open(dir.string()), Contains("must be shard file names"));
  write_index({{"metadata", {}}});
  CHECK_THROWS_WITH(rhine::SafetensorsCheckpoint::open(dir.string()), Contains("no \"weight_map\""));
  write_index({{"weight_map", {{"w", "missing.safetensors"}}}});
  CHECK_THROWS_WITH(rhine::SafetensorsCheckpoint::open(dir.string()),
                    Contains("cannot open file") && Contains("missing.safetensors"));
  fs::remove(index);
  CHECK_THROWS_WITH(rhine::SafetensorsCheckpoint::open(dir.string()), Contains("holds neither"));
  fs::remove_all(dir);
}

TEST_CASE("malformed files are each rejected with their own message", "[safetensors]") {
  struct Case {
    const char* label;
    std::string bytes;
    std::vector<std::string> expect;  // substrings of the message
  };
  const std::string ok_entry = R"("t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  std::vector<Case> cases = {
      {"too_short", std::string("abc"), {"too short for the 8-byte header length"}},
      {"absurd_header", u64le(1ULL << 40) + "{}", {"header length is absurd", "1099511627776"}},
      {"header_past_end", u64le(100) + "{\"a\":1}", {"header length runs past the end of the file"}},
      {"no_brace", make_file("[1]", 0), {"header must start with '{'"}},
      {"bad_json", make_file("{\"t\":{\"dtype\":", 0), {"invalid JSON header"}},
      {"not_utf8", make_file("{\"\xff\":{}}", 0), {"invalid JSON header"}},
      {"duplicate", make_file("{" + ok_entry + "," + ok_entry + "}", 16), {"duplicate key", "\"t\""}},
      {"duplicate_field", make_file(R"({"t":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8),
       {"duplicate key", "\"dtype\""}},
      {"unknown_dtype", make_file(R"({"t":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}})", 8),
       {"unknown dtype", "tensor \"t\"", "\"F33\"", "known dtypes"}},
      {"dtype_not_string", make_file(R"({"t":{"dtype":32,"shape":[2],"data_offsets":[0,8]}})", 8),
       {"dtype must be a string", "tensor \"t\""}},
      {"size_mismatch", make_file(R"({"t":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}})", 20),
       {"shape [2, 3] of F32 needs 24 bytes", "tensor \"t\"", "got 20"}},
      {"past_end", make_file(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 8),
       {"data_offsets run past the end", "tensor \"t\""}},
      {"begin_after_end", make_file(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8),
       {"data_offsets begin > end", "tensor \"t\""}},
      {"overlap", make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                            R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12),
       {"overlaps tensor \"a\"", "tensor \"b\""}},
      {"hole", make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                         R"("b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})", 20),
       {"hole in the byte buffer", "tensor \"b\"", "[8, 12)"}},
      {"hole_at_start", make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12),
       {"hole in the byte buffer", "tensor \"a\""}},
      {"trailing_bytes", make_file("{" + ok_entry + "}", 9), {"belong to no tensor", "[8, 9]"}},
      {"metadata_not_string", make_file(R"({"__metadata__":{"format":"pt","step":3}})", 0),
       {"__metadata__ values must be strings", "key \"step\""}},
      {"metadata_not_object", make_file(R"({"__metadata__":"pt"})", 0), {"__metadata__ must be an object"}},
      {"negative_dim", make_file(R"({"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8),
       {"\"shape\" must hold non-negative integers", "tensor \"t\""}},
      {"float_dim", make_file(R"({"t":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", 8),
       {"\"shape\" must hold non-negative integers"}},
      {"shape_overflow", make_file(R"({"t":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,8]}})", 8),
       {"overflows 64 bits", "tensor \"t\""}},
      {"offsets_arity", make_file(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,4,8]}})", 8),
       {"data_offsets must be [begin, end]", "tensor \"t\""}},
      {"unknown_field", make_file(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}})", 8),
       {"unknown field in tensor entry", "\"x\""}},
      {"missing_field", make_file(R"({"t":{"dtype":"F32","data_offsets":[0,8]}})", 8),
       {"tensor entry lacks \"shape\"", "tensor \"t\""}},
      {"entry_not_object", make_file(R"({"t":[1,2]})", 0), {"tensor entry must be an object", "tensor \"t\""}},
      {"sub_byte", make_file(R"({"t":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}})", 2),
       {"not a whole number of bytes", "tensor \"t\""}},
      {"too_deep", make_file(R"({"t":{"dtype":"F32","shape":[[2]],"data_offsets":[0,8]}})", 8),
       {"nests deeper than a safetensors header can"}},
      {"top_level_array_after_brace", make_file("{}  x", 0), {"invalid JSON header"}},
  };
  auto dir = rhine::test::temp_dir("st_malformed");
  const char* seed_dir = std::getenv("RHINE_SAFETENSORS_SEED_DIR");  // to refresh the fuzz seeds
  for (const auto& c : cases) {
    INFO(c.label);
    const std::string path = (dir / (std::string(c.label) + ".safetensors")).string();
    std::ofstream(path, std::ios::binary) << c.bytes;
    if (seed_dir) std::ofstream(fs::path(seed_dir) / c.label, std::ios::binary) << c.bytes;
    try {
      rhine::SafetensorsFile::open(path);
      FAIL("accepted a malformed file");
    } catch (const rhine::Error& e) {
      const std::string msg = e.what();
      CHECK_THAT(msg, Contains("[safetensors] "));
      CHECK_THAT(msg, Contains(path));
      for (const auto& s : c.expect) CHECK_THAT(msg, Contains(s));
    }
    // The in-memory parser says the same.
    CHECK_THROWS_AS(rhine::parse_safetensors(c.bytes, c.label), rhine::Error);
  }
  // Valid corner cases: empty header object, empty and scalar tensors, spaces as padding.
  CHECK(rhine::parse_safetensors(make_file("{}", 0), "x").entries.empty());
  CHECK(rhine::parse_safetensors(make_file("{}      ", 0), "x").entries.empty());
  auto h = rhine::parse_safetensors(
      make_file(R"({"e":{"dtype":"F32","shape":[0,3],"data_offsets":[0,0]},"s":{"dtype":"I64","shape":[],"data_offsets":[0,8]}})", 8),
      "x");
  REQUIRE(h.entries.size() == 2);
  CHECK(h.entries[0].name == "e");
  CHECK(h.entries[1].numel() == 1);
  rhine::SafetensorsReadOptions small;
  small.max_header_bytes = 4;
  CHECK_THROWS_WITH(rhine::parse_safetensors(make_file("{}      ", 0), "x", small), Contains("header length is absurd"));
  fs::remove_all(dir);
}
