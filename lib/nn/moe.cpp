// DeepSeekMoE: routing, grouped and loop dispatch, balance losses and the
// aux-loss-free bias update (docs/architectures.md section 2). Dimension letters
// as in rhine/nn/moe.h.
#include "rhine/nn/moe.h"

#include <ATen/core/grad_mode.h>
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#if __has_include(<ATen/ops/_grouped_mm.h>)
#include <ATen/ops/_grouped_mm.h>
#define RHINE_HAS_GROUPED_MM 1
#endif

#include <limits>
#include <optional>

#include "rhine/core/error.h"
#include "rhine/nn/adapter.h"
#include "rhine/nn/fused.h"
#include "rhine/torch/compat.h"
#include "rhine/torch/sync.h"
#include "build.h"

namespace rhine::nn {

Routing route_tokens(const at::Tensor& logits, const at::Tensor& bias, const ModelConfig& c) {
  RHINE_CHECK(logits.dim() == 2 && logits.size(1) == c.n_routed_experts, "moe",
              "router logits must be [N, n_routed_experts]", logits.sizes().vec(), "");
  const auto N = logits.size(0), E = c.n_routed_experts, K = c.num_experts_per_tok;
  Routing r;
  r.scores = c.scoring_func == "sigmoid" ? logits.sigmoid() : logits.softmax(-1);  // [N, E]
  // The bias steers selection only; the weights use the unbiased scores.
  at::Tensor sel = bias.defined() ? r.scores + bias.to(r.scores.scalar_type()) : r.scores;
  if (c.topk_method != "greedy" && c.n_group > 1) {
    const auto G = c.n_group;
    at::Tensor g = sel.view({N, G, E / G});                              // [N, G, E/G]
    at::Tensor group_score = c.topk_method == "noaux_tc"
                                 ? std::get<0>(g.topk(2, -1)).sum(-1)    // top-2 sum (V3)
                                 : std::get<0>(g.max(-1));               // max (V2)
    at::Tensor keep = std::get<1>(group_score.topk(c.topk_group, -1));  // [N, topk_group]
    at::Tensor gmask = at::zeros({N, G}, sel.options().dtype(at::kBool)).scatter(1, keep, true);
    at::Tensor emask = gmask.unsqueeze(-1).expand({N, G, E / G}).reshape({N, E});
    sel = sel.masked_fill(emask.logical_not(), -std::numeric_limits<double>::infinity());
  }
  r.indices = std::get<1>(sel.topk(K, -1));  // [N, K]
  at::Tensor w = r.scores.gather(1, r.indices);
  if (c.model_type == "deepseek_v2") {
    // DeepSeek-V2's MoEGate (modeling_deepseek.py): renormalise only for K > 1 with
    // norm_topk_prob, and scale only when not renormalised. transformers' port always
    // scales and never renormalises; the two agree for the released norm_topk_prob false.
    if (K > 1 && c.norm_topk_prob)
      r.weights = w / (w.sum(-1, true) + 1e-20);
    else
      r.weights = w * c.routed_scaling_factor;
  } else {
    // DeepSeek-V3 (and transformers' DeepseekV3 port): renormalise, then always scale.
    if (c.norm_topk_prob) w = w / (w.sum(-1, true) + 1e-20);
    r.weights = w * c.routed_scaling_factor;
  }
  // Pairs per expert by scatter_add, not at::bincount: CUDA's bincount reads the
  // indices' min and max to the host to size its output (two synchronisations).
  const at::Tensor flat = r.indices.reshape({N * K});
  r.counts = at::zeros({E}, flat.options()).scatter_add_(0, flat, at::ones_like(flat));
  return r;
}

namespace {
// [.., E] float: per-expert selection counts of indices [.., K] (last dim summed).
at::Tensor selection_counts(const at::Tensor& indices, std::int64_t E, at::ScalarType dt) {
  auto shape = indices.sizes().vec();
  shape.back() = E;
  return at::zeros(shape, indices.options().dtype(dt))
      .scatter_add(-1, indices, at::ones(indices.sizes(), indices.options().dtype(dt)));
}
}  // namespace

at::Tensor sequence_balance_loss(const at::Tensor& scores, const at::Tensor& indices) {
  RHINE_CHECK(scores.dim() == 3 && indices.dim() == 3 && scores.size(0) == indices.size(0) &&
                  scores.size(1) == indices.size(1),
              "moe", "sequence_balance_loss takes scores [B, T, E] and indices [B, T, K]",
              (std::vector<std::vector<std::int64_t>>{scores.sizes().vec(), indices.sizes().vec()}),
              "");
  const auto T = scores.size(1), E = scores.size(2), K = indices.size(2);
  at::Tensor f = selection_counts(indices, E, scores.scalar_type()).sum(1) *
                 (static_cast<double>(E) / static_cast<double>(K * T));  // [B, E]
  at::Tensor p = (scores / scores.sum(-1, true)).mean(1);                // [B, E]
  return (f * p).sum(-1).mean();
}

at::Tensor expert_balance_loss(const at::Tensor& scores, const at::Tensor& indices) {
  RHINE_CHECK(scores.dim() == 2 && indices.dim() == 2 && scores.size(0) == indices.size(0), "moe",
              "expert_balance_loss takes scores [N, E] and indices [N, K]",
              (std::vector<std::vector<std::int64_t>>{scores.sizes().vec(), indices.sizes().vec()}),
              "");
  const auto N = scores.size(0), E = scores.size(1), K = indices.size(1);
  at::Tensor f = selection_counts(indices, E, scores.scalar_type()).sum(0) *
                 (static_cast<double>(E) / static_cast<double>(K * N));  // [E]
  return (f * scores.mean(0)).sum();
}

ExpertBatch sort_by_expert(const at::Tensor& x, const Routing& r, bool host_counts) {
  const auto N = r.indices.size(0), K = r.indices.size(1);
  at::Tensor flat = r.indices.reshape({N * K});                               // [N*K] expert of each pair
  at::Tensor order = std::get<1>(at::sort(flat, /*stable=*/true, 0, false));  // [N*K]
  ExpertBatch b;
  b.token = at::div(order, K, "floor");
  b.tokens = x.index_select(0, b.token);
  b.weights = r.weights.reshape({N * K}).index_select(0, order);
  if (!host_counts) return b;
  // The split sizes on the host: one synchronisation per MoE layer (the grouped
  // GEMM takes device offsets instead).
  at::Tensor counts = to_host(r.counts).contiguous();
  b.counts.assign(counts.data_ptr<std::int64_t>(), counts.data_ptr<std::int64_t>() + counts.numel());
  return b;
}

at::Tensor combine_experts(const ExpertBatch& b, const at::Tensor& ys, std::int64_t N) {
  at::Tensor w = ys * b.weights.unsqueeze(1).to(ys.scalar_type());
  return at::zeros({N, ys.size(1)}, w.options()).index_add(0, b.token, w);  // [N, C]
}

ModelConfig expert_config(const ModelConfig& c, std::int64_t width) {
  ModelConfig e = c;
  e.intermediate_size = width;
  return e;
}

// --- stacked expert weights and the grouped GEMM ------------------------------

namespace {

// The weights of expert e as the stacked layout orders them: gate, up, down.
struct ExpertWeights {
  std::vector<at::Tensor> gate_up;  ///< [gate_0, up_0, gate_1, up_1, ...], each [I, C]
  std::vector<at::Tensor> down;     ///< [down_0, down_1, ...], each [C, I]
};

ExpertWeights expert_weights(const MoEImpl& m) {
  ExpertWeights w;
  for (const auto& e : m.expert_list) {
    w.gate_up.push_back(e->gate_proj->weight);
    w.gate_up.push_back(e->up_proj->weight);
    w.down.push_back(e->down_proj->weight);
  }
  return w;
}

// True when `parts` (each of parts[0]'s shape, contiguous) follow each other in
// one storage, in order: then they are the slices of one stacked tensor.
bool consecutive(const std::vector<at::Tensor>& parts) {
  if (parts.empty() || !parts[0].defined() || !parts[0].has_storage() || parts[0].numel() == 0) return false;
  const auto& first = parts[0];
  for (std::size_t i = 0; i < parts.size(); ++i) {
    const auto& t = parts[i];
    if (!t.defined() || !t.has_storage() || !t.is_contiguous() || t.sizes() != first.sizes() ||
        t.scalar_type() != first.scalar_type() || !t.storage().is_alias_of(first.storage()) ||
        t.storage_offset() != first.storage_offset() + static_cast<std::int64_t>(i) * first.numel())
      return false;
  }
  return true;
}

// The stacked [E, P * rows, cols] tensor over consecutive `parts` (P per
// expert), without a copy: forward aliases their storage, backward hands each
// part its slice of the gradient.
struct StackedParts : public torch::autograd::Function<StackedParts> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, at::TensorList parts, std::int64_t per_expert) {
    const auto& first = parts[0];
    const std::int64_t E = static_cast<std::int64_t>(parts.size()) / per_expert;
    const std::int64_t rows = first.size(0), cols = first.size(1);
    ctx->saved_data["rows"] = rows;
    ctx->saved_data["parts"] = static_cast<std::int64_t>(parts.size());
    at::Tensor stacked = at::empty({0}, first.options());
    stacked.set_(first.storage(), first.storage_offset(), {E, per_expert * rows, cols},
                 {per_expert * rows * cols, cols, 1});
    return stacked;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const std::int64_t rows = ctx->saved_data["rows"].toInt();
    torch::autograd::variable_list out;
    if (!grads[0].defined())  // no gradient reached the stack: none for the parts
      return torch::autograd::variable_list(static_cast<std::size_t>(ctx->saved_data["parts"].toInt()) + 1);
    for (const at::Tensor& slice : grads[0].unbind(0))
      for (const at::Tensor& part : slice.split(rows, 0)) out.push_back(part);
    out.emplace_back();  // per_expert
    return out;
  }
};

// [E, P * rows, cols] from `parts` (P per expert): an alias when packed, else a copy.
[[maybe_unused]] at::Tensor stack_parts(const std::vector<at::Tensor>& parts, std::int64_t per_expert) {
  if (consecutive(parts)) return StackedParts::apply(at::TensorList(parts), per_expert);
  const std::int64_t E = static_cast<std::int64_t>(parts.size()) / per_expert;
  return at::stack(parts, 0).view({E, per_expert * parts[0].size(0), parts[0].size(1)});
}

// The dtype the experts compute in: autocast's where it is on, else the weights'.
at::ScalarType expert_dtype(const MoEImpl& m, const at::Tensor& x) {
  const auto dev = x.device().type();
  if ((dev == c10::DeviceType::CPU || dev == c10::DeviceType::CUDA) && rhine::autocast_enabled(dev))
    return rhine::autocast_dtype(dev);
  return m.expert_list.empty() ? x.scalar_type() : m.expert_list[0]->up_proj->weight.scalar_type();
}

// Whether GroupedGemm can run this layer's experts (else it runs as Grouped).
bool grouped_gemm_fits(const MoEImpl& m) {
  if (m.expert_list.empty()) return false;
  for (const auto& e : m.expert_list) {
    if (!e->gate_proj || e->act != "silu") return false;
    for (const torch::nn::Linear* l : {&e->gate_proj, &e->up_proj, &e->down_proj})
      if ((*l)->bias.defined() || lora_path(**l)) return false;
  }
  return true;
}

// The routed experts on the sorted pairs: [M, C] -> [M, C] in two grouped GEMMs.
at::Tensor run_grouped_gemm(const MoEImpl& m, const ExpertBatch& batch, const at::Tensor& counts) {
#ifdef RHINE_HAS_GROUPED_MM
  // _grouped_mm is on none of autocast's lists: the casts autocast would make are made here.
  const auto w = expert_weights(m);
  const auto dt = expert_dtype(m, batch.tokens);
  const std::int64_t I = w.gate_up[0].size(0);
  at::Tensor w13 = stack_parts(w.gate_up, 2).to(dt);  // [E, 2I, C]
  at::Tensor w2 = stack_parts(w.down, 1).to(dt);      // [E, C, I]
  at::Tensor offsets = counts.cumsum(0).to(at::kInt);  // each expert's block end, on the device
  at::Tensor h = at::_grouped_mm(batch.tokens.to(dt), w13.transpose(-2, -1), offsets);  // [M, 2I]
  const auto gu = h.split(I, 1);
  at::Tensor a = m.expert_list[0]->fused ? fused_swiglu(gu[0], gu[1]) : at::silu(gu[0]) * gu[1];
  return at::_grouped_mm(a, w2.transpose(-2, -1), offsets);  // [M, C]
#else
  (void)m, (void)batch, (void)counts;
  RHINE_FAIL("moe", "MoEDispatch::GroupedGemm needs at::_grouped_mm (LibTorch 2.x); this LibTorch is",
             rhine::torch_version(), "use MoEDispatch::Grouped");
#endif
}

// The dispatch a forward on x uses.
MoEDispatch resolve_dispatch(const MoEImpl& m, MoEDispatch d, const at::Tensor& x) {
  if (d == MoEDispatch::Auto) {
    const bool bf16 = x.scalar_type() == at::kBFloat16 ||
                      (rhine::autocast_enabled(c10::DeviceType::CUDA) &&
                       rhine::autocast_dtype(c10::DeviceType::CUDA) == at::kBFloat16);
    d = grouped_gemm_available() && x.is_cuda() && bf16 ? MoEDispatch::GroupedGemm : MoEDispatch::Grouped;
  }
  if (d == MoEDispatch::GroupedGemm && !grouped_gemm_fits(m)) return MoEDispatch::Grouped;
  if (d == MoEDispatch::GroupedGemm) {
    // at::_grouped_mm takes fp32, bf16 and fp16 (not float64), and its kernels
    // load rows with 16-byte strides: the hidden and expert widths in bytes.
    const auto dt = expert_dtype(m, x);
    const auto bytes = static_cast<std::int64_t>(c10::elementSize(dt));
    const at::Tensor& w = m.expert_list[0]->gate_proj->weight;  // [I, C]
    const bool aligned = (w.size(0) * bytes) % 16 == 0 && (w.size(1) * bytes) % 16 == 0;
    if (!aligned || !(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf)) d = MoEDispatch::Grouped;
  }
  return d;
}

}  // namespace

bool grouped_gemm_available() {
#ifdef RHINE_HAS_GROUPED_MM
  return true;
#else
  return false;
#endif
}

bool MoEImpl::experts_packed() const {
  if (expert_list.empty() || !expert_list[0]->gate_proj) return false;
  const auto w = expert_weights(*this);
  return consecutive(w.gate_up) && consecutive(w.down);
}

void MoEImpl::pack_experts() {
  if (expert_list.empty() || !expert_list[0]->gate_proj || experts_packed()) return;
  const auto w = expert_weights(*this);
  const auto& g0 = w.gate_up[0];
  // Placeholders (deferred init, FSDP) and mixed shapes or dtypes stay as they are.
  for (const auto* list : {&w.gate_up, &w.down})
    for (const auto& t : *list)
      if (!t.defined() || t.numel() == 0 || t.sizes() != (*list)[0].sizes() || t.scalar_type() != g0.scalar_type() ||
          t.device() != g0.device())
        return;
  at::NoGradGuard no_grad;
  const auto E = static_cast<std::int64_t>(expert_list.size());
  at::Tensor w13 = at::empty({2 * E, g0.size(0), g0.size(1)}, g0.options());
  at::Tensor w2 = at::empty({E, w.down[0].size(0), w.down[0].size(1)}, g0.options());
  // Each parameter keeps its object (optimizers and names hold it) and takes its slice.
  auto move_into = [](at::Tensor p, const at::Tensor& slice) {
    slice.copy_(p);
    p.set_data(slice);
  };
  for (std::int64_t i = 0; i < 2 * E; ++i) move_into(w.gate_up[static_cast<std::size_t>(i)], w13[i]);
  for (std::int64_t e = 0; e < E; ++e) move_into(w.down[static_cast<std::size_t>(e)], w2[e]);
}

int pack_expert_weights(torch::nn::Module& root) {
  int n = 0;
  for (const auto& m : root.modules(/*include_self=*/true))
    if (auto* moe = dynamic_cast<MoEImpl*>(m.get())) {
      moe->pack_experts();
      n += moe->experts_packed() ? 1 : 0;
    }
  return n;
}

// --- gate -------------------------------------------------------------------

MoEGateImpl::MoEGateImpl(const ModelConfig& c) : config(c) {
  weight = register_parameter(
      "weight", at::empty({c.n_routed_experts, c.hidden_size}).normal_(0.0, c.initializer_range));
  if (c.topk_method == "noaux_tc")
    e_score_correction_bias =
        register_buffer("e_score_correction_bias", at::zeros({c.n_routed_experts}, at::kFloat));
}

Routing MoEGateImpl::forward(const at::Tensor& x) {
  // Router math in fp32 even under autocast (bf16 logits would flip top-k choices).
  std::optional<AutocastGuard> off;
  if (rhine::autocast_enabled(x.device().type()))
    off.emplace(x.device().type(), at::kBFloat16, /*enabled=*/false);
  const auto dt = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor logits = at::linear(x.to(dt), weight.to(dt));  // [N, E]
  return route_tokens(logits, e_score_correction_bias, config);
}

// --- MoE --------------------------------------------------------------------

MoEImpl::MoEImpl(const ModelConfig& c) {
  RHINE_CHECK(c.uses_moe(), "moe", "MoE needs n_routed_experts > 0", c.n_routed_experts,
              "set the DeepSeek MoE keys in config.json");
  gate = register_module("gate", MoEGate(c));
  experts = register_module("experts", torch::nn::ModuleList());
  const ModelConfig ec = expert_config(c, c.moe_intermediate_size);
  for (std::int64_t e = 0; e < c.n_routed_experts; ++e) {
    expert_list.push_back(MLP(ec));
    experts->push_back(expert_list.back());
  }
  if (c.n_shared_experts > 0)
    shared_experts = register_module(
        "shared_experts", MLP(expert_config(c, c.moe_intermediate_size * c.n_shared_experts)));
  // Initialisation writes the packed weights in place; deferred weights are
  // never written here (FSDP or an import gives them their storage).
  if (!detail::deferring_init()) pack_experts();
}

MoEOutput MoEImpl::forward(const at::Tensor& x, const BalanceLossWeights& balance) {
  RHINE_CHECK(x.dim() == 3, "moe", "x must be [B, T, C]", x.sizes().vec(), "");
  const auto B = x.size(0), T = x.size(1), C = x.size(2), N = B * T;
  const auto E = static_cast<std::int64_t>(expert_list.size());
  at::Tensor x2 = x.reshape({N, C});
  Routing r = gate(x2);
  const auto K = r.indices.size(1);

  at::Tensor y;
  const MoEDispatch how = expert_dispatch_ ? dispatch : resolve_dispatch(*this, dispatch, x2);
  if (expert_dispatch_) {
    y = expert_dispatch_->run(*this, x2, r);
  } else if (how == MoEDispatch::GroupedGemm) {
    // Offsets stay on the device: no host read of the counts.
    ExpertBatch batch = sort_by_expert(x2, r, /*host_counts=*/false);
    y = combine_experts(batch, run_grouped_gemm(*this, batch, r.counts), N);
  } else if (how == MoEDispatch::Grouped) {
    // Sort the N*K (token, slot) pairs by expert: each expert's tokens become
    // one contiguous block, gathered once and scattered back once.
    ExpertBatch batch = sort_by_expert(x2, r);
    // split, not narrow: split's backward is one cat, where every narrow's
    // backward zero-fills a tensor of all N*K rows.
    const auto blocks = batch.tokens.split_with_sizes(batch.counts, 0);
    std::vector<at::Tensor> outs;
    for (std::int64_t e = 0; e < E; ++e)
      if (blocks[static_cast<std::size_t>(e)].size(0) > 0)
        outs.push_back(expert_list[e](blocks[static_cast<std::size_t>(e)]));  // [n_e, C]
    y = combine_experts(batch, at::cat(outs, 0), N);
  } else {
    for (std::int64_t e = 0; e < E; ++e) {
      at::Tensor hit = r.indices == e;                          // [N, K]
      at::Tensor rows = hit.any(1).nonzero().squeeze(1);       // tokens that chose e
      if (rows.numel() == 0) continue;
      // An expert appears at most once per token: its weight is the masked sum.
      at::Tensor w = (r.weights * hit.to(r.weights.scalar_type())).sum(1).index_select(0, rows);
      at::Tensor out = expert_list[e](x2.index_select(0, rows));  // [n_e, C]
      out = out * w.unsqueeze(1).to(out.scalar_type());
      y = y.defined() ? y.index_add(0, rows, out)
                      : at::zeros({N, C}, out.options()).index_add(0, rows, out);
    }
  }
  if (shared_experts) {
    at::Tensor s = shared_experts(x2);
    y = y.defined() ? y.to(s.scalar_type()) + s : s;
  }

  MoEOutput out;
  out.counts = r.counts;  // [E]
  if (balance.any()) {
    at::Tensor aux = at::zeros({}, r.scores.options());
    if (balance.sequence != 0.0)
      aux = aux + balance.sequence * sequence_balance_loss(r.scores.view({B, T, E}), r.indices.view({B, T, K}));
    if (balance.expert != 0.0) aux = aux + balance.expert * expert_balance_loss(r.scores, r.indices);
    out.aux_loss = aux;
  }
  out.y = y.view({B, T, C});
  return out;
}

void MoEImpl::update_bias(const at::Tensor& counts, double gamma) {
  at::Tensor& b = gate->e_score_correction_bias;
  if (!b.defined()) return;
  RHINE_CHECK(counts.dim() == 1 && counts.size(0) == b.size(0), "moe",
              "bias update needs counts [n_routed_experts]", counts.sizes().vec(),
              "pass this layer's (all-reduced) expert counts");
  at::NoGradGuard g;
  at::Tensor c = counts.to(b.device()).to(at::kDouble);
  b.add_((gamma * at::sign(c.mean() - c)).to(b.scalar_type()));
}

}  // namespace rhine::nn
