#!/usr/bin/env bash
# `rhine-convert to-gguf` against llama.cpp's own tools (issue 18 item 5):
#   1. a small random Llama (made by transformers; padded vocabulary, f16 fallback rows) with a
#      SentencePiece vocabulary and one with a byte-level BPE tokenizer.json (Llama 3 split),
#      each exported in f32, f16, bf16 and q8_0: every key and
#      tensor read back by the `gguf` package equals what check_gguf.py computes with
#      numpy / sentencepiece / tokenizers / gguf.quants, byte for byte;
#   2. llama.cpp itself (llama-cpp-python) loads the f32 file, tokenizes a prompt as
#      the reference library does, gives Rhine's logits (rhine-convert logits) and Rhine's greedy
#      continuation of 32 tokens (rhine-generate); the q8_0 file's logits stay close;
#   3. models llama.cpp's llama architecture does not describe are refused with an error.
#   gguf_test.sh RHINE_TOKENIZER RHINE_CONVERT RHINE_GENERATE SOURCE_DIR WORK_DIR PYTHON
set -euo pipefail
tok=$(realpath "$1") convert=$(realpath "$2") generate=$(realpath "$3") src=$(realpath "$4") work=$5 py=${RHINE_PYTHON:-$6}
source "$src/tests/skip.sh"
check=$src/tests/io/check_gguf.py
[[ -n "$py" ]] || rhine_skip "no Python for the gguf / llama.cpp references: set RHINE_PYTHON or build with scripts/build.sh (which passes the project's environment, scripts/setup-python.sh)"
missing=$("$py" -c 'import gguf, sentencepiece, tokenizers, transformers, safetensors, llama_cpp' 2>&1) ||
  rhine_skip "the Python $py cannot import gguf, sentencepiece, tokenizers, transformers, safetensors and llama_cpp ($(echo "$missing" | tail -1)); run scripts/setup-python.sh and point RHINE_PYTHON at its bin/python"
rm -rf "$work" && mkdir -p "$work" && cd "$work"
export OMP_NUM_THREADS=2

d=$src/data/sample
"$tok" train -i de=$d/de.txt -i en=$d/en.txt -i fr=$d/fr.txt -i nl=$d/nl.txt -o tok --vocab-size 500 >/dev/null 2>&1
prompt="Die Katze sitzt auf der Matte und"

# Both vocabulary kinds: SentencePiece (llama.cpp's "llama") and byte-level BPE with the Llama 3
# split (its "gpt2" with pre-tokenizer "llama-bpe").
for vocab in tok.model "$src/tests/fixtures/tokenizer/tiny_byte_level.json"; do
  m=model-$(basename "${vocab%%.*}")
  "$py" "$check" make-model "$vocab" $m 2>/dev/null
  # 1. Every key and tensor, each type.
  for t in f32 f16 bf16 q8_0; do
    "$convert" to-gguf --model $m --out $m.$t.gguf --type $t
    "$py" "$check" check $m $m.$t.gguf $t
  done
  # 2. llama.cpp runs the exported model as Rhine does.
  r=$("$py" "$check" llama-cpp $m.f32.gguf "$vocab" "$prompt" 32 $m.prompt_ids.txt)
  echo "llama.cpp, $m f32: $r"
  "$convert" logits --model $m --ids $m.prompt_ids.txt --out $m.rhine_logits.safetensors >/dev/null
  "$py" "$check" compare-logits $m.f32.gguf.logits.npy $m.rhine_logits.safetensors 1e-4
  "$generate" --model $m --prompt "$prompt" --max-new-tokens 32 --temperature 0 --ids >/dev/null 2>gen.err
  rhine_ids=$(sed -n 's/^\[rhine-generate\] ids: //p' gen.err)
  cpp_ids=$(echo "$r" | "$py" -c 'import json,sys; print(" ".join(map(str, json.load(sys.stdin)["continuation"])))')
  n=$(wc -w <<< "$rhine_ids")
  [[ -n "$rhine_ids" && "$cpp_ids" == "$rhine_ids"* ]] ||
    { echo "FAIL: $m: greedy continuations differ: rhine-generate [$rhine_ids], llama.cpp [$cpp_ids]"; exit 1; }
  echo "$m: greedy continuation ($n tokens) equal: $rhine_ids"
  "$py" "$check" llama-cpp $m.q8_0.gguf "$vocab" "$prompt" 1 $m.prompt_ids.txt >/dev/null
  "$py" "$check" compare-logits $m.q8_0.gguf.logits.npy $m.f32.gguf.logits.npy 5e-2
  echo "$m: q8_0 logits close to f32"
done
model=model-tok

# 3. Refusals name the key.
expect_fail() {
  local want=$1; shift
  if "$@" >/dev/null 2>err.txt; then echo "FAIL: '$*' succeeded"; exit 1; fi
  grep -q "$want" err.txt || { echo "FAIL: '$*' error lacks '$want':"; cat err.txt; exit 1; }
}
cp -r $model biased && sed -i 's/"attention_bias": false/"attention_bias": true/' biased/config.json
expect_fail "attention_bias" "$convert" to-gguf --model biased --out x.gguf
expect_fail "unknown GGUF type" "$convert" to-gguf --model $model --out x.gguf --type q4_0
"$tok" train -i de=$d/de.txt -i en=$d/en.txt -o big --vocab-size 600 >/dev/null 2>&1
expect_fail "more pieces than the model's vocab_size" "$convert" to-gguf --model $model --out x.gguf --tokenizer big.model
rm -f $model/tokenizer.model
expect_fail "no tokenizer.model or tokenizer.json" "$convert" to-gguf --model $model --out x.gguf
expect_fail "no pre-tokenizer equal" "$convert" to-gguf --model $model --out x.gguf --tokenizer "$src/tests/fixtures/tokenizer/tiny_byte_fallback.json"
[[ ! -e x.gguf && ! -e x.gguf.tmp ]] || { echo "FAIL: a refused export left a file"; exit 1; }
echo "refusals: ok"
