#!/usr/bin/env bash
# The pre-registered primary comparison (experiments/PREREGISTRATION.md, section 1): LoRA W{q,v} r=8 vs full
# fine-tuning on the ablation task at 150 and 300 steps, seeds 101-117 (SEEDS overrides, e.g. SEEDS='101 102').
# Seed by seed: core 0 runs LoRA at 150 steps then full FT at 300, core 1 full FT at 150 then LoRA at 300 (about the
# same time each), and the next seed starts when both are done, so the four cells always have the same seeds.
# Re-launching skips finished runs. Then: python -m experiments collect && python -m experiments report
#   bash experiments/lora_vs_full.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TRAIN="nice -n 19 .venv/bin/python -m lora_lightning.app.train -m skip_done=true"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true PYTHONWARNINGS=ignore
OUT=multirun/lora_vs_full
LORA_LR=0.002  # the lora-2 family's search lr (python -m experiments ablation-lrs), as in Table 6
FULL_LR=0.0002 # full fine-tuning's search lr, as in the Table 6 reference rows
mkdir -p experiments/logs "$OUT"
git rev-parse HEAD >"$OUT/COMMIT"  # the code the runs trained with (git status lists local changes below it)
git status --short -- lora_lightning >>"$OUT/COMMIT"
for seed in ${SEEDS:-$(seq 101 117)}; do
  (
    taskset -c 0 $TRAIN experiment=lora_vs_full 'lora.targets=[q,v]' lora.r=8 lora.lr=$LORA_LR seed=$seed hydra.sweep.dir="$OUT/150/lora/$seed"
    taskset -c 0 $TRAIN experiment=lora_vs_full_300 lora=full lora.lr=$FULL_LR seed=$seed hydra.sweep.dir="$OUT/300/full/$seed"
  ) >>experiments/logs/lora_vs_full_a.log 2>&1 &
  (
    taskset -c 1 $TRAIN experiment=lora_vs_full lora=full lora.lr=$FULL_LR seed=$seed hydra.sweep.dir="$OUT/150/full/$seed"
    taskset -c 1 $TRAIN experiment=lora_vs_full_300 'lora.targets=[q,v]' lora.r=8 lora.lr=$LORA_LR seed=$seed hydra.sweep.dir="$OUT/300/lora/$seed"
  ) >>experiments/logs/lora_vs_full_b.log 2>&1 &
  wait
  echo "seed $seed done $(date -u +%FT%TZ)" >>experiments/logs/lora_vs_full_progress.log
done
