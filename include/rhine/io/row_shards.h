#pragma once
/// \file
/// Row-sharded tensor files: how a sharded training run (rhine/dist/fsdp.h)
/// saves its parameters and optimizer state without gathering anything on one
/// rank, and how a run with another layout reads them back.
///
/// Every rank writes the rows it holds of each tensor into its own safetensors
/// file; rank 0 then merges the ranks' descriptors into `shards.json`:
///
///     shard-00000-of-00004.safetensors   rank 0's pieces (key = tensor name)
///     ...
///     shard-00003-of-00004.safetensors
///     shards.json   {"format": "rhine-row-shards", "version": 1, "world_size": 4,
///                    "tensors": {"<name>": {"shape": [R, ...], "dtype": "F32",
///                                 "pieces": [{"file": "shard-00000-of-00004.safetensors",
///                                             "rows": [0, 3]}, ...]}, ...}}
///
/// The pieces of a tensor tile its rows [0, R) exactly (checked when the index
/// is written and when it is read). A scalar counts as one row.
///
/// RowReader reads any row range of any tensor, from such a directory or from
/// plain safetensors (a file, an HF index, a directory with model.safetensors:
/// each tensor then is one piece holding all its rows), through the memory
/// mapping: reading rows [a, b) touches only those rows' pages. That is what
/// resharding is: a run with N' ranks asks each tensor for its own rows.
///
///     auto d = rhine::io::write_row_shard(dir, world.rank(), world.world_size(), pieces);
///     auto all = world.host_all_gather_bytes(d.dump());            // every rank's descriptor
///     if (world.is_main()) rhine::io::write_row_index(dir, parse_each(all));
///     ...
///     auto reader = rhine::io::RowReader::open(dir);
///     at::Tensor mine = reader.rows("model.embed_tokens.weight", 1000, 2000);

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "rhine/core/json.h"
#include "rhine/formats/safetensors.h"

namespace rhine::io {

/// Rows [row_begin, row_begin + rows.size(0)) of tensor `name`, whose whole
/// shape is `shape` (a scalar: shape {} and one row).
struct RowPiece {
  std::string name;
  at::Tensor rows;
  std::vector<std::int64_t> shape;
  std::int64_t row_begin = 0;
};

/// "shard-00003-of-00004.safetensors".
std::string row_shard_file_name(int rank, int world_size);

/// Writes `pieces` (this rank's; any device, copied to CPU) into
/// dir/row_shard_file_name(rank, world_size), atomically and fsynced, and
/// returns its descriptor for write_row_index. Throws rhine::Error "[row_shards]"
/// for a piece whose rows do not fit its shape, or a name given twice.
Json write_row_shard(const std::string& dir, int rank, int world_size, const std::vector<RowPiece>& pieces);

/// Merges every rank's descriptor (in rank order) into dir/shards.json
/// (atomically). `extra` is stored under "meta". Throws rhine::Error when a
/// tensor's pieces overlap, leave rows uncovered, or disagree on shape or dtype.
void write_row_index(const std::string& dir, const std::vector<Json>& descriptors, const Json& extra = Json::object());

/// Reads row ranges of tensors from row shards or plain safetensors.
class RowReader {
 public:
  /// `path`: a directory with shards.json (row shards), or anything
  /// SafetensorsCheckpoint::open takes. Throws rhine::Error naming the file.
  static RowReader open(const std::string& path);

  /// Tensor names, sorted.
  std::vector<std::string> names() const;
  /// The names that start with `prefix`, without it, sorted ("optim/" gives
  /// the "<param>/<slot>" keys of an optimizer state).
  std::vector<std::string> names(const std::string& prefix) const;
  bool contains(const std::string& name) const { return tensors_.count(name) > 0; }
  /// The whole shape of `name`; throws when absent.
  const std::vector<std::int64_t>& shape(const std::string& name) const;
  /// The stored dtype of `name`.
  at::ScalarType dtype(const std::string& name) const;
  /// Rows of `name` (1 for a scalar).
  std::int64_t num_rows(const std::string& name) const;
  /// Rows [begin, end) of `name` as a new contiguous CPU tensor of the stored
  /// dtype, shape {end - begin, shape[1:]...} (a scalar: its shape {}).
  at::Tensor rows(const std::string& name, std::int64_t begin, std::int64_t end) const;
  /// The whole tensor (rows(name, 0, num_rows(name))).
  at::Tensor whole(const std::string& name) const;
  /// "meta" of shards.json (empty for plain safetensors).
  const Json& meta() const { return meta_; }
  /// Whether `path` held row shards (shards.json).
  bool row_sharded() const { return row_sharded_; }

 private:
  static RowReader open_unchecked(const std::string& path);
  struct Piece {
    std::shared_ptr<const SafetensorsFile> file;
    std::int64_t begin = 0, end = 0;
  };
  struct Entry {
    std::vector<std::int64_t> shape;
    std::vector<Piece> pieces;  ///< sorted by begin, tiling [0, rows)
  };
  std::string source_;
  std::map<std::string, Entry> tensors_;
  Json meta_ = Json::object();
  bool row_sharded_ = false;
};

}  // namespace rhine::io
