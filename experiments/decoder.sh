#!/usr/bin/env bash
# The causal-LM job's runs behind experiments/results/decoder.md (issue 20): SmolLM2-135M-Instruct on E2E NLG,
# LoRA (the app's default recipe) and full fine-tuning, one epoch, seeds 0-2, two runs at a time with one
# thread each (hydra/launcher=joblib). Needs `bash scripts/install.sh decoder` (the E2E data). About 50 min on
# two cores. Then: python -m experiments.decoder
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-0,1,2}
EPOCHS=${EPOCHS:-1}
COMMON=(model=smollm2 data=e2e_nlg logger=csv progress=none experiment_name=smollm2 "seed=$SEEDS"
        "trainer.max_epochs=$EPOCHS" hydra/launcher=joblib hydra.launcher.n_jobs=2)
.venv/bin/lora-train -m "${COMMON[@]}" "hydra.sweep.dir=multirun/smollm2/lora"
.venv/bin/lora-train -m "${COMMON[@]}" lora=full "hydra.sweep.dir=multirun/smollm2/full"
