#include "rhine/io/safetensors.h"

#include <ATen/ATen.h>

#include <array>
#include <cmath>
#include <cstring>
#include <limits>

#include "rhine/core/error.h"
#include "rhine/torch/compat.h"

namespace rhine {
namespace {

constexpr const char* kComponent = "safetensors";

std::string where(const SafetensorsFile& file, std::string_view tensor) {
  return "in " + file.path() + ", tensor " + detail::quote(tensor);
}

std::vector<std::int64_t> sizes_of(const SafetensorsView& v) { return v.shape(); }

// value = (-1)^s * 2^(e - bias) * (1 + m / 2^mbits), subnormal when e == 0.
float decode_minifloat(unsigned b, int ebits, int mbits, int bias) {
  const unsigned m = b & ((1u << mbits) - 1);
  const unsigned e = (b >> mbits) & ((1u << ebits) - 1);
  const float sign = (b >> (ebits + mbits)) & 1 ? -1.0f : 1.0f;
  const float frac = static_cast<float>(m) / static_cast<float>(1u << mbits);
  if (e == 0) return sign * std::ldexp(frac, 1 - bias);
  return sign * std::ldexp(1.0f + frac, static_cast<int>(e) - bias);
}

float decode_f8(SafetensorsDtype d, unsigned b) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  switch (d) {
    case SafetensorsDtype::F8_E4M3:  // no infinities; S.1111.111 is NaN
      return (b & 0x7f) == 0x7f ? nan : decode_minifloat(b, 4, 3, 7);
    case SafetensorsDtype::F8_E5M2:  // IEEE-like: exponent 31 is inf (m = 0) or NaN
      if (((b >> 2) & 0x1f) == 0x1f)
        return (b & 3) ? nan : ((b & 0x80) ? -1.0f : 1.0f) * std::numeric_limits<float>::infinity();
      return decode_minifloat(b, 5, 2, 15);
    case SafetensorsDtype::F8_E8M0:  // unsigned exponent only
      return b == 0xff ? nan : std::ldexp(1.0f, static_cast<int>(b) - 127);
    case SafetensorsDtype::F8_E4M3FNUZ:  // 0x80 ("negative zero") is the only NaN
      return b == 0x80 ? nan : decode_minifloat(b, 4, 3, 8);
    case SafetensorsDtype::F8_E5M2FNUZ:
      return b == 0x80 ? nan : decode_minifloat(b, 5, 2, 16);
    default:
      RHINE_FAIL(kComponent, "not a float8 dtype", std::string(dtype_name(d)), "");
  }
}

const std::array<float, 256>& f8_table(SafetensorsDtype d) {
  static const auto make = [](SafetensorsDtype dt) {
    std::array<float, 256> t{};
    for (unsigned b = 0; b < 256; ++b) t[b] = decode_f8(dt, b);
    return t;
  };
  static const std::array<float, 256> e4m3 = make(SafetensorsDtype::F8_E4M3),
                                      e5m2 = make(SafetensorsDtype::F8_E5M2),
                                      e8m0 = make(SafetensorsDtype::F8_E8M0),
                                      e4m3fnuz = make(SafetensorsDtype::F8_E4M3FNUZ),
                                      e5m2fnuz = make(SafetensorsDtype::F8_E5M2FNUZ);
  switch (d) {
    case SafetensorsDtype::F8_E4M3: return e4m3;
    case SafetensorsDtype::F8_E5M2: return e5m2;
    case SafetensorsDtype::F8_E8M0: return e8m0;
    case SafetensorsDtype::F8_E4M3FNUZ: return e4m3fnuz;
    case SafetensorsDtype::F8_E5M2FNUZ: return e5m2fnuz;
    default: RHINE_FAIL(kComponent, "not a float8 dtype", std::string(dtype_name(d)), "");
  }
}

at::Tensor copy_bytes(const SafetensorsView& v, at::ScalarType st) {
  at::Tensor t = at::empty(sizes_of(v), at::TensorOptions().dtype(st));
  if (v.nbytes() > 0) std::memcpy(t.data_ptr(), v.data, v.nbytes());
  return t;
}

at::Tensor wrap_or_copy(const SafetensorsView& v, const std::shared_ptr<const SafetensorsFile>& file,
                        at::ScalarType st, bool copy) {
  const auto elem = static_cast<std::uintptr_t>(c10::elementSize(st));
  if (copy || reinterpret_cast<std::uintptr_t>(v.data) % elem != 0) return copy_bytes(v, st);
  // The deleter holds the file (and its mapping) until the last tensor goes.
  std::shared_ptr<const SafetensorsFile> keep = file;
  return at::from_blob(const_cast<std::byte*>(v.data), sizes_of(v),
                       [keep](void*) mutable { keep.reset(); }, at::TensorOptions().dtype(st));
}

}  // namespace

std::optional<at::ScalarType> to_scalar_type(SafetensorsDtype d) {
  switch (d) {
    case SafetensorsDtype::BOOL: return at::kBool;
    case SafetensorsDtype::U8: return at::kByte;
    case SafetensorsDtype::I8: return at::kChar;
    case SafetensorsDtype::I16: return at::kShort;
    case SafetensorsDtype::F16: return at::kHalf;
    case SafetensorsDtype::BF16: return at::kBFloat16;
    case SafetensorsDtype::I32: return at::kInt;
    case SafetensorsDtype::F32: return at::kFloat;
    case SafetensorsDtype::F64: return at::kDouble;
    case SafetensorsDtype::I64: return at::kLong;
    case SafetensorsDtype::C64: return at::kComplexFloat;
#if RHINE_TORCH_VERSION_AT_LEAST(2, 1)
    case SafetensorsDtype::F8_E4M3: return at::kFloat8_e4m3fn;
    case SafetensorsDtype::F8_E5M2: return at::kFloat8_e5m2;
#endif
#if RHINE_TORCH_VERSION_AT_LEAST(2, 3)
    case SafetensorsDtype::U16: return at::kUInt16;
    case SafetensorsDtype::U32: return at::kUInt32;
    case SafetensorsDtype::U64: return at::kUInt64;
#endif
    default: return std::nullopt;
  }
}

SafetensorsDtype to_safetensors_dtype(at::ScalarType st) {
  switch (st) {
    case at::kBool: return SafetensorsDtype::BOOL;
    case at::kByte: return SafetensorsDtype::U8;
    case at::kChar: return SafetensorsDtype::I8;
    case at::kShort: return SafetensorsDtype::I16;
    case at::kHalf: return SafetensorsDtype::F16;
    case at::kBFloat16: return SafetensorsDtype::BF16;
    case at::kInt: return SafetensorsDtype::I32;
    case at::kFloat: return SafetensorsDtype::F32;
    case at::kDouble: return SafetensorsDtype::F64;
    case at::kLong: return SafetensorsDtype::I64;
    case at::kComplexFloat: return SafetensorsDtype::C64;
#if RHINE_TORCH_VERSION_AT_LEAST(2, 1)
    case at::kFloat8_e4m3fn: return SafetensorsDtype::F8_E4M3;
    case at::kFloat8_e5m2: return SafetensorsDtype::F8_E5M2;
#endif
#if RHINE_TORCH_VERSION_AT_LEAST(2, 3)
    case at::kUInt16: return SafetensorsDtype::U16;
    case at::kUInt32: return SafetensorsDtype::U32;
    case at::kUInt64: return SafetensorsDtype::U64;
#endif
    default:
      RHINE_FAIL(kComponent, "safetensors cannot store this dtype", Verbatim{c10::toString(st)},
                 "convert the tensor first (e.g. to float32 or bfloat16)");
  }
}

at::Tensor decode_float8(const std::byte* bytes, const std::vector<std::int64_t>& shape,
                         SafetensorsDtype dtype) {
  const auto& table = f8_table(dtype);
  at::Tensor out = at::empty(shape, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const auto* b = reinterpret_cast<const unsigned char*>(bytes);
  for (std::int64_t i = 0, n = out.numel(); i < n; ++i) o[i] = table[b[i]];
  return out;
}

at::Tensor dequantize_fp8_blocks(const at::Tensor& w, const at::Tensor& scale_inv, std::int64_t block,
                                 at::ScalarType out) {
  RHINE_CHECK(block > 0, kComponent, "fp8 block size must be positive", block, "DeepSeek-V3 uses 128");
  RHINE_CHECK(w.dim() == 2, kComponent, "block-scaled fp8 weights must be 2-D [O, I]", w.sizes(),
              "only linear weights carry a _scale_inv");
  const std::int64_t O = w.size(0), I = w.size(1);
  const std::vector<std::int64_t> want{(O + block - 1) / block, (I + block - 1) / block};
  RHINE_CHECK(scale_inv.dim() == 2 && scale_inv.sizes().vec() == want, kComponent,
              "scale_inv shape does not match [ceil(O/" + std::to_string(block) + "), ceil(I/" +
                  std::to_string(block) + ")] = " + detail::display(want),
              scale_inv.sizes(), "check fp8_block (weight_block_size in config.json)");
  at::Tensor s = scale_inv.to(at::kFloat)
                     .repeat_interleave(block, 0)
                     .repeat_interleave(block, 1)
                     .slice(0, 0, O)
                     .slice(1, 0, I);  // [O, I]
  return (w.to(at::kFloat) * s).to(out);
}

at::Tensor to_tensor(const SafetensorsView& v, const std::shared_ptr<const SafetensorsFile>& file,
                     const TensorLoadOptions& options) {
  const SafetensorsDtype d = v.dtype();
  if (is_float8(d)) {
    switch (options.float8) {
      case Float8Mode::error:
        RHINE_FAIL(kComponent, "float8 tensor " + where(*file, v.name()) + " needs a decision",
                   std::string(dtype_name(d)),
                   "set TensorLoadOptions::float8 to Float8Mode::dequantize (to dequantize_to, with "
                   "_scale_inv blocks), raw_bytes or native (LibTorch >= 2.1)");
      case Float8Mode::dequantize:
        return decode_float8(v.data, v.shape(), d).to(options.dequantize_to);
      case Float8Mode::raw_bytes:
        return wrap_or_copy(v, file, at::kByte, options.copy);
      case Float8Mode::native: {
        auto st = to_scalar_type(d);
        RHINE_CHECK(st.has_value(), kComponent,
                    "this LibTorch has no native type for float8 tensor " + where(*file, v.name()),
                    std::string(dtype_name(d)),
                    "LibTorch " + torch_version() + "; use Float8Mode::dequantize or raw_bytes");
        return wrap_or_copy(v, file, *st, options.copy);
      }
    }
  }
  if (options.widen_unsigned && (d == SafetensorsDtype::U16 || d == SafetensorsDtype::U32)) {
    at::Tensor raw = copy_bytes(v, d == SafetensorsDtype::U16 ? at::kShort : at::kInt);
    return d == SafetensorsDtype::U16 ? raw.to(at::kInt).bitwise_and(static_cast<std::int64_t>(0xffff))
                                      : raw.to(at::kLong).bitwise_and(static_cast<std::int64_t>(0xffffffff));
  }
  auto st = to_scalar_type(d);
  RHINE_CHECK(st.has_value(), kComponent, "no LibTorch dtype for tensor " + where(*file, v.name()),
              std::string(dtype_name(d)),
              (d == SafetensorsDtype::U16 || d == SafetensorsDtype::U32)
                  ? std::string("set TensorLoadOptions::widen_unsigned to read it as a wider signed type")
                  : "LibTorch " + torch_version() + " cannot hold it; read the bytes with SafetensorsFile");
  if (d == SafetensorsDtype::BOOL) {
    // A bool tensor holding bytes other than 0 and 1 is undefined behaviour in LibTorch.
    const auto* b = reinterpret_cast<const unsigned char*>(v.data);
    for (std::size_t i = 0; i < v.nbytes(); ++i)
      RHINE_CHECK(b[i] <= 1, kComponent, "BOOL tensor holds a byte other than 0 or 1 " + where(*file, v.name()),
                  static_cast<int>(b[i]), "the file is corrupt");
  }
  return wrap_or_copy(v, file, *st, options.copy);
}

std::map<std::string, at::Tensor> load_safetensors(const SafetensorsCheckpoint& checkpoint,
                                                   const TensorLoadOptions& options) {
  std::map<std::string, at::Tensor> out;
  const bool blocks = options.float8 == Float8Mode::dequantize;
  for (const auto& name : checkpoint.names()) {
    const auto& file = checkpoint.file_of(name);
    const SafetensorsView v = file->at(name);
    const std::string scale_name = name + "_scale_inv";
    if (blocks && is_float8(v.dtype()) && checkpoint.contains(scale_name)) {
      const auto& sfile = checkpoint.file_of(scale_name);
      TensorLoadOptions so = options;
      so.copy = true;
      at::Tensor scale = to_tensor(sfile->at(scale_name), sfile, so);
      at::Tensor w = decode_float8(v.data, v.shape(), v.dtype());
      try {
        out[name] = dequantize_fp8_blocks(w, scale, options.fp8_block, options.dequantize_to);
      } catch (const Error& e) {
        RHINE_FAIL(kComponent, "cannot dequantise " + where(*file, name), Verbatim{e.what()},
                   "the weight and its _scale_inv do not fit together");
      }
      continue;
    }
    if (blocks && name.size() > 10 && name.compare(name.size() - 10, 10, "_scale_inv") == 0) {
      const std::string weight = name.substr(0, name.size() - 10);
      if (checkpoint.contains(weight) && is_float8(checkpoint.at(weight).dtype())) continue;
    }
    out[name] = to_tensor(v, file, options);
  }
  return out;
}

std::map<std::string, at::Tensor> load_safetensors(const std::string& path,
                                                   const TensorLoadOptions& options) {
  return load_safetensors(SafetensorsCheckpoint::open(path, options.read), options);
}

namespace {

// Contiguous CPU copies (kept alive by the caller) and the writer's descriptions of them.
std::vector<SafetensorsTensor> describe(const std::map<std::string, at::Tensor>& tensors,
                                        std::vector<at::Tensor>& keep) {
  std::vector<SafetensorsTensor> out;
  keep.reserve(tensors.size());
  for (const auto& [name, t] : tensors) {
    RHINE_CHECK(t.defined(), kComponent, "cannot save an undefined tensor", name, "");
    SafetensorsDtype d;
    try {
      d = to_safetensors_dtype(t.scalar_type());
    } catch (const Error& e) {
      RHINE_FAIL(kComponent, "cannot save tensor " + detail::quote(name), Verbatim{e.what()}, "");
    }
    keep.push_back(t.detach().to(at::kCPU).contiguous());  // host read: the file being written
    const at::Tensor& c = keep.back();
    out.push_back({name, d, c.sizes().vec(), c.data_ptr(),
                   static_cast<std::size_t>(c.numel() * c.element_size())});
  }
  return out;
}

}  // namespace

void save_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                      const SafetensorsWriteOptions& options) {
  std::vector<at::Tensor> keep;
  write_safetensors(path, describe(tensors, keep), options);
}

std::vector<std::string> save_safetensors_checkpoint(const std::string& dir,
                                                     const std::map<std::string, at::Tensor>& tensors,
                                                     const SafetensorsWriteOptions& options) {
  std::vector<at::Tensor> keep;
  return write_safetensors_checkpoint(dir, describe(tensors, keep), options);
}

}  // namespace rhine
