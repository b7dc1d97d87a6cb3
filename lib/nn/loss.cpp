// Language-model cross-entropy: the plain-op reference and the chunked form
// (see rhine/nn/loss.h). Dimension letters: N rows, V vocabulary.
#include "rhine/nn/loss.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <vector>

#include "rhine/core/error.h"
#include "rhine/torch/sync.h"

namespace rhine::nn {
namespace {

struct Prepared {
  at::Tensor valid;    // [N] bool: rows that carry loss
  at::Tensor targets;  // [N] int64, ignored rows set to 0 (a valid gather index)
  at::Tensor n;        // 0-dim int64: counted rows
};

Prepared prepare(const at::Tensor& logits, const at::Tensor& targets, std::int64_t ignore_index) {
  RHINE_CHECK(logits.dim() == 2 && targets.dim() == 1 && logits.size(0) == targets.size(0),
              "lm_loss", "logits must be [N, V] and targets [N]",
              (std::vector<std::vector<std::int64_t>>{logits.sizes().vec(), targets.sizes().vec()}),
              "flatten batch and time first");
  Prepared p;
  at::Tensor t = targets.to(logits.device(), at::kLong);
  p.valid = t != ignore_index;
  p.targets = t.masked_fill(p.valid.logical_not(), 0);
  p.n = p.valid.sum();
  if (targets.device().is_cpu()) {  // on the host the check costs no synchronisation
    const auto V = logits.size(1);
    const at::Tensor tc = targets.to(at::kLong);
    const bool bad = cpu_value<bool>(at::logical_and(tc != ignore_index, at::logical_or(tc < 0, tc >= V)).any());
    RHINE_CHECK(!bad, "lm_loss", "a target id is outside the vocabulary", V,
                "targets must be in [0, vocab_size) or equal ignore_index");
  }
  return p;
}

at::ScalarType acc_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

struct ChunkedLMLoss : public torch::autograd::Function<ChunkedLMLoss> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& logits,
                                                const at::Tensor& targets, const at::Tensor& valid,
                                                const at::Tensor& n, double z_loss, int64_t chunk_rows) {
    const auto N = logits.size(0);
    const auto acc = acc_type(logits);
    at::Tensor lse = at::empty({N}, logits.options().dtype(acc));
    for (int64_t b = 0; b < N; b += chunk_rows) {
      const int64_t m = std::min(chunk_rows, N - b);
      lse.narrow(0, b, m).copy_(at::logsumexp(logits.narrow(0, b, m).to(acc), {-1}));
    }
    at::Tensor picked = logits.gather(1, targets.unsqueeze(1)).squeeze(1).to(acc);  // [N]
    at::Tensor w = valid.to(acc);
    at::Tensor denom = n.clamp_min(1).to(acc);
    at::Tensor ce = ((lse - picked) * w).sum() / denom;
    at::Tensor z = z_loss > 0 ? (lse * lse * w).sum() * z_loss / denom : at::zeros({}, lse.options());
    ctx->save_for_backward({logits, targets, w, lse, denom});
    ctx->saved_data["z_loss"] = z_loss;
    ctx->saved_data["chunk_rows"] = chunk_rows;
    return {ce, z};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &t = saved[1], &w = saved[2], &lse = saved[3], &denom = saved[4];
    const double z_loss = ctx->saved_data["z_loss"].toDouble();
    const int64_t chunk_rows = ctx->saved_data["chunk_rows"].toInt();
    const auto N = x.size(0);
    const auto acc = lse.scalar_type();
    // Per row: the softmax coefficient and the one-hot term, as device tensors.
    at::Tensor dce = grads[0].defined() ? grads[0].to(acc) : at::zeros({}, lse.options());
    at::Tensor coef = w * dce / denom;                                           // [N]
    at::Tensor onehot = -coef;                                                   // [N]
    if (z_loss > 0 && grads[1].defined()) coef = coef + w * grads[1].to(acc) * (2.0 * z_loss) * lse / denom;
    at::Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
    for (int64_t b = 0; b < N; b += chunk_rows) {
      const int64_t m = std::min(chunk_rows, N - b);
      at::Tensor g = at::exp(x.narrow(0, b, m).to(acc) - lse.narrow(0, b, m).unsqueeze(1));  // p [m, V]
      g.mul_(coef.narrow(0, b, m).unsqueeze(1));
      g.scatter_add_(1, t.narrow(0, b, m).unsqueeze(1), onehot.narrow(0, b, m).unsqueeze(1));
      dx.narrow(0, b, m).copy_(g);
    }
    return {dx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> lm_loss(const at::Tensor& logits, const at::Tensor& targets,
                                                       std::int64_t ignore_index, double z_loss) {
  const Prepared p = prepare(logits, targets, ignore_index);
  at::Tensor lf = logits.to(acc_type(logits));
  at::Tensor lse = at::logsumexp(lf, {-1});                              // [N]
  at::Tensor picked = lf.gather(1, p.targets.unsqueeze(1)).squeeze(1);  // [N]
  at::Tensor w = p.valid.to(lf.scalar_type());
  at::Tensor denom = p.n.clamp_min(1).to(lf.scalar_type());
  at::Tensor ce = ((lse - picked) * w).sum() / denom;
  at::Tensor z = z_loss > 0 ? (lse.pow(2) * w).sum() * z_loss / denom : at::zeros_like(ce);
  return {ce, z, p.n};
}

std::int64_t default_loss_chunk_rows(std::int64_t vocab_size) {
  return std::max<std::int64_t>(1, (std::int64_t{1} << 24) / std::max<std::int64_t>(vocab_size, 1));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> chunked_lm_loss(const at::Tensor& logits, const at::Tensor& targets,
                                                               std::int64_t ignore_index, double z_loss,
                                                               std::int64_t chunk_rows) {
  RHINE_CHECK(chunk_rows >= 0, "lm_loss", "chunk_rows must be >= 0", chunk_rows, "0 picks the default");
  const Prepared p = prepare(logits, targets, ignore_index);
  if (chunk_rows == 0) chunk_rows = default_loss_chunk_rows(logits.size(1));
  auto out = ChunkedLMLoss::apply(logits, p.targets, p.valid, p.n, z_loss, chunk_rows);
  return {out[0], out[1], p.n};
}

}  // namespace rhine::nn
