# Every dependency comes from Debian's packages (scripts/setup.sh installs them).
# The torch-free layer and LibTorch are found separately so that a build of
# the tokenizer alone never needs LibTorch's headers.
find_package(fmt REQUIRED)
find_package(spdlog REQUIRED)
find_package(nlohmann_json 3.10 REQUIRED)
find_package(PkgConfig REQUIRED)
pkg_check_modules(PCRE2 REQUIRED IMPORTED_TARGET libpcre2-8)
pkg_check_modules(UTF8PROC REQUIRED IMPORTED_TARGET libutf8proc)
pkg_check_modules(XXHASH REQUIRED IMPORTED_TARGET libxxhash)

find_package(Torch REQUIRED)
# Torch 1.13 sets TORCH_CXX_FLAGS (the C++11 ABI switch) on its imported
# target already; nothing else from TORCH_CXX_FLAGS is needed.
set(RHINE_TORCH_VERSION "${Torch_VERSION}")
if(NOT RHINE_TORCH_VERSION)
  set(RHINE_TORCH_VERSION "unknown")
endif()
message(STATUS "Rhine: LibTorch ${RHINE_TORCH_VERSION} from ${TORCH_INSTALL_PREFIX}")
