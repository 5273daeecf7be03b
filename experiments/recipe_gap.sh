#!/usr/bin/env bash
# The recipe's Rotten Tomatoes gap and the convention speeches' seeds (experiments/PREREGISTRATION.md, Runs §2-3).
#   bash experiments/recipe_gap.sh search     # seed 0, split 0: full FT at lr 2.5e-5 and 2e-4 (beside the searched
#                                             # 5e-5, 1e-4); LoRA q,k,v,o r=8 at lr {1,2,4}e-3 x alpha {16,32} x
#                                             # dropout {0, 0.1}, less the three cells the pilot has (9 runs)
#   bash experiments/recipe_gap.sh extend     # the edge rule, once: full FT's best lr at a grid end gets x1/2 or x2
#   bash experiments/recipe_gap.sh rotation   # data.seed 1-5 x seeds 1, 2: the LoRA default and full FT at the lr
#                                             # its search chose (20 runs, experiment_name=recipe_rotation)
#   bash experiments/recipe_gap.sh speeches   # seeds 4-6 of the LoRA default and full FT on the convention speeches
#   bash experiments/recipe_gap.sh list STAGE # print a stage's jobs, run none
# About 10 minutes a run (3 epochs, fp32, one thread). Two workers, one per core, take the jobs in turn; re-launching
# skips finished runs (skip_done). Each job's sweep folder gets a COMMIT file (the code it trained with).
# Then: python -m experiments collect && python -m experiments report
set -euo pipefail
set -f  # overrides such as lora.targets=[q,k,v,o] are words, never globs
cd "$(dirname "$0")/.."
TRAIN="nice -n 19 .venv/bin/python -m lora_lightning.app.train -m skip_done=true experiment=recipe"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true PYTHONWARNINGS=ignore
RUNS=${RUNS:-multirun}  # where the full FT search is read from (experiments/runs once collected)
LORA="lora.lr=0.002+lora.targets=[q,k,v,o]"  # the recipe's LoRA default (r 8, alpha 16, dropout 0.1)
source experiments/best_full_lr.sh  # best_full_lr DATA

# Job lines: "<sweep folder below multirun/recipe> <overrides ('+' separates words)>".
search_jobs() {
  local lr alpha dropout
  for lr in 2.5e-05 0.0002; do echo "search-rotten_tomatoes-full/lr$lr seed=0+data=rotten_tomatoes+lora=full+lora.lr=$lr"; done
  for lr in 0.001 0.002 0.004; do
    for alpha in 16 32; do
      for dropout in 0.0 0.1; do
        [[ $alpha == 16 && $dropout == 0.1 ]] && continue  # the pilot's cells (search-rotten_tomatoes-lora)
        local cell="lora.r=8+lora.targets=[q,k,v,o]+lora.lr=$lr+lora.alpha=$alpha+lora.dropout=$dropout"
        echo "search-rotten_tomatoes-lora/lr$lr-alpha$alpha-dropout$dropout seed=0+data=rotten_tomatoes+$cell"
      done
    done
  done
}

extend_jobs() {  # full FT's grid 2.5e-5 .. 2e-4: one step past an edge it chose, once
  local best
  best=$(best_full_lr rotten_tomatoes)
  case "$best" in
    2.5e-05) echo "search-rotten_tomatoes-full/lr1.25e-05 seed=0+data=rotten_tomatoes+lora=full+lora.lr=1.25e-05" ;;
    0.0002) echo "search-rotten_tomatoes-full/lr0.0004 seed=0+data=rotten_tomatoes+lora=full+lora.lr=0.0004" ;;
    *) echo "full FT's best lr $best is inside its grid: nothing to extend" >&2 ;;
  esac
}

tuned_lora() {  # the best LoRA cell of the search as overrides, if it beats the default on validation by >= 1 point
  .venv/bin/python - "$RUNS/recipe/search-rotten_tomatoes-lora" <<'PYEOF'
import json, pathlib, sys
from omegaconf import OmegaConf
cells = {}
for p in pathlib.Path(sys.argv[1]).rglob("summary.json"):
    run, cfg = json.loads(p.read_text()), OmegaConf.load(p.parent / "resolved_config.yaml")
    key = (float(cfg.lora.lr), float(cfg.lora.alpha), float(cfg.lora.dropout))
    if run.get("seed") == 0 and list(cfg.lora.targets) == ["q", "k", "v", "o"] and cfg.lora.r == 8:
        cells[key] = run["best_val_acc"]
default = cells.get((0.002, 16.0, 0.1))
best = max(cells, key=cells.get) if cells else None
if default is None or best is None or len(cells) < 12:
    sys.exit(f"the LoRA search in {sys.argv[1]} is not complete ({len(cells)} of 12 cells): run the search stage first")
if cells[best] - default >= 0.01:
    print(f"lora.r=8+lora.targets=[q,k,v,o]+lora.lr={best[0]!r}+lora.alpha={best[1]:g}+lora.dropout={best[2]!r}")
PYEOF
}

rotation_jobs() {  # the LoRA default and full FT; a LoRA cell tuned on this task joins as a third arm (section 2)
  local full split seed tuned
  full=$(best_full_lr rotten_tomatoes)
  tuned=$(tuned_lora)
  for split in 1 2 3 4 5; do
    for seed in 1 2; do
      local common="experiment_name=recipe_rotation+data=rotten_tomatoes+data.seed=$split+seed=$seed"
      echo "rotation-rotten_tomatoes-lora/split$split-seed$seed $common+$LORA"
      echo "rotation-rotten_tomatoes-full/split$split-seed$seed $common+lora=full+lora.lr=$full"
      if [[ -n $tuned ]]; then echo "rotation-rotten_tomatoes-lora-tuned/split$split-seed$seed $common+$tuned"; fi
    done
  done
}

speeches_jobs() {
  local full seed
  full=$(best_full_lr convention_speeches)
  for seed in 4 5 6; do
    echo "final-convention_speeches-lora-seeds4-5-6/seed$seed data=convention_speeches+seed=$seed+$LORA"
    echo "final-convention_speeches-full-seeds4-5-6/seed$seed data=convention_speeches+seed=$seed+lora=full+lora.lr=$full"
  done
}

worker() {  # worker <core> <jobs file>: every other job, starting at line <core> + 1
  local core=$1 i=0 dir overrides
  while read -r dir overrides; do
    if (( i++ % 2 == core )); then
      if [[ ! -f "multirun/recipe/$dir/0/summary.json" ]]; then
        mkdir -p "multirun/recipe/$dir"
        { git rev-parse HEAD; git status --short -- lora_lightning; } >"multirun/recipe/$dir/COMMIT"
      fi
      taskset -c "$core" $TRAIN ${overrides//+/ } hydra.sweep.dir="multirun/recipe/$dir" || echo "FAILED $dir" >&2
    fi
  done <"$2"
}

two_workers() {  # two_workers <stage>
  local jobs
  jobs=$(mktemp)
  "$1_jobs" >"$jobs"
  mkdir -p experiments/logs
  worker 0 "$jobs" >>"experiments/logs/recipe_gap_$1_a.log" 2>&1 &
  worker 1 "$jobs" >>"experiments/logs/recipe_gap_$1_b.log" 2>&1 &
  wait
  echo "$1 done $(date -u +%FT%TZ)" >>experiments/logs/recipe_gap_progress.log
}

case "${1:-}" in
  search | extend | rotation | speeches) two_workers "$1" ;;
  list) case "${2:-}" in search | extend | rotation | speeches) "$2_jobs" ;; *) exit 2 ;; esac ;;
  *)
    echo "usage: bash experiments/recipe_gap.sh search|extend|rotation|speeches, or list STAGE" >&2
    exit 2
    ;;
esac
