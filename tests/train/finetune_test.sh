#!/usr/bin/env bash
# rhine-finetune end to end on a tiny imported HF-format model:
#  1. a tokenizer (rhine-tokenizer) and shards (rhine-prepare) of the bundled
#     de/fr/nl/en sample; a tiny Llama-style base model pretrained briefly by
#     rhine-train on all four languages (its checkpoint directory is an HF
#     model directory: config.json + model.safetensors under HF names, and the
#     tokenizer, which rhine-finetune checkpoints and exports carry as well);
#  2. continued pretraining on Dutch alone lowers the Dutch held-out loss, and
#     the export passes the independent HF-directory checker; with a mixture
#     replaying 25% English, English ends below the Dutch-only run;
#  3. SFT (full) on German prompt/response pairs lowers the held-out loss on
#     the replies;
#  4. LoRA SFT lowers it too and trains only the adapters: in the merged
#     export exactly the adapted q/v/down_proj weights differ from the base,
#     every other tensor is bitwise equal (independent python reader); the
#     PEFT adapter directory is written; its checkpoints hold only the
#     adapters, resuming on another base is refused; on a bf16 base under
#     bf16 autocast it trains too and exports bf16;
#  5. a bad config fails with exit code 1 and names the key;
#  6. rhine-train on two Gloo ranks with "zero1": true (optimizer state
#     sharded) gives the losses of two ranks without it;
#  7. rhine-train with "parallel": {"zero": 3} (FSDP) on two ranks gives them
#     too; on four ranks it follows them to 1e-4 (another float summation
#     order), and so do four FSDP ranks resuming the two-rank checkpoint;
#     rhine-convert exports the sharded checkpoint to a valid HF directory;
#  8. a DeepSeek-V3-style MoE model (MLA, MTP) with "parallel": {"ep": 2}
#     (routed experts over the two ranks) gives the losses of two FSDP ranks
#     without it to 1e-5, four EP ranks resuming its checkpoint and hybrid
#     sharding ("fsdp": 2 of 4 ranks, "ep": 2) and "fsdp": 4 with "ep": 2
#     (experts sharded over the EDP group) follow them to 1e-4, and that
#     EP checkpoint exports to a valid HF directory;
#  9. rhine-finetune under FSDP streams the base model in (built without its
#     weights, each rank reads its rows) and its losses equal the data
#     parallel run that loaded the base model whole, to 1e-5;
# 10. so does LoRA SFT under FSDP (base and adapters sharded), which also
#     writes its PEFT adapter and a valid merged HF export.
# Usage: finetune_test.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
source "$(dirname "$0")/test_lib.sh"
setup_run_test finetune_test "$1" "$2"
check="/usr/bin/python3 $src/tests/fixtures/hf/check_hf_dir.py"
export OMP_NUM_THREADS=2

# 1. Tokenizer, shards, base model.
make_shards 800
"$prep" -q -t tok.model -o shards/nl nl=$S/nl.txt >/dev/null
cat > base.json <<EOF
{"tokenizer": "tok.model", "train_shards": "shards/all", "heldout_shards": "shards/heldout", "out_dir": "base",
 "model": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
           "tie_word_embeddings": false},
 "seq_len": 64, "batch_size": 8, "steps": 60, "warmup": 5, "lr": 0.005, "eval_tokens": 3000,
 "sample_tokens": 4, "log_every": 100, "bf16": false}
EOF
"$train" base.json > base.txt 2>&1 || fail "rhine-train: $(tail -5 base.txt)"
base=base/checkpoints/step-00000060
[[ -f $base/config.json && -f $base/model.safetensors ]] || fail "no base checkpoint: $(ls base/checkpoints)"
cmp -s tok.model $base/tokenizer.model && [[ -f $base/tokenizer.json ]] ||
  fail "the rhine-train checkpoint does not carry its tokenizer: $(ls $base)"

# after LANG OUTPUT: "before after" held-out loss of LANG from rhine-finetune's table.
losses() { awk -v l="$1" '$1 == l && NF >= 6 { print $3, $4 }' "$2"; }
lower() {  # lower LANG OUTPUT: the loss after is below the loss before
  read -r before after <<<"$(losses "$1" "$2")"
  [[ -n "$before" ]] || fail "no $1 row in $2: $(cat "$2")"
  python3 -c "import sys; b, a = float(sys.argv[1]), float(sys.argv[2]); sys.exit(0 if a < b else 1)" "$before" "$after" \
    || fail "$1 held-out loss did not go down: $before -> $after"
  echo "$1 held-out loss $before -> $after"
}

# 2. Continued pretraining on Dutch.
cat > cpt.json <<EOF
{"base_model": "$base", "tokenizer": "tok.model", "mode": "pretrain", "train": "shards/nl",
 "heldout": "shards/heldout", "out_dir": "cpt", "export_dir": "cpt-hf", "seq_len": 64, "batch_size": 8,
 "steps": 40, "warmup": 4, "lr": 0.003, "eval_tokens": 3000, "sample_tokens": 4, "log_every": 100, "bf16": false}
EOF
"$ft" cpt.json > cpt.txt 2>&1 || fail "rhine-finetune pretrain: $(tail -5 cpt.txt)"
lower nl cpt.txt
r=$($check model cpt-hf)
python3 -c 'import json,sys; r=json.loads(sys.argv[1]); sys.exit("FAIL: %s" % r["problems"] if r["problems"] else 0)' "$r"
cmp -s tok.model cpt-hf/tokenizer.model && [[ -f cpt-hf/tokenizer.json ]] || fail "the export has not the run's tokenizer"
cmp -s tok.model cpt/checkpoints/step-00000040/tokenizer.model || fail "the rhine-finetune checkpoint does not carry its tokenizer"

# 2b. The same with replay: 75% Dutch, 25% English drawn from all four languages' shards.
# English is then trained instead of forgotten: its held-out loss ends below the Dutch-only
# run's, the token shares follow the weights, and the report names English as replayed.
sed -e 's|"train": "shards/nl"|"train": "shards/all", "mixture": {"nl": 0.75, "en": 0.25}|' \
    -e 's|"out_dir": "cpt", "export_dir": "cpt-hf"|"out_dir": "replay", "export_dir": "replay-hf"|' cpt.json > replay.json
"$ft" replay.json > replay.txt 2>&1 || fail "rhine-finetune pretrain with a mixture: $(tail -5 replay.txt)"
lower nl replay.txt
read -r _ en_only <<<"$(losses en cpt.txt)"
read -r _ en_replay <<<"$(losses en replay.txt)"
python3 - "$en_only" "$en_replay" replay.txt <<'PY' || fail "replay: $(grep -A7 Held-out replay.txt)"
import sys
only, replay, out = float(sys.argv[1]), float(sys.argv[2]), open(sys.argv[3]).read()
rows = {l.split()[0]: int(l.split()[1]) for l in out.split("Held-out")[1].splitlines()[2:6]}
share = rows["nl"] / (rows["nl"] + rows["en"])
assert replay < only, f"English held-out loss with replay {replay} is not below Dutch-only {only}"
assert rows["de"] == rows["fr"] == 0 and 0.6 < share < 0.9, rows
assert "en" in out and "(replayed, " in out, "no forgetting line"
print(f"replay: en held-out loss {only} (nl only) -> {replay} (25% en); nl share {share:.2f}")
PY

# 3. SFT on German "continue the text" pairs: prompt = a line, response = the next line.
pairs() {  # pairs FILE N
  python3 -c '
import json, sys
lines = [l.strip() for l in open(sys.argv[1], encoding="utf-8") if l.strip()]
for a, b in list(zip(lines[0::2], lines[1::2]))[:int(sys.argv[2])]:
    print(json.dumps({"prompt": a[:200], "response": b[:200], "lang": "de"}, ensure_ascii=False))
' "$1" "$2"
}
pairs $S/de.txt 600 > sft-train.jsonl
pairs $S/heldout/de.txt 60 > sft-heldout.jsonl
sft_config() {  # sft_config OUT_DIR LORA_JSON
  cat <<EOF
{"base_model": "$base", "tokenizer": "tok.model", "mode": "sft", "train": "sft-train.jsonl",
 "heldout": "sft-heldout.jsonl", "chat_template": "plain", "out_dir": "$1", "export_dir": "$1-hf", "lora": $2,
 "seq_len": 64, "batch_size": 8, "steps": 30, "warmup": 3, "lr": $3, "eval_tokens": 3000, "sample_tokens": 4,
 "log_every": 100, "bf16": false}
EOF
}
sft_config sft null 0.003 > sft.json
"$ft" sft.json > sft.txt 2>&1 || fail "rhine-finetune sft: $(tail -5 sft.txt)"
lower de sft.txt
grep -q "loss on the replies" sft.txt || fail "sft table header"

# 4. LoRA: only the adapters train.
sft_config lora '{"rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj"]}' 0.02 > lora.json
"$ft" lora.json > lora.txt 2>&1 || fail "rhine-finetune lora: $(tail -5 lora.txt)"
lower de lora.txt
[[ -f lora/adapter/adapter_config.json && -f lora/adapter/adapter_model.safetensors ]] || fail "no PEFT adapter"
/usr/bin/python3 - "$base/model.safetensors" lora-hf/model.safetensors <<'EOF' || fail "LoRA changed more than the adapted weights"
# Independent safetensors reader: 8-byte header length, JSON header, raw bytes.
import json, struct, sys
def read(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]]) for k, v in header.items()}
base, tuned = read(sys.argv[1]), read(sys.argv[2])
assert base.keys() == tuned.keys(), (sorted(base.keys() ^ tuned.keys()))
changed = sorted(k for k in base if base[k] != tuned[k])
adapted = sorted(k for k in base if k.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight")))
print("changed:", changed)
assert changed == adapted, (changed, adapted)
EOF
echo "LoRA: only the adapted q_proj/v_proj/down_proj weights changed"

# 4b. Its checkpoints hold the adapters only and name the base; resuming on
#     another base, or exporting such a checkpoint alone, is refused.
/usr/bin/python3 - lora/checkpoints <<'EOF' || fail "a LoRA checkpoint holds more than the adapters"
import glob, json, struct, sys
step = sorted(glob.glob(sys.argv[1] + "/step-*"))[-1]
with open(step + "/model.safetensors", "rb") as f:
    names = json.loads(f.read(struct.unpack("<Q", f.read(8))[0])).keys() - {"__metadata__"}
params = [n for n in names if n.endswith((".weight", ".bias"))]
assert params and all(".lora_" in n for n in params), sorted(params)
frozen = json.load(open(step + "/trainer.json"))["frozen"]
assert frozen["source"].endswith("step-00000060") and frozen["fingerprint"]["tensors"] > 0, frozen
print(step, len(params), "adapter tensors")
EOF
sed -e 's|"steps": 30|"steps": 34|' -e "s|\"base_model\": \"$base\"|\"base_model\": \"cpt/checkpoints/step-00000040\"|" lora.json > lora-other.json
! "$ft" lora-other.json > lora-other.txt 2>&1 || fail "rhine-finetune resumed a LoRA run on another base"
grep -q "trained on other frozen parameters" lora-other.txt || fail "resume on another base: $(tail -3 lora-other.txt)"
! "$build/tools/rhine-convert" rhine-to-hf --checkpoint lora/checkpoints --out lora-conv > lora-conv.txt 2>&1 \
  || fail "rhine-convert exported an adapters-only checkpoint"
grep -q "holds only the trained parameters" lora-conv.txt || fail "rhine-to-hf: $(tail -3 lora-conv.txt)"
echo "LoRA checkpoints hold only the adapters; another base is refused on resume"

# 4c. LoRA on a bf16 base under bf16 autocast: the base stays bf16 (float32
#     adapters), the loss falls, and the merged export is bf16.
"$build/tools/rhine-convert" dtype --model "$base" --out base-bf16 --to bf16 > /dev/null
sft_config lora16 '{"rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}' 0.02 |
  sed -e "s|\"base_model\": \"$base\"|\"base_model\": \"base-bf16\"|" -e 's|"bf16": false|"bf16": "always"|' > lora16.json
"$ft" lora16.json > lora16.txt 2>&1 || fail "rhine-finetune lora on bf16: $(tail -5 lora16.txt)"
lower de lora16.txt
/usr/bin/python3 - lora16-hf/model.safetensors <<'EOF' || fail "the LoRA export on a bf16 base is not bf16"
import json, struct, sys
with open(sys.argv[1], "rb") as f:
    h = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
h.pop("__metadata__", None)
dtypes = {v["dtype"] for v in h.values()}
assert dtypes == {"BF16"}, dtypes
EOF
echo "LoRA on a bf16 base: exported in bf16"

# 5. Bad config.
sed 's/"steps"/"stepz"/' sft.json > bad.json
if "$ft" bad.json > bad.txt 2>&1; then fail "a bad config was accepted"; fi
grep -q "stepz" bad.txt || fail "the error does not name the key: $(cat bad.txt)"
sed 's|"mode": "sft"|"mode": "sft", "mixture": {"de": 1}|' sft.json > bad.json
if "$ft" bad.json > bad.txt 2>&1; then fail "a mixture in SFT mode was accepted"; fi
grep -q '"mixture" applies to mode "pretrain"' bad.txt || fail "unclear mixture error: $(cat bad.txt)"
# follows REF STEPS TOL RUN...: REF's metrics.jsonl has STEPS step losses, and
# each RUN's steps are among them, end at the same step and agree to TOL (relative).
follows() {
  python3 - "$@" <<'PY'
import json, sys
def losses(p):
    return {r["step"]: r["loss"] for r in map(json.loads, open(p + "/metrics.jsonl")) if r.get("type") == "step"}
ref, n, tol = losses(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
assert len(ref) == n, (sys.argv[1], ref)
for run in sys.argv[4:]:
    got = losses(run)
    assert got and set(got) <= set(ref) and max(got) == max(ref), (run, got)
    for k in got:
        assert abs(got[k] - ref[k]) <= tol * abs(ref[k]), (run, k, got[k], ref[k])
PY
}
# 6. rhine-train data parallel, with and without ZeRO-1.
two_ranks() { n_ranks 2 "$@"; }
for z in false true; do
  sed "s/\"out_dir\": \"base\"/\"out_dir\": \"dp-$z\", \"zero1\": $z/; s/\"steps\": 60/\"steps\": 8/; s/\"log_every\": 100/\"log_every\": 1/" base.json > dp-$z.json
  two_ranks dp-$z.json dp-$z.log
done
grep -q "ZeRO-1" dp-true.log.0 || fail "zero1 was not used: $(head -5 dp-true.log.0)"
follows dp-false 8 1e-5 dp-true || fail "ZeRO-1 changed the losses"
echo "ZeRO-1 losses equal plain data parallel over 8 steps"
# 7. FSDP through the "parallel" block.
mk() {  # mk NAME STEPS PARALLEL
  sed "s/\"out_dir\": \"base\"/\"out_dir\": \"$1\", \"parallel\": $3/; s/\"steps\": 60/\"steps\": $2/; s/\"log_every\": 100/\"log_every\": 1/" base.json > $1.json
}
mk fsdp2 8 '{"zero": 3}, "checkpoint_every": 4'; two_ranks fsdp2.json fsdp2.log
mk fsdp4 8 '{"zero": 3, "fsdp": 4, "reshard_after_forward": false}'; n_ranks 4 fsdp4.json fsdp4.log
grep -q "FSDP ZeRO-3 over 4 rank" fsdp4.log.0 || fail "FSDP was not used: $(head -5 fsdp4.log.0)"
mk resume4 8 '{"zero": 3}, "checkpoint_every": 4'; mkdir -p resume4/checkpoints
cp -r fsdp2/checkpoints/step-00000004 resume4/checkpoints/ && n_ranks 4 resume4.json resume4.log
grep -q "resumed from" resume4.log.0 || fail "the 4-rank run did not resume: $(head -5 resume4.log.0)"
follows dp-false 8 1e-5 fsdp2 && follows dp-false 8 1e-4 fsdp4 resume4 || fail "FSDP changed the losses"
echo "FSDP losses follow plain data parallel (2 ranks to 1e-5; 4 ranks, and 2 -> 4 ranks resumed, to 1e-4)"
# The 4-rank sharded checkpoint exports to an HF directory (tensor by tensor) that passes the checker.
"$build/tools/rhine-convert" rhine-to-hf --checkpoint resume4/checkpoints --out resume4-hf > convert.txt 2>&1 \
  || fail "rhine-convert of a sharded checkpoint: $(tail -3 convert.txt)"
grep -q "sharded checkpoint" convert.txt || fail "the sharded path was not taken: $(cat convert.txt)"
r=$($check model resume4-hf)
python3 -c 'import json,sys; r=json.loads(sys.argv[1]); sys.exit("FAIL: %s" % r["problems"] if r["problems"] else 0)' "$r"

# 8. Expert parallelism through the "parallel" block, on a small MoE model.
moe='"model": {"model_type": "deepseek_v3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 128, "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "first_k_dense_replace": 1, "n_group": 2, "topk_group": 1, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": true, "routed_scaling_factor": 2.5, "num_nextn_predict_layers": 1}'
mkmoe() {  # mkmoe NAME PARALLEL
  sed "s/\"out_dir\": \"base\"/\"out_dir\": \"$1\", \"parallel\": $2, \"checkpoint_every\": 4/; s/\"steps\": 60/\"steps\": 8/; s/\"log_every\": 100/\"log_every\": 1/; s/\"model\": {[^}]*}/$moe/" moe-base.json > $1.json
}
tr -d '\n' < base.json > moe-base.json  # one line, so that sed replaces the whole "model" object
mkmoe moe_z3 '{"zero": 3}'; two_ranks moe_z3.json moe_z3.log
mkmoe moe_ep2 '{"zero": 3, "ep": 2}'; two_ranks moe_ep2.json moe_ep2.log
grep -q "routed experts over 2 ranks (EP)" moe_ep2.log.0 || fail "EP was not used: $(head -5 moe_ep2.log.0)"
mkmoe moe_ep4 '{"ep": 4}'; mkdir -p moe_ep4/checkpoints
cp -r moe_ep2/checkpoints/step-00000004 moe_ep4/checkpoints/ && n_ranks 4 moe_ep4.json moe_ep4.log
grep -q "resumed from" moe_ep4.log.0 || fail "the 4-rank EP run did not resume: $(head -5 moe_ep4.log.0)"
# Hybrid: 2 copies x 2 ranks, EP 2 within each copy.
mkmoe moe_hsdp '{"fsdp": 2, "ep": 2}'; n_ranks 4 moe_hsdp.json moe_hsdp.log
grep -q "FSDP ZeRO-3 over 2 rank(s) x 2 copies (hybrid)" moe_hsdp.log.0 || fail "hybrid was not used: $(head -5 moe_hsdp.log.0)"
# EP smaller than FSDP: 4 ranks, EP 2, each EP rank's experts sharded over 2 (the issue's example layout).
mkmoe moe_edp '{"fsdp": 4, "ep": 2, "zero": 3, "reshard_after_forward": true}'; n_ranks 4 moe_edp.json moe_edp.log
grep -q "sharded over 2 (EDP)" moe_edp.log.0 || fail "EDP was not used: $(head -5 moe_edp.log.0)"
follows moe_z3 8 1e-5 moe_ep2 && follows moe_z3 8 1e-4 moe_ep4 moe_hsdp moe_edp || fail "EP changed the losses"
echo "EP losses follow FSDP without EP (2 ranks to 1e-5; 2 -> 4 EP ranks resumed, 2 copies x EP 2, and FSDP 4 x EP 2, to 1e-4)"
"$build/tools/rhine-convert" rhine-to-hf --checkpoint moe_ep2/checkpoints --out moe-ep2-hf > convert-ep.txt 2>&1 \
  || fail "rhine-convert of an EP checkpoint: $(tail -3 convert-ep.txt)"
r=$($check model moe-ep2-hf)
python3 -c 'import json,sys; r=json.loads(sys.argv[1]); sys.exit("FAIL: %s" % r["problems"] if r["problems"] else 0)' "$r"

# 9. rhine-finetune's streaming import under FSDP.
# dp_and_fsdp CONFIG NAME: rhine-finetune CONFIG for 6 logged steps on two ranks, as data parallel
# (NAME-dp) and under FSDP ZeRO-3 (NAME-fsdp), each with its own out_dir and export_dir.
dp_and_fsdp() {
  for v in dp:'{"zero": 0}' fsdp:'{"zero": 3}'; do
    python3 - "$1" "$2-${v%%:*}" "${v#*:}" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
c.update(out_dir=sys.argv[2], export_dir=sys.argv[2] + "-hf", parallel=json.loads(sys.argv[3]), steps=6, log_every=1)
json.dump(c, open(sys.argv[2] + ".json", "w"))
PY
    prog=$ft two_ranks "$2-${v%%:*}.json" "$2-${v%%:*}.log"
  done
}
dp_and_fsdp cpt.json ft
grep -q "FSDP ZeRO-3 over 2 rank" ft-fsdp.log.0 || fail "rhine-finetune did not use FSDP: $(head -5 ft-fsdp.log.0)"
follows ft-dp 6 1e-5 ft-fsdp || fail "the streaming import changed the losses"
echo "rhine-finetune under FSDP (streaming import) equals data parallel over 6 steps"

# 10. LoRA SFT under FSDP (the base streamed in and sharded, the adapters sharded and trained).
dp_and_fsdp lora.json lora
grep -q "FSDP ZeRO-3 over 2 rank" lora-fsdp.log.0 || fail "LoRA did not use FSDP: $(head -5 lora-fsdp.log.0)"
follows lora-dp 6 1e-5 lora-fsdp || fail "LoRA under FSDP changed the losses"
[[ -f lora-fsdp/adapter/adapter_model.safetensors ]] || fail "no PEFT adapter from the FSDP run"
r=$($check model lora-fsdp-hf)
python3 -c 'import json,sys; r=json.loads(sys.argv[1]); sys.exit("FAIL: %s" % r["problems"] if r["problems"] else 0)' "$r"
echo "rhine-finetune LoRA under FSDP equals data parallel over 6 steps and writes its PEFT adapter"
echo "PASS"
