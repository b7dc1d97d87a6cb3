#pragma once
/// \file
/// Whole-file I/O with clear errors and crash-safe writes.

#include <string>
#include <string_view>

namespace rhine {

/// Reads a whole file. Errors name the component, the path and the OS reason.
std::string read_file(const std::string& path, std::string_view component);

/// Writes `data` to `path` so that a crash at any moment leaves either the old
/// file or the complete new one, never a torn file: the bytes go to a
/// temporary file in the same directory, which is fsynced, renamed over
/// `path`, and the directory is fsynced.
void write_file_atomic(const std::string& path, std::string_view data);

/// fsyncs a directory so that a rename inside it is durable.
void fsync_directory(const std::string& dir);

}  // namespace rhine
