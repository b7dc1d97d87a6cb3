#pragma once
/// \file
/// Safetensors, torch-free: a validating reader that memory-maps a file and
/// hands out zero-copy views, a writer, and sharded checkpoints
/// (`model.safetensors.index.json`).
///
/// File layout (huggingface/safetensors):
///
///     [0, 8)        N: u64 little-endian, the header length
///     [8, 8+N)      header: a JSON object, right-padded with spaces
///                   {"__metadata__": {str: str}, "<name>": {"dtype": "BF16",
///                    "shape": [d0, d1, ...], "data_offsets": [begin, end]}, ...}
///     [8+N, EOF)    the byte buffer; offsets are relative to its start
///
/// Every header field is checked when a file is opened (see `parse_safetensors`);
/// a bad file gets an error naming the file and the tensor.
///
/// The LibTorch side (views -> at::Tensor, saving tensors) is rhine/io/safetensors.h.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace rhine {

/// Element types of safetensors, in the order of the spec's `Dtype` enum.
enum class SafetensorsDtype : std::uint8_t {
  BOOL, U8, I8, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64, C64,
  F8_E4M3,      ///< OCP E4M3 "fn" (torch float8_e4m3fn): bias 7, no inf, 0x7f/0xff NaN
  F8_E5M2,      ///< OCP E5M2 (torch float8_e5m2): bias 15, IEEE-like inf/NaN
  F8_E8M0,      ///< exponent only (OCP MX scale): 2^(e-127), 0xff NaN
  F8_E4M3FNUZ,  ///< bias 8, no inf, no -0, 0x80 NaN
  F8_E5M2FNUZ,  ///< bias 16, no inf, no -0, 0x80 NaN
  F4,           ///< 4-bit float (E2M1), two per byte
  F6_E2M3,      ///< 6-bit float, packed
  F6_E3M2,      ///< 6-bit float, packed
};

/// The spec's name of a dtype ("F32", "BF16", "F8_E4M3", ...).
std::string_view dtype_name(SafetensorsDtype dtype);
/// The dtype called `name`, or nullopt for a name the spec does not define.
std::optional<SafetensorsDtype> dtype_from_name(std::string_view name);
/// Bits per element (4 for F4, 6 for F6_*, 64 for C64 and F64, ...).
std::size_t dtype_bits(SafetensorsDtype dtype);
/// True for the five 8-bit float types.
bool is_float8(SafetensorsDtype dtype);

/// Limits and behaviour of the reader.
struct SafetensorsReadOptions {
  /// Largest accepted header (the reference implementation's MAX_HEADER_SIZE).
  std::uint64_t max_header_bytes = 100'000'000;
  /// Map the file copy-on-write and writable: tensors that wrap the mapping
  /// can then be modified in place (pages are copied privately on first
  /// write; the file never changes). With false the mapping is read-only and
  /// a write through a view crashes.
  bool writable = true;
};

/// One tensor entry of a header, validated. Offsets are relative to the byte buffer.
struct SafetensorsEntry {
  std::string name;
  SafetensorsDtype dtype = SafetensorsDtype::F32;
  std::vector<std::int64_t> shape;  ///< row-major; [] is a scalar
  std::uint64_t begin = 0, end = 0; ///< data_offsets, end exclusive
  /// Number of elements (1 for a scalar, 0 when a dim is 0).
  std::int64_t numel() const;
  std::uint64_t nbytes() const { return end - begin; }
};

/// A parsed and validated header.
struct SafetensorsHeader {
  std::map<std::string, std::string> metadata;  ///< `__metadata__` (may be empty)
  std::vector<SafetensorsEntry> entries;        ///< sorted by begin offset
  std::uint64_t header_bytes = 0;               ///< N: the byte buffer starts at 8 + N
};

/// Parses and validates a whole safetensors file held in memory (`bytes`
/// starts with the 8-byte length). Checks: file long enough for the length,
/// N <= max_header_bytes and 8 + N <= file size, header starts with '{',
/// JSON syntax, nesting at most 3 deep, no duplicate keys at any level, `__metadata__` an object of
/// strings, each entry an object with exactly dtype/shape/data_offsets, known
/// dtype, non-negative shape with no overflow, numel * bits a whole number of
/// bytes equal to end - begin, begin <= end <= buffer size, and entries that
/// cover the buffer with no overlap and no hole. `source` names the file in
/// errors.
SafetensorsHeader parse_safetensors(std::string_view bytes, std::string_view source,
                                    const SafetensorsReadOptions& options = {});

/// A zero-copy view of one tensor inside an open file. Valid as long as the
/// `SafetensorsFile` it came from lives (hold the shared_ptr).
struct SafetensorsView {
  const SafetensorsEntry* entry = nullptr;
  const std::byte* data = nullptr;  ///< first byte of the tensor inside the mapping
  const std::string& name() const { return entry->name; }
  SafetensorsDtype dtype() const { return entry->dtype; }
  const std::vector<std::int64_t>& shape() const { return entry->shape; }
  std::int64_t numel() const { return entry->numel(); }
  std::size_t nbytes() const { return static_cast<std::size_t>(entry->nbytes()); }
};

/// A memory-mapped, validated safetensors file.
///
///     auto f = rhine::SafetensorsFile::open("model.safetensors");
///     rhine::SafetensorsView w = f->at("model.embed_tokens.weight");
///     // w.dtype(), w.shape() = [V, C], w.data .. w.data + w.nbytes()
class SafetensorsFile {
 public:
  /// Maps and validates `path`. Throws rhine::Error naming the file (and the
  /// tensor, when one entry is at fault).
  static std::shared_ptr<const SafetensorsFile> open(const std::string& path,
                                                     const SafetensorsReadOptions& options = {});
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, std::string>& metadata() const { return header_.metadata; }
  /// Entries sorted by offset.
  const std::vector<SafetensorsEntry>& entries() const { return header_.entries; }
  /// Tensor names, sorted.
  std::vector<std::string> names() const;
  bool contains(std::string_view name) const { return index_.count(name) > 0; }
  /// The view of `name`; throws naming the file and the closest existing name.
  SafetensorsView at(std::string_view name) const;
  /// The view of `name`, or nullopt.
  std::optional<SafetensorsView> find(std::string_view name) const;
  /// First byte of the mapping and its size (the whole file).
  const std::byte* mapping() const { return base_; }
  std::size_t mapping_size() const { return size_; }

 private:
  SafetensorsFile() = default;
  SafetensorsView view(const SafetensorsEntry& e) const;

  std::string path_;
  std::byte* base_ = nullptr;
  std::size_t size_ = 0;
  SafetensorsHeader header_;
  std::map<std::string, std::size_t, std::less<>> index_;  // name -> entries_ position
};

/// A logical checkpoint: one safetensors file, or the shards of a
/// `model.safetensors.index.json`, looked up by tensor name.
class SafetensorsCheckpoint {
 public:
  /// `path` is a .safetensors file, an `*.index.json`, or a directory holding
  /// `model.safetensors.index.json` or `model.safetensors`. The index must map
  /// every name to a shard that holds it, and every tensor of every shard must
  /// be listed (errors name the index, the shard and the tensor).
  static SafetensorsCheckpoint open(const std::string& path,
                                    const SafetensorsReadOptions& options = {});

  /// Tensor names, sorted.
  std::vector<std::string> names() const;
  bool contains(std::string_view name) const { return where_.count(name) > 0; }
  std::size_t size() const { return where_.size(); }
  /// The view of `name`; throws naming the checkpoint and the closest name.
  SafetensorsView at(std::string_view name) const;
  /// The file holding `name` (keeps the mapping alive); throws when absent.
  const std::shared_ptr<const SafetensorsFile>& file_of(std::string_view name) const;
  /// The open shard files (one for an unsharded checkpoint).
  const std::vector<std::shared_ptr<const SafetensorsFile>>& files() const { return files_; }
  /// `metadata` of the index (empty for a single file).
  const std::map<std::string, std::string>& index_metadata() const { return index_metadata_; }
  /// What was opened (file or index path), for messages.
  const std::string& source() const { return source_; }

 private:
  std::string source_;
  std::vector<std::shared_ptr<const SafetensorsFile>> files_;
  std::map<std::string, std::size_t, std::less<>> where_;  // name -> files_ position
  std::map<std::string, std::string> index_metadata_;
};

/// One tensor to write: raw little-endian row-major bytes that the caller keeps alive.
struct SafetensorsTensor {
  std::string name;
  SafetensorsDtype dtype = SafetensorsDtype::F32;
  std::vector<std::int64_t> shape;
  const void* data = nullptr;
  std::size_t nbytes = 0;  ///< must equal numel * bits / 8
};

/// Options of the writer.
struct SafetensorsWriteOptions {
  /// Extra `__metadata__` entries; "format" is "pt" unless given here.
  std::map<std::string, std::string> metadata;
  /// For sharded writes: the largest shard, in tensor bytes. A tensor larger
  /// than this gets a shard of its own. 0 means never shard.
  std::uint64_t max_shard_bytes = 5'000'000'000;
};

/// The header bytes (8-byte length + JSON padded with spaces to a multiple
/// of 8) for `tensors`, and their order in the buffer. Layout matches the
/// reference writer: sorted by dtype alignment (descending), then by name;
/// offsets contiguous; `__metadata__` first.
struct SafetensorsLayout {
  std::string header;                 ///< bytes [0, 8 + N)
  std::vector<std::size_t> order;     ///< indices into `tensors`, in buffer order
  std::uint64_t buffer_bytes = 0;
};
SafetensorsLayout plan_safetensors(const std::vector<SafetensorsTensor>& tensors,
                                   const SafetensorsWriteOptions& options = {});

/// Writes one safetensors file atomically (temporary file in the same
/// directory, fsync, rename, fsync of the directory). Names must be unique
/// and non-empty, sizes consistent with dtype and shape.
void write_safetensors(const std::string& path, const std::vector<SafetensorsTensor>& tensors,
                       const SafetensorsWriteOptions& options = {});

/// The whole file in memory (for small files and tests).
std::string serialize_safetensors(const std::vector<SafetensorsTensor>& tensors,
                                  const SafetensorsWriteOptions& options = {});

/// Writes a Hugging Face checkpoint into directory `dir`: `model.safetensors`
/// when everything fits in `options.max_shard_bytes` (or it is 0), else shards
/// `model-0000k-of-0000n.safetensors` filled greedily in the given order plus
/// `model.safetensors.index.json` ({"metadata": {"total_size": bytes},
/// "weight_map": {name: shard}}). Returns the files written (names only).
std::vector<std::string> write_safetensors_checkpoint(const std::string& dir,
                                                      const std::vector<SafetensorsTensor>& tensors,
                                                      const SafetensorsWriteOptions& options = {});

/// As above for tensors too large to hold at once: `specs` give every tensor's
/// name, dtype, shape and nbytes (their data is ignored); `load(first, last)`
/// is called once per shard, in order, and returns tensors [first, last) of
/// `specs` with data that stays valid until the next call. Only one shard's
/// data is needed at a time.
std::vector<std::string> write_safetensors_checkpoint(
    const std::string& dir, const std::vector<SafetensorsTensor>& specs,
    const std::function<std::vector<SafetensorsTensor>(std::size_t first, std::size_t last)>& load,
    const SafetensorsWriteOptions& options = {});

}  // namespace rhine
