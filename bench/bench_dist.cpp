// Data-parallel training on one machine (Gloo on 127.0.0.1), at the same
// global batch. The program starts its own ranks (it re-executes itself with
// --rank), so it runs as is:
//
//   build/bench/bench_dist [--steps 10] [--batch 8] [--seq 128] [--hidden 256] [--layers 4]
//                          [--vocab 2048] [--sweep scaling|layouts|experts|all]
//
// Lines (JSON, bench.h):
//  - "dp_train" (sweep scaling): params {procs, threads_per_proc, ...}, rate in
//    tokens/s of the whole run (all ranks). Compare procs=1 threads=2 with
//    procs=2 threads=1 for the same cores.
//  - "dist_layout" (sweep layouts): data parallel (ddp), FSDP ZeRO-2 (zero2)
//    and FSDP ZeRO-3 (fsdp) on 1, 2 and 4 ranks of one thread each, with
//    tokens/s and, per rank (the largest over ranks), the bytes of
//    parameters + gradients + optimizer state measured from the tensors
//    ("state_mb": what stays between steps, gradient buckets included), the
//    most gathered at once ("gathered_peak_mb": FSDP's unsharded blocks and
//    full gradients) and the process's peak RSS. On 2 cores the point is
//    the overhead and the memory, not a speed-up.
//  - "dist_layout" with params.model "moe" (sweep experts): a DeepSeek-V3-style
//    model of the same width (MLA, 16 routed + 1 shared experts, top-2, every
//    layer but the first MoE) under ddp, fsdp and fsdp_ep (ZeRO-3 with the
//    routed experts partitioned over the ranks, tokens sent by all-to-all),
//    and on 4 ranks fsdp_ep_half (EP 2, each pair's experts sharded over the
//    2 ranks at the same place: expert data parallelism) and hsdp_ep (2
//    copies x 2 ranks, EP 2 in each).
#include <ATen/ops/randint.h>
#include <sys/wait.h>
#include <torch/nn/module.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "bench.h"
#include "bench_dist_common.h"
#include <sys/resource.h>

#include "rhine/dist/fsdp.h"
#include "rhine/dist/grad_sync.h"
#include "rhine/dist/world.h"
#include "rhine/nn/model.h"
#include "rhine/optim/adamw.h"
#include "rhine/torch/runtime.h"

extern char** environ;

namespace {

struct Opts {
  int steps = 10, batch = 8, seq = 128, hidden = 256, layers = 4, vocab = 2048;
  int rank = -1, procs = 1, threads = 1, port = 0;
  /// 0: data parallel (GradientSync), 2: FSDP ZeRO-2, 3: FSDP ZeRO-3, 4: ZeRO-3 + EP over all ranks,
  /// 5: ZeRO-3 + EP over half the ranks (experts sharded over the EDP pairs),
  /// 6: hybrid, 2 copies each sharded over half the ranks with EP there.
  int layout = 0;
  int moe = 0;     ///< 1: the DeepSeek-V3-style MoE model
  std::string sweep = "all";
};

const char* layout_name(int layout) {
  return layout == 0 ? "ddp" : layout == 2 ? "zero2" : layout == 3 ? "fsdp" : layout == 4 ? "fsdp_ep"
         : layout == 5 ? "fsdp_ep_half" : "hsdp_ep";
}

double tensor_mb(const std::vector<at::Tensor>& ts) {
  double bytes = 0;
  for (const auto& t : ts)
    if (t.defined()) bytes += static_cast<double>(t.numel() * t.element_size());
  return bytes / (1 << 20);
}

int worker(const Opts& o) {
  rhine::set_threads(o.threads);
  rhine::dist::World world = rhine::bench::local_world(o.rank, o.procs, o.port);
  rhine::nn::ModelConfig c = rhine::bench::llama_bench_config(o.hidden, o.layers, o.vocab, o.seq);
  if (o.moe) {
    c.model_type = "deepseek_v3";
    c.kv_lora_rank = o.hidden / 4;
    c.qk_nope_head_dim = 64;
    c.qk_rope_head_dim = 32;
    c.v_head_dim = 64;
    c.n_routed_experts = 16;
    c.n_shared_experts = 1;
    c.num_experts_per_tok = 2;
    c.moe_intermediate_size = o.hidden / 2;
    c.first_k_dense_replace = 1;
    c.topk_method = "noaux_tc";
    c.scoring_func = "sigmoid";
    c.norm_topk_prob = true;
    c.validate();
  }
  rhine::nn::CausalLMOptions mo;
  mo.init_seed = 1;
  rhine::nn::CausalLM lm(c, mo);
  rhine::NamedParameters params;
  for (const auto& p : lm->named_parameters()) params.push_back({p.key(), p.value()});
  const auto n_params = lm->num_parameters();
  std::unique_ptr<rhine::dist::FSDP> fsdp;
  std::unique_ptr<rhine::dist::GradientSync> sync;
  if (o.layout >= 2) {
    rhine::dist::FSDPOptions fo;
    fo.zero_stage = o.layout >= 4 ? 3 : o.layout;
    fo.expert_parallel = o.layout == 4 ? o.procs : o.layout >= 5 ? o.procs / 2 : 1;
    if (o.layout == 6) fo.shard_size = o.procs / 2;
    fsdp = std::make_unique<rhine::dist::FSDP>(world, lm, fo);
  } else {
    sync = std::make_unique<rhine::dist::GradientSync>(world, params);
  }
  rhine::AdamW opt(fsdp ? fsdp->parameters() : params, rhine::AdamWOptions{});
  const int64_t b = o.batch / o.procs;
  at::Tensor ids = at::randint(o.vocab, {b, o.seq + 1}, at::kLong);  // [b, T+1]
  double state_mb = 0;
  auto step = [&](bool measure) {
    rhine::nn::ForwardOptions fo;
    fo.labels = ids.slice(1, 1).contiguous();
    fo.mtp_lambda = 0.3;  // MTP heads train (a model without them ignores it)
    auto out = lm->forward(ids.slice(1, 0, o.seq).contiguous(), fo);
    out.loss.backward();
    if (sync) sync->finish();
    if (fsdp) fsdp->finish();
    opt.step();
    if (!measure) {
      opt.zero_grad();
      return;
    }
    // Between steps a rank keeps its parameters, gradients (their buffers)
    // and the optimizer's slots: measured here, before the gradients go.
    std::vector<at::Tensor> held;
    for (const auto& p : opt.parameters()) held.push_back(p), held.push_back(p.grad());
    for (const auto& [k, t] : opt.state_dict().tensors) held.push_back(t);
    state_mb = tensor_mb(held);
    if (sync) state_mb += tensor_mb(opt.parameters());  // GradientSync's flat bucket copy of the gradients
    if (fsdp && o.layout == 2) state_mb += static_cast<double>(fsdp->memory().model_elements) * 4 / (1 << 20);
    opt.zero_grad();
  };
  world.barrier();
  auto stats = rhine::bench::time_runs([&] { step(false); }, o.steps, 2);
  world.barrier();
  if (o.sweep == "layouts" || o.sweep == "experts") {
    step(true);
    rusage ru{};
    ::getrusage(RUSAGE_SELF, &ru);
    double gathered_mb = 0;
    if (fsdp) {
      const auto m = fsdp->memory();
      gathered_mb = static_cast<double>(m.peak_gathered_elements + m.peak_full_grad_elements) * 4 / (1 << 20);
    } else {
      gathered_mb = 0;
    }
    // The largest over ranks.
    at::Tensor mine = at::tensor({state_mb, gathered_mb, static_cast<double>(ru.ru_maxrss) / 1024}, at::kDouble);
    world.host_all_reduce_(mine, rhine::dist::ReduceOp::kMax);
    if (world.is_main()) {
      nlohmann::json params_j = {{"layout", layout_name(o.layout)}, {"model", o.moe ? "moe" : "dense"}, {"procs", o.procs},
                                 {"threads_per_proc", o.threads}, {"global_batch", o.batch},
                                 {"seq", o.seq}, {"hidden", o.hidden}, {"layers", o.layers},
                                 {"vocab", o.vocab}, {"n_params", n_params}, {"backend", world.backend()}};
      nlohmann::json j = {{"name", "dist_layout"},
                          {"params", params_j},
                          {"median", static_cast<double>(o.batch) * o.seq / stats.median},
                          {"min", static_cast<double>(o.batch) * o.seq / stats.max},
                          {"max", static_cast<double>(o.batch) * o.seq / stats.min},
                          {"unit", "tokens/s"},
                          {"runs", stats.runs},
                          {"state_mb_per_rank", mine[0].item<double>()},
                          {"gathered_peak_mb_per_rank", mine[1].item<double>()},
                          {"peak_rss_mb_per_rank", mine[2].item<double>()}};
      std::printf("%s\n", j.dump().c_str());
      std::fflush(stdout);
    }
    return 0;
  }
  if (world.is_main()) {
    nlohmann::json params_j = {{"procs", o.procs},   {"threads_per_proc", o.threads},
                               {"global_batch", o.batch}, {"seq", o.seq},
                               {"hidden", o.hidden}, {"layers", o.layers},
                               {"vocab", o.vocab},   {"n_params", n_params},
                               {"backend", world.backend()}};
    rhine::bench::report_rate("dp_train", params_j, stats, static_cast<double>(o.batch) * o.seq,
                              "tokens/s");
  }
  return 0;
}

int free_port() {
  // Ports 29500 + pid % 1000 keep concurrent runs of this bench apart.
  return 29500 + static_cast<int>(::getpid() % 1000);
}

void run_config(const Opts& base, int procs, int threads, int port) {
  std::vector<pid_t> pids;
  for (int r = 0; r < procs; ++r) {
    pid_t pid = ::fork();
    if (pid == 0) {
      std::vector<std::string> args = {"/proc/self/exe", "--rank", std::to_string(r), "--procs",
                                       std::to_string(procs), "--threads", std::to_string(threads),
                                       "--port", std::to_string(port), "--steps",
                                       std::to_string(base.steps), "--batch", std::to_string(base.batch),
                                       "--seq", std::to_string(base.seq), "--hidden",
                                       std::to_string(base.hidden), "--layers", std::to_string(base.layers),
                                       "--vocab", std::to_string(base.vocab), "--layout",
                                       std::to_string(base.layout), "--moe", std::to_string(base.moe),
                                       "--sweep", base.sweep};
      std::vector<char*> av;
      for (auto& s : args) av.push_back(s.data());
      av.push_back(nullptr);
      ::execv("/proc/self/exe", av.data());
      std::_Exit(127);
    }
    pids.push_back(pid);
  }
  for (pid_t p : pids) {
    int st = 0;
    ::waitpid(p, &st, 0);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) std::fprintf(stderr, "bench_dist: a rank failed\n");
  }
}

}  // namespace

int main(int argc, char** argv) {
  Opts o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    if (k == "--sweep") {
      o.sweep = argv[i + 1];
      continue;
    }
    const int v = std::atoi(argv[i + 1]);
    if (k == "--steps") o.steps = v;
    else if (k == "--batch") o.batch = v;
    else if (k == "--seq") o.seq = v;
    else if (k == "--hidden") o.hidden = v;
    else if (k == "--layers") o.layers = v;
    else if (k == "--vocab") o.vocab = v;
    else if (k == "--rank") o.rank = v;
    else if (k == "--procs") o.procs = v;
    else if (k == "--threads") o.threads = v;
    else if (k == "--port") o.port = v;
    else if (k == "--layout") o.layout = v;
    else if (k == "--moe") o.moe = v;
    else {
      std::fprintf(stderr, "bench_dist: unknown argument %s\n", k.c_str());
      return 2;
    }
  }
  try {
    if (o.rank >= 0) return worker(o);
    int port = free_port();
    const std::string asked = o.sweep;
    auto want = [&](const char* sweep) { return asked == sweep || asked == "all"; };
    if (want("scaling")) {
      o.sweep = "scaling";
      run_config(o, 1, 1, port++);
      run_config(o, 1, 2, port++);
      run_config(o, 2, 1, port++);
    }
    if (want("layouts")) {
      o.sweep = "layouts";
      for (int layout : {0, 2, 3})
        for (int procs : {1, 2, 4}) {
          o.layout = layout;
          run_config(o, procs, 1, port++);
        }
    }
    if (want("experts")) {
      o.sweep = "experts";
      o.moe = 1;
      for (int layout : {0, 3, 4, 5, 6})
        for (int procs : {1, 2, 4}) {
          if ((layout == 4 && procs == 1) || (layout >= 5 && procs < 4)) continue;
          o.layout = layout;
          run_config(o, procs, 1, port++);
        }
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_dist: %s\n", e.what());
    return 1;
  }
}
