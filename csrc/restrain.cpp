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

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <map>
#include <string>

#include "jacobi_svd.h"
#include "restrain_math.h"

// A named range around one phase of the algorithm: the profiler's table per phase (scripts/gpu_check.sh,
// benchmarks/bench_gpu.py --profile) attributes each CUDA kernel to the range that launched it. The
// phases never nest: sketch, product (with ΔW), qr, small_svd, residual, summary, correction,
// dense_svd, norm and host_read.
#define PRUNE_EXT_PHASE(name) RECORD_FUNCTION("prune_ext::" name, std::vector<c10::IValue>())

namespace prune_ext {

using at::Tensor;

void check_restraint_args(double threshold, int64_t fn, double param) {
  TORCH_CHECK_VALUE(std::isfinite(threshold) && threshold > 0,
                    "prune_ext: W_sigma_max (the threshold) must be a finite positive number, got ", threshold);
  TORCH_CHECK_VALUE(fn == kLogFn || fn == kLinearFn, "prune_ext: fn must be 0 (log) or 1 (linear), got ", fn);
  TORCH_CHECK_VALUE(std::isfinite(param) && param > 1, "prune_ext: ", fn == kLogFn ? "alpha" : "beta",
                    " must be a finite number > 1, got ", param);
}

void check_sketch_args(int64_t rank, int64_t oversample, int64_t power_iters, int64_t rank_hint) {
  TORCH_CHECK_VALUE(rank >= 0 && oversample >= 0 && power_iters >= 0 && rank_hint >= 0,
                    "prune_ext: rank, oversample, power_iters and rank_hint must be >= 0");
}

void check_matrix(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, "prune_ext: ", name, " must be a 2-D matrix, got ", t.dim(), " dimensions");
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "prune_ext: ", name,
                   " must be a real floating-point tensor (float32, float64, bfloat16, float16), got ",
                   t.scalar_type());
}

Tensor sketch(const Tensor& like, int64_t rows, int64_t cols, int64_t seed, int64_t offset) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("prune_ext::_sketch", "")
                       .typed<Tensor(const Tensor&, int64_t, int64_t, int64_t, int64_t)>();
  return op.call(like, rows, cols, seed, offset);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> small_svd(const Tensor& T) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("prune_ext::_small_svd", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&)>();
  return op.call(T);
}

void check_jacobi_args(const Tensor& T, int64_t sweeps) {
  TORCH_CHECK_TYPE(T.scalar_type() == at::kDouble, "prune_ext: _jacobi_svd takes float64 matrices, got ",
                   T.scalar_type());
  TORCH_CHECK_VALUE(T.dim() == 3 && T.size(1) == T.size(2), "prune_ext: _jacobi_svd takes (L, l, l) matrices, got ",
                    T.sizes());
  TORCH_CHECK_VALUE(T.size(1) <= kJacobiMaxSize, "prune_ext: _jacobi_svd takes l <= ", kJacobiMaxSize, ", got l = ",
                    T.size(1));
  TORCH_CHECK_VALUE(sweeps >= 1 && sweeps <= 1000, "prune_ext: _jacobi_svd needs 1 <= sweeps <= 1000, got ",
                    sweeps, " (for ", T.size(0), " matrices of size ", T.size(1), ")");
}

std::tuple<Tensor, Tensor, Tensor> jacobi_svd(const Tensor& T, int64_t sweeps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("prune_ext::_jacobi_svd", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, int64_t)>();
  return op.call(T, sweeps);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> summarize_rounds(const Tensor& s, const Tensor& resid_sq,
                                                            const Tensor& frob, at::ArrayRef<double> thresholds,
                                                            double band_factor, int64_t fn, double param,
                                                            int64_t power_iters) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("prune_ext::_summarize_rounds", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
                           const Tensor&, const Tensor&, const Tensor&, at::ArrayRef<double>, double, int64_t,
                           double, int64_t)>();
  return op.call(s, resid_sq, frob, thresholds, band_factor, fn, param, power_iters);
}

// Y = A S for the fold sketch S of fold_rotation (restrain_math.h): every column of A is added, with a
// random sign, to one of the c columns of Y, so a sketch costs one read of A instead of a GEMM of 2mnc
// flops (5–8× less time at 4096 × 11008, c = 210, on this CPU). For the ranges of edits, whose row spaces
// are spread over all columns, Vᵀ S is a sum of ⌈n / c⌉ randomly signed blocks and finds the range as
// well as a dense sign sketch does (the same residual to rounding, measured at ranks 100 and 200); a
// ΔW concentrated on a few columns that collide only costs another round, since the certificate is
// checked whatever the sketch. This composition serves CUDA and non-row-major CPU matrices (rows in
// blocks whose slice of Y stays in cache); row-major CPU matrices have a kernel of their own.
std::vector<int64_t> fold_rotations(int64_t n, int64_t cols, int64_t seed, int64_t offset) {
  std::vector<int64_t> rotation;
  for (int64_t f0 = 0, f = 0; f0 < n; f0 += cols, ++f)
    rotation.push_back(fold_rotation(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), f, cols));
  return rotation;
}

constexpr int64_t kFoldBlockElems = 1 << 18;
Tensor fold_sketch(const Tensor& A, int64_t cols, int64_t seed, int64_t offset) {
  TORCH_CHECK_VALUE(A.dim() == 2 && cols > 0, "prune_ext: fold_sketch needs a matrix and cols > 0");
  const int64_t m = A.size(0), n = A.size(1);
  Tensor Y = at::zeros({m, cols}, A.options());
  if (m == 0 || n == 0) return Y;
  const Tensor signs = sketch(A, 1, n, seed, offset);
  const std::vector<int64_t> rotation = fold_rotations(n, cols, seed, offset);
  const int64_t rows = A.is_cpu() ? std::max<int64_t>(1, kFoldBlockElems / cols) : m;
  for (int64_t r0 = 0; r0 < m; r0 += rows) {
    const int64_t nr = std::min(rows, m - r0);
    Tensor Yb = Y.narrow(0, r0, nr);
    const Tensor Ab = A.narrow(0, r0, nr);
    for (int64_t f0 = 0, f = 0; f0 < n; f0 += cols, ++f) {
      // positions [0, w) of the block go to [o, o + w) mod c: at most two contiguous pieces
      const int64_t w = std::min(cols, n - f0), o = rotation[f], w1 = std::min(w, cols - o);
      Yb.narrow(1, o, w1).addcmul_(Ab.narrow(1, f0, w1), signs.narrow(1, f0, w1));
      if (w > w1) Yb.narrow(1, 0, w - w1).addcmul_(Ab.narrow(1, f0 + w1, w - w1), signs.narrow(1, f0 + w1, w - w1));
    }
  }
  return Y;
}

// The fold sketch through the dispatcher (the CPU has its own kernel, see csrc/cpu).
Tensor fold(const Tensor& A, int64_t cols, int64_t seed, int64_t offset) {
  PRUNE_EXT_PHASE("sketch");
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("prune_ext::_fold_sketch", "")
                       .typed<Tensor(const Tensor&, int64_t, int64_t, int64_t)>();
  return op.call(A, cols, seed, offset);
}

namespace {

constexpr int64_t kInitialRank = 64;     // first subspace size (without a rank hint)
constexpr int64_t kGrowth = 2;           // doubling: the least first growth, the most later growth
constexpr int64_t kDenseBelow = 96;      // min(m, n) at or below which a dense SVD is simply cheaper
constexpr int64_t kRowBlockElems = 1 << 23;  // rows per block in residual passes: bounded memory
constexpr int64_t kWidenBelow = 512;         // dense float32 matrices this small are done in float64…
constexpr int64_t kWidenElems = 1 << 21;     // …if they also have at most this many entries,
constexpr double kWidenRatio = 1e3;          // and any dense float32 matrix with ‖ΔW‖_F > this × t

at::ScalarType compute_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

double unit_roundoff(at::ScalarType t) {
  return t == at::kDouble ? std::numeric_limits<double>::epsilon() : std::numeric_limits<float>::epsilon();
}

// Every read of the restraint's decisions back to the host goes through here, one device-to-host
// transfer each (a synchronisation on a GPU), and shows in the profiler as "prune_ext::host_read": the
// CPU tests count them, since they are the same reads a GPU would make.
std::vector<double> to_host(const Tensor& t) {
  RECORD_FUNCTION("prune_ext::host_read", std::vector<c10::IValue>());
  Tensor h = t.detach().to(at::kCPU, at::kDouble).contiguous();
  return std::vector<double>(h.data_ptr<double>(), h.data_ptr<double>() + h.numel());
}

Tensor orthonormalize(const Tensor& Y) {
  PRUNE_EXT_PHASE("qr");
  return std::get<0>(at::linalg_qr(Y, "reduced"));
}

// The small l × l SVDs: on CUDA the Jacobi kernel (csrc/cuda/jacobi_svd.cu), batched, on the device, with
// its info flag left there (cuSOLVER's gesvd takes a host workspace and synchronises once per matrix, so
// a CUDA graph cannot capture it and every adaptive round paid milliseconds per matrix); on the CPU
// LAPACK, as before (faster there for l in the hundreds), unless PRUNE_EXT_SMALL_SVD=jacobi asks for the
// GPU's algorithm (the CPU tests run the fixed-rank and adaptive paths with it so).
bool jacobi_everywhere() {
  const char* v = std::getenv("PRUNE_EXT_SMALL_SVD");
  return v != nullptr && std::string(v) == "jacobi";
}

// The tall-skinny orthonormalisations of the adaptive mode: shifted CholeskyQR3 on CUDA (see orth), Householder
// QR on the CPU as before, unless PRUNE_EXT_QR=cholesky asks for the GPU's method (CPU tests).
bool cholesky_everywhere() {
  const char* v = std::getenv("PRUNE_EXT_QR");
  return v != nullptr && std::string(v) == "cholesky";
}

bool use_jacobi(const Tensor& T) { return (!T.is_cpu() || jacobi_everywhere()) && T.size(1) <= kJacobiMaxSize; }

// Singular values (descending), orthonormal right singular vectors (columns) and info flags of each
// float64 l × l R factor in T. The Jacobi SVD runs on Tᵀ: one-sided Jacobi on the transpose of a
// triangular factor converges in 8–9 sweeps where on the factor itself it takes 20–30 (measured at l = 64
// and 130 on spectra spanning 8 and 12 decades; the preconditioning of Drmač and Veselić). Its orthogonal
// V are T's left vectors; the right ones are the columns of Tᵀ V = [σ_1 u_1, …], orthonormalised in that
// (descending) order by a QR. Not Tᵀ V / σ: that leaves in u_j an error of ε ‖T‖ / σ_j in every direction,
// u_1's included, which B's σ_1 then multiplies in the correction Bᵀ u_j (measured: 1e-3 absolute errors
// at σ_1 / t = 1e6); the QR takes out of each column its components along the larger ones, as LAPACK's
// orthogonal vectors have them (errors of ε ‖T‖ absolute in T u_j). Column signs are free: the
// restraint uses u_j only in products u_j u_jᵀ.
std::tuple<Tensor, Tensor, Tensor> right_svd(const Tensor& T) {
  PRUNE_EXT_PHASE("small_svd");
  if (use_jacobi(T)) {
    const Tensor Tt = T.transpose(1, 2);
    auto [S, V, info] = jacobi_svd(Tt, kJacobiSweeps);
    return {S, std::get<0>(at::linalg_qr(at::bmm(Tt, V), "reduced")), info};
  }
  auto [U, S, Vh, info] = small_svd(T);
  return {S, Vh.transpose(1, 2), info};
}

// A·X for the thin X (n × w) of every product with ΔW, formed as (XᵀAᵀ)ᵀ: BLAS (MKL) runs a product
// whose output is w × m row-major (the large matrix as the right operand) about 1.4× faster than the
// m × w one for either layout of A (measured at 4096 × 11008, w = 210); the transpose is a view, and the
// column-major m × w result is the layout LAPACK's QR wants.
Tensor times_A(const Tensor& A, const Tensor& X) {
  PRUNE_EXT_PHASE("product");
  return at::mm(X.t(), A.t()).t();
}

// QᵀA (B's rows) for the thin Q (m × w), formed as (AᵀQ)ᵀ: MKL runs that layout 1.3–1.7× faster for
// w ≤ 128 and about as fast or faster beyond (measured at 4096 × 11008, w = 64…222, two threads); B
// comes out column-major, which every later product takes as it is.
Tensor times_At(const Tensor& Q, const Tensor& A) {
  PRUNE_EXT_PHASE("product");
  return at::mm(A.t(), Q).t();
}

// ‖A − QB‖_F² as a float64 device scalar, computed explicitly in row blocks (the formula
// ‖A‖_F² − ‖B‖_F² loses everything to cancellation exactly when the residual is small, which is when
// it matters: B is a float32 product whose rounding, about ε‖A‖_F², is 10³–10⁴ times more than the
// margin t² − σ_{k+1}² that certifies a typical edit ledger).
Tensor residual_sq(const Tensor& A, const Tensor& Q, const Tensor& B) {
  PRUNE_EXT_PHASE("residual");
  const int64_t m = A.size(0);
  const int64_t rows = std::max<int64_t>(1, kRowBlockElems / std::max<int64_t>(1, A.size(1)));
  Tensor acc = at::zeros({}, A.options().dtype(at::kDouble));
  Tensor buf = at::empty({std::min(rows, m), A.size(1)}, A.options());  // one block buffer, reused
  for (int64_t r0 = 0; r0 < m; r0 += rows) {
    const int64_t nr = std::min(rows, m - r0);
    Tensor R = buf.narrow(0, 0, nr);
    at::addmm_out(R, A.narrow(0, r0, nr), Q.narrow(0, r0, nr), B, 1, -1);
    acc += at::linalg_vector_norm(R, 2).to(at::kDouble).square();
  }
  return acc;
}

// The settings of one call.
struct Config {
  int64_t fn;
  double param;
  int64_t rank;  // > 0: fixed rank
  int64_t oversample;
  int64_t power_iters;
  int64_t seed;
  int64_t rank_hint;  // > 0: the caller's bound on the rank of ΔW (sizes the first subspace; checked)
  bool fixed() const { return rank > 0; }
};

// One matrix of a call: its input, the state of its randomized search, and its result.
struct Job {
  Tensor delta;   // the caller's matrix
  Tensor A;       // compute dtype, BLAS layout: delta itself when possible
  bool in_place = true;
  double t = 0;
  int64_t m = 0, n = 0, p = 0;
  Tensor frob;    // ‖A‖_F, float64 device scalar
  // Randomized search: an orthonormal basis Q (m × l) of the explored subspace, B = QᵀA (l × n), the
  // Ritz values s (descending) with their vectors Ub (l × l, float64), and the round's device summary.
  Tensor Q, B, Ub, s;
  Tensor row_sq;  // ‖row i of B‖², float64 (the energy each column of Q captures)
  Tensor before, after, coeff, stats;
  int64_t l = 0, powers = 0;
  int64_t passes = 0;  // passes over ΔW so far: ‖ΔW‖_F, each product with it, residuals, the correction
  bool grown = false;  // the subspace grew once already (later growth doubles)
  // Cholesky QR for this job's bases (adaptive mode on CUDA), and the largest orthogonality defect of the
  // bases built since the last round read (read with the round; above kCholeskyQrDefect: fallback).
  bool cholesky = false;
  Tensor q_defect;
  // Result (device, float64): the restrained values before / after F and the stats row.
  Tensor out_before, out_after, out_stats;
};

double band_factor(const Job& j) { return 1 + 16 * unit_roundoff(j.A.scalar_type()); }

// On the CPU, where looking at a scalar costs nothing (no transfer, no synchronisation, so not a host
// read), a round whose unexplained energy ‖ΔW‖_F² − ‖B‖_F² exceeds what any certificate allows, t² (the
// band) plus a rounding allowance of 10⁻³‖ΔW‖_F² (the rounding measured is about 10⁻⁷‖ΔW‖_F²), cannot
// certify: its explicit residual would not change the answer, so that pass is skipped and the energy
// (≥ 0) is returned instead, else −1. Only the decision to grow rests on it, never a certificate. On a GPU
// the look would cost a synchronisation per round, so there every round computes its residual; the
// fixed-rank mode reports the residual it computed, so it always does.
double uncertifiable_energy(const Job& j) {
  if (!j.A.is_cpu()) return -1;
  const double f2 = std::pow(j.frob.item<double>(), 2);
  const double b2 = j.row_sq.sum().item<double>();
  const double band = j.t * band_factor(j);
  return f2 - b2 > band * band + 1e-3 * f2 ? f2 - b2 : -1;  // false for NaN
}

// Rayleigh–Ritz on span(Q) for jobs of equal shape and subspace size, and their summaries: the SVD of
// each B = QᵀA (l × n) from the R factor of Bᵀ = P R (batched QR) and the SVD of the small R (so the
// Ritz vectors are as accurate as B itself: a Gram matrix BBᵀ would square B's dynamic range), the
// residuals ‖A − QB‖_F² (one pass each, unless uncertifiable_energy shows it cannot matter), and one
// summary launch. Nothing is read back to the host.
void ritz_rounds(const std::vector<Job*>& js, const Config& c) {
  std::vector<Tensor> Bts, resid, frob;
  std::vector<double> thresholds;
  for (Job* j : js) {
    Bts.push_back(j->B.t());
    // (only the adaptive search reads them: the fixed-rank mode never looks at a round)
    if (!c.fixed()) j->row_sq = at::linalg_vector_norm(j->B, 2, {1}, false, at::kDouble).square();
    const double hopeless = c.fixed() ? -1 : uncertifiable_energy(*j);
    if (hopeless >= 0) {
      resid.push_back(at::full({}, hopeless, j->frob.options()));
    } else {
      resid.push_back(residual_sq(j->A, j->Q, j->B));
      ++j->passes;
    }
    frob.push_back(j->frob);
    thresholds.push_back(j->t);
  }
  const Tensor R = [&] {
    PRUNE_EXT_PHASE("qr");
    return std::get<1>(at::linalg_qr(at::stack(Bts), "r"));
  }();
  // R = X S Yh, so B = Rᵀ Pᵀ = Yhᵀ S (P X)ᵀ: B's left singular vectors are Yhᵀ, R's right ones.
  auto [s, Ub, info] = right_svd(R.to(at::kDouble));
  // A failed decomposition is summarised as a non-finite ΔW would be: nothing changes, nothing is
  // certified (the adaptive search then grows the subspace or goes dense).
  const Tensor frob_or_nan = at::where(info == 0, at::stack(frob), std::numeric_limits<double>::quiet_NaN());
  PRUNE_EXT_PHASE("summary");
  auto [before, after, coeff, stats] = summarize_rounds(s, at::stack(resid), frob_or_nan, thresholds,
                                                        band_factor(*js[0]), c.fn, c.param, js[0]->powers);
  for (size_t i = 0; i < js.size(); ++i) {
    Job& j = *js[i];
    j.s = s[i];
    j.Ub = Ub[i];
    j.before = before[i];
    j.after = after[i];
    j.coeff = coeff[i];
    j.stats = stats[i];
  }
}

// Orthonormal bases of the stacked Y (one matrix per job), batched: Householder QR, or shifted CholeskyQR3
// for jobs that use it (GEMMs and small Cholesky factorisations instead of latency-bound geqrf/orgqr
// chains on a GPU, csrc/cholesky_qr.cpp). Nothing is read here: each job keeps its bases' orthogonality defect on the device,
// the round read brings it back, and a defect above kCholeskyQrDefect (or a failed Cholesky: NaN) sends
// the job back to a Householder first round (after_round). Tested: float32 sketches of low-rank edits
// (cond ~1e8) pass; an exactly rank-deficient float64 ΔW (cond ~1e16) falls back once.
Tensor orth(const std::vector<Job*>& js, const Tensor& Y) {
  if (!js[0]->cholesky) return orthonormalize(Y);
  PRUNE_EXT_PHASE("qr");
  auto [Q, defect] = cholesky_qr(Y);
  for (size_t i = 0; i < js.size(); ++i) {
    Job& j = *js[i];
    j.q_defect = j.q_defect.defined() ? at::maximum(j.q_defect, defect[i]) : defect[i];  // NaN stays NaN
  }
  return Q;
}

// Orthonormal bases of f(job) for each job, the factorisations batched.
template <typename F>
Tensor orthonormalize_each(const std::vector<Job*>& js, F f) {
  std::vector<Tensor> ys;
  for (size_t i = 0; i < js.size(); ++i) ys.push_back(f(*js[i], i));
  return orth(js, at::stack(ys));
}

// New orthonormal directions from Y, orthogonal to j.Q. Y may be (numerically) rank deficient once Q
// holds the range of ΔW, so the second projection acts on an orthonormal basis, not on Y's rounding
// noise: project, orthonormalise, project again, orthonormalise again ("twice is enough").
Tensor extend_basis(Job& j, const Tensor& Y) {
  const Tensor& Q = j.Q;
  Tensor Z = orth({&j}, (Y - Q.mm(Q.t().mm(Y))).unsqueeze(0))[0];
  Z = orth({&j}, (Z - Q.mm(Q.t().mm(Z))).unsqueeze(0))[0];
  return at::cat({Q, Z}, 1);
}

// B = QᵀA for each job (one pass each).
void project(const std::vector<Job*>& js) {
  for (Job* j : js) {
    j->B = times_At(j->Q, j->A);
    ++j->passes;
  }
}

// One subspace (power) iteration with re-orthonormalisation for each job: Q ← orth(A orth(AᵀQ)), where
// AᵀQ = Bᵀ is the product every caller already holds for the current Q (so one pass, not two). B is
// stale afterwards and left to the caller (several steps may come before it is needed).
void power_step(const std::vector<Job*>& js) {
  const Tensor Z = orthonormalize_each(js, [](Job& j, size_t) { return j.B.t(); });
  const Tensor Q = orthonormalize_each(js, [&](Job& j, size_t i) { return times_A(j.A, Z[i]); });
  for (size_t i = 0; i < js.size(); ++i) {
    js[i]->Q = Q[i];
    ++js[i]->powers;
    ++js[i]->passes;
  }
}

// The first round for jobs of one shape, dtype and subspace size: the same fold sketch for each (one
// seed, so a matrix gets the sketch a call on it alone would), batched QR factorisations, products per
// matrix, then ritz_rounds. Fixed-rank jobs also take their power iterations here.
// A fixed-rank subspace of l columns is the dominant l-dimensional subspace of an oversampled sketch
// (l + oversample columns, same pass): with l at the rank of ΔW and no power iterations, a sketch of
// exactly l columns is as ill-conditioned as a square random matrix (cond(ΔWΩ) of 10⁵ measured at rank
// 85, spikes), and float32 rounding of ΔWΩ then blurs the top directions past the accuracy the mode
// promises; the extra columns cost part of one pass and an SVD of the small R factor of the sketch.
void first_rounds(const std::vector<Job*>& js, int64_t l, const Config& c) {
  const int64_t extra = c.fixed() ? std::max<int64_t>(0, std::min(c.oversample, js[0]->p - l)) : 0;
  std::vector<Tensor> ys;
  for (Job* j : js) ys.push_back(fold(j->A, l + extra, c.seed, 0));
  Tensor Q;
  if (extra == 0) {
    Q = orth(js, at::stack(ys));
  } else {
    PRUNE_EXT_PHASE("small_svd");  // (with the QR of the oversampled sketch)
    auto [Qy, Ry] = at::linalg_qr(at::stack(ys), "reduced");
    // Ry's left singular vectors, descending: the top l first (Jacobi: Ryᵀ's right ones, orthogonal, and
    // fast to converge on the transpose of a triangular factor, see right_svd).
    const Tensor Ryd = Ry.to(at::kDouble);
    const Tensor U = use_jacobi(Ryd) ? std::get<1>(jacobi_svd(Ryd.transpose(1, 2), kJacobiSweeps))
                                           : std::get<0>(small_svd(Ryd));
    Q = at::matmul(Qy, U.narrow(2, 0, l).to(Qy.scalar_type()));
  }
  for (size_t i = 0; i < js.size(); ++i) {
    js[i]->Q = Q[i];
    js[i]->l = l;
    ++js[i]->passes;
  }
  project(js);
  for (int64_t it = 0; c.fixed() && it < c.power_iters; ++it) {
    power_step(js);
    project(js);
  }
  ritz_rounds(js, c);
}

// ΔW −= Σ_{i<k} (σ_i − F(σ_i)) u_i v_iᵀ with the Ritz triplets u_i = Q ub_i, σ_i v_i = Bᵀ ub_i, that is
// (Q Ub_k)(Bᵀ Ub_k diag(coeff_k))ᵀ: one in-place GEMM on A. coeff is 0 for values left alone, so the
// fixed-rank mode passes all l columns and never needs k on the host.
void apply_correction(Job& j, int64_t k) {
  PRUNE_EXT_PHASE("correction");
  const at::ScalarType ct = j.A.scalar_type();
  const Tensor Ub_k = j.Ub.narrow(1, 0, k), coeff_k = j.coeff.narrow(0, 0, k);
  // Columns left alone are exact zeros on both sides (NaN · 0 would be NaN): A is then bitwise unchanged.
  const Tensor unchanged = coeff_k == 0;
  const Tensor left = j.Q.mm(Ub_k.to(ct)).masked_fill_(unchanged, 0);
  // (in the working precision: its rounding is that of storing the result, and a float64 product would
  // cost a conversion of B and a GEMM at a quarter of the speed)
  const Tensor right = j.B.t().mm((Ub_k * coeff_k).to(ct)).masked_fill_(unchanged, 0);
  j.A.addmm_(left, right.t(), 1, -1);
  ++j.passes;
  if (!j.in_place) j.delta.copy_(j.A);
}

// The passes over ΔW go into the stats row last (a device write from a host count: no read back).
void record_passes(Job& j) { j.out_stats[kStatPasses].fill_(static_cast<double>(j.passes)); }

void set_result(Job& j, int64_t k) {
  j.out_before = j.before.narrow(0, 0, k);
  j.out_after = j.after.narrow(0, 0, k);
  j.out_stats = j.stats;
  record_passes(j);
}

void set_host_result(Job& j, const std::vector<double>& before, const std::vector<double>& after,
                     double (&stats)[kNumStats]) {
  stats[kStatPasses] = static_cast<double>(j.passes);
  auto opts = at::TensorOptions().dtype(at::kDouble);
  j.out_before = at::tensor(before, opts).to(j.delta.device());
  j.out_after = at::tensor(after, opts).to(j.delta.device());
  j.out_stats = at::tensor(std::vector<double>(stats, stats + kNumStats), opts).to(j.delta.device());
}

void check_finite(double frob, const Tensor& A) {
  if (std::isfinite(frob)) return;
  TORCH_CHECK_VALUE(to_host(at::isfinite(A).all())[0] != 0, "prune_ext: delta contains NaN or Inf");
  TORCH_CHECK_VALUE(false, "prune_ext: ‖delta‖_F overflows ", A.scalar_type(), "; scale it down first");
}

// Float32 matrices go dense in float64 when they are small (cheap at that size), or when ‖ΔW‖_F / t is
// so large that float32 cannot place the directions at the threshold's level (a float32 SVD resolves a
// direction to about ε σ1 / gap): the result is then exact to its own rounding even when the
// restraint removes most of ΔW's norm.
bool widens(const Job& j, double frob) {
  if (j.A.scalar_type() != at::kFloat) return false;
  return (j.p <= kWidenBelow && j.A.numel() <= kWidenElems) || frob > kWidenRatio * j.t;
}

// A dense SVD: for small matrices, and where the sketch cannot resolve the spectrum cheaply. (Its passes
// are counted as one, the correction as another.)
void dense(Job& j, double frob, const Config& c) {
  double stats[kNumStats] = {0, 0, frob, 1, kMethodNormBound, 0, frob, 0, 0};
  if (frob <= j.t) return set_host_result(j, {}, {}, stats);  // σmax ≤ ‖ΔW‖_F ≤ t: nothing above
  PRUNE_EXT_PHASE("dense_svd");
  const Tensor& A = j.A;
  const bool widen = widens(j, frob);
  const Tensor Aw = widen ? A.to(at::kDouble) : A;
  auto [U, S, Vh] = at::linalg_svd(Aw, false);
  ++j.passes;
  const std::vector<double> s = to_host(S);
  const int64_t k = std::count_if(s.begin(), s.end(), [&](double v) { return v > j.t; });
  stats[kStatRestrained] = k;
  stats[kStatRankExplored] = static_cast<double>(s.size());
  stats[kStatSigmaNextBound] = k < static_cast<int64_t>(s.size()) ? s[k] : 0.0;
  stats[kStatMethod] = kMethodDense;
  stats[kStatResidual] = 0;
  std::vector<double> before(s.begin(), s.begin() + k), after(k), shrink(k);
  for (int64_t i = 0; i < k; ++i) {
    after[i] = restrained_value(s[i], j.t, c.fn, c.param);
    shrink[i] = s[i] - after[i];
  }
  if (k > 0) ++j.passes;
  set_host_result(j, before, after, stats);
  if (k == 0) return;
  const Tensor d = at::tensor(shrink, at::TensorOptions().dtype(at::kDouble)).to(Aw.options());
  const Tensor left = U.narrow(1, 0, k) * d, right = Vh.narrow(0, 0, k);
  if (widen) {
    j.delta.copy_(at::addmm(Aw, left, right, 1, -1));
    return;
  }
  j.A.addmm_(left, right, 1, -1);
  if (!j.in_place) j.delta.copy_(j.A);
}

// The Ritz values trusted to size the next round: a range finder with l columns resolves about the top
// l − oversample values of ΔW.
int64_t trusted(int64_t l, const Config& c) { return std::max<int64_t>(1, l - c.oversample); }

// What the host reads of a round: the stats row; max_i |σ_i − F(σ_i)| / σ_i, the factor by which F
// scales the error of a Ritz pair into the correction (large where F is steep: small thresholds, α near
// 1); and the evidence that sizes the next round: the energy ‖ΔW‖_F² − Σ_{i≤a} s_i² not accounted for
// by the a trusted Ritz values and the smallest of them, s_a; and the energy left outside the first j
// columns of Q for j = l and j = 3l/4, ‖ΔW‖_F² − ‖B_{1..j}‖_F² (the basis is nested, so these are the
// residual energies a sketch of j columns would have left: the decay of that curve with j); last, the
// orthogonality defect of the bases built since the last read (0 with Householder QR).
constexpr int64_t kRead = kNumStats + 6;
constexpr int64_t kReadDefect = kRead - 1;
int64_t curve_start(int64_t l) { return std::max<int64_t>(1, 3 * l / 4); }
Tensor round_read(const Job& j, const Config& c) {
  const int64_t a = std::min(j.l, trusted(j.l, c));
  const Tensor f2 = j.frob.square();
  const Tensor unexplained = f2 - j.s.narrow(0, 0, a).square().sum();
  const Tensor& rows = j.row_sq;
  const Tensor left_l = f2 - rows.sum(), left_j0 = f2 - rows.narrow(0, 0, curve_start(j.l)).sum();
  const Tensor defect = j.q_defect.defined() ? j.q_defect.reshape({1}) : at::zeros({1}, f2.options());
  return at::cat({j.stats, j.coeff.abs().max().reshape({1}), unexplained.reshape({1}), j.s.narrow(0, a - 1, 1),
                  left_l.reshape({1}), left_j0.reshape({1}), defect});
}

// The size of the next subspace, from the round's evidence (`ev`: the entries of round_read after the
// stats row). Two estimates of where the residual vanishes:
//   values: how many values of the size of the smallest trusted Ritz value s_a the unexplained energy E
//     would take, E / s_a², doubled (the tail below s_a decays, so it holds more values than that, while
//     the Ritz values of a sketch without power iterations underestimate it), plus a and oversample;
//   curve: the sketch size at which the residual-energy curve of the nested basis, extrapolated
//     geometrically from 3l/4 to l, falls to t²/4.
// The first growth (from the blind first sketch, or from a hinted one that fell short) takes the smaller
// of the two, at least doubling and at most 4l (so that no estimate alone sends a matrix to the dense
// SVD). Later growth takes the curve between 1.5l and 2l (by then E is mostly what the top directions
// still miss, which says little about how many more there are). Never less than k + 2 · oversample.
// Measured on the benchmark's spectra (ranks 100–1000, a 100× range over the rank) and the tests'
// (decaying over 10³, spikes, clustered): see README, "How it is fast and exact".
int64_t next_size(const Job& j, int64_t k, const double* ev, const Config& c) {
  const double unexplained = ev[1], s_a = ev[2], left_l = ev[3], left_j0 = ev[4];
  const double l = static_cast<double>(j.l);
  const int64_t j0 = curve_start(j.l);
  const double goal = 0.25 * j.t * j.t;
  double curve = std::numeric_limits<double>::infinity();
  if (j0 < j.l && !(left_l > goal)) {
    curve = l;  // little energy left: what fails is a margin at the threshold
  } else if (j0 < j.l && left_j0 > left_l) {
    const double rate = std::log(left_l / left_j0) / static_cast<double>(j.l - j0);  // < 0
    curve = l + std::log(goal / left_l) / rate;
  }
  double estimate;
  if (!j.grown) {
    double values = std::numeric_limits<double>::infinity();
    if (unexplained > 0 && s_a > 0) values = trusted(j.l, c) + 2 * std::ceil(unexplained / (s_a * s_a)) + c.oversample;
    estimate = std::max(kGrowth * l, std::min({values, curve, 4 * l}));  // NaN-safe: min/max keep the bounds
  } else {
    estimate = std::clamp(std::isfinite(curve) ? curve : kGrowth * l, 1.5 * l, kGrowth * l);
  }
  const int64_t target = std::max<int64_t>(static_cast<int64_t>(std::ceil(estimate)), k + 2 * c.oversample);
  return std::min(target, j.p);
}

// Grows the subspace to `target` columns; false when a dense SVD is cheaper. The products with the
// columns already there (B's rows) are kept; the new ones take two passes (sketch, projection).
bool grow(Job& j, int64_t target, const Config& c) {
  if (target > j.p / 2) return false;
  // New sketch columns: entries the earlier ones did not use.
  j.Q = extend_basis(j, fold(j.A, target - j.l, c.seed, j.n * j.l));
  j.B = at::cat({j.B, times_At(j.Q.narrow(1, j.l, target - j.l), j.A)}, 0);
  j.passes += 2;
  j.l = target;
  j.grown = true;
  return true;
}

// The adaptive search of one job, as a step function the caller drives for all jobs at once: each step
// takes what the host has just read for this job and either finishes the job or enqueues its next device
// work and returns the (float64) tensor it needs read next. So `restrain_many` reads back once per round
// for all matrices still searching (lockstep), not once per round and matrix; each job's device work, and
// so its result, is exactly what it would be alone. Certified at once in the common case (edits are low
// rank); otherwise the subspace grows, subspace iterations sharpen the Ritz vectors, or a dense SVD takes
// over (which reads its values on its own).
struct Search {
  Job* j = nullptr;
  double frob = 0, accuracy = 0, floor_ok = 0, last_res = -1;
  std::vector<double> st;      // the last round's summary (round_read)
  bool awaiting_ritz = false;  // the pending read is the largest Ritz residual, not a round summary
};

Search start_search(Job& j, double frob) {
  Search s;
  s.j = &j;
  s.frob = frob;
  // Correction errors (Ritz residual × F's amplification) of ~1e-6 (float32) / ~1e-11 (float64) of
  // ‖ΔW‖_F are the target, and the rounding floor of the working precision the limit.
  s.accuracy = (j.A.scalar_type() == at::kDouble ? 1e-11 : 3e-6) * frob;
  s.floor_ok = 1e3 * unit_roundoff(j.A.scalar_type()) * frob;
  return s;
}

Tensor after_ritz(Search& s, double max_res, const Config& c);

// A round's summary has been read: decide.
Tensor after_round(Search& s, const Config& c) {
  Job& j = *s.j;
  const std::vector<double>& st = s.st;
  if (!(st[kReadDefect] <= kCholeskyQrDefect)) {
    // A basis Cholesky QR could not orthonormalise (the round's summary rests on it): this job starts
    // again from a first round of the same size by Householder QR. Counted in the profiler.
    RECORD_FUNCTION("prune_ext::qr_fallback", std::vector<c10::IValue>());
    j.cholesky = false;
    j.q_defect = Tensor();
    j.powers = 0;
    first_rounds({&j}, j.l, c);
    return round_read(j, c);
  }
  j.q_defect = Tensor();  // read: the next round reports its own bases
  if (static_cast<int64_t>(st[kStatMethod]) == kMethodNormBound) {
    set_result(j, 0);
    return {};
  }
  const int64_t k = static_cast<int64_t>(st[kStatRestrained]);
  if ((k + c.oversample > j.l && j.l < j.p) || st[kStatCertified] == 0) {
    if (!grow(j, next_size(j, k, st.data() + kNumStats, c), c)) {
      dense(j, s.frob, c);
      return {};
    }
    ritz_rounds({&j}, c);
    return round_read(j, c);
  }
  if (k == 0) {
    set_result(j, 0);
    return {};
  }
  const double amp = std::max(1.0, st[kNumStats]);
  // ‖R‖_F bounds every Ritz residual (QB v_i = σ_i u_i, so ΔW v_i − σ_i u_i = R v_i); only when it
  // misses the accuracy target are the residuals computed one by one.
  const double resid = st[kStatResidual];
  if (resid * amp > s.accuracy) {
    const at::ScalarType ct = j.A.scalar_type();
    const Tensor Ub_k = j.Ub.narrow(1, 0, k), s_k = j.s.narrow(0, 0, k);
    const Tensor V_k = (j.B.to(at::kDouble).t().mm(Ub_k) / s_k).to(ct);
    const Tensor U_k = j.Q.mm(Ub_k.to(ct));
    const Tensor ritz = at::linalg_vector_norm(times_A(j.A, V_k) - U_k * s_k.to(ct), 2, {0});
    ++j.passes;
    s.awaiting_ritz = true;
    return at::max(ritz).to(at::kDouble).reshape({1});
  }
  return after_ritz(s, resid, c);
}

// The largest Ritz residual is known (or bounded by ‖R‖_F): correct, iterate, or go dense.
Tensor after_ritz(Search& s, double max_res, const Config& c) {
  Job& j = *s.j;
  const std::vector<double>& st = s.st;
  const int64_t k = static_cast<int64_t>(st[kStatRestrained]);
  const double amp = std::max(1.0, st[kNumStats]);
  if (max_res * amp > s.accuracy) {
    // Subspace iterations shrink the Ritz residuals geometrically until they reach the rounding
    // floor of the working precision; stagnation at a small floor is as accurate as it gets, unless
    // a dense SVD would be done in float64 (small float32 matrices): then that is exact instead.
    const bool stagnated = s.last_res >= 0 && max_res > 0.5 * s.last_res;
    if (!stagnated && j.powers < c.power_iters) {
      s.last_res = max_res;
      power_step({&j});  // from B = QᵀA of this round
      project({&j});
      ritz_rounds({&j}, c);
      return round_read(j, c);
    }
    if (!(stagnated && max_res * amp <= s.floor_ok) || widens(j, s.frob)) {
      dense(j, s.frob, c);
      return {};
    }
  }
  apply_correction(j, k);
  set_result(j, k);
  if (max_res != st[kStatResidual]) j.out_stats[kStatRitzResidual].fill_(max_res);
  return {};
}

// One step of a search with the values just read for it.
Tensor advance(Search& s, std::vector<double> read, const Config& c) {
  if (s.awaiting_ritz) {
    s.awaiting_ritz = false;
    return after_ritz(s, std::min(s.st[kStatResidual], read[0]), c);
  }
  s.st = std::move(read);
  return after_round(s, c);
}

// Drives every search to its end, one host read per round for all of them.
void finish_adaptive(std::vector<Search>& searches, const std::vector<std::vector<double>>& first, const Config& c) {
  std::vector<Tensor> pending(searches.size());
  for (size_t i = 0; i < searches.size(); ++i) pending[i] = advance(searches[i], first[i], c);
  while (true) {
    std::vector<Tensor> parts;
    std::vector<size_t> who;
    for (size_t i = 0; i < searches.size(); ++i)
      if (pending[i].defined()) {
        parts.push_back(pending[i]);
        who.push_back(i);
      }
    if (parts.empty()) return;
    const std::vector<double> host = to_host(at::cat(parts));
    size_t at = 0;
    for (size_t n = 0; n < who.size(); ++n) {
      const size_t i = who[n], len = static_cast<size_t>(parts[n].numel());
      pending[i] = advance(searches[i], std::vector<double>(host.begin() + at, host.begin() + at + len), c);
      at += len;
    }
  }
}

Tensor pad_rows(const std::vector<Tensor>& rows, const at::Device& device) {
  int64_t width = 0;
  for (const Tensor& r : rows) width = std::max(width, r.numel());
  Tensor out = at::zeros({static_cast<int64_t>(rows.size()), width}, at::TensorOptions().dtype(at::kDouble).device(device));
  for (size_t i = 0; i < rows.size(); ++i)
    if (rows[i].numel() > 0) out[i].narrow(0, 0, rows[i].numel()).copy_(rows[i]);
  return out;
}

// The size of the first subspace: `rank` in fixed-rank mode; else the hinted rank plus the
// oversampling when the caller gave a bound (a bound that is wrong only costs rounds: the certificate is
// checked as always), else kInitialRank.
int64_t first_size(const Job& j, const Config& c) {
  if (c.fixed()) return std::min(c.rank, j.p);
  if (c.rank_hint > 0) return std::min(j.p, std::max<int64_t>(1, c.rank_hint + c.oversample));
  return std::min(j.p, std::max(kInitialRank, 2 * c.oversample));
}

// The whole call. Every job's first round is enqueued before anything is read back (jobs of equal
// shape share batched factorisations); then one device-to-host transfer brings every ‖ΔW‖_F and
// first-round summary, NaN or Inf anywhere is reported before any matrix is written, and the searches
// go on in lockstep (one read per later round for all). The fixed-rank mode reads nothing back: its correction uses every explored
// direction, with coefficient 0 for values left alone (no host round trip, so CUDA-graph capturable).
void run_jobs(std::vector<Job>& jobs, const Config& c) {
  std::vector<Job*> randomized, small;
  std::map<std::tuple<int64_t, int64_t, int64_t, int64_t>, std::vector<Job*>> groups;
  for (Job& j : jobs) {
    if (j.A.numel() == 0) {
      j.passes = 0;
      double stats[kNumStats] = {0, 0, 0, 1, kMethodNone, 0, 0, 0, 0};
      set_host_result(j, {}, {}, stats);
      continue;
    }
    const int64_t l = first_size(j, c);
    if (!c.fixed() && (j.p <= kDenseBelow || l > j.p / 2)) {
      small.push_back(&j);
      continue;
    }
    randomized.push_back(&j);
    groups[{j.m, j.n, static_cast<int64_t>(j.A.scalar_type()), l}].push_back(&j);
  }
  for (auto& [key, js] : groups) first_rounds(js, std::get<3>(key), c);

  if (c.fixed()) {
    for (Job* j : randomized) {
      apply_correction(*j, j->l);
      set_result(*j, j->l);
    }
    return;
  }
  std::vector<Tensor> parts;
  for (Job* j : small) parts.push_back(j->frob.reshape({1}));
  for (Job* j : randomized) parts.push_back(at::cat({j->frob.reshape({1}), round_read(*j, c)}));
  if (parts.empty()) return;
  const std::vector<double> host = to_host(at::cat(parts));
  const size_t offset = small.size();
  std::vector<double> frobs(host.begin(), host.begin() + offset);
  constexpr size_t kRow = kRead + 1;  // ‖ΔW‖_F, then round_read
  for (size_t i = 0; i < randomized.size(); ++i) frobs.push_back(host[offset + i * kRow]);
  std::vector<Job*> all(small);
  all.insert(all.end(), randomized.begin(), randomized.end());
  for (size_t i = 0; i < all.size(); ++i) check_finite(frobs[i], all[i]->A);

  for (size_t i = 0; i < small.size(); ++i) dense(*small[i], frobs[i], c);
  std::vector<Search> searches;
  std::vector<std::vector<double>> first;
  for (size_t i = 0; i < randomized.size(); ++i) {
    const double* row = host.data() + offset + i * kRow + 1;
    searches.push_back(start_search(*randomized[i], frobs[offset + i]));
    first.emplace_back(row, row + kRead);
  }
  finish_adaptive(searches, first, c);
}

// F magnifies the rounding of a value near the threshold by its slope, F'(t) = 1 / (t ln α) for the log
// F (the linear F's 1/β is below 1). Float32 places values to about ε σ1, so past this slope it cannot
// meet the accuracy target, and the restraint is computed in float64 instead (only for thresholds far
// below any real weight's σmax: t < 0.2 for α = 1.2).
constexpr double kSteepSlope = 25;

bool steep(double t, const Config& c) { return c.fn == kLogFn && 1 / (t * std::log(c.param)) > kSteepSlope; }

std::vector<Job> make_jobs(at::TensorList deltas, at::ArrayRef<double> thresholds, const Config& c) {
  std::vector<Job> jobs(deltas.size());
  for (size_t i = 0; i < deltas.size(); ++i) {
    Job& j = jobs[i];
    j.delta = deltas[i];
    j.t = thresholds[i];
    j.m = j.delta.size(0);
    j.n = j.delta.size(1);
    j.p = std::min(j.m, j.n);
    // Work on delta itself when BLAS can read it (row- or column-major float32/float64); otherwise on
    // one compute-dtype copy, written back at the end.
    const Tensor& d = j.delta;
    const at::ScalarType ct = steep(j.t, c) ? at::kDouble : compute_dtype(d.scalar_type());
    const bool blas_layout = (d.stride(1) == 1 && d.stride(0) >= std::max<int64_t>(1, j.n)) ||
                             (d.stride(0) == 1 && d.stride(1) >= std::max<int64_t>(1, j.m));
    j.in_place = d.scalar_type() == ct && blas_layout;
    j.A = j.in_place ? d : d.to(d.options().dtype(ct), false, true, at::MemoryFormat::Contiguous);
    j.frob = [&] {
      PRUNE_EXT_PHASE("norm");
      return at::linalg_vector_norm(j.A, 2).to(at::kDouble);
    }();
    j.passes = 1;
    j.cholesky = !c.fixed() && (!j.A.is_cpu() || cholesky_everywhere());
  }
  return jobs;
}

// Runs the jobs; a factorisation that fails (NaN or Inf can make it fail before any norm is read) is
// reported as what is wrong with the input.
void run_checked(std::vector<Job>& jobs, const Config& c) {
  try {
    run_jobs(jobs, c);
  } catch (const c10::Error&) {
    for (const Job& j : jobs)
      if (j.A.numel() > 0) check_finite(to_host(j.frob)[0], j.A);
    throw;
  }
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> restrain_(Tensor& delta, double threshold, int64_t fn, double param,
                                             int64_t rank, int64_t oversample, int64_t power_iters,
                                             int64_t seed, int64_t rank_hint) {
  check_matrix(delta, "delta");
  check_restraint_args(threshold, fn, param);
  check_sketch_args(rank, oversample, power_iters, rank_hint);
  const Config c{fn, param, rank, oversample, power_iters, seed, rank_hint};
  std::vector<Job> jobs = make_jobs({delta}, {threshold}, c);
  run_checked(jobs, c);
  return {jobs[0].out_before, jobs[0].out_after, jobs[0].out_stats};
}

std::tuple<Tensor, Tensor, Tensor> restrain_many_(at::TensorList deltas, at::ArrayRef<double> thresholds,
                                                  int64_t fn, double param, int64_t rank, int64_t oversample,
                                                  int64_t power_iters, int64_t seed, int64_t rank_hint) {
  TORCH_CHECK_VALUE(deltas.size() == thresholds.size(), "prune_ext: got ", deltas.size(), " matrices but ",
                    thresholds.size(), " thresholds");
  // Validate everything first, so that a bad argument leaves every matrix untouched.
  for (size_t i = 0; i < deltas.size(); ++i) {
    check_matrix(deltas[i], "every delta");
    check_restraint_args(thresholds[i], fn, param);
  }
  check_sketch_args(rank, oversample, power_iters, rank_hint);
  const at::Device device = deltas.empty() ? at::Device(at::kCPU) : deltas[0].device();
  for (const Tensor& d : deltas)
    TORCH_CHECK_VALUE(d.device() == device, "prune_ext: restrain_many_ needs every matrix on one device, got ",
                      device, " and ", d.device());
  auto opts = at::TensorOptions().dtype(at::kDouble).device(device);
  if (deltas.empty()) return {at::zeros({0, 0}, opts), at::zeros({0, 0}, opts), at::zeros({0, kNumStats}, opts)};
  const Config c{fn, param, rank, oversample, power_iters, seed, rank_hint};
  std::vector<Job> jobs = make_jobs(deltas, thresholds, c);
  run_checked(jobs, c);
  std::vector<Tensor> before, after, stats;
  for (const Job& j : jobs) {
    before.push_back(j.out_before);
    after.push_back(j.out_after);
    stats.push_back(j.out_stats);
  }
  return {pad_rows(before, device), pad_rows(after, device), at::stack(stats)};
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
  Tensor v = sketch(A, n, 1, seed, 0);
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
