// Device-generic implementations (ATen calls only), registered for CPU in csrc/cpu/ and for CUDA in
// csrc/cuda/. Everything large is a GEMM or a QR; every decision is taken on a few host scalars, read
// in one transfer per round (a low-rank input certified at once costs one device-to-host read).
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace prune_ext {

// Layout of the float64 stats vector returned by restrain_ (one row per matrix for restrain_many_).
enum Stat : int64_t {
  kStatRestrained = 0,     // k: number of singular values above the threshold (changed)
  kStatRankExplored = 1,   // l: size of the subspace the values were searched in (min(m, n) for dense)
  kStatSigmaNextBound = 2, // certified upper bound on σ_{k+1}(ΔW), the largest value left unchanged
  kStatCertified = 3,      // 1 if sigma_next_bound <= threshold (up to rounding), else 0
  kStatMethod = 4,         // Method below
  kStatPowerIters = 5,     // power (subspace) iterations spent
  kStatResidual = 6,       // ‖(I − QQᵀ)ΔW‖_F, the part of ΔW outside the explored subspace
  kStatRitzResidual = 7,   // max ‖ΔW v_i − σ_i u_i‖ over the changed triplets, or its bound ‖(I − QQᵀ)ΔW‖_F
                           // when that already meets the accuracy target (accuracy of the correction)
  kNumStats = 8,
};

enum Method : int64_t { kMethodNone = 0, kMethodRandomized = 1, kMethodDense = 2, kMethodNormBound = 3 };

std::tuple<at::Tensor, at::Tensor, at::Tensor> restrain_(
    at::Tensor& delta, double threshold, int64_t fn, double param, int64_t rank, int64_t oversample,
    int64_t power_iters, int64_t seed);

std::tuple<at::Tensor, at::Tensor, at::Tensor> restrain_many_(
    at::TensorList deltas, at::ArrayRef<double> thresholds, int64_t fn, double param, int64_t rank,
    int64_t oversample, int64_t power_iters, int64_t seed);

std::tuple<at::Tensor, at::Tensor, at::Tensor> factored_svd(const at::Tensor& left, const at::Tensor& right);

at::Tensor spectral_norm(const at::Tensor& W, double rtol, int64_t max_iters, int64_t seed);

// Argument checks shared by every backend (raise ValueError / TypeError in Python).
void check_restraint_args(double threshold, int64_t fn, double param);
void check_matrix(const at::Tensor& t, const char* name);
void check_sketch_args(int64_t rank, int64_t oversample, int64_t power_iters);

}  // namespace prune_ext
