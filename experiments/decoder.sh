#!/usr/bin/env bash
# The causal-LM job's runs behind experiments/results/decoder.md: SmolLM2-135M-Instruct on E2E NLG
# (experiment=decoder: one epoch), LoRA (the app's default recipe) on seeds 0-2 and full fine-tuning (lr 1e-4) on
# seeds 0-1, two runs at a time with one thread each (hydra/launcher=joblib). Needs `bash scripts/install.sh
# decoder` (the E2E data). About 50 min on two cores. Then: python -m experiments decoder
set -euo pipefail
cd "$(dirname "$0")/.."
COMMON=(experiment=decoder experiment_name=smollm2 logger=csv progress=none hydra/launcher=joblib hydra.launcher.n_jobs=2)
.venv/bin/lora-train -m "${COMMON[@]}" "seed=${LORA_SEEDS:-0,1,2}" "hydra.sweep.dir=multirun/smollm2/lora"
.venv/bin/lora-train -m "${COMMON[@]}" lora=full "seed=${FULL_SEEDS:-0,1}" "hydra.sweep.dir=multirun/smollm2/full"
