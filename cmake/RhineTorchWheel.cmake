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
