# Every dependency comes from Debian's packages (scripts/setup.sh installs them),
# except the second LibTorch: PyTorch's wheel from PyPI (scripts/setup-python.sh),
# found through CMAKE_PREFIX_PATH (scripts/build.sh --torch=wheel sets it).
# The torch-free layer and LibTorch are found separately so that a build of
# the tokenizer alone never needs LibTorch's headers.
find_package(fmt REQUIRED)
find_package(spdlog REQUIRED)
find_package(nlohmann_json 3.10 REQUIRED)
find_package(PkgConfig REQUIRED)
pkg_check_modules(PCRE2 REQUIRED IMPORTED_TARGET libpcre2-8)
pkg_check_modules(UTF8PROC REQUIRED IMPORTED_TARGET libutf8proc)
pkg_check_modules(XXHASH REQUIRED IMPORTED_TARGET libxxhash)

# A PyTorch wheel's own CUDA, LibTorch and OpenMP libraries are pinned before find_package(Torch)
# (RhineTorchWheel.cmake), from the TorchConfig.cmake that find_package will load: Torch_DIR
# when set (or cached), else the first CMAKE_PREFIX_PATH entry that holds one.
include(RhineTorchWheel)
set(_rhine_torch_config "")
if(Torch_DIR AND EXISTS "${Torch_DIR}/TorchConfig.cmake")
  set(_rhine_torch_config "${Torch_DIR}")
else()
  foreach(_prefix IN LISTS CMAKE_PREFIX_PATH)
    if(EXISTS "${_prefix}/Torch/TorchConfig.cmake")
      set(_rhine_torch_config "${_prefix}/Torch")
      break()
    endif()
  endforeach()
endif()
if(_rhine_torch_config)
  rhine_torch_wheel_cuda("${_rhine_torch_config}")
  rhine_torch_wheel_libraries("${_rhine_torch_config}")
endif()
find_package(Torch REQUIRED)
if(RHINE_WHEEL_CUDA_LIB_DIRS)
  list(JOIN RHINE_WHEEL_CUDA_LIB_DIRS ":" RHINE_WHEEL_RPATH_LINK)
  message(STATUS "Rhine: CUDA libraries of the PyTorch wheel: ${RHINE_WHEEL_RPATH_LINK}")
endif()
# Torch 1.13 sets TORCH_CXX_FLAGS (the C++11 ABI switch) on its imported
# target already; nothing else from TORCH_CXX_FLAGS is needed.
set(RHINE_TORCH_VERSION "${Torch_VERSION}")
if(NOT RHINE_TORCH_VERSION)
  set(RHINE_TORCH_VERSION "unknown")
endif()
message(STATUS "Rhine: LibTorch ${RHINE_TORCH_VERSION} from ${TORCH_INSTALL_PREFIX}")

# at::parallel_for is a header template. In a LibTorch built on OpenMP (AT_PARALLEL_OPENMP:
# Debian's and the wheel's both are), it splits the work over LibTorch's threads only in files
# compiled with OpenMP; elsewhere it runs the whole range on the calling thread. Rhine's own CPU
# kernels (lib/nn/fused.cpp, the fused AdamW pass, ...) are therefore compiled with OpenMP
# (lib/CMakeLists.txt). One OpenMP runtime serves the process: libgomp.so.1, found first in
# the wheel's folder where LibTorch's rpath puts it, else the system's; a wheel's Rhine links
# against that same file (rhine_torch_wheel_libraries pinned it above).
set(RHINE_OPENMP OFF)
foreach(_inc IN LISTS TORCH_INCLUDE_DIRS)
  if(EXISTS "${_inc}/ATen/Config.h")
    file(STRINGS "${_inc}/ATen/Config.h" _rhine_at_omp REGEX "define AT_PARALLEL_OPENMP 1")
    if(_rhine_at_omp)
      find_package(OpenMP REQUIRED COMPONENTS CXX)
      set(RHINE_OPENMP ON)
    endif()
    break()
  endif()
endforeach()
message(STATUS "Rhine: own kernels on LibTorch's OpenMP threads: ${RHINE_OPENMP}")

# libstdc++ first among a program's libraries. PyTorch wheels since 2.5 export some libstdc++
# functions they link statically (pytorch/pytorch#133437: libtorch_cpu.so 101 of std::filesystem's
# in 2.11 and 2.15, 2.11's libtorch.so 64 more), and the dynamic linker binds a program's calls to
# the first library in its NEEDED list that defines them: LibTorch's come before libstdc++.so.6,
# and on 2.11 a call to std::filesystem::remove_all then jumps to address 0. Naming libstdc++
# before the others makes the program's calls, and LibTorch's, use the system's libstdc++, which
# LibTorch's copies only stand in for. Applied to rhine::rhine's users (lib/CMakeLists.txt) and
# to the test programs that link LibTorch alone (tests/CMakeLists.txt). GCC on Linux only (clang
# with libstdc++ would need it too, but is not a compiler Rhine builds with).
set(RHINE_LIBSTDCXX_FIRST "")
if(CMAKE_SYSTEM_NAME STREQUAL "Linux" AND CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
  set(RHINE_LIBSTDCXX_FIRST "LINKER:--push-state,--no-as-needed,-lstdc++,--pop-state")
endif()

# The PyTorch wheel ships fmt 12 headers in torch/include/fmt (for its own use). Its include
# directory would shadow Debian's fmt 9, which libfmt.so and Debian's spdlog 1.10 are built
# for, in every file that includes LibTorch. Rhine's targets therefore see Debian's fmt and
# spdlog first, through a folder of two links that is searched before LibTorch's (-I precedes
# -isystem). Installed consumers never see it (BUILD_INTERFACE).
# (Debian's LibTorch lives in /usr itself: its include folder is fmt's own, nothing to do.)
get_target_property(_rhine_fmt_inc fmt::fmt INTERFACE_INCLUDE_DIRECTORIES)
if(NOT _rhine_fmt_inc)
  set(_rhine_fmt_inc /usr/include)
endif()
list(GET _rhine_fmt_inc 0 _rhine_fmt_inc)
get_filename_component(_rhine_torch_inc "${TORCH_INSTALL_PREFIX}/include" REALPATH)
get_filename_component(_rhine_fmt_inc "${_rhine_fmt_inc}" REALPATH)
if(EXISTS "${_rhine_torch_inc}/fmt" AND NOT _rhine_torch_inc STREQUAL _rhine_fmt_inc)
  set(RHINE_SHADOW_INCLUDE_DIR "${PROJECT_BINARY_DIR}/rhine-shadow-include")
  file(MAKE_DIRECTORY "${RHINE_SHADOW_INCLUDE_DIR}")
  foreach(_lib fmt spdlog)
    if(NOT EXISTS "${_rhine_fmt_inc}/${_lib}")
      message(FATAL_ERROR "[cmake] ${_lib} headers not found in ${_rhine_fmt_inc}; install lib${_lib}-dev")
    endif()
    file(CREATE_LINK "${_rhine_fmt_inc}/${_lib}" "${RHINE_SHADOW_INCLUDE_DIR}/${_lib}" SYMBOLIC)
  endforeach()
  # rhine_build_flags (RhineCompilerFlags.cmake) reaches every Rhine target, never consumers.
  target_include_directories(rhine_build_flags INTERFACE $<BUILD_INTERFACE:${RHINE_SHADOW_INCLUDE_DIR}>)
  message(STATUS "Rhine: LibTorch ships its own fmt; Rhine's targets use ${_rhine_fmt_inc}/fmt and spdlog first")
endif()

# The GPU parts: both need a LibTorch built with CUDA (libtorch_cuda, c10_cuda).
if(RHINE_WITH_CUDA OR RHINE_WITH_NCCL)
  if(NOT TARGET torch_cuda OR NOT TARGET c10_cuda)
    message(FATAL_ERROR "[cmake] RHINE_WITH_CUDA / RHINE_WITH_NCCL need a CUDA build of LibTorch, "
                        "got ${TORCH_INSTALL_PREFIX} without torch_cuda; build against the PyTorch "
                        "wheel: scripts/build.sh --torch=wheel")
  endif()
endif()
if(RHINE_WITH_NCCL)
  # ProcessGroupNCCL.hpp includes <nccl.h>: the wheel's nvidia-nccl package or the CUDA toolkit.
  find_path(RHINE_NCCL_INCLUDE_DIR nccl.h
    HINTS ${TORCH_INSTALL_PREFIX}/../nvidia/nccl/include ${CUDAToolkit_INCLUDE_DIRS} /usr/local/cuda/include)
  if(NOT RHINE_NCCL_INCLUDE_DIR)
    message(FATAL_ERROR "[cmake] RHINE_WITH_NCCL: nccl.h not found; install NCCL (the CUDA toolkit's, "
                        "or pip's nvidia-nccl) or point RHINE_NCCL_INCLUDE_DIR at it")
  endif()
endif()
message(STATUS "Rhine: CUDA sources ${RHINE_WITH_CUDA}, NCCL backend ${RHINE_WITH_NCCL}")
