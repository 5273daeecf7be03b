# Sourced by recipe.sh and recipe_probe.sh: best_full_lr DATA prints the lr of the task's seed-0 full fine-tuning
# search run with the best validation accuracy, read from ${RUNS:-multirun}/recipe/search-DATA-full (at any depth:
# recipe_gap.sh adds lrs in their own job folders).
best_full_lr() {
  .venv/bin/python - "${RUNS:-multirun}/recipe/search-$1-full" <<'PYEOF'
import json, pathlib, sys
runs = [json.loads(p.read_text()) for p in pathlib.Path(sys.argv[1]).rglob("summary.json")]
if not runs:
    sys.exit(f"no finished runs in {sys.argv[1]}: run `experiments/recipe.sh search-full` for this data set first")
print(max(runs, key=lambda s: s["best_val_acc"])["lr"])
PYEOF
}
