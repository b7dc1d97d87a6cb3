#!/usr/bin/python3
"""End-to-end training throughput: Rhine's `rhine-train` against the same model trained by
PyTorch eager and by torch.compile, in one run (issues #9 and #17).

For each config (--configs: the demo models, examples/configs/demo-{dense,moe}.json, and the
models of issue #17 in bench/configs: a 15.7M Llama with GQA at 8 x 256 and a vocabulary of 8k,
a 96M Llama at 2 x 1024, a 60M MLA + MoE), each thread count and each round:
  a) every `rhine-train` given (--rhine-train, comma-separated: the Debian LibTorch 1.13 build and
     the wheel's LibTorch 2.x build) runs a copy of the config with `steps` reduced (default: the
     config's, at most 30), evaluation and checkpoints moved out of the timed window, a metrics
     line every step, out_dir in a temporary directory; tokens/s is the median of the per-step
     `tok_s` of metrics.jsonl after the first --warmup-steps steps;
  b) every PyTorch side given (--peers: eager, compile; each in this script's Python or
     @PYTHON) trains the same model written here in plain PyTorch (HF formulas; MoE as a loop
     over experts like HF and DeepSeek's model.py; `compile` wraps the model in torch.compile,
     inductor on the CPU, as a user would) on the same demo shards (document order and row
     languages drawn with numpy, not Rhine's generator), packed the way Rhine's loader packs them
     ([bos] doc [eos], per-document positions and attention masks, labels -100 across documents),
     with the same batch_size x seq_len, AdamW (betas 0.9 / 0.95, the config's lr and weight decay
     on every parameter, warm-up + cosine schedule), gradient clipping at the config's grad_clip,
     the same precision, and for MoE the sequence-wise aux loss, the MTP loss (lambda 0.3,
     rhine-train's default) and the aux-loss-free bias update (rate 1e-3); the step time covers
     the same work as Rhine's (batch, forward, backward, clip, optimizer, bias update);
  c) precision (--precision auto): bf16 autocast on both sides where the CPU computes bf16
     natively (rhine-info says), fp32 where it only emulates it (there bf16 matmuls run tens of
     times slower than fp32, and neither Rhine nor a user would train that way);
  d) the matmul ceiling: rhine-info next to each rhine-train measures every GEMM of the model's
     training step (forward, and backward to input and weight, experts at their mean load) in the
     run's dtype and threads; the ceiling is their total FLOPs over the summed time at those rates,
     and "ceiling_share" is a side's model FLOP/s (6 per weight and token, plus causal attention)
     over the ceiling of its LibTorch;
  e) prints JSON Lines in Rhine's bench format: one "train_e2e" line per (config, threads, side)
     with the median, min, max and 90th percentile of the per-step tokens/s over all rounds, the
     model GFLOP per token, achieved GFLOP/s and the ceiling share, and one "train_e2e_ratio" line
     per (Rhine build, PyTorch side): the median over rounds of each round's ratio of medians,
     with the goal of issue #17 (1.0x torch.compile, 1.5x eager);
  f) with --dp N, the first rhine-train also runs as N local data-parallel ranks x 1 thread (Gloo
     on 127.0.0.1, started the way torchrun would) and "train_e2e_dp_scaling" compares that with
     one process at 1 and N threads.

Before measuring, the PyTorch models are checked in float64 against the independent references
that generate Rhine's nn test fixtures (--self-check), in every Python used. The Python model's
state_dict must have exactly the names and shapes of Rhine's final checkpoint
(model.safetensors; Rhine's MTP embedding / head aliases of the tied embedding are not
parameters), otherwise the script stops with an error.

Threads: rhine-train takes the config key "threads"; this script sets both "threads" and
OMP_NUM_THREADS for Rhine, and OMP_NUM_THREADS + torch.set_num_threads for Python.

The demo directory (tokenizer and shards) is what scripts/demo.sh creates (build/demo:
tok.model, shards/train, shards/heldout); configs with a larger vocabulary than the tokenizer's
simply leave the extra rows untrained. Run from the repository, with the project's Python
(scripts/setup-python.sh; PyTorch 2.x):

    py=$(scripts/setup-python.sh)/bin/python
    $py bench/bench_train.py --configs dense16m,dense100m,moe,moe60m --threads 2 \\
        --rhine-train build/examples/rhine-train,build-torch2/examples/rhine-train [--rounds 2]
    /usr/bin/python3 bench/bench_train.py --peers eager   # against Debian's PyTorch 1.13 eager
    $py bench/bench_train.py --self-check   # only: the PyTorch models vs tests/fixtures/nn
"""
import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {  # --configs names: the demo models and issue #17's models (bench/configs)
    "dense": "examples/configs/demo-dense.json",       # 2.7M Llama-style, 16 x 128
    "moe": "examples/configs/demo-moe.json",           # 5.8M MLA + MoE + MTP, 16 x 128
    "dense16m": "bench/configs/train-dense-16m.json",  # 15.7M Llama, GQA, hidden 384, vocab 8k, 8 x 256
    "dense100m": "bench/configs/train-dense-100m.json",  # 96M Llama, GQA, hidden 768, 12 layers, 2 x 1024
    "moe60m": "bench/configs/train-moe-60m.json",      # 60M MLA + MoE (16 routed + 1 shared, top-2), 8 x 256
}
MTP_LAMBDA = 0.3          # rhine-train's default (the demo configs do not set mtp_lambda)
ROUTER_BIAS_RATE = 1e-3   # rhine-train's default router_bias_update_rate


# --- files written by Rhine: tokenizer ids, shards, checkpoints --------------------------------

def _varint(buf, i):
    v, shift = 0, 0
    while True:
        b = buf[i]
        i += 1
        v |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return v, i


def _fields(buf):
    """(field, wire type, value) of one protobuf message; value is bytes for wire type 2."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        f, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(buf, i)
        elif wt == 1:
            v, i = buf[i:i + 8], i + 8
        elif wt == 2:
            n, i = _varint(buf, i)
            v, i = buf[i:i + n], i + n
        elif wt == 5:
            v, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"[bench_train] unsupported protobuf wire type, got {wt}; is this a .model file?")
        yield f, wt, v


def sentencepiece_ids(path):
    """(vocab_size, bos_id, eos_id) of a SentencePiece .model (-1: none), as Rhine reads them."""
    with open(path, "rb") as f:
        buf = f.read()
    n_pieces, spec = 0, {41: 1, 42: 2}  # trainer_spec bos_id / eos_id defaults
    for f, wt, v in _fields(buf):
        if f == 1 and wt == 2:
            n_pieces += 1
        elif f == 2 and wt == 2:
            for g, wt2, u in _fields(v):
                if g in spec and wt2 == 0:
                    spec[g] = u - (1 << 64) if u >= (1 << 63) else u  # int32 -1 is a 10-byte varint
    return n_pieces, spec[41], spec[42]


def read_shard(path):
    """(tokens int64 array, documents [(first, n, language code)]) of one Rhine token shard."""
    import numpy as np
    with open(path, "rb") as f:
        head = f.read(64)
        magic, version, tb, n_tok, n_docs, meta_bytes = struct.unpack("<8sIIQQQ", head[:40])
        if magic != b"RHTOKENS" or version != 1:
            raise ValueError(f"[bench_train] not a Rhine token shard, got magic {magic!r} in {path}; "
                             "make the shards with scripts/demo.sh")
        tokens = np.fromfile(f, dtype="<u2" if tb == 2 else "<u4", count=n_tok).astype(np.int64)
        f.seek(64 + (n_tok * tb + 63) // 64 * 64)
        index = np.frombuffer(f.read(16 * n_docs), dtype=np.dtype([("first", "<u8"), ("n", "<u4"),
                                                                   ("lang", "<u2"), ("src", "<u2")]))
        meta = json.loads(f.read(meta_bytes))
    return tokens, [(int(d["first"]), int(d["n"]), meta["languages"][int(d["lang"])]) for d in index]


def safetensors_shapes(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        head = json.loads(f.read(n))
    return {k: v["shape"] for k, v in head.items() if k != "__metadata__"}


def median(v):
    s = sorted(v)
    return s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])


def schedule(step, warmup, total, floor):
    """Rhine's warmup_cosine(warmup, total, 1, floor) at 0-based step `step`."""
    if step < warmup:
        return step / warmup
    t = min(step - warmup, total - warmup) / (total - warmup)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


# --- model FLOPs and the matmul ceiling on the model's own shapes -------------------------------

def model_matmuls(c, B, T):
    """The weight matmuls of one training step as (rows M, in, out): M rows through a weight
    [out, in], experts at their mean load (N K / E rows each), and the attention score/value
    FLOPs (causal: each token attends to T/2 positions on average), forward + backward."""
    N, C, V = B * T, c["hidden_size"], c["vocab_size"]
    L, D_mtp = c["num_hidden_layers"], c.get("num_nextn_predict_layers") or 0
    mm, attn = [], 0.0
    for layer in range(L + D_mtp):
        if c.get("kv_lora_rank"):
            H, R = c["num_attention_heads"], c["kv_lora_rank"]
            Dn, Dr, Dv = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
            q = c.get("q_lora_rank")
            mm += [(N, C, q), (N, q, H * (Dn + Dr))] if q else [(N, C, H * (Dn + Dr))]
            mm += [(N, C, R + Dr), (N, R, H * (Dn + Dv)), (N, H * Dv, C)]
            dqk, dv = Dn + Dr, Dv
        else:
            H, Hkv = c["num_attention_heads"], c["num_key_value_heads"]
            D = c.get("head_dim") or C // H
            mm += [(N, C, H * D), (N, C, Hkv * D), (N, C, Hkv * D), (N, H * D, C)]
            dqk, dv = D, D
        attn += 3 * N * H * T * (dqk + dv)  # fwd 2 H (T/2)(dqk + dv) per token; bwd twice that
        moe = (c.get("n_routed_experts") or 0) > 0 and layer >= c.get("first_k_dense_replace", 0) \
            and layer % c.get("moe_layer_freq", 1) == 0
        if moe:
            E, K, Ie, S = c["n_routed_experts"], c["num_experts_per_tok"], c["moe_intermediate_size"], \
                c.get("n_shared_experts") or 0
            M = max(1, round(N * K / E))
            mm += [(M, C, Ie), (M, C, Ie), (M, Ie, C)] * E + [(N, C, E)]
            if S:
                mm += [(N, C, Ie * S), (N, C, Ie * S), (N, Ie * S, C)]
        else:
            I = c["intermediate_size"]
            mm += [(N, C, I), (N, C, I), (N, I, C)]
        if layer >= L:  # an MTP module: eh_proj and its pass through the shared head
            mm += [(N, 2 * C, C), (N, C, V)]
    mm.append((N, C, V))  # the LM head
    return mm, attn


def step_flops(c, B, T):
    """Model FLOPs of one training step (forward + backward: 6 per weight and row) and per token."""
    mm, attn = model_matmuls(c, B, T)
    total = sum(6.0 * M * i * o for M, i, o in mm) + attn
    return total, total / (B * T)


def gemm_shapes(c, B, T):
    """{(m, n, k): FLOPs} of the step's GEMMs: each weight matmul runs forward [M,in]x[in,out],
    backward to the input [M,out]x[out,in] and to the weight [out,M]x[M,in]."""
    shapes = {}
    for M, i, o in model_matmuls(c, B, T)[0]:
        for sh in ((M, o, i), (M, i, o), (o, i, M)):
            shapes[sh] = shapes.get(sh, 0.0) + 2.0 * M * i * o
    return shapes


def matmul_ceiling(rhine_info, c, B, T, threads, bf16):
    """GFLOP/s the step's GEMMs reach alone (rhine-info --gemm on this LibTorch, the run's dtype and
    threads): total FLOPs over the sum of each shape's FLOPs / its measured rate."""
    shapes = gemm_shapes(c, B, T)
    cmd = [rhine_info, "--json", "--threads", str(threads), "--dtype", "bf16" if bf16 else "fp32"]
    for m, n, k in shapes:
        cmd += ["--gemm", f"{m}x{n}x{k}"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    if p.returncode != 0:
        sys.exit(f"[bench_train] rhine-info failed, got exit code {p.returncode}:\n{p.stderr[-2000:]}")
    info = json.loads(p.stdout.strip().splitlines()[-1])
    rate = {(g["m"], g["n"], g["k"]): g["gflops"] for g in info["gemm"]}
    total = sum(shapes.values())
    return total / 1e9 / sum(f / 1e9 / rate[sh] for sh, f in shapes.items()), info["torch"]


# --- the PyTorch side ---------------------------------------------------------------------------
# Dimension letters: B batch rows, T sequence, C hidden, H heads, Hkv key/value heads, D head dim,
# V vocabulary, E routed experts, K experts per token, R kv_lora_rank, Dn/Dr/Dv MLA head dims.

def build_models():
    """Defines the model classes (needs torch; imported in the worker only)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    def f32(x):  # fp32 for the numerically sensitive parts; float64 stays float64 (--self-check)
        return x if x.dtype == torch.float64 else x.float()

    class RMSNorm(nn.Module):  # HF: normalise in fp32, cast back, then scale
        def __init__(self, n, eps):
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.ones(n)), eps

        def forward(self, x):
            xf = f32(x)
            return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    class MLP(nn.Module):  # SwiGLU
        def __init__(self, C, inter):
            super().__init__()
            self.gate_proj = nn.Linear(C, inter, bias=False)
            self.up_proj = nn.Linear(C, inter, bias=False)
            self.down_proj = nn.Linear(inter, C, bias=False)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def attend(q, k, v, mask, scale):
        """Eager attention with fp32 softmax (HF eager); q [B, H, T, *], mask [B, 1, T, T] bool."""
        s = (q @ k.transpose(-1, -2)) * scale                               # [B, H, T, T]
        p = f32(s).masked_fill(~mask, float("-inf")).softmax(-1).to(q.dtype)
        return p @ v                                                        # [B, H, T, Dv]

    def rotate_half(x):
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), -1)

    class LlamaAttention(nn.Module):  # GQA, rotate_half RoPE
        def __init__(self, c):
            super().__init__()
            C, self.H, self.Hkv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
            self.D = c.get("head_dim") or C // self.H
            self.q_proj = nn.Linear(C, self.H * self.D, bias=False)
            self.k_proj = nn.Linear(C, self.Hkv * self.D, bias=False)
            self.v_proj = nn.Linear(C, self.Hkv * self.D, bias=False)
            self.o_proj = nn.Linear(self.H * self.D, C, bias=False)

        def forward(self, x, rope, mask):
            B, T, _ = x.shape
            cos, sin = rope                                                 # [B, 1, T, D] fp32
            q = self.q_proj(x).view(B, T, self.H, self.D).transpose(1, 2)   # [B, H, T, D]
            k = self.k_proj(x).view(B, T, self.Hkv, self.D).transpose(1, 2)  # [B, Hkv, T, D]
            v = self.v_proj(x).view(B, T, self.Hkv, self.D).transpose(1, 2)
            cos, sin = cos.to(q.dtype), sin.to(q.dtype)                    # HF casts the tables to x's dtype
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            rep = self.H // self.Hkv
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            a = attend(q, k, v, mask, self.D ** -0.5)
            return self.o_proj(a.transpose(1, 2).reshape(B, T, -1))

    def rope_interleaved(x, freqs):
        """x [B, H, T, Dr] or [B, T, Dr], pairs (2j, 2j+1) as complex numbers; freqs [B, T, Dr/2] complex."""
        xc = torch.view_as_complex(f32(x).reshape(*x.shape[:-1], -1, 2))
        f = freqs if x.dim() == 3 else freqs[:, None]
        return torch.view_as_real(xc * f).flatten(-2).to(x.dtype)

    class MLA(nn.Module):  # naive form, decoupled interleaved RoPE key (DeepSeek-V3)
        def __init__(self, c):
            super().__init__()
            C, H = c["hidden_size"], c["num_attention_heads"]
            self.H, self.R = H, c["kv_lora_rank"]
            self.Dn, self.Dr, self.Dv = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
            if c.get("q_lora_rank"):
                self.q_a_proj = nn.Linear(C, c["q_lora_rank"], bias=False)
                self.q_a_layernorm = RMSNorm(c["q_lora_rank"], 1e-6)
                self.q_b_proj = nn.Linear(c["q_lora_rank"], H * (self.Dn + self.Dr), bias=False)
            else:
                self.q_proj = nn.Linear(C, H * (self.Dn + self.Dr), bias=False)
            self.kv_a_proj_with_mqa = nn.Linear(C, self.R + self.Dr, bias=False)
            self.kv_a_layernorm = RMSNorm(self.R, 1e-6)
            self.kv_b_proj = nn.Linear(self.R, H * (self.Dn + self.Dv), bias=False)
            self.o_proj = nn.Linear(H * self.Dv, C, bias=False)

        def forward(self, x, freqs, mask):
            B, T, _ = x.shape
            H, Dn, Dr, Dv, R = self.H, self.Dn, self.Dr, self.Dv, self.R
            q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
            q = q.view(B, T, H, Dn + Dr).transpose(1, 2)                       # [B, H, T, Dn+Dr]
            q = torch.cat([q[..., :Dn], rope_interleaved(q[..., Dn:], freqs)], -1)
            kv = self.kv_a_proj_with_mqa(x)                                    # [B, T, R+Dr]
            k_pe = rope_interleaved(kv[..., R:], freqs)                        # [B, T, Dr]
            kv = self.kv_b_proj(self.kv_a_layernorm(kv[..., :R])).view(B, T, H, Dn + Dv).transpose(1, 2)
            k = torch.cat([kv[..., :Dn], k_pe[:, None].expand(B, H, T, Dr).to(kv.dtype)], -1)  # [B, H, T, Dn+Dr]
            o = attend(q.to(kv.dtype), k, kv[..., Dn:], mask, (Dn + Dr) ** -0.5)  # [B, H, T, Dv]
            return self.o_proj(o.transpose(1, 2).reshape(B, T, H * Dv))

    class Gate(nn.Module):  # sigmoid scores, noaux_tc group-limited top-k with the selection bias
        def __init__(self, c):
            super().__init__()
            self.c, E = c, c["n_routed_experts"]
            self.weight = nn.Parameter(torch.empty(E, c["hidden_size"]))
            self.register_buffer("e_score_correction_bias", torch.zeros(E))

        def forward(self, x):                                                  # x [N, C]
            c = self.c
            N, E, K, G = x.shape[0], c["n_routed_experts"], c["num_experts_per_tok"], c["n_group"]
            with torch.autocast("cpu", enabled=False):                         # router math in fp32
                logits = F.linear(f32(x), f32(self.weight))
            scores = logits.sigmoid() if c["scoring_func"] == "sigmoid" else logits.softmax(-1)  # [N, E]
            with torch.no_grad():
                sel = scores + self.e_score_correction_bias
                if G > 1:
                    g = sel.view(N, G, E // G)
                    gs = g.topk(2, -1).values.sum(-1)                          # [N, G] top-2 sum
                    keep = gs.topk(c["topk_group"], -1).indices
                    allowed = torch.zeros(N, G, dtype=torch.bool).scatter(1, keep, True)
                    sel = sel.masked_fill(~allowed.repeat_interleave(E // G, 1), float("-inf"))
                idx = sel.topk(K, -1).indices                                  # [N, K]
            w = scores.gather(1, idx)
            if c.get("norm_topk_prob"):
                w = w / (w.sum(-1, keepdim=True) + 1e-20)
            return idx, w * c["routed_scaling_factor"], scores

    class MoE(nn.Module):  # loop over experts (HF / DeepSeek model.py), shared expert, seq-aux loss
        def __init__(self, c):
            super().__init__()
            C, E = c["hidden_size"], c["n_routed_experts"]
            self.E, self.seq_aux_alpha = E, 0.0
            self.gate = Gate(c)
            self.experts = nn.ModuleList(MLP(C, c["moe_intermediate_size"]) for _ in range(E))
            if c.get("n_shared_experts"):
                self.shared_experts = MLP(C, c["moe_intermediate_size"] * c["n_shared_experts"])
            self.counts, self.aux = None, None

        def forward(self, x):                                                  # x [B, T, C]
            B, T, C = x.shape
            x2 = x.reshape(-1, C)                                              # [N, C]
            idx, w, scores = self.gate(x2)
            counts = torch.bincount(idx.flatten(), minlength=self.E)           # [E]
            self.counts = counts
            y = torch.zeros_like(x2)
            for i, n in enumerate(counts.tolist()):
                if n == 0:
                    continue
                rows, slot = torch.where(idx == i)
                y = y.index_add(0, rows, (self.experts[i](x2[rows]) * w[rows, slot, None]).to(y.dtype))
            if hasattr(self, "shared_experts"):
                y = y + self.shared_experts(x2)
            self.aux = None
            if self.seq_aux_alpha:  # DeepSeek-V3 sequence-wise balance loss, per row
                K = idx.shape[1]
                f = torch.zeros(B, self.E).scatter_add(1, idx.view(B, T * K), torch.ones(B, T * K))
                f = f * (self.E / (K * T))                                     # [B, E]
                p = (scores / scores.sum(-1, keepdim=True)).view(B, T, self.E).mean(1)  # [B, E]
                self.aux = self.seq_aux_alpha * (f * p).sum(-1).mean()
            return y.view(B, T, C)

        @torch.no_grad()
        def update_bias(self, rate):  # aux-loss-free balancing: b += rate * sign(mean load - load)
            c = self.counts.double()
            b = self.gate.e_score_correction_bias
            b.add_((rate * torch.sign(c.mean() - c)).to(b.dtype))

    def is_moe(c, layer):
        return (c.get("n_routed_experts") or 0) > 0 and layer >= c.get("first_k_dense_replace", 0) \
            and layer % c.get("moe_layer_freq", 1) == 0

    class Block(nn.Module):
        def __init__(self, c, layer):
            super().__init__()
            C, eps = c["hidden_size"], c["rms_norm_eps"]
            self.input_layernorm, self.post_attention_layernorm = RMSNorm(C, eps), RMSNorm(C, eps)
            self.self_attn = MLA(c) if c.get("kv_lora_rank") else LlamaAttention(c)
            self.mlp = MoE(c) if is_moe(c, layer) else MLP(C, c["intermediate_size"])

        def forward(self, x, rope, mask):
            h = x + self.self_attn(self.input_layernorm(x), rope, mask)
            return h + self.mlp(self.post_attention_layernorm(h))

    class SharedHead(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])

    class MTPLayer(Block):  # DeepSeek-V3 MTP module; embedding and head are the main model's
        def __init__(self, c, layer):
            super().__init__(c, layer)
            C, eps = c["hidden_size"], c["rms_norm_eps"]
            self.enorm, self.hnorm = RMSNorm(C, eps), RMSNorm(C, eps)
            self.eh_proj = nn.Linear(2 * C, C, bias=False)
            self.shared_head = SharedHead(c)

        def forward(self, h_prev, ids_ahead, emb, head, rope, mask):
            e = self.enorm(F.embedding(ids_ahead, emb))                        # [B, T, C]
            x = self.eh_proj(torch.cat([e, self.hnorm(h_prev).to(e.dtype)], -1))
            h = Block.forward(self, x, rope, mask)
            return h, F.linear(self.shared_head.norm(h), head)                 # [B, T, V]

    class Decoder(nn.Module):
        def __init__(self, c):
            super().__init__()
            N, D = c["num_hidden_layers"], c.get("num_nextn_predict_layers", 0) or 0
            self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
            self.layers = nn.ModuleList([Block(c, i) for i in range(N)] + [MTPLayer(c, N + k) for k in range(D)])
            self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
            self.n_main = N

    class CausalLM(nn.Module):
        def __init__(self, c, seq_aux_alpha, mtp_lambda):
            super().__init__()
            self.c, self.mtp_lambda, self.keep_logits = c, mtp_lambda, False
            self.model = Decoder(c)
            if not c.get("tie_word_embeddings", True):
                self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
            self.mla = bool(c.get("kv_lora_rank"))
            D = c["qk_rope_head_dim"] if self.mla else (c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])
            self.inv_freq = 1.0 / (c.get("rope_theta", 10000.0) ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
            self.moes = [m for m in self.modules() if isinstance(m, MoE)]
            for m in self.moes:
                m.seq_aux_alpha = seq_aux_alpha
            with torch.no_grad():  # HF init, as Rhine: N(0, initializer_range) for matrices, ones for norms
                for name, p in self.named_parameters():
                    if name.endswith(("_proj.weight", "embed_tokens.weight", "lm_head.weight", "gate.weight")):
                        p.normal_(0.0, c.get("initializer_range", 0.02))

        def head(self):
            return self.lm_head.weight if hasattr(self, "lm_head") else self.model.embed_tokens.weight

        def forward(self, ids, labels, pos):
            B, T = ids.shape
            ang = pos.double()[..., None] * self.inv_freq                      # [B, T, D/2]
            wdt = torch.float64 if self.model.embed_tokens.weight.dtype == torch.float64 else torch.float32
            if self.mla:
                rope = torch.polar(torch.ones_like(ang), ang)
                rope = rope if wdt == torch.float64 else rope.to(torch.complex64)
            else:
                emb = torch.cat((ang, ang), -1)
                rope = (emb.cos().to(wdt)[:, None], emb.sin().to(wdt)[:, None])  # [B, 1, T, D]
            doc = (pos == 0).long().cumsum(1)                                  # [B, T] document index
            mask = torch.ones(T, T, dtype=torch.bool).tril()[None] & (doc[:, :, None] == doc[:, None, :])
            mask = mask[:, None]                                               # [B, 1, T, T]
            m = self.model
            h = m.embed_tokens(ids)
            for layer in m.layers[:m.n_main]:
                h = layer(h, rope, mask)
            h = m.norm(h)
            logits = F.linear(h, self.head())                                  # [B, T, V]
            if self.keep_logits:
                self.last_logits = logits
            ce = F.cross_entropy(f32(logits).reshape(B * T, -1), labels.reshape(-1), ignore_index=-100)
            loss = ce
            mtp_layers = m.layers[m.n_main:]
            if len(mtp_layers) and self.mtp_lambda:
                total, hk = 0.0, h
                for k, layer in enumerate(mtp_layers, start=1):
                    hk, lk = layer(hk, ids.roll(-k, 1), m.embed_tokens.weight, self.head(), rope, mask)
                    tgt = torch.full_like(labels, -100)
                    tgt[:, :T - k] = labels[:, k:]                             # t_{i+k+1}
                    total = total + F.cross_entropy(f32(lk).reshape(B * T, -1), tgt.reshape(-1),
                                                    ignore_index=-100)
                loss = loss + total * (self.mtp_lambda / len(mtp_layers))
            for moe in self.moes:
                if moe.aux is not None:
                    loss = loss + moe.aux
            return loss, ce

    return CausalLM


class PackedLoader:
    """Rhine's packed mode in numpy: per language a shuffled stream of [bos] doc [eos], rows of
    T + 1 tokens drawn by language with probability proportional to tokens^(1/temperature)."""

    def __init__(self, shard_dir, B, T, bos, eos, temperature, seed):
        import numpy as np
        self.np, self.B, self.T = np, B, T
        self.rng = np.random.default_rng(seed)
        by_lang = {}
        for name in sorted(os.listdir(shard_dir)):
            if name.endswith(".tokens"):
                tokens, docs = read_shard(os.path.join(shard_dir, name))
                for first, n, lang in docs:
                    by_lang.setdefault(lang, []).append(tokens[first:first + n])
        if not by_lang:
            raise ValueError(f"[bench_train] no .tokens shards, got directory {shard_dir}; run scripts/demo.sh")
        self.streams, weights = [], []
        for lang in sorted(by_lang):
            docs = [np.concatenate([[bos]] * (bos >= 0) + [d] + [[eos]] * (eos >= 0)).astype(np.int64)
                    for d in by_lang[lang]]
            ids, dids = [], []
            for epoch in range(2):  # two shuffled epochs: more than a short benchmark reads
                for j, i in enumerate(self.rng.permutation(len(docs))):
                    ids.append(docs[i])
                    dids.append(np.full(len(docs[i]), epoch * len(docs) + j))
            self.streams.append([np.concatenate(ids), np.concatenate(dids), 0])
            weights.append(sum(len(d) for d in docs) ** (1.0 / temperature))
        self.p = np.array(weights) / sum(weights)

    def next(self):
        import torch
        np, B, T = self.np, self.B, self.T
        tok, doc = np.empty((B, T + 1), np.int64), np.empty((B, T + 1), np.int64)
        for r in range(B):
            s = self.streams[self.rng.choice(len(self.streams), p=self.p)]
            if s[2] + T + 1 > len(s[0]):
                s[2] = 0
            tok[r], doc[r] = s[0][s[2]:s[2] + T + 1], s[1][s[2]:s[2] + T + 1]
            s[2] += T
        ids, labels = torch.from_numpy(tok[:, :T].copy()), torch.from_numpy(tok[:, 1:].copy())
        d_in, d_next = doc[:, :T], doc[:, 1:]
        labels[torch.from_numpy(d_in != d_next)] = -100                       # never across documents
        starts = np.ones((B, T), bool)
        starts[:, 1:] = d_in[:, 1:] != d_in[:, :-1]
        idx = np.broadcast_to(np.arange(T), (B, T))
        pos = idx - np.maximum.accumulate(np.where(starts, idx, 0), axis=1)  # position within its document
        return ids, labels, torch.from_numpy(pos.copy())


def python_worker(a):
    """One PyTorch training run; prints one JSON object (per-step times, losses, state shapes)."""
    import torch
    torch.set_num_threads(a.threads)
    cfg = json.load(open(a.worker_config))
    c = dict(cfg["model"])
    vocab, bos, eos = sentencepiece_ids(os.path.join(a.demo_dir, "tok.model"))
    c.setdefault("vocab_size", vocab)
    torch.manual_seed(cfg.get("seed", 1))
    CausalLM = build_models()
    lm = CausalLM(c, cfg.get("moe_seq_aux_alpha", 0.0), cfg.get("mtp_lambda", MTP_LAMBDA))
    lm.train()
    params = [p for p in lm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], betas=(0.9, 0.95), eps=1e-8, weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: schedule(s, cfg["warmup"], cfg["steps"], cfg.get("min_lr_ratio", 0.1)))
    B, T = cfg["batch_size"], cfg["seq_len"]
    loader = PackedLoader(os.path.join(a.demo_dir, "shards", "train"), B, T, bos, eos,
                          cfg.get("mixture_temperature", 1.0), cfg.get("seed", 1))
    bf16, clip = cfg.get("bf16", True) not in (False, None), cfg.get("grad_clip", 1.0)
    # torch.compile the way a user would: the whole model (inductor on the CPU); the MoE's
    # per-expert loop breaks the graph at counts.tolist(), as it does for HF's and DeepSeek's code.
    model = torch.compile(lm) if a.compile else lm
    steps = []
    for step in range(cfg["steps"]):
        t0 = time.perf_counter()
        ids, labels, pos = loader.next()
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, ce = model(ids, labels, pos)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, clip) if clip > 0 else torch.tensor(0.0)
        opt.step()
        sched.step()
        for m in lm.moes:
            m.update_bias(cfg.get("router_bias_update_rate", ROUTER_BIAS_RATE))
        opt.zero_grad()
        rec = {"step": step + 1, "loss": loss.item(), "ce": ce.item(), "grad_norm": float(gnorm)}
        rec["tok_s"] = B * T / (time.perf_counter() - t0)
        steps.append(rec)
    print(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__, "compile": a.compile,
                      "n_params": sum(p.numel() for p in lm.parameters()),
                      "state": {k: list(v.shape) for k, v in lm.state_dict().items()},
                      "steps": steps}), flush=True)


def self_check():
    """The PyTorch models in float64 against the independent float64 references that generate Rhine's
    nn test fixtures (tests/fixtures/nn: HF Llama formulas with document masks; DeepSeek-V3 MLA,
    noaux_tc routing with a non-zero selection bias, shared expert, MTP), on tiny configs with the
    demo configs' structure. Checks logits, CE, the MTP loss and the expert counts of every MoE layer."""
    import torch
    sys.path.insert(0, os.path.join(ROOT, "tests", "fixtures", "nn"))
    import make_fixtures as ref_dense            # noqa: E402  (both set float64 as the default dtype)
    import make_deepseek_fixtures as ref_ds      # noqa: E402
    torch.set_default_dtype(torch.float64)
    CausalLM = build_models()
    gen = torch.Generator().manual_seed(7)

    def randomize(lm):  # weights far from the trained-from-scratch init, so that mistakes show
        with torch.no_grad():
            for name, t in list(lm.named_parameters()) + list(lm.named_buffers()):
                r = torch.randn(t.shape, generator=gen)
                if name.endswith("norm.weight"):
                    t.copy_(1.0 + 0.2 * r)
                elif name.endswith("e_score_correction_bias"):
                    t.copy_(0.3 * r)                 # large enough to change selections
                elif name.endswith("gate.weight"):
                    t.copy_(2.0 * r / math.sqrt(t.shape[-1]))
                elif "embed" in name:
                    t.copy_(0.5 * r)
                else:
                    t.copy_(r / math.sqrt(t.shape[-1]))

    def weights(lm, c):  # HF names, with the tied head and the MTP copies the references read
        W = {k: v.detach() for k, v in lm.state_dict().items()}
        W["lm_head.weight"] = W["model.embed_tokens.weight"]
        N = c["num_hidden_layers"]
        for k in range(c.get("num_nextn_predict_layers", 0) or 0):
            W[f"model.layers.{N + k}.embed_tokens.weight"] = W["model.embed_tokens.weight"]
            W[f"model.layers.{N + k}.shared_head.head.weight"] = W["lm_head.weight"]
        return W

    def rel(a, b):
        return float((a - b).detach().norm() / b.detach().norm())

    failures = []
    tiny = {"vocab_size": 48, "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4,
            "max_position_embeddings": 64, "hidden_act": "silu"}
    # Dense: two documents in row 0 (positions restart, labels -100 across the boundary).
    c = dict(json.load(open(os.path.join(ROOT, CONFIGS["dense"])))["model"], **tiny, num_hidden_layers=2)
    lm = CausalLM(c, 0.0, 0.0)
    randomize(lm)
    lm.keep_logits = True
    ids = torch.randint(0, 48, (2, 12), generator=gen)
    pos = torch.stack([torch.cat([torch.arange(5), torch.arange(7)]), torch.arange(12)])
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    labels[0, 4] = -100
    _, ce = lm(ids, labels, pos)
    ref_logits = ref_dense.forward(c, weights(lm, c), ids, pos, True)
    ref_ce, _ = ref_dense.lm_loss(ref_logits, labels, 0.0)
    e = [rel(lm.last_logits, ref_logits), abs(float(ce) - ref_ce)]
    print(f"# self-check dense: logits rel err {e[0]:.2e}, |ce - ref| {e[1]:.2e}", file=sys.stderr)
    failures += ["dense"] if max(e) > 1e-10 else []
    # MoE: DeepSeek-V3 structure of demo-moe (3 layers: one dense, two MoE, one MTP module with MoE).
    c = dict(json.load(open(os.path.join(ROOT, CONFIGS["moe"])))["model"], **tiny, num_hidden_layers=3,
             kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, moe_intermediate_size=12)
    lam = 0.3
    lm = CausalLM(c, 0.0, lam)
    randomize(lm)
    lm.keep_logits = True
    ids = torch.randint(0, 48, (2, 9), generator=gen)
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    labels[1, 3] = -100
    loss, ce = lm(ids, labels, torch.arange(9).expand(2, 9))
    ref_logits, ref_ce, ref_mtp, ref_counts = ref_ds.forward(c, weights(lm, c), ids, labels)
    counts = [m.counts.tolist() for m in lm.moes]
    e = [rel(lm.last_logits, ref_logits), abs(float(ce) - ref_ce),
         abs(float(loss - ce) - lam * sum(ref_mtp) / len(ref_mtp))]
    same_counts = counts == [x.tolist() for x in ref_counts]
    print(f"# self-check moe: logits rel err {e[0]:.2e}, |ce - ref| {e[1]:.2e}, |mtp loss - ref| {e[2]:.2e}, "
          f"expert counts {'equal' if same_counts else 'DIFFER'} {counts}", file=sys.stderr)
    failures += ["moe"] if max(e) > 1e-10 or not same_counts else []
    if failures:
        sys.exit(f"[bench_train] self-check failed, got mismatches in {failures}; the PyTorch model is not "
                 "the reference model")
    print("# self-check passed", file=sys.stderr)


# --- the driver ---------------------------------------------------------------------------------

def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rhine(a, rhine_train, cfg_path, out_dir, threads, procs=1):
    """One rhine-train run; procs > 1 starts that many data-parallel ranks (Gloo on 127.0.0.1) the way
    torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); rank 0 writes the metrics."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if procs > 1:
        env.update(WORLD_SIZE=str(procs), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    ranks = [subprocess.Popen([rhine_train, cfg_path], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)) if procs > 1
                              else env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(procs)]
    outs = [r.communicate() for r in ranks]
    p = subprocess.CompletedProcess(ranks[0].args, ranks[0].returncode, *outs[0])
    for r, (_, err) in zip(ranks, outs):
        if r.returncode != 0:
            sys.exit(f"[bench_train] rhine-train failed, got exit code {r.returncode}:\n{err[-3000:]}")
    steps = [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl"))]
    steps = [s for s in steps if s.get("type") == "step"]
    ckpts = sorted(os.listdir(os.path.join(out_dir, "checkpoints")))
    shapes = safetensors_shapes(os.path.join(out_dir, "checkpoints", ckpts[-1], "model.safetensors"))
    log_threads = [l for l in p.stderr.splitlines() if " thread" in l and "LibTorch" in l]
    return {"steps": steps, "state": shapes, "log": log_threads[0].split("] ", 2)[-1] if log_threads else "",
            "model_line": next((l.split("] ", 2)[-1] for l in p.stderr.splitlines() if "parameters" in l), "")}


def run_python(a, cfg_path, threads, python, compile_model):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [python, os.path.abspath(__file__), "--worker-config", cfg_path, "--demo-dir", a.demo_dir,
           "--threads", str(threads)] + (["--compile"] if compile_model else [])
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"[bench_train] the PyTorch run failed, got exit code {p.returncode}:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def rhine_tensors(rhine_state):
    """Rhine's checkpoint without the MTP aliases of the tied embedding / head (not parameters)."""
    return {k: v for k, v in rhine_state.items() if not (k.endswith(".shared_head.head.weight") or
            (k.endswith(".embed_tokens.weight") and k != "model.embed_tokens.weight"))}


def param_count(rhine_state):
    return sum(math.prod(v) for k, v in rhine_tensors(rhine_state).items()
               if not k.endswith("e_score_correction_bias"))


def torch_minor(version):
    """'2.15.0+cu132' -> '2.15'."""
    return ".".join(version.split("+")[0].split(".")[:2])


def check_same_model(rhine_state, py_state):
    """Rhine's checkpoint holds the parameters, the router bias buffers and the MTP aliases of the tied
    embedding / head; the PyTorch model the parameters and the router bias buffers."""
    r = rhine_tensors(rhine_state)
    missing, extra = sorted(set(r) - set(py_state)), sorted(set(py_state) - set(r))
    wrong = sorted(k for k in set(r) & set(py_state) if list(r[k]) != list(py_state[k]))
    if missing or extra or wrong:
        sys.exit(f"[bench_train] the PyTorch model differs from Rhine's, got missing {missing[:5]}, "
                 f"extra {extra[:5]}, shape mismatches {wrong[:5]}; fix build_models()")
    return param_count(rhine_state)


def stats(v):
    """Bench-format statistics of per-step tokens/s, plus the 90th percentile: on a shared machine the
    faster steps are the ones that ran without a neighbour's compile on the same cores."""
    s = sorted(v)
    return {"median": median(v), "min": s[0], "max": s[-1], "p90": s[min(len(s) - 1, int(0.9 * len(s)))],
            "runs": len(v)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rhine-train", default=os.path.join(ROOT, "build/examples/rhine-train"),
                    help="one or more rhine-train binaries, comma-separated (e.g. the Debian and the wheel "
                         "build); rhine-info next to each measures its matmul ceiling")
    ap.add_argument("--peers", default="eager,compile",
                    help="PyTorch sides, comma-separated: eager, compile (torch.compile, inductor), each "
                         "optionally @PYTHON (default: the Python running this script)")
    ap.add_argument("--demo-dir", default=os.path.join(ROOT, "build/demo"),
                    help="tok.model and shards/{train,heldout}, as scripts/demo.sh makes them")
    ap.add_argument("--configs", default="dense,moe", help="comma-separated: " + ", ".join(CONFIGS))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                    help="auto: bf16 autocast where the CPU has native bf16 (rhine-info), fp32 elsewhere")
    ap.add_argument("--steps", type=int, default=0, help="steps per run (default: the config's, at most 30)")
    ap.add_argument("--warmup-steps", type=int, default=-1,
                    help="first steps left out of the median (default: steps / 5, at least 2)")
    ap.add_argument("--rounds", type=int, default=1, help="runs of every side per setting (order rotates)")
    ap.add_argument("--dp", type=int, default=0, metavar="N",
                    help="also run rhine-train data parallel: N local ranks x 1 thread (Gloo), compared with "
                         "one process at 1 and N threads")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the matmul-ceiling measurement")
    ap.add_argument("--verbose", action="store_true", help="per-step tokens/s and losses on stderr")
    ap.add_argument("--keep", action="store_true", help="keep the run directories (printed on stderr)")
    ap.add_argument("--self-check", action="store_true",
                    help="only check the PyTorch models against tests/fixtures/nn's float64 references")
    ap.add_argument("--worker-config", help=argparse.SUPPRESS)
    ap.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.demo_dir = os.path.abspath(a.demo_dir)
    if a.self_check:
        return self_check()
    if a.worker_config:
        a.threads = int(a.threads)
        return python_worker(a)
    for f in ("tok.model", "shards/train", "shards/heldout"):
        if not os.path.exists(os.path.join(a.demo_dir, f)):
            sys.exit(f"[bench_train] missing demo data, got no {f} in {a.demo_dir}; run scripts/demo.sh first "
                     "(it trains the tokenizer and writes the shards) or pass --demo-dir")
    a.rhine = [os.path.abspath(r) for r in a.rhine_train.split(",")]
    for r in a.rhine:
        if not os.access(r, os.X_OK):
            sys.exit(f"[bench_train] rhine-train not found, got {r}; build it "
                     "(cmake --build build --target rhine-train) or pass --rhine-train PATH")
    a.peer_list = []
    for spec in a.peers.split(",") if a.peers else []:
        mode, _, python = spec.partition("@")
        if mode not in ("eager", "compile"):
            sys.exit(f"[bench_train] --peers takes eager or compile (optionally @PYTHON), got {spec}")
        a.peer_list.append((mode, python or sys.executable))
    for python in sorted({p for _, p in a.peer_list}):
        chk = subprocess.run([python, os.path.abspath(__file__), "--self-check"], capture_output=True, text=True)
        sys.stderr.write(chk.stderr)
        if chk.returncode != 0:
            sys.exit(1)
    for c in a.configs.split(","):
        if c not in CONFIGS:
            sys.exit(f"[bench_train] unknown config, got {c}; use one of {', '.join(CONFIGS)}")
    info = subprocess.run([os.path.join(os.path.dirname(a.rhine[0]), "rhine-info"), "--json"],
                          capture_output=True, text=True)
    native = info.returncode == 0 and json.loads(info.stdout.strip().splitlines()[-1]).get("native_bf16", False)
    a.bf16 = a.precision == "bf16" or (a.precision == "auto" and native)
    print(f"# precision: {'bf16 autocast' if a.bf16 else 'fp32'} (--precision {a.precision}; native bf16 on "
          f"this CPU: {'yes' if native else 'no'})", file=sys.stderr)
    tmp = tempfile.mkdtemp(prefix="rhine-bench-train-")
    try:
        measure(a, tmp)
    finally:
        if a.keep:
            print(f"# run directories in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)  # each run leaves a checkpoint (tens of MB)


def timed_median(run, warmup_steps):
    return median([s["tok_s"] for s in run["steps"] if s["step"] > warmup_steps])


def measure(a, tmp):
    order = 0
    for name in a.configs.split(","):
        base = json.load(open(os.path.join(ROOT, CONFIGS[name])))
        steps = a.steps or min(base["steps"], 30)
        warm = a.warmup_steps if a.warmup_steps >= 0 else max(2, steps // 5)
        if steps <= warm + 2:
            sys.exit(f"[bench_train] steps must exceed warm-up steps + 2, got {steps} and {warm}")
        vocab = sentencepiece_ids(os.path.join(a.demo_dir, "tok.model"))[0]
        model = dict(base["model"])
        model.setdefault("vocab_size", vocab)
        B, T = base["batch_size"], base["seq_len"]
        flops, flops_per_token = step_flops(model, B, T)
        single = {}  # threads -> median tokens/s of one rhine-train process
        for threads in [int(t) for t in a.threads.split(",")] + ([-a.dp] if a.dp > 1 else []):
            procs, threads = (-threads, 1) if threads < 0 else (1, threads)
            tag = f"{name}-t{threads}" + (f"-dp{procs}" if procs > 1 else "")
            cfg = dict(base)
            cfg.update(tokenizer=os.path.join(a.demo_dir, "tok.model"),
                       train_shards=os.path.join(a.demo_dir, "shards/train"),
                       heldout_shards=os.path.join(a.demo_dir, "shards/heldout"),
                       steps=steps, warmup=min(base.get("warmup", 0), steps // 3),
                       eval_every=0, checkpoint_every=0, log_every=1, eval_tokens=1000, sample_tokens=1,
                       threads=threads, bf16="always" if a.bf16 else False)
            if procs > 1:
                runs = []
                for rnd in range(a.rounds):
                    cfg["out_dir"] = os.path.join(tmp, f"run-{tag}-{rnd}")
                    cfg_path = os.path.join(tmp, f"{tag}-{rnd}.json")
                    with open(cfg_path, "w") as f:
                        json.dump(cfg, f, indent=1)
                    runs.append(run_rhine(a, a.rhine[0], cfg_path, cfg["out_dir"], 1, procs))
                timed = [s["tok_s"] for r in runs for s in r["steps"] if s["step"] > warm]
                s = stats(timed)
                print(json.dumps({"name": "train_e2e", "params": {
                    "config": os.path.basename(CONFIGS[name]), "impl": "rhine", "procs": procs, "threads": 1,
                    "B": B, "T": T, "bf16": a.bf16, "steps": steps, "timed_steps": f"{warm + 1}..{steps}",
                    "rounds": a.rounds, "ce_first": round(runs[0]["steps"][0]["ce"], 4),
                    "ce_last": round(runs[0]["steps"][-1]["ce"], 4), "runtime": runs[0]["log"]},
                    **s, "unit": "tokens/s"}), flush=True)
                print(json.dumps({"name": "train_e2e_dp_scaling", "params": {
                    "config": os.path.basename(CONFIGS[name]), "numerator": f"{procs} procs x 1 thread",
                    "vs_1proc_1thread": s["median"] / single[1] if 1 in single else None,
                    "vs_1proc_{}threads".format(procs): s["median"] / single[procs] if procs in single else None,
                    "load_avg": os.getloadavg()[0]},
                    "median": s["median"] / single[1] if 1 in single else None, "unit": "x (vs 1 process x 1 thread)",
                    "runs": a.rounds}), flush=True)
                continue
            # Every side once per round, the order rotating from round to round (and setting to
            # setting), so that a neighbour's load on the shared cores hits all sides alike.
            sides = [("rhine", r) for r in a.rhine] + [(mode, python) for mode, python in a.peer_list]
            res = {side: [] for side in sides}
            for rnd in range(a.rounds):
                k = order % len(sides)
                order += 1
                for side in sides[k:] + sides[:k]:
                    out_dir = os.path.join(tmp, f"run-{tag}-{rnd}-{len(res[side])}-{sides.index(side)}")
                    cfg["out_dir"] = out_dir
                    cfg_path = out_dir + ".json"
                    with open(cfg_path, "w") as f:
                        json.dump(cfg, f, indent=1)
                    res[side].append(run_rhine(a, side[1], cfg_path, out_dir, threads) if side[0] == "rhine"
                                     else run_python(a, cfg_path, threads, side[1], side[0] == "compile"))
            # Names: rhine@<LibTorch version>, pytorch_eager@<torch version>, pytorch_compile@...
            label, torch_of = {}, {}
            for side, runs in res.items():
                if side[0] == "rhine":
                    ver = runs[0]["log"].split("LibTorch ", 1)[-1].split(",")[0]
                    label[side] = f"rhine@{ver}"
                else:
                    ver = runs[0]["torch"]
                    label[side] = f"pytorch_{side[0]}@{ver}"
                torch_of[side] = torch_minor(ver)
            if a.verbose:
                for side, runs in res.items():
                    for r in runs:
                        print(f"# {tag} {label[side]}: tok/s " + " ".join(f"{s['tok_s']:.0f}" for s in r["steps"]) +
                              "; ce " + " ".join(f"{s['ce']:.3f}" for s in r["steps"]), file=sys.stderr)
            rhine0 = res[sides[0]][0]
            for side in sides[len(a.rhine):]:
                n_rhine = check_same_model(rhine0["state"], res[side][0]["state"])
                if n_rhine != res[side][0]["n_params"]:
                    sys.exit(f"[bench_train] parameter counts differ, got Rhine {n_rhine} and PyTorch "
                             f"{res[side][0]['n_params']}")
            n_params = param_count(rhine0["state"])
            # The matmul ceiling on the model's shapes, once per LibTorch (rhine-info of a build
            # whose LibTorch has the side's major.minor version).
            ceilings = {}
            if not a.no_ceiling:
                for r in a.rhine:
                    ceil, ver = matmul_ceiling(os.path.join(os.path.dirname(r), "rhine-info"), model, B, T, threads,
                                               a.bf16)
                    ceilings[torch_minor(ver)] = (ceil, os.path.dirname(r))
            med = {}
            for side, runs in res.items():
                timed = [s["tok_s"] for r in runs for s in r["steps"] if s["step"] > warm]
                first, last = runs[0]["steps"][0], runs[0]["steps"][-1]
                params = {"config": os.path.basename(CONFIGS[name]), "impl": label[side], "procs": 1,
                          "threads": threads, "B": B, "T": T, "bf16": a.bf16, "n_params": n_params,
                          "steps": steps, "timed_steps": f"{warm + 1}..{steps}", "rounds": a.rounds,
                          "ce_first": round(first["ce"], 4), "ce_last": round(last["ce"], 4),
                          "data": "demo shards, packed [bos] doc [eos]" + (" by rhine-train" if side[0] == "rhine"
                                                                          else " by this script (numpy)"),
                          "model_gflop_per_token": round(flops_per_token / 1e9, 4)}
                if side[0] == "rhine":
                    params["runtime"], params["model_log"] = runs[0]["log"], runs[0]["model_line"]
                else:
                    params["runtime"] = f"torch {runs[0]['torch']}, {runs[0]['threads']} threads" + \
                        (", torch.compile (inductor)" if side[0] == "compile" else ", eager")
                s = stats(timed)
                med[side] = s["median"]
                achieved = s["median"] * flops_per_token / 1e9
                params["achieved_gflops"] = round(achieved, 1)
                if torch_of[side] in ceilings:
                    ceil, where = ceilings[torch_of[side]]
                    params["ceiling_gflops"], params["ceiling_share"] = round(ceil, 1), round(achieved / ceil, 3)
                    params["ceiling_from"] = os.path.relpath(os.path.join(where, "rhine-info"), ROOT)
                if side[0] == "rhine" and side[1] == a.rhine[0]:
                    single[threads] = s["median"]
                print(json.dumps({"name": "train_e2e", "params": params, **s, "unit": "tokens/s"}), flush=True)
            for num in sides[:len(a.rhine)]:
                for den in sides[len(a.rhine):]:
                    pair = [timed_median(x, warm) / timed_median(y, warm) for x, y in zip(res[num], res[den])]
                    print(json.dumps({"name": "train_e2e_ratio", "params": {
                        "config": os.path.basename(CONFIGS[name]), "threads": threads, "numerator": label[num],
                        "denominator": label[den], "goal": 1.0 if den[0] == "compile" else 1.5,
                        "per_round": [round(x, 3) for x in pair],
                        "pooled_median_ratio": round(med[num] / med[den], 3), "load_avg": os.getloadavg()[0]},
                        "median": median(pair), "min": min(pair), "max": max(pair), "unit": "x",
                        "runs": a.rounds}), flush=True)


if __name__ == "__main__":
    main()
