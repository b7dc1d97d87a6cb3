#pragma once
/// \file
/// Safetensors <-> LibTorch: views of a memory-mapped file as at::Tensor
/// (zero-copy where dtype and alignment allow), float8 decoding and DeepSeek's
/// block-scaled FP8 dequantisation, and saving name -> tensor maps.
///
///     rhine::TensorLoadOptions o;
///     o.float8 = rhine::Float8Mode::dequantize;          // F8 -> bf16 (scales applied)
///     auto weights = rhine::load_safetensors("/models/DeepSeek-V2-Lite", o);
///     rhine::save_safetensors("out.safetensors", weights);
///
/// Dimension letters: O rows (out features), I columns (in features),
/// Bk = block (128 in DeepSeek-V3 checkpoints).

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "rhine/formats/safetensors.h"

namespace rhine {

/// What to do with float8 tensors (F8_E4M3, F8_E5M2, F8_E8M0, F8_E4M3FNUZ, F8_E5M2FNUZ).
enum class Float8Mode {
  error,       ///< throw, naming the tensor and the options that load it (default)
  dequantize,  ///< decode to `TensorLoadOptions::dequantize_to`; `load_safetensors`
               ///< also applies `<name>_scale_inv` block scales and drops them
  raw_bytes,   ///< the bytes as a uint8 tensor of the same shape (zero-copy)
  native,      ///< LibTorch's float8 types (LibTorch >= 2.1, E4M3 and E5M2 only)
};

/// Options of loading tensors from safetensors.
struct TensorLoadOptions {
  Float8Mode float8 = Float8Mode::error;
  /// dtype of decoded float8 tensors: at::kBFloat16 (as DeepSeek's fp8_cast_bf16) or at::kFloat.
  at::ScalarType dequantize_to = at::kBFloat16;
  /// Edge of the square scale blocks of `<name>_scale_inv` (DeepSeek-V3: 128).
  std::int64_t fp8_block = 128;
  /// Copy every tensor out of the mapping (the file can then be unmapped early).
  bool copy = false;
  /// U16 -> int32 and U32 -> int64 (copies). Off: an error on LibTorch < 2.3,
  /// which has no unsigned types wider than 8 bits.
  bool widen_unsigned = false;
  SafetensorsReadOptions read;
};

/// The LibTorch dtype of a safetensors dtype, or nullopt where this LibTorch
/// has none (F8 on < 2.1, U16/U32/U64 on < 2.3, F4, F6).
std::optional<at::ScalarType> to_scalar_type(SafetensorsDtype dtype);
/// The safetensors dtype of a LibTorch dtype; throws for one safetensors cannot store.
SafetensorsDtype to_safetensors_dtype(at::ScalarType dtype);

/// The tensor behind `view`, an entry of `file`. Wraps the mapping without a
/// copy when the dtype exists in LibTorch, the data is aligned to the element
/// size and `options.copy` is off; the returned tensor then keeps `file`
/// alive (shared ownership through the deleter). Otherwise copies. Errors
/// name the file and the tensor.
at::Tensor to_tensor(const SafetensorsView& view, const std::shared_ptr<const SafetensorsFile>& file,
                     const TensorLoadOptions& options = {});

/// Decodes `numel` float8 values of type `dtype` at `bytes` to float32.
/// Shape of the result: `shape`.
at::Tensor decode_float8(const std::byte* bytes, const std::vector<std::int64_t>& shape,
                         SafetensorsDtype dtype);

/// DeepSeek block-scaled dequantisation: W[i, j] = w[i, j] * scale_inv[i / Bk, j / Bk].
/// `w` [O, I] (float32, e.g. from decode_float8), `scale_inv` [ceil(O/Bk), ceil(I/Bk)];
/// computed in float32, returned as `out`.
at::Tensor dequantize_fp8_blocks(const at::Tensor& w, const at::Tensor& scale_inv, std::int64_t block,
                                 at::ScalarType out);

/// Loads every tensor of a file, an index, or a directory (see
/// SafetensorsCheckpoint::open) into a name -> tensor map.
std::map<std::string, at::Tensor> load_safetensors(const std::string& path,
                                                   const TensorLoadOptions& options = {});
/// The same from an open checkpoint.
std::map<std::string, at::Tensor> load_safetensors(const SafetensorsCheckpoint& checkpoint,
                                                   const TensorLoadOptions& options = {});

/// Saves tensors (any device, any strides: copied to contiguous CPU memory)
/// into one safetensors file, atomically.
void save_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                      const SafetensorsWriteOptions& options = {});

/// Saves tensors as a Hugging Face checkpoint directory (sharded above
/// `options.max_shard_bytes`, see write_safetensors_checkpoint); returns the file names.
std::vector<std::string> save_safetensors_checkpoint(const std::string& dir,
                                                     const std::map<std::string, at::Tensor>& tensors,
                                                     const SafetensorsWriteOptions& options = {});

}  // namespace rhine
