#!/usr/bin/env bash
# The run config's blocks (rhine/train/run.h), end to end through
# rhine-train, on a small DeepSeek-V3-style model (MLA, MoE with a router,
# MTP), bf16 autocast, two threads:
#  1. for each of AdamW, Muon (with AdamW for the rest), AdEMAMix and Lion:
#     the held-out bits per byte fall over 40 steps, and a run restarted from
#     its step-20 checkpoint ends bitwise equal to the uninterrupted run
#     (model.safetensors and optimizer.safetensors at step 40);
#  2. the decay groups: weight decay only on matrices; norms, the embedding
#     and the MoE router (mlp.gate.weight) in the "no_decay" group, as the
#     checkpoint's optimizer state records them;
#  3. Muon under FSDP (two ranks, each stepping row shards of the matrices it
#     shares through FSDP::muon_shards) follows Muon on two data-parallel
#     ranks;
#  4. bad blocks fail with exit code 1 and a message naming the key;
#  5. "activation_checkpointing": true gives the losses of the same run
#     without it (with the sequence-wise balance loss on).
# Usage: run_config_test.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
source "$(dirname "$0")/test_lib.sh"
setup_run_test run_config_test "$1" "$2"
export OMP_NUM_THREADS=2
make_shards 600

# config NAME OPTIMIZER_JSON LR [EXTRA_KEYS]
config() {
  cat > "$1.json" <<EOF
{"tokenizer": "tok.model", "train_shards": "shards/all", "heldout_shards": "shards/heldout", "out_dir": "$1",
 "model": {"model_type": "deepseek_v3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 128, "kv_lora_rank": 16,
           "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 4,
           "n_shared_experts": 1, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "first_k_dense_replace": 1,
           "n_group": 1, "topk_group": 1, "norm_topk_prob": true, "routed_scaling_factor": 2.5,
           "num_nextn_predict_layers": 1, "tie_word_embeddings": false},
 "optimizer": $2, "lr": $3, "weight_decay": 0.1, "threads": 2, "bf16": "always",
 "seq_len": 64, "batch_size": 8, "steps": 40, "warmup": 4, "checkpoint_every": 20, "keep_last": 0,
 "eval_tokens": 2000, "sample_tokens": 2, "log_every": 10, "moe_seq_aux_alpha": 0.0001 ${4:-}}
EOF
}
# bpb_falls NAME: the mean held-out bpb of the last evaluation is below the first's.
bpb_falls() {
  python3 - "$1/metrics.jsonl" <<'PY'
import json, sys
ev = [json.loads(l) for l in open(sys.argv[1]) if '"eval"' in l]
mean = lambda e: sum(v["bpb"] for v in e["languages"].values()) / len(e["languages"])
first, last = mean(ev[0]), mean(ev[-1])
print(f"held-out bpb {first:.3f} -> {last:.3f}")
sys.exit(0 if last < first - 0.05 else 1)
PY
}

# 1. Each optimizer: loss falls, and the restart from step 20 is bitwise.
for spec in 'adamw|{"type": "adamw"}|0.005' \
            'muon|{"type": "muon", "momentum": 0.95}|0.005' \
            'ademamix|{"type": "ademamix", "beta2": 0.95, "alpha": 5, "beta3_warmup": 40, "alpha_warmup": 40}|0.005' \
            'lion|{"type": "lion", "beta1": 0.9, "beta2": 0.99}|0.0005'; do
  IFS='|' read -r name block lr <<<"$spec"
  config "$name" "$block" "$lr"
  "$train" "$name.json" > "$name.log" 2>&1 || fail "rhine-train $name: $(tail -5 "$name.log")"
  grep -q "$name" "$name.log" || fail "the log does not name the optimizer $name: $(head -5 "$name.log")"
  msg=$(bpb_falls "$name") || fail "$name: held-out bpb did not fall: $msg"
  echo "$name: $msg"
  # Restart: a copy of the run without its step-40 checkpoint resumes from step 20.
  cp -r "$name" "$name-resumed"
  rm -rf "$name-resumed/checkpoints/step-00000040"
  sed "s/\"out_dir\": \"$name\"/\"out_dir\": \"$name-resumed\"/" "$name.json" > "$name-resumed.json"
  "$train" "$name-resumed.json" > "$name-resumed.log" 2>&1 || fail "rhine-train $name resumed: $(tail -5 "$name-resumed.log")"
  grep -q "resumed from" "$name-resumed.log" || fail "$name did not resume: $(head -8 "$name-resumed.log")"
  for f in model.safetensors optimizer.safetensors; do
    cmp -s "$name/checkpoints/step-00000040/$f" "$name-resumed/checkpoints/step-00000040/$f" \
      || fail "$name: $f at step 40 differs after a restart from step 20"
  done
  echo "$name: restart from step 20 is bitwise equal at step 40"
done

# 2. Decay groups, as the checkpoint's optimizer state records them.
python3 - adamw/checkpoints/step-00000040/trainer.json <<'PY' || fail "decay groups"
import json, sys
groups = {g["name"]: g for g in json.load(open(sys.argv[1]))["optimizer"]["groups"]}
assert set(groups) == {"decay", "no_decay"}, groups.keys()
assert groups["decay"]["options"]["weight_decay"] == 0.1 and groups["no_decay"]["options"]["weight_decay"] == 0.0
no_decay, decay = set(groups["no_decay"]["params"]), set(groups["decay"]["params"])
for name in ["model.embed_tokens.weight", "model.norm.weight", "model.layers.1.mlp.gate.weight",
             "model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.kv_a_layernorm.weight"]:
    assert name in no_decay, name
for name in ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.experts.0.up_proj.weight", "lm_head.weight"]:
    assert name in decay, name
print(f"decay groups: {len(decay)} tensors with weight decay, {len(no_decay)} without (router, norms, embedding)")
PY

# 3. Muon under FSDP follows Muon data parallel (two ranks each, 8 steps).
for v in 'dp|{"zero": 0}' 'fsdp|{"zero": 3}'; do
  IFS='|' read -r name par <<<"$v"
  config "muon-$name" '{"type": "muon", "ns_dtype": "fp32"}' 0.005 ", \"parallel\": $par"
  sed -i 's/"steps": 40/"steps": 8/; s/"log_every": 10/"log_every": 1/; s/"bf16": "always"/"bf16": false/' "muon-$name.json"
  n_ranks 2 "muon-$name.json" "muon-$name.log"
done
grep -q "FSDP ZeRO-3 over 2 rank" muon-fsdp.log.0 || fail "FSDP was not used: $(head -5 muon-fsdp.log.0)"
grep -q "muon on" muon-fsdp.log.0 && grep -q "muon on" muon-dp.log.0 || fail "Muon was not used: $(head -5 muon-fsdp.log.0)"
python3 - muon-dp/metrics.jsonl muon-fsdp/metrics.jsonl <<'PY' || fail "Muon under FSDP left Muon data parallel"
import json, sys
loss = lambda p: {r["step"]: r["loss"] for r in map(json.loads, open(p)) if r.get("type") == "step"}
a, b = loss(sys.argv[1]), loss(sys.argv[2])
assert len(a) == 8 and a.keys() == b.keys(), (a, b)
worst = max(abs(a[k] - b[k]) / abs(a[k]) for k in a)
print(f"Muon under FSDP follows data parallel over 8 steps (largest relative loss difference {worst:.1e})")
sys.exit(0 if worst < 1e-4 else 1)
PY

# 4. Bad blocks.
bad() {  # bad BLOCK EXPECTED_TEXT
  config bad "$1" 0.005
  if "$train" bad.json > bad.log 2>&1; then fail "rhine-train accepted the optimizer block $1"; fi
  grep -q -- "$2" bad.log || fail "the error for $1 does not say \"$2\": $(tail -3 bad.log)"
}
bad '{"type": "sgd"}' 'unknown optimizer type'
bad '{"type": "adamw", "lr": 0.1}' 'set the top-level "lr"'
bad '{"type": "lion", "beta3": 0.9}' 'beta3'
bad '{"type": "adamw", "adamw": ["*embed*"]}' 'is a Muon key'
echo "bad optimizer blocks fail with the key named"

# 5. Activation checkpointing (float32, 8 steps, one process).
for ck in false true; do
  config "ckpt-$ck" '{"type": "adamw"}' 0.005 ", \"activation_checkpointing\": $ck"
  sed -i 's/"steps": 40/"steps": 8/; s/"log_every": 10/"log_every": 1/; s/"bf16": "always"/"bf16": false/' "ckpt-$ck.json"
  "$train" "ckpt-$ck.json" > "ckpt-$ck.log" 2>&1 || fail "rhine-train ckpt-$ck: $(tail -5 "ckpt-$ck.log")"
done
grep -q "activation checkpointing" ckpt-true.log || fail "checkpointing was not used: $(head -5 ckpt-true.log)"
! grep -q "activation checkpointing" ckpt-false.log || fail "checkpointing was used without the key"
python3 - ckpt-false/metrics.jsonl ckpt-true/metrics.jsonl <<'PY' || fail "activation checkpointing changed the losses"
import json, sys
loss = lambda p: {r["step"]: (r["loss"], r["aux"]) for r in map(json.loads, open(p)) if r.get("type") == "step"}
a, b = loss(sys.argv[1]), loss(sys.argv[2])
assert len(a) == 8 and a.keys() == b.keys(), (a, b)
worst = max(abs(a[k][i] - b[k][i]) / abs(a[k][i]) for k in a for i in (0, 1))
print(f"activation checkpointing: losses and balance losses of 8 steps follow the plain run (largest relative difference {worst:.1e})")
sys.exit(0 if worst < 1e-5 else 1)
PY
echo "PASS"
