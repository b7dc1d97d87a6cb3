// libFuzzer target for the safetensors header parser and validator.
// Any input must either parse or throw rhine::Error (never crash, hang or
// read out of bounds); a file that parses must survive a write/re-read round
// trip with the same tensors.
//   scripts/fuzz.sh fuzz_safetensors 300
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

#include "rhine/core/error.h"
#include "rhine/formats/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  rhine::SafetensorsHeader h;
  try {
    h = rhine::parse_safetensors(bytes, "fuzz");
  } catch (const rhine::Error&) {
    return 0;
  }
  const char* buffer = bytes.data() + 8 + h.header_bytes;
  std::vector<rhine::SafetensorsTensor> ts;
  for (const auto& e : h.entries) ts.push_back({e.name, e.dtype, e.shape, buffer + e.begin, e.nbytes()});
  std::string again;
  try {
    again = rhine::serialize_safetensors(ts);
  } catch (const rhine::Error&) {
    return 0;  // e.g. the empty name, which the reader accepts and the writer refuses
  }
  rhine::SafetensorsHeader h2 = rhine::parse_safetensors(again, "fuzz-roundtrip");
  if (h2.entries.size() != h.entries.size()) __builtin_trap();
  for (const auto& e2 : h2.entries) {
    const rhine::SafetensorsEntry* e = nullptr;
    for (const auto& x : h.entries)
      if (x.name == e2.name) e = &x;
    if (!e || e->dtype != e2.dtype || e->shape != e2.shape || e->nbytes() != e2.nbytes()) __builtin_trap();
    if (std::string_view(buffer + e->begin, e->nbytes()) !=
        std::string_view(again.data() + 8 + h2.header_bytes + e2.begin, e2.nbytes()))
      __builtin_trap();
  }
  return 0;
}
