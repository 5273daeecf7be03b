"""LoRA beside the earlier methods (experiments/PREREGISTRATION.md, Runs §7-9; issue 38), from the committed records.

    bash experiments/baselines.sh search   # -> multirun/baselines/search/<arm>/lr<lr>/0
    python -m experiments collect          # -> experiments/runs/baselines/...
    python -m experiments baselines        # -> experiments/results/baselines.md

Sections: the paper's Table 1 (inference latency of adapters, from ``benchmarks/adapter_latency.json``) and the
search stage of Table 2 (each arm's best validation accuracy per lr at seed 0, the lr chosen, and whether it sits at
a grid edge, which the pre-registration answers with one more point). Full fine-tuning and head only take their
searches from the committed ablation search (same scale and seed). The confirmatory seeds are reported once run.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from experiments.records import REPO, load_runs

RUNS = REPO / "experiments" / "runs"
BASELINE_RUNS = RUNS / "baselines"
ABLATION_SEARCH = RUNS / "ablations" / "search"
LATENCY = REPO / "benchmarks" / "adapter_latency.json"
OUT = REPO / "experiments" / "results" / "baselines.md"
ARMS = (  # arm -> (label, the pre-registered search grid)
    ("lora_qv", "LoRA W{q,v} r=8", (0.001, 0.002, 0.004, 0.008)),
    ("lora_default", "LoRA W{q,k,v,o} r=8 (default recipe)", (0.001, 0.002, 0.004, 0.008)),
    ("full", "full fine-tuning", (5e-05, 0.0001, 0.0002, 0.0004)),
    ("head_only", "head only", (0.001, 0.003, 0.01, 0.03)),
    ("bitfit", "BitFit", (0.001, 0.003, 0.01, 0.03)),
    ("adapter_h", "Adapter^H (m=8)", (0.001, 0.002, 0.004, 0.008)),
    ("adapter_l", "Adapter^L (m=16)", (0.001, 0.002, 0.004, 0.008)),
    ("prefix", "PreLayer (prefix tuning, 16 tokens)", (0.003, 0.01, 0.03, 0.1)),
    ("prompt", "PreEmbed (prompt tuning, 16 tokens)", (0.003, 0.01, 0.03, 0.1)),
    ("lora_pe", "LoRA+PE (W{q,v} r=8 + 16 prompt tokens)", (0.001, 0.002, 0.004, 0.008)),
)
FROM_ABLATION_SEARCH = ("full", "head_only")


def arm_of(run: dict, path: Path | None = None) -> str | None:
    """The §7 arm a search record belongs to: its folder below ``search/`` (this study's runs) or its method (the
    ablation search's full fine-tuning and head-only runs)."""
    if path is not None and "search" in path.parts:
        parts = path.parts
        return parts[parts.index("search") + 1]
    return run.get("method")


def search_rows(baseline_root: Path = BASELINE_RUNS, ablation_root: Path = ABLATION_SEARCH) -> dict[str, dict]:
    """``arm -> {lr: best_val_acc}`` at seed 0 and 150 steps."""
    out: dict[str, dict] = defaultdict(dict)
    search = baseline_root / "search"
    if search.is_dir():
        for summary in sorted(search.rglob("summary.json")):
            run = json.loads(summary.read_text())
            arm = arm_of(run, summary.relative_to(baseline_root))
            if run.get("best_val_acc") is not None:
                out[arm][float(run["lr"])] = float(run["best_val_acc"])
    for run in load_runs(ablation_root) if ablation_root.is_dir() else []:
        if run.get("method") in FROM_ABLATION_SEARCH and run.get("steps") == 150 and run.get("seed") == 0:
            out[run["method"]][float(run["lr"])] = float(run["best_val_acc"])
    return dict(out)


def choose(scores: dict[float, float], grid: tuple[float, ...]) -> tuple[float, str]:
    """The lr with the best validation accuracy (the smaller lr on a tie) and where it sits in the grid searched."""
    lr = max(sorted(scores), key=lambda k: scores[k])
    lo, hi = min(scores), max(scores)
    edge = "low edge" if lr == lo else "high edge" if lr == hi else "inside"
    if set(scores) - set(grid):
        edge += " (grid extended)"
    return lr, edge


def chosen_lrs(rows: dict[str, dict]) -> dict[str, float]:
    """``arm -> lr`` for the seeds stage: the best lr of each arm whose whole pre-registered grid has run and whose
    best lr is inside the grid or past an edge the grid was extended at (the edge rule). Other arms are left out."""
    out = {}
    for arm, _, grid in ARMS:
        scores = rows.get(arm, {})
        if not set(grid) <= set(scores):
            continue
        lr, where = choose(scores, grid)
        if where in ("low edge", "high edge"):
            continue
        out[arm] = lr
    return out


def search_section(rows: dict[str, dict]) -> list[str]:
    lines = [
        "## Table 2's search stage (seed 0, best validation accuracy, %)",
        "",
        "Each arm's own learning rates, 4 per arm (pre-registered grids); the chosen lr is the best; an lr at a grid "
        "edge gets one more point beyond it before the seeds run (`experiments/PREREGISTRATION.md` §7).",
        "",
        "| arm | lr: best val acc | chosen lr | where | runs |",
        "|---|---|---|---|---|",
    ]
    for arm, label, grid in ARMS:
        scores = rows.get(arm, {})
        if not scores:
            lines.append(f"| {label} | not run yet | - | - | 0 of {len(grid)} |")
            continue
        cells = ", ".join(f"{lr:g}: {100 * v:.1f}" for lr, v in sorted(scores.items()))
        lr, where = choose(scores, grid)
        done = f"{len(scores)} of {len(grid)}" if len(scores) < len(grid) else f"{len(scores)}"
        where = where if len(scores) >= len(grid) else "search unfinished"
        lines.append(f"| {label} | {cells} | {lr:g} | {where} | {done} |")
    lines.append("")
    return lines


def pct(r: float) -> str:
    return f"{100 * (r - 1):+.1f}%"


def latency_section(path: Path = LATENCY) -> list[str]:
    lines = ["## Table 1: inference latency (`python -m benchmarks.adapter_latency`)", ""]
    if not path.is_file():
        return lines + ["Not run yet.", ""]
    data = json.loads(path.read_text())
    paper = data["paper"]
    lines += [
        "One forward pass in fp32 on this CPU, overhead over the base model in the same round (median [p25, p75] over "
        "rounds), the adapters' parameter count in brackets; the paper's overheads (GPT-2 medium, V100) beside them.",
        "",
    ]
    for name, res in data["models"].items():
        lines += [
            f"### {name}",
            "",
            "| batch × seq | rounds | base (ms) | LoRA merged | LoRA unmerged | Adapter^H | Adapter^L "
            "| paper Adapter^H | paper Adapter^L |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for key, s in res["settings"].items():
            o = s["overhead"]
            cell = {
                c: f"{pct(o[c]['median'])} [{pct(o[c]['p25'])}, {pct(o[c]['p75'])}] ({s['added_params'][c] / 1e6:.2f}M)"
                for c in o
            }
            ref = {c: pct(paper[c][key] / paper["base"][key]) for c in ("adapter_h", "adapter_l")}
            lines.append(
                f"| {s['batch']} × {s['seq']} | {s['rounds']} | {1e3 * s['seconds']['base']['median']:.0f} | "
                f"{cell['lora_merged']} | {cell['lora_unmerged']} | {cell['adapter_h']} | {cell['adapter_l']} | "
                f"{ref['adapter_h']} | {ref['adapter_l']} |"
            )
        lines.append("")
    return lines


def report(rows: dict[str, dict], latency: Path = LATENCY) -> str:
    lines = [
        "# LoRA beside adapters, prefix tuning and BitFit (the paper's Tables 1-2 at CPU scale)",
        "",
        "<!-- generated by `python -m experiments baselines` from experiments/runs and benchmarks/; do not edit -->",
        "",
        "The methods are the app's `lora=<method>` (docs/main-job.md, \"The paper's baselines\"). The comparison "
        "is pre-registered in `experiments/PREREGISTRATION.md` §7-9: a search stage (4 lrs per arm, seed 0), then "
        "21 seeds per arm (80% power for a 1-point difference over a Holm family of six checks). Only what has run is "
        "reported below.",
        "",
    ]
    lines += latency_section(latency)
    lines += search_section(rows)
    lines += [
        "## Table 2's seeds",
        "",
        "Not run yet: the confirmatory seeds (101-121 per arm) start after the search stage, as pre-registered.",
        "",
    ]
    return "\n".join(lines)


def write_report(
    baseline_root: Path = BASELINE_RUNS, ablation_root: Path = ABLATION_SEARCH, latency: Path = LATENCY, out: Path = OUT
) -> str:
    """``out`` from the records; returns its text."""
    text = report(search_rows(baseline_root, ablation_root), latency)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text
