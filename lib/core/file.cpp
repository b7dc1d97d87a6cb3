#include "rhine/core/file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <random>

#include "rhine/core/error.h"

namespace rhine {
namespace {

std::string os_error() { return std::strerror(errno); }

// Closes a file descriptor on scope exit.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

}  // namespace

std::string read_file(const std::string& path, std::string_view component) {
  Fd f{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  RHINE_CHECK(f.fd >= 0, std::string(component), "cannot open file for reading", path,
              os_error() + "; check the path");
  struct stat st {};
  RHINE_CHECK(::fstat(f.fd, &st) == 0, std::string(component), "cannot stat file", path, os_error());
  RHINE_CHECK(!S_ISDIR(st.st_mode), std::string(component), "expected a file but found a directory",
              path, "pass the file inside it");
  std::string out;
  out.reserve(static_cast<std::size_t>(st.st_size));
  char buf[1 << 16];
  for (;;) {
    ssize_t n = ::read(f.fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    RHINE_CHECK(n >= 0, std::string(component), "read error", path, os_error());
    if (n == 0) break;
    out.append(buf, static_cast<std::size_t>(n));
  }
  return out;
}

void fsync_directory(const std::string& dir) {
  Fd d{::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC)};
  RHINE_CHECK(d.fd >= 0, "file", "cannot open directory to fsync", dir, os_error());
  RHINE_CHECK(::fsync(d.fd) == 0, "file", "fsync of directory failed", dir, os_error());
}

void write_file_atomic(const std::string& path, std::string_view data) {
  namespace fs = std::filesystem;
  fs::path target(path);
  fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  std::random_device rd;
  fs::path tmp = dir / ("." + target.filename().string() + ".tmp." + std::to_string(::getpid()) +
                        "." + std::to_string(rd()));
  {
    Fd f{::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644)};
    RHINE_CHECK(f.fd >= 0, "file", "cannot create temporary file", tmp.string(),
                os_error() + "; check the directory exists and is writable");
    const char* p = data.data();
    std::size_t left = data.size();
    while (left > 0) {
      ssize_t n = ::write(f.fd, p, left);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        std::string err = os_error();
        ::unlink(tmp.c_str());
        RHINE_FAIL("file", "write failed", tmp.string(), err + "; is the disk full?");
      }
      p += n;
      left -= static_cast<std::size_t>(n);
    }
    if (::fsync(f.fd) != 0) {
      std::string err = os_error();
      ::unlink(tmp.c_str());
      RHINE_FAIL("file", "fsync failed", tmp.string(), err);
    }
  }
  if (::rename(tmp.c_str(), target.c_str()) != 0) {
    std::string err = os_error();
    ::unlink(tmp.c_str());
    RHINE_FAIL("file", "cannot rename temporary file into place", path, err);
  }
  fsync_directory(dir.string());
}

}  // namespace rhine
