#!/usr/bin/env bash
# Adapts the demo model (scripts/demo.sh) to Dutch end to end and compares the choices:
#   1. extend the demo's tokenizer by 1,000 Dutch pieces (rhine-tokenizer extend): fertility
#      and parity per language before and after;
#   2. grow the model's embedding and head to the new vocabulary (rhine-convert extend-vocab),
#      with the new rows at the mean of their pieces' rows, by FOCUS (weighted similar base
#      tokens, from vectors learnt on the Dutch text), and random;
#   3. tokenize the sample with the extended tokenizer (rhine-prepare);
#   4. continue pretraining for 60 steps (rhine-finetune, "mode": "pretrain"): the model
#      without extension on Dutch, the extended model (each initialisation) on Dutch, and
#      the extended model (FOCUS) with 25% English replay;
#   5. print held-out bits per byte per language right after the resize and after training.
# About 5 minutes on 2 cores. Needs scripts/demo.sh to have run (build/demo).
#
#   scripts/adapt-nl.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${RHINE_BUILD_DIR:-build}
demo=build/demo
out=build/adapt-nl
S=data/sample
base=$(ls -d $demo/run-moe/checkpoints/step-* 2>/dev/null | tail -1 || true)
[[ -n "$base" && -f $demo/tok.model ]] ||
  { echo "[adapt-nl] no demo model in $demo: run scripts/demo.sh first" >&2; exit 1; }
rm -rf "$out" && mkdir -p "$out"
heldout="--eval de=$S/heldout/de.txt --eval en=$S/heldout/en.txt --eval fr=$S/heldout/fr.txt --eval nl=$S/heldout/nl.txt"

echo "== 1/4 extend the tokenizer by 1000 Dutch pieces (rhine-tokenizer extend)"
"$bin/tokenizer/rhine-tokenizer" extend -t $demo/tok.model -i nl=$S/nl.txt -n 1000 -o $out/tok-nl $heldout

echo "== 2/4 grow the model to the new vocabulary (rhine-convert extend-vocab)"
for init in mean focus random; do
  "$bin/tools/rhine-convert" extend-vocab --model "$base" --base-tokenizer $demo/tok.model \
    --tokenizer $out/tok-nl.model --out $out/model-$init --init $init --text $S/nl.txt
done

echo "== 3/4 tokenize the sample with the extended tokenizer (rhine-prepare)"
"$bin/tools/rhine-prepare" -q -t $out/tok-nl.model -o $out/shards/train \
  de=$S/de.txt fr=$S/fr.txt nl=$S/nl.txt en=$S/en.txt >/dev/null
"$bin/tools/rhine-prepare" -q -t $out/tok-nl.model -o $out/shards/heldout \
  de=$S/heldout/de.txt fr=$S/heldout/fr.txt nl=$S/heldout/nl.txt en=$S/heldout/en.txt >/dev/null

echo "== 4/4 continue pretraining, 60 steps each (rhine-finetune)"
finetune() {  # finetune NAME MODEL TOKENIZER SHARDS MIXTURE
  cat > $out/$1.json <<EOF
{"base_model": "$2", "tokenizer": "$3", "mode": "pretrain", "train": "$4/train", "heldout": "$4/heldout",
 "mixture": $5, "out_dir": "$out/run-$1", "export_dir": "$out/export-$1", "seq_len": 128, "batch_size": 16,
 "steps": 60, "warmup": 5, "lr": 0.001, "eval_tokens": 20000, "sample_tokens": 1, "bf16": false}
EOF
  "$bin/examples/rhine-finetune" $out/$1.json > $out/$1.log 2>&1 ||
    { echo "[adapt-nl] rhine-finetune $1 failed:" >&2; tail -5 $out/$1.log >&2; exit 1; }
  echo "$1: $(grep -E '^bits per byte, change' $out/$1.log)"
}
finetune base-nl "$base" $demo/tok.model $demo/shards '{"nl": 1}'
finetune mean-nl $out/model-mean $out/model-mean/tokenizer.model $out/shards '{"nl": 1}'
finetune focus-nl $out/model-focus $out/model-focus/tokenizer.model $out/shards '{"nl": 1}'
finetune random-nl $out/model-random $out/model-random/tokenizer.model $out/shards '{"nl": 1}'
finetune focus-replay $out/model-focus $out/model-focus/tokenizer.model $out/shards '{"nl": 0.75, "en": 0.25}'

echo
echo "Held-out bits per byte (right after the resize -> after 60 steps; lower is better)"
python3 - $out <<'PY'
import sys
runs = [("base-nl", "no extension, Dutch only"), ("random-nl", "+1000 pieces, random rows, Dutch only"),
        ("mean-nl", "+1000 pieces, mean rows, Dutch only"), ("focus-nl", "+1000 pieces, FOCUS rows, Dutch only"),
        ("focus-replay", "+1000 pieces, FOCUS rows, 75% nl + 25% en")]
print(f"{'run':<44}" + "".join(f"{l:>17}" for l in ("nl", "de", "en", "fr")))
for name, label in runs:
    text = open(f"{sys.argv[1]}/{name}.log").read().split("Held-out")[1].splitlines()[2:6]
    row = {l.split()[0]: (float(l.split()[4]), float(l.split()[5])) for l in text}
    print(f"{label:<44}" + "".join(f"{row[l][0]:>8.3f} -> {row[l][1]:.3f}" for l in ("nl", "de", "en", "fr")))
PY
echo "Logs and configs: $out/*.log, $out/*.json; models: $out/export-*"
