// Runs the tiny training setup of trainer_fixture.h with checkpoints, for the
// kill -9 resume and data-parallel tests:
//
//   rhine_trainer_worker SHARDS OUT_DIR MAX_STEPS [KILL_AFTER_STEP]
//
// With KILL_AFTER_STEP the process SIGKILLs itself right after that step's
// checkpoint (checkpoint_every = 1), like a crash between steps. With the
// torchrun variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) it trains
// data-parallel over Gloo (RHINE_TEST_ZERO1=1: with the optimizer state
// sharded, ZeRO-1; RHINE_TEST_FSDP=3 or 2: fully sharded, FSDP ZeRO-3 or
// ZeRO-2). At the end rank 0 writes OUT_DIR/final.safetensors (under FSDP
// every parameter is gathered first) and, without FSDP, OUT_DIR/eval.json: the trained model
// evaluated on a fixed held-out set (split over the data-parallel ranks).
#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <memory>

#include "rhine/dist/fsdp.h"
#include "rhine/dist/grad_sync.h"
#include "rhine/dist/sharded_optimizer.h"
#include "rhine/dist/world.h"
#include "rhine/io/checkpoint.h"
#include "rhine/core/json.h"
#include "rhine/io/safetensors.h"
#include "rhine/torch/runtime.h"
#include "trainer_fixture.h"

int main(int argc, char** argv) try {
  if (argc < 4) {
    std::fprintf(stderr, "usage: rhine_trainer_worker SHARDS OUT_DIR MAX_STEPS [KILL_AFTER_STEP]\n");
    return 2;
  }
  rhine::RuntimeOptions ro;
  ro.threads = 1;
  ro.seed = 11;
  ro.device = "cpu";
  rhine::init_runtime(ro);
  rhine::dist::DistOptions dopt;
  dopt.timeout = std::chrono::seconds(60);
  auto world = rhine::dist::init_from_env(dopt);
  rhine::test::TinyRun run(argv[1], 4, 3, rhine::test::kVocab, world.rank(), world.world_size());
  rhine::NamedParameters params;
  for (const auto& p : run.model->named_parameters()) params.push_back({p.key(), p.value()});
  rhine::dist::broadcast_parameters(world, run.model->parameters());
  std::unique_ptr<rhine::dist::GradientSync> sync;  // data parallel (not under FSDP: it shards gradients itself)
  if (std::getenv("RHINE_TEST_FSDP") == nullptr) sync = std::make_unique<rhine::dist::GradientSync>(world, params);

  rhine::train::TrainerOptions o;
  o.max_steps = std::atoll(argv[3]);
  o.out_dir = argv[2];
  o.checkpoint_every = 1;
  o.keep_last = 2;
  o.log_every = 1;
  o.progress = false;
  o.bf16 = false;
  // RHINE_TEST_ZERO1=1: the optimizer state sharded over the ranks (same AdamW options).
  std::unique_ptr<rhine::dist::ShardedOptimizer> zero1;
  std::unique_ptr<rhine::dist::FSDP> fsdp;
  std::unique_ptr<rhine::AdamW> fsdp_adamw;
  std::unique_ptr<rhine::train::Trainer> trainer;
  if (const char* stage = std::getenv("RHINE_TEST_FSDP")) {
    rhine::dist::FSDPOptions fo;
    fo.zero_stage = std::atoi(stage);
    fsdp = std::make_unique<rhine::dist::FSDP>(world, run.model, fo);
    fsdp_adamw = std::make_unique<rhine::AdamW>(fsdp->parameters(), rhine::test::tiny_adamw_options());
    trainer = std::make_unique<rhine::train::Trainer>(run.model, *fsdp_adamw, run.schedule, *run.loader, o);
    trainer->set_fsdp(&world, fsdp.get());
  } else if (std::getenv("RHINE_TEST_ZERO1") != nullptr) {
    zero1 = std::make_unique<rhine::dist::ShardedOptimizer>(world, params, [](const rhine::NamedParameters& shard) {
      return std::make_unique<rhine::AdamW>(shard, rhine::test::tiny_adamw_options());
    });
    trainer = std::make_unique<rhine::train::Trainer>(run.model, *zero1, run.schedule, *run.loader, o);
  } else {
    trainer = std::make_unique<rhine::train::Trainer>(run.model, *run.optimizer, run.schedule, *run.loader, o);
  }
  if (world.world_size() > 1 && !fsdp) trainer->set_data_parallel(&world, sync.get());
  // RHINE_TEST_KILL_IN_SAVE=K: rank 0 SIGKILLs itself while writing checkpoint
  // K, after every rank wrote its files and before the commit.
  if (const char* k = std::getenv("RHINE_TEST_KILL_IN_SAVE"); k != nullptr && world.is_main()) {
    const long long kill_at = std::atoll(k);
    trainer->callbacks().save_extra = [&, kill_at](rhine::io::CheckpointWriter&) {
      if (trainer->step() == kill_at) ::raise(SIGKILL);
    };
  }
  if (argc > 4) {
    const long long kill_after = std::atoll(argv[4]);
    trainer->callbacks().on_checkpoint = [&](const std::filesystem::path&) {
      if (trainer->step() == kill_after) ::raise(SIGKILL);
    };
  }
  trainer->fit();
  auto final_state = fsdp ? std::map<std::string, at::Tensor>{} : rhine::train::model_state(run.model);
  if (fsdp) {
    for (const auto& name : fsdp->parameter_names()) final_state[name] = fsdp->full_parameter(name);
    for (const auto& [name, b] : run.model->state_buffers()) final_state[name] = b;
  }
  if (world.is_main()) rhine::save_safetensors(std::string(argv[2]) + "/final.safetensors", final_state);
  // Evaluation of the trained model on a fixed held-out set (data parallel: split over the
  // ranks); rank 0 writes OUT_DIR/eval.json.
  if (!fsdp) {
    rhine::train::HeldoutSet h;
    h.seq_len = 5;
    for (int d = 0; d < 7; ++d) {
      std::vector<std::int64_t> doc;
      for (int t = 0; t < 3 + 2 * d; ++t) doc.push_back((7 * d + 3 * t) % rhine::test::kVocab);
      h.languages[d % 2 ? "de" : "nl"].docs.push_back(doc);
      h.languages[d % 2 ? "de" : "nl"].bytes += static_cast<std::uint64_t>(4 * doc.size());
    }
    for (const auto& doc : h.languages["nl"].docs) {  // nl scores every other token (as SFT replies)
      std::vector<std::uint8_t> t(doc.size());
      for (std::size_t i = 0; i < t.size(); ++i) t[i] = i % 2;
      h.languages["nl"].targets.push_back(t);
    }
    rhine::train::EvalOptions eo;
    eo.batch_size = 2;
    eo.world = &world;
    const auto r = rhine::train::evaluate(run.model, h, eo);
    if (world.is_main()) rhine::write_json_file(std::string(argv[2]) + "/eval.json", r.to_json());
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "%s\n", e.what());
  return 1;
}
