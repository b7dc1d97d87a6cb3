#include "rhine/io/checkpoint.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fmt/format.h>

#include "rhine/core/error.h"
#include "rhine/core/file.h"
#include "rhine/core/json.h"

namespace rhine::io {
namespace fs = std::filesystem;
namespace {

constexpr const char* kComponent = "checkpoint";
constexpr const char* kMarker = "COMPLETE.json";
constexpr const char* kFormat = "rhine-checkpoint";

struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

void fsync_file(const fs::path& p) {
  Fd f{::open(p.c_str(), O_RDONLY | O_CLOEXEC)};
  RHINE_CHECK(f.fd >= 0, kComponent, "cannot open file to fsync", p.string(), std::strerror(errno));
  RHINE_CHECK(::fsync(f.fd) == 0, kComponent, "fsync failed", p.string(),
              std::string(std::strerror(errno)) + "; is the disk full?");
}

// xxh3-64 of a whole file, as 16 hex digits.
std::string hash_file(const fs::path& p) {
  Fd f{::open(p.c_str(), O_RDONLY | O_CLOEXEC)};
  RHINE_CHECK(f.fd >= 0, kComponent, "cannot open file to hash", p.string(), std::strerror(errno));
  XXH3_state_t* st = XXH3_createState();
  XXH3_64bits_reset(st);
  std::vector<char> buf(1 << 20);
  for (;;) {
    ssize_t n = ::read(f.fd, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      XXH3_freeState(st);
      RHINE_FAIL(kComponent, "read error while hashing", p.string(), std::strerror(errno));
    }
    if (n == 0) break;
    XXH3_64bits_update(st, buf.data(), static_cast<std::size_t>(n));
  }
  const auto h = XXH3_64bits_digest(st);
  XXH3_freeState(st);
  return fmt::format("{:016x}", h);
}

// Parses "step-00000100" -> 100; nullopt for anything else.
std::optional<std::int64_t> parse_step(const std::string& name) {
  if (name.rfind("step-", 0) != 0 || name.size() <= 5) return std::nullopt;
  std::int64_t v = 0;
  for (std::size_t i = 5; i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9' || v > (INT64_MAX - 9) / 10) return std::nullopt;
    v = v * 10 + (name[i] - '0');
  }
  return v;
}

bool starts_with(const std::string& s, const char* prefix) { return s.rfind(prefix, 0) == 0; }

// Renames `p` to a unique .trash-* name in its parent, then deletes it.
void trash(const fs::path& p) {
  static int counter = 0;
  const auto t = p.parent_path() / fmt::format(".trash-{}-{}-{}", p.filename().string(), ::getpid(), counter++);
  fs::rename(p, t);
  fsync_directory(p.parent_path().string());
  std::error_code ec;
  fs::remove_all(t, ec);
  if (ec) spdlog::warn("[checkpoint] could not delete {}: {}", t.string(), ec.message());
}

}  // namespace

// --- CheckpointWriter --------------------------------------------------------

CheckpointWriter::CheckpointWriter(const CheckpointManager* manager, std::int64_t step, fs::path tmp)
    : manager_(manager), step_(step), tmp_(std::move(tmp)) {}

CheckpointWriter::CheckpointWriter(CheckpointWriter&& o) noexcept
    : manager_(o.manager_), step_(o.step_), tmp_(std::move(o.tmp_)), done_(o.done_) {
  o.done_ = true;
}

CheckpointWriter::~CheckpointWriter() {
  if (done_ || tmp_.empty()) return;
  std::error_code ec;
  fs::remove_all(tmp_, ec);
}

std::string CheckpointWriter::path(std::string_view name) const {
  RHINE_CHECK(!name.empty() && name.find('/') == std::string_view::npos && name != kMarker && name != "." &&
                  name != "..",
              kComponent, "expected a plain file name inside the checkpoint", std::string(name),
              "use a name like model.safetensors (no directories; COMPLETE.json is reserved)");
  return (tmp_ / std::string(name)).string();
}

fs::path CheckpointWriter::commit() {
  RHINE_CHECK(!done_, kComponent, "commit() called twice for step", step_, "begin() a new checkpoint");
  Json files = Json::array();
  std::vector<fs::path> entries;
  for (const auto& e : fs::directory_iterator(tmp_)) entries.push_back(e.path());
  std::sort(entries.begin(), entries.end());
  for (const auto& p : entries) {
    RHINE_CHECK(fs::is_regular_file(p), kComponent, "checkpoints hold plain files only, found",
                p.string(), "write files, not directories, into the checkpoint");
    fsync_file(p);
    files.push_back({{"name", p.filename().string()},
                     {"bytes", static_cast<std::uint64_t>(fs::file_size(p))},
                     {"xxh3", hash_file(p)}});
  }
  Json marker = {{"format", kFormat}, {"version", 1}, {"step", step_}, {"files", files}};
  write_file_atomic((tmp_ / kMarker).string(), marker.dump(1) + "\n");
  fsync_directory(tmp_.string());

  const fs::path root(manager_->options().dir);
  const fs::path final_path = root / CheckpointManager::dir_name(step_);
  if (fs::exists(final_path)) trash(final_path);  // saving a step again replaces it
  std::error_code ec;
  fs::rename(tmp_, final_path, ec);
  RHINE_CHECK(!ec, kComponent, "cannot rename the finished checkpoint into place", final_path.string(),
              ec.message());
  fsync_directory(root.string());
  done_ = true;
  manager_->rotate();
  return final_path;
}

// --- CheckpointManager -------------------------------------------------------

CheckpointManager::CheckpointManager(CheckpointOptions options) : o_(std::move(options)) {
  RHINE_CHECK(!o_.dir.empty(), kComponent, "checkpoint directory is empty", o_.dir,
              "set CheckpointOptions::dir");
  RHINE_CHECK(o_.keep_last >= 0, kComponent, "keep_last must be >= 0", o_.keep_last, "0 keeps all");
  RHINE_CHECK(o_.keep_every >= 0, kComponent, "keep_every must be >= 0", o_.keep_every, "0 disables it");
  std::error_code ec;
  fs::create_directories(o_.dir, ec);
  RHINE_CHECK(!ec, kComponent, "cannot create checkpoint directory", o_.dir, ec.message());
}

std::string CheckpointManager::dir_name(std::int64_t step) {
  RHINE_CHECK(step >= 0, kComponent, "step must be >= 0", step, "");
  return fmt::format("step-{:08d}", step);
}

CheckpointWriter CheckpointManager::begin(std::int64_t step) const {
  const fs::path tmp = fs::path(o_.dir) / fmt::format(".tmp-{}-{}", dir_name(step), ::getpid());
  std::error_code ec;
  fs::remove_all(tmp, ec);
  fs::create_directory(tmp, ec);
  RHINE_CHECK(!ec, kComponent, "cannot create temporary checkpoint directory", tmp.string(), ec.message());
  return CheckpointWriter(this, step, tmp);
}

std::string CheckpointManager::check(const fs::path& dir, bool verify_checksums) {
  const fs::path marker = dir / kMarker;
  if (!fs::is_regular_file(marker)) return "no COMPLETE.json (the writer did not finish)";
  Json m;
  try {
    m = Json::parse(read_file(marker.string(), kComponent));
  } catch (const std::exception& e) {
    return std::string("unreadable COMPLETE.json: ") + e.what();
  }
  if (!m.is_object() || m.value("format", "") != kFormat || !m.contains("files") || !m["files"].is_array())
    return "COMPLETE.json is not a rhine-checkpoint marker";
  for (const auto& f : m["files"]) {
    if (!f.is_object() || !f.contains("name") || !f["name"].is_string() || !f.contains("bytes") ||
        !f["bytes"].is_number_unsigned())
      return "COMPLETE.json has a malformed file entry";
    const auto name = f["name"].get<std::string>();
    if (name.empty() || name.find('/') != std::string::npos || name == "." || name == "..")
      return "COMPLETE.json names an invalid file '" + name + "'";
    const fs::path p = dir / name;
    std::error_code ec;
    const auto size = fs::file_size(p, ec);
    if (ec) return "missing file " + name;
    if (size != f["bytes"].get<std::uint64_t>())
      return fmt::format("{} has {} bytes, COMPLETE.json says {}", name, size, f["bytes"].get<std::uint64_t>());
    if (verify_checksums && f.contains("xxh3") && f["xxh3"].is_string() &&
        hash_file(p) != f["xxh3"].get<std::string>())
      return "checksum mismatch in " + name;
  }
  return "";
}

std::vector<CheckpointInfo> CheckpointManager::list() const {
  std::vector<CheckpointInfo> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(o_.dir, ec)) {
    const auto name = e.path().filename().string();
    const auto step = parse_step(name);
    if (!step || !e.is_directory()) continue;
    const auto why = check(e.path(), o_.verify_checksums);
    if (!why.empty()) {
      spdlog::warn("[checkpoint] ignoring {}: {}", e.path().string(), why);
      continue;
    }
    out.push_back({*step, e.path()});
  }
  RHINE_CHECK(!ec, kComponent, "cannot list checkpoint directory", o_.dir, ec.message());
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.step < b.step; });
  return out;
}

std::optional<CheckpointInfo> CheckpointManager::latest() const {
  auto all = list();
  if (all.empty()) return std::nullopt;
  return all.back();
}

int CheckpointManager::remove_leftovers() const {
  int n = 0;
  std::vector<fs::path> stale;
  for (const auto& e : fs::directory_iterator(o_.dir)) {
    const auto name = e.path().filename().string();
    if (starts_with(name, ".tmp-step-") || starts_with(name, ".trash-")) stale.push_back(e.path());
  }
  for (const auto& p : stale) {
    spdlog::warn("[checkpoint] removing {} left by an interrupted writer", p.string());
    std::error_code ec;
    fs::remove_all(p, ec);
    if (!ec) ++n;
  }
  return n;
}

void CheckpointManager::rotate() const {
  if (o_.keep_last == 0) return;
  auto all = list();
  std::vector<CheckpointInfo> rotating;
  for (const auto& c : all)
    if (o_.keep_every == 0 || c.step % o_.keep_every != 0) rotating.push_back(c);
  const auto keep = static_cast<std::size_t>(o_.keep_last);
  // Never delete the newest complete checkpoint, even if it is a keep_every one.
  for (std::size_t i = 0; i + keep < rotating.size(); ++i)
    if (rotating[i].step != all.back().step) trash(rotating[i].path);
}

}  // namespace rhine::io
