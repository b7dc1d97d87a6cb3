#pragma once
/// \file
/// The memory and throughput planner behind `rhine-plan`: for a model config
/// (nn::ModelConfig), a layout (Layout: ranks, ZeRO stage, expert
/// parallelism, micro-batch, accumulation, checkpointing, dtypes) and a device
/// kind (DeviceKind: memory, peak rate, link speeds), plan() gives each rank's
/// memory by category and an estimated step time, tokens/s and MFU, from the
/// formulas below (docs/plan.md states them with their sources).
///
///     auto cfg = rhine::nn::ModelConfig::from_file("config.json");
///     rhine::plan::Layout layout;
///     layout.fsdp = 8; layout.zero = 3; layout.seq_len = 8192; layout.micro_batch = 2;
///     layout.device = "H100";
///     rhine::plan::Plan p = rhine::plan::plan(cfg, layout);
///     std::cout << p.to_text();                    // or p.to_json().dump(2)
///
/// Letters: P parameters (exact, from parameter_shapes()), W the parameters a
/// rank holds whole, S its shard, N ranks, t = micro_batch * seq_len tokens
/// per rank and micro-batch, L layers, C hidden, V vocabulary, a the bytes of
/// an activation (2 under bf16 autocast, 4 in fp32), g the bytes of a
/// gathered weight (param_dtype: 2 or 4).
///
/// Memory per rank (the largest over ranks), following docs/parallel.md:
///   data parallel  parameters 4W, gradients 4W, GradientSync's bucket copy
///                  4W (communication; only with N > 1), AdamW 8W.
///   ZeRO-1         as data parallel, AdamW 8 x (the largest share of the
///                  greedy size-ordered partition dist::ShardedOptimizer uses).
///   FSDP ZeRO-2    parameters 4S (fp32 shards) + gW (the replicated gathered
///                  weights), gradients 4S + 4 x root unit (the root's full
///                  gradients live until finish()), AdamW 8S; communication:
///                  one unit's full fp32 gradients and its reduce-scatter
///                  buffer (8 x largest unit).
///   FSDP ZeRO-3    parameters 4S, gradients and AdamW as ZeRO-2;
///                  communication: the root unit and two blocks gathered
///                  (the running one and the prefetched one) in g bytes, plus
///                  8 x largest unit for the reduce-scatter.
///   accumulation   (grad_accum > 1, ZeRO-2/3) full-size fp32 gradient
///                  accumulators 4W (FSDP's no_sync, as FSDP2).
///   experts        (ep > 1) routed experts' parameters count 1/ep per rank
///                  (then 1/(fsdp/ep) of that under ZeRO-2/3); they are not
///                  gathered.
/// S is exact: each parameter of R rows keeps ceil(R/N) rows on rank 0.
/// Activations: activation_bytes_per_token() x t (docs/plan.md gives the
/// per-layer terms, Korthikanti et al. 2022 adapted to Rhine's blocks);
/// with activation checkpointing only each block's fp32 input is kept, plus one
/// block's activations while it is recomputed. The peak is the baseline plus
/// the sum of the categories; on the "cpu" kind also at least the whole fp32
/// model Rhine builds before sharding (4P) plus the shards.
///
/// Time per optimizer step: compute = tokens per rank x F / (peak x
/// efficiency) with F = 6 x (matmul parameters per token) + 6 x L x H x
/// (d_qk + d_v) x T (attention, not halved for causality, as PaLM and
/// torchtitan count it), x 4/3 with checkpointing (the recomputed forward);
/// communication per collective from its ring volume over the link its group
/// crosses (all-reduce 2(n-1)/n X, all-gather and reduce-scatter (n-1)/n X,
/// all-to-all (n-1)/n X); gathers and gradient reductions overlap compute,
/// all-to-alls and ZeRO-1's weight broadcast do not:
/// step = max(compute, overlapped) + exposed. MFU = 6-style model FLOPs /
/// (step x peak).
///
/// Torch-free (it reads only nn::ModelConfig); compiled into rhine::rhine
/// because ModelConfig's parser lives there.

#include <cstdint>
#include <string>
#include <vector>

#include "rhine/core/json.h"
#include "rhine/nn/config.h"

namespace rhine::plan {

// --- parameters ---------------------------------------------------------------

/// What a parameter is, for the accounting.
enum class ParamKind {
  kEmbedding,     ///< model.embed_tokens.weight
  kHead,          ///< lm_head.weight (absent when tied)
  kNorm,          ///< RMSNorm gains (layers, final, MLA latents, MTP)
  kAttention,     ///< q/k/v/o, MLA projections, q_norm/k_norm
  kMlp,           ///< dense MLP (incl. xIELU's alpha_p/alpha_n)
  kRouter,        ///< MoE gate weight [E, C]
  kRoutedExpert,  ///< mlp.experts.{e}.*
  kSharedExpert,  ///< mlp.shared_experts.*
  kMtpProjection, ///< MTP eh_proj [C, 2C]
};

/// One parameter of the model nn::CausalLM builds for a config, under its name.
struct ParamShape {
  std::string name;                ///< e.g. "model.layers.0.self_attn.q_proj.weight"
  std::vector<std::int64_t> shape; ///< e.g. [H*D, C]
  ParamKind kind = ParamKind::kAttention;
  /// FSDP unit: 0 the root (embeddings, final norm, head), 1 + i block i
  /// (main layers 0..L-1, then the MTP modules).
  std::int64_t unit = 0;
  /// Element count (product of shape).
  std::int64_t numel() const;
};

/// Every trainable parameter of nn::CausalLM(config), with the names and
/// shapes of its named_parameters() and in their order (buffers such as
/// e_score_correction_bias and the MTP modules' weight aliases excluded).
/// Calls config.validate() first.
std::vector<ParamShape> parameter_shapes(const nn::ModelConfig& config);

/// Parameter counts (elements).
struct ParamCounts {
  std::int64_t total = 0;           ///< P: CausalLM::num_parameters()
  std::int64_t embedding = 0;       ///< embed_tokens + lm_head (once when tied)
  std::int64_t routed_experts = 0;  ///< every routed expert (MTP modules' included)
  std::int64_t mtp = 0;             ///< the MTP modules (blocks, norms, eh_proj)
  /// Per token: embeddings, norms, attention, dense MLPs, router, shared and K
  /// routed experts per MoE layer; MTP excluded (nn::active_parameter_count).
  std::int64_t active = 0;
  std::int64_t root_unit = 0;      ///< FSDP's root unit
  std::int64_t largest_block = 0;  ///< FSDP's largest block unit
  std::int64_t n_blocks = 0;       ///< L + MTP modules
};

/// The counts of parameter_shapes(config).
ParamCounts count_parameters(const nn::ModelConfig& config);

// --- devices ------------------------------------------------------------------

/// A device kind: memory and peak rates of one device (one GPU, one GCD of an
/// MI250X, one MI300A APU, or one CPU rank). Rates are per direction.
struct DeviceKind {
  std::string name;         ///< "H100", "H200", "GH200", "MI250X", "MI300A", "cpu"
  std::string description;  ///< what exactly, e.g. "NVIDIA H100 SXM5, 80 GB HBM3"
  double memory_bytes = 0;  ///< device memory (0: not checked)
  double peak_flops = 0;    ///< dense bf16 FLOP/s (fp32 for "cpu")
  double intra_node_bytes_per_s = 0;  ///< to a peer in the node, per direction
  double inter_node_bytes_per_s = 0;  ///< to other nodes, per device and direction
  int devices_per_node = 1;
  /// Bytes a rank holds before the model exists (runtime, libraries, process
  /// group): measured for "cpu" (docs/plan.md), 0 for the GPUs (their CUDA /
  /// ROCm context and collective buffers are not modelled).
  double baseline_bytes = 0;
  std::string source;  ///< where the figures come from
};

/// The table: H100, H200, GH200, GH200-144, MI250X, MI300A, cpu.
const std::vector<DeviceKind>& device_kinds();
/// The kind called `name` (case-insensitive). Throws rhine::Error "[plan]
/// unknown device kind, got NAME; known: ..." otherwise.
const DeviceKind& device_kind(const std::string& name);

// --- layout -------------------------------------------------------------------

/// How the ranks share the model, and the batch (one options struct).
struct Layout {
  /// Ranks = dp x fsdp. ZeRO 0/1: dp ranks of data parallelism (fsdp 1).
  /// ZeRO 2/3: fsdp ranks shard, dp replicas of that (hybrid, FSDP2's HSDP:
  /// Rhine's FSDPOptions::shard_size, the run config's "fsdp").
  int dp = 1;
  int fsdp = 1;
  /// Expert parallelism: routed experts split over ep ranks (divides the
  /// ranks and n_routed_experts; under ZeRO-2/3 it divides fsdp).
  int ep = 1;
  /// 0 data parallel, 1 ZeRO-1, 2 FSDP ZeRO-2, 3 FSDP ZeRO-3.
  int zero = 0;
  std::int64_t seq_len = 2048;     ///< tokens per row
  std::int64_t micro_batch = 1;    ///< rows per rank and micro-step
  std::int64_t grad_accum = 1;     ///< micro-steps per optimizer step
  bool activation_checkpointing = false;
  bool bf16 = true;                ///< bf16 autocast (activations 2 bytes); false: fp32
  std::string param_dtype = "float32";  ///< FSDP's gathered weights: "float32" or "bfloat16"
  bool reshard_after_forward = true;    ///< ZeRO-3: gather again for backward
  std::string device = "H100";          ///< a device_kinds() name
  /// Fraction of peak_flops the matmuls reach (an assumption, stated in the
  /// output; 0.5 by default).
  double compute_efficiency = 0.5;

  int ranks() const { return dp * fsdp; }
  /// Throws rhine::Error "[plan] ..." naming the value and a hint for a layout
  /// that cannot run `config` (fsdp with zero < 2, ep not dividing, ...).
  void validate(const nn::ModelConfig& config) const;
};

// --- results ------------------------------------------------------------------

/// Bytes per rank (the largest over ranks).
struct MemoryEstimate {
  double parameters = 0, gradients = 0, optimizer = 0, activations = 0, communication = 0;
  double baseline = 0;      ///< the device kind's baseline_bytes
  double construction = 0;  ///< building the whole fp32 model, then its shards (4P + 4S)
  /// baseline + the categories' sum ("cpu": at least baseline + construction).
  double peak_bytes = 0;
  double capacity = 0;      ///< the device's memory (0: not checked)
  bool fits = true;         ///< peak_bytes <= capacity (or capacity unknown)
};

/// Time of one optimizer step and what it moves.
struct TimeEstimate {
  double model_flops_per_token = 0;  ///< F (6N plus attention, MTP included)
  double compute_s = 0;              ///< every micro-step's forward and backward
  /// Bytes each rank sends per step, by collective (ring volumes).
  double all_reduce_bytes = 0, all_gather_bytes = 0, reduce_scatter_bytes = 0, all_to_all_bytes = 0;
  double overlapped_s = 0;  ///< communication that overlaps compute
  double exposed_s = 0;     ///< communication that does not
  double step_s = 0;        ///< max(compute, overlapped) + exposed
  double tokens_per_step = 0;       ///< global
  double tokens_per_s = 0;          ///< global
  double tokens_per_s_per_device = 0;
  double mfu = 0;                   ///< model FLOPs / (step x peak)
};

/// plan()'s answer.
struct Plan {
  nn::ModelConfig config;
  Layout layout;
  DeviceKind device;
  ParamCounts params;
  MemoryEstimate memory;
  TimeEstimate time;
  /// What the estimate assumes that Rhine does not do yet, or did not check.
  std::vector<std::string> notes;

  Json to_json() const;
  /// The human-readable table rhine-plan prints.
  std::string to_text() const;
};

/// Bytes of activations one rank keeps per token of a micro-batch (the
/// per-layer formula of docs/plan.md summed over the blocks, the head and
/// the loss; with checkpointing the block inputs plus one block).
double activation_bytes_per_token(const nn::ModelConfig& config, const Layout& layout);

/// The estimate for `config` under `layout` (validated first).
Plan plan(const nn::ModelConfig& config, const Layout& layout);

}  // namespace rhine::plan
