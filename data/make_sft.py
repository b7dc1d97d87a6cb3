#!/usr/bin/python3
"""Instruction data for rhine-finetune from the parallel sample: translation
requests from English into German, French and Dutch, one JSONL line each:

  {"messages": [{"role": "user", "content": "Übersetze ins Deutsche: <en>"},
                {"role": "assistant", "content": "<de>"}], "lang": "de"}

The sample's documents are the same LibreOffice help pages in every language
(data/README.md); a document's lines are paired only when both languages have
the same number of lines, so pairs stay aligned. Lines shorter than 20 or
longer than 300 characters are skipped.

  data/make_sft.py OUT_DIR        writes OUT_DIR/train.jsonl and OUT_DIR/heldout.jsonl
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ASK = {"de": "Übersetze ins Deutsche: ", "fr": "Traduis en français : ", "nl": "Vertaal naar het Nederlands: "}


def documents(path):
    with open(path, encoding="utf-8") as f:
        return [d.strip().split("\n") for d in f.read().split("\n\n") if d.strip()]


def pairs(split_dir):
    en = documents(os.path.join(split_dir, "en.txt"))
    for lang, ask in ASK.items():
        other = documents(os.path.join(split_dir, lang + ".txt"))
        assert len(other) == len(en), (lang, len(other), len(en))
        for a, b in zip(en, other):
            if len(a) != len(b):
                continue
            for src, tgt in zip(a, b):
                if 20 <= len(src) <= 300 and 20 <= len(tgt) <= 300:
                    yield {"messages": [{"role": "user", "content": ask + src},
                                        {"role": "assistant", "content": tgt}], "lang": lang}


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    for name, split in (("train", os.path.join(HERE, "sample")), ("heldout", os.path.join(HERE, "sample", "heldout"))):
        n = 0
        with open(os.path.join(out, name + ".jsonl"), "w", encoding="utf-8") as f:
            for record in pairs(split):
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                n += 1
        print(f"{out}/{name}.jsonl: {n} translation pairs")


if __name__ == "__main__":
    main()
