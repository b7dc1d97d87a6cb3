# Warnings and sanitizers, applied through an interface target so that only
# Rhine's own targets get them (never the consumers of an installed Rhine).
add_library(rhine_build_flags INTERFACE)
target_compile_options(rhine_build_flags INTERFACE
  -Wall -Wextra -Wpedantic -Wnon-virtual-dtor -Wcast-align
  $<$<CXX_COMPILER_ID:GNU>:-Wshadow=local>
  -Wno-unused-parameter           # LibTorch headers and autograd overrides
  -Wno-missing-field-initializers # options structs are filled partially on purpose
  $<$<BOOL:${RHINE_WERROR}>:-Werror>)

if(RHINE_SANITIZE STREQUAL "address")
  set(_rhine_san -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined)
elseif(RHINE_SANITIZE STREQUAL "undefined")
  set(_rhine_san -fsanitize=undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined)
elseif(NOT RHINE_SANITIZE STREQUAL "")
  message(FATAL_ERROR "[cmake] RHINE_SANITIZE must be '', 'address' or 'undefined', got '${RHINE_SANITIZE}'")
endif()
if(RHINE_BUILD_FUZZ)
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "Clang")
    message(FATAL_ERROR "[cmake] RHINE_BUILD_FUZZ needs clang, got ${CMAKE_CXX_COMPILER_ID}; "
                        "configure with -DCMAKE_CXX_COMPILER=clang++-14")
  endif()
  # Coverage instrumentation for everything; the fuzzer's main comes at link
  # time of each fuzz target (fuzz/CMakeLists.txt).
  list(APPEND _rhine_san -fsanitize=fuzzer-no-link)
  if(NOT RHINE_SANITIZE)
    list(APPEND _rhine_san -fsanitize=address,undefined -fno-omit-frame-pointer)
  endif()
endif()
if(_rhine_san)
  target_compile_options(rhine_build_flags INTERFACE ${_rhine_san})
  target_link_options(rhine_build_flags INTERFACE ${_rhine_san})
endif()

# Attach the flags to a Rhine target (libraries, tools, tests, benches).
function(rhine_target_defaults target)
  target_link_libraries(${target} PRIVATE $<BUILD_INTERFACE:rhine_build_flags>)
  target_compile_features(${target} PUBLIC cxx_std_17)
endfunction()
