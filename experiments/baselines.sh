#!/usr/bin/env bash
# The baselines of the paper's Tables 2-4 on the ablation task (experiments/PREREGISTRATION.md, sections 7-9).
#   bash experiments/baselines.sh search      # section 7's search stage: 4 lrs per method, seed 0
# Two workers, one per core, take the jobs in turn; re-launching skips finished runs (skip_done).
# Then: python -m experiments collect && python -m experiments report
set -euo pipefail
set -f  # overrides such as lora.targets=[q,v] are words, never globs
cd "$(dirname "$0")/.."
TRAIN="nice -n 19 .venv/bin/python -m lora_lightning.app.train -m skip_done=true"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true PYTHONWARNINGS=ignore
OUT=multirun/baselines
mkdir -p experiments/logs "$OUT"
git rev-parse HEAD >"$OUT/COMMIT"  # the code the runs trained with (git status lists local changes below it)
git status --short -- lora_lightning >>"$OUT/COMMIT"

search_jobs() {  # "<name> <overrides> <lr>" per line, in the pre-registered order
  local lr
  for lr in 0.001 0.003 0.01 0.03; do echo "bitfit lora=bitfit $lr"; done
  for lr in 0.001 0.002 0.004 0.008; do echo "adapter_h lora=adapter_h $lr"; done
  for lr in 0.001 0.002 0.004 0.008; do echo "adapter_l lora=adapter_l $lr"; done
  for lr in 0.003 0.01 0.03 0.1; do echo "prefix lora=prefix $lr"; done
  for lr in 0.003 0.01 0.03 0.1; do echo "prompt lora=prompt $lr"; done
  for lr in 0.001 0.002 0.004 0.008; do echo "lora_qv lora.targets=[q,v] $lr"; done
  for lr in 0.001 0.002 0.004 0.008; do echo "lora_default lora.targets=[q,k,v,o] $lr"; done
  for lr in 0.001 0.002 0.004 0.008; do echo "lora_pe lora=lora_pe+lora.targets=[q,v] $lr"; done
}

extend_jobs() {  # the edge rule (PREREGISTRATION.md section 7): one more lr beyond a best lr at a grid's end
  echo "adapter_l lora=adapter_l 0.016"  # best 0.008, the grid's top; its step is x2
  echo "prompt lora=prompt 0.001"        # best 0.003, the grid's bottom; its step is about x3
}

worker() {  # worker <core> <stage> <jobs file>: every other job, starting at line <core> + 1
  local core=$1 stage=$2 i=0 name overrides lr
  while read -r name overrides lr; do
    if (( i++ % 2 == core )); then
      taskset -c "$core" $TRAIN experiment=baselines_search ${overrides//+/ } lora.lr="$lr" \
        hydra.sweep.dir="$OUT/$stage/$name/lr$lr" || echo "FAILED $name $lr" >&2
    fi
  done <"$3"
}

two_workers() {  # two_workers <stage>: the jobs <stage>_jobs lists, on both cores, then a line in the progress log
  local jobs
  jobs=$(mktemp)
  "$1_jobs" >"$jobs"
  worker 0 search "$jobs" >>experiments/logs/baselines_search_a.log 2>&1 &
  worker 1 search "$jobs" >>experiments/logs/baselines_search_b.log 2>&1 &
  wait
  echo "$1 done $(date -u +%FT%TZ)" >>experiments/logs/baselines_progress.log
}

case "${1:-}" in
  search | extend) two_workers "$1" ;;
  *)
    echo "usage: bash experiments/baselines.sh search|extend" >&2
    exit 2
    ;;
esac
