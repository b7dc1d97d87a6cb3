// libFuzzer target for the tokenizer.json reader and the stages it builds: any byte string
// must either load (and then encode and decode without crashing, with offsets inside the
// text and the byte-level fast path equal to the generic stages) or throw rhine::Error.
// Run with: scripts/fuzz.sh fuzz_tokenizer_json 90
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "rhine/core/error.h"
#include "rhine/core/json.h"
#include "rhine/tokenizer/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  try {
    const auto json = rhine::parse_json(bytes, "tokenizer", "fuzz.json");
    const auto tok = rhine::Tokenizer::from_tokenizer_json(json, "fuzz.json");
    static const char* const texts[] = {
        "Grüß Gott,  wie geht's?", "  l'été ﬁn ①  ", "Fiets 123 \xF0\x9F\x98\x80 \xFF\xC3", "",
        "<s>a</s>\t\t\xE2\x96\x81x", "\xCC\x81\xCC\x81 Ｆｕｌｌ", "the hello<|end|> 1234567\r\n",
    };
    rhine::EncodeOptions special, generic;
    special.add_special = true;
    special.parse_special = true;
    generic.fast_paths = false;
    for (const char* t : texts) {
      const auto e = tok.encode_with_offsets(t);
      for (const auto& o : e.offsets)
        if (o.first > o.second || o.second > std::string_view(t).size()) __builtin_trap();
      if (tok.encode(t, generic) != e.ids) __builtin_trap();  // fast path == reference twin
      (void)tok.decode(e.ids);
      (void)tok.decode(tok.encode(t, special));
    }
    std::vector<int32_t> ids;
    for (int32_t id = 0; id < tok.vocab_size() && id < 64; ++id) ids.push_back(id);
    (void)tok.decode(ids);
    (void)tok.decode(ids, {true});
  } catch (const rhine::Error&) {
  }
  return 0;
}
