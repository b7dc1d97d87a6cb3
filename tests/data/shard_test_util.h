#pragma once
// Scratch directories for data tests.
#include <unistd.h>

#include <filesystem>
#include <string>

namespace rhine::test {

/// A fresh directory under /tmp, removed when the object goes.
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& tag) {
    path = std::filesystem::temp_directory_path() / ("rhine_" + tag + "_" + std::to_string(::getpid()));
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~TempDir() { std::filesystem::remove_all(path); }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

}  // namespace rhine::test
