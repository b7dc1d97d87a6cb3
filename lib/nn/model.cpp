// The Llama-family causal LM. Dimension letters as in rhine/nn/model.h.
#include "rhine/nn/model.h"

#include <ATen/core/grad_mode.h>
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <string_view>

#include "rhine/core/error.h"
#include "rhine/nn/adapter.h"
#include "rhine/nn/fused.h"
#include "rhine/nn/mtp.h"
#include "rhine/torch/compat.h"
#include "rhine/torch/profile.h"
#include "rhine/torch/sync.h"
#include "build.h"

namespace rhine::nn {

// --- blocks -----------------------------------------------------------------

DecoderLayerImpl::DecoderLayerImpl(const ModelConfig& c, std::int64_t layer) {
  // Apertus names its two norms differently; the math is the same.
  const bool apertus = c.model_type == "apertus";
  norm1 = register_module(apertus ? "attention_layernorm" : "input_layernorm",
                          RMSNorm(c.hidden_size, c.rms_norm_eps));
  if (c.uses_mla())
    mla = register_module("self_attn", MLA(c));
  else
    self_attn = register_module("self_attn", Attention(c));
  norm2 = register_module(apertus ? "feedforward_layernorm" : "post_attention_layernorm",
                          RMSNorm(c.hidden_size, c.rms_norm_eps));
  if (c.is_moe_layer(layer))
    moe = register_module("mlp", MoE(c));
  else
    mlp = register_module("mlp", MLP(c));
}

BlockOutput DecoderLayerImpl::forward(const at::Tensor& x, const AttentionInputs& in, LayerKV* cache,
                                      LatentKV* latent, const BalanceLossWeights& balance) {
  at::Tensor a = mla ? mla(norm1(x), in, latent) : self_attn(norm1(x), in, cache);
  at::Tensor h = x + a;  // [B, T, C]
  if (!moe) return {h + mlp(norm2(h)), {}, {}};
  MoEOutput m = moe(norm2(h), balance);
  return {h + m.y, m.counts, m.aux_loss};
}

namespace {

// Activation checkpointing, as torch.utils.checkpoint (reentrant) does it
// (LibTorch C++ has no checkpoint API). Forward runs the block inside a custom
// Function, so without a graph, and keeps only its input; backward runs it
// again with grad enabled and back-propagates the incoming gradients through
// the recomputation. The recomputation sees what the first run saw: the
// generator state of the input's device (restored for the recomputation and
// put back after it) and the autocast state (enabled and dtype, per device).
// The block closure holds the module's shared holder, not a raw pointer.
struct Recompute : torch::CustomClassHolder {
  std::function<BlockOutput(const at::Tensor&)> fn;
  c10::Device device{c10::kCPU};
  at::Tensor rng_state;
  bool autocast_cpu = false, autocast_cuda = false;
  c10::ScalarType dtype_cpu = at::kBFloat16, dtype_cuda = at::kHalf;
  bool has_aux = false;
};

at::Tensor generator_state(const c10::Device& device) {
  at::Generator gen = at::globalContext().defaultGenerator(device);
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_generator_state(const c10::Device& device, const at::Tensor& state) {
  at::Generator gen = at::globalContext().defaultGenerator(device);
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

// Outputs: h, the aux loss (a zero when the block has none) and the expert
// counts (int64, not differentiable; empty for a dense block).
struct CheckpointFunction : public torch::autograd::Function<CheckpointFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                c10::intrusive_ptr<Recompute> r) {
    ctx->save_for_backward({x});
    r->device = x.device();
    r->rng_state = generator_state(r->device);
    r->autocast_cpu = autocast_enabled(at::kCPU);
    r->dtype_cpu = autocast_dtype(at::kCPU);
    r->autocast_cuda = autocast_enabled(at::kCUDA);
    r->dtype_cuda = autocast_dtype(at::kCUDA);
    // No autocast caching in this graph-less run: a cached weight copy would
    // have no grad_fn, and the recomputation (or a later use in the same
    // autocast region or rhine::AutocastStep) would take it and give the
    // weight no gradient.
    struct CacheOff {
      bool was = at::autocast::is_autocast_cache_enabled();
      CacheOff() { at::autocast::set_autocast_cache_enabled(false); }
      ~CacheOff() { at::autocast::set_autocast_cache_enabled(was); }
    } cache_off;
    BlockOutput out = r->fn(x);
    r->has_aux = out.aux_loss.defined();
    at::Tensor aux = r->has_aux ? out.aux_loss : at::zeros({}, x.options().dtype(at::kFloat));
    at::Tensor counts = out.counts.defined() ? out.counts : at::empty({0}, x.options().dtype(at::kLong));
    ctx->mark_non_differentiable({counts});
    ctx->saved_data["recompute"] = c10::IValue::make_capsule(c10::intrusive_ptr<torch::CustomClassHolder>(r));
    return {out.h, aux, counts};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto r = c10::static_intrusive_pointer_cast<Recompute>(ctx->saved_data["recompute"].toCapsule());
    at::Tensor x = ctx->get_saved_variables()[0];
    at::Tensor xd = x.detach().requires_grad_(true);
    BlockOutput out;
    {
      const at::Tensor now = generator_state(r->device);
      set_generator_state(r->device, r->rng_state);
      at::AutoGradMode grad(true);
      AutocastGuard cpu(at::kCPU, r->dtype_cpu, r->autocast_cpu);
      AutocastGuard cuda(at::kCUDA, r->dtype_cuda, r->autocast_cuda);
      out = r->fn(xd);
      set_generator_state(r->device, now);
    }
    std::vector<at::Tensor> outputs{out.h}, gradients{grads[0]};
    if (r->has_aux && grads[1].defined()) {
      outputs.push_back(out.aux_loss);
      gradients.push_back(grads[1]);
    }
    torch::autograd::backward(outputs, gradients);
    return {xd.grad(), at::Tensor()};
  }
};

}  // namespace

BlockOutput checkpoint_block(std::function<BlockOutput(const at::Tensor&)> fn, const at::Tensor& x) {
  auto r = c10::make_intrusive<Recompute>();
  r->fn = std::move(fn);
  auto outs = CheckpointFunction::apply(x, r);
  BlockOutput out;
  out.h = outs[0];
  if (r->has_aux) out.aux_loss = outs[1];
  if (outs[2].numel() > 0) out.counts = outs[2];
  return out;
}

DecoderModelImpl::DecoderModelImpl(const ModelConfig& c) {
  embed_tokens = register_module("embed_tokens", detail::make_embedding(c.vocab_size, c.hidden_size));
  layers = register_module("layers", torch::nn::ModuleList());
  for (std::int64_t i = 0; i < c.num_hidden_layers; ++i) {
    blocks.push_back(DecoderLayer(c, i));
    layers->push_back(blocks.back());
  }
  // MTP modules continue the layer numbering, as DeepSeek-V3 stores them.
  for (std::int64_t k = 0; k < c.num_nextn_predict_layers; ++k) {
    mtp.push_back(std::make_shared<MTPLayerImpl>(c, c.num_hidden_layers + k));
    layers->push_back(mtp.back());
  }
  norm = register_module("norm", RMSNorm(c.hidden_size, c.rms_norm_eps));
}

// --- the LM -----------------------------------------------------------------

namespace {
bool has_suffix(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
}  // namespace

CausalLMImpl::CausalLMImpl(const ModelConfig& c, const CausalLMOptions& o)
    : options(o), config_(c) {
  config_.validate();
  std::optional<detail::DeferredInit> deferred;
  if (o.defer_init) deferred.emplace();
  model = register_module("model", DecoderModel(c));
  if (!c.tie_word_embeddings)
    lm_head = register_module("lm_head", detail::make_linear(c.hidden_size, c.vocab_size, false));
  deferred.reset();
  freqs_ = rope_frequencies(c.rope, c.head_dim, c.max_position_embeddings);
  if (c.uses_mla())
    mla_freqs_ = rope_frequencies(c.rope, c.qk_rope_head_dim, c.max_position_embeddings);

  if (o.fused_kernels) set_fused_kernels(*this, true);  // RMSNorm, RoPE, SwiGLU

  // defer_init: the weights come from a checkpoint or FSDP::initialize.
  at::NoGradGuard no_grad;
  if (!o.defer_init) {
    auto gen = init_generator();
    auto params = named_parameters();
    for (const auto& step : init_plan()) step.apply(params[step.name], gen);
  }
  tie_mtp_weights();
}

void ParamInit::apply(at::Tensor& t, c10::optional<at::Generator>& gen) const {
  at::NoGradGuard no_grad;
  if (std > 0)
    t.normal_(0.0, std, gen);
  else
    t.zero_();
}

std::vector<ParamInit> CausalLMImpl::init_plan() const {
  // HF initialisation: N(0, initializer_range) for linear and embedding
  // weights, zero biases, ones for norms (set by RMSNorm), xIELU as built.
  std::vector<ParamInit> plan;
  for (const auto& p : named_parameters()) {
    const std::string& name = p.key();
    auto ends_with = [&](std::string_view suffix) { return has_suffix(name, suffix); };
    if (ends_with("_proj.weight") || ends_with("_proj_with_mqa.weight") || ends_with("embed_tokens.weight") ||
        name == "lm_head.weight" || ends_with("mlp.gate.weight"))
      plan.push_back({name, config_.initializer_range});
    else if (ends_with("_proj.bias"))
      plan.push_back({name, 0.0});
  }
  return plan;
}

c10::optional<at::Generator> CausalLMImpl::init_generator() const {
  if (!options.init_seed) return c10::nullopt;
  return at::make_generator<at::CPUGeneratorImpl>(*options.init_seed);
}

std::vector<std::pair<std::string, at::Tensor>> CausalLMImpl::state_buffers() {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& b : named_buffers()) {
    const std::string& name = b.key();
    auto ends_with = [&](std::string_view suffix) { return has_suffix(name, suffix); };
    const bool alias = name.rfind("model.layers.", 0) == 0 &&
                       (ends_with(".embed_tokens.weight") || ends_with(".shared_head.head.weight"));
    if (!alias) out.emplace_back(name, b.value());
  }
  return out;
}

void CausalLMImpl::tie_mtp_weights() {
  for (auto& m : model->mtp) {
    m->embed_tokens->tie(model->embed_tokens->weight);
    m->shared_head->head->tie(output_weight());
  }
}

void CausalLMImpl::to(torch::Device device, torch::Dtype dtype, bool non_blocking) {
  torch::nn::Module::to(device, dtype, non_blocking);
  tie_mtp_weights();
}
void CausalLMImpl::to(torch::Dtype dtype, bool non_blocking) {
  torch::nn::Module::to(dtype, non_blocking);
  tie_mtp_weights();
}
void CausalLMImpl::to(torch::Device device, bool non_blocking) {
  torch::nn::Module::to(device, non_blocking);
  tie_mtp_weights();
}

std::vector<MoE> CausalLMImpl::moe_layers() const {
  std::vector<MoE> out;
  for (const auto& b : model->blocks)
    if (b->moe) out.push_back(b->moe);
  for (const auto& m : model->mtp)
    if (m->moe) out.push_back(m->moe);
  return out;
}

void CausalLMImpl::update_router_bias(const at::Tensor& counts, double gamma) {
  auto layers = moe_layers();
  RHINE_CHECK(counts.dim() == 2 && counts.size(0) == static_cast<std::int64_t>(layers.size()),
              "causal_lm", "router bias update needs counts [n_moe_layers, E]",
              counts.sizes().vec(), "pass ForwardOutput::expert_counts (summed, all-reduced)");
  for (std::size_t l = 0; l < layers.size(); ++l) layers[l]->update_bias(counts[l], gamma);
}

at::Tensor CausalLMImpl::output_weight() const {
  return lm_head ? lm_head->weight : model->embed_tokens->weight;
}

KVCache CausalLMImpl::make_cache() const {
  KVCache c;
  c.layers.resize(config_.num_hidden_layers);
  if (config_.uses_mla()) c.latent.resize(config_.num_hidden_layers);
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

namespace {

std::int64_t mlp_params(const ModelConfig& c, std::int64_t I) {
  const std::int64_t C = c.hidden_size;
  const std::int64_t n_mats = c.gated_mlp() ? 3 : 2;
  std::int64_t mlp = n_mats * C * I;
  if (c.mlp_bias) mlp += (n_mats - 1) * I + C;
  if (!c.gated_mlp()) mlp += 2;  // xIELU alpha_p, alpha_n
  return mlp;
}

std::int64_t attention_params(const ModelConfig& c) {
  const std::int64_t C = c.hidden_size, H = c.num_attention_heads;
  if (c.uses_mla()) {
    const std::int64_t qk = c.qk_head_dim(), R = c.kv_lora_rank, Dr = c.qk_rope_head_dim;
    const std::int64_t b = c.attention_bias ? 1 : 0;
    std::int64_t n = 0;
    if (c.q_lora_rank)
      n += C * *c.q_lora_rank + b * *c.q_lora_rank + *c.q_lora_rank + *c.q_lora_rank * H * qk;
    else
      n += C * H * qk;
    n += C * (R + Dr) + b * (R + Dr) + R;                       // kv_a + kv_a_layernorm
    n += R * H * (c.qk_nope_head_dim + c.v_head_dim);           // kv_b
    n += H * c.v_head_dim * C + b * C;                          // o
    return n;
  }
  const std::int64_t D = c.head_dim, Hkv = c.num_key_value_heads;
  std::int64_t attn = C * H * D + 2 * C * Hkv * D + H * D * C;  // q, k, v, o
  if (c.attention_bias) attn += H * D + 2 * Hkv * D + C;
  if (c.qk_norm) attn += 2 * D;
  return attn;
}

// One block (norms, attention, MLP or MoE); `active`: K routed experts only.
std::int64_t layer_params(const ModelConfig& c, std::int64_t layer, bool active) {
  std::int64_t ffn;
  if (c.is_moe_layer(layer)) {
    const std::int64_t n_exp = active ? c.num_experts_per_tok : c.n_routed_experts;
    ffn = c.n_routed_experts * c.hidden_size + n_exp * mlp_params(c, c.moe_intermediate_size);
    if (c.n_shared_experts > 0)
      ffn += mlp_params(c, c.moe_intermediate_size * c.n_shared_experts);
  } else {
    ffn = mlp_params(c, c.intermediate_size);
  }
  return attention_params(c) + ffn + 2 * c.hidden_size;
}

std::int64_t count_params(const ModelConfig& c, bool include_embeddings, bool active) {
  const std::int64_t C = c.hidden_size;
  std::int64_t n = C;  // final norm
  for (std::int64_t l = 0; l < c.num_hidden_layers; ++l) n += layer_params(c, l, active);
  if (!active)  // MTP: block + enorm, hnorm, eh_proj, shared_head.norm
    for (std::int64_t k = 0; k < c.num_nextn_predict_layers; ++k)
      n += layer_params(c, c.num_hidden_layers + k, false) + 3 * C + 2 * C * C;
  if (include_embeddings) n += c.vocab_size * C * (c.tie_word_embeddings ? 1 : 2);
  return n;
}

}  // namespace

std::int64_t parameter_count(const ModelConfig& c, bool include_embeddings) {
  return count_params(c, include_embeddings, false);
}

std::int64_t active_parameter_count(const ModelConfig& c, bool include_embeddings) {
  return count_params(c, include_embeddings, true);
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

std::vector<std::vector<std::int64_t>> document_starts_of(const at::Tensor& position_ids) {
  RHINE_CHECK(position_ids.dim() == 2 && position_ids.device().is_cpu(), "causal_lm",
              "document starts come from host position ids [B, T]", position_ids.sizes().vec(), "");
  const at::Tensor p = position_ids.to(at::kLong).contiguous();
  const auto B = p.size(0), T = p.size(1);
  const auto* d = p.data_ptr<std::int64_t>();
  std::vector<std::vector<std::int64_t>> out(static_cast<std::size_t>(B));
  for (std::int64_t b = 0; b < B; ++b) {
    auto& row = out[static_cast<std::size_t>(b)];
    row.push_back(0);  // tokens before the first position 0 form a document too
    for (std::int64_t t = 1; t < T; ++t)
      if (d[b * T + t] == 0) row.push_back(t);
  }
  return out;
}

ForwardOutput CausalLMImpl::forward(const at::Tensor& ids, const ForwardOptions& o) {
  if (!hooks_) return forward_impl(ids, o);
  hooks_->forward_begin();
  ForwardOutput out;
  try {
    out = forward_impl(ids, o);
  } catch (...) {
    try {
      hooks_->forward_end();
    } catch (...) {  // the first error is the one to report
    }
    throw;
  }
  hooks_->forward_end();
  return out;
}

ForwardOutput CausalLMImpl::forward_impl(const at::Tensor& ids, const ForwardOptions& o) {
  RHINE_CHECK(ids.dim() == 2, "causal_lm", "ids must be [B, T]", ids.sizes().vec(),
              "add a batch dimension");
  RHINE_CHECK(!options.defer_init || hooks_, "causal_lm", "the model's weights were never written",
              "built with CausalLMOptions::defer_init",
              "shard it with FSDP and call FSDP::load_parameters before forward");
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
      cache ? cache_append(cache->key_valid_buf, past > 0 ? cache->key_valid : at::Tensor(), new_valid, 1)
            : new_valid;

  AttentionInputs in, in_mla;
  const auto table_dtype =
      model->embed_tokens->weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto layout = config_.rope_interleave ? RopeLayout::Interleaved : RopeLayout::HalfSplit;
  if (config_.uses_mla())
    std::tie(in_mla.cos, in_mla.sin) = rope_cos_sin(mla_freqs_, pos, layout, table_dtype);
  else
    std::tie(in.cos, in.sin) = rope_cos_sin(freqs_, pos, layout, table_dtype);
  const bool windowed = config_.sliding_window && S > *config_.sliding_window;
  // Padding is known without reading the device: a host mask is read on the
  // host, a device mask counts as padded (the masked path is correct either
  // way), and the cache remembers whether its slots hold padding.
  const bool new_padding = o.attention_mask && (o.attention_mask->device().is_cpu()
                                                    ? !cpu_value<bool>(o.attention_mask->to(at::kBool).all())
                                                    : true);
  const bool padded = new_padding || (cache != nullptr && past > 0 && cache->padded);
  // Packed documents whose starts are known on the host run per document, without a mask.
  std::vector<std::vector<std::int64_t>> starts;
  if (o.document_mask && !windowed && !padded && cache == nullptr) {
    if (!o.document_starts.empty())
      starts = o.document_starts;
    else if (pos.device().is_cpu())
      starts = document_starts_of(pos);
  }
  if (!starts.empty()) {
    in.attention.is_causal = true;
    in.attention.document_starts = std::move(starts);
  } else if (windowed || padded || o.document_mask) {
    std::optional<at::Tensor> docs;
    if (o.document_mask) docs = (pos == 0).to(at::kLong).cumsum(1);  // [B, T] document index
    std::optional<std::int64_t> window;
    if (windowed) window = config_.sliding_window;
    in.attention.mask = build_attention_mask(T, S, key_valid, window, docs);
  } else {
    in.attention.is_causal = true;  // lets LibTorch 2.x pick its fused kernels
  }
  in_mla.attention = in.attention;
  const AttentionInputs& block_in = config_.uses_mla() ? in_mla : in;

  const bool ckpt = options.activation_checkpointing && is_training() && at::GradMode::is_enabled();
  const BalanceLossWeights balance{o.moe_seq_aux_alpha, o.moe_expert_aux_alpha};
  // MoE statistics of this forward, per MoE layer in moe_layers() order.
  std::vector<at::Tensor> counts, aux_losses;
  std::vector<at::Tensor> mtp_counts(model->mtp.size());  // (undefined: the MTP module did not run)

  at::Tensor h;
  {
    RHINE_RANGE("rhine::embed");
    h = model->embed_tokens(ids);  // [B, T, C]
  }
  for (std::size_t i = 0; i < model->blocks.size(); ++i) {
    RHINE_RANGE("rhine::block." + std::to_string(i));
    DecoderLayer block = model->blocks[i];
    BlockOutput stats;
    auto run = [&](const std::vector<at::Tensor>& x) -> std::vector<at::Tensor> {
      if (ckpt) {
        // A custom Function's output needs grad only when an input does: with a
        // frozen embedding (LoRA) the first block's input gets a leaf that does,
        // else nothing behind it would train (torch.utils.checkpoint's reentrant caveat).
        const at::Tensor input = x[0].requires_grad() ? x[0] : x[0].detach().requires_grad_(true);
        stats = checkpoint_block([block, in = block_in, balance](const at::Tensor& xi) mutable {
          return block->forward(xi, in, nullptr, nullptr, balance);
        }, input);
      } else {
        stats = block(x[0], block_in, cache ? &cache->layers[i] : nullptr,
                      cache && !cache->latent.empty() ? &cache->latent[i] : nullptr, balance);
      }
      return {stats.h};
    };
    h = hooks_ ? hooks_->run_block(i, {h}, run)[0] : run({h})[0];
    if (block->moe) {
      counts.push_back(stats.counts);
      if (stats.aux_loss.defined()) aux_losses.push_back(stats.aux_loss);
    }
  }
  h = model->norm(h);
  const at::Tensor h_main = h;  // [B, T, C] post-norm: the input of MTP depth 1
  if (o.last_logits_only) h = h.narrow(1, T - 1, 1);
  ForwardOutput out;
  {
    RHINE_RANGE("rhine::lm_head");
    out.logits = lm_head ? linear(lm_head, h) : at::linear(h, rhine::autocast_weight(model->embed_tokens->weight));  // [B, T, V]
  }

  if (cache) {
    cache->key_valid = key_valid;
    cache->padded = padded;
    cache->next_position = pos.select(1, T - 1) + 1;
  }
  if (o.labels) {
    RHINE_CHECK(!o.last_logits_only, "causal_lm", "labels need the logits of every position",
                o.last_logits_only, "drop last_logits_only when computing a loss");
    RHINE_CHECK(o.labels->sizes() == ids.sizes(), "causal_lm", "labels must have the shape of ids",
                o.labels->sizes().vec(), "pass next-token targets [B, T]");
    RHINE_CHECK(!cache || model->mtp.empty() || o.mtp_lambda == 0.0, "causal_lm",
                "MTP losses need a forward without KV cache", o.mtp_lambda,
                "set mtp_lambda = 0 when decoding");
    at::Tensor labels = o.labels->to(at::kLong);
    // The fused CPU loss, the chunked one elsewhere; the reference twin without fused kernels.
    const auto loss_fn = [&](const at::Tensor& logits, const at::Tensor& targets, double z) {
      return options.fused_kernels ? fused_lm_loss(logits, targets, o.ignore_index, z)
                                   : lm_loss(logits, targets, o.ignore_index, z);
    };
    auto [ce, z, n] = [&] {
      RHINE_RANGE("rhine::loss");
      return loss_fn(out.logits.reshape({B * T, -1}), labels.reshape({B * T}), o.z_loss);
    }();
    out.loss = ce + z;
    out.stats.ce_loss = ce.detach();
    out.stats.z_loss = z.detach();
    out.stats.n_tokens = n;

    // MTP: depth k predicts t_{i+k+1} = labels[i+k] from h^{k-1}_i and t_{i+k}.
    if (!model->mtp.empty() && o.mtp_lambda != 0.0) {
      const auto D = static_cast<double>(model->mtp.size());
      // Packed rows: no MTP target in the next document (mtp_labels).
      const at::Tensor documents = o.document_mask ? (pos == 0).to(at::kLong).cumsum(1) : at::Tensor();
      at::Tensor hk = h_main, total;
      for (std::size_t k = 1; k <= model->mtp.size(); ++k) {
        RHINE_RANGE("rhine::mtp." + std::to_string(k));
        BlockOutput stats;
        auto run = [&](const std::vector<at::Tensor>& x) -> std::vector<at::Tensor> {
          auto [block, logits] = model->mtp[k - 1]->forward(x[0], mtp_inputs(ids, k), model->embed_tokens->weight,
                                                            output_weight(), block_in, balance);
          stats = block;
          return {block.h, logits};
        };
        const std::size_t index = model->blocks.size() + k - 1;
        auto outs = hooks_ ? hooks_->run_block(index, {hk}, run) : run({hk});
        hk = outs[0];
        const at::Tensor& logits_k = outs[1];
        if (model->mtp[k - 1]->moe) {
          mtp_counts[k - 1] = stats.counts;
          if (stats.aux_loss.defined()) aux_losses.push_back(stats.aux_loss);
        }
        auto [ce_k, z_k, n_k] = loss_fn(logits_k.reshape({B * T, -1}),
                                        mtp_labels(labels, k, o.ignore_index, documents).reshape({B * T}), 0.0);
        out.stats.mtp_ce.push_back(ce_k.detach());
        out.stats.mtp_tokens.push_back(n_k);
        total = total.defined() ? total + ce_k : ce_k;
      }
      out.mtp_loss = total * (o.mtp_lambda / D);
      out.stats.mtp_loss = out.mtp_loss.detach();
      out.loss = out.loss + out.mtp_loss;
    }
  }
  // MoE statistics and balance losses of every MoE layer that ran (MTP
  // layers that did not run count zeros).
  for (std::size_t k = 0; k < model->mtp.size(); ++k)
    if (model->mtp[k]->moe)
      counts.push_back(mtp_counts[k].defined() ? mtp_counts[k]
                                               : at::zeros({config_.n_routed_experts}, ids.options().dtype(at::kLong)));
  if (!counts.empty()) {
    out.expert_counts = at::stack(counts);
    for (const auto& a : aux_losses) out.aux_loss = out.aux_loss.defined() ? out.aux_loss + a : a;
    if (out.aux_loss.defined()) {
      out.stats.aux_loss = out.aux_loss.detach();
      if (out.loss.defined()) out.loss = out.loss + out.aux_loss;
    }
  }
  if (out.loss.defined()) {
    if (!out.stats.aux_loss.defined()) out.stats.aux_loss = at::zeros_like(out.stats.ce_loss);
    if (!out.stats.mtp_loss.defined()) out.stats.mtp_loss = at::zeros_like(out.stats.ce_loss);
  }
  return out;
}

}  // namespace rhine::nn
