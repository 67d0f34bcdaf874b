// A cuSOLVER dense handle of our own, one per (thread, device), bound to the current stream.
//
// Why not at::cuda::getCurrentCUDASolverDnHandle: in torch 2.14 it lives in the lazily loaded
// libtorch_cuda_linalg.so, so an extension that references it fails to import until something else
// has loaded that library. Our own handle only needs libcusolver itself (linked directly).
#pragma once

#include <c10/cuda/CUDAStream.h>
#include <cusolverDn.h>

#include "cuda_checks.h"

#include <unordered_map>

namespace prune_ext {
namespace cuda {

inline const char* cusolver_status_name(cusolverStatus_t s) {
  switch (s) {
    case CUSOLVER_STATUS_SUCCESS: return "CUSOLVER_STATUS_SUCCESS";
    case CUSOLVER_STATUS_NOT_INITIALIZED: return "CUSOLVER_STATUS_NOT_INITIALIZED";
    case CUSOLVER_STATUS_ALLOC_FAILED: return "CUSOLVER_STATUS_ALLOC_FAILED";
    case CUSOLVER_STATUS_INVALID_VALUE: return "CUSOLVER_STATUS_INVALID_VALUE";
    case CUSOLVER_STATUS_ARCH_MISMATCH: return "CUSOLVER_STATUS_ARCH_MISMATCH";
    case CUSOLVER_STATUS_EXECUTION_FAILED: return "CUSOLVER_STATUS_EXECUTION_FAILED";
    case CUSOLVER_STATUS_INTERNAL_ERROR: return "CUSOLVER_STATUS_INTERNAL_ERROR";
    case CUSOLVER_STATUS_NOT_SUPPORTED: return "CUSOLVER_STATUS_NOT_SUPPORTED";
    default: return "unknown cuSOLVER status";
  }
}

// A failed call raises through fail_library_call (formatted in a host C++ file: see cuda_checks.h).
#define PRUNE_EXT_CUSOLVER_CHECK(expr)                                                              \
  do {                                                                                               \
    const cusolverStatus_t _st = (expr);                                                             \
    if (_st != CUSOLVER_STATUS_SUCCESS)                                                              \
      ::prune_ext::fail_library_call("cuSOLVER", #expr, static_cast<int64_t>(_st),                   \
                                     ::prune_ext::cuda::cusolver_status_name(_st), __FILE__, __LINE__); \
  } while (0)

struct SolverContext {
  cusolverDnHandle_t handle = nullptr;
  cusolverDnParams_t params = nullptr;
};

// The caller must have made `device` current (c10::cuda::CUDAGuard). Handles are created lazily and
// deliberately never destroyed: destroying them from thread-local or static destructors at process exit
// can run after the CUDA runtime has shut down (PyTorch's own handle pools make the same choice).
inline SolverContext solver_context(c10::DeviceIndex device) {
  thread_local std::unordered_map<int, SolverContext> contexts;
  auto it = contexts.find(device);
  if (it == contexts.end()) {
    SolverContext ctx;
    PRUNE_EXT_CUSOLVER_CHECK(cusolverDnCreate(&ctx.handle));
    PRUNE_EXT_CUSOLVER_CHECK(cusolverDnCreateParams(&ctx.params));
    it = contexts.emplace(static_cast<int>(device), ctx).first;
  }
  PRUNE_EXT_CUSOLVER_CHECK(cusolverDnSetStream(it->second.handle, c10::cuda::getCurrentCUDAStream(device).stream()));
  return it->second;
}

}  // namespace cuda
}  // namespace prune_ext
