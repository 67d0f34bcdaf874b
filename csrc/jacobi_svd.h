// One-sided Jacobi SVD (Hestenes) of small square float64 matrices, the parts shared by the CPU kernel
// (csrc/cpu) and the CUDA kernel (csrc/cuda/jacobi_svd.cu): the pairing of columns in a sweep, the
// rotation, the convergence test and the final ordering. The fixed-rank restraint uses it on CUDA
// instead of cuSOLVER's gesvd, which takes a host workspace and synchronises (so a CUDA graph cannot
// capture it): a Jacobi SVD is a fixed-shape loop of rotations, whose sweep count has a bound known
// before it runs, and which reports non-convergence in a device flag instead of raising.
//
// The matrix M (l × l) is held as its columns w_0 … w_{l−1}, each contiguous. A sweep rotates every pair
// (p, q) so that w_p ⊥ w_q; the rotations accumulate in V (orthogonal to rounding whatever M is), so at
// convergence M V = W with orthogonal columns: σ_j = ‖w_j‖ and V's columns the right singular vectors.
// Rounding: the values to a few ε σ_j relative (Demmel & Veselić 1992), far better than the ε σ1 the
// restraint needs. Rank deficiency is harmless (a zero column has no rotation).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace prune_ext {

// The sweep count the fixed-rank restraint allows (quadratic convergence: 6–10 sweeps for l ≤ 256 in
// float64, measured on the tests' spectra), and the relative off-diagonal size at which a pair counts
// as orthogonal (l ε, as LAPACK's dgesvj uses √l ε … l ε).
constexpr int64_t kJacobiSweeps = 30;
// The largest l the kernels take (the CUDA kernel keeps a block per matrix; l × l in global memory).
constexpr int64_t kJacobiMaxSize = 1024;

C10_HOST_DEVICE inline double jacobi_tolerance(int64_t l) { return static_cast<double>(l) * 2.220446049250313e-16; }

// The players of a round-robin tournament over `even` (= l rounded up to even) columns: in round r
// (0 ≤ r < even − 1) pair i is (r, even − 1) for i = 0 and ((r + i) mod (even − 1), (r − i) mod (even − 1))
// otherwise; every pair meets once per sweep and the pairs of a round are disjoint (rotated in
// parallel on a GPU). A column index ≥ l (the odd case's padding) means "no pair".
C10_HOST_DEVICE inline void jacobi_pair(int64_t round, int64_t i, int64_t even, int64_t* p, int64_t* q) {
  const int64_t n1 = even - 1;
  if (i == 0) {
    *p = round;
    *q = n1;
  } else {
    *p = (round + i) % n1;
    *q = (round - i + n1) % n1;
  }
}

// The rotation that makes columns p and q orthogonal, from alpha = ‖w_p‖², beta = ‖w_q‖², gamma = w_pᵀw_q:
// w_p ← c w_p − s w_q, w_q ← s w_p + c w_q (Rutishauser's formulas, the smaller angle). A pair counts as
// orthogonal when |gamma| ≤ tol ‖M‖_F max(‖w_p‖, ‖w_q‖), an absolute test at M's scale rather than the
// relative |gamma| ≤ tol ‖w_p‖ ‖w_q‖: a column far below ‖M‖ carries rounding of about ε ‖M‖ from earlier
// rotations, so the relative test can go on rotating noise for ever (measured: no convergence within 30
// sweeps for l ≥ 130 and a spectrum spanning 1e-8), while this one leaves errors of about tol ‖M‖ in the
// values and tol ‖M‖ / gap in the vectors, the accuracy of any backward-stable SVD (LAPACK's gesdd). The
// restraint needs values to ε σ1 and the vectors of values above a threshold. Returns |gamma| over that
// bound (≤ tol: orthogonal, and then no rotation: c = 1, s = 0).
C10_HOST_DEVICE inline double jacobi_rotation(double alpha, double beta, double gamma, double tol, double norm,
                                              double* c, double* s) {
  *c = 1;
  *s = 0;
  const double bound = norm * ::sqrt(alpha > beta ? alpha : beta);
  if (!(alpha > 0) || !(beta > 0) || !(bound > 0)) return 0;  // a zero column (NaN: the caller reports it)
  const double off = ::fabs(gamma) / bound;
  if (!(off > tol)) return off;
  const double zeta = (beta - alpha) / (2 * gamma);
  const double t = (zeta >= 0 ? 1.0 : -1.0) / (::fabs(zeta) + ::sqrt(1 + zeta * zeta));
  *c = 1 / ::sqrt(1 + t * t);
  *s = *c * t;
  return off;
}

// Entry r of the sums a rotation needs: alpha += w_p[r]², beta += w_q[r]², gamma += w_p[r] w_q[r] (each
// kernel strides r over its threads and reduces the partial sums its own way).
C10_HOST_DEVICE inline void jacobi_accumulate(const double* wp, const double* wq, int64_t r, double* alpha,
                                              double* beta, double* gamma) {
  *alpha += wp[r] * wp[r];
  *beta += wq[r] * wq[r];
  *gamma += wp[r] * wq[r];
}

// Entry r of the rotation by (c, s) of columns p, q of W and of the accumulated V (stored as rows of Vᵀ).
C10_HOST_DEVICE inline void jacobi_rotate(double* wp, double* wq, double* vp, double* vq, int64_t r, double c,
                                          double s) {
  const double a = wp[r], b = wq[r];
  wp[r] = c * a - s * b;
  wq[r] = s * a + c * b;
  const double x = vp[r], y = vq[r];
  vp[r] = c * x - s * y;
  vq[r] = s * x + c * y;
}

// Position of value j in descending order of sig[0..l) (ties by index): the permutation that sorts,
// computed per entry (one thread per entry on a GPU).
C10_HOST_DEVICE inline int64_t descending_rank(const double* sig, int64_t l, int64_t j) {
  int64_t r = 0;
  for (int64_t k = 0; k < l; ++k) r += (sig[k] > sig[j] || (sig[k] == sig[j] && k < j)) ? 1 : 0;
  return r;
}

}  // namespace prune_ext
