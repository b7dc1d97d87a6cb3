#pragma once
/// \file
/// GGUF, torch-free: the file format of llama.cpp and ggml. A streaming writer
/// (one tensor's bytes in memory at a time) and the element encodings Rhine
/// exports (F32, F16, BF16, Q8_0).
///
/// File layout (GGUF version 3, all integers little-endian; ggml's docs/gguf.md):
///
///     magic "GGUF", u32 version = 3, u64 tensor_count, u64 kv_count
///     kv_count x  { string key, u32 value_type, value }
///     tensor_count x { string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset }
///     zero padding to `general.alignment` (32)
///     tensor data: each tensor at its offset from here, offsets multiples of 32
///
/// A string is u64 length + bytes (no terminator); an array is u32 element
/// type + u64 count + elements. ne[0] is the fastest-varying dimension, so a
/// row-major [rows, cols] matrix is written as ne = {cols, rows}.
///
/// The LibTorch side (Hugging Face Llama/Mistral directories -> GGUF with the
/// tokenizer) is rhine/io/gguf.h.
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace rhine {

/// The ggml element types Rhine writes (values of ggml's `ggml_type`).
enum class GgmlType : std::uint32_t {
  F32 = 0,
  F16 = 1,
  Q8_0 = 8,  ///< blocks of 32: f16 scale d = max|x| / 127, then 32 x int8 round(x / d)
  BF16 = 30,
};
/// "f32", "f16", "q8_0", "bf16".
std::string_view ggml_type_name(GgmlType type);
/// The type called `name` (as ggml_type_name spells it), or nullopt.
std::optional<GgmlType> ggml_type_from_name(std::string_view name);
/// Elements per block: 32 for Q8_0, 1 for the float types.
std::int64_t ggml_block_size(GgmlType type);
/// Bytes of a row-major tensor of `shape` in `type`. Throws rhine::Error
/// "[gguf] ..." when the last dimension is not a multiple of the block size.
std::uint64_t ggml_nbytes(GgmlType type, const std::vector<std::int64_t>& shape);

/// Encodings of `n` float32 values (little-endian bytes, as ggml stores them).
/// F16 and BF16 round to nearest even (numpy's astype(float16), torch's
/// .to(bfloat16)); NaN stays NaN. Q8_0 needs n % 32 == 0 and gives
/// ggml-quants.c's quantize_row_q8_0_ref bit for bit.
std::string encode_f16(const float* x, std::int64_t n);
std::string encode_bf16(const float* x, std::int64_t n);
std::string encode_q8_0(const float* x, std::int64_t n);
/// float32 -> IEEE half bits, round to nearest even.
std::uint16_t float_to_half_bits(float x);

/// A metadata value. Scalars and the three array kinds a model file needs.
using GgufValue = std::variant<std::uint32_t, std::int32_t, float, bool, std::string, std::uint64_t,
                               std::vector<std::string>, std::vector<float>, std::vector<std::int32_t>>;

/// One tensor to write: `bytes()` is called once, while the file is written,
/// and must return exactly ggml_nbytes(type, shape) bytes.
struct GgufTensor {
  std::string name;
  std::vector<std::int64_t> shape;  ///< row-major, like the source tensor ([out, in] for a weight)
  GgmlType type = GgmlType::F32;
  std::function<std::string()> bytes;
};

/// Builds a GGUF file: metadata in insertion order, tensors in insertion order.
///
///     rhine::GgufWriter w;
///     w.add("general.architecture", std::string("llama"));
///     w.add_tensor({"output_norm.weight", {C}, rhine::GgmlType::F32, [&] { return bytes; }});
///     w.write("model.gguf");
class GgufWriter {
 public:
  /// Adds a key. Throws rhine::Error for a key added twice or an empty key.
  void add(const std::string& key, GgufValue value);
  /// Adds a tensor. Throws for a duplicate or empty name, more than 4
  /// dimensions, or a last dimension the type's block size does not divide.
  void add_tensor(GgufTensor tensor);
  /// Writes the file crash-safely (a temporary file in the same directory,
  /// fsynced and renamed over `path`). Each tensor's bytes are produced,
  /// written and released before the next; a wrong byte count throws naming
  /// the tensor, and the half-written temporary file is removed.
  void write(const std::string& path) const;

  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return kv_; }
  const std::vector<GgufTensor>& tensors() const { return tensors_; }

 private:
  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::vector<GgufTensor> tensors_;
};

}  // namespace rhine
