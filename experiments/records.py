"""The run records: what every report of experiments/ is built from, and nothing computed from them yet.

The first stage of the one-way flow of experiments/ (runs -> statistics -> claims -> tables/plots -> report):
each finished ``lora-train`` run leaves a ``summary.json`` (and its ``resolved_config.yaml``) under
``experiments/runs`` (copied there by ``python -m experiments collect``, or rebuilt from a console log by
``python -m experiments recover-logs``). This module reads them, names the experiments and metrics they record,
and reads the two other inputs of the report: the ``subspace.py`` outputs and the saved variants CSV. It imports
no other module of experiments/.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------- metrics and experiments
METRIC = "best_val_acc"  # the paper's metric
TEST_METRIC = "test_acc"  # accuracy on the test split of the checkpoint with the best validation accuracy
LAST_TEST_METRIC = "last_test_acc"  # the test accuracy of the last checkpoint (test_last=true)
METRIC_NAMES = {METRIC: "validation accuracy", TEST_METRIC: "test accuracy"}
SEARCH_EXPERIMENT = "ablation_search"  # the seed-0 learning-rate search of the ablations
ABLATION_EXPERIMENTS = (SEARCH_EXPERIMENT, "table5", "table6", "table6_reference", "convergence", "convergence_table5")
LONG = "convergence"  # the ablation cells at 300 steps instead of 150
LONG_TABLE5 = "convergence_table5"  # Table 5 at 300 steps
RECIPE = "recipe"  # the default recipe: seed-0 search and final runs on four tasks
RECIPE_PROBE = "recipe_probe"  # variations of the LoRA default
TASKS = ("rotten_tomatoes", "trec", "newsgroups", "convention_speeches")
REPO = Path(__file__).resolve().parent.parent

# The pre-registered third round (experiments/PREREGISTRATION.md)
PRIMARY = {150: "lora_vs_full", 300: "lora_vs_full_300"}  # schedule (optimizer steps) -> experiment name
PRIMARY_SEEDS = tuple(range(101, 118))  # seeds 101-117, both arms, both schedules
PRIMARY_COMPLETE = "lora_vs_full/DECLARED_COMPLETE"  # below the runs folder: its text is the reason the study stopped
PILOT_SCHEDULES = {  # schedule -> (Table 5 experiment, Table 6 experiment, experiment of the reference rows)
    150: ("table5", "table6", "table6_reference"),
    300: (LONG_TABLE5, LONG, LONG),
}
ROTATION = "recipe_rotation"  # the split rotation of the recipe's Rotten Tomatoes comparison (data.seed 1-5)
ROTATION_SPLITS = (1, 2, 3, 4, 5)
ROTATION_SEEDS = (1, 2)
DECODER_RUNS = (
    "decoder"  # experiments/runs/decoder: the decoder study's records (collect copies multirun/smollm2 there)
)
PRECISION_RUNS = "precision"  # experiments/runs/precision


# --------------------------------------------------------------------------- loading
def load_runs(root: Path) -> list[dict]:
    """Every ``summary.json`` below ``root`` (one per finished run), with ``dir`` and ``targets_key`` added."""
    rows = []
    for path in sorted(root.rglob("summary.json")) if root.is_dir() else []:
        row = json.loads(path.read_text())
        row["dir"] = str(path.parent)
        row["targets_key"] = ",".join(row.get("targets") or [])
        rows.append(row)
    return rows


def of_experiment(rows: list[dict], experiment: str, methods: Sequence[str] | None = None) -> list[dict]:
    """The runs of one ``experiment`` (the summary's field, whatever folder they sit in), optionally of some methods."""
    return [r for r in rows if r.get("experiment") == experiment and (methods is None or r.get("method") in methods)]


def has_metric(row: dict, metric: str) -> bool:
    """Whether a run recorded ``metric`` (``test_acc`` is absent when the run had no test split)."""
    return isinstance(row.get(metric), (int, float))


def metrics_present(rows: list[dict]) -> list[str]:
    """``[METRIC]``, plus ``TEST_METRIC`` when some run recorded it."""
    return [METRIC] + ([TEST_METRIC] if any(has_metric(r, TEST_METRIC) for r in rows) else [])


def read_config(row: dict) -> dict | None:
    """The run's ``resolved_config.yaml`` (``None`` when it was not kept)."""
    path = Path(row["dir"]) / "resolved_config.yaml"
    if not path.is_file():
        return None
    import yaml  # noqa: PLC0415 (only the report needs it)

    return yaml.safe_load(path.read_text())


def config_value(cfg: dict, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def own_config(row: dict) -> bool:
    """Whether the run's ``resolved_config.yaml`` is its own: False for records rebuilt from a console log, whose
    config was composed afterwards from the logged overrides with the configs of the day (``recover.py``), so it
    says what those configs give, not how the run was configured."""
    return not row.get("recovered_from")


def relaunched_without_log(row: dict) -> bool:
    """A record rebuilt from a ``skip_done`` re-launch: the log repeats a stored summary without the training output,
    so nothing in it says how the run trained (its precision among others)."""
    return bool(row.get("recovered_from")) and row.get("precision") is None


def data_seed(row: dict) -> int | None:
    """The run's split (``data.seed``): the summary's ``data_seed`` if it has one, else its resolved config's."""
    if isinstance(row.get("data_seed"), int):
        return row["data_seed"]
    cfg = read_config(row)
    value = config_value(cfg, "data.seed") if cfg else None
    return value if isinstance(value, int) else None


def is_search(row: dict) -> bool:
    """Recipe search runs use seed 0; the final runs seeds 1-3."""
    return row.get("seed") == 0


def cell(row: dict) -> tuple[str, str, int | None]:
    """(method, targets, r): what a run trained, whatever its schedule."""
    if row.get("method") == "lora":
        return ("lora", row["targets_key"], row.get("r"))
    return (row.get("method", ""), "", None)


def by_cell(rows: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(cell(r), []).append(r)
    return out


def with_curves(groups: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Each group's runs that recorded a validation curve (runs recovered from logs have none), so a plot's n
    counts the runs it draws; groups left empty are dropped."""
    kept = {k: [r for r in v if r.get("val_curve")] for k, v in groups.items()}
    return {k: v for k, v in kept.items() if v}


def read_variants_csv(path: Path) -> list[dict]:
    """The rows of a ``variants_runs.csv`` written by ``write_csv`` (numbers parsed; empty cells dropped)."""

    def value(text: str):
        for cast in (int, float):
            try:
                return cast(text)
            except ValueError:
                pass
        return text

    with path.open() as fh:
        return [{k: value(v) for k, v in row.items() if v != ""} for row in csv.DictReader(fh)]


# --------------------------------------------------------------------------- the outputs of subspace.py, and paths
_ABSOLUTE_MULTIRUN = re.compile(r"(?<![\w.~/-])/(?:[^\s/()'\"`]+/)*?multirun/")  # an absolute path up to its multirun/


def repo_relative(text: str) -> str:
    """``text`` with the machine paths a record may hold made relative to the repository: the checkout's own
    absolute path dropped, and any absolute path into a ``multirun/`` folder (``/any/where/multirun/recipe/x/0``)
    written from ``multirun/`` on, so that no generated report names the machine it ran on."""
    text = text.replace(f"{REPO.as_posix()}/", "")
    return _ABSOLUTE_MULTIRUN.sub("multirun/", text)


SUBSPACE_MARKER = re.compile(r"<!-- subspace\.py runs=(?P<runs>\S+) adapters=(?P<adapters>\S*) -->")


def relink(text: str, link: str) -> str:
    """``text`` (markdown whose images and links point at ``link/<file>``) for a file inside ``link`` itself:
    ``](link/x.png)`` becomes ``](x.png)``."""
    return text.replace(f"]({link.rstrip('/')}/", "](")


_BARE_LINK = re.compile(r"\]\((?![a-z]+:|/|\.|#)([^)/\s]+)\)")


def prefix_links(text: str, link: str) -> str:
    """The inverse of :func:`relink`: bare ``](x.png)`` links of a file inside ``link`` become ``](link/x.png)``,
    for embedding its text in a file one level up."""
    return _BARE_LINK.sub(lambda m: f"]({link.rstrip('/')}/{m[1]})", text)


def fresh_subspace_text(path: Path, runs: Path, link: str | None = None) -> str | None:
    """The text of a ``subspace.py`` output when it was computed from ``runs`` (its marker names ``runs`` and
    adapters that still exist), its links prefixed with ``link`` when given; ``None`` when it is missing or stale."""
    text = path.read_text() if path.is_file() else ""
    m = SUBSPACE_MARKER.search(text)
    fresh = (
        bool(m)
        and Path(m["runs"]).resolve() == runs.resolve()
        and all((runs / a).is_file() for a in m["adapters"].split(";") if a)
    )
    if not fresh:
        return None
    return prefix_links(text.strip(), link) if link else text.strip()
