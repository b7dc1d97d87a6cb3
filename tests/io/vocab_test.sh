#!/usr/bin/env bash
# `rhine-convert extend-vocab` (issue 18 item 2) against transformers, sentencepiece and
# tokenizers: a small random Llama (transformers, padded vocabulary) grown to a tokenizer that
# `rhine-tokenizer extend` extended for Dutch, with --init mean, focus and random, a tied-head
# model with focus, and to a tokenizer.json extended the same way; then bad
# input (a tokenizer that is not an extension of the base) is refused.
#   vocab_test.sh RHINE_TOKENIZER RHINE_CONVERT SOURCE_DIR WORK_DIR PYTHON
set -euo pipefail
tok=$(realpath "$1") convert=$(realpath "$2") src=$(realpath "$3") work=$4 py=${RHINE_PYTHON:-$5}
source "$src/tests/skip.sh"
[[ -n "$py" ]] || rhine_skip "no Python for the transformers / sentencepiece references: set RHINE_PYTHON or build with scripts/build.sh (which passes the project's environment, scripts/setup-python.sh)"
missing=$("$py" -c 'import sentencepiece, tokenizers, transformers, safetensors, torch' 2>&1) ||
  rhine_skip "the Python $py cannot import sentencepiece, tokenizers, transformers, safetensors and torch ($(echo "$missing" | tail -1)); run scripts/setup-python.sh"
rm -rf "$work" && mkdir -p "$work" && cd "$work"
d=$src/data/sample
"$tok" train -i de=$d/de.txt -i en=$d/en.txt -i fr=$d/fr.txt -i nl=$d/nl.txt -o base --vocab-size 500 >/dev/null 2>&1
"$tok" extend -t base.model -i nl=$d/nl.txt -n 60 -o ext >/dev/null
"$py" "$src/tests/io/check_gguf.py" make-model base.model model >/dev/null 2>&1   # vocab 512: 12 padding rows
for init in mean focus random; do
  "$convert" extend-vocab --model model --tokenizer ext.model --out model-$init --init $init --text $d/nl.txt
  "$py" "$src/tests/io/check_vocab.py" model base.model model-$init $init
done
# A model whose head is tied to its embedding.
"$py" "$src/tests/io/check_gguf.py" make-model base.model model-tied tied >/dev/null 2>&1
"$convert" extend-vocab --model model-tied --tokenizer ext.model --out model-tied-focus --init focus --text $d/nl.txt
"$py" "$src/tests/io/check_vocab.py" model-tied base.model model-tied-focus focus
# A tokenizer.json base (the BPE with byte fallback rhine-tokenizer train wrote beside the .model).
"$tok" extend -t base.tokenizer.json -i nl=$d/nl.txt -n 60 -o extj >/dev/null
"$convert" extend-vocab --model model --base-tokenizer base.tokenizer.json --tokenizer extj.tokenizer.json \
  --out model-json --init focus --text $d/nl.txt
"$py" "$src/tests/io/check_vocab.py" model base.tokenizer.json model-json focus
cmp -s extj.tokenizer.json model-json/tokenizer.json || { echo "FAIL: the extended tokenizer.json was not written as is"; exit 1; }
"$tok" train -i de=$d/de.txt -i en=$d/en.txt -o other --vocab-size 520 >/dev/null 2>&1
if "$convert" extend-vocab --model model --tokenizer other.model --out bad >/dev/null 2>err.txt; then
  echo "FAIL: a tokenizer that is not an extension was accepted"; exit 1
fi
grep -q "does not keep the base's token" err.txt || { echo "FAIL: unclear error:"; cat err.txt; exit 1; }
[[ ! -e bad ]] || { echo "FAIL: a refused resize left a directory"; exit 1; }
if "$convert" extend-vocab --model model --tokenizer ext.model --out bad --init focus >/dev/null 2>err.txt; then
  echo "FAIL: --init focus without text was accepted"; exit 1
fi
grep -q "needs target-language text" err.txt || { echo "FAIL: unclear error:"; cat err.txt; exit 1; }
[[ ! -e bad ]] || { echo "FAIL: a refused resize left a directory"; exit 1; }
echo "extend-vocab: ok"
