#!/usr/bin/env bash
# The one command for a GPU machine: builds Rhine against that machine's PyTorch 2.x with the
# CUDA sources and the NCCL backend, runs the CUDA-labelled tests (a bf16 training step on cuda
# against the CPU step, the MoE grouped GEMM, packed documents through the variable-length
# flash kernel, generation, checkpoint tensors on the device, a one-rank NCCL world with every
# Trainer collective), prints the GPU training benchmark (bench_gpu: Rhine vs PyTorch eager and
# torch.compile) and the packed-document attention on cuda (bench_attention) as JSON Lines,
# and last builds and runs the quick CPU tests against that LibTorch.
#
#   scripts/gpu-check.sh [--no-bench] [--no-cpu-tests]
#
# The steps run in order of what only a GPU machine can tell (GPU tests, GPU benchmark, then
# the CPU tests CI also runs), and each prints its result and elapsed time as it ends, so a
# run cut short by a time limit still reports what it reached.
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
# Exit status: 0 everything passed; 1 a step failed; 2 bad usage; 77 the build passed but there
# is no GPU, so nothing GPU-side ran (the script says so). Full logs: $RHINE_BUILD_DIR/gpu-check/.
set -uo pipefail
cd "$(dirname "$0")/.."
bench=1 cpu_tests=1
for arg in "$@"; do
  case $arg in
    --no-bench) bench=0 ;;
    --no-cpu-tests) cpu_tests=0 ;;
    *) echo "usage: scripts/gpu-check.sh [--no-bench] [--no-cpu-tests]" >&2; exit 2 ;;
  esac
done
build_dir=${RHINE_BUILD_DIR:-build-gpu}
jobs=${RHINE_JOBS:-$(nproc)}
logs="$build_dir/gpu-check"
mkdir -p "$logs"
say() { echo "[gpu-check $(printf '%4d' $SECONDS)s] $*"; }
fail() { say "FAILED: $*"; exit 1; }
report() {  # report <name> <log> [<ctest status>]: the verdict; a failed run's last lines too
  grep -E "tests passed|tests failed|Skipped|\*\*\*Failed|Not Run" "$2" | sed "s/^/  $1: /"
  [[ "${3:-0}" != 0 ]] && tail -40 "$2" | sed "s/^/  $1| /"
  return 0
}

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
gpu_targets=(rhine_test_cuda bench_gpu bench_attention)
build() {  # build <what> [targets...] (none: everything)
  local what=$1; shift
  say "building $what ($jobs jobs)"
  cmake --build "$build_dir" -j "$jobs" ${1:+--target "$@"} >>"$logs/build.log" 2>&1 || { grep -m5 -A8 -E "error:|^FAILED:" "$logs/build.log"; fail "build (log: $logs/build.log)"; }
}
: >"$logs/build.log"
build "the GPU tests and benchmarks" "${gpu_targets[@]}"
say "build OK: CUDA sources and NCCL backend compiled and linked"

# 4. A GPU?
n_gpu=$("$py" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [[ "$n_gpu" == 0 ]]; then
  [[ $cpu_tests == 1 ]] && build "everything else (the CPU tests' programs)"
  say "no GPU visible (torch.cuda.device_count() = 0): stopping after the build; nothing GPU-side ran"
  exit 77
fi
say "$n_gpu GPU(s): $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"

# 5. The GPU tests: they must run (RHINE_REQUIRE_GPU=1); a skip fails.
status=0
say "GPU tests (ctest -L cuda)"
rc=0
# --timeout 150: a hung test (an NCCL rendezvous, say) must not spend a lent machine's minutes.
(cd "$build_dir" && RHINE_REQUIRE_GPU=1 ctest -L cuda --no-tests=error --output-on-failure --timeout 150) >"$logs/ctest-cuda.log" 2>&1 || rc=1 status=1
report cuda "$logs/ctest-cuda.log" $rc

# 6. The benchmarks, quickest first, each size on its own so that a run cut off by a time
#    limit keeps what finished: packed documents on cuda (the variable-length flash kernel
#    vs the dense document mask), then the training step side by side with PyTorch eager
#    and torch.compile (whose compile of the 0.9B model takes the longest).
if [[ $bench == 1 ]]; then
  say "bench_attention --cuda-only"
  "$build_dir/bench/bench_attention" --cuda-only >"$logs/bench_attention.jsonl" 2>"$logs/bench_attention.err" || { status=1; tail -20 "$logs/bench_attention.err"; }
  cat "$logs/bench_attention.jsonl"
  : >"$logs/bench_gpu.jsonl"; : >"$logs/bench_gpu.err"
  for size in 125M 0.9B; do
    say "bench_gpu --size $size (Rhine vs PyTorch eager and torch.compile)"
    "$build_dir/bench/bench_gpu" --size "$size" --python "$py" >>"$logs/bench_gpu.jsonl" 2>>"$logs/bench_gpu.err" || { status=1; tail -20 "$logs/bench_gpu.err"; }
    grep -F "\"$size\"" "$logs/bench_gpu.jsonl" || true
  done
fi

# 7. The quick CPU tests against this LibTorch (CI runs them too, on the CPU).
if [[ $cpu_tests == 1 ]]; then
  build "everything else (the CPU tests' programs)"
  say "CPU tests (ctest -L 'torch|nn|optim|dist|train' -LE slow)"
  rc=0
  (cd "$build_dir" && ctest -L 'torch|nn|optim|dist|train' -LE slow -j "$jobs" --no-tests=error --output-on-failure --timeout 600) >"$logs/ctest-cpu.log" 2>&1 || rc=1 status=1
  report cpu "$logs/ctest-cpu.log" $rc
fi

echo
say "summary"
report cuda "$logs/ctest-cuda.log"
[[ $cpu_tests == 1 ]] && report cpu "$logs/ctest-cpu.log"
[[ $bench == 1 ]] && cat "$logs/bench_gpu.jsonl" "$logs/bench_attention.jsonl"
[[ $status == 0 ]] && say "OK" || say "FAILED (logs in $logs)"
exit $status
