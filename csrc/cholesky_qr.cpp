// Shifted CholeskyQR3 for batches of tall-skinny matrices (device-generic: ATen calls only), the
// orthonormalisation the adaptive restraint uses on CUDA, where Householder QR (geqrf + orgqr) is a chain
// of latency-bound small kernels per matrix while this is three GEMMs, three l × l Cholesky factorisations
// and three triangular solves per batch: one pass on YᵀY + sI (a shift that makes the factorisation
// succeed for cond(Y) up to about 1/u), then CholeskyQR2 on the result (Fukaya, Nakatsukasa, Yanagisawa &
// Yamamoto 2020, "Shifted Cholesky QR for computing the QR factorization of ill-conditioned matrices").
//
// Precision: the Gram matrices are formed and factored in float64 whatever the input (Y is m × w with
// w ≤ a few hundred: the conversion costs a sliver of one pass over ΔW). Plain CholeskyQR2 fails from
// cond(Y) ≈ 1e8 (measured: float32 sketches of rank-40 edits with 64 columns, whose trailing columns are
// rounding noise, have cond 0.5–1.3e8 and failed in half the cases); the shifted first pass covers them.
// Each batch entry reports its orthogonality defect max|QᵀQ − I| (NaN when a Cholesky failed), computed on
// the device and read with the round's other numbers; a caller that sees a defect above kCholeskyQrDefect
// orthonormalises again by Householder QR (detected and counted, see restrain.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "restrain.h"

namespace prune_ext {

std::tuple<at::Tensor, at::Tensor> cholesky_qr(const at::Tensor& Y) {
  TORCH_CHECK_VALUE(Y.dim() == 3, "prune_ext: cholesky_qr takes (L, m, w) matrices, got ", Y.dim(),
                    " dimensions");
  const at::ScalarType out_type = Y.scalar_type();
  const int64_t m = Y.size(1), w = Y.size(2);
  at::Tensor Q = Y.to(at::kDouble);
  const at::Tensor eye = at::eye(w, Q.options());
  at::Tensor ok = at::ones({Y.size(0)}, Y.options().dtype(at::kBool));
  for (int pass = 0; pass < 3; ++pass) {
    at::Tensor G = at::bmm(Q.transpose(1, 2), Q);
    if (pass == 0) {
      // The shift of Fukaya et al.: s = 11 (m w + w (w + 1)) u ‖Y‖², with ‖Y‖_F² = trace(G) ≥ ‖Y‖₂².
      const double u = std::numeric_limits<double>::epsilon() / 2;
      const at::Tensor shift = 11.0 * static_cast<double>(m * w + w * (w + 1)) * u *
                               G.diagonal(0, 1, 2).sum(1);
      G = G + shift.view({-1, 1, 1}) * eye;
    }
    auto [Lc, info] = at::linalg_cholesky_ex(G, /*upper=*/false, /*check_errors=*/false);
    ok = ok.logical_and(info == 0);
    // Q ← Q L⁻ᵀ (a failed factorisation leaves NaN or garbage: caught by the defect below)
    Q = at::linalg_solve_triangular(Lc.transpose(1, 2), Q, /*upper=*/true, /*left=*/false);
  }
  at::Tensor defect = (at::bmm(Q.transpose(1, 2), Q) - eye).abs().amax({1, 2});
  defect = at::where(ok.logical_and(defect.isfinite()), defect, std::numeric_limits<double>::quiet_NaN());
  return {Q.to(out_type), defect};
}

TORCH_LIBRARY_IMPL(prune_ext, CPU, m) { m.impl("_cholesky_qr", &cholesky_qr); }
#ifdef PRUNE_EXT_WITH_CUDA
// (every ATen call guards its own device)
TORCH_LIBRARY_IMPL(prune_ext, CUDA, m) { m.impl("_cholesky_qr", &cholesky_qr); }
#endif

}  // namespace prune_ext
