#!/usr/bin/env bash
# Installs what is missing, then configures and builds Rhine against one of two LibTorch builds.
#
#   scripts/build.sh [--torch=debian|wheel] [extra cmake -D options]
#
#   --torch=debian  (default) Debian's LibTorch 1.13, CPU only, into build/.
#   --torch=wheel   LibTorch 2.x from the PyTorch wheel of the project's Python environment
#                   (scripts/setup-python.sh), into build-torch2/, with the CUDA sources and the
#                   NCCL backend compiled and linked when the CUDA toolkit (nvcc) is there.
#
# Environment: RHINE_BUILD_DIR (default: build or build-torch2), RHINE_JOBS (default: all
# CPUs), RHINE_SKIP_SETUP=1 to skip the package check, CUDA_HOME (default /usr/local/cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
torch=debian
if [[ "${1:-}" == --torch=* ]]; then
  torch=${1#--torch=}
  shift
fi
[[ "${RHINE_SKIP_SETUP:-0}" == 1 ]] || scripts/setup.sh
jobs=${RHINE_JOBS:-$(nproc)}
args=()
case "$torch" in
  debian)
    build_dir=${RHINE_BUILD_DIR:-build}
    ;;
  wheel)
    build_dir=${RHINE_BUILD_DIR:-build-torch2}
    py=$(scripts/setup-python.sh)/bin/python
    args+=(-DCMAKE_PREFIX_PATH="$("$py" -c 'import torch; print(torch.utils.cmake_prefix_path)')")
    cuda_home=${CUDA_HOME:-/usr/local/cuda}
    if [[ -x "$cuda_home/bin/nvcc" ]]; then
      export PATH="$cuda_home/bin:$PATH"
      # The CUDA sources are C++ against LibTorch's CUDA headers; the architecture list only
      # quiets PyTorch's detection (there is no GPU on build machines).
      export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
      args+=(-DCUDAToolkit_ROOT="$cuda_home" -DRHINE_WITH_CUDA=ON -DRHINE_WITH_NCCL=ON)
    else
      echo "[build] no nvcc under $cuda_home: building against the wheel without CUDA/NCCL (set CUDA_HOME)" >&2
    fi
    ;;
  *) echo "[build] unknown --torch, got '$torch'; use --torch=debian or --torch=wheel" >&2; exit 2 ;;
esac
args+=("$@")
if [[ ! -f "$build_dir/CMakeCache.txt" || ${#args[@]} -gt 0 ]]; then
  cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release "${args[@]}" >/dev/null
fi
cmake --build "$build_dir" -j "$jobs"
