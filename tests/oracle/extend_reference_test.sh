#!/usr/bin/env bash
# `rhine-tokenizer extend` on real LLM tokenizers (issue 18 item 1): Llama 3 and Qwen3
# (byte-level BPE, added tokens after the vocabulary) and Mistral-7B (BPE with byte fallback)
# from the reference archive, each extended by 500 Dutch tokens. Hugging Face `tokenizers`
# loads each extended tokenizer.json and encodes the held-out pages and hard cases to Rhine's
# ids; the new ids follow every existing one; Dutch held-out text shrinks by at least 10%.
# The references are not in the repository: RHINE_REFERENCE_DIR names the folder holding
# tokenizers.tar.xz (or its unpacked tokenizers/); without it, or without the Python, the
# test reports Skipped.
#   extend_reference_test.sh RHINE_TOKENIZER SOURCE_DIR WORK_DIR PYTHON
set -euo pipefail
tool=$1 src=$2 work=$3 py=${RHINE_PYTHON:-$4}
source "$src/tests/skip.sh"
ref=$src/tests/oracle/hf_tokenizers.py
[[ -n "$py" ]] || rhine_skip "no Python for the tokenizers oracle: set RHINE_PYTHON or build with scripts/build.sh"
version=$("$py" "$ref" --version 2>&1) ||
  rhine_skip "the Python $py cannot import tokenizers ($(echo "$version" | tail -1)); run scripts/setup-python.sh"
dir=${RHINE_REFERENCE_DIR:-}
[[ -n "$dir" ]] || rhine_skip "the reference tokenizer.json files: RHINE_REFERENCE_DIR is not set (a folder holding tokenizers.tar.xz; docs/testing.md)"
rm -rf "$work" && mkdir -p "$work"
if [[ -d "$dir/tokenizers" ]]; then
  refs=$dir/tokenizers
elif [[ -f "$dir/tokenizers.tar.xz" ]]; then
  tar -xJf "$dir/tokenizers.tar.xz" -C "$work" tokenizers/llama3 tokenizers/qwen3 tokenizers/mistral-7b
  refs=$work/tokenizers
else
  rhine_skip "the reference tokenizer.json files: RHINE_REFERENCE_DIR=$dir holds neither tokenizers/ nor tokenizers.tar.xz"
fi
fx=$src/data/sample
cat $fx/heldout/*.txt > "$work/text.txt"
printf '%s\n' $'e\u0301t\u00e9 Gr\u00fc\u00df Gott! emoji \U1F600 CJK \u4f60\u597d digits 12345678901234567890' \
  '<s> </s> <|begin_of_text|> <0x41> literal specials' $'whitespace   runs\t\ttabs   ' >> "$work/text.txt"
for name in llama3 qwen3 mistral-7b; do
  base=$refs/$name/tokenizer.json
  [[ -f "$base" ]] || { echo "FAIL: $base missing from the reference archive"; exit 1; }
  "$tool" extend -t "$base" -i nl=$fx/nl.txt -n 500 -o "$work/$name" \
    --eval nl=$fx/heldout/nl.txt --eval en=$fx/heldout/en.txt > "$work/$name.log"
  "$tool" encode -t "$work/$name.tokenizer.json" --parse-special --threads 1 < "$work/text.txt" > "$work/$name.rhine.ids"
  "$py" "$ref" encode json "$work/$name.tokenizer.json" < "$work/text.txt" > "$work/$name.hf.ids"
  cmp -s "$work/$name.rhine.ids" "$work/$name.hf.ids" ||
    { echo "FAIL: extended $name: Rhine's ids differ from tokenizers'"; diff "$work/$name.rhine.ids" "$work/$name.hf.ids" | head -4; exit 1; }
  "$py" - "$base" "$work/$name.tokenizer.json" "$work/$name.extend.json" <<'PY' ||
import json, sys
base, ext = (json.load(open(p)) for p in sys.argv[1:3])
r = json.load(open(sys.argv[3]))
bv, ev = base["model"]["vocab"], ext["model"]["vocab"]
assert all(ev.get(t) == i for t, i in bv.items()), "base tokens changed ids"
first = max(list(bv.values()) + [t["id"] for t in base["added_tokens"]]) + 1
added = {t["content"]: t["id"] for t in base["added_tokens"]}
assert all(ev[t] == i for t, i in added.items() if t not in bv), "added tokens not in the vocabulary under their ids"
assert sorted(i for t, i in ev.items() if t not in bv and t not in added) == list(range(first, first + 500)), "new ids"
from tokenizers import Tokenizer
hf = Tokenizer.from_file(sys.argv[2])
assert all(hf.token_to_id(t) == i for t, i in added.items()), "tokenizers moved an added token"
assert ext["model"]["merges"][:len(base["model"]["merges"])] == base["model"]["merges"], "base merges changed"
nl = r["languages"]["nl"]
assert nl["tokens_after"] < 0.9 * nl["tokens_before"], nl
print(f"ids {first}..{first + 499}; nl held-out tokens {nl['tokens_before']} -> {nl['tokens_after']}, "
      f"parity to en {nl['parity_before']:.3f} -> {nl['parity_after']:.3f}")
PY
    { echo "FAIL: extended $name breaks the base or saves too little"; exit 1; }
  echo "extended $name by 500 Dutch tokens: $(wc -l < "$work/text.txt") lines encode as tokenizers does"
done
