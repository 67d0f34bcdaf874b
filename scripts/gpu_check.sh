#!/usr/bin/env bash
# The GPU checks of issue 23 in one short run, for a machine with an NVIDIA GPU, nvcc and a CUDA build of
# torch already installed (the device machines lent to some tasks: python3 there holds torch 2.11+cu130,
# pytest, pytest-xdist, hypothesis and cupy; nothing can be downloaded). Made to survive its own failures:
#   * builds the extension in place for the local GPU's architecture only (about 1 min with 16 jobs);
#   * runs every crash-prone test file in a process of its own, under pytest-xdist when it is there (a
#     worker that dies, SIGSEGV included, is replaced and its test reported as failed: later tests run);
#     tests/test_gpu_paths_cpu.py (CPU only) is left to the CPU machines;
#   * writes every log as it goes under ${OUT:-gpu-check}/ (build.log, env.txt, tests_<file>.log and
#     .xml, bench_gpu.log, bench_gpu.json, summary.txt), so a run cut short still says what it saw;
#   * the benchmark prints a per-phase CUDA-kernel time table first, then every row as it is measured.
# Each step has a time limit; the whole run stays under 8 minutes on an H100/H200.
#
#   OUT=/some/folder bash scripts/gpu_check.sh   # full run (build ~1, tests ~2-3, bench ~3 min)
#   QUICK=1 bash scripts/gpu_check.sh            # the benchmark's --quick variant (1024 × 2816)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
t_start=$(date +%s)
summary="$out/summary.txt"
: > "$summary"
note() { echo "[gpu_check] $*" | tee -a "$summary"; }

{
  date -u
  git rev-parse HEAD 2>/dev/null || echo "(no git)"
  git status --short 2>/dev/null | head -20
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  nproc
  $py -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  $py -c "import transformers; print('transformers', transformers.__version__)" 2>&1 | tail -1
  nvcc --version | tail -n 1
  c++ --version | head -n 1
} > "$out/env.txt" 2>&1
cat "$out/env.txt"
$py -c "import torch; assert torch.cuda.is_available()" || { note "no GPU visible to torch"; exit 1; }
# The extension needs torch >= 2.4 (torch.library.register_fake); the machines hold 2.11.
$py -c "import torch, sys; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 4))" \
  || { note "torch too old (need >= 2.4)"; exit 1; }

# --- build: the local architecture only -----------------------------------------------------------------
arch=$($py -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
t0=$(date +%s)
PRUNE_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=${MAX_JOBS:-$(nproc)} \
  timeout 300 $py setup.py -q build_ext --inplace > "$out/build.log" 2>&1 \
  || { tail -40 "$out/build.log"; note "build FAILED after $(( $(date +%s) - t0 )) s"; exit 1; }
note "built for sm_${arch/./} in $(( $(date +%s) - t0 )) s"
$py -c "import prune_ext; assert prune_ext.WITH_CUDA; print('prune_ext', prune_ext.__version__, 'WITH_CUDA', prune_ext.WITH_CUDA)" \
  || { note "import of the CUDA build FAILED"; exit 1; }
# Which libstdc++ the build links against, and whether it defines std::ostream code of its own (the
# first run's crash was inside std::ostream in _C.so): recorded for docs/gpu.md.
so=$(ls prune_ext/_C*.so | head -n 1)
{
  echo "== GLIBCXX versions required by $so"; objdump -T "$so" | grep -o 'GLIBCXX_[0-9.]*' | sort -Vu | tail -5
  echo "== std::basic_ostream / num_put code defined inside $so (should be none)"
  nm -DC --defined-only "$so" | grep -E 'basic_ostream|num_put|codecvt' | head -20
  echo "== libstdc++ the process loads"
  $py -c "import torch, prune_ext; print(sorted({l.split()[-1] for l in open('/proc/self/maps') if 'libstdc++' in l}))"
  echo "== host compilers"; c++ --version | head -n 1; nvcc --version | tail -n 1
  ldd "$so" | grep -E 'stdc|c10|torch_cuda|cusolver|cublas'
} > "$out/abi.txt" 2>&1

# --- tests: each file in its own process ------------------------------------------------------------------
xdist=()
$py -c "import xdist" 2>/dev/null && xdist=(-n 2)
run_tests() {  # name, time limit, pytest arguments…
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  timeout "$limit" $py -m pytest -q -p no:cacheprovider -rfEs "${xdist[@]}" --junitxml="$out/tests_$name.xml" "$@" \
    2>&1 | tee "$out/tests_$name.log"
  local rc=${PIPESTATUS[0]}
  note "tests $name: exit $rc in $(( $(date +%s) - t0 )) s ($(tail -n 1 "$out/tests_$name.log"))"
  [ "$rc" -eq 0 ] || failed=1
}
failed=0
run_tests cuda 150 tests/test_cuda.py
$py -c "import hypothesis" 2>/dev/null && run_tests restrain_cuda 100 tests/test_restrain.py -k cuda

# --- benchmark: phases first, then every row as measured, results in JSON -------------------------------
t0=$(date +%s)
left=$(( 420 - (t0 - t_start) ))
[ "$left" -gt 120 ] || left=120
timeout "$left" $py benchmarks/bench_gpu.py ${QUICK:+--quick} --json "$out/bench_gpu.json" 2>&1 \
  | tee "$out/bench_gpu.log"
note "benchmark: exit ${PIPESTATUS[0]} in $(( $(date +%s) - t0 )) s (limit $left s)"

# --- last, with what time is left: the CLI on the GPU (needs the transformers the editors need) ---------
left=$(( 470 - ($(date +%s) - t_start) ))
if [ "$left" -ge 30 ]; then
  run_tests devices "$left" "tests/test_devices.py::test_cuda_run_keeps_books_and_restraint_on_the_gpu" \
    "tests/test_devices.py::test_two_gpu_device_map"
else
  note "tests devices: skipped (no time left)"
fi
note "whole run: $(( $(date +%s) - t_start )) s"
exit "$failed"
