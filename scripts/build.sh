#!/usr/bin/env bash
# Installs missing Debian packages, then configures and builds Rhine.
#
#   scripts/build.sh [extra cmake -D options]
#
# Environment: RHINE_BUILD_DIR (default: build), RHINE_JOBS (default: all CPUs),
# RHINE_SKIP_SETUP=1 to skip the package check.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ "${RHINE_SKIP_SETUP:-0}" == 1 ]] || scripts/setup.sh
build_dir=${RHINE_BUILD_DIR:-build}
jobs=${RHINE_JOBS:-$(nproc)}
if [[ ! -f "$build_dir/CMakeCache.txt" || $# -gt 0 ]]; then
  cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
fi
cmake --build "$build_dir" -j "$jobs"
