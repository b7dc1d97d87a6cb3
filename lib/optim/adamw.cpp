#include "rhine/optim/adamw.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <cmath>

#include "fused_adamw_kernel.h"
#include "rhine/core/error.h"

namespace rhine {

void AdamWOptions::validate() const {
  RHINE_CHECK(std::isfinite(lr) && lr >= 0, "adamw", "lr must be finite and >= 0", lr, "e.g. 3e-4");
  RHINE_CHECK(beta1 >= 0 && beta1 < 1, "adamw", "beta1 must be in [0, 1)", beta1, "e.g. 0.9");
  RHINE_CHECK(beta2 >= 0 && beta2 < 1, "adamw", "beta2 must be in [0, 1)", beta2, "e.g. 0.95");
  RHINE_CHECK(eps > 0, "adamw", "eps must be > 0", eps, "e.g. 1e-8");
  RHINE_CHECK(std::isfinite(weight_decay) && weight_decay >= 0, "adamw",
              "weight_decay must be finite and >= 0", weight_decay, "e.g. 0.1");
}

Json AdamWOptions::to_json() const {
  return {{"lr", lr}, {"beta1", beta1}, {"beta2", beta2}, {"eps", eps}, {"weight_decay", weight_decay}};
}

AdamWOptions AdamWOptions::from_json(const Json& j) {
  JsonFields f(j, "adamw");
  AdamWOptions o;
  o.lr = f.get("lr", o.lr);
  o.beta1 = f.get("beta1", o.beta1);
  o.beta2 = f.get("beta2", o.beta2);
  o.eps = f.get("eps", o.eps);
  o.weight_decay = f.get("weight_decay", o.weight_decay);
  f.reject_unknown();
  o.validate();
  return o;
}

namespace detail {

void adamw_update_reference(at::Tensor& p, const at::Tensor& g, at::Tensor& exp_avg,
                            at::Tensor& exp_avg_sq, const AdamWStep& s) {
  // Op for op what torch::optim::AdamW::step does (amsgrad off).
  if (s.weight_decay != 0) p.mul_(1 - s.lr * s.weight_decay);
  const double bias_correction1 = 1 - std::pow(s.beta1, s.step);
  const double bias_correction2 = 1 - std::pow(s.beta2, s.step);
  exp_avg.mul_(s.beta1).add_(g, 1 - s.beta1);
  exp_avg_sq.mul_(s.beta2).addcmul_(g, g, 1 - s.beta2);
  at::Tensor denom = (exp_avg_sq.sqrt() / std::sqrt(bias_correction2)).add_(s.eps);
  p.addcdiv_(exp_avg, denom, -s.lr / bias_correction1);
}

namespace {

void adamw_update_foreach(std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                          std::vector<at::Tensor>& m, std::vector<at::Tensor>& v,
                          const AdamWStep& h, const std::vector<int64_t>& steps) {
  if (params.empty()) return;
  std::vector<at::Scalar> sqrt_bc2, neg_step;
  for (int64_t t : steps) {
    sqrt_bc2.emplace_back(std::sqrt(1 - std::pow(h.beta2, t)));
    neg_step.emplace_back(-h.lr / (1 - std::pow(h.beta1, t)));
  }
  if (h.weight_decay != 0) at::_foreach_mul_(params, at::Scalar(1 - h.lr * h.weight_decay));
  at::_foreach_mul_(m, at::Scalar(h.beta1));
  at::_foreach_add_(m, grads, at::Scalar(1 - h.beta1));
  at::_foreach_mul_(v, at::Scalar(h.beta2));
  at::_foreach_addcmul_(v, grads, grads, at::Scalar(1 - h.beta2));
  std::vector<at::Tensor> denom = at::_foreach_sqrt(v);
  at::_foreach_div_(denom, sqrt_bc2);
  at::_foreach_add_(denom, at::Scalar(h.eps));
  at::_foreach_addcdiv_(params, m, denom, neg_step);
}

template <class T>
bool fusable(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v) {
  const auto st = c10::CppTypeToScalarType<T>::value;
  for (const auto* t : {&p, &g, &m, &v})
    if (!t->device().is_cpu() || t->scalar_type() != st || !t->is_contiguous()) return false;
  return g.numel() == p.numel();
}

}  // namespace

void adamw_update_multi(std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                        std::vector<at::Tensor>& exp_avgs, std::vector<at::Tensor>& exp_avg_sqs,
                        const AdamWStep& h, const std::vector<int64_t>& steps, OptimizerImpl impl,
                        const std::vector<at::Tensor>& copies) {
  // Copies the fused pass did not write: cast after the update, in one
  // multi-tensor launch on CUDA where LibTorch has _foreach_copy_.
  auto copy_rest = [&](const std::vector<bool>& done) {
    c10::AutoGradMode no_grad(false);
    std::vector<at::Tensor> dst, src;
    for (size_t i = 0; i < copies.size(); ++i)
      if (copies[i].defined() && !done[i]) dst.push_back(copies[i]), src.push_back(params[i]);
    if (dst.empty()) return;
#if RHINE_TORCH_VERSION_AT_LEAST(2, 2)
    at::_foreach_copy_(dst, src);
#else
    for (size_t i = 0; i < dst.size(); ++i) dst[i].copy_(src[i]);
#endif
  };
  if (impl == OptimizerImpl::kReference) {
    for (size_t i = 0; i < params.size(); ++i) {
      AdamWStep s = h;
      s.step = steps[i];
      adamw_update_reference(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], s);
    }
    copy_rest(std::vector<bool>(copies.size(), false));
    return;
  }
  if (impl == OptimizerImpl::kForeach) {
    adamw_update_foreach(params, grads, exp_avgs, exp_avg_sqs, h, steps);
    copy_rest(std::vector<bool>(copies.size(), false));
    return;
  }
  std::vector<bool> fused_copy(copies.size(), false);
  // Fused: contiguous fp32/fp64 CPU tensors through the one-pass kernel,
  // the rest (CUDA, bf16, strided) through the foreach ops.
  std::vector<AdamWBuffers<float>> f32;
  std::vector<AdamWBuffers<double>> f64;
  std::vector<at::Tensor> rp, rg, rm, rv;
  std::vector<int64_t> rs;
  for (size_t i = 0; i < params.size(); ++i) {
    auto &p = params[i], &m = exp_avgs[i], &v = exp_avg_sqs[i];
    const auto& g = grads[i];
    const double step_size = h.lr / (1 - std::pow(h.beta1, steps[i]));
    const double sqrt_bc2 = std::sqrt(1 - std::pow(h.beta2, steps[i]));
    if (fusable<float>(p, g, m, v)) {
      f32.push_back({p.data_ptr<float>(), g.data_ptr<float>(), m.data_ptr<float>(),
                     v.data_ptr<float>(), p.numel(), step_size, sqrt_bc2});
      if (i < copies.size() && copies[i].defined() && copies[i].scalar_type() == at::kBFloat16 &&
          copies[i].is_contiguous() && copies[i].device().is_cpu()) {
        f32.back().bf16_copy = reinterpret_cast<uint16_t*>(copies[i].data_ptr<at::BFloat16>());
        fused_copy[i] = true;
      }
    } else if (fusable<double>(p, g, m, v)) {
      f64.push_back({p.data_ptr<double>(), g.data_ptr<double>(), m.data_ptr<double>(),
                     v.data_ptr<double>(), p.numel(), step_size, sqrt_bc2});
    } else {
      rp.push_back(p), rg.push_back(g), rm.push_back(m), rv.push_back(v), rs.push_back(steps[i]);
      continue;
    }
    // Writes through raw pointers bypass autograd's version counter.
    p.unsafeGetTensorImpl()->bump_version();
  }
  const double decay = h.weight_decay != 0 ? 1 - h.lr * h.weight_decay : 1.0;
  if (!f32.empty()) fused_adamw_cpu(f32, h.beta1, h.beta2, h.eps, decay);
  if (!f64.empty()) fused_adamw_cpu(f64, h.beta1, h.beta2, h.eps, decay);
  adamw_update_foreach(rp, rg, rm, rv, h, rs);
  copy_rest(fused_copy);
}

}  // namespace detail

AdamW::AdamW(std::vector<Group> groups, OptimizerImpl impl)
    : GroupedOptimizer(std::move(groups), "adamw"), impl_(impl) {}

AdamW::AdamW(const NamedParameters& params, const AdamWOptions& options, OptimizerImpl impl)
    : AdamW(std::vector<Group>{{"default", params, options}}, impl) {}

void AdamW::step_impl() {
  written_.clear();  // (left over only if the last step threw)
  for (auto& group : groups_) {
    const auto& o = group.options;
    std::vector<at::Tensor> ps, gs, ms, vs, cs;  // cs: the weight copies to write (undefined: none)
    std::vector<int64_t> steps;
    for (auto& np : group.params) {
      const at::Tensor& g = np.tensor.grad();
      if (!g.defined()) continue;
      auto& st = state_of(np.name);
      if (st.step == 0) {
        st.slots["exp_avg"] = at::zeros_like(np.tensor, at::MemoryFormat::Preserve);
        st.slots["exp_avg_sq"] = at::zeros_like(np.tensor, at::MemoryFormat::Preserve);
      }
      ++st.step;
      ps.push_back(np.tensor), gs.push_back(g);
      ms.push_back(st.slots.at("exp_avg")), vs.push_back(st.slots.at("exp_avg_sq"));
      steps.push_back(st.step);
      const bool copied = copy_dtype_ != at::ScalarType::Undefined && np.tensor.scalar_type() == at::kFloat &&
                          copies_.requested(np.tensor);
      cs.push_back(copied ? copies_.buffer(np.tensor, copy_dtype_) : at::Tensor());
    }
    const detail::AdamWStep h{o.lr * lr_scale(), o.beta1, o.beta2, o.eps, o.weight_decay, 0};
    detail::adamw_update_multi(ps, gs, ms, vs, h, steps, impl_, cs);
    for (size_t i = 0; i < cs.size(); ++i)
      if (cs[i].defined()) written_.push_back(ps[i]);
  }
}

void AdamW::after_step() {
  for (const auto& p : written_) copies_.written(p);  // at the weights' versions after the step
  written_.clear();
}

void AdamW::set_weight_copies(c10::ScalarType dtype) {
  RHINE_CHECK(dtype == at::ScalarType::Undefined || dtype == at::kBFloat16 || dtype == at::kHalf, "adamw",
              "weight copies are bf16 or fp16", c10::toString(dtype), "pass at::kBFloat16 (or Undefined: off)");
  if (dtype == copy_dtype_) return;
  copy_dtype_ = dtype;
  copies_.clear();
}

}  // namespace rhine
