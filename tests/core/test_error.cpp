#include <catch2/catch.hpp>

#include <map>
#include <string>
#include <vector>

#include "rhine/core/error.h"

using Catch::Matchers::Equals;

TEST_CASE("RHINE_CHECK message reads [component] what, got VALUE, hint", "[error]") {
  int heads = 7;
  try {
    RHINE_CHECK(heads % 2 == 0, "config", "num_attention_heads must be even", heads,
                "use an even head count");
    FAIL("no throw");
  } catch (const rhine::Error& e) {
    CHECK_THAT(e.what(), Equals("[config] num_attention_heads must be even, got 7; use an even head count"));
    CHECK(e.component() == "config");
    CHECK(e.description() == "num_attention_heads must be even");
    CHECK(e.value() == "7");
    CHECK(e.hint() == "use an even head count");
  }
}

TEST_CASE("RHINE_CHECK passes and does not evaluate the message when the condition holds",
          "[error]") {
  int evaluated = 0;
  auto what = [&] {
    ++evaluated;
    return std::string("never");
  };
  RHINE_CHECK(true, "x", what(), 1, what());
  CHECK(evaluated == 0);
}

TEST_CASE("error values are rendered: strings quoted and escaped, containers listed", "[error]") {
  using rhine::detail::display;
  CHECK(display(std::string("ab")) == "\"ab\"");
  CHECK(display("a\"b\n") == "\"a\\\"b\\n\"");
  CHECK(display(std::string("\x01")) == "\"\\x01\"");
  CHECK(display(std::vector<int>{1, 2, 3}) == "[1, 2, 3]");
  CHECK(display(std::vector<std::string>{"x"}) == "[\"x\"]");
  CHECK(display(true) == "true");
  CHECK(display(2.5) == "2.5");
  CHECK(display(static_cast<unsigned char>(200)) == "200");
  // UTF-8 stays readable.
  CHECK(display(std::string("Straße")) == "\"Straße\"");
  CHECK(display(rhine::Verbatim{"[1,2]"}) == "[1,2]");
  // Long values are cut, so a whole file never ends up in one message.
  CHECK(display(std::string(1000, 'a')).size() < 220);
}

TEST_CASE("RHINE_FAIL throws without value and hint when they are empty", "[error]") {
  CHECK_THROWS_WITH(RHINE_FAIL("io", "disk gone", std::string_view{}, ""), "[io] disk gone, got \"\"");
  try {
    throw rhine::Error("io", "disk gone");
  } catch (const rhine::Error& e) {
    CHECK_THAT(e.what(), Equals("[io] disk gone"));
  }
}
