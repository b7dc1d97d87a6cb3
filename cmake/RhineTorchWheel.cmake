# What a PyTorch wheel's LibTorch needs pinned before find_package(Torch): its CUDA libraries
# (rhine_torch_wheel_cuda) and the files of its own lib folder, LibTorch's libraries and its
# OpenMP runtime (rhine_torch_wheel_libraries). Each does nothing for other LibTorch builds.

# The CUDA libraries of a PyTorch wheel. pip keeps the libraries LibTorch was built against in
# site-packages/nvidia/*/lib (cudart, cuBLAS, cuDNN, NCCL, ...), which may be newer than the
# CUDA toolkit's in /usr/local/cuda. Linking against the toolkit's instead fails (libtorch_cuda
# needs newer NCCL symbols) or loads two CUDA runtimes. Used by Rhine's own build
# (RhineDependencies.cmake) and by its installed package (RhineConfig.cmake), before
# find_package(Torch).
#
#   rhine_torch_wheel_cuda(<dir holding TorchConfig.cmake>)
# sets, when that LibTorch is a wheel with nvidia/ beside it:
#   CUDA_cudart_LIBRARY (cache, unless already set): the wheel's cudart, for CUDA::cudart;
#   RHINE_WHEEL_CUDA_LIB_DIRS: the nvidia/*/lib folders (for the linker's -rpath-link).
function(rhine_torch_wheel_cuda torch_config_dir)
  set(RHINE_WHEEL_CUDA_LIB_DIRS "" PARENT_SCOPE)
  get_filename_component(nvidia "${torch_config_dir}/../../../../nvidia" ABSOLUTE)
  if(NOT EXISTS "${torch_config_dir}/TorchConfig.cmake" OR NOT IS_DIRECTORY "${nvidia}")
    return()
  endif()
  file(GLOB dirs LIST_DIRECTORIES true "${nvidia}/*/lib")
  file(GLOB cudart "${nvidia}/*/lib/libcudart.so.[0-9]*")
  if(cudart AND NOT CUDA_cudart_LIBRARY)
    list(GET cudart 0 cudart)
    set(CUDA_cudart_LIBRARY "${cudart}" CACHE FILEPATH "cudart of the PyTorch wheel (Rhine)")
  endif()
  set(RHINE_WHEEL_CUDA_LIB_DIRS "${dirs}" PARENT_SCOPE)
endfunction()

# _rhine_pin(<cache variable> <file> <doc>): when <file> exists, the cache variable names it,
# also over an earlier value (a build folder configured before, or against another LibTorch:
# one process must not mix two builds' libraries), with a message when it replaces one.
function(_rhine_pin var file doc)
  if(NOT EXISTS "${file}" OR "${${var}}" STREQUAL "${file}")
    return()
  endif()
  if(${var})
    message(STATUS "Rhine: ${var} was ${${var}}; now ${file}")
  endif()
  set(${var} "${file}" CACHE FILEPATH "${doc}" FORCE)
endfunction()

# The files of a PyTorch wheel's lib folder.
# - LibTorch's libraries. TorchConfig.cmake looks them up with find_library(... PATHS <its
#   folder>), which searches the system folders first: on a machine that also has Debian's
#   LibTorch (scripts/setup.sh installs both) TORCH_LIBRARIES would then name Debian's libc10.so
#   next to the wheel's targets, and "Found Torch" would print Debian's libtorch.so. Rhine links
#   the imported targets only, but a program that links ${TORCH_LIBRARIES}, as PyTorch's
#   documentation shows, would mix the two.
# - Its OpenMP runtime. The wheel ships its own libgomp.so.1, which LibTorch's rpath loads at run
#   time. Linking Rhine's OpenMP-compiled kernels against that file (find_package(OpenMP) reads
#   OpenMP_gomp_LIBRARY) rather than the compiler's libgomp checks their symbols against the
#   runtime that will serve them, and spares CMake's warning, once per program, that the
#   compiler's libgomp "may be hidden" by the wheel's folder.
#
#   rhine_torch_wheel_libraries(<dir holding TorchConfig.cmake>)
# sets TORCH_LIBRARY, c10_LIBRARY, C10_CUDA_LIBRARY, CAFFE2_NVRTC_LIBRARY and OpenMP_gomp_LIBRARY
# (cache; also over an earlier value, saying so) to the files in that LibTorch's lib folder,
# where they exist.
function(rhine_torch_wheel_libraries torch_config_dir)
  get_filename_component(lib "${torch_config_dir}/../../../lib" ABSOLUTE)
  if(NOT EXISTS "${torch_config_dir}/TorchConfig.cmake" OR NOT EXISTS "${lib}/libtorch.so")
    return()
  endif()
  foreach(pair IN ITEMS TORCH_LIBRARY:libtorch.so c10_LIBRARY:libc10.so
                        C10_CUDA_LIBRARY:libc10_cuda.so CAFFE2_NVRTC_LIBRARY:libcaffe2_nvrtc.so
                        OpenMP_gomp_LIBRARY:libgomp.so.1)
    string(REPLACE ":" ";" pair "${pair}")
    list(GET pair 0 var)
    list(GET pair 1 file)
    _rhine_pin(${var} "${lib}/${file}" "${file} of this LibTorch (Rhine)")
  endforeach()
endfunction()
