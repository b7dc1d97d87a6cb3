// Building blocks: RoPE frequencies against the generator script and the worked
// values of docs/architectures.md, RoPE layouts against closed forms, RMSNorm and xIELU
// against their formulas, finite-difference gradients per block (float64), and
// GQA == MHA with repeated KV heads.
#include "nn_fixtures.h"

#include <ATen/core/grad_mode.h>
#include <cmath>

#include "rhine/nn/layers.h"

using namespace rhine::nn;
using Catch::Matchers::Contains;
using nn_test::rel_err;

namespace {

RopeParameters rope_from_json(const rhine::Json& r) {
  // Through the config reader, as a real config.json would go.
  rhine::Json cfg = {{"model_type", "llama"},  {"vocab_size", 8},        {"hidden_size", 8},
                     {"intermediate_size", 8}, {"num_hidden_layers", 1}, {"num_attention_heads", 1},
                     {"rope_parameters", r}};
  return ModelConfig::from_json(cfg).rope;
}

ModelConfig tiny_config(const std::string& type = "llama") {
  ModelConfig c;
  c.model_type = type;
  c.vocab_size = 16;
  c.hidden_size = 16;
  c.intermediate_size = 24;
  c.num_hidden_layers = 1;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 4;
  c.rms_norm_eps = 1e-5;
  c.max_position_embeddings = 64;
  if (type == "apertus") {
    c.hidden_act = "xielu";
    c.qk_norm = true;
  }
  return c;
}

// Randomises every parameter (so norms and biases matter) in float64.
void randomize(torch::nn::Module& m, uint64_t seed) {
  at::manual_seed(seed);
  at::NoGradGuard g;
  for (auto& p : m.parameters()) p.copy_(at::randn_like(p) * 0.5 + (p.dim() == 1 ? 1.0 : 0.0));
}

}  // namespace

TEST_CASE("RoPE inverse frequencies match the generator script for every scaling", "[nn][rope]") {
  auto meta = rhine::read_json_file(nn_test::fixture_path("rope.json"), "test");
  for (const auto& [name, c] : meta["cases"].items()) {
    INFO("case " << name);
    RopeParameters r = rope_from_json(c["rope"]);
    auto f =
        rope_frequencies(r, c["dim"].get<int64_t>(), c["max_position_embeddings"].get<int64_t>());
    auto expected = c["inv_freq"].get<std::vector<double>>();
    REQUIRE(f.inv_freq.size() == expected.size());
    for (std::size_t j = 0; j < expected.size(); ++j)
      CHECK(f.inv_freq[j] == Approx(expected[j]).epsilon(1e-12));
    CHECK(f.attention_factor == Approx(c["attention_factor"].get<double>()).epsilon(1e-12));
  }
}

TEST_CASE("YaRN and llama3 worked values from docs/architectures.md", "[nn][rope]") {
  // 1.4: get_mscale worked values.
  CHECK(yarn_get_mscale(40.0, 1.0) == Approx(1.368888).epsilon(1e-6));
  CHECK(yarn_get_mscale(40.0, 0.707) == Approx(1.260804).epsilon(1e-6));
  CHECK(yarn_get_mscale(1.0, 1.0) == 1.0);

  // 4.2: DeepSeek-V3, dim 64, factor 40: indices <= 10 unchanged, >= 23 divided by 40.
  RopeParameters v3;
  v3.rope_type = "yarn";
  v3.factor = 40;
  v3.original_max_position_embeddings = 4096;
  v3.mscale = v3.mscale_all_dim = 1.0;
  auto f = rope_frequencies(v3, 64, 163840);
  for (int j = 0; j < 32; ++j) {
    const double plain = std::pow(10000.0, -2.0 * j / 64.0);
    INFO("j = " << j);
    if (j <= 10) CHECK(f.inv_freq[j] == Approx(plain).epsilon(1e-14));
    if (j >= 23) CHECK(f.inv_freq[j] == Approx(plain / 40).epsilon(1e-14));
    if (j > 10 && j < 23) {  // linear ramp between the two
      const double ramp = (j - 10.0) / 13.0;
      CHECK(f.inv_freq[j] == Approx(plain / 40 * ramp + plain * (1 - ramp)).epsilon(1e-14));
    }
  }
  CHECK(f.attention_factor == 1.0);  // mscale == mscale_all_dim

  // 4.3: Apertus llama3 (theta 1.2e7, factor 8, orig 8192): wavelength > 8192 -> /8,
  // wavelength < 2048 -> unchanged, in between the smooth blend.
  RopeParameters ap;
  ap.rope_type = "llama3";
  ap.rope_theta = 1.2e7;
  ap.factor = 8;
  ap.original_max_position_embeddings = 8192;
  auto g = rope_frequencies(ap, 128, 65536);
  int n_lo = 0, n_hi = 0, n_mid = 0;
  for (int j = 0; j < 64; ++j) {
    const double inv = std::pow(1.2e7, -2.0 * j / 128.0), wl = 2 * M_PI / inv;
    if (wl > 8192) {
      CHECK(g.inv_freq[j] == Approx(inv / 8).epsilon(1e-14));
      ++n_lo;
    } else if (wl < 2048) {
      CHECK(g.inv_freq[j] == Approx(inv).epsilon(1e-14));
      ++n_hi;
    } else {
      const double s = (8192 / wl - 1.0) / 3.0;
      CHECK(g.inv_freq[j] == Approx((1 - s) * inv / 8 + s * inv).epsilon(1e-14));
      ++n_mid;
    }
  }
  CHECK(n_lo > 0);
  CHECK(n_hi > 0);
  CHECK(n_mid > 0);
}

TEST_CASE("RoPE layouts: closed-form rotation and the Meta <-> HF permutation", "[nn][rope]") {
  at::manual_seed(3);
  const int64_t B = 2, H = 3, T = 5, D = 8;
  RopeParameters r;
  auto freqs = rope_frequencies(r, D, 64);
  auto pos =
      at::arange(T, at::kLong).unsqueeze(0).repeat({B, 1}) + at::tensor({0L, 7L}).unsqueeze(1);
  auto x = at::randn({B, H, T, D}, at::kDouble);

  // Interleaved == complex multiplication (x_2j + i x_2j+1) * exp(i pos f_j).
  auto [ci, si] = rope_cos_sin(freqs, pos, RopeLayout::Interleaved, at::kDouble);
  auto yi = apply_rope(x, ci.to(at::kDouble), si.to(at::kDouble), RopeLayout::Interleaved);
  auto xa = x.accessor<double, 4>();
  auto ya = yi.accessor<double, 4>();
  auto pa = pos.accessor<int64_t, 2>();
  double max_err = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < D / 2; ++j) {
          const double a = pa[b][t] * freqs.inv_freq[j];
          const double re = xa[b][h][t][2 * j] * std::cos(a) - xa[b][h][t][2 * j + 1] * std::sin(a);
          const double im = xa[b][h][t][2 * j] * std::sin(a) + xa[b][h][t][2 * j + 1] * std::cos(a);
          max_err = std::max(
              {max_err, std::abs(ya[b][h][t][2 * j] - re), std::abs(ya[b][h][t][2 * j + 1] - im)});
        }
  CHECK(max_err < 1e-12);

  // HF dim r < D/2 is Meta dim 2r, HF dim r >= D/2 is Meta dim 2(r - D/2) + 1 (5.4):
  // rotate_half on the permuted vector == interleaved on the original, permuted.
  std::vector<int64_t> perm(D);
  for (int64_t rr = 0; rr < D; ++rr) perm[rr] = rr < D / 2 ? 2 * rr : 2 * (rr - D / 2) + 1;
  auto idx = at::tensor(perm, at::kLong);
  auto [ch, sh] = rope_cos_sin(freqs, pos, RopeLayout::HalfSplit, at::kDouble);
  auto yh = apply_rope(x.index_select(3, idx), ch.to(at::kDouble), sh.to(at::kDouble),
                       RopeLayout::HalfSplit);
  CHECK(rel_err(yh, yi.index_select(3, idx)) < 1e-12);
  // Rotations keep norms.
  CHECK(rel_err(yh.norm(2, {-1}), x.norm(2, {-1})) < 1e-7);
}

TEST_CASE("RMSNorm follows HF semantics (fp32 statistics, weight after the cast)", "[nn][norm]") {
  at::manual_seed(4);
  auto x = at::randn({3, 5, 16}, at::kDouble) * 3;
  auto w = at::randn({16}, at::kDouble);
  auto y = rms_norm(x, w, 1e-5);
  auto ref = w * x / at::sqrt((x * x).mean({-1}, true) + 1e-5);
  CHECK(rel_err(y, ref) < 1e-14);
  // bf16 input: normalised in fp32, cast to bf16, then times the fp32 weight.
  auto xb = x.to(at::kBFloat16);
  auto wf = w.to(at::kFloat);
  auto yb = rms_norm(xb, wf, 1e-5);
  auto xf = xb.to(at::kFloat);
  auto refb = wf * (xf * at::rsqrt(xf.pow(2).mean({-1}, true) + 1e-5)).to(at::kBFloat16);
  CHECK(yb.scalar_type() == at::kFloat);
  CHECK(rel_err(yb, refb) == 0.0);
  CHECK_THROWS_WITH(rms_norm(x, at::ones({8}), 1e-5), Contains("[rms_norm]"));
}

TEST_CASE("xIELU matches its closed form and HF's initial values", "[nn][mlp]") {
  XIELU act;
  act->to(at::kDouble);
  // Initialised in float32 like HF's default dtype: alpha_p = alpha_n = 0.8.
  CHECK(at::softplus(act->alpha_p).item<double>() == Approx(0.8).epsilon(1e-7));
  CHECK(0.5 + at::softplus(act->alpha_n).item<double>() == Approx(0.8).epsilon(1e-7));
  {
    at::NoGradGuard g;
    act->alpha_p.fill_(0.3);
    act->alpha_n.fill_(-0.2);
  }
  auto x = at::tensor({-3.0, -0.5, -1e-8, 0.0, 0.25, 2.0}, at::kDouble);
  auto y = act(x);
  // eps is a float32 buffer like HF's (-1e-6 rounded to float32).
  const double ap = std::log1p(std::exp(0.3)), an = 0.5 + std::log1p(std::exp(-0.2)), beta = 0.5,
               eps = act->eps.item<double>();
  CHECK(eps == Approx(-1e-6).epsilon(1e-7));
  for (int64_t i = 0; i < x.size(0); ++i) {
    const double v = x[i].item<double>();
    const double ref =
        v > 0 ? ap * v * v + beta * v : an * (std::expm1(std::min(v, eps)) - v) + beta * v;
    CHECK(y[i].item<double>() == Approx(ref).margin(1e-15).epsilon(1e-12));
  }
}

TEST_CASE("finite-difference gradients per block in float64", "[nn][grad]") {
  at::manual_seed(5);
  for (std::string type : {"llama", "apertus"}) {
    INFO("model type " << type);
    ModelConfig c = tiny_config(type);
    c.attention_bias = type == "llama";
    MLP mlp(c);
    Attention attn(c);
    RMSNorm norm(c.hidden_size, c.rms_norm_eps);
    for (torch::nn::Module* m :
         std::vector<torch::nn::Module*>{mlp.get(), attn.get(), norm.get()}) {
      m->to(at::kDouble);
      randomize(*m, 11);
    }
    const int64_t B = 2, T = 4;
    auto x = at::randn({B, T, c.hidden_size}, at::kDouble);
    auto pos = at::arange(T, at::kLong).unsqueeze(0).repeat({B, 1});
    AttentionInputs in;
    std::tie(in.cos, in.sin) =
        rope_cos_sin(rope_frequencies(c.rope, c.head_dim, 64), pos, RopeLayout::HalfSplit);
    in.cos = in.cos.to(at::kDouble);
    in.sin = in.sin.to(at::kDouble);
    in.attention.is_causal = true;
    auto R = at::randn({B, T, c.hidden_size}, at::kDouble);

    std::vector<std::pair<std::string, std::function<at::Tensor(const at::Tensor&)>>> blocks = {
        {"rms_norm", [&](const at::Tensor& v) { return norm(v); }},
        {"mlp", [&](const at::Tensor& v) { return mlp(v); }},
        {"attention", [&](const at::Tensor& v) { return attn(v, in); }},
    };
    for (auto& [name, fn] : blocks) {
      INFO("block " << name);
      auto xi = x.clone().requires_grad_(true);
      (fn(xi) * R).sum().backward();
      auto xd = x.clone();
      auto num = nn_test::numeric_grad(xd, [&] { return (fn(xd) * R).sum().item<double>(); });
      CHECK(rel_err(xi.grad(), num) < 1e-7);
    }
    // Parameter gradients: xIELU's scalars and the q-norm (apertus), q_proj.
    std::vector<at::Tensor> params;
    params.push_back(attn->q_proj->weight);
    if (type == "apertus") {
      params.push_back(attn->q_norm->weight);
      params.push_back(mlp->act_fn->alpha_p);
      params.push_back(mlp->act_fn->alpha_n);
    } else {
      params.push_back(attn->q_proj->bias);
    }
    auto loss = [&] { return (attn(x, in) * R).sum() + (mlp(x) * R).sum(); };
    for (auto& p : params) p.mutable_grad() = at::Tensor();
    loss().backward();
    for (auto& p : params) {
      at::Tensor pd = p.detach();  // shares storage: numeric_grad perturbs in place
      auto num = nn_test::numeric_grad(pd, [&] { return loss().item<double>(); });
      CHECK(rel_err(p.grad(), num) < 1e-7);
    }
  }
}

TEST_CASE("GQA and MQA equal MHA with repeated KV heads", "[nn][attention]") {
  at::manual_seed(6);
  for (int64_t hkv : {2, 1}) {
    INFO("Hkv = " << hkv);
    ModelConfig g = tiny_config();
    g.num_key_value_heads = hkv;
    ModelConfig m = g;
    m.num_key_value_heads = g.num_attention_heads;
    Attention ga(g), ma(m);
    ga->to(at::kDouble);
    ma->to(at::kDouble);
    randomize(*ga, 12);
    {
      at::NoGradGuard ng;
      const int64_t rep = g.num_attention_heads / hkv, D = g.head_dim, C = g.hidden_size;
      ma->q_proj->weight.copy_(ga->q_proj->weight);
      ma->o_proj->weight.copy_(ga->o_proj->weight);
      // KV head k serves query heads k*rep .. k*rep+rep-1 (contiguous groups).
      auto rep_rows = [&](const at::Tensor& w) {
        return w.view({hkv, 1, D, C}).expand({hkv, rep, D, C}).reshape({hkv * rep * D, C});
      };
      ma->k_proj->weight.copy_(rep_rows(ga->k_proj->weight));
      ma->v_proj->weight.copy_(rep_rows(ga->v_proj->weight));
    }
    auto x = at::randn({2, 5, g.hidden_size}, at::kDouble);
    auto pos = at::arange(5, at::kLong).unsqueeze(0).repeat({2, 1});
    AttentionInputs in;
    std::tie(in.cos, in.sin) =
        rope_cos_sin(rope_frequencies(g.rope, g.head_dim, 64), pos, RopeLayout::HalfSplit);
    in.attention.is_causal = true;
    CHECK(rel_err(ga(x, in), ma(x, in)) < 1e-12);
  }
}
