#!/usr/bin/env bash
# Issue 18: the sweeps behind the default recipe (experiments/README.md, "The default recipe").
#   bash experiments/recipe.sh search   # seed 0: lr x targets for LoRA, lr for full fine-tuning, head only
#   bash experiments/recipe.sh final LORA_LR LORA_TARGETS "RT_FULL_LR TREC_FULL_LR SPEECH_FULL_LR NG_FULL_LR"
#                                        # seeds 1,2,3: the chosen LoRA default, full FT at its best lr, head only
# Two streams of single-threaded runs, one per core (taskset), each over two data sets.
set -euo pipefail
cd "$(dirname "$0")/.."
TRAIN=".venv/bin/python -m lora_lightning.app.train"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true PYTHONWARNINGS=ignore
stage=${1:?search or final}
mkdir -p experiments/logs

stream() {  # core, data sets...
  local core=$1; shift
  for data in "$@"; do
    if [ "$stage" = search ]; then
      taskset -c "$core" $TRAIN -m experiment=recipe data="$data" seed=0 'lora.lr=1e-3,2e-3,4e-3' 'lora.targets=[q,v],[q,k,v,o]' \
        hydra.sweep.dir="multirun/recipe/search-$data-lora"
      taskset -c "$core" $TRAIN -m experiment=recipe data="$data" seed=0 lora=full 'lora.lr=5e-5,1e-4,2e-4' \
        hydra.sweep.dir="multirun/recipe/search-$data-full"
      taskset -c "$core" $TRAIN -m experiment=recipe data="$data" seed=0 lora=head_only hydra.sweep.dir="multirun/recipe/search-$data-head"
    else
      local full_lr=${FULL_LR[$data]}
      taskset -c "$core" $TRAIN -m experiment=recipe data="$data" seed=1,2,3 lora.lr="$LORA_LR" "lora.targets=$LORA_TARGETS" \
        hydra.sweep.dir="multirun/recipe/final-$data-lora"
      taskset -c "$core" $TRAIN -m experiment=recipe data="$data" seed=1,2,3 lora=full lora.lr="$full_lr" \
        hydra.sweep.dir="multirun/recipe/final-$data-full"
      taskset -c "$core" $TRAIN -m experiment=recipe data="$data" seed=1,2,3 lora=head_only hydra.sweep.dir="multirun/recipe/final-$data-head"
    fi
  done
}

if [ "$stage" = final ]; then
  LORA_LR=${2:?lora lr}; LORA_TARGETS=${3:?lora targets, e.g. [q,k,v,o]}
  read -r -a lrs <<<"${4:?four full-FT lrs}"
  declare -A FULL_LR=([rotten_tomatoes]=${lrs[0]} [trec]=${lrs[1]} [convention_speeches]=${lrs[2]} [newsgroups]=${lrs[3]})
fi
stream 0 rotten_tomatoes convention_speeches >"experiments/logs/recipe_${stage}_a.log" 2>&1 &
stream 1 trec newsgroups >"experiments/logs/recipe_${stage}_b.log" 2>&1 &
wait
