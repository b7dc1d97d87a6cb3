#!/usr/bin/env bash
# kill -9 and resume under the conditions of a real run: 4 threads, bf16
# autocast, fused kernels on. For each run below the process is killed with
# SIGKILL once its step-8 checkpoint is on disk, started again with the same
# command, and its step-20 checkpoint must equal, byte for byte, that of a run
# that was never interrupted (model.safetensors, optimizer.safetensors):
#  1. rhine-train, a small DeepSeek-V3-style model (MLA + MoE + MTP, the
#     sequence-wise balance loss and the router-bias update on);
#  2. rhine-finetune SFT (full) of a small Llama-style model;
#  3. rhine-finetune LoRA SFT of the same model.
# Usage: resume_test.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
source "$(dirname "$0")/test_lib.sh"
setup_run_test resume_test "$1" "$2"
unset OMP_NUM_THREADS  # the config's "threads": 4 decides
make_shards 600
common='"threads": 4, "bf16": "always", "fused_kernels": true, "seq_len": 64, "batch_size": 8, "steps": 20, "warmup": 3,
 "checkpoint_every": 4, "keep_last": 0, "eval_tokens": 1000, "sample_tokens": 2, "log_every": 1'

# killed_and_resumed PROGRAM NAME: runs NAME.json uninterrupted (out_dir NAME) and, as NAME-k.json
# (out_dir NAME-k), kills it after its step-8 checkpoint and runs it again; compares step 20.
killed_and_resumed() {
  local prog=$1 name=$2
  "$prog" "$name.json" > "$name.log" 2>&1 || fail "$name: $(tail -5 "$name.log")"
  sed "s/\"out_dir\": \"$name\"/\"out_dir\": \"$name-k\"/; s/\"export_dir\": \"$name-hf\"/\"export_dir\": \"$name-k-hf\"/" \
    "$name.json" > "$name-k.json"
  "$prog" "$name-k.json" > "$name-k.log" 2>&1 &
  local pid=$! waited=0
  until [[ -d "$name-k/checkpoints/step-00000008" ]]; do
    kill -0 "$pid" 2>/dev/null || fail "$name-k ended before its step-8 checkpoint: $(tail -5 "$name-k.log")"
    sleep 0.02
    waited=$((waited + 1))
    ((waited < 30000)) || fail "$name-k: no step-8 checkpoint after 10 minutes"
  done
  kill -9 "$pid"
  wait "$pid" 2>/dev/null && fail "$name-k was not killed"
  local at; at=$(ls "$name-k/checkpoints" | grep '^step-' | tail -1)
  [[ ! -d "$name-k/checkpoints/step-00000020" ]] || fail "$name-k finished before the kill (too fast to test)"
  "$prog" "$name-k.json" > "$name-k2.log" 2>&1 || fail "$name-k resumed: $(tail -5 "$name-k2.log")"
  grep -q "resumed from" "$name-k2.log" || fail "$name-k did not resume: $(head -8 "$name-k2.log")"
  for f in model.safetensors optimizer.safetensors; do
    cmp -s "$name/checkpoints/step-00000020/$f" "$name-k/checkpoints/step-00000020/$f" \
      || fail "$name: $f at step 20 differs after kill -9 and resume"
  done
  echo "$name: killed by SIGKILL after checkpoint $at, resumed; step 20 is bitwise equal"
}

# 1. MLA + MoE + MTP pretraining.
cat > moe.json <<EOF
{"tokenizer": "tok.model", "train_shards": "shards/all", "heldout_shards": "shards/heldout", "out_dir": "moe",
 "model": {"model_type": "deepseek_v3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 128, "kv_lora_rank": 16,
           "q_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 4,
           "n_shared_experts": 1, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "first_k_dense_replace": 1,
           "n_group": 1, "topk_group": 1, "norm_topk_prob": true, "routed_scaling_factor": 2.5,
           "num_nextn_predict_layers": 1},
 "lr": 0.003, "moe_seq_aux_alpha": 0.0001, $common}
EOF
killed_and_resumed "$train" moe

# 2. and 3.: a small Llama-style base model, then SFT and LoRA SFT of it.
cat > base.json <<EOF
{"tokenizer": "tok.model", "train_shards": "shards/all", "heldout_shards": "shards/heldout", "out_dir": "base",
 "model": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128},
 "seq_len": 64, "batch_size": 8, "steps": 10, "warmup": 2, "lr": 0.005, "eval_tokens": 1000, "sample_tokens": 2,
 "log_every": 100, "bf16": false}
EOF
"$train" base.json > base.log 2>&1 || fail "base model: $(tail -5 base.log)"
python3 - "$S/de.txt" > sft.jsonl <<'PY'
import json, sys
lines = [l.strip() for l in open(sys.argv[1], encoding="utf-8") if l.strip()]
for a, b in list(zip(lines[0::2], lines[1::2]))[:300]:
    print(json.dumps({"prompt": a[:150], "response": b[:150], "lang": "de"}, ensure_ascii=False))
PY
for v in 'sft|null' 'lora|{"rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}'; do
  IFS='|' read -r name lora <<<"$v"
  cat > "$name.json" <<EOF
{"base_model": "base/checkpoints/step-00000010", "tokenizer": "tok.model", "mode": "sft", "train": "sft.jsonl",
 "heldout": "sft.jsonl", "chat_template": "plain", "out_dir": "$name", "export_dir": "$name-hf", "lora": $lora,
 "lr": 0.003, $common}
EOF
  killed_and_resumed "$ft" "$name"
done
echo "PASS"
