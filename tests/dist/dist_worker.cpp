// One rank of the data-parallel tests (test_dist.cpp starts 1 or 2 of these).
// It trains a tiny Llama-style CausalLM with AdamW on a fixed batch of B rows:
// rank r of N uses rows [r*B/N, (r+1)*B/N), split into `accum` micro-batches.
// It reads its place from the environment like any Rhine program
// (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, or nothing for one process).
//
//   dist_worker --out PREFIX [--steps 3] [--batch 4] [--seq 8] [--accum 1]
//               [--sync bucketed|reference] [--bucket-bytes N] [--no-overlap]
//               [--zero1] [--timeout-ms 20000] [--no-broadcast] [--collectives]
//               [--forget-no-sync]   accumulate without no_sync (must throw)
//               [--unwind]           on an error, destroy the World normally
//                                    (instead of _Exit) before exiting with 3
//               [--resume-at K]      ZeRO-1: before step K, rebuild the optimizer
//                                    from its state_dict (a per-rank resume)
//               [--die-rank R --die-after K]    rank R exits after K steps
//               [--sleep-rank R --sleep-after K] rank R sleeps 60 s after K steps
//
// Writes PREFIX.rank<r>.params (every parameter as float64, in named order),
// PREFIX.rank<r>.json (buckets, overlapped buckets per step, losses, hash) or,
// on a rhine::Error, PREFIX.rank<r>.err with its message (exit code 3).
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/from_blob.h>
#include <torch/nn/module.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "global_batch.h"
#include "rhine/core/error.h"
#include "rhine/core/json.h"
#include "rhine/dist/grad_sync.h"
#include "rhine/dist/sharded_optimizer.h"
#include "rhine/dist/world.h"
#include "rhine/nn/model.h"
#include "rhine/optim/adamw.h"
#include "rhine/torch/runtime.h"

namespace {

struct Args {
  std::string out;
  int steps = 3, batch = 4, seq = 8, accum = 1;
  std::string sync = "bucketed";
  long bucket_bytes = 25l << 20;
  bool overlap = true, zero1 = false, broadcast = true, collectives = false, forget_no_sync = false;
  int resume_at = -1;
  bool unwind = false;
  long timeout_ms = 20000;
  int die_rank = -1, die_after = 0, sleep_rank = -1, sleep_after = 0;
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    auto next = [&]() -> std::string {
      RHINE_CHECK(i + 1 < argc, "dist_worker", "missing value for", k, "");
      return argv[++i];
    };
    if (k == "--out") a.out = next();
    else if (k == "--steps") a.steps = std::stoi(next());
    else if (k == "--batch") a.batch = std::stoi(next());
    else if (k == "--seq") a.seq = std::stoi(next());
    else if (k == "--accum") a.accum = std::stoi(next());
    else if (k == "--sync") a.sync = next();
    else if (k == "--bucket-bytes") a.bucket_bytes = std::stol(next());
    else if (k == "--no-overlap") a.overlap = false;
    else if (k == "--zero1") a.zero1 = true;
    else if (k == "--no-broadcast") a.broadcast = false;
    else if (k == "--collectives") a.collectives = true;
    else if (k == "--forget-no-sync") a.forget_no_sync = true;
    else if (k == "--unwind") a.unwind = true;
    else if (k == "--resume-at") a.resume_at = std::stoi(next());
    else if (k == "--timeout-ms") a.timeout_ms = std::stol(next());
    else if (k == "--die-rank") a.die_rank = std::stoi(next());
    else if (k == "--die-after") a.die_after = std::stoi(next());
    else if (k == "--sleep-rank") a.sleep_rank = std::stoi(next());
    else if (k == "--sleep-after") a.sleep_after = std::stoi(next());
    else RHINE_FAIL("dist_worker", "unknown argument", k, "");
  }
  RHINE_CHECK(!a.out.empty(), "dist_worker", "--out is required", "", "");
  return a;
}

rhine::nn::ModelConfig tiny_config() {
  rhine::nn::ModelConfig c;
  c.model_type = "llama";
  c.vocab_size = 32;
  c.hidden_size = 16;
  c.intermediate_size = 24;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 4;
  c.rms_norm_eps = 1e-5;
  c.max_position_embeddings = 64;
  return c;
}

/// Checks each World collective against values every rank can compute.
void check_collectives(rhine::dist::World& world) {
  const int n = world.world_size(), r = world.rank();
  // [v, v+1, v+2], as a device-group buffer
  auto filled = [&](double v) { return world.to_device(at::arange(3, at::kFloat).add(v)); };
  const double sum = n * (n + 1) / 2.0;  // of r + 1 over ranks
  struct Case { rhine::dist::ReduceOp op; double expect; };
  for (const Case c : {Case{rhine::dist::ReduceOp::kSum, sum}, Case{rhine::dist::ReduceOp::kAvg, sum / n},
                       Case{rhine::dist::ReduceOp::kMax, double(n)}, Case{rhine::dist::ReduceOp::kMin, 1.0}}) {
    const auto scale = [&](at::Tensor x) { return x.mul(c.op == rhine::dist::ReduceOp::kSum ? n : 1); };
    at::Tensor t = filled(r + 1);
    world.all_reduce_(t, c.op);
    at::Tensor want = scale(at::arange(3, at::kFloat)).add(c.expect);
    RHINE_CHECK(t.equal(want), "dist_worker", "all_reduce result", static_cast<int>(c.op), "");
    at::Tensor h = at::arange(3, at::kFloat).add(r + 1);  // the same on the host group
    world.host_all_reduce_(h, c.op);
    RHINE_CHECK(h.equal(want), "dist_worker", "host_all_reduce result", static_cast<int>(c.op), "");
    // reduce_scatter_tensor: rank k's input is [n, 3] with row j = [k+1+10j, ...];
    // rank r keeps row r of the reduction (native on Gloo 2.x, emulated on 1.13).
    at::Tensor in = world.to_device(at::arange(3, at::kFloat).add(r + 1).repeat({n, 1}) +
                                    at::arange(n, at::kFloat).mul(10).unsqueeze(1));
    at::Tensor out = world.device_zeros(3, at::kFloat);
    world.reduce_scatter_tensor(out, in, c.op);
    at::Tensor want_rs = want + (c.op == rhine::dist::ReduceOp::kSum ? 10.0 * r * n : 10.0 * r);
    RHINE_CHECK(out.equal(want_rs), "dist_worker", "reduce_scatter_tensor result", static_cast<int>(c.op), "");
  }
  at::Tensor b = filled(r * 10);
  world.broadcast_(b, n - 1);
  RHINE_CHECK(b.equal(filled((n - 1) * 10)), "dist_worker", "broadcast result", r, "");
  auto g = world.all_gather(filled(r));
  RHINE_CHECK(static_cast<int>(g.size()) == n, "dist_worker", "all_gather size", g.size(), "");
  for (int k = 0; k < n; ++k)
    RHINE_CHECK(g[static_cast<size_t>(k)].equal(filled(k)), "dist_worker", "all_gather part", k, "");
  at::Tensor into = world.device_zeros(3 * n, at::kFloat);
  world.all_gather_into_tensor(into, filled(r));
  for (int k = 0; k < n; ++k)
    RHINE_CHECK(into.narrow(0, 3 * k, 3).equal(filled(k)), "dist_worker", "all_gather_into_tensor part", k, "");
  // all_to_all_single with uneven splits: rank r sends k + 1 rows [100r + 10k + j, 2 columns] to rank k.
  {
    std::vector<int64_t> in_splits, out_splits;
    std::vector<at::Tensor> send, want;
    for (int k = 0; k < n; ++k) {
      in_splits.push_back(k + 1);
      out_splits.push_back(r + 1);
      send.push_back(at::arange(k + 1, at::kFloat).add(100.0 * r + 10.0 * k).unsqueeze(1).repeat({1, 2}));
      want.push_back(at::arange(r + 1, at::kFloat).add(100.0 * k + 10.0 * r).unsqueeze(1).repeat({1, 2}));
    }
    at::Tensor in = world.to_device(at::cat(send));
    at::Tensor out = world.to_device(at::zeros({n * (r + 1), 2}, at::kFloat));
    world.all_to_all_single(out, in, out_splits, in_splits);
    RHINE_CHECK(out.equal(at::cat(want)), "dist_worker", "all_to_all_single result on rank", r, "");
  }
  // split: groups {0,1}, {2,3}, ... and {0,2,..}, {1,3,..}; each reduces
  // over its members only, and one group's buffer serves the other.
  {
    rhine::dist::World pair = world.split(r / 2), stride = world.split(r % 2);
    const int pairs = std::min(2, n - r / 2 * 2);
    RHINE_CHECK(pair.world_size() == pairs && pair.rank() == r % 2, "dist_worker", "split into pairs: size/rank",
                std::to_string(pair.world_size()) + "/" + std::to_string(pair.rank()), "");
    RHINE_CHECK(stride.world_size() == (n - r % 2 + 1) / 2 && stride.rank() == r / 2, "dist_worker",
                "split by parity: size/rank",
                std::to_string(stride.world_size()) + "/" + std::to_string(stride.rank()), "");
    at::Tensor t = pair.to_device(at::full({2}, double(r + 1), at::kFloat));
    pair.all_reduce_(t);
    double want_pair = 0, want_both = 0;
    for (int k = r / 2 * 2; k < r / 2 * 2 + pairs; ++k) want_pair += k + 1;
    RHINE_CHECK(t.equal(at::full({2}, want_pair, at::kFloat)), "dist_worker", "all_reduce within a pair", r, "");
    stride.all_reduce_(t);  // the pairs' sums, over the ranks of my parity: everyone's sum when n is even
    for (int k = 0; k < n; ++k) want_both += k + 1;
    if (n % 2 == 0)
      RHINE_CHECK(t.equal(at::full({2}, want_both, at::kFloat)), "dist_worker", "all_reduce pairs then parity", r,
                  "");
    RHINE_CHECK(stride.host_sum({1.0})[0] == stride.world_size(), "dist_worker", "host_sum in a split", r, "");
  }
  // Host group: uneven byte strings and a broadcast.
  const auto texts = world.host_all_gather_bytes(std::string(static_cast<size_t>(r + 1), char('a' + r)));
  for (int k = 0; k < n; ++k)
    RHINE_CHECK(texts[static_cast<size_t>(k)] == std::string(static_cast<size_t>(k + 1), char('a' + k)),
                "dist_worker", "host_all_gather_bytes part", k, "");
  at::Tensor hb = at::full({2}, double(r), at::kDouble);
  world.host_broadcast_(hb, 0);
  RHINE_CHECK(hb.equal(at::zeros({2}, at::kDouble)), "dist_worker", "host_broadcast result", r, "");
  RHINE_CHECK(world.host_sum({1.0, double(r)}) == std::vector<double>({double(n), sum - n}), "dist_worker",
              "host_sum", r, "");
  // A host tensor on the device group: refused before anything is sent, on every rank alike.
  if (world.options().strict_device_group) {
    at::Tensor host = at::ones({2}, at::kDouble);
    bool refused = false;
    try {
      world.all_reduce_(host);
    } catch (const rhine::Error& e) {
      refused = std::string(e.what()).find("did not hand out") != std::string::npos;
    }
    RHINE_CHECK(refused, "dist_worker", "strict device check let a host tensor through on rank", r, "");
  }
  world.barrier();
}

int run(const Args& a) {
  rhine::set_threads(1);
  rhine::dist::DistOptions dopt;
  dopt.backend = "gloo";
  dopt.timeout = std::chrono::milliseconds(a.timeout_ms);
  rhine::dist::World world = rhine::dist::init_from_env(dopt);
  const int rank = world.rank(), n = world.world_size();
  const std::string prefix = a.out + ".rank" + std::to_string(rank);
  try {
    const auto cfg = tiny_config();
    rhine::nn::CausalLMOptions mo;
    mo.init_seed = 1234 + static_cast<uint64_t>(rank);  // differ on purpose: broadcast fixes it
    rhine::nn::CausalLM lm(cfg, mo);
    rhine::NamedParameters params;
    for (const auto& p : lm->named_parameters()) params.push_back({p.key(), p.value()});
    std::vector<at::Tensor> tensors;
    for (const auto& p : params) tensors.push_back(p.tensor);
    if (a.collectives) check_collectives(world);
    if (a.broadcast) rhine::dist::broadcast_parameters(world, tensors);
    rhine::dist::check_same_across_ranks(world, tensors);

    // This rank's rows of the global batch.
    RHINE_CHECK(a.batch % (n * a.accum) == 0, "dist_worker", "batch must split over ranks and micro-steps",
                a.batch, "");
    const int64_t b = a.batch / n, T = a.seq;
    at::Tensor data = rhine::test::global_batch_rows(rank * b, b, T, cfg.vocab_size);  // [b, T+1]

    rhine::AdamWOptions ao;
    ao.lr = 1e-2;
    ao.weight_decay = 0.1;
    std::unique_ptr<rhine::AdamW> plain;
    std::unique_ptr<rhine::dist::ShardedOptimizer> sharded;
    auto factory = [&](const rhine::NamedParameters& shard) -> std::unique_ptr<rhine::Optimizer> {
      return std::make_unique<rhine::AdamW>(rhine::decay_groups(shard, ao));
    };
    if (a.zero1) {
      sharded = std::make_unique<rhine::dist::ShardedOptimizer>(world, params, factory);
    } else {
      plain = std::make_unique<rhine::AdamW>(rhine::decay_groups(params, ao));
    }
    rhine::dist::GradientSyncOptions so;
    so.bucket_bytes = a.bucket_bytes;
    so.overlap = a.overlap;
    // The per-parameter twin needs no hooks: build the bucketed sync only when used.
    std::unique_ptr<rhine::dist::GradientSync> sync;
    if (a.sync == "bucketed") sync = std::make_unique<rhine::dist::GradientSync>(world, params, so);

    rhine::Json report;
    report["rank"] = rank;
    report["world_size"] = n;
    report["buckets"] = sync ? sync->buckets().size() : params.size();
    report["overlapped"] = rhine::Json::array();
    report["losses"] = rhine::Json::array();
    const int64_t mb = b / a.accum;
    for (int step = 0; step < a.steps; ++step) {
      if (rank == a.die_rank && step == a.die_after) std::_Exit(0);
      if (rank == a.sleep_rank && step == a.sleep_after) std::this_thread::sleep_for(std::chrono::seconds(60));
      if (sharded && step == a.resume_at) {
        // Round trip through copies of this rank's state, as a checkpoint would.
        rhine::OptimizerState saved = sharded->state_dict();
        for (auto& [k, t] : saved.tensors) t = t.clone();
        sharded = std::make_unique<rhine::dist::ShardedOptimizer>(world, params, factory);
        sharded->load_state_dict(saved);
      }
      double loss_sum = 0;
      for (int micro = 0; micro < a.accum; ++micro) {
        auto guard = (sync && micro + 1 < a.accum && !a.forget_no_sync) ? sync->no_sync()
                                                                         : rhine::dist::NoSyncGuard{};
        at::Tensor chunk = data.slice(0, micro * mb, (micro + 1) * mb);  // [mb, T+1]
        rhine::nn::ForwardOptions fo;
        fo.labels = chunk.slice(1, 1, T + 1).contiguous();
        fo.mtp_lambda = 0.3;  // MTP heads train (a model without them ignores it)
        auto out = lm->forward(chunk.slice(1, 0, T).contiguous(), fo);
        at::Tensor loss = out.loss / static_cast<double>(a.accum);
        loss.backward();
        loss_sum += loss.item<double>();
      }
      if (sync) {
        sync->finish();
        report["overlapped"].push_back(sync->last_overlapped_buckets());
      } else {
        RHINE_CHECK(a.sync == "reference", "dist_worker", "unknown --sync", a.sync, "");
        rhine::dist::sync_gradients_reference(world, params);
      }
      report["losses"].push_back(loss_sum);
      if (sharded) {
        sharded->step();
        sharded->zero_grad();
      } else {
        plain->step();
        plain->zero_grad();
      }
    }
    rhine::dist::check_same_across_ranks(world, tensors);
    char hash[32];
    std::snprintf(hash, sizeof hash, "%016llx",
                  static_cast<unsigned long long>(rhine::dist::tensors_hash(tensors)));
    report["hash"] = hash;
    std::ofstream f(prefix + ".params", std::ios::binary);
    for (const auto& t : tensors) {
      at::Tensor d = t.detach().to(at::kDouble).contiguous();
      f.write(static_cast<const char*>(d.data_ptr()), static_cast<std::streamsize>(d.numel() * 8));
    }
    std::ofstream(prefix + ".json") << report.dump() << "\n";
    world.barrier();
    return 0;
  } catch (const rhine::Error& e) {
    std::ofstream(prefix + ".err") << e.what() << "\n";
    std::fprintf(stderr, "rank %d: %s\n", rank, e.what());
    std::fflush(stderr);
    // Default: leave at once, as a launcher would kill us anyway. --unwind
    // checks that destroying a failed World does not hang either.
    if (a.unwind) throw;
    std::_Exit(3);
  }
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse(argc, argv));
  } catch (const rhine::Error& e) {
    return 3;  // already reported by run()
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dist_worker: %s\n", e.what());
    return 2;
  }
}
