#pragma once
/// \file
/// Fully sharded data parallel (ZeRO-3, and ZeRO-2) for a CausalLM, in the
/// spirit of PyTorch's FSDP2 and applied from outside: the model is built as
/// usual, then handed to an FSDP, which moves its parameters into per-rank
/// shards and installs nn::ForwardHooks; forward() and backward() are called
/// on the unchanged model.
///
///     rhine::nn::CausalLM lm(config, model_options);
///     rhine::dist::FSDP fsdp(world, lm);                   // shards; lm's weights are now placeholders
///     rhine::AdamW opt(rhine::decay_groups(fsdp.parameters(), adamw));   // steps the shards
///     for (int micro = 0; micro < accum; ++micro) {
///       auto guard = micro + 1 < accum ? fsdp.no_sync() : rhine::dist::FSDP::NoSync{};
///       (lm->forward(ids, fo).loss / accum).backward();    // gathers and reduce-scatters per block
///     }
///     fsdp.finish();                                        // shard gradients now averaged over ranks
///     double norm = fsdp.clip_grad_norm(1.0);               // global norm over all shards
///     opt.step(); opt.zero_grad();
///
/// Units and shards. Each block (decoder layer `model.layers.{i}`, MTP module)
/// is one unit; the embeddings, the final norm and the head are the root unit.
/// Every parameter is split along its first dimension: with N ranks, rank r
/// owns rows [r*ceil(R/N), min(R, (r+1)*ceil(R/N))) of a parameter with R rows,
/// stored in fp32 (the "shard", what the optimizer steps; a rank whose range is
/// empty gets no shard for that parameter). The shards of a unit live in one
/// flat buffer per rank, padded to ceil(R/N) rows each, so one all-gather and
/// one reduce-scatter serve a whole unit.
///
/// One step (ZeRO-3):
///  - forward: the root unit is gathered (in `param_dtype`) when forward()
///    starts; each block's unit just before the block runs, and the next
///    block's all-gather is issued before this one computes (prefetch). After
///    the block, its gathered parameters are freed (reshard_after_forward) or
///    kept until its backward.
///  - backward: an autograd function on each block's outputs gathers the
///    unit again before the block's backward runs (prefetching the block
///    before it); one on the block's inputs fires when the block's backward is
///    done, and reduce-scatters the unit's gradients in fp32 into the shards'
///    gradients (the mean over ranks, as GradientSync computes it), then frees
///    the gathered parameters and the full gradients.
///  - finish(): reduce-scatters what backward did not reach (the root unit,
///    blocks whose input needed no gradient), in a fixed order, and frees all.
/// Every rank issues the same collectives in the same order: the points above
/// depend on the graph's shape only, never on timing.
///
/// ZeRO-2 (`zero_stage = 2`): the full parameters stay on every rank between
/// steps (gathered once after each optimizer step, at the next forward),
/// gradients and optimizer state are sharded as above.
///
/// Gradient accumulation (`no_sync()`): backward passes without communication
/// add the gradients into fp32 full-size accumulators per parameter; the first
/// backward outside no_sync reduce-scatters their sum. (As FSDP2: accumulation
/// without communication costs full-size gradient memory.)
///
/// Precision: `param_dtype` kFloat gathers fp32 weights, so a run equals the
/// unsharded one to float summation order (bf16 autocast casts as it would
/// without FSDP). kBFloat16 gathers bf16 weights (half the traffic and the
/// gathered memory; every weight, norms included, is used in bf16 as FSDP2's
/// MixedPrecisionPolicy(param_dtype=bf16) does); gradients are reduced in fp32
/// either way.
///
/// Activation checkpointing (CausalLMOptions::activation_checkpointing) works
/// unchanged: the recomputation runs after the unit was gathered again.
///
/// Expert parallelism (`expert_parallel` = the world size): each routed expert
/// stays whole, in fp32, on the rank that owns it (rhine/dist/expert_parallel.h
/// installs the all-to-all dispatch on the MoE layers); it is never gathered,
/// its gradient is divided by N in finish(), and it is one piece of its
/// owner's file in a sharded checkpoint. With a smaller EP, a unit's routed
/// experts form a second shard buffer, row-sharded over the expert-data-
/// parallel group (see FSDPOptions::expert_parallel).
///
/// Hybrid sharding (`shard_size` S < N ranks): consecutive groups of S ranks
/// each shard one copy of the model (World::split); gathers and
/// reduce-scatters stay within a copy, and the shard gradients are then
/// all-reduced across the N/S copies. Expert parallelism is then S.
///
/// Streaming construction: a model built with CausalLMOptions::defer_init has
/// no weights yet; the FSDP keeps this rank's (unwritten) rows, frees the
/// rest and refuses to compute until load_parameters() has read them (an HF
/// import) or initialize() has drawn them (training from scratch).
///
/// Muon orthogonalises whole matrices: give it `muon_shards()`
/// (`muon.set_shards(fsdp.muon_shards())`), which all-gathers each unit's
/// update rows at the step, one unit at a time, so that every rank
/// orthogonalises the unit's whole matrices and keeps its rows
/// (rhine/optim/muon.h). check_optimizer refuses a Muon without it.
///
/// LoRA (rhine/io/lora.h): base weights and adapters are sharded alike, only
/// the adapters train; a gathered block runs the adapters' low-rank path
/// beside its frozen base weights (rhine/nn/adapter.h), nothing else is needed.
///
/// A trainable parameter no rank has a gradient for (an expert no token
/// chose) keeps an undefined gradient, as in one process, so optimizers skip
/// it: each rank flags its gradients in the reduce-scatter buffer itself.
///
/// A parameter that is a slice of a larger buffer (the MoE layers' stacked
/// routed experts, rhine/nn/moe.h) gets storage of its own first: FSDP frees
/// and regathers each parameter by itself. The experts' grouped GEMM then
/// stacks the gathered weights per forward (a copy).
///
/// The model's parameters are placeholders (empty tensors) while their unit
/// is not gathered; read weights through full_parameter(), which gathers
/// them. The FSDP must outlive every forward and backward of the model; its
/// destructor removes the hooks but leaves the model's parameters empty.

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "rhine/core/json.h"
#include "rhine/dist/world.h"
#include "rhine/io/row_shards.h"
#include "rhine/nn/model.h"
#include "rhine/optim/muon.h"
#include "rhine/optim/optimizer.h"

namespace rhine::dist {

/// Options of FSDP (the "parallel" block of a run config maps onto these).
struct FSDPOptions {
  /// 3: parameters, gradients and optimizer state sharded (FSDP, ZeRO-3);
  /// 2: gradients and optimizer state sharded, parameters replicated (ZeRO-2).
  int zero_stage = 3;
  /// ZeRO-3: free a block's gathered parameters after its forward and gather
  /// them again for its backward. false: keep them until the block's
  /// backward (more memory, one all-gather less per block and step).
  bool reshard_after_forward = true;
  /// dtype of the gathered parameters, the ones forward computes with:
  /// kFloat or kBFloat16 (see the file comment).
  c10::ScalarType param_dtype = c10::kFloat;
  /// Issue the next block's all-gather while this one computes.
  bool prefetch = true;
  /// Expert parallelism (rhine/dist/expert_parallel.h): 1 shards the routed
  /// experts by rows like every other weight. EP > 1 (dividing the shard
  /// group, S ranks: the world size unless shard_size says less) groups
  /// consecutive ranks by EP; each EP group partitions the experts over its
  /// ranks and tokens travel to them by all-to-all within the group. With
  /// EP = S every expert is whole on its owner (fp32, never gathered; the
  /// hybrid copies' owners all-reduce its gradient). With EP < S the S/EP
  /// ranks holding the same place in their EP groups (the expert-data-
  /// parallel group) shard those experts by rows, gathered and
  /// reduce-scattered within that group like any other unit's weights.
  int expert_parallel = 1;
  /// Hybrid sharding (HSDP, dp x fsdp): the ranks one copy of the model is
  /// sharded over; 0 = all of them. With N ranks and shard_size S (S divides
  /// N), ranks [k*S, (k+1)*S) share copy k; gradients are reduce-scattered
  /// within a copy, then all-reduced over the N/S ranks that hold the same
  /// rows. Parameter all-gathers stay within a copy (the fast links of a
  /// node, when S is the GPUs per node). expert_parallel is then 1 or S.
  int shard_size = 0;

  /// Throws rhine::Error for a stage other than 2 or 3, or another dtype.
  void validate() const;
};

/// Element counts of one rank's sharding (what tests and benches read).
struct FSDPMemory {
  std::int64_t model_elements = 0;   ///< all parameters of the model
  std::int64_t shard_elements = 0;   ///< this rank's shards (padding excluded), its own experts included
  std::int64_t expert_elements = 0;  ///< of those, the routed experts this rank owns (expert parallelism)
  std::int64_t buffer_elements = 0;  ///< this rank's flat shard buffers (with padding)
  /// Gathered (unsharded) parameter elements held now, and the most held at
  /// once since construction or reset_peak().
  std::int64_t gathered_elements = 0, peak_gathered_elements = 0;
  /// Full-size gradient elements held now (between a block's backward and its
  /// reduce-scatter, or accumulated under no_sync), and the most at once.
  std::int64_t full_grad_elements = 0, peak_full_grad_elements = 0;
  /// Elements of the largest unit (the bound of one gathered block).
  std::int64_t largest_unit_elements = 0;
};

/// Fully sharded data parallel over a World's ranks (see the file comment).
/// Holds a reference to `world` (which must outlive it) and to the model.
class FSDP {
 public:
  /// Shards `model`'s parameters and installs its hooks. Every rank must
  /// pass a model with the same parameters (names, shapes); the shards are
  /// taken from each rank's own values, so build the model from the same seed
  /// (or broadcast_parameters first). Throws rhine::Error for a model that has
  /// forward hooks already or merged LoRA adapters.
  FSDP(World& world, nn::CausalLM model, const FSDPOptions& options = {});
  ~FSDP();
  FSDP(const FSDP&) = delete;
  FSDP& operator=(const FSDP&) = delete;

  /// While alive, backward passes accumulate gradients without communication.
  class NoSync {
   public:
    NoSync() = default;
    ~NoSync();
    NoSync(NoSync&& other) noexcept;
    NoSync& operator=(NoSync&& other) noexcept;
    NoSync(const NoSync&) = delete;
    NoSync& operator=(const NoSync&) = delete;

   private:
    friend class FSDP;
    explicit NoSync(FSDP* fsdp);
    FSDP* fsdp_ = nullptr;
  };
  /// Accumulation micro-step: no reduce-scatter while the guard lives.
  NoSync no_sync() { return NoSync(this); }

  /// This rank's shards of the trainable parameters, under the model's names
  /// and in its order: fp32 leaf tensors [rows of this rank, ...]; after
  /// finish() their gradients are the mean over ranks. Build the optimizer
  /// over these (check_optimizer tells whether it can step shards).
  const NamedParameters& parameters() const;
  /// Throws rhine::Error when `optimizer` cannot step row shards (a Muon
  /// without muon_shards()).
  static void check_optimizer(const Optimizer& optimizer);
  /// What Muon needs to step this FSDP's shards (see the file comment).
  /// Holds this FSDP's state: use it while the FSDP lives.
  std::shared_ptr<MuonShards> muon_shards();

  /// Reduce-scatters every unit backward did not reduce, in a fixed order, and
  /// frees all gathered parameters. Call once after the last backward of a step.
  void finish();
  /// Global L2 norm of the shards' gradients (one all-reduce; fp64 sums).
  double grad_norm();
  /// Scales the shards' gradients so that their global norm is at most
  /// `max_norm` (as rhine::clip_grad_norm over the unsharded gradients);
  /// returns the norm before clipping.
  double clip_grad_norm(double max_norm);

  /// Parameter `name` whole (fp32, on the world's device), all-gathered from
  /// the shards. Collective: every rank calls it with the same names in the same order.
  at::Tensor full_parameter(const std::string& name);
  /// Names of all parameters, trainable or not, in the model's order.
  std::vector<std::string> parameter_names() const;
  /// Unit names in order: "root", then "model.layers.{i}".
  std::vector<std::string> unit_names() const;

  /// Ends sharding: every rank's model gets its whole parameters back (fp32)
  /// and the hooks are removed, for what follows training in a program that
  /// fits one rank (samples, an HF export). Collective. The FSDP is unusable
  /// afterwards.
  void unshard();

  // --- sharded checkpoints (rhine/io/row_shards.h) ----------------------------
  /// This rank's rows of every parameter (frozen ones too) under the model's
  /// names, and of `optimizer`'s state as "optim/<param>/<slot>" (nullptr: none).
  std::vector<io::RowPiece> state_pieces(const Optimizer* optimizer) const;
  /// Collective: every rank writes its pieces into `dir` (one directory all
  /// ranks see), and rank 0 writes shards.json whose meta is `meta` plus
  /// "optimizer": the optimizer metas merged over ranks. Nothing is gathered
  /// but descriptors.
  void save(const std::string& dir, const Optimizer* optimizer, const Json& meta = Json::object());
  /// Copies this rank's rows of every parameter from `reader` into the shards:
  /// row shards saved with any number of ranks, or a plain model (a model
  /// directory, model.safetensors of a Trainer checkpoint). Throws rhine::Error
  /// naming a missing tensor or a shape that differs.
  void load_parameters(const io::RowReader& reader);
  /// For a model built with CausalLMOptions::defer_init and trained from
  /// scratch: writes this rank's rows of the values the model's constructor
  /// would have drawn (CausalLMImpl::init_plan, the same generator and order:
  /// bitwise the eager build's), one parameter whole at a time. Not
  /// collective (every rank draws everything and keeps its rows).
  void initialize();
  /// Restores `optimizer` (built over parameters()) from a state saved with
  /// any partition: `meta` the merged optimizer meta, slots read from `reader`
  /// as `prefix` + "<param>/<slot>" (save() uses prefix "optim/").
  void load_optimizer(const io::RowReader& reader, const Json& meta, Optimizer& optimizer,
                      const std::string& prefix = "optim/") const;

  FSDPMemory memory() const;
  void reset_peak();
  const FSDPOptions& options() const;

  struct State;  ///< implementation (lib/dist/fsdp.cpp); the model's hooks share it

 private:
  std::shared_ptr<State> state_;
};

}  // namespace rhine::dist
