#!/usr/bin/env bash
# The GPU checks of issue 3 in one run, for a machine with an NVIDIA GPU, nvcc and a CUDA build of torch
# already installed (the device machines lent to some tasks: python3 there holds torch 2.11+cu130,
# pytest and cupy; nothing can be downloaded). Builds the extension in place for the local GPU only,
# runs the CUDA tests and the device-parametrised core tests, then the GPU benchmark. Logs go to
# ${OUT:-gpu-check}/ (gpu_tests.log, bench_gpu.log).
#
#   bash scripts/gpu_check.sh            # about 5-8 minutes on an H100 (build ~2, tests ~1, bench ~3)
#   QUICK=1 bash scripts/gpu_check.sh    # the benchmark's --quick variant
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || exit 1
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" || exit 1

# Only the local architecture: a build for one GPU, not the CI's list.
arch=$($py -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
t0=$(date +%s)
PRUNE_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=${MAX_JOBS:-16} \
  $py setup.py -q build_ext --inplace > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
echo "[gpu_check] built for sm_${arch/./} in $(( $(date +%s) - t0 )) s"
$py -c "import prune_ext, torch; assert prune_ext.WITH_CUDA; print('prune_ext', prune_ext.__version__, 'WITH_CUDA', prune_ext.WITH_CUDA)" || exit 1

# Tests: every CUDA test, and the core tests that parametrise over devices (hypothesis may be absent:
# then test_restrain.py is skipped, not failed).
tests=(tests/test_cuda.py "tests/test_devices.py::test_cuda_run_keeps_books_and_restraint_on_the_gpu"
       "tests/test_devices.py::test_two_gpu_device_map")
$py -c "import hypothesis" 2>/dev/null && tests+=(tests/test_restrain.py)
t0=$(date +%s)
$py -m pytest -q -p no:cacheprovider -rs "${tests[@]}" 2>&1 | tee "$out/gpu_tests.log"
test_rc=${PIPESTATUS[0]}
echo "[gpu_check] tests exit $test_rc in $(( $(date +%s) - t0 )) s"

t0=$(date +%s)
$py benchmarks/bench_gpu.py ${QUICK:+--quick} 2>&1 | tee "$out/bench_gpu.log"
echo "[gpu_check] benchmark in $(( $(date +%s) - t0 )) s"
exit "$test_rc"
