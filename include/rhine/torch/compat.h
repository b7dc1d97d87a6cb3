#pragma once
/// \file
/// The one place where Rhine's code differs between LibTorch versions.
/// Debian ships LibTorch 1.13 (CPU); GPU machines run PyTorch 2.x's LibTorch.
/// Everything else in Rhine calls these functions instead of switching on
/// versions itself. What this layer covers:
///  - version macros (RHINE_TORCH_VERSION_AT_LEAST) and `torch_version()`;
///  - `attention`: scaled dot-product attention with GQA, causal (bottom-right
///    aligned, so KV-cached decoding works) and explicit masks; fused kernels
///    on 2.x (flash / memory-efficient / cuDNN), the math path on 1.13;
///  - `AutocastGuard`: mixed precision on CPU (bf16) and CUDA (bf16/fp16),
///    over the 1.13 per-device setters and the 2.4+ device-generic ones;
///    `AutocastStep` (one cast per weight per optimizer step) and
///    `WeightCopies` / `autocast_weight` (bf16 copies the optimizer writes,
///    taken by the layers instead of a cast), which build on autocast's state.
/// Device selection, threads and seeding live in rhine/torch/runtime.h.
///
/// Dimension letters: B batch, H query heads, Hkv key/value heads, T query
/// length, S key length, D head dim (queries and keys), Dv value head dim.

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>
#include <torch/version.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

/// True when the LibTorch being compiled against is at least major.minor.
#define RHINE_TORCH_VERSION_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) ||                \
   (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

namespace rhine {

/// "major.minor.patch" of the LibTorch Rhine was compiled against.
std::string torch_version();

/// True when `attention` dispatches to LibTorch's fused kernels (2.x).
bool has_fused_attention();

/// Options of `attention`.
struct AttentionOptions {
  /// Bool (true = may attend) or additive float mask, broadcastable to
  /// [B, H, T, S]. Combined with `is_causal` when both are given.
  std::optional<at::Tensor> mask;
  /// Query i sees keys j <= i + (S - T): bottom-right aligned, so a query
  /// block at the end of a longer key sequence (KV cache) is causal too.
  bool is_causal = false;
  /// Softmax scale; default 1/sqrt(D).
  std::optional<double> scale;
  /// Dropout on the attention probabilities (training only).
  double dropout_p = 0.0;
  /// Packed documents without a mask: for each batch row, the token offsets
  /// where its documents start (ascending, the first 0), on the host. Each
  /// document attends causally to itself only, through one call of the fused
  /// kernel per document, and no [B, 1, T, S] mask is built (O(sum L_i^2)
  /// work instead of O(T^2)). On CUDA in fp16/bf16 (LibTorch 2.5+, a GPU the
  /// flash kernel serves) all documents run in one call of the
  /// variable-length flash kernel instead (`document_offsets`).
  /// Needs is_causal, no mask and T == S. Empty: off.
  std::vector<std::vector<int64_t>> document_starts;
};

/// The bool mask [B, 1, T, T] that `document_starts` stands for (causal inside
/// each document): the dense twin of the per-document path.
at::Tensor document_mask(const std::vector<std::vector<int64_t>>& document_starts, int64_t T,
                         const c10::Device& device);

/// The cumulative token offsets of the documents of all rows flattened into
/// one [B * T] sequence (what the variable-length flash kernel takes as
/// cu_seqlens): the start b * T + s of each document of row b, then B * T.
std::vector<int32_t> document_offsets(const std::vector<std::vector<int64_t>>& document_starts, int64_t T);

/// Scaled dot-product attention.
///   q [B, H, T, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv] -> [B, H, T, Dv]
/// with H a multiple of Hkv (MHA, GQA, MQA). A query row that sees no key at
/// all (fully masked) yields NaN; mask such rows out of the loss. With
/// `document_starts`, runs once per document (then `attention_reference`,
/// the twin, applies `document_mask`).
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const AttentionOptions& options = {});

/// Which kernel `attention` runs for these inputs on this LibTorch: "flash",
/// "efficient", "cudnn" or "math" (LibTorch 2.5+ asks at::_fused_sdp_choice
/// with exactly the arguments `attention` passes), "reference" on older ones.
/// With `document_starts`: "flash-varlen" (one call for all documents, CUDA)
/// or "per-document/" followed by the kernel each document's call runs.
/// For tests and benchmarks: on 2.x CPU the causal, packed-document and
/// KV-cache masks all reach the flash kernel.
std::string attention_backend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const AttentionOptions& options = {});

/// The plain-op twin of `attention`: repeats KV heads, matmul, mask, softmax in
/// fp32, matmul. It is 1.13's implementation and the oracle in tests.
at::Tensor attention_reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const AttentionOptions& options = {});

/// The bool mask [T, S] of bottom-right aligned causal attention.
at::Tensor causal_mask(int64_t T, int64_t S, const c10::Device& device);

/// Enables autocast for one device type while in scope (bf16 on CPU; bf16 or
/// fp16 on CUDA), restoring the previous state and clearing the cast cache on
/// exit. Nesting is allowed.
class AutocastGuard {
 public:
  AutocastGuard(c10::DeviceType device, c10::ScalarType dtype, bool enabled = true);
  ~AutocastGuard();
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  c10::DeviceType device_;
  bool prev_enabled_;
  c10::ScalarType prev_dtype_;
};

/// Keeps autocast's cast cache alive across the autocast regions inside it
/// (this thread): a trainable fp32 weight is cast to the autocast dtype at
/// its first use and every later region reuses that copy, until the
/// outermost AutocastStep (or AutocastGuard) ends. Wrapping the micro-batches
/// of one optimizer step casts each weight once per step instead of once per
/// micro-batch (rhine::train::Trainer does; TrainerOptions::cast_once_per_step).
/// The weights must not change inside it (the copies would be stale) nor get
/// new storage (FSDP's gathers: the Trainer does not use it there). Memory:
/// the bf16 copies stay alive between micro-batches. `enabled` false: no-op.
class WeightCopies;

class AutocastStep {
 public:
  /// `copies`: weight copies written before the step (by the optimizer:
  /// AdamW::set_weight_copies), which `autocast_weight` hands to the layers
  /// in this scope instead of casting. Not owned; must outlive the scope.
  explicit AutocastStep(bool enabled = true, const WeightCopies* copies = nullptr);
  ~AutocastStep();
  AutocastStep(const AutocastStep&) = delete;
  AutocastStep& operator=(const AutocastStep&) = delete;

 private:
  bool enabled_;
  const WeightCopies* previous_copies_ = nullptr;
  std::unordered_map<const c10::TensorImpl*, at::Tensor>* previous_handed_ = nullptr;
  /// The aliases of copies handed out in this step, one per weight.
  std::unique_ptr<std::unordered_map<const c10::TensorImpl*, at::Tensor>> handed_;
};

/// Low-precision copies of fp32 weights written outside the forward: AdamW
/// writes the bf16 copy of each weight a layer asked for (`autocast_weight`
/// records the request) in the same pass as its update
/// (AdamW::set_weight_copies), and the next step's layers use that copy
/// instead of casting the weight again. A copy counts only while its weight
/// is unchanged since it was written (the weight's version counter, storage
/// and device): an in-place change, a checkpoint load or a move to another
/// device makes the layers cast afresh. Used from one thread (the forward's
/// and the optimizer's).
class WeightCopies {
 public:
  /// Records that a layer asked for `weight`'s copy (autocast_weight does).
  void request(const at::Tensor& weight) const { requested_.insert(weight.unsafeGetTensorImpl()); }
  /// Whether a layer asked for `weight`'s copy.
  bool requested(const at::Tensor& weight) const { return requested_.count(weight.unsafeGetTensorImpl()) > 0; }
  /// The buffer for `weight`'s copy in `dtype` (allocated at the first call
  /// and whenever the last one is still referenced, e.g. by a kept graph),
  /// to be filled and then marked with `written`.
  at::Tensor buffer(const at::Tensor& weight, c10::ScalarType dtype);
  /// Marks `weight`'s buffer as holding its current values.
  void written(const at::Tensor& weight);
  /// The copy of `weight` in `dtype` when it is current, else nullptr.
  const at::Tensor* find(const at::Tensor& weight, c10::ScalarType dtype) const;
  /// Copies held (written or not).
  std::size_t size() const { return entries_.size(); }
  void clear() {
    entries_.clear();
    requested_.clear();
  }

 private:
  struct Entry {
    std::optional<c10::weak_intrusive_ptr<c10::TensorImpl>> weight;  ///< tells a reused address apart
    at::Tensor copy;
    std::int64_t version = -1;  ///< the weight's version when written; -1: not written
    const void* data = nullptr;  ///< the weight's storage when written (set_data keeps the version)
  };
  std::unordered_map<const c10::TensorImpl*, Entry> entries_;
  mutable std::unordered_set<const c10::TensorImpl*> requested_;
};

/// The weight a layer should multiply by: inside an AutocastStep with
/// WeightCopies, while autocast is on for the weight's device, the current
/// copy in autocast's dtype (its gradient reaches the fp32 weight as a cast's
/// would; the request is recorded when there is none yet); otherwise
/// `weight` itself (autocast then casts it as usual). The AutocastStep is
/// per thread: the recomputation of an activation-checkpointed block on
/// CUDA runs on autograd's device thread and casts there.
at::Tensor autocast_weight(const at::Tensor& weight);

/// Whether autocast is on for `device` in this thread.
bool autocast_enabled(c10::DeviceType device);
/// The dtype autocast casts matmuls to on `device` (meaningful while it is on).
c10::ScalarType autocast_dtype(c10::DeviceType device);

}  // namespace rhine
