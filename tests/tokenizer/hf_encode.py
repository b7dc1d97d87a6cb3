"""Reference encoder for the tokenizer.json parity test (tests/tokenizer/test_hf_parity.cpp):
the Hugging Face `tokenizers` library (Rust, the implementation transformers uses).

    python hf_encode.py TOKENIZER_JSON LINES_JSONL > ids.jsonl
    python hf_encode.py --version

LINES_JSONL holds one JSON string per line (so \\r, \\t and lone newlines survive). Output:
per input line one JSON object of Tokenizer.from_file(TOKENIZER_JSON)'s results:
  "ids"      encode(text, add_special_tokens=False).ids
  "special"  encode(text, add_special_tokens=True).ids (the post-processor's BOS/EOS/...)
  "decoded"  decode(ids, skip_special_tokens=False)
Added tokens in the text are matched, as the library always does. --version prints the
library's version (and fails without it).
"""
import json
import sys

from tokenizers import Tokenizer, __version__


def main(argv):
    if argv[1:] == ["--version"]:
        print(__version__)
        return 0
    if len(argv) != 3:
        print("usage: hf_encode.py TOKENIZER_JSON LINES_JSONL", file=sys.stderr)
        return 2
    tokenizer = Tokenizer.from_file(argv[1])
    out = []
    with open(argv[2], encoding="utf-8", newline="\n") as f:
        for line in f:
            if line.strip():
                text = json.loads(line)
                ids = tokenizer.encode(text, add_special_tokens=False).ids
                out.append(json.dumps({
                    "ids": ids,
                    "special": tokenizer.encode(text, add_special_tokens=True).ids,
                    "decoded": tokenizer.decode(ids, skip_special_tokens=False),
                }))
    sys.stdout.write("\n".join(out) + ("\n" if out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
