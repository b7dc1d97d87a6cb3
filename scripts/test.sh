#!/usr/bin/env bash
# Installs what is missing (Debian packages, the project's Python environment with the
# reference libraries), builds Rhine and runs its tests.
#
#   scripts/test.sh                       # Debian's LibTorch 1.13 (build/), every test
#   scripts/test.sh --torch=wheel         # LibTorch 2.x from the PyTorch wheel with CUDA and
#                                         # NCCL compiled in (build-torch2/), every test
#   scripts/test.sh -LE slow              # extra arguments go to ctest
#
# A test whose reference is missing shows as "Skipped" in ctest's summary, never as passed;
# RHINE_REQUIRE_REFERENCES=1 turns those skips into failures (.ci/run sets it). GPU tests
# (label cuda) skip without a GPU: scripts/gpu-check.sh runs them. See docs/testing.md.
set -euo pipefail
cd "$(dirname "$0")/.."
torch=debian
if [[ "${1:-}" == --torch=* ]]; then
  torch=${1#--torch=}
  shift
fi
[[ "${RHINE_SKIP_SETUP:-0}" == 1 ]] || scripts/setup.sh
export RHINE_SKIP_SETUP=1
py=$(scripts/setup-python.sh)/bin/python
scripts/build.sh --torch="$torch" -DRHINE_PYTHON="$py"
if [[ "$torch" == wheel ]]; then build_dir=${RHINE_BUILD_DIR:-build-torch2}; else build_dir=${RHINE_BUILD_DIR:-build}; fi
cd "$build_dir"
ctest -j "${RHINE_JOBS:-$(nproc)}" --output-on-failure --timeout 1200 "$@"
