// Certified truncated-SVD restraint of ΔW, written once over ATen so that it runs on any device.
//
// Only singular values above the threshold t change, so the restrained matrix is
//   ΔW − Σ_{σ_i > t} (σ_i − F(σ_i)) u_i v_iᵀ,
// a rank-k correction. We find the top triplets in a growing random subspace Q (m × l) and prove
// that none above t was missed: with A = ΔW, B = QᵀA and R = A − QB (QᵀR = 0),
//   AᵀA = BᵀB + RᵀR  ⇒  σ_{k+1}(A)² ≤ σ_{k+1}(B)² + ‖R‖₂² ≤ σ_{k+1}(B)² + ‖R‖_F²   (Weyl),
// and the Ritz values σ_i(B) are lower bounds of σ_i(A). So k = #{σ_i(B) > t} is exact as soon as
// σ_{k+1}(B)² + ‖R‖_F² ≤ t². Edits are low rank, so once l exceeds the rank, R vanishes to rounding
// and the certificate holds at once; otherwise l grows, and a dense SVD takes over near min(m, n).
#include "restrain.h"

#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "restrain_math.h"

namespace prune_ext {

using at::Tensor;

void check_restraint_args(double threshold, int64_t fn, double param) {
  TORCH_CHECK_VALUE(std::isfinite(threshold) && threshold > 0,
                    "prune_ext: W_sigma_max (the threshold) must be a finite positive number, got ", threshold);
  TORCH_CHECK_VALUE(fn == kLogFn || fn == kLinearFn, "prune_ext: fn must be 0 (log) or 1 (linear), got ", fn);
  TORCH_CHECK_VALUE(std::isfinite(param) && param > 1, "prune_ext: ", fn == kLogFn ? "alpha" : "beta",
                    " must be a finite number > 1, got ", param);
}

void check_sketch_args(int64_t rank, int64_t oversample, int64_t power_iters) {
  TORCH_CHECK_VALUE(rank >= 0 && oversample >= 0 && power_iters >= 0,
                    "prune_ext: rank, oversample and power_iters must be >= 0");
}

void check_matrix(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, "prune_ext: ", name, " must be a 2-D matrix, got ", t.dim(), " dimensions");
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "prune_ext: ", name,
                   " must be a real floating-point tensor (float32, float64, bfloat16, float16), got ",
                   t.scalar_type());
}

namespace {

constexpr int64_t kInitialRank = 64;     // first subspace size
constexpr int64_t kGrowth = 4;           // subspace growth factor
constexpr int64_t kDenseBelow = 96;      // min(m, n) at or below which a dense SVD is simply cheaper
constexpr int64_t kRowBlockElems = 1 << 23;  // rows per block in residual passes: bounded memory
constexpr int64_t kWidenBelow = 512;         // dense float32 matrices this small are done in float64…
constexpr int64_t kWidenElems = 1 << 21;     // …if they also have at most this many entries

at::ScalarType compute_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

double unit_roundoff(at::ScalarType t) {
  return t == at::kDouble ? std::numeric_limits<double>::epsilon() : std::numeric_limits<float>::epsilon();
}

std::vector<double> to_host(const Tensor& t) {
  Tensor h = t.detach().to(at::kCPU, at::kDouble).contiguous();
  return std::vector<double>(h.data_ptr<double>(), h.data_ptr<double>() + h.numel());
}

// Drawn on the CPU from a seeded generator, so a seed gives the same sketch on every device.
Tensor gaussian(int64_t rows, int64_t cols, at::Generator& gen, const at::TensorOptions& opts) {
  return at::randn({rows, cols}, gen, at::TensorOptions().dtype(opts.dtype())).to(opts);
}

Tensor orthonormalize(const Tensor& Y) { return std::get<0>(at::linalg_qr(Y, "reduced")); }

// New orthonormal directions from Y, orthogonal to Q. Y may be (numerically) rank deficient once Q
// holds the range of ΔW, so the second projection acts on an orthonormal basis, not on Y's rounding
// noise: project, orthonormalise, project again, orthonormalise again ("twice is enough").
Tensor extend_basis(const Tensor& Q, const Tensor& Y) {
  Tensor Z = orthonormalize(Y - Q.mm(Q.t().mm(Y)));
  Z = orthonormalize(Z - Q.mm(Q.t().mm(Z)));
  return at::cat({Q, Z}, 1);
}

// One subspace (power) iteration with re-orthonormalisation: Q ← orth(A orth(Aᵀ Q)).
Tensor power_step(const Tensor& A, const Tensor& Q) { return orthonormalize(A.mm(orthonormalize(A.t().mm(Q)))); }

// Rayleigh–Ritz on span(Q): B = QᵀA and the SVD of B via its l × l Gram matrix in float64
// (float64 keeps every value above ~1e-7 σ1 accurate, far below any threshold of interest). Everything
// stays on the device; the host reads the values together with the residual (one transfer a round).
struct Ritz {
  Tensor B;   // l × n, compute dtype
  Tensor Ub;  // l × l left singular vectors of B (float64), columns in descending order
  Tensor s;   // singular values of B (float64), descending
};

Ritz rayleigh_ritz(Tensor B) {
  Ritz r;
  r.B = std::move(B);
  Tensor Bd = r.B.to(at::kDouble);
  auto [evals, evecs] = at::linalg_eigh(Bd.mm(Bd.t()));
  r.Ub = evecs.flip(1);
  r.s = evals.flip(0).clamp_min(0).sqrt();
  return r;
}

// ‖A − QB‖_F² as a float64 device scalar, computed explicitly in row blocks (the formula
// ‖A‖_F² − ‖B‖_F² loses everything to cancellation exactly when the residual is small, which is when
// it matters).
Tensor residual_sq(const Tensor& A, const Tensor& Q, const Tensor& B) {
  const int64_t m = A.size(0);
  const int64_t rows = std::max<int64_t>(1, kRowBlockElems / std::max<int64_t>(1, A.size(1)));
  Tensor acc = at::zeros({}, A.options().dtype(at::kDouble));
  for (int64_t r0 = 0; r0 < m; r0 += rows) {
    const int64_t nr = std::min(rows, m - r0);
    Tensor R = at::addmm(A.narrow(0, r0, nr), Q.narrow(0, r0, nr), B, 1, -1);
    acc += at::linalg_vector_norm(R, 2).to(at::kDouble).square();
  }
  return acc;
}

struct Outcome {
  Tensor left;   // m × k: U_k diag(σ − F(σ))  (compute dtype)
  Tensor right;  // n × k: V_k
  Tensor replacement;  // or the whole restrained matrix (small dense case, computed in float64)
  std::vector<double> before, after;
  double stats[kNumStats] = {0, 0, 0, 0, 0, 0, 0, 0};
};

void shrink_values(const std::vector<double>& s, int64_t k, double t, int64_t fn, double param, Outcome& out,
                   std::vector<double>& shrink) {
  shrink.resize(k);
  out.before.assign(s.begin(), s.begin() + k);
  out.after.resize(k);
  for (int64_t i = 0; i < k; ++i) {
    out.after[i] = restrained_value(s[i], t, fn, param);
    shrink[i] = s[i] - out.after[i];
  }
}

int64_t count_above(const std::vector<double>& s, double t) {
  return std::count_if(s.begin(), s.end(), [t](double v) { return v > t; });
}

// The checks every path starts with, on ‖ΔW‖_F: NaN or Inf is an error (nothing written yet), and
// ‖ΔW‖_F ≤ t means σmax ≤ t: nothing can be above the threshold (returns true, `out` says so).
bool nothing_above(double frob, const Tensor& A, double t, Outcome& out) {
  if (!std::isfinite(frob)) {
    TORCH_CHECK_VALUE(at::isfinite(A).all().item<bool>(), "prune_ext: delta contains NaN or Inf");
    TORCH_CHECK_VALUE(false, "prune_ext: ‖delta‖_F overflows ", A.scalar_type(), "; scale it down first");
  }
  if (frob > t) return false;
  out.stats[kStatCertified] = 1;
  out.stats[kStatMethod] = kMethodNormBound;
  out.stats[kStatSigmaNextBound] = frob;
  out.stats[kStatResidual] = frob;
  return true;
}

Outcome dense(const Tensor& A, double t, int64_t fn, double param) {
  Outcome out;
  // Small float32 matrices are decomposed and corrected in float64 (cheap at this size): the result
  // is then exact to its own rounding even when the restraint removes most of ΔW's norm.
  const bool widen = A.scalar_type() == at::kFloat && std::min(A.size(0), A.size(1)) <= kWidenBelow &&
                     A.numel() <= kWidenElems;
  const Tensor Aw = widen ? A.to(at::kDouble) : A;
  auto [U, S, Vh] = at::linalg_svd(Aw, false);
  const std::vector<double> s = to_host(S);
  const int64_t k = count_above(s, t);
  out.stats[kStatRestrained] = k;
  out.stats[kStatRankExplored] = static_cast<double>(s.size());
  out.stats[kStatSigmaNextBound] = k < static_cast<int64_t>(s.size()) ? s[k] : 0.0;
  out.stats[kStatCertified] = 1;
  out.stats[kStatMethod] = kMethodDense;
  if (k == 0) return out;
  std::vector<double> shrink;
  shrink_values(s, k, t, fn, param, out, shrink);
  Tensor d = at::tensor(shrink, at::TensorOptions().dtype(at::kDouble)).to(Aw.options());
  if (widen) {
    out.replacement = at::addmm(Aw, U.narrow(1, 0, k) * d, Vh.narrow(0, 0, k), 1, -1);
    return out;
  }
  out.left = U.narrow(1, 0, k) * d;
  out.right = Vh.narrow(0, 0, k).t();
  return out;
}

// The restraint of A (float32 or float64, BLAS layout). ‖A‖_F (`frob_d`, a device scalar) is read
// together with the first round's values and residual: a certified low-rank input costs one
// device-to-host transfer. Small matrices go dense.
Outcome randomized(const Tensor& A, const Tensor& frob_d, double t, int64_t fn, double param, int64_t rank,
                   int64_t oversample, int64_t power_iters, int64_t seed) {
  const int64_t m = A.size(0), n = A.size(1), p = std::min(m, n);
  const bool fixed = rank > 0;
  const double u = unit_roundoff(A.scalar_type());
  const double band = t * (1 + 16 * u);  // values within rounding of t are "at" the threshold
  const int64_t dense_cut = p / 2;
  Outcome out;

  int64_t l = fixed ? std::min(rank, p) : std::min(p, std::max(kInitialRank, 2 * oversample));
  if (!fixed && (p <= kDenseBelow || l > dense_cut)) {
    if (nothing_above(frob_d.item<double>(), A, t, out)) return out;
    return dense(A, t, fn, param);
  }

  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed));
  Tensor Q = orthonormalize(A.mm(gaussian(n, l, gen, A.options())));
  int64_t powers = 0;
  if (fixed)
    for (; powers < power_iters; ++powers) Q = power_step(A, Q);
  Tensor B = Q.t().mm(A);  // QᵀA, kept in step with Q (extended by rows as Q grows)

  // Grows the subspace by kGrowth (or to fit k + oversample), false when dense is cheaper.
  auto grow = [&](int64_t k) {
    const int64_t target = std::min(p, std::max(kGrowth * l, k + 2 * oversample));
    if (fixed || target > dense_cut) return false;
    Q = extend_basis(Q, A.mm(gaussian(n, target - l, gen, A.options())));
    B = at::cat({B, Q.narrow(1, l, target - l).t().mm(A)}, 0);
    l = target;
    return true;
  };

  double frob = -1;       // ‖A‖_F, known after the first read
  double accuracy = 0;    // Ritz residual that makes the correction accurate to ~1e-6 (float32) /
                          // ~1e-11 (float64) of ‖ΔW‖_F
  double floor_ok = 0;    // a Ritz residual this small is at the rounding floor
  double last_res = -1;
  while (true) {
    Ritz rr = rayleigh_ritz(B);
    std::vector<double> s;
    double resid = -1;  // ‖A − QB‖_F
    if (frob < 0) {     // first round: the norm, the values and the residual in one transfer
      const std::vector<double> host =
          to_host(at::cat({frob_d.reshape({1}), residual_sq(A, Q, rr.B).reshape({1}), rr.s}));
      frob = host[0];
      if (nothing_above(frob, A, t, out)) return out;
      resid = std::sqrt(std::max(0.0, host[1]));
      s.assign(host.begin() + 2, host.end());
      accuracy = (A.scalar_type() == at::kDouble ? 1e-11 : 3e-6) * frob;
      floor_ok = 1e3 * u * frob;
    } else {
      s = to_host(rr.s);
    }
    const int64_t k = count_above(s, t);
    if (!fixed && k + oversample > l && l < p) {
      if (grow(k)) continue;
      return dense(A, t, fn, param);
    }
    const double s_next = k < l ? s[k] : 0.0;
    if (resid < 0) {
      // Later rounds screen by the (cancellation-prone) formula before paying for the residual: far
      // above t means no certificate at this l.
      double sum_sq = 0;
      for (double v : s) sum_sq += v * v;
      const double tail_formula = std::sqrt(std::max(0.0, frob * frob - sum_sq));
      if (!fixed && tail_formula > 2 * t) {
        if (grow(k)) continue;
        return dense(A, t, fn, param);
      }
      resid = std::sqrt(std::max(0.0, residual_sq(A, Q, rr.B).item<double>()));
    }
    const double bound = std::sqrt(s_next * s_next + resid * resid);
    const bool certified = bound <= band;
    if (!fixed && !certified) {
      if (grow(k)) continue;
      return dense(A, t, fn, param);
    }

    out = Outcome();
    out.stats[kStatRestrained] = k;
    out.stats[kStatRankExplored] = l;
    out.stats[kStatSigmaNextBound] = bound;
    out.stats[kStatCertified] = certified;
    out.stats[kStatMethod] = kMethodRandomized;
    out.stats[kStatPowerIters] = powers;
    out.stats[kStatResidual] = resid;
    if (k == 0) return out;

    // Ritz triplets of the values to change: u_i = Q ub_i, v_i = Bᵀ ub_i / σ_i. Since QB v_i = σ_i u_i,
    // ΔW v_i − σ_i u_i = R v_i with R = ΔW − QB, so ‖R‖_F (already known) bounds every Ritz residual;
    // only when it is too large for the accuracy target are the residuals computed one by one.
    std::vector<double> shrink;
    shrink_values(s, k, t, fn, param, out, shrink);
    Tensor Ub_k = rr.Ub.narrow(1, 0, k);
    Tensor s_k = rr.s.narrow(0, 0, k);
    Tensor V_k = (rr.B.to(at::kDouble).t().mm(Ub_k) / s_k).to(A.scalar_type());  // n × k
    Tensor U_k = Q.mm(Ub_k.to(A.scalar_type()));                                   // m × k
    double max_res = resid;
    if (resid > accuracy) {
      Tensor ritz_res = at::linalg_vector_norm(A.mm(V_k) - U_k * s_k.to(A.scalar_type()), 2, {0});
      max_res = std::min(resid, at::max(ritz_res).item<double>());
    }
    out.stats[kStatRitzResidual] = max_res;
    if (!fixed && max_res > accuracy) {
      // Subspace iterations shrink the Ritz residuals geometrically until they reach the rounding
      // floor of the working precision; stagnation at a small floor is as accurate as it gets.
      const bool stagnated = last_res >= 0 && max_res > 0.5 * last_res;
      if (!stagnated && powers < power_iters) {
        last_res = max_res;
        Q = power_step(A, Q);
        B = Q.t().mm(A);
        ++powers;
        continue;
      }
      if (!(stagnated && max_res <= floor_ok))
        return dense(A, t, fn, param);  // a spectrum the sketch cannot resolve: be exact instead
    }
    Tensor d = at::tensor(shrink, at::TensorOptions().dtype(at::kDouble)).to(A.options());
    out.left = U_k * d;
    out.right = V_k;
    return out;
  }
}

std::tuple<Tensor, Tensor, Tensor> pack(const Outcome& out, const at::Device& device) {
  auto opts = at::TensorOptions().dtype(at::kDouble);
  Tensor stats = at::tensor(std::vector<double>(out.stats, out.stats + kNumStats), opts);
  return {at::tensor(out.before, opts).to(device), at::tensor(out.after, opts).to(device), stats.to(device)};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> restrain_(Tensor& delta, double threshold, int64_t fn, double param,
                                             int64_t rank, int64_t oversample, int64_t power_iters,
                                             int64_t seed) {
  check_matrix(delta, "delta");
  check_restraint_args(threshold, fn, param);
  check_sketch_args(rank, oversample, power_iters);
  Outcome out;
  out.stats[kStatCertified] = 1;
  if (delta.numel() == 0) return pack(out, delta.device());

  // Work on delta itself when BLAS can read it (row- or column-major float32/float64); otherwise on
  // one compute-dtype copy, written back at the end.
  const at::ScalarType ct = compute_dtype(delta.scalar_type());
  const bool blas_layout = (delta.stride(1) == 1 && delta.stride(0) >= std::max<int64_t>(1, delta.size(1))) ||
                           (delta.stride(0) == 1 && delta.stride(1) >= std::max<int64_t>(1, delta.size(0)));
  const bool in_place = delta.scalar_type() == ct && blas_layout;
  Tensor A = in_place ? delta : delta.to(delta.options().dtype(ct), false, true, at::MemoryFormat::Contiguous);

  const Tensor frob = at::linalg_vector_norm(A, 2).to(at::kDouble);
  try {
    out = randomized(A, frob, threshold, fn, param, rank, oversample, power_iters, seed);
  } catch (const c10::Error&) {
    // NaN or Inf can make a factorisation fail before ‖A‖_F is read: say what is wrong with the input
    Outcome unused;
    nothing_above(frob.item<double>(), A, threshold, unused);
    throw;
  }
  if (out.replacement.defined()) {
    delta.copy_(out.replacement);
  } else if (out.left.defined()) {
    A.addmm_(out.left, out.right.t(), 1, -1);
    if (!in_place) delta.copy_(A);
  }
  return pack(out, delta.device());
}

std::tuple<Tensor, Tensor, Tensor> restrain_many_(at::TensorList deltas, at::ArrayRef<double> thresholds,
                                                  int64_t fn, double param, int64_t rank, int64_t oversample,
                                                  int64_t power_iters, int64_t seed) {
  TORCH_CHECK_VALUE(deltas.size() == thresholds.size(), "prune_ext: got ", deltas.size(), " matrices but ",
                    thresholds.size(), " thresholds");
  // Validate everything first, so that a bad argument leaves every matrix untouched.
  for (size_t i = 0; i < deltas.size(); ++i) {
    check_matrix(deltas[i], "every delta");
    check_restraint_args(thresholds[i], fn, param);
  }
  const at::Device device = deltas.empty() ? at::Device(at::kCPU) : deltas[0].device();
  std::vector<Tensor> before, after, stats;
  int64_t kmax = 0;
  for (size_t i = 0; i < deltas.size(); ++i) {
    Tensor d = deltas[i];
    auto [b, a, s] = restrain_(d, thresholds[i], fn, param, rank, oversample, power_iters, seed);
    kmax = std::max(kmax, b.numel());
    before.push_back(b);
    after.push_back(a);
    stats.push_back(s.to(device));
  }
  auto opts = at::TensorOptions().dtype(at::kDouble).device(device);
  const int64_t L = static_cast<int64_t>(deltas.size());
  Tensor all_before = at::zeros({L, kmax}, opts);
  Tensor all_after = at::zeros({L, kmax}, opts);
  for (int64_t i = 0; i < L; ++i) {
    all_before[i].narrow(0, 0, before[i].numel()).copy_(before[i]);
    all_after[i].narrow(0, 0, after[i].numel()).copy_(after[i]);
  }
  Tensor all_stats = L == 0 ? at::zeros({0, kNumStats}, opts) : at::stack(stats);
  return {all_before, all_after, all_stats};
}

std::tuple<Tensor, Tensor, Tensor> factored_svd(const Tensor& left, const Tensor& right) {
  check_matrix(left, "left");
  check_matrix(right, "right");
  TORCH_CHECK_VALUE(left.size(1) == right.size(1), "prune_ext: factors must share their rank, got ",
                    left.sizes(), " and ", right.sizes());
  TORCH_CHECK_VALUE(left.device() == right.device(), "prune_ext: factors must be on one device");
  const at::ScalarType ct = at::promote_types(compute_dtype(left.scalar_type()), compute_dtype(right.scalar_type()));
  auto [Qa, Ra] = at::linalg_qr(left.to(ct), "reduced");
  auto [Qb, Rb] = at::linalg_qr(right.to(ct), "reduced");
  auto [X, S, Yh] = at::linalg_svd(Ra.mm(Rb.t()), false);
  return {Qa.mm(X), S, Qb.mm(Yh.t())};
}

Tensor spectral_norm(const Tensor& W, double rtol, int64_t max_iters, int64_t seed) {
  check_matrix(W, "W");
  TORCH_CHECK_VALUE(rtol > 0 && std::isfinite(rtol), "prune_ext: rtol must be positive, got ", rtol);
  TORCH_CHECK_VALUE(max_iters > 0, "prune_ext: max_iters must be positive, got ", max_iters);
  auto opts = at::TensorOptions().dtype(at::kDouble);
  if (W.numel() == 0) return at::tensor(std::vector<double>{0, 0, 0, 1}, opts).to(W.device());
  // Golub–Kahan–Lanczos bidiagonalisation in float64 with full reorthogonalisation. With B_j = X Σ Yᵀ,
  // the top Ritz triplet satisfies W v = θ u exactly and ‖Wᵀu − θ v‖ = β_j |x_j|: a singular value of
  // W lies within that residual of θ, and θ ≤ σmax(W) always.
  // Start in the smaller dimension, so that min(m, n) steps exhaust the Krylov space (exact answer).
  Tensor A = W.size(0) < W.size(1) ? W.t().to(at::kDouble) : W.to(at::kDouble);
  const int64_t m = A.size(0), n = A.size(1), steps = std::min<int64_t>(max_iters, std::min(m, n));
  TORCH_CHECK_VALUE(at::isfinite(A).all().item<bool>(), "prune_ext: W contains NaN or Inf");
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed));
  Tensor v = gaussian(n, 1, gen, A.options());
  v = v / at::linalg_vector_norm(v, 2);
  std::vector<Tensor> Us, Vs{v};
  std::vector<double> alpha, beta;
  double theta = 0, residual = std::numeric_limits<double>::infinity();
  bool converged = false;
  int64_t j = 0;
  for (; j < steps && !converged; ++j) {
    Tensor uvec = A.mm(Vs.back());
    if (!Us.empty()) {
      Tensor U = at::cat(Us, 1);
      uvec = uvec - U.mm(U.t().mm(uvec));
      uvec = uvec - U.mm(U.t().mm(uvec));
    }
    const double a = at::linalg_vector_norm(uvec, 2).item<double>();
    alpha.push_back(a);
    if (a == 0) {  // W is exactly zero on the Krylov space seen so far
      converged = true;
      residual = 0;
      break;
    }
    Us.push_back(uvec / a);
    Tensor V = at::cat(Vs, 1);
    Tensor vvec = A.t().mm(Us.back());
    vvec = vvec - V.mm(V.t().mm(vvec));
    vvec = vvec - V.mm(V.t().mm(vvec));
    const double b = at::linalg_vector_norm(vvec, 2).item<double>();
    beta.push_back(b);
    // Top singular triplet of the (j+1) × (j+1) upper bidiagonal B_j, on the host.
    const int64_t r = static_cast<int64_t>(alpha.size());
    Tensor Bj = at::zeros({r, r}, opts);
    for (int64_t i = 0; i < r; ++i) {
      Bj[i][i] = alpha[i];
      if (i + 1 < r) Bj[i][i + 1] = beta[i];
    }
    auto [X, S, Yh] = at::linalg_svd(Bj, false);
    theta = S[0].item<double>();
    residual = b * std::abs(X[r - 1][0].item<double>());
    converged = residual <= rtol * theta || b == 0;
    if (b == 0) break;
    Vs.push_back(vvec / b);
  }
  return at::tensor(std::vector<double>{theta, residual, static_cast<double>(j), converged ? 1.0 : 0.0}, opts)
      .to(W.device());
}

}  // namespace prune_ext
