#pragma once
/// \file
/// JSON helpers on nlohmann/json for configs (Hugging Face `config.json`,
/// Rhine's training configs): file I/O with errors that name file, line and
/// column, and `JsonFields`, a reader that rejects keys nobody asked for, so a
/// typo such as "lerning_rate" fails loudly instead of silently leaving the
/// default in place.

#include <nlohmann/json.hpp>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <type_traits>

#include "rhine/core/error.h"

namespace rhine {

using Json = nlohmann::json;

/// Parses JSON text. Errors read "[component] invalid JSON in SOURCE at line L,
/// column C ...".
Json parse_json(std::string_view text, std::string_view component, std::string_view source_name);

/// Reads and parses a JSON file (errors name the file).
Json read_json_file(const std::string& path, std::string_view component);

/// Writes `value` to `path` atomically (temporary file, fsync, rename).
void write_json_file(const std::string& path, const Json& value, int indent = 2);

/// Typed access to the fields of one JSON object, remembering which keys were
/// read. Numbers are checked strictly: an integer field rejects 2.5 and a
/// negative value for an unsigned type instead of truncating.
///
///     JsonFields f(j, "adamw");
///     double lr = f.get("lr", 1e-3);
///     auto betas = f.require<std::vector<double>>("betas");
///     f.reject_unknown();   // throws on any key not read above
class JsonFields {
 public:
  /// Throws rhine::Error when `object` is not a JSON object.
  JsonFields(const Json& object, std::string component);

  /// The value of `key`, or `fallback` when the key is absent or null.
  template <class T>
  T get(std::string_view key, T fallback) {
    const Json* v = find(key);
    return (v && !v->is_null()) ? convert<T>(key, *v) : fallback;
  }
  /// The value of `key`; throws when it is absent or null.
  template <class T>
  T require(std::string_view key) {
    const Json* v = find(key);
    RHINE_CHECK(v && !v->is_null(), component_, "required key " + detail::quote(key) + " is missing",
                Verbatim{object_.dump().substr(0, 160)}, "add it to the " + component_ + " config");
    return convert<T>(key, *v);
  }
  /// The value of `key`, or nullopt when absent or null.
  template <class T>
  std::optional<T> optional(std::string_view key) {
    const Json* v = find(key);
    if (!v || v->is_null()) return std::nullopt;
    return convert<T>(key, *v);
  }
  /// The raw JSON of `key` (nullptr when absent); marks it as read.
  const Json* raw(std::string_view key) { return find(key); }
  /// True when the key is present (does not mark it as read).
  bool has(std::string_view key) const { return object_.contains(std::string(key)); }

  /// Throws for the first key that no getter asked for, suggesting the closest
  /// known key ("did you mean ..."). `also_known` lists keys that are accepted
  /// but deliberately ignored.
  void reject_unknown(std::initializer_list<std::string_view> also_known = {}) const;
  /// The keys that no getter asked for, as an object (to keep and write back).
  Json unknown() const;

  const std::string& component() const { return component_; }

 private:
  const Json* find(std::string_view key);
  [[noreturn]] void type_error(std::string_view key, const Json& v, const char* expected) const;

  template <class T>
  T convert(std::string_view key, const Json& v) const {
    if constexpr (std::is_same_v<T, bool>) {
      if (!v.is_boolean()) type_error(key, v, "a boolean (true or false)");
      return v.get<bool>();
    } else if constexpr (std::is_integral_v<T>) {
      if (!v.is_number_integer()) type_error(key, v, "an integer");
      if constexpr (std::is_unsigned_v<T>) {
        if (v.is_number_unsigned()) return static_cast<T>(v.get<std::uint64_t>());
        if (v.get<std::int64_t>() < 0) type_error(key, v, "a non-negative integer");
      }
      return static_cast<T>(v.get<std::int64_t>());
    } else if constexpr (std::is_floating_point_v<T>) {
      if (!v.is_number()) type_error(key, v, "a number");
      return v.get<T>();
    } else if constexpr (std::is_same_v<T, std::string>) {
      if (!v.is_string()) type_error(key, v, "a string");
      return v.get<std::string>();
    } else {
      try {
        return v.get<T>();
      } catch (const nlohmann::json::exception&) {
        type_error(key, v, "a value of the expected type");
      }
    }
  }

  const Json& object_;
  std::string component_;
  std::set<std::string, std::less<>> asked_;
};

/// Levenshtein edit distance (bytes), for "did you mean" hints.
std::size_t edit_distance(std::string_view a, std::string_view b);

}  // namespace rhine
