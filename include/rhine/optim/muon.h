#pragma once
/// \file
/// Muon (K. Jordan et al., "Muon: an optimizer for hidden layers", 2024;
/// modded-nanogpt; Moonlight/Kimi, arXiv:2502.16982): SGD-momentum whose
/// update for a 2-D weight W [A, B] is replaced by its nearest semi-orthogonal
/// matrix, computed with a quintic Newton-Schulz iteration.
///
///     m  <- beta*m + (1-beta)*g                          (momentum.lerp_(g, 1-beta))
///     u  <- nesterov ? (1-beta)*g + beta*m : m          (g.lerp(m, beta))
///     O  <- NS5(u)                                       (ns_steps iterations, ns_dtype)
///     W  <- W*(1 - lr*wd) - lr * scale(A, B) * O
///
/// NS5: X = u / (||u||_F + 1e-7), transposed so that A <= B; then ns_steps
/// times: S = X X^T; X <- a X + (b S + c S S) X with (a, b, c) =
/// (3.4445, -4.7750, 2.0315). Five steps drive every singular value of a
/// well-conditioned input into about [0.65, 1.15] (measured: fp32/fp64
/// [0.68, 1.14], bf16 [0.65, 1.15]; tests check [0.6, 1.2]), not exactly 1:
/// the coefficients trade accuracy for a fast rise of the small ones. Tensors with
/// more than 2 dimensions are flattened to [size(0), rest]. The parameters of
/// one shape in a group are orthogonalised as one batch [n, A, B] (few, large
/// matmuls).
///
/// Update scale rule (so that learning rates transfer across shapes), chosen
/// by MuonOptions::scale:
///  - MuonScale::kMatchAdamW (default; Moonlight, arXiv:2502.16982 sec. 2.2):
///    scale = 0.2 * sqrt(max(A, B)). The update then has RMS about 0.2, the
///    typical RMS of an AdamW update, so the Muon groups can use the same lr
///    and weight decay as the AdamW groups and as an AdamW run.
///  - MuonScale::kSpectral (Keller Jordan's reference code): scale =
///    sqrt(max(1, A/B)); needs its own, larger lr (0.02 there).
///
/// Embeddings, the LM head, norms and every parameter with fewer than 2
/// dimensions belong in groups with `use_muon = false`: those run AdamW
/// (rhine/optim/adamw.h, reference formula) with the group's lr, beta1, beta2,
/// eps and weight_decay. `muon_groups` builds such a split from names.
///
/// State slots: "momentum_buffer" (Muon groups); "exp_avg", "exp_avg_sq" (AdamW groups).
///
/// Row shards (FSDP, rhine/dist/fsdp.h): momentum and the Nesterov blend are
/// elementwise and run on the shard, but Newton-Schulz needs each whole
/// matrix. With `set_shards` (FSDP::muon_shards()), a step hands the update
/// rows to the MuonShards, which all-gathers them one FSDP unit at a time,
/// lets Muon orthogonalise the unit's whole matrices (every rank computes the
/// same), and gives back this rank's rows of the result; the scale uses the
/// whole matrix's shape. The step then equals the unsharded one (to the
/// summation order of the gradients).

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "rhine/optim/optimizer.h"

namespace rhine {

/// How Muon scales the orthogonalised update (see the file comment).
enum class MuonScale { kMatchAdamW, kSpectral };

/// Options of one Muon param group.
struct MuonOptions {
  /// true: Muon update (parameters must have >= 2 dims); false: AdamW.
  bool use_muon = true;
  double lr = 1e-3;
  double weight_decay = 0.1;
  // Muon groups
  double momentum = 0.95;
  bool nesterov = true;
  int ns_steps = 5;
  MuonScale scale = MuonScale::kMatchAdamW;
  /// dtype of the Newton-Schulz iteration (bf16 as in the reference code;
  /// kFloat / kDouble for tight tests).
  c10::ScalarType ns_dtype = c10::ScalarType::BFloat16;
  // AdamW groups
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;

  void validate() const;
  Json to_json() const;
  static MuonOptions from_json(const Json& j);
};

/// Which parameters Muon leaves to AdamW.
struct MuonGroupRules {
  /// Globs (full parameter name) that go to AdamW even when 2-D.
  std::vector<std::string> adamw = {"*embed*", "*lm_head*", "*norm*"};
  /// Decay split of the AdamW parameters.
  ParamGroupRules decay;
};

/// Groups "muon" (2-D+ parameters not matched by rules.adamw), "adamw_decay"
/// and "adamw_no_decay" (weight_decay 0), each with `options` (use_muon set
/// accordingly); empty groups are left out.
std::vector<ParamGroup<MuonOptions>> muon_groups(const NamedParameters& params,
                                                 const MuonOptions& options,
                                                 const MuonGroupRules& rules = {});

/// Newton-Schulz quintic orthogonalisation of G [..., A, B] (last two dims;
/// leading dims batched), computed in `dtype`, returned in G's dtype.
at::Tensor newton_schulz5(const at::Tensor& G, int steps = 5,
                          c10::ScalarType dtype = c10::ScalarType::BFloat16);

/// The scale factor of an [A, B] update under `rule`.
double muon_scale(MuonScale rule, int64_t A, int64_t B);

/// Serves Muon when its parameters are row shards of whole matrices (see the
/// file comment); implemented by rhine::dist::FSDP.
class MuonShards {
 public:
  virtual ~MuonShards() = default;
  /// Whole matrices [A, B] by parameter name -> their orthogonalised update, same shapes.
  using Orthogonalise = std::function<std::map<std::string, at::Tensor>(const std::map<std::string, at::Tensor>&)>;
  /// Collective (every rank once per step, whatever it holds): `rows` maps
  /// this rank's Muon parameters to their update rows (the shard's shape).
  /// Calls `orthogonalise` on batches of whole matrices and returns, for
  /// every name in `rows`, this rank's rows of the result (the shard's shape).
  virtual std::map<std::string, at::Tensor> orthogonalise(const std::map<std::string, at::Tensor>& rows,
                                                          const Orthogonalise& orthogonalise) = 0;
  /// The whole [A, B] shape of the matrix a shard belongs to.
  virtual std::pair<std::int64_t, std::int64_t> whole_shape(const std::string& name) const = 0;
};

/// Muon with auxiliary AdamW groups; see the file comment.
class Muon : public GroupedOptimizer<MuonOptions> {
 public:
  explicit Muon(std::vector<Group> groups);
  std::string type() const override { return "muon"; }
  /// Steps row shards through `shards` (nullptr: whole parameters, the default).
  void set_shards(std::shared_ptr<MuonShards> shards) { shards_ = std::move(shards); }
  bool sharded() const { return shards_ != nullptr; }

 protected:
  void step_impl() override;

 private:
  std::shared_ptr<MuonShards> shards_;
};

}  // namespace rhine
