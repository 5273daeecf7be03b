#!/usr/bin/env bash
# The Lightning-facing tests (lifecycle, callback, checkpoints, multi-adapter fits, distributed, both packages)
# on one Lightning release, in a virtual environment of its own, for lightning.pytorch and pytorch_lightning:
#   bash scripts/lightning_matrix.sh 2.4.0      # the oldest release lora_lightning supports
# (.ci/run runs it for 2.4.0; the newest, 2.6.x, is what scripts/install.sh installs and the whole suite runs on.)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:?usage: scripts/lightning_matrix.sh LIGHTNING_VERSION}
ENV=.venv-lightning-$VERSION
PY=${PYTHON:-python3}
PIP="$ENV/bin/python -m pip install -q --disable-pip-version-check"
[ -x "$ENV/bin/python" ] || "$PY" -m venv "$ENV"
$PIP "torch==2.13.0"
$PIP "lightning==$VERSION" "pytorch-lightning==$VERSION" "torchmetrics>=1.4" "safetensors>=0.4" "pytest>=8" "pytest-xdist>=3.6,<4" "numpy" "packaging" "transformers>=4.44"
$PIP --no-deps -e .
$ENV/bin/python -c "import lightning, pytorch_lightning; print('lightning', lightning.__version__, '/ pytorch_lightning', pytorch_lightning.__version__)"
TESTS=(tests/test_lifecycle.py tests/test_callback.py tests/test_checkpoint.py tests/test_multi_adapter_fit.py tests/test_distributed.py tests/test_legacy_files.py)
for PACKAGE in lightning.pytorch pytorch_lightning; do
  echo "== $PACKAGE $VERSION"
  LORA_LIGHTNING_TEST_PACKAGE=$PACKAGE $ENV/bin/python -m pytest -q -p no:cacheprovider -m "not slow" -n 2 --dist loadfile "${TESTS[@]}"
done
