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
                "pass the model's tokenizer.model (SentencePiece) or tokenizer.json (byte-level BPE)");
    return *o.tokenizer;
  }
  for (const char* name : {"tokenizer.model", "tokenizer.json"})
    if (fs::is_regular_file(dir / name)) return dir / name;
  RHINE_FAIL(kExport, "GGUF export needs the vocabulary; no tokenizer.model or tokenizer.json in", dir.string(),
             "pass --tokenizer FILE (a SentencePiece .model or a byte-level BPE tokenizer.json)");
}

// The settings of tokenizer_config.json (or chat_template.jinja) llama.cpp reads.
struct TokenizerConfig {
  std::optional<bool> add_bos, add_eos;
  std::string chat_template;
};
TokenizerConfig read_tokenizer_config(const fs::path& dir) {
  TokenizerConfig t;
  if (fs::exists(dir / "tokenizer_config.json")) {
    const Json tc = read_json_file((dir / "tokenizer_config.json").string(), kExport);
    if (tc.contains("add_bos_token") && tc["add_bos_token"].is_boolean()) t.add_bos = tc["add_bos_token"].get<bool>();
    if (tc.contains("add_eos_token") && tc["add_eos_token"].is_boolean()) t.add_eos = tc["add_eos_token"].get<bool>();
    if (tc.contains("chat_template") && tc["chat_template"].is_string())
      t.chat_template = tc["chat_template"].get<std::string>();
  }
  if (t.chat_template.empty() && fs::exists(dir / "chat_template.jinja"))
    t.chat_template = read_file((dir / "chat_template.jinja").string(), kExport);
  return t;
}

// Special ids: config.json's, else the tokenizer's own (-1: none).
void add_special_ids(GgufWriter& w, const nn::ModelConfig& c, std::int32_t bos, std::int32_t eos, std::int32_t unk,
                     std::int32_t pad) {
  auto put = [&](const char* key, std::optional<std::int64_t> from_config, std::int32_t own) {
    if (from_config && *from_config >= 0) w.add(key, static_cast<std::uint32_t>(*from_config));
    else if (own >= 0) w.add(key, static_cast<std::uint32_t>(own));
  };
  put("tokenizer.ggml.bos_token_id", c.bos_token_id, bos);
  put("tokenizer.ggml.eos_token_id",
      c.eos_token_id.empty() ? std::nullopt : std::optional<std::int64_t>(c.eos_token_id.front()), eos);
  put("tokenizer.ggml.unknown_token_id", std::nullopt, unk);
  put("tokenizer.ggml.padding_token_id", c.pad_token_id, pad);
}

void pad_vocabulary(std::vector<std::string>& tokens, std::vector<std::int32_t>& types, std::vector<float>* scores,
                    std::int64_t vocab_size) {
  for (auto i = static_cast<std::int64_t>(tokens.size()); i < vocab_size; ++i) {
    tokens.push_back("[PAD" + std::to_string(i) + "]");
    types.push_back(5);  // unused
    if (scores) scores->push_back(-1000.0f);
  }
}

// llama.cpp's name of the pre-tokenizer a byte-level BPE tokenizer.json uses (the
// regexes it implements); "" when it implements none that matches.
std::string bpe_pre_name(const Json& pre) {
  static const std::string llama3 =
      R"re((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)re";
  if (pre.is_object() && pre.value("type", "") == "ByteLevel" && pre.value("use_regex", true) &&
      !pre.value("add_prefix_space", false))
    return "gpt-2";
  if (pre.is_object() && pre.value("type", "") == "Sequence" && pre.contains("pretokenizers")) {
    const Json& seq = pre["pretokenizers"];
    if (seq.size() == 2 && seq[0].value("type", "") == "Split" && seq[0].contains("pattern") &&
        seq[0]["pattern"].value("Regex", "") == llama3 && seq[1].value("type", "") == "ByteLevel" &&
        !seq[1].value("use_regex", true))
      return "llama-bpe";
  }
  return "";
}

// tokenizer.ggml.* of a byte-level BPE tokenizer.json ("gpt2" in llama.cpp's terms).
void add_bpe_tokenizer(GgufWriter& w, const fs::path& path, const nn::ModelConfig& c, const fs::path& dir,
                       GgufExportReport& report) {
  const Json j = read_json_file(path.string(), kExport);
  const Json& m = j.contains("model") ? j["model"] : Json();
  RHINE_CHECK(m.is_object() && m.value("type", "") == "BPE" && m.contains("vocab") && m.contains("merges"), kExport,
              "GGUF export reads SentencePiece .model files and byte-level BPE tokenizer.json files; " + path.string() +
                  " has model type",
              m.is_object() ? m.value("type", std::string("?")) : std::string("?"),
              "pass the model's SentencePiece tokenizer.model with --tokenizer");
  const std::string pre = bpe_pre_name(j.contains("pre_tokenizer") ? j["pre_tokenizer"] : Json());
  RHINE_CHECK(!pre.empty(), kExport,
              "llama.cpp implements no pre-tokenizer equal to the one of " + path.string(),
              Verbatim{j.contains("pre_tokenizer") ? j["pre_tokenizer"].dump().substr(0, 300) : "null"},
              "byte-level BPE with the GPT-2 or Llama 3 split is supported; use llama.cpp's convert_hf_to_gguf.py "
              "for other pre-tokenizers");
  std::vector<std::string> tokens;
  std::vector<std::int32_t> types;
  auto place = [&](std::int64_t id, const std::string& text, std::int32_t type) {
    RHINE_CHECK(id >= 0 && id < c.vocab_size, kExport, "a token id of " + path.string() + " is outside the model's vocab_size",
                id, "vocab_size is " + std::to_string(c.vocab_size) + "; resize the model or pass its own tokenizer");
    if (static_cast<std::int64_t>(tokens.size()) <= id) {
      tokens.resize(static_cast<std::size_t>(id) + 1);
      types.resize(static_cast<std::size_t>(id) + 1, -1);
    }
    tokens[static_cast<std::size_t>(id)] = text;
    types[static_cast<std::size_t>(id)] = type;
  };
  for (const auto& [text, id] : m["vocab"].items()) place(id.get<std::int64_t>(), text, 1);  // normal
  std::int32_t bos = -1;  // the post-processor's first special token, below
  if (j.contains("added_tokens"))
    for (const auto& a : j["added_tokens"])
      place(a.at("id").get<std::int64_t>(), a.at("content").get<std::string>(), a.value("special", false) ? 3 : 4);
  for (std::size_t i = 0; i < types.size(); ++i)
    RHINE_CHECK(types[i] >= 0, kExport, "the vocabulary of " + path.string() + " has a hole at id", i,
                "every id below the largest must name a token");
  const auto n = static_cast<std::int64_t>(tokens.size());
  pad_vocabulary(tokens, types, nullptr, c.vocab_size);
  report.vocab = static_cast<std::int64_t>(tokens.size());
  report.padded_tokens = c.vocab_size - n;
  std::vector<std::string> merges;
  for (const auto& mg : m["merges"])
    merges.push_back(mg.is_string() ? mg.get<std::string>() : mg.at(0).get<std::string>() + " " + mg.at(1).get<std::string>());

  // add_bos / add_eos: tokenizer_config.json, else what the post-processor template adds.
  TokenizerConfig tc = read_tokenizer_config(dir);
  bool template_bos = false, template_eos = false;
  if (j.contains("post_processor") && j["post_processor"].is_object() &&
      j["post_processor"].value("type", "") == "TemplateProcessing") {
    const Json& single = j["post_processor"]["single"];
    if (!single.empty() && single.front().contains("SpecialToken")) {
      template_bos = true;
      bos = static_cast<std::int32_t>(
          j["post_processor"]["special_tokens"][single.front()["SpecialToken"]["id"].get<std::string>()]["ids"][0]
              .get<std::int64_t>());
    }
    if (single.size() > 1 && single.back().contains("SpecialToken")) template_eos = true;
  }
  w.add("tokenizer.ggml.model", std::string("gpt2"));
  w.add("tokenizer.ggml.pre", pre);
  w.add("tokenizer.ggml.tokens", std::move(tokens));
  w.add("tokenizer.ggml.token_type", std::move(types));
  w.add("tokenizer.ggml.merges", std::move(merges));
  add_special_ids(w, c, bos, /*eos=*/-1, /*unk=*/-1, /*pad=*/-1);
  w.add("tokenizer.ggml.add_bos_token", tc.add_bos.value_or(template_bos));
  w.add("tokenizer.ggml.add_eos_token", tc.add_eos.value_or(template_eos));
  if (!tc.chat_template.empty()) w.add("tokenizer.chat_template", tc.chat_template);
}

// tokenizer.ggml.* of a SentencePiece model ("llama" in llama.cpp's terms).
void add_spm_tokenizer(GgufWriter& w, const fs::path& path, const nn::ModelConfig& c, const fs::path& dir,
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
  pad_vocabulary(tokens, types, &scores, c.vocab_size);
  report.vocab = static_cast<std::int64_t>(tokens.size());
  report.padded_tokens = c.vocab_size - n;
  w.add("tokenizer.ggml.model", std::string("llama"));
  w.add("tokenizer.ggml.pre", std::string("default"));
  w.add("tokenizer.ggml.tokens", std::move(tokens));
  w.add("tokenizer.ggml.scores", std::move(scores));
  w.add("tokenizer.ggml.token_type", std::move(types));
  add_special_ids(w, c, spm.bos_id, spm.eos_id, spm.unk_id, spm.pad_id);
  const TokenizerConfig tc = read_tokenizer_config(dir);
  w.add("tokenizer.ggml.add_bos_token", tc.add_bos.value_or(true));
  w.add("tokenizer.ggml.add_eos_token", tc.add_eos.value_or(false));
  w.add("tokenizer.ggml.add_space_prefix", spm.add_dummy_prefix);
  if (!tc.chat_template.empty()) w.add("tokenizer.chat_template", tc.chat_template);
}

void add_tokenizer(GgufWriter& w, const fs::path& path, const nn::ModelConfig& c, const fs::path& dir,
                   GgufExportReport& report) {
  if (path.extension() == ".json") add_bpe_tokenizer(w, path, c, dir, report);
  else add_spm_tokenizer(w, path, c, dir, report);
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
  // llama.cpp's order: token_embd first, then by layer, then the output tensors.
  auto rank = [](const std::string& g) {
    if (g == "token_embd.weight") return std::make_pair(-1L, g);
    if (g.rfind("blk.", 0) == 0) return std::make_pair(std::stol(g.substr(4)), g);
    return std::make_pair(1L << 40, g);
  };
  std::vector<std::pair<std::pair<long, std::string>, std::string>> order;
  for (const auto& hf : ckpt->names())
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
