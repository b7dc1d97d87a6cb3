// The memory and throughput planner (rhine/plan/plan.h; formulas and their
// sources in docs/plan.md). Torch-free: everything here is arithmetic on a
// ModelConfig.
#include "rhine/plan/plan.h"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <numeric>

#include "rhine/core/error.h"

namespace rhine::plan {

namespace {

constexpr const char* kComponent = "plan";

std::string lower(std::string s) {
  for (auto& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return s;
}

// --- parameter shapes, in CausalLM's registration order -----------------------

struct Shapes {
  std::vector<ParamShape> out;
  std::int64_t unit = 0;
  void add(std::string name, std::vector<std::int64_t> shape, ParamKind kind) {
    out.push_back({std::move(name), std::move(shape), kind, unit});
  }
  /// torch::nn::Linear(in, out): weight [out, in], then bias [out].
  void linear(const std::string& prefix, std::int64_t in, std::int64_t out_dim, bool bias, ParamKind kind) {
    add(prefix + ".weight", {out_dim, in}, kind);
    if (bias) add(prefix + ".bias", {out_dim}, kind);
  }
};

/// MLP (layers.cpp): gate_proj (gated only), up_proj, down_proj, xIELU alphas.
void mlp_shapes(Shapes& s, const nn::ModelConfig& c, const std::string& prefix, std::int64_t width, ParamKind kind) {
  const std::int64_t C = c.hidden_size;
  if (c.gated_mlp()) s.linear(prefix + ".gate_proj", C, width, c.mlp_bias, kind);
  s.linear(prefix + ".up_proj", C, width, c.mlp_bias, kind);
  s.linear(prefix + ".down_proj", width, C, c.mlp_bias, kind);
  if (!c.gated_mlp()) {
    s.add(prefix + ".act_fn.alpha_p", {1}, kind);
    s.add(prefix + ".act_fn.alpha_n", {1}, kind);
  }
}

/// DecoderLayer (model.cpp): norm1, self_attn (standard or MLA), norm2, mlp (MLP or MoE).
void layer_shapes(Shapes& s, const nn::ModelConfig& c, std::int64_t layer) {
  const std::string p = "model.layers." + std::to_string(layer) + ".";
  const bool apertus = c.model_type == "apertus";
  const std::int64_t C = c.hidden_size, H = c.num_attention_heads;
  s.add(p + (apertus ? "attention_layernorm" : "input_layernorm") + ".weight", {C}, ParamKind::kNorm);
  const std::string a = p + "self_attn";
  if (c.uses_mla()) {
    const std::int64_t qk = c.qk_head_dim(), R = c.kv_lora_rank, Dr = c.qk_rope_head_dim;
    if (c.q_lora_rank) {
      const std::int64_t Rq = *c.q_lora_rank;
      s.linear(a + ".q_a_proj", C, Rq, c.attention_bias, ParamKind::kAttention);
      s.add(a + ".q_a_layernorm.weight", {Rq}, ParamKind::kNorm);
      s.linear(a + ".q_b_proj", Rq, H * qk, false, ParamKind::kAttention);
    } else {
      s.linear(a + ".q_proj", C, H * qk, false, ParamKind::kAttention);
    }
    s.linear(a + ".kv_a_proj_with_mqa", C, R + Dr, c.attention_bias, ParamKind::kAttention);
    s.add(a + ".kv_a_layernorm.weight", {R}, ParamKind::kNorm);
    s.linear(a + ".kv_b_proj", R, H * (c.qk_nope_head_dim + c.v_head_dim), false, ParamKind::kAttention);
    s.linear(a + ".o_proj", H * c.v_head_dim, C, c.attention_bias, ParamKind::kAttention);
  } else {
    const std::int64_t D = c.head_dim, Hkv = c.num_key_value_heads;
    s.linear(a + ".q_proj", C, H * D, c.attention_bias, ParamKind::kAttention);
    s.linear(a + ".k_proj", C, Hkv * D, c.attention_bias, ParamKind::kAttention);
    s.linear(a + ".v_proj", C, Hkv * D, c.attention_bias, ParamKind::kAttention);
    s.linear(a + ".o_proj", H * D, C, c.attention_bias, ParamKind::kAttention);
    if (c.qk_norm) {
      s.add(a + ".q_norm.weight", {D}, ParamKind::kNorm);
      s.add(a + ".k_norm.weight", {D}, ParamKind::kNorm);
    }
  }
  s.add(p + (apertus ? "feedforward_layernorm" : "post_attention_layernorm") + ".weight", {C}, ParamKind::kNorm);
  if (c.is_moe_layer(layer)) {
    s.add(p + "mlp.gate.weight", {c.n_routed_experts, C}, ParamKind::kRouter);
    for (std::int64_t e = 0; e < c.n_routed_experts; ++e)
      mlp_shapes(s, c, p + "mlp.experts." + std::to_string(e), c.moe_intermediate_size, ParamKind::kRoutedExpert);
    if (c.n_shared_experts > 0)
      mlp_shapes(s, c, p + "mlp.shared_experts", c.moe_intermediate_size * c.n_shared_experts,
                 ParamKind::kSharedExpert);
  } else {
    mlp_shapes(s, c, p + "mlp", c.intermediate_size, ParamKind::kMlp);
  }
}

std::int64_t product(const std::vector<std::int64_t>& v) {
  return std::accumulate(v.begin(), v.end(), std::int64_t{1}, std::multiplies<>());
}

double ceil_div(double a, double b) { return std::ceil(a / b); }

}  // namespace

std::int64_t ParamShape::numel() const { return product(shape); }

std::vector<ParamShape> parameter_shapes(const nn::ModelConfig& c) {
  c.validate();
  Shapes s;
  const std::int64_t C = c.hidden_size;
  s.add("model.embed_tokens.weight", {c.vocab_size, C}, ParamKind::kEmbedding);
  for (std::int64_t l = 0; l < c.num_hidden_layers; ++l) {
    s.unit = 1 + l;
    layer_shapes(s, c, l);
  }
  for (std::int64_t k = 0; k < c.num_nextn_predict_layers; ++k) {
    const std::int64_t layer = c.num_hidden_layers + k;
    s.unit = 1 + layer;
    layer_shapes(s, c, layer);  // the MTP module is a DecoderLayer first
    const std::string p = "model.layers." + std::to_string(layer) + ".";
    s.add(p + "enorm.weight", {C}, ParamKind::kNorm);
    s.add(p + "hnorm.weight", {C}, ParamKind::kNorm);
    s.add(p + "eh_proj.weight", {C, 2 * C}, ParamKind::kMtpProjection);
    s.add(p + "shared_head.norm.weight", {C}, ParamKind::kNorm);
  }
  s.unit = 0;
  s.add("model.norm.weight", {C}, ParamKind::kNorm);
  if (!c.tie_word_embeddings) s.add("lm_head.weight", {c.vocab_size, C}, ParamKind::kHead);
  return s.out;
}

ParamCounts count_parameters(const nn::ModelConfig& c) {
  const auto shapes = parameter_shapes(c);
  ParamCounts n;
  n.n_blocks = c.num_hidden_layers + c.num_nextn_predict_layers;
  std::vector<std::int64_t> units(static_cast<std::size_t>(n.n_blocks + 1), 0);
  std::int64_t routed_main = 0;
  for (const auto& p : shapes) {
    const auto k = p.numel();
    n.total += k;
    units[static_cast<std::size_t>(p.unit)] += k;
    if (p.kind == ParamKind::kEmbedding || p.kind == ParamKind::kHead) n.embedding += k;
    if (p.kind == ParamKind::kRoutedExpert) n.routed_experts += k;
    const bool mtp = p.unit > c.num_hidden_layers;
    if (mtp) n.mtp += k;
    if (p.kind == ParamKind::kRoutedExpert && !mtp) routed_main += k;
  }
  n.root_unit = units[0];
  for (std::size_t u = 1; u < units.size(); ++u) n.largest_block = std::max(n.largest_block, units[u]);
  // Per token: all but MTP, and K of E routed experts in each MoE layer.
  n.active = n.total - n.mtp - routed_main;
  if (c.uses_moe() && c.n_routed_experts > 0) n.active += routed_main / c.n_routed_experts * c.num_experts_per_tok;
  return n;
}

// --- devices ------------------------------------------------------------------

const std::vector<DeviceKind>& device_kinds() {
  // Figures and their sources: docs/plan.md, "Device kinds". Rates per direction.
  static const std::vector<DeviceKind> kinds = {
      {"H100", "NVIDIA H100 SXM5, 80 GB HBM3, NVLink 4 (900 GB/s both directions), 400 Gb/s InfiniBand per GPU",
       80e9, 989.4e12, 450e9, 50e9, 8, 0,
       "Hopper SXM5 peak rates (989.4 TFLOP/s dense bf16); NVLink 900 GB/s bidirectional; NDR 400 Gb/s per GPU"},
      {"H200", "NVIDIA H200 SXM5, 141 GB HBM3e, otherwise as H100", 141e9, 989.4e12, 450e9, 50e9, 8, 0,
       "same GH100 compute as H100 (989 TFLOP/s dense bf16), 141 GB HBM3e"},
      {"GH200", "NVIDIA GH200 Grace Hopper, 96 GB HBM3 GPU memory; 4 per node as in CSCS Alps, Slingshot-11 200 Gb/s per GPU",
       96e9, 989.4e12, 150e9, 25e9, 4, 0,
       "Hopper GPU (989 TFLOP/s dense bf16), 96 GB HBM3 variant; Alps: 4 per node, 200 Gb/s per GPU (Apertus report); "
       "150 GB/s per peer in the node is an assumption"},
      {"GH200-144", "NVIDIA GH200 Grace Hopper, 144 GB HBM3e variant; node as GH200", 144e9, 989.4e12, 150e9, 25e9, 4,
       0, "as GH200 with the 144 GB HBM3e memory"},
      {"MI250X", "AMD Instinct MI250X, one GCD (half a package): 64 GB HBM2e; 8 GCDs per node, one 200 Gb/s NIC per package",
       64e9, 191.5e12, 50e9, 12.5e9, 8, 0,
       "383 TFLOP/s bf16 and 128 GB per package, two GCDs; Infinity Fabric 50 GB/s per link and direction"},
      {"MI300A", "AMD Instinct MI300A APU, 128 GB unified HBM3; 4 per node, one 200 Gb/s NIC each", 128e9, 980.6e12,
       128e9, 25e9, 4, 0,
       "980.6 TFLOP/s dense bf16 (AMD); 512 GB HBM per 4-APU node (CSCS Alps); 128 GB/s per peer is an assumption"},
      {"cpu", "one CPU rank of this machine: one thread, LibTorch 2.x wheel build, Gloo over loopback", 0, 1e11, 2e9,
       2e9, 64, 366.0 * (1 << 20),
       "baseline: VmRSS of a rank after LibTorch and Gloo started (bench_plan, median of its layouts); "
       "fp32 GEMM ~1e11 FLOP/s per thread and 2 GB/s loopback are rough"},
  };
  return kinds;
}

const DeviceKind& device_kind(const std::string& name) {
  std::string known;
  for (const auto& k : device_kinds()) {
    if (lower(k.name) == lower(name)) return k;
    known += (known.empty() ? "" : ", ") + k.name;
  }
  RHINE_FAIL(kComponent, "unknown device kind", name, "known: " + known);
}

// --- layout -------------------------------------------------------------------

void Layout::validate(const nn::ModelConfig& c) const {
  RHINE_CHECK(zero >= 0 && zero <= 3, kComponent, "zero must be 0, 1, 2 or 3", zero,
              "0 data parallel, 1 optimizer state sharded, 2 + gradients, 3 + parameters (FSDP)");
  RHINE_CHECK(dp >= 1 && fsdp >= 1, kComponent, "dp and fsdp must be >= 1", (std::vector<int>{dp, fsdp}),
              "ranks = dp x fsdp");
  RHINE_CHECK(zero >= 2 || fsdp == 1, kComponent, "fsdp > 1 shards parameters and needs zero 2 or 3: fsdp",
              fsdp, "use --dp for data parallel (zero 0/1), or --zero 3 with --fsdp");
  RHINE_CHECK(ep >= 1 && ranks() % ep == 0, kComponent, "ep must divide the number of ranks (dp x fsdp)",
              fmt::format("ep {} with {} ranks", ep, ranks()), "pick ep among the divisors of the rank count");
  if (ep > 1) {
    RHINE_CHECK(c.uses_moe(), kComponent, "expert parallelism needs an MoE model: ep", ep,
                "leave ep at 1 for dense models");
    RHINE_CHECK(c.n_routed_experts % ep == 0, kComponent, "ep must divide n_routed_experts",
                fmt::format("ep {} with {} experts", ep, c.n_routed_experts), "each rank holds E / ep whole experts");
    RHINE_CHECK(zero < 2 || fsdp % ep == 0, kComponent, "under zero 2/3, ep must divide fsdp",
                fmt::format("ep {} with fsdp {}", ep, fsdp), "experts are split over ep ranks inside the fsdp group");
  }
  RHINE_CHECK(seq_len >= 1 && micro_batch >= 1 && grad_accum >= 1, kComponent,
              "seq_len, micro_batch and grad_accum must be >= 1",
              (std::vector<std::int64_t>{seq_len, micro_batch, grad_accum}), "");
  RHINE_CHECK(param_dtype == "float32" || param_dtype == "bfloat16", kComponent,
              "param_dtype must be \"float32\" or \"bfloat16\"", param_dtype,
              "the dtype FSDP gathers weights in");
  RHINE_CHECK(compute_efficiency > 0 && compute_efficiency <= 1, kComponent,
              "compute_efficiency must be in (0, 1]", compute_efficiency, "0.4-0.6 is typical for bf16 GEMMs");
  device_kind(device);  // throws for an unknown kind
}

// --- activations ----------------------------------------------------------------

namespace {

/// Bytes per token one block keeps for backward (docs/plan.md, "Activations").
/// a: activation bytes; r = 4: the fp32 residual stream and RMSNorm's fp32
/// statistics. Attention kernels are flash-style (no T x T matrix kept).
double block_bytes(const nn::ModelConfig& c, std::int64_t layer, double a) {
  const double r = 4.0;
  const double C = static_cast<double>(c.hidden_size), H = static_cast<double>(c.num_attention_heads);
  const double cast = a < r ? a : 0.0;  // autocast's bf16 copy of a norm output (one per norm)
  // Two pre-norms: each keeps its input, its normalised value and its output (fp32).
  double n = 2 * (3 * r * C + cast * C);
  if (c.uses_mla()) {
    const double qk = static_cast<double>(c.qk_head_dim()), R = static_cast<double>(c.kv_lora_rank);
    const double Dr = static_cast<double>(c.qk_rope_head_dim), dv = static_cast<double>(c.v_head_dim);
    const double nope = static_cast<double>(c.qk_nope_head_dim);
    if (c.q_lora_rank) n += a * static_cast<double>(*c.q_lora_rank) + 3 * r * static_cast<double>(*c.q_lora_rank);
    n += a * H * qk;                      // q
    n += a * (R + Dr) + 3 * r * R;        // kv_a output, its latent norm
    n += a * H * (nope + dv);             // kv_b output
    n += a * (H * Dr + Dr);               // RoPE outputs (q_pe, k_pe)
    n += a * (2 * H * qk + H * dv);       // assembled q, k and v for attention
    n += a * H * dv + r * H;              // attention output, logsumexp
    n += a * H * dv;                      // o_proj input
  } else {
    const double D = static_cast<double>(c.head_dim), Hkv = static_cast<double>(c.num_key_value_heads);
    n += a * (H * D + 2 * Hkv * D);        // q, k, v
    if (c.qk_norm) n += 3 * r * (H + Hkv) * D;  // QK-norm (Apertus)
    n += a * (H * D + Hkv * D);            // RoPE outputs
    n += a * H * D + r * H;                // attention output, logsumexp
    n += a * H * D;                        // o_proj input
  }
  auto mlp = [&](double width) { return a * 4 * width; };  // gate, up, act(gate), act * up
  if (c.is_moe_layer(layer)) {
    const double E = static_cast<double>(c.n_routed_experts), K = static_cast<double>(c.num_experts_per_tok);
    const double I = static_cast<double>(c.moe_intermediate_size);
    n += r * C + 3 * r * E;                // router input (fp32) and scores
    n += K * (2 * a * C + mlp(I) + r);     // each of K experts: its input rows, output rows, MLP, weight
    if (c.n_shared_experts > 0) n += mlp(I * static_cast<double>(c.n_shared_experts));
  } else {
    n += mlp(static_cast<double>(c.intermediate_size));
  }
  return n;
}

/// Bytes per token of the head and the loss: final norm, logits (a), their
/// fp32 copy in the loss and the logits' gradient (fp32).
double head_bytes(const nn::ModelConfig& c, double a) {
  const double r = 4.0, C = static_cast<double>(c.hidden_size), V = static_cast<double>(c.vocab_size);
  return 3 * r * C + (a + 2 * r) * V;
}

double gathered_bytes(const Layout& l) { return l.param_dtype == "bfloat16" ? 2.0 : 4.0; }

/// The largest share of dist::ShardedOptimizer's partition: parameters by
/// size (largest first, stable), each to the least loaded rank.
std::int64_t zero1_largest_share(const std::vector<ParamShape>& shapes, int n) {
  std::vector<std::int64_t> sizes;
  for (const auto& p : shapes) sizes.push_back(p.numel());
  std::stable_sort(sizes.begin(), sizes.end(), std::greater<>());
  std::vector<std::int64_t> load(static_cast<std::size_t>(n), 0);
  for (auto k : sizes) *std::min_element(load.begin(), load.end()) += k;
  return *std::max_element(load.begin(), load.end());
}

/// Ring time of `bytes` over a group of `group` ranks whose members lie
/// `stride` ranks apart: inside one node when the group's span fits.
double link_bytes_per_s(const DeviceKind& d, int group, int stride) {
  return static_cast<std::int64_t>(group) * stride <= d.devices_per_node ? d.intra_node_bytes_per_s
                                                                         : d.inter_node_bytes_per_s;
}

std::string gb(double bytes) { return fmt::format("{:.2f}", bytes / 1e9); }

}  // namespace

double activation_bytes_per_token(const nn::ModelConfig& c, const Layout& l) {
  const double a = l.bf16 ? 2.0 : 4.0;
  double main = 0, largest = 0;
  for (std::int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const double b = block_bytes(c, i, a);
    main += b;
    largest = std::max(largest, b);
  }
  // Checkpointing keeps each block's fp32 input, and one block's activations
  // while its forward is recomputed in backward.
  if (l.activation_checkpointing) main = 4.0 * static_cast<double>(c.hidden_size * c.num_hidden_layers) + largest;
  double mtp = 0;  // MTP modules (never checkpointed): embedding, two norms, eh_proj, block, own head
  const double C = static_cast<double>(c.hidden_size);
  for (std::int64_t k = 0; k < c.num_nextn_predict_layers; ++k)
    mtp += 4.0 * C + 2 * 3 * 4.0 * C + a * 2 * C + a * C + block_bytes(c, c.num_hidden_layers + k, a) + head_bytes(c, a);
  return main + mtp + head_bytes(c, a);
}

// --- plan -----------------------------------------------------------------------

Plan plan(const nn::ModelConfig& c, const Layout& l) {
  l.validate(c);
  Plan out;
  out.config = c;
  out.layout = l;
  out.device = device_kind(l.device);
  const DeviceKind& d = out.device;
  const auto shapes = parameter_shapes(c);
  out.params = count_parameters(c);
  const ParamCounts& pc = out.params;
  const int N = l.ranks();
  const double g = gathered_bytes(l);
  const bool sharded = l.zero >= 2;

  // W: what a rank holds whole (replicated layouts; gathered under ZeRO-2);
  // S: its shard (ZeRO-2/3). Routed experts: 1/ep per rank, then row-sharded
  // over fsdp/ep ranks.
  double W = 0, S = 0, root_gathered = 0, largest_block_gathered = 0;
  std::vector<double> unit_gathered(static_cast<std::size_t>(pc.n_blocks + 1), 0.0);
  for (const auto& p : shapes) {
    const double k = static_cast<double>(p.numel());
    const bool expert = p.kind == ParamKind::kRoutedExpert;
    const double whole = expert ? k / l.ep : k;
    W += whole;
    if (sharded) {
      const double rows = static_cast<double>(p.shape[0]), inner = k / rows;
      const int n = expert ? std::max(1, l.fsdp / l.ep) : l.fsdp;
      S += expert ? ceil_div(rows, n) * inner / l.ep : ceil_div(rows, n) * inner;
      // Under expert parallelism with ep == fsdp the owner keeps its experts
      // whole (never gathered); with a smaller ep the owners gather theirs.
      if (!(expert && l.ep > 1))
        unit_gathered[static_cast<std::size_t>(p.unit)] += k;
      else if (l.ep < l.fsdp)
        unit_gathered[static_cast<std::size_t>(p.unit)] += k / l.ep;
    }
  }
  root_gathered = unit_gathered[0];
  for (std::size_t u = 1; u < unit_gathered.size(); ++u)
    largest_block_gathered = std::max(largest_block_gathered, unit_gathered[u]);

  MemoryEstimate& m = out.memory;
  m.baseline = d.baseline_bytes;
  m.capacity = d.memory_bytes;
  if (!sharded) {
    m.parameters = 4 * W;
    m.gradients = 4 * W;
    m.communication = N > 1 ? 4 * W : 0;  // GradientSync's flat buckets
    double opt = W;
    if (l.zero == 1 && l.dp > 1) {
      if (l.ep > 1) {
        opt = W / l.dp;  // the partition of a rank's own experts is not modelled exactly
      } else {
        opt = static_cast<double>(zero1_largest_share(shapes, l.dp));
      }
    }
    m.optimizer = 8 * opt;
  } else {
    m.parameters = 4 * S + (l.zero == 2 ? g * W : 0);
    m.gradients = 4 * S + 4 * root_gathered;  // the root's full gradients live until finish()
    if (l.grad_accum > 1) m.gradients += 4 * W;  // no_sync's full-size fp32 accumulators
    m.optimizer = 8 * S;
    // One unit's full gradients and its reduce-scatter buffer; ZeRO-3: the
    // root and two blocks gathered (running + prefetched).
    m.communication = 8 * largest_block_gathered;
    if (l.zero == 3) m.communication += g * (root_gathered + 2 * largest_block_gathered);
  }
  const double tokens_micro = static_cast<double>(l.micro_batch * l.seq_len);
  m.activations = activation_bytes_per_token(c, l) * tokens_micro;
  const double training = m.parameters + m.gradients + m.optimizer + m.activations + m.communication;
  m.construction = 4 * static_cast<double>(pc.total) + (sharded ? 4 * S : 0);
  m.peak_bytes = m.baseline + training;
  if (lower(d.name) == "cpu") m.peak_bytes = std::max(m.peak_bytes, m.baseline + m.construction);
  m.fits = m.capacity <= 0 || m.peak_bytes <= m.capacity;

  // --- time ---------------------------------------------------------------------
  TimeEstimate& t = out.time;
  const double T = static_cast<double>(l.seq_len), C = static_cast<double>(c.hidden_size);
  const double H = static_cast<double>(c.num_attention_heads);
  const double dqk = c.uses_mla() ? static_cast<double>(c.qk_head_dim()) : static_cast<double>(c.head_dim);
  const double dv = c.uses_mla() ? static_cast<double>(c.v_head_dim) : static_cast<double>(c.head_dim);
  // Matmul parameters per token: active minus the input embedding (a lookup),
  // plus the head's matmul when tied; MTP: each module's block, eh_proj and head.
  double matmul = static_cast<double>(pc.active) - static_cast<double>(c.vocab_size) * C;
  if (c.tie_word_embeddings) matmul += static_cast<double>(c.vocab_size) * C;
  double layers_attn = static_cast<double>(c.num_hidden_layers);
  if (c.num_nextn_predict_layers > 0) {
    const auto mtp_routed = [&] {
      double r = 0;
      for (const auto& p : shapes)
        if (p.unit > c.num_hidden_layers && p.kind == ParamKind::kRoutedExpert) r += static_cast<double>(p.numel());
      return r;
    }();
    double mtp_active = static_cast<double>(pc.mtp) - mtp_routed;
    if (c.n_routed_experts > 0) mtp_active += mtp_routed / static_cast<double>(c.n_routed_experts) * c.num_experts_per_tok;
    matmul += mtp_active + static_cast<double>(c.num_nextn_predict_layers) * static_cast<double>(c.vocab_size) * C;
    layers_attn += static_cast<double>(c.num_nextn_predict_layers);
  }
  t.model_flops_per_token = 6 * matmul + 6 * layers_attn * H * (dqk + dv) * T;
  const double tokens_rank_step = tokens_micro * static_cast<double>(l.grad_accum);
  const double hw_factor = l.activation_checkpointing ? 4.0 / 3.0 : 1.0;
  t.compute_s = tokens_rank_step * t.model_flops_per_token * hw_factor / (d.peak_flops * l.compute_efficiency);

  // Groups: fsdp ranks are adjacent (stride 1), dp replicas stride fsdp; the
  // ep group lies inside the fsdp group (ZeRO-2/3) or the dp group.
  double overlapped = 0, exposed = 0;
  auto ring = [&](double factor, double bytes, int group, int stride) {
    if (group <= 1) return std::pair<double, double>{0.0, 0.0};
    const double sent = factor * (group - 1) / group * bytes;
    return std::pair<double, double>{sent, sent / link_bytes_per_s(d, group, stride)};
  };
  const double accum = static_cast<double>(l.grad_accum);
  if (!sharded) {
    auto [ar, ar_s] = ring(2, 4 * W, l.dp, 1);  // gradients, once per step (no_sync before)
    t.all_reduce_bytes += ar;
    overlapped += ar_s;
    if (l.zero == 1) {  // every owner broadcasts its updated shard: an all-gather's volume
      auto [ag, ag_s] = ring(1, 4 * W, l.dp, 1);
      t.all_gather_bytes += ag;
      exposed += ag_s;
    }
  } else {
    const double Wg = W;  // what gets gathered (experts excluded under ep)
    const double gathers = l.zero == 3 ? accum * (l.reshard_after_forward ? 2 : 1) : 1;
    auto [ag, ag_s] = ring(gathers, g * Wg, l.fsdp, 1);
    t.all_gather_bytes += ag;
    (l.zero == 3 ? overlapped : exposed) += ag_s;  // ZeRO-2 gathers everything at forward start
    auto [rs, rs_s] = ring(1, 4 * Wg, l.fsdp, 1);
    t.reduce_scatter_bytes += rs;
    overlapped += rs_s;
    auto [ar, ar_s] = ring(2, 4 * S, l.dp, l.fsdp);  // hybrid: shards all-reduced over replicas
    t.all_reduce_bytes += ar;
    overlapped += ar_s;
  }
  if (l.ep > 1) {
    // Per MoE layer and micro-step: dispatch and combine, forward and backward,
    // of t*K rows of C activations.
    std::int64_t moe_layers = 0;
    for (std::int64_t i = 0; i < c.num_hidden_layers + c.num_nextn_predict_layers; ++i)
      moe_layers += c.is_moe_layer(i) ? 1 : 0;
    const double a = l.bf16 ? 2.0 : 4.0;
    const double per = tokens_micro * static_cast<double>(c.num_experts_per_tok) * C * a;
    auto [aa, aa_s] = ring(1, 4 * per * static_cast<double>(moe_layers) * accum, l.ep, 1);
    t.all_to_all_bytes += aa;
    exposed += aa_s;
  }
  t.overlapped_s = overlapped;
  t.exposed_s = exposed;
  t.step_s = std::max(t.compute_s, overlapped) + exposed;
  t.tokens_per_step = tokens_rank_step * N;
  t.tokens_per_s = t.tokens_per_step / t.step_s;
  t.tokens_per_s_per_device = t.tokens_per_s / N;
  t.mfu = t.tokens_per_s_per_device * t.model_flops_per_token / d.peak_flops;

  // --- what Rhine does not do (yet), and what is not modelled -------------------
  if (l.ep > 1 && !sharded)
    out.notes.push_back("Rhine's expert parallelism runs under FSDP (zero 2/3) only today");
  if (d.baseline_bytes == 0)
    out.notes.push_back("the device's runtime context and collective buffers (CUDA/ROCm, NCCL/RCCL) are not counted");
  out.notes.push_back(fmt::format("compute at {:.0f}% of peak (assumed; --efficiency)", 100 * l.compute_efficiency));
  if (!m.fits)
    out.notes.push_back(fmt::format("does not fit: {} GB needed, {} GB on the device", gb(m.peak_bytes), gb(m.capacity)));
  return out;
}

// --- output -----------------------------------------------------------------------

Json Plan::to_json() const {
  const auto& l = layout;
  Json j;
  j["model"] = {{"model_type", config.model_type},
                {"parameters", params.total},
                {"active_parameters", params.active},
                {"embedding_parameters", params.embedding},
                {"routed_expert_parameters", params.routed_experts},
                {"mtp_parameters", params.mtp}};
  j["layout"] = {{"ranks", l.ranks()}, {"dp", l.dp}, {"fsdp", l.fsdp}, {"ep", l.ep}, {"zero", l.zero},
                 {"seq_len", l.seq_len}, {"micro_batch", l.micro_batch}, {"grad_accum", l.grad_accum},
                 {"activation_checkpointing", l.activation_checkpointing}, {"bf16", l.bf16},
                 {"param_dtype", l.param_dtype}, {"reshard_after_forward", l.reshard_after_forward},
                 {"compute_efficiency", l.compute_efficiency}};
  j["device"] = {{"name", device.name}, {"description", device.description}, {"memory_bytes", device.memory_bytes},
                 {"peak_flops", device.peak_flops}, {"intra_node_bytes_per_s", device.intra_node_bytes_per_s},
                 {"inter_node_bytes_per_s", device.inter_node_bytes_per_s},
                 {"devices_per_node", device.devices_per_node}};
  j["memory_per_rank_bytes"] = {{"parameters", memory.parameters}, {"gradients", memory.gradients},
                                {"optimizer", memory.optimizer}, {"activations", memory.activations},
                                {"communication", memory.communication}, {"baseline", memory.baseline},
                                {"construction", memory.construction}, {"peak", memory.peak_bytes},
                                {"capacity", memory.capacity}, {"fits", memory.fits}};
  j["time"] = {{"model_flops_per_token", time.model_flops_per_token}, {"compute_s", time.compute_s},
               {"all_reduce_bytes", time.all_reduce_bytes}, {"all_gather_bytes", time.all_gather_bytes},
               {"reduce_scatter_bytes", time.reduce_scatter_bytes}, {"all_to_all_bytes", time.all_to_all_bytes},
               {"overlapped_s", time.overlapped_s}, {"exposed_s", time.exposed_s}, {"step_s", time.step_s},
               {"tokens_per_step", time.tokens_per_step}, {"tokens_per_s", time.tokens_per_s},
               {"tokens_per_s_per_device", time.tokens_per_s_per_device}, {"mfu", time.mfu}};
  j["notes"] = notes;
  return j;
}

std::string Plan::to_text() const {
  const auto& l = layout;
  std::string s;
  auto row = [&](const std::string& k, const std::string& v) { s += fmt::format("  {:<28} {}\n", k, v); };
  const char* stage[] = {"data parallel", "ZeRO-1", "FSDP ZeRO-2", "FSDP ZeRO-3"};
  s += fmt::format("model      {}, {:.3f}B parameters ({:.3f}B active per token, {:.3f}B routed experts)\n",
                   config.model_type, params.total / 1e9, params.active / 1e9, params.routed_experts / 1e9);
  s += fmt::format("layout     {} ranks = dp {} x fsdp {}, ep {}, {}; {} x {} tokens per micro-batch, accumulation {}, "
                   "checkpointing {}, {}, gathers in {}\n",
                   l.ranks(), l.dp, l.fsdp, l.ep, stage[l.zero], l.micro_batch, l.seq_len, l.grad_accum,
                   l.activation_checkpointing ? "on" : "off", l.bf16 ? "bf16 autocast" : "fp32", l.param_dtype);
  s += fmt::format("device     {}\n\n", device.description);
  s += "memory per rank (GB)\n";
  row("parameters", gb(memory.parameters));
  row("gradients", gb(memory.gradients));
  row("optimizer (AdamW)", gb(memory.optimizer));
  row("activations", gb(memory.activations));
  row("communication buffers", gb(memory.communication));
  if (memory.baseline > 0) row("baseline (runtime)", gb(memory.baseline));
  row("peak", gb(memory.peak_bytes) +
                  (memory.capacity > 0 ? fmt::format(" of {} ({})", gb(memory.capacity), memory.fits ? "fits" : "DOES NOT FIT")
                                       : ""));
  s += "\nstep\n";
  row("model FLOPs per token", fmt::format("{:.3e}", time.model_flops_per_token));
  row("compute", fmt::format("{:.3f} s", time.compute_s));
  row("communication overlapped", fmt::format("{:.3f} s", time.overlapped_s));
  row("communication exposed", fmt::format("{:.3f} s", time.exposed_s));
  row("step", fmt::format("{:.3f} s ({:.0f} tokens)", time.step_s, time.tokens_per_step));
  row("tokens/s", fmt::format("{:.0f} ({:.0f} per device)", time.tokens_per_s, time.tokens_per_s_per_device));
  row("MFU", fmt::format("{:.1f}%", 100 * time.mfu));
  row("sent per rank and step (GB)",
      fmt::format("all-reduce {}, all-gather {}, reduce-scatter {}, all-to-all {}", gb(time.all_reduce_bytes),
                  gb(time.all_gather_bytes), gb(time.reduce_scatter_bytes), gb(time.all_to_all_bytes)));
  if (!notes.empty()) {
    s += "\nnotes\n";
    for (const auto& n : notes) s += "  - " + n + "\n";
  }
  return s;
}

}  // namespace rhine::plan
