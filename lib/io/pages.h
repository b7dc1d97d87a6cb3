#pragma once
// Internal to lib/io: giving back the pages of a read-only file mapping.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>

namespace rhine::io {

/// Releases the whole pages inside [p, p + n) of a private file mapping once
/// their bytes were copied: the kernel re-reads them from the file if they
/// are touched again, so a copying reader never holds what it read twice.
/// Only for mappings nothing writes (MADV_DONTNEED drops private changes).
inline void release_pages(const void* p, std::size_t n) {
  static const std::uintptr_t page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
  const auto begin = (reinterpret_cast<std::uintptr_t>(p) + page - 1) / page * page;
  const auto end = (reinterpret_cast<std::uintptr_t>(p) + n) / page * page;
  if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

}  // namespace rhine::io
