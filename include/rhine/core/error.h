#pragma once
/// \file
/// Rhine's error type and check macros.
///
/// Every error Rhine raises reads
///
///     [component] what was wrong, got VALUE; hint
///
/// so a user knows which part of Rhine complained, what it saw, and what to do.
/// Checks are always on (they are not `assert`): they guard I/O, configs and
/// user input, which Release builds must validate too.

#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace rhine {

/// The exception every Rhine component throws for bad input or state.
class Error : public std::runtime_error {
 public:
  /// Builds "[component] what, got value; hint" (", got ..." and "; ..." are
  /// left out when `value` or `hint` is empty).
  Error(std::string component, std::string what, std::string value = {}, std::string hint = {});

  const std::string& component() const noexcept { return component_; }
  /// The bare description, without component, value or hint.
  const std::string& description() const noexcept { return what_; }
  const std::string& value() const noexcept { return value_; }
  const std::string& hint() const noexcept { return hint_; }

 private:
  std::string component_, what_, value_, hint_;
};

/// Wraps text that `RHINE_CHECK` shows as is (not quoted), e.g. a JSON dump.
struct Verbatim {
  std::string text;
};

namespace detail {

/// Renders a value for an error message: strings quoted, containers as
/// [a, b, c], everything else through operator<<.
template <class T>
std::string display(const T& v);

template <class T, class = void>
struct is_container : std::false_type {};
template <class T>
struct is_container<T, std::void_t<decltype(std::declval<const T&>().begin()),
                                   decltype(std::declval<const T&>().end())>> : std::true_type {};

std::string quote(std::string_view s);

template <class T>
std::string display(const T& v) {
  if constexpr (std::is_same_v<T, Verbatim>) {
    return v.text;
  } else if constexpr (std::is_convertible_v<const T&, std::string_view>) {
    return quote(std::string_view(v));
  } else if constexpr (std::is_same_v<T, bool>) {
    return v ? "true" : "false";
  } else if constexpr (std::is_same_v<T, char> || std::is_same_v<T, signed char> ||
                       std::is_same_v<T, unsigned char>) {
    return std::to_string(static_cast<int>(v));
  } else if constexpr (is_container<T>::value) {
    std::string out = "[";
    bool first = true;
    for (const auto& e : v) {
      if (!first) out += ", ";
      out += display(e);
      first = false;
    }
    return out + "]";
  } else {
    std::ostringstream os;
    os << v;
    return os.str();
  }
}

[[noreturn]] void throw_error(std::string component, std::string what, std::string value,
                              std::string hint);

}  // namespace detail
}  // namespace rhine

/// Throws rhine::Error("[component] what, got VALUE; hint") unless `cond` holds.
/// `value` is any printable expression (strings are quoted, containers listed);
/// `what` and `hint` are std::string-convertible and only built on failure.
#define RHINE_CHECK(cond, component, what, value, hint)                                   \
  do {                                                                                    \
    if (__builtin_expect(!(cond), 0))                                                     \
      ::rhine::detail::throw_error((component), (what), ::rhine::detail::display(value),  \
                                   (hint));                                               \
  } while (false)

/// Throws rhine::Error unconditionally (same message shape as RHINE_CHECK).
#define RHINE_FAIL(component, what, value, hint) \
  ::rhine::detail::throw_error((component), (what), ::rhine::detail::display(value), (hint))
