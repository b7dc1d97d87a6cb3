# Honest skips for shell-script tests (docs/testing.md); source it, then
#   rhine_skip "what is missing; how to provide it"
# prints "RHINE_TEST_SKIPPED: <reason>" and exits 0, which ctest reports as Skipped (the test
# carries SKIP_REGULAR_EXPRESSION on that marker, tests/CMakeLists.txt). Under
# RHINE_REQUIRE_REFERENCES=1 it fails instead (exit 1), naming what is missing.
rhine_skip() {
  if [[ "${RHINE_REQUIRE_REFERENCES:-}" == 1 ]]; then
    echo "FAIL: missing reference: $1" >&2
    echo "(RHINE_REQUIRE_REFERENCES=1 turns skips into failures; without it this test reports Skipped)" >&2
    exit 1
  fi
  echo "RHINE_TEST_SKIPPED: $1"
  exit 0
}
