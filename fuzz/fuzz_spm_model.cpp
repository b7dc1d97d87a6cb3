// libFuzzer target for the SentencePiece .model reader and the encoders behind it:
// any byte string must either load (and then encode and decode without crashing) or
// throw rhine::Error. Run with: scripts/fuzz.sh fuzz_spm_model 120
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "rhine/core/error.h"
#include "rhine/tokenizer/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  try {
    const auto model = rhine::tokenizer::parse_spm_model(bytes, "fuzz.model");
    const auto tok = rhine::Tokenizer::from_sentencepiece(model, "fuzz.model");
    static const char* const texts[] = {
        "Grüß Gott,  wie geht's?", "  l'été ﬁn ①  ", "Fiets 123 \xF0\x9F\x98\x80 \xFF\xC3", "",
        "<s>a</s>\t\t\xE2\x96\x81x", "\xCC\x81\xCC\x81 Ｆｕｌｌ",
    };
    rhine::EncodeOptions special;
    special.add_special = true;
    special.add_eos = true;
    special.parse_special = true;
    for (const char* t : texts) {
      const auto e = tok.encode_with_offsets(t);
      for (const auto& o : e.offsets)
        if (o.first > o.second || o.second > std::string_view(t).size()) __builtin_trap();
      (void)tok.decode(e.ids);
      (void)tok.decode(tok.encode(t, special));
    }
    std::vector<int32_t> ids;
    for (int32_t id = 0; id < tok.vocab_size() && id < 64; ++id) ids.push_back(id);
    (void)tok.decode(ids);
  } catch (const rhine::Error&) {
  }
  return 0;
}
