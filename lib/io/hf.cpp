#include "rhine/io/hf.h"

#include <ATen/core/grad_mode.h>
#include <ATen/ATen.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <functional>
#include <optional>
#include <cerrno>
#include <cstring>
#include <regex>
#include <set>

#include "rhine/core/error.h"
#include "rhine/core/file.h"
#include "rhine/core/json.h"
#include "rhine/core/log.h"
#include "rhine/formats/safetensors.h"
#include "rhine/io/lora.h"
#include "rhine/io/row_shards.h"
#include "rhine/io/safetensors.h"
#include "rhine/nn/moe.h"
#include "rhine/tokenizer/sentencepiece.h"
#include "pages.h"

namespace fs = std::filesystem;

namespace rhine::io {
namespace {

constexpr const char* kImport = "hf_import";
constexpr const char* kExport = "hf_export";

bool ends_with(const std::string& s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool matches_any(const std::vector<std::regex>& res, const std::string& name) {
  for (const auto& re : res)
    if (std::regex_match(name, re)) return true;
  return false;
}

std::vector<std::regex> compile(const std::vector<std::string>& patterns, const char* what) {
  std::vector<std::regex> out;
  for (const auto& p : patterns) {
    try {
      out.emplace_back(p, std::regex::ECMAScript);
    } catch (const std::regex_error& e) {
      RHINE_FAIL(kImport, std::string("invalid regex in ImportOptions::") + what, p, e.what());
    }
  }
  return out;
}

std::string shape_str(const std::vector<std::int64_t>& s) { return detail::display(s); }

bool is_lora_name(const std::string& name) {
  return name.find(".lora_A.") != std::string::npos || name.find(".lora_B.") != std::string::npos;
}

// The block edge of DeepSeek FP8 checkpoints (config quantization_config.weight_block_size).
std::int64_t fp8_block(const nn::ModelConfig& c) {
  const auto it = c.extra.find("quantization_config");
  if (it != c.extra.end() && it->is_object() && it->contains("weight_block_size")) {
    const auto& b = (*it)["weight_block_size"];
    if (b.is_array() && !b.empty() && b[0].is_number_integer()) {
      RHINE_CHECK(b.size() == 2 && b[0] == b[1], kImport,
                  "only square FP8 scale blocks are supported, got weight_block_size", Verbatim{b.dump()},
                  "DeepSeek-V3 checkpoints use [128, 128]");
      return b[0].get<std::int64_t>();
    }
  }
  return 128;
}

}  // namespace

const std::vector<std::string>& hf_tokenizer_files() {
  static const std::vector<std::string> files = {"tokenizer.json",          "tokenizer.model",   "tokenizer_config.json",
                                                 "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                                                 "generation_config.json"};
  return files;
}

void write_tokenizer_files(const fs::path& tokenizer, const fs::path& dir) {
  const std::string bytes = read_file(tokenizer.string(), "hf_export");
  const std::size_t first = bytes.find_first_not_of(" \t\r\n");
  const bool json = first != std::string::npos && bytes[first] == '{';
  if (json) {
    write_file_atomic((dir / "tokenizer.json").string(), bytes);
    const fs::path own_model = fs::path(tokenizer).replace_filename("tokenizer.model"), model = dir / "tokenizer.model";
    if (fs::exists(model) && !(fs::is_regular_file(own_model) &&
                               read_file(own_model.string(), "hf_export") == read_file(model.string(), "hf_export")))
      fs::remove(model);
  } else {
    const auto proto = tokenizer::parse_spm_model(bytes, tokenizer.string());
    write_file_atomic((dir / "tokenizer.model").string(), bytes);
    write_file_atomic((dir / "tokenizer.json").string(),
                      tokenizer::spm_to_tokenizer_json(proto, tokenizer.string()).dump(1) + "\n");
  }
  // The tokenizer's own side files replace those in `dir`; an added_tokens.json of another
  // vocabulary is dropped (its ids may name other tokens).
  const fs::path home = tokenizer.has_parent_path() ? tokenizer.parent_path() : fs::path(".");
  const bool same_dir = fs::equivalent(home, dir);
  for (const char* f : {"tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "added_tokens.json"}) {
    if (same_dir) break;
    const fs::path beside = home / f;
    if (fs::is_regular_file(beside))
      write_file_atomic((dir / f).string(), read_file(beside.string(), "hf_export"));
    else if (std::string_view(f) == "added_tokens.json")
      fs::remove(dir / f);
  }
}

std::string hf_dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "float32";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    case at::kDouble: return "float64";
    default:
      RHINE_FAIL("hf", "no Hugging Face name for dtype", std::string(c10::toString(dtype)),
                 "use float32, bfloat16, float16 or float64");
  }
}

at::ScalarType parse_hf_dtype(const std::string& name) {
  if (name == "float32" || name == "fp32" || name == "f32" || name == "float") return at::kFloat;
  if (name == "bfloat16" || name == "bf16") return at::kBFloat16;
  if (name == "float16" || name == "fp16" || name == "f16" || name == "half") return at::kHalf;
  if (name == "float64" || name == "fp64" || name == "f64" || name == "double") return at::kDouble;
  RHINE_FAIL("hf", "unknown dtype", name, "use float32, bfloat16, float16 or float64");
}

nn::ModelConfig load_hf_config(const fs::path& dir) {
  const fs::path cfg = dir / "config.json";
  RHINE_CHECK(fs::is_directory(dir), kImport, "not a directory", dir.string(),
              "pass the directory holding config.json and the safetensors");
  RHINE_CHECK(fs::exists(cfg), kImport, "no config.json in the model directory", dir.string(),
              "an HF model directory holds config.json next to model.safetensors");
  return nn::ModelConfig::from_file(cfg.string());
}

std::vector<std::pair<std::string, at::Tensor>> hf_state_dict(nn::CausalLMImpl& model) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& p : model.named_parameters())
    if (!is_lora_name(p.key())) out.emplace_back(p.key(), p.value());
  for (const auto& b : model.named_buffers())
    if (!is_lora_name(b.key())) out.emplace_back(b.key(), b.value());
  return out;
}

nn::CausalLM load_hf_model(const fs::path& dir, const ImportOptions& options) {
  nn::ModelConfig config = load_hf_config(dir);
  at::ScalarType dtype = at::kFloat;
  if (options.dtype) {
    dtype = *options.dtype;
  } else {
    for (const char* key : {"torch_dtype", "dtype"}) {
      auto it = config.extra.find(key);
      if (it != config.extra.end() && it->is_string()) {
        dtype = parse_hf_dtype(it->get<std::string>());
        break;
      }
    }
  }
  RHINE_CHECK(at::isFloatingType(dtype), kImport, "the model dtype must be a floating type",
              std::string(c10::toString(dtype)), "use float32, bfloat16, float16 or float64");

  // Opens config-less index/shards with the reader's own validation errors.
  const SafetensorsCheckpoint ckpt = SafetensorsCheckpoint::open(dir.string());
  const std::vector<std::string> file_names = ckpt.names();

  // Float8 weights: dequantised on request, else one error naming them.
  const std::int64_t block = fp8_block(config);
  std::set<std::string> fp8, scales;
  for (const auto& n : file_names)
    if (is_float8(ckpt.at(n).dtype())) fp8.insert(n);
  if (!fp8.empty()) {
    RHINE_CHECK(options.dequantize_fp8, kImport,
                std::to_string(fp8.size()) + " tensors in " + dir.string() + " are float8",
                std::vector<std::string>(fp8.begin(), std::next(fp8.begin(), std::min<std::size_t>(fp8.size(), 8))),
                "set ImportOptions::dequantize_fp8 (rhine-convert: --dequantize-fp8) to decode them "
                "with their _scale_inv block scales");
    for (const auto& n : fp8)
      if (ckpt.contains(n + "_scale_inv")) scales.insert(n + "_scale_inv");
    config.extra.erase("quantization_config");
  }

  // When the file must provide every parameter (no allowed_missing), the
  // model is built without drawing its Linear and Embedding weights
  // (CausalLMOptions::defer_init: never-written pages cost no memory) since
  // the copies below overwrite them: a bf16 import then never holds a float32
  // model, and the random initialisation is skipped.
  nn::CausalLMOptions model_options = options.model;
  const bool deferred = options.allowed_missing.empty() && !model_options.defer_init;
  if (deferred) model_options.defer_init = true;
  nn::CausalLM lm(config, model_options);
  if (dtype != at::kFloat) lm->to(dtype);

  std::map<std::string, at::Tensor> params, buffers;
  std::vector<std::string> order;
  for (const auto& p : lm->named_parameters()) {
    params[p.key()] = p.value();
    order.push_back(p.key());
  }
  for (const auto& b : lm->named_buffers()) {
    buffers[b.key()] = b.value();
    order.push_back(b.key());
  }

  const auto extra_re = compile(options.allowed_extra, "allowed_extra");
  const auto missing_re = compile(options.allowed_missing, "allowed_missing");
  std::vector<std::string> missing, unexpected, mismatched;
  for (const auto& [name, t] : params)
    if (!ckpt.contains(name) && !matches_any(missing_re, name)) missing.push_back(name);
  bool tied_head_in_file = false;
  for (const auto& n : file_names) {
    if (params.count(n) || buffers.count(n) || scales.count(n)) continue;
    if (n == "lm_head.weight" && config.tie_word_embeddings) {
      tied_head_in_file = true;
      continue;
    }
    if (!matches_any(extra_re, n)) unexpected.push_back(n);
  }
  if (!missing.empty() || !unexpected.empty()) {
    std::string value = "missing " + detail::display(missing) + ", unexpected " + detail::display(unexpected);
    std::string hint = "the checkpoint does not fit the " + config.model_type + " model its config.json describes";
    std::string mtp_layers;  // "61" or "(61|62)": the MTP layers' indices, for the hint's regex
    for (std::int64_t k = 0; k < config.num_nextn_predict_layers; ++k)
      mtp_layers += (k ? "|" : "") + std::to_string(config.num_hidden_layers + k);
    if (config.num_nextn_predict_layers > 1) mtp_layers = "(" + mtp_layers + ")";
    const bool only_mtp_missing =
        config.num_nextn_predict_layers > 0 && !missing.empty() && unexpected.empty() &&
        std::all_of(missing.begin(), missing.end(), [&](const std::string& n) {
          for (std::int64_t k = 0; k < config.num_nextn_predict_layers; ++k)
            if (n.rfind("model.layers." + std::to_string(config.num_hidden_layers + k) + ".", 0) == 0) return true;
          return false;
        });
    if (std::count(missing.begin(), missing.end(), "lm_head.weight"))
      hint += " (no lm_head.weight: set tie_word_embeddings true if the output layer is the embedding)";
    else if (only_mtp_missing)
      hint += ": it holds no MTP module although num_nextn_predict_layers is " +
              std::to_string(config.num_nextn_predict_layers) +
              " (transformers drops them in save_pretrained); set num_nextn_predict_layers to 0 in config.json to "
              "import it without MTP, or start the MTP modules fresh with ImportOptions::allowed_missing = "
              "{R\"(model\\.layers\\." + mtp_layers + "\\..*)\"}";
    else
      hint += "; ImportOptions::allowed_extra / allowed_missing accept known differences";
    RHINE_FAIL(kImport,
               std::to_string(missing.size()) + " missing and " + std::to_string(unexpected.size()) +
                   " unexpected tensors in " + dir.string(),
               Verbatim{value}, hint);
  }
  for (const auto& name : order) {
    if (!ckpt.contains(name)) continue;
    const auto& t = params.count(name) ? params[name] : buffers[name];
    const auto& shape = ckpt.at(name).shape();
    if (t.sizes().vec() != shape)
      mismatched.push_back(name + ": file " + shape_str(shape) + ", model " + shape_str(t.sizes().vec()));
  }
  RHINE_CHECK(mismatched.empty(), kImport, "tensor shapes differ from the model's in " + dir.string(),
              mismatched, "config.json does not describe these weights (sizes, heads, head_dim?)");

  TensorLoadOptions lo;
  lo.float8 = Float8Mode::dequantize;
  lo.dequantize_to = at::kFloat;
  at::NoGradGuard no_grad;
  auto load = [&](const std::string& name) -> at::Tensor {
    const auto& file = ckpt.file_of(name);
    const SafetensorsView v = file->at(name);
    if (fp8.count(name)) {
      at::Tensor w = decode_float8(v.data, v.shape(), v.dtype());  // [O, I] float32
      const std::string sname = name + "_scale_inv";
      if (!scales.count(sname)) return w;
      const auto& sfile = ckpt.file_of(sname);
      TensorLoadOptions so;
      so.copy = true;
      at::Tensor scale = to_tensor(sfile->at(sname), sfile, so);
      try {
        return dequantize_fp8_blocks(w, scale, block, at::kFloat);
      } catch (const Error& e) {
        RHINE_FAIL(kImport, "cannot dequantise " + name + " in " + file->path(), Verbatim{e.what()},
                   "the weight and its _scale_inv do not fit together");
      }
    }
    return to_tensor(v, file, lo);
  };
  // Buffers that alias a parameter (DeepSeek MTP embed_tokens / shared_head.head
  // share storage with the main embedding / head): their file copies are only
  // compared, and those parameters are never swapped for the mapping.
  std::map<const void*, std::string> param_storage;
  for (const auto& [name, t] : params) param_storage[t.storage().data()] = name;
  std::set<const void*> aliased;
  for (const auto& [name, b] : buffers)
    if (b.defined() && b.has_storage() && param_storage.count(b.storage().data())) aliased.insert(b.storage().data());
  for (const auto& name : order) {
    if (!ckpt.contains(name)) continue;
    at::Tensor src = load(name);
    at::Tensor& dst = params.count(name) ? params[name] : buffers[name];
    if (!params.count(name) && aliased.count(dst.storage().data())) {
      if (!at::equal(src.to(dst.scalar_type()), dst))
        rhine::log(LogLevel::warn, "[hf_import] " + name + " in " + dir.string() + " differs from " +
                                param_storage[dst.storage().data()] + ", which it aliases; the latter is used");
      continue;
    }
    if (options.zero_copy && aliased.count(dst.storage().data())) {
      dst.copy_(src);
      continue;
    }
    // Buffers are always copied: some alias parameters (DeepSeek MTP heads).
    if (options.zero_copy && params.count(name) && src.scalar_type() == dst.scalar_type() && !fp8.count(name)) {
      dst.set_data(src);
    } else {
      dst.copy_(src);
      if (!fp8.count(name)) {
        const SafetensorsView v = ckpt.at(name);
        release_pages(v.data, v.nbytes());
      }
    }
  }
  if (tied_head_in_file) {
    at::Tensor head = load("lm_head.weight"), emb = load("model.embed_tokens.weight");
    RHINE_CHECK(head.scalar_type() == emb.scalar_type() && at::equal(head, emb), kImport,
                "tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight in",
                dir.string(), "set tie_word_embeddings false in config.json to keep a separate output layer");
  }
  if (deferred) lm->options.defer_init = false;  // every parameter is written now
  if (options.device != c10::Device(c10::kCPU)) lm->to(options.device);
  // Routed experts into their stacked layout (rhine/nn/moe.h); a zero-copy
  // import keeps the mapped file's tensors.
  if (!options.zero_copy) nn::pack_expert_weights(*lm);
  return lm;
}

void write_directory_atomic(const fs::path& dir_in, bool overwrite,
                            const std::function<void(const fs::path& tmp)>& fill,
                            const std::string& component) {
  const fs::path dir = fs::absolute(dir_in).lexically_normal();
  fs::path target = dir;
  if (!target.has_filename()) target = target.parent_path();
  const bool exists = fs::exists(target);
  RHINE_CHECK(!exists || overwrite, component, "the output directory exists", target.string(),
              "pass overwrite (rhine-convert: --overwrite) to replace it, or choose another path");
  RHINE_CHECK(!exists || fs::is_directory(target), component, "the output path exists and is not a directory",
              target.string(), "");
  std::error_code ec;
  fs::create_directories(target.parent_path(), ec);
  RHINE_CHECK(!ec, component, "cannot create the parent directory", target.parent_path().string(), ec.message());
  const fs::path tmp = target.parent_path() /
                       ("." + target.filename().string() + ".tmp-" + std::to_string(::getpid()));
  fs::remove_all(tmp, ec);
  fs::create_directory(tmp, ec);
  RHINE_CHECK(!ec, component, "cannot create the temporary directory", tmp.string(), ec.message());
  try {
    fill(tmp);
    fsync_directory(tmp.string());
    if (exists) {
      // Swap old and new in one step; the old directory ends up at `tmp`.
      if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, target.c_str(), RENAME_EXCHANGE) != 0) {
        RHINE_CHECK(errno == EINVAL || errno == ENOSYS, component, "cannot replace the directory",
                    target.string(), std::strerror(errno));
        // Filesystem without RENAME_EXCHANGE: move the old one aside first.
        const fs::path old = tmp.string() + "-old";
        fs::remove_all(old, ec);
        fs::rename(target, old);
        fs::rename(tmp, target);
        fs::remove_all(old, ec);
      } else {
        fs::remove_all(tmp, ec);
      }
    } else {
      fs::rename(tmp, target, ec);
      RHINE_CHECK(!ec, component, "cannot rename the temporary directory to", target.string(), ec.message());
    }
    fsync_directory(target.parent_path().string());
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
}

namespace {

using ShardLoader = std::function<std::vector<SafetensorsTensor>(std::size_t first, std::size_t last)>;

/// What save_hf_model and export_row_shards_to_hf share: config.json (with
/// `weights_dtype` as torch_dtype), the tokenizer and generation files, and the
/// safetensors of `specs` loaded shard by shard, into `dir` atomically.
std::vector<std::string> write_hf_directory(const nn::ModelConfig& model_config, at::ScalarType weights_dtype,
                                            const std::vector<SafetensorsTensor>& specs, const ShardLoader& load,
                                            const fs::path& dir, const ExportOptions& options) {
  Json config = model_config.to_json();
  config["torch_dtype"] = hf_dtype_name(weights_dtype);
  if (config.contains("dtype")) config["dtype"] = hf_dtype_name(weights_dtype);
  config.erase("quantization_config");  // Rhine never writes quantised weights

  SafetensorsWriteOptions wo;
  wo.metadata = options.metadata;
  wo.metadata["format"] = "pt";
  wo.max_shard_bytes = options.max_shard_bytes;
  std::vector<std::string> written;
  write_directory_atomic(dir, options.overwrite, [&](const fs::path& tmp) {
    write_json_file((tmp / "config.json").string(), config);
    written.push_back("config.json");
    bool have_generation = false;
    if (options.tokenizer_from) {
      const fs::path& src = *options.tokenizer_from;
      RHINE_CHECK(fs::is_directory(src), kExport, "tokenizer_from is not a directory", src.string(),
                  "pass the HF directory the model came from");
      for (const std::string& f : hf_tokenizer_files()) {
        if (!fs::is_regular_file(src / f)) continue;
        write_file_atomic((tmp / f).string(), read_file((src / f).string(), kExport));
        written.push_back(f);
        if (f == "generation_config.json") have_generation = true;
      }
    }
    if (!have_generation) {
      const nn::ModelConfig& c = model_config;
      Json gen = {{"_from_model_config", true}};
      if (c.bos_token_id) gen["bos_token_id"] = *c.bos_token_id;
      if (c.eos_token_id.size() == 1) gen["eos_token_id"] = c.eos_token_id[0];
      else if (!c.eos_token_id.empty()) gen["eos_token_id"] = c.eos_token_id;
      if (c.pad_token_id) gen["pad_token_id"] = *c.pad_token_id;
      write_json_file((tmp / "generation_config.json").string(), gen);
      written.push_back("generation_config.json");
    }
    for (auto& f : write_safetensors_checkpoint(tmp.string(), specs, load, wo)) written.push_back(f);
  }, kExport);
  return written;
}

/// `t` as written: in the export dtype (DeepSeek keeps the router bias in
/// float32 in every checkpoint dtype), contiguous on the CPU.
at::Tensor export_tensor(const std::string& name, const at::Tensor& t, const ExportOptions& options) {
  at::Tensor c = t.detach();
  if (options.dtype && at::isFloatingType(c.scalar_type()) && !ends_with(name, "e_score_correction_bias"))
    c = c.to(*options.dtype);
  return c.to(at::kCPU).contiguous();  // host read: the file being written
}

SafetensorsTensor view_of(const std::string& name, const at::Tensor& c) {
  return {name, to_safetensors_dtype(c.scalar_type()), c.sizes().vec(), c.data_ptr(),
          static_cast<std::size_t>(c.numel() * c.element_size())};
}

void check_export_dtype(const ExportOptions& options) {
  if (options.dtype)
    RHINE_CHECK(at::isFloatingType(*options.dtype), kExport, "the export dtype must be a floating type",
                std::string(c10::toString(*options.dtype)), "use float32, bfloat16 or float16");
}

}  // namespace

std::vector<std::string> save_hf_model(nn::CausalLM& model, const fs::path& dir, const ExportOptions& options) {
  RHINE_CHECK(!has_unmerged_lora(*model), kExport, "the model carries unmerged LoRA adapters", dir.string(),
              "call merge_lora(model) first to export merged weights, or save_peft_adapter for the adapters");
  check_export_dtype(options);
  // Contiguous CPU tensors in module order (transformers shards in state-dict order too).
  std::vector<at::Tensor> keep;
  std::vector<SafetensorsTensor> tensors;
  at::ScalarType weights_dtype = at::kFloat;
  {
    at::NoGradGuard no_grad;
    auto state = hf_state_dict(*model);
    keep.reserve(state.size());
    for (auto& [name, t] : state) {
      at::Tensor c = export_tensor(name, t, options);
      if (name == "model.embed_tokens.weight") weights_dtype = c.scalar_type();
      keep.push_back(c);
      tensors.push_back(view_of(name, c));
    }
  }
  return write_hf_directory(model->config(), weights_dtype, tensors,
                            [&](std::size_t first, std::size_t last) {
                              return std::vector<SafetensorsTensor>(tensors.begin() + static_cast<std::ptrdiff_t>(first),
                                                                    tensors.begin() + static_cast<std::ptrdiff_t>(last));
                            },
                            dir, options);
}

std::vector<std::string> export_row_shards_to_hf(const fs::path& step_dir, const fs::path& dir,
                                                 const ExportOptions& options) {
  check_export_dtype(options);
  const nn::ModelConfig config = load_hf_config(step_dir);
  const RowReader reader = RowReader::open(step_dir.string());
  RHINE_CHECK(reader.row_sharded(), kExport, "not a row-sharded checkpoint (no shards.json)", step_dir.string(),
              "export an unsharded checkpoint with load_hf_model + save_hf_model (rhine-convert rhine-to-hf)");
  std::optional<RowReader> buffers;
  if (fs::exists(step_dir / "buffers.safetensors")) buffers.emplace(RowReader::open((step_dir / "buffers.safetensors").string()));
  // name -> (reader, stored name): the parameters, the state buffers, and the
  // MTP modules' copies of the embedding and head that HF checkpoints hold.
  std::vector<std::pair<std::string, std::pair<const RowReader*, std::string>>> source;
  for (const auto& name : reader.names())
    if (name.rfind("optim/", 0) != 0) source.push_back({name, {&reader, name}});
  if (buffers)
    for (const auto& name : buffers->names())
      if (name.rfind("rng/", 0) != 0) source.push_back({name, {&*buffers, name}});
  const std::string head = config.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
  for (std::int64_t k = 0; k < config.num_nextn_predict_layers; ++k) {
    const std::string layer = "model.layers." + std::to_string(config.num_hidden_layers + k);
    source.push_back({layer + ".embed_tokens.weight", {&reader, "model.embed_tokens.weight"}});
    source.push_back({layer + ".shared_head.head.weight", {&reader, head}});
  }
  // The order of a model's state dict: names compared with numbers as numbers.
  auto natural_less = [](const std::string& a, const std::string& b) {
    std::size_t i = 0, j = 0;
    while (i < a.size() && j < b.size()) {
      if (std::isdigit(static_cast<unsigned char>(a[i])) && std::isdigit(static_cast<unsigned char>(b[j]))) {
        std::size_t ie = i, je = j;
        while (ie < a.size() && std::isdigit(static_cast<unsigned char>(a[ie]))) ++ie;
        while (je < b.size() && std::isdigit(static_cast<unsigned char>(b[je]))) ++je;
        const auto x = std::stoll(a.substr(i, ie - i)), y = std::stoll(b.substr(j, je - j));
        if (x != y) return x < y;
        i = ie, j = je;
      } else {
        if (a[i] != b[j]) return a[i] < b[j];
        ++i, ++j;
      }
    }
    return a.size() - i < b.size() - j;
  };
  std::sort(source.begin(), source.end(), [&](const auto& x, const auto& y) { return natural_less(x.first, y.first); });
  // Specs from the index alone (nothing read yet).
  std::vector<SafetensorsTensor> specs;
  at::ScalarType weights_dtype = at::kFloat;
  for (const auto& [name, from] : source) {
    at::ScalarType dt = from.first->dtype(from.second);
    if (options.dtype && at::isFloatingType(dt) && !ends_with(name, "e_score_correction_bias")) dt = *options.dtype;
    if (name == "model.embed_tokens.weight") weights_dtype = dt;
    const auto& shape = from.first->shape(from.second);
    std::int64_t numel = 1;
    for (auto d : shape) numel *= d;
    specs.push_back({name, to_safetensors_dtype(dt), shape, nullptr,
                     static_cast<std::size_t>(numel) * c10::elementSize(dt)});
  }
  std::vector<at::Tensor> keep;  // the current shard's tensors only
  auto load = [&](std::size_t first, std::size_t last) {
    keep.clear();
    std::vector<SafetensorsTensor> out;
    for (std::size_t i = first; i < last; ++i) {
      const auto& [name, from] = source[i];
      keep.push_back(export_tensor(name, from.first->whole(from.second), options));
      out.push_back(view_of(name, keep.back()));
    }
    return out;
  };
  return write_hf_directory(config, weights_dtype, specs, load, dir, options);
}

}  // namespace rhine::io
