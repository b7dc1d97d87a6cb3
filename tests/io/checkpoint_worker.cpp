// Writes checkpoints in a loop until it is killed; tests/io/test_checkpoint.cpp
// SIGKILLs it at random moments and checks what is left on disk.
//
//   rhine_checkpoint_worker DIR KEEP_LAST
//
// Checkpoint N holds "a.bin" (payload_size(N) bytes, byte i = (i * 31 + N) & 255)
// and "b.json" ({"step": N}); the test recomputes both.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "rhine/io/checkpoint.h"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: rhine_checkpoint_worker DIR KEEP_LAST\n");
    return 2;
  }
  rhine::io::CheckpointOptions o;
  o.dir = argv[1];
  o.keep_last = std::atoi(argv[2]);
  rhine::io::CheckpointManager m(o);
  m.remove_leftovers();
  const auto last = m.latest();
  for (std::int64_t step = last ? last->step + 1 : 0;; ++step) {
    auto w = m.begin(step);
    const std::size_t n = 1000 + static_cast<std::size_t>(step * 7919 % 400000);
    std::vector<char> data(n);
    for (std::size_t i = 0; i < n; ++i) data[i] = static_cast<char>((i * 31 + static_cast<std::size_t>(step)) & 255);
    std::ofstream(w.path("a.bin"), std::ios::binary).write(data.data(), static_cast<std::streamsize>(n));
    std::ofstream(w.path("b.json")) << "{\"step\": " << step << "}\n";
    w.commit();
  }
}
