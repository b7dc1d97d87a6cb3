#!/usr/bin/env bash
# Installs missing Debian packages, builds Rhine and runs its tests.
#
#   scripts/test.sh                # every test
#   scripts/test.sh -LE slow       # extra arguments go to ctest
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh
cd "${RHINE_BUILD_DIR:-build}"
ctest -j "${RHINE_JOBS:-$(nproc)}" --output-on-failure --timeout 1200 "$@"
