// GGUF writer, torch-free: the element encodings against independent
// references (the compiler's _Float16 conversion, hand-computed Q8_0 blocks),
// the byte layout of a small file decoded here field by field, and the
// writer's refusals. The files of whole models are read back by llama.cpp's
// own `gguf` package in tests/io/gguf_test.sh.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "rhine/core/error.h"
#include "rhine/core/file.h"
#include "rhine/formats/gguf.h"
#include "test_util.h"

using Catch::Matchers::Contains;

namespace {

template <typename T>
T get(const std::string& s, std::size_t& at) {
  T v;
  std::memcpy(&v, s.data() + at, sizeof(T));
  at += sizeof(T);
  return v;
}
std::string get_string(const std::string& s, std::size_t& at) {
  const auto n = get<std::uint64_t>(s, at);
  std::string r = s.substr(at, n);
  at += n;
  return r;
}

std::uint16_t f16_reference(float x) {
  const _Float16 h = static_cast<_Float16>(x);  // GCC: IEEE round to nearest even
  std::uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}

}  // namespace

TEST_CASE("gguf: float_to_half_bits equals the compiler's _Float16 conversion", "[formats][gguf]") {
  std::vector<float> xs = {0.0f, -0.0f, 1.0f, -2.5f, 65504.0f, 65519.99f, 65520.0f, 1e6f, -1e6f,
                           6.1035156e-05f, 5.9604645e-08f, 2.9802322e-08f, 2.98023259e-08f, 1e-9f,
                           std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                           1.0009765625f + 0.00048828125f /* a tie: rounds to even */};
  std::mt19937 rng(7);
  std::uniform_int_distribution<std::uint32_t> bits;
  for (int i = 0; i < 200000; ++i) {
    std::uint32_t u = bits(rng);
    float f;
    std::memcpy(&f, &u, 4);
    if (!std::isnan(f)) xs.push_back(f);
  }
  for (int e = -30; e <= 17; ++e)  // every binade of half, subnormals included, and exact ties
    for (int m = 0; m < 64; ++m) xs.push_back(std::ldexp(1.0f + m / 64.0f + 1.0f / 4096.0f, e));
  std::size_t bad = 0;
  for (float x : xs)
    if (rhine::float_to_half_bits(x) != f16_reference(x) && bad++ < 5)
      FAIL_CHECK("x = " << x << ": " << rhine::float_to_half_bits(x) << " vs " << f16_reference(x));
  CHECK(bad == 0);
  const std::uint16_t nan = rhine::float_to_half_bits(std::numeric_limits<float>::quiet_NaN());
  CHECK((nan & 0x7c00) == 0x7c00);
  CHECK((nan & 0x03ff) != 0);
}

TEST_CASE("gguf: q8_0 blocks hold the f16 scale max|x|/127 and round(x/d) half away from zero",
          "[formats][gguf]") {
  std::vector<float> x(64);
  for (int i = 0; i < 32; ++i) x[i] = (i - 16) * 0.25f;  // max |x| = 4
  for (int i = 32; i < 64; ++i) x[i] = 0.0f;        // an all-zero block: d = 0, qs = 0
  const std::string b = rhine::encode_q8_0(x.data(), 64);
  REQUIRE(b.size() == 2 * 34);
  std::size_t at = 0;
  const float d = 4.0f / 127.0f;
  CHECK(get<std::uint16_t>(b, at) == f16_reference(d));
  for (int i = 0; i < 32; ++i) {
    const auto q = get<std::int8_t>(b, at);
    CHECK(q == static_cast<std::int8_t>(std::round(x[i] * (1.0f / d))));
  }
  CHECK(get<std::uint16_t>(b, at) == 0);
  for (int i = 0; i < 32; ++i) CHECK(get<std::int8_t>(b, at) == 0);
  // Half away from zero: 2.5 -> 3 and -2.5 -> -3 (a block scaled so that d = 1).
  std::vector<float> t(32, 0.0f);
  t[0] = 127.0f, t[1] = 2.5f, t[2] = -2.5f;
  const std::string tb = rhine::encode_q8_0(t.data(), 32);
  CHECK(static_cast<std::int8_t>(tb[2 + 1]) == 3);
  CHECK(static_cast<std::int8_t>(tb[2 + 2]) == -3);
  CHECK_THROWS_WITH(rhine::encode_q8_0(t.data(), 31), Contains("multiple of 32"));
}

TEST_CASE("gguf: bf16 rounds to nearest even and keeps NaN", "[formats][gguf]") {
  const std::vector<float> x = {1.0f, 1.00390625f /* tie below: to even 1.0 */,
                                1.01171875f /* tie: to even 1.015625 */, -3.0f,
                                std::numeric_limits<float>::quiet_NaN()};
  const std::string b = rhine::encode_bf16(x.data(), 5);
  std::size_t at = 0;
  CHECK(get<std::uint16_t>(b, at) == 0x3f80);
  CHECK(get<std::uint16_t>(b, at) == 0x3f80);
  CHECK(get<std::uint16_t>(b, at) == 0x3f82);
  CHECK(get<std::uint16_t>(b, at) == 0xc040);
  CHECK((get<std::uint16_t>(b, at) & 0x7fc0) == 0x7fc0);
}

TEST_CASE("gguf: the writer's layout (header, metadata, tensor infos, aligned data)", "[formats][gguf]") {
  rhine::test::TempDir dir("gguf_layout");
  std::filesystem::create_directories(dir.path);
  rhine::GgufWriter w;
  w.add("general.architecture", std::string("llama"));
  w.add("llama.block_count", std::uint32_t{2});
  w.add("tokenizer.ggml.tokens", std::vector<std::string>{"<s>", "a"});
  w.add("tokenizer.ggml.scores", std::vector<float>{0.0f, -1.5f});
  w.add("flag", true);
  const std::vector<float> v = {1, 2, 3};
  w.add_tensor({"norm.weight", {3}, rhine::GgmlType::F32,
                [&] { return std::string(reinterpret_cast<const char*>(v.data()), 12); }});
  std::vector<float> m(2 * 32, 0.5f);
  w.add_tensor({"w", {2, 32}, rhine::GgmlType::Q8_0, [&] { return rhine::encode_q8_0(m.data(), 64); }});
  const std::string path = (dir.path / "t.gguf").string();
  w.write(path);
  const std::string s = rhine::read_file(path, "test");
  std::size_t at = 0;
  CHECK(s.substr(0, 4) == "GGUF");
  at = 4;
  CHECK(get<std::uint32_t>(s, at) == 3);
  CHECK(get<std::uint64_t>(s, at) == 2);
  CHECK(get<std::uint64_t>(s, at) == 5);
  CHECK(get_string(s, at) == "general.architecture");
  CHECK(get<std::uint32_t>(s, at) == 8);
  CHECK(get_string(s, at) == "llama");
  CHECK(get_string(s, at) == "llama.block_count");
  CHECK(get<std::uint32_t>(s, at) == 4);
  CHECK(get<std::uint32_t>(s, at) == 2);
  CHECK(get_string(s, at) == "tokenizer.ggml.tokens");
  CHECK(get<std::uint32_t>(s, at) == 9);
  CHECK(get<std::uint32_t>(s, at) == 8);
  CHECK(get<std::uint64_t>(s, at) == 2);
  CHECK(get_string(s, at) == "<s>");
  CHECK(get_string(s, at) == "a");
  CHECK(get_string(s, at) == "tokenizer.ggml.scores");
  CHECK(get<std::uint32_t>(s, at) == 9);
  CHECK(get<std::uint32_t>(s, at) == 6);
  CHECK(get<std::uint64_t>(s, at) == 2);
  CHECK(get<float>(s, at) == 0.0f);
  CHECK(get<float>(s, at) == -1.5f);
  CHECK(get_string(s, at) == "flag");
  CHECK(get<std::uint32_t>(s, at) == 7);
  CHECK(get<std::uint8_t>(s, at) == 1);
  CHECK(get_string(s, at) == "norm.weight");
  CHECK(get<std::uint32_t>(s, at) == 1);
  CHECK(get<std::uint64_t>(s, at) == 3);
  CHECK(get<std::uint32_t>(s, at) == 0);
  CHECK(get<std::uint64_t>(s, at) == 0);
  CHECK(get_string(s, at) == "w");
  CHECK(get<std::uint32_t>(s, at) == 2);
  CHECK(get<std::uint64_t>(s, at) == 32);  // ne[0]: the row length
  CHECK(get<std::uint64_t>(s, at) == 2);
  CHECK(get<std::uint32_t>(s, at) == 8);
  CHECK(get<std::uint64_t>(s, at) == 32);  // 12 bytes, padded to the alignment
  const std::size_t data = (at + 31) / 32 * 32;
  CHECK(std::string(s.data() + at, data - at) == std::string(data - at, '\0'));
  float f[3];
  std::memcpy(f, s.data() + data, 12);
  CHECK((f[0] == 1 && f[1] == 2 && f[2] == 3));
  CHECK(s.substr(data + 32, 68) == rhine::encode_q8_0(m.data(), 64));
  CHECK(s.size() == data + 32 + 96);  // 68 bytes padded to 96
}

TEST_CASE("gguf: the writer refuses bad input and leaves no file behind", "[formats][gguf]") {
  rhine::test::TempDir dir("gguf_bad");
  std::filesystem::create_directories(dir.path);
  rhine::GgufWriter w;
  w.add("a", std::uint32_t{1});
  CHECK_THROWS_WITH(w.add("a", std::uint32_t{2}), Contains("added twice"));
  auto src = [] { return std::string(40, '\0'); };
  CHECK_THROWS_WITH(w.add_tensor({"q", {2, 20}, rhine::GgmlType::Q8_0, src}), Contains("block size of q8_0"));
  CHECK_THROWS_WITH(w.add_tensor({"x", {1, 1, 1, 1, 1}, rhine::GgmlType::F32, src}), Contains("1 to 4"));
  w.add_tensor({"t", {10}, rhine::GgmlType::F32, src});  // 40 bytes, as it should
  CHECK_THROWS_WITH(w.add_tensor({"t", {10}, rhine::GgmlType::F32, src}), Contains("added twice"));
  w.add_tensor({"short", {11}, rhine::GgmlType::F32, src});  // 40 bytes for 44
  const auto path = dir.path / "bad.gguf";
  CHECK_THROWS_WITH(w.write(path.string()), Contains("short") && Contains("wrong number of bytes"));
  CHECK(!std::filesystem::exists(path));
  CHECK(!std::filesystem::exists(path.string() + ".tmp"));
  CHECK(rhine::ggml_type_from_name("q8_0") == rhine::GgmlType::Q8_0);
  CHECK(!rhine::ggml_type_from_name("q4_0").has_value());
}
