"""peft as the oracle of Rhine's LoRA adapters (tests/oracle/test_peft.cpp).

    python peft_adapters.py make VARIANT DIR
    python peft_adapters.py logits VARIANT BASE_DIR ADAPTER_DIR IN.safetensors OUT.safetensors

`make` builds VARIANT's random model with transformers (hf_models.py) and saves it to
DIR/base, then trains a LoRA adapter on it with peft itself (r 4, lora_alpha 12, dropout 0,
TARGETS[VARIANT], 3 AdamW steps so that B is no longer zero) and writes
    DIR/peft_adapter            the adapter (PeftModel.save_pretrained)
    DIR/merged                  merge_and_unload() of it, save_pretrained (safetensors)
    DIR/reference.safetensors   input_ids [2, T] and the adapted model's float32 logits

`logits` loads BASE_DIR with transformers, the adapter with PeftModel.from_pretrained and
writes the float32 logits of IN.safetensors' `input_ids` to OUT.safetensors (`logits`).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_models  # noqa: E402

TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "deepseek_v3": ["q_b_proj", "kv_b_proj", "o_proj"],
}


def make(variant, out):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(4321)
    model = AutoModelForCausalLM.from_config(hf_models.config_for(variant), attn_implementation="eager")
    hf_models.randomise(model)
    model.save_pretrained(os.path.join(out, "base"))

    base = hf_models.load(variant, os.path.join(out, "base"), torch.float32)
    lora = LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0, target_modules=TARGETS[variant],
                      task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, lora)
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, base.config.vocab_size, (2, 24), generator=g)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(3):
        opt.zero_grad()
        peft_model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    peft_model.eval()
    peft_model.save_pretrained(os.path.join(out, "peft_adapter"))
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits.float().contiguous()
    save_file({"input_ids": ids, "logits": logits}, os.path.join(out, "reference.safetensors"))
    peft_model.merge_and_unload().save_pretrained(os.path.join(out, "merged"))


def logits(variant, base_dir, adapter_dir, inp, out):
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    ids = load_file(inp)["input_ids"]
    model = PeftModel.from_pretrained(hf_models.load(variant, base_dir, torch.float32), adapter_dir).eval()
    with torch.no_grad():
        save_file({"logits": model(input_ids=ids).logits.float().contiguous()}, out)


def main(argv):
    if argv[1:] == ["--version"]:
        import peft
        import transformers
        print(f"peft {peft.__version__}, transformers {transformers.__version__}")
        return 0
    if len(argv) == 4 and argv[1] == "make":
        make(argv[2], argv[3])
        return 0
    if len(argv) == 7 and argv[1] == "logits":
        logits(*argv[2:])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
