// Safetensors <-> at::Tensor: values from the independent Python fixtures
// (tests/fixtures/safetensors/make_fixtures.py), zero-copy that really wraps
// the mapping, float8 decoding against closed forms and the Python decoder,
// DeepSeek block dequantisation, and saved files re-read by the independent
// Python reader.
#include "torch_test.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>

#include "rhine/core/error.h"
#include "rhine/core/file.h"
#include "rhine/core/json.h"
#include "rhine/io/safetensors.h"
#include "rhine/torch/compat.h"
#include "formats/python_reader.h"
#include "test_util.h"

namespace fs = std::filesystem;
using Catch::Matchers::Contains;

namespace {

const fs::path kFixtures = fs::path(RHINE_SOURCE_DIR) / "tests" / "fixtures" / "safetensors";

// The tensor the fixture JSON describes, built from its decimal values.
at::Tensor expected_tensor(const rhine::Json& e, at::ScalarType dtype) {
  auto shape = e["shape"].get<std::vector<std::int64_t>>();
  const auto& vals = e["values"];
  at::Tensor t;
  if (!vals.empty() && vals[0].is_number_float()) {
    t = at::tensor(vals.get<std::vector<double>>(), at::kDouble);
  } else {
    t = at::tensor(vals.get<std::vector<std::int64_t>>(), at::kLong);
  }
  return t.reshape(shape).to(dtype);
}

bool inside(const at::Tensor& t, const rhine::SafetensorsFile& f) {
  const auto* p = static_cast<const std::byte*>(t.data_ptr());
  return p >= f.mapping() && p < f.mapping() + f.mapping_size();
}

float f8(rhine::SafetensorsDtype d, unsigned b) {
  std::byte x{static_cast<unsigned char>(b)};
  return rhine::decode_float8(&x, {}, d).item<float>();
}

}  // namespace

TEST_CASE("fixture tensors load with the values the Python writer stored", "[io][safetensors]") {
  rhine::TensorLoadOptions o;
  o.widen_unsigned = true;
  for (const char* stem : {"dtypes", "unaligned"}) {
    INFO(stem);
    auto expected = rhine::read_json_file((kFixtures / (std::string(stem) + ".expected.json")).string(), "test");
    auto m = rhine::load_safetensors((kFixtures / (std::string(stem) + ".safetensors")).string(), o);
    REQUIRE(m.size() == expected["tensors"].size());
    for (const auto& [name, e] : expected["tensors"].items()) {
      INFO(name);
      const at::Tensor& t = m.at(name);
      at::ScalarType want = e["dtype"] == "U16"   ? at::kInt
                            : e["dtype"] == "U32" ? at::kLong
                                                  : *rhine::to_scalar_type(*rhine::dtype_from_name(e["dtype"].get<std::string>()));
      CHECK(t.scalar_type() == want);
      CHECK(t.sizes().vec() == e["shape"].get<std::vector<std::int64_t>>());
      CHECK(at::equal(t, expected_tensor(e, want)));
      if (e["dtype"] != "U16" && e["dtype"] != "U32")
        CHECK(rhine::test::hex(t.data_ptr(), t.numel() * t.element_size()) == e["hex"].get<std::string>());
    }
  }
  auto expected = rhine::read_json_file((kFixtures / "sharded.expected.json").string(), "test");
  auto m = rhine::load_safetensors((kFixtures / "sharded").string());
  REQUIRE(m.size() == 4);
  for (const auto& [name, e] : expected["tensors"].items())
    CHECK(at::equal(m.at(name), expected_tensor(e, m.at(name).scalar_type())));
}

TEST_CASE("aligned tensors wrap the mapping and keep the file alive", "[io][safetensors]") {
  const std::string path = (kFixtures / "dtypes.safetensors").string();
  auto file = rhine::SafetensorsFile::open(path);
  std::weak_ptr<const rhine::SafetensorsFile> weak = file;
  at::Tensor t = rhine::to_tensor(file->at("f32.matrix"), file);
  at::Tensor b = rhine::to_tensor(file->at("bf16"), file);
  CHECK(inside(t, *file));
  CHECK(inside(b, *file));
  CHECK(t.data_ptr() == static_cast<const void*>(file->at("f32.matrix").data));
  const at::Tensor before = t.clone();
  file.reset();
  CHECK_FALSE(weak.expired());  // the tensors hold the mapping
  CHECK(at::equal(t, before));
  // Copy-on-write mapping: in-place writes are private, the file is untouched.
  t.mul_(2);
  CHECK(at::equal(t, before * 2));
  auto again = rhine::SafetensorsFile::open(path);
  CHECK(at::equal(rhine::to_tensor(again->at("f32.matrix"), again), before));
  t = at::Tensor();
  b = at::Tensor();
  CHECK(weak.expired());

  // copy = true, and misaligned data (unpadded header), give tensors of their own.
  file = rhine::SafetensorsFile::open(path);
  rhine::TensorLoadOptions copy;
  copy.copy = true;
  CHECK_FALSE(inside(rhine::to_tensor(file->at("f32.matrix"), file, copy), *file));
  auto un = rhine::SafetensorsFile::open((kFixtures / "unaligned.safetensors").string());
  CHECK_FALSE(inside(rhine::to_tensor(un->at("a"), un), *un));
  CHECK(inside(rhine::to_tensor(file->at("u8"), file), *file));  // 1-byte types are always aligned
}

TEST_CASE("types this LibTorch lacks fail with a clear error unless asked for", "[io][safetensors]") {
  const std::string path = (kFixtures / "dtypes.safetensors").string();
#if !RHINE_TORCH_VERSION_AT_LEAST(2, 3)
  CHECK_THROWS_WITH(rhine::load_safetensors(path),
                    Contains("[safetensors] no LibTorch dtype for tensor in ") && Contains("dtypes.safetensors") &&
                        Contains("tensor \"u16\"") && Contains("widen_unsigned"));
#endif
  const std::string fp8 = (kFixtures / "fp8.safetensors").string();
  CHECK_THROWS_WITH(rhine::load_safetensors(fp8),
                    Contains("float8 tensor in ") && Contains("fp8.safetensors") && Contains("tensor \"all.f8_e4m3\"") &&
                        Contains("Float8Mode::dequantize"));
#if !RHINE_TORCH_VERSION_AT_LEAST(2, 1)
  rhine::TensorLoadOptions native;
  native.float8 = rhine::Float8Mode::native;
  CHECK_THROWS_WITH(rhine::load_safetensors(fp8, native), Contains("no native type for float8"));
#endif
}

TEST_CASE("float8 decoding matches the format definitions", "[io][safetensors]") {
  using D = rhine::SafetensorsDtype;
  // Closed forms from the OCP FP8 spec: largest normal, smallest subnormal, one, NaN/inf.
  CHECK(f8(D::F8_E4M3, 0x7e) == 448.0f);
  CHECK(f8(D::F8_E4M3, 0xfe) == -448.0f);
  CHECK(f8(D::F8_E4M3, 0x01) == std::ldexp(1.0f, -9));
  CHECK(f8(D::F8_E4M3, 0x38) == 1.0f);
  CHECK(std::isnan(f8(D::F8_E4M3, 0x7f)));
  CHECK(std::isnan(f8(D::F8_E4M3, 0xff)));
  CHECK(f8(D::F8_E4M3, 0x78) == 256.0f);  // exponent 15 is a normal number in E4M3fn
  CHECK(f8(D::F8_E5M2, 0x7b) == 57344.0f);
  CHECK(f8(D::F8_E5M2, 0x01) == std::ldexp(1.0f, -16));
  CHECK(f8(D::F8_E5M2, 0x3c) == 1.0f);
  CHECK(f8(D::F8_E5M2, 0x7c) == std::numeric_limits<float>::infinity());
  CHECK(f8(D::F8_E5M2, 0xfc) == -std::numeric_limits<float>::infinity());
  CHECK(std::isnan(f8(D::F8_E5M2, 0x7d)));
  CHECK(f8(D::F8_E8M0, 127) == 1.0f);
  CHECK(f8(D::F8_E8M0, 0) == std::ldexp(1.0f, -127));
  CHECK(std::isnan(f8(D::F8_E8M0, 255)));
  CHECK(std::isnan(f8(D::F8_E4M3FNUZ, 0x80)));
  CHECK(f8(D::F8_E4M3FNUZ, 0x7f) == 240.0f);
  CHECK(f8(D::F8_E5M2FNUZ, 0x7f) == 57344.0f);

  // All 256 patterns of every float8 type against the Python decoder.
  auto expected = rhine::read_json_file((kFixtures / "fp8.expected.json").string(), "test");
  rhine::TensorLoadOptions o;
  o.float8 = rhine::Float8Mode::dequantize;
  o.dequantize_to = at::kFloat;
  auto m = rhine::load_safetensors((kFixtures / "fp8.safetensors").string(), o);
  for (const char* name : {"all.f8_e4m3", "all.f8_e5m2", "all.f8_e8m0", "all.f8_e4m3fnuz", "all.f8_e5m2fnuz", "plain.e5m2"}) {
    INFO(name);
    const auto& vals = expected["tensors"][name]["values"];
    at::Tensor t = m.at(name).flatten();
    REQUIRE(t.numel() == static_cast<std::int64_t>(vals.size()));
    for (std::size_t i = 0; i < vals.size(); ++i) {
      INFO("pattern " << i);
      const float got = t[static_cast<std::int64_t>(i)].item<float>();
      if (vals[i].is_string()) {
        const std::string s = vals[i];
        if (s == "nan") CHECK(std::isnan(got));
        if (s == "inf") CHECK(got == std::numeric_limits<float>::infinity());
        if (s == "-inf") CHECK(got == -std::numeric_limits<float>::infinity());
      } else {
        CHECK(got == static_cast<float>(vals[i].get<double>()));
      }
    }
  }
}

TEST_CASE("DeepSeek block-scaled FP8 weights dequantise like the reference", "[io][safetensors]") {
  const std::string raw = rhine::read_file((kFixtures / "fp8_w_dequant.f32").string(), "test");
  at::Tensor want = at::empty({130, 129}, at::kFloat);
  REQUIRE(raw.size() == 130 * 129 * 4);
  std::memcpy(want.data_ptr(), raw.data(), raw.size());
  rhine::TensorLoadOptions o;
  o.float8 = rhine::Float8Mode::dequantize;
  o.dequantize_to = at::kFloat;
  auto m = rhine::load_safetensors((kFixtures / "fp8.safetensors").string(), o);
  CHECK(m.count("layer.weight_scale_inv") == 0);  // consumed, as in fp8_cast_bf16.py
  CHECK(at::equal(m.at("layer.weight"), want));  // one fp32 multiply each: bit-exact
  o.dequantize_to = at::kBFloat16;
  auto b = rhine::load_safetensors((kFixtures / "fp8.safetensors").string(), o);
  CHECK(b.at("layer.weight").scalar_type() == at::kBFloat16);
  CHECK(at::equal(b.at("layer.weight"), want.to(at::kBFloat16)));

  // raw_bytes: the F8 bytes as uint8, scales untouched.
  o.float8 = rhine::Float8Mode::raw_bytes;
  auto r = rhine::load_safetensors((kFixtures / "fp8.safetensors").string(), o);
  CHECK(r.at("all.f8_e4m3").scalar_type() == at::kByte);
  CHECK(at::equal(r.at("all.f8_e4m3").flatten(), at::arange(256, at::kLong).to(at::kByte)));
  CHECK(r.count("layer.weight_scale_inv") == 1);

  CHECK_THROWS_WITH(rhine::dequantize_fp8_blocks(at::zeros({130, 129}), at::ones({1, 2}), 128, at::kFloat),
                    Contains("scale_inv shape does not match") && Contains("[2, 2]"));
}

TEST_CASE("saved tensors are re-read exactly by Rhine and the independent reader", "[io][safetensors]") {
  auto dir = rhine::test::temp_dir("io_save");
  at::manual_seed(7);
  std::map<std::string, at::Tensor> m{
      {"w.t", at::randn({5, 3}).t()},  // not contiguous
      {"w.bf16", at::randn({4, 4}).to(at::kBFloat16)},
      {"w.half", at::randn({3}).to(at::kHalf)},
      {"w.f64", at::randn({2, 2}, at::kDouble)},
      {"ids", at::randint(-100, 100, {6}, at::kLong)},
      {"i32", at::randint(-100, 100, {2, 3}, at::kInt)},
      {"i16", at::randint(-100, 100, {3}, at::kShort)},
      {"i8", at::randint(-100, 100, {3}, at::kChar)},
      {"u8", at::randint(0, 255, {3}, at::kByte)},
      {"mask", at::randn({7}) > 0},
      {"grad", at::randn({3}).requires_grad_()},
      {"scalar", at::scalar_tensor(1.5)},
      {"empty", at::empty({0, 3})},
      {"c64", at::randn({2}, at::kComplexFloat)},
  };
  const std::string path = (dir / "m.safetensors").string();
  rhine::save_safetensors(path, m);
  auto back = rhine::load_safetensors(path);
  REQUIRE(back.size() == m.size());
  for (const auto& [name, t] : m) {
    INFO(name);
    CHECK(back.at(name).scalar_type() == t.scalar_type());
    CHECK(at::equal(back.at(name), t.detach()));
  }
  if (rhine::test::have_python()) {
    auto py = rhine::test::python_read_safetensors(path);
    CHECK(py["problems"].empty());
    for (const auto& [name, t] : m) {
      INFO(name);
      at::Tensor c = t.detach().contiguous();
      CHECK(py["tensors"][name]["hex"] == rhine::test::hex(c.data_ptr(), c.numel() * c.element_size()));
      CHECK(py["tensors"][name]["dtype"] == std::string(rhine::dtype_name(rhine::to_safetensors_dtype(t.scalar_type()))));
    }
  } else {
    RHINE_SKIP_PART(rhine::test::kNoPythonReason);
  }

  rhine::SafetensorsWriteOptions o;
  o.max_shard_bytes = 64;
  auto files = rhine::save_safetensors_checkpoint((dir / "ckpt").string(), m, o);
  CHECK(files.size() > 2);
  auto ck = rhine::load_safetensors((dir / "ckpt").string());
  REQUIRE(ck.size() == m.size());
  for (const auto& [name, t] : m) CHECK(at::equal(ck.at(name), t.detach()));

  CHECK_THROWS_WITH(rhine::save_safetensors(path, {{"x", at::zeros({2}, at::kComplexDouble)}}),
                    Contains("cannot save tensor \"x\"") && Contains("cannot store this dtype"));
  fs::remove_all(dir);
}
