#include "rhine/io/gguf.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <map>
#include <regex>

#include "rhine/core/error.h"
#include "rhine/core/file.h"
#include "rhine/core/json.h"
#include "rhine/formats/safetensors.h"
#include "rhine/io/hf.h"
#include "rhine/io/safetensors.h"
#include "rhine/tokenizer/sentencepiece.h"

namespace rhine::io {
namespace {

namespace fs = std::filesystem;
constexpr const char* kExport = "gguf_export";

// ggml's llama_ftype of a file whose weights are `type`.
std::uint32_t file_type(GgmlType type) {
  switch (type) {
    case GgmlType::F32: return 0;
    case GgmlType::F16: return 1;
    case GgmlType::Q8_0: return 7;
    case GgmlType::BF16: return 32;
  }
  return 0;
}

// Checks that llama.cpp's "llama" architecture computes what `c` describes.
void check_supported(const nn::ModelConfig& c, const fs::path& dir) {
  const std::string where = (dir / "config.json").string();
  RHINE_CHECK(c.model_type == "llama" || c.model_type == "mistral", kExport,
              "GGUF export writes the Llama family (llama, mistral); model_type is", c.model_type,
              "export other architectures with rhine-convert rhine-to-hf and llama.cpp's convert_hf_to_gguf.py");
  auto refuse = [&](bool bad, const char* key, const std::string& value) {
    RHINE_CHECK(!bad, kExport, std::string(where) + ": llama.cpp's llama architecture has no " + key, value,
                "this exporter writes plain Llama / Mistral models only");
  };
  refuse(c.uses_mla() || c.uses_moe(), "MLA / MoE layers (kv_lora_rank, n_routed_experts)", c.model_type);
  refuse(c.attention_bias, "attention_bias", "true");
  refuse(c.mlp_bias, "mlp_bias", "true");
  refuse(c.qk_norm, "qk_norm", "true");
  refuse(c.post_norm, "post_norm", "true");
  refuse(c.hidden_act != "silu", "hidden_act other than silu", c.hidden_act);
  refuse(c.rope.rope_type != "default", "rope_scaling of this type here", c.rope.rope_type);
}

// HF name -> ggml name; "" for tensors llama.cpp does not load (rotary inv_freq).
std::string ggml_name(const std::string& hf) {
  static const std::map<std::string, std::string> top = {
      {"model.embed_tokens.weight", "token_embd.weight"},
      {"model.norm.weight", "output_norm.weight"},
      {"lm_head.weight", "output.weight"}};
  static const std::map<std::string, std::string> layer = {
      {"input_layernorm.weight", "attn_norm.weight"},
      {"self_attn.q_proj.weight", "attn_q.weight"},
      {"self_attn.k_proj.weight", "attn_k.weight"},
      {"self_attn.v_proj.weight", "attn_v.weight"},
      {"self_attn.o_proj.weight", "attn_output.weight"},
      {"post_attention_layernorm.weight", "ffn_norm.weight"},
      {"mlp.gate_proj.weight", "ffn_gate.weight"},
      {"mlp.up_proj.weight", "ffn_up.weight"},
      {"mlp.down_proj.weight", "ffn_down.weight"}};
  if (auto it = top.find(hf); it != top.end()) return it->second;
  static const std::regex re(R"(model\.layers\.(\d+)\.(.+))");
  std::smatch m;
  if (std::regex_match(hf, m, re)) {
    if (m[2] == "self_attn.rotary_emb.inv_freq") return "";
    if (auto it = layer.find(m[2]); it != layer.end()) return "blk." + m[1].str() + "." + it->second;
  }
  RHINE_FAIL(kExport, "a tensor the Llama architecture does not have", hf,
             "export models whose config.json says llama or mistral, without adapters (merge LoRA first)");
}

// HF's q/k rows (per head: first halves then second halves of the rotary
// pairs) -> the pairwise order llama.cpp's RoPE reads (convert_hf_to_gguf's permute).
at::Tensor permute_rope_rows(const at::Tensor& w, std::int64_t heads) {
  const auto rows = w.size(0), cols = w.size(1);
  return w.reshape({heads, 2, rows / heads / 2, cols}).transpose(1, 2).reshape({rows, cols}).contiguous();
}

std::string encode(const at::Tensor& t32, GgmlType type) {
  const float* p = t32.data_ptr<float>();
  const auto n = t32.numel();
  switch (type) {
    case GgmlType::F32: return std::string(reinterpret_cast<const char*>(p), static_cast<std::size_t>(n) * 4);
    case GgmlType::F16: return encode_f16(p, n);
    case GgmlType::BF16: return encode_bf16(p, n);
    case GgmlType::Q8_0: return encode_q8_0(p, n);
  }
  return {};
}

fs::path find_tokenizer(const fs::path& dir, const GgufExportOptions& o) {
  if (o.tokenizer) {
    RHINE_CHECK(fs::is_regular_file(*o.tokenizer), kExport, "no tokenizer file at", o.tokenizer->string(),
                "pass the SentencePiece .model of the model's vocabulary");
    return *o.tokenizer;
  }
  RHINE_CHECK(fs::is_regular_file(dir / "tokenizer.model"), kExport,
              "GGUF export needs the SentencePiece tokenizer.model of the vocabulary; none in", dir.string(),
              fs::exists(dir / "tokenizer.json")
                  ? "this directory has only tokenizer.json, which this exporter does not translate yet; pass "
                    "--tokenizer FILE.model if the vocabulary came from SentencePiece"
                  : "pass --tokenizer FILE.model");
  return dir / "tokenizer.model";
}

// tokenizer.ggml.* of a SentencePiece model, padded to the model's vocabulary.
void add_tokenizer(GgufWriter& w, const fs::path& path, const nn::ModelConfig& c, const fs::path& dir,
                   GgufExportReport& report) {
  const auto spm = tokenizer::parse_spm_model(read_file(path.string(), kExport), path.string());
  const auto n = static_cast<std::int64_t>(spm.pieces.size());
  RHINE_CHECK(n <= c.vocab_size, kExport,
              "the tokenizer " + path.string() + " has more pieces than the model's vocab_size", n,
              "vocab_size is " + std::to_string(c.vocab_size) + "; resize the model or pass its own tokenizer");
  std::vector<std::string> tokens;
  std::vector<float> scores;
  std::vector<std::int32_t> types;
  for (const auto& p : spm.pieces) {
    tokens.push_back(p.piece);
    scores.push_back(p.score);
    types.push_back(static_cast<std::int32_t>(p.type));  // SentencePiece's and GGUF's numbering agree
  }
  for (std::int64_t i = n; i < c.vocab_size; ++i) {
    tokens.push_back("[PAD" + std::to_string(i) + "]");
    scores.push_back(-1000.0f);
    types.push_back(static_cast<std::int32_t>(tokenizer::SpmModelProto::PieceType::unused));
  }
  report.vocab = static_cast<std::int64_t>(tokens.size());
  report.padded_tokens = c.vocab_size - n;
  w.add("tokenizer.ggml.model", std::string("llama"));
  w.add("tokenizer.ggml.pre", std::string("default"));
  w.add("tokenizer.ggml.tokens", std::move(tokens));
  w.add("tokenizer.ggml.scores", std::move(scores));
  w.add("tokenizer.ggml.token_type", std::move(types));

  auto id = [&](std::optional<std::int64_t> from_config, std::int32_t from_spm) -> std::optional<std::uint32_t> {
    if (from_config && *from_config >= 0) return static_cast<std::uint32_t>(*from_config);
    if (from_spm >= 0) return static_cast<std::uint32_t>(from_spm);
    return std::nullopt;
  };
  const std::optional<std::int64_t> eos =
      c.eos_token_id.empty() ? std::nullopt : std::optional<std::int64_t>(c.eos_token_id.front());
  if (auto v = id(c.bos_token_id, spm.bos_id)) w.add("tokenizer.ggml.bos_token_id", *v);
  if (auto v = id(eos, spm.eos_id)) w.add("tokenizer.ggml.eos_token_id", *v);
  if (auto v = id(std::nullopt, spm.unk_id)) w.add("tokenizer.ggml.unknown_token_id", *v);
  if (auto v = id(c.pad_token_id, spm.pad_id)) w.add("tokenizer.ggml.padding_token_id", *v);

  bool add_bos = true, add_eos = false;
  std::string chat_template;
  if (fs::exists(dir / "tokenizer_config.json")) {
    const Json tc = read_json_file((dir / "tokenizer_config.json").string(), kExport);
    if (tc.contains("add_bos_token") && tc["add_bos_token"].is_boolean()) add_bos = tc["add_bos_token"].get<bool>();
    if (tc.contains("add_eos_token") && tc["add_eos_token"].is_boolean()) add_eos = tc["add_eos_token"].get<bool>();
    if (tc.contains("chat_template") && tc["chat_template"].is_string())
      chat_template = tc["chat_template"].get<std::string>();
  }
  if (chat_template.empty() && fs::exists(dir / "chat_template.jinja"))
    chat_template = read_file((dir / "chat_template.jinja").string(), kExport);
  w.add("tokenizer.ggml.add_bos_token", add_bos);
  w.add("tokenizer.ggml.add_eos_token", add_eos);
  w.add("tokenizer.ggml.add_space_prefix", spm.add_dummy_prefix);
  if (!chat_template.empty()) w.add("tokenizer.chat_template", chat_template);
}

}  // namespace

GgufExportReport export_hf_to_gguf(const fs::path& dir, const fs::path& out, const GgufExportOptions& options) {
  const nn::ModelConfig c = load_hf_config(dir);
  check_supported(c, dir);
  const GgmlType type = options.type;
  GgufExportReport report;

  GgufWriter w;
  w.add("general.architecture", std::string("llama"));
  w.add("general.name", options.name.empty() ? fs::absolute(dir).lexically_normal().filename().string()
                                             : options.name);
  w.add("general.file_type", file_type(type));
  w.add("general.quantization_version", std::uint32_t{2});
  auto u32 = [](std::int64_t v) { return static_cast<std::uint32_t>(v); };
  w.add("llama.vocab_size", u32(c.vocab_size));
  w.add("llama.context_length", u32(c.max_position_embeddings));
  w.add("llama.embedding_length", u32(c.hidden_size));
  w.add("llama.block_count", u32(c.num_hidden_layers));
  w.add("llama.feed_forward_length", u32(c.intermediate_size));
  w.add("llama.attention.head_count", u32(c.num_attention_heads));
  w.add("llama.attention.head_count_kv", u32(c.num_key_value_heads));
  w.add("llama.rope.freq_base", static_cast<float>(c.rope.rope_theta));
  w.add("llama.rope.dimension_count", u32(c.head_dim));
  w.add("llama.attention.layer_norm_rms_epsilon", static_cast<float>(c.rms_norm_eps));
  if (c.head_dim * c.num_attention_heads != c.hidden_size) {
    w.add("llama.attention.key_length", u32(c.head_dim));
    w.add("llama.attention.value_length", u32(c.head_dim));
  }
  add_tokenizer(w, find_tokenizer(dir, options), c, dir, report);

  // Tensors: read, converted and encoded one at a time while the file is written.
  const auto ckpt = std::make_shared<SafetensorsCheckpoint>(SafetensorsCheckpoint::open(dir.string()));
  std::vector<std::string> names = ckpt->names();
  // llama.cpp's order: token_embd first, then by layer, then the output tensors.
  auto rank = [](const std::string& g) {
    if (g == "token_embd.weight") return std::make_pair(-1L, g);
    if (g.rfind("blk.", 0) == 0) return std::make_pair(std::stol(g.substr(4)), g);
    return std::make_pair(1L << 40, g);
  };
  std::vector<std::pair<std::pair<long, std::string>, std::string>> order;
  for (const auto& hf : names)
    if (const std::string g = ggml_name(hf); !g.empty()) order.push_back({rank(g), hf});
  std::sort(order.begin(), order.end());
  for (const auto& [key, hf] : order) {
    const std::string g = key.second;
    const SafetensorsView view = ckpt->at(hf);
    std::vector<std::int64_t> shape = view.shape();
    GgmlType t = shape.size() == 1 ? GgmlType::F32 : type;
    if (t == GgmlType::Q8_0 && shape.back() % 32 != 0) t = GgmlType::F16;
    std::int64_t heads = 0;
    if (g.find(".attn_q.") != std::string::npos) heads = c.num_attention_heads;
    if (g.find(".attn_k.") != std::string::npos) heads = c.num_key_value_heads;
    const std::string name = hf;
    report.tensors += 1;
    report.parameters += view.numel();
    report.tensor_bytes += ggml_nbytes(t, shape);
    w.add_tensor({g, shape, t, [ckpt, name, heads, t] {
                    at::Tensor x = to_tensor(ckpt->at(name), ckpt->file_of(name)).to(at::kFloat).contiguous();
                    if (heads > 0) x = permute_rope_rows(x, heads);
                    return encode(x, t);
                  }});
  }
  RHINE_CHECK(report.tensors > 0, kExport, "no model tensors in", dir.string(), "");
  w.write(out.string());
  return report;
}

}  // namespace rhine::io
