#!/usr/bin/env bash
# Installs missing Debian packages, builds Rhine and runs the main job: train a
# de/fr/nl/en tokenizer on the bundled sample, tokenize the sample into shards,
# pretrain a small DeepSeek-style model (MLA + MoE + MTP) on it, and print
# per-language held-out bits per byte before/after, a generated sample per
# language, and where the plot of the run is.
#
#   scripts/demo.sh [CONFIG.json]     (default: examples/configs/demo-moe.json;
#                                      examples/configs/demo-dense.json: a Llama-style model)
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-examples/configs/demo-moe.json}
scripts/build.sh
bin=${RHINE_BUILD_DIR:-build}
out=build/demo
S=data/sample
mkdir -p "$out"

echo "== 1/3 train a SentencePiece BPE tokenizer on de/fr/nl/en (rhine-tokenizer)"
"$bin/tokenizer/rhine-tokenizer" train --model-type bpe --vocab-size 4000 --temperature 3 --parity 1.08 \
  --input de=$S/de.txt --input fr=$S/fr.txt --input nl=$S/nl.txt --input en=$S/en.txt \
  --out "$out/tok" 2>&1 | grep -E '^\[parity\]|^\[train\] wrote'
"$bin/tokenizer/rhine-tokenizer" stats --tokenizer "$out/tok.model" --reference en \
  --input de=$S/heldout/de.txt --input fr=$S/heldout/fr.txt --input nl=$S/heldout/nl.txt \
  --input en=$S/heldout/en.txt

echo "== 2/3 tokenize the sample into shards (rhine-prepare)"
rm -rf "$out/shards"
"$bin/tools/rhine-prepare" -q -t "$out/tok.model" -o "$out/shards/train" \
  de=$S/de.txt fr=$S/fr.txt nl=$S/nl.txt en=$S/en.txt
"$bin/tools/rhine-prepare" -q -t "$out/tok.model" -o "$out/shards/heldout" \
  de=$S/heldout/de.txt fr=$S/heldout/fr.txt nl=$S/heldout/nl.txt en=$S/heldout/en.txt >/dev/null

echo "== 3/3 pretrain a small model (rhine-train $config)"
# A fresh run each time (rhine-train itself resumes from out_dir when it can).
run_dir=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get("out_dir", ""))' "$config")
[[ -n "$run_dir" ]] && rm -rf "$run_dir"
"$bin/examples/rhine-train" "$config"
