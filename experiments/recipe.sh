#!/usr/bin/env bash
# The sweeps behind the default recipe (experiments/README.md, "The default recipe").
#   bash experiments/recipe.sh search DATA...        # seed 0: LoRA lr x targets, full FT lr, head only
#   bash experiments/recipe.sh search-full DATA...   # seed 0: full FT lr only (a task held out of the LoRA search)
#   bash experiments/recipe.sh final LORA_LR LORA_TARGETS DATA...
#        # seeds 1,2,3: the chosen LoRA default, full FT at the lr with the best seed-0 validation accuracy
#        # in multirun/recipe/search-DATA-full, head only
#   SEEDS=4,5,6 bash experiments/recipe.sh more-seeds LORA_LR LORA_TARGETS DATA...
#        # further seeds of the two groups the goal compares: the LoRA default on one core, full FT (same lr as
#        # its final runs) on the other, one data set after the other; sweep folders end in -seeds4-5-6
# RUNS=experiments/runs: read the full FT search from the collected or recovered runs instead of multirun/.
# Runs are single-threaded; data sets are split over two streams, one per core (taskset), at low priority.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
TRAIN="nice -n 10 $PY -m lora_lightning.app.train"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true PYTHONWARNINGS=ignore
stage=${1:?search, search-full, final or more-seeds}; shift
if [ "$stage" = final ] || [ "$stage" = more-seeds ]; then LORA_LR=${1:?lora lr}; LORA_TARGETS=${2:?lora targets, e.g. [q,k,v,o]}; shift 2; fi
DATASETS=("$@")
mkdir -p experiments/logs

source experiments/best_full_lr.sh  # best_full_lr DATA

if [ "$stage" = more-seeds ]; then
  S=${SEEDS:?SEEDS=4,5,6: the seeds to add}
  for data in "${DATASETS[@]}"; do
    T="$TRAIN -m experiment=recipe data=$data seed=$S"
    full_lr=$(best_full_lr "$data")
    taskset -c 0 $T lora.lr="$LORA_LR" "lora.targets=$LORA_TARGETS" hydra.sweep.dir="multirun/recipe/final-$data-lora-seeds${S//,/-}" \
      >>"experiments/logs/recipe_more_seeds_${data}_lora.log" 2>&1 &
    taskset -c 1 $T lora=full lora.lr="$full_lr" hydra.sweep.dir="multirun/recipe/final-$data-full-seeds${S//,/-}" \
      >>"experiments/logs/recipe_more_seeds_${data}_full.log" 2>&1 &
    wait
  done
  exit 0
fi

run_data() {  # core data
  local core=$1 data=$2 T="taskset -c $1 $TRAIN -m experiment=recipe data=$2"
  case "$stage" in
    search)
      $T seed=0 'lora.lr=1e-3,2e-3,4e-3' 'lora.targets=[q,v],[q,k,v,o]' hydra.sweep.dir="multirun/recipe/search-$data-lora"
      $T seed=0 lora=full 'lora.lr=5e-5,1e-4,2e-4' hydra.sweep.dir="multirun/recipe/search-$data-full"
      $T seed=0 lora=head_only hydra.sweep.dir="multirun/recipe/search-$data-head" ;;
    search-full)
      $T seed=0 lora=full 'lora.lr=5e-5,1e-4,2e-4' hydra.sweep.dir="multirun/recipe/search-$data-full" ;;
    final)
      $T seed=1,2,3 lora.lr="$LORA_LR" "lora.targets=$LORA_TARGETS" hydra.sweep.dir="multirun/recipe/final-$data-lora"
      $T seed=1,2,3 lora=full lora.lr="$(best_full_lr "$data")" hydra.sweep.dir="multirun/recipe/final-$data-full"
      $T seed=1,2,3 lora=head_only hydra.sweep.dir="multirun/recipe/final-$data-head" ;;
  esac
}

stream() {  # core, data sets...
  local core=$1; shift
  for data in "$@"; do run_data "$core" "$data"; done
}

even=() odd=()
for i in "${!DATASETS[@]}"; do
  if (( i % 2 == 0 )); then even+=("${DATASETS[$i]}"); else odd+=("${DATASETS[$i]}"); fi
done
C0=${FIRST_CORE:-0}; C1=$(( (C0 + 1) % 2 ))  # FIRST_CORE=1: start on the second core
# logs append: a re-launch (or a second invocation naming the same data set) must not erase the first one's records
stream "$C0" "${even[@]}" >>"experiments/logs/recipe_${stage}_$(IFS=-; echo "${even[*]}").log" 2>&1 &
if (( ${#odd[@]} )); then stream "$C1" "${odd[@]}" >>"experiments/logs/recipe_${stage}_$(IFS=-; echo "${odd[*]}").log" 2>&1 & fi
wait
