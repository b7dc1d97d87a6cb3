#include "rhine/train/trainer.h"

#include <ATen/core/grad_mode.h>
#include <ATen/ATen.h>
#include <ATen/core/Generator.h>
#include <c10/core/GradMode.h>
#include <fmt/format.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <mutex>
#include <optional>
#include <sstream>

#include "rhine/core/error.h"
#include "rhine/core/file.h"
#include "rhine/dist/fsdp.h"
#include "rhine/dist/grad_sync.h"
#include "rhine/dist/sharded_optimizer.h"
#include "rhine/dist/world.h"
#include "rhine/io/checkpoint.h"
#include "rhine/io/row_shards.h"
#include "rhine/io/safetensors.h"
#include "rhine/optim/adamw.h"
#include "rhine/optim/clip.h"
#include "rhine/torch/compat.h"
#include "rhine/torch/runtime.h"
#include "rhine/torch/sync.h"
#include "rhine/train/plot.h"

namespace rhine::train {
namespace fs = std::filesystem;
namespace {

constexpr const char* kComponent = "trainer";
using Clock = std::chrono::steady_clock;

// --- signals: SIGINT/SIGTERM ask the loop to checkpoint and return ----------
volatile std::sig_atomic_t g_signal = 0;
extern "C" void rhine_trainer_on_signal(int sig) { g_signal = sig; }

// Installs the handlers for the lifetime of fit() and restores the old ones.
struct SignalScope {
  explicit SignalScope(bool enabled) : enabled_(enabled) {
    if (!enabled_) return;
    g_signal = 0;
    struct sigaction sa {};
    sa.sa_handler = rhine_trainer_on_signal;
    sigemptyset(&sa.sa_mask);
    ::sigaction(SIGINT, &sa, &old_int_);
    ::sigaction(SIGTERM, &sa, &old_term_);
  }
  ~SignalScope() {
    if (!enabled_) return;
    ::sigaction(SIGINT, &old_int_, nullptr);
    ::sigaction(SIGTERM, &old_term_, nullptr);
  }
  bool enabled_;
  struct sigaction old_int_ {}, old_term_ {};
};

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

std::string human_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const auto t = static_cast<long long>(s + 0.5);
  if (t >= 3600) return fmt::format("{}h{:02d}m", t / 3600, static_cast<int>(t % 3600 / 60));
  if (t >= 60) return fmt::format("{}m{:02d}s", t / 60, static_cast<int>(t % 60));
  return fmt::format("{}s", t);
}

std::string human_count(double v) {
  if (v >= 1e6) return fmt::format("{:.2f}M", v / 1e6);
  if (v >= 1e3) return fmt::format("{:.1f}k", v / 1e3);
  return fmt::format("{:.0f}", v);
}

at::Tensor cpu_rng_state() {
  auto gen = at::globalContext().defaultGenerator(c10::DeviceType::CPU);
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_cpu_rng_state(const at::Tensor& state) {
  auto gen = at::globalContext().defaultGenerator(c10::DeviceType::CPU);
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

}  // namespace

void TrainerOptions::validate() const {
  RHINE_CHECK(max_steps > 0, kComponent, "max_steps must be positive", max_steps, "");
  RHINE_CHECK(grad_accum >= 1, kComponent, "grad_accum must be >= 1", grad_accum, "1 = no accumulation");
  RHINE_CHECK(grad_clip >= 0 && std::isfinite(grad_clip), kComponent, "grad_clip must be >= 0", grad_clip,
              "0 disables clipping");
  RHINE_CHECK(checkpoint_every >= 0, kComponent, "checkpoint_every must be >= 0", checkpoint_every, "");
  RHINE_CHECK(eval_every >= 0, kComponent, "eval_every must be >= 0", eval_every, "");
  RHINE_CHECK(log_every >= 1, kComponent, "log_every must be >= 1", log_every, "");
  RHINE_CHECK(keep_last >= 0, kComponent, "keep_last must be >= 0", keep_last, "0 keeps all");
  RHINE_CHECK(max_consecutive_skips >= 1, kComponent, "max_consecutive_skips must be >= 1",
              max_consecutive_skips, "");
  RHINE_CHECK(router_bias_update_rate >= 0, kComponent, "router_bias_update_rate must be >= 0",
              router_bias_update_rate, "0 turns the update off");
  skip.validate();
  RHINE_CHECK(!profile.enabled() || (profile.start >= 1 && !out_dir.empty()), kComponent,
              "profile needs out_dir and start >= 1", profile.to_json().dump(),
              "the trace goes to out_dir/profile/");
}

// --- model state -------------------------------------------------------------

std::map<std::string, at::Tensor> model_state(const nn::CausalLM& model, bool frozen) {
  std::map<std::string, at::Tensor> out;
  for (const auto& p : model->named_parameters())
    if (frozen || p.value().requires_grad()) out[p.key()] = p.value().detach();
  for (const auto& b : model->named_buffers()) out[b.key()] = b.value().detach();
  return out;
}

void load_model_state(nn::CausalLM& model, const std::map<std::string, at::Tensor>& state, bool frozen) {
  std::map<std::string, at::Tensor> targets;
  for (const auto& p : model->named_parameters())
    if (frozen || p.value().requires_grad()) targets[p.key()] = p.value();
  for (const auto& b : model->named_buffers()) targets[b.key()] = b.value();
  std::vector<std::string> missing, unexpected, shapes;
  for (const auto& [name, t] : targets)
    if (!state.count(name)) missing.push_back(name);
  for (const auto& [name, t] : state) {
    auto it = targets.find(name);
    if (it == targets.end())
      unexpected.push_back(name);
    else if (it->second.sizes() != t.sizes())
      shapes.push_back(fmt::format("{} {} vs model {}", name, fmt::join(t.sizes(), "x"),
                                   fmt::join(it->second.sizes(), "x")));
  }
  RHINE_CHECK(missing.empty() && unexpected.empty() && shapes.empty(), kComponent,
              "model state does not match the model",
              fmt::format("missing {}, unexpected {}, shape mismatches {}", fmt::join(missing, ", "),
                          fmt::join(unexpected, ", "), fmt::join(shapes, ", ")),
              "the checkpoint was written for another model config (or other trained parameters, e.g. LoRA targets)");
  at::NoGradGuard no_grad;
  for (auto& [name, t] : targets) t.copy_(state.at(name));
}

Json frozen_fingerprint(const nn::CausalLM& model) {
  std::int64_t tensors = 0, elements = 0;
  double l1 = 0, l2 = 0;
  for (const auto& p : model->parameters()) {
    if (p.requires_grad()) continue;
    ++tensors;
    elements += p.numel();
    // In float64, a slice at a time: a float64 copy of a 128k x 2048
    // embedding alone would be 2 GB.
    const at::Tensor flat = p.detach().reshape({-1});
    constexpr std::int64_t kSlice = std::int64_t{1} << 22;
    for (std::int64_t i = 0; i < flat.numel(); i += kSlice) {
      const at::Tensor x = flat.narrow(0, i, std::min(kSlice, flat.numel() - i)).to(at::kDouble);
      const at::Tensor sums = to_host(at::stack({x.abs().sum(), x.pow(2).sum()})).contiguous();
      l1 += sums.data_ptr<double>()[0];
      l2 += sums.data_ptr<double>()[1];
    }
  }
  if (tensors == 0) return nullptr;
  return {{"tensors", tensors}, {"elements", elements}, {"l1", l1}, {"l2", std::sqrt(l2)}};
}

bool same_frozen_parameters(const Json& a, const Json& b) {
  if (a.is_null() || b.is_null()) return a.is_null() && b.is_null();
  auto close = [&](const char* k) {
    const double x = a.at(k).get<double>(), y = b.at(k).get<double>();
    return std::abs(x - y) <= 1e-9 * std::max(std::abs(x), std::abs(y));
  };
  return a.at("tensors") == b.at("tensors") && a.at("elements") == b.at("elements") && close("l1") && close("l2");
}

// --- files of a run: checkpoints, metrics, progress line ----------------------

struct Trainer::Files {
  std::unique_ptr<io::CheckpointManager> ckpt;
  fs::path metrics_path, svg_path;
  std::ofstream metrics;
  bool tty = ::isatty(STDERR_FILENO) != 0;
  bool progress_drawn = false;
  std::int64_t last_checkpoint_step = -1;
};

Trainer::Trainer(nn::CausalLM model, Optimizer& optimizer, Schedule schedule, BatchSource& loader,
                 TrainerOptions options)
    : Trainer(std::move(model), &optimizer, nullptr, std::move(schedule), loader, std::move(options)) {}

Trainer::Trainer(nn::CausalLM model, dist::ShardedOptimizer& optimizer, Schedule schedule, BatchSource& loader,
                 TrainerOptions options)
    : Trainer(std::move(model), nullptr, &optimizer, std::move(schedule), loader, std::move(options)) {}

Trainer::Trainer(nn::CausalLM model, Optimizer* optimizer, dist::ShardedOptimizer* sharded, Schedule schedule,
                 BatchSource& loader, TrainerOptions options)
    : model_(std::move(model)),
      optimizer_(optimizer),
      sharded_(sharded),
      schedule_(std::move(schedule)),
      loader_(loader),
      o_(std::move(options)),
      guard_(o_.skip),
      files_(std::make_unique<Files>()) {
  o_.validate();
  o_.bf16 = resolve_bf16(o_.bf16, o_.bf16_emulated, model_->output_weight().device(), kComponent);
  if (!o_.out_dir.empty()) {
    std::error_code ec;
    fs::create_directories(o_.out_dir, ec);
    RHINE_CHECK(!ec, kComponent, "cannot create the run directory", o_.out_dir, ec.message());
    io::CheckpointOptions co;
    co.dir = (fs::path(o_.out_dir) / "checkpoints").string();
    co.keep_last = o_.keep_last;
    files_->ckpt = std::make_unique<io::CheckpointManager>(co);
    files_->metrics_path = fs::path(o_.out_dir) / "metrics.jsonl";
    files_->svg_path = fs::path(o_.out_dir) / "training.svg";
  }
}

Trainer::~Trainer() = default;

void Trainer::set_heldout(const HeldoutSet* heldout) { heldout_ = heldout; }

void Trainer::set_data_parallel(dist::World* world, dist::GradientSync* sync) {
  RHINE_CHECK((world == nullptr) == (sync == nullptr), kComponent, "set_data_parallel needs both world and sync",
              world == nullptr ? "world null" : "sync null", "pass both, or both nullptr for one process");
  world_ = world;
  sync_ = sync;
}

void Trainer::set_fsdp(dist::World* world, dist::FSDP* fsdp) {
  RHINE_CHECK(world != nullptr && fsdp != nullptr, kComponent, "set_fsdp needs both world and fsdp",
              world == nullptr ? "world null" : "fsdp null", "");
  RHINE_CHECK(sharded_ == nullptr && sync_ == nullptr, kComponent,
              "FSDP shards gradients and optimizer state itself", "ZeRO-1 or GradientSync set",
              "build the Trainer with a plain optimizer over fsdp.parameters() and no GradientSync");
  dist::FSDP::check_optimizer(*optimizer_);
  world_ = world;
  fsdp_ = fsdp;
}

bool Trainer::is_main() const { return world_ == nullptr || world_->is_main(); }
int Trainer::world_size() const { return world_ == nullptr ? 1 : world_->world_size(); }

void Trainer::sum_over_ranks(std::vector<double>& values) {
  if (world_size() == 1) return;
  values = world_->host_sum(values);  // host scalars: the host group, never NCCL
}

void Trainer::barrier() {
  if (world_size() > 1) world_->barrier();
}

void Trainer::optimizer_zero_grad() {
  if (sharded_ != nullptr) {
    sharded_->zero_grad();
  } else {
    optimizer_->zero_grad();
  }
}

void Trainer::optimizer_step(double lr_scale) {
  if (sharded_ != nullptr) {
    sharded_->set_lr_scale(lr_scale);
    sharded_->step();  // steps this rank's shard, then broadcasts every shard
  } else {
    optimizer_->set_lr_scale(lr_scale);
    optimizer_->step();
  }
}

std::vector<at::Tensor> Trainer::trained_parameters() const {
  if (sharded_ == nullptr) return optimizer_->parameters();
  std::vector<at::Tensor> out;
  for (const auto& np : sharded_->parameters()) out.push_back(np.tensor);
  return out;
}

OptimizerState Trainer::gather_optimizer_state() {
  if (sharded_ == nullptr) return is_main() ? optimizer_->state_dict() : OptimizerState{};
  RHINE_CHECK(world_ != nullptr, kComponent, "a ShardedOptimizer needs set_data_parallel()", "no world",
              "call trainer.set_data_parallel(&world, &sync) before fit()");
  auto mine = sharded_->state_dict();
  // 1. Every rank's meta and tensor list (name, dtype, shape), all-gathered as JSON bytes.
  Json desc = {{"meta", mine.meta}, {"tensors", Json::array()}};
  for (const auto& [name, t] : mine.tensors)
    desc["tensors"].push_back({name, static_cast<int>(t.scalar_type()), t.sizes().vec()});
  std::vector<Json> descs;
  for (const auto& text : world_->host_all_gather_bytes(desc.dump())) descs.push_back(Json::parse(text));
  // 2. Each owner broadcasts its tensors, one at a time; rank 0 keeps them.
  OptimizerState all;
  all.meta = {{"zero1_shards", Json::array()}};
  const auto device = model_->output_weight().device();
  for (int r = 0; r < world_->world_size(); ++r) {
    all.meta["zero1_shards"].push_back(descs[static_cast<std::size_t>(r)]["meta"]);
    for (const auto& t : descs[static_cast<std::size_t>(r)]["tensors"]) {
      const auto name = t[0].get<std::string>();
      at::Tensor x = world_->to_device(
          r == world_->rank() ? mine.tensors.at(name)
                              : at::empty(t[2].get<std::vector<std::int64_t>>(),
                                          at::TensorOptions().dtype(static_cast<at::ScalarType>(t[1].get<int>())).device(device)));
      if (r != 0) world_->broadcast_(x, r);
      if (is_main()) all.tensors[name] = x;
    }
  }
  if (!is_main()) return {};
  return all;
}

// --- checkpoints -------------------------------------------------------------

fs::path Trainer::save_checkpoint() {
  RHINE_RANGE("rhine::checkpoint");
  RHINE_CHECK(files_->ckpt != nullptr, kComponent, "cannot checkpoint without a run directory", o_.out_dir,
              "set TrainerOptions::out_dir");
  if (fsdp_ != nullptr) return save_sharded_checkpoint();
  const auto final_path = fs::path(files_->ckpt->options().dir) / io::CheckpointManager::dir_name(step_);
  auto opt = gather_optimizer_state();  // collective under ZeRO-1
  if (!is_main()) {  // rank 0 writes; the others wait until it is durable
    barrier();
    files_->last_checkpoint_step = step_;
    return final_path;
  }
  auto w = files_->ckpt->begin(step_);
  model_->config().save(w.path("config.json"));
  // Frozen parameters (a LoRA run's base) stay out; trainer.json says where they come from.
  save_safetensors(w.path("model.safetensors"), model_state(model_, /*frozen=*/false));
  opt.tensors["rng/cpu"] = cpu_rng_state();
  save_safetensors(w.path("optimizer.safetensors"), opt.tensors);
  Json state = run_state_json(opt.meta);
  if (frozen_fingerprint_.is_null()) frozen_fingerprint_ = frozen_fingerprint(model_);
  if (!frozen_fingerprint_.is_null())
    state["frozen"] = {{"source", o_.frozen_source}, {"fingerprint", frozen_fingerprint_}};
  write_json_file(w.path("trainer.json"), state);
  if (callbacks_.save_extra) callbacks_.save_extra(w);
  const auto path = w.commit();
  barrier();
  files_->last_checkpoint_step = step_;
  if (callbacks_.on_checkpoint) callbacks_.on_checkpoint(path);
  return path;
}

Json Trainer::run_state_json(const Json& optimizer_meta) const {
  Json langs = Json::object();
  for (const auto& [l, n] : tokens_per_language_) langs[l] = n;
  return {{"step", step_},
          {"optimizer", optimizer_meta},
          {"loader", loader_.state()},
          {"skip_guard", guard_.state()},
          {"elapsed_seconds", elapsed_before_},
          {"tokens_per_language", langs},
          {"max_steps", o_.max_steps},
          {"grad_accum", o_.grad_accum}};
}

void Trainer::restore_run_state(const Json& state, const fs::path& dir) {
  loader_.load_state(state.at("loader").get<std::string>());
  guard_.load_state(state.at("skip_guard"));
  step_ = state.at("step").get<std::int64_t>();
  elapsed_before_ = state.at("elapsed_seconds").get<double>();
  tokens_per_language_.clear();
  for (const auto& [l, n] : state.at("tokens_per_language").items()) tokens_per_language_[l] = n.get<std::int64_t>();
  consecutive_skips_ = 0;
  files_->last_checkpoint_step = step_;
  if (callbacks_.load_extra) callbacks_.load_extra(dir);
}

fs::path Trainer::save_sharded_checkpoint() {
  // Rank 0 opens the temporary directory; every rank writes its rows into it;
  // rank 0 adds the rest and commits (a killed save leaves no step-N).
  std::optional<io::CheckpointWriter> w;
  if (is_main()) w.emplace(files_->ckpt->begin(step_));
  const std::string dir = world_->host_all_gather_bytes(w ? w->dir().string() : std::string())[0];
  fsdp_->save(dir, optimizer_, {{"step", step_}});
  if (!is_main()) {
    barrier();
    files_->last_checkpoint_step = step_;
    return fs::path(files_->ckpt->options().dir) / io::CheckpointManager::dir_name(step_);
  }
  model_->config().save(w->path("config.json"));
  std::map<std::string, at::Tensor> extra;
  for (const auto& [name, b] : model_->state_buffers()) extra[name] = b.detach();
  extra["rng/cpu"] = cpu_rng_state();
  save_safetensors(w->path("buffers.safetensors"), extra);
  Json state = run_state_json("shards.json");
  state["layout"] = {{"kind", "fsdp"}, {"world_size", world_size()}, {"zero_stage", fsdp_->options().zero_stage}};
  write_json_file(w->path("trainer.json"), state);
  if (callbacks_.save_extra) callbacks_.save_extra(*w);
  const auto path = w->commit();
  barrier();
  files_->last_checkpoint_step = step_;
  if (callbacks_.on_checkpoint) callbacks_.on_checkpoint(path);
  return path;
}

void Trainer::load_sharded_checkpoint(const fs::path& dir) {
  const bool sharded = fs::exists(dir / "shards.json");
  const auto state = read_json_file((dir / "trainer.json").string(), kComponent);
  // Sharded: the shards hold the parameters and ("optim/...") the optimizer
  // slots, buffers.safetensors the buffers and the RNG. Plain: model.safetensors
  // holds parameters and buffers, optimizer.safetensors the slots and the RNG.
  const auto params = io::RowReader::open(sharded ? dir.string() : (dir / "model.safetensors").string());
  const auto extra = io::RowReader::open((dir / (sharded ? "buffers.safetensors" : "optimizer.safetensors")).string());
  const io::RowReader& buffers = sharded ? extra : params;
  const io::RowReader& slots = sharded ? params : extra;
  const std::string prefix = sharded ? "optim/" : "";
  RHINE_CHECK(extra.contains("rng/cpu"), kComponent, "the checkpoint holds no rng/cpu", dir.string(),
              "the checkpoint was not written by rhine::train::Trainer");
  set_cpu_rng_state(extra.whole("rng/cpu"));
  {
    at::NoGradGuard no_grad;
    for (auto& [name, b] : model_->state_buffers()) b.copy_(buffers.whole(name));
  }
  // The optimizer scalars merged over the ranks that wrote them.
  Json meta = sharded ? params.meta().at("optimizer") : state.at("optimizer");
  if (meta.contains("zero1_shards")) meta = merge_state_meta(meta["zero1_shards"].get<std::vector<Json>>());
  if (fsdp_ != nullptr) {
    fsdp_->load_parameters(params);
    fsdp_->load_optimizer(slots, meta, *optimizer_, prefix);
  } else {  // a sharded checkpoint into an unsharded run: whole tensors
    at::NoGradGuard no_grad;
    for (const auto& p : model_->named_parameters()) p.value().copy_(params.whole(p.key()));
    Optimizer* opt = sharded_ != nullptr ? sharded_->local() : optimizer_;
    const auto device = model_->output_weight().device();
    if (opt != nullptr)
      opt->load_state_dict(reshard_state(*opt, meta, slots.names(prefix), [&](const std::string& key) {
        return slots.whole(prefix + key).to(device);
      }));
  }
  restore_run_state(state, dir);
}

void Trainer::load_checkpoint(const fs::path& dir) {
  const auto why = io::CheckpointManager::check(dir, false);
  RHINE_CHECK(why.empty(), kComponent, "not a complete checkpoint", dir.string(), why);
  const auto saved_config = read_json_file((dir / "config.json").string(), kComponent);
  RHINE_CHECK(nn::ModelConfig::from_json(saved_config).to_json() == model_->config().to_json(), kComponent,
              "the checkpoint was written for another model config", dir.string(),
              "resume with the config of that run, or start in a new out_dir");
  if (fsdp_ != nullptr || fs::exists(dir / "shards.json")) return load_sharded_checkpoint(dir);
  const auto state = read_json_file((dir / "trainer.json").string(), kComponent);
  if (state.contains("frozen")) {  // written without the parameters that need no gradient
    if (frozen_fingerprint_.is_null()) frozen_fingerprint_ = frozen_fingerprint(model_);
    const Json& saved = state.at("frozen");
    RHINE_CHECK(same_frozen_parameters(saved.at("fingerprint"), frozen_fingerprint_), kComponent,
                "the checkpoint was trained on other frozen parameters than this model holds", dir.string(),
                fmt::format("resume on the base it was trained on ({}) with the same LoRA targets; the checkpoint "
                            "holds only the trained parameters (fingerprint {}, this model {})",
                            saved.value("source", std::string("not recorded")), saved.at("fingerprint").dump(),
                            frozen_fingerprint_.dump()));
    load_model_state(model_, load_safetensors((dir / "model.safetensors").string()), /*frozen=*/false);
  } else {
    load_model_state(model_, load_safetensors((dir / "model.safetensors").string()));
  }
  OptimizerState opt;
  opt.tensors = load_safetensors((dir / "optimizer.safetensors").string());
  auto rng = opt.tensors.find("rng/cpu");
  RHINE_CHECK(rng != opt.tensors.end(), kComponent, "optimizer.safetensors has no rng/cpu", dir.string(),
              "the checkpoint was not written by rhine::train::Trainer");
  set_cpu_rng_state(rng->second);
  opt.tensors.erase(rng);
  const auto device = model_->output_weight().device();
  for (auto& [name, t] : opt.tensors) t = t.to(device);
  opt.meta = state.at("optimizer");
  const bool saved_sharded = opt.meta.contains("zero1_shards");
  RHINE_CHECK(saved_sharded == (sharded_ != nullptr), kComponent,
              saved_sharded ? "the checkpoint holds ZeRO-1 optimizer shards" : "the checkpoint holds an unsharded optimizer",
              dir.string(), "resume with the optimizer setup (sharded or not) of the run that wrote it");
  if (sharded_ != nullptr) {
    const auto& shards = opt.meta["zero1_shards"];
    RHINE_CHECK(static_cast<int>(shards.size()) == world_size(), kComponent,
                "the checkpoint's ZeRO-1 state was written by another number of ranks", shards.size(),
                fmt::format("resume with {} ranks", shards.size()));
    OptimizerState mine;
    mine.meta = shards[static_cast<std::size_t>(world_->rank())];
    for (const auto& np : sharded_->shard())
      for (auto& [name, t] : opt.tensors)
        if (name.size() > np.name.size() && name.compare(0, np.name.size(), np.name) == 0 &&
            name[np.name.size()] == '/')
          mine.tensors[name] = t;
    sharded_->load_state_dict(mine);
  } else {
    optimizer_->load_state_dict(opt);
  }
  restore_run_state(state, dir);
}

// --- one optimizer step ------------------------------------------------------

StepMetrics Trainer::train_step() {
  RHINE_RANGE("rhine::step");
  const auto t0 = Clock::now();
  const auto device = model_->output_weight().device();
  const auto& langs = loader_.languages();
  std::vector<Batch> micro;
  micro.reserve(static_cast<std::size_t>(o_.grad_accum));
  // [counted tokens, input tokens, tokens per language...], summed over ranks.
  std::vector<double> counts(2 + langs.size(), 0.0);
  for (int i = 0; i < o_.grad_accum; ++i) {
    micro.push_back(loader_.next());
    auto& b = micro.back();
    if (callbacks_.on_batch) callbacks_.on_batch(b);
    // The batch is still on the host: check and count it there (no device to wait for).
    const auto V = model_->config().vocab_size;
    const bool bad = cpu_value<bool>(at::logical_or(b.input_ids.lt(0).logical_or(b.input_ids.ge(V)).any(),
                                                    b.labels.ne(-100).logical_and(b.labels.lt(0).logical_or(
                                                        b.labels.ge(V))).any()));
    RHINE_CHECK(!bad, kComponent, "a batch holds a token id outside the model's vocabulary", V,
                "the tokenizer that wrote the shards must match the model's vocab_size");
    counts[0] += static_cast<double>(cpu_value<std::int64_t>(b.labels.ne(-100).sum()));
    counts[1] += static_cast<double>(b.input_ids.numel());
    for (std::size_t l = 0; l < b.tokens_per_language.size(); ++l)
      counts[2 + l] += static_cast<double>(b.tokens_per_language[l]);
  }
  sum_over_ranks(counts);
  const double counted = counts[0];
  StepMetrics m;
  m.tokens = static_cast<std::int64_t>(counts[1]);
  for (std::size_t l = 0; l < langs.size(); ++l)
    if (counts[2 + l] > 0) m.tokens_per_language[langs[l]] = static_cast<std::int64_t>(counts[2 + l]);

  optimizer_zero_grad();
  // Statistics stay on the device until the one host read below: this rank's
  // share of [loss, ce, aux, mtp] (float64) and the expert counts [n_moe_layers, E].
  at::Tensor step_losses = at::zeros({4}, at::TensorOptions().dtype(at::kDouble).device(device));
  at::Tensor expert_counts;
  // The weights' bf16 copies, made at their first use, serve every micro-batch of the step.
  std::optional<AutocastStep> cast_once;
  if (o_.bf16 && o_.cast_once_per_step && fsdp_ == nullptr) {
    // With AdamW the copies come from the last optimizer step, written in its update.
    auto* adamw = o_.optimizer_writes_copies ? dynamic_cast<AdamW*>(optimizer_) : nullptr;
    if (adamw != nullptr) adamw->set_weight_copies(at::kBFloat16);
    cast_once.emplace(true, adamw != nullptr ? &adamw->weight_copies() : nullptr);
  }
  for (std::size_t i = 0; i < micro.size(); ++i) {
    auto& b = micro[i];
    // Accumulation micro-steps communicate nothing; the last one launches the buckets.
    auto no_sync = sync_ != nullptr && i + 1 < micro.size() ? sync_->no_sync() : dist::NoSyncGuard{};
    auto fsdp_no_sync = fsdp_ != nullptr && i + 1 < micro.size() ? fsdp_->no_sync() : dist::FSDP::NoSync{};
    nn::ForwardOptions fo;
    fo.labels = to_device(b.labels, device);  // no host wait (pinned, asynchronous on CUDA)
    fo.position_ids = to_device(b.position_ids, device);
    fo.document_mask = o_.document_mask;
    if (o_.document_mask) fo.document_starts = nn::document_starts_of(b.position_ids);  // on the host
    fo.z_loss = o_.z_loss;
    fo.mtp_lambda = o_.mtp_lambda;
    fo.moe_seq_aux_alpha = o_.moe_seq_aux_alpha;
    fo.moe_expert_aux_alpha = o_.moe_expert_aux_alpha;
    nn::ForwardOutput out;
    {
      RHINE_RANGE("rhine::forward");
      AutocastGuard autocast(device.type(), at::kBFloat16, o_.bf16);
      out = model_->forward(to_device(b.input_ids, device), fo);
    }
    // Token-weighted: the step's loss is the mean over all counted tokens of
    // all micro-batches of all ranks. GradientSync averages over ranks, hence
    // the factor world_size.
    const at::Tensor w = out.stats.n_tokens.to(at::kDouble) * (counted > 0 ? 1.0 / counted : 0.0);  // device
    {
      RHINE_RANGE("rhine::backward");
      (out.loss * (w * world_size()).to(out.loss.scalar_type())).backward();
    }
    step_losses = step_losses + at::stack({out.loss.detach(), out.stats.ce_loss, out.stats.aux_loss,
                                           out.stats.mtp_loss}).to(at::kDouble) * w;
    if (out.expert_counts.defined())
      expert_counts = expert_counts.defined() ? expert_counts + out.expert_counts : out.expert_counts;
  }
  cast_once.reset();  // before the optimizer changes the weights
  {
    RHINE_RANGE("rhine::grad_sync");
    if (sync_ != nullptr) sync_->finish();
    if (fsdp_ != nullptr) fsdp_->finish();
  }

  at::Tensor norm;  // on the device (FSDP reduces its shards' norms itself)
  {
    RHINE_RANGE("rhine::clip");
    if (fsdp_ != nullptr) {  // the global norm over every rank's shards
      m.grad_norm = o_.grad_clip > 0 ? fsdp_->clip_grad_norm(o_.grad_clip) : fsdp_->grad_norm();
    } else {
      const auto params = trained_parameters();
      norm = o_.grad_clip > 0 ? clip_grad_norm(params, o_.grad_clip) : grad_norm(params);
    }
  }
  // The step's one host read: losses, the gradient norm and the expert counts together.
  std::vector<at::Tensor> parts = {step_losses};
  if (norm.defined()) parts.push_back(norm.reshape({1}).to(device, at::kDouble));
  if (expert_counts.defined()) parts.push_back(expert_counts.reshape({-1}).to(at::kDouble));
  const at::Tensor host = [&] {
    RHINE_RANGE("rhine::host_read");
    return to_host(at::cat(parts)).contiguous();
  }();
  const double* hp = host.data_ptr<double>();
  std::vector<double> losses(hp, hp + 4);
  if (norm.defined()) m.grad_norm = hp[4];
  sum_over_ranks(losses);
  m.loss = losses[0];
  m.ce_loss = losses[1];
  m.aux_loss = losses[2];
  m.mtp_loss = losses[3];
  if (expert_counts.defined()) {  // global counts drive the bias update
    expert_counts = host.narrow(0, host.numel() - expert_counts.numel(), expert_counts.numel())
                        .view(expert_counts.sizes())
                        .clone();
    if (world_size() > 1) world_->host_all_reduce_(expert_counts, dist::ReduceOp::kSum);
    m.moe_imbalance = moe_imbalance(expert_counts);
  }
  if (counted == 0) m.loss = m.ce_loss = std::nan("");
  const auto decision = guard_.check(m.loss, m.grad_norm);
  m.lr = schedule_(step_);
  if (decision.accept) {
    RHINE_RANGE("rhine::optimizer");
    optimizer_step(m.lr);
    if (expert_counts.defined() && o_.router_bias_update_rate > 0)
      model_->update_router_bias(expert_counts.to(at::kLong), o_.router_bias_update_rate);
    consecutive_skips_ = 0;
  } else {
    m.skipped = true;
    m.skip_reason = decision.reason;
    // Only non-finite steps count towards stopping: SkipGuard itself accepts an
    // outlier after max_consecutive_outliers, so a level shift cannot stall a run.
    if (!std::isfinite(m.loss) || !std::isfinite(m.grad_norm))
      ++consecutive_skips_;
    else
      consecutive_skips_ = 0;
    spdlog::warn("[trainer] step {} skipped: {}", step_ + 1, decision.reason);
  }
  optimizer_zero_grad();
  ++step_;
  m.step = step_;
  m.tokens_per_second = static_cast<double>(m.tokens) / std::max(1e-9, seconds_since(t0));
  for (const auto& [l, n] : m.tokens_per_language) tokens_per_language_[l] += n;
  RHINE_CHECK(consecutive_skips_ < o_.max_consecutive_skips, kComponent,
              fmt::format("{} consecutive steps with a non-finite loss or gradient, stopping (last: {})",
                          consecutive_skips_, decision.reason),
              step_,
              files_->last_checkpoint_step >= 0
                  ? fmt::format("the last checkpoint (step {}) is intact; check the data and lower the learning rate",
                                files_->last_checkpoint_step)
                  : std::string("check the data and lower the learning rate"));
  return m;
}

// --- evaluation and logging ---------------------------------------------------

EvalResult Trainer::run_eval() {
  EvalOptions eo;
  eo.bf16 = o_.bf16;
  eo.batch_size = o_.eval_batch_size;
  eo.world = world_;  // split over data-parallel ranks; evaluate keeps collective forwards whole
  auto r = evaluate(model_, *heldout_, eo);
  r.step = step_;
  log_eval(r);
  if (callbacks_.on_eval) callbacks_.on_eval(step_, r);
  return r;
}

void Trainer::log_step(const StepMetrics& m) {
  if (!is_main()) return;
  if (files_->metrics.is_open() && (m.step % o_.log_every == 0 || m.skipped || m.step == o_.max_steps)) {
    Json langs = Json::object();
    for (const auto& [l, n] : m.tokens_per_language) langs[l] = n;
    Json j = {{"type", "step"},       {"step", m.step},           {"loss", m.loss},
              {"ce", m.ce_loss},      {"grad_norm", m.grad_norm}, {"lr_scale", m.lr},
              {"aux", m.aux_loss},    {"mtp", m.mtp_loss},        {"moe_imbalance", m.moe_imbalance},
              {"tokens", m.tokens},   {"tok_s", m.tokens_per_second},
              {"skipped", m.skipped}, {"elapsed", m.elapsed_seconds}, {"languages", langs}};
    if (!std::isfinite(m.loss)) j["loss"] = nullptr;
    if (!std::isfinite(m.grad_norm)) j["grad_norm"] = nullptr;
    files_->metrics << j.dump() << '\n' << std::flush;
  }
  if (!o_.progress) return;
  const bool redraw = files_->tty || m.step % o_.log_every == 0 || m.step == o_.max_steps;
  if (!redraw) return;
  constexpr int kBar = 24;
  const double frac = static_cast<double>(m.step) / static_cast<double>(o_.max_steps);
  const int filled = static_cast<int>(frac * kBar);
  std::string bar(static_cast<std::size_t>(filled), '=');
  if (filled < kBar) bar += '>', bar.append(static_cast<std::size_t>(kBar - filled - 1), ' ');
  // ETA from the mean step time of this run (evaluations and checkpoints excluded).
  const double eta = step_seconds_ / std::max<double>(1.0, static_cast<double>(steps_this_run_)) *
                     static_cast<double>(o_.max_steps - m.step);
  // ce: the language-model loss alone (comparable between dense, MoE and MTP models).
  const auto line = fmt::format("step {:>6}/{} [{}] {:3.0f}%  ce {:.4f}  gnorm {:.2f}  lr x{:.3f}  {} tok/s  ETA {}",
                                m.step, o_.max_steps, bar, 100 * frac, m.ce_loss, m.grad_norm, m.lr,
                                human_count(m.tokens_per_second), human_duration(eta));
  if (files_->tty) {
    std::fprintf(stderr, "\r%s\x1b[K", line.c_str());
    files_->progress_drawn = true;
  } else {
    std::fprintf(stderr, "%s\n", line.c_str());
  }
}

void Trainer::log_eval(const EvalResult& r) {
  if (!is_main()) return;
  if (files_->progress_drawn) std::fprintf(stderr, "\n"), files_->progress_drawn = false;
  std::string text;
  for (const auto& [l, e] : r.languages) text += fmt::format(" {} {:.3f}", l, e.bits_per_byte);
  spdlog::info("[trainer] eval at step {}: bits per byte{}", r.step, text);
  if (files_->metrics.is_open())
    files_->metrics << Json{{"type", "eval"}, {"step", r.step}, {"languages", r.to_json()}}.dump() << '\n'
                    << std::flush;
}

// --- the loop -----------------------------------------------------------------

TrainResult Trainer::fit() {
  SignalScope signals(o_.checkpoint_on_signal);
  TrainResult result;
  const auto t_start = Clock::now();

  if (files_->ckpt) {
    if (is_main()) files_->ckpt->remove_leftovers();
    barrier();
    if (o_.resume)
      if (auto last = files_->ckpt->latest()) {
        load_checkpoint(last->path);
        result.resumed_from = step_;
        spdlog::info("[trainer] resumed from {} (step {})", last->path.string(), step_);
      }
    if (world_size() > 1) {  // every rank must resume from the same step
      std::vector<double> v = {static_cast<double>(step_), static_cast<double>(step_) * step_};
      sum_over_ranks(v);
      const double n = world_size(), mean = v[0] / n;
      RHINE_CHECK(v[1] / n - mean * mean < 0.5, kComponent, "ranks resumed from different steps", step_,
                  "all ranks need the same out_dir on a shared filesystem");
    }
  }
  if (files_->ckpt && is_main()) {
    // Metrics after the resumed step belong to the killed run: drop them.
    if (fs::exists(files_->metrics_path)) {
      std::ifstream in(files_->metrics_path);
      std::string line, kept;
      while (std::getline(in, line)) {
        try {
          const auto j = Json::parse(line);
          if (j.value("step", std::int64_t{0}) <= step_) kept += line + "\n";
        } catch (const std::exception&) {
        }
      }
      write_file_atomic(files_->metrics_path.string(), kept);
    }
    files_->metrics.open(files_->metrics_path, std::ios::app);
    RHINE_CHECK(files_->metrics.good(), kComponent, "cannot open metrics file", files_->metrics_path.string(),
                "check permissions of out_dir");
  }
  model_->train();
  if (heldout_ && o_.eval_at_start && step_ == 0) result.first_eval = run_eval();

  const std::int64_t first_step = step_;
  std::unique_ptr<Profiler> profiler;
  const std::int64_t profile_end = o_.profile.start + o_.profile.steps - 1;  // last traced step
  while (step_ < o_.max_steps) {
    std::vector<double> stop = {g_signal != 0 ? 1.0 : 0.0};
    sum_over_ranks(stop);  // a signal on any rank stops all of them at the same step
    if (stop[0] > 0) {
      result.interrupted = true;
      break;
    }
    if (o_.profile.enabled() && !profiler && step_ + 1 >= o_.profile.start && step_ + 1 <= profile_end) {
      const auto path = fs::path(o_.out_dir) / "profile" / fmt::format("trace.rank{}.json", world_ ? world_->rank() : 0);
      if (is_main())
        spdlog::info("[trainer] tracing steps {}-{} ({} profiler)", step_ + 1, profile_end, Profiler::backend());
      profiler = std::make_unique<Profiler>(path.string());
    }
    const auto t_step = Clock::now();
    auto m = train_step();
    step_seconds_ += seconds_since(t_step);
    if (profiler && step_ >= profile_end) {
      const auto path = profiler->finish();
      profiler.reset();
      if (is_main()) spdlog::info("[trainer] wrote the trace to {} (open it in https://ui.perfetto.dev)", path);
    }
    ++steps_this_run_;
    m.elapsed_seconds = elapsed_before_ + seconds_since(t_start);
    result.tokens += m.tokens;
    log_step(m);
    if (callbacks_.on_step) callbacks_.on_step(m);
    if (heldout_ && o_.eval_every > 0 && step_ % o_.eval_every == 0) {
      result.last_eval = run_eval();
      if (files_->ckpt && is_main()) plot_metrics(files_->metrics_path.string(), files_->svg_path.string());
    }
    if (files_->ckpt && o_.checkpoint_every > 0 && step_ % o_.checkpoint_every == 0) {
      const auto elapsed = elapsed_before_;
      elapsed_before_ = m.elapsed_seconds;
      save_checkpoint();
      elapsed_before_ = elapsed;
    }
  }
  if (files_->progress_drawn) std::fprintf(stderr, "\n"), files_->progress_drawn = false;
  result.seconds = seconds_since(t_start);
  if (result.interrupted && is_main()) spdlog::warn("[trainer] interrupted by signal {} at step {}", int(g_signal), step_);
  if (heldout_ && !result.interrupted && (!result.last_eval || result.last_eval->step != step_))
    result.last_eval = run_eval();
  if (files_->ckpt) {
    elapsed_before_ += result.seconds;
    if ((result.interrupted || o_.checkpoint_at_end) && files_->last_checkpoint_step != step_) {
      const auto path = save_checkpoint();
      spdlog::info("[trainer] checkpoint {}", path.string());
    }
    if (is_main() && (step_ > first_step || result.last_eval))
      plot_metrics(files_->metrics_path.string(), files_->svg_path.string());
  }
  result.step = step_;
  result.skipped_steps = guard_.n_skipped();
  result.tokens_per_language = tokens_per_language_;
  return result;
}

}  // namespace rhine::train
