#include "rhine/io/lora.h"

#include <ATen/core/grad_mode.h>
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/nn/modules/linear.h>

#include <cmath>
#include <map>
#include <regex>

#include "rhine/core/error.h"
#include "rhine/core/json.h"
#include "rhine/io/hf.h"
#include "rhine/io/safetensors.h"
#include "rhine/nn/adapter.h"

namespace fs = std::filesystem;

namespace rhine::io {
namespace {

constexpr const char* kComponent = "lora";
constexpr const char* kPeftPrefix = "base_model.model.";

// The A matrix of an adapter (rhine/nn/adapter.h) also keeps the options
// apply_lora was given, for lora_options and the PEFT config.
class LoraAImpl : public nn::LoraMatrixImpl {
 public:
  LoraAImpl(at::Tensor w, LoraOptions o) : nn::LoraMatrixImpl(std::move(w)), options(std::move(o)) {
    scaling = options.alpha / static_cast<double>(options.rank);
    dropout = options.dropout;
  }
  LoraOptions options;
};

struct Adapted {
  std::string name;
  torch::nn::LinearImpl* linear;
  LoraAImpl* a;
  nn::LoraMatrixImpl* b;
};

std::vector<Adapted> adapted(const torch::nn::Module& model) {
  std::vector<Adapted> out;
  auto visit = [&](const std::string& name, const torch::nn::Module* m) {
    auto* lin = dynamic_cast<torch::nn::LinearImpl*>(const_cast<torch::nn::Module*>(m));
    if (!lin) return;
    const nn::LoraPath p = nn::lora_path(*lin);
    auto* a = dynamic_cast<LoraAImpl*>(p.a);
    if (a && p.b) out.push_back({name, lin, a, p.b});
  };
  // include_self would need the root held by a shared_ptr; models on the stack are fine too.
  visit("", &model);
  for (const auto& m : model.named_modules("", /*include_self=*/false)) visit(m.key(), m.value().get());
  return out;
}

// s B A [O, I] in the base weight's dtype, from the current A and B.
at::Tensor delta(const Adapted& l) {
  at::Tensor d = at::mm(l.b->weight, l.a->weight) * l.a->scaling;  // [O, r] x [r, I] -> [O, I]
  return d.to(l.linear->weight.scalar_type());
}

bool selected(const std::string& name, const LoraOptions& o, const std::optional<std::regex>& re) {
  if (re) return std::regex_match(name, *re);
  for (const auto& t : o.target_modules)
    if (name == t || (name.size() > t.size() && name.compare(name.size() - t.size(), t.size(), t) == 0 &&
                      name[name.size() - t.size() - 1] == '.'))
      return true;
  return false;
}

Json target_json(const LoraOptions& o) {
  if (!o.target_regex.empty()) return o.target_regex;
  return o.target_modules;
}

}  // namespace

std::vector<std::string> apply_lora(torch::nn::Module& model, const LoraOptions& o) {
  RHINE_CHECK(o.rank >= 1, kComponent, "rank must be at least 1", o.rank, "typical ranks are 8..64");
  RHINE_CHECK(o.dropout >= 0 && o.dropout < 1, kComponent, "dropout must be in [0, 1)", o.dropout, "");
  RHINE_CHECK(std::isfinite(o.alpha), kComponent, "alpha must be finite", o.alpha, "");
  RHINE_CHECK(o.init == "kaiming" || o.init == "gaussian", kComponent, "unknown init", o.init,
              "use \"kaiming\" or \"gaussian\"");
  RHINE_CHECK(adapted(model).empty(), kComponent, "the model already has LoRA adapters",
              adapted(model).front().name, "merge or load into a fresh model");
  RHINE_CHECK(!o.target_regex.empty() || !o.target_modules.empty(), kComponent, "no target modules given", "",
              "set target_modules (e.g. {\"q_proj\", \"v_proj\"}) or target_regex");
  std::optional<std::regex> re;
  if (!o.target_regex.empty()) {
    try {
      re.emplace(o.target_regex, std::regex::ECMAScript);
    } catch (const std::regex_error& e) {
      RHINE_FAIL(kComponent, "invalid target_regex", o.target_regex, e.what());
    }
  }
  std::vector<std::pair<std::string, torch::nn::LinearImpl*>> targets;
  std::vector<std::string> linear_names;
  for (const auto& m : model.named_modules("", /*include_self=*/false)) {
    auto* lin = dynamic_cast<torch::nn::LinearImpl*>(m.value().get());
    if (!lin) continue;
    linear_names.push_back(m.key());
    if (selected(m.key(), o, re)) targets.emplace_back(m.key(), lin);
  }
  RHINE_CHECK(!targets.empty(), kComponent, "no Linear module matches the targets", target_json(o).dump(),
              "Linear modules are named like " +
                  (linear_names.empty() ? std::string("(none)") : detail::quote(linear_names.front())));

  c10::optional<at::Generator> gen;
  if (o.init_seed) gen = at::make_generator<at::CPUGeneratorImpl>(*o.init_seed);
  at::NoGradGuard no_grad;
  for (auto& p : model.parameters()) p.set_requires_grad(false);
  std::vector<std::string> names;
  for (auto& [name, lin] : targets) {
    const at::Tensor& w = lin->weight;  // [O, I]; not read, only its shape, dtype and device
    const std::int64_t O = w.size(0), I = w.size(1);
    // Initialised in float32 on the CPU (same values on every device/dtype), then moved.
    at::Tensor a = at::empty({o.rank, I}, at::kFloat);
    if (o.init == "kaiming") {
      const double bound = 1.0 / std::sqrt(static_cast<double>(I));  // kaiming_uniform_(a=sqrt(5))
      a.uniform_(-bound, bound, gen);
    } else {
      a.normal_(0.0, 1.0 / static_cast<double>(o.rank), gen);
    }
    // A bf16 or fp16 base gets float32 adapters (PEFT's autocast_adapter_dtype).
    const bool reduced = w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf;
    const auto dtype = reduced ? at::kFloat : w.scalar_type();
    a = a.to(w.options().dtype(dtype)).requires_grad_(true);
    at::Tensor b = at::zeros({O, o.rank}, w.options().dtype(dtype)).requires_grad_(true);
    lin->register_module("lora_A", std::make_shared<LoraAImpl>(a, o));
    lin->register_module("lora_B", std::make_shared<nn::LoraMatrixImpl>(b));
    names.push_back(name);
  }
  return names;
}

std::optional<LoraOptions> lora_options(const torch::nn::Module& model) {
  auto l = adapted(model);
  if (l.empty()) return std::nullopt;
  return l.front().a->options;
}

std::vector<at::Tensor> lora_parameters(const torch::nn::Module& model) {
  std::vector<at::Tensor> out;
  for (const auto& l : adapted(model)) {
    out.push_back(l.a->weight);
    out.push_back(l.b->weight);
  }
  return out;
}

std::vector<LoraLayer> lora_layers(const torch::nn::Module& model) {
  std::vector<LoraLayer> out;
  for (const auto& l : adapted(model)) out.push_back({l.name, l.linear, l.a->merged});
  return out;
}

bool is_lora_parameter(const std::string& name) {
  auto ends = [&](const std::string& tail) {
    return name.size() > tail.size() && name.compare(name.size() - tail.size(), tail.size(), tail) == 0;
  };
  return ends(".lora_A.weight") || ends(".lora_B.weight");
}

void merge_lora(torch::nn::Module& model) {
  at::NoGradGuard no_grad;
  for (const auto& l : adapted(model)) {
    if (l.a->merged) continue;
    l.linear->weight.add_(delta(l));
    l.a->merged = true;
  }
}

void unmerge_lora(torch::nn::Module& model) {
  at::NoGradGuard no_grad;
  for (const auto& l : adapted(model)) {
    if (!l.a->merged) continue;
    l.linear->weight.sub_(delta(l));
    l.a->merged = false;
  }
}

bool has_unmerged_lora(const torch::nn::Module& model) {
  for (const auto& l : adapted(model))
    if (!l.a->merged) return true;
  return false;
}

void save_peft_adapter(const torch::nn::Module& model, const fs::path& dir, const PeftSaveOptions& options) {
  const auto layers = adapted(model);
  RHINE_CHECK(!layers.empty(), kComponent, "the model has no LoRA adapters to save", dir.string(),
              "call apply_lora first");
  const LoraOptions& o = layers.front().a->options;
  std::map<std::string, at::Tensor> tensors;
  for (const auto& l : layers) {
    at::Tensor a = l.a->weight.detach(), b = l.b->weight.detach();
    if (options.dtype) {
      a = a.to(*options.dtype);
      b = b.to(*options.dtype);
    }
    tensors[kPeftPrefix + l.name + ".lora_A.weight"] = a;  // [r, I]
    tensors[kPeftPrefix + l.name + ".lora_B.weight"] = b;  // [O, r]
  }
  Json config = {
      {"peft_type", "LORA"},
      {"task_type", "CAUSAL_LM"},
      {"r", o.rank},
      {"lora_alpha", o.alpha},
      {"lora_dropout", o.dropout},
      {"target_modules", target_json(o)},
      {"bias", "none"},
      {"base_model_name_or_path", options.base_model_name_or_path.value_or(o.base_model_name_or_path)},
      {"fan_in_fan_out", false},
      {"inference_mode", true},
      {"init_lora_weights", o.init == "gaussian" ? Json("gaussian") : Json(true)},
      {"modules_to_save", nullptr},
      {"use_rslora", false},
      {"use_dora", false},
      {"layers_to_transform", nullptr},
      {"layers_pattern", nullptr},
      {"rank_pattern", Json::object()},
      {"alpha_pattern", Json::object()},
      {"revision", nullptr},
  };
  write_directory_atomic(dir, options.overwrite, [&](const fs::path& tmp) {
    write_json_file((tmp / "adapter_config.json").string(), config);
    SafetensorsWriteOptions wo;
    wo.metadata["format"] = "pt";
    save_safetensors((tmp / "adapter_model.safetensors").string(), tensors, wo);
  }, kComponent);
}

LoraOptions load_peft_adapter(torch::nn::Module& model, const fs::path& dir) {
  const fs::path cfg_path = dir / "adapter_config.json", st = dir / "adapter_model.safetensors";
  RHINE_CHECK(fs::exists(cfg_path), kComponent, "no adapter_config.json in the adapter directory", dir.string(),
              "a PEFT adapter directory holds adapter_config.json and adapter_model.safetensors");
  RHINE_CHECK(fs::exists(st), kComponent, "no adapter_model.safetensors in the adapter directory", dir.string(),
              fs::exists(dir / "adapter_model.bin") ? "adapter_model.bin (pickle) is not read; re-save with "
                                                       "safe_serialization=True"
                                                     : "");
  const Json j = read_json_file(cfg_path.string(), kComponent);
  const std::string where = cfg_path.string();
  auto str = [&](const char* k, const char* fallback) {
    return j.contains(k) && j[k].is_string() ? j[k].get<std::string>() : std::string(fallback);
  };
  RHINE_CHECK(str("peft_type", "") == "LORA", kComponent, "not a LoRA adapter: peft_type in " + where,
              str("peft_type", "(missing)"), "only LORA adapters are supported");
  RHINE_CHECK(str("bias", "none") == "none", kComponent, "adapter biases are not supported: bias in " + where,
              str("bias", ""), "train adapters with bias=\"none\"");
  for (const char* k : {"use_dora", "use_rslora", "fan_in_fan_out"})
    RHINE_CHECK(!j.contains(k) || !j[k].is_boolean() || !j[k].get<bool>(), kComponent,
                std::string(k) + " is not supported, in " + where, true, "");
  for (const char* k : {"rank_pattern", "alpha_pattern"})
    RHINE_CHECK(!j.contains(k) || j[k].is_null() || j[k].empty(), kComponent,
                std::string(k) + " is not supported, in " + where, Verbatim{j.value(k, Json()).dump()},
                "Rhine uses one rank and alpha for all layers");
  for (const char* k : {"layers_to_transform", "modules_to_save"})
    RHINE_CHECK(!j.contains(k) || j[k].is_null(), kComponent, std::string(k) + " is not supported, in " + where,
                Verbatim{j[k].dump()}, "");
  LoraOptions o;
  try {
    o.rank = j.at("r").get<std::int64_t>();
    o.alpha = j.value("lora_alpha", 8.0);
    o.dropout = j.value("lora_dropout", 0.0);
    const Json& t = j.at("target_modules");
    if (t.is_string()) {
      o.target_regex = t.get<std::string>();
      o.target_modules.clear();
    } else {
      o.target_modules = t.get<std::vector<std::string>>();
    }
  } catch (const nlohmann::json::exception& e) {
    RHINE_FAIL(kComponent, "invalid adapter config " + where, Verbatim{e.what()},
               "r (int), lora_alpha (number), target_modules (list or string) are needed");
  }
  o.base_model_name_or_path = str("base_model_name_or_path", "");
  if (j.contains("init_lora_weights") && j["init_lora_weights"] == "gaussian") o.init = "gaussian";

  if (adapted(model).empty()) {
    apply_lora(model, o);
  } else {
    const LoraOptions have = *lora_options(model);
    RHINE_CHECK(have.rank == o.rank && have.alpha == o.alpha, kComponent,
                "the model's adapters differ from " + where,
                "r " + std::to_string(have.rank) + " vs " + std::to_string(o.rank),
                "load into a model without adapters");
    RHINE_CHECK(!lora_options(model) || !adapted(model).front().a->merged, kComponent,
                "cannot load into merged adapters", where, "unmerge_lora first");
  }
  const auto layers = adapted(model);
  const auto file = load_safetensors(st.string());
  std::vector<std::string> missing, unexpected, mismatched;
  std::map<std::string, at::Tensor> want;
  for (const auto& l : layers) {
    want[kPeftPrefix + l.name + ".lora_A.weight"] = l.a->weight;
    want[kPeftPrefix + l.name + ".lora_B.weight"] = l.b->weight;
  }
  for (const auto& [n, t] : want)
    if (!file.count(n)) missing.push_back(n);
  for (const auto& [n, t] : file)
    if (!want.count(n)) unexpected.push_back(n);
  RHINE_CHECK(missing.empty() && unexpected.empty(), kComponent,
              std::to_string(missing.size()) + " missing and " + std::to_string(unexpected.size()) +
                  " unexpected adapter tensors in " + st.string(),
              Verbatim{"missing " + detail::display(missing) + ", unexpected " + detail::display(unexpected)},
              "the adapter was trained for a model with other module names or targets");
  for (const auto& [n, t] : want)
    if (file.at(n).sizes() != t.sizes())
      mismatched.push_back(n + ": file " + detail::display(file.at(n).sizes().vec()) + ", model " +
                           detail::display(t.sizes().vec()));
  RHINE_CHECK(mismatched.empty(), kComponent, "adapter shapes differ from the model's in " + st.string(), mismatched,
              "the adapter belongs to a model of other sizes");
  {
    at::NoGradGuard no_grad;
    for (auto& [n, t] : want) t.copy_(file.at(n));
  }
  return o;
}

}  // namespace rhine::io
