// Demonstrations of the skip mechanism (RHINE_SKIP_TEST / RHINE_SKIP_PART in test_util.h).
// Built into rhine_test_skip_demo, which ctest does not discover (one case fails on purpose);
// the ctest test base.skip_mechanism (core/skip_mechanism_test.cmake) runs them and checks the
// marker, the exit status and the message with and without RHINE_REQUIRE_REFERENCES=1.
#include <catch2/catch.hpp>

#include <cstdio>

#include "test_util.h"

TEST_CASE("skip demo: a missing reference skips the test case", "[.][skip_demo_skip]") {
  CHECK(1 + 1 == 2);
  RHINE_SKIP_TEST("demo reference /nonexistent/demo; provide it with the demo variable");
  FAIL("unreachable: RHINE_SKIP_TEST returns");
}

TEST_CASE("skip demo: a missing reference skips part of the test case", "[.][skip_demo_part]") {
  RHINE_SKIP_PART("demo reference /nonexistent/demo-part; provide it with the demo variable");
  CHECK(2 + 2 == 4);
  std::puts("after the skipped part");
}

TEST_CASE("skip demo: a failure before a skip stays a failure", "[.][skip_demo_fail]") {
  CHECK(1 + 1 == 3);
  RHINE_SKIP_TEST("demo reference /nonexistent/demo-fail");
}
