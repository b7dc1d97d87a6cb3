#!/usr/bin/env bash
# Library code reads tensor values on the host only through rhine/torch/sync.h
# (to_host, host_value, cpu_value), so that the synchronisation count the
# trainer tests hold a step to is complete. Fails on any other .item(), .cpu()
# or .to(kCPU) under lib/, except lines marked "// host read: <why>" (files
# being written). Checks first that the pattern does catch such a read.
#   host_reads_test.sh SOURCE_DIR
set -euo pipefail
src=$1
pattern='\.item<|\.item\(\)|\.cpu\(\)|\.to\((at|c10|torch)::kCPU\)'
probe=$(mktemp)
trap 'rm -f "$probe"' EXIT
printf 'double x = t.item<double>();\nauto c = t.cpu();\nauto d = t.to(at::kCPU);\n' >"$probe"
[[ $(grep -cE "$pattern" "$probe") == 3 ]] || { echo "FAIL: the pattern misses host reads" >&2; exit 1; }
hits=$(grep -rnE "$pattern" "$src/lib" --include='*.cpp' --include='*.h' |
       grep -vE '^[^:]*/lib/torch/sync\.cpp:|// host read: ' || true)
if [[ -n "$hits" ]]; then
  echo "FAIL: host reads outside rhine/torch/sync.h (use rhine::to_host / host_value / cpu_value):" >&2
  echo "$hits" >&2
  exit 1
fi
echo "no unmarked host reads under lib/"
