// Multi-head Latent Attention and whole DeepSeek models: logits of tiny
// DeepSeek-V2/V3 models against the float64 PyTorch reference of
// tests/fixtures/nn/make_deepseek_fixtures.py, absorbed == naive, latent-cached
// decoding == full forward, MLA == MHA math on constructed weights, float64
// finite differences, softmax scale and cache sizes of the published configs.
#include "deepseek_fixtures.h"

#include <ATen/CPUGeneratorImpl.h>

#include "rhine/io/lora.h"
#include "rhine/nn/generate.h"
#include "rhine/nn/mla.h"
#include "rhine/nn/model.h"

using namespace rhine::nn;
using Catch::Matchers::Contains;
using nn_test::Fixture;
using nn_test::rel_err;

namespace {

void set_absorb(CausalLM& lm, bool on) {
  for (auto& m : lm->modules(false))
    if (auto* a = dynamic_cast<MLAImpl*>(m.get())) a->absorb = on;
}

ModelConfig small_mla_config(std::optional<std::int64_t> q_rank) {
  ModelConfig c;
  c.model_type = "deepseek_v3";
  c.vocab_size = 16;
  c.hidden_size = 8;
  c.intermediate_size = 8;
  c.num_hidden_layers = 1;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 2;
  c.q_lora_rank = q_rank;
  c.kv_lora_rank = 6;
  c.qk_nope_head_dim = 4;
  c.qk_rope_head_dim = 2;
  c.v_head_dim = 3;
  c.head_dim = 2;
  c.rope_interleave = true;
  c.validate();
  return c;
}

AttentionInputs rope_inputs(const ModelConfig& c, std::int64_t B, std::int64_t T,
                            std::int64_t dim) {
  AttentionInputs in;
  auto pos = at::arange(T, at::kLong).unsqueeze(0).expand({B, T});
  std::tie(in.cos, in.sin) = rope_cos_sin(rope_frequencies(c.rope, dim, c.max_position_embeddings),
                                          pos, RopeLayout::Interleaved, at::kDouble);
  in.attention.is_causal = true;
  return in;
}

}  // namespace

TEST_CASE("tiny DeepSeek-V2 and V3 match the float64 PyTorch reference", "[nn][mla][deepseek]") {
  for (std::string name : {"deepseek_v2_tiny", "deepseek_v3_tiny"}) {
    INFO("fixture " << name);
    Fixture fx(name);
    CausalLM lm = nn_test::deepseek_model(fx);
    auto out = lm->forward(fx.ids(0));
    CHECK(out.logits.scalar_type() == at::kDouble);
    CHECK(rel_err(out.logits, fx.logits(0)) < 1e-12);
    // Expert loads of every MoE layer equal the reference's token-by-token routing.
    const auto& want = fx.meta["cases"][0]["expert_counts"];
    REQUIRE(out.expert_counts.defined());
    const auto n_main = static_cast<std::int64_t>(want.size()) - fx.config.num_nextn_predict_layers;
    for (std::int64_t l = 0; l < n_main; ++l) {
      auto row = out.expert_counts[l];
      for (std::int64_t e = 0; e < row.size(0); ++e)
        CHECK(row[e].item<std::int64_t>() == want[l][e].get<std::int64_t>());
    }
    // The absorbed form gives the same logits.
    set_absorb(lm, true);
    CHECK(rel_err(lm->forward(fx.ids(0)).logits, fx.logits(0)) < 1e-12);
  }
}

TEST_CASE("latent-cached decoding equals the full forward", "[nn][mla][cache]") {
  Fixture fx("deepseek_v3_tiny");
  CausalLM lm = nn_test::deepseek_model(fx);
  auto ids = fx.ids(0);
  const auto T = ids.size(1);
  auto full = lm->forward(ids).logits;  // naive form, no cache
  KVCache cache = lm->make_cache();
  ForwardOptions o;
  o.cache = &cache;
  auto pre = lm->forward(ids.narrow(1, 0, 4), o).logits;  // prefill 4
  CHECK(rel_err(pre, full.narrow(1, 0, 4)) < 1e-12);
  for (std::int64_t t = 4; t < T; ++t) {
    auto step = lm->forward(ids.narrow(1, t, 1), o).logits;
    INFO("position " << t);
    CHECK(rel_err(step, full.narrow(1, t, 1)) < 1e-12);
  }
  CHECK(cache.length() == T);
  // Only the latent and the rope key are cached: kv_lora_rank + qk_rope_head_dim.
  REQUIRE(cache.latent.size() == 2);
  CHECK(cache.latent[0].elements_per_token() == 16 + 4);
  CHECK(cache.latent[1].ckv.sizes().vec() == std::vector<std::int64_t>{2, T, 16});
  CHECK_FALSE(cache.layers[0].k.defined());
  CHECK(kv_cache_elements_per_token(fx.config) == 20);

  // generate() with the latent cache: greedy tokens equal argmax of full forwards.
  GenerateOptions g;
  g.max_new_tokens = 5;
  std::vector<std::int64_t> prompt = {3, 7, 11};
  auto res = generate(lm, {prompt}, g);
  std::vector<std::int64_t> seq = prompt;
  for (int i = 0; i < 5; ++i) {
    auto l = lm->forward(at::tensor(seq, at::kLong).unsqueeze(0)).logits;
    seq.push_back(l[0][-1].argmax().item<std::int64_t>());
  }
  CHECK(res.tokens[0] == std::vector<std::int64_t>(seq.begin() + 3, seq.end()));
}

TEST_CASE("LoRA on kv_b_proj: the absorbed form reads the adapted weight", "[nn][mla][lora]") {
  // The absorbed form multiplies by kv_b_proj's weight instead of calling the
  // Linear, so it must see W + s B A (nn::effective_weight) as the naive form does.
  Fixture fx("deepseek_v3_tiny");
  CausalLM lm = nn_test::deepseek_model(fx);
  rhine::io::LoraOptions o;
  o.rank = 2;
  o.target_modules = {"kv_b_proj"};
  o.init_seed = 3;
  REQUIRE(rhine::io::apply_lora(*lm, o).size() >= 2);
  {
    at::NoGradGuard g;
    auto gen = at::make_generator<at::CPUGeneratorImpl>(4);
    for (auto& p : lm->named_parameters())
      if (p.key().find(".lora_B.") != std::string::npos) p.value().normal_(0.0, 0.5, gen);
  }
  const auto naive = lm->forward(fx.ids(0)).logits;
  CHECK(rel_err(naive, fx.logits(0)) > 1e-3);  // the adapter changes the model
  set_absorb(lm, true);
  CHECK(rel_err(lm->forward(fx.ids(0)).logits, naive) < 1e-12);
  rhine::io::merge_lora(*lm);
  CHECK(rel_err(lm->forward(fx.ids(0)).logits, naive) < 1e-12);
}

TEST_CASE("MLA without compression reduces to multi-head attention", "[nn][mla]") {
  // kv_lora_rank = C with W^DKV = I, zero rotary parts and unit-RMS inputs:
  // MLA must be MHA with W_K / W_V = the per-head blocks of kv_b_proj and W_Q
  // = the non-rotary rows of q_proj (checks the weight layouts).
  ModelConfig c = small_mla_config(std::nullopt);
  c.kv_lora_rank = c.hidden_size;  // 8
  const std::int64_t C = 8, H = 2, dn = 4, dr = 2, dv = 3, B = 2, T = 5;
  MLA mla(c);
  mla->to(at::kDouble);
  at::manual_seed(3);
  at::NoGradGuard g;
  auto wq = at::randn({H, dn, C}, at::kDouble) / std::sqrt(8.0);
  auto wk = at::randn({H, dn, C}, at::kDouble) / std::sqrt(8.0);
  auto wv = at::randn({H, dv, C}, at::kDouble) / std::sqrt(8.0);
  auto wo = at::randn({C, H * dv}, at::kDouble) / std::sqrt(6.0);
  mla->q_proj->weight.copy_(at::cat({wq, at::zeros({H, dr, C}, at::kDouble)}, 1).view({H * (dn + dr), C}));
  mla->kv_a_proj_with_mqa->weight.copy_(at::cat({at::eye(C, at::kDouble), at::zeros({dr, C}, at::kDouble)}, 0));
  mla->kv_b_proj->weight.copy_(at::cat({wk, wv}, 1).view({H * (dn + dv), C}));
  mla->o_proj->weight.copy_(wo);
  // Unit RMS after the latent norm's eps: mean(x^2) + 1e-6 = 1.
  auto x = at::randn({B, T, C}, at::kDouble);
  x = x * at::rsqrt(x.pow(2).mean(-1, true)) * std::sqrt(1.0 - 1e-6);
  auto in = rope_inputs(c, B, T, dr);
  auto y_naive = mla->forward_naive(x, in);
  auto y_abs = mla->forward_absorbed(x, in, nullptr);
  // Plain MHA reference.
  auto q = at::einsum("btc,hdc->bhtd", {x, wq}), k = at::einsum("btc,hdc->bhtd", {x, wk}),
       v = at::einsum("btc,hdc->bhtd", {x, wv});
  auto s = at::matmul(q, k.transpose(-1, -2)) * (1.0 / std::sqrt(double(dn + dr)));
  s = s.masked_fill(at::ones({T, T}, at::kBool).triu(1), -INFINITY);
  auto ref = at::matmul(s.softmax(-1), v).transpose(1, 2).reshape({B, T, H * dv}).matmul(wo.t());
  CHECK(rel_err(y_naive, ref) < 1e-12);
  CHECK(rel_err(y_abs, ref) < 1e-12);
}

TEST_CASE("MLA gradients match float64 finite differences", "[nn][mla][grad]") {
  for (auto q_rank : {std::optional<std::int64_t>(), std::optional<std::int64_t>(5)}) {
    INFO("q_lora_rank " << (q_rank ? *q_rank : 0));
    ModelConfig c = small_mla_config(q_rank);
    c.attention_bias = true;
    MLA mla(c);
    mla->to(at::kDouble);
    at::manual_seed(5);
    {
      at::NoGradGuard g;
      for (auto& p : mla->parameters()) p.normal_(0.0, 0.5);
    }
    const std::int64_t B = 2, T = 4;
    auto x = at::randn({B, T, 8}, at::kDouble).requires_grad_(true);
    auto proj = at::randn({B, T, 8}, at::kDouble);
    auto in = rope_inputs(c, B, T, 2);
    auto f = [&] { return (mla->forward_naive(x, in) * proj).sum(); };
    f().backward();
    auto num_x = nn_test::numeric_grad(x.detach(), [&] { return f().item<double>(); });
    CHECK(rel_err(x.grad(), num_x) < 1e-7);
    for (auto& p : mla->named_parameters()) {
      INFO("parameter " << p.key());
      auto num = nn_test::numeric_grad(p.value().detach(), [&] { return f().item<double>(); });
      CHECK(rel_err(p.value().grad(), num) < 1e-7);
    }
  }
}

TEST_CASE("MLA softmax scale and cache sizes of the published configs", "[nn][mla]") {
  auto v3 = ModelConfig::from_file(nn_test::fixture_path("configs/deepseek-v3.json"));
  auto lite = ModelConfig::from_file(nn_test::fixture_path("configs/deepseek-v2-lite.json"));
  // docs/architectures.md 1.4 worked values.
  CHECK(v3.mla_softmax_scale() == Approx(0.1352338).epsilon(1e-6));
  CHECK(lite.mla_softmax_scale() == Approx(0.1147214).epsilon(1e-6));
  CHECK(kv_cache_elements_per_token(v3) == 576);
  CHECK(kv_cache_elements_per_token(lite) == 576);
  // A GQA config caches 2 * Hkv * D.
  ModelConfig gqa;
  gqa.num_key_value_heads = 8;
  gqa.head_dim = 128;
  CHECK(kv_cache_elements_per_token(gqa) == 2048);
}

TEST_CASE("MLA rejects a config without kv_lora_rank", "[nn][mla]") {
  ModelConfig c;
  c.vocab_size = 8;
  c.hidden_size = 8;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 2;
  c.head_dim = 4;
  c.intermediate_size = 8;
  c.num_hidden_layers = 1;
  CHECK_THROWS_WITH(MLA(c), Contains("[mla]") && Contains("kv_lora_rank"));
  c.model_type = "deepseek_v3";
  CHECK_THROWS_WITH(c.validate(), Contains("[model_config]") && Contains("kv_lora_rank"));
}
