"""Independent check of `rhine-convert extend-vocab` (tests/io/vocab_test.sh):

  check_vocab.py BASE_DIR BASE.model|BASE.tokenizer.json EXTENDED_DIR INIT

transformers loads EXTENDED_DIR; its config and the extended tokenizer agree (tokenizer.json read
by `tokenizers` encodes as sentencepiece reads tokenizer.model); the base rows of the embedding
and head are unchanged; under INIT=mean each new row is the mean of the base rows of the fewest
base pieces spelling the new token (computed here with the base tokenizer's vocabulary, read by sentencepiece or tokenizers), under
INIT=random the new rows have roughly the base rows' mean and spread; under INIT=focus each new
row is the weighted sum of base rows that vocab_init.json names, with weights >= 0 summing to 1
(sparsemax), and most new tokens have such a FOCUS recipe rather than the mean fallback. Under
mean, vocab_init.json names the pieces of the mean. Prints one JSON line.
"""
import json
import os
import sys

import numpy as np


def fail(msg):
    sys.exit("FAIL: " + msg)


def spell(pieces, text):  # fewest base pieces, ties to lower ids (the exporter's documented rule)
    n = len(text)
    best = [(0, [])] + [None] * n
    for i in range(n):
        if best[i] is None:
            continue
        for j in range(i + 1, min(n, i + 64) + 1):
            pid = pieces.get(text[i:j])
            if pid is None:
                continue
            cand = (best[i][0] + 1, best[i][1] + [pid])
            if best[j] is None or cand[0] < best[j][0] or (cand[0] == best[j][0] and pid < best[j][1][-1]):
                best[j] = cand
    if best[n] is None:
        fail(f"cannot spell {text!r} with the base pieces")
    return best[n][1]


class Vocab:
    """A tokenizer's pieces by id, from a SentencePiece .model (sentencepiece) or a
    tokenizer.json (tokenizers)."""

    def __init__(self, path):
        if path.endswith(".json"):
            from tokenizers import Tokenizer
            tok = Tokenizer.from_file(path)
            self.size = tok.get_vocab_size()
            inv = {i: t for t, i in tok.get_vocab().items()}
            self.piece = [inv[i] for i in range(self.size)]
            special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
            self.encode = lambda text: tok.encode(text, add_special_tokens=False).ids
        else:
            import sentencepiece as spm
            sp = spm.SentencePieceProcessor(model_file=path)
            self.size = sp.get_piece_size()
            self.piece = [sp.id_to_piece(i) for i in range(self.size)]
            special = {i for i in range(self.size) if sp.is_control(i) or sp.is_unknown(i)}
            self.encode = sp.encode
        self.normal = {p: i for i, p in enumerate(self.piece) if i not in special}


def main(base_dir, base_tok, ext_dir, init):
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    ext = AutoModelForCausalLM.from_pretrained(ext_dir, dtype=torch.float32)
    sb = Vocab(base_tok)
    spm_ext = os.path.exists(os.path.join(ext_dir, "tokenizer.model"))
    if base_tok.endswith(".json") and spm_ext:
        fail("a tokenizer.json extension left a tokenizer.model in the output")
    se = Vocab(os.path.join(ext_dir, "tokenizer.model" if spm_ext else "tokenizer.json"))
    nb, ne = sb.size, se.size
    V0, V1 = base.config.vocab_size, ext.config.vocab_size
    if V1 != max(V0, ne):
        fail(f"vocab_size {V1}, expected max({V0}, {ne})")
    if se.piece[:nb] != sb.piece:
        fail("the extended tokenizer changed base pieces")
    text = "Met de pijltoetsen kunt u objecten nauwkeuriger verplaatsen dan met de muis."
    hf = Tokenizer.from_file(os.path.join(ext_dir, "tokenizer.json")).encode(text, add_special_tokens=False).ids
    if hf != se.encode(text):
        fail(f"tokenizer.json encodes {hf}, the extended tokenizer {se.encode(text)}")
    if len(se.encode(text)) >= len(sb.encode(text)):
        fail("the extended tokenizer does not shorten Dutch text")
    pieces = sb.normal
    recipes = json.load(open(os.path.join(ext_dir, "vocab_init.json")))
    if recipes["init"] != init or [t["id"] for t in recipes["tokens"]] != list(range(nb, ne)):
        fail(f"vocab_init.json: init {recipes['init']}, ids not {nb}..{ne - 1}")
    if any(t["token"] != se.piece[t["id"]] for t in recipes["tokens"]):
        fail("vocab_init.json names other tokens than the tokenizer")
    focus_made = 0
    for t in recipes["tokens"]:
        ids = [i for i, _ in t["from"]]
        ws = np.array([w for _, w in t["from"]], dtype=np.float64)
        spelled = spell(pieces, t["token"])
        if init == "random":
            if ids:
                fail("random rows with a recipe")
            continue
        if not ids or min(ids) < 0 or max(ids) >= nb or (ws < 0).any() or abs(ws.sum() - 1) > 1e-5:
            fail(f"recipe of {t['token']!r} is not a distribution over base ids: {t['from']}")
        if init == "mean" and ids != spelled:
            fail(f"mean recipe of {t['token']!r} is {ids}, the fewest pieces are {spelled}")
        focus_made += sorted(ids) != sorted(spelled) or not np.allclose(ws, 1 / len(ids))
    if init == "focus" and focus_made < 0.5 * (ne - nb):
        fail(f"only {focus_made} of {ne - nb} new tokens have a FOCUS recipe (the rest fell back to the mean)")
    checked = 0
    tied = base.config.tie_word_embeddings
    if ext.config.tie_word_embeddings != tied or (tied and ext.lm_head.weight.data_ptr() != ext.model.embed_tokens.weight.data_ptr()):
        fail("the resized model does not keep the base's (un)tied head")
    for name in ("model.embed_tokens.weight",) + (() if tied else ("lm_head.weight",)):
        w0 = base.get_parameter(name).detach().numpy()
        w1 = ext.get_parameter(name).detach().numpy()
        if w1.shape != (V1, w0.shape[1]):
            fail(f"{name}: shape {w1.shape}")
        if not np.array_equal(w1[:nb], w0[:nb]):
            fail(f"{name}: base rows changed")
        new = w1[nb:ne]
        if init == "mean":
            want = np.stack([w0[spell(pieces, se.piece[i])].mean(0) for i in range(nb, ne)])
            err = np.abs(new - want).max()
            if err > 1e-6:
                fail(f"{name}: new rows differ from the mean of their pieces' rows by {err}")
        elif init == "focus":
            want = np.stack([sum(w * w0[i].astype(np.float64) for i, w in t["from"]) for t in recipes["tokens"]])
            err = np.abs(new - want).max()
            if err > 1e-5:
                fail(f"{name}: new rows differ from their FOCUS recipes by {err}")
        else:
            m, s = w0[:nb].mean(), w0[:nb].std()
            if abs(new.mean() - m) > 0.2 * s or not 0.8 * s < new.std() < 1.2 * s:
                fail(f"{name}: random rows mean {new.mean()} std {new.std()}, base {m} {s}")
        checked += ne - nb
    with torch.no_grad():
        ids = torch.tensor([se.encode(text)])
        if not torch.isfinite(ext(ids).logits).all():
            fail("non-finite logits")
    print(json.dumps({"init": init, "tied": tied, "base_vocab": V0, "vocab": V1, "new_tokens": ne - nb, "rows_checked": checked,
                      "focus_recipes": focus_made}))


if __name__ == "__main__":
    main(*sys.argv[1:])
