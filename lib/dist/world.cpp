#include "rhine/dist/world.h"

#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef USE_C10D_NCCL
#include <ATen/Context.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <utility>

#include "rhine/core/error.h"
#include "rhine/torch/compat.h"

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
  c10::intrusive_ptr<C10dGroup> group;
};

struct PendingOp::Impl {
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

}  // namespace

void PendingOp::wait() {
  if (!impl_) return;
  auto impl = std::move(impl_);
  wait_work(impl->work, impl->op, impl->rank, impl->world_size, impl->timeout);
  if (impl->divide.defined()) impl->divide.div_(impl->world_size);
}

void World::barrier() {
  if (!impl_) return;
  c10::intrusive_ptr<c10d::Work> work;
  try {
    work = impl_->group->barrier();
  } catch (const std::exception& e) {
    throw_collective_error("barrier", rank_, world_size_, options_.timeout, e);
  }
  wait_work(work, "barrier", rank_, world_size_, options_.timeout);
}

PendingOp World::all_reduce_async(at::Tensor& tensor, ReduceOp op) {
  check_collective_tensor(tensor, "all_reduce");
  PendingOp pending;
  if (!impl_) return pending;
  auto p = std::make_shared<PendingOp::Impl>();
  p->op = "all_reduce";
  p->rank = rank_;
  p->world_size = world_size_;
  p->timeout = options_.timeout;
  if (op == ReduceOp::kAvg) p->divide = tensor;
  std::vector<at::Tensor> tensors{tensor};
  c10d::AllreduceOptions opts;
  opts.reduceOp = to_c10d(op);
  try {
    p->work = impl_->group->allreduce(tensors, opts);
  } catch (const std::exception& e) {
    throw_collective_error("all_reduce", rank_, world_size_, options_.timeout, e);
  }
  pending.impl_ = std::move(p);
  return pending;
}

void World::all_reduce_(at::Tensor& tensor, ReduceOp op) { all_reduce_async(tensor, op).wait(); }

void World::broadcast_(at::Tensor& tensor, int root) {
  check_collective_tensor(tensor, "broadcast");
  RHINE_CHECK(root >= 0 && root < world_size_, kComponent, "broadcast root out of range", root,
              "use a rank in [0, world_size)");
  if (!impl_) return;
  std::vector<at::Tensor> tensors{tensor};
  c10d::BroadcastOptions opts;
  opts.rootRank = root;
  c10::intrusive_ptr<c10d::Work> work;
  try {
    work = impl_->group->broadcast(tensors, opts);
  } catch (const std::exception& e) {
    throw_collective_error("broadcast", rank_, world_size_, options_.timeout, e);
  }
  wait_work(work, "broadcast", rank_, world_size_, options_.timeout);
}

std::vector<at::Tensor> World::all_gather(const at::Tensor& tensor) {
  check_collective_tensor(tensor, "all_gather");
  if (!impl_) return {tensor.clone()};
  std::vector<std::vector<at::Tensor>> out(1);
  for (int r = 0; r < world_size_; ++r) out[0].push_back(at::empty_like(tensor));
  std::vector<at::Tensor> in{tensor};
  c10::intrusive_ptr<c10d::Work> work;
  try {
    work = impl_->group->allgather(out, in);
  } catch (const std::exception& e) {
    throw_collective_error("all_gather", rank_, world_size_, options_.timeout, e);
  }
  wait_work(work, "all_gather", rank_, world_size_, options_.timeout);
  return out[0];
}

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
  if (rv.world_size == 1) return world;

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

  auto impl = std::make_unique<World::Impl>();
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

  try {
    if (backend == "gloo") {
      auto opts = c10d::ProcessGroupGloo::Options::create(options.timeout);
      std::string iface = options.gloo_interface;
      if (iface.empty()) {
        if (const char* e = std::getenv("GLOO_SOCKET_IFNAME")) iface = e;
      }
      if (!iface.empty()) {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(iface));
      } else if (is_loopback(rv.master_addr)) {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
      } else {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
      impl->group = c10::make_intrusive<c10d::ProcessGroupGloo>(impl->store, rv.rank,
                                                                rv.world_size, opts);
    } else {
#ifdef USE_C10D_NCCL
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = options.timeout;
      impl->group = c10::make_intrusive<c10d::ProcessGroupNCCL>(impl->store, rv.rank,
                                                                rv.world_size, opts);
#endif
    }
  } catch (const std::exception& e) {
    RHINE_FAIL(kComponent,
               "creating the " + backend + " process group at " + where + " failed on rank " +
                   std::to_string(rv.rank) + " of " + std::to_string(rv.world_size) +
                   " (timeout " + fmt_seconds(options.timeout) + " s)",
               Verbatim{first_line(e)},
               "did every rank start, and can they reach each other (GLOO_SOCKET_IFNAME)?");
  }
  world.backend_ = backend;
  world.impl_ = std::move(impl);
  return world;
}

World init_from_env(const DistOptions& options) { return init(rendezvous_from_env(), options); }

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
    at::Tensor flat = at::cat(flat_parts);
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
    at::Tensor c = t.detach().to(at::kCPU).contiguous();
    mix(c.data_ptr(), static_cast<size_t>(c.numel()) * c.element_size());
  }
  return h;
}

std::vector<std::uint64_t> gather_hashes(World& world, const std::vector<at::Tensor>& tensors) {
  const std::uint64_t h = tensors_hash(tensors);
  if (world.world_size() == 1) return {h};
  at::Tensor mine = at::empty({1}, at::TensorOptions().dtype(at::kLong));
  std::memcpy(mine.data_ptr(), &h, sizeof h);
  // NCCL gathers CUDA tensors only; the hash travels on the tensors' device.
  if (!tensors.empty() && tensors[0].defined()) mine = mine.to(tensors[0].device());
  std::vector<std::uint64_t> out;
  for (const auto& t : world.all_gather(mine)) {
    at::Tensor c = t.to(at::kCPU);
    std::uint64_t v;
    std::memcpy(&v, c.data_ptr(), sizeof v);
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
