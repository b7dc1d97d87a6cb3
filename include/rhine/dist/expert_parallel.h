#pragma once
/// \file
/// Expert parallelism for DeepSeekMoE: the routed experts of every MoE layer
/// are partitioned over the ranks, and each token travels to the ranks that
/// own its experts and back, by all-to-all with uneven splits.
///
/// Turn it on with FSDPOptions::expert_parallel (rhine/dist/fsdp.h): FSDP
/// then keeps each routed expert whole on its owner (it is neither gathered
/// nor row-sharded), shards everything else as usual (attention, router,
/// shared experts, embeddings), and installs the ExpertParallel dispatch
/// below on every MoE layer of the unchanged model. Nothing else changes:
/// routing, the router bias, the balance losses and the per-language expert
/// counts are computed on each rank from its own tokens before dispatch, as
/// without expert parallelism (`ForwardOutput::expert_counts` are this rank's
/// counts; all-reduce them for the bias update as data parallel does).
///
/// With E routed experts over N ranks, rank r owns experts
/// [r*E/N, (r+1)*E/N) of every MoE layer (E must divide by N). One MoE
/// layer's forward on a rank with n tokens, K experts per token:
///  1. sort the n*K (token, slot) pairs by expert (nn::sort_by_expert);
///  2. all-to-all the per-expert pair counts (E integers), so every rank
///     knows how many rows it receives from each rank for each local expert;
///  3. all-to-all the rows (the dispatch), regroup them by local expert, run
///     each local expert once on all its rows, undo the regrouping;
///  4. all-to-all the outputs back (the combine), weight them by the routing
///     weights and sum per token (nn::combine_experts).
/// Backward runs the two row all-to-alls in reverse (an autograd function:
/// all_to_all below). Every rank issues the same collectives in the same
/// order whatever its routing, also when it sends or receives no rows.
///
/// The dispatch payload has the tokens' dtype; the combine payload has the
/// dtype the experts compute in (autocast's dtype when it is on), so bf16
/// autocast halves the combine traffic. Gradients: an expert's gradient on
/// its owner sums every rank's tokens; FSDP divides it by N, the same mean
/// over ranks as every other gradient.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "rhine/dist/world.h"
#include "rhine/nn/moe.h"

namespace rhine::dist {

/// The rank that owns routed expert `expert` of `n_experts` over `ranks`
/// ranks: expert / (n_experts / ranks). Throws rhine::Error when n_experts
/// does not divide by ranks.
int expert_owner(std::int64_t expert, std::int64_t n_experts, int ranks);

/// All-to-all of rows as an autograd function: forward is
/// World::all_to_all_single(out, x, out_splits, in_splits); backward sends
/// the output's gradient back the way the rows came (splits swapped).
/// Collective: every rank calls it, and its backward runs on every rank.
at::Tensor all_to_all(World& world, const at::Tensor& x, const std::vector<std::int64_t>& out_splits,
                      const std::vector<std::int64_t>& in_splits);

/// The nn::ExpertDispatch of expert parallelism over all of `world`'s ranks
/// (steps 1-4 of the file comment). Holds a reference to `world`.
class ExpertParallel : public nn::ExpertDispatch {
 public:
  explicit ExpertParallel(World& world) : world_(&world) {}
  at::Tensor run(nn::MoEImpl& layer, const at::Tensor& x, const nn::Routing& routing) override;

 private:
  World* world_;
};

}  // namespace rhine::dist
