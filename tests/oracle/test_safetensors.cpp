// The safetensors Python library as the oracle of Rhine's safetensors files
// (tests/oracle/st_files.py), both ways, for every dtype both sides have:
//   - a file written by safetensors.torch.save_file (F64 F32 F16 BF16 F8_E4M3 F8_E5M2 I64 I32
//     I16 I8 U8 U16 U32 BOOL, a scalar, an empty tensor, metadata) loads in Rhine with the
//     library's values; on LibTorch < 2.3 float8 is decoded to float32 and U16/U32 are widened
//     (1.13 has no such types);
//   - a file Rhine writes loads with safetensors.torch.load_file with Rhine's dtypes, shapes,
//     values and metadata (float8 and U16/U32 only where this LibTorch has them).
// Values are compared exactly, widened to float64 / int64 on both sides.
#include "torch_test.h"

#include <string>

#include "oracle/oracle_util.h"
#include "rhine/core/json.h"
#include "rhine/io/safetensors.h"
#include "rhine/torch/compat.h"
#include "test_util.h"

namespace {

at::Tensor widen(const at::Tensor& t) {
  return at::isFloatingType(t.scalar_type()) ? t.to(at::kDouble) : t.to(at::kLong);
}

}  // namespace

TEST_CASE("safetensors oracle: files of the safetensors library load in Rhine", "[oracle][slow]") {
  static const std::string why = oracle::missing("st_files.py", "safetensors");
  if (!why.empty()) RHINE_SKIP_TEST(why);
  rhine::test::TempDir tmp("st_oracle_in");
  oracle::run("st_files.py", "make " + tmp.file("py.safetensors") + " " + tmp.file("values.safetensors"));
  rhine::TensorLoadOptions o;
#if RHINE_TORCH_VERSION_AT_LEAST(2, 3)
  o.float8 = rhine::Float8Mode::native;
#else
  o.float8 = rhine::Float8Mode::dequantize;
  o.dequantize_to = at::kFloat;
  o.widen_unsigned = true;
#endif
  const auto got = rhine::load_safetensors(tmp.file("py.safetensors"), o);
  const auto want = rhine::load_safetensors(tmp.file("values.safetensors"));
  REQUIRE(got.size() == want.size());
  REQUIRE(got.size() == 16);
  for (const auto& [name, w] : want) {
    INFO(name);
    REQUIRE(got.count(name) == 1);
    const at::Tensor& g = got.at(name);
    CHECK(g.sizes() == w.sizes());
    CHECK(at::equal(widen(g), w));
  }
  CHECK(got.at("bf16").scalar_type() == at::kBFloat16);
  CHECK(got.at("bool").scalar_type() == at::kBool);
  CHECK(got.at("scalar").dim() == 0);
#if RHINE_TORCH_VERSION_AT_LEAST(2, 3)
  CHECK(got.at("f8_e4m3").scalar_type() == at::kFloat8_e4m3fn);
  CHECK(got.at("f8_e5m2").scalar_type() == at::kFloat8_e5m2);
  CHECK(got.at("u16").scalar_type() == at::kUInt16);
  CHECK(got.at("u32").scalar_type() == at::kUInt32);
#endif
  CHECK(rhine::SafetensorsFile::open(tmp.file("py.safetensors"))->metadata().at("origin") == "python");
}

TEST_CASE("safetensors oracle: files Rhine writes load with the safetensors library", "[oracle][slow]") {
  static const std::string why = oracle::missing("st_files.py", "safetensors");
  if (!why.empty()) RHINE_SKIP_TEST(why);
  rhine::test::TempDir tmp("st_oracle_out");
  at::manual_seed(9);
  const at::Tensor x = at::randn({4, 3}, at::kDouble) * 4;
  const at::Tensor n = at::randint(-100, 100, {4, 3}, at::kLong);
  std::map<std::string, at::Tensor> tensors = {
      {"f64", x}, {"f32", x.to(at::kFloat)}, {"f16", x.to(at::kHalf)}, {"bf16", x.to(at::kBFloat16)},
      {"i64", n}, {"i32", n.to(at::kInt)}, {"i16", n.to(at::kShort)}, {"i8", n.to(at::kChar)},
      {"u8", n.abs().to(at::kByte)}, {"bool", x > 0},
      {"scalar", at::scalar_tensor(2.5, at::kFloat)}, {"empty", at::zeros({0, 3}, at::kBFloat16)},
      {"strided", x.t()},  // non-contiguous: written as its values
  };
  std::map<std::string, std::string> dtype = {
      {"f64", "F64"}, {"f32", "F32"}, {"f16", "F16"}, {"bf16", "BF16"}, {"i64", "I64"}, {"i32", "I32"},
      {"i16", "I16"}, {"i8", "I8"}, {"u8", "U8"}, {"bool", "BOOL"}, {"scalar", "F32"}, {"empty", "BF16"},
      {"strided", "F64"}};
#if RHINE_TORCH_VERSION_AT_LEAST(2, 3)
  tensors["f8_e4m3"] = x.to(at::kFloat8_e4m3fn);
  tensors["f8_e5m2"] = x.to(at::kFloat8_e5m2);
  tensors["u16"] = n.abs().to(at::kUInt16);
  tensors["u32"] = n.abs().to(at::kUInt32);
  dtype.insert({{"f8_e4m3", "F8_E4M3"}, {"f8_e5m2", "F8_E5M2"}, {"u16", "U16"}, {"u32", "U32"}});
#endif
  rhine::SafetensorsWriteOptions wo;
  wo.metadata = {{"origin", "rhine"}};
  rhine::save_safetensors(tmp.file("rhine.safetensors"), tensors, wo);
  const std::string cmd = oracle::python() + " " + oracle::script("st_files.py") + " read " +
                          tmp.file("rhine.safetensors") + " " + tmp.file("values.safetensors") + " 2>&1";
  const auto [status, out] = rhine::test::run_command(cmd);
  INFO(cmd << "\n" << out);
  REQUIRE(status == 0);
  const auto report = rhine::Json::parse(out);
  CHECK(report.at("metadata").at("origin") == "rhine");
  CHECK(report.at("metadata").at("format") == "pt");
  const auto values = rhine::load_safetensors(tmp.file("values.safetensors"));
  REQUIRE(report.at("tensors").size() == tensors.size());
  for (const auto& [name, t] : tensors) {
    INFO(name);
    const auto& r = report.at("tensors").at(name);
    CHECK(r.at("dtype").get<std::string>() == dtype.at(name));
    CHECK(r.at("shape").get<std::vector<std::int64_t>>() == t.sizes().vec());
    CHECK(at::equal(values.at(name), widen(t)));
  }
}
