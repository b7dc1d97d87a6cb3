#pragma once
/// \file
/// Hugging Face model directories <-> Rhine models.
///
/// Import reads `config.json` and the weights (`model.safetensors`, or the
/// shards of `model.safetensors.index.json`) into a CausalLM. Rhine's
/// parameters and persistent buffers carry the HF names, so the mapping is by
/// name and generic: whatever modules a config builds (llama, mistral,
/// apertus; DeepSeek MLA / MoE / MTP layers at `model.layers.{L+i}`) are
/// filled from the tensors of the same names.
///
///     auto lm = rhine::io::load_hf_model("/models/EuroLLM-1.7B");          // float32
///     rhine::io::ExportOptions o;  o.dtype = at::kBFloat16;  o.tokenizer_from = "/models/EuroLLM-1.7B";
///     rhine::io::save_hf_model(lm, "/out/EuroLLM-1.7B-de", o);
///
/// Export writes a directory that transformers' `from_pretrained` loads
/// without missing or unexpected weights: `config.json`,
/// `generation_config.json`, `model.safetensors` (or shards
/// `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`) with
/// `__metadata__ {"format": "pt"}`, the tied `lm_head` left out, experts one
/// tensor per expert (they are modules of their own), and the tokenizer files
/// of `ExportOptions::tokenizer_from`. The directory appears atomically: it
/// is written under a temporary name next to the target and renamed (an
/// existing target is swapped out with `renameat2(RENAME_EXCHANGE)`).

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "rhine/nn/config.h"
#include "rhine/nn/model.h"

namespace rhine::io {

/// Options of load_hf_model.
struct ImportOptions {
  /// dtype of the model's parameters and buffers. Default float32 (master
  /// weights for training; a bf16 checkpoint converts exactly). nullopt =
  /// "auto": the config's `torch_dtype` (v4) or `dtype` (v5) key, float32 when absent.
  std::optional<at::ScalarType> dtype = at::kFloat;
  /// Decode float8 weights (F8_E4M3, with DeepSeek's `<name>_scale_inv` 128x128
  /// block scales) to `dtype`. Off: a checkpoint holding float8 tensors is an
  /// error naming them and this option. On, `quantization_config` is dropped
  /// from the imported config (the model is no longer quantised).
  bool dequantize_fp8 = false;
  /// Regexes (ECMAScript, whole-name match) of file tensors that may be
  /// present without a model parameter and are ignored. Default: rotary
  /// `inv_freq` buffers that older transformers versions saved.
  std::vector<std::string> allowed_extra = {R"(.*\.rotary_emb\.inv_freq)"};
  /// Regexes of model parameters that may be absent from the file (they keep
  /// their initialisation). Persistent buffers (xIELU `beta`/`eps`, ...) are
  /// always optional: released checkpoints differ in whether they hold them.
  std::vector<std::string> allowed_missing;
  /// Let parameters wrap the file mapping (private copy-on-write pages)
  /// instead of copying, where dtype and alignment allow: the fastest load
  /// and no second copy in memory, but the files must not be rewritten in
  /// place (truncated) while the model lives. Off: each tensor is copied and
  /// its mapped pages are released right after, so peak memory stays near
  /// the model size either way.
  bool zero_copy = false;
  /// Device the model is moved to after loading.
  c10::Device device = c10::Device(c10::kCPU);
  /// Options of the built CausalLM (fused kernels, activation checkpointing).
  nn::CausalLMOptions model;
};

/// Reads the ModelConfig of an HF directory (its config.json).
nn::ModelConfig load_hf_config(const std::filesystem::path& dir);

/// Builds the model `dir/config.json` describes and fills every parameter
/// from the directory's safetensors. Throws rhine::Error "[hf_import] ..."
/// listing all missing and all unexpected tensors at once, naming the tensor
/// and both shapes on a shape mismatch, for float8 weights without
/// `dequantize_fp8`, and for a tied lm_head stored with values different from
/// the embeddings. Bad files and indexes raise the safetensors reader's
/// errors (naming file, shard and tensor).
nn::CausalLM load_hf_model(const std::filesystem::path& dir, const ImportOptions& options = {});

/// The names of a model's tensors as an HF checkpoint holds them: parameters
/// then persistent buffers, in module order (LoRA adapters excluded; the
/// tied lm_head is never a parameter).
std::vector<std::pair<std::string, at::Tensor>> hf_state_dict(nn::CausalLMImpl& model);

/// Options of save_hf_model.
struct ExportOptions {
  /// Largest shard in tensor bytes (transformers' default "5GB"); 0 = one file.
  std::uint64_t max_shard_bytes = 5'000'000'000;
  /// dtype of the written floating-point tensors; nullopt keeps each
  /// tensor's dtype. Written to config.json as `torch_dtype`.
  std::optional<at::ScalarType> dtype;
  /// Replace an existing directory (atomically). Off: an existing target is an error.
  bool overwrite = false;
  /// Directory to copy tokenizer files (tokenizer.json, tokenizer.model,
  /// tokenizer_config.json, special_tokens_map.json, added_tokens.json,
  /// chat_template.jinja) and generation_config.json from, e.g. the imported
  /// HF directory. Missing files are skipped; without generation_config.json
  /// there, one is written from the config's bos/eos/pad ids.
  std::optional<std::filesystem::path> tokenizer_from;
  /// Extra `__metadata__` entries of every safetensors file ("format": "pt" always).
  std::map<std::string, std::string> metadata;
};

/// Writes `model` as an HF directory `dir` (see the file comment). Throws
/// rhine::Error "[hf_export] ..." when the target exists without `overwrite`,
/// or when the model carries unmerged LoRA adapters (merge them first, or
/// save them with save_peft_adapter). Returns the files written (names).
std::vector<std::string> save_hf_model(nn::CausalLM& model, const std::filesystem::path& dir,
                                       const ExportOptions& options = {});

/// Exports a row-sharded training checkpoint (rhine/io/row_shards.h: the
/// step directory of an FSDP run) as an HF directory `dir`, tensor by tensor:
/// each output shard's tensors are read through the memory mapping, written
/// and released before the next shard, so no process holds the whole model.
/// Tensors, names and config equal what save_hf_model writes for the same
/// weights (the MTP modules' embedding and head copies included). Throws
/// rhine::Error "[hf_export] ..." for a directory without shards.json.
std::vector<std::string> export_row_shards_to_hf(const std::filesystem::path& step_dir,
                                                 const std::filesystem::path& dir, const ExportOptions& options = {});

/// The files beside the weights of an HF directory that describe its tokenizer and
/// generation defaults (tokenizer.json, tokenizer.model, tokenizer_config.json,
/// special_tokens_map.json, added_tokens.json, chat_template.jinja, generation_config.json):
/// what ExportOptions::tokenizer_from copies.
const std::vector<std::string>& hf_tokenizer_files();

/// Writes the tokenizer file `tokenizer` into directory `dir` under its HF names, so that the
/// directory (an HF export, a training checkpoint) carries the vocabulary it was trained
/// with: a SentencePiece `.model` as tokenizer.model plus the equivalent tokenizer.json; a
/// tokenizer.json as tokenizer.json, a tokenizer.model already in `dir` removed unless the
/// same file sits beside the tokenizer.json (it would describe another vocabulary). The
/// tokenizer_config.json, special_tokens_map.json, chat_template.jinja and added_tokens.json
/// beside the tokenizer replace those in `dir`; an added_tokens.json in `dir` with none beside
/// the tokenizer is removed (its ids may name other tokens). Throws rhine::Error when the
/// file cannot be read ("[hf_export] ...") or is not a valid tokenizer.
void write_tokenizer_files(const std::filesystem::path& tokenizer, const std::filesystem::path& dir);

/// The HF spelling of a dtype ("float32", "bfloat16", "float16", "float64").
std::string hf_dtype_name(at::ScalarType dtype);
/// The dtype of an HF spelling ("float32", "bfloat16", "bf16", "fp16", ...); throws for others.
at::ScalarType parse_hf_dtype(const std::string& name);

/// Writes a directory atomically: `fill` writes into a fresh temporary
/// directory next to `dir`, which is fsynced and renamed to `dir` (swapped
/// with an existing one when `overwrite`; the old one is then removed).
/// Used by save_hf_model and save_peft_adapter.
void write_directory_atomic(const std::filesystem::path& dir, bool overwrite,
                            const std::function<void(const std::filesystem::path& tmp)>& fill,
                            const std::string& component);

}  // namespace rhine::io
