// rhine-plan's memory model against Rhine's own training: for several layouts
// (data parallel, ZeRO-1, FSDP ZeRO-2 and ZeRO-3, with and without activation
// checkpointing, on 1, 2 and 4 ranks) the program trains the model
// bench_dist's layout sweep uses (a Llama of hidden 512, 8 layers, vocab 8192:
// 33.6M parameters; fp32, AdamW, global batch 8 x 128 tokens, one thread per
// rank, Gloo on 127.0.0.1) for a few steps, reads each rank's peak RSS, and
// prints it beside what rhine::plan::plan predicts for the same layout on the
// "cpu" device kind. It starts its own ranks (it re-executes itself), so it
// runs as is:
//
//   build/bench/bench_plan [--steps 3] [--hidden 512] [--layers 8] [--vocab 8192]
//                          [--batch 8] [--seq 128] [--only NAME] [--malloc default|fixed|both]
//
// Every layout runs with glibc's default allocator and (--malloc both, the
// default) again with MALLOC_MMAP_THRESHOLD_=131072: by default glibc raises
// its mmap threshold to the largest block freed so far (up to 32 MiB), after
// which freed weights and activations stay in the heap; the fixed threshold
// hands large blocks back, so the peak follows what is alive (docs/benchmarks.md, "The planner against measured peak memory (`bench_plan`)").
//
// Lines (JSON, bench.h): "plan_memory" with params {layout, procs, zero,
// checkpointing, ...}, "measured_peak_mb" (the largest VmHWM over ranks),
// "predicted_peak_mb" (rhine::plan's per-rank peak, baseline included),
// "ratio" (predicted / measured), "within_15pct", the prediction's parts
// ("predicted_mb": parameters, gradients, optimizer, activations,
// communication buffers, baseline) and "baseline_measured_mb" (this run's
// VmRSS of a rank after LibTorch and the process group started, before the
// model: what the "cpu" kind's measured baseline constant stands for).
// Last lines "plan_memory_summary", one per allocator mode, count the layouts
// within 15%.
#include <ATen/ops/randint.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "bench.h"
#include "bench_dist_common.h"
#include "rhine/dist/fsdp.h"
#include "rhine/dist/grad_sync.h"
#include "rhine/dist/sharded_optimizer.h"
#include "rhine/dist/world.h"
#include "rhine/nn/model.h"
#include "rhine/optim/adamw.h"
#include "rhine/plan/plan.h"
#include "rhine/torch/runtime.h"

namespace {

struct Opts {
  int steps = 3, batch = 8, seq = 128, hidden = 512, layers = 8, vocab = 8192;
  // worker only
  int rank = -1, procs = 1, port = 0, zero = 0;
  bool ckpt = false;
  std::string out, only, malloc = "both";
};

struct LayoutRun {
  std::string name;
  int procs, zero;
  bool ckpt;
};

// The layouts compared (name, ranks, zero stage, activation checkpointing).
const std::vector<LayoutRun> kLayouts = {
    {"dp", 1, 0, false},         {"dp", 2, 0, false},         {"dp", 4, 0, false},
    {"zero1", 2, 1, false},      {"zero1", 4, 1, false},      {"zero2", 2, 2, false},
    {"zero2", 4, 2, false},      {"zero3", 2, 3, false},      {"zero3", 4, 3, false},
    {"dp_ckpt", 2, 0, true},     {"zero3_ckpt", 4, 3, true},
};

rhine::nn::ModelConfig bench_config(const Opts& o) {
  return rhine::bench::llama_bench_config(o.hidden, o.layers, o.vocab, o.seq);
}

/// VmRSS or VmHWM of this process in MiB (/proc/self/status).
double status_mb(const std::string& key) {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind(key + ":", 0) == 0) return std::stod(line.substr(key.size() + 1)) / 1024.0;
  return 0.0;
}

int worker(const Opts& o) {
  rhine::set_threads(1);
  rhine::dist::World world = rhine::bench::local_world(o.rank, o.procs, o.port);
  world.barrier();
  const double baseline = status_mb("VmRSS");

  const auto c = bench_config(o);
  rhine::nn::CausalLMOptions mo;
  mo.init_seed = 1;
  mo.activation_checkpointing = o.ckpt;
  rhine::nn::CausalLM lm(c, mo);
  lm->train();
  rhine::NamedParameters params;
  for (const auto& p : lm->named_parameters()) params.push_back({p.key(), p.value()});
  std::unique_ptr<rhine::dist::FSDP> fsdp;
  std::unique_ptr<rhine::dist::GradientSync> sync;
  std::unique_ptr<rhine::AdamW> adamw;                     // one of these two
  std::unique_ptr<rhine::dist::ShardedOptimizer> sharded;  // (ZeRO-1)
  if (o.zero >= 2) {
    rhine::dist::FSDPOptions fo;
    fo.zero_stage = o.zero;
    fsdp = std::make_unique<rhine::dist::FSDP>(world, lm, fo);
    adamw = std::make_unique<rhine::AdamW>(fsdp->parameters(), rhine::AdamWOptions{});
  } else {
    sync = std::make_unique<rhine::dist::GradientSync>(world, params);
    if (o.zero == 1)
      sharded = std::make_unique<rhine::dist::ShardedOptimizer>(world, params, [](const rhine::NamedParameters& shard) {
        return std::make_unique<rhine::AdamW>(shard, rhine::AdamWOptions{});
      });
    else
      adamw = std::make_unique<rhine::AdamW>(params, rhine::AdamWOptions{});
  }
  const int64_t b = o.batch / o.procs;
  at::Tensor ids = at::randint(o.vocab, {b, o.seq + 1}, at::kLong);  // [b, T+1]
  for (int s = 0; s < o.steps; ++s) {
    rhine::nn::ForwardOptions fo;
    fo.labels = ids.slice(1, 1).contiguous();
    fo.mtp_lambda = 0.3;  // MTP heads train (a model without them ignores it)
    auto out = lm->forward(ids.slice(1, 0, o.seq).contiguous(), fo);
    out.loss.backward();
    if (sync) sync->finish();
    if (fsdp) fsdp->finish();
    if (sharded) {
      sharded->step();
      sharded->zero_grad();
    } else {
      adamw->step();
      adamw->zero_grad();
    }
  }
  world.barrier();
  // The largest over ranks.
  at::Tensor mine = at::tensor({status_mb("VmHWM"), baseline}, at::kDouble);
  world.host_all_reduce_(mine, rhine::dist::ReduceOp::kMax);
  if (world.is_main()) {
    std::ofstream f(o.out);
    f << nlohmann::json{{"peak_mb", mine[0].item<double>()}, {"baseline_mb", mine[1].item<double>()}}.dump();
  }
  return 0;
}

/// Runs one layout's ranks; returns rank 0's JSON (null when a rank failed).
nlohmann::json run_layout(const Opts& base, const LayoutRun& l, int port, const std::string& out, bool fixed) {
  std::vector<pid_t> pids;
  for (int r = 0; r < l.procs; ++r) {
    pid_t pid = ::fork();
    if (pid == 0) {
      std::vector<std::string> args = {"/proc/self/exe", "--rank",   std::to_string(r),     "--procs",
                                       std::to_string(l.procs), "--port", std::to_string(port), "--zero",
                                       std::to_string(l.zero), "--ckpt", l.ckpt ? "1" : "0",  "--steps",
                                       std::to_string(base.steps), "--batch", std::to_string(base.batch),
                                       "--seq", std::to_string(base.seq), "--hidden", std::to_string(base.hidden),
                                       "--layers", std::to_string(base.layers), "--vocab",
                                       std::to_string(base.vocab), "--out", out};
      std::vector<char*> av;
      for (auto& s : args) av.push_back(s.data());
      av.push_back(nullptr);
      ::setenv("OMP_NUM_THREADS", "1", 1);
      // glibc raises its mmap threshold to the largest block freed so far (up
      // to 32 MiB), after which freed activations and unsharded weights stay
      // in the heap; a fixed threshold hands large blocks back to the system.
      if (fixed) ::setenv("MALLOC_MMAP_THRESHOLD_", "131072", 1);
      ::execv("/proc/self/exe", av.data());
      std::_Exit(127);
    }
    pids.push_back(pid);
  }
  bool ok = true;
  for (pid_t p : pids) {
    int st = 0;
    ::waitpid(p, &st, 0);
    ok = ok && WIFEXITED(st) && WEXITSTATUS(st) == 0;
  }
  std::ifstream f(out);
  if (!ok || !f) return nullptr;
  nlohmann::json j;
  f >> j;
  return j;
}

double mb(double bytes) { return bytes / (1 << 20); }

}  // namespace

int main(int argc, char** argv) {
  Opts o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--out") o.out = v;
    else if (k == "--only") o.only = v;
    else if (k == "--malloc") o.malloc = v;
    else if (k == "--steps") o.steps = std::stoi(v);
    else if (k == "--batch") o.batch = std::stoi(v);
    else if (k == "--seq") o.seq = std::stoi(v);
    else if (k == "--hidden") o.hidden = std::stoi(v);
    else if (k == "--layers") o.layers = std::stoi(v);
    else if (k == "--vocab") o.vocab = std::stoi(v);
    else if (k == "--rank") o.rank = std::stoi(v);
    else if (k == "--procs") o.procs = std::stoi(v);
    else if (k == "--port") o.port = std::stoi(v);
    else if (k == "--zero") o.zero = std::stoi(v);
    else if (k == "--ckpt") o.ckpt = v == "1";
    else {
      std::fprintf(stderr, "bench_plan: unknown argument %s\n", k.c_str());
      return 2;
    }
  }
  try {
    if (o.rank >= 0) return worker(o);
    const auto config = bench_config(o);
    const auto dir = std::filesystem::temp_directory_path() / ("rhine_bench_plan_" + std::to_string(::getpid()));
    std::filesystem::create_directories(dir);
    int port = 29700 + static_cast<int>(::getpid() % 1000);
    std::vector<bool> modes;
    if (o.malloc == "default" || o.malloc == "both") modes.push_back(false);
    if (o.malloc == "fixed" || o.malloc == "both") modes.push_back(true);
    std::map<std::string, std::pair<int, int>> counts;  // malloc mode -> (within, total)
    std::vector<std::pair<bool, LayoutRun>> runs;
    for (bool fixed : modes)
      for (const auto& l : kLayouts)
        if (o.only.empty() || o.only == l.name) runs.emplace_back(fixed, l);
    for (const auto& [fixed, l] : runs) {
      const std::string out = (dir / (l.name + "_" + std::to_string(l.procs) + ".json")).string();
      const auto measured = run_layout(o, l, port++, out, fixed);
      const std::string mode = fixed ? "fixed_mmap_threshold" : "glibc_default";
      if (measured.is_null()) {
        std::fprintf(stderr, "bench_plan: a rank of %s on %d failed\n", l.name.c_str(), l.procs);
        continue;
      }
      rhine::plan::Layout layout;
      layout.zero = l.zero;
      layout.dp = l.zero >= 2 ? 1 : l.procs;
      layout.fsdp = l.zero >= 2 ? l.procs : 1;
      layout.seq_len = o.seq;
      layout.micro_batch = o.batch / l.procs;
      layout.activation_checkpointing = l.ckpt;
      layout.bf16 = false;
      layout.device = "cpu";
      const auto p = rhine::plan::plan(config, layout);
      const double measured_mb = measured["peak_mb"].get<double>();
      const double predicted_mb = mb(p.memory.peak_bytes);
      const double ratio = predicted_mb / measured_mb;
      const bool ok = std::abs(ratio - 1.0) <= 0.15;
      counts[mode].first += ok ? 1 : 0;
      counts[mode].second += 1;
      nlohmann::json params = {{"layout", l.name}, {"procs", l.procs}, {"zero", l.zero},
                               {"checkpointing", l.ckpt}, {"global_batch", o.batch}, {"seq", o.seq},
                               {"hidden", o.hidden}, {"layers", o.layers}, {"vocab", o.vocab},
                               {"n_params", p.params.total}, {"steps", o.steps}, {"malloc", mode}};
      nlohmann::json parts = {{"parameters", mb(p.memory.parameters)},
                              {"gradients", mb(p.memory.gradients)},
                              {"optimizer", mb(p.memory.optimizer)},
                              {"activations", mb(p.memory.activations)},
                              {"communication", mb(p.memory.communication)},
                              {"baseline", mb(p.memory.baseline)}};
      nlohmann::json j = {{"name", "plan_memory"},
                          {"params", params},
                          {"measured_peak_mb", measured_mb},
                          {"predicted_peak_mb", predicted_mb},
                          {"ratio", ratio},
                          {"within_15pct", ok},
                          {"predicted_mb", parts},
                          {"baseline_measured_mb", measured["baseline_mb"]},
                          {"unit", "MiB"}};
      std::printf("%s\n", j.dump().c_str());
      std::fflush(stdout);
    }
    std::filesystem::remove_all(dir);
    for (const auto& [mode, c] : counts)
      std::printf("%s\n", nlohmann::json{{"name", "plan_memory_summary"}, {"malloc", mode}, {"layouts", c.second},
                                         {"within_15pct", c.first}}
                              .dump()
                              .c_str());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_plan: %s\n", e.what());
    return 1;
  }
}
