#!/usr/bin/env bash
# The baselines of the paper's Tables 2-4 on the ablation task (experiments/PREREGISTRATION.md, sections 7-9).
#   bash experiments/baselines.sh search   # section 7's search stage: 4 lrs per method, seed 0
#   bash experiments/baselines.sh extend   # the edge rule's extra lr for the arms whose best lr sat at a grid end
#   bash experiments/baselines.sh seeds    # every arm at its chosen lr: section 7's seeds 101-103, then sections 9
#                                          # and 8 (seeds 101-103), then section 7's seeds 104-121
#   bash experiments/baselines.sh list seeds  # print a stage's jobs ("<experiment> <folder> <lr> <overrides>")
# The seeds stage reads each arm's chosen lr from the collected search records (python -m experiments baselines
# --chosen), so run `python -m experiments collect` after the search and extend stages.
# Two workers, one per core, take the jobs in turn; re-launching skips finished runs (skip_done). Each job's sweep
# folder gets a COMMIT file: the code it trained with (git status lists local changes below it).
# Then: python -m experiments collect && python -m experiments baselines && python -m experiments report
set -euo pipefail
set -f  # overrides such as lora.targets=[q,v] are words, never globs
cd "$(dirname "$0")/.."
TRAIN="nice -n 19 .venv/bin/python -m lora_lightning.app.train -m skip_done=true"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true PYTHONWARNINGS=ignore
OUT=multirun/baselines
mkdir -p experiments/logs "$OUT"

declare -A ARM=(  # arm -> its overrides ('+' separates words), the pre-registered configs of section 7
  [lora_qv]="lora.targets=[q,v]"
  [lora_default]="lora.targets=[q,k,v,o]"
  [full]="lora=full"
  [head_only]="lora=head_only"
  [bitfit]="lora=bitfit"
  [adapter_h]="lora=adapter_h"
  [adapter_l]="lora=adapter_l"
  [prefix]="lora=prefix"
  [prompt]="lora=prompt"
  [lora_pe]="lora=lora_pe+lora.targets=[q,v]"
)
SECTION7=(lora_qv lora_default full head_only bitfit adapter_h adapter_l prefix prompt)

# Job lines: "<experiment> <sweep folder below $OUT> <lr> <overrides>".
search_jobs() {  # in the pre-registered order
  local lr arm
  for lr in 0.001 0.003 0.01 0.03; do echo "baselines_search search/bitfit/lr$lr $lr ${ARM[bitfit]}"; done
  for arm in adapter_h adapter_l; do
    for lr in 0.001 0.002 0.004 0.008; do echo "baselines_search search/$arm/lr$lr $lr ${ARM[$arm]}"; done
  done
  for arm in prefix prompt; do
    for lr in 0.003 0.01 0.03 0.1; do echo "baselines_search search/$arm/lr$lr $lr ${ARM[$arm]}"; done
  done
  for arm in lora_qv lora_default lora_pe; do
    for lr in 0.001 0.002 0.004 0.008; do echo "baselines_search search/$arm/lr$lr $lr ${ARM[$arm]}"; done
  done
}

extend_jobs() {  # the edge rule (PREREGISTRATION.md section 7): one more lr beyond a best lr at a grid's end
  echo "baselines_search search/adapter_l/lr0.016 0.016 ${ARM[adapter_l]}"  # best 0.008, the grid's top; step x2
  echo "baselines_search search/prompt/lr0.001 0.001 ${ARM[prompt]}"        # best 0.003, the grid's bottom; step ~x3
}

seeds_jobs() {  # section 7 seed by seed (every arm of a seed before the next), sections 9 and 8 after seed 103
  local -A lr
  local arm seed n r
  while read -r arm value; do lr[$arm]=$value; done < <(.venv/bin/python -m experiments baselines --chosen)
  for arm in "${SECTION7[@]}" lora_pe; do
    [[ -n "${lr[$arm]:-}" ]] || { echo "no chosen lr for $arm: finish its search and collect it" >&2; exit 1; }
  done
  section7_seed() {
    for arm in "${SECTION7[@]}"; do
      # full fine-tuning at 2e-4 reuses section 1's 150-step runs of seeds 101-117 (the same config)
      if [[ $arm == full && ${lr[full]} == 0.0002 && $1 -le 117 ]]; then continue; fi
      echo "baselines seeds/$arm/$1 ${lr[$arm]} ${ARM[$arm]}+seed=$1"
    done
  }
  if [[ ${lr[full]} == 0.0002 ]]; then  # the reuse's premise: this code and config retrain section 1's seed 101
    echo "baselines check/full/101 ${lr[full]} ${ARM[full]}+seed=101"
  fi
  for seed in 101 102 103; do section7_seed $seed; done
  for seed in 101 102 103; do  # section 9: LoRA+PE
    echo "baselines seeds/lora_pe/$seed ${lr[lora_pe]} ${ARM[lora_pe]}+seed=$seed"
  done
  for seed in 101 102 103; do  # section 8: the sizes other than section 7's (16 tokens, r=8), longest last
    for r in 1 4 64; do echo "baselines length/lora_qv_r$r/$seed ${lr[lora_qv]} ${ARM[lora_qv]}+lora.r=$r+seed=$seed"; done
    for n in 4 64; do
      for arm in prefix prompt; do
        echo "baselines length/${arm}_n$n/$seed ${lr[$arm]} ${ARM[$arm]}+lora.prefix_tokens=$n+seed=$seed"
      done
    done
  done
  for seed in 101 102 103; do
    for arm in prefix prompt; do
      echo "baselines length/${arm}_n256/$seed ${lr[$arm]} ${ARM[$arm]}+lora.prefix_tokens=256+seed=$seed"
    done
  done
  for seed in $(seq 104 121); do section7_seed "$seed"; done
}

worker() {  # worker <core> <jobs file>: every other job, starting at line <core> + 1
  local core=$1 i=0 experiment dir lr overrides
  while read -r experiment dir lr overrides; do
    if (( i++ % 2 == core )); then
      if [[ ! -f "$OUT/$dir/0/summary.json" ]]; then
        mkdir -p "$OUT/$dir"
        { git rev-parse HEAD; git status --short -- lora_lightning; } >"$OUT/$dir/COMMIT"
      fi
      taskset -c "$core" $TRAIN experiment="$experiment" ${overrides//+/ } lora.lr="$lr" \
        hydra.sweep.dir="$OUT/$dir" || echo "FAILED $dir $lr" >&2
    fi
  done <"$2"
}

two_workers() {  # two_workers <stage> <log name>: the jobs <stage>_jobs lists, on both cores, then a progress line
  local jobs
  jobs=$(mktemp)
  "$1_jobs" >"$jobs"
  worker 0 "$jobs" >>"experiments/logs/baselines_$2_a.log" 2>&1 &
  worker 1 "$jobs" >>"experiments/logs/baselines_$2_b.log" 2>&1 &
  wait
  echo "$1 done $(date -u +%FT%TZ)" >>experiments/logs/baselines_progress.log
}

case "${1:-}" in
  search | extend) two_workers "$1" search ;;
  seeds) two_workers seeds seeds ;;
  list) case "${2:-}" in search | extend | seeds) "$2_jobs" ;; *) exit 2 ;; esac ;;  # print a stage's jobs, run none
  *)
    echo "usage: bash experiments/baselines.sh search|extend|seeds, or list search|extend|seeds" >&2
    exit 2
    ;;
esac
