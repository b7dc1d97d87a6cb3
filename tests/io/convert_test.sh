#!/usr/bin/env bash
# End-to-end test of rhine-convert (issue 6 item 5):
# - `logits` on the HF fixtures (tests/fixtures/hf) must match the float64 reference
#   logits of tests/fixtures/hf/make_fixtures.py, read back by the independent python
#   reader (check_hf_dir.py logits): float32 tensors logits.N [T, V], one per line;
# - `dtype` to bf16 writes a directory the checker accepts (names, shapes, BF16, torch_dtype);
# - `hf-to-rhine` then `rhine-to-hf` gives back a model with byte-identical logits;
# - bad input fails with a message and exit code 1.
#   convert_test.sh RHINE_CONVERT SOURCE_DIR WORK_DIR
set -euo pipefail
tool=$1 src=$2 work=$3
fx=$src/tests/fixtures/hf
check="/usr/bin/python3 $fx/check_hf_dir.py"
rm -rf "$work" && mkdir -p "$work"

# ok REPORT_JSON MAX_REL_ERR: problems empty and max_rel_err below the bound.
ok() {
  /usr/bin/python3 -c 'import json,sys; r=json.loads(sys.argv[1]); b=float(sys.argv[2]);
p=r["problems"]; e=r.get("max_rel_err", 0.0)
sys.exit(0 if not p and e < b else "FAIL: %s max_rel_err %g (bound %g)" % (p, e, b))' "$1" "$2"
}

for arch in llama llama_sharded mistral apertus; do
  "$tool" logits --model "$fx/$arch" --ids "$fx/$arch/ids.txt" --out "$work/$arch.logits.safetensors" >/dev/null
  r=$($check logits "$work/$arch.logits.safetensors" "$fx/$arch/reference_logits.safetensors")
  ok "$r" 1e-5
  echo "$arch: logits match the float64 reference: $r"
done

# dtype: f32 -> bf16 -> f32.
"$tool" dtype --model "$fx/apertus" --out "$work/apertus_bf16" --to bf16 >/dev/null
r=$($check model "$work/apertus_bf16"); ok "$r" 1
grep -q '"torch_dtype": "bfloat16"' "$work/apertus_bf16/config.json"
"$tool" logits --model "$work/apertus_bf16" --ids "$fx/apertus/ids.txt" --out "$work/bf16.logits.safetensors" >/dev/null
r=$($check logits "$work/bf16.logits.safetensors" "$fx/apertus/reference_logits.safetensors")
ok "$r" 3e-2   # bf16 weights: relative error of order 1e-2
echo "dtype bf16: $r"
"$tool" dtype --model "$work/apertus_bf16" --out "$work/apertus_f32" --to f32 --max-shard-bytes 20000 >/dev/null
r=$($check model "$work/apertus_f32"); ok "$r" 1
[[ -f "$work/apertus_f32/model.safetensors.index.json" ]] || { echo "FAIL: --max-shard-bytes did not shard"; exit 1; }

# HF -> Rhine checkpoint -> HF: same logits, byte for byte.
"$tool" hf-to-rhine --model "$fx/mistral" --out "$work/run" --step 100 >/dev/null
[[ -f "$work/run/step-00000100/COMPLETE.json" && -f "$work/run/step-00000100/model.safetensors" ]] \
  || { echo "FAIL: no complete step-00000100 checkpoint"; ls -R "$work/run"; exit 1; }
"$tool" rhine-to-hf --checkpoint "$work/run" --out "$work/mistral_back" >/dev/null
r=$($check model "$work/mistral_back"); ok "$r" 1
cmp "$fx/mistral/generation_config.json" "$work/mistral_back/generation_config.json"
"$tool" logits --model "$fx/mistral" --ids "$fx/mistral/ids.txt" --out "$work/a.safetensors" >/dev/null
"$tool" logits --model "$work/mistral_back" --ids "$fx/mistral/ids.txt" --out "$work/b.safetensors" >/dev/null
cmp "$work/a.safetensors" "$work/b.safetensors" || { echo "FAIL: round-trip logits differ"; exit 1; }
echo "hf-to-rhine / rhine-to-hf: identical logits"

# Errors: message on stderr, exit code 1.
expect_fail() {
  local name=$1 want=$2; shift 2
  set +e
  "$@" >/dev/null 2>"$work/err.txt"
  local rc=$?
  set -e
  [[ $rc == 1 ]] || { echo "FAIL: $name exited with $rc"; cat "$work/err.txt"; exit 1; }
  grep -qF -- "$want" "$work/err.txt" || { echo "FAIL: $name: no '$want' in: $(cat "$work/err.txt")"; exit 1; }
  echo "$name: $(head -c 200 "$work/err.txt")"
}
printf '1 2 x\n' > "$work/bad_ids.txt"
expect_fail "non-numeric id" "[rhine-convert] not a token id on line 0" \
  "$tool" logits --model "$fx/llama" --ids "$work/bad_ids.txt" --out "$work/x.safetensors"
printf '1 2\n3 99\n' > "$work/bad_ids.txt"
expect_fail "id out of range" "[rhine-convert] token id out of range on line 1" \
  "$tool" logits --model "$fx/llama" --ids "$work/bad_ids.txt" --out "$work/x.safetensors"
expect_fail "missing model" "[hf_import]" \
  "$tool" logits --model "$work/nope" --ids "$fx/llama/ids.txt" --out "$work/x.safetensors"
expect_fail "existing output" "[hf_export] the output directory exists" \
  "$tool" dtype --model "$fx/llama" --out "$work/apertus_bf16" --to bf16
expect_fail "bad dtype" "[hf] unknown dtype" \
  "$tool" dtype --model "$fx/llama" --out "$work/new" --to int4
echo "rhine-convert: all checks passed"
