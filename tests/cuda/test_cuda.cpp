// GPU tests (label "cuda"): a bf16 training step on cuda against the same step
// on the CPU, the MoE grouped-GEMM dispatch against per-expert calls, packed
// documents through the variable-length flash kernel against the dense twin,
// greedy generation, checkpoint tensors saved from and loaded onto the device,
// and a one-rank NCCL world carrying every collective the Trainer issues, data
// parallel, ZeRO-1 and FSDP (ZeRO-3 and ZeRO-2, fp32 and bf16 gathers).
// Without a CUDA device (or without a CUDA build) each test reports itself
// skipped; scripts/gpu-check.sh sets RHINE_REQUIRE_GPU=1, which turns such a
// skip into a failure on the GPU machine.
//
// Tolerances (METHOD: ||a - b|| / ||b||): fp32 on both devices 1e-4 (cuBLAS
// and OpenBLAS sum in different orders; TF32 is off in LibTorch by default);
// bf16 autocast 3e-2 (bf16 keeps 8 bits of mantissa, and the two devices
// round different intermediate products).
#include <ATen/ops/allclose.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/randint.h>
#include <ATen/ops/zeros.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>

#include "rhine/dist/fsdp.h"
#include "rhine/dist/grad_sync.h"
#include "rhine/dist/sharded_optimizer.h"
#include "rhine/dist/world.h"
#include "rhine/io/safetensors.h"
#include "rhine/nn/generate.h"
#include "rhine/nn/moe.h"
#include "rhine/torch/compat.h"
#include "rhine/torch/cuda.h"
#include "rhine/torch/runtime.h"
#include "rhine/torch/sync.h"
#include "test_util.h"
#include "trainer_fixture.h"

namespace fs = std::filesystem;

namespace {

bool gpu_required() {
  const char* v = std::getenv("RHINE_REQUIRE_GPU");
  return v != nullptr && std::string(v) == "1";
}

// Ends the test case as skipped unless a CUDA device is there.
#define RHINE_NEED_GPU()                                                                        \
  do {                                                                                          \
    if (!rhine::cuda::available()) {                                                            \
      const std::string why = rhine::cuda::compiled_with_cuda()                                 \
                                  ? "no CUDA device visible"                                    \
                                  : "Rhine built without CUDA (scripts/build.sh --torch=wheel)"; \
      if (gpu_required()) FAIL("RHINE_REQUIRE_GPU=1 but " << why);                              \
      rhine::test::record_skip(why + "; run scripts/gpu-check.sh on a GPU machine");            \
      return;                                                                                   \
    }                                                                                           \
  } while (false)

double rel(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor x = a.detach().to(at::kCPU, at::kDouble), y = b.detach().to(at::kCPU, at::kDouble);
  REQUIRE(x.isfinite().all().item<bool>());
  return (x - y).norm().item<double>() / std::max(y.norm().item<double>(), 1e-30);
}

const c10::Device kGpu(c10::DeviceType::CUDA, 0);

struct Shards {
  fs::path dir = rhine::test::temp_dir("cuda_shards");
  Shards() { rhine::test::write_tiny_shards(dir); }
};

/// Losses of `steps` Trainer steps of TinyRun on `device`.
std::vector<double> train_losses(const fs::path& shards, c10::Device device, bool bf16, int steps,
                                 rhine::dist::World* world = nullptr, bool zero1 = false, int fsdp_stage = 0,
                                 c10::ScalarType param_dtype = at::kFloat) {
  rhine::test::TinyRun run(shards, 4);
  run.model->to(device);
  rhine::train::TrainerOptions o;
  o.max_steps = steps;
  o.log_every = 1;
  o.progress = false;
  o.bf16 = bf16;
  rhine::NamedParameters params;
  for (const auto& p : run.model->named_parameters()) params.push_back({p.key(), p.value()});
  std::unique_ptr<rhine::dist::GradientSync> sync;
  std::unique_ptr<rhine::dist::ShardedOptimizer> sharded;
  std::unique_ptr<rhine::train::Trainer> trainer;
  std::unique_ptr<rhine::dist::FSDP> fsdp;
  std::unique_ptr<rhine::AdamW> fsdp_adamw;
  if (world != nullptr && fsdp_stage == 0) {
    rhine::dist::broadcast_parameters(*world, run.model->parameters());
    sync = std::make_unique<rhine::dist::GradientSync>(*world, params);
  }
  if (fsdp_stage > 0) {  // FSDP on the device: NCCL gathers and reduce-scatters
    rhine::dist::FSDPOptions fo;
    fo.zero_stage = fsdp_stage;
    fo.param_dtype = param_dtype;
    fsdp = std::make_unique<rhine::dist::FSDP>(*world, run.model, fo);
    fsdp_adamw = std::make_unique<rhine::AdamW>(fsdp->parameters(), rhine::test::tiny_adamw_options());
    trainer = std::make_unique<rhine::train::Trainer>(run.model, *fsdp_adamw, run.schedule, *run.loader, o);
    trainer->set_fsdp(world, fsdp.get());
  } else if (zero1) {
    sharded = std::make_unique<rhine::dist::ShardedOptimizer>(*world, params, [](const rhine::NamedParameters& s) {
      return std::make_unique<rhine::AdamW>(s, rhine::test::tiny_adamw_options());
    });
    trainer = std::make_unique<rhine::train::Trainer>(run.model, *sharded, run.schedule, *run.loader, o);
  } else {
    trainer = std::make_unique<rhine::train::Trainer>(run.model, *run.optimizer, run.schedule, *run.loader, o);
  }
  if (world != nullptr && !fsdp) trainer->set_data_parallel(world, sync.get());
  std::vector<double> losses;
  trainer->callbacks().on_step = [&](const rhine::train::StepMetrics& m) { losses.push_back(m.loss); };
  trainer->fit();
  return losses;
}
}  // namespace

TEST_CASE("a training step on cuda equals the CPU step (fp32 and bf16 autocast)", "[cuda]") {
  RHINE_NEED_GPU();
  rhine::set_threads(2);
  Shards s;
  // Forward + backward of the same model and batch on both devices.
  for (const bool bf16 : {false, true}) {
    rhine::test::TinyRun cpu(s.dir, 4), gpu(s.dir, 4);
    gpu.model->to(kGpu);
    at::Tensor ids = at::randint(rhine::test::kVocab, {4, 17}, at::TensorOptions().dtype(at::kLong));
    auto step = [&](rhine::nn::CausalLM& m, c10::Device d) {
      rhine::nn::ForwardOptions fo;
      fo.labels = ids.slice(1, 1).to(d);
      rhine::AutocastGuard autocast(d.type(), at::kBFloat16, bf16);
      auto out = m->forward(ids.slice(1, 0, 16).to(d), fo);
      out.loss.backward();
      return out.loss.detach().to(at::kCPU, at::kFloat);
    };
    const at::Tensor l_cpu = step(cpu.model, at::kCPU), l_gpu = step(gpu.model, kGpu);
    const double tol = bf16 ? 3e-2 : 1e-4;
    CHECK(rel(l_gpu, l_cpu) < tol);
    const auto pc = cpu.model->named_parameters(), pg = gpu.model->named_parameters();
    for (const auto& p : pc) {
      INFO(p.key() << (bf16 ? " bf16" : " fp32"));
      CHECK(rel(pg[p.key()].grad(), p.value().grad()) < tol);
    }
  }
  // Whole Trainer steps (AdamW included): the same losses step by step.
  const auto lc = train_losses(s.dir, at::kCPU, true, 3), lg = train_losses(s.dir, kGpu, true, 3);
  REQUIRE(lc.size() == 3);
  REQUIRE(lg.size() == 3);
  for (std::size_t i = 0; i < 3; ++i) CHECK(std::abs(lg[i] - lc[i]) / lc[i] < 3e-2);
}

TEST_CASE("a Trainer step on cuda synchronises the host only in its one counted read", "[cuda]") {
  RHINE_NEED_GPU();
  Shards s;
  for (const bool bf16 : {false, true}) {
    INFO((bf16 ? "bf16" : "fp32"));
    rhine::test::TinyRun run(s.dir, 4);
    run.model->to(kGpu);
    rhine::train::TrainerOptions o;
    o.max_steps = 3;
    o.log_every = 1;
    o.progress = false;
    o.bf16 = bf16;
    o.grad_accum = 2;
    rhine::train::Trainer t(run.model, *run.optimizer, run.schedule, *run.loader, o);
    std::vector<std::uint64_t> per_step;
    std::uint64_t start = 0;
    int batches = 0;
    t.callbacks().on_batch = [&](const rhine::Batch&) {
      if (batches++ % o.grad_accum == 0) start = rhine::host_sync_count();
    };
    t.callbacks().on_step = [&](const rhine::train::StepMetrics& m) {
      per_step.push_back(rhine::host_sync_count() - start);
      CHECK(std::isfinite(m.loss));
    };
    {
      // Any other synchronisation throws, LibTorch's included: a blocking copy
      // of the batch to the device, an op that reads a size to the host.
      rhine::cuda::SyncErrorGuard no_sync;
      t.fit();
    }
    REQUIRE(per_step.size() == 3);
    for (const auto n : per_step) CHECK(n == 1);
  }
}

TEST_CASE("MoE on cuda under bf16 autocast runs the grouped GEMM, equal to per-expert calls", "[cuda]") {
  RHINE_NEED_GPU();
  REQUIRE(rhine::nn::grouped_gemm_available());
  rhine::nn::ModelConfig c = rhine::nn::ModelConfig::from_json(rhine::Json{
      {"model_type", "deepseek_v3"}, {"vocab_size", 64}, {"hidden_size", 64}, {"intermediate_size", 128},
      {"num_hidden_layers", 2}, {"num_attention_heads", 2}, {"num_key_value_heads", 2},
      {"q_lora_rank", nullptr}, {"kv_lora_rank", 16}, {"qk_nope_head_dim", 16}, {"qk_rope_head_dim", 16},
      {"v_head_dim", 16}, {"n_routed_experts", 8}, {"n_shared_experts", 1}, {"num_experts_per_tok", 2},
      {"moe_intermediate_size", 32}, {"first_k_dense_replace", 1}, {"n_group", 1}, {"topk_group", 1},
      {"routed_scaling_factor", 2.5}, {"scoring_func", "sigmoid"}, {"topk_method", "noaux_tc"},
      {"norm_topk_prob", true}});
  at::manual_seed(3);
  rhine::nn::MoE gg(c), per(c);
  {
    at::NoGradGuard g;
    auto pp = per->named_parameters();
    for (auto& p : gg->named_parameters()) pp[p.key()].copy_(p.value());
  }
  gg->to(kGpu);
  per->to(kGpu);
  CHECK_FALSE(gg->experts_packed());
  gg->pack_experts();  // after the move, as rhine-train and the HF import do
  CHECK(gg->experts_packed());
  per->dispatch = rhine::nn::MoEDispatch::Grouped;  // gg keeps Auto: the grouped GEMM on cuda in bf16
  const at::Tensor x = at::randn({4, 64, 64}).to(kGpu);
  const at::Tensor proj = at::randn({4, 64, 64}).to(kGpu);
  auto run = [&](rhine::nn::MoE& m) {
    at::Tensor xi = x.clone().requires_grad_(true);
    rhine::AutocastGuard autocast(c10::DeviceType::CUDA, at::kBFloat16);
    at::Tensor y = m(xi).y;
    (y.to(at::kFloat) * proj).sum().backward();
    return std::make_pair(y.detach(), xi.grad());
  };
  const auto syncs = rhine::host_sync_count();
  std::pair<at::Tensor, at::Tensor> a;
  {
    // No host read of the expert counts, Rhine's own or inside LibTorch's ops
    // (CUDA's at::bincount read its input's min and max to the host).
    rhine::cuda::SyncErrorGuard no_sync;
    a = run(gg);
  }
  const auto& [ya, ga] = a;
  CHECK(rhine::host_sync_count() == syncs);
  const auto [yb, gb] = run(per);
  CHECK(rel(ya, yb) < 3e-2);
  CHECK(rel(ga, gb) < 3e-2);
  const auto pp = per->named_parameters();
  for (const auto& p : gg->named_parameters()) {
    INFO(p.key());
    if (!pp[p.key()].grad().defined()) continue;  // an expert no token chose (zero in gg)
    CHECK(rel(p.value().grad(), pp[p.key()].grad()) < 3e-2);
  }
}

TEST_CASE("packed documents on cuda run the variable-length flash kernel, equal to the fp32 CPU twin", "[cuda]") {
  RHINE_NEED_GPU();
  // GQA heads of one width (Llama) and a narrower V (MLA: V is zero-padded to
  // the query head dim for the kernel and the output cut back).
  for (const int64_t Dv : {64, 32}) {
    INFO("Dv " << Dv);
    at::manual_seed(11);
    const int64_t B = 2, H = 4, Hkv = 2, T = 96, D = 64;
    const std::vector<std::vector<int64_t>> starts = {{0, 17, 40}, {0, 1, 95}};
    // [B, T, heads, dim] transposed, as the model's projections give them.
    const at::Tensor q32 = at::randn({B, T, H, D}).transpose(1, 2), k32 = at::randn({B, T, Hkv, D}).transpose(1, 2),
                     v32 = at::randn({B, T, Hkv, Dv}).transpose(1, 2), w = at::randn({B, H, T, Dv});
    rhine::AttentionOptions o;
    o.is_causal = true;
    o.document_starts = starts;
    auto run = [&](c10::Device device, c10::ScalarType dtype, bool twin) {
      std::vector<at::Tensor> in;
      for (const auto& t : {q32, k32, v32}) in.push_back(t.to(device, dtype).detach().requires_grad_(true));
      const at::Tensor wd = w.to(device);
      // On cuda, forward and backward with every host synchronisation an error
      // (LibTorch's too): the offsets go up, nothing comes back.
      std::optional<rhine::cuda::SyncErrorGuard> no_sync;
      if (device.is_cuda()) no_sync.emplace();
      at::Tensor y = twin ? rhine::attention_reference(in[0], in[1], in[2], o) : rhine::attention(in[0], in[1], in[2], o);
      (y.to(at::kFloat) * wd).sum().backward();
      return std::vector<at::Tensor>{y.detach(), in[0].grad(), in[1].grad(), in[2].grad()};
    };
    const at::Tensor qg = q32.to(kGpu, at::kBFloat16), kg = k32.to(kGpu, at::kBFloat16), vg = v32.to(kGpu, at::kBFloat16);
    CHECK(rhine::attention_backend(qg, kg, vg, o) == "flash-varlen");
    const auto syncs = rhine::host_sync_count();
    const auto gpu = run(kGpu, at::kBFloat16, false);
    CHECK(rhine::host_sync_count() == syncs);
    const auto cpu = run(at::kCPU, at::kFloat, true);  // the dense document mask, fp32
    const char* names[] = {"out", "dq", "dk", "dv"};
    for (std::size_t i = 0; i < gpu.size(); ++i) {
      INFO(names[i]);
      CHECK(rel(gpu[i], cpu[i]) < 3e-2);
    }
    // fp32 on cuda is not served by the flash kernel: one call per document.
    CHECK(rhine::attention_backend(q32.to(kGpu), k32.to(kGpu), v32.to(kGpu), o).rfind("per-document/", 0) == 0);
    // Under bf16 autocast, fp32 inputs (q and k after a QK-norm with fp32
    // weights) are cast once and served by the flash kernel, as bf16 ones are.
    {
      rhine::AutocastGuard amp(c10::DeviceType::CUDA, at::kBFloat16);
      CHECK(rhine::attention_backend(q32.to(kGpu), k32.to(kGpu), v32.to(kGpu), o) == "flash-varlen");
      const at::Tensor y = rhine::attention(q32.to(kGpu), k32.to(kGpu), v32.to(kGpu), o);
      CHECK(y.scalar_type() == at::kBFloat16);
      CHECK(rel(y, gpu[0]) < 1e-6);  // the same kernel on the same bf16 inputs
    }
  }
}

TEST_CASE("greedy generation on cuda gives the CPU's tokens", "[cuda]") {
  RHINE_NEED_GPU();
  rhine::nn::CausalLMOptions mo;
  mo.init_seed = 5;
  rhine::nn::CausalLM cpu(rhine::test::tiny_config(), mo), gpu(rhine::test::tiny_config(), mo);
  gpu->to(kGpu);
  rhine::nn::GenerateOptions go;
  go.max_new_tokens = 12;
  const std::vector<std::vector<std::int64_t>> prompts{{1, 2, 3, 4}, {9, 8}};
  const auto a = rhine::nn::generate(cpu, prompts, go), b = rhine::nn::generate(gpu, prompts, go);
  CHECK(a.tokens == b.tokens);
}

TEST_CASE("checkpoint tensors saved from cuda load back onto cuda unchanged", "[cuda]") {
  RHINE_NEED_GPU();
  rhine::nn::CausalLMOptions mo;
  mo.init_seed = 6;
  rhine::nn::CausalLM lm(rhine::test::tiny_config(), mo);
  lm->to(kGpu);
  const auto state = rhine::train::model_state(lm);
  const fs::path dir = rhine::test::temp_dir("cuda_ckpt");
  rhine::save_safetensors((dir / "model.safetensors").string(), state);
  rhine::nn::CausalLM back(rhine::test::tiny_config(), rhine::nn::CausalLMOptions{});
  back->to(kGpu);
  rhine::train::load_model_state(back, rhine::load_safetensors((dir / "model.safetensors").string()));
  for (const auto& [name, t] : rhine::train::model_state(back)) {
    INFO(name);
    CHECK(t.is_cuda());
    CHECK(t.equal(state.at(name)));
  }
  const auto m = rhine::cuda::memory_stats(kGpu);
  CHECK(m.allocated > 0);
  CHECK(m.peak_allocated >= m.allocated);
  CHECK(m.total > m.reserved);
}

TEST_CASE("a one-rank NCCL world serves every Trainer collective", "[cuda]") {
  RHINE_NEED_GPU();
  rhine::dist::Rendezvous rv;
  rv.master_port = rhine::test::free_port();
  rhine::dist::DistOptions o;
  o.backend = "nccl";
  o.group_for_one_rank = true;
  o.timeout = std::chrono::seconds(60);
  auto world = rhine::dist::init(rv, o);
  REQUIRE(world.backend() == "nccl");
  REQUIRE(world.device() == kGpu);
  // Device group: CUDA tensors only; a host tensor is a [dist] error, not an NCCL crash.
  at::Tensor t = world.to_device(at::arange(4, at::kFloat));
  world.all_reduce_(t);
  world.broadcast_(t, 0);
  CHECK(world.all_gather(t).at(0).equal(t));
  at::Tensor into = world.device_zeros(4, at::kFloat), out = world.device_zeros(4, at::kFloat);
  world.all_gather_into_tensor(into, t);
  world.reduce_scatter_tensor(out, t, rhine::dist::ReduceOp::kAvg);
  CHECK(into.equal(t));
  CHECK(out.equal(t));
  at::Tensor host = at::ones({2}, at::kDouble);
  CHECK_THROWS_WITH(world.all_reduce_(host), Catch::Contains("[dist]") && Catch::Contains("host_"));
  // Host group: CPU scalars.
  world.host_all_reduce_(host);
  CHECK(world.host_sum({1.0, 2.0}) == std::vector<double>{1.0, 2.0});
  CHECK(world.host_all_gather_bytes("abc") == std::vector<std::string>{"abc"});
  world.barrier();
  // The Trainer on it, plain and ZeRO-1: the losses of one process without a World.
  Shards s;
  const auto solo = train_losses(s.dir, kGpu, false, 3);
  for (const bool zero1 : {false, true}) {
    const auto dp = train_losses(s.dir, kGpu, false, 3, &world, zero1);
    REQUIRE(dp.size() == solo.size());
    for (std::size_t i = 0; i < dp.size(); ++i) CHECK(std::abs(dp[i] - solo[i]) <= 1e-5 * std::abs(solo[i]));
  }
  // FSDP on the GPU (ZeRO-3, ZeRO-2; fp32 gathers): the same losses; bf16 gathers within bf16's precision.
  for (const int stage : {3, 2}) {
    INFO("FSDP ZeRO-" << stage);
    const auto f = train_losses(s.dir, kGpu, false, 3, &world, false, stage);
    REQUIRE(f.size() == solo.size());
    for (std::size_t i = 0; i < f.size(); ++i) CHECK(std::abs(f[i] - solo[i]) <= 1e-5 * std::abs(solo[i]));
  }
  const auto fb = train_losses(s.dir, kGpu, true, 3, &world, false, 3, at::kBFloat16);
  REQUIRE(fb.size() == solo.size());
  for (std::size_t i = 0; i < fb.size(); ++i) CHECK(std::abs(fb[i] - solo[i]) <= 3e-2 * std::abs(solo[i]));
}
