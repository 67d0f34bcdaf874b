// CUDA kernels of prune_ext.
//
// * restrain_, restrain_many_, factored_svd, spectral_norm: the device-generic algorithms of
//   csrc/restrain.cpp (ATen calls: GEMMs through cuBLAS, QR / eigh / SVD through cuSOLVER), run under a
//   device guard for the input's device and on the current stream. The numerical logic is the one the CPU
//   tests exercise.
// * restrain_values: an elementwise kernel over the F of csrc/restrain_math.h (the code the CPU runs).
// * _fold_sketch: its own file (fold_sketch.cu); _jacobi_svd: jacobi_svd.cu.
// * _sketch, _summarize_rounds: the (Rademacher) sketch entries and the per-round summary of restrain_math.h (the code
//   the CPU runs), so that the algorithm never copies from the host; _small_svd: cusolverDnXgesvd with its
//   info flag left on the device (ATen's linalg_svd reads it back, a synchronisation).
// * restrain_gesvdr_: cuSOLVER's randomized SVD (cusolverDnXgesvdr) for the top triplets, then the
//   restraint-and-scale step as one fused kernel (F from restrain_math.h) and the rank-k correction as
//   one in-place GEMM. Selectable alternative to compare against; it has no certificate.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <math_constants.h>
#include <vector>

#include "../restrain.h"
#include "../restrain_math.h"
#include "cuda_checks.h"
#include "cusolver_handle.cuh"

namespace prune_ext {
namespace cuda {

using at::Tensor;

// Stats method code of the gesvdr path (extends Method in restrain.h; prune_ext/restraint.py maps it).
constexpr int64_t kMethodGesvdr = 4;

constexpr int kThreads = 256;

inline int blocks_for(int64_t n) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 1 << 16)));
}

// ---------------------------------------------------------------------------------------------------
// restrain_values: F elementwise, in the op-math type (float for half / bfloat16).

template <typename scalar_t>
__global__ void restrain_values_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, int64_t n,
                                       double threshold, int64_t fn, double param) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t t = static_cast<acc_t>(threshold), p = static_cast<acc_t>(param);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)
    out[i] = static_cast<scalar_t>(restrained_value<acc_t>(static_cast<acc_t>(in[i]), t, fn, p));
}

Tensor restrain_values_cuda(const Tensor& sigma, double threshold, int64_t fn, double param) {
  check_restraint_args(threshold, fn, param);
  TORCH_CHECK_TYPE(at::isFloatingType(sigma.scalar_type()), "prune_ext: sigma must be floating point");
  c10::cuda::CUDAGuard guard(sigma.device());
  Tensor in = sigma.contiguous();
  Tensor out = at::empty_like(in);
  const int64_t n = in.numel();
  if (n == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "restrain_values_cuda", [&] {
    restrain_values_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        in.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n, threshold, fn, param);
    PRUNE_EXT_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Internal building blocks (csrc/restrain.h).

template <typename scalar_t>
__global__ void sketch_kernel(scalar_t* __restrict__ out, int64_t n, uint64_t seed, int64_t offset) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)
    sketch_entries(seed, static_cast<uint64_t>(offset + i), 1, out + i);
}

Tensor sketch_cuda(const Tensor& like, int64_t rows, int64_t cols, int64_t seed, int64_t offset) {
  c10::cuda::CUDAGuard guard(like.device());
  Tensor out = at::empty({rows, cols}, like.options());
  const int64_t n = out.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "sketch_cuda", [&] {
    sketch_kernel<scalar_t><<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        out.mutable_data_ptr<scalar_t>(), n, static_cast<uint64_t>(seed), offset);
    PRUNE_EXT_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// One thread per matrix: summarize_round over l values (l is a few hundred at most). The thresholds travel
// by value in the kernel's arguments (a captured CUDA graph replays them as they were; a host buffer
// copied through the stream could have been reused by then), kMaxPerLaunch matrices a launch.
constexpr int64_t kMaxPerLaunch = 64;
struct Thresholds {
  double v[kMaxPerLaunch];
};

__global__ void summarize_rounds_kernel(const double* __restrict__ s, const double* __restrict__ resid_sq,
                                        const double* __restrict__ frob, Thresholds thresholds, int64_t L,
                                        int64_t l, double band_factor, int64_t fn, double param,
                                        int64_t power_iters, double* before, double* after, double* coeff,
                                        double* stats) {
  const int64_t i = threadIdx.x;
  if (i >= L) return;
  const double t = thresholds.v[i];
  summarize_round(s + i * l, l, resid_sq[i], frob[i], t, t * band_factor, fn, param, power_iters, before + i * l,
                  after + i * l, coeff + i * l, stats + i * kNumStats);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> summarize_rounds_cuda(const Tensor& s, const Tensor& resid_sq,
                                                                 const Tensor& frob, at::ArrayRef<double> thresholds,
                                                                 double band_factor, int64_t fn, double param,
                                                                 int64_t power_iters) {
  c10::cuda::CUDAGuard guard(s.device());
  const int64_t L = s.size(0), l = s.size(1);
  TORCH_CHECK(static_cast<int64_t>(thresholds.size()) == L, "prune_ext: one threshold per matrix");
  const Tensor sv = s.to(at::kDouble).contiguous();
  const Tensor rv = resid_sq.to(at::kDouble).contiguous(), fv = frob.to(at::kDouble).contiguous();
  auto opts = sv.options();
  Tensor before = at::empty({L, l}, opts), after = at::empty({L, l}, opts), coeff = at::empty({L, l}, opts);
  Tensor stats = at::empty({L, kNumStats}, opts);
  for (int64_t i0 = 0; i0 < L; i0 += kMaxPerLaunch) {
    const int64_t n = std::min(kMaxPerLaunch, L - i0);
    Thresholds th{};
    std::copy(thresholds.begin() + i0, thresholds.begin() + i0 + n, th.v);
    summarize_rounds_kernel<<<1, kMaxPerLaunch, 0, c10::cuda::getCurrentCUDAStream()>>>(
        sv.const_data_ptr<double>() + i0 * l, rv.const_data_ptr<double>() + i0, fv.const_data_ptr<double>() + i0,
        th, n, l, band_factor, fn, param, power_iters, before.mutable_data_ptr<double>() + i0 * l,
        after.mutable_data_ptr<double>() + i0 * l, coeff.mutable_data_ptr<double>() + i0 * l,
        stats.mutable_data_ptr<double>() + i0 * kNumStats);
    PRUNE_EXT_KERNEL_LAUNCH_CHECK();
  }
  return {before, after, coeff, stats};
}

// SVDs T = U diag(S) Vh of L float64 l × l matrices, one cusolverDnXgesvd each on the current stream.
// cuSOLVER's info flags stay on the device and are returned (a flag is also raised for non-finite
// values): the caller treats a failed decomposition as unusable without a host-side check.
std::tuple<Tensor, Tensor, Tensor, Tensor> small_svd_cuda(const Tensor& T) {
  c10::cuda::CUDAGuard guard(T.device());
  TORCH_CHECK(T.dim() == 3 && T.size(1) == T.size(2) && T.scalar_type() == at::kDouble,
              "prune_ext: _small_svd takes (L, l, l) float64 matrices");
  const int64_t L = T.size(0), l = T.size(1);
  // Row-major T read column-major is Tᵀ = U_c S V_cᵀ, so T = V_c S U_cᵀ: the buffer cuSOLVER fills with
  // V_cᵀ (column-major) is V_c = U read row-major, and the one it fills with U_c is U_cᵀ = Vh.
  Tensor A = T.contiguous().clone();  // destroyed by gesvd
  Tensor S = at::empty({L, l}, T.options());
  Tensor U = at::empty({L, l, l}, T.options()), Vh = at::empty({L, l, l}, T.options());
  Tensor info = at::zeros({L}, T.options().dtype(at::kInt));
  if (L == 0 || l == 0) return {U, S, Vh, info};
  SolverContext ctx = solver_context(T.device().index());
  size_t dev_bytes = 0, host_bytes = 0;
  PRUNE_EXT_CUSOLVER_CHECK(cusolverDnXgesvd_bufferSize(
      ctx.handle, ctx.params, 'A', 'A', l, l, CUDA_R_64F, A.data_ptr(), l, CUDA_R_64F, S.data_ptr(), CUDA_R_64F,
      Vh.data_ptr(), l, CUDA_R_64F, U.data_ptr(), l, CUDA_R_64F, &dev_bytes, &host_bytes));
  Tensor dwork = at::empty({static_cast<int64_t>(std::max<size_t>(dev_bytes, 1))}, T.options().dtype(at::kByte));
  std::vector<char> hwork(std::max<size_t>(host_bytes, 1));
  for (int64_t i = 0; i < L; ++i)
    PRUNE_EXT_CUSOLVER_CHECK(cusolverDnXgesvd(
        ctx.handle, ctx.params, 'A', 'A', l, l, CUDA_R_64F, A[i].data_ptr(), l, CUDA_R_64F, S[i].data_ptr(),
        CUDA_R_64F, Vh[i].data_ptr(), l, CUDA_R_64F, U[i].data_ptr(), l, CUDA_R_64F, dwork.data_ptr(), dev_bytes,
        host_bytes > 0 ? hwork.data() : nullptr, host_bytes, info.data_ptr<int>() + i));
  info.masked_fill_(at::logical_not(at::isfinite(S).all(1)), 1);
  return {U, S, Vh, info};
}

// ---------------------------------------------------------------------------------------------------
// The device-generic algorithms, under a device guard (they enqueue on the current stream of that device).

std::tuple<Tensor, Tensor, Tensor> restrain_cuda(Tensor& delta, double threshold, int64_t fn, double param,
                                                 int64_t rank, int64_t oversample, int64_t power_iters,
                                                 int64_t seed, int64_t rank_hint) {
  c10::cuda::CUDAGuard guard(delta.device());
  return restrain_(delta, threshold, fn, param, rank, oversample, power_iters, seed, rank_hint);
}

// (Return type as restrain.h declares it: this file follows the schema's outputs without restating them.)
auto restrain_many_cuda(at::TensorList deltas, at::ArrayRef<double> thresholds, int64_t fn, double param,
                        int64_t rank, int64_t oversample, int64_t power_iters, int64_t seed, int64_t rank_hint)
    -> decltype(restrain_many_(deltas, thresholds, fn, param, rank, oversample, power_iters, seed, rank_hint)) {
  TORCH_CHECK_VALUE(!deltas.empty(), "prune_ext: restrain_many_ got no matrices");
  c10::cuda::CUDAGuard guard(deltas[0].device());
  return restrain_many_(deltas, thresholds, fn, param, rank, oversample, power_iters, seed, rank_hint);
}

std::tuple<Tensor, Tensor, Tensor> factored_svd_cuda(const Tensor& left, const Tensor& right) {
  c10::cuda::CUDAGuard guard(left.device());
  return factored_svd(left, right);
}

Tensor spectral_norm_cuda(const Tensor& W, double rtol, int64_t max_iters, int64_t seed) {
  c10::cuda::CUDAGuard guard(W.device());
  return spectral_norm(W, rtol, max_iters, seed);
}

// ---------------------------------------------------------------------------------------------------
// cusolverDnXgesvdr path.

template <typename T>
struct CudaType;
template <>
struct CudaType<float> {
  static constexpr cudaDataType value = CUDA_R_32F;
};
template <>
struct CudaType<double> {
  static constexpr cudaDataType value = CUDA_R_64F;
};

// The fused restraint-and-scale step: out[i, j] = U[i, j] · (σ_j − F(σ_j)), 0 for σ_j at or below the
// threshold. F in float64, from restrain_math.h (the code the CPU path runs). U may be strided.
template <typename T>
__global__ void shrink_scale_kernel(const T* __restrict__ U, int64_t su0, int64_t su1, const T* __restrict__ S,
                                    T* __restrict__ out, int64_t rows, int64_t cols, double threshold, int64_t fn,
                                    double param) {
  const int64_t total = rows * cols;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t i = idx / cols, j = idx - i * cols;
    const double shrink = restraint_shrink<double>(static_cast<double>(S[j]), threshold, fn, param);
    out[idx] = static_cast<T>(static_cast<double>(U[i * su0 + j * su1]) * shrink);
  }
}

// One thread: before/after (float64, length r), the stats vector and gesvdr's info in stats[kNumStats].
template <typename T>
__global__ void summarize_kernel(const T* __restrict__ S, int64_t r, double threshold, int64_t fn, double param,
                                 int64_t niters, const int* __restrict__ info, double* __restrict__ before,
                                 double* __restrict__ after, double* __restrict__ stats) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  int64_t k = 0;
  for (int64_t j = 0; j < r; ++j) {
    const double s = static_cast<double>(S[j]);
    before[j] = s;
    after[j] = restrained_value<double>(s, threshold, fn, param);
    k += s > threshold ? 1 : 0;
  }
  stats[kStatRestrained] = static_cast<double>(k);
  stats[kStatRankExplored] = static_cast<double>(r);
  // An estimate of σ_{k+1} (a Ritz value, i.e. a lower bound): gesvdr certifies nothing.
  stats[kStatSigmaNextBound] = k < r ? static_cast<double>(S[k]) : CUDART_INF;
  stats[kStatCertified] = 0;
  stats[kStatMethod] = static_cast<double>(kMethodGesvdr);
  stats[kStatPowerIters] = static_cast<double>(niters);
  stats[kStatResidual] = CUDART_NAN;
  stats[kStatRitzResidual] = CUDART_NAN;
  stats[kStatPasses] = 0;  // not counted: gesvdr makes its own passes
  stats[kNumStats] = static_cast<double>(*info);
}

struct GesvdrResult {
  Tensor left;    // rows × r: left singular vectors of X (strided view)
  Tensor right;   // cols × r: right singular vectors of X (strided view)
  Tensor S;       // r singular values, descending
  Tensor before, after, stats;  // float64 on the device; stats has kNumStats + 1 entries (the last: info)
  int64_t k = 0;
  int info = 0;
};

// Top-r triplets of the column-major rows × cols matrix X held in `work`, a row-major torch tensor of shape
// {cols, rows} (that is, Xᵀ); `work` is destroyed.
template <typename T>
GesvdrResult gesvdr(Tensor& work, int64_t r, int64_t p, int64_t niters, double threshold, int64_t fn,
                    double param) {
  const int64_t rows = work.size(1), cols = work.size(0);
  const auto opts = work.options();
  const c10::DeviceIndex device = work.device().index();
  SolverContext ctx = solver_context(device);
  // Output buffers as large as NVIDIA's sample (and CUDA.jl) allocate them for jobu = jobv = 'S':
  // ldu × rows and ldv × cols. Column-major Y (ld × c) is the row-major torch tensor {c, ld}.
  Tensor S = at::empty({std::min(rows, cols)}, opts);
  Tensor Ub = at::empty({rows, rows}, opts);
  Tensor Vb = at::empty({cols, cols}, opts);
  Tensor info = at::zeros({1}, opts.dtype(at::kInt));
  constexpr cudaDataType dt = CudaType<T>::value;
  size_t dev_bytes = 0, host_bytes = 0;
  PRUNE_EXT_CUSOLVER_CHECK(cusolverDnXgesvdr_bufferSize(
      ctx.handle, ctx.params, 'S', 'S', rows, cols, r, p, niters, dt, work.data_ptr(), rows, dt, S.data_ptr(), dt,
      Ub.data_ptr(), rows, dt, Vb.data_ptr(), cols, dt, &dev_bytes, &host_bytes));
  Tensor dwork = at::empty({static_cast<int64_t>(std::max<size_t>(dev_bytes, 1))}, opts.dtype(at::kByte));
  std::vector<char> hwork(std::max<size_t>(host_bytes, 1));
  PRUNE_EXT_CUSOLVER_CHECK(cusolverDnXgesvdr(
      ctx.handle, ctx.params, 'S', 'S', rows, cols, r, p, niters, dt, work.data_ptr(), rows, dt, S.data_ptr(), dt,
      Ub.data_ptr(), rows, dt, Vb.data_ptr(), cols, dt, dwork.data_ptr(), dev_bytes, hwork.data(), host_bytes,
      info.data_ptr<int>()));

  GesvdrResult res;
  res.S = S.narrow(0, 0, r);
  res.left = Ub.narrow(0, 0, r).t();   // rows × r, strides (1, rows)
  res.right = Vb.narrow(0, 0, r).t();  // cols × r, strides (1, cols)
  auto dopts = opts.dtype(at::kDouble);
  res.before = at::empty({r}, dopts);
  res.after = at::empty({r}, dopts);
  res.stats = at::empty({kNumStats + 1}, dopts);
  summarize_kernel<T><<<1, 1, 0, c10::cuda::getCurrentCUDAStream(device)>>>(
      res.S.const_data_ptr<T>(), r, threshold, fn, param, niters, info.const_data_ptr<int>(),
      res.before.mutable_data_ptr<double>(), res.after.mutable_data_ptr<double>(),
      res.stats.mutable_data_ptr<double>());
  PRUNE_EXT_KERNEL_LAUNCH_CHECK();
  // The one device-to-host synchronisation of a round: k (the adaptive decision) and info.
  const Tensor host = res.stats.to(at::kCPU);
  res.k = static_cast<int64_t>(host.const_data_ptr<double>()[kStatRestrained]);
  res.info = static_cast<int>(host.const_data_ptr<double>()[kNumStats]);
  return res;
}

std::tuple<Tensor, Tensor, Tensor> restrain_gesvdr_cuda(Tensor& delta, double threshold, int64_t fn, double param,
                                                        int64_t rank, int64_t oversample, int64_t power_iters,
                                                        int64_t seed) {
  check_matrix(delta, "delta");
  check_restraint_args(threshold, fn, param);
  check_sketch_args(rank, oversample, power_iters);
  TORCH_CHECK_VALUE(delta.is_cuda(), "prune_ext: the gesvdr method (cuSOLVER) needs a CUDA tensor");
  c10::cuda::CUDAGuard guard(delta.device());
  const int64_t m = delta.size(0), n = delta.size(1), pmin = std::min(m, n);
  const bool fixed = rank > 0;
  // Too small for a randomized SVD with any oversampling: the certified generic path (dense here).
  if (delta.numel() == 0 || pmin < 2)
    return restrain_(delta, threshold, fn, param, rank, oversample, power_iters, seed);

  const at::ScalarType ct = delta.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const bool flip = m > n;
  const int64_t p_max = std::min(oversample, pmin - 1);
  int64_t r = fixed ? std::min(rank, pmin) : std::max<int64_t>(1, std::min<int64_t>(32, pmin - p_max));
  while (true) {
    const int64_t p = std::min(p_max, pmin - r);
    // gesvdr destroys its input: it gets a copy in the compute dtype, oriented so that the column-major
    // matrix it sees is tall: X = ΔW when m > n, else X = ΔWᵀ. The buffer holds Xᵀ row-major.
    Tensor work = at::empty({pmin, std::max(m, n)}, delta.options().dtype(ct));
    work.copy_(flip ? delta.t() : delta);
    GesvdrResult res;
    AT_DISPATCH_FLOATING_TYPES(ct, "restrain_gesvdr_cuda", [&] {
      res = gesvdr<scalar_t>(work, r, p, power_iters, threshold, fn, param);
    });
    const Tensor U_all = flip ? res.left : res.right;  // m × r: left singular vectors of ΔW
    const Tensor V_all = flip ? res.right : res.left;  // n × r: right singular vectors of ΔW
    if (res.info != 0) fail_solver_info("cusolverDnXgesvdr", res.info);
    if (!fixed && res.k == r) {  // every value found is above the threshold: more may be missing
      const int64_t grown = std::min(2 * r, pmin - p_max);
      if (grown > r) {
        r = grown;
        continue;
      }
      // As large as gesvdr goes: the certified generic path (it falls back to a dense SVD).
      return restrain_(delta, threshold, fn, param, 0, oversample, power_iters, seed);
    }
    const int64_t k = res.k;
    Tensor stats = res.stats.narrow(0, 0, kNumStats);
    if (k > 0) {
      Tensor left = at::empty({m, k}, delta.options().dtype(ct));
      Tensor right = V_all.narrow(1, 0, k);
      AT_DISPATCH_FLOATING_TYPES(ct, "restrain_gesvdr_scale", [&] {
        const Tensor U = U_all.narrow(1, 0, k);
        shrink_scale_kernel<scalar_t><<<blocks_for(m * k), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            U.const_data_ptr<scalar_t>(), U.stride(0), U.stride(1), res.S.const_data_ptr<scalar_t>(),
            left.mutable_data_ptr<scalar_t>(), m, k, threshold, fn, param);
        PRUNE_EXT_KERNEL_LAUNCH_CHECK();
      });
      // ΔW −= U_k diag(σ − F(σ)) V_kᵀ: one GEMM on ΔW's own storage when cuBLAS can read it.
      const bool blas_layout = (delta.stride(1) == 1 && delta.stride(0) >= std::max<int64_t>(1, n)) ||
                               (delta.stride(0) == 1 && delta.stride(1) >= std::max<int64_t>(1, m));
      if (delta.scalar_type() == ct && blas_layout) {
        delta.addmm_(left, right.t(), 1, -1);
      } else {
        Tensor A = delta.to(ct);
        A.addmm_(left, right.t(), 1, -1);
        delta.copy_(A);
      }
    }
    return {res.before.narrow(0, 0, k), res.after.narrow(0, 0, k), stats.clone()};
  }
}

}  // namespace cuda

TORCH_LIBRARY_IMPL(prune_ext, CUDA, m) {
  m.impl("restrain_", &cuda::restrain_cuda);
  m.impl("restrain_many_", &cuda::restrain_many_cuda);
  m.impl("restrain_values", &cuda::restrain_values_cuda);
  m.impl("factored_svd", &cuda::factored_svd_cuda);
  m.impl("spectral_norm", &cuda::spectral_norm_cuda);
  m.impl("restrain_gesvdr_", &cuda::restrain_gesvdr_cuda);
  m.impl("_sketch", &cuda::sketch_cuda);
  m.impl("_small_svd", &cuda::small_svd_cuda);
  m.impl("_summarize_rounds", &cuda::summarize_rounds_cuda);
}

}  // namespace prune_ext
