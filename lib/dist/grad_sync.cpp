#include "rhine/dist/grad_sync.h"

#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <mutex>
#include <unordered_set>
#include <utility>

#include "rhine/core/error.h"

namespace rhine::dist {

namespace {
constexpr const char* kComponent = "dist";
}  // namespace

struct GradientSync::State {
  World* world = nullptr;
  NamedParameters params;
  GradientSyncOptions options;

  struct Bucket {
    std::vector<std::size_t> members;
    std::vector<std::int64_t> offsets;  ///< element offset of each member in `flat`
    at::Tensor flat;                    ///< [sum of numels], members' dtype and device
    std::size_t pending = 0;            ///< members whose gradient is not in `flat` yet
    bool launched = false;
    PendingOp op;
  };
  std::vector<Bucket> buckets;
  std::vector<std::size_t> bucket_of;  ///< parameter -> bucket
  std::vector<std::size_t> slot_of;    ///< parameter -> position in its bucket
  std::vector<bool> ready;             ///< parameter's gradient copied this step
  std::size_t next_launch = 0;
  std::size_t overlapped = 0;
  bool sync_enabled = true;
  /// Accumulators whose post hooks we own, with the hook keys (to remove them).
  /// (A std::shared_ptr up to LibTorch 2.x, a c10::intrusive_ptr in later ones.)
  using NodePtr = decltype(torch::autograd::impl::grad_accumulator(std::declval<const at::Tensor&>()));
  std::vector<std::pair<NodePtr, std::uintptr_t>> hooks;
  std::mutex mutex;

  void reset_step() {
    for (auto& b : buckets) {
      b.pending = b.members.size();
      b.launched = false;
    }
    std::fill(ready.begin(), ready.end(), false);
    next_launch = 0;
  }

  /// Copies parameter i's gradient (zero when it has none) into its bucket.
  void stage(std::size_t i) {
    Bucket& b = buckets[bucket_of[i]];
    const at::Tensor& p = params[i].tensor;
    at::Tensor dst = b.flat.narrow(0, b.offsets[slot_of[i]], p.numel());
    const at::Tensor& g = p.grad();
    if (g.defined()) {
      RHINE_CHECK(!g.is_sparse(), kComponent, "sparse gradients are not supported, parameter",
                  params[i].name, "use dense embeddings");
      dst.copy_(g.reshape({-1}));
    } else {
      dst.zero_();
    }
    ready[i] = true;
    --b.pending;
  }

  /// Launches every ready bucket from next_launch on, in order.
  void launch_ready() {
    while (next_launch < buckets.size() && buckets[next_launch].pending == 0) {
      Bucket& b = buckets[next_launch];
      b.op = world->all_reduce_async(b.flat, ReduceOp::kSum);
      b.launched = true;
      ++next_launch;
    }
  }

  /// Called by the hook of parameter i after its .grad was updated.
  void on_grad_ready(std::size_t i) {
    std::lock_guard<std::mutex> lock(mutex);
    if (!sync_enabled) return;
    RHINE_CHECK(!ready[i], kComponent,
                "the gradient of a parameter became ready twice before finish(), parameter",
                params[i].name,
                "wrap gradient-accumulation micro-steps in GradientSync::no_sync() and call "
                "finish() once after the last backward of each step");
    stage(i);
    launch_ready();
  }
};

/// Post hook on a parameter's AccumulateGrad node.
struct GradientSync::Hook : torch::autograd::FunctionPostHook {
  Hook(std::weak_ptr<GradientSync::State> state, std::size_t index)
      : state_(std::move(state)), index_(index) {}
  torch::autograd::variable_list operator()(const torch::autograd::variable_list& outputs,
                                            const torch::autograd::variable_list& /*inputs*/) override {
    if (auto s = state_.lock()) s->on_grad_ready(index_);
    return outputs;
  }
  std::weak_ptr<GradientSync::State> state_;
  std::size_t index_;
};

GradientSync::GradientSync(World& world, const NamedParameters& params,
                           const GradientSyncOptions& options)
    : state_(std::make_shared<State>()) {
  RHINE_CHECK(options.bucket_bytes > 0, kComponent, "bucket_bytes must be positive",
              options.bucket_bytes, "PyTorch DDP uses 25 MiB");
  State& s = *state_;
  s.world = &world;
  s.params = params;
  s.options = options;
  std::unordered_set<const void*> seen;
  for (const auto& p : params) {
    RHINE_CHECK(p.tensor.defined() && p.tensor.is_floating_point(), kComponent,
                "GradientSync needs defined floating-point parameters, parameter", p.name, "");
    RHINE_CHECK(p.tensor.requires_grad(), kComponent,
                "GradientSync got a parameter without requires_grad, parameter", p.name,
                "leave frozen parameters (e.g. the base weights under LoRA) out of the list");
    RHINE_CHECK(seen.insert(p.tensor.unsafeGetTensorImpl()).second, kComponent,
                "a parameter is listed twice (tied weights?), parameter", p.name,
                "list each tensor once");
  }
  const std::size_t n = params.size();
  s.bucket_of.assign(n, 0);
  s.slot_of.assign(n, 0);
  s.ready.assign(n, false);
  if (world.world_size() == 1) return;

  // Buckets over the parameters in reverse order, each of one dtype and device.
  std::int64_t bytes = 0;
  for (std::size_t k = n; k-- > 0;) {
    const at::Tensor& t = params[k].tensor;
    const std::int64_t tb = t.numel() * static_cast<std::int64_t>(t.element_size());
    bool fresh = s.buckets.empty();
    if (!fresh) {
      const at::Tensor& first = params[s.buckets.back().members.front()].tensor;
      fresh = first.scalar_type() != t.scalar_type() || first.device() != t.device() ||
              bytes + tb > options.bucket_bytes;
    }
    if (fresh) {
      s.buckets.emplace_back();
      bytes = 0;
    }
    auto& b = s.buckets.back();
    s.bucket_of[k] = s.buckets.size() - 1;
    s.slot_of[k] = b.members.size();
    b.offsets.push_back(b.members.empty() ? 0 : b.offsets.back() + params[b.members.back()].tensor.numel());
    b.members.push_back(k);
    bytes += tb;
  }
  for (auto& b : s.buckets) {
    const at::Tensor& first = params[b.members.front()].tensor;
    const std::int64_t total = b.offsets.back() + params[b.members.back()].tensor.numel();
    b.flat = world.device_zeros(total, first.scalar_type());  // on the device group's device
  }
  s.reset_step();

  if (options.overlap) {
    for (std::size_t i = 0; i < n; ++i) {
      const at::Tensor& t = params[i].tensor;
      auto acc = torch::autograd::impl::grad_accumulator(t);
      RHINE_CHECK(acc != nullptr, kComponent, "parameter has no gradient accumulator", params[i].name,
                  "GradientSync needs leaf parameters with requires_grad");
      const std::uintptr_t key = acc->add_post_hook(std::make_unique<Hook>(state_, i));
      s.hooks.emplace_back(std::move(acc), key);
    }
  }
}

GradientSync::~GradientSync() {
  if (!state_) return;
  for (auto& [node, key] : state_->hooks) node->del_post_hook(key);
}

GradientSync::GradientSync(GradientSync&&) noexcept = default;
GradientSync& GradientSync::operator=(GradientSync&& other) noexcept {
  if (this != &other) {
    if (state_) {
      for (auto& [node, key] : state_->hooks) node->del_post_hook(key);
    }
    state_ = std::move(other.state_);
  }
  return *this;
}

void GradientSync::finish() {
  RHINE_CHECK(state_ != nullptr, kComponent, "finish() on a moved-from GradientSync", "", "");
  State& s = *state_;
  if (s.world->world_size() == 1) return;
  std::lock_guard<std::mutex> lock(s.mutex);
  at::NoGradGuard no_grad;
  s.overlapped = s.next_launch;
  for (std::size_t i = 0; i < s.params.size(); ++i) {
    if (!s.ready[i]) s.stage(i);
  }
  s.launch_ready();
  const double ws = static_cast<double>(s.world->world_size());
  try {
    for (auto& b : s.buckets) b.op.wait();
  } catch (...) {
    s.reset_step();
    throw;
  }
  for (auto& b : s.buckets) {
    b.flat.div_(ws);
    for (std::size_t slot = 0; slot < b.members.size(); ++slot) {
      at::Tensor& p = s.params[b.members[slot]].tensor;
      at::Tensor src = b.flat.narrow(0, b.offsets[slot], p.numel()).view(p.sizes());
      at::Tensor& g = p.mutable_grad();
      if (g.defined() && g.scalar_type() == p.scalar_type() && g.is_contiguous()) {
        g.copy_(src);
      } else {
        g = src.clone();
      }
    }
  }
  s.reset_step();
}

void GradientSync::set_sync_enabled(bool enabled) {
  std::lock_guard<std::mutex> lock(state_->mutex);
  state_->sync_enabled = enabled;
}

bool GradientSync::sync_enabled() const { return state_->sync_enabled; }

std::vector<std::vector<std::size_t>> GradientSync::buckets() const {
  std::vector<std::vector<std::size_t>> out;
  for (const auto& b : state_->buckets) out.push_back(b.members);
  return out;
}

std::size_t GradientSync::last_overlapped_buckets() const { return state_->overlapped; }

// --- NoSyncGuard -------------------------------------------------------------

NoSyncGuard::NoSyncGuard(GradientSync* sync) : sync_(sync), previous_(sync->sync_enabled()) {
  sync_->set_sync_enabled(false);
}

NoSyncGuard::~NoSyncGuard() {
  if (sync_) sync_->set_sync_enabled(previous_);
}

NoSyncGuard::NoSyncGuard(NoSyncGuard&& other) noexcept
    : sync_(std::exchange(other.sync_, nullptr)), previous_(other.previous_) {}

NoSyncGuard& NoSyncGuard::operator=(NoSyncGuard&& other) noexcept {
  if (this != &other) {
    if (sync_) sync_->set_sync_enabled(previous_);
    sync_ = std::exchange(other.sync_, nullptr);
    previous_ = other.previous_;
  }
  return *this;
}

// --- reference twin ----------------------------------------------------------

void sync_gradients_reference(World& world, const NamedParameters& params) {
  if (world.world_size() == 1) return;
  at::NoGradGuard no_grad;
  for (const auto& np : params) {
    at::Tensor p = np.tensor;
    at::Tensor& g = p.mutable_grad();
    at::Tensor buf = world.to_device(g.defined() ? g.contiguous().clone() : at::zeros_like(p));
    world.all_reduce_(buf, ReduceOp::kSum);
    buf.div_(static_cast<double>(world.world_size()));
    g = buf;
  }
}

}  // namespace rhine::dist
