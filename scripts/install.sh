#!/usr/bin/env bash
# Create .venv (if needed) and install lora-lightning with everything the job and tests need.
# torch is pinned to 2.13.0 first so pip takes the CPU wheel, never a multi-GB CUDA build (the package itself
# accepts torch>=2.4; scripts/check_wheel.sh runs the wheel on torch 2.14.1).
# `bash scripts/install.sh decoder` also installs the causal-LM job's data set (E2E NLG, bigbench; ~2 min).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-assets.txt
if [ "${1:-}" = "decoder" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-decoder-data.txt || {
    echo "install.sh decoder: bigbench==1.0.0 (the E2E NLG data) is not served by your package index; the causal-LM job" \
         "still runs on a JSONL file of {input, target} records: lora-train experiment=decoder data.source=FILE.jsonl" >&2
    exit 1
  }
fi
.venv/bin/python -c "import torch, lightning, lora_lightning; print(f'installed: torch {torch.__version__}, lightning {lightning.__version__}, lora_lightning {lora_lightning.__version__}')"
