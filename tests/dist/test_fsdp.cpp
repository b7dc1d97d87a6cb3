// FSDP (rhine/dist/fsdp.h) on Gloo ranks over loopback, with fsdp_worker:
// every layout trains the same global batch, and the reference is one process
// training it without any parallelism (no communication at all).
//
// Tolerance: ranks compute each micro-batch's forward and backward on fewer
// rows than one process does, so GEMMs and reductions sum in another order
// (and the mean over ranks is a sum divided by N instead of one mean over all
// rows). In fp32 that moves parameters by ~1e-7 relative after a few AdamW
// steps; we allow 2e-5 relative (||a-b||/||b||) for fp32 runs. Two runs of the
// same layout are bitwise equal.
#include <catch2/catch.hpp>

#include <chrono>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "rhine/core/json.h"
#include "ranks.h"
#include "test_util.h"

using rhine::test::all_ok;
using rhine::test::diff;
using rhine::test::read_params;
using rhine::test::slurp;

namespace {

std::vector<rhine::test::Exit> run(const rhine::test::TempDir& dir, const std::string& name, int n,
                                   std::vector<std::string> args, double limit_s = 180) {
  return rhine::test::run_ranks(RHINE_FSDP_WORKER, dir, name, n, std::move(args), limit_s);
}

rhine::Json report(const rhine::test::TempDir& dir, const std::string& name, int rank) {
  return rhine::Json::parse(slurp(dir.file(name) + ".rank" + std::to_string(rank) + ".json"));
}

/// Trains `name` with n ranks and `args`, and compares with the one-process run `ref`.
void expect_equal_to(const rhine::test::TempDir& dir, const std::string& ref, const std::string& name, int n,
                     const std::vector<std::string>& args, double tol = 2e-5) {
  INFO(name << " with " << n << " ranks vs " << ref);
  REQUIRE(all_ok(run(dir, name, n, args)));
  auto [rel, mx] = diff(read_params(dir.file(name) + ".params"), read_params(dir.file(ref) + ".params"));
  INFO("relative " << rel << ", max abs " << mx);
  CHECK(rel < tol);
  const auto a = report(dir, name, 0)["losses"], b = report(dir, ref, 0)["losses"];
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i)
    CHECK(a[i].get<double>() == Approx(b[i].get<double>()).epsilon(tol < 1e-3 ? 1e-5 : 1e-2));
}

/// The parameters `name` and `ref` ended with agree to `tol` (relative).
void expect_close(const rhine::test::TempDir& dir, const std::string& name, const std::string& ref,
                  double tol = 2e-5) {
  auto [rel, mx] = diff(read_params(dir.file(name) + ".params"), read_params(dir.file(ref) + ".params"));
  INFO(name << " vs " << ref << ": relative " << rel << ", max abs " << mx);
  CHECK(rel < tol);
}

/// `name` with n ranks stops with a rhine::Error (exit code 3) whose message
/// on rank 0 contains `needle`.
void expect_refused(const rhine::test::TempDir& dir, const std::string& name, int n,
                    const std::vector<std::string>& args, const std::string& needle) {
  const auto exits = run(dir, name, n, args);
  REQUIRE(exits.size() == static_cast<std::size_t>(std::max(n, 1)));
  CHECK(exits[0].code == 3);
  const std::string err = slurp(dir.file(name) + ".rank0.err");
  INFO(err);
  CHECK(err.find(needle) != std::string::npos);
}

std::vector<std::string> with(std::vector<std::string> base, const std::vector<std::string>& more) {
  base.insert(base.end(), more.begin(), more.end());
  return base;
}

}  // namespace

TEST_CASE("FSDP (ZeRO-3) on 2 and 4 ranks trains the dense model as one process does", "[fsdp]") {
  rhine::test::TempDir dir("fsdp_dense");
  const std::vector<std::string> base{"--model", "dense", "--steps", "3", "--batch", "8"};
  REQUIRE(all_ok(run(dir, "ref", 0, with(base, {"--parallel", "none"}))));
  expect_equal_to(dir, "ref", "fsdp2", 2, base);
  expect_equal_to(dir, "ref", "fsdp4", 4, base);
  expect_equal_to(dir, "ref", "fsdp2_keep", 2, with(base, {"--no-reshard", "--no-prefetch"}));
  expect_equal_to(dir, "ref", "zero2", 2, with(base, {"--zero", "2"}));

  // Memory: each rank holds 1/N of the parameters (plus row padding), and
  // never the whole model gathered at once.
  for (const std::string name : {"fsdp2", "fsdp4"}) {
    const int n = name == "fsdp2" ? 2 : 4;
    std::int64_t total_shards = 0;
    for (int r = 0; r < n; ++r) {
      const auto m = report(dir, name, r)["memory"];
      INFO(name << " rank " << r << ": " << m.dump());
      const auto model = m["model_elements"].get<std::int64_t>();
      total_shards += m["shard_elements"].get<std::int64_t>();
      CHECK(m["buffer_elements"].get<std::int64_t>() <= model / n + model / 8);
      CHECK(m["peak_gathered_elements"].get<std::int64_t>() < model);
      CHECK(m["gathered_elements"].get<std::int64_t>() == 0);  // all freed after the step
    }
    CHECK(total_shards == report(dir, name, 0)["memory"]["model_elements"].get<std::int64_t>());
  }
  // ZeRO-2 keeps every parameter gathered.
  const auto z2 = report(dir, "zero2", 0)["memory"];
  CHECK(z2["gathered_elements"] == z2["model_elements"]);
}

TEST_CASE("FSDP with accumulation, clipping and activation checkpointing equals one process", "[fsdp]") {
  rhine::test::TempDir dir("fsdp_accum");
  const std::vector<std::string> base{"--model", "dense", "--steps", "3", "--batch", "8", "--clip", "0.05"};
  // One process: 4 micro-batches of 2 rows; ranks: 2 micro-batches of 2 rows each.
  REQUIRE(all_ok(run(dir, "ref", 0, with(base, {"--parallel", "none", "--accum", "4"}))));
  const auto ref = report(dir, "ref", 0);
  for (const auto& norm : ref["norms"]) CHECK(norm.get<double>() > 0.05);  // clipping really acts
  expect_equal_to(dir, "ref", "accum", 2, with(base, {"--accum", "2"}));
  expect_equal_to(dir, "ref", "accum_ckpt", 2, with(base, {"--accum", "2", "--ckpt"}));
  const auto a = report(dir, "accum", 0);
  for (std::size_t i = 0; i < ref["norms"].size(); ++i)
    CHECK(a["norms"][i].get<double>() == Approx(ref["norms"][i].get<double>()).epsilon(1e-5));
  // Accumulating without communication holds full-size gradients.
  CHECK(a["memory"]["peak_full_grad_elements"].get<std::int64_t>() > 0);
}

TEST_CASE("FSDP trains the MLA + MoE + MTP model as one process does", "[fsdp]") {
  rhine::test::TempDir dir("fsdp_moe");
  const std::vector<std::string> base{"--model", "moe", "--steps", "3", "--batch", "8"};
  REQUIRE(all_ok(run(dir, "ref", 0, with(base, {"--parallel", "none"}))));
  expect_equal_to(dir, "ref", "fsdp2", 2, base);
  expect_equal_to(dir, "ref", "fsdp4", 4, with(base, {"--ckpt"}));
  expect_equal_to(dir, "ref", "zero2", 2, with(base, {"--zero", "2"}));
}

TEST_CASE("FSDP steps Muon on row shards (whole matrices gathered per unit) as one process does", "[fsdp]") {
  // Newton-Schulz runs on each whole matrix, rebuilt from the ranks' rows;
  // the scale uses the whole shape. fp32 iteration (the worker sets it), so
  // the tolerance is FSDP's 2e-5. The MoE model adds routed experts kept
  // whole by expert parallelism.
  rhine::test::TempDir dir("fsdp_muon");
  const std::vector<std::string> base{"--model", "moe", "--steps", "3", "--batch", "8", "--optim", "muon"};
  REQUIRE(all_ok(run(dir, "ref", 0, with(base, {"--parallel", "none"}))));
  expect_equal_to(dir, "ref", "muon2", 2, base);
  expect_equal_to(dir, "ref", "muon4_ep", 4, with(base, {"--ep", "4"}));
  // Sharded checkpoints carry Muon's momentum: 4 ranks -> 2.
  REQUIRE(all_ok(run(dir, "save4", 4, with(base, {"--save-at", "1", "--ckpt-dir", dir.file("ck4")}))));
  REQUIRE(all_ok(run(dir, "resume2", 2, with(base, {"--resume", dir.file("ck4")}))));
  auto [rel, mx] = diff(read_params(dir.file("resume2") + ".params"), read_params(dir.file("muon2") + ".params"));
  INFO("resumed vs uninterrupted: " << rel);
  CHECK(rel < 2e-5);
  // A Muon without muon_shards() would orthogonalise row blocks: refused.
  const auto exits = run(dir, "unsharded", 2, with(base, {"--no-muon-shards"}));
  REQUIRE(exits.size() == 2);
  CHECK(exits[0].code == 3);
  const std::string err = slurp(dir.file("unsharded") + ".rank0.err");
  INFO(err);
  CHECK(err.find("[fsdp]") != std::string::npos);
  CHECK(err.find("muon_shards") != std::string::npos);
}

TEST_CASE("FSDP in bf16: autocast equals data parallel bitwise, bf16 gathers train as one rank does", "[fsdp]") {
  rhine::test::TempDir dir("fsdp_bf16");
  const std::vector<std::string> base{"--model", "dense", "--steps", "3", "--batch", "8", "--autocast"};
  // fp32 gathers under autocast cast each weight exactly as data parallel
  // does, and the reduce-scatter sums the same two gradients as the all-reduce:
  // bitwise equal. (One process differs from both by ~5e-3: bf16 activations
  // amplify the different summation order of 4-row and 8-row batches.)
  REQUIRE(all_ok(run(dir, "ddp", 2, with(base, {"--parallel", "ddp"}))));
  REQUIRE(all_ok(run(dir, "fsdp", 2, base)));
  CHECK(read_params(dir.file("fsdp") + ".params") == read_params(dir.file("ddp") + ".params"));
  // bf16 gathers are another precision (every weight used in bf16, as FSDP2's
  // param_dtype): compared with one rank gathering in bf16, to 2e-2 (one bf16
  // ulp is 4e-3 relative, and 3 AdamW steps at lr 1e-2 compound it).
  REQUIRE(all_ok(run(dir, "ref_bf16", 0, with(base, {"--param-bf16"}))));
  expect_equal_to(dir, "ref_bf16", "bf16_2", 2, with(base, {"--param-bf16"}), 2e-2);
  auto [rel, mx] = diff(read_params(dir.file("ref_bf16") + ".params"), read_params(dir.file("ddp") + ".params"));
  INFO("bf16 gathers vs fp32: " << rel);
  CHECK(rel > 1e-3);  // really another precision
}

TEST_CASE("FSDP: a rank that dies or stalls gives the others the clear [dist] error", "[fsdp]") {
  rhine::test::TempDir dir("fsdp_dead");
  auto exits = run(dir, "dead", 2, {"--steps", "3", "--die-rank", "1", "--die-after", "1", "--timeout-ms", "3000"}, 60);
  REQUIRE(exits.size() == 2);
  CHECK(exits[0].code == 3);
  const std::string err = slurp(dir.file("dead") + ".rank0.err");
  INFO(err);
  CHECK(err.find("[dist]") != std::string::npos);
  // A stalled rank: the other one times out (3 s) instead of hanging.
  const auto t0 = std::chrono::steady_clock::now();
  exits = rhine::test::run_ranks(RHINE_FSDP_WORKER, dir, "stall", 2,
                                 {"--steps", "3", "--sleep-rank", "1", "--sleep-after", "1", "--timeout-ms", "3000"},
                                 60, /*kill_after_first=*/true);
  CHECK(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() < 40);
  CHECK(exits[0].code == 3);
  const std::string stalled = slurp(dir.file("stall") + ".rank0.err");
  INFO(stalled);
  CHECK(stalled.find("[dist]") != std::string::npos);
  CHECK(stalled.find("timed out") != std::string::npos);
}

TEST_CASE("Sharded checkpoints reshard: FSDP 4 -> 2 -> 1 process, and one process -> FSDP 4", "[fsdp]") {
  // Save after 2 of 4 steps with one layout, resume with another, and compare
  // with the uninterrupted run of the new layout. The MoE model also checks
  // the router biases (replicated buffers) and MTP.
  rhine::test::TempDir dir("fsdp_reshard");
  const std::vector<std::string> base{"--model", "moe", "--steps", "4", "--batch", "8"};
  REQUIRE(all_ok(run(dir, "full2", 2, base)));
  REQUIRE(all_ok(run(dir, "full1", 0, with(base, {"--parallel", "none"}))));
  REQUIRE(all_ok(run(dir, "full4", 4, base)));
  // FSDP 4 ranks -> checkpoint at step 2 -> FSDP 2 ranks to step 4.
  REQUIRE(all_ok(run(dir, "save4", 4, with(base, {"--save-at", "2", "--ckpt-dir", dir.file("ck4")}))));
  CHECK(std::filesystem::exists(dir.file("ck4") + "/shards.json"));
  CHECK(std::filesystem::exists(dir.file("ck4") + "/shard-00003-of-00004.safetensors"));
  REQUIRE(all_ok(run(dir, "resume2", 2, with(base, {"--resume", dir.file("ck4"), "--save-at", "3", "--ckpt-dir", dir.file("ck2")}))));
  expect_close(dir, "resume2", "full2");
  // FSDP 2 ranks (checkpoint of step 3) -> one process.
  REQUIRE(all_ok(run(dir, "resume1", 0, with(base, {"--parallel", "none", "--resume", dir.file("ck2")}))));
  expect_close(dir, "resume1", "full1");
  // One process (a one-rank row shard of whole tensors) -> FSDP 4 ranks.
  REQUIRE(all_ok(run(dir, "save1", 0, with(base, {"--parallel", "none", "--save-at", "1", "--ckpt-dir", dir.file("ck1")}))));
  REQUIRE(all_ok(run(dir, "resume4", 4, with(base, {"--resume", dir.file("ck1")}))));
  expect_close(dir, "resume4", "full4");
  // (A resume that loaded nothing would train steps 2-4 from the initial
  // weights and miss the uninterrupted run by far.)
}

TEST_CASE("Expert parallelism (EP 2 and 4, with ZeRO-3 and ZeRO-2) trains the MoE model as one process does",
          "[fsdp][ep]") {
  // The routed experts are partitioned over the ranks (each whole on one
  // rank); tokens travel to them by all-to-all. Same tolerance as FSDP: the
  // experts see the same rows, summed in another order.
  rhine::test::TempDir dir("fsdp_ep");
  const std::vector<std::string> base{"--model", "moe", "--steps", "3", "--batch", "8"};
  REQUIRE(all_ok(run(dir, "ref", 0, with(base, {"--parallel", "none"}))));
  expect_equal_to(dir, "ref", "ep2", 2, with(base, {"--ep", "2"}));
  expect_equal_to(dir, "ref", "ep4", 4, with(base, {"--ep", "4", "--ckpt"}));
  expect_equal_to(dir, "ref", "ep2_zero2", 2, with(base, {"--ep", "2", "--zero", "2"}));
  // bf16 gathers: the routed experts (not gathered) still compute from their
  // fp32 weights; another precision, so compared to the fp32 run loosely.
  expect_equal_to(dir, "ref", "ep2_bf16", 2, with(base, {"--ep", "2", "--param-bf16"}), 5e-2);
  const std::vector<std::string> clipped = with(base, {"--clip", "0.05"});
  REQUIRE(all_ok(run(dir, "ref_accum", 0, with(clipped, {"--parallel", "none", "--accum", "4"}))));
  expect_equal_to(dir, "ref_accum", "ep4_accum", 4, with(clipped, {"--ep", "4", "--accum", "2"}));

  // Each rank holds E/N experts of every MoE layer whole, and 1/N of the rest.
  for (const std::string name : {"ep2", "ep4"}) {
    const int n = name == "ep2" ? 2 : 4;
    std::int64_t total_shards = 0, total_experts = 0;
    for (int r = 0; r < n; ++r) {
      const auto m = report(dir, name, r)["memory"];
      INFO(name << " rank " << r << ": " << m.dump());
      total_shards += m["shard_elements"].get<std::int64_t>();
      total_experts += m["expert_elements"].get<std::int64_t>();
      CHECK(m["expert_elements"].get<std::int64_t>() > 0);
      if (r > 0) CHECK(m["expert_elements"] == report(dir, name, 0)["memory"]["expert_elements"]);
    }
    const auto model = report(dir, name, 0)["memory"]["model_elements"].get<std::int64_t>();
    CHECK(total_shards == model);
    // moe_config: 3 MoE layers (layers 1, 2 and the MTP module) x 8 experts x 3 matrices of 8 x 16.
    CHECK(total_experts == 3 * 8 * 3 * 8 * 16);
  }
}

TEST_CASE("Sharded checkpoints reshard across expert parallelism: EP 4 -> EP 2 -> ZeRO-3 -> one process -> EP 4",
          "[fsdp][ep]") {
  // An expert-parallel checkpoint holds each routed expert whole, written by
  // its owner; every other tensor in row shards. Any layout reads it.
  rhine::test::TempDir dir("fsdp_ep_reshard");
  const std::vector<std::string> base{"--model", "moe", "--steps", "4", "--batch", "8"};
  REQUIRE(all_ok(run(dir, "full1", 0, with(base, {"--parallel", "none"}))));
  REQUIRE(all_ok(run(dir, "full_ep2", 2, with(base, {"--ep", "2"}))));
  REQUIRE(all_ok(run(dir, "full_ep4", 4, with(base, {"--ep", "4"}))));
  REQUIRE(all_ok(run(dir, "full_z3", 2, base)));
  // EP 4 -> checkpoint at step 1 -> EP 2 (checkpoint at step 2) -> ZeRO-3 without EP (step 3) -> one process.
  REQUIRE(all_ok(run(dir, "save_ep4", 4, with(base, {"--ep", "4", "--save-at", "1", "--ckpt-dir", dir.file("ck_ep4")}))));
  REQUIRE(all_ok(run(dir, "ep2", 2,
                     with(base, {"--ep", "2", "--resume", dir.file("ck_ep4"), "--save-at", "2", "--ckpt-dir",
                                 dir.file("ck_ep2")}))));
  expect_close(dir, "ep2", "full_ep2");
  REQUIRE(all_ok(run(dir, "z3", 2, with(base, {"--resume", dir.file("ck_ep2"), "--save-at", "3", "--ckpt-dir",
                                               dir.file("ck_z3")}))));
  expect_close(dir, "z3", "full_z3");
  // (The one process saves what it loaded at step 3 again, as a one-rank row shard.)
  REQUIRE(all_ok(run(dir, "one", 0, with(base, {"--parallel", "none", "--resume", dir.file("ck_z3"), "--save-at",
                                                "3", "--ckpt-dir", dir.file("ck_one")}))));
  expect_close(dir, "one", "full1");
  // One process -> EP 4.
  REQUIRE(all_ok(run(dir, "ep4", 4, with(base, {"--ep", "4", "--resume", dir.file("ck_one")}))));
  expect_close(dir, "ep4", "full_ep4");
  // EP 2's checkpoint: rank 1 wrote experts 4-7 whole, rank 0 experts 0-3.
  const auto index = rhine::Json::parse(slurp(dir.file("ck_ep2") + "/shards.json"))["tensors"];
  for (const auto& [expert, file] : std::vector<std::pair<int, std::string>>{
           {0, "shard-00000-of-00002.safetensors"}, {7, "shard-00001-of-00002.safetensors"}}) {
    const auto pieces = index["model.layers.1.mlp.experts." + std::to_string(expert) + ".up_proj.weight"]["pieces"];
    INFO(pieces.dump());
    REQUIRE(pieces.size() == 1);
    CHECK(pieces[0]["file"] == file);
    CHECK(pieces[0]["rows"] == rhine::Json::array({0, 8}));
  }
  CHECK(index["model.layers.1.mlp.shared_experts.up_proj.weight"]["pieces"].size() == 2);  // row-sharded
}

TEST_CASE("Hybrid sharding (2 copies x 2 ranks), with expert parallelism in each copy, trains as one process does",
          "[fsdp][ep]") {
  // HSDP: ranks {0,1} and {2,3} each shard one copy of the model; gradients
  // are reduce-scattered within a copy and all-reduced across copies. With
  // "ep" 2 each copy's two ranks own half the experts; the two owners of an
  // expert (one per copy) all-reduce its gradient.
  rhine::test::TempDir dir("fsdp_hybrid");
  const std::vector<std::string> dense{"--model", "dense", "--steps", "3", "--batch", "8"};
  REQUIRE(all_ok(run(dir, "ref", 0, with(dense, {"--parallel", "none"}))));
  expect_equal_to(dir, "ref", "hsdp", 4, with(dense, {"--shard", "2"}));
  expect_equal_to(dir, "ref", "hsdp_z2_accum", 4, with(dense, {"--shard", "2", "--zero", "2", "--accum", "2"}));
  // Each rank holds half the model: a copy is sharded over 2 ranks, not 4.
  const auto m = report(dir, "hsdp", 0)["memory"];
  CHECK(m["shard_elements"].get<std::int64_t>() * 2 >= m["model_elements"].get<std::int64_t>());
  CHECK(m["shard_elements"].get<std::int64_t>() * 3 < m["model_elements"].get<std::int64_t>() * 2);

  const std::vector<std::string> moe{"--model", "moe", "--steps", "3", "--batch", "8"};
  REQUIRE(all_ok(run(dir, "ref_moe", 0, with(moe, {"--parallel", "none"}))));
  expect_equal_to(dir, "ref_moe", "hsdp_ep", 4, with(moe, {"--shard", "2", "--ep", "2"}));
  // EP within a copy: each rank owns 4 of the 8 experts of every MoE layer.
  CHECK(report(dir, "hsdp_ep", 3)["memory"]["expert_elements"].get<std::int64_t>() == 3 * 4 * 3 * 8 * 16);
  // A hybrid checkpoint (written by the first copy) resumes as FSDP over 4 ranks with EP 4.
  REQUIRE(all_ok(run(dir, "full_ep4", 4, with(moe, {"--ep", "4"}))));
  REQUIRE(all_ok(run(dir, "save", 4, with(moe, {"--shard", "2", "--ep", "2", "--save-at", "1", "--ckpt-dir",
                                                 dir.file("ck")}))));
  CHECK(std::filesystem::exists(dir.file("ck") + "/shard-00001-of-00002.safetensors"));
  REQUIRE(all_ok(run(dir, "resume_ep4", 4, with(moe, {"--ep", "4", "--resume", dir.file("ck")}))));
  expect_close(dir, "resume_ep4", "full_ep4");
  // A shard size that does not divide the ranks is refused.
  expect_refused(dir, "bad", 4, with(dense, {"--shard", "3"}), "shard_size must divide");
}

TEST_CASE("Expert parallelism smaller than the shard group: experts sharded over the expert-data-parallel group",
          "[fsdp][ep]") {
  // 4 ranks, EP 2: EP groups {0,1} and {2,3} split the 8 experts of every MoE
  // layer (tokens travel within a group); ranks {0,2} and {1,3} (the EDP
  // groups) shard their 4 experts by rows, gathered per block like every
  // other weight. Everything else is sharded over all 4 ranks.
  rhine::test::TempDir dir("fsdp_edp");
  const std::vector<std::string> moe{"--model", "moe", "--steps", "3", "--batch", "8"};
  REQUIRE(all_ok(run(dir, "ref", 0, with(moe, {"--parallel", "none"}))));
  expect_equal_to(dir, "ref", "edp", 4, with(moe, {"--ep", "2"}));
  expect_equal_to(dir, "ref", "edp_z2_ckpt", 4, with(moe, {"--ep", "2", "--zero", "2", "--ckpt"}));
  REQUIRE(all_ok(run(dir, "ref_muon", 0, with(moe, {"--parallel", "none", "--optim", "muon"}))));
  expect_equal_to(dir, "ref_muon", "edp_muon", 4, with(moe, {"--ep", "2", "--optim", "muon"}));
  REQUIRE(all_ok(run(dir, "ref_lora", 0, with(moe, {"--parallel", "none", "--lora"}))));
  expect_equal_to(dir, "ref_lora", "edp_lora", 4, with(moe, {"--ep", "2", "--lora"}));
  // Each rank holds half the rows of its EP group's 4 experts per MoE layer.
  for (int r = 0; r < 4; ++r)
    CHECK(report(dir, "edp", r)["memory"]["expert_elements"].get<std::int64_t>() == 3 * 4 * 3 * 8 * 16 / 2);
  // Checkpoints: EP 2 of 4 -> EP 4, and EP 4 -> EP 2 of 4.
  REQUIRE(all_ok(run(dir, "full_ep4", 4, with(moe, {"--ep", "4"}))));
  REQUIRE(all_ok(
      run(dir, "save_edp", 4, with(moe, {"--ep", "2", "--save-at", "1", "--ckpt-dir", dir.file("ck_edp")}))));
  REQUIRE(all_ok(run(dir, "to_ep4", 4, with(moe, {"--ep", "4", "--resume", dir.file("ck_edp")}))));
  expect_close(dir, "to_ep4", "full_ep4");
  REQUIRE(all_ok(
      run(dir, "save_ep4", 4, with(moe, {"--ep", "4", "--save-at", "2", "--ckpt-dir", dir.file("ck_ep4")}))));
  REQUIRE(all_ok(run(dir, "to_edp", 4, with(moe, {"--ep", "2", "--resume", dir.file("ck_ep4")}))));
  expect_close(dir, "to_edp", "edp");
  // EP that does not divide the shard group is refused.
  expect_refused(dir, "bad", 4, with(moe, {"--ep", "3"}), "expert_parallel must divide");
}

TEST_CASE("LoRA under FSDP: the frozen base sharded, the adapters trained as one process trains them",
          "[fsdp][lora]") {
  // FSDP gathers each block's base weights and adapters like any parameters;
  // the block runs the adapters' low-rank path beside the frozen base. The
  // adapters' gradients are reduce-scattered into their row shards; the base
  // gets none.
  rhine::test::TempDir dir("fsdp_lora");
  const std::vector<std::string> dense{"--model", "dense", "--steps", "3", "--batch", "8", "--lora"};
  REQUIRE(all_ok(run(dir, "ref", 0, with(dense, {"--parallel", "none"}))));
  expect_equal_to(dir, "ref", "fsdp2", 2, dense);
  expect_equal_to(dir, "ref", "fsdp4_ckpt", 4, with(dense, {"--ckpt"}));
  expect_equal_to(dir, "ref", "fsdp2_keep", 2, with(dense, {"--no-reshard"}));
  expect_equal_to(dir, "ref", "zero2", 2, with(dense, {"--zero", "2"}));
  // Only the adapters train: the ranks' optimizers step 1/N of them each.
  const auto adapters = report(dir, "ref", 0)["trained_elements"].get<std::int64_t>();
  const auto model = report(dir, "fsdp2", 0)["memory"]["model_elements"].get<std::int64_t>();
  CHECK(adapters > 0);
  CHECK(adapters < model / 4);
  std::int64_t stepped = 0;
  for (int r = 0; r < 4; ++r) stepped += report(dir, "fsdp4_ckpt", r)["trained_elements"].get<std::int64_t>();
  CHECK(stepped == adapters);
  CHECK(report(dir, "fsdp4_ckpt", 0)["memory"]["gathered_elements"] == 0);
  // Adapter dropout (PEFT's: per element of the adapter input) draws from each
  // rank's generator for the rank's rows, so a sharded run and one process
  // differ as with any dropout. A sharded run repeats itself bitwise, and the
  // dropout changes it.
  const auto drop = with(dense, {"--lora-dropout", "0.25"});
  REQUIRE(all_ok(run(dir, "drop2", 2, drop)));
  REQUIRE(all_ok(run(dir, "drop2_again", 2, drop)));
  CHECK(diff(read_params(dir.file("drop2") + ".params"), read_params(dir.file("drop2_again") + ".params")).first == 0);
  CHECK(diff(read_params(dir.file("drop2") + ".params"), read_params(dir.file("fsdp2") + ".params")).first > 1e-6);

  // MLA + MoE + MTP: adapters on attention and on every down_proj, the routed
  // experts' too, which expert parallelism keeps whole on their owners.
  const std::vector<std::string> moe{"--model", "moe", "--steps", "3", "--batch", "8", "--lora"};
  REQUIRE(all_ok(run(dir, "ref_moe", 0, with(moe, {"--parallel", "none"}))));
  expect_equal_to(dir, "ref_moe", "moe2", 2, moe);
  expect_equal_to(dir, "ref_moe", "moe4_ep", 4, with(moe, {"--ep", "4"}));
  // A sharded checkpoint of a LoRA run reshards like any other: EP 4 -> ZeRO-3 on 2 ranks.
  REQUIRE(all_ok(run(dir, "save4", 4, with(moe, {"--ep", "4", "--save-at", "1", "--ckpt-dir", dir.file("ck4")}))));
  REQUIRE(all_ok(run(dir, "resume2", 2, with(moe, {"--resume", dir.file("ck4")}))));
  expect_close(dir, "resume2", "moe2");

  // Streaming import: the base model's rows are read after sharding; the
  // adapters (absent from an HF directory) keep their initialisation.
  REQUIRE(all_ok(run(dir, "export", 0, {"--model", "moe", "--parallel", "none", "--export-hf", dir.file("hf")})));
  const std::vector<std::string> imported = with(moe, {"--import", dir.file("hf")});
  REQUIRE(all_ok(run(dir, "ref_import", 0, with(imported, {"--parallel", "none"}))));
  expect_equal_to(dir, "ref_import", "import2", 2, with(imported, {"--defer-init"}));
}

TEST_CASE("Streaming import: a model built without its weights loads an HF directory into its shards", "[fsdp]") {
  // CausalLMOptions::defer_init leaves the linear and embedding weights
  // unwritten; FSDP keeps this rank's shards and FSDP::load_parameters reads
  // only its rows of the HF files. Training then equals one process that
  // imported the same directory.
  rhine::test::TempDir dir("fsdp_import");
  REQUIRE(all_ok(run(dir, "export", 0, {"--model", "moe", "--parallel", "none", "--export-hf", dir.file("hf")})));
  const std::vector<std::string> base{"--model", "moe", "--steps", "3", "--batch", "8", "--import", dir.file("hf")};
  REQUIRE(all_ok(run(dir, "ref", 0, with(base, {"--parallel", "none"}))));
  expect_equal_to(dir, "ref", "eager2", 2, base);
  expect_equal_to(dir, "ref", "meta2", 2, with(base, {"--defer-init"}));
  expect_equal_to(dir, "ref", "meta4_ep", 4, with(base, {"--defer-init", "--ep", "4", "--zero", "2"}));
  // The import decides the result: the same training from the seed's weights differs.
  REQUIRE(all_ok(run(dir, "seed", 0, {"--model", "moe", "--steps", "3", "--batch", "8", "--parallel", "none"})));
  CHECK(diff(read_params(dir.file("seed") + ".params"), read_params(dir.file("ref") + ".params")).first > 1e-2);
  // From scratch: FSDP::initialize draws each rank's rows of what the eager
  // build would have drawn; training is bitwise the eager FSDP run's.
  const std::vector<std::string> scratch{"--model", "moe", "--steps", "3", "--batch", "8"};
  REQUIRE(all_ok(run(dir, "eager_scratch2", 2, scratch)));
  REQUIRE(all_ok(run(dir, "lazy_scratch2", 2, with(scratch, {"--defer-init", "--init-shards"}))));
  CHECK(read_params(dir.file("lazy_scratch2") + ".params") == read_params(dir.file("eager_scratch2") + ".params"));
  REQUIRE(all_ok(run(dir, "eager_scratch4", 4, with(scratch, {"--ep", "4"}))));
  REQUIRE(all_ok(run(dir, "lazy_scratch4", 4, with(scratch, {"--ep", "4", "--defer-init", "--init-shards"}))));
  CHECK(read_params(dir.file("lazy_scratch4") + ".params") == read_params(dir.file("eager_scratch4") + ".params"));
  // Without load_parameters the FSDP refuses to compute.
  const auto exits = run(dir, "unloaded", 2, {"--model", "moe", "--steps", "1", "--defer-init"});
  REQUIRE(exits.size() == 2);
  CHECK(exits[0].code == 3);
  CHECK(slurp(dir.file("unloaded") + ".rank0.err").find("never loaded") != std::string::npos);
}

TEST_CASE("Streaming import and construction need about 1/N of the model per rank (peak RSS, 18M parameters on 4 ranks)",
          "[fsdp]") {
  rhine::test::TempDir dir("fsdp_import_rss");
  REQUIRE(all_ok(run(dir, "export", 0, {"--wide", "--parallel", "none", "--export-hf", dir.file("hf")})));
  const std::vector<std::string> base{"--wide", "--steps", "0", "--batch", "4", "--import", dir.file("hf")};
  REQUIRE(all_ok(run(dir, "eager", 4, base)));
  REQUIRE(all_ok(run(dir, "meta", 4, with(base, {"--defer-init"}))));
  // Streaming construction from scratch: no import, each rank draws its rows.
  REQUIRE(all_ok(run(dir, "scratch", 4, {"--wide", "--steps", "0", "--batch", "4", "--defer-init", "--init-shards"})));
  for (int r = 0; r < 4; ++r) {
    const auto s = report(dir, "scratch", r);
    const auto model = static_cast<double>(s["model_bytes"].get<std::int64_t>());
    const auto grown = static_cast<double>(s["import_peak_rss_growth_bytes"].get<std::int64_t>());
    // The largest parameter (the 33.5 MB embedding, nearly half of this
    // narrow model) is bounded by the largest unit (the root: embedding + norm).
    const auto largest = 4.0 * static_cast<double>(s["memory"]["largest_unit_elements"].get<std::int64_t>());
    INFO("rank " << r << ": from scratch, peak RSS growth while building " << grown / 1e6 << " MB of a "
                 << model / 1e6 << " MB model whose largest unit is " << largest / 1e6 << " MB");
    CHECK(grown < model / 4 + largest + 0.15 * model);  // this rank's shards and one whole parameter at a time
    const auto eager = report(dir, "eager", r)["import_peak_rss_growth_bytes"].get<std::int64_t>();
    CHECK(grown < 0.85 * static_cast<double>(eager));
  }
  for (int r = 0; r < 4; ++r) {
    const auto e = report(dir, "eager", r), m = report(dir, "meta", r);
    const auto model = static_cast<double>(m["model_bytes"].get<std::int64_t>());
    const auto eager = static_cast<double>(e["import_peak_rss_growth_bytes"].get<std::int64_t>());
    const auto meta = static_cast<double>(m["import_peak_rss_growth_bytes"].get<std::int64_t>());
    INFO("rank " << r << ": model " << model / 1e6 << " MB; peak RSS growth while building and importing: eager "
                 << eager / 1e6 << " MB, meta " << meta / 1e6 << " MB");
    CHECK(eager > model);          // the whole model, built and initialised
    CHECK(meta < 0.75 * model);    // this rank's shards, its rows of the file pages, one tensor in flight
  }
}
