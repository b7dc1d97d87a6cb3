#include "rhine/torch/compat.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cmath>
#include <limits>

#include "rhine/core/error.h"
#include "rhine/torch/cuda.h"
#include "rhine/torch/sync.h"

// at::_flash_attention_forward with cumulative offsets (CUDA builds of 2.5+;
// declared, and failing at run time, in CPU builds, where it is never reached).
#if RHINE_TORCH_VERSION_AT_LEAST(2, 5) && __has_include(<ATen/ops/_flash_attention_forward.h>)
#include <ATen/detail/CUDAHooksInterface.h>
#include <ATen/ops/_flash_attention_forward.h>
#define RHINE_HAS_FLASH_VARLEN 1
#else
#define RHINE_HAS_FLASH_VARLEN 0
#endif

namespace rhine {
namespace {

// Validates shapes; returns the number of query heads per KV head.
int64_t check_attention_shapes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  RHINE_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention",
              "q, k, v must be 4-D [B, H, T, D]",
              (std::vector<int64_t>{q.dim(), k.dim(), v.dim()}), "reshape to [B, heads, seq, head_dim]");
  RHINE_CHECK(q.size(0) == k.size(0) && k.size(0) == v.size(0), "attention",
              "batch sizes of q, k, v differ",
              (std::vector<int64_t>{q.size(0), k.size(0), v.size(0)}), "pass tensors of one batch");
  RHINE_CHECK(k.size(1) == v.size(1) && k.size(2) == v.size(2), "attention",
              "k and v must have the same heads and length", k.sizes().vec(), "");
  RHINE_CHECK(q.size(3) == k.size(3), "attention", "q and k head dims differ",
              (std::vector<int64_t>{q.size(3), k.size(3)}), "");
  RHINE_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "attention",
              "query heads must be a multiple of key/value heads",
              (std::vector<int64_t>{q.size(1), k.size(1)}), "check num_key_value_heads");
  return q.size(1) / k.size(1);
}

// Merges `is_causal` into an explicit mask (bool when possible).
std::optional<at::Tensor> merged_mask(const AttentionOptions& o, int64_t T, int64_t S,
                                      const c10::Device& device) {
  if (!o.is_causal) return o.mask;
  at::Tensor causal = causal_mask(T, S, device);
  if (!o.mask) return causal;
  if (o.mask->scalar_type() == at::kBool) return at::logical_and(*o.mask, causal);
  return o.mask->masked_fill(causal.logical_not(), -std::numeric_limits<double>::infinity());
}

}  // namespace

std::string torch_version() {
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH);
}

bool has_fused_attention() { return RHINE_TORCH_VERSION_AT_LEAST(2, 1); }

at::Tensor causal_mask(int64_t T, int64_t S, const c10::Device& device) {
  // [T, S]: row i may see columns j <= i + (S - T).
  return at::ones({T, S}, at::TensorOptions().dtype(at::kBool).device(device)).tril(S - T);
}

namespace {

void check_document_starts(const at::Tensor& q, const at::Tensor& k, const AttentionOptions& o) {
  const int64_t B = q.size(0), T = q.size(2);
  RHINE_CHECK(o.is_causal && !o.mask && k.size(2) == T, "attention",
              "document_starts need is_causal, no mask and as many keys as queries",
              fmt::format("is_causal {}, mask {}, T {}, S {}", o.is_causal, o.mask.has_value(), T, k.size(2)),
              "build a mask (nn::build_attention_mask) for caches, padding or windows");
  RHINE_CHECK(static_cast<int64_t>(o.document_starts.size()) == B, "attention",
              "document_starts needs one list per batch row", o.document_starts.size(), fmt::format("B is {}", B));
  for (const auto& row : o.document_starts) {
    bool ok = !row.empty() && row.front() == 0;
    for (std::size_t i = 1; ok && i < row.size(); ++i) ok = row[i] > row[i - 1] && row[i] < T;
    RHINE_CHECK(ok, "attention", "document starts must ascend from 0 and stay below T", row,
                fmt::format("T is {}", T));
  }
}

}  // namespace

at::Tensor document_mask(const std::vector<std::vector<int64_t>>& document_starts, int64_t T,
                         const c10::Device& device) {
  const auto B = static_cast<int64_t>(document_starts.size());
  at::Tensor doc = at::zeros({B, T}, at::kLong);  // document index of each token
  auto* d = doc.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    for (std::size_t i = 1; i < document_starts[b].size(); ++i)
      for (int64_t t = document_starts[b][i]; t < T; ++t) d[b * T + t] = static_cast<int64_t>(i);
  doc = doc.to(device);
  at::Tensor same = doc.unsqueeze(2) == doc.unsqueeze(1);  // [B, T, T]
  return same.logical_and(causal_mask(T, T, device)).unsqueeze(1);
}

at::Tensor attention_reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const AttentionOptions& options) {
  if (!options.document_starts.empty()) {  // the dense twin of the per-document path
    check_attention_shapes(q, k, v);
    check_document_starts(q, k, options);
    AttentionOptions dense = options;
    dense.document_starts.clear();
    dense.is_causal = false;
    dense.mask = document_mask(options.document_starts, q.size(2), q.device());
    return attention_reference(q, k, v, dense);
  }
  const int64_t groups = check_attention_shapes(q, k, v);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), S = k.size(2), Hkv = k.size(1);
  const double scale = options.scale.value_or(1.0 / std::sqrt(static_cast<double>(q.size(3))));
  // GQA without copying K and V per query head: query head h reads KV head
  // h / groups, so the `groups` heads of one KV head are G*T rows of one
  // batched product with it ([B, Hkv, G*T, D] x [B, Hkv, D, S]).
  at::Tensor qg = groups > 1 ? q.reshape({B, Hkv, groups * T, q.size(3)}) : q;

  // Softmax runs in fp32 at least (fp64 stays fp64), as low-precision
  // softmax over long rows loses the small probabilities.
  const auto acc = at::promote_types(q.scalar_type(), at::kFloat);
  at::Tensor scores = at::matmul(qg, k.transpose(-2, -1)).view({B, H, T, S}).to(acc) * scale;  // [B, H, T, S]
  if (auto mask = merged_mask(options, T, S, q.device())) {
    if (mask->scalar_type() == at::kBool)
      scores = scores.masked_fill(mask->logical_not(), -std::numeric_limits<double>::infinity());
    else
      scores = scores + mask->to(acc);
  }
  at::Tensor probs = at::softmax(scores, -1).to(v.scalar_type());  // [B, H, T, S]
  if (options.dropout_p > 0) probs = at::dropout(probs, options.dropout_p, /*train=*/true);
  if (groups == 1) return at::matmul(probs, v);  // [B, H, T, Dv]
  return at::matmul(probs.reshape({B, Hkv, groups * T, S}), v).view({B, H, T, v.size(3)});  // [B, H, T, Dv]
}

namespace {

// What `attention` hands to at::scaled_dot_product_attention on 2.x. The fused
// kernels' own is_causal is top-left aligned; use it only where that
// coincides with ours (square, no extra mask), else pass a mask.
struct SdpaArgs {
  std::optional<at::Tensor> mask;
  bool is_causal = false;
};
[[maybe_unused]] SdpaArgs sdpa_args(const at::Tensor& q, const at::Tensor& k, const AttentionOptions& options) {
  const int64_t T = q.size(2), S = k.size(2);
  SdpaArgs a;
  a.is_causal = options.is_causal && !options.mask && T == S;
  if (!a.is_causal) a.mask = merged_mask(options, T, S, q.device());
  return a;
}

}  // namespace

namespace {

// Packed documents on CUDA under autocast: q, k and v at autocast's dtype, the
// cast SDPA's autocast rule makes on each per-document call anyway. Made once
// here, it lets the variable-length kernel (fp16/bf16 only) take inputs that
// arrive in fp32, such as q and k after a QK-norm whose weights are fp32.
struct Qkv {
  at::Tensor q, k, v;
};
Qkv at_autocast_dtype(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  if (!q.is_cuda() || !autocast_enabled(c10::DeviceType::CUDA)) return {q, k, v};
  const auto dt = autocast_dtype(c10::DeviceType::CUDA);
  auto cast = [dt](const at::Tensor& t) {
    return at::isFloatingType(t.scalar_type()) && t.scalar_type() != dt ? t.to(dt) : t;
  };
  return {cast(q), cast(k), cast(v)};
}

// The CUDA variable-length flash kernel for packed documents (LibTorch 2.5+):
// all documents of all rows in one call, addressed by cumulative offsets,
// instead of one kernel launch per document. What it needs: a CUDA device the
// flash kernel serves (Ampere or newer), fp16 or bf16, head dims a multiple
// of 8 up to 256 with Dv <= D (a narrower V, as MLA has, is zero-padded to D
// and the output cut back), unit stride in the head dim. Whether LibTorch's
// flash kernel serves this device, dtype and head dim is asked of flash's own
// check (rhine::cuda::flash_attention_serves) with q standing for k and v too:
// shapes with as many heads and keys as queries, which flash accepts whenever
// it accepts q. Not of at::_fused_sdp_choice: that names the backend SDPA
// would pick, and 2.11 picks cuDNN's on Hopper (cuDNN 9.15+) where flash
// serves as well.
bool flash_varlen_usable(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const AttentionOptions& options) {
#if RHINE_HAS_FLASH_VARLEN
  // Not on ROCm (its flash build's variable-length form is untested here).
  if (!q.is_cuda() || at::detail::getCUDAHooks().hasROCM()) return false;
  const auto dtype = q.scalar_type();
  if ((dtype != at::kHalf && dtype != at::kBFloat16) || k.scalar_type() != dtype || v.scalar_type() != dtype)
    return false;
  const int64_t D = q.size(3), Dv = v.size(3);
  if (D % 8 != 0 || D > 256 || Dv > D || Dv % 8 != 0) return false;
  if (q.stride(3) != 1 || k.stride(3) != 1 || v.stride(3) != 1) return false;
  return cuda::flash_attention_serves(q, options.dropout_p);
#else
  (void)q, (void)k, (void)v, (void)options;
  return false;
#endif
}

}  // namespace

std::vector<int32_t> document_offsets(const std::vector<std::vector<int64_t>>& document_starts, int64_t T) {
  std::vector<int32_t> offsets;
  const auto B = static_cast<int64_t>(document_starts.size());
  RHINE_CHECK(B * T <= std::numeric_limits<int32_t>::max(), "attention",
              "packed batch too large for 32-bit document offsets", B * T, "use fewer rows per micro-batch");
  for (int64_t b = 0; b < B; ++b)
    for (const int64_t s : document_starts[static_cast<std::size_t>(b)]) offsets.push_back(static_cast<int32_t>(b * T + s));
  offsets.push_back(static_cast<int32_t>(B * T));
  return offsets;
}

#if RHINE_HAS_FLASH_VARLEN
namespace {

// Runs only where flash_varlen_usable said yes.
at::Tensor flash_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const AttentionOptions& options) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), Dv = v.size(3);
  const std::vector<int32_t> offsets = document_offsets(options.document_starts, T);
  int64_t longest = 0;
  for (std::size_t i = 0; i + 1 < offsets.size(); ++i)
    longest = std::max<int64_t>(longest, offsets[i + 1] - offsets[i]);
  // A host-to-device copy of the offsets (B * documents + 1 ints), pinned and
  // asynchronous: the host waits for nothing.
  const at::Tensor cu = to_device(at::tensor(at::ArrayRef<int32_t>(offsets), at::kInt), q.device());
  // [B, H, T, D] -> [B*T, H, D]: free when q came from a [B, T, H, D] projection.
  const at::Tensor qp = q.transpose(1, 2).reshape({B * T, H, D});
  const at::Tensor kp = k.transpose(1, 2).reshape({B * T, Hkv, D});
  at::Tensor vp = v.transpose(1, 2).reshape({B * T, Hkv, Dv});
  if (Dv < D) vp = at::constant_pad_nd(vp, {0, D - Dv});
  at::Tensor out = std::get<0>(at::_flash_attention_forward(qp, kp, vp, cu, cu, longest, longest, options.dropout_p,
                                                            /*is_causal=*/true, /*return_debug_mask=*/false,
                                                            options.scale));  // [B*T, H, D]
  if (Dv < D) out = out.narrow(2, 0, Dv);
  return out.view({B, T, H, Dv}).transpose(1, 2);  // [B, H, T, Dv]
}

}  // namespace
#endif  // RHINE_HAS_FLASH_VARLEN

std::string attention_backend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const AttentionOptions& options) {
  if (!options.document_starts.empty()) {
    check_attention_shapes(q, k, v);
    check_document_starts(q, k, options);
    const Qkv a = at_autocast_dtype(q, k, v);
    if (flash_varlen_usable(a.q, a.k, a.v, options)) return "flash-varlen";
    AttentionOptions one = options;  // what each document's call runs
    one.document_starts.clear();
    return "per-document/" + attention_backend(a.q, a.k, a.v, one);
  }
#if RHINE_TORCH_VERSION_AT_LEAST(2, 5)
  const int64_t groups = check_attention_shapes(q, k, v);
  const SdpaArgs a = sdpa_args(q, k, options);
  switch (at::_fused_sdp_choice(q, k, v, a.mask, options.dropout_p, a.is_causal, options.scale,
                                /*enable_gqa=*/groups > 1)) {
    case 0: return "math";
    case 1: return "flash";
    case 2: return "efficient";
    case 3: return "cudnn";
    default: return "other";
  }
#else
  check_attention_shapes(q, k, v);
  return "reference";
#endif
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const AttentionOptions& options) {
  if (!options.document_starts.empty()) {
    check_attention_shapes(q, k, v);
    check_document_starts(q, k, options);
    const Qkv a = at_autocast_dtype(q, k, v);
#if RHINE_HAS_FLASH_VARLEN
    if (flash_varlen_usable(a.q, a.k, a.v, options)) return flash_varlen(a.q, a.k, a.v, options);
#endif
    AttentionOptions one = options;  // causal inside one document
    one.document_starts.clear();
    const int64_t B = q.size(0), T = q.size(2);
    // unbind and split rather than narrow: their backward is one stack / cat,
    // where every narrow's backward would zero-fill a tensor of q's full size.
    const std::vector<at::Tensor> qs = a.q.unbind(0), ks = a.k.unbind(0), vs = a.v.unbind(0);  // [H, T, D]
    std::vector<at::Tensor> rows;
    for (int64_t b = 0; b < B; ++b) {
      const auto& starts = options.document_starts[static_cast<std::size_t>(b)];
      std::vector<int64_t> lengths;
      for (std::size_t i = 0; i < starts.size(); ++i)
        lengths.push_back((i + 1 < starts.size() ? starts[i + 1] : T) - starts[i]);
      const auto qd = qs[b].split_with_sizes(lengths, 1), kd = ks[b].split_with_sizes(lengths, 1),
                 vd = vs[b].split_with_sizes(lengths, 1);  // [H, n, D] each
      std::vector<at::Tensor> docs;
      for (std::size_t i = 0; i < lengths.size(); ++i)
        docs.push_back(attention(qd[i].unsqueeze(0), kd[i].unsqueeze(0), vd[i].unsqueeze(0), one));
      rows.push_back(docs.size() == 1 ? docs[0] : at::cat(docs, 2));
    }
    return B == 1 ? rows[0] : at::cat(rows, 0);
  }
#if RHINE_TORCH_VERSION_AT_LEAST(2, 1)
  const int64_t groups = check_attention_shapes(q, k, v);
  const SdpaArgs a = sdpa_args(q, k, options);
#if RHINE_TORCH_VERSION_AT_LEAST(2, 5)
  return at::scaled_dot_product_attention(q, k, v, a.mask, options.dropout_p, a.is_causal,
                                          options.scale, /*enable_gqa=*/groups > 1);
#else
  at::Tensor kk = groups > 1 ? k.repeat_interleave(groups, 1) : k;
  at::Tensor vv = groups > 1 ? v.repeat_interleave(groups, 1) : v;
  return at::scaled_dot_product_attention(q, kk, vv, a.mask, options.dropout_p, a.is_causal,
                                          options.scale);
#endif
#else
  return attention_reference(q, k, v, options);
#endif
}

// ---------------------------------------------------------------------------
// Autocast
// ---------------------------------------------------------------------------
namespace {

void check_autocast_device(c10::DeviceType device) {
  RHINE_CHECK(device == c10::DeviceType::CPU || device == c10::DeviceType::CUDA, "autocast",
              "autocast supports CPU and CUDA only", c10::DeviceTypeName(device), "");
}

bool get_enabled(c10::DeviceType device) {
#if RHINE_TORCH_VERSION_AT_LEAST(2, 4)
  return at::autocast::is_autocast_enabled(device);
#else
  return device == c10::DeviceType::CPU ? at::autocast::is_cpu_enabled() : at::autocast::is_enabled();
#endif
}

void set_enabled(c10::DeviceType device, bool on) {
#if RHINE_TORCH_VERSION_AT_LEAST(2, 4)
  at::autocast::set_autocast_enabled(device, on);
#else
  if (device == c10::DeviceType::CPU)
    at::autocast::set_cpu_enabled(on);
  else
    at::autocast::set_enabled(on);
#endif
}

c10::ScalarType get_dtype(c10::DeviceType device) {
#if RHINE_TORCH_VERSION_AT_LEAST(2, 4)
  return at::autocast::get_autocast_dtype(device);
#else
  return device == c10::DeviceType::CPU ? at::autocast::get_autocast_cpu_dtype()
                                        : at::autocast::get_autocast_gpu_dtype();
#endif
}

void set_dtype(c10::DeviceType device, c10::ScalarType dtype) {
#if RHINE_TORCH_VERSION_AT_LEAST(2, 4)
  at::autocast::set_autocast_dtype(device, dtype);
#else
  if (device == c10::DeviceType::CPU)
    at::autocast::set_autocast_cpu_dtype(dtype);
  else
    at::autocast::set_autocast_gpu_dtype(dtype);
#endif
}

}  // namespace

bool autocast_enabled(c10::DeviceType device) {
  check_autocast_device(device);
  return get_enabled(device);
}

c10::ScalarType autocast_dtype(c10::DeviceType device) {
  check_autocast_device(device);
  return get_dtype(device);
}

AutocastGuard::AutocastGuard(c10::DeviceType device, c10::ScalarType dtype, bool enabled)
    : device_(device) {
  check_autocast_device(device);
  RHINE_CHECK(dtype == at::kBFloat16 || (dtype == at::kHalf && device == c10::DeviceType::CUDA),
              "autocast", "unsupported autocast dtype", c10::toString(dtype),
              "use bfloat16 (CPU or CUDA) or float16 (CUDA)");
  prev_enabled_ = get_enabled(device);
  prev_dtype_ = get_dtype(device);
  set_enabled(device, enabled);
  set_dtype(device, dtype);
  at::autocast::increment_nesting();
}

namespace {
// Of the innermost AutocastStep with copies: the copies, and the aliases handed
// out in this step (one per weight, as autocast's cache keeps one cast per
// weight: all uses then meet in one node, whose backward sums their bf16
// gradients before the one cast to fp32, exactly as the cast's node does).
struct ActiveCopies {
  const WeightCopies* copies = nullptr;
  std::unordered_map<const c10::TensorImpl*, at::Tensor>* handed = nullptr;
};
thread_local ActiveCopies active;

// Hands out `copy` (already in the low dtype) for `weight`: an alias of the
// copy's storage forward, the gradient cast back to the weight's dtype
// backward, as the cast autocast would have made.
struct UseCopy : public torch::autograd::Function<UseCopy> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& weight, const at::Tensor& copy) {
    ctx->saved_data["dtype"] = static_cast<int64_t>(weight.scalar_type());
    at::Tensor alias = at::empty({0}, copy.options());
    alias.set_(copy.storage(), copy.storage_offset(), copy.sizes(), copy.strides());
    return alias;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto dtype = static_cast<c10::ScalarType>(ctx->saved_data["dtype"].toInt());
    return {grads[0].defined() ? grads[0].to(dtype) : at::Tensor(), at::Tensor()};
  }
};
}  // namespace

AutocastStep::AutocastStep(bool enabled, const WeightCopies* copies) : enabled_(enabled) {
  if (!enabled_) return;
  at::autocast::increment_nesting();
  previous_copies_ = active.copies;
  previous_handed_ = active.handed;
  if (copies != nullptr) {
    handed_ = std::make_unique<std::unordered_map<const c10::TensorImpl*, at::Tensor>>();
    active = {copies, handed_.get()};
  }
}

AutocastStep::~AutocastStep() {
  if (!enabled_) return;
  active = {previous_copies_, previous_handed_};
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
}

namespace {
bool same_weight(const std::optional<c10::weak_intrusive_ptr<c10::TensorImpl>>& held, const at::Tensor& weight) {
  return held.has_value() && held->lock().get() == weight.unsafeGetTensorImpl();
}
}  // namespace

at::Tensor WeightCopies::buffer(const at::Tensor& weight, c10::ScalarType dtype) {
  auto& e = entries_[weight.unsafeGetTensorImpl()];
  // A new buffer also when the last one is still referenced (an alias in a
  // graph kept past the step): overwriting it would change that graph's weights.
  if (!e.copy.defined() || e.copy.scalar_type() != dtype || e.copy.sizes() != weight.sizes() ||
      e.copy.device() != weight.device() || e.copy.use_count() > 1 || e.copy.storage().use_count() > 1 ||
      !same_weight(e.weight, weight)) {
    e.weight.emplace(weight.getIntrusivePtr());
    e.copy = at::empty(weight.sizes(), weight.options().dtype(dtype));
  }
  e.version = -1;
  return e.copy;
}

void WeightCopies::written(const at::Tensor& weight) {
  auto it = entries_.find(weight.unsafeGetTensorImpl());
  RHINE_CHECK(it != entries_.end(), "weight_copies", "written() for a weight without a buffer",
              weight.sizes().vec(), "call buffer(weight, dtype) first");
  it->second.version = static_cast<std::int64_t>(weight._version());
  it->second.data = weight.data_ptr();
}

const at::Tensor* WeightCopies::find(const at::Tensor& weight, c10::ScalarType dtype) const {
  auto it = entries_.find(weight.unsafeGetTensorImpl());
  if (it == entries_.end()) return nullptr;
  const Entry& e = it->second;
  const bool current = e.version == static_cast<std::int64_t>(weight._version()) &&
                       e.data == weight.data_ptr() && e.copy.device() == weight.device() &&
                       e.copy.scalar_type() == dtype && e.copy.sizes() == weight.sizes() &&
                       same_weight(e.weight, weight);
  return current ? &e.copy : nullptr;
}

at::Tensor autocast_weight(const at::Tensor& weight) {
  if (active.copies == nullptr || !weight.defined()) return weight;
  const auto dev = weight.device().type();
  if ((dev != c10::DeviceType::CPU && dev != c10::DeviceType::CUDA) || !get_enabled(dev)) return weight;
  const at::Tensor* copy = active.copies->find(weight, get_dtype(dev));
  if (copy == nullptr) {
    active.copies->request(weight);  // the optimizer writes it from the next step on
    return weight;
  }
  // Reuse this step's alias where autocast would reuse its cached cast: with
  // gradients on and the cache on (an activation-checkpointed block's
  // graph-less first run turns it off: an alias without grad_fn must not be
  // kept for the recomputation).
  const bool keep = c10::GradMode::is_enabled() && at::autocast::is_autocast_cache_enabled();
  if (keep) {
    auto it = active.handed->find(weight.unsafeGetTensorImpl());
    if (it != active.handed->end()) return it->second;
  }
  at::Tensor alias = UseCopy::apply(weight, *copy);
  if (keep) active.handed->emplace(weight.unsafeGetTensorImpl(), alias);
  return alias;
}

AutocastGuard::~AutocastGuard() {
  // The cast cache holds bf16 copies of weights; drop it when the outermost
  // guard ends, as Python's torch.autocast does.
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  set_enabled(device_, prev_enabled_);
  set_dtype(device_, prev_dtype_);
}

}  // namespace rhine
