// One rank of the FSDP tests (test_fsdp.cpp starts 1, 2 or 4 of these). It
// trains a tiny model with AdamW on a fixed global batch of B rows: rank r of
// N uses rows [r*B/N, (r+1)*B/N), split into `accum` micro-batches, and every
// rank builds the model from the same seed.
//
//   fsdp_worker --out PREFIX [--model dense|moe] [--parallel none|ddp|fsdp]
//               [--zero 3|2] [--ep N] [--shard S] [--optim adamw|muon [--no-muon-shards]]
//               [--no-reshard] [--no-prefetch] [--param-bf16]
//               [--autocast] [--ckpt] [--clip X] [--steps 3] [--batch 8]
//               [--seq 8] [--accum 1] [--timeout-ms 20000]
//               [--die-rank R --die-after K]   rank R exits after K steps
//               [--sleep-rank R --sleep-after K]   rank R stalls (60 s) after K steps
//               [--save-at K --ckpt-dir D]  after K steps, save a row-sharded
//                                          checkpoint (parameters, optimizer, buffers)
//               [--resume DIR]             start from such a checkpoint (any layout wrote it)
//               [--export-hf DIR]          one process: write the model built from seed 99 as an
//                                          HF directory, and stop
//               [--import DIR [--defer-init]]  start from such an HF directory; --defer-init: build the
//                                          model with CausalLMOptions::defer_init (FSDP only),
//                                          so that a rank holds only its shards
//               [--defer-init --init-shards]  build it so and let FSDP::initialize draw each
//                                          rank's rows (training from scratch)
//               [--wide]                   the dense model 512 wide with a 16k vocabulary (18M
//                                          parameters), for memory measurements
//               [--lora [--lora-dropout P]]  LoRA r=4 (alpha 8, seed 5) on q_proj, v_proj and down_proj
//                                          (dense) or q_b_proj, kv_b_proj, o_proj and every down_proj,
//                                          routed experts' too (moe); only the adapters train
//
//   dense: Llama-style, GQA, tied embeddings, 3 layers.
//   moe:   DeepSeek-V3-style: MLA, a dense first layer then MoE layers (sigmoid
//          routing, aux-loss-free bias updated from global counts), one MTP module.
//
// Writes PREFIX.params (rank 0: every parameter whole, float64, in the model's
// order) and PREFIX.rank<r>.json (global mean losses, gradient norms, FSDP
// memory figures); on a rhine::Error PREFIX.rank<r>.err (exit code 3).
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/ops/from_blob.h>
#include <torch/nn/module.h>

#include <sys/resource.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "global_batch.h"
#include "rhine/core/error.h"
#include "rhine/core/json.h"
#include "rhine/dist/fsdp.h"
#include "rhine/dist/grad_sync.h"
#include "rhine/dist/world.h"
#include "rhine/io/row_shards.h"
#include "rhine/io/hf.h"
#include "rhine/io/lora.h"
#include "rhine/io/safetensors.h"
#include "rhine/nn/model.h"
#include "rhine/optim/adamw.h"
#include "rhine/optim/clip.h"
#include "rhine/optim/muon.h"
#include "rhine/torch/compat.h"
#include "rhine/torch/runtime.h"

namespace {

struct Args {
  std::string out, model = "dense", parallel = "fsdp", optim = "adamw";
  int zero = 3, ep = 1, shard = 0, steps = 3, batch = 8, seq = 8, accum = 1;
  bool no_muon_shards = false;  // to see check_optimizer refuse such a Muon
  bool reshard = true, prefetch = true, param_bf16 = false, autocast = false, ckpt = false;
  double clip = 0.0;
  long timeout_ms = 20000;
  int die_rank = -1, die_after = 0, sleep_rank = -1, sleep_after = 0;
  int save_at = -1;
  std::string ckpt_dir, resume, export_hf, import_dir;
  bool defer_init = false, init_shards = false, wide = false, lora = false;
  double lora_dropout = 0.0;
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    auto next = [&]() -> std::string {
      RHINE_CHECK(i + 1 < argc, "fsdp_worker", "missing value for", k, "");
      return argv[++i];
    };
    if (k == "--out") a.out = next();
    else if (k == "--model") a.model = next();
    else if (k == "--parallel") a.parallel = next();
    else if (k == "--zero") a.zero = std::stoi(next());
    else if (k == "--ep") a.ep = std::stoi(next());
    else if (k == "--shard") a.shard = std::stoi(next());
    else if (k == "--optim") a.optim = next();
    else if (k == "--no-muon-shards") a.no_muon_shards = true;
    else if (k == "--no-reshard") a.reshard = false;
    else if (k == "--no-prefetch") a.prefetch = false;
    else if (k == "--param-bf16") a.param_bf16 = true;
    else if (k == "--autocast") a.autocast = true;
    else if (k == "--ckpt") a.ckpt = true;
    else if (k == "--clip") a.clip = std::stod(next());
    else if (k == "--steps") a.steps = std::stoi(next());
    else if (k == "--batch") a.batch = std::stoi(next());
    else if (k == "--seq") a.seq = std::stoi(next());
    else if (k == "--accum") a.accum = std::stoi(next());
    else if (k == "--timeout-ms") a.timeout_ms = std::stol(next());
    else if (k == "--die-rank") a.die_rank = std::stoi(next());
    else if (k == "--die-after") a.die_after = std::stoi(next());
    else if (k == "--sleep-rank") a.sleep_rank = std::stoi(next());
    else if (k == "--sleep-after") a.sleep_after = std::stoi(next());
    else if (k == "--save-at") a.save_at = std::stoi(next());
    else if (k == "--ckpt-dir") a.ckpt_dir = next();
    else if (k == "--resume") a.resume = next();
    else if (k == "--export-hf") a.export_hf = next();
    else if (k == "--import") a.import_dir = next();
    else if (k == "--defer-init") a.defer_init = true;
    else if (k == "--init-shards") a.init_shards = true;
    else if (k == "--wide") a.wide = true;
    else if (k == "--lora") a.lora = true;
    else if (k == "--lora-dropout") a.lora_dropout = std::stod(next());
    else RHINE_FAIL("fsdp_worker", "unknown argument", k, "");
  }
  RHINE_CHECK(!a.out.empty(), "fsdp_worker", "--out is required", "", "");
  return a;
}

rhine::nn::ModelConfig dense_config() {
  rhine::nn::ModelConfig c;
  c.model_type = "llama";
  c.vocab_size = 40;
  c.hidden_size = 16;
  c.intermediate_size = 24;
  c.num_hidden_layers = 3;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 4;
  c.tie_word_embeddings = true;
  c.rms_norm_eps = 1e-5;
  c.max_position_embeddings = 64;
  c.validate();
  return c;
}

/// The dense model's sizes with DeepSeek-V3's attention, MoE and MTP.
rhine::nn::ModelConfig moe_config() {
  rhine::nn::ModelConfig c = dense_config();
  c.model_type = "deepseek_v3";
  c.num_attention_heads = 2;
  c.tie_word_embeddings = false;
  c.q_lora_rank = 8;
  c.kv_lora_rank = 8;
  c.qk_nope_head_dim = 4;
  c.qk_rope_head_dim = 4;
  c.v_head_dim = 4;
  c.n_routed_experts = 8;
  c.n_shared_experts = 1;
  c.num_experts_per_tok = 2;
  c.moe_intermediate_size = 8;
  c.n_group = 2;
  c.topk_group = 1;
  c.topk_method = "noaux_tc";
  c.scoring_func = "sigmoid";
  c.norm_topk_prob = true;
  c.routed_scaling_factor = 2.5;
  c.first_k_dense_replace = 1;
  c.num_nextn_predict_layers = 1;
  c.validate();
  return c;
}

/// Saves a row-sharded checkpoint of `step`: FSDP through FSDP::save, one
/// process as a one-rank row shard of whole tensors; the buffers (router
/// biases, replicated) as rank 0's whole pieces.
void save(rhine::dist::World& world, rhine::nn::CausalLM& lm, rhine::dist::FSDP* fsdp, const rhine::Optimizer& opt,
          const rhine::NamedParameters& params, const std::string& dir, int step) {
  std::filesystem::create_directories(dir);
  const rhine::Json meta = {{"step", step}};
  std::vector<rhine::io::RowPiece> buffers;
  if (world.rank() == 0)
    for (const auto& [name, b] : lm->state_buffers()) buffers.push_back({name, b.detach(), b.sizes().vec(), 0});
  if (fsdp) {
    if (world.rank() == 0) {
      std::map<std::string, at::Tensor> named;
      for (const auto& b : buffers) named[b.name] = b.rows;
      rhine::save_safetensors(dir + "/buffers.safetensors", named);
    }
    fsdp->save(dir, &opt, meta);
    return;
  }
  auto pieces = buffers;
  for (const auto& p : params) pieces.push_back({p.name, p.tensor.detach(), p.tensor.sizes().vec(), 0});
  const auto state = opt.state_dict();
  for (const auto& [key, t] : state.tensors) pieces.push_back({"optim/" + key, t, t.sizes().vec(), 0});
  const auto desc = rhine::io::write_row_shard(dir, 0, 1, pieces);
  rhine::Json m = meta;
  m["optimizer"] = state.meta;
  rhine::io::write_row_index(dir, {desc}, m);
}

/// Loads what save() wrote (with any layout); returns its step.
int resume(rhine::nn::CausalLM& lm, rhine::dist::FSDP* fsdp, rhine::Optimizer& opt, const rhine::NamedParameters& params,
           const std::string& dir) {
  const auto reader = rhine::io::RowReader::open(dir);
  at::NoGradGuard no_grad;
  const auto& meta = reader.meta();
  const bool own_file = std::filesystem::exists(dir + "/buffers.safetensors");
  const auto buffers = own_file ? rhine::io::RowReader::open(dir + "/buffers.safetensors") : reader;
  for (auto& [name, b] : lm->state_buffers()) b.copy_(buffers.whole(name));
  if (fsdp) {
    fsdp->load_parameters(reader);
    fsdp->load_optimizer(reader, meta.at("optimizer"), opt);
  } else {
    for (const auto& p : params) p.tensor.copy_(reader.whole(p.name));
    opt.load_state_dict(rhine::reshard_state(opt, meta.at("optimizer"), reader.names("optim/"),
                                             [&](const std::string& key) { return reader.whole("optim/" + key); }));
  }
  return meta.at("step").get<int>();
}

int run(const Args& a) {
  rhine::set_threads(1);
  rhine::dist::DistOptions dopt;
  dopt.backend = "gloo";
  dopt.timeout = std::chrono::milliseconds(a.timeout_ms);
  rhine::dist::World world = rhine::dist::init_from_env(dopt);
  at::manual_seed(7);  // LoRA dropout draws from the global generator; starting a World may have used it
  const int rank = world.rank(), n = world.world_size();
  const std::string prefix = a.out + ".rank" + std::to_string(rank);
  try {
    auto cfg = a.model == "moe" ? moe_config() : dense_config();
    if (a.wide) {
      cfg.hidden_size = 512;
      cfg.head_dim = 128;
      cfg.intermediate_size = 1536;
      cfg.vocab_size = 16384;
      cfg.validate();
    }
    rhine::nn::CausalLMOptions mo;
    mo.init_seed = 1234;  // the same on every rank
    mo.activation_checkpointing = a.ckpt;
    if (!a.export_hf.empty()) {
      mo.init_seed = 99;
      rhine::nn::CausalLM other(cfg, mo);
      rhine::io::save_hf_model(other, a.export_hf);
      return 0;
    }
    mo.defer_init = a.defer_init;
    rhine::Json report;
    rusage before{};
    ::getrusage(RUSAGE_SELF, &before);
    rhine::nn::CausalLM lm(cfg, mo);
    lm->train();
    if (a.lora) {
      rhine::io::LoraOptions lo;
      lo.rank = 4;
      lo.alpha = 8.0;
      lo.dropout = a.lora_dropout;
      lo.init_seed = 5;
      lo.target_modules = a.model == "moe" ? std::vector<std::string>{"q_b_proj", "kv_b_proj", "o_proj", "down_proj"}
                                           : std::vector<std::string>{"q_proj", "v_proj", "down_proj"};
      rhine::io::apply_lora(*lm, lo);
      // B = 0 would make the first step's A gradients zero: start both sides moving.
      at::NoGradGuard no_grad;
      auto gen = at::make_generator<at::CPUGeneratorImpl>(6);
      for (auto& p : lm->named_parameters())
        if (p.key().find(".lora_B.") != std::string::npos) p.value().normal_(0.0, 0.1, gen);
    }
    report["model_bytes"] = lm->num_parameters() * 4;

    rhine::NamedParameters model_params, trained;  // all; those that train (the adapters under --lora)
    for (const auto& p : lm->named_parameters()) {
      model_params.push_back({p.key(), p.value()});
      if (p.value().requires_grad()) trained.push_back({p.key(), p.value()});
    }
    std::vector<at::Tensor> model_tensors;
    for (const auto& p : model_params) model_tensors.push_back(p.tensor);

    std::unique_ptr<rhine::dist::FSDP> fsdp;
    std::unique_ptr<rhine::dist::GradientSync> sync;
    if (a.parallel == "fsdp") {
      rhine::dist::FSDPOptions fo;
      fo.zero_stage = a.zero;
      fo.reshard_after_forward = a.reshard;
      fo.prefetch = a.prefetch;
      fo.param_dtype = a.param_bf16 ? at::kBFloat16 : at::kFloat;
      fo.expert_parallel = a.ep;
      fo.shard_size = a.shard;
      fsdp = std::make_unique<rhine::dist::FSDP>(world, lm, fo);
      if (a.init_shards) fsdp->initialize();
      if (!a.import_dir.empty()) fsdp->load_parameters(rhine::io::RowReader::open(a.import_dir));
    } else if (a.parallel == "ddp") {
      sync = std::make_unique<rhine::dist::GradientSync>(world, trained);
    } else {
      RHINE_CHECK(a.parallel == "none" && n == 1, "fsdp_worker", "--parallel none is one process, got",
                  a.parallel, "");
    }
    if (!a.import_dir.empty()) {
      const auto reader = rhine::io::RowReader::open(a.import_dir);
      at::NoGradGuard no_grad;
      if (!fsdp)
        for (auto& p : model_params)
          if (!rhine::io::is_lora_parameter(p.name) || reader.contains(p.name)) p.tensor.copy_(reader.whole(p.name));
      for (auto& [name, b] : lm->state_buffers())
        if (reader.contains(name)) b.copy_(reader.whole(name));
    }
    rusage after{};
    ::getrusage(RUSAGE_SELF, &after);
    report["import_peak_rss_growth_bytes"] = (after.ru_maxrss - before.ru_maxrss) * 1024;
    const rhine::NamedParameters& stepped = fsdp ? fsdp->parameters() : trained;
    rhine::AdamWOptions ao;
    ao.lr = 1e-2;
    ao.weight_decay = 0.1;
    std::unique_ptr<rhine::Optimizer> optimizer;
    if (a.optim == "muon") {  // Newton-Schulz in fp32: the comparison is about sharding, not bf16 rounding
      rhine::MuonOptions muon_options;
      muon_options.lr = 1e-2;
      muon_options.ns_dtype = at::kFloat;
      auto muon = std::make_unique<rhine::Muon>(rhine::muon_groups(stepped, muon_options));
      if (fsdp && !a.no_muon_shards) muon->set_shards(fsdp->muon_shards());
      optimizer = std::move(muon);
    } else {
      optimizer = std::make_unique<rhine::AdamW>(rhine::decay_groups(stepped, ao));
    }
    rhine::Optimizer& opt = *optimizer;
    if (fsdp) rhine::dist::FSDP::check_optimizer(opt);
    std::vector<at::Tensor> stepped_tensors;
    std::int64_t stepped_elements = 0;
    for (const auto& p : stepped) {
      stepped_tensors.push_back(p.tensor);
      stepped_elements += p.tensor.numel();
    }
    report["trained_elements"] = stepped_elements;  // what this rank's optimizer steps

    RHINE_CHECK(a.batch % (n * a.accum) == 0, "fsdp_worker", "batch must split over ranks and micro-steps",
                a.batch, "");
    const int64_t b = a.batch / n, T = a.seq;
    at::Tensor data = rhine::test::global_batch_rows(rank * b, b, T, cfg.vocab_size);  // [b, T+1]

    report["rank"] = rank;
    report["world_size"] = n;
    report["losses"] = rhine::Json::array();
    report["norms"] = rhine::Json::array();
    if (fsdp) fsdp->reset_peak();
    const int64_t mb = b / a.accum;
    const int first = a.resume.empty() ? 0 : resume(lm, fsdp.get(), opt, model_params, a.resume);
    for (int step = first; step < a.steps; ++step) {
      if (step == a.save_at) save(world, lm, fsdp.get(), opt, model_params, a.ckpt_dir, step);
      if (rank == a.die_rank && step == a.die_after) std::_Exit(0);
      if (rank == a.sleep_rank && step == a.sleep_after) std::this_thread::sleep_for(std::chrono::seconds(60));
      double loss_sum = 0;
      at::Tensor counts;
      for (int micro = 0; micro < a.accum; ++micro) {
        const bool last = micro + 1 == a.accum;
        auto fsdp_guard = fsdp && !last ? fsdp->no_sync() : rhine::dist::FSDP::NoSync{};
        auto ddp_guard = sync && !last ? sync->no_sync() : rhine::dist::NoSyncGuard{};
        at::Tensor chunk = data.slice(0, micro * mb, (micro + 1) * mb);
        rhine::nn::ForwardOptions fo;
        fo.labels = chunk.slice(1, 1, T + 1).contiguous();
        fo.mtp_lambda = 0.3;  // MTP heads train (a model without them ignores it)
        rhine::nn::ForwardOutput out;
        {
          rhine::AutocastGuard cast(at::kCPU, at::kBFloat16, a.autocast);
          out = lm->forward(chunk.slice(1, 0, T).contiguous(), fo);
        }
        at::Tensor loss = out.loss / static_cast<double>(a.accum);
        loss.backward();
        loss_sum += loss.item<double>();
        if (out.expert_counts.defined()) counts = counts.defined() ? counts + out.expert_counts : out.expert_counts;
      }
      double norm = 0;
      if (fsdp) {
        fsdp->finish();
        norm = a.clip > 0 ? fsdp->clip_grad_norm(a.clip) : fsdp->grad_norm();
      } else {
        if (sync) sync->finish();
        norm = (a.clip > 0 ? rhine::clip_grad_norm(stepped_tensors, a.clip) : rhine::grad_norm(stepped_tensors))
                   .item<double>();
      }
      report["losses"].push_back(world.host_sum({loss_sum})[0] / n);
      report["norms"].push_back(norm);
      opt.step();
      opt.zero_grad();
      if (counts.defined()) {
        at::Tensor global = counts.to(at::kDouble).contiguous();
        world.host_all_reduce_(global);
        lm->update_router_bias(global.to(at::kLong), 1e-3);
      }
    }
    if (a.save_at == a.steps) save(world, lm, fsdp.get(), opt, model_params, a.ckpt_dir, a.steps);
    if (fsdp) {
      const auto m = fsdp->memory();
      report["memory"] = {{"model_elements", m.model_elements},
                          {"shard_elements", m.shard_elements},
                          {"expert_elements", m.expert_elements},
                          {"buffer_elements", m.buffer_elements},
                          {"gathered_elements", m.gathered_elements},
                          {"peak_gathered_elements", m.peak_gathered_elements},
                          {"peak_full_grad_elements", m.peak_full_grad_elements},
                          {"largest_unit_elements", m.largest_unit_elements}};
    }
    // Every parameter whole, in the model's order (gathered under FSDP: collective).
    std::vector<at::Tensor> whole;
    for (const auto& p : model_params)
      whole.push_back(fsdp ? fsdp->full_parameter(p.name) : p.tensor.detach());
    if (rank == 0) {
      std::ofstream f(a.out + ".params", std::ios::binary);
      for (const auto& t : whole) {
        at::Tensor d = t.to(at::kDouble).contiguous();
        f.write(static_cast<const char*>(d.data_ptr()), static_cast<std::streamsize>(d.numel() * 8));
      }
    }
    std::ofstream(prefix + ".json") << report.dump() << "\n";
    world.barrier();
    return 0;
  } catch (const rhine::Error& e) {
    std::ofstream(prefix + ".err") << e.what() << "\n";
    std::fprintf(stderr, "rank %d: %s\n", rank, e.what());
    std::fflush(stderr);
    std::_Exit(3);
  }
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse(argc, argv));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fsdp_worker: %s\n", e.what());
    return 2;
  }
}
