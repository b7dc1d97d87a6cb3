// AdamW against LibTorch's own torch::optim::AdamW (bit for bit), the fused
// pass against its reference twin, the decay-group builder, and contracts.
#include "torch_test.h"

#include <torch/optim/adamw.h>

#include <cmath>
#include <vector>

#include "rhine/core/error.h"
#include "rhine/optim/adamw.h"

using Catch::Matchers::Contains;

namespace {

// Shapes of a small Llama-like model, names as in HF checkpoints.
rhine::NamedParameters make_params(uint64_t seed, at::ScalarType dtype = at::kFloat) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const std::vector<std::pair<std::string, std::vector<int64_t>>> shapes = {
      {"model.embed_tokens.weight", {50, 16}},
      {"model.layers.0.input_layernorm.weight", {16}},
      {"model.layers.0.self_attn.q_proj.weight", {16, 16}},
      {"model.layers.0.self_attn.q_proj.bias", {16}},
      {"model.layers.0.mlp.up_proj.weight", {40, 16}},
      {"model.layers.0.mlp.down_proj.weight", {16, 40}},
      {"model.norm.weight", {16}},
      {"lm_head.weight", {50, 16}},
      {"conv.weight", {4, 3, 3, 2}}};
  rhine::NamedParameters out;
  for (const auto& [name, shape] : shapes)
    out.push_back({name, at::randn(shape, gen, at::TensorOptions().dtype(dtype)).requires_grad_(true)});
  return out;
}

rhine::NamedParameters clone_params(const rhine::NamedParameters& ps) {
  rhine::NamedParameters out;
  for (const auto& np : ps) out.push_back({np.name, np.tensor.detach().clone().requires_grad_(true)});
  return out;
}

// Random gradients for step `step`; every 7th step leaves one parameter without one.
void set_grads(const std::vector<rhine::NamedParameters*>& copies, int step) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1000 + step);
  const auto n = copies.front()->size();
  for (size_t i = 0; i < n; ++i) {
    const auto& ref = (*copies.front())[i].tensor;
    const bool skip = step % 7 == 3 && i == static_cast<size_t>(step) % n;
    at::Tensor g = skip ? at::Tensor() : at::randn(ref.sizes(), gen, ref.options().requires_grad(false)) * (1.0 + 0.5 * std::sin(step));
    for (auto* c : copies) (*c)[i].tensor.mutable_grad() = g.defined() ? g.clone() : at::Tensor();
  }
}

double rel_err(const at::Tensor& a, const at::Tensor& b) {
  const double nb = b.to(at::kDouble).norm().item<double>();
  const double d = (a.to(at::kDouble) - b.to(at::kDouble)).norm().item<double>();
  return nb == 0 ? d : d / nb;  // NaN propagates and fails every "<" check
}

std::vector<at::Tensor> tensors(const rhine::NamedParameters& ps) {
  std::vector<at::Tensor> out;
  for (const auto& np : ps) out.push_back(np.tensor);
  return out;
}

}  // namespace

TEST_CASE("AdamW (reference and foreach) equals torch::optim::AdamW bit for bit over 300 steps", "[adamw]") {
  for (auto impl : {rhine::OptimizerImpl::kReference, rhine::OptimizerImpl::kForeach}) {
    auto mine = make_params(7), theirs = clone_params(mine);
    rhine::AdamWOptions o;
    o.lr = 3e-3, o.beta1 = 0.85, o.beta2 = 0.97, o.eps = 1e-7, o.weight_decay = 0.1;
    rhine::AdamW opt(rhine::decay_groups(mine, o), impl);
    REQUIRE(opt.param_groups().size() == 2);

    // The same groups for LibTorch, split by the same names.
    auto split = rhine::split_by_decay(theirs);
    std::vector<torch::optim::OptimizerParamGroup> groups;
    auto to = [&](double wd) {
      auto t = std::make_unique<torch::optim::AdamWOptions>(o.lr);
      t->betas({o.beta1, o.beta2}).eps(o.eps).weight_decay(wd);
      return t;
    };
    groups.emplace_back(tensors(split.decay), to(o.weight_decay));
    groups.emplace_back(tensors(split.no_decay), to(0.0));
    torch::optim::AdamW ref(groups, torch::optim::AdamWOptions(o.lr));

    for (int step = 0; step < 300; ++step) {
      set_grads({&mine, &theirs}, step);
      if (step == 150) {  // group options may change mid-run (e.g. an lr drop)
        opt.group_options(0).lr *= 0.5;
        static_cast<torch::optim::AdamWOptions&>(ref.param_groups()[0].options()).lr(o.lr * 0.5);
      }
      opt.step();
      ref.step();
    }
    for (size_t i = 0; i < mine.size(); ++i) {
      INFO(to_string(impl) << " " << mine[i].name);
      CHECK(at::equal(mine[i].tensor, theirs[i].tensor));
    }
    CHECK(opt.n_steps() == 300);
    CHECK(opt.param_step("lm_head.weight") < 300);  // it missed some gradients
  }
}

TEST_CASE("fused AdamW matches its reference twin (fp32 and fp64) and falls back exactly", "[adamw]") {
  for (auto dtype : {at::kFloat, at::kDouble}) {
    auto a = make_params(11, dtype), b = clone_params(a);
    rhine::AdamWOptions o;
    o.lr = 1e-2, o.weight_decay = 0.05;
    rhine::AdamW fused(rhine::decay_groups(a, o), rhine::OptimizerImpl::kFused);
    rhine::AdamW ref(rhine::decay_groups(b, o), rhine::OptimizerImpl::kReference);
    double worst = 0;
    for (int step = 0; step < 200; ++step) {
      set_grads({&a, &b}, step);
      fused.step();
      ref.step();
      for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, rel_err(a[i].tensor, b[i].tensor));
    }
    // METHOD: max over steps and parameters of ||fused - ref|| / ||ref||.
    // fp32: rounding differences of about 1 ulp per step, accumulated over 200 steps.
    INFO("dtype " << dtype << " worst rel err " << worst);
    CHECK(worst < (dtype == at::kFloat ? 1e-5 : 1e-13));
    const auto sa = fused.state_dict(), sb = ref.state_dict();
    for (const auto& [k, t] : sb.tensors) CHECK(rel_err(sa.tensors.at(k), t) < (dtype == at::kFloat ? 1e-5 : 1e-13));
  }
  SECTION("bf16 and strided parameters take the foreach path, equal to the reference") {
    rhine::NamedParameters a = {{"w", at::randn({12, 8}).t().requires_grad_(true)},  // strided
                                {"h", at::randn({20}).to(at::kBFloat16).requires_grad_(true)}};
    rhine::NamedParameters b = clone_params(a);
    b[0].tensor = a[0].tensor.detach().contiguous().requires_grad_(true);
    REQUIRE_FALSE(a[0].tensor.is_contiguous());
    rhine::AdamW fused(a, rhine::AdamWOptions{}, rhine::OptimizerImpl::kFused);
    rhine::AdamW ref(b, rhine::AdamWOptions{}, rhine::OptimizerImpl::kReference);
    for (int step = 0; step < 20; ++step) {
      set_grads({&a, &b}, step + 1);
      fused.step();
      ref.step();
    }
    CHECK(at::equal(a[0].tensor, b[0].tensor));
    CHECK(at::equal(a[1].tensor, b[1].tensor));
  }
}

TEST_CASE("AdamW writes each fp32 weight's bf16 copy in its update, equal to a cast", "[adamw][copies]") {
  for (auto impl : {rhine::OptimizerImpl::kFused, rhine::OptimizerImpl::kForeach, rhine::OptimizerImpl::kReference}) {
    INFO("impl " << static_cast<int>(impl));
    auto a = make_params(12), b = clone_params(a);
    a.push_back({"strided", at::randn({12, 8}).t().requires_grad_(true)});  // not fusable: cast after
    b.push_back({"strided", a.back().tensor.detach().clone().requires_grad_(true)});
    rhine::AdamWOptions o;
    o.lr = 1e-2, o.weight_decay = 0.05;
    rhine::AdamW with(rhine::decay_groups(a, o), impl), without(rhine::decay_groups(b, o), impl);
    with.set_weight_copies(at::kBFloat16);
    // Copies are written for the weights a layer asked for (autocast_weight
    // records the requests): here all but the norm.
    for (const auto& np : a)
      if (np.name != "model.norm.weight") with.weight_copies().request(np.tensor);
    for (int step = 0; step < 5; ++step) {
      set_grads({&a, &b}, step);
      with.step();
      without.step();
      for (size_t i = 0; i < a.size(); ++i) {
        INFO(a[i].name << " step " << step);
        CHECK(at::equal(a[i].tensor, b[i].tensor));  // the update itself is unchanged
        const at::Tensor* copy = with.weight_copies().find(a[i].tensor, at::kBFloat16);
        const bool had_grad = a[i].tensor.grad().defined();
        if (a[i].name == "model.norm.weight") {
          CHECK(copy == nullptr);  // never requested
          continue;
        }
        if (!had_grad) continue;  // skipped by the step: its copy (if any) is from an earlier step
        REQUIRE(copy != nullptr);
        CHECK(at::equal(*copy, a[i].tensor.detach().to(at::kBFloat16)));  // round to nearest even, as a cast
        CHECK(with.weight_copies().find(a[i].tensor, at::kHalf) == nullptr);
      }
    }
    CHECK(with.weight_copies().size() == a.size() - 1);
    // A change to the weight outside the optimizer makes its copy stale.
    {
      at::NoGradGuard g;
      a[2].tensor.mul_(2);
    }
    CHECK(with.weight_copies().find(a[2].tensor, at::kBFloat16) == nullptr);
    CHECK(with.weight_copies().find(a[3].tensor, at::kBFloat16) != nullptr);
    // Another tensor of the same shape has no copy.
    CHECK(with.weight_copies().find(a[3].tensor.detach().clone(), at::kBFloat16) == nullptr);
    // Nor does a weight whose storage was swapped (set_data keeps its version, as Module::to does).
    {
      at::NoGradGuard g;
      a[3].tensor.set_data(a[3].tensor.detach().clone());
    }
    CHECK(with.weight_copies().find(a[3].tensor, at::kBFloat16) == nullptr);
    // A copy still referenced (say by a graph kept past the step) is not overwritten.
    const at::Tensor* kept = with.weight_copies().find(a[4].tensor, at::kBFloat16);
    REQUIRE(kept != nullptr);
    const at::Tensor held = *kept;
    const at::Tensor before = held.clone();
    set_grads({&a, &b}, 7);
    with.step();
    CHECK(at::equal(held, before));
    CHECK(with.weight_copies().find(a[4].tensor, at::kBFloat16)->data_ptr() != held.data_ptr());
  }
  rhine::NamedParameters d = {{"w", at::randn({4, 4}, at::kDouble).requires_grad_(true)}};
  rhine::AdamW f64(d, rhine::AdamWOptions{});
  f64.set_weight_copies(at::kBFloat16);
  f64.weight_copies().request(d[0].tensor);
  d[0].tensor.mutable_grad() = at::ones({4, 4}, at::kDouble);
  f64.step();
  CHECK(f64.weight_copies().size() == 0);  // only fp32 parameters get copies
  CHECK_THROWS_WITH(f64.set_weight_copies(at::kFloat), Contains("[adamw] weight copies are bf16 or fp16"));
}

TEST_CASE("decay groups: norms, biases, embeddings and 1-D parameters get no decay", "[adamw]") {
  auto ps = make_params(1);
  auto split = rhine::split_by_decay(ps);
  std::vector<std::string> no_decay;
  for (const auto& np : split.no_decay) no_decay.push_back(np.name);
  CHECK(no_decay == std::vector<std::string>{"model.embed_tokens.weight",
                                             "model.layers.0.input_layernorm.weight",
                                             "model.layers.0.self_attn.q_proj.bias",
                                             "model.norm.weight"});
  CHECK(split.decay.size() == 5);
  rhine::ParamGroupRules rules;
  rules.no_decay = {"*norm*"};  // embeddings decay now; biases still by their 1 dim
  CHECK(rhine::split_by_decay(ps, rules).no_decay.size() == 3);
  rules.no_decay_below_2d = false;
  CHECK(rhine::split_by_decay(ps, rules).no_decay.size() == 2);
  auto groups = rhine::decay_groups(ps, rhine::AdamWOptions{});
  CHECK(groups[0].name == "decay");
  CHECK(groups[1].name == "no_decay");
  CHECK(groups[1].options.weight_decay == 0.0);
  CHECK(rhine::glob_match("*.bias", "a.b.bias"));
  CHECK_FALSE(rhine::glob_match("*.bias", "a.b.bias2"));
  CHECK(rhine::glob_match("layers.?.mlp*", "layers.3.mlp.up"));
  CHECK_FALSE(rhine::glob_match("layers.?.mlp*", "layers.13.mlp.up"));
}

TEST_CASE("AdamW rejects bad options, duplicate parameters and foreign state", "[adamw]") {
  auto ps = make_params(2);
  rhine::AdamWOptions bad;
  bad.beta2 = 1.0;
  CHECK_THROWS_WITH(rhine::AdamW(ps, bad), "[adamw] beta2 must be in [0, 1), got 1; e.g. 0.95");
  auto dup = ps;
  dup.push_back(ps[0]);
  CHECK_THROWS_WITH(rhine::AdamW(dup, rhine::AdamWOptions{}),
                    Contains("[adamw] parameter appears twice, got \"model.embed_tokens.weight\""));
  CHECK_THROWS_WITH(rhine::AdamWOptions::from_json({{"lr", 1e-3}, {"weight_decy", 0.1}}),
                    Contains("weight_decay"));

  rhine::AdamW a(rhine::decay_groups(ps, rhine::AdamWOptions{}));
  for (auto& np : ps) np.tensor.mutable_grad() = at::ones_like(np.tensor);
  a.step();
  auto s = a.state_dict();
  CHECK(s.tensors.size() == 2 * ps.size());
  CHECK(s.tensors.count("lm_head.weight/exp_avg_sq") == 1);
  CHECK(s.meta["param_steps"]["lm_head.weight"] == 1);

  rhine::AdamW one_group(ps, rhine::AdamWOptions{});
  CHECK_THROWS_WITH(one_group.load_state_dict(s), Contains("number of param groups differs"));
  auto other = make_params(3);
  other[2].name = "renamed";
  rhine::AdamW renamed(rhine::decay_groups(other, rhine::AdamWOptions{}));
  CHECK_THROWS_WITH(renamed.load_state_dict(s), Contains("parameter differs from the saved state"));
  s.meta["type"] = "lion";
  CHECK_THROWS_WITH(a.load_state_dict(s), Contains("[adamw] optimizer state is for another optimizer"));
}
