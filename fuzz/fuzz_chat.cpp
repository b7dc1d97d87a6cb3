// libFuzzer target for the SFT line reader (rhine/tokenizer/chat.h): any byte string as a
// JSONL line must either render and tokenize, with one target flag per token and a first
// token that is never a target after load-time clean-up, or throw rhine::Error.
// Run with: scripts/fuzz.sh fuzz_chat 90
#include <cstddef>
#include <cstdint>
#include <string>

#include "rhine/core/error.h"
#include "rhine/core/file.h"
#include "rhine/core/json.h"
#include "rhine/tokenizer/chat.h"
#include "rhine/tokenizer/tokenizer.h"

namespace {
// A byte-level BPE with two special tokens (tests/fixtures/tokenizer/tiny_byte_level.json).
const rhine::Tokenizer& tokenizer() {
  static const rhine::Tokenizer tok = rhine::Tokenizer::load(RHINE_SOURCE_DIR "/tests/fixtures/tokenizer/tiny_byte_level.json");
  return tok;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  const std::string line(reinterpret_cast<const char*>(data), size);
  for (const char* name : {"chatml", "plain"}) {
    rhine::SftOptions o;
    o.chat_template = rhine::ChatTemplate::named(name);
    o.chat_template.append_eos = false;  // the fixture has no EOS
    try {
      const auto ex = rhine::tokenize_sft_example(line, o, tokenizer());
      if (ex.tokens.size() != ex.target.size()) __builtin_trap();
      for (auto t : ex.target)
        if (t > 1) __builtin_trap();
      for (auto id : ex.tokens)
        if (id < 0 || id >= tokenizer().vocab_size()) __builtin_trap();
    } catch (const rhine::Error&) {
    }
  }
  return 0;
}
