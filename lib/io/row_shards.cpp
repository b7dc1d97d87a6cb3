#include "rhine/io/row_shards.h"

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <algorithm>
#include <filesystem>
#include <set>

#include "rhine/core/error.h"
#include "rhine/core/file.h"
#include "rhine/io/safetensors.h"
#include "pages.h"

namespace rhine::io {

namespace fs = std::filesystem;

namespace {

constexpr const char* kComponent = "row_shards";
constexpr const char* kIndex = "shards.json";

std::int64_t rows_of(const std::vector<std::int64_t>& shape) { return shape.empty() ? 1 : shape[0]; }

}  // namespace

std::string row_shard_file_name(int rank, int world_size) {
  return fmt::format("shard-{:05d}-of-{:05d}.safetensors", rank, world_size);
}

Json write_row_shard(const std::string& dir, int rank, int world_size, const std::vector<RowPiece>& pieces) {
  RHINE_CHECK(rank >= 0 && rank < world_size, kComponent, "rank out of range", rank,
              "pass the World's rank and world_size");
  std::map<std::string, at::Tensor> tensors;
  Json desc = {{"file", row_shard_file_name(rank, world_size)}, {"tensors", Json::object()}};
  for (const auto& p : pieces) {
    RHINE_CHECK(!tensors.count(p.name), kComponent, "a tensor given twice in one rank's pieces", p.name,
                "each rank holds one contiguous row range per tensor");
    const std::int64_t R = rows_of(p.shape);
    std::vector<std::int64_t> want = p.shape;
    at::Tensor rows = p.rows;
    if (p.shape.empty()) {
      RHINE_CHECK(p.row_begin == 0 && rows.numel() == 1, kComponent, "a scalar's piece must be its one value",
                  p.name, "");
      rows = rows.reshape({});
    } else {
      want[0] = rows.dim() > 0 ? rows.size(0) : -1;
      RHINE_CHECK(rows.sizes().vec() == want && p.row_begin >= 0 && p.row_begin + rows.size(0) <= R,
                  kComponent, "piece does not fit its tensor: " + p.name + " rows",
                  fmt::format("{} at row {} of shape [{}]", fmt::join(rows.sizes().vec(), "x"), p.row_begin,
                              fmt::join(p.shape, ", ")),
                  "rows must be [n, shape[1:]...] with row_begin + n <= shape[0]");
    }
    tensors[p.name] = rows;
    const std::int64_t n = p.shape.empty() ? 1 : rows.size(0);
    desc["tensors"][p.name] = {{"shape", p.shape},
                               {"dtype", std::string(dtype_name(to_safetensors_dtype(rows.scalar_type())))},
                               {"rows", {p.row_begin, p.row_begin + n}}};
  }
  save_safetensors((fs::path(dir) / row_shard_file_name(rank, world_size)).string(), tensors);
  return desc;
}

void write_row_index(const std::string& dir, const std::vector<Json>& descriptors, const Json& extra) {
  Json tensors = Json::object();
  for (const auto& d : descriptors) {
    const auto file = d.at("file").get<std::string>();
    for (const auto& [name, t] : d.at("tensors").items()) {
      if (!tensors.contains(name)) tensors[name] = {{"shape", t["shape"]}, {"dtype", t["dtype"]}, {"pieces", Json::array()}};
      auto& e = tensors[name];
      RHINE_CHECK(e["shape"] == t["shape"] && e["dtype"] == t["dtype"], kComponent,
                  "ranks disagree on the shape or dtype of", name,
                  fmt::format("{} {} vs {} {}", e["dtype"].dump(), e["shape"].dump(), t["dtype"].dump(), t["shape"].dump()));
      e["pieces"].push_back({{"file", file}, {"rows", t["rows"]}});
    }
  }
  for (auto& [name, e] : tensors.items()) {
    auto& pieces = e["pieces"];
    std::sort(pieces.begin(), pieces.end(),
              [](const Json& a, const Json& b) { return a["rows"][0].get<std::int64_t>() < b["rows"][0].get<std::int64_t>(); });
    std::int64_t next = 0;
    for (const auto& p : pieces) {
      RHINE_CHECK(p["rows"][0].get<std::int64_t>() == next, kComponent,
                  "the ranks' pieces of " + name + " overlap or leave rows out at row", next,
                  "every row must be written by exactly one rank");
      next = p["rows"][1].get<std::int64_t>();
    }
    RHINE_CHECK(next == rows_of(e["shape"].get<std::vector<std::int64_t>>()), kComponent,
                "the ranks' pieces of " + name + " end before its last row", next, "");
  }
  Json index = {{"format", "rhine-row-shards"},
                {"version", 1},
                {"world_size", descriptors.size()},
                {"meta", extra},
                {"tensors", tensors}};
  write_file_atomic((fs::path(dir) / kIndex).string(), index.dump(1));
}

RowReader RowReader::open(const std::string& path) {
  try {
    return open_unchecked(path);
  } catch (const nlohmann::json::exception& e) {  // a field of the wrong type or missing
    RHINE_FAIL(kComponent, "malformed row-shard index in " + path + ":", e.what(),
               "the checkpoint is damaged; resume from another one");
  }
}

RowReader RowReader::open_unchecked(const std::string& path) {
  RowReader r;
  r.source_ = path;
  const fs::path index = fs::path(path) / kIndex;
  if (fs::is_directory(path) && fs::exists(index)) {
    r.row_sharded_ = true;
    const Json j = read_json_file(index.string(), kComponent);
    RHINE_CHECK(j.value("format", "") == "rhine-row-shards" && j.value("version", 0) == 1, kComponent,
                "not a row-shard index of version 1", index.string(), "written by rhine::io::write_row_index");
    r.meta_ = j.value("meta", Json::object());
    std::map<std::string, std::shared_ptr<const SafetensorsFile>> files;
    for (const auto& [name, e] : j.at("tensors").items()) {
      Entry entry;
      entry.shape = e.at("shape").get<std::vector<std::int64_t>>();
      std::int64_t next = 0;
      for (const auto& p : e.at("pieces")) {
        const auto file = p.at("file").get<std::string>();
        RHINE_CHECK(file.find('/') == std::string::npos, kComponent, "a piece names a file outside the directory",
                    file, index.string());
        auto& f = files[file];
        if (!f) f = SafetensorsFile::open((fs::path(path) / file).string());
        Piece piece{f, p.at("rows")[0].get<std::int64_t>(), p.at("rows")[1].get<std::int64_t>()};
        RHINE_CHECK(piece.begin == next && piece.end > piece.begin && f->contains(name), kComponent,
                    "damaged row-shard index: pieces of " + name + " do not tile its rows, or " + file + " lacks it",
                    index.string(), "the checkpoint is damaged; resume from another one");
        std::vector<std::int64_t> stored = entry.shape;
        if (!stored.empty()) stored[0] = piece.end - piece.begin;
        RHINE_CHECK(f->at(name).shape() == stored, kComponent,
                    "damaged row-shard index: " + file + " holds " + name + " in another shape than its rows",
                    index.string(), "the checkpoint is damaged; resume from another one");
        next = piece.end;
        entry.pieces.push_back(piece);
      }
      RHINE_CHECK(next == rows_of(entry.shape), kComponent, "damaged row-shard index: rows of " + name + " missing",
                  index.string(), "the checkpoint is damaged; resume from another one");
      r.tensors_[name] = std::move(entry);
    }
    return r;
  }
  const auto ckpt = SafetensorsCheckpoint::open(path);
  for (const auto& name : ckpt.names()) {
    const auto& file = ckpt.file_of(name);
    Entry entry;
    entry.shape = file->at(name).shape();
    entry.pieces.push_back({file, 0, rows_of(entry.shape)});
    r.tensors_[name] = std::move(entry);
  }
  return r;
}

std::vector<std::string> RowReader::names() const {
  std::vector<std::string> out;
  for (const auto& [name, e] : tensors_) out.push_back(name);
  return out;
}

std::vector<std::string> RowReader::names(const std::string& prefix) const {
  std::vector<std::string> out;
  for (const auto& [name, e] : tensors_)
    if (name.rfind(prefix, 0) == 0) out.push_back(name.substr(prefix.size()));
  return out;
}

const std::vector<std::int64_t>& RowReader::shape(const std::string& name) const {
  auto it = tensors_.find(name);
  RHINE_CHECK(it != tensors_.end(), kComponent, "no tensor named " + name + " in", source_,
              "check the checkpoint belongs to this model");
  return it->second.shape;
}

at::ScalarType RowReader::dtype(const std::string& name) const {
  shape(name);  // throws for an unknown name
  const auto& piece = tensors_.at(name).pieces.front();
  const auto dtype = to_scalar_type(piece.file->at(name).dtype());
  RHINE_CHECK(dtype.has_value(), kComponent, "no LibTorch dtype for the stored type of " + name,
              std::string(dtype_name(piece.file->at(name).dtype())), "");
  return *dtype;
}

std::int64_t RowReader::num_rows(const std::string& name) const { return rows_of(shape(name)); }

at::Tensor RowReader::rows(const std::string& name, std::int64_t begin, std::int64_t end) const {
  const auto& s = shape(name);
  const Entry& e = tensors_.at(name);
  const std::int64_t R = rows_of(s);
  RHINE_CHECK(0 <= begin && begin <= end && end <= R, kComponent, "row range out of bounds for " + name,
              fmt::format("[{}, {}) of {}", begin, end, R), "");
  std::vector<at::Tensor> parts, mapped;  // mapped: the parts that view the file mapping
  for (const auto& p : e.pieces) {
    const std::int64_t a = std::max(begin, p.begin), b = std::min(end, p.end);
    if (a >= b) continue;
    const auto view = p.file->at(name);
    at::Tensor whole = to_tensor(view, p.file);  // zero-copy over the mapping (if aligned)
    if (s.empty()) return whole.clone();
    parts.push_back(whole.narrow(0, a - p.begin, b - a));
    if (whole.data_ptr() == static_cast<const void*>(view.data)) mapped.push_back(parts.back());
  }
  if (s.empty()) RHINE_FAIL(kComponent, "scalar without a piece", name, "");
  if (parts.empty()) {
    std::vector<std::int64_t> shape = s;
    shape[0] = 0;
    return at::empty(shape, at::TensorOptions().dtype(dtype(name)));
  }
  at::Tensor out = parts.size() == 1 ? parts[0].clone() : at::cat(parts);
  // The rows are copied: give their pages of the mapping back, so that a
  // rank reading its rows of every tensor never holds them twice.
  for (const auto& part : mapped) release_pages(part.data_ptr(), part.numel() * part.element_size());
  return out;
}

at::Tensor RowReader::whole(const std::string& name) const { return rows(name, 0, num_rows(name)); }

}  // namespace rhine::io
