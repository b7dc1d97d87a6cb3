// HF model directories: import against float64 reference logits computed by
// tests/fixtures/hf/make_fixtures.py (plain PyTorch, HF formulas, files written
// by hand), import -> export -> import bitwise round trips whose exported files
// are checked by an independent python reader (tests/fixtures/hf/check_hf_dir.py,
// which lists the names transformers expects), and malformed directories.
#include "torch_test.h"

#include <ATen/core/grad_mode.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "io/io_test_util.h"
#include "rhine/core/error.h"
#include "rhine/core/file.h"
#include "rhine/core/json.h"
#include "rhine/io/hf.h"
#include "rhine/io/safetensors.h"
#include "rhine/tokenizer/sentencepiece.h"
#include "test_util.h"

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using io_test::hf_fixture;

namespace {

const char* const kArchs[] = {"llama", "llama_sharded", "mistral", "apertus"};

// A copy of fixture `name` in `dir` whose weights are `edit`ed (written by
// Rhine's safetensors writer as one model.safetensors).
template <class Edit>
fs::path edited_copy(const fs::path& dir, const std::string& name, Edit&& edit) {
  const fs::path out = dir / (name + "_edited");
  fs::create_directories(out);
  fs::copy_file(hf_fixture(name) / "config.json", out / "config.json");
  auto w = rhine::load_safetensors(hf_fixture(name).string());
  edit(w);
  rhine::save_safetensors((out / "model.safetensors").string(), w);
  return out;
}

void check_same_state(rhine::nn::CausalLM& a, rhine::nn::CausalLM& b) {
  auto sa = rhine::io::hf_state_dict(*a), sb = rhine::io::hf_state_dict(*b);
  REQUIRE(sa.size() == sb.size());
  for (std::size_t i = 0; i < sa.size(); ++i) {
    INFO(sa[i].first);
    REQUIRE(sa[i].first == sb[i].first);
    REQUIRE(sa[i].second.scalar_type() == sb[i].second.scalar_type());
    CHECK(at::equal(sa[i].second, sb[i].second));
  }
}

}  // namespace

TEST_CASE("HF fixtures import with the logits of the float64 reference", "[io][hf]") {
  for (const char* arch : kArchs) {
    INFO(arch);
    const auto dir = hf_fixture(arch);
    const auto ref = rhine::load_safetensors((dir / "reference_logits.safetensors").string());
    const auto rows = io_test::read_ids(dir / "ids.txt");
    REQUIRE(rows.size() == ref.size());
    rhine::io::ImportOptions f64;
    f64.dtype = at::kDouble;
    auto lm64 = rhine::io::load_hf_model(dir, f64);
    auto lm32 = rhine::io::load_hf_model(dir);  // float32 default
    CHECK(lm32->model->embed_tokens->weight.scalar_type() == at::kFloat);
    for (std::size_t i = 0; i < rows.size(); ++i) {
      const at::Tensor& want = ref.at("logits." + std::to_string(i));  // [T, V] float64
      at::Tensor got64 = io_test::logits_of(lm64, rows[i]), got32 = io_test::logits_of(lm32, rows[i]);
      REQUIRE(got64.sizes() == want.sizes());
      CHECK(io_test::rel_err(got64, want) < 1e-12);
      CHECK(io_test::rel_err(got32, want) < 1e-5);
    }
  }
}

TEST_CASE("import -> export -> import is lossless and transformers' names come out", "[io][hf]") {
  rhine::test::TempDir tmp("hf_roundtrip");
  for (const char* arch : kArchs) {
    for (std::uint64_t shard : {std::uint64_t{0}, std::uint64_t{20000}}) {
      INFO(arch << " max_shard_bytes " << shard);
      auto a = rhine::io::load_hf_model(hf_fixture(arch));
      const fs::path out = tmp.path / (std::string(arch) + "_" + std::to_string(shard));
      rhine::io::ExportOptions eo;
      eo.max_shard_bytes = shard;
      eo.tokenizer_from = hf_fixture(arch);
      auto files = rhine::io::save_hf_model(a, out, eo);
      CHECK(fs::exists(out / "config.json"));
      CHECK(fs::exists(out / "generation_config.json"));
      CHECK(fs::exists(out / (shard ? "model.safetensors.index.json" : "model.safetensors")));
      auto report = io_test::python_check("model '" + out.string() + "'");
      INFO(report.dump());
      CHECK(report["problems"].empty());
      if (shard) CHECK(report["files"].size() > 1);
      auto b = rhine::io::load_hf_model(out);
      auto ja = a->config().to_json(), jb = b->config().to_json();
      ja.erase("torch_dtype");  // the bf16 fixture is exported as the float32 it was imported as
      jb.erase("torch_dtype");
      CHECK(ja == jb);
      check_same_state(a, b);
      for (const auto& row : io_test::read_ids(hf_fixture(arch) / "ids.txt"))
        CHECK(at::equal(io_test::logits_of(a, row), io_test::logits_of(b, row)));
    }
  }
  // Tied embeddings: no lm_head in the export (the checker requires its absence too).
  auto tied = rhine::load_safetensors((tmp.path / "mistral_0" / "model.safetensors").string());
  CHECK(tied.count("lm_head.weight") == 0);
  CHECK(tied.count("model.embed_tokens.weight") == 1);
}

TEST_CASE("export in bf16 writes bf16 tensors and torch_dtype, dtype auto reads them back", "[io][hf]") {
  rhine::test::TempDir tmp("hf_bf16");
  auto a = rhine::io::load_hf_model(hf_fixture("apertus"));
  rhine::io::ExportOptions eo;
  eo.dtype = at::kBFloat16;
  rhine::io::save_hf_model(a, tmp.path / "bf16", eo);
  auto report = io_test::python_check("model '" + (tmp.path / "bf16").string() + "'");
  INFO(report.dump());
  CHECK(report["problems"].empty());
  CHECK(rhine::read_json_file((tmp.path / "bf16" / "config.json").string(), "test")["torch_dtype"] ==
        "bfloat16");
  rhine::io::ImportOptions io;
  io.dtype = std::nullopt;  // auto: the config's torch_dtype
  auto b = rhine::io::load_hf_model(tmp.path / "bf16", io);
  for (const auto& [name, t] : rhine::io::hf_state_dict(*b)) {
    INFO(name);
    CHECK(t.scalar_type() == at::kBFloat16);
  }
  auto sa = rhine::io::hf_state_dict(*a), sb = rhine::io::hf_state_dict(*b);
  for (std::size_t i = 0; i < sa.size(); ++i) CHECK(at::equal(sa[i].second.to(at::kBFloat16), sb[i].second));
  // The bf16 sharded fixture: auto keeps bf16 and the float32 import is exact.
  auto s16 = rhine::io::load_hf_model(hf_fixture("llama_sharded"), io);
  auto s32 = rhine::io::load_hf_model(hf_fixture("llama_sharded"));
  CHECK(s16->model->norm->weight.scalar_type() == at::kBFloat16);
  CHECK(at::equal(s16->model->norm->weight.to(at::kFloat), s32->model->norm->weight));
}

TEST_CASE("zero-copy import wraps the file copy-on-write and trains without touching it", "[io][hf]") {
  rhine::io::ImportOptions zc;
  zc.zero_copy = true;
  auto a = rhine::io::load_hf_model(hf_fixture("llama"), zc);
  auto b = rhine::io::load_hf_model(hf_fixture("llama"));
  check_same_state(a, b);
  const std::string before = rhine::read_file((hf_fixture("llama") / "model.safetensors").string(), "test");
  {
    at::NoGradGuard g;
    for (auto& p : a->parameters()) p.mul_(2.0);
  }
  CHECK(rhine::read_file((hf_fixture("llama") / "model.safetensors").string(), "test") == before);
  auto c = rhine::io::load_hf_model(hf_fixture("llama"));
  check_same_state(b, c);
  CHECK(at::equal(a->model->norm->weight, 2.0 * b->model->norm->weight));
}

TEST_CASE("tied embeddings: lm_head absent or equal loads, different is an error", "[io][hf]") {
  rhine::test::TempDir tmp("hf_tied");
  auto equal = edited_copy(tmp.path, "mistral", [](auto& w) { w["lm_head.weight"] = w["model.embed_tokens.weight"].clone(); });
  auto lm = rhine::io::load_hf_model(equal);
  CHECK(lm->config().tie_word_embeddings);
  auto differs = edited_copy(tmp.path / "d", "mistral",
                             [](auto& w) { w["lm_head.weight"] = w["model.embed_tokens.weight"] + 1.0f; });
  CHECK_THROWS_WITH(rhine::io::load_hf_model(differs),
                    Contains("[hf_import] tie_word_embeddings is true but lm_head.weight differs") &&
                        Contains("set tie_word_embeddings false"));
}

TEST_CASE("malformed HF directories give errors that name the problem", "[io][hf]") {
  rhine::test::TempDir tmp("hf_bad");
  SECTION("missing and unexpected tensors are listed together") {
    auto dir = edited_copy(tmp.path, "llama", [](auto& w) {
      w.erase("model.layers.1.mlp.up_proj.weight");
      w.erase("model.norm.weight");
      w["model.layers.0.mlp.extra.weight"] = at::zeros({2});
    });
    CHECK_THROWS_WITH(rhine::io::load_hf_model(dir),
                      Contains("[hf_import] 2 missing and 1 unexpected tensors in") &&
                          Contains("\"model.layers.1.mlp.up_proj.weight\"") && Contains("\"model.norm.weight\"") &&
                          Contains("unexpected [\"model.layers.0.mlp.extra.weight\"]") &&
                          Contains("allowed_extra"));
  }
  SECTION("untied model without lm_head gets the tie hint") {
    auto dir = edited_copy(tmp.path, "llama", [](auto& w) { w.erase("lm_head.weight"); });
    CHECK_THROWS_WITH(rhine::io::load_hf_model(dir),
                      Contains("missing [\"lm_head.weight\"]") && Contains("set tie_word_embeddings true"));
  }
  SECTION("allowed_missing / allowed_extra accept known differences") {
    auto dir = edited_copy(tmp.path, "llama", [](auto& w) {
      w.erase("model.norm.weight");
      w["model.layers.0.mlp.extra.weight"] = at::zeros({2});
    });
    rhine::io::ImportOptions o;
    o.allowed_missing = {R"(model\.norm\.weight)"};
    o.allowed_extra.push_back(R"(.*\.extra\.weight)");  // next to the default inv_freq allowance
    auto lm = rhine::io::load_hf_model(dir, o);
    CHECK(at::equal(lm->model->norm->weight, at::ones({32})));  // kept its initialisation
    // The default allowance covers the fixture's rotary inv_freq buffers; without it they are unexpected.
    rhine::io::ImportOptions strict;
    strict.allowed_extra.clear();
    CHECK_THROWS_WITH(rhine::io::load_hf_model(hf_fixture("llama"), strict),
                      Contains("unexpected [\"model.layers.0.self_attn.rotary_emb.inv_freq\", "
                               "\"model.layers.1.self_attn.rotary_emb.inv_freq\"]"));
  }
  SECTION("wrong shapes name the tensor and both shapes") {
    auto dir = edited_copy(tmp.path, "llama", [](auto& w) {
      w["model.layers.0.self_attn.k_proj.weight"] = at::zeros({8, 32});
    });
    CHECK_THROWS_WITH(rhine::io::load_hf_model(dir),
                      Contains("[hf_import] tensor shapes differ") &&
                          Contains("model.layers.0.self_attn.k_proj.weight: file [8, 32], model [16, 32]"));
  }
  SECTION("no config.json, no weights") {
    fs::create_directories(tmp.path / "empty");
    CHECK_THROWS_WITH(rhine::io::load_hf_model(tmp.path / "empty"), Contains("[hf_import] no config.json"));
    fs::copy_file(hf_fixture("llama") / "config.json", tmp.path / "empty" / "config.json");
    CHECK_THROWS_WITH(rhine::io::load_hf_model(tmp.path / "empty"),
                      Contains("neither model.safetensors.index.json nor model.safetensors"));
  }
  SECTION("bad index.json, shard missing, index out of sync") {
    const fs::path dir = tmp.path / "sharded";
    fs::copy(hf_fixture("llama_sharded"), dir);
    const std::string index = (dir / "model.safetensors.index.json").string();
    const std::string good = rhine::read_file(index, "test");
    rhine::write_file_atomic(index, good.substr(0, good.size() / 2));
    CHECK_THROWS_WITH(rhine::io::load_hf_model(dir), Contains("invalid JSON") && Contains("index.json"));
    rhine::write_file_atomic(index, R"({"metadata": {}})");
    CHECK_THROWS_WITH(rhine::io::load_hf_model(dir), Contains("index has no \"weight_map\""));
    rhine::Json j = rhine::Json::parse(good);
    j["weight_map"]["model.norm.weight"] = "model-00001-of-00003.safetensors";
    rhine::write_file_atomic(index, j.dump());
    CHECK_THROWS_WITH(rhine::io::load_hf_model(dir), Contains("the index maps a tensor to a shard that does not hold it") &&
                                                         Contains("model.norm.weight"));
    rhine::write_file_atomic(index, good);
    fs::remove(dir / "model-00002-of-00003.safetensors");
    CHECK_THROWS_WITH(rhine::io::load_hf_model(dir), Contains("model-00002-of-00003.safetensors"));
  }
}

TEST_CASE("float8 block-scaled weights: an error by default, dequantised on request", "[io][hf]") {
  rhine::test::TempDir tmp("hf_fp8");
  const fs::path dir = tmp.path / "fp8";
  fs::create_directories(dir);
  rhine::Json cfg = rhine::read_json_file((hf_fixture("llama") / "config.json").string(), "test");
  cfg["quantization_config"] = {{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"weight_block_size", {16, 16}}};
  rhine::write_json_file((dir / "config.json").string(), cfg);
  auto w = rhine::load_safetensors((hf_fixture("llama") / "model.safetensors").string());
  const std::string name = "model.layers.0.self_attn.q_proj.weight";  // [32, 32]: 2 x 2 blocks of 16
  std::vector<unsigned char> codes(32 * 32);
  for (std::size_t i = 0; i < codes.size(); ++i) codes[i] = static_cast<unsigned char>((i * 37) % 0x7e);
  at::Tensor scale = at::tensor({0.5f, 2.0f, 0.25f, 4.0f}).view({2, 2});
  std::vector<at::Tensor> keep;
  std::vector<rhine::SafetensorsTensor> ts;
  for (auto& [n, t] : w) {
    if (n == name) continue;
    keep.push_back(t.contiguous());
    ts.push_back({n, rhine::to_safetensors_dtype(t.scalar_type()), t.sizes().vec(), keep.back().data_ptr(),
                  static_cast<std::size_t>(t.numel() * t.element_size())});
  }
  ts.push_back({name, rhine::SafetensorsDtype::F8_E4M3, {32, 32}, codes.data(), codes.size()});
  ts.push_back({name + "_scale_inv", rhine::SafetensorsDtype::F32, {2, 2}, scale.data_ptr(), 16});
  rhine::write_safetensors((dir / "model.safetensors").string(), ts);

  CHECK_THROWS_WITH(rhine::io::load_hf_model(dir), Contains("[hf_import] 1 tensors in") && Contains("are float8") &&
                                                       Contains(name) && Contains("dequantize_fp8"));
  rhine::io::ImportOptions o;
  o.dequantize_fp8 = true;
  auto lm = rhine::io::load_hf_model(dir, o);
  // Independent of Rhine's decoder: E4M3 closed form, then the block scale.
  at::Tensor want = at::empty({32, 32}, at::kFloat);
  for (int i = 0; i < 32; ++i)
    for (int j = 0; j < 32; ++j) {
      unsigned b = codes[i * 32 + j];
      int e = (b >> 3) & 15, m = b & 7;
      float v = e == 0 ? std::ldexp(m / 8.0f, -6) : std::ldexp(1.0f + m / 8.0f, e - 7);
      want[i][j] = v * scale[i / 16][j / 16].item<float>();
    }
  CHECK(at::equal(lm->model->blocks[0]->self_attn->q_proj->weight, want));
  CHECK(lm->config().extra.count("quantization_config") == 0);
}

TEST_CASE("export is atomic and refuses to overwrite unless asked", "[io][hf]") {
  rhine::test::TempDir tmp("hf_atomic");
  auto lm = rhine::io::load_hf_model(hf_fixture("mistral"));
  const fs::path out = tmp.path / "out";
  rhine::io::save_hf_model(lm, out);
  CHECK_THROWS_WITH(rhine::io::save_hf_model(lm, out), Contains("[hf_export] the output directory exists") &&
                                                          Contains("overwrite"));
  rhine::write_file_atomic((out / "stale.txt").string(), "old");
  rhine::io::ExportOptions eo;
  eo.overwrite = true;
  eo.max_shard_bytes = 20000;
  rhine::io::save_hf_model(lm, out, eo);
  CHECK_FALSE(fs::exists(out / "stale.txt"));  // replaced as a whole
  CHECK_FALSE(fs::exists(out / "model.safetensors"));
  CHECK(fs::exists(out / "model.safetensors.index.json"));
  std::size_t entries = 0;
  for (const auto& e : fs::directory_iterator(tmp.path)) {
    INFO(e.path());
    ++entries;
  }
  CHECK(entries == 1);  // no temporary directory left behind
  // generation_config.json from the config when no source directory is given.
  auto gen = rhine::read_json_file((out / "generation_config.json").string(), "test");
  CHECK(gen["bos_token_id"] == 1);
  CHECK(gen["eos_token_id"] == 2);
  // Tokenizer files are copied from tokenizer_from.
  const fs::path src = tmp.path / "src";
  fs::copy(hf_fixture("mistral"), src);
  rhine::write_file_atomic((src / "tokenizer.json").string(), R"({"version": "1.0"})");
  rhine::write_file_atomic((src / "special_tokens_map.json").string(), "{}");
  eo.tokenizer_from = src;
  auto files = rhine::io::save_hf_model(lm, out, eo);
  CHECK(rhine::read_file((out / "tokenizer.json").string(), "test") == R"({"version": "1.0"})");
  CHECK(fs::exists(out / "special_tokens_map.json"));
  CHECK(rhine::read_file((out / "generation_config.json").string(), "test") ==
        rhine::read_file((src / "generation_config.json").string(), "test"));
}

TEST_CASE("DeepSeek V2/V3 (MLA, MoE, MTP): export has transformers' names, round trip is lossless", "[io][hf]") {
  rhine::test::TempDir tmp("hf_deepseek");
  // Tiny configs with every kind of tensor: q compression (V3) or q_proj (V2), shared
  // experts, a dense first layer, the V3 router bias, one MTP layer (V3).
  const char* v3 = R"({"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"],
    "vocab_size": 48, "hidden_size": 32, "intermediate_size": 40, "moe_intermediate_size": 12,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
    "n_shared_experts": 1, "n_routed_experts": 4, "routed_scaling_factor": 2.5,
    "kv_lora_rank": 16, "q_lora_rank": 24, "qk_rope_head_dim": 8, "v_head_dim": 8,
    "qk_nope_head_dim": 8, "topk_method": "noaux_tc", "n_group": 2, "topk_group": 1,
    "num_experts_per_tok": 2, "moe_layer_freq": 1, "first_k_dense_replace": 1,
    "norm_topk_prob": true, "scoring_func": "sigmoid", "num_nextn_predict_layers": 1,
    "max_position_embeddings": 64, "rms_norm_eps": 1e-06, "rope_theta": 10000,
    "tie_word_embeddings": false, "bos_token_id": 0, "eos_token_id": 1})";
  const char* v2 = R"({"model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"],
    "vocab_size": 48, "hidden_size": 32, "intermediate_size": 40, "moe_intermediate_size": 12,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
    "n_shared_experts": 2, "n_routed_experts": 4, "routed_scaling_factor": 1.0,
    "kv_lora_rank": 16, "q_lora_rank": null, "qk_rope_head_dim": 8, "v_head_dim": 8,
    "qk_nope_head_dim": 8, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
    "num_experts_per_tok": 2, "moe_layer_freq": 1, "first_k_dense_replace": 1,
    "norm_topk_prob": false, "scoring_func": "softmax",
    "max_position_embeddings": 64, "rms_norm_eps": 1e-06, "rope_theta": 10000,
    "tie_word_embeddings": false, "bos_token_id": 0, "eos_token_id": 1})";
  const std::vector<std::int64_t> row = {3, 17, 5, 40, 2, 9, 33, 11};
  for (const char* text : {v3, v2}) {
    auto cfg = rhine::nn::ModelConfig::from_json(rhine::Json::parse(text));
    INFO(cfg.model_type);
    rhine::nn::CausalLMOptions co;
    co.init_seed = 21;
    rhine::nn::CausalLM a(cfg, co);
    {
      at::NoGradGuard g;  // non-trivial norms and router bias, so every tensor matters
      for (auto& p : a->named_parameters())
        if (p.key().find("norm") != std::string::npos) p.value().uniform_(0.5, 1.5);
      for (auto& b : a->named_buffers())
        if (b.key().find("e_score_correction_bias") != std::string::npos) b.value().uniform_(-0.1, 0.1);
    }
    const fs::path out = tmp.path / cfg.model_type;
    rhine::io::ExportOptions eo;
    eo.max_shard_bytes = 30000;
    rhine::io::save_hf_model(a, out, eo);
    auto report = io_test::python_check("model '" + out.string() + "'");
    INFO(report.dump());
    CHECK(report["problems"].empty());
    auto b = rhine::io::load_hf_model(out);
    auto jb = b->config().to_json();
    CHECK(jb["torch_dtype"] == "float32");
    jb.erase("torch_dtype");
    CHECK(jb == a->config().to_json());
    check_same_state(a, b);
    CHECK(at::equal(io_test::logits_of(a, row), io_test::logits_of(b, row)));
    // An export in bf16 keeps the router bias in float32 (as DeepSeek's checkpoints do).
    if (cfg.model_type == "deepseek_v3") {
      eo.dtype = at::kBFloat16;
      eo.max_shard_bytes = 0;
      rhine::io::save_hf_model(a, tmp.path / "v3_bf16", eo);
      auto w = rhine::load_safetensors((tmp.path / "v3_bf16" / "model.safetensors").string());
      CHECK(w.at("model.layers.1.mlp.gate.e_score_correction_bias").scalar_type() == at::kFloat);
      CHECK(w.at("model.layers.2.mlp.experts.3.down_proj.weight").scalar_type() == at::kBFloat16);
      CHECK(w.count("model.layers.2.shared_head.head.weight") == 1);  // the MTP layer
    }
  }
}

TEST_CASE("write_tokenizer_files puts a run's tokenizer under its HF names", "[hf]") {
  rhine::test::TempDir tmp("tokfiles");
  const fs::path src = tmp.path / "src", dir = tmp.path / "dir";
  fs::create_directories(src);
  fs::create_directories(dir);
  // A SentencePiece model: tokenizer.model as is, plus the tokenizer.json converted from it.
  rhine::tokenizer::SpmModelProto m;
  m.model_type = rhine::tokenizer::SpmModelProto::ModelType::bpe;
  using T = rhine::tokenizer::SpmModelProto::PieceType;
  m.pieces = {{"<unk>", 0, T::unknown}, {"<s>", 0, T::control}, {"</s>", 0, T::control}, {"a", -1, T::normal}};
  const std::string model_bytes = rhine::tokenizer::serialize_spm_model(m);
  rhine::write_file_atomic((src / "tok.model").string(), model_bytes);
  rhine::io::write_tokenizer_files(src / "tok.model", dir);
  CHECK(rhine::read_file((dir / "tokenizer.model").string(), "t") == model_bytes);
  CHECK(rhine::read_json_file((dir / "tokenizer.json").string(), "t")["model"]["type"] == "BPE");
  // A tokenizer.json of another vocabulary: replaces tokenizer.json, removes the stale
  // tokenizer.model and added_tokens.json, brings its own tokenizer_config.json.
  rhine::write_file_atomic((dir / "added_tokens.json").string(), "{\"<x>\": 9}");
  rhine::write_file_atomic((dir / "tokenizer_config.json").string(), "{\"bos_token\": \"<s>\"}");
  const std::string json = rhine::tokenizer::spm_to_tokenizer_json(m, "m").dump();
  rhine::write_file_atomic((src / "tokenizer.json").string(), json);
  rhine::write_file_atomic((src / "tokenizer_config.json").string(), "{\"bos_token\": \"<bos>\"}");
  rhine::io::write_tokenizer_files(src / "tokenizer.json", dir);
  CHECK(rhine::read_file((dir / "tokenizer.json").string(), "t") == json);
  CHECK_FALSE(fs::exists(dir / "tokenizer.model"));
  CHECK_FALSE(fs::exists(dir / "added_tokens.json"));
  CHECK(rhine::read_file((dir / "tokenizer_config.json").string(), "t") == "{\"bos_token\": \"<bos>\"}");
  // With its own tokenizer.model beside it, the same tokenizer.model in `dir` stays.
  rhine::write_file_atomic((src / "tokenizer.model").string(), model_bytes);
  rhine::write_file_atomic((dir / "tokenizer.model").string(), model_bytes);
  rhine::io::write_tokenizer_files(src / "tokenizer.json", dir);
  CHECK(fs::exists(dir / "tokenizer.model"));
  CHECK_THROWS_AS(rhine::io::write_tokenizer_files(src / "missing.model", dir), rhine::Error);
}
