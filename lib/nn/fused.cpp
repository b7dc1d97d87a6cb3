// Fused CPU kernels with custom autograd (see rhine/nn/fused.h).
// Dimension letters: R rows (all leading dims flattened), N normalised size.
#include "rhine/nn/fused.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <mutex>
#include <vector>

#include "rhine/nn/layers.h"

namespace rhine::nn {
namespace {

// Rows per parallel task: enough work to amortise the task overhead.
int64_t grain(int64_t N) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1));
}

// y [R, N] (acc dtype), rstd [R] (acc) from x [R, N], w [N] (acc).
template <class x_t, class acc_t>
void rms_forward(const x_t* x, const acc_t* w, acc_t* y, acc_t* rstd, int64_t R, int64_t N,
                 double eps) {
  at::parallel_for(0, R, grain(N), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const x_t* xr = x + r * N;
      acc_t ss = 0;
      for (int64_t i = 0; i < N; ++i) {
        const acc_t v = static_cast<acc_t>(xr[i]);
        ss += v * v;
      }
      const acc_t s = acc_t(1) / std::sqrt(ss / acc_t(N) + static_cast<acc_t>(eps));
      rstd[r] = s;
      acc_t* yr = y + r * N;
      // HF casts the normalised value back to x's dtype before the weight.
      for (int64_t i = 0; i < N; ++i)
        yr[i] = w[i] * static_cast<acc_t>(static_cast<x_t>(static_cast<acc_t>(xr[i]) * s));
    }
  });
}

// dx [R, N] (x dtype) and dw [N] (acc) from dy [R, N] (acc), x, w, rstd.
// With n = x * rstd: dn = dy * w; dx = rstd * (dn - n * mean(dn * n)); dw = sum_r dy * n.
template <class x_t, class acc_t>
void rms_backward(const acc_t* dy, const x_t* x, const acc_t* w, const acc_t* rstd, x_t* dx,
                  acc_t* dw, int64_t R, int64_t N) {
  std::mutex m;
  at::parallel_for(0, R, grain(N), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> dw_local(dw ? N : 0, acc_t(0));
    for (int64_t r = begin; r < end; ++r) {
      const acc_t* dyr = dy + r * N;
      const x_t* xr = x + r * N;
      const acc_t s = rstd[r];
      acc_t dot = 0;  // sum(dn * n)
      for (int64_t i = 0; i < N; ++i) {
        const acc_t n = static_cast<acc_t>(xr[i]) * s;
        dot += dyr[i] * w[i] * n;
        if (dw) dw_local[i] += dyr[i] * n;
      }
      const acc_t mean = dot / acc_t(N);
      if (dx) {
        x_t* dxr = dx + r * N;
        for (int64_t i = 0; i < N; ++i) {
          const acc_t n = static_cast<acc_t>(xr[i]) * s;
          dxr[i] = static_cast<x_t>(s * (dyr[i] * w[i] - n * mean));
        }
      }
    }
    if (dw) {
      std::lock_guard<std::mutex> lock(m);
      for (int64_t i = 0; i < N; ++i) dw[i] += dw_local[i];
    }
  });
}

at::ScalarType acc_type(at::ScalarType x) {
  return x == at::kDouble ? at::kDouble : at::kFloat;
}

struct FusedRMSNorm : public torch::autograd::Function<FusedRMSNorm> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& weight, double eps) {
    const int64_t N = x.size(-1), R = x.numel() / std::max<int64_t>(N, 1);
    const auto acc = acc_type(x.scalar_type());
    at::Tensor xc = x.contiguous();
    at::Tensor wc = weight.to(acc).contiguous();
    at::Tensor y = at::empty(x.sizes(), x.options().dtype(acc));
    at::Tensor rstd = at::empty({R}, x.options().dtype(acc));
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "fused_rms_norm", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      rms_forward<scalar_t, acc_t>(xc.data_ptr<scalar_t>(), wc.data_ptr<acc_t>(),
                                   y.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), R, N, eps);
    });
    ctx->save_for_backward({xc, wc, rstd});
    ctx->saved_data["w_dtype"] = static_cast<int64_t>(weight.scalar_type());
    const auto out = at::promote_types(x.scalar_type(), weight.scalar_type());
    return out == acc ? y : y.to(out);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    at::Tensor x = saved[0], w = saved[1], rstd = saved[2];
    const int64_t N = x.size(-1), R = x.numel() / std::max<int64_t>(N, 1);
    const auto acc = w.scalar_type();
    at::Tensor dy = grads[0].to(acc).contiguous();
    const bool need_dx = ctx->needs_input_grad(0), need_dw = ctx->needs_input_grad(1);
    at::Tensor dx = need_dx ? at::empty_like(x) : at::Tensor();
    at::Tensor dw = need_dw ? at::zeros({N}, w.options()) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "fused_rms_norm_backward", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      rms_backward<scalar_t, acc_t>(dy.data_ptr<acc_t>(), x.data_ptr<scalar_t>(),
                                    w.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(),
                                    need_dx ? dx.data_ptr<scalar_t>() : nullptr,
                                    need_dw ? dw.data_ptr<acc_t>() : nullptr, R, N);
    });
    if (need_dw) dw = dw.to(static_cast<at::ScalarType>(ctx->saved_data["w_dtype"].toInt()));
    return {dx, dw, at::Tensor()};
  }
};

}  // namespace

at::Tensor fused_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const auto t = x.scalar_type();
  const bool covered = x.device().is_cpu() && weight.device().is_cpu() && weight.dim() == 1 &&
                       x.dim() >= 1 && x.size(-1) == weight.size(0) &&
                       (t == at::kFloat || t == at::kBFloat16 || t == at::kDouble) &&
                       (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble ||
                        weight.scalar_type() == at::kBFloat16);
  if (!covered) return rms_norm(x, weight, eps);  // the twin checks and reports shapes
  return FusedRMSNorm::apply(x, weight, eps);
}

}  // namespace rhine::nn
