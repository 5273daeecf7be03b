"""The learning rate chosen per ablation family, and the copy of finished runs into the repository.

    python -m experiments ablation-lrs --runs multirun   # '<family> <lr>' lines, for ablations.sh
    python -m experiments collect                        # multirun/{ablations,recipe} -> experiments/runs

``collect`` keeps, per finished run (one with a ``summary.json``), the two small files every table
is built from (``summary.json``, ``resolved_config.yaml``), the decoder's predictions (``test_predictions.json``,
``zero_shot_predictions.json``: the decoder report rescores them) and, for the Table 6 runs on {Wq, Wv} at the
ranks §7.2 / §7.3 read, the ``adapter.safetensors``; the layout below ``multirun/`` is kept, except that the decoder
sweep ``multirun/smollm2`` lands in ``experiments/runs/decoder`` (``DEST``). A sweep folder's ``COMMIT`` file (the
code its runs trained with, written by ``lora_vs_full.sh``; ``baselines.sh`` writes one per job folder) is copied
too, wherever it sits below the sweep folder.

The committed layout the reports read:

- ``experiments/runs/{ablations,recipe,lora_vs_full}/<job path>/{summary.json,resolved_config.yaml}``;
- ``experiments/runs/decoder/<job path>/``: ``summary.json``, ``resolved_config.yaml``, ``test_predictions.json`` and
  ``zero_shot_predictions.json`` (``experiments/decoder.py``);
- ``experiments/runs/precision/<job path>/{summary.json,resolved_config.yaml}`` (``experiments/precision.py``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

from experiments.records import SEARCH_EXPERIMENT

FAMILIES = ("lora-1", "lora-2", "lora-4", "full", "head_only")
COLLECTED = (
    "ablations",
    "recipe",
    "lora_vs_full",
    "smollm2",
    "decoder",
    "precision",
    "lora_fa",
    "baselines",
)  # the sweep folders below multirun/ that collect copies
DEST = {"smollm2": "decoder"}  # a sweep folder copied under another name (experiments/runs/decoder)
SMALL_FILES = ("summary.json", "resolved_config.yaml", "test_predictions.json", "zero_shot_predictions.json")
SWEEP_FILES = ("COMMIT",)  # files of a sweep folder itself
ADAPTER = "adapter.safetensors"
SUBSPACE_RANKS = (4, 8, 64)  # the ranks experiments/subspace.py reads (§7.2: 8 vs 64; §7.3: 4 and 64)
SUBSPACE_EXPERIMENTS = ("table6", "convergence")  # §7.2 / §7.3 at 150 and at 300 steps
SUBSPACE_SEEDS = (1, 2, 3)  # the seeds of every Table 6 cell (seeds 4, 5 of some cells are not kept: 3 MB each at r=64)


# --------------------------------------------------------------------------- learning rates
def family_of(row: dict) -> str:
    """``lora-<number of weight types>``, ``full`` or ``head_only``."""
    method = row.get("method")
    if method == "lora":
        return f"lora-{len(row.get('targets') or [])}"
    return str(method)


def ablation_lrs(rows: Iterable[dict]) -> dict[str, float]:
    """Per family, the lr of the search runs (``experiment=ablation_search``) with the highest best
    validation accuracy (mean over runs at that lr); ties go to the smaller lr."""
    by_family: dict[str, dict[float, list[float]]] = {}
    for row in rows:
        if (
            row.get("experiment") == SEARCH_EXPERIMENT
            and row.get("best_val_acc") is not None
            and row.get("lr") is not None
        ):
            by_family.setdefault(family_of(row), {}).setdefault(float(row["lr"]), []).append(float(row["best_val_acc"]))
    chosen = {}
    for family, by_lr in by_family.items():
        means = {lr: sum(v) / len(v) for lr, v in by_lr.items()}
        chosen[family] = min(means, key=lambda lr: (-means[lr], lr))
    return chosen


def edge_extensions(rows: Iterable[dict]) -> dict[str, float]:
    """Per family whose chosen lr is the largest (smallest) it was searched at, the next lr past that edge:
    one more step of the grid's ratio at that end (``4e-3`` after ``2e-3, 4e-3`` -> ``8e-3``), rounded to 3
    significant digits. Families with an interior choice, or searched at one lr only, are left out."""
    searched: dict[str, set[float]] = {}
    for row in rows:
        if (
            row.get("experiment") == SEARCH_EXPERIMENT
            and row.get("best_val_acc") is not None
            and row.get("lr") is not None
        ):
            searched.setdefault(family_of(row), set()).add(float(row["lr"]))
    chosen = ablation_lrs(rows)
    out = {}
    for family, lrs in searched.items():
        grid = sorted(lrs)
        if len(grid) < 2:
            continue
        if chosen[family] == grid[-1]:
            out[family] = float(f"{grid[-1] * grid[-1] / grid[-2]:.3g}")
        elif chosen[family] == grid[0]:
            out[family] = float(f"{grid[0] * grid[0] / grid[1]:.3g}")
    return out


def format_lrs(lrs: dict[str, float]) -> str:
    """One ``<family> <lr>`` line per family (``FAMILIES`` order first); ``repr`` of a float is exact and Hydra reads
    it."""
    order = [f for f in FAMILIES if f in lrs] + sorted(f for f in lrs if f not in FAMILIES)
    return "".join(f"{f} {lrs[f]!r}\n" for f in order)


# --------------------------------------------------------------------------- collect
def keeps_adapter(summary: dict) -> bool:
    """Whether a run's adapter is kept for experiments/subspace.py: Table 6 and its 300-step twins (experiment
    convergence), {Wq, Wv}, r in 4, 8, 64, seeds 1-3."""
    return (
        summary.get("experiment") in SUBSPACE_EXPERIMENTS
        and summary.get("method") == "lora"
        and summary.get("targets") == ["q", "v"]
        and summary.get("r") in SUBSPACE_RANKS
        and summary.get("seed") in SUBSPACE_SEEDS
    )


def relocated(summary: dict, source_dir: Path, rel: Path, with_adapter: bool) -> dict:
    """The summary as stored in the repository: ``adapter_path`` relative to the run folder (``None``
    when the adapter is not kept), absolute paths into the source run made relative (``multirun/...``)."""
    out = dict(summary)
    prefix = str(source_dir.resolve())
    for key, value in summary.items():
        if isinstance(value, str) and (value == prefix or value.startswith(prefix + "/")):
            out[key] = str(Path("multirun") / rel / value[len(prefix) + 1 :]).rstrip("/")
    out["adapter_path"] = ADAPTER if with_adapter else None
    out["collected_from"] = str(Path("multirun") / rel)
    return out


def finished_runs(source: Path) -> list[Path]:
    """The run folders (holding a ``summary.json``) below the sweep folders ``COLLECTED`` of ``source``."""
    return sorted(p.parent for sweep in COLLECTED for p in (source / sweep).rglob("summary.json"))


def destination(rel: Path) -> Path:
    """Where a path below ``multirun/`` goes below the runs folder: the same path, its sweep folder renamed by
    ``DEST``."""
    parts = rel.parts
    return Path(DEST.get(parts[0], parts[0]), *parts[1:]) if parts else rel


def collect(source: Path, dest: Path) -> list[Path]:
    """Copy every finished run under the sweep folders ``COLLECTED`` of ``source`` to ``dest/<same relative path>``
    (``destination``): ``summary.json`` (paths rewritten, see ``relocated``), ``resolved_config.yaml``, the decoder's
    prediction files where present and, where ``keeps_adapter``, ``adapter.safetensors``; and each sweep folder's
    ``COMMIT`` files. Returns the files written."""
    written: list[Path] = []
    for sweep in COLLECTED:
        for name in SWEEP_FILES:
            for found in sorted((source / sweep).rglob(name)) if (source / sweep).is_dir() else []:
                target = dest / destination(found.relative_to(source))
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(found, target)
                written.append(target)
    for run in finished_runs(source):
        rel = run.relative_to(source)
        target = dest / destination(rel)
        target.mkdir(parents=True, exist_ok=True)
        summary = json.loads((run / "summary.json").read_text())
        adapter = run / ADAPTER
        with_adapter = keeps_adapter(summary) and adapter.is_file()
        (target / "summary.json").write_text(json.dumps(relocated(summary, run, rel, with_adapter), indent=2) + "\n")
        written.append(target / "summary.json")
        for name in SMALL_FILES[1:] + ((ADAPTER,) if with_adapter else ()):
            if (run / name).is_file():
                shutil.copyfile(run / name, target / name)
                written.append(target / name)
    return written
