// Trainer: exact resume after kill -9, gradient accumulation, NaN handling,
// signals, per-language evaluation, the metrics plot.
#include "torch_test.h"  // first: LibTorch's glog macros vs Catch

#include <ATen/record_function.h>
#include <atomic>
#include <string_view>
#include <ATen/core/grad_mode.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "rhine/core/error.h"
#include "rhine/core/json.h"
#include "rhine/io/checkpoint.h"
#include "rhine/io/safetensors.h"
#include "rhine/torch/runtime.h"
#include "rhine/torch/sync.h"
#include "rhine/train/plot.h"
#include "rhine/train/run.h"
#include "test_util.h"
#include "tiny_config.h"
#include "trainer_fixture.h"

namespace fs = std::filesystem;
using rhine::train::Trainer;
using rhine::train::TrainerOptions;

namespace {

// Starts the worker binary with extra environment variables; returns its pid.
pid_t start_worker(const std::vector<std::string>& args, const std::map<std::string, std::string>& env = {}) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    for (const auto& [k, v] : env) ::setenv(k.c_str(), v.c_str(), 1);
    ::setenv("RHINE_DIST_STRICT_DEVICE", "1", 1);  // host scalars on the device group fail, as under NCCL
    std::vector<char*> argv{const_cast<char*>(RHINE_TRAINER_WORKER)};
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execv(RHINE_TRAINER_WORKER, argv.data());
    ::_exit(127);
  }
  return pid;
}

int wait_worker(pid_t pid) {
  int status = 0;
  ::waitpid(pid, &status, 0);
  return status;
}

// Runs the worker binary; returns its wait status.
int run_worker(const std::vector<std::string>& args) { return wait_worker(start_worker(args)); }
// step -> loss of the "step" records in metrics.jsonl.
std::map<std::int64_t, double> losses(const fs::path& metrics) {
  std::map<std::int64_t, double> out;
  std::ifstream in(metrics);
  std::string line;
  while (std::getline(in, line)) {
    auto j = rhine::Json::parse(line);
    if (j["type"] == "step") {
      REQUIRE_FALSE(out.count(j["step"].get<std::int64_t>()));  // no duplicates after resume
      out[j["step"].get<std::int64_t>()] = j["loss"].get<double>();
    }
  }
  return out;
}

TrainerOptions quiet_options(std::int64_t steps) {
  TrainerOptions o;
  o.max_steps = steps;
  o.progress = false;
  o.bf16 = false;
  o.log_every = 1;
  return o;
}

std::vector<at::Tensor> params_of(const rhine::nn::CausalLM& m) {
  std::vector<at::Tensor> out;
  for (const auto& p : m->parameters()) out.push_back(p.detach().clone());
  return out;
}

}  // namespace

TEST_CASE("trainer: kill -9 and resume gives bitwise the uninterrupted run", "[trainer][slow]") {
  rhine::test::TempDir tmp("trainer-resume");
  rhine::test::write_tiny_shards(tmp.path / "shards");
  const auto shards = (tmp.path / "shards").string();
  const auto a = tmp.path / "uninterrupted", b = tmp.path / "killed";
  REQUIRE(run_worker({shards, a.string(), "9"}) == 0);
  const int killed = run_worker({shards, b.string(), "9", "4"});
  REQUIRE(WIFSIGNALED(killed));
  REQUIRE(WTERMSIG(killed) == SIGKILL);
  {
    rhine::io::CheckpointManager m({(b / "checkpoints").string(), 2, 0, true});
    REQUIRE(m.latest());
    CHECK(m.latest()->step == 4);
  }
  REQUIRE(run_worker({shards, b.string(), "9"}) == 0);  // resumes from step 4

  const auto la = losses(a / "metrics.jsonl"), lb = losses(b / "metrics.jsonl");
  REQUIRE(la.size() == 9);
  REQUIRE(lb.size() == 9);
  for (const auto& [step, loss] : la) {
    INFO("step " << step);
    CHECK(lb.at(step) == loss);  // bitwise
  }
  const auto pa = rhine::load_safetensors((a / "final.safetensors").string());
  const auto pb = rhine::load_safetensors((b / "final.safetensors").string());
  REQUIRE(pa.size() == pb.size());
  for (const auto& [name, t] : pa) {
    INFO(name);
    CHECK(at::equal(t, pb.at(name)));
  }
  CHECK(la.rbegin()->second < la.begin()->second);  // it did learn something
  CHECK(fs::exists(b / "training.svg"));
}

TEST_CASE("trainer: two data-parallel ranks (Gloo) equal one process with the whole batch", "[trainer][slow]") {
  rhine::test::TempDir tmp("trainer-dp");
  rhine::test::write_tiny_shards(tmp.path / "shards");
  const auto shards = (tmp.path / "shards").string();
  const auto one = tmp.path / "one", two = tmp.path / "two";
  REQUIRE(run_worker({shards, one.string(), "6"}) == 0);
  const std::string port = std::to_string(rhine::test::free_port());
  std::vector<pid_t> ranks;
  for (int r = 0; r < 2; ++r)
    ranks.push_back(start_worker({shards, two.string(), "6"}, {{"RANK", std::to_string(r)},
                                                              {"WORLD_SIZE", "2"},
                                                              {"MASTER_ADDR", "127.0.0.1"},
                                                              {"MASTER_PORT", port}}));
  for (auto pid : ranks) CHECK(wait_worker(pid) == 0);
  const auto la = losses(one / "metrics.jsonl"), lb = losses(two / "metrics.jsonl");
  REQUIRE(la.size() == 6);
  REQUIRE(lb.size() == 6);
  for (const auto& [step, loss] : la) CHECK(lb.at(step) == Approx(loss).epsilon(1e-5));
  const auto pa = rhine::load_safetensors((one / "final.safetensors").string());
  const auto pb = rhine::load_safetensors((two / "final.safetensors").string());
  for (const auto& [name, t] : pa) {
    INFO(name);
    const double rel = (t - pb.at(name)).norm().item<double>() / (t.norm().item<double>() + 1e-12);
    CHECK(rel < 1e-5);
  }
  // Evaluation split over the two ranks (one host all-reduce) gives one process's numbers.
  const auto ea = rhine::read_json_file((one / "eval.json").string(), "test");
  const auto eb = rhine::read_json_file((two / "eval.json").string(), "test");
  REQUIRE(ea.size() == 2);
  for (const auto& lang : {"de", "nl"}) {
    INFO(lang);
    CHECK(eb.at(lang).at("tokens") == ea.at(lang).at("tokens"));
    CHECK(eb.at(lang).at("tokens").get<std::int64_t>() > 5);
    CHECK(eb.at(lang).at("loss").get<double>() == Approx(ea.at(lang).at("loss").get<double>()).epsilon(1e-5));
    CHECK(eb.at(lang).at("bpb").get<double>() == Approx(ea.at(lang).at("bpb").get<double>()).epsilon(1e-5));
  }
}

namespace {
// Runs the worker as two Gloo ranks (extra environment for both); true when both exit 0.
bool run_ranks(int n, const std::vector<std::string>& args, std::map<std::string, std::string> env = {}) {
  if (n == 1) return wait_worker(start_worker(args, env)) == 0;
  env["WORLD_SIZE"] = std::to_string(n);
  env["MASTER_ADDR"] = "127.0.0.1";
  env["MASTER_PORT"] = std::to_string(rhine::test::free_port());
  std::vector<pid_t> ranks;
  for (int r = 0; r < n; ++r) {
    env["RANK"] = std::to_string(r);
    ranks.push_back(start_worker(args, env));
  }
  bool ok = true;
  for (auto pid : ranks) ok = wait_worker(pid) == 0 && ok;
  return ok;
}
bool run_two_ranks(const std::vector<std::string>& args, std::map<std::string, std::string> env = {}) {
  return run_ranks(2, args, std::move(env));
}

/// Relative difference of two final.safetensors files, over all tensors.
double final_diff(const fs::path& a, const fs::path& b) {
  const auto pa = rhine::load_safetensors(a.string()), pb = rhine::load_safetensors(b.string());
  REQUIRE(pa.size() == pb.size());
  double num = 0, den = 0;
  for (const auto& [name, t] : pa) {
    INFO(name);
    REQUIRE(pb.count(name));
    num += (t.to(at::kDouble) - pb.at(name).to(at::kDouble)).pow(2).sum().item<double>();
    den += t.to(at::kDouble).pow(2).sum().item<double>();
  }
  return std::sqrt(num / den);
}
}  // namespace

TEST_CASE("trainer: kill -9 during a sharded FSDP save leaves the previous checkpoint, and the resume follows the run",
          "[trainer][slow]") {
  rhine::test::TempDir tmp("trainer-fsdp-kill");
  rhine::test::write_tiny_shards(tmp.path / "shards");
  const auto shards = (tmp.path / "shards").string();
  const auto whole = tmp.path / "whole", killed = tmp.path / "killed";
  REQUIRE(run_ranks(2, {shards, whole.string(), "5"}, {{"RHINE_TEST_FSDP", "3"}}));
  // Rank 0 dies inside the save of step 3 (every shard file written, not committed).
  CHECK_FALSE(run_ranks(2, {shards, killed.string(), "5"}, {{"RHINE_TEST_FSDP", "3"}, {"RHINE_TEST_KILL_IN_SAVE", "3"}}));
  rhine::io::CheckpointManager m({(killed / "checkpoints").string()});
  REQUIRE(m.latest().has_value());
  CHECK(m.latest()->step == 2);
  REQUIRE(run_ranks(2, {shards, killed.string(), "5"}, {{"RHINE_TEST_FSDP", "3"}}));
  const auto a = losses(whole / "metrics.jsonl"), b = losses(killed / "metrics.jsonl");
  REQUIRE(b.size() == 5);
  for (const auto& [step, loss] : a) CHECK(b.at(step) == loss);  // same layout: bitwise
  CHECK(final_diff(killed / "final.safetensors", whole / "final.safetensors") == 0.0);
}

TEST_CASE("trainer: FSDP checkpoints reshard (4 ranks -> 2 -> 1 process, data parallel -> FSDP)",
          "[trainer][slow]") {
  // Reference: plain data parallel on 2 ranks to step 6, then on to step 8.
  // Every other run resumes across a change of layout and must follow it
  // (tolerance: float summation order of 1, 2 or 4 rows per rank).
  rhine::test::TempDir tmp("trainer-fsdp");
  rhine::test::write_tiny_shards(tmp.path / "shards");
  const auto shards = (tmp.path / "shards").string();
  const auto plain = tmp.path / "plain", fsdp = tmp.path / "fsdp", dp2fsdp = tmp.path / "dp2fsdp";
  REQUIRE(run_ranks(2, {shards, plain.string(), "6"}));
  fs::copy(plain / "final.safetensors", tmp.path / "plain6.safetensors");
  fs::copy(plain, dp2fsdp, fs::copy_options::recursive);
  REQUIRE(run_ranks(2, {shards, plain.string(), "8"}));
  const auto ref = losses(plain / "metrics.jsonl");
  REQUIRE(ref.size() == 8);
  auto expect_losses = [&](const fs::path& run, std::int64_t first, std::int64_t last) {
    const auto l = losses(run / "metrics.jsonl");
    for (std::int64_t step = first; step <= last; ++step) {
      INFO(run.filename().string() << " step " << step);
      REQUIRE(l.count(step));
      CHECK(l.at(step) == Approx(ref.at(step)).epsilon(1e-5));
    }
  };
  // FSDP on 4 ranks to step 3, resumed by FSDP on 2 ranks to step 6.
  REQUIRE(run_ranks(4, {shards, fsdp.string(), "3"}, {{"RHINE_TEST_FSDP", "3"}}));
  const auto ck3 = fsdp / "checkpoints" / rhine::io::CheckpointManager::dir_name(3);
  CHECK(fs::exists(ck3 / "shards.json"));
  CHECK(fs::exists(ck3 / "shard-00003-of-00004.safetensors"));
  CHECK_FALSE(fs::exists(ck3 / "model.safetensors"));  // nothing gathered on one rank
  REQUIRE(run_ranks(2, {shards, fsdp.string(), "6"}, {{"RHINE_TEST_FSDP", "3"}}));
  expect_losses(fsdp, 1, 6);
  CHECK(final_diff(fsdp / "final.safetensors", tmp.path / "plain6.safetensors") < 1e-5);
  // ... and by one process without sharding to step 8.
  REQUIRE(run_ranks(1, {shards, fsdp.string(), "8"}));
  expect_losses(fsdp, 7, 8);
  CHECK(final_diff(fsdp / "final.safetensors", plain / "final.safetensors") < 1e-5);
  // A data-parallel checkpoint (step 6) resumed by ZeRO-2 FSDP on 4 ranks.
  REQUIRE(run_ranks(4, {shards, dp2fsdp.string(), "8"}, {{"RHINE_TEST_FSDP", "2"}}));
  expect_losses(dp2fsdp, 7, 8);
  CHECK(final_diff(dp2fsdp / "final.safetensors", plain / "final.safetensors") < 1e-5);
}

TEST_CASE("trainer: ZeRO-1 (sharded optimizer state) equals plain data parallel, across a stop and resume",
          "[trainer][slow]") {
  rhine::test::TempDir tmp("trainer-zero1");
  rhine::test::write_tiny_shards(tmp.path / "shards");
  const auto shards = (tmp.path / "shards").string();
  const auto plain = tmp.path / "plain", zero = tmp.path / "zero";
  REQUIRE(run_two_ranks({shards, plain.string(), "6"}));
  // ZeRO-1: stop after 3 steps (final checkpoint with the shards collected), resume to 6.
  REQUIRE(run_two_ranks({shards, zero.string(), "3"}, {{"RHINE_TEST_ZERO1", "1"}}));
  const auto ckpt3 = zero / "checkpoints" / rhine::io::CheckpointManager::dir_name(3);
  {  // one optimizer file with every parameter's slots, under the unsharded names
    const auto z = rhine::load_safetensors((ckpt3 / "optimizer.safetensors").string());
    const auto p = rhine::load_safetensors(
        (plain / "checkpoints" / rhine::io::CheckpointManager::dir_name(6) / "optimizer.safetensors").string());
    std::set<std::string> zn, pn;
    for (const auto& [k, v] : z) zn.insert(k);
    for (const auto& [k, v] : p) pn.insert(k);
    CHECK(zn == pn);
    const auto meta = rhine::read_json_file((ckpt3 / "trainer.json").string(), "test");
    CHECK(meta["optimizer"]["zero1_shards"].size() == 2);
  }
  REQUIRE(run_two_ranks({shards, zero.string(), "6"}, {{"RHINE_TEST_ZERO1", "1"}}));
  const auto la = losses(plain / "metrics.jsonl"), lb = losses(zero / "metrics.jsonl");
  REQUIRE(la.size() == 6);
  REQUIRE(lb.size() == 6);
  for (const auto& [step, loss] : la) {
    INFO("step " << step);
    CHECK(lb.at(step) == Approx(loss).epsilon(1e-6));
  }
  const auto pa = rhine::load_safetensors((plain / "final.safetensors").string());
  const auto pb = rhine::load_safetensors((zero / "final.safetensors").string());
  REQUIRE(pa.size() == pb.size());
  for (const auto& [name, t] : pa) {
    INFO(name);
    const double rel = (t - pb.at(name)).norm().item<double>() / (t.norm().item<double>() + 1e-12);
    CHECK(rel < 1e-6);
  }
  // A sharded checkpoint cannot be resumed without sharding (clear error, exit 1).
  CHECK_FALSE(run_two_ranks({shards, zero.string(), "8"}));
}

TEST_CASE("trainer: accumulating 2 micro-batches equals one doubled batch", "[trainer]") {
  rhine::set_threads(1);
  rhine::test::TempDir tmp("trainer-accum");
  rhine::test::write_tiny_shards(tmp.path);
  rhine::test::TinyRun small(tmp.path, 4), big(tmp.path, 8);
  auto o = quiet_options(5);
  o.grad_accum = 2;
  Trainer t1(small.model, *small.optimizer, small.schedule, *small.loader, o);
  o.grad_accum = 1;
  Trainer t2(big.model, *big.optimizer, big.schedule, *big.loader, o);
  std::vector<double> l1, l2;
  t1.callbacks().on_step = [&](const rhine::train::StepMetrics& m) { l1.push_back(m.loss); };
  t2.callbacks().on_step = [&](const rhine::train::StepMetrics& m) { l2.push_back(m.loss); };
  const auto r1 = t1.fit();
  t2.fit();
  REQUIRE(l1.size() == 5);
  for (std::size_t i = 0; i < l1.size(); ++i) CHECK(l1[i] == Approx(l2[i]).epsilon(1e-5));
  const auto p1 = params_of(small.model), p2 = params_of(big.model);
  for (std::size_t i = 0; i < p1.size(); ++i) {
    const double rel = (p1[i] - p2[i]).norm().item<double>() / p2[i].norm().item<double>();
    CHECK(rel < 1e-5);
  }
  CHECK(r1.tokens == 5 * 8 * 16);
  std::int64_t per_lang = 0;
  for (const auto& [l, n] : r1.tokens_per_language) per_lang += n;
  CHECK(per_lang == r1.tokens);
}

TEST_CASE("trainer: bf16 weights cast once per step, or written by AdamW, give the steps of casting per micro-batch", "[trainer]") {
  rhine::set_threads(1);
  rhine::test::TempDir tmp("trainer-cast-once");
  rhine::test::write_tiny_shards(tmp.path);
  // Count the dtype copies (autocast's weight casts among them) of a whole fit().
  static std::atomic<int> copies{0};
  auto count_copies = [](Trainer& t) {
    copies = 0;
    const auto handle = at::addThreadLocalCallback(
        at::RecordFunctionCallback([](const at::RecordFunction& fn) -> std::unique_ptr<at::ObserverContext> {
          if (std::string_view(fn.name()) == "aten::_to_copy") ++copies;
          return nullptr;
        }).scopes({at::RecordScope::FUNCTION}));
    t.fit();
    at::removeCallback(handle);
    return copies.load();
  };
  // With activation checkpointing too: its graph-less forward must not leave
  // weight copies without grad_fn for the recomputation to take.
  for (const bool checkpointing : {false, true}) {
    INFO("activation checkpointing " << checkpointing);
    // written: AdamW writes the bf16 copies in its update (the default);
    // once: the forward casts once per step; each: once per micro-batch.
    rhine::test::TinyRun written(tmp.path, 4), once(tmp.path, 4), each(tmp.path, 4);
    for (auto* r : {&written, &once, &each}) r->model->options.activation_checkpointing = checkpointing;
    auto o = quiet_options(3);
    o.grad_accum = 3;
    o.bf16 = true;
    o.bf16_emulated = true;
    o.cast_once_per_step = true;
    Trainer t0(written.model, *written.optimizer, written.schedule, *written.loader, o);
    o.optimizer_writes_copies = false;
    Trainer t1(once.model, *once.optimizer, once.schedule, *once.loader, o);
    o.cast_once_per_step = false;
    Trainer t2(each.model, *each.optimizer, each.schedule, *each.loader, o);
    REQUIRE(t1.options().bf16);
    std::vector<double> l0, l1, l2;
    t0.callbacks().on_step = [&](const rhine::train::StepMetrics& m) { l0.push_back(m.loss); };
    t1.callbacks().on_step = [&](const rhine::train::StepMetrics& m) { l1.push_back(m.loss); };
    t2.callbacks().on_step = [&](const rhine::train::StepMetrics& m) { l2.push_back(m.loss); };
    const int n_written = count_copies(t0), n_once = count_copies(t1), n_each = count_copies(t2);
    INFO(n_written << " copies with the optimizer's copies, " << n_once << " with the cast once per step, "
                   << n_each << " with a cast per micro-batch");
    CHECK(n_each > n_once);  // the weight casts of 2 of the 3 micro-batches per step are gone
    CHECK(n_once > n_written);  // and after the first step no weight is cast in the forward
    auto* adamw = dynamic_cast<rhine::AdamW*>(written.optimizer.get());
    REQUIRE(adamw != nullptr);
    // Copies of the weights the layers asked for (the projections and the
    // head), none of the norms'.
    CHECK(adamw->weight_copies().size() > 0);
    CHECK(adamw->weight_copies().size() < params_of(written.model).size());
    REQUIRE(l1.size() == 3);
    CHECK(l0 == l1);  // the same bf16 values, only made elsewhere or fewer times: bitwise
    CHECK(l1 == l2);
    const auto p0 = params_of(written.model), p1 = params_of(once.model), p2 = params_of(each.model);
    for (std::size_t i = 0; i < p1.size(); ++i) {
      CHECK(at::equal(p0[i], p1[i]));
      CHECK(at::equal(p1[i], p2[i]));
    }
    CHECK(l1[2] < l1[0]);
  }
}

TEST_CASE("trainer: a step reads the device once (losses, norm and expert counts in one host read)", "[trainer]") {
  // Counted through rhine::to_host, which all library code uses (a CPU run
  // counts what a GPU run would wait for). MoE layers still read their split
  // sizes, one read per MoE layer per micro-batch.
  rhine::test::TempDir tmp("trainer-syncs");
  rhine::test::write_tiny_shards(tmp.path);
  for (const char* type : {"llama", "deepseek_v3"}) {
    for (int accum : {1, 3}) {
      INFO(type << " grad_accum " << accum);
      rhine::test::TinyRun run(tmp.path, 4);
      std::uint64_t moe_layers = 0;
      if (std::string(type) != "llama") {
        auto cfg = rhine::test::tiny_config(type);
        cfg.vocab_size = rhine::test::kVocab;
        run.model = rhine::nn::CausalLM(cfg);
        rhine::NamedParameters params;
        for (const auto& p : run.model->named_parameters()) params.push_back({p.key(), p.value()});
        run.optimizer = std::make_unique<rhine::AdamW>(params, rhine::test::tiny_adamw_options());
        moe_layers = run.model->moe_layers().size();  // layer 1 and the MTP layer (mtp_lambda 0.3)
        REQUIRE(moe_layers == 2);
      }
      auto o = quiet_options(3);
      o.grad_accum = accum;
      o.z_loss = 1e-4;
      o.grad_clip = 1.0;
      o.router_bias_update_rate = 1e-3;
      Trainer t(run.model, *run.optimizer, run.schedule, *run.loader, o);
      std::vector<std::uint64_t> per_step;
      std::uint64_t start = 0;
      int batches = 0;
      t.callbacks().on_batch = [&](const rhine::Batch&) {
        if (batches++ % accum == 0) start = rhine::host_sync_count();
      };
      t.callbacks().on_step = [&](const rhine::train::StepMetrics& m) {
        per_step.push_back(rhine::host_sync_count() - start);
        CHECK(std::isfinite(m.loss));
        CHECK(m.grad_norm > 0);
      };
      t.fit();
      REQUIRE(per_step.size() == 3);
      for (const auto n : per_step) CHECK(n == 1 + moe_layers * static_cast<std::uint64_t>(accum));
    }
  }
  SECTION("a dense forward with labels reads nothing") {
    rhine::nn::CausalLM lm(rhine::test::tiny_config("llama"));
    rhine::nn::ForwardOptions fo;
    const at::Tensor ids = at::randint(0, 32, {2, 8}, at::kLong);
    fo.labels = ids.roll(-1, 1);
    fo.z_loss = 1e-4;
    fo.document_mask = true;
    fo.position_ids = at::arange(8, at::kLong).repeat({2, 1});
    const auto before = rhine::host_sync_count();
    auto out = lm->forward(ids, fo);
    out.loss.backward();
    CHECK(rhine::host_sync_count() == before);
  }
}

TEST_CASE("trainer: \"profile\" writes a Chrome trace of exactly the asked steps with Rhine's ranges", "[trainer]") {
  rhine::test::TempDir tmp("trainer-profile");
  rhine::test::write_tiny_shards(tmp.path / "shards");
  rhine::test::TinyRun run(tmp.path / "shards", 4);
  auto o = quiet_options(4);
  o.out_dir = (tmp.path / "run").string();
  o.profile = rhine::ProfileOptions::from_json(rhine::Json::parse(R"({"start": 2, "steps": 2})"), "test");
  Trainer t(run.model, *run.optimizer, run.schedule, *run.loader, o);
  t.fit();
  const auto path = tmp.path / "run" / "profile" / "trace.rank0.json";
  REQUIRE(std::filesystem::exists(path));
  std::ifstream in(path);
  const auto trace = rhine::Json::parse(in);
  std::map<std::string, int> names;
  // Kineto writes {"traceEvents": [...]}, the legacy profiler the bare array (both Chrome trace formats).
  for (const auto& e : trace.is_array() ? trace : trace.at("traceEvents"))
    if (e.contains("name") && e.value("ph", std::string()) != "M") ++names[e.at("name").get<std::string>()];
  INFO(rhine::Json(names).dump());
  CHECK(names["rhine::step"] == 2);  // steps 2 and 3, not 1 or 4
  CHECK(names["rhine::optimizer"] == 2);
  for (const char* range : {"rhine::forward", "rhine::backward", "rhine::grad_sync", "rhine::clip", "rhine::host_read",
                            "rhine::embed", "rhine::block.0", "rhine::block.1", "rhine::lm_head", "rhine::loss"})
    CHECK(names[range] == 2);
  CHECK(names["aten::mm"] + names["aten::addmm"] + names["aten::matmul"] > 0);  // LibTorch's own ops
  CHECK_THROWS_WITH(rhine::ProfileOptions::from_json(rhine::Json::parse(R"({"start": 0, "steps": 2})"), "run profile"),
                    Catch::Contains("[run profile] profile needs start >= 1 and steps >= 1"));
  CHECK_THROWS_WITH(rhine::ProfileOptions::from_json(rhine::Json::parse(R"({"step": 3})"), "run profile"),
                    Catch::Contains("[run profile]"));
  o.out_dir.clear();
  CHECK_THROWS_WITH(o.validate(), Catch::Contains("[trainer] profile needs out_dir"));
}

TEST_CASE("trainer: a NaN batch is skipped and counted, repeated NaNs stop with an intact checkpoint",
          "[trainer]") {
  rhine::test::TempDir tmp("trainer-nan");
  rhine::test::write_tiny_shards(tmp.path / "shards");
  // Token kVocab never occurs in the data; its embedding row is NaN, so a
  // batch that contains it has a NaN loss and NaN gradients.
  rhine::test::TinyRun run(tmp.path / "shards", 4, 3, rhine::test::kVocab + 1);
  {
    at::NoGradGuard g;
    run.model->model->embed_tokens->weight[rhine::test::kVocab].fill_(std::nan(""));
  }
  auto o = quiet_options(12);
  o.out_dir = (tmp.path / "run").string();
  o.checkpoint_every = 2;
  o.max_consecutive_skips = 3;
  Trainer t(run.model, *run.optimizer, run.schedule, *run.loader, o);
  std::set<std::int64_t> poison = {3};  // trainer.step() when the batch is drawn
  t.callbacks().on_batch = [&](rhine::Batch& b) {
    if (poison.count(t.step())) b.input_ids[0][5] = rhine::test::kVocab;
  };
  auto before = params_of(run.model);
  std::int64_t skipped_at = -1;
  t.callbacks().on_step = [&](const rhine::train::StepMetrics& m) {
    if (m.skipped) {
      skipped_at = m.step;
      // A skipped step changes nothing.
      const auto now = params_of(run.model);
      for (std::size_t i = 0; i < now.size(); ++i) CHECK(at::allclose(now[i], before[i], 0, 0, /*equal_nan=*/true));
    }
    before = params_of(run.model);
  };
  auto r = t.fit();
  CHECK(r.step == 12);
  CHECK(r.skipped_steps == 1);
  CHECK(skipped_at == 4);
  for (const auto& p : run.model->named_parameters())
    if (p.key() != "model.embed_tokens.weight") CHECK(at::isfinite(p.value()).all().item<bool>());

  // Now NaN batches from step 14 on: stop after 3 skipped steps, last good checkpoint intact.
  auto o2 = o;
  o2.max_steps = 30;
  Trainer t2(run.model, *run.optimizer, run.schedule, *run.loader, o2);
  t2.callbacks().on_batch = [&](rhine::Batch& b) {
    if (t2.step() >= 13) b.input_ids[0][5] = rhine::test::kVocab;
  };
  CHECK_THROWS_WITH(t2.fit(), Catch::Contains("[trainer] 3 consecutive steps with a non-finite loss or gradient") &&
                                  Catch::Contains("the last checkpoint (step 14) is intact"));
  rhine::io::CheckpointManager m({(tmp.path / "run" / "checkpoints").string(), 3, 0, true});
  REQUIRE(m.latest());
  CHECK(m.latest()->step == 14);
  const auto state = rhine::load_safetensors((m.latest()->path / "model.safetensors").string());
  for (const auto& [name, tensor] : state)
    if (name != "model.embed_tokens.weight") CHECK(at::isfinite(tensor).all().item<bool>());
}

TEST_CASE("trainer: SIGINT checkpoints and returns, the next fit() resumes", "[trainer]") {
  rhine::test::TempDir tmp("trainer-signal");
  rhine::test::write_tiny_shards(tmp.path / "shards");
  rhine::test::TinyRun run(tmp.path / "shards", 4);
  auto o = quiet_options(8);
  o.out_dir = (tmp.path / "run").string();
  std::int64_t raised = 0;
  {
    Trainer t(run.model, *run.optimizer, run.schedule, *run.loader, o);
    t.callbacks().on_step = [&](const rhine::train::StepMetrics& m) {
      if (m.step == 3) ::raise(SIGINT), ++raised;
    };
    const auto r = t.fit();
    CHECK(r.interrupted);
    CHECK(r.step == 3);
    CHECK(r.resumed_from == -1);
  }
  CHECK(raised == 1);
  rhine::test::TinyRun again(tmp.path / "shards", 4);
  Trainer t(again.model, *again.optimizer, again.schedule, *again.loader, o);
  const auto r = t.fit();
  CHECK(r.resumed_from == 3);
  CHECK(r.step == 8);
  CHECK_FALSE(r.interrupted);
  CHECK(losses(tmp.path / "run" / "metrics.jsonl").size() == 8);

  // A checkpoint of another model config is refused.
  rhine::test::TinyRun other(tmp.path / "shards", 4, 3, rhine::test::kVocab + 1);
  Trainer t3(other.model, *other.optimizer, other.schedule, *other.loader, o);
  CHECK_THROWS_WITH(t3.fit(), Catch::Contains("written for another model config"));
}

TEST_CASE("trainer: per-language evaluation is the direct cross-entropy in bits per byte", "[trainer]") {
  rhine::test::TempDir tmp("trainer-eval");
  rhine::test::write_tiny_shards(tmp.path);
  rhine::test::TinyRun run(tmp.path, 4);  // the loader is not used
  rhine::train::HeldoutSet h;
  h.seq_len = 64;
  h.languages["de"].docs = {{1, 5, 9, 2, 7, 7, 3}, {4, 4, 8}};
  h.languages["de"].bytes = 23;
  h.languages["nl"].docs = {{10, 11, 12, 13, 14}};
  h.languages["nl"].bytes = 9;
  const auto r = rhine::train::evaluate(run.model, h, false);
  REQUIRE(r.languages.size() == 2);
  for (const auto& [lang, l] : h.languages) {
    double nats = 0;
    std::int64_t n = 0;
    for (const auto& doc : l.docs) {
      auto ids = at::tensor(doc).view({1, -1});
      auto logits = run.model->forward(ids.slice(1, 0, ids.size(1) - 1)).logits.to(at::kDouble);
      auto logp = at::log_softmax(logits[0], -1);
      for (std::int64_t t = 0; t + 1 < ids.size(1); ++t, ++n) nats -= logp[t][doc[t + 1]].item<double>();
    }
    const auto& e = r.languages.at(lang);
    CHECK(e.tokens == n);
    CHECK(e.loss == Approx(nats / n).epsilon(1e-5));
    CHECK(e.bits_per_byte == Approx(nats / std::log(2.0) / l.bytes).epsilon(1e-5));
  }
  // Chunking: with seq_len 2 every token after the first is still predicted once.
  h.seq_len = 2;
  const auto chunked = rhine::train::evaluate(run.model, h, false);
  CHECK(chunked.languages.at("de").tokens == 6 + 2);
  CHECK(chunked.languages.at("nl").tokens == 4);
  CHECK(run.model->is_training());
}

TEST_CASE("evaluation: batched windows give the numbers of one window per pass (dense and MoE, SFT targets)",
          "[trainer]") {
  // float64 so that batching changes nothing but summation order.
  for (const char* type : {"llama", "deepseek_v3"}) {
    INFO(type);
    at::manual_seed(5);
    auto cfg = rhine::test::tiny_config(type);
    rhine::nn::CausalLM lm(cfg);
    lm->to(at::kDouble);
    rhine::train::HeldoutSet h;
    h.seq_len = 4;
    for (int d = 0; d < 9; ++d) {  // lengths 2..18: full windows of 4 and last windows of 1..4
      std::vector<std::int64_t> doc;
      for (int t = 0; t < 2 + 2 * d; ++t) doc.push_back((5 * d + 3 * t + 1) % cfg.vocab_size);
      auto& l = h.languages[d % 3 ? "fr" : "en"];
      l.docs.push_back(doc);
      l.bytes += 3 * doc.size();
      if (d % 3) {  // fr: SFT-style targets (every third token not scored)
        std::vector<std::uint8_t> t(doc.size(), 1);
        for (std::size_t i = 0; i < t.size(); i += 3) t[i] = 0;
        l.targets.push_back(t);
      }
    }
    rhine::train::EvalOptions one, batched;
    one.batch_size = 1;
    batched.batch_size = 8;
    const auto a = rhine::train::evaluate(lm, h, one), b = rhine::train::evaluate(lm, h, batched);
    for (const auto& [lang, e] : a.languages) {
      INFO(lang);
      const auto& f = b.languages.at(lang);
      CHECK(f.tokens == e.tokens);
      CHECK(f.loss == Approx(e.loss).epsilon(1e-12));
      CHECK(f.bits_per_byte == Approx(e.bits_per_byte).epsilon(1e-12));
      CHECK(f.expert_counts.defined() == (cfg.n_routed_experts > 0));
      if (f.expert_counts.defined()) CHECK(at::equal(f.expert_counts, e.expert_counts));
    }
    // ForwardOptions' default runs no MTP head: `loss` stays the next-token loss.
    const auto ids = at::tensor(h.languages.at("en").docs.back()).view({1, -1});
    rhine::nn::ForwardOptions fo;
    fo.labels = ids;
    const auto out = lm->forward(ids, fo);
    CHECK_FALSE(out.mtp_loss.defined());
    CHECK(out.loss.item<double>() == Approx(out.stats.ce_loss.item<double>()).epsilon(1e-6));
  }
}

TEST_CASE("trainer: bad options are clear errors", "[trainer]") {
  TrainerOptions o;
  o.max_steps = 0;
  CHECK_THROWS_WITH(o.validate(), Catch::Contains("[trainer] max_steps must be positive"));
  o.max_steps = 1;
  o.grad_accum = 0;
  CHECK_THROWS_WITH(o.validate(), Catch::Contains("grad_accum"));
  o.grad_accum = 1;
  o.grad_clip = -1;
  CHECK_THROWS_WITH(o.validate(), Catch::Contains("grad_clip"));
}

TEST_CASE("trainer: bf16 autocast only where the CPU computes bf16, unless bf16_emulated", "[trainer]") {
  rhine::test::TempDir tmp("trainer-bf16");
  rhine::test::write_tiny_shards(tmp.path);
  rhine::test::TinyRun run(tmp.path, 4);
  auto o = quiet_options(1);
  o.bf16 = true;
  const bool native = rhine::native_bf16(c10::Device(c10::DeviceType::CPU));
  CHECK(Trainer(run.model, *run.optimizer, run.schedule, *run.loader, o).options().bf16 == native);
  o.bf16_emulated = true;
  CHECK(Trainer(run.model, *run.optimizer, run.schedule, *run.loader, o).options().bf16);
  o.bf16 = false;
  CHECK_FALSE(Trainer(run.model, *run.optimizer, run.schedule, *run.loader, o).options().bf16);

  // The run config: true, false or "always"; anything else is a clear error.
  auto parse = [](const std::string& text) {
    const auto j = rhine::Json::parse(text);
    rhine::JsonFields f(j, "run");
    rhine::train::RunOptions r;
    r.read(f, "run");
    return r.trainer_options();
  };
  CHECK(parse(R"({"bf16": true})").bf16);
  CHECK_FALSE(parse(R"({"bf16": true})").bf16_emulated);
  CHECK(parse(R"({"bf16": "always"})").bf16_emulated);
  CHECK_FALSE(parse(R"({"bf16": false})").bf16);
  CHECK_THROWS_WITH(parse(R"({"bf16": "yes"})"), Catch::Contains("\"bf16\" must be true, false or \"always\""));
}

TEST_CASE("plot: metrics.jsonl becomes an SVG with a line per series", "[trainer]") {
  rhine::test::TempDir tmp("trainer-plot");
  {
    std::ofstream f(tmp.file("metrics.jsonl"));
    for (int s = 1; s <= 20; ++s) f << rhine::Json{{"type", "step"}, {"step", s}, {"loss", 5.0 - 0.1 * s}}.dump() << "\n";
    f << R"({"type":"step","step":21,"loss":null})" << "\n";  // a skipped NaN step
    f << "{\"type\": \"st" << "\n";                              // a line torn by a crash
    for (int s : {0, 10, 20})
      f << rhine::Json{{"type", "eval"}, {"step", s},
                       {"languages", {{"de", {{"bpb", 3.0 - 0.05 * s}}}, {"<fr&>", {{"bpb", 3.1 - 0.05 * s}}}}}}
                  .dump()
        << "\n";
  }
  CHECK(rhine::train::plot_metrics(tmp.file("metrics.jsonl"), tmp.file("plot.svg")) == 20);
  std::ifstream in(tmp.file("plot.svg"));
  std::stringstream ss;
  ss << in.rdbuf();
  const auto svg = ss.str();
  auto count = [&](const std::string& what) {
    std::size_t n = 0;
    for (auto p = svg.find(what); p != std::string::npos; p = svg.find(what, p + 1)) ++n;
    return n;
  };
  CHECK(svg.rfind("<?xml", 0) == 0);
  CHECK(svg.find("</svg>") != std::string::npos);
  CHECK(count("<polyline") == 4);  // loss, moving average, de, fr
  CHECK(svg.find("&lt;fr&amp;&gt;") != std::string::npos);
  CHECK(svg.find("<fr&>") == std::string::npos);
  CHECK(count("<svg") == 1);

  CHECK(rhine::train::nice_ticks(0, 1, 6) == std::vector<double>{0, 0.2, 0.4, 0.6000000000000001, 0.8, 1});
  const auto t = rhine::train::nice_ticks(2.31, 3.57, 5);
  CHECK(t.front() <= 2.31);
  CHECK(t.back() >= 3.57);
  CHECK_THROWS_WITH(rhine::train::plot_metrics(tmp.file("missing.jsonl"), tmp.file("x.svg")),
                    Catch::Contains("[plot] cannot open metrics file"));
}
