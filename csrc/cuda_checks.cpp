// The failure functions of the CUDA translation units' checks (csrc/cuda/cuda_checks.h): every message
// with numbers in it is formatted here, in a host C++ file compiled like the rest of the extension,
// never in a .cu file (see that header for why). Built in every configuration (nothing CUDA in it), so
// the CPU tests exercise them too.
#include <c10/util/Exception.h>

#include "restrain.h"

namespace prune_ext {

void fail_library_call(const char* library, const char* call, int64_t status, const char* status_name,
                       const char* file, int line) {
  TORCH_CHECK(false, "prune_ext: ", library, " call ", call, " failed with status ", status, " (",
              status_name != nullptr ? status_name : "?", ") at ", file, ":", line);
}

void fail_too_large(const char* what, int64_t n, int64_t max) {
  TORCH_CHECK_VALUE(false, "prune_ext: ", what, ": ", n, " exceeds the largest supported size ", max);
}

void fail_solver_info(const char* what, int64_t info) {
  TORCH_CHECK(false, "prune_ext: ", what, " failed with info = ", info);
}

}  // namespace prune_ext
