#!/usr/bin/env bash
# Builds one libFuzzer target with clang + ASan/UBSan and runs it for a while.
#
#   scripts/fuzz.sh TARGET [SECONDS]      e.g. scripts/fuzz.sh fuzz_safetensors 300
#
# The seed corpus is fuzz/corpus/TARGET/ (read only); new inputs go to
# build-fuzz/corpus/TARGET/ and crashes to build-fuzz/crashes/.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:?usage: scripts/fuzz.sh TARGET [SECONDS]}
seconds=${2:-60}
scripts/setup.sh
command -v clang++-14 >/dev/null || { echo "[fuzz] clang++-14 is missing; apt-get install clang-14 libclang-rt-14-dev" >&2; exit 1; }
if [[ ! -f build-fuzz/CMakeCache.txt ]]; then
  cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++-14 \
    -DRHINE_BUILD_FUZZ=ON -DRHINE_BUILD_TESTS=OFF -DRHINE_BUILD_EXAMPLES=OFF -DRHINE_BUILD_TOOLS=OFF >/dev/null
fi
cmake --build build-fuzz --target "$target"
mkdir -p "build-fuzz/corpus/$target" build-fuzz/crashes
seeds=()
[[ -d "fuzz/corpus/$target" ]] && seeds+=("fuzz/corpus/$target")
"build-fuzz/fuzz/$target" -max_total_time="$seconds" -print_final_stats=1 \
  -artifact_prefix=build-fuzz/crashes/ "build-fuzz/corpus/$target" "${seeds[@]}"
