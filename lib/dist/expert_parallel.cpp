// Expert parallelism: token dispatch and combine by all-to-all (see
// rhine/dist/expert_parallel.h).
#include "rhine/dist/expert_parallel.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <numeric>

#include "rhine/core/error.h"
#include "rhine/torch/compat.h"
#include "rhine/torch/sync.h"

namespace rhine::dist {

namespace {

constexpr const char* kComponent = "expert_parallel";

std::vector<std::int64_t> to_vector(const c10::IValue& v) { return v.toIntList().vec(); }

at::Tensor exchange(World& world, const at::Tensor& x, const std::vector<std::int64_t>& out_splits,
                    const std::vector<std::int64_t>& in_splits) {
  std::vector<std::int64_t> shape = x.sizes().vec();
  shape[0] = std::accumulate(out_splits.begin(), out_splits.end(), std::int64_t{0});
  at::Tensor out = world.to_device(at::empty(shape, x.options()));
  world.all_to_all_single(out, world.to_device(x), out_splits, in_splits);
  return out;
}

struct AllToAll : public torch::autograd::Function<AllToAll> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, std::int64_t world,
                            std::vector<std::int64_t> out_splits, std::vector<std::int64_t> in_splits) {
    ctx->saved_data["world"] = world;
    ctx->saved_data["out_splits"] = out_splits;
    ctx->saved_data["in_splits"] = in_splits;
    return exchange(*reinterpret_cast<World*>(world), x, out_splits, in_splits);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto* world = reinterpret_cast<World*>(ctx->saved_data["world"].toInt());
    const auto out_splits = to_vector(ctx->saved_data["out_splits"]);
    const auto in_splits = to_vector(ctx->saved_data["in_splits"]);
    return {exchange(*world, grads[0].contiguous(), in_splits, out_splits), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

}  // namespace

int expert_owner(std::int64_t expert, std::int64_t n_experts, int ranks) {
  RHINE_CHECK(ranks > 0 && n_experts % ranks == 0, kComponent,
              "the routed experts must divide evenly over the expert-parallel ranks, got",
              std::to_string(n_experts) + " experts over " + std::to_string(ranks) + " ranks",
              "pick an expert-parallel size that divides n_routed_experts");
  RHINE_CHECK(expert >= 0 && expert < n_experts, kComponent, "no such routed expert", expert, "");
  return static_cast<int>(expert / (n_experts / ranks));
}

at::Tensor all_to_all(World& world, const at::Tensor& x, const std::vector<std::int64_t>& out_splits,
                      const std::vector<std::int64_t>& in_splits) {
  return AllToAll::apply(x.contiguous(), reinterpret_cast<std::int64_t>(&world), out_splits, in_splits);
}

at::Tensor ExpertParallel::run(nn::MoEImpl& layer, const at::Tensor& x, const nn::Routing& routing) {
  World& world = *world_;
  const int n = world.world_size(), rank = world.rank();
  const auto E = static_cast<std::int64_t>(layer.expert_list.size());
  expert_owner(0, E, n);  // validates the partition
  const std::int64_t local = E / n, first = rank * local;

  // 1. pairs sorted by expert: rank j's experts form the j-th block.
  nn::ExpertBatch batch = nn::sort_by_expert(x, routing);

  // 2. pair counts: recv[j * local + l] = rows rank j sends for local expert l.
  at::Tensor send_counts = at::tensor(batch.counts, at::TensorOptions().dtype(at::kLong));
  at::Tensor recv_counts = world.to_device(at::empty({E}, send_counts.options()));
  world.all_to_all_single(recv_counts, world.to_device(send_counts), std::vector<std::int64_t>(n, local),
                          std::vector<std::int64_t>(n, local));
  recv_counts = to_host(recv_counts);
  const std::int64_t* recv = recv_counts.data_ptr<std::int64_t>();
  std::vector<std::int64_t> in_splits(n, 0), out_splits(n, 0);
  for (int j = 0; j < n; ++j)
    for (std::int64_t l = 0; l < local; ++l) {
      in_splits[j] += batch.counts[static_cast<std::size_t>(j * local + l)];
      out_splits[j] += recv[j * local + l];
    }

  // 3. dispatch; the received rows come rank-major: regroup them expert-major.
  at::Tensor rows = all_to_all(world, batch.tokens, out_splits, in_splits);  // [M, C]
  // Rank j's rows come in local-expert order, so taking each expert's rows
  // from every rank in turn walks each rank's block front to back.
  std::vector<std::int64_t> perm, per_expert(static_cast<std::size_t>(local), 0), next(n, 0);
  perm.reserve(static_cast<std::size_t>(rows.size(0)));
  for (int j = 1; j < n; ++j) next[j] = next[j - 1] + out_splits[j - 1];  // rank j's first row
  for (std::int64_t l = 0; l < local; ++l)
    for (int j = 0; j < n; ++j) {
      const std::int64_t m = recv[j * local + l];
      for (std::int64_t i = 0; i < m; ++i) perm.push_back(next[j]++);
      per_expert[static_cast<std::size_t>(l)] += m;
    }
  const auto index_opts = at::TensorOptions().dtype(at::kLong).device(rows.device());
  at::Tensor order = at::tensor(perm, at::TensorOptions().dtype(at::kLong)).to(rows.device());
  const auto dev = x.device().type();
  const bool cast = (dev == c10::DeviceType::CPU || dev == c10::DeviceType::CUDA) && rhine::autocast_enabled(dev);
  const auto payload = cast ? rhine::autocast_dtype(dev) : x.scalar_type();
  // Without autocast the rows meet the experts' own (fp32) weights, also when
  // FSDP gathers the other weights in bf16 (param_dtype).
  const auto weights = layer.expert_list[static_cast<std::size_t>(first)]->up_proj->weight.scalar_type();
  at::Tensor grouped = rows.index_select(0, order);
  if (!cast) grouped = grouped.to(weights);
  std::vector<at::Tensor> outs;
  std::int64_t start = 0;
  for (std::int64_t l = 0; l < local; ++l) {
    const std::int64_t m = per_expert[static_cast<std::size_t>(l)];
    if (m == 0) continue;
    outs.push_back(layer.expert_list[static_cast<std::size_t>(first + l)](grouped.narrow(0, start, m)).to(payload));
    start += m;
  }
  // No rows here: an empty output that still depends on the received rows,
  // so that this rank's backward reaches the dispatch's all-to-all as well.
  at::Tensor done = outs.empty() ? grouped.to(payload) * 0 : at::cat(outs, 0);
  at::Tensor inverse = at::empty_like(order).scatter_(0, order, at::arange(order.numel(), index_opts));
  at::Tensor back = done.index_select(0, inverse);  // rank-major again

  // 4. combine.
  at::Tensor ys = all_to_all(world, back, in_splits, out_splits);  // [n*K, C]
  return nn::combine_experts(batch, ys, x.size(0));
}

}  // namespace rhine::dist
