#!/usr/bin/env bash
# The ablation cells the verdicts compare, at twice the steps (conf/experiment/convergence.yaml),
# each family at the lr its 150-step search chose (read from the committed records), seeds 1-3.
# Two streams of single-threaded runs, one per core; re-launching skips finished runs.
#   bash experiments/convergence.sh && python -m experiments collect
#   bash experiments/convergence.sh rest table5   # further stages, listed below
set -euo pipefail
cd "$(dirname "$0")/.."
TRAIN="nice -n 19 .venv/bin/python -m lora_lightning.app.train -m skip_done=true"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true PYTHONWARNINGS=ignore
OUT=multirun/ablations/convergence
mkdir -p experiments/logs
lr() { .venv/bin/python -m experiments ablation-lrs --runs "${RUNS:-experiments/runs}" | awk -v f="$1" '$1 == f {print $2}'; }
L1=$(lr lora-1); L2=$(lr lora-2); L4=$(lr lora-4); LF=$(lr full); LH=$(lr head_only)
echo "learning rates: lora-1 $L1, lora-2 $L2, lora-4 $L4, full $LF, head_only $LH"
for v in "$L1" "$L2" "$L4" "$LF" "$LH"; do [ -n "$v" ] || { echo "no search records: run experiments/ablations.sh search first" >&2; exit 1; }; done
# Further stages, each split over the two cores; several may be named at once (`rest table5`), and each core then
# runs its share of every stage in turn:
#   rest    the other Table 6 cells its claims read: W{q} at r=1 and 64, all four at r=64 (9 runs)
#   table5  Table 5 at 300 steps (conf/experiment/convergence_table5.yaml), seeds 11-13 (21 runs)
stage_a() {
  case "$1" in
    rest) taskset -c 0 $TRAIN experiment=convergence 'lora.targets=[q]' lora.r=1,64 seed=1,2,3 lora.lr="$L1" hydra.sweep.dir="$OUT/q-1-64" ;;
    table5) taskset -c 0 $TRAIN experiment=convergence_table5 'lora.targets=[q],[k],[v]' seed=11,12,13 lora.lr="$L1" hydra.sweep.dir="$OUT/table5-one" ;;
  esac
}
stage_b() {
  case "$1" in
    rest) taskset -c 1 $TRAIN experiment=convergence 'lora.targets=[q,k,v,o]' lora.r=64 seed=1,2,3 lora.lr="$L4" hydra.sweep.dir="$OUT/qkvo-64" ;;
    table5)
      taskset -c 1 $TRAIN experiment=convergence_table5 'lora.targets=[o]' seed=11,12,13 lora.lr="$L1" hydra.sweep.dir="$OUT/table5-o"
      taskset -c 1 $TRAIN experiment=convergence_table5 'lora.targets=[q,k],[q,v]' seed=11,12,13 lora.lr="$L2" hydra.sweep.dir="$OUT/table5-two"
      taskset -c 1 $TRAIN experiment=convergence_table5 'lora.targets=[q,k,v,o]' seed=11,12,13 lora.lr="$L4" hydra.sweep.dir="$OUT/table5-four" ;;
  esac
}
if [ $# -gt 0 ]; then
  # every name checked before anything starts (stage_a / stage_b know only these two)
  for s in "$@"; do case "$s" in rest|table5) ;; *) echo "unknown stage $s (rest, table5)" >&2; exit 1 ;; esac; done
  ( for s in "$@"; do stage_a "$s"; done ) >>experiments/logs/convergence_more_a.log 2>&1 &
  ( for s in "$@"; do stage_b "$s"; done ) >>experiments/logs/convergence_more_b.log 2>&1 &
  wait
  exit 0
fi
(
  taskset -c 0 $TRAIN experiment=convergence lora=full lora.lr="$LF" seed=1,2,3 hydra.sweep.dir="$OUT/full"
  taskset -c 0 $TRAIN experiment=convergence 'lora.targets=[q,v]' lora.r=1,64 seed=1,2,3 lora.lr="$L2" hydra.sweep.dir="$OUT/qv-1-64"
  taskset -c 0 $TRAIN experiment=convergence lora=head_only lora.lr="$LH" seed=1,2,3 hydra.sweep.dir="$OUT/head_only"
) >>experiments/logs/convergence_a.log 2>&1 &
(
  taskset -c 1 $TRAIN experiment=convergence 'lora.targets=[q,v]' lora.r=4,8 seed=1,2,3 lora.lr="$L2" hydra.sweep.dir="$OUT/qv-4-8"
  taskset -c 1 $TRAIN experiment=convergence 'lora.targets=[q,k,v,o]' lora.r=8 seed=1,2,3 lora.lr="$L4" hydra.sweep.dir="$OUT/qkvo-8"
  taskset -c 1 $TRAIN experiment=convergence 'lora.targets=[q]' lora.r=8 seed=1,2,3 lora.lr="$L1" hydra.sweep.dir="$OUT/q-8"
) >>experiments/logs/convergence_b.log 2>&1 &
wait
