// The restraint functions F of PRUNE (paper Eq. 5 and appendix C.3), shared by the CPU and
// CUDA kernels so that the CPU tests exercise exactly the math the GPU runs.
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>
#include <cstdint>

namespace prune_ext {

enum RestraintFn : int64_t { kLogFn = 0, kLinearFn = 1 };

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

}  // namespace prune_ext
