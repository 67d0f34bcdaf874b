// CPU kernel of _jacobi_svd: the one-sided Jacobi SVD of csrc/jacobi_svd.h, sweep by sweep and pair by
// pair in the order the CUDA kernel rotates them (rounds of disjoint pairs), so the CPU tests check the
// algorithm the GPU runs (only the summation order of the dot products differs).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../jacobi_svd.h"
#include "../restrain.h"

namespace prune_ext {
namespace {

// One matrix: W (l × l, row j = column j of M) and Vt (row j = column j of V, starts as I) in place.
// Returns the info flag (0 converged, 1 not within `sweeps`, 2 non-finite input).
int jacobi_one(double* W, double* Vt, int64_t l, int64_t sweeps) {
  for (int64_t i = 0; i < l * l; ++i)
    if (!std::isfinite(W[i])) return 2;
  const double tol = jacobi_tolerance(l);
  double norm = 0;  // ‖M‖_F
  for (int64_t i = 0; i < l * l; ++i) norm += W[i] * W[i];
  norm = std::sqrt(norm);
  const int64_t even = l + (l & 1);
  for (int64_t sweep = 0; sweep < sweeps; ++sweep) {
    double off = 0;
    for (int64_t round = 0; round < even - 1; ++round) {
      for (int64_t i = 0; i < even / 2; ++i) {
        int64_t p, q;
        jacobi_pair(round, i, even, &p, &q);
        if (p >= l || q >= l) continue;
        double* wp = W + p * l;
        double* wq = W + q * l;
        double alpha = 0, beta = 0, gamma = 0;
        for (int64_t r = 0; r < l; ++r) jacobi_accumulate(wp, wq, r, &alpha, &beta, &gamma);
        double c, s;
        off = std::max(off, jacobi_rotation(alpha, beta, gamma, tol, norm, &c, &s));
        if (s == 0) continue;
        double* vp = Vt + p * l;
        double* vq = Vt + q * l;
        for (int64_t r = 0; r < l; ++r) jacobi_rotate(wp, wq, vp, vq, r, c, s);
      }
    }
    if (!(off > tol)) return 0;
  }
  return 1;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jacobi_svd_cpu(const at::Tensor& T, int64_t sweeps) {
  check_jacobi_args(T, sweeps);
  const int64_t L = T.size(0), l = T.size(1);
  // Columns of each matrix as contiguous rows (the layout the rotations stream through).
  at::Tensor W = T.transpose(1, 2).clone(at::MemoryFormat::Contiguous);  // a copy: rotated in place
  at::Tensor Vt = at::eye(l, T.options()).expand({L, l, l}).contiguous();
  at::Tensor S = at::empty({L, l}, T.options());
  at::Tensor V = at::empty({L, l, l}, T.options());
  at::Tensor info = at::zeros({L}, T.options().dtype(at::kInt));
  double* w = W.data_ptr<double>();
  double* vt = Vt.data_ptr<double>();
  double* s = S.data_ptr<double>();
  double* v = V.data_ptr<double>();
  int* flag = info.data_ptr<int>();
  at::parallel_for(0, L, 1, [&](int64_t b0, int64_t b1) {
    std::vector<double> sig(l);
    for (int64_t b = b0; b < b1; ++b) {
      double* Wb = w + b * l * l;
      double* Vb = vt + b * l * l;
      flag[b] = jacobi_one(Wb, Vb, l, sweeps);
      for (int64_t j = 0; j < l; ++j) {
        double acc = 0;
        for (int64_t r = 0; r < l; ++r) acc += Wb[j * l + r] * Wb[j * l + r];
        sig[j] = flag[b] == 2 ? 0.0 : std::sqrt(acc);  // (NaN would break the ranking)
      }
      for (int64_t j = 0; j < l; ++j) {
        const int64_t pos = descending_rank(sig.data(), l, j);
        s[b * l + pos] = flag[b] == 2 ? NAN : sig[j];
        for (int64_t r = 0; r < l; ++r) v[b * l * l + r * l + pos] = flag[b] == 2 ? NAN : Vb[j * l + r];
      }
    }
  });
  return {S, V, info};
}

}  // namespace

TORCH_LIBRARY_IMPL(prune_ext, CPU, m) { m.impl("_jacobi_svd", &jacobi_svd_cpu); }

}  // namespace prune_ext
