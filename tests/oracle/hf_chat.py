"""transformers' apply_chat_template as the oracle of Rhine's SFT rendering
(tests/oracle/test_chat.cpp).

    python hf_chat.py TOKENIZER_JSON CONVERSATIONS.jsonl > OUT.jsonl

Loads TOKENIZER_JSON as a PreTrainedTokenizerFast with ChatML as its chat template (the
template Rhine ships as "chatml"; the assistant turn wrapped in {% generation %} so that
transformers reports the assistant tokens), and for each line of CONVERSATIONS.jsonl (Rhine's
SFT format: "messages", or "prompt" + "response") prints
{"ids": apply_chat_template(..., tokenize=True), "mask": its assistant_masks}.
"""
import json
import sys

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
          "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>\\n' }}"
          "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}")


def main(argv):
    if argv[1:] == ["--version"]:
        import transformers
        print(f"transformers {transformers.__version__}")
        return 0
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_file=argv[1])
    tok.chat_template = CHATML
    with open(argv[2], encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            j = json.loads(line)
            messages = j.get("messages") or [{"role": "user", "content": j["prompt"]},
                                              {"role": "assistant", "content": j["response"]}]
            out = tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=True)
            print(json.dumps({"ids": list(out["input_ids"]), "mask": list(out["assistant_masks"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
