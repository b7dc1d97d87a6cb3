#include "rhine/core/json.h"

#include <algorithm>
#include <vector>

#include "rhine/core/file.h"

namespace rhine {
namespace {

// Line and column (1-based) of a byte offset, for parse errors.
std::pair<std::size_t, std::size_t> line_column(std::string_view text, std::size_t offset) {
  std::size_t line = 1, col = 1;
  for (std::size_t i = 0; i < std::min(offset, text.size()); ++i) {
    if (text[i] == '\n') {
      ++line;
      col = 1;
    } else {
      ++col;
    }
  }
  return {line, col};
}

}  // namespace

Json parse_json(std::string_view text, std::string_view component, std::string_view source_name) {
  try {
    return Json::parse(text.begin(), text.end());
  } catch (const nlohmann::json::parse_error& e) {
    // e.byte is the 1-based position just past the offending character.
    auto [line, col] = line_column(text, e.byte > 0 ? e.byte - 1 : 0);
    std::string where = std::string(source_name) + " at line " + std::to_string(line) +
                        ", column " + std::to_string(col);
    std::size_t lo = e.byte > 20 ? e.byte - 20 : 0;
    RHINE_FAIL(std::string(component).c_str(), "invalid JSON in " + where,
               std::string(text.substr(lo, 40)),
               "fix the syntax there (parser said: " + std::string(e.what()) + ")");
  } catch (const nlohmann::json::exception& e) {  // e.g. out_of_range: a number like 1e999
    RHINE_FAIL(std::string(component).c_str(), "invalid JSON in " + std::string(source_name),
               std::string(text.substr(0, 40)), std::string(e.what()));
  }
}

Json read_json_file(const std::string& path, std::string_view component) {
  std::string text = read_file(path, component);
  return parse_json(text, component, path);
}

void write_json_file(const std::string& path, const Json& value, int indent) {
  write_file_atomic(path, value.dump(indent) + "\n");
}

JsonFields::JsonFields(const Json& object, std::string component)
    : object_(object), component_(std::move(component)) {
  RHINE_CHECK(object_.is_object(), component_, "expected a JSON object",
              Verbatim{object_.dump().substr(0, 160)}, "the " + component_ + " config must be {...}");
}

const Json* JsonFields::find(std::string_view key) {
  asked_.emplace(key);
  auto it = object_.find(std::string(key));
  return it == object_.end() ? nullptr : &*it;
}

void JsonFields::type_error(std::string_view key, const Json& v, const char* expected) const {
  RHINE_FAIL(component_.c_str(), "key " + detail::quote(key) + " must be " + expected, Verbatim{v.dump()},
             "fix its value in the " + component_ + " config");
}

void JsonFields::reject_unknown(std::initializer_list<std::string_view> also_known) const {
  for (auto it = object_.begin(); it != object_.end(); ++it) {
    const std::string& key = it.key();
    if (asked_.count(key)) continue;
    if (std::find(also_known.begin(), also_known.end(), key) != also_known.end()) continue;

    std::string best;
    std::size_t best_d = std::string::npos;
    auto consider = [&](std::string_view k) {
      std::size_t d = edit_distance(key, k);
      if (d < best_d) best_d = d, best = std::string(k);
    };
    for (const auto& k : asked_) consider(k);
    for (auto k : also_known) consider(k);
    std::string hint = "remove it";
    if (!best.empty() && best_d <= std::max<std::size_t>(2, key.size() / 3))
      hint = "did you mean " + detail::quote(best) + "?";
    else if (!asked_.empty()) {
      hint += "; known keys:";
      for (const auto& k : asked_) hint += " " + k;
    }
    RHINE_FAIL(component_.c_str(), "unknown key in config", key, hint);
  }
}

Json JsonFields::unknown() const {
  Json out = Json::object();
  for (auto it = object_.begin(); it != object_.end(); ++it)
    if (!asked_.count(it.key())) out[it.key()] = it.value();
  return out;
}

std::size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<std::size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      std::size_t sub = prev[j - 1] + (a[i - 1] != b[j - 1]);
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, sub});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

}  // namespace rhine
