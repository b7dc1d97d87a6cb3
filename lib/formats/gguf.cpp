#include "rhine/formats/gguf.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <set>

#include "rhine/core/error.h"
#include "rhine/core/file.h"

namespace rhine {
namespace {

constexpr const char* kComponent = "gguf";
constexpr std::uint32_t kVersion = 3;
constexpr std::uint64_t kAlignment = 32;  // general.alignment's default

// GGUF metadata value types (gguf_type).
enum : std::uint32_t {
  kU8 = 0, kI8 = 1, kU16 = 2, kI16 = 3, kU32 = 4, kI32 = 5, kF32 = 6, kBool = 7, kString = 8,
  kArray = 9, kU64 = 10, kI64 = 11, kF64 = 12,
};

template <typename T>
void put(std::string& out, T v) {
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));  // little-endian hosts only (x86-64, aarch64)
  out.append(b, sizeof(T));
}
void put_string(std::string& out, const std::string& s) {
  put<std::uint64_t>(out, s.size());
  out += s;
}

void put_value(std::string& out, const GgufValue& v) {
  struct Visitor {
    std::string& o;
    void operator()(std::uint32_t x) const { put(o, kU32), put(o, x); }
    void operator()(std::int32_t x) const { put(o, kI32), put(o, x); }
    void operator()(float x) const { put(o, kF32), put(o, x); }
    void operator()(bool x) const { put(o, kBool), put<std::uint8_t>(o, x ? 1 : 0); }
    void operator()(const std::string& x) const { put(o, kString), put_string(o, x); }
    void operator()(std::uint64_t x) const { put(o, kU64), put(o, x); }
    void operator()(const std::vector<std::string>& x) const {
      put(o, kArray), put(o, kString), put<std::uint64_t>(o, x.size());
      for (const auto& s : x) put_string(o, s);
    }
    void operator()(const std::vector<float>& x) const {
      put(o, kArray), put(o, kF32), put<std::uint64_t>(o, x.size());
      for (float f : x) put(o, f);
    }
    void operator()(const std::vector<std::int32_t>& x) const {
      put(o, kArray), put(o, kI32), put<std::uint64_t>(o, x.size());
      for (std::int32_t i : x) put(o, i);
    }
  };
  std::visit(Visitor{out}, v);
}

std::uint64_t align_up(std::uint64_t n) { return (n + kAlignment - 1) / kAlignment * kAlignment; }

void write_all(int fd, const char* p, std::size_t n, const std::string& path) {
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    RHINE_CHECK(w > 0, kComponent, "cannot write " + path, std::strerror(errno), "check free disk space");
    p += w;
    n -= static_cast<std::size_t>(w);
  }
}

}  // namespace

std::string_view ggml_type_name(GgmlType type) {
  switch (type) {
    case GgmlType::F32: return "f32";
    case GgmlType::F16: return "f16";
    case GgmlType::Q8_0: return "q8_0";
    case GgmlType::BF16: return "bf16";
  }
  return "?";
}

std::optional<GgmlType> ggml_type_from_name(std::string_view name) {
  for (GgmlType t : {GgmlType::F32, GgmlType::F16, GgmlType::Q8_0, GgmlType::BF16})
    if (ggml_type_name(t) == name) return t;
  return std::nullopt;
}

std::int64_t ggml_block_size(GgmlType type) { return type == GgmlType::Q8_0 ? 32 : 1; }

std::uint64_t ggml_nbytes(GgmlType type, const std::vector<std::int64_t>& shape) {
  std::uint64_t n = 1;
  for (auto d : shape) {
    RHINE_CHECK(d >= 0, kComponent, "tensor dimensions must be non-negative", shape, "");
    n *= static_cast<std::uint64_t>(d);
  }
  const std::int64_t last = shape.empty() ? 1 : shape.back();
  RHINE_CHECK(last % ggml_block_size(type) == 0, kComponent,
              std::string("the last dimension must be a multiple of the block size of ") +
                  std::string(ggml_type_name(type)),
              shape, "write this tensor as f16 or f32");
  switch (type) {
    case GgmlType::F32: return n * 4;
    case GgmlType::F16:
    case GgmlType::BF16: return n * 2;
    case GgmlType::Q8_0: return n / 32 * 34;
  }
  return 0;
}

// F. Giesen's float_to_half_fast3_rtne: exact round-to-nearest-even, subnormals included.
std::uint16_t float_to_half_bits(float x) {
  std::uint32_t f;
  std::memcpy(&f, &x, 4);
  const std::uint32_t sign = f & 0x80000000u;
  f ^= sign;
  std::uint16_t o;
  if (f >= (127u + 16u) << 23) {  // overflow (rounds to inf), inf or NaN
    o = f > (255u << 23) ? 0x7e00 : 0x7c00;
  } else if (f < (113u << 23)) {  // result subnormal or zero: let the FPU round
    const std::uint32_t magic_bits = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    float v, magic;
    std::memcpy(&v, &f, 4);
    std::memcpy(&magic, &magic_bits, 4);
    volatile float sum = v + magic;  // volatile: the rounding of this add is the point
    const float s = sum;
    std::uint32_t r;
    std::memcpy(&r, &s, 4);
    o = static_cast<std::uint16_t>(r - magic_bits);
  } else {
    const std::uint32_t mant_odd = (f >> 13) & 1u;
    f += (static_cast<std::uint32_t>(15 - 127) << 23) + 0xfffu;
    f += mant_odd;
    o = static_cast<std::uint16_t>(f >> 13);
  }
  return static_cast<std::uint16_t>(o | (sign >> 16));
}

std::string encode_f16(const float* x, std::int64_t n) {
  std::string out;
  out.reserve(static_cast<std::size_t>(n) * 2);
  for (std::int64_t i = 0; i < n; ++i) put(out, float_to_half_bits(x[i]));
  return out;
}

std::string encode_bf16(const float* x, std::int64_t n) {
  std::string out;
  out.reserve(static_cast<std::size_t>(n) * 2);
  for (std::int64_t i = 0; i < n; ++i) {
    std::uint32_t u;
    std::memcpy(&u, &x[i], 4);
    const std::uint16_t h = std::isnan(x[i]) ? static_cast<std::uint16_t>((u >> 16) | 0x40)
                                             : static_cast<std::uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    put(out, h);
  }
  return out;
}

std::string encode_q8_0(const float* x, std::int64_t n) {
  RHINE_CHECK(n % 32 == 0, kComponent, "q8_0 needs a multiple of 32 values", n, "");
  std::string out;
  out.reserve(static_cast<std::size_t>(n / 32 * 34));
  for (std::int64_t b = 0; b < n; b += 32) {
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[b + j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    put(out, float_to_half_bits(d));
    for (int j = 0; j < 32; ++j) put(out, static_cast<std::int8_t>(std::roundf(x[b + j] * id)));
  }
  return out;
}

void GgufWriter::add(const std::string& key, GgufValue value) {
  RHINE_CHECK(!key.empty(), kComponent, "metadata keys must not be empty", key, "");
  for (const auto& [k, v] : kv_)
    RHINE_CHECK(k != key, kComponent, "metadata key added twice", key, "");
  kv_.emplace_back(key, std::move(value));
}

void GgufWriter::add_tensor(GgufTensor tensor) {
  RHINE_CHECK(!tensor.name.empty(), kComponent, "tensor names must not be empty", tensor.name, "");
  RHINE_CHECK(tensor.shape.size() >= 1 && tensor.shape.size() <= 4, kComponent,
              "tensors have 1 to 4 dimensions in GGUF; got " + tensor.name, tensor.shape, "");
  RHINE_CHECK(static_cast<bool>(tensor.bytes), kComponent, "tensor without a data source", tensor.name, "");
  for (const auto& t : tensors_)
    RHINE_CHECK(t.name != tensor.name, kComponent, "tensor added twice", tensor.name, "");
  (void)ggml_nbytes(tensor.type, tensor.shape);  // checks the block size
  tensors_.push_back(std::move(tensor));
}

void GgufWriter::write(const std::string& path) const {
  std::string head;
  head.append("GGUF", 4);
  put(head, kVersion);
  put<std::uint64_t>(head, tensors_.size());
  put<std::uint64_t>(head, kv_.size());
  for (const auto& [k, v] : kv_) {
    put_string(head, k);
    put_value(head, v);
  }
  std::vector<std::uint64_t> sizes;
  std::uint64_t offset = 0;
  for (const auto& t : tensors_) {
    put_string(head, t.name);
    put<std::uint32_t>(head, static_cast<std::uint32_t>(t.shape.size()));
    for (auto it = t.shape.rbegin(); it != t.shape.rend(); ++it) put<std::uint64_t>(head, *it);  // ne[0] fastest
    put<std::uint32_t>(head, static_cast<std::uint32_t>(t.type));
    put<std::uint64_t>(head, offset);
    sizes.push_back(ggml_nbytes(t.type, t.shape));
    offset = align_up(offset + sizes.back());
  }
  head.resize(align_up(head.size()), '\0');

  const std::filesystem::path target(path);
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  RHINE_CHECK(fd >= 0, kComponent, "cannot create " + tmp, std::strerror(errno),
              "check that the output directory exists and is writable");
  try {
    write_all(fd, head.data(), head.size(), tmp);
    const std::string zeros(kAlignment, '\0');
    for (std::size_t i = 0; i < tensors_.size(); ++i) {
      const std::string bytes = tensors_[i].bytes();
      RHINE_CHECK(bytes.size() == sizes[i], kComponent,
                  "tensor " + tensors_[i].name + " produced the wrong number of bytes", bytes.size(),
                  "expected " + std::to_string(sizes[i]));
      write_all(fd, bytes.data(), bytes.size(), tmp);
      write_all(fd, zeros.data(), align_up(sizes[i]) - sizes[i], tmp);
    }
    RHINE_CHECK(::fsync(fd) == 0, kComponent, "cannot fsync " + tmp, std::strerror(errno), "");
  } catch (...) {
    ::close(fd);
    std::filesystem::remove(tmp);
    throw;
  }
  ::close(fd);
  std::filesystem::rename(tmp, target);
  fsync_directory(target.parent_path().empty() ? std::string(".") : target.parent_path().string());
}

}  // namespace rhine
