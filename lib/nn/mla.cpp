// Multi-head Latent Attention: naive and absorbed forms (docs/architectures.md
// 1.3-1.7). Dimension letters as in rhine/nn/mla.h.
#include "rhine/nn/mla.h"

#include <ATen/ATen.h>

#include "rhine/core/error.h"
#include "rhine/nn/adapter.h"
#include "rhine/torch/compat.h"
#include "build.h"

namespace rhine::nn {

MLAImpl::MLAImpl(const ModelConfig& c)
    : n_heads(c.num_attention_heads),
      nope_dim(c.qk_nope_head_dim),
      rope_dim(c.qk_rope_head_dim),
      v_dim(c.v_head_dim),
      kv_rank(c.kv_lora_rank),
      softmax_scale(c.mla_softmax_scale()),
      dropout(c.attention_dropout),
      layout(c.rope_interleave ? RopeLayout::Interleaved : RopeLayout::HalfSplit) {
  RHINE_CHECK(c.uses_mla(), "mla", "MLA needs kv_lora_rank > 0", c.kv_lora_rank,
              "set the DeepSeek MLA keys in config.json");
  auto lin = [](std::int64_t in, std::int64_t out, bool bias) { return detail::make_linear(in, out, bias); };
  const std::int64_t C = c.hidden_size, H = n_heads, qk = nope_dim + rope_dim;
  // HF DeepseekV3Attention: biases (attention_bias) only on q_a, kv_a and o;
  // the latent norms use the default eps 1e-6, not rms_norm_eps (section 1.1).
  if (c.q_lora_rank) {
    q_a_proj = register_module("q_a_proj", lin(C, *c.q_lora_rank, c.attention_bias));
    q_a_layernorm = register_module("q_a_layernorm", RMSNorm(*c.q_lora_rank, 1e-6));
    q_b_proj = register_module("q_b_proj", lin(*c.q_lora_rank, H * qk, false));
  } else {
    q_proj = register_module("q_proj", lin(C, H * qk, false));
  }
  kv_a_proj_with_mqa =
      register_module("kv_a_proj_with_mqa", lin(C, kv_rank + rope_dim, c.attention_bias));
  kv_a_layernorm = register_module("kv_a_layernorm", RMSNorm(kv_rank, 1e-6));
  kv_b_proj = register_module("kv_b_proj", lin(kv_rank, H * (nope_dim + v_dim), false));
  o_proj = register_module("o_proj", lin(H * v_dim, C, c.attention_bias));
}

at::Tensor MLAImpl::query(const at::Tensor& x, const AttentionInputs& in) {
  const auto B = x.size(0), T = x.size(1);
  at::Tensor q = q_proj ? linear(q_proj, x)
                        : linear(q_b_proj, q_a_layernorm(linear(q_a_proj, x)));  // [B, T, H*(Dn+Dr)]
  q = q.view({B, T, n_heads, nope_dim + rope_dim}).transpose(1, 2);         // [B, H, T, Dn+Dr]
  // split, not narrow: its backward is one cat, where each narrow's zero-fills all of q.
  const auto parts = q.split_with_sizes({nope_dim, rope_dim}, -1);
  at::Tensor q_pe = apply_rope(parts[1], in.cos, in.sin, layout);
  return at::cat({parts[0], q_pe}, -1);
}

std::pair<at::Tensor, at::Tensor> MLAImpl::latent(const at::Tensor& x, const AttentionInputs& in) {
  at::Tensor full = linear(kv_a_proj_with_mqa, x);                       // [B, T, Rkv + Dr]
  const auto parts = full.split_with_sizes({kv_rank, rope_dim}, -1);
  at::Tensor ckv = kv_a_layernorm(parts[0]);  // [B, T, Rkv]
  // One rotary key shared by all heads: rotate it as a single head.
  at::Tensor k_pe = apply_rope(parts[1].unsqueeze(1), in.cos, in.sin, layout)
                        .squeeze(1);  // [B, T, Dr]
  return {ckv, k_pe};
}

at::Tensor MLAImpl::forward(const at::Tensor& x, const AttentionInputs& in, LatentKV* cache) {
  return (cache || absorb) ? forward_absorbed(x, in, cache) : forward_naive(x, in);
}

at::Tensor MLAImpl::forward_naive(const at::Tensor& x, const AttentionInputs& in) {
  const auto B = x.size(0), T = x.size(1), H = n_heads;
  at::Tensor q = query(x, in);           // [B, H, T, Dn+Dr]
  auto [ckv, k_pe] = latent(x, in);      // [B, T, Rkv], [B, T, Dr]
  at::Tensor kv = linear(kv_b_proj, ckv).view({B, T, H, nope_dim + v_dim}).transpose(1, 2);  // [B,H,T,Dn+Dv]
  const auto kv_parts = kv.split_with_sizes({nope_dim, v_dim}, -1);
  at::Tensor k_nope = kv_parts[0];  // [B,H,T,Dn]
  at::Tensor v = kv_parts[1];       // [B,H,T,Dv]
  at::Tensor k = at::cat({k_nope, k_pe.unsqueeze(1).expand({B, H, T, rope_dim}).to(k_nope.scalar_type())},
                         -1);  // [B, H, T, Dn+Dr]
  AttentionOptions opt = in.attention;
  opt.scale = softmax_scale;
  opt.dropout_p = is_training() ? dropout : 0.0;
  const auto dt = q.scalar_type();
  at::Tensor out = rhine::attention(q, k.to(dt), v.to(dt), opt);  // [B, H, T, Dv]
  return linear(o_proj, out.transpose(1, 2).reshape({B, T, H * v_dim}));
}

at::Tensor MLAImpl::forward_absorbed(const at::Tensor& x, const AttentionInputs& in,
                                     LatentKV* cache) {
  const auto B = x.size(0), T = x.size(1), H = n_heads;
  at::Tensor q = query(x, in);       // [B, H, T, Dn+Dr]
  auto [ckv, k_pe] = latent(x, in);  // [B, T, Rkv], [B, T, Dr]
  if (cache) {
    ckv = cache->ckv = cache_append(cache->ckv_buf, cache->ckv, ckv, 1);      // [B, S, Rkv]
    k_pe = cache->k_pe = cache_append(cache->k_pe_buf, cache->k_pe, k_pe, 1);  // [B, S, Dr]
  }
  const auto dt = q.scalar_type();
  at::Tensor w = effective_weight(*kv_b_proj).view({H, nope_dim + v_dim, kv_rank}).to(dt);  // [H, Dn+Dv, Rkv]
  at::Tensor w_uk = w.narrow(1, 0, nope_dim);                                     // [H, Dn, Rkv]
  at::Tensor w_uv = w.narrow(1, nope_dim, v_dim);                                 // [H, Dv, Rkv]
  // q_nope W^UK: scores against the latent equal scores against k_nope.
  at::Tensor q_lat = at::matmul(q.narrow(-1, 0, nope_dim), w_uk);  // [B, H, T, Rkv]
  at::Tensor qf = at::cat({q_lat, q.narrow(-1, nope_dim, rope_dim)}, -1);  // [B, H, T, Rkv+Dr]
  at::Tensor kf = at::cat({ckv, k_pe}, -1).unsqueeze(1).to(dt);           // [B, 1, S, Rkv+Dr]
  at::Tensor vf = ckv.unsqueeze(1).to(dt);                                 // [B, 1, S, Rkv]
  AttentionOptions opt = in.attention;
  opt.scale = softmax_scale;
  opt.dropout_p = is_training() ? dropout : 0.0;
  at::Tensor o_lat = rhine::attention(qf, kf, vf, opt);          // [B, H, T, Rkv]
  at::Tensor o = at::matmul(o_lat, w_uv.transpose(1, 2));         // [B, H, T, Dv]
  return linear(o_proj, o.transpose(1, 2).reshape({B, T, H * v_dim}));
}

std::int64_t kv_cache_elements_per_token(const ModelConfig& c) {
  if (c.uses_mla()) return c.kv_lora_rank + c.qk_rope_head_dim;
  return 2 * c.num_key_value_heads * c.head_dim;
}

}  // namespace rhine::nn
