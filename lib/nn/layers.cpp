// Building blocks of Llama-family decoders. Formulas: docs/architectures.md
// sections 0 (RMSNorm, SwiGLU), 4 (RoPE scaling), 5.3 (RoPE layouts), 6.4
// (Apertus: xIELU, QK-norm). Dimension letters as in rhine/nn/layers.h.
#include "rhine/nn/layers.h"

#include <ATen/ATen.h>

#include <cmath>

#include "rhine/core/error.h"
#include "rhine/nn/adapter.h"
#include "rhine/nn/fused.h"
#include "build.h"

namespace rhine::nn {

// --- RMSNorm ----------------------------------------------------------------

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  RHINE_CHECK(weight.dim() == 1 && x.size(-1) == weight.size(0), "rms_norm",
              "weight must be 1-D with the size of x's last dimension",
              (std::vector<std::int64_t>{x.size(-1), weight.dim() == 1 ? weight.size(0) : -1}),
              "pass weight [N] for x [..., N]");
  // Statistics in fp32 (or wider), as HF does, whatever x's dtype.
  const auto compute = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor xf = x.to(compute);
  at::Tensor y = xf * at::rsqrt(xf.pow(2).mean({-1}, /*keepdim=*/true) + eps);
  return weight * y.to(x.scalar_type());
}

RMSNormImpl::RMSNormImpl(std::int64_t dim, double eps_) : eps(eps_) {
  weight = register_parameter("weight", at::ones({dim}));
}

at::Tensor RMSNormImpl::forward(const at::Tensor& x) {
  return fused ? fused_rms_norm(x, weight, eps) : rms_norm(x, weight, eps);
}

// --- RoPE -------------------------------------------------------------------

double yarn_get_mscale(double scale, double mscale) {
  return scale <= 1.0 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0;
}

RopeFrequencies rope_frequencies(const RopeParameters& rope, std::int64_t dim,
                                 std::int64_t max_position_embeddings) {
  RHINE_CHECK(dim > 0 && dim % 2 == 0, "rope", "rotary dim must be positive and even", dim,
              "check head_dim");
  const std::int64_t half = dim / 2;
  const double base = rope.rope_theta;
  const double orig =
      static_cast<double>(rope.original_max_position_embeddings.value_or(max_position_embeddings));
  RopeFrequencies out;
  out.inv_freq.resize(half);
  for (std::int64_t j = 0; j < half; ++j)
    out.inv_freq[j] = 1.0 / std::pow(base, static_cast<double>(2 * j) / static_cast<double>(dim));

  const std::string& type = rope.rope_type;
  if (type == "default") return out;
  if (type == "linear") {
    for (auto& f : out.inv_freq) f /= rope.factor;
    return out;
  }
  if (type == "llama3") {
    const double lo_wl = orig / rope.low_freq_factor, hi_wl = orig / rope.high_freq_factor;
    for (auto& f : out.inv_freq) {
      const double wavelen = 2.0 * M_PI / f;
      if (wavelen > lo_wl) {
        f /= rope.factor;  // long wavelengths: interpolated
      } else if (wavelen >= hi_wl) {
        const double smooth = (orig / wavelen - rope.low_freq_factor) /
                              (rope.high_freq_factor - rope.low_freq_factor);
        f = (1.0 - smooth) * f / rope.factor + smooth * f;
      }  // short wavelengths: unchanged
    }
    return out;
  }
  if (type == "yarn") {
    auto corr_dim = [&](double rotations) {
      return dim * std::log(orig / (rotations * 2.0 * M_PI)) / (2.0 * std::log(base));
    };
    double low = corr_dim(rope.beta_fast), high = corr_dim(rope.beta_slow);
    if (rope.truncate) {
      low = std::floor(low);
      high = std::ceil(high);
    }
    low = std::max(low, 0.0);
    high = std::min(high, static_cast<double>(dim - 1));
    if (low == high) high += 0.001;  // avoids a zero-width ramp
    for (std::int64_t j = 0; j < half; ++j) {
      const double ramp = std::clamp((static_cast<double>(j) - low) / (high - low), 0.0, 1.0);
      const double extra = 1.0 - ramp;  // 1: keep the original frequency
      const double f = out.inv_freq[j];
      out.inv_freq[j] = f / rope.factor * (1.0 - extra) + f * extra;
    }
    if (rope.attention_factor) {
      out.attention_factor = *rope.attention_factor;
    } else if (rope.mscale != 0.0 && rope.mscale_all_dim != 0.0) {
      out.attention_factor = yarn_get_mscale(rope.factor, rope.mscale) /
                             yarn_get_mscale(rope.factor, rope.mscale_all_dim);
    } else {
      out.attention_factor = yarn_get_mscale(rope.factor);
    }
    return out;
  }
  RHINE_FAIL("rope", "unknown rope type", type, "Rhine supports default, linear, llama3 and yarn");
}

std::pair<at::Tensor, at::Tensor> rope_cos_sin(const RopeFrequencies& freqs,
                                               const at::Tensor& positions, RopeLayout layout,
                                               at::ScalarType dtype) {
  RHINE_CHECK(positions.dim() == 2, "rope", "positions must be [B, T]", positions.sizes().vec(),
              "pass one position per token");
  const auto dev = positions.device();
  at::Tensor inv = at::tensor(freqs.inv_freq, at::TensorOptions().dtype(at::kDouble)).to(dev);
  // Angles in float64: exact for the positions of long contexts, then fp32.
  at::Tensor ang = positions.to(at::kDouble).unsqueeze(-1) * inv;  // [B, T, D/2]
  at::Tensor emb = layout == RopeLayout::HalfSplit ? at::cat({ang, ang}, -1)
                                                   : ang.repeat_interleave(2, -1);  // [B, T, D]
  return {(emb.cos() * freqs.attention_factor).to(dtype),
          (emb.sin() * freqs.attention_factor).to(dtype)};
}

namespace {
// rotate_half: (x1, x2) -> (-x2, x1) on the halves of the last dim.
at::Tensor rotate_half(const at::Tensor& x) {
  const auto half = x.size(-1) / 2;
  return at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
}
// Interleaved pairs: (x_2j, x_2j+1) -> (-x_2j+1, x_2j).
at::Tensor rotate_pairs(const at::Tensor& x) {
  auto p = x.unflatten(-1, {x.size(-1) / 2, 2});  // [..., D/2, 2]
  return at::stack({-p.select(-1, 1), p.select(-1, 0)}, -1).flatten(-2);
}
}  // namespace

at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      RopeLayout layout) {
  RHINE_CHECK(
      x.dim() == 4 && cos.dim() == 3 && x.size(-1) == cos.size(-1) && x.size(2) == cos.size(1),
      "rope", "x must be [B, H, T, D] and cos/sin [B, T, D]",
      (std::vector<std::vector<std::int64_t>>{x.sizes().vec(), cos.sizes().vec()}), "");
  auto c = cos.unsqueeze(1).to(x.scalar_type()), s = sin.unsqueeze(1).to(x.scalar_type());
  return x * c + (layout == RopeLayout::HalfSplit ? rotate_half(x) : rotate_pairs(x)) * s;
}

void set_fused_kernels(torch::nn::Module& root, bool on) {
  auto set = [on](torch::nn::Module& m) {
    if (auto* norm = dynamic_cast<RMSNormImpl*>(&m)) norm->fused = on;
    if (auto* attn = dynamic_cast<AttentionImpl*>(&m)) attn->fused = on;
    if (auto* mlp = dynamic_cast<MLPImpl*>(&m)) mlp->fused = on;
  };
  set(root);
  for (auto& m : root.modules(/*include_self=*/false)) set(*m);
}

// --- MLPs -------------------------------------------------------------------

XIELUImpl::XIELUImpl() {
  // Stored in softplus-inverse space: alpha_p = 0.8, alpha_n = beta + 0.3 = 0.8.
  alpha_p = register_parameter("alpha_p", at::full({1}, std::log(std::expm1(0.8))));
  alpha_n = register_parameter("alpha_n", at::full({1}, std::log(std::expm1(0.8 - 0.5))));
  // 0-dim persistent buffers like HF's torch.tensor(beta) (UNCERTAIN whether
  // released checkpoints carry them; loaders should accept both).
  beta = register_buffer("beta", at::scalar_tensor(0.5));
  eps = register_buffer("eps", at::scalar_tensor(-1e-6));
}

at::Tensor XIELUImpl::forward(const at::Tensor& x) {
  at::Tensor ap = at::softplus(alpha_p), an = beta + at::softplus(alpha_n);
  at::Tensor b = beta.to(x.scalar_type()), e = eps.to(x.scalar_type());
  at::Tensor pos = ap * x * x + b * x;
  at::Tensor neg = (at::expm1(at::minimum(x, e)) - x) * an + b * x;
  return at::where(x > 0, pos, neg);
}

MLPImpl::MLPImpl(const ModelConfig& c) : act(c.hidden_act) {
  auto lin = [&](std::int64_t in, std::int64_t out) { return detail::make_linear(in, out, c.mlp_bias); };
  if (c.gated_mlp())
    gate_proj = register_module("gate_proj", lin(c.hidden_size, c.intermediate_size));
  up_proj = register_module("up_proj", lin(c.hidden_size, c.intermediate_size));
  down_proj = register_module("down_proj", lin(c.intermediate_size, c.hidden_size));
  if (!c.gated_mlp()) act_fn = register_module("act_fn", XIELU());
}

at::Tensor MLPImpl::forward(const at::Tensor& x) {
  if (!gate_proj) return linear(down_proj, act_fn(linear(up_proj, x)));
  at::Tensor g = linear(gate_proj, x);  // [B, T, I]
  if (fused && act == "silu") return linear(down_proj, fused_swiglu(g, linear(up_proj, x)));
  if (act == "silu")
    g = at::silu(g);
  else if (act == "gelu")
    g = at::gelu(g);
  else if (act == "gelu_pytorch_tanh")
    g = at::gelu(g, "tanh");
  else
    g = at::relu(g);
  return linear(down_proj, g * linear(up_proj, x));
}

// --- attention --------------------------------------------------------------

at::Tensor cache_append(at::Tensor& buf, const at::Tensor& view, const at::Tensor& x, std::int64_t dim) {
  const std::int64_t len = view.defined() ? view.size(dim) : 0, n = x.size(dim);
  const at::Tensor src = view.defined() ? x.to(view.scalar_type()) : x;
  const bool in_buf = view.defined() && buf.defined() && view.is_alias_of(buf) &&
                      view.data_ptr() == buf.data_ptr() && view.sizes().size() == buf.sizes().size();
  if (!view.defined() || !in_buf || buf.size(dim) < len + n) {
    // Fresh storage: exactly the slots needed at first (a prefill that is never extended
    // costs nothing extra), then double.
    const std::int64_t old_cap = in_buf ? buf.size(dim) : 0;
    auto sizes = src.sizes().vec();
    sizes[static_cast<std::size_t>(dim)] = std::max(len + n, 2 * old_cap);
    at::Tensor grown = at::empty(sizes, src.options());
    if (len > 0) grown.narrow(dim, 0, len).copy_(view);
    buf = grown;
  }
  buf.narrow(dim, len, n).copy_(src);
  return buf.narrow(dim, 0, len + n);
}

AttentionImpl::AttentionImpl(const ModelConfig& c)
    : n_heads(c.num_attention_heads),
      n_kv_heads(c.num_key_value_heads),
      head_dim(c.head_dim),
      dropout(c.attention_dropout),
      layout(c.rope_interleave ? RopeLayout::Interleaved : RopeLayout::HalfSplit) {
  auto lin = [&](std::int64_t in, std::int64_t out, bool bias) { return detail::make_linear(in, out, bias); };
  q_proj = register_module("q_proj", lin(c.hidden_size, n_heads * head_dim, c.attention_bias));
  k_proj = register_module("k_proj", lin(c.hidden_size, n_kv_heads * head_dim, c.attention_bias));
  v_proj = register_module("v_proj", lin(c.hidden_size, n_kv_heads * head_dim, c.attention_bias));
  o_proj = register_module("o_proj", lin(n_heads * head_dim, c.hidden_size, c.attention_bias));
  if (c.qk_norm) {
    q_norm = register_module("q_norm", RMSNorm(head_dim, c.rms_norm_eps));
    k_norm = register_module("k_norm", RMSNorm(head_dim, c.rms_norm_eps));
  }
}

at::Tensor AttentionImpl::forward(const at::Tensor& x, const AttentionInputs& in, LayerKV* cache) {
  const auto B = x.size(0), T = x.size(1);
  at::Tensor q = linear(q_proj, x).view({B, T, n_heads, head_dim}).transpose(1, 2);     // [B, H, T, D]
  at::Tensor k = linear(k_proj, x).view({B, T, n_kv_heads, head_dim}).transpose(1, 2);  // [B, Hkv, T, D]
  at::Tensor v = linear(v_proj, x).view({B, T, n_kv_heads, head_dim}).transpose(1, 2);  // [B, Hkv, T, D]
  if (q_norm) {  // Apertus: per-head RMSNorm before RoPE
    q = q_norm(q);
    k = k_norm(k);
  }
  q = fused ? fused_rope(q, in.cos, in.sin, layout) : apply_rope(q, in.cos, in.sin, layout);
  k = fused ? fused_rope(k, in.cos, in.sin, layout) : apply_rope(k, in.cos, in.sin, layout);
  if (cache) {
    k = cache->k = cache_append(cache->k_buf, cache->k, k, 2);  // [B, Hkv, S, D]
    v = cache->v = cache_append(cache->v_buf, cache->v, v, 2);
  }
  AttentionOptions opt = in.attention;
  opt.dropout_p = is_training() ? dropout : 0.0;
  // q, k, v can differ in dtype under autocast (the cache keeps its dtype).
  const auto dt = q.scalar_type();
  at::Tensor out = rhine::attention(q, k.to(dt), v.to(dt), opt);  // [B, H, T, D]
  return linear(o_proj, out.transpose(1, 2).reshape({B, T, n_heads * head_dim}));
}

}  // namespace rhine::nn
