#include "rhine/core/error.h"

namespace rhine {
namespace {

std::string compose(const std::string& component, const std::string& what,
                    const std::string& value, const std::string& hint) {
  std::string msg = "[" + component + "] " + what;
  if (!value.empty()) msg += ", got " + value;
  if (!hint.empty()) msg += "; " + hint;
  return msg;
}

}  // namespace

Error::Error(std::string component, std::string what, std::string value, std::string hint)
    : std::runtime_error(compose(component, what, value, hint)),
      component_(std::move(component)),
      what_(std::move(what)),
      value_(std::move(value)),
      hint_(std::move(hint)) {}

namespace detail {

std::string quote(std::string_view s) {
  // Keep messages on one line and bounded; control characters show as \xNN.
  constexpr std::size_t kMax = 200;
  std::string out = "\"";
  std::size_t n = 0;
  for (unsigned char c : s) {
    if (++n > kMax) {
      out += "...";
      break;
    }
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      case '\r': out += "\\r"; break;
      default:
        if (c < 0x20 || c == 0x7f) {
          static const char* hex = "0123456789abcdef";
          out += "\\x";
          out += hex[c >> 4];
          out += hex[c & 15];
        } else {
          out += static_cast<char>(c);  // UTF-8 passes through
        }
    }
  }
  return out + "\"";
}

void throw_error(std::string component, std::string what, std::string value, std::string hint) {
  throw Error(std::move(component), std::move(what), std::move(value), std::move(hint));
}

}  // namespace detail
}  // namespace rhine
