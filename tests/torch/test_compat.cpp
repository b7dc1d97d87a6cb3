#include "torch_test.h"

#include <ATen/core/grad_mode.h>

#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "rhine/core/error.h"
#include "rhine/torch/compat.h"
#include "rhine/torch/cuda.h"

using Catch::Matchers::Contains;

namespace {

// Independent oracle: attention written as loops in float64, straight from the
// definition softmax(q k^T * scale + mask) v, with GQA head h -> h / (H / Hkv)
// and bottom-right causal alignment j <= i + S - T.
at::Tensor attention_loops(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           bool causal, double scale, const at::Tensor* bool_mask) {
  auto Q = q.to(at::kDouble).contiguous(), K = k.to(at::kDouble).contiguous(),
       V = v.to(at::kDouble).contiguous();
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), Dv = v.size(3), G = H / Hkv;
  auto out = at::zeros({B, H, T, Dv}, at::kDouble);
  auto qa = Q.accessor<double, 4>(), ka = K.accessor<double, 4>(), va = V.accessor<double, 4>();
  auto oa = out.accessor<double, 4>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < T; ++i) {
        std::vector<double> s(S, -std::numeric_limits<double>::infinity());
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j < S; ++j) {
          if (causal && j > i + S - T) continue;
          if (bool_mask && !bool_mask->index({b, 0, i, j}).item<bool>()) continue;
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += qa[b][h][i][d] * ka[b][h / G][j][d];
          s[j] = dot * scale;
          mx = std::max(mx, s[j]);
        }
        double z = 0;
        for (int64_t j = 0; j < S; ++j) z += std::isinf(s[j]) ? 0.0 : std::exp(s[j] - mx);
        for (int64_t j = 0; j < S; ++j) {
          if (std::isinf(s[j])) continue;
          double p = std::exp(s[j] - mx) / z;
          for (int64_t d = 0; d < Dv; ++d) oa[b][h][i][d] += p * va[b][h / G][j][d];
        }
      }
  return out;
}

double rel_err(const at::Tensor& a, const at::Tensor& ref) {
  auto d = a.to(at::kDouble) - ref.to(at::kDouble);
  double r = ref.to(at::kDouble).norm().item<double>();
  double e = d.norm().item<double>();
  return std::isnan(e) ? std::numeric_limits<double>::infinity() : e / r;
}

}  // namespace

TEST_CASE("attention matches a float64 loop oracle for MHA, GQA, MQA, causal and masks",
          "[compat][attention]") {
  at::manual_seed(0);
  struct Case {
    int64_t H, Hkv, T, S;
    bool causal;
    bool mask;
  };
  const Case cases[] = {
      {4, 4, 5, 5, false, false},  // MHA
      {4, 4, 6, 6, true, false},   // causal, square: fused is_causal path on 2.x
      {6, 2, 7, 7, true, false},   // GQA
      {4, 1, 5, 5, true, false},   // MQA
      {4, 2, 3, 9, true, false},   // a query block after a KV cache: bottom-right causal
      {4, 2, 1, 9, true, false},   // one-token decode step
      {4, 4, 6, 6, false, true},   // explicit bool mask
      {4, 2, 6, 6, true, true},    // causal and bool mask together (packed documents)
  };
  for (const auto& c : cases) {
    INFO("H=" << c.H << " Hkv=" << c.Hkv << " T=" << c.T << " S=" << c.S << " causal=" << c.causal
              << " mask=" << c.mask);
    const int64_t B = 2, D = 8, Dv = 6;
    auto q = at::randn({B, c.H, c.T, D});
    auto k = at::randn({B, c.Hkv, c.S, D});
    auto v = at::randn({B, c.Hkv, c.S, Dv});
    rhine::AttentionOptions o;
    o.is_causal = c.causal;
    at::Tensor mask;
    if (c.mask) {
      // Two documents packed in one row: block-diagonal visibility, plus the
      // diagonal so no query row is fully masked.
      mask = at::zeros({B, 1, c.T, c.S}, at::kBool);
      for (int64_t i = 0; i < c.T; ++i)
        for (int64_t j = 0; j < c.S; ++j) mask.index_put_({0, 0, i, j}, (i < 3) == (j < 3));
      mask.select(0, 1).fill_(true);
      o.mask = mask;
    }
    const double scale = 1.0 / std::sqrt(static_cast<double>(D));
    auto ref = attention_loops(q, k, v, c.causal, scale, c.mask ? &mask : nullptr);
    CHECK(rel_err(rhine::attention_reference(q, k, v, o), ref) < 1e-5);
    CHECK(rel_err(rhine::attention(q, k, v, o), ref) < 1e-5);
  }
}

TEST_CASE("attention honours a custom scale and an additive float mask", "[compat][attention]") {
  at::manual_seed(1);
  auto q = at::randn({1, 2, 4, 8}), k = at::randn({1, 2, 4, 8}), v = at::randn({1, 2, 4, 8});
  rhine::AttentionOptions o;
  o.scale = 0.3;
  auto ref = attention_loops(q, k, v, false, 0.3, nullptr);
  CHECK(rel_err(rhine::attention(q, k, v, o), ref) < 1e-5);

  // An additive mask of 0 / -inf is the same as the bool mask.
  auto allowed = at::rand({1, 1, 4, 4}) > 0.4;
  allowed.diagonal(0, 2, 3).fill_(true);
  o.mask = at::zeros({1, 1, 4, 4}).masked_fill(allowed.logical_not(), -INFINITY);
  auto ref_masked = attention_loops(q, k, v, false, 0.3, &allowed);
  CHECK(rel_err(rhine::attention(q, k, v, o), ref_masked) < 1e-5);
  o.is_causal = true;
  auto ref_causal = attention_loops(q, k, v, true, 0.3, &allowed);
  CHECK(rel_err(rhine::attention(q, k, v, o), ref_causal) < 1e-5);
}

TEST_CASE("attention gradients match central finite differences in float64",
          "[compat][attention]") {
  at::manual_seed(2);
  auto opts = at::TensorOptions().dtype(at::kDouble);
  auto q = at::randn({1, 2, 3, 4}, opts).requires_grad_(true);
  auto k = at::randn({1, 1, 5, 4}, opts).requires_grad_(true);
  auto v = at::randn({1, 1, 5, 3}, opts).requires_grad_(true);
  rhine::AttentionOptions o;
  o.is_causal = true;
  auto w = at::randn({1, 2, 3, 3}, opts);  // random projection of the output
  auto loss_of = [&] { return (rhine::attention(q, k, v, o) * w).sum(); };
  loss_of().backward();
  const double eps = 1e-6;
  for (at::Tensor* t : {&q, &k, &v}) {
    auto grad = t->grad().clone();
    auto flat = t->data().view(-1);
    for (int64_t i = 0; i < flat.numel(); ++i) {
      double orig = flat[i].item<double>();
      flat[i] = orig + eps;
      double up = loss_of().item<double>();
      flat[i] = orig - eps;
      double down = loss_of().item<double>();
      flat[i] = orig;
      CHECK(grad.view(-1)[i].item<double>() == Approx((up - down) / (2 * eps)).margin(1e-7));
    }
  }
}

TEST_CASE("attention rejects bad shapes with clear errors", "[compat][attention]") {
  auto q = at::randn({1, 3, 4, 8}), k = at::randn({1, 2, 4, 8}), v = at::randn({1, 2, 4, 8});
  CHECK_THROWS_WITH(rhine::attention(q, k, v),
                    "[attention] query heads must be a multiple of key/value heads, got [3, 2]; "
                    "check num_key_value_heads");
  CHECK_THROWS_WITH(rhine::attention(q.view({3, 4, 8}), k, v), Contains("q, k, v must be 4-D"));
  CHECK_THROWS_WITH(rhine::attention(at::randn({1, 2, 4, 6}), k, v), Contains("q and k head dims differ"));
}

TEST_CASE("attention per document (document_starts) equals the dense document mask and the loop oracle",
          "[compat][attention]") {
  at::manual_seed(4);
  auto opts = at::TensorOptions().dtype(at::kDouble);
  const int64_t B = 3, H = 4, Hkv = 2, T = 11, D = 8;
  const std::vector<std::vector<int64_t>> starts = {{0, 4, 5, 9}, {0}, {0, 1, 10}};
  auto q = at::randn({B, H, T, D}, opts).requires_grad_(true);
  auto k = at::randn({B, Hkv, T, D}, opts).requires_grad_(true);
  auto v = at::randn({B, Hkv, T, 6}, opts).requires_grad_(true);
  rhine::AttentionOptions per_doc;
  per_doc.is_causal = true;
  per_doc.document_starts = starts;
  rhine::AttentionOptions dense;
  dense.mask = rhine::document_mask(starts, T, at::kCPU);
  CHECK(dense.mask->sizes().vec() == std::vector<int64_t>{B, 1, T, T});
  // Row 0: token 4 is a document of its own; token 6 sees 5..6 only.
  CHECK(dense.mask->index({0, 0, 4}).sum().item<int64_t>() == 1);
  CHECK(dense.mask->index({0, 0, 6}).sum().item<int64_t>() == 2);

  auto out = rhine::attention(q, k, v, per_doc);
  const at::Tensor mask = *dense.mask;
  CHECK(rel_err(out, attention_loops(q, k, v, false, 1.0 / std::sqrt(double(D)), &mask)) < 1e-12);
  CHECK(rel_err(out, rhine::attention_reference(q, k, v, per_doc)) < 1e-12);  // the twin applies the mask
  auto w = at::randn(out.sizes(), opts);
  auto grads = [&](const rhine::AttentionOptions& o) {
    for (auto* t : {&q, &k, &v}) t->mutable_grad() = at::Tensor();
    (rhine::attention(q, k, v, o) * w).sum().backward();
    return std::vector<at::Tensor>{q.grad().clone(), k.grad().clone(), v.grad().clone()};
  };
  const auto g1 = grads(per_doc), g2 = grads(dense);
  for (std::size_t i = 0; i < g1.size(); ++i) CHECK(rel_err(g1[i], g2[i]) < 1e-12);

  // The offsets the CUDA variable-length kernel takes: every row's documents
  // in one [B * T] sequence.
  CHECK(rhine::document_offsets(starts, T) == std::vector<int32_t>{0, 4, 5, 9, 11, 22, 23, 32, 33});
  // On the CPU each document runs its own call: the fused flash kernel on
  // 2.5+ where q, k, v have one head dim (here v = k), the math path where
  // they differ.
  const at::Tensor qf = q.detach().to(at::kFloat), kf = k.detach().to(at::kFloat);
  const bool fused = RHINE_TORCH_VERSION_AT_LEAST(2, 5);
  CHECK(rhine::attention_backend(qf, kf, kf, per_doc) == (fused ? "per-document/flash" : "per-document/reference"));
  CHECK(rhine::attention_backend(qf, kf, v.detach().to(at::kFloat), per_doc) ==
        (fused ? "per-document/math" : "per-document/reference"));

  rhine::AttentionOptions bad = per_doc;
  bad.document_starts = {{0, 4}, {1}, {0}};
  CHECK_THROWS_WITH(rhine::attention(q, k, v, bad), Contains("[attention] document starts must ascend from 0"));
  bad.document_starts = {{0, 4}};
  CHECK_THROWS_WITH(rhine::attention(q, k, v, bad), Contains("one list per batch row"));
  bad = per_doc;
  bad.is_causal = false;
  CHECK_THROWS_WITH(rhine::attention(q, k, v, bad), Contains("need is_causal, no mask"));
}

TEST_CASE("the flash check says no for a host tensor and a CPU-only build refuses the sync guard", "[compat][attention]") {
  // The GPU side of both is in tests/cuda/test_cuda.cpp.
  CHECK_FALSE(rhine::cuda::flash_attention_serves(at::randn({1, 2, 8, 64}).to(at::kBFloat16), 0.0));
  if (!rhine::cuda::compiled_with_cuda())
    CHECK_THROWS_WITH(rhine::cuda::SyncErrorGuard(), Contains("[cuda] this Rhine was built without CUDA"));
}

TEST_CASE("causal_mask is bottom-right aligned", "[compat]") {
  auto m = rhine::causal_mask(2, 4, at::kCPU);
  auto expected = at::tensor({1, 1, 1, 0, 1, 1, 1, 1}).to(at::kBool).view({2, 4});
  CHECK(m.equal(expected));
}

TEST_CASE("AutocastGuard runs CPU matmuls in bf16 inside its scope only", "[compat][autocast]") {
  auto a = at::randn({8, 8}), b = at::randn({8, 8});
  CHECK_FALSE(rhine::autocast_enabled(at::kCPU));
  {
    rhine::AutocastGuard guard(at::kCPU, at::kBFloat16);
    CHECK(rhine::autocast_enabled(at::kCPU));
    CHECK(at::matmul(a, b).scalar_type() == at::kBFloat16);
    {
      rhine::AutocastGuard off(at::kCPU, at::kBFloat16, /*enabled=*/false);
      CHECK(at::matmul(a, b).scalar_type() == at::kFloat);
    }
    CHECK(at::matmul(a, b).scalar_type() == at::kBFloat16);
  }
  CHECK_FALSE(rhine::autocast_enabled(at::kCPU));
  CHECK(at::matmul(a, b).scalar_type() == at::kFloat);
  CHECK_THROWS_WITH(rhine::AutocastGuard(at::kCPU, at::kHalf), Contains("[autocast] unsupported autocast dtype"));
}

TEST_CASE("AutocastStep casts a weight once for all autocast regions inside it", "[compat][autocast]") {
  // The cache is invisible except through a stale copy: change the weight in
  // place between two regions and see whether the second region notices.
  const at::Tensor w0 = at::randn({16, 16}), x = at::randn({4, 16});
  auto run = [&](bool step) {
    at::Tensor w = w0.clone().requires_grad_(true);
    std::vector<at::Tensor> ys;
    {
      rhine::AutocastStep cast_once(step);
      for (int micro = 0; micro < 2; ++micro) {
        at::Tensor y;
        {
          rhine::AutocastGuard guard(at::kCPU, at::kBFloat16);
          y = at::linear(x, w);
        }
        y.to(at::kFloat).sum().backward();  // outside autocast, as the Trainer does
        ys.push_back(y.detach());
        at::NoGradGuard no_grad;
        if (micro == 0) w.add_(1.0);  // what no step may do: the copy is now stale
      }
    }
    rhine::AutocastGuard guard(at::kCPU, at::kBFloat16);
    ys.push_back(at::linear(x, w).detach());  // after the step: cast afresh
    return std::make_pair(ys, w.grad().clone());
  };
  const auto [cached, g_cached] = run(true);
  const auto [fresh, g_fresh] = run(false);
  CHECK(at::equal(cached[0], fresh[0]));
  CHECK(at::equal(cached[1], cached[0]));     // one cast served both micro-batches
  CHECK_FALSE(at::equal(fresh[1], fresh[0]));  // without it, each region casts again
  CHECK(at::equal(cached[2], fresh[2]));      // and the cache ends with the step
  // Both micro-batches' gradients reach the fp32 weight through the shared copy.
  CHECK(at::equal(g_cached, g_fresh));
  CHECK(g_cached.abs().sum().item<double>() > 0);
  CHECK_FALSE(rhine::autocast_enabled(at::kCPU));
}

TEST_CASE("autocast_weight hands out a current weight copy inside AutocastStep, with the cast's gradient", "[compat][autocast]") {
  at::Tensor w = at::randn({6, 4}).requires_grad_(true);
  const at::Tensor x = at::randn({3, 4});
  rhine::WeightCopies copies;
  {
    at::NoGradGuard g;
    copies.buffer(w, at::kBFloat16).copy_(w);
  }
  CHECK(copies.find(w, at::kBFloat16) == nullptr);  // not marked written yet
  copies.written(w);
  REQUIRE(copies.find(w, at::kBFloat16) != nullptr);
  auto grad_of = [&](bool with_copies) {
    w.mutable_grad() = at::Tensor();
    rhine::AutocastStep step(true, with_copies ? &copies : nullptr);
    rhine::AutocastGuard autocast(at::kCPU, at::kBFloat16);
    const at::Tensor used = rhine::autocast_weight(w);
    CHECK((used.unsafeGetTensorImpl() == w.unsafeGetTensorImpl()) == !with_copies);
    if (with_copies) {
      CHECK(used.scalar_type() == at::kBFloat16);
      CHECK(used.data_ptr() == copies.find(w, at::kBFloat16)->data_ptr());  // the copy itself, not a new cast
    }
    // A second use in the step (a tied head, say) gets the same alias, as
    // autocast's cache gives the same cast: both gradients meet in one node
    // and reach w through one cast to fp32, bitwise as with the cast.
    const at::Tensor again = rhine::autocast_weight(w);
    CHECK(again.unsafeGetTensorImpl() == used.unsafeGetTensorImpl());  // (w itself without copies)
    const at::Tensor y = at::linear(x, used);
    const at::Tensor y2 = at::linear(x * 0.37, again);
    (y.to(at::kFloat) * at::arange(18, at::kFloat).view({3, 6}) + y2.to(at::kFloat) * 1.3).sum().backward();
    return std::make_pair(y.detach(), w.grad().clone());
  };
  const auto [y_copy, g_copy] = grad_of(true);
  const auto [y_cast, g_cast] = grad_of(false);
  CHECK(at::equal(y_copy, y_cast));
  CHECK(g_copy.scalar_type() == at::kFloat);
  CHECK(at::equal(g_copy, g_cast));
  // Outside an AutocastStep with copies, or with autocast off: the weight itself.
  CHECK(rhine::autocast_weight(w).unsafeGetTensorImpl() == w.unsafeGetTensorImpl());
  {
    rhine::AutocastStep step(true, &copies);
    CHECK(rhine::autocast_weight(w).unsafeGetTensorImpl() == w.unsafeGetTensorImpl());  // autocast off
  }
  // A weight changed in place after its copy was written: the copy is stale.
  {
    at::NoGradGuard g;
    w.add_(1);
  }
  CHECK(copies.find(w, at::kBFloat16) == nullptr);
  rhine::AutocastStep step(true, &copies);
  rhine::AutocastGuard autocast(at::kCPU, at::kBFloat16);
  CHECK(rhine::autocast_weight(w).unsafeGetTensorImpl() == w.unsafeGetTensorImpl());
}

TEST_CASE("version macros agree with the runtime version string", "[compat]") {
  auto v = rhine::torch_version();
  CHECK(v.rfind(std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + ".", 0) == 0);
  CHECK(RHINE_TORCH_VERSION_AT_LEAST(1, 13));
  CHECK_FALSE(RHINE_TORCH_VERSION_AT_LEAST(99, 0));
  CHECK(rhine::has_fused_attention() == RHINE_TORCH_VERSION_AT_LEAST(2, 1));
}

TEST_CASE("on LibTorch 2.x the CPU attention Rhine calls reaches the fused flash kernel", "[compat][attention]") {
  // [B, H, T, D] queries over GQA keys: causal training, packed documents (a
  // bool mask), and a KV-cached step (T < S, bottom-right causal mask).
  auto q = at::randn({2, 8, 16, 32}), k = at::randn({2, 2, 16, 32}), v = at::randn({2, 2, 16, 32});
  rhine::AttentionOptions causal;
  causal.is_causal = true;
  rhine::AttentionOptions docs;
  docs.mask = rhine::causal_mask(16, 16, at::kCPU).logical_and(at::ones({16, 16}, at::kBool).triu(-7));
  auto q1 = at::randn({2, 8, 1, 32});
  for (const auto* o : {&causal, &docs}) {
    const auto backend = rhine::attention_backend(q, k, v, *o);
    if (!RHINE_TORCH_VERSION_AT_LEAST(2, 5)) {
      CHECK(backend == "reference");
      continue;
    }
    CHECK(backend == "flash");
    CHECK(rhine::attention_backend(q.to(at::kBFloat16), k.to(at::kBFloat16), v.to(at::kBFloat16), *o) == "flash");
    // and it still agrees with the plain-op twin
    CHECK(at::allclose(rhine::attention(q, k, v, *o), rhine::attention_reference(q, k, v, *o), 1e-5, 1e-5));
  }
  if (RHINE_TORCH_VERSION_AT_LEAST(2, 5)) CHECK(rhine::attention_backend(q1, k, v, causal) == "flash");
}
