#pragma once
/// \file
/// Building blocks of Llama-family decoders, with parameters under the
/// Hugging Face names (docs/architectures.md sections 0, 4, 5, 6.4): RMSNorm,
/// RoPE (rotate_half and interleaved layouts; none / linear / llama3 / yarn
/// scaling), SwiGLU and Apertus' ungated xIELU MLP, and GQA attention with
/// optional QK-norm through rhine::attention.
///
/// Dimension letters: B batch, T query length, S key length (cache + new),
/// C hidden size, H query heads, Hkv key/value heads, D head dim, I MLP width.

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <optional>
#include <vector>

#include "rhine/nn/config.h"
#include "rhine/torch/compat.h"

namespace rhine::nn {

// --- RMSNorm ----------------------------------------------------------------

/// HF RMSNorm: w * cast_to_input_dtype(x_f32 * rsqrt(mean(x_f32^2, -1) + eps)).
/// x [..., N], weight [N] -> [..., N]. The plain-op reference and the module's math.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

/// RMSNorm over the last dimension; parameter `weight` [N], initialised to 1.
class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(std::int64_t dim, double eps);
  /// x [..., N] -> [..., N]
  at::Tensor forward(const at::Tensor& x);
  at::Tensor weight;
  double eps;
  /// Use the fused CPU kernel (rhine/nn/fused.h) instead of the plain ops.
  bool fused = false;
};
TORCH_MODULE(RMSNorm);

// --- RoPE -------------------------------------------------------------------

/// Which dimension pairs RoPE rotates: (j, j + D/2) as HF's rotate_half, or
/// (2j, 2j + 1) as Meta's original and DeepSeek checkpoints.
enum class RopeLayout { HalfSplit, Interleaved };

/// The inverse frequencies of one rotary head and the cos/sin amplitude.
struct RopeFrequencies {
  std::vector<double> inv_freq;   ///< [D/2], computed in float64
  double attention_factor = 1.0;  ///< multiplies cos and sin (yarn's mscale)
};

/// Inverse frequencies for `dim` rotary dims (even) per docs/architectures.md 4.2/4.3:
/// default theta^(-2j/dim); linear /factor; llama3 band-wise; yarn ramp + mscale.
/// `max_position_embeddings` stands in for a missing original_max_position_embeddings.
RopeFrequencies rope_frequencies(const RopeParameters& rope, std::int64_t dim,
                                 std::int64_t max_position_embeddings);

/// yarn's get_mscale: 1 if scale <= 1 else 0.1 * mscale * ln(scale) + 1.
double yarn_get_mscale(double scale, double mscale = 1.0);

/// cos and sin tables for integer positions [B, T] -> each [B, T, D], laid out
/// for `layout` and multiplied by the attention factor. Angles are computed in
/// float64 and the tables returned in `dtype` (float32 as HF; float64 for
/// float64 models).
std::pair<at::Tensor, at::Tensor> rope_cos_sin(const RopeFrequencies& freqs,
                                               const at::Tensor& positions, RopeLayout layout,
                                               at::ScalarType dtype = at::kFloat);

/// Rotates x [B, H, T, D] by cos/sin [B, T, D]: x * cos + rotate(x) * sin, in
/// x's dtype (cos/sin are cast to it, as HF does).
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      RopeLayout layout);

// --- MLPs -------------------------------------------------------------------

/// xIELU (Apertus): alpha_p*x^2 + beta*x for x > 0, alpha_n*(expm1(min(x, eps)) - x)
/// + beta*x otherwise, alpha_p = softplus(alpha_p_raw), alpha_n = beta +
/// softplus(alpha_n_raw). Parameters `alpha_p` [1], `alpha_n` [1]; persistent
/// buffers `beta` (0.5) and `eps` (-1e-6), scalars (shape []) as in HF.
class XIELUImpl : public torch::nn::Module {
 public:
  XIELUImpl();
  /// x [...] -> [...]
  at::Tensor forward(const at::Tensor& x);
  at::Tensor alpha_p, alpha_n, beta, eps;
};
TORCH_MODULE(XIELU);

/// The MLP of one decoder layer. Gated (hidden_act != xielu):
/// down_proj(act(gate_proj(x)) * up_proj(x)); ungated (Apertus):
/// down_proj(xielu(up_proj(x))) with the activation registered as `act_fn`.
/// Weights gate_proj/up_proj [I, C], down_proj [C, I].
class MLPImpl : public torch::nn::Module {
 public:
  explicit MLPImpl(const ModelConfig& config);
  /// x [B, T, C] -> [B, T, C]
  at::Tensor forward(const at::Tensor& x);
  torch::nn::Linear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
  XIELU act_fn{nullptr};
  std::string act;
  /// silu-gated MLPs use fused_swiglu (rhine/nn/fused.h) for act(gate) * up.
  bool fused = false;
};
TORCH_MODULE(MLP);

// --- attention --------------------------------------------------------------

/// Keys and values a layer has seen so far: k [B, Hkv, S, D], v [B, Hkv, S, D]
/// (after RoPE and k-norm). Undefined tensors = empty cache. k and v are views
/// of the first S slots of k_buf / v_buf, which grow by doubling (cache_append).
struct LayerKV {
  at::Tensor k, v;
  at::Tensor k_buf, v_buf;  ///< storage: [B, Hkv, capacity >= S, D]
};

/// Appends `x` to a cache along `dim` and returns the view of all cached slots:
/// `view` (the current cached slots, undefined when empty) lives at the start of
/// `buf`, whose capacity along `dim` doubles when full, so a token costs O(1)
/// amortised copying instead of at::cat's O(S). A `view` that does not live in
/// `buf` (set from outside) is copied into fresh storage first. The cache keeps the
/// dtype it started with (`x` is converted).
at::Tensor cache_append(at::Tensor& buf, const at::Tensor& view, const at::Tensor& x, std::int64_t dim);

/// Per-call inputs shared by all layers: the rotary tables of the new tokens
/// and the attention mask options (mask [B, 1, T, S] bool or is_causal).
struct AttentionInputs {
  at::Tensor cos, sin;  ///< [B, T, D] float32 (float64 for float64 models)
  AttentionOptions attention;
};

/// Multi-head attention with GQA/MQA (num_key_value_heads), optional biases,
/// optional QK-norm (q_norm/k_norm [D], before RoPE), RoPE, and a KV cache.
/// Weights q_proj [H*D, C], k_proj and v_proj [Hkv*D, C], o_proj [C, H*D].
class AttentionImpl : public torch::nn::Module {
 public:
  explicit AttentionImpl(const ModelConfig& config);
  /// x [B, T, C] -> [B, T, C]. With `cache`, its k/v are extended by the T new
  /// positions and attention runs over all S keys.
  at::Tensor forward(const at::Tensor& x, const AttentionInputs& in, LayerKV* cache = nullptr);
  torch::nn::Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};
  RMSNorm q_norm{nullptr}, k_norm{nullptr};
  std::int64_t n_heads, n_kv_heads, head_dim;
  double dropout;
  RopeLayout layout;
  /// Rotate q and k with fused_rope (rhine/nn/fused.h) instead of apply_rope.
  bool fused = false;
};
TORCH_MODULE(Attention);

/// Switches the fused CPU kernels (rhine/nn/fused.h) on or off in every
/// RMSNorm, Attention (RoPE) and MLP (SwiGLU) below `root` (itself included):
/// what CausalLMOptions::fused_kernels does. Values and gradients equal the
/// plain ops to rounding.
void set_fused_kernels(torch::nn::Module& root, bool on);

}  // namespace rhine::nn
