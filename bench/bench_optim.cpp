// Optimizer step time on a ~52M-parameter Llama-like model (fp32, CPU):
// Rhine's AdamW fused / foreach / reference twin and torch::optim::AdamW side
// by side, the fused step writing bf16 weight copies in its pass vs casting
// after it, then Muon, AdEMAMix and Lion. Prints JSON Lines (see bench.h).
#include <ATen/ATen.h>
#include <torch/optim/adamw.h>

#include <memory>
#include <string>
#include <vector>

#include "bench.h"
#include "rhine/optim/ademamix.h"
#include "rhine/optim/adamw.h"
#include "rhine/optim/lion.h"
#include "rhine/optim/muon.h"
#include "rhine/torch/runtime.h"

namespace {

// vocab 32000, hidden 512, 6 layers, GQA 8/4 heads of 64, SwiGLU 1536, untied head.
rhine::NamedParameters make_model() {
  const int64_t V = 32000, C = 512, L = 6, Ckv = 256, F = 1536;
  std::vector<std::pair<std::string, std::vector<int64_t>>> shapes = {{"model.embed_tokens.weight", {V, C}}};
  for (int64_t l = 0; l < L; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    shapes.push_back({p + "input_layernorm.weight", {C}});
    shapes.push_back({p + "self_attn.q_proj.weight", {C, C}});
    shapes.push_back({p + "self_attn.k_proj.weight", {Ckv, C}});
    shapes.push_back({p + "self_attn.v_proj.weight", {Ckv, C}});
    shapes.push_back({p + "self_attn.o_proj.weight", {C, C}});
    shapes.push_back({p + "post_attention_layernorm.weight", {C}});
    shapes.push_back({p + "mlp.gate_proj.weight", {F, C}});
    shapes.push_back({p + "mlp.up_proj.weight", {F, C}});
    shapes.push_back({p + "mlp.down_proj.weight", {C, F}});
  }
  shapes.push_back({"model.norm.weight", {C}});
  shapes.push_back({"lm_head.weight", {V, C}});
  rhine::NamedParameters out;
  for (const auto& [name, shape] : shapes) {
    auto t = (at::randn(shape) * 0.02).requires_grad_(true);
    t.mutable_grad() = at::randn(shape) * 1e-3;
    out.push_back({name, t});
  }
  return out;
}

int64_t count(const rhine::NamedParameters& ps) {
  int64_t n = 0;
  for (const auto& np : ps) n += np.tensor.numel();
  return n;
}

}  // namespace

int main() {
  auto info = rhine::init_runtime({});
  at::manual_seed(0);
  const int runs = 11;
  auto report = [&](const std::string& name, const std::string& impl, int64_t n,
                    const rhine::bench::Stats& s) {
    rhine::bench::report(name, {{"impl", impl}, {"n_params", n}, {"dtype", "fp32"},
                                {"threads", info.threads}, {"torch", info.torch_version}},
                         s, "ms", 1e3);
  };
  rhine::AdamWOptions ao;
  ao.lr = 3e-4, ao.beta2 = 0.95, ao.weight_decay = 0.1;
  for (auto impl : {rhine::OptimizerImpl::kFused, rhine::OptimizerImpl::kForeach,
                    rhine::OptimizerImpl::kReference}) {
    auto ps = make_model();
    rhine::AdamW opt(rhine::decay_groups(ps, ao), impl);
    report("adamw_step", "rhine_" + rhine::to_string(impl), count(ps),
           rhine::bench::time_runs([&] { opt.step(); }, runs));
  }
  // The step plus each weight's bf16 copy for the next forward: written in the
  // fused pass (AdamW::set_weight_copies) vs cast after the step, as autocast
  // casts in the forward (both fresh copies of every fp32 parameter).
  for (const bool in_pass : {true, false}) {
    auto ps = make_model();
    rhine::AdamW opt(rhine::decay_groups(ps, ao), rhine::OptimizerImpl::kFused);
    if (in_pass) opt.set_weight_copies(at::kBFloat16);
    std::vector<at::Tensor> casts(ps.size());
    report("adamw_step_bf16_copies", in_pass ? "rhine_fused_copy_in_pass" : "rhine_fused_then_cast", count(ps),
           rhine::bench::time_runs([&] {
             opt.step();
             if (!in_pass)
               for (std::size_t i = 0; i < ps.size(); ++i) casts[i] = ps[i].tensor.detach().to(at::kBFloat16);
           }, runs));
  }
  {
    auto ps = make_model();
    auto split = rhine::split_by_decay(ps);
    auto tensors = [](const rhine::NamedParameters& v) {
      std::vector<at::Tensor> t;
      for (const auto& np : v) t.push_back(np.tensor);
      return t;
    };
    std::vector<torch::optim::OptimizerParamGroup> groups;
    auto opts = [&](double wd) {
      auto o = std::make_unique<torch::optim::AdamWOptions>(ao.lr);
      o->betas({ao.beta1, ao.beta2}).eps(ao.eps).weight_decay(wd);
      return o;
    };
    groups.emplace_back(tensors(split.decay), opts(ao.weight_decay));
    groups.emplace_back(tensors(split.no_decay), opts(0.0));
    torch::optim::AdamW opt(groups, torch::optim::AdamWOptions(ao.lr));
    report("adamw_step", "torch_optim_adamw", count(ps),
           rhine::bench::time_runs([&] { opt.step(); }, runs));
  }
  {
    auto ps = make_model();
    rhine::MuonOptions mo;
    rhine::Muon opt(rhine::muon_groups(ps, mo));
    report("muon_step", "rhine_bf16_ns5", count(ps), rhine::bench::time_runs([&] { opt.step(); }, 5, 1));
  }
  {
    auto ps = make_model();
    rhine::AdEMAMix opt(rhine::decay_groups(ps, rhine::AdEMAMixOptions{}));
    report("ademamix_step", "rhine_reference", count(ps), rhine::bench::time_runs([&] { opt.step(); }, 5, 1));
  }
  {
    auto ps = make_model();
    rhine::Lion opt(rhine::decay_groups(ps, rhine::LionOptions{}));
    report("lion_step", "rhine_reference", count(ps), rhine::bench::time_runs([&] { opt.step(); }, 5, 1));
  }
  return 0;
}
