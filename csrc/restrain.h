// Device-generic implementations (ATen calls only), registered for CPU in csrc/cpu/ and for CUDA in
// csrc/cuda/. Everything large is a GEMM or a QR; every decision is taken on a few host scalars, read
// in one transfer per call for all its matrices (one more per extra round of a matrix that needs it);
// the fixed-rank mode reads nothing back.
#pragma once

#include <ATen/ATen.h>

#include "restrain_math.h"

#include <tuple>
#include <vector>

namespace prune_ext {

// The float64 stats vector returned by restrain_ (one row per matrix for restrain_many_) is laid out as
// Stat in restrain_math.h says.

// rank_hint > 0: the caller's bound on the rank of ΔW, which sizes the first subspace (rank_hint +
// oversample columns) instead of the blind first sketch; it is checked like any subspace, never trusted.
std::tuple<at::Tensor, at::Tensor, at::Tensor> restrain_(
    at::Tensor& delta, double threshold, int64_t fn, double param, int64_t rank, int64_t oversample,
    int64_t power_iters, int64_t seed, int64_t rank_hint = 0);

std::tuple<at::Tensor, at::Tensor, at::Tensor> restrain_many_(
    at::TensorList deltas, at::ArrayRef<double> thresholds, int64_t fn, double param, int64_t rank,
    int64_t oversample, int64_t power_iters, int64_t seed, int64_t rank_hint = 0);

std::tuple<at::Tensor, at::Tensor, at::Tensor> factored_svd(const at::Tensor& left, const at::Tensor& right);

at::Tensor spectral_norm(const at::Tensor& W, double rtol, int64_t max_iters, int64_t seed);

// Failures of the CUDA kernels' checks, formatted in a host C++ file (csrc/cuda_checks.cpp; see
// csrc/cuda/cuda_checks.h for why): a library call's status, a size past a limit, a solver's info flag.
[[noreturn]] void fail_library_call(const char* library, const char* call, int64_t status, const char* status_name,
                                    const char* file, int line);
[[noreturn]] void fail_too_large(const char* what, int64_t n, int64_t max);
[[noreturn]] void fail_solver_info(const char* what, int64_t info);

// Argument checks shared by every backend (raise ValueError / TypeError in Python).
void check_restraint_args(double threshold, int64_t fn, double param);
void check_matrix(const at::Tensor& t, const char* name);
void check_sketch_args(int64_t rank, int64_t oversample, int64_t power_iters, int64_t rank_hint = 0);

// Internal operators with a kernel per backend (csrc/cpu, csrc/cuda), called by the algorithms above
// through the dispatcher. Shapes: s (L, l), resid_sq and frob (L), T (L, l, l), all float64.
//   _sketch(like, rows, cols, seed, offset): rows × cols of the sketch entries offset + i·cols + j
//       (sketch_entries in restrain_math.h), in like's dtype and device.
//   _small_svd(T): U, S (descending), Vh with T = U diag(S) Vh, and the solver's info flag (0: success)
//       of each matrix; never reads anything back to the host on CUDA (the flag stays there).
//   _summarize_rounds(s, resid_sq, frob, thresholds, band_factor, fn, param, power_iters):
//       summarize_round (restrain_math.h) per matrix → before, after, coeff (L, l) and stats (L, kNumStats).
at::Tensor sketch(const at::Tensor& like, int64_t rows, int64_t cols, int64_t seed, int64_t offset);
// _fold_sketch(A, cols, seed, offset): A S for the fold sketch S (n × cols) of fold_rotation in
// restrain_math.h, its signs the sketch entries offset, …, offset + n − 1 (device-generic: ATen calls).
at::Tensor fold_sketch(const at::Tensor& A, int64_t cols, int64_t seed, int64_t offset);
// The rotations o_f of that fold's ⌈n / cols⌉ blocks (host values: they choose which columns an ATen call
// or a loop adds where), shared by every kernel of _fold_sketch.
std::vector<int64_t> fold_rotations(int64_t n, int64_t cols, int64_t seed, int64_t offset);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> small_svd(const at::Tensor& T);
// _jacobi_svd(T, sweeps): the one-sided Jacobi SVD of csrc/jacobi_svd.h for (L, l, l) float64 T: S (L, l)
// descending, V (L, l, l) orthogonal with T V = U diag(S) (right singular vectors), and info (L, int32):
// 0 converged, 1 not within `sweeps` sweeps, 2 non-finite input (then S and V are NaN). Never raises
// for a matrix's values and never reads back to the host (CUDA graphs).
std::tuple<at::Tensor, at::Tensor, at::Tensor> jacobi_svd(const at::Tensor& T, int64_t sweeps);
// _cholesky_qr(Y): an orthonormal basis Q (L, m, w) of each (m × w, m ≥ w) Y by shifted CholeskyQR3 in float64
// (csrc/cholesky_qr.cpp), and each one's orthogonality defect max|QᵀQ − I| (float64; NaN when a
// Cholesky factorisation failed). Above kCholeskyQrDefect the caller must fall back to Householder QR.
constexpr double kCholeskyQrDefect = 1e-9;
std::tuple<at::Tensor, at::Tensor> cholesky_qr(const at::Tensor& Y);
// Its argument checks, shared by the kernels (compiled here, in a host C++ file: see cuda_checks.h).
void check_jacobi_args(const at::Tensor& T, int64_t sweeps);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> summarize_rounds(
    const at::Tensor& s, const at::Tensor& resid_sq, const at::Tensor& frob, at::ArrayRef<double> thresholds,
    double band_factor, int64_t fn, double param, int64_t power_iters);

}  // namespace prune_ext
