// PCRE2 wrapper (regex.h).
#define PCRE2_CODE_UNIT_WIDTH 8
#include "regex.h"

#include <pcre2.h>

#include "rhine/core/error.h"

namespace rhine::tokenizer {

namespace {

// Per-thread match data and JIT stack, grown on demand; shared by every Regex.
struct ThreadScratch {
  pcre2_match_data* data = nullptr;
  pcre2_jit_stack* stack = nullptr;
  ~ThreadScratch() {
    if (data) pcre2_match_data_free(data);
    if (stack) pcre2_jit_stack_free(stack);
  }
};

ThreadScratch& scratch() {
  thread_local ThreadScratch s;
  if (!s.data) s.data = pcre2_match_data_create(16, nullptr);
  if (!s.stack) s.stack = pcre2_jit_stack_create(32 * 1024, 4 * 1024 * 1024, nullptr);
  return s;
}

}  // namespace

struct Regex::Impl {
  pcre2_code* code = nullptr;
  bool jit = false;
  ~Impl() {
    if (code) pcre2_code_free(code);
  }
};

Regex::Regex(const std::string& pattern, const std::string& source) : impl_(std::make_unique<Impl>()), pattern_(pattern) {
  int error = 0;
  PCRE2_SIZE error_offset = 0;
  impl_->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), PCRE2_UTF | PCRE2_UCP,
                              &error, &error_offset, nullptr);
  if (!impl_->code) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(error, message, sizeof(message));
    RHINE_FAIL("tokenizer", "cannot compile the regex of " + detail::quote(source) + " at offset " +
               std::to_string(error_offset) + " (" + reinterpret_cast<const char*>(message) + ")",
               pattern.substr(0, 200), "patterns must be valid PCRE2 (Oniguruma/HF syntax)");
  }
  impl_->jit = pcre2_jit_compile(impl_->code, PCRE2_JIT_COMPLETE) == 0;
}

Regex::~Regex() = default;

void Regex::find_all(std::string_view text, std::vector<std::pair<uint32_t, uint32_t>>& out) const {
  ThreadScratch& s = scratch();
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  PCRE2_SIZE at = 0;
  while (at <= text.size()) {
    int rc;
    if (impl_->jit) {
      // The JIT stack is assigned per call: the match context is per thread.
      thread_local pcre2_match_context* context = nullptr;
      if (!context) {
        context = pcre2_match_context_create(nullptr);
        pcre2_jit_stack_assign(context, nullptr, s.stack);
      }
      rc = pcre2_jit_match(impl_->code, subject, text.size(), at, 0, s.data, context);
    } else {
      rc = pcre2_match(impl_->code, subject, text.size(), at, PCRE2_NO_UTF_CHECK, s.data, nullptr);
    }
    if (rc == PCRE2_ERROR_NOMATCH) return;
    RHINE_CHECK(rc >= 0, "tokenizer", "regex match failed for pattern " + detail::quote(pattern_.substr(0, 80)), rc,
                "a PCRE2 resource limit was hit; the input may be pathological");
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(s.data);
    const PCRE2_SIZE b = ov[0], e = ov[1];
    if (e > b) {
      out.emplace_back(static_cast<uint32_t>(b), static_cast<uint32_t>(e));
      at = e;
    } else {
      // Empty match: step over one UTF-8 character.
      if (b >= text.size()) return;
      at = b + 1;
      while (at < text.size() && (static_cast<unsigned char>(text[at]) & 0xC0) == 0x80) ++at;
    }
  }
}

std::string regex_escape(std::string_view s) {
  std::string out;
  for (char c : s) {
    if (std::string_view("\\^$.|?*+()[]{}-/#&~ ").find(c) != std::string_view::npos && c != ' ') out.push_back('\\');
    out.push_back(c);
  }
  return out;
}

}  // namespace rhine::tokenizer
