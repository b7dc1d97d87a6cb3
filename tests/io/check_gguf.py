"""Independent checks of `rhine-convert to-gguf` (tests/io/gguf_test.sh).

  check_gguf.py make-model TOKENIZER DIR
      a small random Llama (transformers) with that vocabulary (a SentencePiece .model or a
      byte-level BPE tokenizer.json), saved as an HF directory
  check_gguf.py check DIR FILE.gguf TYPE
      reads FILE.gguf with the `gguf` package (llama.cpp's own Python reader) and compares every
      key and tensor with what is expected from DIR, computed here with numpy, safetensors,
      sentencepiece and gguf.quants (llama.cpp's reference encodings): bytes must be equal
  check_gguf.py llama-cpp FILE.gguf TOKENIZER PROMPT N IDS_OUT
      runs llama.cpp (llama-cpp-python): checks that its tokenizer gives the reference's ids
      (with BOS) for PROMPT, writes them to IDS_OUT, prints the greedy continuation (N tokens)
      and saves the logits of every prompt position as FILE.gguf.logits.npy
  check_gguf.py compare-logits A.npy B.npy|RHINE.safetensors BOUND
      max relative error (max |a - b| / max |b|) of two logit arrays, failing above BOUND
Prints one line of JSON per command; exits non-zero with a message on a mismatch.
"""
import json
import os
import shutil
import sys

import numpy as np


def fail(msg):
    sys.exit("FAIL: " + msg)


def load_vocab(path):
    """(size, bos, eos, encode(text) with special tokens) of a .model or tokenizer.json, by the references."""
    if path.endswith(".json"):
        from tokenizers import Tokenizer
        t = Tokenizer.from_file(path)
        j = json.load(open(path))
        special = [a for a in j.get("added_tokens", []) if a.get("special")]
        ids = {a["content"]: a["id"] for a in special}
        single = j["post_processor"]["single"]  # the fixture's template: <|begin|> $A
        bos = ids[single[0]["SpecialToken"]["id"]]
        eos = next(a["id"] for a in special if a["id"] != bos)
        return t.get_vocab_size(with_added_tokens=True), bos, eos, lambda text: t.encode(text).ids
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=path)
    return sp.get_piece_size(), sp.bos_id(), sp.eos_id(), lambda text: [sp.bos_id()] + sp.encode(text)


def make_model(tok_path, out, tie="untied"):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    n, bos, eos, _ = load_vocab(tok_path)
    cfg = LlamaConfig(vocab_size=n + 12,  # padded: the exporter adds [PADn] tokens
                      hidden_size=64, intermediate_size=80,  # 80: ffn_down rows fall back to f16 under q8_0
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                      initializer_range=0.1, bos_token_id=bos, eos_token_id=eos, tie_word_embeddings=tie == "tied")
    torch.manual_seed(3)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # norms away from 1, so that a wrong norm mapping shows
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                p.normal_(0.0, 0.5)  # spread-out logits: greedy choices far from ties
    model.save_pretrained(out, safe_serialization=True)
    tc = {"chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}
    if tok_path.endswith(".json"):
        shutil.copy(tok_path, os.path.join(out, "tokenizer.json"))  # add_bos from the post-processor template
    else:
        shutil.copy(tok_path, os.path.join(out, "tokenizer.model"))
        tc.update(add_bos_token=True, add_eos_token=False)
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(tc, f)
    print(json.dumps({"made": out, "vocab_size": cfg.vocab_size, "tokens": n}))


def tokenizer_expectation(model_dir, cfg, tc):
    V = cfg["vocab_size"]
    pad = lambda n: [f"[PAD{i}]" for i in range(n, V)]
    if os.path.exists(os.path.join(model_dir, "tokenizer.model")):
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=os.path.join(model_dir, "tokenizer.model"))
        n = sp.get_piece_size()

        def ptype(i):
            for test, t in ((sp.is_unknown, 2), (sp.is_control, 3), (sp.is_byte, 6), (sp.is_unused, 5)):
                if test(i):
                    return t
            return 1
        e = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
             "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)] + pad(n),
             "tokenizer.ggml.scores": [np.float32(sp.get_score(i)) for i in range(n)] + [np.float32(-1000.0)] * (V - n),
             "tokenizer.ggml.token_type": [ptype(i) for i in range(n)] + [5] * (V - n),
             "tokenizer.ggml.unknown_token_id": sp.unk_id(), "tokenizer.ggml.add_space_prefix": True,
             "tokenizer.ggml.add_bos_token": tc["add_bos_token"], "tokenizer.ggml.add_eos_token": tc["add_eos_token"]}
        if sp.pad_id() >= 0:
            e["tokenizer.ggml.padding_token_id"] = sp.pad_id()
        return e
    from tokenizers import Tokenizer
    path = os.path.join(model_dir, "tokenizer.json")
    t, j = Tokenizer.from_file(path), json.load(open(path))
    vocab = {i: tok for tok, i in t.get_vocab(with_added_tokens=True).items()}
    n = len(vocab)
    added = {a["id"]: (3 if a.get("special") else 4) for a in j.get("added_tokens", [])}
    merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"]["merges"]]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
            "tokenizer.ggml.tokens": [vocab[i] for i in range(n)] + pad(n),
            "tokenizer.ggml.token_type": [added.get(i, 1) for i in range(n)] + [5] * (V - n),
            "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False}


def permute(w, n_head):  # HF rotate-half rows -> llama.cpp's pairwise order (convert_hf_to_gguf)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check(model_dir, path, type_name):
    import gguf
    from safetensors.numpy import load_file
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    tc = json.load(open(os.path.join(model_dir, "tokenizer_config.json")))
    Q = gguf.GGMLQuantizationType
    qtype = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[type_name]
    ftype = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}[type_name]
    H, Hkv, C, V = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"], cfg["vocab_size"]
    expect = {
        "general.architecture": "llama", "general.file_type": ftype, "general.quantization_version": 2,
        "llama.vocab_size": V, "llama.context_length": cfg["max_position_embeddings"],
        "llama.embedding_length": C, "llama.block_count": cfg["num_hidden_layers"],
        "llama.feed_forward_length": cfg["intermediate_size"], "llama.attention.head_count": H,
        "llama.attention.head_count_kv": Hkv,
        "llama.rope.freq_base": np.float32(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]),
        "llama.rope.dimension_count": C // H,
        "llama.attention.layer_norm_rms_epsilon": np.float32(cfg["rms_norm_eps"]),
        "tokenizer.ggml.bos_token_id": cfg["bos_token_id"], "tokenizer.ggml.eos_token_id": cfg["eos_token_id"],
        "tokenizer.chat_template": tc["chat_template"],
        **tokenizer_expectation(model_dir, cfg, tc),
    }
    r = gguf.GGUFReader(path)
    got = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    got.pop("general.name", None)
    problems = []
    for k in sorted(set(expect) | set(got)):
        if k not in got or k not in expect:
            problems.append(f"key {k}: {'missing' if k not in got else 'unexpected'}")
        elif got[k] != expect[k]:
            problems.append(f"key {k}: got {str(got[k])[:80]} expected {str(expect[k])[:80]}")

    # Tensors: HF name -> (ggml name, transform), bytes as gguf.quants encodes them.
    st = {}
    for f in sorted(os.listdir(model_dir)):
        if f.endswith(".safetensors"):
            st.update(load_file(os.path.join(model_dir, f)))
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for i in range(cfg["num_hidden_layers"]):
        for a, b in per_layer.items():
            names[f"model.layers.{i}.{a}.weight"] = f"blk.{i}.{b}.weight"
    tensors = {t.name: t for t in r.tensors}
    for hf, g in names.items():
        if g not in tensors:
            problems.append(f"tensor {g} missing")
            continue
        w = st[hf].astype(np.float32)
        if g.endswith("attn_q.weight"):
            w = permute(w, H)
        if g.endswith("attn_k.weight"):
            w = permute(w, Hkv)
        t = qtype if w.ndim == 2 else Q.F32
        if t == Q.Q8_0 and w.shape[-1] % 32:
            t = Q.F16  # convert_hf_to_gguf's fallback for rows q8_0 cannot hold
        want = gguf.quants.quantize(w, t)
        rt = tensors.pop(g)
        if rt.tensor_type != t:
            problems.append(f"tensor {g}: type {rt.tensor_type.name}, expected {t.name}")
        elif list(rt.shape) != list(reversed(w.shape)):
            problems.append(f"tensor {g}: ne {list(rt.shape)}, expected {list(reversed(w.shape))}")
        elif rt.data.tobytes() != want.tobytes():
            problems.append(f"tensor {g}: bytes differ from gguf.quants.quantize ({t.name})")
    problems += [f"tensor {g}: unexpected" for g in tensors]
    if problems:
        fail(f"{path}: " + "; ".join(problems[:10]))
    print(json.dumps({"file": os.path.basename(path), "keys": len(got), "tensors": len(r.tensors),
                      "type": type_name, "problems": 0}))


def llama_cpp(path, tok_path, prompt, n_new, ids_out):
    from llama_cpp import Llama
    ids = load_vocab(tok_path)[3](prompt)
    with open(ids_out, "w") as f:
        f.write(" ".join(map(str, ids)) + "\n")
    # f32 KV cache (llama.cpp defaults to f16), so that an f32 model runs in f32 throughout
    llm = Llama(model_path=path, n_ctx=256, n_threads=2, logits_all=True, verbose=False, seed=1, type_k=0, type_v=0)
    # llama.cpp's own tokenizer on the vocabulary the file carries
    theirs = llm.tokenize(prompt.encode("utf-8"), add_bos=True)
    if theirs != ids:
        fail(f"llama.cpp tokenizes the prompt as {theirs}, the reference library as {ids}")
    llm.eval(ids)
    logits = np.array([llm.scores[i] for i in range(len(ids))], dtype=np.float32)
    np.save(path + ".logits.npy", logits)
    out = []
    for _ in range(n_new):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    print(json.dumps({"prompt_ids": ids, "continuation": out, "vocab": llm.n_vocab()}))


def compare_logits(a_path, b_path, bound):
    a = np.load(a_path)
    if b_path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        b = load_file(b_path)["logits.0"]
    else:
        b = np.load(b_path)
    if a.shape != b.shape:
        fail(f"logits shapes differ: {a.shape} vs {b.shape}")
    err = float(np.abs(a - b).max() / np.abs(b).max())
    if not err < float(bound):
        fail(f"logits differ: max rel err {err:.3g} (bound {bound})")
    print(json.dumps({"max_rel_err": err, "bound": float(bound)}))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"make-model": make_model, "check": check, "llama-cpp": lambda p, t, pr, n, o: llama_cpp(p, t, pr, int(n), o),
     "compare-logits": compare_logits}[cmd](*args)
