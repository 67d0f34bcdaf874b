// CPU kernels: the device-generic algorithms (LAPACK/BLAS through ATen), the elementwise F, and the
// internal building blocks over the shared math of restrain_math.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../restrain.h"
#include "../restrain_math.h"

namespace prune_ext {
namespace {

at::Tensor restrain_values_cpu(const at::Tensor& sigma, double threshold, int64_t fn, double param) {
  check_restraint_args(threshold, fn, param);
  TORCH_CHECK_TYPE(at::isFloatingType(sigma.scalar_type()), "prune_ext: sigma must be floating point");
  at::Tensor in = sigma.contiguous();
  at::Tensor out = at::empty_like(in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "restrain_values_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = in.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const acc_t t = static_cast<acc_t>(threshold), p = static_cast<acc_t>(param);
    for (int64_t i = 0; i < in.numel(); ++i)
      dst[i] = static_cast<scalar_t>(restrained_value<acc_t>(static_cast<acc_t>(src[i]), t, fn, p));
  });
  return out;
}

at::Tensor sketch_cpu(const at::Tensor& like, int64_t rows, int64_t cols, int64_t seed, int64_t offset) {
  at::Tensor out = at::empty({rows, cols}, like.options().device(at::kCPU));
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "sketch_cpu", [&] {
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows * cols, 1 << 14, [&](int64_t begin, int64_t end) {
      sketch_entries(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset + begin), end - begin, dst + begin);
    });
  });
  return out;
}

// The fold sketch (restrain.h) for a row-major A in one read of it: each row of A adds into its row of
// Y, block by block, in contiguous pieces the compiler vectorises. At 4096 × 11008 it takes 31 ms for 64
// columns where the ATen composition of restrain.cpp (which other layouts and CUDA use) takes 50 ms, one
// ATen call per piece being what costs there; from ~160 columns on the two are level (~25 ms).
at::Tensor fold_sketch_cpu(const at::Tensor& A, int64_t cols, int64_t seed, int64_t offset) {
  if (A.dim() != 2 || A.stride(1) != 1 || A.size(0) == 0 || A.size(1) == 0 || cols <= 0)
    return fold_sketch(A, cols, seed, offset);
  const int64_t m = A.size(0), n = A.size(1), lda = A.stride(0);
  at::Tensor Y = at::zeros({m, cols}, A.options());
  const std::vector<int64_t> rotation = fold_rotations(n, cols, seed, offset);
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "fold_sketch_cpu", [&] {
    std::vector<scalar_t> signs(n);
    sketch_entries(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), n, signs.data());
    const scalar_t* a = A.data_ptr<scalar_t>();
    scalar_t* y = Y.data_ptr<scalar_t>();
    at::parallel_for(0, m, std::max<int64_t>(1, (1 << 16) / n), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* __restrict__ ar = a + r * lda;
        const scalar_t* __restrict__ sg = signs.data();
        scalar_t* __restrict__ yr = y + r * cols;
        for (int64_t f0 = 0, f = 0; f0 < n; f0 += cols, ++f) {
          const int64_t w = std::min(cols, n - f0), o = rotation[f], w1 = std::min(w, cols - o);
          for (int64_t q = 0; q < w1; ++q) yr[o + q] += sg[f0 + q] * ar[f0 + q];
          for (int64_t q = w1; q < w; ++q) yr[q - w1] += sg[f0 + q] * ar[f0 + q];
        }
      }
    });
  });
  return Y;
}

// LAPACK's SVD raises on a failure with finite input. A matrix with NaN or Inf gets NaN results and a
// nonzero info (as cuSOLVER would report it on CUDA, where raising would cost a synchronisation); the
// other matrices of the batch are decomposed as usual.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> small_svd_cpu(const at::Tensor& T) {
  const at::Tensor finite = at::isfinite(T).flatten(1).all(1);
  const at::Tensor info = at::logical_not(finite).to(at::kInt);
  if (finite.all().item<bool>()) {
    auto [U, S, Vh] = at::linalg_svd(T);
    return {U, S, Vh, info};
  }
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const at::Tensor ok = finite.view({-1, 1, 1});
  auto [U, S, Vh] = at::linalg_svd(at::where(ok, T, 0.0));
  return {at::where(ok, U, nan), at::where(finite.view({-1, 1}), S, nan), at::where(ok, Vh, nan), info};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> summarize_rounds_cpu(
    const at::Tensor& s, const at::Tensor& resid_sq, const at::Tensor& frob, at::ArrayRef<double> thresholds,
    double band_factor, int64_t fn, double param, int64_t power_iters) {
  const int64_t L = s.size(0), l = s.size(1);
  TORCH_CHECK(static_cast<int64_t>(thresholds.size()) == L, "prune_ext: one threshold per matrix");
  const at::Tensor sv = s.to(at::kDouble).contiguous();
  const at::Tensor rv = resid_sq.to(at::kDouble).contiguous(), fv = frob.to(at::kDouble).contiguous();
  auto opts = sv.options();
  at::Tensor before = at::empty({L, l}, opts), after = at::empty({L, l}, opts), coeff = at::empty({L, l}, opts);
  at::Tensor stats = at::empty({L, kNumStats}, opts);
  for (int64_t i = 0; i < L; ++i)
    summarize_round(sv.data_ptr<double>() + i * l, l, rv.data_ptr<double>()[i], fv.data_ptr<double>()[i],
                    thresholds[i], thresholds[i] * band_factor, fn, param, power_iters,
                    before.data_ptr<double>() + i * l, after.data_ptr<double>() + i * l,
                    coeff.data_ptr<double>() + i * l, stats.data_ptr<double>() + i * kNumStats);
  return {before, after, coeff, stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(prune_ext, CPU, m) {
  m.impl("restrain_", &restrain_);
  m.impl("restrain_many_", &restrain_many_);
  m.impl("restrain_values", &restrain_values_cpu);
  m.impl("factored_svd", &factored_svd);
  m.impl("spectral_norm", &spectral_norm);
  m.impl("_sketch", &sketch_cpu);
  m.impl("_fold_sketch", &fold_sketch_cpu);
  m.impl("_small_svd", &small_svd_cpu);
  m.impl("_summarize_rounds", &summarize_rounds_cpu);
}

}  // namespace prune_ext
