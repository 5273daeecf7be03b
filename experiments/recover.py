"""Run records rebuilt from the console logs in ``experiments/logs``, for runs whose folders are gone.

    python -m experiments recover-logs experiments/logs/ablations_*.log

Every ``lora-train`` run prints its overrides (Hydra's ``#N : ...`` line) and a summary table (test and best
validation accuracy to 0.01 points — made exact again from the sizes of the splits, k/n —, trainable parameters,
fit time and steps, output dir). When a run's folder
is lost (the sweeps of 2026-12-03 were: ``multirun/`` is not in git), this module turns each logged run into
a ``summary.json`` under ``experiments/runs/<the run's path below multirun/>`` holding what the log shows, and
a ``resolved_config.yaml`` composed from the same overrides with this checkout's configs (Hydra's job number
and output dir set from the log; ``trainer.precision`` set from the log: ``bf16-mixed`` when the run printed
Lightning's AMP line, ``32-true`` when it trained without it, null when the log only shows a skipped re-launch).

A recovered summary says so (``recovered_from``: the log; ``val_curve`` and the adapter are absent: the log does
not hold them). A run that is also present as a real run (same experiment, method, targets, r, lr, seed) is not
recovered: the real one is kept and the pair is compared (``twin_checks``), which is how the logs are checked
against a fresh re-run of the same settings.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from experiments.records import repo_relative

OVERRIDES = re.compile(r"\[HYDRA\] \t#(\d+) : (.*)$")
ROW = re.compile(r"^│ (.+?) +│ +(.+?) │$")
LORA_METHOD = re.compile(r"^LoRA r=(\d+) alpha=([0-9.]+) on \[(.*)\]$")
TITLE_START = "lora-lightning: "
TITLE = re.compile(r"^lora-lightning:([^/]+)/(.*)$")  # matched with all whitespace removed (rich wraps long titles)
RESTORED = re.compile(r"Restoring states from the checkpoint path at (\S+)/checkpoints/")
SKIPPED = re.compile(r"skip_done: (\S+) already holds the summary of .*; not re-run")
PERCENT = re.compile(r"^(-?[0-9.]+)%$")
FIT = re.compile(r"^([0-9.]+) s \((\d+) steps\)$")
PARAMS = re.compile(r"^([0-9,]+) of ([0-9,]+) ")
EXCLUDED_FROM_RUN_NAME = (
    "experiment",
    "scale",
    "logger",
    "trainer",
    "progress",
    "test",
    "test_last",
    "threads",
    "hydra/launcher",
    "hparams_search",
    "skip_done",
    "resume",
)  # conf/config.yaml override_dirname.exclude_keys (a test checks)
IDENTITY = ("experiment", "data", "method", "targets_key", "r", "lr", "seed")


@dataclass
class LoggedRun:
    """One ``#N : overrides`` block of a Hydra multirun console log."""

    log: str
    job: int
    overrides: list[str]
    trained: bool = True  # False: the block is a skip_done re-launch (the table repeats the stored summary)
    bf16: bool = False
    table: dict[str, str] = field(default_factory=dict)
    experiment: str | None = None  # the summary table's title: the run's experiment_name ...
    title_run_name: str | None = None  # ... and its run_name, as rich prints it (``[...]`` taken as markup and dropped)
    path: str | None = None  # the output dir in full (the table cuts long ones with an ellipsis)

    @property
    def output_dir(self) -> str:
        shown = self.table["output dir"]
        if self.path is not None:
            return self.path
        if "…" in shown:
            raise ValueError(f"{self.log} job #{self.job}: the output dir is cut ({shown}) and no other line names it")
        return shown


def unfinished_blocks(logs: Iterable[Path]) -> list[LoggedRun]:
    """The blocks of the ``logs`` that trained and printed no summary table: runs that were cut off (or failed)
    before they finished, in log order (``log`` is the log's path as given)."""
    out = []
    for log in logs:
        out += [
            r
            for r in parse_log(Path(log).read_text(), str(log), keep_unfinished=True)
            if "output dir" not in r.table and r.trained
        ]
    return out


def overrides_dict(overrides: list[str]) -> dict[str, str]:
    """``['lora=full', 'lora.lr=2e-4']`` -> ``{'lora': 'full', 'lora.lr': '2e-4'}``."""
    return dict(o.partition("=")[::2] for o in overrides)


def parse_log(text: str, log: str, keep_unfinished: bool = False) -> list[LoggedRun]:
    """The blocks of one log, in order; a block without a summary table (interrupted run) is dropped unless
    ``keep_unfinished``."""
    runs: list[LoggedRun] = []
    title: list[str] | None = None  # the lines of a table title being read (until the table's top border)
    for line in text.splitlines():
        if title is not None:
            if not line.lstrip().startswith("┏"):
                title.append(line)
                continue
            if m := TITLE.match(re.sub(r"\s", "", "".join(title))):
                runs[-1].experiment, runs[-1].title_run_name = m.group(1), m.group(2)
            title = None
        if m := OVERRIDES.search(line):
            runs.append(LoggedRun(log, int(m.group(1)), m.group(2).split()))
        elif not runs:
            continue
        elif line.lstrip().startswith(TITLE_START):
            title = [line]
        elif m := SKIPPED.search(line):
            runs[-1].trained, runs[-1].path = False, m.group(1)
        elif m := RESTORED.search(line):
            runs[-1].path = m.group(1)
        elif "Using bfloat16 Automatic Mixed Precision" in line:
            runs[-1].bf16 = True
        elif m := ROW.match(line.strip()):
            key, value = m.group(1).strip(), m.group(2).strip()
            if key != "what":
                runs[-1].table[key] = value
    return runs if keep_unfinished else [r for r in runs if "output dir" in r.table]


def _pct(value: str | None) -> float | None:
    m = PERCENT.match(value or "")
    return None if m is None else float(m.group(1)) / 100


def exact_accuracy(printed: float | None, n: int | None) -> float | None:
    """The accuracy a run computed, from the value it printed (rounded to 0.01 points) and the size ``n`` of the
    split it was measured on: the one k/n (float32, as torchmetrics computes it) that rounds to the printed
    value; the printed value when n is unknown or several k fit (n > 10,000)."""
    if printed is None or not n:
        return printed
    import numpy as np  # noqa: PLC0415

    fits = [
        k
        for k in range(max(0, round(printed * n) - 2), round(printed * n) + 3)
        if abs(100 * k / n - 100 * printed) <= 0.005 + 1e-9
    ]
    return float(np.float32(fits[0]) / np.float32(n)) if len(fits) == 1 else printed


_SIZES: dict[str, dict[str, int]] = {}


def split_sizes(data_cfg: dict) -> dict[str, int]:
    """Sizes of the val and test splits a data config gives (the datamodule built and split, no training)."""
    key = json.dumps(data_cfg, sort_keys=True, default=str)
    if key not in _SIZES:
        from hydra.utils import instantiate  # noqa: PLC0415

        dm = instantiate(data_cfg, _convert_="all")
        dm.prepare_data()
        dm.setup("fit")
        _SIZES[key] = {split: len(dm.splits[split]) for split in ("val", "test") if split in dm.splits}
    return _SIZES[key]


def run_name(overrides: list[str]) -> str:
    """Hydra's ``override_dirname`` of the job (sorted ``key=value``, the app's excluded keys left out)."""
    return ",".join(sorted(o for o in overrides if o.partition("=")[0] not in EXCLUDED_FROM_RUN_NAME))


def consistent(run: LoggedRun) -> bool:
    """Whether the block's summary table belongs to its ``#N : overrides`` line: the table's title shows the
    run_name the overrides give (two streams writing into one file can interleave a header with another's table)."""
    return run.title_run_name == re.sub(r"\[[^\]]*\]", "", run_name(run.overrides))


def summary_of(run: LoggedRun, cfg: dict, sizes: dict[str, int] | None = None) -> dict:
    """The summary fields the log holds (seed, lr and data from the run's composed config ``cfg``; accuracies
    made exact with the split ``sizes``, see ``exact_accuracy``); the rest of a live run's summary is absent,
    not guessed."""
    sizes = sizes or {}
    t = run.table
    what = t.get("method", "")
    if m := LORA_METHOD.match(what):
        method, r, alpha = "lora", int(m.group(1)), float(m.group(2))
        targets = [s.strip().strip("'") for s in m.group(3).split(",") if s.strip()]
    else:
        method, r, alpha, targets = what, None, None, None  # print_summary writes the method as is: full, head_only
    fit = FIT.match(t.get("fit time", ""))
    params = PARAMS.match(t.get("trainable params", ""))
    return {
        "experiment": run.experiment,
        "run_name": run_name(run.overrides),
        "method": method,
        "seed": int(cfg["seed"]),
        "targets": targets,
        "r": r,
        "alpha": alpha,
        "variant": "lora" if method == "lora" else None,
        "lr": None if cfg["model"].get("lr") is None else float(cfg["model"]["lr"]),
        "data": str(cfg["data"].get("source")),
        "best_val_acc": exact_accuracy(_pct(t.get("best val accuracy")), sizes.get("val")),
        "test_acc": exact_accuracy(_pct(t.get("test accuracy")), sizes.get("test")),
        "test_f1": _pct(t.get("test macro-F1")),
        "val_curve": [],
        "params_trainable": None if params is None else int(params.group(1).replace(",", "")),
        "params_total": None if params is None else int(params.group(2).replace(",", "")),
        "fit_seconds": None if fit is None else float(fit.group(1)),
        "steps": None if fit is None else int(fit.group(2)),
        "precision": ("bf16-mixed" if run.bf16 else "32-true") if run.trained else None,
        "adapter_path": None,
        "output_dir": run.output_dir,
        "recovered_from": run.log,
        "split_sizes": sizes,
    }


def relative_dir(output_dir: str) -> Path:
    """``/any/where/multirun/ablations/table6/qv/0`` -> ``ablations/table6/qv/0``."""
    parts = Path(output_dir).parts
    if "multirun" not in parts:
        raise ValueError(f"output dir {output_dir!r} is not below a multirun/ folder; cannot place its record")
    return Path(*parts[len(parts) - parts[::-1].index("multirun") :])


def identity(row: dict) -> tuple:
    """What makes two runs the same settings and seed."""
    key = dict(row, targets_key=",".join(row.get("targets") or []))
    return tuple(key.get(k) for k in IDENTITY)


def recovered_runs(logs: Iterable[Path], rejected: list[str] | None = None) -> dict[Path, tuple[dict, dict]]:
    """Per run folder (relative to ``multirun/``): the summary and composed config of the block that trained
    it (a skipped re-launch only when no log shows the training), in log order. Blocks whose table does not
    belong to their overrides (``consistent``) are left out and described in ``rejected``."""
    blocks: dict[Path, LoggedRun] = {}
    for path in logs:
        for run in parse_log(path.read_text(errors="replace"), str(path)):
            if not consistent(run):
                if rejected is not None:
                    rejected.append(
                        repo_relative(
                            f"{run.log} job #{run.job}: overrides {' '.join(run.overrides)!r} but its table "
                            f"is of {run.title_run_name!r} ({run.output_dir}): interleaved output, not recovered"
                        )
                    )
                continue
            rel = relative_dir(run.output_dir)
            if rel in blocks and blocks[rel].trained and not run.trained:
                continue
            blocks[rel] = run
    out = {}
    for rel, run in blocks.items():
        cfg = composed_config(run)
        summary = summary_of(run, cfg, split_sizes(cfg["data"]))
        if summary["experiment"] != cfg.get("experiment_name"):
            raise ValueError(
                f"{run.log} job #{run.job}: the table says experiment {summary['experiment']!r}, its overrides "
                f"compose {cfg.get('experiment_name')!r} with this checkout's configs; recover it at the commit that "
                "ran it"
            )
        cfg["run_name"] = summary["run_name"]
        cfg["trainer"]["precision"] = summary["precision"]
        out[rel] = (summary, cfg)
    add_lora_params([summary for summary, _ in out.values()])
    return out


def add_lora_params(summaries: list[dict]) -> None:
    """``params_lora`` (the table prints only trainable and total): a LoRA run's total minus the base model's,
    read from the full fine-tuning runs on the same data (whose total is the base model with that data's head);
    0 for full / head only; absent when the logs hold no full run on that data."""
    bases: dict[str | None, set[int]] = {}
    for s in summaries:
        if s["method"] == "full" and s.get("params_total"):
            bases.setdefault(s.get("data"), set()).add(s["params_total"])
    for data, sizes in bases.items():
        if len(sizes) > 1:
            raise ValueError(
                f"the logs hold full fine-tuning runs on {data} of {len(sizes)} model sizes ({sorted(sizes)}); "
                "recover them separately"
            )
    for s in summaries:
        if s["method"] != "lora":
            s["params_lora"] = 0
        elif s.get("data") in bases and s.get("params_total"):
            s["params_lora"] = s["params_total"] - next(iter(bases[s.get("data")]))


def composed_config(run: LoggedRun) -> dict:
    """The run's config as this checkout's Hydra configs compose it from the logged overrides."""
    from hydra import compose, initialize_config_module  # noqa: PLC0415
    from hydra.core.global_hydra import GlobalHydra  # noqa: PLC0415
    from hydra.core.hydra_config import HydraConfig  # noqa: PLC0415
    from omegaconf import OmegaConf, open_dict  # noqa: PLC0415

    import lora_lightning.app.train  # noqa: F401,PLC0415 (registers the structured config schemas)

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="lora_lightning.app.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=run.overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.job.num = run.job
        cfg.hydra.runtime.output_dir = run.output_dir
        cfg.hydra.sweep.dir = str(Path(run.output_dir).parent)
    HydraConfig.instance().set_config(cfg)
    out = OmegaConf.to_container(cfg, resolve=True)
    out.pop("hydra")
    out["recovered"] = {
        "from_log": run.log,
        "note": "composed from the logged overrides with the configs of the commit that recovered it",
    }
    return out


def recover(
    logs: Iterable[Path], dest: Path, existing: list[dict], rejected: list[str] | None = None
) -> tuple[list[Path], list[tuple[dict, dict]]]:
    """Write ``summary.json`` + ``resolved_config.yaml`` below ``dest`` for every logged run that has no real
    run folder there and no real twin (``identity``) among ``existing``. Returns the files written and the
    (logged, real) pairs of runs that exist both ways."""
    from omegaconf import OmegaConf  # noqa: PLC0415

    real = {identity(r): r for r in existing if not r.get("recovered_from")}
    written: list[Path] = []
    twins: list[tuple[dict, dict]] = []
    for rel, (summary, cfg) in recovered_runs(logs, rejected).items():
        target = dest / rel
        held = target / "summary.json"
        if held.is_file() and not json.loads(held.read_text()).get("recovered_from"):
            continue  # the run's own folder is there: this block is that very run, not a twin
        if identity(summary) in real:
            twins.append((summary, real[identity(summary)]))
            if held.is_file():  # recovered before its re-run came in
                for name in ("summary.json", "resolved_config.yaml"):
                    (target / name).unlink(missing_ok=True)
            continue
        target.mkdir(parents=True, exist_ok=True)
        summary = dict(summary, output_dir=str(Path("multirun") / rel))
        (target / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        OmegaConf.save(OmegaConf.create(cfg), target / "resolved_config.yaml")
        written += [target / "summary.json", target / "resolved_config.yaml"]
    return written, twins


def write_record(dest: Path, logs: list[Path], twins: list[tuple[dict, dict]], rejected: list[str]) -> Path:
    """``dest/recovery.json``: which logs were read, how many runs were recovered, and the twin checks (paths
    relative to the repository: ``records.repo_relative``)."""
    path = dest / "recovery.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    checks = twin_checks(twins)
    record = {
        "logs": sorted({repo_relative(p) for p in previous.get("logs", [])} | {repo_relative(str(p)) for p in logs}),
        "recovered_runs": sum(1 for p in dest.rglob("summary.json") if json.loads(p.read_text()).get("recovered_from")),
        "twin_checks": checks,
        "twins_same": sum(line.startswith("same") for line in checks),
        "rejected_blocks": sorted({repo_relative(b) for b in previous.get("rejected_blocks", [])} | set(rejected)),
    }
    dest.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def twin_checks(twins: list[tuple[dict, dict]]) -> list[str]:
    """One line per logged/real pair: are test and best validation accuracy the same (the logged ones made
    exact with the split sizes, so 'same' means equal to float32 precision)?"""
    lines = []
    for logged, real in sorted(twins, key=lambda p: identity(p[0])):
        same = all(
            logged.get(k) is not None and real.get(k) is not None and abs(logged[k] - real[k]) < 1e-7
            for k in ("best_val_acc", "test_acc")
        )
        lines.append(
            f"{'same' if same else 'DIFFERENT'}: {logged['experiment']} {logged['run_name']} seed {logged['seed']}: "
            f"logged val {100 * logged['best_val_acc']:.2f} test {100 * logged['test_acc']:.2f}, re-run val "
            f"{100 * real['best_val_acc']:.2f} test {100 * real['test_acc']:.2f}"
        )
    return lines
