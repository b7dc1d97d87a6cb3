// ModelConfig: round trips on published config.json copies (tests/fixtures/nn/configs),
// both RoPE spellings, derived values, DeepSeek keys, and bad configs.
#include <catch2/catch.hpp>

#include <string>

#include "rhine/core/error.h"
#include "rhine/nn/config.h"

using Catch::Matchers::Contains;
using rhine::Json;
using rhine::nn::ModelConfig;

namespace {

std::string config_path(const std::string& name) {
  return std::string(RHINE_SOURCE_DIR) + "/tests/fixtures/nn/configs/" + name;
}

// Every key of `original` is in `written` with an equal value; rope_scaling
// objects may gain "type"/"rope_type" (Rhine writes both spellings).
void check_keys_kept(const Json& original, const Json& written) {
  for (const auto& [key, value] : original.items()) {
    INFO("key " << key);
    REQUIRE(written.contains(key));
    if (key == "rope_scaling" && value.is_object()) {
      for (const auto& [k, v] : value.items()) {
        INFO("rope_scaling." << k);
        CHECK(written[key][k] == v);
      }
      CHECK(written[key]["type"] == written[key]["rope_type"]);
    } else {
      CHECK(written[key] == value);
    }
  }
}

ModelConfig parse(const std::string& text) {
  return ModelConfig::from_json(Json::parse(text));
}

const char* kSmall = R"({"model_type": "llama", "vocab_size": 100, "hidden_size": 64,
  "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4)";

std::string small(const std::string& more) {
  return std::string(kSmall) + more + "}";
}

}  // namespace

TEST_CASE("EuroLLM-1.7B config.json round-trips and derives head_dim", "[nn][config]") {
  const Json original = rhine::read_json_file(config_path("eurollm-1.7b.json"), "test");
  const ModelConfig c = ModelConfig::from_json(original);
  CHECK(c.model_type == "llama");
  CHECK(c.hidden_size == 2048);
  CHECK(c.num_hidden_layers == 24);
  CHECK(c.num_attention_heads == 16);
  CHECK(c.num_key_value_heads == 8);
  CHECK(c.head_dim == 128);  // derived: 2048 / 16
  CHECK(c.intermediate_size == 5632);
  CHECK(c.vocab_size == 128000);
  CHECK(c.rope.rope_type == "default");
  CHECK(c.rope.rope_theta == 10000.0);
  CHECK(c.rms_norm_eps == 1e-5);
  CHECK_FALSE(c.tie_word_embeddings);
  CHECK(c.eos_token_id == std::vector<std::int64_t>{4});
  CHECK(c.gated_mlp());
  // Keys Rhine does not model are kept.
  CHECK(c.extra.at("pretraining_tp") == 1);
  CHECK(c.extra.at("torch_dtype") == "bfloat16");
  CHECK(c.extra.at("use_cache") == true);

  const Json written = c.to_json();
  check_keys_kept(original, written);
  CHECK_FALSE(written.contains("head_dim"));  // derived, not written (as HF v4)
  CHECK(ModelConfig::from_json(written) == c);
}

TEST_CASE("Mistral-7B-v0.1 config.json round-trips with its sliding window", "[nn][config]") {
  const Json original = rhine::read_json_file(config_path("mistral-7b-v0.1.json"), "test");
  const ModelConfig c = ModelConfig::from_json(original);
  CHECK(c.model_type == "mistral");
  CHECK(c.sliding_window == std::optional<std::int64_t>(4096));
  CHECK(c.num_key_value_heads == 8);
  CHECK(c.head_dim == 128);
  CHECK(c.intermediate_size == 14336);
  CHECK(c.max_position_embeddings == 32768);
  CHECK(c.extra.at("transformers_version") == "4.34.0.dev0");
  const Json written = c.to_json();
  check_keys_kept(original, written);
  CHECK(written["rope_scaling"].is_null());
  CHECK(ModelConfig::from_json(written) == c);
}

TEST_CASE("Apertus-8B config.json round-trips with llama3 RoPE, xIELU and QK-norm",
          "[nn][config]") {
  const Json original = rhine::read_json_file(config_path("apertus-8b.json"), "test");
  const ModelConfig c = ModelConfig::from_json(original);
  CHECK(c.model_type == "apertus");
  CHECK(c.hidden_act == "xielu");
  CHECK_FALSE(c.gated_mlp());
  CHECK(c.qk_norm);
  CHECK_FALSE(c.post_norm);
  CHECK(c.intermediate_size == 21504);
  CHECK(c.vocab_size == 131072);
  CHECK(c.rope.rope_type == "llama3");
  CHECK(c.rope.rope_theta == 12000000.0);
  CHECK(c.rope.factor == 8.0);
  CHECK(c.rope.low_freq_factor == 1.0);
  CHECK(c.rope.high_freq_factor == 4.0);
  CHECK(c.rope.original_max_position_embeddings == std::optional<std::int64_t>(8192));
  CHECK(c.pad_token_id == std::optional<std::int64_t>(3));
  CHECK(c.extra.at("hidden_dropout") == 0.0);
  CHECK(c.extra.at("dtype") == "bfloat16");
  const Json written = c.to_json();
  check_keys_kept(original, written);
  CHECK(written["rope_scaling"]["type"] == "llama3");
  CHECK(ModelConfig::from_json(written) == c);
}

TEST_CASE("transformers v5 rope_parameters and legacy rope_scaling.type read the same",
          "[nn][config]") {
  const auto v4 = parse(small(R"(, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3",
      "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192})"));
  const auto legacy = parse(small(R"(, "rope_theta": 500000.0, "rope_scaling": {"type": "llama3",
      "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192})"));
  const auto v5 =
      parse(small(R"(, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0,
      "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192})"));
  CHECK(v4 == legacy);
  CHECK(v4 == v5);
  CHECK(v5.rope.rope_theta == 500000.0);
  // v5 without original_max_position_embeddings falls back to max_position_embeddings.
  const auto fallback = parse(small(R"(, "max_position_embeddings": 4096,
      "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0})"));
  CHECK(fallback.rope.original_max_position_embeddings == std::optional<std::int64_t>(4096));
  // Unknown keys inside the rope object survive too.
  const auto extra = parse(small(R"(, "rope_scaling": {"rope_type": "linear", "factor": 2.0,
      "comment": "kept"})"));
  CHECK(extra.to_json()["rope_scaling"]["comment"] == "kept");
  CHECK(extra.to_json()["rope_scaling"]["factor"] == 2.0);
}

TEST_CASE("derived values: KV heads, head_dim, eos lists", "[nn][config]") {
  const auto mha = parse(small(""));
  CHECK(mha.num_key_value_heads == 4);  // absent -> num_attention_heads
  CHECK(mha.head_dim == 16);
  const auto nemo_like = parse(small(R"(, "num_key_value_heads": 2, "head_dim": 32)"));
  CHECK(nemo_like.head_dim == 32);  // explicit, q_proj out 128 != hidden 64
  CHECK(nemo_like.to_json()["head_dim"] == 32);
  const auto eos = parse(small(R"(, "eos_token_id": [2, 68])"));
  CHECK(eos.eos_token_id == std::vector<std::int64_t>{2, 68});
  CHECK(eos.to_json()["eos_token_id"] == Json::array({2, 68}));
  const auto eos1 = parse(small(R"(, "eos_token_id": [2])"));
  CHECK(eos1.to_json()["eos_token_id"] == Json::array({2}));  // list stays a list
}

TEST_CASE("DeepSeek-V3 keys are parsed, kept and written back", "[nn][config]") {
  // Values from DeepSeek's config_671B.json / the HF config (docs/architectures.md 1.1, 2.1, 4.2).
  const Json j =
      Json::parse(R"({"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"],
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
    "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc",
    "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1,
    "first_k_dense_replace": 3, "norm_topk_prob": true, "scoring_func": "sigmoid",
    "aux_loss_alpha": 0.001, "seq_aux": true, "ep_size": 1, "num_nextn_predict_layers": 1,
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
      "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
    "tie_word_embeddings": false, "bos_token_id": 0, "eos_token_id": 1})");
  const ModelConfig c = ModelConfig::from_json(j);
  CHECK(c.is_deepseek());
  CHECK(c.q_lora_rank == std::optional<std::int64_t>(1536));
  CHECK(c.kv_lora_rank == 512);
  CHECK(c.qk_rope_head_dim == 64);
  CHECK(c.head_dim == 64);  // HF V3 sets head_dim = qk_rope_head_dim
  CHECK(c.rope_interleave);
  CHECK(c.rope.rope_type == "yarn");
  CHECK(c.rope.factor == 40.0);
  CHECK(c.rope.mscale_all_dim == 1.0);
  CHECK(c.n_routed_experts == 256);
  CHECK(c.scoring_func == "sigmoid");
  CHECK(c.extra.at("aux_loss_alpha") == 0.001);  // ignored by HF, kept by Rhine
  CHECK(c.extra.at("seq_aux") == true);
  const Json written = c.to_json();
  check_keys_kept(j, written);
  CHECK(ModelConfig::from_json(written) == c);
}

TEST_CASE("configs saved by transformers 5 leave out keys their model_type implies",
          "[nn][config]") {
  // transformers' DeepseekV3Config writes neither scoring_func nor topk_method (its model
  // always routes with sigmoid scores and the noaux_tc group rule), and ApertusConfig has no
  // qk_norm key (the model always normalises q and k). Found by tests/oracle.
  Json v3 = Json::parse(R"({"model_type": "deepseek_v3", "vocab_size": 64, "hidden_size": 16,
    "intermediate_size": 24, "moe_intermediate_size": 8, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 2, "n_shared_experts": 1,
    "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
    "kv_lora_rank": 8, "q_lora_rank": 8, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4,
    "v_head_dim": 4, "first_k_dense_replace": 1, "norm_topk_prob": true})");
  ModelConfig c = ModelConfig::from_json(v3);
  CHECK(c.scoring_func == "sigmoid");
  CHECK(c.topk_method == "noaux_tc");
  v3["model_type"] = "deepseek_v2";
  c = ModelConfig::from_json(v3);
  CHECK(c.scoring_func == "softmax");
  CHECK(c.topk_method == "greedy");
  const Json apertus = Json::parse(R"({"model_type": "apertus", "vocab_size": 64, "hidden_size": 16,
    "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2})");
  CHECK(ModelConfig::from_json(apertus).qk_norm);
  CHECK_FALSE(ModelConfig::from_json(Json::parse(R"({"model_type": "llama", "vocab_size": 64,
    "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2})"))
                  .qk_norm);
}

TEST_CASE("bad configs fail with clear messages", "[nn][config]") {
  using rhine::Error;
  SECTION("heads do not divide hidden_size") {
    CHECK_THROWS_WITH(
        parse(R"({"model_type": "llama", "vocab_size": 100, "hidden_size": 60,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 8})"),
        Contains("[model_config]") &&
            Contains("hidden_size must be a positive multiple of num_attention_heads") &&
            Contains("[60, 8]"));
  }
  SECTION("KV heads do not divide query heads") {
    CHECK_THROWS_WITH(parse(small(R"(, "num_key_value_heads": 3)")),
                      Contains("multiple of num_key_value_heads") && Contains("[4, 3]"));
  }
  SECTION("unknown rope type") {
    CHECK_THROWS_WITH(
        parse(small(R"(, "rope_scaling": {"rope_type": "ntk-magic", "factor": 2.0})")),
        Contains("unknown rope type") && Contains("\"ntk-magic\""));
  }
  SECTION("negative sizes") {
    CHECK_THROWS_WITH(parse(R"({"model_type": "llama", "vocab_size": -5, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4})"),
                      Contains("vocab_size must be positive") && Contains("got -5"));
    CHECK_THROWS_WITH(parse(small(R"(, "num_key_value_heads": -2)")), Contains("must be positive"));
    CHECK_THROWS_WITH(parse(small(R"(, "sliding_window": 0)")),
                      Contains("sliding_window must be positive or null"));
  }
  SECTION("wrong types and unknown model types") {
    CHECK_THROWS_WITH(parse(small(R"(, "num_key_value_heads": 2.5)")), Contains("an integer"));
    CHECK_THROWS_WITH(parse(R"({"model_type": "gpt2", "vocab_size": 1})"),
                      Contains("unsupported model_type") && Contains("\"gpt2\""));
    CHECK_THROWS_WITH(parse(small(R"(, "hidden_act": "swish42")")),
                      Contains("unsupported hidden_act"));
    CHECK_THROWS_WITH(parse(R"({"model_type": "llama", "hidden_size": 64})"),
                      Contains("required key \"vocab_size\" is missing"));
  }
  SECTION("impossible rope values") {
    CHECK_THROWS_WITH(parse(small(R"(, "rope_theta": -1.0)")),
                      Contains("rope_theta must be positive"));
    CHECK_THROWS_WITH(parse(small(R"(, "rope_scaling": {"rope_type": "linear", "factor": 0.5})")),
                      Contains("factor must be >= 1"));
    CHECK_THROWS_WITH(
        parse(small(R"(, "rope_scaling": {"type": "linear", "rope_type": "yarn", "factor": 2.0})")),
        Contains("different"));
  }
  SECTION("odd head_dim") {
    CHECK_THROWS_WITH(parse(small(R"(, "head_dim": 15)")), Contains("head_dim must be even"));
  }
}
