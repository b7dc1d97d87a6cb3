#include <catch2/catch.hpp>

#include <filesystem>
#include <unistd.h>

#include "rhine/core/error.h"
#include "rhine/core/file.h"
#include "rhine/core/json.h"

using Catch::Matchers::Contains;
using rhine::Json;
using rhine::JsonFields;

TEST_CASE("JsonFields reads typed values with defaults", "[json]") {
  Json j = Json::parse(R"({"lr": 0.001, "steps": 100, "name": "adamw", "betas": [0.9, 0.95],
                           "nested": {"a": 1}, "flag": false, "nothing": null})");
  JsonFields f(j, "adamw");
  CHECK(f.get("lr", 1.0) == 0.001);
  CHECK(f.get<int>("steps", 0) == 100);
  CHECK(f.require<std::string>("name") == "adamw");
  CHECK(f.require<std::vector<double>>("betas") == std::vector<double>{0.9, 0.95});
  CHECK(f.get("flag", true) == false);
  CHECK(f.get("absent", 7) == 7);
  CHECK(f.get("nothing", 3) == 3);  // null means "use the default"
  CHECK_FALSE(f.optional<int>("nothing").has_value());
  CHECK(f.raw("nested")->at("a") == 1);
  CHECK_NOTHROW(f.reject_unknown());
  CHECK(f.unknown().empty());
}

TEST_CASE("JsonFields rejects a typo and suggests the known key", "[json]") {
  Json j = Json::parse(R"({"lerning_rate": 0.1})");
  JsonFields f(j, "optimizer");
  CHECK(f.get("learning_rate", 1e-3) == 1e-3);
  CHECK_THROWS_WITH(f.reject_unknown(),
                    "[optimizer] unknown key in config, got \"lerning_rate\"; did you mean \"learning_rate\"?");
}

TEST_CASE("JsonFields lists known keys when no key is close", "[json]") {
  Json j = Json::parse(R"({"zzzzzzzzzz": 1})");
  JsonFields f(j, "trainer");
  (void)f.get("steps", 1);
  (void)f.get("seed", 1);
  CHECK_THROWS_WITH(f.reject_unknown(), Contains("known keys: seed steps"));
  // Keys deliberately ignored are accepted.
  CHECK_NOTHROW(f.reject_unknown({"zzzzzzzzzz"}));
  CHECK(f.unknown() == Json::parse(R"({"zzzzzzzzzz": 1})"));
}

TEST_CASE("JsonFields checks numbers strictly", "[json]") {
  Json j = Json::parse(R"({"heads": 2.5, "layers": -3, "dim": "64", "ok": 3, "big": 1e300,
                           "flag": 1})");
  JsonFields f(j, "config");
  CHECK_THROWS_WITH(f.get<int>("heads", 0), "[config] key \"heads\" must be an integer, got 2.5; fix its value in the config config");
  CHECK_THROWS_WITH(f.get<unsigned>("layers", 0u), Contains("must be a non-negative integer, got -3"));
  CHECK_THROWS_WITH(f.get<int>("dim", 0), Contains("must be an integer, got \"64\""));
  CHECK_THROWS_WITH(f.get<bool>("flag", false), Contains("must be a boolean"));
  CHECK(f.get<double>("ok", 0) == 3.0);  // integers are fine where a number is expected
  CHECK(f.get<double>("big", 0) == 1e300);
  CHECK_THROWS_WITH(f.require<int>("missing"), Contains("required key \"missing\" is missing"));
  CHECK_THROWS_WITH(f.require<std::vector<int>>("dim"), Contains("key \"dim\" must be a value of the expected type"));
}

TEST_CASE("JsonFields needs an object", "[json]") {
  Json j = Json::parse("[1, 2]");
  CHECK_THROWS_WITH(JsonFields(j, "config"), Contains("[config] expected a JSON object, got [1,2]"));
}

TEST_CASE("parse_json reports file, line and column", "[json]") {
  const char* text = "{\n  \"a\": 1,\n  \"b\": ,\n}";
  try {
    (void)rhine::parse_json(text, "config", "config.json");
    FAIL("no throw");
  } catch (const rhine::Error& e) {
    CHECK_THAT(e.what(), Contains("[config] invalid JSON in config.json at line 3, column 8"));
  }
}

TEST_CASE("parse_json turns an overflowing number into rhine::Error (found by fuzz_chat)", "[json]") {
  CHECK_THROWS_AS(rhine::parse_json(R"({"text": 900e900})", "cfg", "x.json"), rhine::Error);
  CHECK_THROWS_WITH(rhine::parse_json(R"({"text": 900e900})", "cfg", "x.json"), Contains("x.json"));
}

TEST_CASE("JSON files round trip and missing files are named", "[json]") {
  auto dir = std::filesystem::temp_directory_path() / ("rhine_json_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  std::string path = (dir / "c.json").string();
  Json j = {{"hidden_size", 64}, {"name", "Straße"}, {"rope_theta", 500000.0}};
  rhine::write_json_file(path, j);
  CHECK(rhine::read_json_file(path, "config") == j);
  CHECK_THROWS_WITH(rhine::read_json_file((dir / "nope.json").string(), "config"),
                    Contains("[config] cannot open file for reading, got \"") && Contains("nope.json"));
  std::filesystem::remove_all(dir);
}

TEST_CASE("edit_distance", "[json]") {
  CHECK(rhine::edit_distance("", "") == 0);
  CHECK(rhine::edit_distance("kitten", "sitting") == 3);
  CHECK(rhine::edit_distance("lerning_rate", "learning_rate") == 1);
  CHECK(rhine::edit_distance("abc", "") == 3);
}
