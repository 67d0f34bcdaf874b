// CPU kernels: the device-generic algorithms (LAPACK/BLAS through ATen) and the elementwise F.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../restrain.h"
#include "../restrain_math.h"

namespace prune_ext {
namespace {

at::Tensor restrain_values_cpu(const at::Tensor& sigma, double threshold, int64_t fn, double param) {
  check_restraint_args(threshold, fn, param);
  TORCH_CHECK_TYPE(at::isFloatingType(sigma.scalar_type()), "prune_ext: sigma must be floating point");
  at::Tensor in = sigma.contiguous();
  at::Tensor out = at::empty_like(in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "restrain_values_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = in.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const acc_t t = static_cast<acc_t>(threshold), p = static_cast<acc_t>(param);
    for (int64_t i = 0; i < in.numel(); ++i)
      dst[i] = static_cast<scalar_t>(restrained_value<acc_t>(static_cast<acc_t>(src[i]), t, fn, p));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(prune_ext, CPU, m) {
  m.impl("restrain_", &restrain_);
  m.impl("restrain_many_", &restrain_many_);
  m.impl("restrain_values", &restrain_values_cpu);
  m.impl("factored_svd", &factored_svd);
  m.impl("spectral_norm", &spectral_norm);
}

}  // namespace prune_ext
