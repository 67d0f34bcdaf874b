// The restraint functions F of PRUNE (paper Eq. 5 and appendix C.3), shared by the CPU and
// CUDA kernels so that the CPU tests exercise exactly the math the GPU runs.
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>
#include <cstdint>

namespace prune_ext {

enum RestraintFn : int64_t { kLogFn = 0, kLinearFn = 1 };

// Stats layout and method codes, shared by the host logic (restrain.h) and the device summary below.
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
  kStatPasses = 8,         // passes over ΔW (‖ΔW‖_F, each product with ΔW, residuals, the correction;
                           // a dense SVD counts as one); written by the host after the summary (0 here)
  kNumStats = 9,
};

enum Method : int64_t { kMethodNone = 0, kMethodRandomized = 1, kMethodDense = 2, kMethodNormBound = 3 };

C10_HOST_DEVICE inline float log_(float x) { return ::logf(x); }
C10_HOST_DEVICE inline double log_(double x) { return ::log(x); }

// F(σ) for a singular value σ of ΔW, with threshold t = σmax(W) and parameter α (log) or β (linear).
// Values at or below the threshold are returned unchanged.
template <typename T>
C10_HOST_DEVICE inline T restrained_value(T sigma, T threshold, int64_t fn, T param) {
  if (!(sigma > threshold)) return sigma;
  if (fn == kLinearFn) return sigma / param + (param - T(1)) / param * threshold;
  // log_α(σ) − log_α(t) + t
  return (log_(sigma) - log_(threshold)) / log_(param) + threshold;
}

// σ − F(σ): the amount a restrained singular value shrinks by (0 at or below the threshold).
template <typename T>
C10_HOST_DEVICE inline T restraint_shrink(T sigma, T threshold, int64_t fn, T param) {
  return sigma - restrained_value(sigma, threshold, fn, param);
}

// The random sketch: Rademacher entries (±1 with equal probability) from a counter-based generator —
// entry i is bit i mod 64 of SplitMix64(seed ^ SplitMix64(⌊i / 64⌋)). Any entry is computed on its own on
// any device, so the CPU and the GPU draw the same sketch for a seed, bit for bit (±1 is exact in every
// dtype), and a GPU draws it without a host round trip (CUDA graphs). Sign matrices find ranges as well
// as Gaussian ones in practice (Halko, Martinsson & Tropp 2011, §4.6; Tropp et al. 2017), cost a hash
// per 64 entries, and the certificate never depends on how the sketch was drawn: an unlucky one only
// costs another round.
C10_HOST_DEVICE inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Writes the sketch entries offset, offset + 1, …, offset + count − 1 to out.
template <typename T>
C10_HOST_DEVICE inline void sketch_entries(uint64_t seed, uint64_t offset, int64_t count, T* out) {
  uint64_t block = ~0ull, bits = 0;
  for (int64_t i = 0; i < count; ++i) {
    const uint64_t index = offset + static_cast<uint64_t>(i);
    if ((index >> 6) != block) {
      block = index >> 6;
      bits = splitmix64(seed ^ splitmix64(block));
    }
    out[i] = ((bits >> (index & 63)) & 1) ? T(1) : T(-1);
  }
}

// The fold sketch S (n × c) of one round: column i of ΔW, in block f = ⌊i / c⌋ at position q = i − f c,
// enters column (q + o_f) mod c of ΔW S with the sign of sketch entry offset + i, where o_f is this
// block's rotation below (a stream of its own, addressed by offset + f: one round's offsets are at
// least n apart, so no two rounds share a rotation). Columns in one block never collide; columns in
// two blocks collide with probability 1/c, as in a CountSketch.
C10_HOST_DEVICE inline int64_t fold_rotation(uint64_t seed, uint64_t offset, int64_t block, int64_t cols) {
  return static_cast<int64_t>(splitmix64(~seed ^ splitmix64(offset + static_cast<uint64_t>(block))) %
                              static_cast<uint64_t>(cols));
}

// Everything one round of the randomized restraint decides from the Ritz values s[0..l) (descending) of
// ΔW on the explored subspace, the squared residual ‖ΔW − QQᵀΔW‖_F² and ‖ΔW‖_F, written without a host
// round trip: before/after (σ and F(σ), equal at or below the threshold), the correction coefficients
// coeff_i = (σ_i − F(σ_i)) / σ_i (0 for values left alone), and the stats row.
// k = #{s_i > t} is exact when σ_{k+1}(B)² + ‖R‖_F² ≤ band² (see csrc/restrain.cpp); ‖ΔW‖_F ≤ t proves
// that nothing is above the threshold at all (then nothing changes, whatever rounding did to s).
C10_HOST_DEVICE inline void summarize_round(const double* s, int64_t l, double resid_sq, double frob,
                                            double threshold, double band, int64_t fn, double param,
                                            int64_t power_iters, double* before, double* after, double* coeff,
                                            double* stats) {
  // NaN or Inf in ΔW (‖ΔW‖_F not finite): nothing changes, nothing is certified (the fixed-rank mode,
  // which never reads back to the host, reports bad input this way instead of raising).
  const bool finite = frob - frob == 0;
  const bool norm_bound = frob <= threshold;
  int64_t k = 0;
  for (int64_t i = 0; i < l; ++i) {
    const double v = s[i];
    const bool above = finite && !norm_bound && v > threshold;
    before[i] = v;
    after[i] = above ? restrained_value<double>(v, threshold, fn, param) : v;
    coeff[i] = above ? (v - after[i]) / v : 0.0;
    k += above ? 1 : 0;
  }
  const double resid = ::sqrt(resid_sq > 0 ? resid_sq : 0.0);
  const double s_next = k < l ? s[k] : 0.0;
  const double bound = !finite ? frob - frob : norm_bound ? frob : ::sqrt(s_next * s_next + resid * resid);
  stats[kStatRestrained] = static_cast<double>(k);
  stats[kStatRankExplored] = static_cast<double>(l);
  stats[kStatSigmaNextBound] = bound;
  stats[kStatCertified] = bound <= band ? 1.0 : 0.0;  // false for NaN
  stats[kStatMethod] = static_cast<double>(norm_bound ? kMethodNormBound : kMethodRandomized);
  stats[kStatPowerIters] = static_cast<double>(power_iters);
  stats[kStatResidual] = norm_bound ? frob : resid;
  stats[kStatRitzResidual] = norm_bound ? 0.0 : resid;  // ‖R‖_F bounds every Ritz residual
  stats[kStatPasses] = 0;
}

}  // namespace prune_ext
