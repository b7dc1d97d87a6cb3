#include "rhine/dist/world.h"

#include <ATen/core/grad_mode.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <fmt/format.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef USE_C10D_NCCL
#include <ATen/Context.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <algorithm>
#include <numeric>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <utility>

#include "rhine/core/error.h"
#include "rhine/torch/compat.h"
#include "rhine/torch/profile.h"
#include "rhine/torch/sync.h"

extern char** environ;

namespace rhine::dist {

// LibTorch 2.0 split c10d's process groups into a ProcessGroup facade and
// per-device Backends; ProcessGroupGloo/NCCL derive from Backend there and
// from ProcessGroup on 1.13. Rhine drives the backend object directly, so
// only the base class name differs.
#if RHINE_TORCH_VERSION_AT_LEAST(2, 0)
using C10dGroup = c10d::Backend;
#else
using C10dGroup = c10d::ProcessGroup;
#endif

namespace {

constexpr const char* kComponent = "dist";

double seconds(std::chrono::milliseconds ms) { return static_cast<double>(ms.count()) / 1000.0; }

std::string fmt_seconds(std::chrono::milliseconds ms) {
  std::ostringstream os;
  os << seconds(ms);
  return os.str();
}

/// The first line of an exception's message, without LibTorch's backtrace.
std::string first_line(const std::exception& e) {
  std::string msg;
  if (const auto* ce = dynamic_cast<const c10::Error*>(&e)) {
    msg = ce->what_without_backtrace();
  } else {
    msg = e.what();
  }
  auto nl = msg.find('\n');
  if (nl != std::string::npos) msg.resize(nl);
  return msg;
}

/// Turns a c10d failure into "[dist] OP timed out after N s on rank R ..." or
/// "[dist] OP failed on rank R ...".
[[noreturn]] void throw_collective_error(const std::string& op, int rank, int world_size,
                                         std::chrono::milliseconds timeout, const std::exception& e) {
  const std::string cause = first_line(e);
  const bool timed_out = cause.find("imed out") != std::string::npos ||
                         cause.find("imeout") != std::string::npos;
  std::ostringstream what;
  if (timed_out) {
    what << op << " timed out after " << fmt_seconds(timeout) << " s on rank " << rank << " of "
         << world_size;
  } else {
    what << op << " failed on rank " << rank << " of " << world_size
         << " (a peer rank probably exited; timeout " << fmt_seconds(timeout) << " s)";
  }
  throw Error(kComponent, what.str(), cause,
              "check the other ranks' logs for a crash or a stalled step, and that all ranks run "
              "the same collectives in the same order; raise DistOptions::timeout if steps are "
              "legitimately slow");
}

bool is_loopback(const std::string& addr) {
  return addr == "localhost" || addr == "::1" || addr.rfind("127.", 0) == 0;
}

int parse_int(const std::map<std::string, std::string>& env, const std::string& name, int lo,
              int hi) {
  const std::string& s = env.at(name);
  errno = 0;
  char* end = nullptr;
  long v = std::strtol(s.c_str(), &end, 10);
  RHINE_CHECK(!s.empty() && end == s.c_str() + s.size() && errno == 0 && v >= lo && v <= hi,
              kComponent, "environment variable " + name + " must be an integer in [" +
                              std::to_string(lo) + ", " + std::to_string(hi) + "]",
              s, "set it as torchrun / srun would, or unset it for a single process");
  return static_cast<int>(v);
}

const std::string* find(const std::map<std::string, std::string>& env, const std::string& name) {
  auto it = env.find(name);
  return it == env.end() ? nullptr : &it->second;
}

c10d::ReduceOp to_c10d(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg: return c10d::ReduceOp(c10d::ReduceOp::SUM);
    case ReduceOp::kMin: return c10d::ReduceOp(c10d::ReduceOp::MIN);
    case ReduceOp::kMax: return c10d::ReduceOp(c10d::ReduceOp::MAX);
  }
  return c10d::ReduceOp(c10d::ReduceOp::SUM);
}

}  // namespace

void DistOptions::validate() const {
  RHINE_CHECK(backend == "auto" || backend == "gloo" || backend == "nccl", kComponent,
              "unknown backend", backend, "use \"auto\", \"gloo\" or \"nccl\"");
  RHINE_CHECK(timeout.count() > 0, kComponent, "timeout must be positive, got ms",
              timeout.count(), "e.g. std::chrono::seconds(300)");
}

// --- rendezvous ---------------------------------------------------------------

Rendezvous rendezvous_from_env(const std::map<std::string, std::string>& env) {
  Rendezvous rv;
  constexpr int kMaxRanks = 1 << 20;
  if (find(env, "RANK") || find(env, "WORLD_SIZE")) {
    RHINE_CHECK(find(env, "RANK") && find(env, "WORLD_SIZE"), kComponent,
                "RANK and WORLD_SIZE must be set together", find(env, "RANK") ? "RANK" : "WORLD_SIZE",
                "launch with torchrun, or set both");
    rv.source = "torchrun";
    rv.world_size = parse_int(env, "WORLD_SIZE", 1, kMaxRanks);
    rv.rank = parse_int(env, "RANK", 0, rv.world_size - 1);
    rv.local_rank = find(env, "LOCAL_RANK") ? parse_int(env, "LOCAL_RANK", 0, kMaxRanks) : rv.rank;
  } else if (find(env, "SLURM_PROCID") && find(env, "SLURM_NTASKS")) {
    rv.source = "slurm";
    rv.world_size = parse_int(env, "SLURM_NTASKS", 1, kMaxRanks);
    rv.rank = parse_int(env, "SLURM_PROCID", 0, rv.world_size - 1);
    rv.local_rank =
        find(env, "SLURM_LOCALID") ? parse_int(env, "SLURM_LOCALID", 0, kMaxRanks) : rv.rank;
  } else {
    return rv;  // single process
  }
  if (rv.world_size == 1) return rv;
  const std::string hint =
      rv.source == "slurm"
          ? "export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1) and "
            "MASTER_PORT (a free port) in the job script before srun"
          : "torchrun sets MASTER_ADDR and MASTER_PORT; when launching by hand, set them on every rank";
  RHINE_CHECK(find(env, "MASTER_ADDR") && !find(env, "MASTER_ADDR")->empty(), kComponent,
              "MASTER_ADDR is not set for a multi-process run, world size", rv.world_size, hint);
  RHINE_CHECK(find(env, "MASTER_PORT"), kComponent,
              "MASTER_PORT is not set for a multi-process run, world size", rv.world_size, hint);
  rv.master_addr = *find(env, "MASTER_ADDR");
  rv.master_port = parse_int(env, "MASTER_PORT", 1, 65535);
  return rv;
}

Rendezvous rendezvous_from_env() {
  std::map<std::string, std::string> env;
  for (char** e = environ; e && *e; ++e) {
    const char* eq = std::strchr(*e, '=');
    if (!eq) continue;
    std::string key(*e, static_cast<std::size_t>(eq - *e));
    if (key == "RANK" || key == "WORLD_SIZE" || key == "LOCAL_RANK" || key == "MASTER_ADDR" ||
        key == "MASTER_PORT" || key.rfind("SLURM_", 0) == 0) {
      env.emplace(std::move(key), std::string(eq + 1));
    }
  }
  return rendezvous_from_env(env);
}

// --- World ------------------------------------------------------------------

struct World::Impl {
  c10::intrusive_ptr<c10d::Store> store;
  /// Takes tensors on World::device(): NCCL, or Gloo on CPU runs.
  c10::intrusive_ptr<C10dGroup> device_group;
  /// Takes CPU tensors: Gloo; the device group itself when that is Gloo
  /// (unless the strict device check asks for two).
  c10::intrusive_ptr<C10dGroup> host_group;
  /// Whether the device group serves _allgather_base / _reduce_scatter_base;
  /// cleared at the first "does not support" (Gloo in LibTorch 1.13).
  bool native_all_gather = RHINE_TORCH_VERSION_AT_LEAST(2, 0);
  bool native_reduce_scatter = RHINE_TORCH_VERSION_AT_LEAST(2, 0);
  /// Strict device check: storages handed out by to_device / device_zeros
  /// (shared with the Worlds split from this one: a buffer of one serves all).
  struct DeviceStorages {
    std::vector<c10::weak_intrusive_ptr<c10::StorageImpl>> storages;
    std::size_t prune_at = 64;
  };
  bool strict = false;
  std::shared_ptr<DeviceStorages> device_storages = std::make_shared<DeviceStorages>();
  /// What split() needs to build groups like these.
  bool loopback = false;
  int splits = 0;      ///< split() calls so far: each gets its own key space on the store
  std::string prefix;  ///< this World's key space ("" for the run's World)

  void remember(const at::Tensor& t) {
    if (!strict) return;
    auto& d = *device_storages;
    if (d.storages.size() >= d.prune_at) {  // forget freed storages now and then
      d.storages.erase(std::remove_if(d.storages.begin(), d.storages.end(), [](const auto& w) { return w.expired(); }),
                       d.storages.end());
      d.prune_at = std::max<std::size_t>(64, 2 * d.storages.size());
    }
    d.storages.push_back(t.storage().getWeakStorageImpl());
  }
  bool remembered(const at::Tensor& t) const {
    const c10::StorageImpl* mine = t.storage().unsafeGetStorageImpl();
    return std::any_of(device_storages->storages.begin(), device_storages->storages.end(), [&](const auto& w) {
      return !w.expired() && w._unsafe_get_target() == mine;
    });
  }
};

struct PendingOp::Impl {
  Impl(c10::intrusive_ptr<c10d::Work> work_, std::string op_, int rank_, int world_size_,
       std::chrono::milliseconds timeout_)
      : work(std::move(work_)), op(std::move(op_)), rank(rank_), world_size(world_size_), timeout(timeout_) {}
  c10::intrusive_ptr<c10d::Work> work;
  std::string op;
  int rank = 0, world_size = 1;
  std::chrono::milliseconds timeout{0};
  at::Tensor divide;  ///< kAvg: divided by world_size after completion
};

World::World() = default;
World::~World() = default;
World::World(World&&) noexcept = default;
World& World::operator=(World&&) noexcept = default;

namespace {

/// Waits for `work`; a c10d failure becomes a rhine::Error. Gloo enforces the
/// timeout itself; the wait bound is a backstop a little above it.
void wait_work(const c10::intrusive_ptr<c10d::Work>& work, const std::string& op, int rank,
               int world_size, std::chrono::milliseconds timeout) {
  try {
    work->wait(timeout + std::chrono::seconds(10));
  } catch (const std::exception& e) {
    throw_collective_error(op, rank, world_size, timeout, e);
  }
}

void check_collective_tensor(const at::Tensor& t, const std::string& op) {
  RHINE_CHECK(t.defined(), kComponent, op + " needs a defined tensor", "undefined", "");
  RHINE_CHECK(t.is_contiguous(), kComponent, op + " needs a contiguous tensor, got sizes",
              t.sizes(), "pass tensor.contiguous() and copy the result back");
}

bool unsupported(const std::exception& e) {
  return std::string(e.what()).find("does not support") != std::string::npos;
}

}  // namespace

void PendingOp::wait() {
  if (!impl_) return;
  RHINE_RANGE("rhine::wait");
  auto impl = std::move(impl_);
  wait_work(impl->work, impl->op, impl->rank, impl->world_size, impl->timeout);
  if (impl->divide.defined()) impl->divide.div_(impl->world_size);
}

at::Tensor World::to_device(const at::Tensor& tensor) {
  RHINE_CHECK(tensor.defined(), kComponent, "to_device needs a defined tensor", "undefined", "");
  at::Tensor t = tensor.to(device_).contiguous();
  if (impl_) impl_->remember(t);
  return t;
}

at::Tensor World::device_zeros(int64_t numel, c10::ScalarType dtype) {
  at::Tensor t = at::zeros({numel}, at::TensorOptions().dtype(dtype).device(device_));
  if (impl_) impl_->remember(t);
  return t;
}

void World::check_device_tensor(const at::Tensor& t, const std::string& op) const {
  check_collective_tensor(t, op);
  if (!impl_) return;
  RHINE_CHECK(t.device() == device_ || (device_.is_cpu() && t.is_cpu()), kComponent,
              op + " runs on the " + backend_ + " device group, which takes tensors on " +
                  device_.str() + "; got a tensor on",
              t.device().str(),
              "move buffers with World::to_device; host scalars (sums, counts, votes) go through "
              "World::host_*");
  RHINE_CHECK(!impl_->strict || impl_->remembered(t), kComponent,
              op + " got a tensor the device group did not hand out (strict device check: under "
                   "NCCL a host tensor here fails), sizes",
              t.sizes(),
              "build device buffers with World::to_device / World::device_zeros, and send host "
              "scalars through World::host_*");
}

void World::check_host_tensor(const at::Tensor& t, const std::string& op) const {
  check_collective_tensor(t, op);
  RHINE_CHECK(t.is_cpu(), kComponent, op + " runs on the host group, which takes CPU tensors; got a tensor on",
              t.device().str(), "use the device collectives (all_reduce_, ...) for device tensors");
}

// Each collective below: a single process returns at once; otherwise launch on
// the group (a c10d exception becomes a [dist] error) and wait.

PendingOp World::launch_all_reduce(bool host, at::Tensor& tensor, ReduceOp op, const char* name) {
  RHINE_RANGE(std::string("rhine::") + name);
  PendingOp pending;
  if (!impl_) return pending;
  std::vector<at::Tensor> tensors{tensor};
  c10d::AllreduceOptions opts;
  opts.reduceOp = to_c10d(op);
  c10::intrusive_ptr<c10d::Work> work;
  try {
    work = (host ? impl_->host_group : impl_->device_group)->allreduce(tensors, opts);
  } catch (const std::exception& e) {
    throw_collective_error(name, rank_, world_size_, options_.timeout, e);
  }
  pending.impl_ = std::make_shared<PendingOp::Impl>(std::move(work), name, rank_, world_size_, options_.timeout);
  if (op == ReduceOp::kAvg) pending.impl_->divide = tensor;
  return pending;
}

void World::run_broadcast(bool host, at::Tensor& tensor, int root, const char* name) {
  RHINE_RANGE(std::string("rhine::") + name);
  RHINE_CHECK(root >= 0 && root < world_size_, kComponent, std::string(name) + " root out of range",
              root, "use a rank in [0, world_size)");
  if (!impl_) return;
  std::vector<at::Tensor> tensors{tensor};
  c10d::BroadcastOptions opts;
  opts.rootRank = root;
  c10::intrusive_ptr<c10d::Work> work;
  try {
    work = (host ? impl_->host_group : impl_->device_group)->broadcast(tensors, opts);
  } catch (const std::exception& e) {
    throw_collective_error(name, rank_, world_size_, options_.timeout, e);
  }
  wait_work(work, name, rank_, world_size_, options_.timeout);
}

std::vector<at::Tensor> World::run_all_gather(bool host, const at::Tensor& tensor, const char* name) {
  RHINE_RANGE(std::string("rhine::") + name);
  if (!impl_) return {tensor.clone()};
  std::vector<std::vector<at::Tensor>> out(1);
  for (int r = 0; r < world_size_; ++r) out[0].push_back(at::empty_like(tensor));
  std::vector<at::Tensor> in{tensor};
  c10::intrusive_ptr<c10d::Work> work;
  try {
    work = (host ? impl_->host_group : impl_->device_group)->allgather(out, in);
  } catch (const std::exception& e) {
    throw_collective_error(name, rank_, world_size_, options_.timeout, e);
  }
  wait_work(work, name, rank_, world_size_, options_.timeout);
  return out[0];
}

void World::barrier() {
  RHINE_RANGE("rhine::barrier");
  if (!impl_) return;
  c10::intrusive_ptr<c10d::Work> work;
  try {
    work = impl_->host_group->barrier();
  } catch (const std::exception& e) {
    throw_collective_error("barrier", rank_, world_size_, options_.timeout, e);
  }
  wait_work(work, "barrier", rank_, world_size_, options_.timeout);
}

PendingOp World::all_reduce_async(at::Tensor& tensor, ReduceOp op) {
  check_device_tensor(tensor, "all_reduce");
  return launch_all_reduce(false, tensor, op, "all_reduce");
}

void World::all_reduce_(at::Tensor& tensor, ReduceOp op) { all_reduce_async(tensor, op).wait(); }

void World::broadcast_(at::Tensor& tensor, int root) {
  check_device_tensor(tensor, "broadcast");
  run_broadcast(false, tensor, root, "broadcast");
}

std::vector<at::Tensor> World::all_gather(const at::Tensor& tensor) {
  check_device_tensor(tensor, "all_gather");
  return run_all_gather(false, tensor, "all_gather");
}

PendingOp World::all_gather_into_tensor_async(at::Tensor& out, const at::Tensor& input) {
  RHINE_RANGE("rhine::all_gather_into_tensor");
  check_device_tensor(out, "all_gather_into_tensor");
  check_device_tensor(input, "all_gather_into_tensor");
  RHINE_CHECK(out.numel() == input.numel() * world_size_ && out.scalar_type() == input.scalar_type(),
              kComponent, "all_gather_into_tensor needs out of world_size x input's elements and dtype, got",
              std::to_string(out.numel()) + " vs " + std::to_string(world_size_) + " x " +
                  std::to_string(input.numel()),
              "allocate out as [world_size * input.numel()]");
  PendingOp pending;
  if (!impl_) {
    out.view({-1}).copy_(input.reshape({-1}));
    return pending;
  }
  at::Tensor flat_out = out.view({-1}), flat_in = input.view({-1});
  if (flat_in.scalar_type() == at::kBFloat16) {
    // A gather only moves bits: bf16 travels as fp16 (Gloo in 1.13 has no bf16).
    flat_out = flat_out.view(at::kHalf);
    flat_in = flat_in.view(at::kHalf);
  }
  c10::intrusive_ptr<c10d::Work> work;
  if (impl_->native_all_gather) {
    try {
      work = impl_->device_group->_allgather_base(flat_out, flat_in);
    } catch (const std::exception& e) {
      if (!unsupported(e)) throw_collective_error("all_gather_into_tensor", rank_, world_size_, options_.timeout, e);
      impl_->native_all_gather = false;  // this backend lacks it: emulate from now on
    }
  }
  if (!work) {  // list all-gather straight into out's chunks
    std::vector<std::vector<at::Tensor>> outs(1);
    for (const auto& c : flat_out.chunk(world_size_)) outs[0].push_back(c);
    std::vector<at::Tensor> in{flat_in};
    try {
      work = impl_->device_group->allgather(outs, in);
    } catch (const std::exception& e) {
      throw_collective_error("all_gather_into_tensor", rank_, world_size_, options_.timeout, e);
    }
  }
  pending.impl_ = std::make_shared<PendingOp::Impl>(std::move(work), "all_gather_into_tensor", rank_, world_size_,
                                                    options_.timeout);
  return pending;
}

void World::all_gather_into_tensor(at::Tensor& out, const at::Tensor& input) {
  all_gather_into_tensor_async(out, input).wait();
}

void World::reduce_scatter_tensor(at::Tensor& out, const at::Tensor& input, ReduceOp op) {
  RHINE_RANGE("rhine::reduce_scatter_tensor");
  check_device_tensor(out, "reduce_scatter_tensor");
  check_device_tensor(input, "reduce_scatter_tensor");
  RHINE_CHECK(input.numel() == out.numel() * world_size_ && out.scalar_type() == input.scalar_type(),
              kComponent, "reduce_scatter_tensor needs input of world_size x out's elements and dtype, got",
              std::to_string(input.numel()) + " vs " + std::to_string(world_size_) + " x " +
                  std::to_string(out.numel()),
              "allocate input as [world_size * out.numel()]");
  at::Tensor flat_out = out.view({-1}), flat_in = input.view({-1});
  if (!impl_) {
    flat_out.copy_(flat_in);
    return;
  }
  c10::intrusive_ptr<c10d::Work> work;
  if (impl_->native_reduce_scatter) {
    c10d::ReduceScatterOptions opts;
    opts.reduceOp = to_c10d(op);
    try {
      work = impl_->device_group->_reduce_scatter_base(flat_out, flat_in, opts);
    } catch (const std::exception& e) {
      if (!unsupported(e)) throw_collective_error("reduce_scatter_tensor", rank_, world_size_, options_.timeout, e);
      impl_->native_reduce_scatter = false;
    }
  }
  if (work) {
    wait_work(work, "reduce_scatter_tensor", rank_, world_size_, options_.timeout);
  } else {  // all-reduce a copy, keep this rank's chunk
    at::Tensor all = flat_in.clone();
    launch_all_reduce(false, all, op == ReduceOp::kAvg ? ReduceOp::kSum : op, "reduce_scatter_tensor").wait();
    flat_out.copy_(all.chunk(world_size_)[static_cast<std::size_t>(rank_)]);
  }
  if (op == ReduceOp::kAvg) flat_out.div_(world_size_);
}

void World::all_to_all_single(at::Tensor& out, const at::Tensor& input, const std::vector<std::int64_t>& out_splits,
                              const std::vector<std::int64_t>& in_splits) {
  RHINE_RANGE("rhine::all_to_all_single");
  check_device_tensor(out, "all_to_all_single");
  check_device_tensor(input, "all_to_all_single");
  auto sum = [](const std::vector<std::int64_t>& v) { return std::accumulate(v.begin(), v.end(), std::int64_t{0}); };
  const auto rows = [](const at::Tensor& t) { return t.dim() == 0 ? std::int64_t{1} : t.size(0); };
  RHINE_CHECK(static_cast<int>(out_splits.size()) == world_size_ && static_cast<int>(in_splits.size()) == world_size_ &&
                  sum(out_splits) == rows(out) && sum(in_splits) == rows(input) &&
                  out.scalar_type() == input.scalar_type(),
              kComponent, "all_to_all_single needs world_size splits summing to the rows of out and input, got",
              fmt::format("out {} rows, splits [{}]; input {} rows, splits [{}]", rows(out), fmt::join(out_splits, ", "),
                          rows(input), fmt::join(in_splits, ", ")),
              "split dim 0 into one count per rank, and allocate out with the rows the others send");
  if (!impl_) {
    out.copy_(input);
    return;
  }
  std::vector<std::int64_t> outs = out_splits, ins = in_splits;
  at::Tensor in = input, dst = out;  // alltoall_base takes non-const references
  if (in.scalar_type() == at::kBFloat16) {  // only moves bits: bf16 travels as fp16 (no bf16 in 1.13's Gloo)
    in = in.view(at::kHalf);
    dst = dst.view(at::kHalf);
  }
  c10::intrusive_ptr<c10d::Work> work;
  try {
    work = impl_->device_group->alltoall_base(dst, in, outs, ins);
  } catch (const std::exception& e) {
    throw_collective_error("all_to_all_single", rank_, world_size_, options_.timeout, e);
  }
  wait_work(work, "all_to_all_single", rank_, world_size_, options_.timeout);
}

void World::host_all_reduce_(at::Tensor& tensor, ReduceOp op) {
  check_host_tensor(tensor, "host_all_reduce");
  launch_all_reduce(true, tensor, op, "host_all_reduce").wait();
}

void World::host_broadcast_(at::Tensor& tensor, int root) {
  check_host_tensor(tensor, "host_broadcast");
  run_broadcast(true, tensor, root, "host_broadcast");
}

std::vector<at::Tensor> World::host_all_gather(const at::Tensor& tensor) {
  check_host_tensor(tensor, "host_all_gather");
  return run_all_gather(true, tensor, "host_all_gather");
}

std::vector<double> World::host_sum(const std::vector<double>& values) {
  if (!impl_ || values.empty()) return values;
  at::Tensor t = at::empty({static_cast<int64_t>(values.size())}, at::TensorOptions().dtype(at::kDouble));
  std::memcpy(t.data_ptr(), values.data(), values.size() * sizeof(double));
  host_all_reduce_(t, ReduceOp::kSum);
  std::vector<double> out(values.size());
  std::memcpy(out.data(), t.data_ptr(), out.size() * sizeof(double));
  return out;
}

std::vector<std::string> World::host_all_gather_bytes(const std::string& bytes) {
  if (!impl_) return {bytes};
  at::Tensor len = at::empty({1}, at::TensorOptions().dtype(at::kLong));
  len.data_ptr<int64_t>()[0] = static_cast<int64_t>(bytes.size());
  std::vector<int64_t> lens;
  int64_t max_len = 0;
  for (const auto& l : host_all_gather(len)) {
    lens.push_back(l.data_ptr<int64_t>()[0]);
    max_len = std::max(max_len, lens.back());
  }
  at::Tensor buf = at::zeros({std::max<int64_t>(max_len, 1)}, at::TensorOptions().dtype(at::kByte));
  std::memcpy(buf.data_ptr(), bytes.data(), bytes.size());
  std::vector<std::string> out;
  auto parts = host_all_gather(buf);
  for (std::size_t r = 0; r < parts.size(); ++r) {
    out.emplace_back(static_cast<const char*>(parts[r].data_ptr()), static_cast<std::size_t>(lens[r]));
  }
  return out;
}

namespace {

/// The device and host groups of `impl` for `rank` of `size`, each in its own
/// key space (`prefix` + "device/", "host/") on impl.store, as c10d's own groups do.
void build_groups(World::Impl& impl, const std::string& prefix, int rank, int size, const std::string& backend,
                  const DistOptions& options, const std::string& where) {
  auto gloo_group = [&](const std::string& key) -> c10::intrusive_ptr<C10dGroup> {
    auto opts = c10d::ProcessGroupGloo::Options::create(options.timeout);
    std::string iface = options.gloo_interface;
    if (iface.empty()) {
      if (const char* e = std::getenv("GLOO_SOCKET_IFNAME")) iface = e;
    }
    if (!iface.empty()) {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(iface));
    } else if (impl.loopback) {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    } else {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    return c10::make_intrusive<c10d::ProcessGroupGloo>(
        c10::make_intrusive<c10d::PrefixStore>(prefix + key, impl.store), rank, size, opts);
  };
  std::string group_name = backend;
  try {
    if (backend == "gloo") {
      impl.device_group = gloo_group("device/");
      impl.host_group = options.strict_device_group ? gloo_group("host/") : impl.device_group;
    } else {
#ifdef USE_C10D_NCCL
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = options.timeout;
      impl.device_group = c10::make_intrusive<c10d::ProcessGroupNCCL>(
          c10::make_intrusive<c10d::PrefixStore>(prefix + "device/", impl.store), rank, size, opts);
      group_name = "gloo (host)";
      impl.host_group = gloo_group("host/");
#endif
    }
  } catch (const std::exception& e) {
    RHINE_FAIL(kComponent,
               "creating the " + group_name + " process group " + where + " failed on rank " + std::to_string(rank) +
                   " of " + std::to_string(size) + " (timeout " + fmt_seconds(options.timeout) + " s)",
               Verbatim{first_line(e)}, "did every rank start, and can they reach each other (GLOO_SOCKET_IFNAME)?");
  }
}

}  // namespace

World init(const Rendezvous& rv, const DistOptions& options) {
  options.validate();
  RHINE_CHECK(rv.world_size >= 1 && rv.rank >= 0 && rv.rank < rv.world_size, kComponent,
              "rank must lie in [0, world_size), got rank/world_size",
              std::to_string(rv.rank) + "/" + std::to_string(rv.world_size), "");
  World world;
  world.rank_ = rv.rank;
  world.world_size_ = rv.world_size;
  world.local_rank_ = rv.local_rank;
  world.options_ = options;
  if (rv.world_size == 1 && !options.group_for_one_rank) return world;

  std::string backend = options.backend;
  if (backend == "auto") {
#ifdef USE_C10D_NCCL
    backend = at::globalContext().hasCUDA() ? "nccl" : "gloo";
#else
    backend = "gloo";
#endif
  }
#ifndef USE_C10D_NCCL
  RHINE_CHECK(backend != "nccl", kComponent, "this Rhine was built without NCCL, backend",
              backend, "use \"gloo\" (CPU tensors), or rebuild with -DRHINE_WITH_NCCL=ON");
#endif
  RHINE_CHECK(!(options.strict_device_group && backend == "nccl"), kComponent,
              "strict_device_group is a CPU test mode for Gloo, backend", backend,
              "under NCCL the device group checks tensor devices itself");

  auto impl = std::make_unique<World::Impl>();
  impl->strict = options.strict_device_group;
  c10d::TCPStoreOptions so;
  so.port = static_cast<std::uint16_t>(rv.master_port);
  so.isServer = rv.rank == 0;
  so.numWorkers = static_cast<std::size_t>(rv.world_size);
  so.waitWorkers = true;
  so.timeout = options.timeout;
  const std::string where = rv.master_addr + ":" + std::to_string(rv.master_port);
  try {
    impl->store = c10::make_intrusive<c10d::TCPStore>(rv.master_addr, so);
  } catch (const std::exception& e) {
    RHINE_FAIL(kComponent,
               "rendezvous at " + where + " failed on rank " + std::to_string(rv.rank) + " of " +
                   std::to_string(rv.world_size) + " (timeout " + fmt_seconds(options.timeout) +
                   " s)",
               Verbatim{first_line(e)},
               rv.rank == 0 ? "is MASTER_PORT free on this machine, and did every rank start?"
                            : "is rank 0 running and MASTER_ADDR/MASTER_PORT reachable from here?");
  }

  impl->loopback = is_loopback(rv.master_addr);
  if (backend == "nccl")
    world.device_ = c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(rv.local_rank));
  build_groups(*impl, "", rv.rank, rv.world_size, backend, options, "at " + where);
  world.backend_ = backend;
  world.impl_ = std::move(impl);
  return world;
}

World World::split(int color) {
  RHINE_CHECK(color >= 0, kComponent, "split needs a color >= 0, got", color,
              "ranks with the same color form one group");
  if (!impl_) {  // one process: its own group
    World one;
    one.device_ = device_;
    one.options_ = options_;
    return one;
  }
  // Everyone's color, then my group: the ranks of my color in world order.
  at::Tensor mine = at::full({1}, static_cast<std::int64_t>(color), at::kLong);
  const std::vector<at::Tensor> colors = run_all_gather(true, mine, "split");
  std::vector<int> members;
  int index = 0;
  for (int r = 0; r < world_size_; ++r) {
    if (host_value<std::int64_t>(colors[static_cast<std::size_t>(r)]) != color) continue;
    if (r == rank_) index = static_cast<int>(members.size());
    members.push_back(r);
  }
  const int call = impl_->splits++;
  World sub;
  sub.rank_ = index;
  sub.world_size_ = static_cast<int>(members.size());
  sub.local_rank_ = local_rank_;
  sub.device_ = device_;
  sub.options_ = options_;
  sub.backend_ = backend_;
  if (members.size() == 1) return sub;  // a group of one: collectives are no-ops
  auto impl = std::make_unique<Impl>();
  impl->store = impl_->store;
  impl->strict = impl_->strict;
  impl->device_storages = impl_->device_storages;
  impl->loopback = impl_->loopback;
  impl->prefix = impl_->prefix + "split" + std::to_string(call) + "/" + std::to_string(color) + "/";
  build_groups(*impl, impl->prefix, index,
               sub.world_size_, backend_, options_,
               "for split " + std::to_string(call) + " (color " + std::to_string(color) + ")");
  sub.impl_ = std::move(impl);
  return sub;
}

World init_from_env(const DistOptions& options) {
  DistOptions o = options;
  if (const char* e = std::getenv("RHINE_DIST_STRICT_DEVICE"); e && std::string(e) == "1") {
    o.strict_device_group = true;
  }
  return init(rendezvous_from_env(), o);
}

// --- parameter helpers ----------------------------------------------------

void broadcast_parameters(World& world, const std::vector<at::Tensor>& tensors, int root) {
  if (world.world_size() == 1) return;
  at::NoGradGuard no_grad;
  // One flat buffer per (dtype, device), in order of first appearance, so all
  // ranks build the same buffers.
  std::vector<std::vector<at::Tensor>> groups;
  for (const auto& t : tensors) {
    RHINE_CHECK(t.defined(), kComponent, "broadcast_parameters got an undefined tensor", "", "");
    bool placed = false;
    for (auto& g : groups) {
      if (g[0].scalar_type() == t.scalar_type() && g[0].device() == t.device()) {
        g.push_back(t);
        placed = true;
        break;
      }
    }
    if (!placed) groups.push_back({t});
  }
  for (auto& g : groups) {
    std::vector<at::Tensor> flat_parts;
    for (const auto& t : g) flat_parts.push_back(t.detach().reshape({-1}));
    at::Tensor flat = world.to_device(at::cat(flat_parts));
    world.broadcast_(flat, root);
    int64_t offset = 0;
    for (auto& t : g) {
      const int64_t n = t.numel();
      t.detach().copy_(flat.narrow(0, offset, n).view(t.sizes()));
      offset += n;
    }
  }
}

std::uint64_t tensors_hash(const std::vector<at::Tensor>& tensors) {
  std::uint64_t h = 14695981039346656037ULL;
  auto mix = [&h](const void* data, size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    for (size_t i = 0; i < n; ++i) {
      h ^= p[i];
      h *= 1099511628211ULL;
    }
  };
  for (const auto& t : tensors) {
    if (!t.defined()) {
      mix("undef", 5);
      continue;
    }
    const auto dtype = static_cast<int>(t.scalar_type());
    mix(&dtype, sizeof dtype);
    for (int64_t s : t.sizes()) mix(&s, sizeof s);
    at::Tensor c = to_host(t.detach()).contiguous();
    mix(c.data_ptr(), static_cast<size_t>(c.numel()) * c.element_size());
  }
  return h;
}

std::vector<std::uint64_t> gather_hashes(World& world, const std::vector<at::Tensor>& tensors) {
  const std::uint64_t h = tensors_hash(tensors);
  if (world.world_size() == 1) return {h};
  at::Tensor mine = at::empty({1}, at::TensorOptions().dtype(at::kLong));  // a host scalar
  std::memcpy(mine.data_ptr(), &h, sizeof h);
  std::vector<std::uint64_t> out;
  for (const auto& t : world.host_all_gather(mine)) {
    std::uint64_t v;
    std::memcpy(&v, t.data_ptr(), sizeof v);
    out.push_back(v);
  }
  return out;
}

void check_same_across_ranks(World& world, const std::vector<at::Tensor>& tensors,
                             const std::string& what) {
  const auto hashes = gather_hashes(world, tensors);
  const bool same =
      std::all_of(hashes.begin(), hashes.end(), [&](std::uint64_t h) { return h == hashes[0]; });
  if (same) return;
  std::ostringstream os;
  for (size_t r = 0; r < hashes.size(); ++r) {
    os << (r ? ", " : "") << "rank " << r << ": " << std::hex << hashes[r] << std::dec;
  }
  RHINE_FAIL(kComponent, what + " differ between ranks (hashes)", Verbatim{os.str()},
             "call broadcast_parameters() after building the model, and sync every gradient "
             "(GradientSync::finish) before each optimizer step");
}

}  // namespace rhine::dist
