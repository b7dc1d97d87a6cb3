#pragma once
/// \file
/// The decoder-only causal LM of the Llama family (llama, mistral, apertus)
/// and of DeepSeek-V2/V3 (MLA attention, DeepSeekMoE, multi-token
/// prediction), composed from a ModelConfig, with parameters under the HF
/// names so that `named_parameters()` (plus `named_buffers()` for
/// e_score_correction_bias and the MTP aliases) matches a checkpoint one to one:
///
///     model.embed_tokens.weight                 [V, C]
///     model.layers.{L}.input_layernorm.weight   [C]   (apertus: attention_layernorm)
///     model.layers.{L}.self_attn.{q,k,v,o}_proj.weight (+ q_norm/k_norm [D])
///     model.layers.{L}.post_attention_layernorm.weight [C] (apertus: feedforward_layernorm)
///     model.layers.{L}.mlp.{gate,up,down}_proj.weight  (apertus: up/down + act_fn.alpha_{p,n})
///     model.norm.weight                         [C]
///     lm_head.weight                            [V, C]  (absent when tie_word_embeddings)
///
/// DeepSeek layers (rhine/nn/mla.h, rhine/nn/moe.h): `self_attn.*` is MLA when
/// config.uses_mla(); `mlp.*` is MoE on the layers config.is_moe_layer(L)
/// picks. MTP modules (rhine/nn/mtp.h) are the extra layers
/// `model.layers.{num_hidden_layers + k}` for k < num_nextn_predict_layers,
/// stored as DeepSeek-V3 checkpoints store them.
///
/// Dimension letters: B batch, T new tokens, S keys (cache + new), C hidden,
/// V vocabulary.
///
///     auto cfg = rhine::nn::ModelConfig::from_file("config.json");
///     rhine::nn::CausalLM lm(cfg);
///     auto out = lm->forward(ids);             // out.logits [B, T, V]

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "rhine/nn/config.h"
#include "rhine/nn/layers.h"
#include "rhine/nn/loss.h"
#include "rhine/nn/mla.h"
#include "rhine/nn/moe.h"

namespace rhine::nn {

class MTPLayerImpl;

/// One pre-norm block: h = x + attn(norm1(x)); out = h + mlp(norm2(h)).
/// attn is standard attention or MLA (config.uses_mla()), mlp a dense MLP or
/// an MoE (config.is_moe_layer(layer)); both registered as `self_attn` / `mlp`.
/// What a block returns: the hidden state and, for an MoE block, its routing
/// statistics (MoEOutput's counts and aux_loss; undefined for a dense block).
struct BlockOutput {
  at::Tensor h;         ///< [B, T, C]
  at::Tensor counts;    ///< [E] int64
  at::Tensor aux_loss;  ///< scalar fp32, weighted balance losses (when a weight is set)
};

class DecoderLayerImpl : public torch::nn::Module {
 public:
  explicit DecoderLayerImpl(const ModelConfig& config, std::int64_t layer = 0);
  /// x [B, T, C] -> h [B, T, C] (and MoE statistics). `cache` serves standard
  /// attention, `latent` MLA; `balance` weighs an MoE block's balance losses.
  BlockOutput forward(const at::Tensor& x, const AttentionInputs& in, LayerKV* cache = nullptr,
                      LatentKV* latent = nullptr, const BalanceLossWeights& balance = {});
  RMSNorm norm1{nullptr}, norm2{nullptr};
  Attention self_attn{nullptr};  ///< standard attention (null for MLA layers)
  MLA mla{nullptr};              ///< MLA (null otherwise); named self_attn
  MLP mlp{nullptr};              ///< dense MLP (null for MoE layers)
  MoE moe{nullptr};              ///< MoE (null otherwise); named mlp
};
TORCH_MODULE(DecoderLayer);

/// Activation checkpointing of one block (what
/// CausalLMOptions::activation_checkpointing applies to every block): runs
/// fn(x) without keeping its activations and returns its outputs; in
/// backward runs fn again, under the generator state of x's device and the
/// autocast state of the first run, and back-propagates the gradients of h
/// and aux_loss through it. `fn` must hold what it uses (module holders,
/// inputs) by value. x must require grad for any gradient to flow.
BlockOutput checkpoint_block(std::function<BlockOutput(const at::Tensor&)> fn, const at::Tensor& x);

/// The KV cache of a whole model for incremental decoding.
struct KVCache {
  std::vector<LayerKV> layers;  ///< one per layer; k/v [B, Hkv, S, D]
  /// One per layer for MLA models: the latent cache (Rkv + Dr per token).
  std::vector<LatentKV> latent;
  /// [B, S] bool: which cached key slots are real tokens (false = padding).
  at::Tensor key_valid;
  at::Tensor key_valid_buf;  ///< its storage (cache_append, layers.h)
  /// [B] int64: the position id the next token of each row gets.
  at::Tensor next_position;
  /// Whether `key_valid` may hold a false (kept on the host, so that decoding
  /// picks the unmasked attention path without reading the device).
  bool padded = false;
  /// Number of cached key slots S.
  std::int64_t length() const {
    if (!layers.empty() && layers[0].k.defined()) return layers[0].k.size(2);
    if (!latent.empty() && latent[0].ckv.defined()) return latent[0].ckv.size(1);
    return 0;
  }
};

/// Inputs of CausalLM::forward besides the token ids.
struct ForwardOptions {
  /// [B, T] int64 position ids. Default: 0..T-1 (continuing the cache:
  /// `cache->next_position`, or counting only valid tokens when
  /// `attention_mask` marks padding).
  std::optional<at::Tensor> position_ids;
  /// [B, T] bool/int (1 = real token, 0 = padding) for the NEW tokens; with a
  /// cache, earlier slots come from `cache->key_valid`. Padding keys are masked.
  std::optional<at::Tensor> attention_mask;
  /// Packed sequences: a token attends only to earlier tokens of its own
  /// document, where a document starts wherever position_ids is 0.
  /// Attention then runs once per document with no [B, 1, T, T] mask
  /// (AttentionOptions::document_starts) when the starts are known on the
  /// host: from `document_starts`, or from position_ids on the CPU. Otherwise
  /// (position ids on a device and no starts), and with padding, a sliding
  /// window shorter than T or a KV cache, the dense mask is built.
  bool document_mask = false;
  /// With document_mask: where each row's documents start (token offsets,
  /// ascending, the first 0), as the Trainer computes them from the batch
  /// before it moves to the device. Empty: derived as above.
  std::vector<std::vector<std::int64_t>> document_starts;
  /// Next-token targets aligned with the inputs ([B, T] int64, already shifted
  /// by the data loader); `ignore_index` entries carry no loss.
  std::optional<at::Tensor> labels;
  std::int64_t ignore_index = -100;
  /// Adds z_loss * mean(logsumexp(logits)^2) over the counted tokens (PaLM).
  double z_loss = 0.0;
  /// KV cache to read and extend (generation). nullptr = no cache.
  KVCache* cache = nullptr;
  /// Return logits of the last position only ([B, 1, V]; generation).
  bool last_logits_only = false;
  /// MTP loss weight lambda: loss += lambda / D * sum_k CE_k (DeepSeek-V3
  /// trains with 0.3, then 0.1). MTP modules run only with labels and
  /// lambda > 0; the default 0 keeps `loss` the next-token loss for any
  /// caller that passes labels (the Trainer sets TrainerOptions::mtp_lambda).
  double mtp_lambda = 0.0;
  /// Weight of the sequence-wise balance loss of every MoE layer (V3: 1e-4).
  double moe_seq_aux_alpha = 0.0;
  /// Weight of V2's expert-level balance loss of every MoE layer (V2: 0.003).
  double moe_expert_aux_alpha = 0.0;
};

/// Numbers a training loop logs per step: detached 0-dim tensors on the
/// model's device (so that a forward never waits for the host; read them with
/// rhine::host_value, or pack them into one rhine::to_host per step, as the
/// Trainer does). All defined when the forward had labels, undefined otherwise.
struct ForwardStats {
  at::Tensor ce_loss;   ///< fp32: mean cross-entropy over counted tokens
  at::Tensor z_loss;    ///< fp32: z-loss term (already multiplied by its weight)
  at::Tensor n_tokens;  ///< int64: tokens that carried loss
  at::Tensor aux_loss;  ///< fp32: MoE balance losses (weighted, summed over layers; 0 without)
  at::Tensor mtp_loss;  ///< fp32: lambda / D * sum_k mtp_ce[k] (0 when MTP did not run)
  std::vector<at::Tensor> mtp_ce;      ///< per MTP depth k: its mean cross-entropy
  std::vector<at::Tensor> mtp_tokens;  ///< per depth: tokens that carried loss (int64)
};

/// Outputs of CausalLM::forward.
struct ForwardOutput {
  at::Tensor logits;  ///< [B, T, V] (or [B, 1, V]) in the compute dtype
  /// Scalar fp32: ce + z + aux_loss + mtp_loss; undefined without labels.
  at::Tensor loss;
  /// Scalar: weighted MoE balance losses summed over MoE layers (part of
  /// `loss`); undefined when no balance loss was asked for.
  at::Tensor aux_loss;
  /// Scalar: the weighted MTP loss (part of `loss`); undefined when MTP did not run.
  at::Tensor mtp_loss;
  /// [n_moe_layers, E] int64: tokens routed to each expert by each MoE layer
  /// (main layers, then MTP layers; zeros for MTP layers that did not run).
  /// Sum over micro-batches, all-reduce over data-parallel ranks, then pass
  /// to CausalLM::update_router_bias. Undefined without MoE layers.
  at::Tensor expert_counts;
  ForwardStats stats;
};

/// Options of CausalLM that are not part of config.json.
struct CausalLMOptions {
  /// Recompute each block in backward instead of keeping its activations
  /// (checkpoint_block): the block's input is kept, its forward runs without
  /// a graph, and backward runs it again under the RNG and autocast state of
  /// the first run, so gradients equal those without checkpointing (tested
  /// on MLA + MoE + MTP with balance losses, in bf16 autocast).
  bool activation_checkpointing = false;
  /// Seed of the N(0, initializer_range) initialisation (LibTorch's generator).
  std::optional<std::uint64_t> init_seed;
  /// Use Rhine's fused CPU kernels (rhine/nn/fused.h): RMSNorm, RoPE, SwiGLU
  /// and the cross-entropy loss, each tested against its plain-op twin.
  bool fused_kernels = false;
  /// Streaming construction, for a model whose weights will be loaded: every
  /// linear and embedding weight is allocated but neither initialised nor
  /// written, so its pages stay unreserved in physical memory (Linux commits
  /// anonymous memory when it is first written); norms, routers and other
  /// small tensors are built as usual. Such a model computes only under FSDP
  /// (rhine/dist/fsdp.h), which keeps this rank's rows and frees the rest,
  /// after FSDP::load_parameters has read this rank's rows of an HF
  /// directory or checkpoint, or FSDP::initialize has written them (a model
  /// trained from scratch: the values the constructor would have drawn,
  /// one parameter at a time); forward() otherwise throws a rhine::Error.
  /// (The whole model's size is still reserved as virtual memory for a
  /// moment, which needs the kernel's default overcommit heuristic.)
  bool defer_init = false;
};

/// One step of CausalLM's initialisation (HF's): the constructor runs the
/// steps of CausalLMImpl::init_plan in order, all drawing from one generator
/// (CausalLMImpl::init_generator); parameters without a step keep what their
/// layer built (norms' ones, the router's bias).
struct ParamInit {
  std::string name;  ///< the parameter, as named_parameters() names it
  double std = 0.0;  ///< N(0, std) when > 0; zeros when 0
  /// Writes the step's values into `t` (the parameter's shape), drawing from `gen`.
  void apply(at::Tensor& t, c10::optional<at::Generator>& gen) const;
};

/// Calls around each block of CausalLM::forward: the one extension point that
/// parallel wrappers applied from outside use (rhine::dist::FSDP
/// gathers a block's parameters before it runs and hooks its backward), as
/// PyTorch's module forward hooks serve FSDP2. The model itself never changes.
///
/// Blocks are numbered as they are stored: decoder layers 0..L-1, then the MTP
/// modules L..L+D-1 (`model.layers.{index}` in both cases).
class ForwardHooks {
 public:
  virtual ~ForwardHooks() = default;
  /// Maps a block's inputs to its outputs.
  using Block = std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>&)>;
  /// First thing CausalLM::forward does (before the embedding lookup).
  virtual void forward_begin() {}
  /// Runs block `index` on `inputs` (the hidden state) through `run`; returns
  /// run's outputs, possibly wrapped in autograd functions. Default: run(inputs).
  virtual std::vector<at::Tensor> run_block(std::size_t index, const std::vector<at::Tensor>& inputs,
                                            const Block& run) {
    return run(inputs);
  }
  /// Last thing CausalLM::forward does (also when it throws).
  virtual void forward_end() {}
};

/// `model.*`: embeddings, the blocks and the final norm.
class DecoderModelImpl : public torch::nn::Module {
 public:
  explicit DecoderModelImpl(const ModelConfig& config);
  torch::nn::Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers{nullptr};
  RMSNorm norm{nullptr};
  std::vector<DecoderLayer> blocks;  ///< typed views of `layers` (main blocks)
  /// Typed views of the MTP modules: layers[num_hidden_layers + k].
  std::vector<std::shared_ptr<MTPLayerImpl>> mtp;
};
TORCH_MODULE(DecoderModel);

/// The causal LM (LlamaForCausalLM and friends).
class CausalLMImpl : public torch::nn::Module {
 public:
  explicit CausalLMImpl(const ModelConfig& config, const CausalLMOptions& options = {});
  /// ids [B, T] int64 -> logits [B, T, V], plus loss/stats when labels are given.
  ForwardOutput forward(const at::Tensor& ids, const ForwardOptions& options = {});
  /// An empty cache for this model.
  KVCache make_cache() const;
  /// Number of parameters (tied embeddings counted once); without
  /// embeddings: excludes embed_tokens and lm_head (the "non-embedding" count).
  std::int64_t num_parameters(bool include_embeddings = true) const;
  /// The output projection [V, C]: lm_head.weight, or embed_tokens.weight when tied.
  at::Tensor output_weight() const;

  /// The MoE modules in layer order (main layers, then MTP layers).
  std::vector<MoE> moe_layers() const;
  /// Aux-loss-free balancing (DeepSeek-V3): for every MoE layer l,
  /// e_score_correction_bias += gamma * sign(mean(counts[l]) - counts[l]).
  /// Call after each optimizer step with global counts [n_moe_layers, E]
  /// (summed over micro-batches and ranks); gamma 1e-3 in V3. No-op for
  /// layers without the bias (topk_method other than noaux_tc).
  void update_router_bias(const at::Tensor& counts, double gamma);
  /// Buffers that hold state of their own (e_score_correction_bias), by name:
  /// named_buffers() without the MTP modules' aliases of the embedding and head.
  std::vector<std::pair<std::string, at::Tensor>> state_buffers();
  /// The initialisation steps, in the order the constructor applies them
  /// (also under defer_init, which skips them: FSDP::initialize replays them).
  std::vector<ParamInit> init_plan() const;
  /// A fresh generator for init_plan: options.init_seed's, or nullopt (the
  /// global generator).
  c10::optional<at::Generator> init_generator() const;
  /// Points the MTP modules' `embed_tokens.weight` and `shared_head.head.weight`
  /// buffers at the storage of model.embed_tokens.weight and the output
  /// weight again (done by the constructor and by `to`; call it after
  /// replacing those tensors by hand).
  void tie_mtp_weights();

  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Device device, bool non_blocking = false) override;

  /// Installs `hooks` (nullptr: none) around every block of forward() (see
  /// ForwardHooks). Set by a parallel wrapper, once, after construction.
  void set_forward_hooks(std::shared_ptr<ForwardHooks> hooks) { hooks_ = std::move(hooks); }
  const std::shared_ptr<ForwardHooks>& forward_hooks() const { return hooks_; }

  const ModelConfig& config() const { return config_; }
  CausalLMOptions options;
  DecoderModel model{nullptr};
  torch::nn::Linear lm_head{nullptr};

 private:
  ForwardOutput forward_impl(const at::Tensor& ids, const ForwardOptions& options);
  ModelConfig config_;
  std::shared_ptr<ForwardHooks> hooks_;
  RopeFrequencies freqs_;      // standard attention: head_dim rotary dims
  RopeFrequencies mla_freqs_;  // MLA: qk_rope_head_dim rotary dims
};
TORCH_MODULE(CausalLM);

/// Parameter count of the model `config` describes, in closed form (no model
/// is built, so it works for 671B configs); matches CausalLM::num_parameters
/// (MTP modules included, their embedding/head aliases not; buffers not).
std::int64_t parameter_count(const ModelConfig& config, bool include_embeddings = true);

/// Parameters used per token: as parameter_count, but MoE layers count the
/// router, K routed experts and the shared experts; MTP modules excluded.
/// Dense models: parameter_count without MTP.
std::int64_t active_parameter_count(const ModelConfig& config, bool include_embeddings = true);

/// Where each row's documents start, from host position ids [B, T]: offset 0
/// and every t > 0 with position 0 (the documents of ForwardOptions::document_mask).
std::vector<std::vector<std::int64_t>> document_starts_of(const at::Tensor& position_ids);

/// The bool attention mask [B, 1, T, S] for T new tokens after S - T cached
/// ones: causal (bottom-right), `key_valid` [B, S] padding, optional sliding
/// window (q - k < window) and document boundaries (`doc_ids` [B, S]). A query
/// that would see no key sees itself (padding rows stay finite).
at::Tensor build_attention_mask(std::int64_t T, std::int64_t S, const at::Tensor& key_valid,
                                std::optional<std::int64_t> window,
                                const std::optional<at::Tensor>& doc_ids);

}  // namespace rhine::nn
