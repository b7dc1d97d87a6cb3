// Fused CPU kernels with custom autograd (see rhine/nn/fused.h).
// Dimension letters: R rows (all leading dims flattened), N normalised size,
// B batch, H heads, T tokens, D head dim, V vocabulary.
//
// The inner loops are plain C++ over raw buffers, written so that the
// compiler vectorises them: exp is a polynomial (vexp), reductions keep kLanes
// partial sums, and the hot row functions are compiled for AVX-512, AVX2 and
// the baseline with the matching one picked at load time (target_clones), so
// the library still runs on any x86-64. Everything is computed in acc_t
// (float, or double for double tensors) and rounded once to the storage type.
#include "rhine/nn/fused.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "rhine/core/error.h"
#include "rhine/nn/layers.h"
#include "rhine/nn/loss.h"
#include "rhine/nn/model.h"
#include "rhine/torch/sync.h"

#include "../core/cpu_clones.h"

namespace rhine::nn {
namespace {

// Rows per parallel task: enough work to amortise the task overhead.
int64_t grain(int64_t N) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1));
}

// Rows per block of the RMSNorm weight-gradient sum: about grain(N) rows, and
// at most 256 blocks so that the partial sums stay small. A function of R and
// N only, never of the thread count.
int64_t rms_dw_block_rows(int64_t R, int64_t N) {
  return std::max<int64_t>(grain(N), (R + 255) / 256);
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
// dw is summed in a fixed order whatever the number of threads: rows are cut
// into blocks that depend only on R and N, each block's partial sum goes to
// its own row of `partials`, and the blocks are added in block order. So a
// run is bitwise reproducible with any thread count (and equal across counts).
template <class x_t, class acc_t>
void rms_backward(const acc_t* dy, const x_t* x, const acc_t* w, const acc_t* rstd, x_t* dx,
                  acc_t* dw, int64_t R, int64_t N) {
  const int64_t block = rms_dw_block_rows(R, N), n_blocks = (R + block - 1) / std::max<int64_t>(block, 1);
  std::vector<acc_t> partials(dw ? static_cast<size_t>(n_blocks * N) : 0, acc_t(0));
  at::parallel_for(0, n_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t k = block_begin; k < block_end; ++k) {
      acc_t* dw_k = dw ? partials.data() + k * N : nullptr;
      for (int64_t r = k * block; r < std::min(R, (k + 1) * block); ++r) {
        const acc_t* dyr = dy + r * N;
        const x_t* xr = x + r * N;
        const acc_t s = rstd[r];
        acc_t dot = 0;  // sum(dn * n)
        for (int64_t i = 0; i < N; ++i) {
          const acc_t n = static_cast<acc_t>(xr[i]) * s;
          dot += dyr[i] * w[i] * n;
          if (dw_k) dw_k[i] += dyr[i] * n;
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
    }
  });
  if (!dw) return;
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t sum = 0;
      for (int64_t k = 0; k < n_blocks; ++k) sum += partials[k * N + i];
      dw[i] += sum;
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


// --- shared helpers ------------------------------------------------------------

using bf16 = c10::BFloat16;
constexpr int kLanes = 16;  // partial sums per reduction: one AVX-512 register of floats

template <class T>
using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

// exp(x) for float in a form that vectorises (Cephes' expf polynomial, about
// 1 ulp): x = n ln2 + r, |r| <= ln2/2, exp(x) = 2^n p(r). Inputs are clamped to
// [-87.3, 88] (so exp(-inf) gives 1e-38, not 0; harmless for the softmax and
// sigmoid uses here); NaN stays NaN.
RHINE_INLINE float vexp(float x) {
  // std::max/min keep a NaN x (they return x when the comparison fails) and,
  // unlike ternaries, are not jump-threaded into branches that stop vectorisation.
  x = std::min(std::max(x, -87.33654f), 88.0f);
  // Round x / ln2 to the nearest integer with the 1.5 * 2^23 trick (no SSE4.1 needed).
  const float shift = 12582912.0f;
  const float t = x * 1.44269504088896341f + shift;
  const float n = t - shift;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  std::int32_t ti;
  std::memcpy(&ti, &t, 4);
  const std::int32_t bits = (ti - 0x4B400000 + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}
RHINE_INLINE double vexp(double x) { return std::exp(x); }

// Rounds an acc value to the storage type. bf16: round to nearest even by bit
// arithmetic (as c10::BFloat16, but branch-free so that loops vectorise).
template <class T, class A>
RHINE_INLINE T store(A v) {
  if constexpr (std::is_same_v<T, bf16>) {
    const float f = static_cast<float>(v);
    std::uint32_t u;
    std::memcpy(&u, &f, 4);
    std::uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    r = f != f ? 0x7FC0u : r;  // NaN stays a quiet NaN
    return bf16(static_cast<std::uint16_t>(r), bf16::from_bits());
  } else {
    return static_cast<T>(v);
  }
}

// bf16 rows and blocks are widened into per-thread float scratch, computed by
// the float loops and rounded back: each of the three loops vectorises, where
// one loop mixing bf16 loads, exp and stores does not (GCC 12).
RHINE_INLINE void to_float(const bf16* __restrict x, float* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const std::uint32_t b = static_cast<std::uint32_t>(x[i].x) << 16;
    std::memcpy(y + i, &b, 4);
  }
}
RHINE_INLINE void from_float(const float* __restrict x, bf16* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = store<bf16>(x[i]);
}
// Per-thread scratch buffer `k` (0..3) of at least n floats.
inline float* scratch(int k, int64_t n) {
  thread_local std::vector<float> bufs[4];
  if (static_cast<int64_t>(bufs[k].size()) < n) bufs[k].resize(n);
  return bufs[k].data();
}
constexpr int64_t kBlock = 1024;  // elements per bf16 block of the elementwise kernels

// --- RoPE ------------------------------------------------------------------------
// Pairs (a, b) = (j, j + D/2) (HalfSplit) or (2j, 2j + 1) (Interleaved).
// forward:  y_a = x_a c_a - x_b s_a,   y_b = x_b c_b + x_a s_b
// backward: dx_a = dy_a c_a + dy_b s_b, dx_b = dy_b c_b - dy_a s_a  (rotation by -theta)

template <class T, class A>
RHINE_INLINE void rope_row_impl(const T* __restrict x, T* __restrict y, const A* __restrict c,
                                const A* __restrict s, int64_t D, bool interleaved,
                                bool backward) {
  const int64_t h = D / 2;
  const int64_t step = interleaved ? 2 : 1, off = interleaved ? 1 : h;
  if (!backward) {
    for (int64_t j = 0; j < h; ++j) {
      const int64_t a = j * step, b = a + off;
      const A xa = static_cast<A>(x[a]), xb = static_cast<A>(x[b]);
      y[a] = store<T>(xa * c[a] - xb * s[a]);
      y[b] = store<T>(xb * c[b] + xa * s[b]);
    }
  } else {
    for (int64_t j = 0; j < h; ++j) {
      const int64_t a = j * step, b = a + off;
      const A xa = static_cast<A>(x[a]), xb = static_cast<A>(x[b]);
      y[a] = store<T>(xa * c[a] + xb * s[b]);
      y[b] = store<T>(xb * c[b] - xa * s[a]);
    }
  }
}

RHINE_CLONES void rope_row(const float* x, float* y, const float* c, const float* s, int64_t D,
                           bool interleaved, bool backward) {
  rope_row_impl(x, y, c, s, D, interleaved, backward);
}
RHINE_CLONES void rope_row(const bf16* x, bf16* y, const float* c, const float* s, int64_t D,
                           bool interleaved, bool backward) {
  float* buf = scratch(0, 2 * D);
  to_float(x, buf, D);
  rope_row_impl(buf, buf + D, c, s, D, interleaved, backward);
  from_float(buf + D, y, D);
}
void rope_row(const double* x, double* y, const double* c, const double* s, int64_t D,
              bool interleaved, bool backward) {
  rope_row_impl(x, y, c, s, D, interleaved, backward);
}

// y[b, h, t, :] = rope(x[b, h, t, :]) for all rows; strides in elements,
// the last dimension dense. cos/sin strides cs0 (0 when broadcast over B), cs1.
template <class T, class A>
void rope_all(const at::Tensor& x, at::Tensor& y, const at::Tensor& cos, const at::Tensor& sin,
              bool interleaved, bool backward) {
  const int64_t B = x.size(0), H = x.size(1), Tn = x.size(2), D = x.size(3);
  const auto xs = x.strides(), ys = y.strides();
  const int64_t cs0 = cos.size(0) == 1 ? 0 : cos.stride(0), cs1 = cos.stride(1);
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const A* cp = cos.data_ptr<A>();
  const A* sp = sin.data_ptr<A>();
  at::parallel_for(0, B * H * Tn, std::max<int64_t>(1, 4096 / std::max<int64_t>(D, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r) {
                       const int64_t t = r % Tn, bh = r / Tn, hh = bh % H, b = bh / H;
                       rope_row(xp + b * xs[0] + hh * xs[1] + t * xs[2],
                                yp + b * ys[0] + hh * ys[1] + t * ys[2], cp + b * cs0 + t * cs1,
                                sp + b * cs0 + t * cs1, D, interleaved, backward);
                     }
                   });
}

struct FusedRope : public torch::autograd::Function<FusedRope> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& cos, const at::Tensor& sin, bool interleaved) {
    at::Tensor y = at::empty_like(x);  // keeps x's memory layout (e.g. [B, T, H, D] storage)
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "fused_rope", [&] {
      rope_all<scalar_t, acc_of<scalar_t>>(x, y, cos, sin, interleaved, false);
    });
    ctx->save_for_backward({cos, sin});
    ctx->saved_data["interleaved"] = interleaved;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    at::Tensor dy = grads[0];
    if (dy.stride(-1) != 1) dy = dy.contiguous();
    at::Tensor dx = at::empty(dy.sizes(), dy.options());
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dy.scalar_type(), "fused_rope_backward", [&] {
      rope_all<scalar_t, acc_of<scalar_t>>(dy, dx, saved[0], saved[1],
                                           ctx->saved_data["interleaved"].toBool(), true);
    });
    return {dx, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// --- SwiGLU ------------------------------------------------------------------------

template <class T>
RHINE_INLINE void swiglu_fwd_impl(const T* __restrict g, const T* __restrict u, T* __restrict y,
                                  int64_t n) {
  using A = acc_of<T>;
  for (int64_t i = 0; i < n; ++i) {
    const A gi = static_cast<A>(g[i]);
    const A s = A(1) / (A(1) + vexp(-gi));
    y[i] = store<T>(gi * s * static_cast<A>(u[i]));
  }
}

template <class T>
RHINE_INLINE void swiglu_bwd_impl(const T* __restrict dy, const T* __restrict g,
                                  const T* __restrict u, T* __restrict dg, T* __restrict du,
                                  int64_t n) {
  using A = acc_of<T>;
  for (int64_t i = 0; i < n; ++i) {
    const A gi = static_cast<A>(g[i]), ui = static_cast<A>(u[i]), d = static_cast<A>(dy[i]);
    const A s = A(1) / (A(1) + vexp(-gi));
    if (dg) dg[i] = store<T>(d * ui * s * (A(1) + gi * (A(1) - s)));
    if (du) du[i] = store<T>(d * gi * s);
  }
}

RHINE_CLONES void swiglu_fwd(const float* g, const float* u, float* y, int64_t n) {
  swiglu_fwd_impl(g, u, y, n);
}
RHINE_CLONES void swiglu_fwd(const bf16* g, const bf16* u, bf16* y, int64_t n) {
  float *gb = scratch(0, kBlock), *ub = scratch(1, kBlock), *yb = scratch(2, kBlock);
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t m = std::min(kBlock, n - b);
    to_float(g + b, gb, m);
    to_float(u + b, ub, m);
    swiglu_fwd_impl(gb, ub, yb, m);
    from_float(yb, y + b, m);
  }
}
void swiglu_fwd(const double* g, const double* u, double* y, int64_t n) {
  swiglu_fwd_impl(g, u, y, n);
}
RHINE_CLONES void swiglu_bwd(const float* dy, const float* g, const float* u, float* dg, float* du,
                             int64_t n) {
  swiglu_bwd_impl(dy, g, u, dg, du, n);
}
RHINE_CLONES void swiglu_bwd(const bf16* dy, const bf16* g, const bf16* u, bf16* dg, bf16* du,
                             int64_t n) {
  float *db = scratch(0, kBlock), *gb = scratch(1, kBlock), *ub = scratch(2, kBlock),
        *ob = scratch(3, 2 * kBlock);
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t m = std::min(kBlock, n - b);
    to_float(dy + b, db, m);
    to_float(g + b, gb, m);
    to_float(u + b, ub, m);
    swiglu_bwd_impl(db, gb, ub, dg ? ob : nullptr, du ? ob + kBlock : nullptr, m);
    if (dg) from_float(ob, dg + b, m);
    if (du) from_float(ob + kBlock, du + b, m);
  }
}
void swiglu_bwd(const double* dy, const double* g, const double* u, double* dg, double* du,
                int64_t n) {
  swiglu_bwd_impl(dy, g, u, dg, du, n);
}

constexpr int64_t kElementGrain = 1 << 14;

struct FusedSwiGLU : public torch::autograd::Function<FusedSwiGLU> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& gate,
                            const at::Tensor& up) {
    at::Tensor g = gate.contiguous(), u = up.contiguous();
    at::Tensor y = at::empty_like(g);
    const int64_t n = g.numel();
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, g.scalar_type(), "fused_swiglu", [&] {
      const scalar_t *gp = g.data_ptr<scalar_t>(), *up_ = u.data_ptr<scalar_t>();
      scalar_t* yp = y.data_ptr<scalar_t>();
      at::parallel_for(0, n, kElementGrain, [&](int64_t b, int64_t e) {
        swiglu_fwd(gp + b, up_ + b, yp + b, e - b);
      });
    });
    ctx->save_for_backward({g, u});
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    at::Tensor g = saved[0], u = saved[1];
    at::Tensor dy = grads[0].to(g.scalar_type()).contiguous();
    const bool need_g = ctx->needs_input_grad(0), need_u = ctx->needs_input_grad(1);
    at::Tensor dg = need_g ? at::empty_like(g) : at::Tensor();
    at::Tensor du = need_u ? at::empty_like(u) : at::Tensor();
    const int64_t n = g.numel();
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, g.scalar_type(), "fused_swiglu_backward", [&] {
      const scalar_t *dyp = dy.data_ptr<scalar_t>(), *gp = g.data_ptr<scalar_t>(),
                     *up_ = u.data_ptr<scalar_t>();
      scalar_t* dgp = need_g ? dg.data_ptr<scalar_t>() : nullptr;
      scalar_t* dup = need_u ? du.data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, n, kElementGrain, [&](int64_t b, int64_t e) {
        swiglu_bwd(dyp + b, gp + b, up_ + b, dgp ? dgp + b : nullptr, dup ? dup + b : nullptr,
                   e - b);
      });
    });
    return {dg, du};
  }
};

// --- cross-entropy over the vocabulary -------------------------------------------
// Per row r with target t_r and weight w_r (0 for ignored rows):
//   lse_r = m + log(sum_j exp(x_rj - m)), m = max_j x_rj
//   ce = sum_r w_r (lse_r - x_r,t) / n,  z = z_loss * sum_r w_r lse_r^2 / n
//   dx_rj = w_r / n * (dce * (p_rj - [j == t_r]) + dz * 2 z_loss lse_r p_rj),  p = exp(x - lse)

// lse of one row, with kLanes partial maxima and sums so that it vectorises.
template <class T>
RHINE_INLINE acc_of<T> lse_row_impl(const T* __restrict x, int64_t V) {
  using A = acc_of<T>;
  A mx[kLanes], sm[kLanes];
  for (int l = 0; l < kLanes; ++l) mx[l] = -std::numeric_limits<A>::infinity(), sm[l] = 0;
  const int64_t Vv = V / kLanes * kLanes;
  for (int64_t j = 0; j < Vv; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const A v = static_cast<A>(x[j + l]);
      mx[l] = v > mx[l] ? v : mx[l];
    }
  A m = -std::numeric_limits<A>::infinity();
  for (int l = 0; l < kLanes; ++l) m = mx[l] > m ? mx[l] : m;
  for (int64_t j = Vv; j < V; ++j) {
    const A v = static_cast<A>(x[j]);
    m = v > m ? v : m;
  }
  if (m == -std::numeric_limits<A>::infinity()) return m;  // all -inf
  for (int64_t j = 0; j < Vv; j += kLanes)
    for (int l = 0; l < kLanes; ++l) sm[l] += vexp(static_cast<A>(x[j + l]) - m);
  A s = 0;
  for (int l = 0; l < kLanes; ++l) s += sm[l];
  for (int64_t j = Vv; j < V; ++j) s += vexp(static_cast<A>(x[j]) - m);
  // A NaN logit makes s NaN (the maxima skip it, the sum does not): NaN out.
  return m + std::log(s);
}

template <class T>
RHINE_INLINE void ce_grad_row_impl(const T* __restrict x, T* __restrict dx, int64_t V,
                                   acc_of<T> lse, acc_of<T> coef) {
  using A = acc_of<T>;
  for (int64_t j = 0; j < V; ++j) dx[j] = store<T>(coef * vexp(static_cast<A>(x[j]) - lse));
}

RHINE_CLONES float lse_row(const float* x, int64_t V) { return lse_row_impl(x, V); }
RHINE_CLONES float lse_row(const bf16* x, int64_t V) {
  float* buf = scratch(0, V);
  to_float(x, buf, V);
  return lse_row_impl(static_cast<const float*>(buf), V);
}
double lse_row(const double* x, int64_t V) { return lse_row_impl(x, V); }
RHINE_CLONES void ce_grad_row(const float* x, float* dx, int64_t V, float lse, float coef) {
  ce_grad_row_impl(x, dx, V, lse, coef);
}
RHINE_CLONES void ce_grad_row(const bf16* x, bf16* dx, int64_t V, float lse, float coef) {
  float *in = scratch(0, kBlock), *out = scratch(1, kBlock);
  for (int64_t b = 0; b < V; b += kBlock) {
    const int64_t m = std::min(kBlock, V - b);
    to_float(x + b, in, m);
    ce_grad_row_impl(static_cast<const float*>(in), out, m, lse, coef);
    from_float(out, dx + b, m);
  }
}
void ce_grad_row(const double* x, double* dx, int64_t V, double lse, double coef) {
  ce_grad_row_impl(x, dx, V, lse, coef);
}

int64_t row_grain(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

struct FusedLMLoss : public torch::autograd::Function<FusedLMLoss> {
  // targets: contiguous int64 with ignored entries already validated; n: counted rows.
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& logits,
                                                const at::Tensor& targets, int64_t ignore_index,
                                                double z_loss, int64_t n) {
    at::Tensor x = logits.contiguous();
    const int64_t N = x.size(0), V = x.size(1);
    const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    at::Tensor lse = at::empty({N}, x.options().dtype(acc));
    const int64_t* tp = targets.data_ptr<int64_t>();
    double ce_sum = 0, z_sum = 0;
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "fused_lm_loss", [&] {
      using A = acc_of<scalar_t>;
      const scalar_t* xp = x.data_ptr<scalar_t>();
      A* lp = lse.data_ptr<A>();
      at::parallel_for(0, N, row_grain(V), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r)
          lp[r] = tp[r] == ignore_index ? A(0) : lse_row(xp + r * V, V);
      });
      // Sums over rows in double, in row order (deterministic for any thread count).
      for (int64_t r = 0; r < N; ++r) {
        if (tp[r] == ignore_index) continue;
        const double l = static_cast<double>(lp[r]);
        ce_sum += l - static_cast<double>(static_cast<A>(xp[r * V + tp[r]]));
        z_sum += l * l;
      }
    });
    const double denom = static_cast<double>(std::max<int64_t>(n, 1));
    at::Tensor ce = at::scalar_tensor(ce_sum / denom, x.options().dtype(acc));
    at::Tensor z = at::scalar_tensor(z_loss > 0 ? z_sum * z_loss / denom : 0.0,
                                     x.options().dtype(acc));
    ctx->save_for_backward({x, targets, lse});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["z_loss"] = z_loss;
    ctx->saved_data["denom"] = denom;
    return {ce, z};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    at::Tensor x = saved[0], targets = saved[1], lse = saved[2];
    const int64_t N = x.size(0), V = x.size(1);
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    const double z_loss = ctx->saved_data["z_loss"].toDouble();
    const double denom = ctx->saved_data["denom"].toDouble();
    // CPU scalars (this kernel runs on the CPU only): no device to wait for.
    const double dce = grads[0].defined() ? cpu_value<double>(grads[0].to(at::kDouble)) : 0.0;
    const double dz = grads[1].defined() && z_loss > 0 ? cpu_value<double>(grads[1].to(at::kDouble)) : 0.0;
    at::Tensor dx = at::empty_like(x);  // in the logits' dtype
    const int64_t* tp = targets.data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "fused_lm_loss_backward", [&] {
      using A = acc_of<scalar_t>;
      const scalar_t* xp = x.data_ptr<scalar_t>();
      scalar_t* dp = dx.data_ptr<scalar_t>();
      const A* lp = lse.data_ptr<A>();
      at::parallel_for(0, N, row_grain(V), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          scalar_t* dr = dp + r * V;
          if (tp[r] == ignore_index) {
            std::fill(dr, dr + V, scalar_t(0));
            continue;
          }
          const double l = static_cast<double>(lp[r]);
          const A coef = static_cast<A>((dce + dz * 2.0 * z_loss * l) / denom);
          ce_grad_row(xp + r * V, dr, V, lp[r], coef);
          // The one-hot term, applied in acc precision to the target entry.
          const A p = vexp(static_cast<A>(xp[r * V + tp[r]]) - lp[r]);
          dr[tp[r]] = static_cast<scalar_t>(coef * p - static_cast<A>(dce / denom));
        }
      });
    });
    return {dx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor fused_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      RopeLayout layout) {
  const auto t = x.scalar_type();
  const bool covered =
      x.device().is_cpu() && x.dim() == 4 && cos.dim() == 3 && sin.sizes() == cos.sizes() &&
      x.size(-1) % 2 == 0 && x.size(-1) == cos.size(-1) && x.size(2) == cos.size(1) &&
      (cos.size(0) == x.size(0) || cos.size(0) == 1) && x.stride(-1) == 1 &&
      (t == at::kFloat || t == at::kBFloat16 || t == at::kDouble) && cos.device().is_cpu() &&
      !cos.requires_grad() && !sin.requires_grad();
  if (!covered) return apply_rope(x, cos, sin, layout);  // the twin checks and reports shapes
  const auto acc = t == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor c = cos.to(acc).contiguous(), s = sin.to(acc).contiguous();
  return FusedRope::apply(x, c, s, layout == RopeLayout::Interleaved);
}

at::Tensor fused_swiglu(const at::Tensor& gate, const at::Tensor& up) {
  const auto t = gate.scalar_type();
  const bool covered = gate.device().is_cpu() && up.device().is_cpu() &&
                       gate.sizes() == up.sizes() && up.scalar_type() == t &&
                       (t == at::kFloat || t == at::kBFloat16 || t == at::kDouble);
  if (!covered) return at::silu(gate) * up;
  return FusedSwiGLU::apply(gate, up);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_lm_loss(const at::Tensor& logits, const at::Tensor& targets,
                                                             std::int64_t ignore_index, double z_loss) {
  const auto t = logits.scalar_type();
  const bool covered = logits.device().is_cpu() && targets.device().is_cpu() &&
                       logits.dim() == 2 && targets.dim() == 1 &&
                       logits.size(0) == targets.size(0) &&
                       (t == at::kFloat || t == at::kBFloat16 || t == at::kDouble);
  if (!covered) return chunked_lm_loss(logits, targets, ignore_index, z_loss);  // checks shapes
  at::Tensor tg = targets.to(at::kLong).contiguous();
  const int64_t N = tg.size(0), V = logits.size(1);
  const int64_t* tp = tg.data_ptr<int64_t>();
  int64_t n = 0;
  bool bad = false;
  for (int64_t r = 0; r < N; ++r) {
    if (tp[r] == ignore_index) continue;
    ++n;
    bad = bad || tp[r] < 0 || tp[r] >= V;
  }
  RHINE_CHECK(!bad, "lm_loss", "a target id is outside the vocabulary", V,
              "targets must be in [0, vocab_size) or equal ignore_index");
  auto out = FusedLMLoss::apply(logits, tg, ignore_index, z_loss, n);
  return {out[0], out[1], at::scalar_tensor(n, at::TensorOptions().dtype(at::kLong))};
}

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
