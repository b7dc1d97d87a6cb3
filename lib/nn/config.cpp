#include "rhine/nn/config.h"

#include <cmath>

#include "rhine/core/error.h"

namespace rhine::nn {
namespace {

constexpr const char* kComponent = "model_config";

const std::vector<std::string> kModelTypes = {"llama", "mistral", "apertus", "deepseek_v2",
                                              "deepseek_v3"};
const std::vector<std::string> kRopeTypes = {"default", "linear", "llama3", "yarn"};
const std::vector<std::string> kActs = {"silu", "xielu", "gelu", "gelu_pytorch_tanh", "relu"};

bool contains(const std::vector<std::string>& v, const std::string& s) {
  for (const auto& e : v)
    if (e == s) return true;
  return false;
}

// Reads rope_scaling (v4) or rope_parameters (v5) into `r`. `theta_v4` is the
// top-level rope_theta when present.
RopeParameters read_rope(const Json* scaling, std::optional<double> theta_v4, bool v5) {
  RopeParameters r;
  if (theta_v4) r.rope_theta = *theta_v4;
  if (!scaling || scaling->is_null()) return r;
  RHINE_CHECK(scaling->is_object(), kComponent,
              std::string(v5 ? "rope_parameters" : "rope_scaling") + " must be an object or null",
              Verbatim{scaling->dump()}, "see docs/architectures.md section 4.1");
  JsonFields f(*scaling, v5 ? "model_config.rope_parameters" : "model_config.rope_scaling");
  // v4 writes "type" (legacy) or "rope_type"; Rhine writes both.
  auto type = f.optional<std::string>("rope_type");
  auto legacy = f.optional<std::string>("type");
  if (type && legacy)
    RHINE_CHECK(*type == *legacy, kComponent,
                "rope_scaling has different \"type\" and \"rope_type\"",
                (std::vector<std::string>{*legacy, *type}), "keep one of them");
  r.rope_type = type ? *type : legacy ? *legacy : "default";
  if (auto t = f.optional<double>("rope_theta")) r.rope_theta = *t;
  r.factor = f.get("factor", 1.0);
  r.original_max_position_embeddings = f.optional<std::int64_t>("original_max_position_embeddings");
  r.low_freq_factor = f.get("low_freq_factor", 1.0);
  r.high_freq_factor = f.get("high_freq_factor", 4.0);
  r.beta_fast = f.get("beta_fast", 32.0);
  r.beta_slow = f.get("beta_slow", 1.0);
  r.mscale = f.get("mscale", 0.0);
  r.mscale_all_dim = f.get("mscale_all_dim", 0.0);
  r.attention_factor = f.optional<double>("attention_factor");
  r.truncate = f.get("truncate", true);
  r.extra = f.unknown();
  return r;
}

Json write_rope(const RopeParameters& r) {
  if (r.rope_type == "default" && r.extra.empty()) return nullptr;
  Json s = r.extra;
  s["type"] = r.rope_type;
  s["rope_type"] = r.rope_type;
  if (r.rope_type != "default") s["factor"] = r.factor;
  if (r.original_max_position_embeddings)
    s["original_max_position_embeddings"] = *r.original_max_position_embeddings;
  if (r.rope_type == "llama3") {
    s["low_freq_factor"] = r.low_freq_factor;
    s["high_freq_factor"] = r.high_freq_factor;
  }
  if (r.rope_type == "yarn") {
    s["beta_fast"] = r.beta_fast;
    s["beta_slow"] = r.beta_slow;
    if (r.mscale != 0.0) s["mscale"] = r.mscale;
    if (r.mscale_all_dim != 0.0) s["mscale_all_dim"] = r.mscale_all_dim;
    if (r.attention_factor) s["attention_factor"] = *r.attention_factor;
    if (!r.truncate) s["truncate"] = false;
  }
  return s;
}

}  // namespace

bool RopeParameters::operator==(const RopeParameters& o) const {
  return rope_type == o.rope_type && rope_theta == o.rope_theta && factor == o.factor &&
         original_max_position_embeddings == o.original_max_position_embeddings &&
         low_freq_factor == o.low_freq_factor && high_freq_factor == o.high_freq_factor &&
         beta_fast == o.beta_fast && beta_slow == o.beta_slow && mscale == o.mscale &&
         mscale_all_dim == o.mscale_all_dim && attention_factor == o.attention_factor &&
         truncate == o.truncate && extra == o.extra;
}

bool ModelConfig::is_deepseek() const {
  return model_type == "deepseek_v2" || model_type == "deepseek_v3";
}

ModelConfig ModelConfig::from_json(const Json& j) {
  JsonFields f(j, kComponent);
  ModelConfig c;
  c.model_type = f.require<std::string>("model_type");
  RHINE_CHECK(contains(kModelTypes, c.model_type), kComponent, "unsupported model_type",
              c.model_type, "Rhine builds llama, mistral, apertus, deepseek_v2 and deepseek_v3");
  c.architectures = f.get("architectures", std::vector<std::string>{});
  c.vocab_size = f.require<std::int64_t>("vocab_size");
  c.hidden_size = f.require<std::int64_t>("hidden_size");
  c.intermediate_size = f.require<std::int64_t>("intermediate_size");
  c.num_hidden_layers = f.require<std::int64_t>("num_hidden_layers");
  c.num_attention_heads = f.require<std::int64_t>("num_attention_heads");
  auto kv = f.optional<std::int64_t>("num_key_value_heads");
  auto hd = f.optional<std::int64_t>("head_dim");
  c.max_position_embeddings = f.get<std::int64_t>("max_position_embeddings", 2048);
  c.hidden_act = f.get<std::string>("hidden_act", c.model_type == "apertus" ? "xielu" : "silu");
  c.rms_norm_eps = f.get("rms_norm_eps", 1e-6);
  c.initializer_range = f.get("initializer_range", 0.02);
  c.attention_bias = f.get("attention_bias", false);
  c.attention_dropout = f.get("attention_dropout", 0.0);
  c.mlp_bias = f.get("mlp_bias", false);
  c.tie_word_embeddings = f.get("tie_word_embeddings", false);
  c.sliding_window = f.optional<std::int64_t>("sliding_window");
  // Apertus always normalises q and k; transformers' ApertusConfig has no qk_norm key.
  c.qk_norm = f.get("qk_norm", c.model_type == "apertus");
  c.post_norm = f.get("post_norm", false);
  c.rope_interleave = f.get("rope_interleave", false);
  c.bos_token_id = f.optional<std::int64_t>("bos_token_id");
  c.pad_token_id = f.optional<std::int64_t>("pad_token_id");
  if (const Json* eos = f.raw("eos_token_id"); eos && !eos->is_null()) {
    if (eos->is_array()) {
      c.eos_is_list_ = true;
      c.eos_token_id = f.get("eos_token_id", std::vector<std::int64_t>{});
    } else {
      c.eos_token_id = {f.require<std::int64_t>("eos_token_id")};
    }
  }

  // RoPE: v5 rope_parameters wins; else v4 rope_theta + rope_scaling.
  auto theta = f.optional<double>("rope_theta");
  if (const Json* p = f.raw("rope_parameters"); p && !p->is_null()) {
    c.rope = read_rope(p, theta, true);
  } else {
    c.rope = read_rope(f.raw("rope_scaling"), theta, false);
  }
  // v5 falls back to max_position_embeddings for the scaled types.
  if (!c.rope.original_max_position_embeddings &&
      (c.rope.rope_type == "llama3" || c.rope.rope_type == "yarn"))
    c.rope.original_max_position_embeddings = c.max_position_embeddings;

  // DeepSeek keys: read for every model_type (MLA / MoE / MTP in an otherwise
  // dense config is a Rhine extension); neutral defaults when absent
  // (no MLA or MoE, one expert group, scaling 1), except the deepseek_v3 routing defaults below.
  c.q_lora_rank = f.optional<std::int64_t>("q_lora_rank");
  c.kv_lora_rank = f.get<std::int64_t>("kv_lora_rank", 0);
  c.qk_nope_head_dim = f.get<std::int64_t>("qk_nope_head_dim", 0);
  c.qk_rope_head_dim = f.get<std::int64_t>("qk_rope_head_dim", 0);
  c.v_head_dim = f.get<std::int64_t>("v_head_dim", 0);
  c.n_routed_experts = f.optional<std::int64_t>("n_routed_experts").value_or(0);
  c.n_shared_experts = f.optional<std::int64_t>("n_shared_experts").value_or(0);
  c.num_experts_per_tok = f.optional<std::int64_t>("num_experts_per_tok").value_or(0);
  c.moe_intermediate_size = f.get<std::int64_t>("moe_intermediate_size", 0);
  c.first_k_dense_replace = f.get<std::int64_t>("first_k_dense_replace", 0);
  c.moe_layer_freq = f.get<std::int64_t>("moe_layer_freq", 1);
  c.n_group = f.optional<std::int64_t>("n_group").value_or(1);
  c.topk_group = f.optional<std::int64_t>("topk_group").value_or(1);
  c.routed_scaling_factor = f.get("routed_scaling_factor", 1.0);
  c.norm_topk_prob = f.get("norm_topk_prob", false);
  // transformers' DeepseekV3 config has neither key (its model always routes this way).
  const bool v3 = c.model_type == "deepseek_v3";
  c.scoring_func = f.get<std::string>("scoring_func", v3 ? "sigmoid" : "softmax");
  c.topk_method = f.get<std::string>("topk_method", v3 ? "noaux_tc" : "greedy");
  c.num_nextn_predict_layers = f.get<std::int64_t>("num_nextn_predict_layers", 0);
  // DeepSeek interleaves the rope dims in its checkpoints (section 1.5);
  // HF's rope_interleave defaults to true for V3.
  if (c.is_deepseek() && !f.has("rope_interleave")) c.rope_interleave = true;

  // Checks on the raw values come before deriving from them.
  RHINE_CHECK(c.num_attention_heads > 0, kComponent, "num_attention_heads must be positive",
              c.num_attention_heads, "set the number of query heads");
  c.num_key_value_heads = kv ? *kv : c.num_attention_heads;
  if (hd) {
    c.head_dim = *hd;
  } else {
    RHINE_CHECK(
        c.hidden_size > 0 && c.hidden_size % c.num_attention_heads == 0, kComponent,
        "hidden_size must be a positive multiple of num_attention_heads when head_dim is absent",
        (std::vector<std::int64_t>{c.hidden_size, c.num_attention_heads}),
        "fix the sizes or set head_dim explicitly");
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  if (c.is_deepseek() && c.qk_rope_head_dim > 0 && !hd) c.head_dim = c.qk_rope_head_dim;
  c.extra = f.unknown();
  c.validate();
  return c;
}

ModelConfig ModelConfig::from_file(const std::string& path) {
  return from_json(read_json_file(path, kComponent));
}

void ModelConfig::validate() const {
  auto positive = [](std::int64_t v, const char* key) {
    RHINE_CHECK(v > 0, kComponent, std::string(key) + " must be positive", v, "check config.json");
  };
  RHINE_CHECK(contains(kModelTypes, model_type), kComponent, "unsupported model_type", model_type,
              "Rhine builds llama, mistral, apertus, deepseek_v2 and deepseek_v3");
  positive(vocab_size, "vocab_size");
  positive(hidden_size, "hidden_size");
  positive(intermediate_size, "intermediate_size");
  positive(num_hidden_layers, "num_hidden_layers");
  positive(num_attention_heads, "num_attention_heads");
  positive(num_key_value_heads, "num_key_value_heads");
  positive(head_dim, "head_dim");
  positive(max_position_embeddings, "max_position_embeddings");
  RHINE_CHECK(num_attention_heads % num_key_value_heads == 0, kComponent,
              "num_attention_heads must be a multiple of num_key_value_heads",
              (std::vector<std::int64_t>{num_attention_heads, num_key_value_heads}),
              "GQA groups query heads evenly over key/value heads");
  RHINE_CHECK(head_dim % 2 == 0, kComponent, "head_dim must be even for RoPE", head_dim,
              "RoPE rotates pairs of dimensions");
  RHINE_CHECK(contains(kActs, hidden_act), kComponent, "unsupported hidden_act", hidden_act,
              "use silu (SwiGLU) or xielu (Apertus)");
  RHINE_CHECK(rms_norm_eps > 0 && std::isfinite(rms_norm_eps), kComponent,
              "rms_norm_eps must be positive", rms_norm_eps, "typical values are 1e-5 or 1e-6");
  RHINE_CHECK(attention_dropout >= 0 && attention_dropout < 1, kComponent,
              "attention_dropout must be in [0, 1)", attention_dropout, "");
  if (sliding_window)
    RHINE_CHECK(*sliding_window > 0, kComponent, "sliding_window must be positive or null",
                *sliding_window, "use null for full attention");
  RHINE_CHECK(!post_norm, kComponent, "post_norm=true is not supported", post_norm,
              "released Apertus models use post_norm=false");
  // RoPE.
  RHINE_CHECK(contains(kRopeTypes, rope.rope_type), kComponent, "unknown rope type", rope.rope_type,
              "Rhine supports default, linear, llama3 and yarn");
  RHINE_CHECK(rope.rope_theta > 0 && std::isfinite(rope.rope_theta), kComponent,
              "rope_theta must be positive", rope.rope_theta, "");
  if (rope.rope_type != "default")
    RHINE_CHECK(rope.factor >= 1.0, kComponent, "rope scaling factor must be >= 1", rope.factor,
                "a factor below 1 shrinks the context");
  if (rope.rope_type == "llama3") {
    RHINE_CHECK(rope.high_freq_factor > rope.low_freq_factor && rope.low_freq_factor > 0,
                kComponent, "llama3 rope needs 0 < low_freq_factor < high_freq_factor",
                (std::vector<double>{rope.low_freq_factor, rope.high_freq_factor}), "");
  }
  if (rope.original_max_position_embeddings)
    positive(*rope.original_max_position_embeddings, "original_max_position_embeddings");
  if (rope.rope_type == "yarn")
    RHINE_CHECK(rope.beta_fast > rope.beta_slow && rope.beta_slow > 0, kComponent,
                "yarn needs beta_fast > beta_slow > 0",
                (std::vector<double>{rope.beta_fast, rope.beta_slow}), "");
  RHINE_CHECK(!is_deepseek() || uses_mla(), kComponent,
              "deepseek models need kv_lora_rank > 0 (MLA)", kv_lora_rank,
              "set kv_lora_rank (512 in DeepSeek-V2/V3)");
  if (uses_mla()) {
    positive(qk_nope_head_dim, "qk_nope_head_dim");
    positive(qk_rope_head_dim, "qk_rope_head_dim");
    positive(v_head_dim, "v_head_dim");
    RHINE_CHECK(qk_rope_head_dim % 2 == 0, kComponent, "qk_rope_head_dim must be even",
                qk_rope_head_dim, "RoPE rotates pairs of dimensions");
    if (q_lora_rank) positive(*q_lora_rank, "q_lora_rank");
  } else {
    RHINE_CHECK(kv_lora_rank == 0, kComponent, "kv_lora_rank must be >= 0", kv_lora_rank,
                "0 (absent) = standard attention");
  }
  RHINE_CHECK(n_routed_experts >= 0 && n_shared_experts >= 0, kComponent,
              "expert counts must be >= 0",
              (std::vector<std::int64_t>{n_routed_experts, n_shared_experts}), "");
  if (uses_moe()) {
    positive(moe_intermediate_size, "moe_intermediate_size");
    RHINE_CHECK(num_experts_per_tok > 0 && num_experts_per_tok <= n_routed_experts, kComponent,
                "num_experts_per_tok must be in [1, n_routed_experts]",
                (std::vector<std::int64_t>{num_experts_per_tok, n_routed_experts}), "");
    RHINE_CHECK(first_k_dense_replace >= 0 && moe_layer_freq >= 1, kComponent,
                "need first_k_dense_replace >= 0 and moe_layer_freq >= 1",
                (std::vector<std::int64_t>{first_k_dense_replace, moe_layer_freq}), "");
    RHINE_CHECK(scoring_func == "softmax" || scoring_func == "sigmoid", kComponent,
                "unsupported scoring_func", scoring_func, "use softmax (V2) or sigmoid (V3)");
    RHINE_CHECK(topk_method == "greedy" || topk_method == "group_limited_greedy" ||
                    topk_method == "noaux_tc",
                kComponent, "unsupported topk_method", topk_method,
                "use greedy, group_limited_greedy (V2) or noaux_tc (V3)");
    RHINE_CHECK(routed_scaling_factor > 0 && std::isfinite(routed_scaling_factor), kComponent,
                "routed_scaling_factor must be positive", routed_scaling_factor, "");
    RHINE_CHECK(n_group > 0 && n_routed_experts % n_group == 0 && topk_group >= 1 &&
                    topk_group <= n_group,
                kComponent,
                "n_routed_experts must split evenly into n_group groups, 1 <= topk_group <= n_group",
                (std::vector<std::int64_t>{n_routed_experts, n_group, topk_group}), "");
    if (topk_method != "greedy") {
      const std::int64_t per_group = n_routed_experts / n_group;
      RHINE_CHECK(num_experts_per_tok <= topk_group * per_group, kComponent,
                  "num_experts_per_tok exceeds the experts of the kept groups",
                  (std::vector<std::int64_t>{num_experts_per_tok, topk_group, per_group}),
                  "raise topk_group or lower num_experts_per_tok");
      if (topk_method == "noaux_tc")
        RHINE_CHECK(per_group >= 2, kComponent,
                    "noaux_tc scores a group by its top-2 experts; groups need >= 2 experts",
                    per_group, "lower n_group");
    }
  }
  RHINE_CHECK(num_nextn_predict_layers >= 0, kComponent,
              "num_nextn_predict_layers must be >= 0", num_nextn_predict_layers, "0 = no MTP");
}

double ModelConfig::mla_softmax_scale() const {
  double scale = 1.0 / std::sqrt(static_cast<double>(qk_head_dim()));
  if (rope.rope_type == "yarn" && rope.mscale_all_dim != 0.0) {
    const double m =
        rope.factor <= 1.0 ? 1.0 : 0.1 * rope.mscale_all_dim * std::log(rope.factor) + 1.0;
    scale *= m * m;
  }
  return scale;
}

Json ModelConfig::to_json() const {
  Json j = extra;
  j["model_type"] = model_type;
  if (!architectures.empty()) j["architectures"] = architectures;
  j["vocab_size"] = vocab_size;
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = intermediate_size;
  j["num_hidden_layers"] = num_hidden_layers;
  j["num_attention_heads"] = num_attention_heads;
  j["num_key_value_heads"] = num_key_value_heads;
  // head_dim is written only when it is not the derived value (as HF v4).
  if (is_deepseek() ? head_dim != qk_rope_head_dim : head_dim * num_attention_heads != hidden_size)
    j["head_dim"] = head_dim;
  j["max_position_embeddings"] = max_position_embeddings;
  j["hidden_act"] = hidden_act;
  j["rms_norm_eps"] = rms_norm_eps;
  j["initializer_range"] = initializer_range;
  j["attention_bias"] = attention_bias;
  j["attention_dropout"] = attention_dropout;
  j["mlp_bias"] = mlp_bias;
  j["tie_word_embeddings"] = tie_word_embeddings;
  if (model_type == "mistral" || sliding_window)
    j["sliding_window"] = sliding_window ? Json(*sliding_window) : Json(nullptr);
  if (model_type == "apertus" || qk_norm) j["qk_norm"] = qk_norm;
  if (model_type == "apertus") j["post_norm"] = post_norm;
  if (is_deepseek() || rope_interleave) j["rope_interleave"] = rope_interleave;
  j["rope_theta"] = rope.rope_theta;
  j["rope_scaling"] = write_rope(rope);
  j["bos_token_id"] = bos_token_id ? Json(*bos_token_id) : Json(nullptr);
  if (eos_is_list_ || eos_token_id.size() > 1)
    j["eos_token_id"] = eos_token_id;
  else
    j["eos_token_id"] = eos_token_id.empty() ? Json(nullptr) : Json(eos_token_id[0]);
  j["pad_token_id"] = pad_token_id ? Json(*pad_token_id) : Json(nullptr);
  if (is_deepseek() || uses_mla() || uses_moe() || num_nextn_predict_layers > 0) {
    j["q_lora_rank"] = q_lora_rank ? Json(*q_lora_rank) : Json(nullptr);
    j["kv_lora_rank"] = kv_lora_rank;
    j["qk_nope_head_dim"] = qk_nope_head_dim;
    j["qk_rope_head_dim"] = qk_rope_head_dim;
    j["v_head_dim"] = v_head_dim;
    j["n_routed_experts"] = n_routed_experts;
    j["n_shared_experts"] = n_shared_experts;
    j["num_experts_per_tok"] = num_experts_per_tok;
    j["moe_intermediate_size"] = moe_intermediate_size;
    j["first_k_dense_replace"] = first_k_dense_replace;
    j["moe_layer_freq"] = moe_layer_freq;
    j["n_group"] = n_group;
    j["topk_group"] = topk_group;
    j["routed_scaling_factor"] = routed_scaling_factor;
    j["norm_topk_prob"] = norm_topk_prob;
    j["scoring_func"] = scoring_func;
    j["topk_method"] = topk_method;
    j["num_nextn_predict_layers"] = num_nextn_predict_layers;
  }
  return j;
}

void ModelConfig::save(const std::string& path) const {
  write_json_file(path, to_json());
}

bool ModelConfig::operator==(const ModelConfig& o) const {
  return to_json() == o.to_json() && rope == o.rope;
}

}  // namespace rhine::nn
