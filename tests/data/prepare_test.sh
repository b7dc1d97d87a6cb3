#!/usr/bin/env bash
# rhine-prepare end to end: trains a small tokenizer with rhine-tokenizer,
# prepares shards from .txt and .jsonl inputs (with broken JSON lines and
# invalid UTF-8), checks the ids of every document against
# `rhine-tokenizer encode`, checks shard rotation, and that a run killed with
# SIGKILL leaves only complete shards and restarts cleanly. The read / encode /
# write pipeline must give the same bytes whatever the batching and thread
# count, and an error in the read or the write stage must end the run with its
# message and exit status 1 (no hang, no abort).
# Usage: prepare_test.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
build=$1 src=$2
prep=$build/tools/rhine-prepare tok=$build/tokenizer/rhine-tokenizer
work=$(mktemp -d /tmp/rhine_prepare_test.XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"
fail() { echo "FAIL: $*" >&2; exit 1; }

"$tok" train -i de="$src/data/sample/de.txt" -i fr="$src/data/sample/fr.txt" --out tok \
  --vocab-size 2000 --model-type unigram >/dev/null 2>&1 || fail "training the tokenizer"

# JSONL with one-line documents (so `rhine-tokenizer encode` sees the same text),
# a broken line, a record without text, and a line with an invalid byte.
head -n 300 "$src/data/sample/fr.txt" | grep -v '^$' | python3 -c '
import json, sys
for i, line in enumerate(sys.stdin):
    r = {"text": line.rstrip("\n"), "lang": "fr"}
    if i % 2:  # every other record names its source and licence
        r.update(source="wiki-fr", licence="CC-BY-SA-4.0")
    print(json.dumps(r, ensure_ascii=False))
print("{broken json")
print(json.dumps({"lang": "fr"}))
' > fr.jsonl
printf 'Erstes Dokument \xff mit Fehler\n\nZweites Dokument\nmit zwei Zeilen\n' > de.txt

"$prep" -q -t tok.model -o shards --shard-tokens 2000 fr.jsonl de=de.txt > out.txt || fail "rhine-prepare"
grep -q "repaired 1 invalid UTF-8 bytes" out.txt || fail "repair count: $(cat out.txt)"
grep -q "skipped 2 JSONL records" out.txt || fail "skip count: $(cat out.txt)"
[[ $(ls shards/fr-*.tokens | wc -l) -ge 2 ]] || fail "no shard rotation at --shard-tokens 2000"
"$prep" --verify shards > verify.txt || fail "verify"
[[ -f shards/manifest.json ]] || fail "no manifest"

# Ids of every French document == rhine-tokenizer encode of the same line.
"$prep" --dump shards | awk -F'\t' '$1 == "fr" { print $3 }' > got.txt
python3 -c '
import json
for line in open("fr.jsonl"):
    try: r = json.loads(line)
    except ValueError: continue
    if "text" in r: print(r["text"])
' | "$tok" encode -t tok.model > want.txt
[[ $(wc -l < want.txt) -gt 100 ]] || fail "too few documents compared"
cmp -s got.txt want.txt || fail "ids differ from rhine-tokenizer encode: $(diff got.txt want.txt | head -5)"
[[ $("$prep" --dump shards | awk -F'\t' '$1 == "de"' | wc -l) == 2 ]] || fail "blank-line documents"
# JSONL source fields become the documents' sources; licences go to the manifest.
[[ $("$prep" --dump shards | awk -F'\t' '$1 == "fr" { print $2 }' | sort -u | tr '\n' ' ') == "fr.jsonl wiki-fr " ]] \
  || fail "sources: $("$prep" --dump shards | awk -F'\t' '{ print $2 }' | sort -u | tr '\n' ' ')"
python3 -c '
import json, sys
s = json.load(open("shards/manifest.json"))["sources"]
assert s["wiki-fr"]["licences"] == ["CC-BY-SA-4.0"], s
assert s["fr.jsonl"]["licences"] == [] and s["de.txt"]["docs"] == 2, s
' || fail "manifest sources/licences"

# The same shards and manifest, byte for byte, when every document is its own
# batch on one thread and with odd-sized batches on two (pipeline schedules differ).
"$prep" -q -t tok.model -o shards_b1 --shard-tokens 2000 --batch-docs 1 --threads 1 fr.jsonl de=de.txt >/dev/null \
  || fail "rhine-prepare --batch-docs 1"
"$prep" -q -t tok.model -o shards_b7 --shard-tokens 2000 --batch-docs 7 --threads 2 fr.jsonl de=de.txt >/dev/null \
  || fail "rhine-prepare --batch-docs 7"
for d in shards_b1 shards_b7; do
  diff -r shards "$d" >/dev/null || fail "$d differs from the default batching: $(diff -rq shards "$d" | head -3)"
done
# The progress bar reaches 100%.
"$prep" -t tok.model -o shards_p fr.jsonl de=de.txt 2>progress.txt >/dev/null || fail "rhine-prepare with progress"
grep -q "100.0%" progress.txt || fail "progress bar: $(tr '\r' '\n' < progress.txt | tail -2)"

# A run killed mid-way leaves only complete shards; a new run restarts cleanly.
for i in $(seq 1 60); do cat fr.jsonl; done > big.jsonl
"$prep" -q -t tok.model -o killed --shard-tokens 5000 --threads 1 big.jsonl & pid=$!
sleep 0.2; kill -9 $pid 2>/dev/null || true; wait $pid 2>/dev/null || true
[[ ! -f killed/manifest.json ]] || echo "note: the run finished before it was killed"
if ls killed/*.tokens >/dev/null 2>&1; then "$prep" --verify killed >/dev/null || fail "a killed run left a bad shard"; fi
"$prep" -q -t tok.model -o killed --shard-tokens 5000 big.jsonl >/dev/null || fail "restart"
[[ -z $(ls -A killed | grep partial || true) ]] || fail "temporary files left after restart"
"$prep" --verify killed >/dev/null || fail "verify after restart"

# Errors in the read stage (a document without a language, after many batches
# of another file) and in the write stage (a shard cannot be renamed into place
# at rotation) end the run with the message and status 1, and leave no manifest.
printf 'Ein Dokument ohne Sprache\n' > nolang.txt
rc=0; timeout 120 "$prep" -q -t tok.model -o err_read --batch-docs 16 big.jsonl nolang.txt >/dev/null 2>err.txt || rc=$?
[[ $rc == 1 ]] || fail "read-stage error: exit status $rc (want 1): $(cat err.txt)"
grep -q "\[rhine-prepare\] document without a language.*nolang.txt" err.txt || fail "read-stage error message: $(cat err.txt)"
[[ ! -f err_read/manifest.json ]] || fail "manifest written after a read-stage error"
mkdir -p err_write/fr-00000.tokens/blocker
rc=0; timeout 120 "$prep" -q -t tok.model -o err_write --shard-tokens 2000 --batch-docs 16 big.jsonl >/dev/null 2>err.txt \
  || rc=$?
[[ $rc == 1 ]] || fail "write-stage error: exit status $rc (want 1): $(cat err.txt)"
grep -q "\[token_shard\] cannot rename the finished shard into place" err.txt || fail "write-stage error message: $(cat err.txt)"
[[ ! -f err_write/manifest.json ]] || fail "manifest written after a write-stage error"
[[ -z $(ls -A err_write | grep partial || true) ]] || fail "temporary files left after a write-stage error"
echo "prepare test ok: $(tail -n 1 verify.txt), $(wc -l < want.txt) documents compared"
