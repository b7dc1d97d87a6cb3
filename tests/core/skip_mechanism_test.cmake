# Checks the skip mechanism (test_util.h, catch_main.cpp) on the [skip_demo_*] test cases of
# rhine_test_skip_demo (core/test_skip.cpp).
#   cmake -DTEST_BINARY=... -DMARKER=RHINE_TEST_SKIPPED: -P skip_mechanism_test.cmake

# run(SPEC REQUIRE_FLAG): runs TEST_BINARY SPEC with RHINE_REQUIRE_REFERENCES=REQUIRE_FLAG;
# sets rc and out (stdout + stderr) in the caller.
function(run spec flag)
  execute_process(
    COMMAND ${CMAKE_COMMAND} -E env RHINE_REQUIRE_REFERENCES=${flag} ${TEST_BINARY} ${spec}
    RESULT_VARIABLE r OUTPUT_VARIABLE o ERROR_VARIABLE o)
  set(rc "${r}" PARENT_SCOPE)
  set(out "${o}" PARENT_SCOPE)
  message(STATUS "--- ${spec} with RHINE_REQUIRE_REFERENCES=${flag}: exit ${r}\n${o}")
endfunction()

# expect(WHAT CONDITION...): stops with WHAT unless the if() condition holds.
function(expect what)
  if(NOT (${ARGN}))
    message(FATAL_ERROR "skip mechanism: ${what}")
  endif()
endfunction()

string(REGEX REPLACE "([][+.*()^$?|\\\\])" "\\\\\\1" marker_re "${MARKER}")

# A skipped test case: exit 0, the marker with its reason.
run("[skip_demo_skip]" 0)
expect("a skipped test case exits 0" rc EQUAL 0)
string(REGEX MATCH "(^|\n)${marker_re} demo reference /nonexistent/demo; provide it" m "${out}")
expect("a skipped test case prints the marker line with its reason" m)
string(FIND "${out}" "unreachable" i)
expect("RHINE_SKIP_TEST returns from the test case" i EQUAL -1)

# Under RHINE_REQUIRE_REFERENCES=1: a failure naming the reference and the variable, no marker.
run("[skip_demo_skip]" 1)
expect("under RHINE_REQUIRE_REFERENCES=1 a skip fails" NOT rc EQUAL 0)
string(FIND "${out}" "missing reference: demo reference /nonexistent/demo" i)
expect("the failure names the missing reference" i GREATER -1)
string(FIND "${out}" "RHINE_REQUIRE_REFERENCES=1 turns skips into failures" i)
expect("the failure names RHINE_REQUIRE_REFERENCES=1" i GREATER -1)
string(FIND "${out}" "${MARKER}" i)
expect("a failed skip prints no marker" i EQUAL -1)

# A partly skipped test case runs to its end and is reported as skipped.
run("[skip_demo_part]" 0)
expect("a partly skipped test case exits 0" rc EQUAL 0)
string(FIND "${out}" "after the skipped part" i)
expect("RHINE_SKIP_PART lets the test case go on" i GREATER -1)
string(FIND "${out}" "${MARKER} demo reference /nonexistent/demo-part" i)
expect("a partly skipped test case prints the marker" i GREATER -1)
run("[skip_demo_part]" 1)
expect("under RHINE_REQUIRE_REFERENCES=1 a partial skip fails" NOT rc EQUAL 0)
string(FIND "${out}" "after the skipped part" i)
expect("under RHINE_REQUIRE_REFERENCES=1 the rest of a partly skipped test case still runs" i GREATER -1)

# A failure before the skip: no marker (ctest would otherwise hide the failure as a skip).
run("[skip_demo_fail]" 0)
expect("a failed test case that then skips exits non-zero" NOT rc EQUAL 0)
string(FIND "${out}" "${MARKER}" i)
expect("a failed test case prints no marker" i EQUAL -1)

message(STATUS "skip mechanism: all checks passed")
