#pragma once
/// \file
/// LoRA adapters (Hu et al. 2021) on chosen Linear layers of a model, merge /
/// unmerge into the base weights, and the PEFT adapter layout
/// (`adapter_config.json` + `adapter_model.safetensors`).
///
/// An adapted Linear y = x W^T + b (W [O, I]) gains two parameters registered
/// on it under PEFT's names, `lora_A.weight` A [r, I] and `lora_B.weight`
/// B [O, r], and computes y = x W^T + b + s (dropout(x) A^T) B^T with
/// s = alpha / r, as a low-rank path beside the base product (rhine/nn/adapter.h):
/// the base weight is only read, never gets a gradient and keeps its dtype
/// (load the base in bf16 and train under bf16 autocast: the adapters are
/// float32). A starts as PEFT's kaiming-uniform (+-1/sqrt(I)) or N(0, 1/r^2)
/// ("gaussian"), B as zeros, so a fresh adapter leaves the model unchanged.
/// Every parameter except the adapters gets requires_grad = false. Dropout
/// p > 0 (training mode only) drops elements of the adapter's input, as PEFT.
///
///     rhine::io::LoraOptions lo;  lo.rank = 16;  lo.alpha = 32;  lo.target_modules = {"q_proj", "v_proj"};
///     rhine::io::apply_lora(*lm, lo);
///     for (...) { loss = lm->forward(ids, fo).loss; loss.backward(); opt.step(); }
///     rhine::io::save_peft_adapter(*lm, "out/adapter");      // PEFT layout
///     rhine::io::merge_lora(*lm);  rhine::io::save_hf_model(lm, "out/merged");
///
/// Dimension letters: O out features, I in features, r rank.

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <torch/nn/module.h>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace torch::nn {
class LinearImpl;  // <torch/nn/modules/linear.h>
}  // namespace torch::nn

namespace rhine::io {

/// Options of apply_lora (the fields of PEFT's LoraConfig Rhine models).
struct LoraOptions {
  std::int64_t rank = 8;   ///< r
  double alpha = 16.0;     ///< lora_alpha; the adapter is scaled by alpha / r
  double dropout = 0.0;    ///< lora_dropout (see the file comment)
  /// PEFT list semantics: a Linear named N is adapted when N equals an entry
  /// or ends with "." + entry ("q_proj" adapts every `...self_attn.q_proj`).
  std::vector<std::string> target_modules = {"q_proj", "v_proj"};
  /// PEFT string semantics: an ECMAScript regex that must match the whole
  /// module name, e.g. R"(.*\.(q_proj|v_proj))" or R"(model\.layers\.[0-3]\..*_proj)".
  /// When set it replaces target_modules.
  std::string target_regex;
  /// "kaiming" (PEFT's default init_lora_weights=true) or "gaussian".
  std::string init = "kaiming";
  /// Seed of A's initialisation (LibTorch's generator); nullopt = global generator.
  std::optional<std::uint64_t> init_seed;
  /// Written to adapter_config.json.
  std::string base_model_name_or_path;
};

/// Adds adapters to every Linear of `model` whose name the options select
/// (names relative to `model`, e.g. "model.layers.0.self_attn.q_proj") and
/// freezes all other parameters. apply_lora reads no base weight, so it also
/// serves a model built with CausalLMOptions::defer_init whose weights are
/// loaded later. Adapter parameters get the device of the base weight and its
/// dtype, float32 for a bf16 or fp16 base (PEFT's autocast_adapter_dtype). Returns the
/// adapted module names. Throws "[lora] ..." when nothing matches, for
/// rank < 1, dropout outside [0, 1), or a model that already has adapters.
std::vector<std::string> apply_lora(torch::nn::Module& model, const LoraOptions& options);

/// The options the adapters of `model` were created with (nullopt: none).
std::optional<LoraOptions> lora_options(const torch::nn::Module& model);

/// The adapter parameters (A and B of each adapted layer, in module order):
/// what the optimizer trains.
std::vector<at::Tensor> lora_parameters(const torch::nn::Module& model);

/// One adapted Linear.
struct LoraLayer {
  std::string name;                          ///< e.g. "model.layers.0.self_attn.q_proj"
  torch::nn::LinearImpl* linear = nullptr;   ///< its `weight` is the base weight (merged: W + s B A)
  bool merged = false;
};
/// The adapted Linears of `model`, in module order.
std::vector<LoraLayer> lora_layers(const torch::nn::Module& model);
/// True for the parameter names apply_lora adds ("....lora_A.weight", "....lora_B.weight").
bool is_lora_parameter(const std::string& name);

/// Adds s B A into each base weight (the Linear then runs W' x without
/// the adapter path). Merging merged adapters does nothing.
void merge_lora(torch::nn::Module& model);
/// Subtracts s B A again (restores the base weights up to rounding).
void unmerge_lora(torch::nn::Module& model);
/// True when some adapter of `model` is not merged.
bool has_unmerged_lora(const torch::nn::Module& model);

/// Options of save_peft_adapter.
struct PeftSaveOptions {
  /// dtype of the saved adapter tensors; nullopt keeps theirs.
  std::optional<at::ScalarType> dtype;
  bool overwrite = false;
  /// Overrides LoraOptions::base_model_name_or_path when set.
  std::optional<std::string> base_model_name_or_path;
};

/// Writes `dir` (atomically) with adapter_config.json (peft_type "LORA",
/// task_type "CAUSAL_LM", r, lora_alpha, lora_dropout, target_modules,
/// bias "none", base_model_name_or_path, ...) and adapter_model.safetensors
/// holding `base_model.model.<module>.lora_A.weight` [r, I] and
/// `.lora_B.weight` [O, r]. Works merged or not (A and B are kept).
void save_peft_adapter(const torch::nn::Module& model, const std::filesystem::path& dir,
                       const PeftSaveOptions& options = {});

/// Reads a PEFT LoRA adapter directory into `model`: adds adapters as
/// adapter_config.json describes (when the model has none yet) and loads A
/// and B. Errors "[lora] ..." list missing and unexpected
/// tensors, name shape mismatches, and reject configs Rhine does not
/// implement (use_dora, use_rslora, bias != "none", rank/alpha patterns,
/// fan_in_fan_out). Returns the adapter's options.
LoraOptions load_peft_adapter(torch::nn::Module& model, const std::filesystem::path& dir);

}  // namespace rhine::io
