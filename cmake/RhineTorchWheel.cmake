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

# The OpenMP runtime of a PyTorch wheel. The wheel ships its own libgomp.so.1 beside
# libtorch_cpu.so, and LibTorch's rpath loads that one at run time. Linking Rhine's
# OpenMP-compiled kernels against the same file (rather than the compiler's libgomp) checks
# their symbols against the runtime that will serve them, and spares CMake's warning that
# the compiler's libgomp "may be hidden" by the wheel's folder, once per program.
#
#   rhine_torch_wheel_openmp(<LibTorch install prefix>)
# sets OpenMP_gomp_LIBRARY (cache, unless already set) when <prefix>/lib/libgomp.so.1 exists.
function(rhine_torch_wheel_openmp torch_prefix)
  if(EXISTS "${torch_prefix}/lib/libgomp.so.1" AND NOT OpenMP_gomp_LIBRARY)
    set(OpenMP_gomp_LIBRARY "${torch_prefix}/lib/libgomp.so.1" CACHE FILEPATH
        "libgomp of the PyTorch wheel (Rhine)")
  endif()
endfunction()
