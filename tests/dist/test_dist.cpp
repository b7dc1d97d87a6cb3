// Data parallel over c10d Gloo (rhine/dist): contracts in process, and real
// multi-process training on loopback with the dist_worker binary, compared
// with one process training on the doubled batch (the independent reference:
// no communication at all), with the per-parameter twin, and with plain AdamW.
#include <ATen/ops/arange.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/zeros.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cmath>
#include <cstring>
#include <fcntl.h>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "rhine/core/json.h"
#include "rhine/dist/grad_sync.h"
#include "rhine/dist/sharded_optimizer.h"
#include "rhine/dist/world.h"
#include "rhine/optim/adamw.h"
#include "ranks.h"
#include "test_util.h"

using Catch::Matchers::Contains;
using rhine::dist::Rendezvous;
using rhine::dist::rendezvous_from_env;

namespace {

using rhine::test::all_ok;
using rhine::test::diff;
using rhine::test::Exit;
using rhine::test::read_params;
using rhine::test::slurp;
using rhine::test::wait_all;

std::vector<Exit> run_world(const rhine::test::TempDir& dir, const std::string& name, int n,
                            std::vector<std::string> args, double limit_s = 120,
                            bool kill_after_first = false) {
  return rhine::test::run_ranks(RHINE_DIST_WORKER, dir, name, n, std::move(args), limit_s, kill_after_first);
}

rhine::NamedParameters make_params(const std::vector<std::vector<int64_t>>& shapes) {
  rhine::NamedParameters ps;
  for (size_t i = 0; i < shapes.size(); ++i)
    ps.push_back({"p" + std::to_string(i), at::zeros(shapes[i])});
  return ps;
}

}  // namespace

// --- contracts ----------------------------------------------------------------

TEST_CASE("rendezvous_from_env reads torchrun, Slurm and single-process environments", "[dist]") {
  Rendezvous single = rendezvous_from_env(std::map<std::string, std::string>{});
  CHECK(single.source == "single");
  CHECK(single.world_size == 1);
  CHECK(single.rank == 0);

  Rendezvous t = rendezvous_from_env({{"RANK", "3"}, {"WORLD_SIZE", "8"}, {"LOCAL_RANK", "1"},
                                      {"MASTER_ADDR", "node07"}, {"MASTER_PORT", "29511"}});
  CHECK(t.source == "torchrun");
  CHECK((t.rank == 3 && t.world_size == 8 && t.local_rank == 1));
  CHECK((t.master_addr == "node07" && t.master_port == 29511));

  // torchrun inside a Slurm allocation: RANK wins over SLURM_PROCID.
  Rendezvous both = rendezvous_from_env({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"SLURM_PROCID", "5"},
                                         {"SLURM_NTASKS", "16"}, {"MASTER_ADDR", "a"},
                                         {"MASTER_PORT", "1234"}});
  CHECK((both.source == "torchrun" && both.rank == 1 && both.world_size == 2 && both.local_rank == 1));

  Rendezvous s = rendezvous_from_env({{"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "16"}, {"SLURM_LOCALID", "1"},
                                      {"MASTER_ADDR", "gpu001"}, {"MASTER_PORT", "29500"}});
  CHECK(s.source == "slurm");
  CHECK((s.rank == 5 && s.world_size == 16 && s.local_rank == 1 && s.master_addr == "gpu001"));

  // One rank needs no master.
  CHECK(rendezvous_from_env({{"RANK", "0"}, {"WORLD_SIZE", "1"}}).world_size == 1);
}

TEST_CASE("rendezvous_from_env names the bad or missing variable", "[dist]") {
  using M = std::map<std::string, std::string>;
  CHECK_THROWS_WITH(rendezvous_from_env(M{{"RANK", "2"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "a"}, {"MASTER_PORT", "1"}}),
                    Contains("[dist]") && Contains("RANK") && Contains("[0, 1]"));
  CHECK_THROWS_WITH(rendezvous_from_env(M{{"RANK", "x"}, {"WORLD_SIZE", "2"}}), Contains("RANK"));
  CHECK_THROWS_WITH(rendezvous_from_env(M{{"RANK", "0"}}), Contains("RANK and WORLD_SIZE"));
  CHECK_THROWS_WITH(rendezvous_from_env(M{{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "1"}}),
                    Contains("MASTER_ADDR is not set") && Contains("torchrun"));
  CHECK_THROWS_WITH(rendezvous_from_env(M{{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "2"}, {"MASTER_ADDR", "a"}}),
                    Contains("MASTER_PORT is not set") && Contains("scontrol show hostnames"));
  CHECK_THROWS_WITH(rendezvous_from_env(M{{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "a"}, {"MASTER_PORT", "70000"}}),
                    Contains("MASTER_PORT"));
  rhine::dist::DistOptions bad;
  bad.backend = "mpi";
  CHECK_THROWS_WITH(bad.validate(), Contains("[dist] unknown backend") && Contains("mpi"));
  bad.backend = "gloo";
  bad.timeout = std::chrono::milliseconds(0);
  CHECK_THROWS_WITH(bad.validate(), Contains("timeout"));
}

TEST_CASE("A single-process World builds nothing and its collectives are no-ops", "[dist]") {
  rhine::dist::World w = rhine::dist::init(Rendezvous{});
  CHECK(w.world_size() == 1);
  CHECK(w.is_main());
  CHECK(w.backend() == "none");
  at::Tensor t = at::arange(6, at::kFloat);
  at::Tensor before = t.clone();
  w.barrier();
  w.all_reduce_(t, rhine::dist::ReduceOp::kSum);
  w.all_reduce_(t, rhine::dist::ReduceOp::kAvg);
  w.broadcast_(t, 0);
  CHECK(t.equal(before));
  auto g = w.all_gather(t);
  REQUIRE(g.size() == 1);
  CHECK(g[0].equal(t));
  CHECK_THROWS_WITH(w.broadcast_(t, 1), Contains("root out of range"));

  // GradientSync leaves gradients alone; ShardedOptimizer is the plain optimizer.
  auto a = make_params({{3, 4}, {5}});
  auto b = make_params({{3, 4}, {5}});
  for (auto* ps : {&a, &b})
    for (auto& p : *ps) {
      p.tensor = at::arange(p.tensor.numel(), at::kFloat).reshape(p.tensor.sizes()).requires_grad_(true);
      p.tensor.mutable_grad() = at::ones_like(p.tensor).mul(0.5);
    }
  rhine::dist::GradientSync sync(w, a);
  sync.finish();
  auto frozen = make_params({{2}});
  CHECK_THROWS_WITH(rhine::dist::GradientSync(w, frozen), Contains("without requires_grad") && Contains("p0"));
  auto twice = a;
  twice.push_back(a[0]);
  CHECK_THROWS_WITH(rhine::dist::GradientSync(w, twice), Contains("listed twice"));
  CHECK(a[0].tensor.grad().equal(at::ones_like(a[0].tensor).mul(0.5)));
  rhine::AdamWOptions ao;
  rhine::dist::ShardedOptimizer zero(w, a, [&](const rhine::NamedParameters& shard) {
    return std::make_unique<rhine::AdamW>(shard, ao);
  });
  CHECK(zero.shard().size() == 2);
  rhine::AdamW plain(b, ao);
  zero.step();
  plain.step();
  for (size_t i = 0; i < a.size(); ++i) CHECK(a[i].tensor.equal(b[i].tensor));
  auto st = zero.state_dict();
  CHECK(st.meta["zero1"]["world_size"] == 1);
  zero.load_state_dict(st);
}

TEST_CASE("partition_parameters is greedy by size, balanced and deterministic", "[dist]") {
  // numels 100, 60, 50, 10, 5 over 2 ranks: 100 -> r0, 60 -> r1, 50 -> r1 (110),
  // 10 -> r0 (110), 5 -> r0 (115 vs 110: ties go to the lowest rank).
  auto ps = make_params({{10, 10}, {60}, {5, 10}, {10}, {5}});
  CHECK(rhine::dist::partition_parameters(ps, 2) == std::vector<int>{0, 1, 1, 0, 0});
  CHECK(rhine::dist::partition_parameters(ps, 1) == std::vector<int>(5, 0));
  // More ranks than parameters: some own nothing.
  CHECK(rhine::dist::partition_parameters(ps, 8) == std::vector<int>{0, 1, 2, 3, 4});
  // Equal sizes: round robin by position.
  auto eq = make_params({{4}, {4}, {4}, {4}});
  CHECK(rhine::dist::partition_parameters(eq, 2) == std::vector<int>{0, 1, 0, 1});
}

TEST_CASE("tensors_hash changes with any byte, dtype or shape", "[dist]") {
  at::Tensor a = at::arange(12, at::kFloat);
  const auto h = rhine::dist::tensors_hash({a});
  CHECK(rhine::dist::tensors_hash({a.clone()}) == h);
  at::Tensor b = a.clone();
  b.data_ptr<float>()[7] = std::nextafter(7.0f, 8.0f);
  CHECK(rhine::dist::tensors_hash({b}) != h);
  CHECK(rhine::dist::tensors_hash({a.reshape({3, 4})}) != h);
  CHECK(rhine::dist::tensors_hash({a.to(at::kDouble)}) != h);
  CHECK(rhine::dist::tensors_hash({a, a}) != h);
}

TEST_CASE("init fails with a [dist] error when the other rank never joins", "[dist]") {
  Rendezvous rv;
  rv.rank = 0;
  rv.world_size = 2;
  rv.master_port = rhine::test::free_port();
  rhine::dist::DistOptions o;
  o.timeout = std::chrono::milliseconds(1500);
  const auto t0 = std::chrono::steady_clock::now();
  CHECK_THROWS_WITH(rhine::dist::init(rv, o),
                    Contains("[dist]") && Contains("at 127.0.0.1:") && Contains("failed on rank 0 of 2") &&
                        Contains("timeout 1.5 s") && Contains("did every rank start"));
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  CHECK(s < 10);
}

// --- two processes on loopback --------------------------------------------------

TEST_CASE("Collectives across two and four Gloo ranks, split groups, and unequal parameters are detected",
          "[dist][process][slow]") {
  rhine::test::TempDir dir("dist_coll");
  // sum/avg/max/min, broadcast from the last rank, all_gather, barrier.
  REQUIRE(all_ok(run_world(dir, "coll", 2, {"--collectives", "--steps", "0"})));
  // Four ranks: the collectives again, and World::split into pairs and by parity.
  REQUIRE(all_ok(run_world(dir, "coll4", 4, {"--collectives", "--steps", "0"})));
  // Ranks initialise with different seeds; without broadcast_parameters the
  // hash check must refuse to train.
  auto exits = run_world(dir, "nobcast", 2, {"--no-broadcast", "--steps", "0"});
  CHECK(exits[0].code == 3);
  CHECK(exits[1].code == 3);
  CHECK_THAT(slurp(dir.file("nobcast.rank0.err")),
             Contains("[dist] parameters differ between ranks") && Contains("rank 1: ") &&
                 Contains("broadcast_parameters"));
}

TEST_CASE("Two Gloo ranks train like one process with the doubled batch", "[dist][process][slow]") {
  rhine::test::TempDir dir("dist_dp");
  // 3 AdamW steps; global batch 4 rows: one process has all 4, each rank 2.
  REQUIRE(all_ok(run_world(dir, "one", 0, {"--batch", "4", "--steps", "3"})));
  REQUIRE(all_ok(run_world(dir, "two", 2, {"--batch", "4", "--steps", "3"})));
  const auto ref = read_params(dir.file("one.rank0.params"));
  const auto r0 = read_params(dir.file("two.rank0.params"));
  const auto r1 = read_params(dir.file("two.rank1.params"));
  CHECK(r0 == r1);  // bitwise: every rank applied the same averaged gradients
  const auto [rel, mx] = diff(r0, ref);
  INFO("||dp - single|| / ||single|| = " << rel << ", max |diff| = " << mx);
  CHECK(rel < 1e-6);
  CHECK(mx < 1e-5);
  // The runs really trained: parameters moved away from the initialisation
  // by far more than the tolerance.
  REQUIRE(all_ok(run_world(dir, "zero_steps", 0, {"--batch", "4", "--steps", "0"})));
  CHECK(diff(ref, read_params(dir.file("zero_steps.rank0.params"))).second > 1e-2);
  // Losses of one process equal the mean of the ranks' losses.
  auto j1 = rhine::parse_json(slurp(dir.file("one.rank0.json")), "test", "one");
  auto j0 = rhine::parse_json(slurp(dir.file("two.rank0.json")), "test", "two0");
  auto j2 = rhine::parse_json(slurp(dir.file("two.rank1.json")), "test", "two1");
  for (size_t s = 0; s < 3; ++s) {
    const double mean = (j0["losses"][s].get<double>() + j2["losses"][s].get<double>()) / 2;
    CHECK(mean == Approx(j1["losses"][s].get<double>()).epsilon(1e-5));
  }
}

TEST_CASE("Bucketed, overlapped gradient sync equals the per-parameter twin bitwise", "[dist][process][slow]") {
  rhine::test::TempDir dir("dist_twin");
  // Small buckets: several of them, most launched from hooks during backward.
  REQUIRE(all_ok(run_world(dir, "bucketed", 2, {"--bucket-bytes", "2048", "--steps", "3"})));
  REQUIRE(all_ok(run_world(dir, "reference", 2, {"--sync", "reference", "--steps", "3"})));
  REQUIRE(all_ok(run_world(dir, "finish_only", 2, {"--bucket-bytes", "2048", "--no-overlap", "--steps", "3"})));
  const auto b = read_params(dir.file("bucketed.rank0.params"));
  CHECK(b == read_params(dir.file("reference.rank0.params")));
  CHECK(b == read_params(dir.file("finish_only.rank0.params")));
  auto j = rhine::parse_json(slurp(dir.file("bucketed.rank0.json")), "test", "bucketed");
  INFO(j.dump());
  CHECK(j["buckets"].get<int>() >= 4);
  // Every bucket but those holding the first layers' parameters is ready, and
  // launched, before backward returns.
  for (const auto& o : j["overlapped"]) CHECK(o.get<int>() >= 2);
  auto jn = rhine::parse_json(slurp(dir.file("finish_only.rank0.json")), "test", "finish_only");
  for (const auto& o : jn["overlapped"]) CHECK(o.get<int>() == 0);
}

TEST_CASE("Gradient accumulation with no_sync equals one step over the whole batch", "[dist][process][slow]") {
  rhine::test::TempDir dir("dist_accum");
  REQUIRE(all_ok(run_world(dir, "one", 0, {"--batch", "8", "--steps", "2"})));
  REQUIRE(all_ok(run_world(dir, "accum", 2, {"--batch", "8", "--accum", "2", "--steps", "2",
                                             "--bucket-bytes", "4096"})));
  const auto [rel, mx] = diff(read_params(dir.file("accum.rank0.params")), read_params(dir.file("one.rank0.params")));
  INFO("rel " << rel << " max " << mx);
  CHECK(rel < 1e-6);
  CHECK(mx < 1e-5);
}

TEST_CASE("ZeRO-1 sharded AdamW equals replicated AdamW", "[dist][process][slow]") {
  rhine::test::TempDir dir("dist_zero1");
  REQUIRE(all_ok(run_world(dir, "plain", 2, {"--steps", "3"})));
  REQUIRE(all_ok(run_world(dir, "zero1", 2, {"--steps", "3", "--zero1"})));
  const auto z0 = read_params(dir.file("zero1.rank0.params"));
  CHECK(z0 == read_params(dir.file("zero1.rank1.params")));
  const auto [rel, mx] = diff(z0, read_params(dir.file("plain.rank0.params")));
  INFO("rel " << rel << " max " << mx);
  CHECK(mx == 0);  // the same per-element AdamW arithmetic, only split over ranks
  // Per-rank state round trip before step 2 continues exactly.
  REQUIRE(all_ok(run_world(dir, "resumed", 2, {"--steps", "3", "--zero1", "--resume-at", "2"})));
  CHECK(read_params(dir.file("resumed.rank0.params")) == z0);
  CHECK(read_params(dir.file("resumed.rank1.params")) == z0);
}

TEST_CASE("Accumulating without no_sync is refused with a hint", "[dist][process][slow]") {
  rhine::test::TempDir dir("dist_forget");
  auto exits = run_world(dir, "forget", 2, {"--accum", "2", "--forget-no-sync", "--steps", "1"});
  CHECK(exits[0].code == 3);
  CHECK_THAT(slurp(dir.file("forget.rank0.err")),
             Contains("[dist] the gradient of a parameter became ready twice before finish()") &&
                 Contains("no_sync()"));
}

TEST_CASE("A rank that exits makes the other fail with a [dist] error, not a hang", "[dist][process][slow]") {
  rhine::test::TempDir dir("dist_dead");
  // Rank 1 dies (rank 0, the store's host, then unwinds normally: destroying
  // a failed World must not hang), then rank 0 dies.
  for (int dead : {1, 0}) {
    const std::string name = "dead" + std::to_string(dead);
    std::vector<std::string> args = {"--steps", "5", "--timeout-ms", "5000", "--die-rank",
                                     std::to_string(dead), "--die-after", "2"};
    if (dead == 1) args.push_back("--unwind");
    auto exits = run_world(dir, name, 2, args, 60);
    const int alive = 1 - dead;
    CHECK(exits[static_cast<size_t>(dead)].code == 0);
    CHECK(exits[static_cast<size_t>(alive)].code == 3);
    CHECK(exits[static_cast<size_t>(alive)].seconds < 5 + 10);  // within the timeout (+ start-up)
    const std::string err = slurp(dir.file(name + ".rank" + std::to_string(alive) + ".err"));
    INFO(err);
    CHECK_THAT(err, Contains("[dist]") && Contains("on rank " + std::to_string(alive) + " of 2"));
    CHECK_THAT(err, Contains("check the other ranks' logs"));
  }
}

TEST_CASE("A stalled rank makes the other time out after DistOptions::timeout", "[dist][process][slow]") {
  rhine::test::TempDir dir("dist_slow");
  auto exits = run_world(dir, "slow", 2,
                         {"--steps", "4", "--timeout-ms", "3000", "--sleep-rank", "1", "--sleep-after", "1"},
                         40, /*kill_after_first=*/true);
  CHECK(exits[0].code == 3);
  CHECK(exits[0].seconds < 3 + 12);  // the timeout, plus start-up and one step
  CHECK(exits[1].code == -1);        // still asleep: killed by the test
  const std::string err = slurp(dir.file("slow.rank0.err"));
  INFO(err);
  CHECK_THAT(err, Contains("[dist] all_reduce timed out after 3 s on rank 0 of 2"));
}
