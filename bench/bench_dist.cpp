// Data-parallel scaling on one machine: training tokens/s of a small
// Llama-style model with 1 process vs 2 processes (Gloo on 127.0.0.1), at the
// same global batch. The program starts its own ranks (it re-executes itself
// with --rank), so it runs as is:
//
//   build/bench/bench_dist [--steps 10] [--batch 8] [--seq 128] [--hidden 256]
//
// Lines (JSON, bench.h): "dp_train" with params {procs, threads_per_proc, ...},
// rate in tokens/s of the whole run (all ranks). Compare procs=1 threads=2
// with procs=2 threads=1 for the same cores.
#include <ATen/ops/randint.h>
#include <sys/wait.h>
#include <torch/nn/module.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "bench.h"
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
};

int worker(const Opts& o) {
  rhine::set_threads(o.threads);
  rhine::dist::Rendezvous rv;
  rv.rank = o.rank;
  rv.world_size = o.procs;
  rv.local_rank = o.rank;
  rv.master_port = o.port;
  rhine::dist::World world = rhine::dist::init(rv);
  rhine::nn::ModelConfig c;
  c.model_type = "llama";
  c.vocab_size = o.vocab;
  c.hidden_size = o.hidden;
  c.intermediate_size = o.hidden * 8 / 3;
  c.num_hidden_layers = o.layers;
  c.num_attention_heads = o.hidden / 64;
  c.num_key_value_heads = o.hidden / 64;
  c.head_dim = 64;
  c.max_position_embeddings = o.seq;
  rhine::nn::CausalLMOptions mo;
  mo.init_seed = 1;
  rhine::nn::CausalLM lm(c, mo);
  rhine::NamedParameters params;
  for (const auto& p : lm->named_parameters()) params.push_back({p.key(), p.value()});
  rhine::AdamW opt(params, rhine::AdamWOptions{});
  rhine::dist::GradientSync sync(world, params);
  const int64_t b = o.batch / o.procs;
  at::Tensor ids = at::randint(o.vocab, {b, o.seq + 1}, at::kLong);  // [b, T+1]
  auto step = [&] {
    rhine::nn::ForwardOptions fo;
    fo.labels = ids.slice(1, 1).contiguous();
    auto out = lm->forward(ids.slice(1, 0, o.seq).contiguous(), fo);
    out.loss.backward();
    sync.finish();
    opt.step();
    opt.zero_grad();
  };
  world.barrier();
  auto stats = rhine::bench::time_runs(step, o.steps, 2);
  world.barrier();
  if (world.is_main()) {
    nlohmann::json params_j = {{"procs", o.procs},   {"threads_per_proc", o.threads},
                               {"global_batch", o.batch}, {"seq", o.seq},
                               {"hidden", o.hidden}, {"layers", o.layers},
                               {"vocab", o.vocab},   {"n_params", lm->num_parameters()},
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
                                       "--vocab", std::to_string(base.vocab)};
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
    else {
      std::fprintf(stderr, "bench_dist: unknown argument %s\n", k.c_str());
      return 2;
    }
  }
  try {
    if (o.rank >= 0) return worker(o);
    const int port = free_port();
    run_config(o, 1, 1, port);
    run_config(o, 1, 2, port + 1);
    run_config(o, 2, 1, port + 2);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_dist: %s\n", e.what());
    return 1;
  }
}
