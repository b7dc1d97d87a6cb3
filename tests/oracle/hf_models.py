"""Hugging Face transformers as the oracle of Rhine's models (tests/oracle/test_hf_models.cpp).

    python hf_models.py make VARIANT DIR      # a small random model built by transformers itself
    python hf_models.py logits VARIANT MODEL_DIR IN.safetensors OUT.safetensors
    python hf_models.py --version

`make` builds the variant's config with transformers' own config class, initialises a
random model with transformers (weights made larger than the default 0.02 and the norm
gains and router biases randomised, so that every term shows in the logits), saves it with
`save_pretrained` (safetensors, float32) into DIR/model and writes DIR/reference.safetensors:

    input_ids [2, T] int64      two random rows
    logits    [2, T, V] f32     the float32 model's logits (eager attention)
    loss      [1] f32           its loss with labels=input_ids (transformers shifts them)
    logits64  [2, T, V] f64     the same model run in float64 (transformers' RMSNorm and
                                router still compute in float32, so this is float32-exact only)
    prompt    [1, P] int64      a prompt, and
    generated [1, 32] int64     the 32 tokens of greedy `generate` (KV cache, float64, no EOS)

`logits` loads MODEL_DIR (a directory Rhine exported) with AutoModelForCausalLM and writes
the float32 logits of IN.safetensors' `input_ids` to OUT.safetensors (`logits`).

Variants: llama (GQA, llama3 RoPE scaling), mistral (sliding window shorter than the rows,
tied embeddings, head_dim != hidden/heads), apertus (xIELU, QK-norm), deepseek_v2 (softmax
routing, group-limited greedy, top-2, norm_topk_prob false, routed_scaling_factor != 1),
deepseek_v2_top1 (greedy, top-1), deepseek_v2_norm (top-2 with norm_topk_prob true; see
below), deepseek_v3 (sigmoid routing with correction bias, noaux_tc groups, YaRN with mscale,
MLA with q_lora_rank).

deepseek_v2_norm: DeepSeek's own modeling_deepseek.py (the code V2's checkpoints were trained
with) renormalises the top-k weights when top_k > 1 and norm_topk_prob, and multiplies by
routed_scaling_factor only when it does not renormalise. transformers' port (5.x) always
multiplies and never renormalises. For this variant the reference therefore replaces the
router's weighting by DeepSeek's rule (`deepseek_v2_gate_weights`, below); everything else
is transformers' code. For norm_topk_prob false both agree and transformers runs unchanged.
"""
import math
import sys

import torch


def config_for(variant):
    import transformers as tf

    common = dict(vocab_size=192, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  max_position_embeddings=256, initializer_range=0.1, rms_norm_eps=1e-6,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    if variant == "llama":
        return tf.LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2,
                              rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 32})
    if variant == "mistral":
        c = dict(common, tie_word_embeddings=True)
        return tf.MistralConfig(**c, num_attention_heads=4, num_key_value_heads=1, head_dim=24,
                                sliding_window=8, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if variant == "apertus":
        return tf.ApertusConfig(**common, num_attention_heads=4, num_key_value_heads=2,
                                rope_parameters={"rope_type": "llama3", "rope_theta": 12000000.0, "factor": 8.0,
                                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 32})
    mla = dict(num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=16,
               qk_rope_head_dim=8, v_head_dim=16, moe_intermediate_size=32, n_shared_experts=1,
               first_k_dense_replace=1, n_routed_experts=8)
    if variant.startswith("deepseek_v2"):
        v2 = dict(q_lora_rank=None, num_experts_per_tok=2, topk_method="group_limited_greedy", n_group=4,
                  topk_group=2, norm_topk_prob=False, routed_scaling_factor=1.5)
        if variant == "deepseek_v2_top1":
            v2.update(num_experts_per_tok=1, topk_method="greedy", n_group=1, topk_group=1)
        elif variant == "deepseek_v2_norm":
            v2.update(norm_topk_prob=True)
        elif variant != "deepseek_v2":
            raise SystemExit(f"unknown variant {variant}")
        return tf.DeepseekV2Config(**common, **mla, **v2)
    if variant == "deepseek_v3":
        # max_position_embeddings = factor * original, as YaRN expects.
        return tf.DeepseekV3Config(**dict(common, max_position_embeddings=64), **mla, q_lora_rank=32, num_experts_per_tok=2, n_group=4, topk_group=2,
                                   norm_topk_prob=True, routed_scaling_factor=2.5, num_nextn_predict_layers=0,
                                   rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                    "original_max_position_embeddings": 16, "beta_fast": 32.0,
                                                    "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0})
    raise SystemExit(f"unknown variant {variant}")


def deepseek_v2_gate_weights(router, hidden_states):
    """DeepSeek-V2's MoEGate.forward (modeling_deepseek.py of deepseek-ai/DeepSeek-V2), as the
    router of transformers' DeepseekV2 port returns it: (router_logits, weights, indices)."""
    h = hidden_states.view(-1, router.hidden_dim)
    logits = torch.nn.functional.linear(h.type(torch.float32), router.weight.type(torch.float32))
    scores = logits.softmax(dim=-1, dtype=torch.float32)
    if router.topk_method == "group_limited_greedy":
        n, g = h.shape[0], router.num_group
        group_scores = scores.view(n, g, -1).max(dim=-1).values
        group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(n, g, router.num_experts // g).reshape(n, -1)
        scores = scores.masked_fill(~score_mask.bool(), 0.0)
    weights, indices = torch.topk(scores, k=router.top_k, dim=-1, sorted=False)
    if router.top_k > 1 and router.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        weights = weights * router.routed_scaling_factor
    return logits, weights, indices


def patch_variant(model, variant):
    """deepseek_v2_norm: DeepSeek's gate rule in place of the port's (see the file comment)."""
    if variant != "deepseek_v2_norm":
        return
    import types
    for module in model.modules():
        if type(module).__name__ == "DeepseekV2TopkRouter":
            module.norm_topk_prob = model.config.norm_topk_prob
            module.forward = types.MethodType(deepseek_v2_gate_weights, module)


# The per-expert loop (transformers' reference path; its grouped-GEMM path has no float64).
EAGER_EXPERTS = {"experts_implementation": "eager"}


def load(variant, model_dir, dtype):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager",
                                                 **EAGER_EXPERTS)
    patch_variant(model, variant)
    return model.eval()


@torch.no_grad()
def randomise(model):
    """Norm gains, router correction biases and xIELU's alphas away from their constant inits."""
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            p.copy_(1 + 0.2 * torch.randn_like(p))
        elif name.endswith("e_score_correction_bias"):
            p.copy_(0.05 * torch.randn_like(p))
        elif name.endswith("alpha_p") or name.endswith("alpha_n"):
            p.add_(0.1 * torch.randn_like(p))


def make(variant, out):
    import os
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1234)
    config = config_for(variant)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    randomise(model)
    model.save_pretrained(os.path.join(out, "model"))

    T = 24
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, config.vocab_size, (2, T), generator=g)
    ref = {"input_ids": ids}
    m32 = load(variant, os.path.join(out, "model"), torch.float32)
    with torch.no_grad():
        o = m32(input_ids=ids, labels=ids)
    ref["logits"] = o.logits.float().contiguous()
    ref["loss"] = o.loss.float().reshape(1)
    m64 = load(variant, os.path.join(out, "model"), torch.float64)
    with torch.no_grad():
        ref["logits64"] = m64(input_ids=ids).logits.double().contiguous()
        prompt = ids[:1, :5]
        m64.generation_config.eos_token_id = None
        gen = m64.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
    ref["prompt"] = prompt.clone()
    ref["generated"] = gen[:, prompt.shape[1]:].contiguous()
    assert ref["generated"].shape[1] == 32
    save_file(ref, os.path.join(out, "reference.safetensors"))


def logits(variant, model_dir, inp, out):
    from safetensors.torch import load_file, save_file
    ids = load_file(inp)["input_ids"]
    model = load(variant, model_dir, torch.float32)
    with torch.no_grad():
        save_file({"logits": model(input_ids=ids).logits.float().contiguous()}, out)


def main(argv):
    if argv[1:] == ["--version"]:
        import transformers
        print(f"transformers {transformers.__version__}, torch {torch.__version__}")
        return 0
    if len(argv) == 4 and argv[1] == "make":
        make(argv[2], argv[3])
        return 0
    if len(argv) == 6 and argv[1] == "logits":
        logits(argv[2], argv[3], argv[4], argv[5])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
