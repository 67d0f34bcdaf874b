// CUDA kernel of _fold_sketch: Y = A S for the fold sketch S of restrain_math.h in one launch and one read
// of A (the ATen composition in csrc/restrain.cpp, which other layouts still use, launches two small
// operators per block of columns: hundreds per call at 4096 × 11008, which cost more than the pass).
// Thread (r, j) sums, over the blocks f of A's row r, the entry q = (j − o_f) mod c of the block with its
// sign; the rotations o_f come from fold_rotation (shared code with the CPU), the signs from the sketch
// kernel (the same entries), so the values equal the CPU kernel's up to the order of the sums.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../restrain.h"
#include "../restrain_math.h"
#include "cuda_checks.h"

namespace prune_ext {
namespace cuda {
namespace {

constexpr int kFoldThreads = 256;

template <typename scalar_t>
__global__ void fold_sketch_kernel(const scalar_t* __restrict__ A, int64_t lda, const scalar_t* __restrict__ signs,
                                   scalar_t* __restrict__ Y, int64_t n, int64_t cols, uint64_t seed,
                                   uint64_t offset) {
  const int64_t r = blockIdx.y;
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= cols) return;
  const scalar_t* row = A + r * lda;
  scalar_t acc = 0;
  for (int64_t f0 = 0, f = 0; f0 < n; f0 += cols, ++f) {
    const int64_t o = fold_rotation(seed, offset, f, cols);
    const int64_t q = j >= o ? j - o : j - o + cols;  // position in the block that lands on column j
    const int64_t i = f0 + q;
    if (i < n) acc += signs[i] * row[i];
  }
  Y[r * cols + j] = acc;
}

at::Tensor fold_sketch_cuda(const at::Tensor& A, int64_t cols, int64_t seed, int64_t offset) {
  // Other layouts, degenerate sizes and more rows than a grid's y dimension: the ATen composition.
  if (A.dim() != 2 || A.stride(1) != 1 || A.size(0) == 0 || A.size(1) == 0 || cols <= 0 || A.size(0) > 65535 ||
      !(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble))
    return fold_sketch(A, cols, seed, offset);
  c10::cuda::CUDAGuard guard(A.device());
  const int64_t m = A.size(0), n = A.size(1);
  check_launch_size("fold_sketch columns", cols, static_cast<int64_t>(kFoldThreads) * 2147483647LL);
  at::Tensor Y = at::empty({m, cols}, A.options());
  const at::Tensor signs = sketch(A, 1, n, seed, offset);
  // One row per block in y, its c output columns across threads (whole warps, at most kFoldThreads).
  const int threads = static_cast<int>(std::min<int64_t>(kFoldThreads, (cols + 31) / 32 * 32));
  const dim3 grid(static_cast<unsigned>((cols + threads - 1) / threads), static_cast<unsigned>(m));
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "fold_sketch_cuda", [&] {
    fold_sketch_kernel<scalar_t><<<grid, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        A.const_data_ptr<scalar_t>(), A.stride(0), signs.const_data_ptr<scalar_t>(), Y.mutable_data_ptr<scalar_t>(),
        n, cols, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
    PRUNE_EXT_KERNEL_LAUNCH_CHECK();
  });
  return Y;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(prune_ext, CUDA, m) { m.impl("_fold_sketch", &cuda::fold_sketch_cuda); }

}  // namespace prune_ext
