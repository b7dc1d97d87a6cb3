#!/usr/bin/env bash
# Installs missing Debian packages, builds Rhine and runs the main job.
#
# Until the trainer lands, the main job is rhine-info: it reports what this
# machine gives Rhine (LibTorch, device, threads) and measures fp32 and bf16
# matmul throughput. The multilingual training demo replaces it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh
echo "== rhine-info (the training demo replaces this once the trainer lands)"
"${RHINE_BUILD_DIR:-build}/examples/rhine-info" "$@"
