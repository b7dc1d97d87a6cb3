#pragma once
/// \file
/// DeepSeekMoE (docs/architectures.md section 2): fine-grained routed experts plus
/// shared experts, V2 routing (softmax, group max, no renormalisation) and V3
/// routing (sigmoid, selection-only bias, group top-2 sum, renormalisation,
/// routed_scaling_factor), router math in fp32, the aux-loss-free bias
/// update, the sequence-wise balance loss and V2's expert-level loss.
/// Parameters under the HF names of `model.layers.{L}.mlp.`:
///
///     gate.weight                        [E, C]     (parameter)
///     gate.e_score_correction_bias       [E] fp32   (noaux_tc only; a persistent
///                                                    BUFFER: in the state dict,
///                                                    never seen by optimizers)
///     experts.{e}.{gate,up}_proj.weight  [I, C]     I = moe_intermediate_size
///     experts.{e}.down_proj.weight       [C, I]
///     shared_experts.{gate,up}_proj.weight [I*Ns, C] (when n_shared_experts > 0)
///     shared_experts.down_proj.weight    [C, I*Ns]
///
/// Experts stay separate modules (the on-Hub layout), but their weights live
/// in one stacked buffer per layer (pack_expert_weights): `gate_proj` and
/// `up_proj` of expert e are rows [0, I) and [I, 2I) of slice e of a
/// [E, 2I, C] tensor, `down_proj` is slice e of an [E, C, I] tensor. The
/// grouped dispatch sorts the (token, slot) pairs by expert, gathers each
/// expert's tokens with one index_select, runs the experts on their blocks
/// and scatters the weighted outputs back with one index_add. The experts run
/// either as two grouped GEMMs over the stacked weights (at::_grouped_mm of
/// LibTorch 2.x, with the block offsets on the device: no host read of the
/// counts) or one call per expert; the loop dispatch (each expert finds its
/// tokens with a mask) is the reference twin of both.
///
/// Dimension letters: B batch, T tokens per row, N = B*T tokens, C hidden,
/// E routed experts, K experts per token, G groups.

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/pimpl.h>

#include <memory>
#include <vector>

#include "rhine/nn/config.h"
#include "rhine/nn/layers.h"

namespace rhine::nn {

/// The routing decision for N tokens.
struct Routing {
  at::Tensor indices;  ///< [N, K] int64 selected experts
  at::Tensor weights;  ///< [N, K] fp32 combine weights (renormalised if asked, * routed_scaling_factor)
  at::Tensor scores;   ///< [N, E] fp32 affinities (softmax or sigmoid; unbiased)
  at::Tensor counts;   ///< [E] int64: (token, slot) pairs routed to each expert
};

/// Routes N tokens from their router logits [N, E] (computed in fp32) per the
/// config's scoring_func / topk_method / n_group / topk_group /
/// num_experts_per_tok / norm_topk_prob / routed_scaling_factor. `bias` [E]
/// (noaux_tc; may be undefined) is added to the scores for selection only.
/// Experts of dropped groups are masked with -inf (DeepSeek model.py; HF uses
/// 0, which differs only when biased scores are negative).
Routing route_tokens(const at::Tensor& logits, const at::Tensor& bias, const ModelConfig& config);

/// V3's complementary sequence-wise balance loss, unweighted (multiply by
/// alpha, 1e-4 in V3): mean over rows b of sum_e f_be * P_be, with
/// f_be = E / (K T) * #{t: e selected}, P_be = mean_t s'_bte and s' the
/// scores normalised to sum 1 per token. scores [B, T, E], indices [B, T, K].
at::Tensor sequence_balance_loss(const at::Tensor& scores, const at::Tensor& indices);

/// V2's expert-level balance loss, unweighted (alpha1 = 0.003 in V2): sum_e
/// f_e * P_e over all N tokens, f_e = E / (K N) * #{t: e selected},
/// P_e = mean_t s_te. scores [N, E], indices [N, K].
at::Tensor expert_balance_loss(const at::Tensor& scores, const at::Tensor& indices);

/// The router: `weight` [E, C] and, for noaux_tc, the buffer
/// `e_score_correction_bias` [E] (fp32, zeros initially).
class MoEGateImpl : public torch::nn::Module {
 public:
  explicit MoEGateImpl(const ModelConfig& config);
  /// x [N, C] (any float dtype) -> routing computed in fp32 (autocast off).
  Routing forward(const at::Tensor& x);
  at::Tensor weight, e_score_correction_bias;
  ModelConfig config;
};
TORCH_MODULE(MoEGate);

/// The (token, slot) pairs of N tokens sorted by expert (stable): each
/// expert's tokens form one contiguous block of `tokens`, in expert order.
struct ExpertBatch {
  at::Tensor token;    ///< [N*K] int64: the token of each sorted pair
  at::Tensor tokens;   ///< [N*K, C]: x's rows, sorted by expert
  at::Tensor weights;  ///< [N*K] fp32: each pair's combine weight
  std::vector<std::int64_t> counts;  ///< [E] on the host: pairs per expert (empty unless asked)
};

/// Sorts the routed pairs of x [N, C] by expert (the grouped dispatch's first
/// half). `host_counts`: also read the pairs per expert to the host (one
/// synchronisation; the per-expert calls and expert parallelism need them).
ExpertBatch sort_by_expert(const at::Tensor& x, const Routing& routing, bool host_counts = true);

/// The grouped dispatch's second half: ys [N*K, C] (expert outputs in
/// batch's order) weighted and summed per token -> [N, C].
at::Tensor combine_experts(const ExpertBatch& batch, const at::Tensor& ys, std::int64_t n_tokens);

class MoEImpl;

/// Runs a layer's routed experts somewhere else than in this process
/// (expert parallelism: rhine/dist/expert_parallel.h). Set on the layers by
/// a parallel wrapper, as nn::ForwardHooks on the model.
class ExpertDispatch {
 public:
  virtual ~ExpertDispatch() = default;
  /// x [N, C] and its routing -> the routed experts' weighted sum [N, C]
  /// (shared experts excluded), as MoEDispatch::Grouped computes it.
  virtual at::Tensor run(MoEImpl& layer, const at::Tensor& x, const Routing& routing) = 0;
};

/// Weights of the balance losses an MoE forward computes (0: not computed).
struct BalanceLossWeights {
  double sequence = 0.0;  ///< V3's sequence-wise loss (1e-4 in V3)
  double expert = 0.0;    ///< V2's expert-level loss (0.003 in V2)
  bool any() const { return sequence != 0.0 || expert != 0.0; }
};

/// What one MoE layer's forward returns (its statistics travel with the
/// output, never in the module, so a recomputed forward cannot clobber them).
struct MoEOutput {
  at::Tensor y;         ///< [B, T, C]
  at::Tensor counts;    ///< [E] int64: (token, slot) pairs routed to each expert
  /// Scalar fp32 (differentiable): sequence * sequence_balance_loss +
  /// expert * expert_balance_loss; undefined when no weight is set.
  at::Tensor aux_loss;
};

/// How MoE runs the routed experts.
enum class MoEDispatch {
  /// GroupedGemm on CUDA when grouped_gemm_available() and the experts
  /// compute in bf16 (autocast); Grouped everywhere else.
  Auto,
  Grouped,      ///< sort by expert, one call per expert on its block
  /// Sort by expert, then the gate/up and down projections of all experts as
  /// two at::_grouped_mm calls (LibTorch 2.x; refused without it). Every
  /// expert gets a gradient (zero for an expert no token chose, where the
  /// other dispatches leave it undefined). Needs SwiGLU experts without bias
  /// or LoRA adapters, computing in fp32, bf16 or fp16, with hidden and expert
  /// widths of a multiple of 16 bytes (else it runs as Grouped).
  GroupedGemm,
  Loop,         ///< reference twin: each expert masks out its tokens
};

/// True when this LibTorch has at::_grouped_mm (2.x), the entry point of
/// MoEDispatch::GroupedGemm. On CUDA it is one kernel (bf16, sm80+); on the
/// CPU LibTorch runs it as a loop of GEMMs.
bool grouped_gemm_available();

/// One DeepSeekMoE layer: y = sum_k w_k FFN_{e_k}(x) + FFN_shared(x).
class MoEImpl : public torch::nn::Module {
 public:
  explicit MoEImpl(const ModelConfig& config);
  /// x [B, T, C] -> y [B, T, C], the expert counts and, when a weight is
  /// set, the balance loss.
  MoEOutput forward(const at::Tensor& x, const BalanceLossWeights& balance = {});
  /// Adds the aux-loss-free update b_e += gamma * sign(mean(counts) - counts_e)
  /// to e_score_correction_bias. counts [E] (any dtype: e.g. all-reduced over
  /// data-parallel ranks first). No-op without the bias (not noaux_tc).
  void update_bias(const at::Tensor& counts, double gamma);

  MoEGate gate{nullptr};
  torch::nn::ModuleList experts{nullptr};
  std::vector<MLP> expert_list;  ///< typed views of `experts`
  MLP shared_experts{nullptr};
  MoEDispatch dispatch = MoEDispatch::Auto;
  /// When set, runs the routed experts instead of `dispatch` (expert
  /// parallelism). Set by a parallel wrapper, once, after construction.
  void set_expert_dispatch(std::shared_ptr<ExpertDispatch> d) { expert_dispatch_ = std::move(d); }
  const std::shared_ptr<ExpertDispatch>& expert_dispatch() const { return expert_dispatch_; }
  /// Moves the routed experts' weights into the stacked layout of the file
  /// comment (one copy; values, parameter objects and names unchanged).
  /// Anything that gives a parameter new storage (module.to(), a zero-copy
  /// import, FSDP) undoes it; the grouped GEMM then stacks per forward (a
  /// copy) until this runs again. No-op for weights already packed.
  void pack_experts();
  /// True when the experts' weights are in the stacked layout.
  bool experts_packed() const;

 private:
  std::shared_ptr<ExpertDispatch> expert_dispatch_;
};
TORCH_MODULE(MoE);

/// MoEImpl::pack_experts() on every MoE layer under `root` (a CausalLM after
/// loading or moving it to its device). Returns the number of layers.
int pack_expert_weights(torch::nn::Module& root);

/// The config of one expert MLP: `config` with intermediate_size = width.
ModelConfig expert_config(const ModelConfig& config, std::int64_t width);

}  // namespace rhine::nn
