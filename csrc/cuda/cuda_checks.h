// Error checks for the CUDA translation units, with every message formatted in a host C++ file.
//
// Why: the first GPU run (2026-12-04) died with SIGSEGV inside std::ostream while a failed
// PRUNE_EXT_CUSOLVER_CHECK built its message in restrain_cuda.cu — TORCH_CHECK with numbers expands to
// c10::str, an ostringstream instantiated in the TU that calls it, here one compiled by nvcc through
// its host compiler. What the .cu TUs do now is only compare and call: the failure functions below are
// compiled by the C++ compiler that compiles the rest of the extension (csrc/cuda_checks.cpp), take plain
// integers and C strings, and throw c10::Error (so Python sees a RuntimeError / ValueError, never a crash).
// See docs/gpu.md, "Errors never crash the process".
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../restrain.h"

#define PRUNE_EXT_KERNEL_LAUNCH_CHECK()                                                                  \
  do {                                                                                                   \
    const cudaError_t _err = cudaGetLastError();                                                         \
    if (_err != cudaSuccess)                                                                             \
      ::prune_ext::fail_library_call("CUDA", "kernel launch", static_cast<int64_t>(_err),               \
                                     cudaGetErrorString(_err), __FILE__, __LINE__);                      \
  } while (0)

namespace prune_ext {
namespace cuda {

// A grid dimension must fit the launch: raise (with the numbers) instead of launching a truncated grid.
inline void check_launch_size(const char* what, int64_t n, int64_t max) {
  if (n > max) fail_too_large(what, n, max);
}

}  // namespace cuda
}  // namespace prune_ext
