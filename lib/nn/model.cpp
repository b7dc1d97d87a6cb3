// The Llama-family causal LM. Dimension letters as in rhine/nn/model.h.
#include "rhine/nn/model.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include "rhine/core/error.h"
#include "rhine/torch/compat.h"

namespace rhine::nn {

// --- blocks -----------------------------------------------------------------

DecoderLayerImpl::DecoderLayerImpl(const ModelConfig& c) {
  // Apertus names its two norms differently; the math is the same.
  const bool apertus = c.model_type == "apertus";
  norm1 = register_module(apertus ? "attention_layernorm" : "input_layernorm",
                          RMSNorm(c.hidden_size, c.rms_norm_eps));
  self_attn = register_module("self_attn", Attention(c));
  norm2 = register_module(apertus ? "feedforward_layernorm" : "post_attention_layernorm",
                          RMSNorm(c.hidden_size, c.rms_norm_eps));
  mlp = register_module("mlp", MLP(c));
}

at::Tensor DecoderLayerImpl::forward(const at::Tensor& x, const AttentionInputs& in,
                                     LayerKV* cache) {
  at::Tensor h = x + self_attn(norm1(x), in, cache);  // [B, T, C]
  return h + mlp(norm2(h));
}

namespace {

// Activation checkpointing: forward runs the block without keeping its
// activations (custom Functions run forward in no-grad mode); backward runs it
// again with grad enabled and back-propagates through the recomputation, as
// torch.utils.checkpoint (reentrant) does. LibTorch C++ has no checkpoint API.
struct BlockCheckpoint : public torch::autograd::Function<BlockCheckpoint> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            DecoderLayerImpl* layer, const AttentionInputs* in) {
    ctx->save_for_backward({x});
    ctx->saved_data["layer"] = reinterpret_cast<std::int64_t>(layer);
    ctx->saved_data["cos"] = in->cos;
    ctx->saved_data["sin"] = in->sin;
    ctx->saved_data["mask"] = in->attention.mask ? *in->attention.mask : at::Tensor();
    ctx->saved_data["has_mask"] = in->attention.mask.has_value();
    ctx->saved_data["is_causal"] = in->attention.is_causal;
    ctx->saved_data["autocast_cpu"] = rhine::autocast_enabled(at::kCPU);
    ctx->saved_data["autocast_cuda"] = rhine::autocast_enabled(at::kCUDA);
    return layer->forward(x, *in, nullptr);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    at::Tensor x = ctx->get_saved_variables()[0];
    auto* layer = reinterpret_cast<DecoderLayerImpl*>(ctx->saved_data["layer"].toInt());
    AttentionInputs in;
    in.cos = ctx->saved_data["cos"].toTensor();
    in.sin = ctx->saved_data["sin"].toTensor();
    if (ctx->saved_data["has_mask"].toBool())
      in.attention.mask = ctx->saved_data["mask"].toTensor();
    in.attention.is_causal = ctx->saved_data["is_causal"].toBool();
    at::Tensor xd = x.detach().requires_grad_(true);
    at::Tensor y;
    {
      // Recompute under the same autocast state as the forward pass.
      at::AutoGradMode grad(true);
      AutocastGuard cpu(at::kCPU, at::kBFloat16, ctx->saved_data["autocast_cpu"].toBool());
      AutocastGuard cuda(at::kCUDA, at::kBFloat16, ctx->saved_data["autocast_cuda"].toBool());
      y = layer->forward(xd, in, nullptr);
    }
    torch::autograd::backward({y}, {grad_out[0]});
    return {xd.grad(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

DecoderModelImpl::DecoderModelImpl(const ModelConfig& c) {
  embed_tokens = register_module("embed_tokens", torch::nn::Embedding(c.vocab_size, c.hidden_size));
  layers = register_module("layers", torch::nn::ModuleList());
  for (std::int64_t i = 0; i < c.num_hidden_layers; ++i) {
    blocks.push_back(DecoderLayer(c));
    layers->push_back(blocks.back());
  }
  norm = register_module("norm", RMSNorm(c.hidden_size, c.rms_norm_eps));
}

// --- the LM -----------------------------------------------------------------

CausalLMImpl::CausalLMImpl(const ModelConfig& c, const CausalLMOptions& o)
    : options(o), config_(c) {
  config_.validate();
  RHINE_CHECK(!c.is_deepseek(), "causal_lm", "DeepSeek models need MLA and MoE layers",
              c.model_type, "use the DeepSeek model (MLA + MoE) for deepseek_v2/deepseek_v3");
  model = register_module("model", DecoderModel(c));
  if (!c.tie_word_embeddings)
    lm_head = register_module(
        "lm_head",
        torch::nn::Linear(torch::nn::LinearOptions(c.hidden_size, c.vocab_size).bias(false)));
  freqs_ = rope_frequencies(c.rope, c.head_dim, c.max_position_embeddings);

  if (o.fused_kernels)
    for (auto& m : modules(/*include_self=*/false))
      if (auto* norm = dynamic_cast<RMSNormImpl*>(m.get())) norm->fused = true;

  // HF initialisation: N(0, initializer_range) for linear and embedding
  // weights, zero biases, ones for norms (set by RMSNorm), xIELU as built.
  at::NoGradGuard no_grad;
  c10::optional<at::Generator> gen;
  if (o.init_seed) gen = at::make_generator<at::CPUGeneratorImpl>(*o.init_seed);
  for (auto& p : named_parameters()) {
    const std::string& name = p.key();
    auto ends_with = [&](const std::string& s) {
      return name.size() >= s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0;
    };
    if (ends_with("_proj.weight") || ends_with("embed_tokens.weight") || name == "lm_head.weight")
      p.value().normal_(0.0, c.initializer_range, gen);
    else if (ends_with("_proj.bias"))
      p.value().zero_();
  }
}

at::Tensor CausalLMImpl::output_weight() const {
  return lm_head ? lm_head->weight : model->embed_tokens->weight;
}

KVCache CausalLMImpl::make_cache() const {
  KVCache c;
  c.layers.resize(config_.num_hidden_layers);
  return c;
}

std::int64_t CausalLMImpl::num_parameters(bool include_embeddings) const {
  std::int64_t n = 0;
  for (const auto& p : named_parameters()) {
    if (!include_embeddings &&
        (p.key() == "model.embed_tokens.weight" || p.key() == "lm_head.weight"))
      continue;
    n += p.value().numel();
  }
  return n;
}

std::int64_t parameter_count(const ModelConfig& c, bool include_embeddings) {
  const std::int64_t C = c.hidden_size, D = c.head_dim, H = c.num_attention_heads,
                     Hkv = c.num_key_value_heads, I = c.intermediate_size;
  std::int64_t attn = C * H * D + 2 * C * Hkv * D + H * D * C;  // q, k, v, o
  if (c.attention_bias) attn += H * D + 2 * Hkv * D + C;
  if (c.qk_norm) attn += 2 * D;
  const std::int64_t n_mats = c.gated_mlp() ? 3 : 2;
  std::int64_t mlp = n_mats * C * I;
  if (c.mlp_bias) mlp += (n_mats - 1) * I + C;
  if (!c.gated_mlp()) mlp += 2;                                     // xIELU alpha_p, alpha_n
  std::int64_t n = c.num_hidden_layers * (attn + mlp + 2 * C) + C;  // + final norm
  if (include_embeddings) n += c.vocab_size * C * (c.tie_word_embeddings ? 1 : 2);
  return n;
}

at::Tensor build_attention_mask(std::int64_t T, std::int64_t S, const at::Tensor& key_valid,
                                std::optional<std::int64_t> window,
                                const std::optional<at::Tensor>& doc_ids) {
  const auto dev = key_valid.device();
  auto i64 = at::TensorOptions().dtype(at::kLong).device(dev);
  at::Tensor q_slot = at::arange(S - T, S, i64).unsqueeze(1);  // [T, 1]
  at::Tensor k_slot = at::arange(0, S, i64).unsqueeze(0);      // [1, S]
  at::Tensor allowed = k_slot <= q_slot;                       // [T, S]
  if (window) allowed = allowed.logical_and((q_slot - k_slot) < *window);
  allowed = allowed.unsqueeze(0).logical_and(key_valid.to(at::kBool).unsqueeze(1));  // [B, T, S]
  if (doc_ids) {
    at::Tensor q_doc = doc_ids->narrow(1, S - T, T);  // [B, T]
    allowed = allowed.logical_and(q_doc.unsqueeze(2) == doc_ids->unsqueeze(1));
  }
  // A padding query sees no key at all: let it see itself so that its (unused)
  // output stays finite and never poisons later layers with NaN.
  at::Tensor self = (k_slot == q_slot).unsqueeze(0);
  allowed = allowed.logical_or(self.logical_and(allowed.any(-1, true).logical_not()));
  return allowed.unsqueeze(1);  // [B, 1, T, S]
}

std::tuple<at::Tensor, at::Tensor, std::int64_t> lm_loss(const at::Tensor& logits,
                                                         const at::Tensor& targets,
                                                         std::int64_t ignore_index, double z_loss) {
  RHINE_CHECK(logits.dim() == 2 && targets.dim() == 1 && logits.size(0) == targets.size(0),
              "lm_loss", "logits must be [N, V] and targets [N]",
              (std::vector<std::vector<std::int64_t>>{logits.sizes().vec(), targets.sizes().vec()}),
              "flatten batch and time first");
  at::Tensor lf = logits.scalar_type() == at::kDouble ? logits : logits.to(at::kFloat);
  at::Tensor valid = targets != ignore_index;  // [N]
  const std::int64_t n = valid.sum().item<std::int64_t>();
  at::Tensor t = targets.masked_fill(valid.logical_not(), 0);
  if (n > 0) {
    const auto V = logits.size(1);
    const auto bad = at::logical_and(valid, at::logical_or(t < 0, t >= V)).any().item<bool>();
    RHINE_CHECK(!bad, "lm_loss", "a target id is outside the vocabulary", V,
                "targets must be in [0, vocab_size) or equal ignore_index");
  }
  at::Tensor lse = at::logsumexp(lf, {-1});                     // [N]
  at::Tensor picked = lf.gather(1, t.unsqueeze(1)).squeeze(1);  // [N]
  at::Tensor w = valid.to(lf.scalar_type());
  const double denom = static_cast<double>(std::max<std::int64_t>(n, 1));
  at::Tensor ce = ((lse - picked) * w).sum() / denom;
  at::Tensor z = z_loss > 0 ? (lse.pow(2) * w).sum() * (z_loss / denom) : at::zeros_like(ce);
  return {ce, z, n};
}

ForwardOutput CausalLMImpl::forward(const at::Tensor& ids, const ForwardOptions& o) {
  RHINE_CHECK(ids.dim() == 2, "causal_lm", "ids must be [B, T]", ids.sizes().vec(),
              "add a batch dimension");
  const auto B = ids.size(0), T = ids.size(1);
  const auto dev = ids.device();
  KVCache* cache = o.cache;
  if (cache) {
    RHINE_CHECK(static_cast<std::int64_t>(cache->layers.size()) == config_.num_hidden_layers,
                "causal_lm", "the KV cache has the wrong number of layers", cache->layers.size(),
                "create it with make_cache()");
    RHINE_CHECK(!o.document_mask, "causal_lm", "document masks are not supported with a KV cache",
                o.document_mask, "decode one document per row");
  }
  const std::int64_t past = cache ? cache->length() : 0, S = past + T;
  at::Tensor new_valid = o.attention_mask
                             ? o.attention_mask->to(at::kBool)
                             : at::ones({B, T}, at::TensorOptions().dtype(at::kBool).device(dev));
  at::Tensor pos;
  if (o.position_ids) {
    pos = o.position_ids->to(at::kLong);
  } else {
    at::Tensor start = (cache && cache->next_position.defined())
                           ? cache->next_position
                           : at::zeros({B}, at::TensorOptions().dtype(at::kLong).device(dev));
    // Count real tokens only, so left-padded rows start at position 0.
    pos = (start.unsqueeze(1) + new_valid.to(at::kLong).cumsum(1) - 1).clamp_min(0);  // [B, T]
  }
  at::Tensor key_valid =
      (cache && past > 0) ? at::cat({cache->key_valid, new_valid}, 1) : new_valid;

  AttentionInputs in;
  const auto table_dtype =
      model->embed_tokens->weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  std::tie(in.cos, in.sin) = rope_cos_sin(
      freqs_, pos, config_.rope_interleave ? RopeLayout::Interleaved : RopeLayout::HalfSplit,
      table_dtype);
  const bool windowed = config_.sliding_window && S > *config_.sliding_window;
  const bool padded = !key_valid.all().item<bool>();
  if (windowed || padded || o.document_mask) {
    std::optional<at::Tensor> docs;
    if (o.document_mask) docs = (pos == 0).to(at::kLong).cumsum(1);  // [B, T] document index
    std::optional<std::int64_t> window;
    if (windowed) window = config_.sliding_window;
    in.attention.mask = build_attention_mask(T, S, key_valid, window, docs);
  } else {
    in.attention.is_causal = true;  // lets LibTorch 2.x pick its fused kernels
  }

  at::Tensor h = model->embed_tokens(ids);  // [B, T, C]
  const bool ckpt = options.activation_checkpointing && is_training() && at::GradMode::is_enabled();
  for (std::size_t i = 0; i < model->blocks.size(); ++i) {
    auto& block = model->blocks[i];
    if (ckpt)
      h = BlockCheckpoint::apply(h, block.get(), &in);
    else
      h = block(h, in, cache ? &cache->layers[i] : nullptr);
  }
  h = model->norm(h);
  if (o.last_logits_only) h = h.narrow(1, T - 1, 1);
  ForwardOutput out;
  out.logits = lm_head ? lm_head(h) : at::linear(h, model->embed_tokens->weight);  // [B, T, V]

  if (cache) {
    cache->key_valid = key_valid;
    cache->next_position = pos.select(1, T - 1) + 1;
  }
  if (o.labels) {
    RHINE_CHECK(!o.last_logits_only, "causal_lm", "labels need the logits of every position",
                o.last_logits_only, "drop last_logits_only when computing a loss");
    RHINE_CHECK(o.labels->sizes() == ids.sizes(), "causal_lm", "labels must have the shape of ids",
                o.labels->sizes().vec(), "pass next-token targets [B, T]");
    auto [ce, z, n] = lm_loss(out.logits.reshape({B * T, -1}),
                              o.labels->reshape({B * T}).to(at::kLong), o.ignore_index, o.z_loss);
    out.loss = ce + z;
    out.stats.ce_loss = ce.item<double>();
    out.stats.z_loss = z.item<double>();
    out.stats.n_tokens = n;
  }
  return out;
}

}  // namespace rhine::nn
