#!/usr/bin/python3
"""Python PyTorch eager peer of bench/bench_moe.cpp: the same MLA + MoE model
(DeepSeek-V3 style: naive MLA with interleaved RoPE, sigmoid noaux_tc routing
with the selection bias, one shared expert) trained with torch.optim.AdamW.
The MoE follows DeepSeek's inference/model.py: a loop over experts with
torch.where (what HF and the reference code do). Prints JSON Lines
"train_step_moe_python" (tokens/s), same sizes as the C++ side.

    /usr/bin/python3 bench/bench_moe.py [--quick] [--threads N]
"""
import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

V, C, L, H, I = 8000, 256, 4, 4, 688
R, DN, DR, DV = 64, 32, 16, 32
E, K, IM, NS, FIRST_DENSE = 16, 2, 128, 1, 1


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class MLP(nn.Module):
    def __init__(self, inter):
        super().__init__()
        self.gate_proj = nn.Linear(C, inter, bias=False)
        self.up_proj = nn.Linear(C, inter, bias=False)
        self.down_proj = nn.Linear(inter, C, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope(x, freqs):  # interleaved pairs, x [B, H, T, DR] or [B, T, DR]
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    f = freqs if x.dim() == 3 else freqs[None]
    return torch.view_as_real(xc * f).flatten(-2).to(x.dtype)


class MLA(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(C, H * (DN + DR), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(C, R + DR, bias=False)
        self.kv_a_layernorm = RMSNorm(R, 1e-6)
        self.kv_b_proj = nn.Linear(R, H * (DN + DV), bias=False)
        self.o_proj = nn.Linear(H * DV, C, bias=False)

    def forward(self, x, freqs):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, H, DN + DR).transpose(1, 2)
        q = torch.cat([q[..., :DN], rope(q[..., DN:], freqs)], -1)
        kv = self.kv_a_proj_with_mqa(x)
        k_pe = rope(kv[..., R:], freqs)
        kv = self.kv_b_proj(self.kv_a_layernorm(kv[..., :R])).view(B, T, H, DN + DV).transpose(1, 2)
        k = torch.cat([kv[..., :DN], k_pe[:, None].expand(B, H, T, DR)], -1)
        s = (q @ k.transpose(-1, -2)).float() / math.sqrt(DN + DR)
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        o = s.softmax(-1).to(q.dtype) @ kv[..., DN:]
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * DV))


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, C) * 0.02)
        self.register_buffer("e_score_correction_bias", torch.zeros(E))

    def forward(self, x):
        with torch.autocast("cpu", enabled=False):
            scores = F.linear(x.float(), self.weight.float()).sigmoid()
        idx = (scores + self.e_score_correction_bias).topk(K, -1).indices
        w = scores.gather(1, idx)
        return idx, w / (w.sum(-1, keepdim=True) + 1e-20) * 2.5


class MoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gate()
        self.experts = nn.ModuleList(MLP(IM) for _ in range(E))
        self.shared_experts = MLP(IM * NS)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, C)
        idx, w = self.gate(x)
        y = torch.zeros_like(x)
        counts = torch.bincount(idx.flatten(), minlength=E).tolist()
        for i in range(E):
            if counts[i] == 0:
                continue
            rows, top = torch.where(idx == i)
            y = y.index_add(0, rows, (self.experts[i](x[rows]) * w[rows, top, None]).to(y.dtype))
        return (y + self.shared_experts(x)).view(shape)


class Block(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(C), RMSNorm(C)
        self.self_attn = MLA()
        self.mlp = MoE() if layer >= FIRST_DENSE else MLP(I)

    def forward(self, x, freqs):
        h = x + self.self_attn(self.input_layernorm(x), freqs)
        return h + self.mlp(self.post_attention_layernorm(h))


class LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(V, C)
        self.layers = nn.ModuleList(Block(i) for i in range(L))
        self.norm = RMSNorm(C)
        self.lm_head = nn.Linear(C, V, bias=False)
        inv = 1.0 / (10000 ** (torch.arange(0, DR, 2).double() / DR))
        self.inv = inv

    def forward(self, ids, labels):
        T = ids.shape[1]
        freqs = torch.polar(torch.ones(T, DR // 2), (torch.arange(T).double()[:, None] * self.inv).float())
        h = self.embed_tokens(ids)
        for b in self.layers:
            h = b(h, freqs)
        logits = self.lm_head(self.norm(h))
        return F.cross_entropy(logits.float().reshape(-1, V), labels.reshape(-1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    B, T = 4, (64 if a.quick else 256)
    runs = 2 if a.quick else 5
    for bf16 in (False, True):
        lm = LM()
        lm.train()
        opt = torch.optim.AdamW(lm.parameters(), lr=1e-4, weight_decay=0.1)
        ids = torch.randint(0, V, (B, T))
        labels = ids.roll(-1, 1)

        def step():
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = lm(ids, labels)
            loss.backward()
            opt.step()

        step()
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        times.sort()
        n = B * T
        print(json.dumps({"name": "train_step_moe_python",
                          "params": {"model": "mla_moe", "n_params": sum(p.numel() for p in lm.parameters()),
                                     "B": B, "T": T, "dtype": "bf16" if bf16 else "fp32",
                                     "threads": a.threads, "impl": "pytorch_eager",
                                     "torch": torch.__version__},
                          "median": n / times[len(times) // 2], "min": n / times[-1],
                          "max": n / times[0], "unit": "tokens/s", "runs": runs}), flush=True)


if __name__ == "__main__":
    main()
