#!/usr/bin/python3
"""The Python twin of bench_model.cpp: the same dense Llama-style models in
plain PyTorch eager (HF formulas: RMSNorm in fp32, rotate_half RoPE, GQA by
repeat_interleave, math attention with fp32 softmax, SwiGLU), the same training
step (forward + backward + torch.optim.AdamW), fp32 and bf16 autocast, 1 and 2
threads. Prints JSON Lines in Rhine's bench format. Run with /usr/bin/python3
(Debian's python3-torch: the same kernels as libtorch-dev).
"""
import json
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

SIZES = {"10M": dict(V=8000, C=256, L=8, H=4, Hkv=2, I=688),
         "50M": dict(V=16000, C=512, L=12, H=8, Hkv=4, I=1376)}


class RMSNorm(nn.Module):
    def __init__(self, n, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), -1)


class Block(nn.Module):
    def __init__(self, C, H, Hkv, I):
        super().__init__()
        self.H, self.Hkv, self.D = H, Hkv, C // H
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(C), RMSNorm(C)
        self.q_proj = nn.Linear(C, H * self.D, bias=False)
        self.k_proj = nn.Linear(C, Hkv * self.D, bias=False)
        self.v_proj = nn.Linear(C, Hkv * self.D, bias=False)
        self.o_proj = nn.Linear(H * self.D, C, bias=False)
        self.gate_proj = nn.Linear(C, I, bias=False)
        self.up_proj = nn.Linear(C, I, bias=False)
        self.down_proj = nn.Linear(I, C, bias=False)

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(B, T, self.H, self.D).transpose(1, 2)
        k = self.k_proj(h).view(B, T, self.Hkv, self.D).transpose(1, 2)
        v = self.v_proj(h).view(B, T, self.Hkv, self.D).transpose(1, 2)
        q = q * cos.to(q.dtype) + rotate_half(q) * sin.to(q.dtype)
        k = k * cos.to(k.dtype) + rotate_half(k) * sin.to(k.dtype)
        rep = self.H // self.Hkv
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(self.D))
        p = s.float().masked_fill(~mask, float("-inf")).softmax(-1).to(q.dtype)
        a = (p @ v).transpose(1, 2).reshape(B, T, -1)
        x = x + self.o_proj(a)
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class LM(nn.Module):
    def __init__(self, V, C, L, H, Hkv, I):
        super().__init__()
        self.embed_tokens = nn.Embedding(V, C)
        self.layers = nn.ModuleList([Block(C, H, Hkv, I) for _ in range(L)])
        self.norm = RMSNorm(C)
        self.lm_head = nn.Linear(C, V, bias=False)
        D = C // H
        self.inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, ids, labels):
        B, T = ids.shape
        ang = torch.arange(T, dtype=torch.float64)[:, None] * self.inv_freq
        emb = torch.cat((ang, ang), -1)
        cos, sin = emb.cos().float()[None, None], emb.sin().float()[None, None]
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        logits = self.lm_head(self.norm(x))
        return F.cross_entropy(logits.float().view(B * T, -1), labels.view(-1), ignore_index=-100)


def main():
    quick = "--quick" in sys.argv

    def arg(name):
        return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else None

    only_size, only_dtype, only_threads = arg("--size"), arg("--dtype"), arg("--threads")
    B, T = 4, (64 if quick else 256)
    runs = int(arg("--runs")) if arg("--runs") else (2 if quick else 5)
    for size, d in SIZES.items():
        if only_size and size != only_size:
            continue
        for threads in (1, 2):
            if only_threads and threads != int(only_threads):
                continue
            torch.set_num_threads(threads)
            for bf16 in (False, True):
                if only_dtype and only_dtype != ("bf16" if bf16 else "fp32"):
                    continue
                torch.manual_seed(0)
                lm = LM(**d)
                lm.train()
                opt = torch.optim.AdamW(lm.parameters(), lr=1e-4, weight_decay=0.1)
                ids = torch.randint(d["V"], (B, T))
                labels = ids.roll(-1, 1)

                def step():
                    opt.zero_grad()
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        loss = lm(ids, labels)
                    loss.backward()
                    opt.step()

                step()  # warm-up
                ts = []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    step()
                    ts.append(time.perf_counter() - t0)
                ts.sort()
                n = sum(p.numel() for p in lm.parameters())
                tf, tb, to = [], [], []
                for _ in range(runs):  # where the time goes
                    t0 = time.perf_counter()
                    opt.zero_grad()
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        loss = lm(ids, labels)
                    t1 = time.perf_counter()
                    loss.backward()
                    t2 = time.perf_counter()
                    opt.step()
                    t3 = time.perf_counter()
                    tf.append(t1 - t0), tb.append(t2 - t1), to.append(t3 - t2)
                med = lambda v: sorted(v)[len(v) // 2] * 1e3
                print(json.dumps({"name": "train_step_python",
                                  "params": {"size": size, "n_params": n, "B": B, "T": T,
                                             "dtype": "bf16" if bf16 else "fp32",
                                             "threads": threads, "impl": "pytorch_eager",
                                             "torch": torch.__version__},
                                  "median": B * T / ts[len(ts) // 2], "min": B * T / ts[-1],
                                  "max": B * T / ts[0], "unit": "tokens/s", "runs": runs}),
                      flush=True)
                print(json.dumps({"name": "train_step_phases_python",
                                  "params": {"size": size, "B": B, "T": T,
                                             "dtype": "bf16" if bf16 else "fp32",
                                             "threads": threads, "impl": "pytorch_eager"},
                                  "forward_ms": med(tf), "backward_ms": med(tb),
                                  "optimizer_ms": med(to), "unit": "ms"}), flush=True)


if __name__ == "__main__":
    main()
