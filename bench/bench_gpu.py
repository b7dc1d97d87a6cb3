#!/usr/bin/env python3
"""The Python side of bench_gpu.cpp: the same dense Llama-style models (HF formulas, as
torchtitan writes them: fp32 RMSNorm, rotate_half RoPE, SDPA causal attention with GQA,
SwiGLU, untied head) at the same sizes, one training step (forward + backward +
torch.optim.AdamW, foreach) in bf16 autocast on cuda:0, in PyTorch eager and with
torch.compile. Prints JSON Lines "gpu_train_step_python" (tokens/s, median over steps
timed after a synchronize).

    python3 bench/bench_gpu.py [--size 125M|0.9B] [--steps N]
"""
import json
import time

import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_model  # noqa: E402  (the CPU benchmark's model pieces, unchanged)
from bench_model import RMSNorm, rotate_half  # noqa: E402

# Keep in step with kSizes in bench_gpu.cpp.
SIZES = {"125M": dict(V=32000, C=768, L=12, H=12, Hkv=4, I=2048, B=8, T=1024),
         "0.9B": dict(V=32000, C=2048, L=16, H=16, Hkv=8, I=5632, B=4, T=2048)}


def rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin


class Block(bench_model.Block):
    """bench_model.py's block (same parameters and names), with SDPA attention."""

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(B, T, self.H, self.D).transpose(1, 2)
        k = self.k_proj(h).view(B, T, self.Hkv, self.D).transpose(1, 2)
        v = self.v_proj(h).view(B, T, self.Hkv, self.D).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.H != self.Hkv)
        x = x + self.o_proj(a.transpose(1, 2).reshape(B, T, -1))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class LM(nn.Module):
    def __init__(self, V, C, L, H, Hkv, I):
        super().__init__()
        self.embed_tokens = nn.Embedding(V, C)
        self.layers = nn.ModuleList([Block(C, H, Hkv, I) for _ in range(L)])
        self.norm, self.lm_head = RMSNorm(C), nn.Linear(C, V, bias=False)
        D = C // H
        self.register_buffer("inv_freq", 1.0 / (10000.0 ** (torch.arange(0, D, 2).double() / D)),
                             persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, ids, labels):
        B, T = ids.shape
        ang = torch.arange(T, dtype=torch.float64, device=ids.device)[:, None] * self.inv_freq
        emb = torch.cat((ang, ang), -1)
        cos, sin = emb.cos().float()[None, None], emb.sin().float()[None, None]
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.lm_head(self.norm(x))
        return F.cross_entropy(logits.float().view(B * T, -1), labels.view(-1))


def main():
    def arg(name, default=None):
        return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default

    steps, only = int(arg("--steps", 10)), arg("--size")
    if not torch.cuda.is_available():
        print("[bench_gpu.py] no CUDA device", file=sys.stderr)
        sys.exit(77)
    dev = torch.device("cuda", 0)
    for size, d in SIZES.items():
        if only and size != only:
            continue
        for impl in ("eager", "compile"):
            torch.manual_seed(0)
            lm = LM(d["V"], d["C"], d["L"], d["H"], d["Hkv"], d["I"]).to(dev)
            lm.train()
            opt = torch.optim.AdamW(lm.parameters(), lr=1e-4, weight_decay=0.1, foreach=True)
            fwd = torch.compile(lm) if impl == "compile" else lm
            ids = torch.randint(d["V"], (d["B"], d["T"]), device=dev)
            labels = ids.roll(-1, 1)

            def step():
                opt.zero_grad()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = fwd(ids, labels)
                loss.backward()
                opt.step()
                torch.cuda.synchronize()

            for _ in range(3):  # warm-up (and compilation)
                step()
            ts = []
            for _ in range(steps):
                t0 = time.perf_counter()
                step()
                ts.append(time.perf_counter() - t0)
            ts.sort()
            tok = d["B"] * d["T"]
            print(json.dumps({"name": "gpu_train_step_python",
                              "params": {"size": size, "n_params": sum(p.numel() for p in lm.parameters()), "B": d["B"], "T": d["T"], "dtype": "bf16",
                                         "impl": impl, "torch": torch.__version__},
                              "median": tok / ts[len(ts) // 2], "min": tok / ts[-1],
                              "max": tok / ts[0], "unit": "tokens/s", "runs": steps}), flush=True)
            del lm, opt, fwd
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
