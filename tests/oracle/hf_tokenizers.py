"""Hugging Face `tokenizers` and `sentencepiece` as oracles of Rhine's tokenizers
(tests/oracle/tokenizer_test.sh).

    python hf_tokenizers.py train FAMILY OUT.json TEXT...   # train with `tokenizers` itself
    python hf_tokenizers.py encode json|spm FILE [--add-special] < lines > ids
    python hf_tokenizers.py decode json|spm FILE < ids > lines
    python hf_tokenizers.py compare-spm bpe|unigram MODEL TEXT RHINE_IDS [--add-special]
    python hf_tokenizers.py --version

Lines are split on "\\n" only (as rhine-tokenizer reads them); ids are written space-separated,
one line per input line. `json` runs tokenizers.Tokenizer.from_file, `spm` runs
sentencepiece.SentencePieceProcessor (--add-special: its BOS in front, as Rhine's
add_special does for a .model). Decode keeps special tokens.

compare-spm checks Rhine's ids of a .model (one line per line of TEXT) against sentencepiece:
every line must be equal, except that for a Unigram model a line may differ where both
segmentations decode to the same text and have the same total score (to 1e-5 relative):
PyPI's sentencepiece 0.2.x and Debian's libsentencepiece 0.1.97 (whose choice Rhine follows)
break such exact float ties differently. It prints the count and fails on anything else.

Families (vocabulary 2,000 on the given text; each the way such models' tokenizer.json files
are built):
  byte_level_bpe    Llama 3 / Qwen style: the llama3 split regex, ByteLevel bytes-to-unicode,
                    BPE; BOS added by a TemplateProcessing post-processor
  bpe_byte_fallback Llama 2 / Mistral style: "\\u2581" for spaces (Prepend + Replace
                    normalizer), BPE with byte_fallback and the 256 <0xXX> tokens, BOS
  unigram           T5 / Gemma-1 style: NFKC, Metaspace pre-tokenizer, Unigram, EOS appended
  wordpiece         BERT style: BertNormalizer (lower case, accents stripped), BertPreTokenizer,
                    WordPiece with "##", [CLS] ... [SEP]
  chatml_bpe        byte-level BPE with <|im_start|> and <|im_end|> (for hf_chat.py)
"""
import json
import sys

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def iterator(paths):
    for p in paths:
        with open(p, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                if line:
                    yield line


def train(family, out, paths):
    from tokenizers import (Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                            trainers)
    vocab = 2000
    def byte_level_bpe(specials):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(iterator(paths), trainers.BpeTrainer(
            vocab_size=vocab, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        return tok

    if family == "byte_level_bpe":
        tok = byte_level_bpe(["<|begin_of_text|>", "<|end_of_text|>"])
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    elif family == "chatml_bpe":
        # byte-level BPE with ChatML's turn tokens (Qwen / EuroLLM style), for the chat oracle
        tok = byte_level_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    elif family == "bpe_byte_fallback":
        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        specials = ["<unk>", "<s>", "</s>"]
        tok.train_from_iterator(iterator(paths), trainers.BpeTrainer(vocab_size=vocab - 256, special_tokens=specials))
        # SentencePiece-converted files hold the 256 byte tokens after the specials: rebuild the
        # vocabulary with them (merges name tokens by text, so they stay valid).
        data = json.loads(tok.to_str())
        old = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
        pieces = specials + [f"<0x{b:02X}>" for b in range(256)] + [t for t, _ in old if t not in specials]
        data["model"]["vocab"] = {t: i for i, t in enumerate(pieces)}
        for a in data["added_tokens"]:
            a["id"] = data["model"]["vocab"][a["content"]]
        tok = Tokenizer.from_str(json.dumps(data))
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    elif family == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
        tok.train_from_iterator(iterator(paths), trainers.UnigramTrainer(
            vocab_size=vocab, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    elif family == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok.train_from_iterator(iterator(paths), trainers.WordPieceTrainer(vocab_size=vocab, special_tokens=specials))
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    else:
        raise SystemExit(f"unknown family {family}")
    tok.save(out)


def load(kind, path):
    if kind == "json":
        from tokenizers import Tokenizer
        return Tokenizer.from_file(path)
    if kind == "spm":
        import sentencepiece
        return sentencepiece.SentencePieceProcessor(model_file=path)
    raise SystemExit(f"unknown kind {kind}")


def lines():
    data = sys.stdin.buffer.read().decode("utf-8")
    parts = data.split("\n")
    if parts and parts[-1] == "":
        parts.pop()
    return parts


def encode(kind, path, add_special):
    tok = load(kind, path)
    out = []
    for line in lines():
        if kind == "json":
            ids = tok.encode(line, add_special_tokens=add_special).ids
        else:
            ids = tok.encode(line, add_bos=add_special)
        out.append(" ".join(map(str, ids)))
    sys.stdout.buffer.write(("\n".join(out) + ("\n" if out else "")).encode("utf-8"))


def decode(kind, path):
    tok = load(kind, path)
    out = []
    for line in lines():
        ids = [int(x) for x in line.split()]
        out.append(tok.decode(ids, skip_special_tokens=False) if kind == "json" else tok.decode(ids))
    sys.stdout.buffer.write(("\n".join(out) + ("\n" if out else "")).encode("utf-8"))


def compare_spm(model_type, model, text_file, ids_file, add_special):
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(model_file=model)
    with open(text_file, "rb") as f:
        texts = f.read().decode("utf-8").split("\n")[:-1]
    with open(ids_file) as f:
        rhine = [[int(x) for x in line.split()] for line in f.read().split("\n")[:-1]]
    assert len(texts) == len(rhine), (len(texts), len(rhine))
    unigram = model_type == "unigram"
    ties = 0
    for i, (text, got) in enumerate(zip(texts, rhine)):
        want = sp.encode(text, add_bos=add_special)
        if got == want:
            continue
        score = lambda ids: sum(float(sp.GetScore(t)) for t in ids)  # noqa: E731
        a, b = score(got), score(want)
        if unigram and sp.decode(got) == sp.decode(want) and abs(a - b) <= 1e-5 * max(1.0, abs(b)):
            ties += 1
            continue
        print(f"line {i + 1}: rhine {got}\n  sentencepiece {want}\n  scores {a} vs {b}", file=sys.stderr)
        return 1
    print(f"{len(texts)} lines equal to sentencepiece {sentencepiece.__version__}"
          + (f" except {ties} segmented differently with equal score" if ties else ""))
    return 0


def main(argv):
    if argv[1:] == ["--version"]:
        import sentencepiece
        import tokenizers
        print(f"tokenizers {tokenizers.__version__}, sentencepiece {sentencepiece.__version__}")
        return 0
    if len(argv) >= 5 and argv[1] == "train":
        train(argv[2], argv[3], argv[4:])
        return 0
    if len(argv) in (4, 5) and argv[1] == "encode":
        encode(argv[2], argv[3], argv[4:] == ["--add-special"])
        return 0
    if len(argv) == 4 and argv[1] == "decode":
        decode(argv[2], argv[3])
        return 0
    if len(argv) in (6, 7) and argv[1] == "compare-spm":
        return compare_spm(argv[2], argv[3], argv[4], argv[5], argv[6:] == ["--add-special"])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
