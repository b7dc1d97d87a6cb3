#include "rhine/formats/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <limits>
#include <random>
#include <set>

#include <nlohmann/json.hpp>

#include "rhine/core/error.h"
#include "rhine/core/file.h"
#include "rhine/core/json.h"

namespace rhine {
namespace {

constexpr const char* kComponent = "safetensors";
namespace fs = std::filesystem;

struct DtypeInfo {
  SafetensorsDtype dtype;
  std::string_view name;
  std::size_t bits;
};

constexpr DtypeInfo kDtypes[] = {
    {SafetensorsDtype::BOOL, "BOOL", 8},         {SafetensorsDtype::U8, "U8", 8},
    {SafetensorsDtype::I8, "I8", 8},             {SafetensorsDtype::I16, "I16", 16},
    {SafetensorsDtype::U16, "U16", 16},          {SafetensorsDtype::F16, "F16", 16},
    {SafetensorsDtype::BF16, "BF16", 16},        {SafetensorsDtype::I32, "I32", 32},
    {SafetensorsDtype::U32, "U32", 32},          {SafetensorsDtype::F32, "F32", 32},
    {SafetensorsDtype::F64, "F64", 64},          {SafetensorsDtype::I64, "I64", 64},
    {SafetensorsDtype::U64, "U64", 64},          {SafetensorsDtype::C64, "C64", 64},
    {SafetensorsDtype::F8_E4M3, "F8_E4M3", 8},   {SafetensorsDtype::F8_E5M2, "F8_E5M2", 8},
    {SafetensorsDtype::F8_E8M0, "F8_E8M0", 8},   {SafetensorsDtype::F8_E4M3FNUZ, "F8_E4M3FNUZ", 8},
    {SafetensorsDtype::F8_E5M2FNUZ, "F8_E5M2FNUZ", 8}, {SafetensorsDtype::F4, "F4", 4},
    {SafetensorsDtype::F6_E2M3, "F6_E2M3", 6},   {SafetensorsDtype::F6_E3M2, "F6_E3M2", 6},
};

const DtypeInfo& info(SafetensorsDtype d) { return kDtypes[static_cast<std::size_t>(d)]; }

std::string os_error() { return std::strerror(errno); }

struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

// "in FILE" or "in FILE, tensor "NAME"": where an error happened.
std::string where(std::string_view source, std::string_view tensor = {}) {
  std::string s = "in " + std::string(source);
  if (!tensor.empty()) s += ", tensor " + detail::quote(tensor);
  return s;
}

std::string dims(const std::vector<std::int64_t>& shape) { return detail::display(shape); }

// The closest name for "did you mean" hints.
template <class Map>
std::string closest_hint(const Map& names, std::string_view name) {
  std::string best;
  std::size_t best_d = std::numeric_limits<std::size_t>::max();
  for (const auto& kv : names) {
    std::size_t d = edit_distance(kv.first, name);
    if (d < best_d) best_d = d, best = kv.first;
  }
  if (best.empty()) return "the file holds no tensors";
  return "did you mean " + detail::quote(best) + "? (" + std::to_string(names.size()) + " tensors)";
}

// Thrown by the parser callback to stop at a nesting depth no header has.
struct TooDeep {};

// Parses JSON, rejecting duplicate keys in any object (nlohmann keeps the
// last one silently; the spec forbids duplicates) and nesting deeper than a
// header's three levels (object -> entry -> shape array), which would only
// cost time and memory.
Json parse_header_json(std::string_view text, std::string_view source) {
  constexpr int kMaxDepth = 3;
  std::vector<std::set<std::string>> keys;
  std::string duplicate;
  int depth = 0;
  Json::parser_callback_t cb = [&](int /*depth*/, Json::parse_event_t event, Json& parsed) {
    switch (event) {
      case Json::parse_event_t::object_start:
        keys.emplace_back();
        [[fallthrough]];
      case Json::parse_event_t::array_start:
        if (++depth > kMaxDepth) throw TooDeep{};
        break;
      case Json::parse_event_t::object_end:
        if (!keys.empty()) keys.pop_back();
        [[fallthrough]];
      case Json::parse_event_t::array_end:
        --depth;
        break;
      case Json::parse_event_t::key:
        if (!keys.empty() && !keys.back().insert(parsed.get<std::string>()).second &&
            duplicate.empty())
          duplicate = parsed.get<std::string>();
        break;
      default:
        break;
    }
    return true;
  };
  Json j;
  try {
    j = Json::parse(text.begin(), text.end(), cb);
  } catch (const Json::exception& e) {
    RHINE_FAIL(kComponent, "invalid JSON header " + where(source), Verbatim{e.what()},
               "the file is corrupt or not a safetensors file");
  } catch (const TooDeep&) {
    RHINE_FAIL(kComponent, "header nests deeper than a safetensors header can " + where(source),
               kMaxDepth + 1, "the file is corrupt or not a safetensors file");
  }
  RHINE_CHECK(duplicate.empty(), kComponent, "duplicate key in the header " + where(source, duplicate),
              duplicate, "each tensor name (and each field) may appear once");
  return j;
}

std::uint64_t read_u64(const Json& v, std::string_view source, std::string_view tensor,
                       std::string_view field) {
  RHINE_CHECK(v.is_number_unsigned(), kComponent,
              "\"" + std::string(field) + "\" must hold non-negative integers " + where(source, tensor),
              Verbatim{v.dump()}, "the header is corrupt");
  return v.get<std::uint64_t>();
}

SafetensorsEntry parse_entry(const std::string& name, const Json& v, std::uint64_t buffer_bytes,
                             std::string_view source) {
  RHINE_CHECK(v.is_object(), kComponent, "tensor entry must be an object " + where(source, name),
              Verbatim{v.dump().substr(0, 200)}, "expected {\"dtype\", \"shape\", \"data_offsets\"}");
  for (const auto& kv : v.items()) {
    RHINE_CHECK(kv.key() == "dtype" || kv.key() == "shape" || kv.key() == "data_offsets",
                kComponent, "unknown field in tensor entry " + where(source, name), kv.key(),
                "allowed fields are dtype, shape and data_offsets");
  }
  for (const char* field : {"dtype", "shape", "data_offsets"}) {
    RHINE_CHECK(v.contains(field), kComponent,
                std::string("tensor entry lacks \"") + field + "\" " + where(source, name),
                Verbatim{v.dump().substr(0, 200)}, "the header is corrupt");
  }
  SafetensorsEntry e;
  e.name = name;
  const Json& dt = v["dtype"];
  RHINE_CHECK(dt.is_string(), kComponent, "dtype must be a string " + where(source, name),
              Verbatim{dt.dump()}, "e.g. \"F32\" or \"BF16\"");
  auto d = dtype_from_name(dt.get<std::string>());
  std::vector<std::string_view> known;
  for (const auto& i : kDtypes) known.push_back(i.name);
  RHINE_CHECK(d.has_value(), kComponent, "unknown dtype " + where(source, name), dt.get<std::string>(),
              "known dtypes: " + detail::display(known));
  e.dtype = *d;

  const Json& shape = v["shape"];
  RHINE_CHECK(shape.is_array(), kComponent, "shape must be an array " + where(source, name),
              Verbatim{shape.dump()}, "e.g. [4096, 4096], or [] for a scalar");
  // numel * bits must fit in 64 bits (and dims in int64).
  std::uint64_t bits = info(e.dtype).bits;
  for (const auto& dim : shape) {
    std::uint64_t n = read_u64(dim, source, name, "shape");
    RHINE_CHECK(n <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()), kComponent,
                "shape dimension too large " + where(source, name), n, "the header is corrupt");
    e.shape.push_back(static_cast<std::int64_t>(n));
    RHINE_CHECK(!__builtin_mul_overflow(bits, n, &bits), kComponent,
                "shape is too large (overflows 64 bits) " + where(source, name), Verbatim{shape.dump()},
                "the header is corrupt");
  }
  const Json& off = v["data_offsets"];
  RHINE_CHECK(off.is_array() && off.size() == 2, kComponent,
              "data_offsets must be [begin, end] " + where(source, name), Verbatim{off.dump()},
              "the header is corrupt");
  e.begin = read_u64(off[0], source, name, "data_offsets");
  e.end = read_u64(off[1], source, name, "data_offsets");
  RHINE_CHECK(e.begin <= e.end, kComponent, "data_offsets begin > end " + where(source, name),
              (std::vector<std::uint64_t>{e.begin, e.end}), "the header is corrupt");
  RHINE_CHECK(e.end <= buffer_bytes, kComponent,
              "data_offsets run past the end of the file " + where(source, name),
              (std::vector<std::uint64_t>{e.begin, e.end}),
              "the byte buffer holds " + std::to_string(buffer_bytes) +
                  " bytes; the file is truncated or the header is corrupt");
  const std::uint64_t nbits = bits;
  RHINE_CHECK(nbits % 8 == 0, kComponent,
              "shape " + dims(e.shape) + " of " + std::string(info(e.dtype).name) +
                  " is not a whole number of bytes " + where(source, name),
              nbits, "sub-byte dtypes need numel * bits divisible by 8");
  RHINE_CHECK(nbits / 8 == e.end - e.begin, kComponent,
              "shape " + dims(e.shape) + " of " + std::string(info(e.dtype).name) + " needs " +
                  std::to_string(nbits / 8) + " bytes but data_offsets span a different size " +
                  where(source, name),
              e.end - e.begin, "the shape, dtype or offsets are corrupt");
  return e;
}

// Creates a temporary file next to `path`, and renames it into place on commit().
class AtomicWriter {
 public:
  explicit AtomicWriter(const std::string& path) : target_(path) {
    fs::path t(path);
    dir_ = t.has_parent_path() ? t.parent_path() : fs::path(".");
    std::random_device rd;
    tmp_ = dir_ / ("." + t.filename().string() + ".tmp." + std::to_string(::getpid()) + "." +
                   std::to_string(rd()));
    fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    RHINE_CHECK(fd_ >= 0, kComponent, "cannot create temporary file", tmp_.string(),
                os_error() + "; check the directory exists and is writable");
  }
  ~AtomicWriter() {
    if (fd_ >= 0) {
      ::close(fd_);
      ::unlink(tmp_.c_str());
    }
  }
  void write(const void* data, std::size_t n) {
    const char* p = static_cast<const char*>(data);
    while (n > 0) {
      ssize_t w = ::write(fd_, p, std::min<std::size_t>(n, 1u << 30));
      if (w < 0 && errno == EINTR) continue;
      RHINE_CHECK(w > 0, kComponent, "write failed", tmp_.string(), os_error() + "; is the disk full?");
      p += w;
      n -= static_cast<std::size_t>(w);
    }
  }
  void commit() {
    RHINE_CHECK(::fsync(fd_) == 0, kComponent, "fsync failed", tmp_.string(), os_error());
    int fd = fd_;
    fd_ = -1;
    RHINE_CHECK(::close(fd) == 0, kComponent, "close failed", tmp_.string(), os_error());
    if (::rename(tmp_.c_str(), target_.c_str()) != 0) {
      std::string err = os_error();
      ::unlink(tmp_.c_str());
      RHINE_FAIL(kComponent, "cannot rename temporary file into place", target_, err);
    }
    fsync_directory(dir_.string());
  }

 private:
  std::string target_;
  fs::path dir_, tmp_;
  int fd_ = -1;
};

void check_tensors(const std::vector<SafetensorsTensor>& tensors) {
  std::set<std::string_view> seen;
  for (const auto& t : tensors) {
    RHINE_CHECK(!t.name.empty(), kComponent, "cannot write a tensor with an empty name", t.name,
                "give every tensor a name");
    RHINE_CHECK(t.name != "__metadata__", kComponent, "tensor name is reserved", t.name,
                "rename the tensor");
    RHINE_CHECK(seen.insert(t.name).second, kComponent, "duplicate tensor name", t.name,
                "names must be unique within a file");
    std::uint64_t bits = info(t.dtype).bits;
    for (auto d : t.shape) {
      RHINE_CHECK(d >= 0, kComponent, "negative dimension in shape of tensor " + detail::quote(t.name),
                  dims(t.shape), "dimensions must be >= 0");
      RHINE_CHECK(!__builtin_mul_overflow(bits, static_cast<std::uint64_t>(d), &bits), kComponent,
                  "shape too large for tensor " + detail::quote(t.name), dims(t.shape), "");
    }
    RHINE_CHECK(bits % 8 == 0 && bits / 8 == t.nbytes, kComponent,
                "byte size does not match shape " + dims(t.shape) + " and dtype " +
                    std::string(info(t.dtype).name) + " for tensor " + detail::quote(t.name),
                t.nbytes, "pass numel * bits / 8 bytes of row-major data");
    RHINE_CHECK(t.data != nullptr || t.nbytes == 0, kComponent,
                "null data pointer for tensor " + detail::quote(t.name), t.nbytes, "");
  }
}

}  // namespace

std::string_view dtype_name(SafetensorsDtype dtype) { return info(dtype).name; }

std::optional<SafetensorsDtype> dtype_from_name(std::string_view name) {
  for (const auto& i : kDtypes)
    if (i.name == name) return i.dtype;
  return std::nullopt;
}

std::size_t dtype_bits(SafetensorsDtype dtype) { return info(dtype).bits; }

bool is_float8(SafetensorsDtype d) {
  return d == SafetensorsDtype::F8_E4M3 || d == SafetensorsDtype::F8_E5M2 ||
         d == SafetensorsDtype::F8_E8M0 || d == SafetensorsDtype::F8_E4M3FNUZ ||
         d == SafetensorsDtype::F8_E5M2FNUZ;
}

std::int64_t SafetensorsEntry::numel() const {
  std::int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

SafetensorsHeader parse_safetensors(std::string_view bytes, std::string_view source,
                                    const SafetensorsReadOptions& options) {
  RHINE_CHECK(bytes.size() >= 8, kComponent,
              "file is too short for the 8-byte header length " + where(source), bytes.size(),
              "the file is empty, truncated or not a safetensors file");
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[i]);
  RHINE_CHECK(n <= options.max_header_bytes, kComponent, "header length is absurd " + where(source), n,
              "the limit is " + std::to_string(options.max_header_bytes) +
                  " bytes; the file is corrupt or not a safetensors file");
  RHINE_CHECK(n <= bytes.size() - 8, kComponent,
              "header length runs past the end of the file " + where(source), n,
              "the file holds " + std::to_string(bytes.size()) + " bytes; it is truncated");
  std::string_view text = bytes.substr(8, static_cast<std::size_t>(n));
  RHINE_CHECK(!text.empty() && text[0] == '{', kComponent,
              "header must start with '{' " + where(source), Verbatim{std::string(text.substr(0, 40))},
              "the file is corrupt or not a safetensors file");

  SafetensorsHeader h;
  h.header_bytes = n;
  const std::uint64_t buffer_bytes = bytes.size() - 8 - n;
  Json j = parse_header_json(text, source);
  RHINE_CHECK(j.is_object(), kComponent, "header must be a JSON object " + where(source),
              Verbatim{j.dump().substr(0, 80)}, "the file is corrupt");
  for (const auto& kv : j.items()) {
    if (kv.key() == "__metadata__") {
      RHINE_CHECK(kv.value().is_object(), kComponent, "__metadata__ must be an object " + where(source),
                  Verbatim{kv.value().dump().substr(0, 80)}, "expected {\"format\": \"pt\", ...}");
      for (const auto& m : kv.value().items()) {
        RHINE_CHECK(m.value().is_string(), kComponent,
                    "__metadata__ values must be strings " + where(source) + ", key " +
                        detail::quote(m.key()),
                    Verbatim{m.value().dump().substr(0, 80)}, "store numbers as strings");
        h.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    h.entries.push_back(parse_entry(kv.key(), kv.value(), buffer_bytes, source));
  }
  std::sort(h.entries.begin(), h.entries.end(), [](const auto& a, const auto& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  std::uint64_t at = 0;
  const SafetensorsEntry* prev = nullptr;
  for (const auto& e : h.entries) {
    RHINE_CHECK(e.begin >= at, kComponent,
                "tensor data overlaps " + (prev ? "tensor " + detail::quote(prev->name) : std::string()) +
                    " " + where(source, e.name),
                (std::vector<std::uint64_t>{e.begin, e.end}),
                "the previous tensor ends at " + std::to_string(at) + "; the header is corrupt");
    RHINE_CHECK(e.begin == at, kComponent, "hole in the byte buffer before " + where(source, e.name),
                (std::vector<std::uint64_t>{e.begin, e.end}),
                "bytes [" + std::to_string(at) + ", " + std::to_string(e.begin) +
                    ") belong to no tensor; the spec requires full coverage");
    at = e.end;
    prev = &e;
  }
  RHINE_CHECK(at == buffer_bytes, kComponent,
              "the byte buffer has bytes that belong to no tensor " + where(source),
              (std::vector<std::uint64_t>{at, buffer_bytes}),
              "tensors end at the first value but the buffer holds the second; the file has trailing "
              "bytes or a missing tensor");
  return h;
}

// --- SafetensorsFile -------------------------------------------------------------------------

std::shared_ptr<const SafetensorsFile> SafetensorsFile::open(const std::string& path,
                                                             const SafetensorsReadOptions& options) {
  Fd f{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  RHINE_CHECK(f.fd >= 0, kComponent, "cannot open file for reading", path, os_error() + "; check the path");
  struct stat st {};
  RHINE_CHECK(::fstat(f.fd, &st) == 0, kComponent, "cannot stat file", path, os_error());
  RHINE_CHECK(S_ISREG(st.st_mode), kComponent, "expected a regular file", path,
              "pass a .safetensors file (SafetensorsCheckpoint::open takes directories)");
  std::shared_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->size_ = static_cast<std::size_t>(st.st_size);
  RHINE_CHECK(file->size_ >= 8, kComponent, "file is too short for the 8-byte header length " + where(path),
              file->size_, "the file is empty, truncated or not a safetensors file");
  const int prot = options.writable ? (PROT_READ | PROT_WRITE) : PROT_READ;
  void* p = ::mmap(nullptr, file->size_, prot, MAP_PRIVATE, f.fd, 0);
  RHINE_CHECK(p != MAP_FAILED, kComponent, "cannot memory-map file", path, os_error());
  file->base_ = static_cast<std::byte*>(p);
  file->header_ = parse_safetensors(
      std::string_view(reinterpret_cast<const char*>(file->base_), file->size_), path, options);
  for (std::size_t i = 0; i < file->header_.entries.size(); ++i)
    file->index_.emplace(file->header_.entries[i].name, i);
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (base_) ::munmap(base_, size_);
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  for (const auto& kv : index_) out.push_back(kv.first);
  return out;
}

SafetensorsView SafetensorsFile::view(const SafetensorsEntry& e) const {
  return {&e, base_ + 8 + header_.header_bytes + e.begin};
}

std::optional<SafetensorsView> SafetensorsFile::find(std::string_view name) const {
  auto it = index_.find(name);
  if (it == index_.end()) return std::nullopt;
  return view(header_.entries[it->second]);
}

SafetensorsView SafetensorsFile::at(std::string_view name) const {
  auto it = index_.find(name);
  if (it == index_.end())
    RHINE_FAIL(kComponent, "no such tensor " + where(path_), name, closest_hint(index_, name));
  return view(header_.entries[it->second]);
}

// --- SafetensorsCheckpoint -------------------------------------------------------------------

SafetensorsCheckpoint SafetensorsCheckpoint::open(const std::string& path,
                                                  const SafetensorsReadOptions& options) {
  SafetensorsCheckpoint c;
  fs::path p(path);
  std::error_code ec;
  if (fs::is_directory(p, ec)) {
    if (fs::exists(p / "model.safetensors.index.json"))
      p = p / "model.safetensors.index.json";
    else if (fs::exists(p / "model.safetensors"))
      p = p / "model.safetensors";
    else
      RHINE_FAIL(kComponent, "directory holds neither model.safetensors.index.json nor model.safetensors",
                 path, "pass the file or index to open");
  }
  c.source_ = p.string();
  const std::string fname = p.filename().string();
  const bool is_index = fname.size() > 5 && fname.compare(fname.size() - 5, 5, ".json") == 0;
  if (!is_index) {
    c.files_.push_back(SafetensorsFile::open(c.source_, options));
    for (const auto& e : c.files_[0]->entries()) c.where_.emplace(e.name, 0);
    return c;
  }
  Json j = read_json_file(c.source_, kComponent);
  RHINE_CHECK(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(), kComponent,
              "index has no \"weight_map\" object " + where(c.source_), Verbatim{j.dump().substr(0, 120)},
              "expected {\"metadata\": {...}, \"weight_map\": {name: shard file}}");
  if (j.contains("metadata") && j["metadata"].is_object()) {
    for (const auto& m : j["metadata"].items())
      c.index_metadata_[m.key()] = m.value().is_string() ? m.value().get<std::string>() : m.value().dump();
  }
  const fs::path dir = p.parent_path();
  std::map<std::string, std::size_t> shard_pos;
  for (const auto& kv : j["weight_map"].items()) {
    RHINE_CHECK(kv.value().is_string(), kComponent,
                "weight_map values must be shard file names " + where(c.source_, kv.key()),
                Verbatim{kv.value().dump().substr(0, 80)}, "the index is corrupt");
    const std::string shard = kv.value().get<std::string>();
    fs::path sp(shard);
    bool safe = !shard.empty() && sp.is_relative();
    for (const auto& part : sp) safe = safe && part != "..";
    RHINE_CHECK(safe, kComponent, "shard path must be a relative path inside the checkpoint directory " +
                                      where(c.source_, kv.key()),
                shard, "the index is corrupt or malicious");
    auto it = shard_pos.find(shard);
    if (it == shard_pos.end()) {
      it = shard_pos.emplace(shard, c.files_.size()).first;
      c.files_.push_back(SafetensorsFile::open((dir / sp).string(), options));
    }
    RHINE_CHECK(c.files_[it->second]->contains(kv.key()), kComponent,
                "the index maps a tensor to a shard that does not hold it " + where(c.source_, kv.key()),
                shard, "the index and the shards are out of sync");
    c.where_.emplace(kv.key(), it->second);
  }
  for (const auto& f : c.files_) {
    for (const auto& e : f->entries()) {
      auto w = c.where_.find(e.name);
      RHINE_CHECK(w != c.where_.end() && c.files_[w->second] == f, kComponent,
                  "shard " + f->path() + " holds a tensor the index does not list " +
                      where(c.source_, e.name),
                  e.name, "the index and the shards are out of sync");
    }
  }
  return c;
}

std::vector<std::string> SafetensorsCheckpoint::names() const {
  std::vector<std::string> out;
  for (const auto& kv : where_) out.push_back(kv.first);
  return out;
}

const std::shared_ptr<const SafetensorsFile>& SafetensorsCheckpoint::file_of(std::string_view name) const {
  auto it = where_.find(name);
  if (it == where_.end())
    RHINE_FAIL(kComponent, "no such tensor " + where(source_), name, closest_hint(where_, name));
  return files_[it->second];
}

SafetensorsView SafetensorsCheckpoint::at(std::string_view name) const {
  return file_of(name)->at(name);
}

// --- writer ----------------------------------------------------------------------------------

SafetensorsLayout plan_safetensors(const std::vector<SafetensorsTensor>& tensors,
                                   const SafetensorsWriteOptions& options) {
  check_tensors(tensors);
  SafetensorsLayout l;
  l.order.resize(tensors.size());
  for (std::size_t i = 0; i < tensors.size(); ++i) l.order[i] = i;
  // Widest dtype first keeps every tensor aligned to its element size.
  std::sort(l.order.begin(), l.order.end(), [&](std::size_t a, std::size_t b) {
    const auto ba = dtype_bits(tensors[a].dtype), bb = dtype_bits(tensors[b].dtype);
    return ba != bb ? ba > bb : tensors[a].name < tensors[b].name;
  });
  nlohmann::ordered_json h = nlohmann::ordered_json::object();
  nlohmann::ordered_json meta = nlohmann::ordered_json::object();
  meta["format"] = "pt";
  for (const auto& kv : options.metadata) meta[kv.first] = kv.second;
  h["__metadata__"] = meta;
  for (std::size_t i : l.order) {
    const auto& t = tensors[i];
    h[t.name] = {{"dtype", std::string(dtype_name(t.dtype))},
                 {"shape", t.shape},
                 {"data_offsets", {l.buffer_bytes, l.buffer_bytes + t.nbytes}}};
    l.buffer_bytes += t.nbytes;
  }
  std::string json;
  try {
    json = h.dump();
  } catch (const nlohmann::json::exception& e) {
    RHINE_FAIL(kComponent, "cannot serialise the header", Verbatim{e.what()},
               "tensor names and metadata must be valid UTF-8");
  }
  json.append((8 - json.size() % 8) % 8, ' ');
  std::uint64_t n = json.size();
  l.header.resize(8);
  for (int i = 0; i < 8; ++i) l.header[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  l.header += json;
  return l;
}

std::string serialize_safetensors(const std::vector<SafetensorsTensor>& tensors,
                                  const SafetensorsWriteOptions& options) {
  SafetensorsLayout l = plan_safetensors(tensors, options);
  std::string out = std::move(l.header);
  out.reserve(out.size() + l.buffer_bytes);
  for (std::size_t i : l.order)
    out.append(static_cast<const char*>(tensors[i].data), tensors[i].nbytes);
  return out;
}

void write_safetensors(const std::string& path, const std::vector<SafetensorsTensor>& tensors,
                       const SafetensorsWriteOptions& options) {
  SafetensorsLayout l = plan_safetensors(tensors, options);
  AtomicWriter w(path);
  w.write(l.header.data(), l.header.size());
  for (std::size_t i : l.order) w.write(tensors[i].data, tensors[i].nbytes);
  w.commit();
}

std::vector<std::string> write_safetensors_checkpoint(const std::string& dir,
                                                      const std::vector<SafetensorsTensor>& tensors,
                                                      const SafetensorsWriteOptions& options) {
  check_tensors(tensors);
  return write_safetensors_checkpoint(
      dir, tensors,
      [&](std::size_t first, std::size_t last) {
        return std::vector<SafetensorsTensor>(tensors.begin() + static_cast<std::ptrdiff_t>(first),
                                              tensors.begin() + static_cast<std::ptrdiff_t>(last));
      },
      options);
}

std::vector<std::string> write_safetensors_checkpoint(
    const std::string& dir, const std::vector<SafetensorsTensor>& specs,
    const std::function<std::vector<SafetensorsTensor>(std::size_t first, std::size_t last)>& load,
    const SafetensorsWriteOptions& options) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  RHINE_CHECK(!ec, kComponent, "cannot create checkpoint directory", dir, ec.message());
  // Shards filled greedily in the given order: [begin, end) of specs each.
  std::vector<std::pair<std::size_t, std::size_t>> shards{{0, 0}};
  std::uint64_t in_shard = 0, total = 0;
  for (std::size_t i = 0; i < specs.size(); ++i) {
    const auto& t = specs[i];
    if (options.max_shard_bytes > 0 && shards.back().second > shards.back().first &&
        in_shard + t.nbytes > options.max_shard_bytes) {
      shards.emplace_back(i, i);
      in_shard = 0;
    }
    shards.back().second = i + 1;
    in_shard += t.nbytes;
    total += t.nbytes;
  }
  auto shard_tensors = [&](std::size_t k) {
    auto got = load(shards[k].first, shards[k].second);
    RHINE_CHECK(got.size() == shards[k].second - shards[k].first, kComponent,
                "the shard loader returned the wrong number of tensors", got.size(), "");
    for (std::size_t j = 0; j < got.size(); ++j) {
      const auto& want = specs[shards[k].first + j];
      RHINE_CHECK(got[j].name == want.name && got[j].dtype == want.dtype && got[j].shape == want.shape &&
                      got[j].nbytes == want.nbytes,
                  kComponent, "the shard loader returned another tensor than announced", got[j].name,
                  "expected " + want.name);
    }
    check_tensors(got);
    return got;
  };
  std::vector<std::string> written;
  if (shards.size() == 1) {
    write_safetensors((fs::path(dir) / "model.safetensors").string(), shard_tensors(0), options);
    written.push_back("model.safetensors");
    // A stale index from an earlier sharded save would shadow the new file.
    fs::remove(fs::path(dir) / "model.safetensors.index.json", ec);
    return written;
  }
  Json weight_map = Json::object();
  char name[64];
  for (std::size_t k = 0; k < shards.size(); ++k) {
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", k + 1, shards.size());
    write_safetensors((fs::path(dir) / name).string(), shard_tensors(k), options);
    written.push_back(name);
    for (std::size_t i = shards[k].first; i < shards[k].second; ++i) weight_map[specs[i].name] = name;
  }
  Json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
  write_json_file((fs::path(dir) / "model.safetensors.index.json").string(), index);
  written.push_back("model.safetensors.index.json");
  return written;
}

}  // namespace rhine
