// Operator schemas (defined once, for every backend) and the Python module stub.
// Kernels: csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA, when built with CUDA).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import prune_ext._C` runs the static TORCH_LIBRARY registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
#ifdef PRUNE_EXT_WITH_CUDA
  PyModule_AddIntConstant(m, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(m, "WITH_CUDA", 0);
#endif
  return m;
}
}

TORCH_LIBRARY(prune_ext, m) {
  // In place on `delta`. Returns (sigma_before, sigma_after, stats): the restrained singular values
  // before and after F (float64, length k) and the float64 stats vector described in restrain.h.
  // fn: 0 = log (param = α), 1 = linear (param = β). rank > 0 fixes the sketch size (no growth, no host
  // read): then sigma_before / sigma_after hold all min(rank, min(m, n)) Ritz values, the first k changed.
  // rank_hint > 0 (adaptive mode): a bound on the rank of ΔW that sizes the first subspace; checked.
  m.def(
      "restrain_(Tensor(a!) delta, float threshold, int fn, float param, int rank, int oversample, "
      "int power_iters, int seed, int rank_hint=0) -> (Tensor, Tensor, Tensor)");
  // The same for a list of matrices: sigma_before / sigma_after are (L, kmax) zero-padded rows, stats is
  // (L, 9). (Tensor-list outputs beside a mutated tensor list cannot be functionalised, hence padding.)
  m.def(
      "restrain_many_(Tensor(a!)[] deltas, float[] thresholds, int fn, float param, int rank, "
      "int oversample, int power_iters, int seed, int rank_hint=0) -> (Tensor, Tensor, Tensor)");
  // Elementwise F on singular values (values at or below the threshold pass through).
  m.def("restrain_values(Tensor sigma, float threshold, int fn, float param) -> Tensor");
  // Exact thin SVD of left @ right.T from its factors in O((m + n) r^2): returns (U, S, V).
  m.def("factored_svd(Tensor left, Tensor right) -> (Tensor, Tensor, Tensor)");
  // σmax by Golub–Kahan–Lanczos; returns float64 [sigma, residual bound, iterations, converged].
  m.def("spectral_norm(Tensor W, float rtol, int max_iters, int seed) -> Tensor");
  // Internal building blocks of the algorithms (csrc/restrain.h), one kernel per backend.
  m.def("_sketch(Tensor like, int rows, int cols, int seed, int offset) -> Tensor");
  m.def("_fold_sketch(Tensor A, int cols, int seed, int offset) -> Tensor");
  m.def("_small_svd(Tensor T) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("_jacobi_svd(Tensor T, int sweeps) -> (Tensor, Tensor, Tensor)");
  m.def("_cholesky_qr(Tensor Y) -> (Tensor, Tensor)");
  m.def(
      "_summarize_rounds(Tensor s, Tensor resid_sq, Tensor frob, float[] thresholds, float band_factor, int fn, "
      "float param, int power_iters) -> (Tensor, Tensor, Tensor, Tensor)");
  // CUDA only: restrain_ with the top triplets from cuSOLVER's randomized SVD (cusolverDnXgesvdr) instead
  // of the certified range finder; same outputs, stats method 4, never certified. rank > 0 fixes k.
  m.def(
      "restrain_gesvdr_(Tensor(a!) delta, float threshold, int fn, float param, int rank, int oversample, "
      "int power_iters, int seed) -> (Tensor, Tensor, Tensor)");
}
