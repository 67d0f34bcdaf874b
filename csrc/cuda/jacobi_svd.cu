// CUDA kernel of _jacobi_svd: the one-sided Jacobi SVD of csrc/jacobi_svd.h, one thread block per matrix.
// A sweep is even − 1 rounds of disjoint column pairs (jacobi_pair); each warp rotates pairs of the round
// (dot products reduced across the warp, then every lane applies the same rotation to its rows), and the
// block synchronises between rounds. The sweep loop stops at convergence or after `sweeps` sweeps, all
// on the device: nothing is read back, no host workspace, so a CUDA graph can capture and replay it.
// Argument checks run in check_jacobi_args (csrc/restrain.cpp, a host C++ file; see cuda_checks.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../jacobi_svd.h"
#include "../restrain.h"
#include "cuda_checks.h"

namespace prune_ext {
namespace cuda {
namespace {

constexpr int kJacobiThreads = 256;
constexpr int kWarp = 32;

__device__ inline double warp_sum(double v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// W, Vt: (L, l, l), row j of a matrix = column j of M (resp. V); Vt starts as the identity.
// sig: (L, l) scratch for the column norms; S (L, l), V (L, l, l), info (L) are the outputs.
__global__ void jacobi_svd_kernel(double* __restrict__ W_all, double* __restrict__ Vt_all,
                                  double* __restrict__ sig_all, double* __restrict__ S_all,
                                  double* __restrict__ V_all, int* __restrict__ info_all, int64_t l,
                                  int64_t sweeps) {
  const int64_t b = blockIdx.x;
  double* W = W_all + b * l * l;
  double* Vt = Vt_all + b * l * l;
  double* sig = sig_all + b * l;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  __shared__ double warp_off[kJacobiThreads / kWarp];
  __shared__ int state;  // 0 running, then the info flag
  __shared__ double norm;  // ‖M‖_F

  // Non-finite input: flag 2, NaN outputs (as the CPU kernel).
  if (threadIdx.x == 0) state = 0;
  __syncthreads();
  double sq = 0;
  for (int64_t i = threadIdx.x; i < l * l; i += blockDim.x) {
    if (!isfinite(W[i])) state = 2;  // benign race: every writer writes 2
    sq += W[i] * W[i];
  }
  sq = warp_sum(sq);
  if (lane == 0) warp_off[warp] = sq;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0;
    for (int w = 0; w < warps; ++w) total += warp_off[w];
    norm = sqrt(total);
  }
  __syncthreads();

  const double tol = jacobi_tolerance(l);
  const int64_t even = l + (l & 1);
  for (int64_t sweep = 0; state == 0 && sweep < sweeps; ++sweep) {
    double off = 0;
    for (int64_t round = 0; round < even - 1; ++round) {
      for (int64_t i = warp; i < even / 2; i += warps) {
        int64_t p, q;
        jacobi_pair(round, i, even, &p, &q);
        if (p >= l || q >= l) continue;  // warp-uniform
        double* wp = W + p * l;
        double* wq = W + q * l;
        double alpha = 0, beta = 0, gamma = 0;
        for (int64_t r = lane; r < l; r += kWarp) jacobi_accumulate(wp, wq, r, &alpha, &beta, &gamma);
        alpha = warp_sum(alpha);
        beta = warp_sum(beta);
        gamma = warp_sum(gamma);
        double c, s;
        off = fmax(off, jacobi_rotation(alpha, beta, gamma, tol, norm, &c, &s));
        if (s == 0) continue;  // warp-uniform: every lane holds the same sums
        double* vp = Vt + p * l;
        double* vq = Vt + q * l;
        for (int64_t r = lane; r < l; r += kWarp) jacobi_rotate(wp, wq, vp, vq, r, c, s);
      }
      __syncthreads();  // the next round's pairs read columns this one wrote
    }
    if (lane == 0) warp_off[warp] = off;
    __syncthreads();
    if (threadIdx.x == 0) {
      double m = 0;
      for (int w = 0; w < warps; ++w) m = fmax(m, warp_off[w]);
      if (!(m > tol)) state = -1;  // converged
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) info_all[b] = state == -1 ? 0 : state == 2 ? 2 : 1;
  const bool bad = state == 2;
  __syncthreads();

  // σ_j = ‖w_j‖, then each value and its vector go to their place in descending order.
  for (int64_t j = warp; j < l; j += warps) {
    double acc = 0;
    for (int64_t r = lane; r < l; r += kWarp) acc += W[j * l + r] * W[j * l + r];
    acc = warp_sum(acc);
    if (lane == 0) sig[j] = bad ? 0.0 : sqrt(acc);
  }
  __syncthreads();
  for (int64_t j = threadIdx.x; j < l; j += blockDim.x)
    S_all[b * l + descending_rank(sig, l, j)] = bad ? NAN : sig[j];
  for (int64_t j = warp; j < l; j += warps) {
    const int64_t pos = descending_rank(sig, l, j);
    for (int64_t r = lane; r < l; r += kWarp) V_all[b * l * l + r * l + pos] = bad ? NAN : Vt[j * l + r];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jacobi_svd_cuda(const at::Tensor& T, int64_t sweeps) {
  check_jacobi_args(T, sweeps);
  c10::cuda::CUDAGuard guard(T.device());
  const int64_t L = T.size(0), l = T.size(1);
  at::Tensor W = T.transpose(1, 2).clone(at::MemoryFormat::Contiguous);  // a copy: rotated in place
  at::Tensor Vt = at::eye(l, T.options()).expand({L, l, l}).contiguous();
  at::Tensor sig = at::empty({L, l}, T.options());
  at::Tensor S = at::empty({L, l}, T.options());
  at::Tensor V = at::empty({L, l, l}, T.options());
  at::Tensor info = at::zeros({L}, T.options().dtype(at::kInt));
  if (L == 0 || l == 0) return {S, V, info};
  check_launch_size("jacobi_svd", L, 2147483647);
  jacobi_svd_kernel<<<static_cast<unsigned>(L), kJacobiThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      W.data_ptr<double>(), Vt.data_ptr<double>(), sig.data_ptr<double>(), S.data_ptr<double>(),
      V.data_ptr<double>(), info.data_ptr<int>(), l, sweeps);
  PRUNE_EXT_KERNEL_LAUNCH_CHECK();
  return {S, V, info};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(prune_ext, CUDA, m) { m.impl("_jacobi_svd", &cuda::jacobi_svd_cuda); }

}  // namespace prune_ext
