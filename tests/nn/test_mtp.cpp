// Multi-token prediction and the DeepSeek model as a whole: MTP loss against
// the float64 PyTorch reference (tests/fixtures/nn/make_deepseek_fixtures.py)
// and against a direct computation from the model's own modules, label
// shifting, HF/DeepSeek-V3 weight names (MTP layers, buffers, aliases),
// parameter counts (published 671B / 37B), aux losses and expert counts in
// ForwardOutput, MLA + MoE inside a llama config, and the config round trip
// on the published DeepSeek-V2-Lite and DeepSeek-V3 config.json.
#include "deepseek_fixtures.h"

#include "rhine/nn/mtp.h"
#include "rhine/torch/compat.h"

using namespace rhine::nn;
using Catch::Matchers::Contains;
using nn_test::Fixture;
using nn_test::rel_err;

TEST_CASE("MTP label and input shifting", "[nn][mtp]") {
  auto labels = at::tensor({1, 2, 3, 4, 5, 6, 7, 8}, at::kLong).view({2, 4});
  auto l2 = mtp_labels(labels, 2, -100);
  CHECK(at::equal(l2, at::tensor({3, 4, -100, -100, 7, 8, -100, -100}, at::kLong).view({2, 4})));
  auto ids = at::tensor({10, 11, 12, 13}, at::kLong).view({1, 4});
  CHECK(at::equal(mtp_inputs(ids, 1), at::tensor({11, 12, 13, 10}, at::kLong).view({1, 4})));
}

TEST_CASE("MTP targets stop at document boundaries", "[nn][mtp]") {
  // documents: row 0 = doc 0 for 3 positions, doc 1 for 3; row 1 one document.
  auto labels = at::tensor({1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}, at::kLong).view({2, 6});
  auto docs = at::tensor({1, 1, 1, 2, 2, 2, 1, 1, 1, 1, 1, 1}, at::kLong).view({2, 6});
  CHECK(at::equal(mtp_labels(labels, 1, -100, docs),
                  at::tensor({2, 3, -100, 5, 6, -100, 8, 9, 10, 11, 12, -100}, at::kLong).view({2, 6})));
  CHECK(at::equal(mtp_labels(labels, 2, -100, docs),
                  at::tensor({3, -100, -100, 6, -100, -100, 9, 10, 11, 12, -100, -100}, at::kLong).view({2, 6})));
  CHECK_THROWS_WITH(mtp_labels(labels, 1, -100, docs.narrow(1, 0, 5)), Contains("[mtp] documents must have"));
}

TEST_CASE("two documents packed in one row give the MTP loss and gradients of each alone", "[nn][mtp]") {
  // The main loss and the MTP loss summed over tokens, packed (document mask,
  // positions restarting) against the two documents trained alone, float64.
  // Without the boundary, the first document's last positions would learn
  // the second document's tokens and the sums would differ.
  Fixture fx("deepseek_v3_tiny");
  const auto all = fx.ids(0);                                    // [2, 9]
  const at::Tensor a = all[0].narrow(0, 0, 5), b = all[1].narrow(0, 0, 6);
  // The stream a b x: each document's labels are its next tokens.
  const at::Tensor la = at::cat({a.narrow(0, 1, 4), b.narrow(0, 0, 1)});
  const at::Tensor lb = at::cat({b.narrow(0, 1, 5), all[1].narrow(0, 6, 1)});
  auto summed = [&](CausalLM& lm, const at::Tensor& ids, const at::Tensor& labels, bool packed) {
    ForwardOptions o;
    o.labels = labels.unsqueeze(0);
    o.mtp_lambda = 1.0;  // one MTP layer: mtp_loss = its mean CE
    if (packed) {
      o.position_ids = at::cat({at::arange(5, at::kLong), at::arange(6, at::kLong)}).unsqueeze(0);
      o.document_mask = true;
    }
    auto out = lm->forward(ids.unsqueeze(0), o);
    REQUIRE(out.stats.mtp_tokens.size() == 1);
    const auto n = out.stats.n_tokens.item<std::int64_t>(), n1 = out.stats.mtp_tokens[0].item<std::int64_t>();
    return std::make_tuple((out.loss - out.mtp_loss) * static_cast<double>(n) + out.mtp_loss * static_cast<double>(n1),
                           n, n1);
  };
  CausalLM packed = nn_test::deepseek_model(fx), alone = nn_test::deepseek_model(fx);
  auto [lp, np, mp] = summed(packed, at::cat({a, b}), at::cat({la, lb}), true);
  auto [l1, n1, m1] = summed(alone, a, la, false);
  auto [l2, n2, m2] = summed(alone, b, lb, false);
  CHECK(np == n1 + n2);
  CHECK(mp == m1 + m2);  // 4 + 5: no target across the boundary
  CHECK(lp.item<double>() == Approx((l1 + l2).item<double>()).epsilon(1e-12));
  lp.backward();
  (l1 + l2).backward();
  auto gp = packed->named_parameters(), ga = alone->named_parameters();
  for (const auto& p : gp) {
    INFO(p.key());
    const at::Tensor x = p.value().grad(), y = ga[p.key()].grad();
    REQUIRE(x.defined() == y.defined());
    if (x.defined()) CHECK(rel_err(x, y) < 1e-10);
  }
}

TEST_CASE("MTP loss matches the float64 reference and a direct computation", "[nn][mtp]") {
  Fixture fx("deepseek_v3_tiny");
  CausalLM lm = nn_test::deepseek_model(fx);
  const auto& c = fx.meta["cases"][0];
  auto ids = fx.ids(0);
  ForwardOptions o;
  o.labels = Fixture::as_tensor(c["labels"]);
  o.mtp_lambda = 0.3;
  auto out = lm->forward(ids, o);
  const double ce = c["ce_loss"].get<double>(), mtp = c["mtp_ce"][0].get<double>();
  CHECK(out.stats.ce_loss.item<double>() == Approx(ce).epsilon(1e-12));
  REQUIRE(out.stats.mtp_ce.size() == 1);
  CHECK(out.stats.mtp_ce[0].item<double>() == Approx(mtp).epsilon(1e-12));
  CHECK(out.stats.mtp_loss.item<double>() == Approx(0.3 / 1 * mtp).epsilon(1e-12));
  CHECK(out.loss.item<double>() == Approx(ce + 0.3 * mtp).epsilon(1e-12));
  // Depth 1 has one target fewer per row than the main loss: 8+7 main, 7+6 MTP.
  CHECK(out.stats.n_tokens.item<std::int64_t>() == 15);
  REQUIRE(out.stats.mtp_tokens.size() == 1);
  CHECK(out.stats.mtp_tokens[0].item<std::int64_t>() == 13);
  // The MTP layer's MoE routed tokens: counts equal the reference's.
  auto want = c["expert_counts"];
  REQUIRE(out.expert_counts.size(0) == 2);
  for (std::int64_t e = 0; e < 8; ++e)
    CHECK(out.expert_counts[1][e].item<std::int64_t>() == want[1][e].get<std::int64_t>());

  // Direct computation from the modules: h0 = norm(main blocks), then
  // [enorm(emb(t_{i+1})); hnorm(h0)] -> eh_proj -> block -> norm -> head.
  {
    at::NoGradGuard g;
    auto& mtp_layer = lm->model->mtp.at(0);
    auto h0 = lm->model->embed_tokens(ids);
    AttentionInputs in;
    auto pos = at::arange(9, at::kLong).unsqueeze(0).expand({2, 9});
    std::tie(in.cos, in.sin) = rope_cos_sin(
        rope_frequencies(fx.config.rope, 4, fx.config.max_position_embeddings), pos,
        RopeLayout::Interleaved, at::kDouble);
    in.attention.is_causal = true;
    for (auto& b : lm->model->blocks) h0 = b(h0, in).h;
    h0 = lm->model->norm(h0);
    auto e = mtp_layer->enorm(lm->model->embed_tokens(ids.roll(-1, 1)));
    auto x = mtp_layer->eh_proj(at::cat({e, mtp_layer->hnorm(h0)}, -1));
    auto h1 = mtp_layer->DecoderLayerImpl::forward(x, in).h;
    auto logits = lm->lm_head(mtp_layer->shared_head->norm(h1));  // [2, 9, V]
    auto [ce1, z1, n1] = lm_loss(logits.narrow(1, 0, 8).reshape({16, -1}),
                                 o.labels->narrow(1, 1, 8).reshape({16}), -100, 0.0);
    CHECK(ce1.item<double>() == Approx(out.stats.mtp_ce[0].item<double>()).epsilon(1e-12));
    CHECK(n1.item<std::int64_t>() == 13);
  }

  // lambda = 0: no MTP; gradients reach every parameter with MTP on.
  o.mtp_lambda = 0.0;
  auto plain = lm->forward(ids, o);
  CHECK_FALSE(plain.mtp_loss.defined());
  CHECK(plain.loss.item<double>() == Approx(ce).epsilon(1e-12));
  CHECK(plain.expert_counts[1].sum().item<std::int64_t>() == 0);  // MTP layer did not run
  o.mtp_lambda = 0.1;
  lm->train();
  auto trained = lm->forward(ids, o);
  trained.loss.backward();
  for (auto& p : lm->named_parameters()) {
    INFO(p.key());
    auto gr = p.value().grad();
    bool ok = gr.defined();
    // Experts no token chose this time have no gradient.
    if (!ok) ok = p.key().find(".experts.") != std::string::npos;
    CHECK(ok);
  }
}

TEST_CASE("DeepSeek models carry the HF/DeepSeek-V3 names and MTP copies alias the shared weights",
          "[nn][mtp][names]") {
  Fixture fx("deepseek_v3_tiny");
  CausalLM lm(fx.config);
  auto params = lm->named_parameters();
  auto buffers = lm->named_buffers();
  for (std::string n :
       {"model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.self_attn.q_a_proj.bias",
        "model.layers.0.self_attn.q_a_layernorm.weight", "model.layers.0.self_attn.q_b_proj.weight",
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
        "model.layers.0.self_attn.kv_a_layernorm.weight", "model.layers.0.self_attn.kv_b_proj.weight",
        "model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.gate_proj.weight",
        "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.experts.7.down_proj.weight",
        "model.layers.1.mlp.shared_experts.up_proj.weight", "model.layers.2.enorm.weight",
        "model.layers.2.hnorm.weight", "model.layers.2.eh_proj.weight",
        "model.layers.2.shared_head.norm.weight", "model.layers.2.mlp.experts.0.gate_proj.weight",
        "model.layers.2.input_layernorm.weight"}) {
    INFO(n);
    CHECK(params.contains(n));
  }
  CHECK(params["model.layers.2.eh_proj.weight"].sizes().vec() == std::vector<std::int64_t>{32, 64});
  for (std::string n : {"model.layers.1.mlp.gate.e_score_correction_bias",
                        "model.layers.2.mlp.gate.e_score_correction_bias",
                        "model.layers.2.embed_tokens.weight", "model.layers.2.shared_head.head.weight"}) {
    INFO(n);
    CHECK(buffers.contains(n));
    CHECK_FALSE(params.contains(n));
  }
  CHECK(buffers["model.layers.1.mlp.gate.e_score_correction_bias"].scalar_type() == at::kFloat);
  // The aliases share storage with the trained tensors, also after a dtype change.
  for (int pass = 0; pass < 2; ++pass) {
    auto b = lm->named_buffers();
    CHECK(b["model.layers.2.embed_tokens.weight"].data_ptr() ==
          lm->model->embed_tokens->weight.data_ptr());
    CHECK(b["model.layers.2.shared_head.head.weight"].data_ptr() == lm->lm_head->weight.data_ptr());
    lm->to(at::kDouble);
  }
  // Parameter count: closed form == built model; MTP aliases are not counted twice.
  CHECK(lm->num_parameters() == parameter_count(fx.config));
  Fixture v2("deepseek_v2_tiny");
  CausalLM l2(v2.config);
  CHECK(l2->num_parameters() == parameter_count(v2.config));
  CHECK(l2->num_parameters(false) == parameter_count(v2.config, false));
  CHECK(l2->named_buffers().size() == 0);  // no bias outside noaux_tc
  CHECK(l2->named_parameters().contains("model.layers.0.self_attn.q_proj.weight"));
  CHECK(l2->named_parameters().contains("model.layers.1.mlp.gate_proj.weight"));  // freq 2: dense
  CHECK(l2->named_parameters().contains("model.layers.2.mlp.gate.weight"));
}

TEST_CASE("published DeepSeek sizes from the closed-form count", "[nn][mtp][count]") {
  auto v3 = ModelConfig::from_file(nn_test::fixture_path("configs/deepseek-v3.json"));
  // V3: 671B total and 37B activated per token (paper), 685B on the Hub with
  // the MTP module (its embedding/head copies included: 2 * V * C more).
  ModelConfig main_only = v3;
  main_only.num_nextn_predict_layers = 0;
  CHECK(parameter_count(main_only) / 1e9 == Approx(671).margin(1.0));
  // "Activated" counts what runs matmuls per token: all but the input
  // embedding lookup (V3 36.6B ~ 37B; V2-Lite 2.45B ~ 2.4B).
  const double emb3 = double(v3.vocab_size) * v3.hidden_size;
  CHECK((active_parameter_count(v3) - emb3) / 1e9 == Approx(37).margin(0.5));
  const double hub = (parameter_count(v3) + 2.0 * v3.vocab_size * v3.hidden_size) / 1e9;
  CHECK(hub == Approx(685).margin(1.0));
  // V2-Lite: 15.7B total, 2.4B activated (model card).
  auto lite = ModelConfig::from_file(nn_test::fixture_path("configs/deepseek-v2-lite.json"));
  CHECK(parameter_count(lite) / 1e9 == Approx(15.7).margin(0.1));
  const double emb2 = double(lite.vocab_size) * lite.hidden_size;
  CHECK((active_parameter_count(lite) - emb2) / 1e9 == Approx(2.4).margin(0.1));
}

TEST_CASE("config round trip of the published DeepSeek-V2-Lite and V3 config.json",
          "[nn][mtp][config]") {
  for (std::string file : {"deepseek-v2-lite.json", "deepseek-v3.json"}) {
    INFO(file);
    auto raw = rhine::read_json_file(nn_test::fixture_path("configs/" + file), "test");
    auto c = ModelConfig::from_json(raw);
    auto j = c.to_json();
    for (auto& [key, value] : raw.items()) {
      INFO("key " << key);
      REQUIRE(j.contains(key));
      if (key == "rope_scaling") {
        for (auto& [k2, v2] : value.items()) CHECK(j[key][k2] == v2);
        CHECK(j[key]["rope_type"] == "yarn");
      } else {
        CHECK(j[key] == value);
      }
    }
    CHECK(ModelConfig::from_json(j) == c);
    CHECK(c.uses_mla());
    CHECK(c.rope_interleave);
    CHECK(c.head_dim == 64);
  }
  auto v3 = ModelConfig::from_file(nn_test::fixture_path("configs/deepseek-v3.json"));
  CHECK(v3.is_moe_layer(3));
  CHECK_FALSE(v3.is_moe_layer(2));
  CHECK(v3.is_moe_layer(61));  // the MTP layer is an MoE layer
  CHECK(v3.extra.contains("quantization_config"));
}

TEST_CASE("MLA and MoE layers inside a llama config", "[nn][mtp][llama]") {
  auto j = rhine::Json::parse(R"({"model_type": "llama", "vocab_size": 32, "hidden_size": 16,
      "intermediate_size": 24, "num_hidden_layers": 3, "num_attention_heads": 2,
      "num_key_value_heads": 1, "kv_lora_rank": 8, "qk_nope_head_dim": 4, "qk_rope_head_dim": 4,
      "v_head_dim": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
      "moe_intermediate_size": 8, "n_shared_experts": 1, "first_k_dense_replace": 1,
      "moe_layer_freq": 2, "num_nextn_predict_layers": 1, "tie_word_embeddings": true})");
  auto c = ModelConfig::from_json(j);
  CHECK(ModelConfig::from_json(c.to_json()) == c);
  CHECK(c.to_json()["n_routed_experts"] == 4);
  CHECK_FALSE(c.rope_interleave);  // llama keeps rotate_half unless rope_interleave is set
  CausalLM lm(c);
  auto p = lm->named_parameters();
  CHECK(p.contains("model.layers.0.self_attn.kv_b_proj.weight"));
  CHECK(p.contains("model.layers.0.mlp.gate_proj.weight"));   // dense: L < 1
  CHECK(p.contains("model.layers.1.mlp.gate_proj.weight"));   // dense: 1 % 2 != 0
  CHECK(p.contains("model.layers.2.mlp.experts.3.up_proj.weight"));
  CHECK(p.contains("model.layers.3.eh_proj.weight"));
  CHECK(lm->num_parameters() == parameter_count(c));
  // Tied embeddings: the MTP head aliases the embedding.
  CHECK(lm->named_buffers()["model.layers.3.shared_head.head.weight"].data_ptr() ==
        lm->model->embed_tokens->weight.data_ptr());
  auto ids = at::randint(0, 32, {2, 6}, at::kLong);
  ForwardOptions o;
  o.labels = ids.roll(-1, 1);
  o.moe_seq_aux_alpha = 1e-2;
  o.moe_expert_aux_alpha = 1e-2;
  auto out = lm->forward(ids, o);
  CHECK(out.logits.sizes().vec() == std::vector<std::int64_t>{2, 6, 32});
  REQUIRE(out.aux_loss.defined());
  CHECK(out.aux_loss.requires_grad());
  // One MoE layer: 2 (the MTP layer 3 is dense: 3 % 2 != 0) -> one row.
  CHECK(out.expert_counts.sizes().vec() == std::vector<std::int64_t>{1, 4});
  CHECK(out.loss.item<double>() ==
        Approx((out.stats.ce_loss + out.stats.mtp_loss + out.stats.aux_loss).item<double>()).epsilon(1e-6));
  // Router bias update API: counts [n_moe_layers, E]; no bias outside noaux_tc.
  lm->update_router_bias(out.expert_counts, 1e-3);
  CHECK_THROWS_WITH(lm->update_router_bias(at::zeros({2, 4}), 1e-3),
                    Contains("[causal_lm]") && Contains("n_moe_layers"));
}

TEST_CASE("router bias update through CausalLM for a V3 model", "[nn][mtp][bias]") {
  Fixture fx("deepseek_v3_tiny");
  CausalLM lm = nn_test::deepseek_model(fx);
  auto before = lm->moe_layers()[0]->gate->e_score_correction_bias.clone();
  ForwardOptions o;
  o.labels = Fixture::as_tensor(fx.meta["cases"][0]["labels"]);
  auto out = lm->forward(fx.ids(0), o);
  lm->update_router_bias(out.expert_counts, 0.25);
  auto cnt = out.expert_counts[0].to(at::kDouble);
  auto expect = before + 0.25 * at::sign(cnt.mean() - cnt);
  CHECK(rel_err(lm->moe_layers()[0]->gate->e_score_correction_bias, expect) < 1e-15);
}

TEST_CASE("the example DeepSeek configs build and train a step", "[nn][mtp][examples]") {
  for (std::string name : {"deepseek-tiny", "deepseek-small"}) {
    INFO(name);
    auto j = rhine::read_json_file(std::string(RHINE_SOURCE_DIR) + "/examples/configs/" + name +
                                       ".json",
                                   "test");
    auto model = j["model"];
    model["vocab_size"] = 4000;  // the demo tokenizer's vocabulary (scripts/demo.sh)
    auto c = ModelConfig::from_json(model);
    CHECK(c.uses_mla());
    CHECK(c.uses_moe());
    CHECK(c.num_nextn_predict_layers == 1);
    if (name == "deepseek-small") {
      // ~10-20M parameters in total, a third of them active per token.
      CHECK(parameter_count(c) > 10'000'000);
      CHECK(parameter_count(c) < 20'000'000);
      CHECK(active_parameter_count(c) < parameter_count(c) / 3);
      continue;
    }
    CausalLMOptions lo;
    lo.init_seed = 1;
    CausalLM lm(c, lo);
    auto ids = at::randint(0, 4000, {2, 16}, at::kLong);
    ForwardOptions o;
    o.labels = ids.roll(-1, 1);
    o.mtp_lambda = 0.3;  // the Trainer's default
    auto out = lm->forward(ids, o);
    out.loss.backward();
    CHECK(std::isfinite(out.loss.item<double>()));
    CHECK(out.stats.mtp_ce.size() == 1);
    CHECK(out.expert_counts.size(0) == 2);  // layer 1 and the MTP layer
  }
}

TEST_CASE("activation checkpointing gives the gradients of the plain forward (MLA + MoE + MTP, balance losses)",
          "[nn][mtp][checkpoint]") {
  // The V3 fixture: MLA with q_lora_rank, 8 routed + 1 shared experts (layer 1),
  // one MTP module that is an MoE layer too. Packed rows (two documents each),
  // sequence-wise and expert-level balance losses, MTP weight 0.3.
  Fixture fx("deepseek_v3_tiny");
  for (const bool bf16 : {false, true}) {
    INFO((bf16 ? "float32 weights, bf16 autocast" : "float64"));
    auto run = [&](bool checkpointing) {
      CausalLM lm = nn_test::deepseek_model(fx);
      if (bf16) lm->to(at::kFloat);
      lm->options.activation_checkpointing = checkpointing;
      lm->train();
      ForwardOptions o;
      auto ids = at::arange(24, at::kLong).remainder(47).view({2, 12});
      o.position_ids = at::cat({at::arange(5, at::kLong), at::arange(7, at::kLong)}).unsqueeze(0).expand({2, 12});
      o.document_mask = true;
      o.labels = ids.roll(-1, 1);
      o.mtp_lambda = 0.3;
      o.moe_seq_aux_alpha = 0.01;
      o.moe_expert_aux_alpha = 0.02;
      ForwardOutput out;
      {
        rhine::AutocastGuard autocast(at::kCPU, at::kBFloat16, bf16);
        out = lm->forward(ids, o);
      }
      out.loss.backward();  // outside autocast, as the Trainer does
      return std::make_pair(out, lm);
    };
    auto [plain, lm_plain] = run(false);
    auto [ckpt, lm_ckpt] = run(true);
    REQUIRE(plain.aux_loss.defined());
    REQUIRE(ckpt.aux_loss.defined());
    CHECK(ckpt.loss.item<double>() == plain.loss.item<double>());
    CHECK(ckpt.aux_loss.item<double>() == plain.aux_loss.item<double>());
    CHECK(at::equal(ckpt.expert_counts, plain.expert_counts));  // statistics come back through the output
    CHECK(ckpt.expert_counts.size(0) == 2);                      // layer 1 and the MTP module
    auto grads = lm_ckpt->named_parameters();
    int compared = 0;
    for (const auto& p : lm_plain->named_parameters()) {
      INFO("parameter " << p.key());
      const auto& g = grads[p.key()].grad();
      REQUIRE(p.value().grad().defined() == g.defined());
      if (!g.defined()) continue;
      CHECK(rel_err(g, p.value().grad()) < (bf16 ? 1e-6 : 1e-13));
      ++compared;
    }
    CHECK(compared > 30);
  }
}

TEST_CASE("checkpoint_block recomputes under the first run's RNG and autocast state", "[nn][checkpoint]") {
  // A block that draws dropout masks (the RNG) and multiplies under autocast:
  // without restoring either, the recomputation would differ from the first run.
  at::manual_seed(5);
  auto w0 = at::randn({16, 16});
  auto x0 = at::randn({4, 16});
  auto run = [&](bool checkpointing) {
    auto w = w0.clone().requires_grad_(true);
    auto x = x0.clone().requires_grad_(true);
    auto fn = [w](const at::Tensor& xi) {
      BlockOutput o;
      o.h = at::dropout(at::matmul(xi, w), 0.5, /*train=*/true);
      o.aux_loss = (o.h.to(at::kFloat) * o.h.to(at::kFloat)).mean() * 0.1;
      return o;
    };
    at::manual_seed(9);
    BlockOutput out;
    {
      rhine::AutocastGuard autocast(at::kCPU, at::kBFloat16, true);
      out = checkpointing ? checkpoint_block(fn, x) : fn(x);
    }
    CHECK(out.h.scalar_type() == at::kBFloat16);
    at::randn({100});  // the generator moves on before backward, as in training
    ((out.h.to(at::kFloat) * at::ones({4, 16})).sum() + out.aux_loss).backward();
    return std::make_tuple(out.h.to(at::kFloat), w.grad(), x.grad());
  };
  auto [h_plain, gw_plain, gx_plain] = run(false);
  auto [h_ckpt, gw_ckpt, gx_ckpt] = run(true);
  CHECK(at::equal(h_ckpt, h_plain));
  CHECK(at::equal(gw_ckpt, gw_plain));
  CHECK(at::equal(gx_ckpt, gx_plain));
}
