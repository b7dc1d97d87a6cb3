#pragma once
/// \file
/// Data parallel training over LibTorch's c10d: the process group of a run
/// (`World`), its rendezvous from torchrun / Slurm environment variables, and
/// the collectives a training loop needs (all-reduce, broadcast, all-gather,
/// barrier), each bounded by a timeout so that a dead or stuck rank surfaces
/// as a rhine::Error instead of a hang.
///
///     auto world = rhine::dist::init_from_env();          // RANK, WORLD_SIZE, ...
///     rhine::dist::broadcast_parameters(world, params);   // all ranks start equal
///     loader_options.rank = world.rank();                 // each rank reads its rows
///     loader_options.world_size = world.world_size();
///
/// Backends: Gloo (CPU tensors; Debian's LibTorch ships it) and NCCL (CUDA
/// tensors; only where LibTorch was built with it and Rhine compiled with
/// RHINE_WITH_NCCL). No c10d type appears in this header.
///
/// Two groups, one per kind of data (as PyTorch's "cpu:gloo,cuda:nccl"):
///  - the device group takes tensors on `World::device()` (the model's
///    device: cuda:LOCAL_RANK under NCCL, the CPU under Gloo): gradients,
///    parameters, optimizer shards. Buffers for it come from
///    `World::to_device` / `World::device_zeros`;
///  - the host group (always Gloo, CPU tensors) takes the scalars a training
///    loop exchanges: loss and token sums, votes, step numbers, descriptors,
///    hashes, expert counts (`World::host_*`).
/// Under Gloo both are one c10d group. Under NCCL the host group is a second,
/// Gloo group on the same store. A tensor on the wrong group is a rhine::Error
/// naming the collective, not a crash inside NCCL.
///
/// Strict device check (DistOptions::strict_device_group, or the environment
/// variable RHINE_DIST_STRICT_DEVICE=1 read by init_from_env): a CPU test
/// mode for Gloo that builds two separate groups, as NCCL runs do, and makes
/// the device group accept only tensors whose storage came from
/// `to_device` / `device_zeros`, so a host tensor sent to it fails on the CPU
/// exactly where it would fail under NCCL.
///
/// A single-process World (no environment variables, or WORLD_SIZE=1) builds
/// no c10d objects at all and every collective is a no-op, so one training
/// loop serves both cases.
///
/// Failure model: after a collective failed (timeout, lost peer) the process
/// group is unusable; let the error end the process (a launcher such as
/// torchrun or srun then tears the other ranks down).

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace rhine::dist {

/// Options of a World.
struct DistOptions {
  /// "auto" (NCCL when compiled in and CUDA is available, else Gloo), "gloo"
  /// or "nccl".
  std::string backend = "auto";
  /// Bound on rendezvous and on every collective; a rank that does not take
  /// part within it makes the others throw. Tests use a few seconds.
  std::chrono::milliseconds timeout = std::chrono::seconds(300);
  /// Gloo network interface (e.g. "eth0"); empty: GLOO_SOCKET_IFNAME if set,
  /// else 127.0.0.1 when MASTER_ADDR is a loopback address, else the address
  /// this machine's hostname resolves to.
  std::string gloo_interface;
  /// Test mode (Gloo only): separate device and host groups, and the device
  /// group refuses tensors that did not come from World::to_device /
  /// World::device_zeros (see the file comment).
  bool strict_device_group = false;
  /// Build the c10d groups even for world_size 1 (a one-rank NCCL world in
  /// the GPU tests); by default one rank builds none and collectives are no-ops.
  bool group_for_one_rank = false;

  /// Throws rhine::Error for an unknown backend or a non-positive timeout.
  void validate() const;
};

/// Where a process sits in the run and where to meet the others.
struct Rendezvous {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;  ///< rank on this node (picks the GPU)
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  /// "torchrun", "slurm" or "single" (no variables set).
  std::string source = "single";
};

/// Reads the rendezvous from `env` (variable -> value):
///  - torchrun: RANK, WORLD_SIZE, LOCAL_RANK (default: RANK), MASTER_ADDR,
///    MASTER_PORT; takes precedence when RANK is set;
///  - Slurm (srun): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, with MASTER_ADDR
///    and MASTER_PORT exported by the job script (Rhine does not parse
///    SLURM_NODELIST: `export MASTER_ADDR=$(scontrol show hostnames
///    "$SLURM_JOB_NODELIST" | head -n1)`);
///  - neither: a single process.
/// MASTER_ADDR / MASTER_PORT are required when world_size > 1. Throws
/// rhine::Error naming the variable for a missing or malformed value.
Rendezvous rendezvous_from_env(const std::map<std::string, std::string>& env);
/// The same over this process's environment.
Rendezvous rendezvous_from_env();

/// How all_reduce combines tensors (kAvg is a sum divided by world_size on Gloo).
enum class ReduceOp { kSum, kAvg, kMin, kMax };

class World;

/// A collective launched asynchronously (World::all_reduce_async). Waiting
/// throws the same rhine::Error as the blocking call would.
class PendingOp {
 public:
  PendingOp() = default;
  /// Blocks until the operation finished (at most the World's timeout).
  void wait();
  /// True once wait() returned or nothing was launched (single process).
  bool done() const { return impl_ == nullptr; }

 private:
  friend class World;
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

/// The process groups of a data-parallel run. Cheap to move; not copyable.
/// Collectives must be called by every rank in the same order with tensors of
/// the same shape and dtype. Device collectives (all_reduce_, broadcast_,
/// all_gather, all_gather_into_tensor, reduce_scatter_tensor) take contiguous
/// tensors on device(); host collectives (host_*) take contiguous CPU tensors.
class World {
 public:
  /// A single-process World.
  World();
  ~World();
  World(World&&) noexcept;
  World& operator=(World&&) noexcept;
  World(const World&) = delete;
  World& operator=(const World&) = delete;

  int rank() const { return rank_; }
  int world_size() const { return world_size_; }
  int local_rank() const { return local_rank_; }
  /// Rank 0: the one that logs, evaluates and writes checkpoints.
  bool is_main() const { return rank_ == 0; }
  /// "gloo", "nccl", or "none" (single process).
  const std::string& backend() const { return backend_; }
  const DistOptions& options() const { return options_; }
  /// The device the device group serves: cuda:local_rank under NCCL, else CPU.
  c10::Device device() const { return device_; }

  /// `tensor` on device(), contiguous (no copy when it already is), usable by
  /// the device collectives (registered under the strict device check).
  at::Tensor to_device(const at::Tensor& tensor);
  /// A zero-filled buffer [numel] of `dtype` on device(), for device collectives.
  at::Tensor device_zeros(int64_t numel, c10::ScalarType dtype);

  // --- device group -----------------------------------------------------------
  /// In place: `tensor` becomes the reduction over ranks of everyone's `tensor`.
  void all_reduce_(at::Tensor& tensor, ReduceOp op = ReduceOp::kSum);
  /// As all_reduce_, returning at once; `tensor` must stay alive and untouched
  /// until the PendingOp was waited on. kAvg divides when waited on.
  PendingOp all_reduce_async(at::Tensor& tensor, ReduceOp op = ReduceOp::kSum);
  /// In place: every rank's `tensor` becomes `root`'s.
  void broadcast_(at::Tensor& tensor, int root = 0);
  /// Everyone's `tensor`, in rank order (world_size tensors of its shape).
  std::vector<at::Tensor> all_gather(const at::Tensor& tensor);
  /// out [world_size * n] = everyone's `input` [n] (any shape, n elements)
  /// concatenated in rank order. c10d's _allgather_base where the backend has
  /// it (NCCL; Gloo from LibTorch 2.x), else a list all-gather into out's chunks.
  void all_gather_into_tensor(at::Tensor& out, const at::Tensor& input);
  /// As all_gather_into_tensor, returning at once (FSDP's prefetch); `out`
  /// and `input` must stay alive and untouched until the PendingOp was waited on.
  PendingOp all_gather_into_tensor_async(at::Tensor& out, const at::Tensor& input);
  /// out [n] = rank r's chunk r of the reduction over ranks of everyone's
  /// `input` [world_size * n]. c10d's _reduce_scatter_base where the backend
  /// has it (NCCL; Gloo from LibTorch 2.x), else an all-reduce of a copy of
  /// `input` keeping this rank's chunk (twice the traffic; same result).
  void reduce_scatter_tensor(at::Tensor& out, const at::Tensor& input,
                             ReduceOp op = ReduceOp::kSum);

  /// All-to-all with uneven splits along dim 0 (expert parallelism's token
  /// dispatch): this rank sends rows [sum(in_splits[:r]), + in_splits[r]) of
  /// `input` to rank r and receives rank r's rows for it into the next
  /// out_splits[r] rows of `out`, in rank order. Other dims equal everywhere;
  /// in_splits/out_splits have world_size entries summing to the rows of
  /// `input`/`out`. c10d's alltoall_base (Gloo in 1.13 and 2.x, NCCL).
  void all_to_all_single(at::Tensor& out, const at::Tensor& input, const std::vector<std::int64_t>& out_splits,
                         const std::vector<std::int64_t>& in_splits);

  /// Splits the ranks into groups (MPI_Comm_split): ranks passing the same
  /// `color` (>= 0) form one World, ranked by their rank here, with this
  /// World's backend, device, options and store. Collective: every rank calls
  /// it, and the splits of a World in the same order. A group of one rank is
  /// a single-process World (its collectives are no-ops). Device buffers from
  /// either World serve both (also under the strict device check).
  ///     World shard = world.split(world.rank() / 2);    // {0,1}, {2,3}
  ///     World replica = world.split(world.rank() % 2);  // {0,2}, {1,3}
  World split(int color);

  // --- host group (CPU tensors: scalars, counts, descriptors) ------------------
  /// Waits until every rank reached this point.
  void barrier();
  /// As all_reduce_, for a CPU tensor.
  void host_all_reduce_(at::Tensor& tensor, ReduceOp op = ReduceOp::kSum);
  /// As broadcast_, for a CPU tensor.
  void host_broadcast_(at::Tensor& tensor, int root = 0);
  /// As all_gather, for a CPU tensor.
  std::vector<at::Tensor> host_all_gather(const at::Tensor& tensor);
  /// Sums `values` over ranks (float64 on the host group).
  std::vector<double> host_sum(const std::vector<double>& values);
  /// Everyone's `bytes` (any lengths), in rank order: two host all-gathers.
  std::vector<std::string> host_all_gather_bytes(const std::string& bytes);

 private:
  friend World init(const Rendezvous&, const DistOptions&);
  friend class PendingOp;
  void check_device_tensor(const at::Tensor& t, const std::string& op) const;
  void check_host_tensor(const at::Tensor& t, const std::string& op) const;
  PendingOp launch_all_reduce(bool host, at::Tensor& tensor, ReduceOp op, const char* name);
  void run_broadcast(bool host, at::Tensor& tensor, int root, const char* name);
  std::vector<at::Tensor> run_all_gather(bool host, const at::Tensor& tensor, const char* name);

 public:
  struct Impl;  ///< the c10d objects (lib/dist/world.cpp)

 private:
  std::unique_ptr<Impl> impl_;  ///< null for a single process
  int rank_ = 0, world_size_ = 1, local_rank_ = 0;
  std::string backend_ = "none";
  c10::Device device_{c10::DeviceType::CPU};
  DistOptions options_;
};

/// Builds the World of `rv`: a c10d::TCPStore served by rank 0 on
/// master_addr:master_port, and a Gloo (or NCCL) process group on it. A
/// world_size of 1 gives a single-process World without c10d objects.
/// Throws rhine::Error when the others do not join within options.timeout.
World init(const Rendezvous& rv, const DistOptions& options = {});
/// init(rendezvous_from_env(), options).
World init_from_env(const DistOptions& options = {});

/// Copies rank `root`'s values of `tensors` (e.g. all parameters) to every
/// rank, flattening same-dtype tensors into few broadcasts. Call once after
/// building the model so that all ranks start equal.
void broadcast_parameters(World& world, const std::vector<at::Tensor>& tensors, int root = 0);

/// A 64-bit FNV-1a hash over the dtypes, shapes and bytes of `tensors`, in order.
std::uint64_t tensors_hash(const std::vector<at::Tensor>& tensors);

/// Every rank's tensors_hash(tensors), in rank order.
std::vector<std::uint64_t> gather_hashes(World& world, const std::vector<at::Tensor>& tensors);

/// Throws rhine::Error listing every rank's hash unless all ranks hold
/// bitwise identical `tensors` (for tests and debugging; one all-gather).
void check_same_across_ranks(World& world, const std::vector<at::Tensor>& tensors,
                             const std::string& what = "parameters");

}  // namespace rhine::dist
