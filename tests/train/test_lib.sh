# Shared by the end-to-end scripts of tests/train (sourced, after `set -euo pipefail`):
#   setup_run_test NAME BUILD_DIR SOURCE_DIR   the programs ($tok $prep $train $ft), a scratch
#                                             directory (removed at exit unless KEEP is set) as the
#                                             working directory, $S (the bundled sample text)
#   fail MESSAGE                              prints "FAIL: MESSAGE" and exits 1
#   make_shards VOCAB                         tok.model (BPE of VOCAB pieces) and the shard
#                                             directories shards/all and shards/heldout of the sample
#   n_ranks N CONFIG LOG                      runs ${prog:-$train} CONFIG as N Gloo ranks (LOG.<rank>)
setup_run_test() {
  build=$2 src=$3
  tok=$build/tokenizer/rhine-tokenizer prep=$build/tools/rhine-prepare
  train=$build/examples/rhine-train ft=$build/examples/rhine-finetune
  work=$(mktemp -d "/tmp/rhine_$1.XXXXXX")
  [[ -n "${KEEP:-}" ]] || trap 'rm -rf "$work"' EXIT
  cd "$work"
  S=$src/data/sample
}

fail() { echo "FAIL: $*" >&2; exit 1; }

make_shards() {
  "$tok" train --model-type bpe --vocab-size "$1" -i de=$S/de.txt -i fr=$S/fr.txt -i nl=$S/nl.txt -i en=$S/en.txt \
    --out tok >/dev/null 2>&1 || fail "training the tokenizer"
  "$prep" -q -t tok.model -o shards/all de=$S/de.txt fr=$S/fr.txt nl=$S/nl.txt en=$S/en.txt >/dev/null
  "$prep" -q -t tok.model -o shards/heldout de=$S/heldout/de.txt fr=$S/heldout/fr.txt nl=$S/heldout/nl.txt \
    en=$S/heldout/en.txt >/dev/null
}

n_ranks() {
  local port; port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  local pids=()
  for ((r = 0; r < $1; r++)); do
    RANK=$r WORLD_SIZE=$1 LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$port OMP_NUM_THREADS=1 RHINE_DIST_STRICT_DEVICE=1 \
      "${prog:-$train}" "$2" > "$3.$r" 2>&1 & pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || fail "rank of $2 failed: $(tail -3 "$3".*)"; done
}
