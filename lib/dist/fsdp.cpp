#include "rhine/dist/fsdp.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/StorageImpl.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <optional>
#include <set>
#include <string>

#include "rhine/core/error.h"
#include "rhine/dist/expert_parallel.h"
#include "rhine/io/lora.h"
#include "rhine/optim/optimizer.h"
#include "rhine/torch/sync.h"

namespace rhine::dist {

namespace {

constexpr const char* kComponent = "fsdp";

/// The unit of a parameter or module name: "model.layers.{i}..." is unit
/// 1 + i, everything else the root unit 0.
std::size_t unit_of(const std::string& name, std::size_t units) {
  const std::string prefix = "model.layers.";
  if (name.rfind(prefix, 0) != 0) return 0;
  const auto dot = name.find('.', prefix.size());
  const auto u = 1 + static_cast<std::size_t>(std::stoll(name.substr(prefix.size(), dot - prefix.size())));
  RHINE_CHECK(u < units, kComponent, "parameter of an unknown layer", name, "");
  return u;
}

std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

/// Frees a tensor's memory but keeps the tensor (shape, strides, and every
/// view or autograd record that shares its storage): FSDP's "resharded" state.
void free_storage(const at::Tensor& t) {
  c10::StorageImpl* s = t.storage().unsafeGetStorageImpl();
  if (s->nbytes() == 0) return;
  s->set_data_ptr(at::DataPtr(nullptr, t.device()));
  s->set_nbytes(0);
}

/// Gives a freed tensor memory for its elements again (contents undefined).
void alloc_storage(const at::Tensor& t) {
  c10::StorageImpl* s = t.storage().unsafeGetStorageImpl();
  const auto bytes = static_cast<std::size_t>(t.numel()) * t.element_size();
  if (s->nbytes() == bytes) return;
  RHINE_CHECK(s->nbytes() == 0, kComponent, "a gathered parameter has storage of unexpected size",
              s->nbytes(), "do not replace the model's parameters after sharding it");
  s->set_data_ptr(s->allocator()->allocate(bytes));
  s->set_nbytes(bytes);
}

}  // namespace

void FSDPOptions::validate() const {
  RHINE_CHECK(zero_stage == 2 || zero_stage == 3, kComponent, "zero_stage must be 2 or 3, got", zero_stage,
              "3 shards parameters too (FSDP); 2 keeps them replicated; ZeRO-1 is dist::ShardedOptimizer");
  RHINE_CHECK(param_dtype == c10::kFloat || param_dtype == c10::kBFloat16, kComponent,
              "param_dtype must be float32 or bfloat16, got", c10::toString(param_dtype),
              "float32 is the exact twin of an unsharded run; bfloat16 halves the gathered bytes");
  RHINE_CHECK(expert_parallel >= 1, kComponent, "expert_parallel must be >= 1, got", expert_parallel,
              "1 shards the experts like every other weight; the world size partitions them over the ranks");
}

struct FSDP::State : nn::ForwardHooks {
  struct Param {
    std::string name;
    at::Tensor var;  ///< the model's parameter (full shape, param_dtype; storage freed when resharded)
    std::vector<std::int64_t> shape;
    std::int64_t rows = 1, inner = 1, rpr = 1;  ///< rows, elements per row, rows per rank
    std::int64_t own_rows = 0;                  ///< rows this rank holds (may be 0)
    std::int64_t row_begin = 0;                 ///< its first row: rank * rpr
    std::size_t unit = 0;                       ///< index into units
    /// Expert parallelism: the EP rank owning this routed expert (-1: not an
    /// owned expert). With EP smaller than the shard group the owners shard
    /// it by rows over the expert-data-parallel group (`edp`); else it is
    /// whole on its owner.
    int owner = -1;
    bool edp = false;
    bool trainable = false;
    std::int64_t off = 0;   ///< offset of its padded shard in the unit's shard buffer
    std::int64_t goff = 0;  ///< offset in the unit's gradient chunk (trainable only)
    std::int64_t gflag = 0;  ///< its "some rank has a gradient" slot in that chunk (trainable only)
    at::Tensor shard;       ///< fp32 leaf [own_rows, ...] viewing the unit's buffer
    at::Tensor acc;         ///< fp32 full gradient accumulated under no_sync
  };
  /// The parameters of a unit sharded over one group of ranks, in one flat
  /// buffer per rank: one all-gather and one reduce-scatter serve them.
  struct Shards {
    World* group = nullptr;  ///< the shard group, or the expert-data-parallel group
    int n = 1;               ///< its size
    std::vector<std::size_t> params;
    std::int64_t chunk = 0, gchunk = 0;
    std::int64_t gflags = 0;  ///< where the gradient chunk's flags begin (Param::gflag)
    at::Tensor shards;        ///< fp32 [chunk]: this rank's padded shards of these parameters
    at::Tensor send, recv;    ///< all-gather buffers while one is in flight
    PendingOp pending;
  };
  struct Unit {
    std::string name;
    Shards main;     ///< row-sharded over the shard group
    Shards experts;  ///< this rank's EP share of the routed experts, row-sharded over its expert-data-parallel group
    std::vector<std::size_t> owned;  ///< routed experts whole on their owner (EP = the shard group)
    std::int64_t elements = 0;       ///< elements this rank holds while the unit is gathered
    bool gathering = false, gathered = false, reduced = false;
    std::int64_t version = -1;  ///< ZeRO-2: shards' versions when last gathered
    std::int64_t shards_version() const {
      return main.shards._version() + (experts.shards.defined() ? experts.shards._version() : 0);
    }
  };

  World* world = nullptr;  ///< the shard group: the run's World, or this rank's part of it (hybrid)
  World* run_world = nullptr;        ///< every rank of the run
  std::unique_ptr<World> shard_group;    ///< hybrid: the ranks sharing one copy of the model
  std::unique_ptr<World> replica_group;  ///< hybrid: the ranks holding the same shards (one per copy)
  std::unique_ptr<World> ep_group;       ///< EP smaller than the shard group: the ranks tokens travel between
  std::unique_ptr<World> edp_group;      ///< ... and the ranks sharding the same experts
  int ep_rank = 0;                       ///< this rank's place in its EP group (the experts it owns)
  nn::CausalLM model{nullptr};
  FSDPOptions o;
  int n = 1, rank = 0;  ///< shard group size and this rank's place in it
  int total = 1;        ///< ranks of the run (n x replicas): gradients are means over these
  std::vector<Param> params;
  std::vector<Unit> units;  ///< 0: root; 1 + i: block i
  NamedParameters trainable;
  std::map<std::string, std::size_t> by_name;
  bool sync = true;
  bool unloaded = false;      ///< built with CausalLMOptions::defer_init and not loaded yet
  bool grad_forward = false;  ///< the running forward records a graph
  std::vector<std::size_t> order;  ///< units in the order forward ran them
  FSDPMemory mem;

  // --- gathering ---------------------------------------------------------------

  void launch_gather(std::size_t u) {
    Unit& unit = units[u];
    if (unit.gathered || unit.gathering) return;
    for (Shards* sh : {&unit.main, &unit.experts}) {
      if (sh->params.empty()) continue;
      const auto opts = sh->shards.options().dtype(o.param_dtype);
      sh->send = o.param_dtype == c10::kFloat ? sh->shards : sh->group->to_device(sh->shards.to(o.param_dtype));
      sh->recv = sh->group->to_device(at::empty({sh->n * sh->chunk}, opts));
      sh->pending = sh->group->all_gather_into_tensor_async(sh->recv, sh->send);
    }
    unit.gathering = true;
  }

  void complete_gather(std::size_t u) {
    Unit& unit = units[u];
    if (unit.gathered) return;
    if (!unit.gathering) launch_gather(u);
    at::NoGradGuard no_grad;
    for (Shards* sh : {&unit.main, &unit.experts}) {
      if (sh->params.empty()) continue;
      sh->pending.wait();
      const std::int64_t n = sh->n;
      const at::Tensor all = sh->recv.view({n, sh->chunk});
      for (std::size_t i : sh->params) {
        Param& p = params[i];
        alloc_storage(p.var);
        // Rank r's padded rows sit at [r, off, off + rpr * inner) of the gathered buffer.
        const at::Tensor per_rank = all.narrow(1, p.off, p.rpr * p.inner).view({n, p.rpr, p.inner});
        at::Tensor dst = p.var.variable_data();
        if (p.rows == n * p.rpr)  // rows divide evenly: one strided copy
          dst.view({n, p.rpr, p.inner}).copy_(per_rank);
        else
          dst.view({p.rows, p.inner}).copy_(per_rank.reshape({n * p.rpr, p.inner}).narrow(0, 0, p.rows));
      }
      sh->send = sh->recv = at::Tensor();
    }
    unit.gathering = false;
    unit.gathered = true;
    unit.version = unit.shards_version();
    mem.gathered_elements += unit.elements;
    mem.peak_gathered_elements = std::max(mem.peak_gathered_elements, mem.gathered_elements);
  }

  /// Every unit, all gathers in flight at once (ZeRO-2's replicated parameters).
  void gather_all() {
    for (std::size_t u = 0; u < units.size(); ++u) launch_gather(u);
    for (std::size_t u = 0; u < units.size(); ++u) complete_gather(u);
  }

  void release(std::size_t u) {
    Unit& unit = units[u];
    if (unit.gathering) complete_gather(u);  // an unused prefetch
    if (!unit.gathered) return;
    for (const Shards* sh : {&unit.main, &unit.experts})
      for (std::size_t i : sh->params) free_storage(params[i].var);
    unit.gathered = false;
    mem.gathered_elements -= unit.elements;
  }

  /// Parameter p [rows, inner] from an all-gather [n, total] of every rank's
  /// padded rows, p's at column `off`.
  static at::Tensor unpad(const at::Tensor& gathered, std::int64_t off, const Param& p) {
    const auto n = gathered.size(0);
    return gathered.narrow(1, off, p.rpr * p.inner).reshape({n * p.rpr, p.inner}).narrow(0, 0, p.rows);
  }

  // --- gradients ----------------------------------------------------------------

  /// p's full gradient so far in fp32: the no_sync accumulator plus .grad
  /// (both reset: the result is the caller's); undefined when there is none.
  at::Tensor take_gradient(Param& p) {
    at::Tensor g = p.var.grad();
    p.var.mutable_grad() = at::Tensor();
    if (g.defined()) g = g.to(c10::kFloat);  // AccumulateGrad's tensor (or its fp32 copy)
    at::Tensor acc = std::move(p.acc);
    p.acc = at::Tensor();
    if (!acc.defined()) return g;
    mem.full_grad_elements -= acc.numel();
    return g.defined() ? acc.add_(g) : acc;
  }

  void reduce(std::size_t u) {
    Unit& unit = units[u];
    at::NoGradGuard no_grad;
    if (!sync) {  // accumulate locally in fp32
      for (const Shards* sh : {&unit.main, &unit.experts})
        for (std::size_t i : sh->params) {
          Param& p = params[i];
          if (!p.trainable) continue;
          p.acc = take_gradient(p);
          if (p.acc.defined()) mem.full_grad_elements += p.acc.numel();
        }
      mem.peak_full_grad_elements = std::max(mem.peak_full_grad_elements, mem.full_grad_elements);
      return;
    }
    for (const Shards* sh : {&unit.main, &unit.experts})
      if (sh->gchunk > 0) reduce_scatter(*sh);
    unit.reduced = true;
  }

  /// The gradients of `sh`'s parameters, reduce-scattered over its group into
  /// the shards' gradients (then over the copies, hybrid): the mean over all ranks.
  void reduce_scatter(const Shards& sh) {
    const std::int64_t n = sh.n;
    const auto f32 = sh.shards.options().dtype(c10::kFloat);
    at::Tensor send = sh.group->to_device(at::zeros({n * sh.gchunk}, f32));
    const at::Tensor send2 = send.view({n, sh.gchunk});
    std::int64_t full = 0;  // full-size gradient elements held for this reduce-scatter
    for (std::size_t i : sh.params) {
      Param& p = params[i];
      if (!p.trainable) continue;
      at::Tensor g = take_gradient(p);
      if (!g.defined()) continue;  // no gradient on this rank: zeros
      // Every rank's chunk learns that this rank had a gradient: a parameter
      // no rank had one for (an expert no token chose) keeps an undefined
      // gradient, as in one process, and the optimizer skips it.
      send2.select(1, p.gflag).fill_(1.0);
      full += g.numel();
      at::Tensor g2 = g.reshape({p.rows, p.inner});
      if (n * p.rpr != p.rows) g2 = at::constant_pad_nd(g2, {0, 0, 0, n * p.rpr - p.rows});
      send2.narrow(1, p.goff, p.rpr * p.inner).view({n, p.rpr, p.inner}).copy_(g2.view({n, p.rpr, p.inner}));
    }
    mem.peak_full_grad_elements = std::max(mem.peak_full_grad_elements, mem.full_grad_elements + full);
    at::Tensor out = sh.group->to_device(at::empty({sh.gchunk}, f32));
    sh.group->reduce_scatter_tensor(out, send, ReduceOp::kSum);
    if (replica_group) replica_group->all_reduce_(out, ReduceOp::kSum);  // hybrid: the other copies' sums
    out.div_(total);
    const at::Tensor flags = to_host(out.narrow(0, sh.gflags, sh.gchunk - sh.gflags)).contiguous();
    for (std::size_t i : sh.params) {
      Param& p = params[i];
      if (!p.trainable || p.own_rows == 0 || flags.data_ptr<float>()[p.gflag - sh.gflags] == 0.0f) continue;
      at::Tensor piece = out.narrow(0, p.goff, p.rpr * p.inner).view({p.rpr, p.inner}).narrow(0, 0, p.own_rows)
                             .view(p.shard.sizes());
      if (p.shard.grad().defined())
        p.shard.mutable_grad().add_(piece);
      else
        p.shard.mutable_grad() = piece;
    }
  }

  // --- hooks ---------------------------------------------------------------------

  void pre_backward(std::size_t u) {
    complete_gather(u);
    if (!o.prefetch) return;
    auto it = std::find(order.begin(), order.end(), u);
    if (it != order.end() && it != order.begin()) launch_gather(*(it - 1));
  }

  void post_backward(std::size_t u) {
    reduce(u);
    if (o.zero_stage == 3) release(u);
  }

  void forward_begin() override {
    RHINE_CHECK(!unloaded, kComponent, "the model was built without its weights and they were never loaded",
                "CausalLMOptions::defer_init",
                "call FSDP::load_parameters (an HF directory or a checkpoint) or FSDP::initialize (from scratch) "
                "first");
    grad_forward = at::GradMode::is_enabled() && !trainable.empty();
    order.clear();
    if (o.zero_stage == 2) {
      // Refresh the replicated parameters when any rank's shards changed
      // (an optimizer step bumps their version); decided together.
      double stale = 0;
      for (const auto& unit : units)
        if (unit.version != unit.shards_version()) stale = 1;
      if (n > 1) stale = world->host_sum({stale})[0];
      if (stale > 0) {
        for (std::size_t u = 0; u < units.size(); ++u) release(u);
        gather_all();
      }
      return;
    }
    complete_gather(0);
    if (o.prefetch && units.size() > 1) launch_gather(1);
  }

  std::vector<at::Tensor> run_block(std::size_t index, const std::vector<at::Tensor>& inputs,
                                    const Block& run) override;

  void forward_end() override {
    if (o.zero_stage == 2) return;
    for (std::size_t u = 1; u < units.size(); ++u)
      if (units[u].gathering) release(u);  // prefetched, not run (MTP without labels)
    if (!grad_forward) release(0);
  }

  /// Hybrid sharding with expert parallelism: every copy's owner of an
  /// expert holds a gradient from its own copy's tokens; one all-reduce over
  /// the replicas sums them (with flags, so that an expert no copy's token
  /// chose keeps an undefined gradient).
  void reduce_owned_over_replicas() {
    std::vector<std::size_t> mine;
    std::int64_t elements = 0;
    for (const auto& unit : units)
      for (std::size_t i : unit.owned)
        if (params[i].own_rows > 0 && params[i].trainable) {
          mine.push_back(i);
          elements += params[i].var.numel();
        }
    if (mine.empty()) return;  // (the same on every replica: they own the same experts)
    at::Tensor flat = replica_group->device_zeros(elements + static_cast<std::int64_t>(mine.size()), c10::kFloat);
    std::int64_t off = 0;
    for (std::size_t k = 0; k < mine.size(); ++k) {
      const at::Tensor g = params[mine[k]].var.grad();
      const auto numel = params[mine[k]].var.numel();
      if (g.defined()) {
        flat.narrow(0, off, numel).copy_(g.reshape({-1}));
        flat[elements + static_cast<std::int64_t>(k)].fill_(1.0);
      }
      off += numel;
    }
    replica_group->all_reduce_(flat, ReduceOp::kSum);
    const at::Tensor flags = to_host(flat.narrow(0, elements, static_cast<std::int64_t>(mine.size()))).contiguous();
    off = 0;
    for (std::size_t k = 0; k < mine.size(); ++k) {
      Param& p = params[mine[k]];
      const auto numel = p.var.numel();
      if (flags.data_ptr<float>()[k] > 0)
        p.var.mutable_grad() = flat.narrow(0, off, numel).view(p.var.sizes()).to(p.var.scalar_type());
      off += numel;
    }
  }

  void finish() {
    RHINE_CHECK(sync, kComponent, "finish() inside no_sync()", "sync off",
                "let the NoSync guard of the last micro-batch go out of scope before finish()");
    for (std::size_t u = units.size(); u-- > 0;)
      if (!units[u].reduced) reduce(u);
    // A routed expert's gradient on its owner sums every rank's tokens: the
    // mean over ranks, as the reduce-scatter gives every other gradient.
    at::NoGradGuard no_grad;
    if (replica_group) reduce_owned_over_replicas();
    for (const auto& unit : units)
      for (std::size_t i : unit.owned)
        if (params[i].own_rows > 0 && params[i].var.grad().defined()) params[i].var.mutable_grad().div_(total);
    for (std::size_t u = 0; u < units.size(); ++u) {
      units[u].reduced = false;
      if (o.zero_stage == 3) release(u);
      for (const Shards* sh : {&units[u].main, &units[u].experts})
        for (std::size_t i : sh->params)
          RHINE_CHECK(!params[i].var.grad().defined(), kComponent,
                      "a gradient arrived after its unit was reduce-scattered:", params[i].name,
                      "this is a bug in FSDP's hook placement; please report it with the model config");
    }
    order.clear();
  }
};

namespace {

// Identity functions whose backward calls into FSDP: on a block's outputs
// (runs before the block's backward: gather) and on its inputs (runs after
// the block's backward: reduce-scatter and free).
template <bool kPre>
struct UnitBoundary : public torch::autograd::Function<UnitBoundary<kPre>> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                at::TensorList xs, std::int64_t state,
                                                std::int64_t unit) {
    ctx->saved_data["state"] = state;
    ctx->saved_data["unit"] = unit;
    torch::autograd::variable_list out;
    for (const auto& x : xs) out.push_back(x.view_as(x));
    return out;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto* st = reinterpret_cast<FSDP::State*>(ctx->saved_data["state"].toInt());
    const auto u = static_cast<std::size_t>(ctx->saved_data["unit"].toInt());
    if (kPre)
      st->pre_backward(u);
    else
      st->post_backward(u);
    grads.push_back(at::Tensor());
    grads.push_back(at::Tensor());
    return grads;
  }
};

}  // namespace

std::vector<at::Tensor> FSDP::State::run_block(std::size_t index, const std::vector<at::Tensor>& inputs,
                                               const Block& run) {
  const std::size_t u = index + 1;
  RHINE_CHECK(u < units.size(), kComponent, "forward ran a block FSDP does not know", index,
              "shard the model after building it completely");
  const auto self = reinterpret_cast<std::int64_t>(this);
  const bool graph = grad_forward && at::GradMode::is_enabled();
  if (o.zero_stage == 3) {
    complete_gather(u);
    if (o.prefetch && u + 1 < units.size()) launch_gather(u + 1);
  }
  const std::vector<at::Tensor> ins =
      graph ? UnitBoundary<false>::apply(at::TensorList(inputs), self, static_cast<std::int64_t>(u)) : inputs;
  std::vector<at::Tensor> outs = run(ins);
  order.push_back(u);
  if (graph) outs = UnitBoundary<true>::apply(at::TensorList(outs), self, static_cast<std::int64_t>(u));
  if (o.zero_stage == 3 && (o.reshard_after_forward || !graph)) release(u);
  return outs;
}

// --- FSDP ----------------------------------------------------------------------

FSDP::FSDP(World& world, nn::CausalLM model, const FSDPOptions& options) : state_(std::make_shared<State>()) {
  options.validate();
  RHINE_CHECK(!model->forward_hooks(), kComponent, "the model has forward hooks already", "hooks set",
              "shard a model once, with one FSDP");
  State& s = *state_;
  s.run_world = &world;
  s.world = &world;
  s.total = world.world_size();
  const int shard = options.shard_size == 0 ? world.world_size() : options.shard_size;
  RHINE_CHECK(shard >= 1 && world.world_size() % shard == 0, kComponent,
              "shard_size must divide the number of ranks, got",
              std::to_string(options.shard_size) + " with " + std::to_string(world.world_size()) + " ranks",
              "hybrid sharding keeps world_size / shard_size copies of the model, each sharded over shard_size ranks");
  if (shard < world.world_size()) {  // hybrid: consecutive ranks share a copy
    s.shard_group = std::make_unique<World>(world.split(world.rank() / shard));
    s.replica_group = std::make_unique<World>(world.split(world.rank() % shard));
    s.world = s.shard_group.get();
  }
  s.model = model;
  s.unloaded = model->options.defer_init;  // streaming construction: rows copied below are not written yet
  s.o = options;
  s.n = s.world->world_size();
  s.rank = s.world->rank();
  const auto& cfg = model->config();
  const std::int64_t blocks = cfg.num_hidden_layers + cfg.num_nextn_predict_layers;
  s.units.resize(static_cast<std::size_t>(1 + blocks));
  s.units[0].name = "root";
  for (std::int64_t i = 0; i < blocks; ++i)
    s.units[static_cast<std::size_t>(1 + i)].name = "model.layers." + std::to_string(i);
  const bool ep = options.expert_parallel > 1;
  const int e = options.expert_parallel;
  s.ep_rank = s.rank;
  if (ep) {
    RHINE_CHECK(s.n % e == 0, kComponent, "expert_parallel must divide the ranks a copy is sharded over, got",
                std::to_string(e) + " with " + std::to_string(s.n) + " ranks",
                "EP groups of expert_parallel consecutive ranks split the experts; the ranks with the same place "
                "in their EP group shard those experts (expert data parallelism)");
    RHINE_CHECK(cfg.uses_moe(), kComponent, "expert parallelism needs an MoE model, got n_routed_experts",
                cfg.n_routed_experts, "set \"ep\": 1 for dense models");
    expert_owner(0, cfg.n_routed_experts, e);  // E divides by EP
    if (e < s.n) {  // EP groups {0..e-1}, {e..2e-1}, ...; EDP groups: the same place in each
      s.ep_group = std::make_unique<World>(s.world->split(s.rank / e));
      s.edp_group = std::make_unique<World>(s.world->split(s.rank % e));
      s.ep_rank = s.rank % e;
    }
  }
  const int d = ep ? s.n / e : 1;  // expert data parallelism: the ranks sharding one EP rank's experts
  for (auto& unit : s.units) {
    unit.main.group = s.world;
    unit.main.n = s.n;
    unit.experts.group = s.edp_group.get();
    unit.experts.n = d;
  }

  // A parameter that is a slice of a larger storage (the MoE layers' stacked
  // experts, rhine/nn/moe.h) gets storage of its own: FSDP frees and
  // regathers each parameter's storage by itself.
  {
    at::NoGradGuard no_grad;
    for (auto& item : model->named_parameters()) {
      at::Tensor t = item.value();
      if (t.has_storage() && t.numel() > 0 &&
          (t.storage_offset() != 0 || t.storage().nbytes() != static_cast<std::size_t>(t.numel()) * t.element_size()))
        t.set_data(t.clone(at::MemoryFormat::Contiguous));
    }
  }
  // Parameters into units, by name: "model.layers.{i}." -> unit 1 + i, the rest root.
  for (const auto& item : model->named_parameters()) {
    const std::string& name = item.key();
    const std::size_t u = unit_of(name, s.units.size());
    State::Param p;
    p.name = name;
    p.var = item.value();
    p.shape = p.var.sizes().vec();
    p.rows = p.shape.empty() ? 1 : p.shape[0];
    p.inner = p.rows == 0 ? 0 : p.var.numel() / p.rows;
    p.rpr = std::max<std::int64_t>(1, ceil_div(p.rows, s.n));
    p.row_begin = s.rank * p.rpr;
    p.own_rows = std::clamp<std::int64_t>(p.rows - p.row_begin, 0, p.rpr);
    p.unit = u;
    p.trainable = p.var.requires_grad();
    // "model.layers.{i}.mlp.experts.{e}.": a routed expert under expert
    // parallelism: whole on its owner (EP = the shard group), or row-sharded
    // over the owners' expert-data-parallel group (EP smaller).
    const std::string experts = ".mlp.experts.";
    const auto at = name.find(experts);
    std::vector<std::size_t>* list = &s.units[u].main.params;
    if (ep && u > 0 && at != std::string::npos) {
      p.owner = expert_owner(std::stoll(name.substr(at + experts.size())), cfg.n_routed_experts, e);
      p.edp = d > 1;
      p.rpr = p.rows;
      p.row_begin = 0;
      p.own_rows = p.owner == s.ep_rank ? p.rows : 0;
      list = &s.units[u].owned;
      if (p.edp && p.owner == s.ep_rank) {
        p.rpr = std::max<std::int64_t>(1, ceil_div(p.rows, d));
        p.row_begin = s.edp_group->rank() * p.rpr;
        p.own_rows = std::clamp<std::int64_t>(p.rows - p.row_begin, 0, p.rpr);
        list = &s.units[u].experts.params;
      }
    }
    s.by_name[name] = s.params.size();
    list->push_back(s.params.size());
    s.params.push_back(std::move(p));
  }

  // Shard buffers: each parameter's padded rows, then this rank's rows copied in.
  at::NoGradGuard no_grad;
  for (auto& unit : s.units) {
    for (State::Shards* sh : {&unit.main, &unit.experts}) {
      for (std::size_t i : sh->params) {
        auto& p = s.params[i];
        p.off = sh->chunk;
        sh->chunk += p.rpr * p.inner;
        if (p.trainable) {
          p.goff = sh->gchunk;
          sh->gchunk += p.rpr * p.inner;
        }
        unit.elements += p.var.numel();
        s.mem.model_elements += p.var.numel();
      }
      sh->gflags = sh->gchunk;
      for (std::size_t i : sh->params)  // one flag per trainable parameter after the gradients
        if (s.params[i].trainable) s.params[i].gflag = sh->gchunk++;
      s.mem.buffer_elements += sh->chunk;
      sh->shards = world.device_zeros(sh->chunk, c10::kFloat);
      for (std::size_t i : sh->params) {
        auto& p = s.params[i];
        at::Tensor padded = sh->shards.narrow(0, p.off, p.rpr * p.inner).view({p.rpr, p.inner});
        if (p.own_rows > 0)
          padded.narrow(0, 0, p.own_rows)
              .copy_(p.var.detach().reshape({p.rows, p.inner}).narrow(0, p.row_begin, p.own_rows));
        std::vector<std::int64_t> shard_shape = p.shape;
        if (shard_shape.empty())
          shard_shape = {p.own_rows};  // a scalar: one row
        else
          shard_shape[0] = p.own_rows;
        p.shard = padded.narrow(0, 0, p.own_rows).view(shard_shape).detach().requires_grad_(p.trainable);
        s.mem.shard_elements += p.shard.numel();
        if (p.edp) s.mem.expert_elements += p.shard.numel();
        // The model's parameter: full shape in param_dtype, memory freed until gathered.
        p.var.set_data(at::empty(p.shape, sh->shards.options().dtype(options.param_dtype)));
        free_storage(p.var);
        if (p.trainable && p.own_rows > 0) s.trainable.push_back({p.name, p.shard});
      }
    }
    s.mem.largest_unit_elements = std::max(s.mem.largest_unit_elements, unit.elements);
    // Routed experts (expert parallelism): the owner keeps the model's fp32
    // tensor, which is its shard too; the other ranks free it for good.
    for (std::size_t i : unit.owned) {
      auto& p = s.params[i];
      s.mem.model_elements += p.var.numel();
      if (p.own_rows == 0) {
        free_storage(p.var);
        continue;
      }
      RHINE_CHECK(p.var.scalar_type() == c10::kFloat, kComponent, "routed experts must be float32 to be owned, got",
                  std::string(c10::toString(p.var.scalar_type())) + " for " + p.name, "build the model in float32");
      p.shard = p.var;
      s.mem.shard_elements += p.var.numel();
      s.mem.expert_elements += p.var.numel();
      if (p.trainable) s.trainable.push_back({p.name, p.shard});
    }
  }
  model->tie_mtp_weights();  // the MTP aliases follow the parameters' new storage
  // LoRA adapters (rhine/nn/adapter.h) are parameters of their block like any
  // other: gathered, run as the low-rank path beside the frozen base, reduced.
  // A merged one has written s B A into a base weight that is now sharded.
  for (const auto& layer : io::lora_layers(*model))
    RHINE_CHECK(!layer.merged, kComponent, "a merged LoRA adapter cannot be sharded", layer.name,
                "unmerge_lora before sharding, or shard the merged model without adapters");
  if (ep) {
    // Tokens travel within the EP group (the copy, unless EP is smaller).
    auto dispatch = std::make_shared<ExpertParallel>(s.ep_group ? *s.ep_group : *s.world);
    for (auto& layer : model->moe_layers()) layer->set_expert_dispatch(dispatch);
  }
  model->set_forward_hooks(state_);
  if (options.zero_stage == 2) s.gather_all();
}

FSDP::~FSDP() {
  if (!state_ || !state_->model) return;
  state_->model->set_forward_hooks(nullptr);
  for (auto& layer : state_->model->moe_layers()) layer->set_expert_dispatch(nullptr);
}

FSDP::NoSync::NoSync(FSDP* fsdp) : fsdp_(fsdp) { fsdp_->state_->sync = false; }
FSDP::NoSync::~NoSync() {
  if (fsdp_) fsdp_->state_->sync = true;
}
FSDP::NoSync::NoSync(NoSync&& other) noexcept : fsdp_(other.fsdp_) { other.fsdp_ = nullptr; }
FSDP::NoSync& FSDP::NoSync::operator=(NoSync&& other) noexcept {
  if (this != &other) {
    if (fsdp_) fsdp_->state_->sync = true;
    fsdp_ = other.fsdp_;
    other.fsdp_ = nullptr;
  }
  return *this;
}

const NamedParameters& FSDP::parameters() const { return state_->trainable; }

void FSDP::check_optimizer(const Optimizer& optimizer) {
  const auto* muon = dynamic_cast<const Muon*>(&optimizer);
  RHINE_CHECK(optimizer.type() != "muon" || (muon != nullptr && muon->sharded()), kComponent,
              "Muon orthogonalises whole matrices and needs FSDP's help to step row shards, got optimizer",
              optimizer.type(), "call muon.set_shards(fsdp.muon_shards()) before training");
}

namespace {

/// Muon's whole-matrix step over FSDP's row shards (rhine/optim/muon.h).
class FSDPMuonShards : public MuonShards {
 public:
  explicit FSDPMuonShards(std::shared_ptr<FSDP::State> state) : s_(std::move(state)) {}

  std::map<std::string, at::Tensor> orthogonalise(const std::map<std::string, at::Tensor>& rows,
                                                  const Orthogonalise& run) override {
    FSDP::State& s = *s_;
    at::NoGradGuard no_grad;
    // Which parameters some rank steps with Muon: every rank joins each
    // unit's gather, also for matrices of which it holds no rows.
    std::string mine;
    for (const auto& [name, u] : rows) mine += name + "\n";
    std::set<std::string> all;
    for (const auto& text : s.world->host_all_gather_bytes(mine)) {
      std::size_t at = 0, end;
      while ((end = text.find('\n', at)) != std::string::npos) {
        all.insert(text.substr(at, end - at));
        at = end + 1;
      }
    }
    std::map<std::string, at::Tensor> out;
    for (const auto& unit : s.units) {
      std::map<std::string, at::Tensor> whole;
      for (const FSDP::State::Shards* sh : {&unit.main, &unit.experts}) {
        std::vector<std::size_t> members;
        std::int64_t total = 0;
        for (std::size_t i : sh->params)
          if (all.count(s.params[i].name)) {
            members.push_back(i);
            total += s.params[i].rpr * s.params[i].inner;
          }
        if (total == 0) continue;
        // One all-gather (within the group that shards them) of the unit's
        // update rows, padded as the shards are.
        at::Tensor send = sh->group->device_zeros(total, c10::kFloat);
        std::int64_t off = 0;
        std::vector<std::int64_t> offs;
        for (std::size_t i : members) {
          const auto& p = s.params[i];
          offs.push_back(off);
          const auto it = rows.find(p.name);
          if (it != rows.end() && p.own_rows > 0)
            send.narrow(0, off, p.own_rows * p.inner).copy_(it->second.reshape({-1}));
          off += p.rpr * p.inner;
        }
        at::Tensor recv = sh->group->device_zeros(sh->n * total, c10::kFloat);
        sh->group->all_gather_into_tensor(recv, send);
        const at::Tensor all_rows = recv.view({sh->n, total});
        for (std::size_t k = 0; k < members.size(); ++k) {
          const auto& p = s.params[members[k]];
          if (!rows.count(p.name)) continue;  // a matrix this rank holds no rows of
          whole[p.name] = FSDP::State::unpad(all_rows, offs[k], p);
        }
      }
      for (std::size_t i : unit.owned) {  // routed experts: whole on their owner already
        const auto& p = s.params[i];
        const auto it = rows.find(p.name);
        if (it != rows.end()) whole[p.name] = it->second.reshape({p.rows, p.inner});
      }
      if (whole.empty()) continue;
      for (auto& [name, o] : run(whole)) {
        const auto& p = s.params[s.by_name.at(name)];
        out[name] = o.narrow(0, p.row_begin, p.own_rows).reshape(p.shard.sizes());
      }
    }
    return out;
  }

  std::pair<std::int64_t, std::int64_t> whole_shape(const std::string& name) const override {
    const auto& p = s_->params[s_->by_name.at(name)];
    return {p.rows, p.inner};
  }

 private:
  std::shared_ptr<FSDP::State> s_;
};

}  // namespace

std::shared_ptr<MuonShards> FSDP::muon_shards() { return std::make_shared<FSDPMuonShards>(state_); }

void FSDP::finish() { state_->finish(); }

double FSDP::grad_norm() {
  State& s = *state_;
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> sq;
  for (const auto& p : s.trainable)
    if (p.tensor.grad().defined())
      sq.push_back(at::linalg_vector_norm(p.tensor.grad(), 2, at::OptionalIntArrayRef{}, false, c10::kFloat)
                       .to(c10::kDouble)
                       .pow(2));
  const double local = sq.empty() ? 0.0 : host_value<double>(at::stack(sq).sum());
  const double total = s.n > 1 ? s.world->host_sum({local})[0] : local;
  return std::sqrt(total);
}

double FSDP::clip_grad_norm(double max_norm) {
  RHINE_CHECK(max_norm > 0 && std::isfinite(max_norm), kComponent, "max_norm must be finite and > 0",
              max_norm, "e.g. 1.0");
  const double total = grad_norm();
  if (!std::isfinite(total)) return total;
  const double coef = max_norm / (total + 1e-6);
  if (coef < 1.0) {
    at::NoGradGuard no_grad;
    for (const auto& p : state_->trainable)
      if (p.tensor.grad().defined()) p.tensor.mutable_grad().mul_(coef);
  }
  return total;
}

at::Tensor FSDP::full_parameter(const std::string& name) {
  State& s = *state_;
  auto it = s.by_name.find(name);
  RHINE_CHECK(it != s.by_name.end(), kComponent, "no parameter named", name, "see parameter_names()");
  const auto& p = s.params[it->second];
  at::NoGradGuard no_grad;
  if (p.edp) {  // a routed expert sharded over its owners' EDP group: they gather it, the first sends it
    at::Tensor whole = s.world->device_zeros(p.rows * p.inner, c10::kFloat);
    if (p.owner == s.ep_rank) {
      const auto& sh = s.units[p.unit].experts;
      at::Tensor mine = sh.shards.narrow(0, p.off, p.rpr * p.inner);
      at::Tensor all = sh.group->device_zeros(sh.n * p.rpr * p.inner, c10::kFloat);
      sh.group->all_gather_into_tensor(all, mine);
      whole.copy_(State::unpad(all.view({sh.n, p.rpr * p.inner}), 0, p).reshape({-1}));
    }
    s.world->broadcast_(whole, p.owner);  // rank p.owner: EP place p.owner, EDP place 0
    return whole.view(p.shape);
  }
  if (p.owner >= 0) {  // a routed expert: its owner sends it
    at::Tensor whole = p.owner == s.rank ? s.world->to_device(p.var.detach().clone())
                                         : s.world->device_zeros(p.rows * p.inner, c10::kFloat).view(p.shape);
    s.world->broadcast_(whole, p.owner);
    return whole;
  }
  at::Tensor mine = s.units[p.unit].main.shards.narrow(0, p.off, p.rpr * p.inner);
  at::Tensor all = s.world->device_zeros(s.n * p.rpr * p.inner, c10::kFloat);
  s.world->all_gather_into_tensor(all, mine);
  return State::unpad(all.view({s.n, p.rpr * p.inner}), 0, p).reshape(p.shape).clone();
}

std::vector<std::string> FSDP::parameter_names() const {
  std::vector<std::string> names;
  for (const auto& p : state_->params) names.push_back(p.name);
  return names;
}

std::vector<std::string> FSDP::unit_names() const {
  std::vector<std::string> names;
  for (const auto& u : state_->units) names.push_back(u.name);
  return names;
}

void FSDP::unshard() {
  State& s = *state_;
  RHINE_CHECK(s.model, kComponent, "unshard() called twice", "", "");
  std::vector<at::Tensor> whole;
  for (const auto& p : s.params) whole.push_back(full_parameter(p.name));
  for (std::size_t u = 0; u < s.units.size(); ++u) s.release(u);
  at::NoGradGuard no_grad;
  for (std::size_t i = 0; i < s.params.size(); ++i) s.params[i].var.set_data(whole[i]);
  s.model->tie_mtp_weights();
  s.model->set_forward_hooks(nullptr);
  for (auto& layer : s.model->moe_layers()) layer->set_expert_dispatch(nullptr);
  s.model = nn::CausalLM(nullptr);
}

namespace {

/// This rank's rows of every parameter and of `optimizer` (nullptr: none).
std::vector<io::RowPiece> pieces_of(const FSDP::State& s, const OptimizerState* optimizer) {
  std::vector<io::RowPiece> pieces;
  for (const auto& p : s.params)
    if (p.own_rows > 0) pieces.push_back({p.name, p.shard.detach(), p.shape, p.row_begin});
  if (optimizer != nullptr) {
    for (const auto& [key, t] : optimizer->tensors) {
      const auto it = s.by_name.find(key.substr(0, key.rfind('/')));
      RHINE_CHECK(it != s.by_name.end(), kComponent, "optimizer state for a parameter FSDP does not shard", key,
                  "build the optimizer over FSDP::parameters()");
      const auto& p = s.params[it->second];
      RHINE_CHECK(t.sizes() == p.shard.sizes(), kComponent, "optimizer slot not of its shard's shape", key,
                  "only elementwise optimizer state can be resharded");
      pieces.push_back({"optim/" + key, t, p.shape, p.row_begin});
    }
  }
  return pieces;
}

}  // namespace

std::vector<io::RowPiece> FSDP::state_pieces(const Optimizer* optimizer) const {
  if (optimizer == nullptr) return pieces_of(*state_, nullptr);
  const OptimizerState st = optimizer->state_dict();
  return pieces_of(*state_, &st);
}

void FSDP::save(const std::string& dir, const Optimizer* optimizer, const Json& meta) {
  State& s = *state_;
  std::optional<OptimizerState> st;  // taken once: its tensors are copies
  if (optimizer != nullptr) st = optimizer->state_dict();
  // Hybrid: the first copy writes; the others hold the same rows.
  const bool writes = !s.replica_group || s.replica_group->rank() == 0;
  const Json desc = writes ? io::write_row_shard(dir, s.rank, s.n, pieces_of(s, st ? &*st : nullptr)) : Json();
  const Json mine = {{"desc", desc}, {"optimizer", st ? st->meta : Json()}};
  std::vector<Json> descs, metas;
  for (const auto& text : s.world->host_all_gather_bytes(mine.dump())) {
    Json j = Json::parse(text);
    descs.push_back(j["desc"]);
    if (!j["optimizer"].is_null()) metas.push_back(j["optimizer"]);
  }
  if (s.rank == 0 && writes) {
    Json m = meta.is_object() ? meta : Json::object();
    if (!metas.empty()) m["optimizer"] = merge_state_meta(metas);
    io::write_row_index(dir, descs, m);
  }
  s.run_world->barrier();  // every file durable before anyone commits or reads
}

void FSDP::load_parameters(const io::RowReader& reader) {
  State& s = *state_;
  at::NoGradGuard no_grad;
  for (auto& p : s.params) {
    // A base model streamed in (defer_init) has no adapters: they keep apply_lora's values.
    if (s.unloaded && io::is_lora_parameter(p.name) && !reader.contains(p.name)) continue;
    RHINE_CHECK(reader.contains(p.name), kComponent, "the checkpoint has no tensor", p.name,
                "resume with the model config of the run that wrote it");
    RHINE_CHECK(reader.shape(p.name) == p.shape, kComponent, "the checkpoint's shape differs for " + p.name,
                c10::str(c10::IntArrayRef(reader.shape(p.name))), "expected " + c10::str(c10::IntArrayRef(p.shape)));
    if (p.own_rows == 0) continue;
    p.shard.copy_(reader.rows(p.name, p.row_begin, p.row_begin + p.own_rows).reshape(p.shard.sizes()));
  }
  s.unloaded = false;
}

void FSDP::initialize() {
  State& s = *state_;
  RHINE_CHECK(s.model, kComponent, "initialize() after unshard()", "", "");
  at::NoGradGuard no_grad;
  // Every rank draws every parameter whole, in the constructor's order and
  // from its generator (the same numbers as an eager build), one at a time,
  // and keeps its rows: at most one parameter is whole at once.
  auto gen = s.model->init_generator();
  for (const auto& step : s.model->init_plan()) {
    const auto it = s.by_name.find(step.name);
    RHINE_CHECK(it != s.by_name.end(), kComponent, "the initialisation names a parameter FSDP does not hold",
                step.name, "shard the model right after building it");
    auto& p = s.params[it->second];
    at::Tensor whole = at::empty(p.shape, at::TensorOptions().dtype(c10::kFloat));  // drawn on the CPU, as eagerly
    step.apply(whole, gen);
    if (p.own_rows > 0)
      p.shard.copy_(whole.reshape({p.rows, p.inner}).narrow(0, p.row_begin, p.own_rows).reshape(p.shard.sizes()));
  }
  s.unloaded = false;
}

void FSDP::load_optimizer(const io::RowReader& reader, const Json& meta, Optimizer& optimizer,
                          const std::string& prefix) const {
  const State& s = *state_;
  auto slot = [&](const std::string& key) {
    const auto& p = s.params[s.by_name.at(key.substr(0, key.rfind('/')))];
    return reader.rows(prefix + key, p.row_begin, p.row_begin + p.own_rows)
        .reshape(p.shard.sizes())
        .to(p.shard.device());
  };
  optimizer.load_state_dict(reshard_state(optimizer, meta, reader.names(prefix), slot));
}

FSDPMemory FSDP::memory() const { return state_->mem; }

void FSDP::reset_peak() {
  state_->mem.peak_gathered_elements = state_->mem.gathered_elements;
  state_->mem.peak_full_grad_elements = state_->mem.full_grad_elements;
}

const FSDPOptions& FSDP::options() const { return state_->o; }

}  // namespace rhine::dist
