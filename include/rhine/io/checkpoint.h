#pragma once
/// \file
/// Crash-safe training checkpoint directories: atomic commit, a completion
/// marker with checksums, "keep last N" rotation and resume from the newest
/// complete checkpoint. What goes *into* a checkpoint (weights, optimizer,
/// loader, RNG) is the caller's business (rhine/train/trainer.h writes it);
/// this class only guarantees that a checkpoint is either complete or ignored.
///
/// Layout under `CheckpointOptions::dir`:
///
///     step-00000100/            a complete checkpoint (any files the caller wrote)
///       model.safetensors ...
///       COMPLETE.json           written last: {"format": "rhine-checkpoint",
///                               "version": 1, "step": 100,
///                               "files": [{"name", "bytes", "xxh3"}, ...]}
///     .tmp-step-00000200-PID/   being written (ignored, removed on next start)
///     .trash-...                being deleted by rotation (ignored)
///
/// Commit protocol: the caller writes its files into a fresh temporary
/// directory; commit() fsyncs each file, writes COMPLETE.json (fsynced),
/// fsyncs the temporary directory, renames it to `step-N` and fsyncs the
/// parent. A process killed at any moment therefore leaves either no
/// `step-N` or a complete one; resume ignores anything else with a warning.
/// Rotation renames old checkpoints to `.trash-*` before deleting them, so a
/// half-deleted checkpoint is never mistaken for one.
///
/// One writer per directory at a time (in data-parallel training: rank 0).
///
///     rhine::io::CheckpointManager ckpt({.dir = "runs/demo/checkpoints", .keep_last = 3});
///     auto w = ckpt.begin(step);
///     save_safetensors(w.path("model.safetensors"), tensors);
///     w.commit();
///     ...
///     if (auto last = ckpt.latest()) resume_from(last->path);
///
/// This header is torch-free.

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace rhine::io {

/// Options of CheckpointManager.
struct CheckpointOptions {
  /// Root directory of the run's checkpoints (created when missing).
  std::string dir;
  /// Complete checkpoints kept after a commit (oldest deleted first); 0 keeps all.
  int keep_last = 3;
  /// Checkpoints whose step is a multiple of this are never rotated away (0: none).
  std::int64_t keep_every = 0;
  /// latest()/list() re-hash every file against COMPLETE.json (slower, catches
  /// bit rot); without it only presence and sizes are checked.
  bool verify_checksums = false;
};

/// A complete checkpoint on disk.
struct CheckpointInfo {
  std::int64_t step = 0;
  std::filesystem::path path;
};

class CheckpointManager;

/// A checkpoint being written: files go into path(name); commit() publishes.
/// Destroyed without commit(), it removes its temporary directory.
class CheckpointWriter {
 public:
  CheckpointWriter(CheckpointWriter&&) noexcept;
  CheckpointWriter& operator=(CheckpointWriter&&) = delete;
  CheckpointWriter(const CheckpointWriter&) = delete;
  ~CheckpointWriter();

  /// The temporary directory the caller writes into.
  const std::filesystem::path& dir() const { return tmp_; }
  /// dir() / name (a plain file name: no '/', not COMPLETE.json).
  std::string path(std::string_view name) const;
  std::int64_t step() const { return step_; }
  /// Makes the checkpoint durable and visible as step-N, then rotates old
  /// ones. Returns the final path. Throws rhine::Error "[checkpoint] ..."
  /// on I/O errors (the temporary directory is then left for cleanup).
  std::filesystem::path commit();

 private:
  friend class CheckpointManager;
  CheckpointWriter(const CheckpointManager* manager, std::int64_t step, std::filesystem::path tmp);
  const CheckpointManager* manager_;
  std::int64_t step_;
  std::filesystem::path tmp_;
  bool done_ = false;
};

/// Finds, writes and rotates checkpoints of one run directory.
class CheckpointManager {
 public:
  explicit CheckpointManager(CheckpointOptions options);

  /// Starts checkpoint `step` in a fresh temporary directory. Saving a step
  /// that already exists replaces it at commit().
  CheckpointWriter begin(std::int64_t step) const;
  /// Complete checkpoints, oldest first. Incomplete or damaged `step-*`
  /// directories are skipped with a warning naming them and the reason.
  std::vector<CheckpointInfo> list() const;
  /// The newest complete checkpoint, if any.
  std::optional<CheckpointInfo> latest() const;
  /// Removes leftover `.tmp-*` / `.trash-*` directories of killed writers.
  /// Call it only when no other writer uses the directory (at start-up).
  /// Returns how many were removed.
  int remove_leftovers() const;

  /// Why `dir` is not a complete checkpoint ("" when it is). Checks
  /// COMPLETE.json, the listed files' presence and sizes, and with
  /// `verify_checksums` their xxh3 hashes.
  static std::string check(const std::filesystem::path& dir, bool verify_checksums);
  /// "step-00000100".
  static std::string dir_name(std::int64_t step);

  const CheckpointOptions& options() const { return o_; }

 private:
  friend class CheckpointWriter;
  void rotate() const;
  CheckpointOptions o_;
};

}  // namespace rhine::io
