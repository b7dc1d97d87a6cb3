#!/usr/bin/env bash
# The one command for a GPU machine: builds Rhine against that machine's PyTorch 2.x with the
# CUDA sources and the NCCL backend, runs the CUDA-labelled tests (a bf16 training step on cuda
# against the CPU step, the MoE grouped GEMM, packed documents through the variable-length
# flash kernel, generation, checkpoint tensors on the device, a one-rank NCCL world with every
# Trainer collective) and the quick CPU tests against that LibTorch, then prints the GPU
# training benchmark (bench_gpu: Rhine vs PyTorch eager and torch.compile) and the packed-
# document attention on cuda (bench_attention) as JSON Lines.
#
#   scripts/gpu-check.sh [--no-bench]
#
# Environment:
#   RHINE_GPU_PYTHON  a python3 with torch >= 2 (default: python3 when it has torch, else the
#                     project's environment from scripts/setup-python.sh)
#   RHINE_BUILD_DIR   build directory (default: build-gpu)
#   RHINE_JOBS        parallel jobs (default: all CPUs)
# Libraries the machine lacks (fmt, spdlog, Catch2, ...) come from .gpu-deps/*.deb when present
# (scripts/pack-gpu-deps.sh fills it on a Debian machine); they are unpacked into
# .gpu-deps/root and put on the search paths.
#
# Exit status: 0 everything passed; 1 a step failed; 77 the build passed but there is no GPU,
# so nothing GPU-side ran (the script says so). Full logs: $RHINE_BUILD_DIR/gpu-check/.
set -uo pipefail
cd "$(dirname "$0")/.."
bench=1
[[ "${1:-}" == --no-bench ]] && bench=0
build_dir=${RHINE_BUILD_DIR:-build-gpu}
jobs=${RHINE_JOBS:-$(nproc)}
logs="$build_dir/gpu-check"
mkdir -p "$logs"
say() { echo "[gpu-check] $*"; }
fail() { say "FAILED: $*"; exit 1; }

# 1. A Python with PyTorch 2.x: its LibTorch is what Rhine builds against.
has_torch2() { "$1" -c 'import sys, torch; sys.exit(0 if int(torch.__version__.split(".")[0]) >= 2 else 1)' 2>/dev/null; }
py=${RHINE_GPU_PYTHON:-}
if [[ -z "$py" ]]; then
  if command -v python3 >/dev/null && has_torch2 python3; then py=python3; else py=$(scripts/setup-python.sh)/bin/python || fail "no python3 with torch >= 2 (set RHINE_GPU_PYTHON)"; fi
fi
has_torch2 "$py" || fail "$py has no torch >= 2 (set RHINE_GPU_PYTHON)"
torch_prefix=$("$py" -c 'import torch; print(torch.utils.cmake_prefix_path)')
say "PyTorch $("$py" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)') from $py"

# 2. Carried Debian libraries, if any.
prefix_path="$torch_prefix"
if compgen -G ".gpu-deps/*.deb" >/dev/null; then
  root="$PWD/.gpu-deps/root"
  if [[ ! -d "$root/usr" ]]; then
    for f in .gpu-deps/*.deb; do dpkg -x "$f" "$root" || fail "cannot unpack $f"; done
  fi
  prefix_path="$root/usr;$prefix_path"
  export LD_LIBRARY_PATH="$root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export PKG_CONFIG_SYSROOT_DIR="$root" PKG_CONFIG_PATH="$root/usr/lib/x86_64-linux-gnu/pkgconfig:$root/usr/share/pkgconfig"
  say "libraries from .gpu-deps/ ($(ls .gpu-deps/*.deb | wc -l) packages)"
fi

# 3. Configure and build (CUDA sources + NCCL backend + benchmarks).
cuda_home=${CUDA_HOME:-/usr/local/cuda}
[[ -x "$cuda_home/bin/nvcc" ]] && export PATH="$cuda_home/bin:$PATH"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
say "configuring $build_dir"
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix_path" \
  -DCUDAToolkit_ROOT="$cuda_home" -DRHINE_WITH_CUDA=ON -DRHINE_WITH_NCCL=ON -DRHINE_BUILD_BENCH=ON \
  -DRHINE_PYTHON="$(command -v "$py")" >"$logs/configure.log" 2>&1 || { tail -30 "$logs/configure.log"; fail "configure (log: $logs/configure.log)"; }
say "building ($jobs jobs)"
targets=(rhine_test_cuda rhine_test_torch rhine_test_nn rhine_test_dist rhine_dist_worker rhine_test_train rhine_trainer_worker bench_gpu bench_attention)
cmake --build "$build_dir" -j "$jobs" --target "${targets[@]}" >"$logs/build.log" 2>&1 || { grep -m5 -A5 "error" "$logs/build.log"; fail "build (log: $logs/build.log)"; }
say "build OK: CUDA sources and NCCL backend compiled and linked"

# 4. A GPU?
n_gpu=$("$py" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [[ "$n_gpu" == 0 ]]; then
  say "no GPU visible (torch.cuda.device_count() = 0): stopping after the build; nothing GPU-side ran"
  exit 77
fi
say "$n_gpu GPU(s): $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"

# 5. Tests: the GPU ones must run (RHINE_REQUIRE_GPU=1), then the quick CPU ones on this LibTorch.
status=0
(cd "$build_dir" && RHINE_REQUIRE_GPU=1 ctest -L cuda --output-on-failure --timeout 600) >"$logs/ctest-cuda.log" 2>&1 || status=1
(cd "$build_dir" && ctest -L 'torch|nn|dist|train' -LE slow -j "$jobs" --output-on-failure --timeout 600) >"$logs/ctest-cpu.log" 2>&1 || status=1

# 6. The GPU training benchmark, side by side with PyTorch eager and torch.compile.
if [[ $bench == 1 ]]; then
  "$build_dir/bench/bench_gpu" --python "$py" >"$logs/bench_gpu.jsonl" 2>"$logs/bench_gpu.err" || status=1
  # Packed documents on cuda: the variable-length flash kernel vs the dense document mask.
  "$build_dir/bench/bench_attention" --cuda-only >>"$logs/bench_gpu.jsonl" 2>"$logs/bench_attention.err" || status=1
fi

echo
say "summary"
grep -E "tests passed|tests failed|Skipped|\*\*\*Failed" "$logs/ctest-cuda.log" | sed 's/^/  cuda: /'
grep -E "tests passed|tests failed|\*\*\*Failed" "$logs/ctest-cpu.log" | sed 's/^/  cpu:  /'
[[ $bench == 1 ]] && cat "$logs/bench_gpu.jsonl"
[[ $status == 0 ]] && say "OK" || say "FAILED (logs in $logs)"
exit $status
