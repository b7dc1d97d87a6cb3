#!/usr/bin/env bash
# Hugging Face `tokenizers` and `sentencepiece` (Python) as oracles of Rhine's tokenizers,
# through the rhine-tokenizer CLI (tests/oracle/hf_tokenizers.py is the reference side):
#   1. tokenizers trained by `tokenizers` itself for each family Rhine reads (byte-level BPE
#      with the llama3 split regex, BPE with byte fallback, Unigram with Metaspace, WordPiece)
#      on the bundled de/fr/nl/en text: Rhine's ids (with and without special tokens) and
#      decoded text equal the library's on the held-out pages and hard cases;
#   2. what `rhine-tokenizer train` writes: PREFIX.tokenizer.json loads in `tokenizers` and
#      PREFIX.model in `sentencepiece`, and both encode to Rhine's ids (BPE and Unigram; for
#      the .model a Unigram line may be segmented differently at an exact score tie, which
#      PyPI's sentencepiece breaks differently from Debian's libsentencepiece: see
#      hf_tokenizers.py compare-spm);
#   3. what `rhine-tokenizer extend` writes for the .model files of 2 (BPE, Unigram);
#   4. and for the tokenizer.json files of 1 (byte-level BPE, byte fallback BPE, Unigram).
# `tokenizers` always matches added tokens in the text, so Rhine encodes tokenizer.json files
# with --parse-special; sentencepiece never matches control pieces, nor does Rhine by default.
#   tokenizer_test.sh RHINE_TOKENIZER SOURCE_DIR WORK_DIR PYTHON
set -euo pipefail
tool=$1 src=$2 work=$3 py=${RHINE_PYTHON:-$4}
source "$src/tests/skip.sh"
ref=$src/tests/oracle/hf_tokenizers.py
[[ -n "$py" ]] || rhine_skip "no Python for the tokenizers/sentencepiece oracle: set RHINE_PYTHON or build with scripts/build.sh (which passes the project's environment, scripts/setup-python.sh)"
version=$("$py" "$ref" --version 2>&1) ||
  rhine_skip "the Python $py cannot import tokenizers and sentencepiece ($(echo "$version" | tail -1)); run scripts/setup-python.sh and point RHINE_PYTHON at its bin/python"
fx=$src/data/sample
rm -rf "$work" && mkdir -p "$work"
cat $fx/heldout/*.txt > "$work/text.txt"
# Hard cases: combining marks, emoji (ZWJ sequence, skin tone), CJK, control characters,
# long digit runs, whitespace runs, special-token text, CRLF, a lone CR.
printf '%s\n' \
  $'e\u0301t\u00e9 a\u030a n\u0303 Gr\u00fc\u00df Gott! \u00c7a va? \u00c9\u00e9n fiets' \
  $'emoji \U1F600\U1F44D\U1F3FD \U1F468\u200d\U1F469\u200d\U1F467 family' \
  $'CJK \u4f60\u597d\uff0c\u4e16\u754c\u3002\u3053\u3093\u306b\u3061\u306f \ud55c\uad6d\uc5b4' \
  $'control \x01\x02\x1b[0m bell\x07 del\x7f' \
  'digits 12345678901234567890 3.14159 1,000,000' \
  $'whitespace   runs\t\ttabs    end   ' \
  '<s> </s> <unk> [CLS] [SEP] <|begin_of_text|> <0x41> literal specials' \
  $'crlf line\r' \
  $'lone\rcr' \
  $'\u00a0nbsp\u2009thin\u3000ideographic \ufb01nance \u212b' \
  "don't you'll I'M O'Neil" >> "$work/text.txt"
n=$(wc -l < "$work/text.txt")

same() {  # same WHAT FILE_A FILE_B
  cmp -s "$2" "$3" && return 0
  echo "FAIL: $1 differ (rhine $2 vs reference $3):"
  diff <(nl -ba "$2") <(nl -ba "$3") | head -8
  exit 1
}

# 1. Families trained by tokenizers.
for family in byte_level_bpe bpe_byte_fallback unigram wordpiece; do
  json=$work/$family.json
  "$py" "$ref" train $family "$json" $fx/de.txt $fx/fr.txt $fx/nl.txt $fx/en.txt
  for special in "" --add-special; do
    "$tool" encode -t "$json" $special --parse-special --threads 1 < "$work/text.txt" > "$work/$family.rhine$special.ids"
    "$py" "$ref" encode json "$json" $special < "$work/text.txt" > "$work/$family.hf$special.ids"
    same "$family ids${special:+ with special tokens}" "$work/$family.rhine$special.ids" "$work/$family.hf$special.ids"
  done
  "$tool" decode -t "$json" < "$work/$family.hf--add-special.ids" > "$work/$family.rhine.txt"
  "$py" "$ref" decode json "$json" < "$work/$family.hf--add-special.ids" > "$work/$family.hf.txt"
  same "$family decoded text" "$work/$family.rhine.txt" "$work/$family.hf.txt"
  echo "$family (trained by tokenizers): $n lines, ids with and without special tokens and decoded text equal ($version)"
done

# read_by_references WHAT TYPE PREFIX TAG: PREFIX.model encodes as sentencepiece and
# PREFIX.tokenizer.json as tokenizers do, with and without special tokens.
read_by_references() {
  local what=$1 type=$2 prefix=$3 tag=$4
  for special in "" --add-special; do
    "$tool" encode -t "$prefix.model" $special --threads 1 < "$work/text.txt" > "$work/$tag.rhine$special.ids"
    "$py" "$ref" compare-spm $type "$prefix.model" "$work/text.txt" "$work/$tag.rhine$special.ids" $special ||
      { echo "FAIL: $what .model: Rhine's ids are not sentencepiece's${special:+ (with BOS)}"; exit 1; }
    "$tool" encode -t "$prefix.tokenizer.json" $special --parse-special --threads 1 < "$work/text.txt" > "$work/$tag.json$special.ids"
    "$py" "$ref" encode json "$prefix.tokenizer.json" $special < "$work/text.txt" > "$work/$tag.hf$special.ids"
    same "$what tokenizer.json vs tokenizers${special:+ with special tokens}" \
      "$work/$tag.json$special.ids" "$work/$tag.hf$special.ids"
  done
}

# 2. What rhine-tokenizer train writes, read by the reference libraries.
for type in bpe unigram; do
  "$tool" train -i de=$fx/de.txt -i fr=$fx/fr.txt -i nl=$fx/nl.txt -i en=$fx/en.txt \
    --model-type $type --vocab-size 2000 --out "$work/rhine_$type" 2>"$work/train_$type.log"
  read_by_references "rhine-tokenizer train $type" $type "$work/rhine_$type" $type
  echo "rhine-tokenizer train $type: $n lines, .model = sentencepiece, tokenizer.json = tokenizers, with and without BOS"
done

# 3. What rhine-tokenizer extend writes (issue 18 item 1): the BPE and Unigram models above
# extended for Dutch. sentencepiece reads the extended .model and tokenizers the extended
# tokenizer.json, both encoding as Rhine does; the base's pieces keep their ids and scores;
# Dutch held-out text shrinks.
for type in bpe unigram; do
  "$tool" extend -t "$work/rhine_$type.model" -i nl=$fx/nl.txt -n 300 -o "$work/ext_nl_$type" \
    --eval nl=$fx/heldout/nl.txt --eval en=$fx/heldout/en.txt > "$work/extend_$type.log"
  read_by_references "rhine-tokenizer extend ($type)" $type "$work/ext_nl_$type" ext_$type
  "$py" - "$work/rhine_$type.model" "$work/ext_nl_$type.model" "$work/ext_nl_$type.extend.json" <<'PY' ||
import json, sys
import sentencepiece as spm
base, ext = (spm.SentencePieceProcessor(model_file=p) for p in sys.argv[1:3])
r = json.load(open(sys.argv[3]))
n = base.get_piece_size()
assert ext.get_piece_size() == n + 300 == n + r["new_tokens"], (ext.get_piece_size(), n, r["new_tokens"])
bad = [i for i in range(n) if (base.id_to_piece(i), base.get_score(i)) != (ext.id_to_piece(i), ext.get_score(i))]
assert not bad, f"base pieces changed at ids {bad[:5]}"
assert [ext.id_to_piece(a["id"]) for a in r["added"]] == [a["piece"] for a in r["added"]]
nl = r["languages"]["nl"]
assert nl["tokens_after"] < 0.95 * nl["tokens_before"], nl
print(f"extend: {n} base pieces unchanged, 300 added; nl held-out tokens {nl['tokens_before']} -> {nl['tokens_after']}")
PY
    { echo "FAIL: rhine-tokenizer extend ($type): the extended model breaks the base's ids or saves nothing"; exit 1; }
echo "rhine-tokenizer extend ($type): $n lines, .model = sentencepiece, tokenizer.json = tokenizers, with and without BOS"
done

# 4. rhine-tokenizer extend on tokenizer.json bases (the byte-level BPE, the BPE with byte
# fallback and the Unigram of section 1): tokenizers loads the extended file and encodes as
# Rhine does; every base token keeps its id, the new tokens take ids after all others; BPE:
# the base merges come first and unchanged, one new merge per new token; Unigram: the base
# pieces keep their scores; Dutch held-out text shrinks.
for family in byte_level_bpe bpe_byte_fallback unigram; do
  "$tool" extend -t "$work/$family.json" -i nl=$fx/nl.txt -n 300 -o "$work/ext_$family" \
    --eval nl=$fx/heldout/nl.txt --eval en=$fx/heldout/en.txt > "$work/extend_$family.log"
  [[ ! -e "$work/ext_$family.model" ]] || { echo "FAIL: a tokenizer.json base wrote a .model"; exit 1; }
  for special in "" --add-special; do
    "$tool" encode -t "$work/ext_$family.tokenizer.json" $special --parse-special --threads 1 < "$work/text.txt" \
      > "$work/ext_$family.rhine$special.ids"
    "$py" "$ref" encode json "$work/ext_$family.tokenizer.json" $special < "$work/text.txt" > "$work/ext_$family.hf$special.ids"
    same "extended $family ids${special:+ with special tokens}" "$work/ext_$family.rhine$special.ids" "$work/ext_$family.hf$special.ids"
  done
  "$py" - "$work/$family.json" "$work/ext_$family.tokenizer.json" "$work/ext_$family.extend.json" <<'PY' ||
import json, sys
from tokenizers import Tokenizer
base, ext = (json.load(open(p)) for p in sys.argv[1:3])
r = json.load(open(sys.argv[3]))
bv, ev = base["model"]["vocab"], ext["model"]["vocab"]
hf = Tokenizer.from_file(sys.argv[2])
nl = r["languages"]["nl"]
assert nl["tokens_after"] < 0.95 * nl["tokens_before"], nl
if base["model"]["type"] == "Unigram":
    assert ev[:len(bv)] == bv and len(ev) == len(bv) + 300, "base pieces or scores changed"
    assert [p for p, _ in ev[len(bv):]] == [a["piece"] for a in r["added"]]
    assert [a["id"] for a in r["added"]] == list(range(len(bv), len(bv) + 300))
    assert hf.get_vocab_size() == len(ev)
    print(f"extend tokenizer.json (Unigram): {len(bv)} base pieces kept, 300 added; "
          f"nl held-out tokens {nl['tokens_before']} -> {nl['tokens_after']}")
    sys.exit(0)
assert all(ev.get(t) == i for t, i in bv.items()), "base tokens changed ids"
first = max(list(bv.values()) + [t["id"] for t in base["added_tokens"]]) + 1
added = {t["content"] for t in base["added_tokens"]}
new = sorted((i, t) for t, i in ev.items() if t not in bv and t not in added)
assert [i for i, _ in new] == list(range(first, first + 300)) == [a["id"] for a in r["added"]], "new ids"
assert [t for _, t in new] == [a["piece"] for a in r["added"]]
bm, em = base["model"]["merges"], ext["model"]["merges"]
assert em[:len(bm)] == bm and len(em) == len(bm) + 300, "base merges not kept first"
pair = lambda m: m if isinstance(m, list) else m.split(" ")
assert ["".join(pair(m)) for m in em[len(bm):]] == [t for _, t in new], "a new merge does not make its token"
assert {k: v for k, v in ext.items() if k != "model"} == {k: v for k, v in base.items() if k != "model"}
assert hf.get_vocab_size() == first + 300
print(f"extend tokenizer.json: {len(bv)} base tokens and {len(bm)} merges kept, 300 added from id {first}; "
      f"nl held-out tokens {nl['tokens_before']} -> {nl['tokens_after']}")
PY
    { echo "FAIL: rhine-tokenizer extend on $family: the extended tokenizer.json breaks the base or saves nothing"; exit 1; }
  echo "rhine-tokenizer extend $family (tokenizer.json): $n lines, ids = tokenizers', with and without special tokens"
done
