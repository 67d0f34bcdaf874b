// CholeskyQR2 for batches of tall-skinny matrices (device-generic: ATen calls only), the orthonormalisation
// the adaptive restraint uses on CUDA, where Householder QR (geqrf + orgqr) is a chain of latency-bound
// small kernels per matrix while CholeskyQR2 is two GEMMs, two l × l Cholesky factorisations and two
// triangular solves per batch (Fukaya, Nakatsukasa, Yanagisawa & Yamamoto 2014; Yamamoto et al. 2015).
//
// Precision: the Gram matrices are formed and factored in float64 whatever the input (Y is m × w with
// w ≤ a few hundred: the conversion costs a sliver of one pass over ΔW), so one CholeskyQR pass is
// stable for cond(Y) up to about 1e7 (√(1/ε64)), which covers a float32 sketch whose trailing columns are
// rounding noise (cond ≈ 1/ε32 ≈ 1e7 at worst) only just: hence the check. Each batch entry reports its
// orthogonality defect max|QᵀQ − I| (NaN when a Cholesky failed), computed on the device and read with the
// round's other numbers; a caller that sees a defect above kCholeskyQrDefect orthonormalises again by
// Householder QR (detected and counted, see restrain.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "restrain.h"

namespace prune_ext {

std::tuple<at::Tensor, at::Tensor> cholesky_qr2(const at::Tensor& Y) {
  TORCH_CHECK_VALUE(Y.dim() == 3, "prune_ext: cholesky_qr2 takes (L, m, w) matrices, got ", Y.dim(),
                    " dimensions");
  const at::ScalarType out_type = Y.scalar_type();
  const int64_t w = Y.size(2);
  at::Tensor Q = Y.to(at::kDouble);
  at::Tensor ok = at::ones({Y.size(0)}, Y.options().dtype(at::kBool));
  for (int pass = 0; pass < 2; ++pass) {
    const at::Tensor G = at::bmm(Q.transpose(1, 2), Q);
    auto [Lc, info] = at::linalg_cholesky_ex(G, /*upper=*/false, /*check_errors=*/false);
    ok = ok.logical_and(info == 0);
    // Q ← Q L⁻ᵀ (a failed factorisation leaves NaN or garbage: caught by the defect below)
    Q = at::linalg_solve_triangular(Lc.transpose(1, 2), Q, /*upper=*/true, /*left=*/false);
  }
  const at::Tensor eye = at::eye(w, Q.options());
  at::Tensor defect = (at::bmm(Q.transpose(1, 2), Q) - eye).abs().amax({1, 2});
  defect = at::where(ok.logical_and(defect.isfinite()), defect, std::numeric_limits<double>::quiet_NaN());
  return {Q.to(out_type), defect};
}

TORCH_LIBRARY_IMPL(prune_ext, CPU, m) { m.impl("_cholesky_qr2", &cholesky_qr2); }
#ifdef PRUNE_EXT_WITH_CUDA
// (every ATen call guards its own device)
TORCH_LIBRARY_IMPL(prune_ext, CUDA, m) { m.impl("_cholesky_qr2", &cholesky_qr2); }
#endif

}  // namespace prune_ext
