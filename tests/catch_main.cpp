// The one translation unit that compiles Catch2's runner, and the listener that reports
// skipped test cases (RHINE_SKIP_TEST / RHINE_SKIP_PART in test_util.h).
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>

#include <iostream>

#include "test_util.h"

namespace {

// Prints "RHINE_TEST_SKIPPED: <reason> [<test case>]" on stdout when a test case that
// recorded a skip ends without a failed assertion; ctest matches it (SKIP_REGULAR_EXPRESSION)
// and reports the test as Skipped. A test case with a failure prints nothing and stays Failed.
struct SkipListener : Catch::TestEventListenerBase {
  using TestEventListenerBase::TestEventListenerBase;

  void testCaseStarting(Catch::TestCaseInfo const& info) override {
    rhine::test::skip_reasons().clear();
    TestEventListenerBase::testCaseStarting(info);
  }

  void testCaseEnded(Catch::TestCaseStats const& stats) override {
    auto& reasons = rhine::test::skip_reasons();
    if (stats.totals.assertions.failed == 0) {
      for (const auto& r : reasons) std::cout << rhine::test::kSkipMarker << " " << r << " [" << stats.testInfo.name << "]\n";
      std::cout.flush();
    }
    reasons.clear();
    TestEventListenerBase::testCaseEnded(stats);
  }
};

}  // namespace

CATCH_REGISTER_LISTENER(SkipListener)
