"""Summarise the Table 5 / Table 6 sweeps into markdown tables, CSV files and PNG plots.

    python -m experiments.summarize                       # reads multirun/{table5,table6,table6_reference}
    python -m experiments.summarize --runs multirun --out experiments/results

Every number comes from the ``summary.json`` each ``lora-train`` run writes (metric: best
validation accuracy over the run, as the paper reports validation accuracy). Groups are averaged
over seeds: mean ± sample standard deviation (n-1), n = number of seeds found. The paper's
figures (GPT-3 175B, ../shared/PAPER.md) are printed beside ours for the shape comparison.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

# --------------------------------------------------------------------------- the paper's figures
TABLE5_ORDER = ["q", "k", "v", "o", "q,k", "q,v", "q,k,v,o"]
TABLE5_PAPER = {  # weights -> (r, WikiSQL, MultiNLI), GPT-3 175B, 18M-parameter budget
    "q": (8, 70.4, 91.0),
    "k": (8, 70.0, 90.8),
    "v": (8, 73.0, 91.0),
    "o": (8, 73.2, 91.3),
    "q,k": (4, 71.4, 91.3),
    "q,v": (4, 73.7, 91.3),
    "q,k,v,o": (2, 73.7, 91.7),
}
TABLE6_RANKS = [1, 2, 4, 8, 64]
TABLE6_TARGETS = ["q", "q,v", "q,k,v,o"]
TABLE6_PAPER = {  # weights -> {r: (WikiSQL, MultiNLI)}
    "q": {1: (68.8, 90.7), 2: (69.6, 90.9), 4: (70.5, 91.1), 8: (70.4, 90.7), 64: (70.0, 90.7)},
    "q,v": {1: (73.4, 91.3), 2: (73.3, 91.4), 4: (73.7, 91.3), 8: (73.8, 91.6), 64: (73.5, 91.4)},
    "q,k,v,o": {1: (74.1, 91.2), 2: (73.7, 91.7), 4: (74.0, 91.7), 8: (74.0, 91.5), 64: (73.9, 91.4)},
}
METRIC = "best_val_acc"


# --------------------------------------------------------------------------- loading
def load_runs(root: Path) -> list[dict]:
    """Every ``summary.json`` below ``root`` (one per finished run), with ``dir`` added."""
    rows = []
    for path in sorted(root.rglob("summary.json")):
        row = json.loads(path.read_text())
        row["dir"] = str(path.parent)
        row["targets_key"] = ",".join(row.get("targets") or [])
        rows.append(row)
    return rows


@dataclass(frozen=True)
class Stat:
    """Mean, sample std (n-1; NaN for n=1) and count of a group of runs (accuracy in %)."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> "Stat":
        v = [100.0 * x for x in values]
        if not v:
            return cls(math.nan, math.nan, 0)
        return cls(statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else math.nan, len(v))

    @property
    def sem(self) -> float:
        return self.std / math.sqrt(self.n) if self.n > 1 else math.nan

    def __str__(self) -> str:
        if self.n == 0:
            return "-"
        if self.n == 1:
            return f"{self.mean:.1f} (n=1)"
        return f"{self.mean:.1f} ± {self.std:.1f}"


def group(rows: list[dict], *keys: str) -> dict[tuple, Stat]:
    out: dict[tuple, list[float]] = {}
    for row in rows:
        out.setdefault(tuple(row[k] for k in keys), []).append(row[METRIC])
    return {k: Stat.of(v) for k, v in out.items()}


def pooled_std(rows: list[dict], *keys: str) -> tuple[float, int]:
    """Seed noise: the pooled within-group standard deviation (in %) and its degrees of freedom."""
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(100.0 * row[METRIC])
    ss = sum(sum((x - statistics.fmean(v)) ** 2 for x in v) for v in groups.values() if len(v) > 1)
    dof = sum(len(v) - 1 for v in groups.values() if len(v) > 1)
    return (math.sqrt(ss / dof) if dof else math.nan), dof


def verdict(diff: float, se: float) -> str:
    """How a difference the paper says is positive came out here."""
    if math.isnan(se):
        return "n/a (one seed)"
    if diff > 2 * se:
        return "agrees (> 2 SE)"
    if diff > 0:
        return "same sign, within noise"
    if diff > -2 * se:
        return "opposite sign, within noise"
    return "disagrees (< -2 SE)"


def diff_of(a: Stat, b: Stat) -> tuple[float, float]:
    """``a - b`` and its standard error from the two groups' seed spread."""
    return a.mean - b.mean, math.sqrt(a.sem**2 + b.sem**2) if a.n > 1 and b.n > 1 else math.nan


# --------------------------------------------------------------------------- tables
def write_csv(rows: list[dict], path: Path) -> None:
    cols = ["experiment", "method", "variant", "lr", "targets_key", "r", "alpha", "seed", "best_val_acc", "params_lora", "params_trainable", "fit_seconds", "steps", "adapter_bytes"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for row in sorted(rows, key=lambda r: (r.get("method", ""), r["targets_key"], r.get("r") or 0, r.get("seed", 0))):
            w.writerow([row.get(c, "") for c in cols])


def table5_markdown(rows: list[dict]) -> tuple[str, dict[str, Stat]]:
    stats = {k[0]: s for k, s in group(rows, "targets_key").items()}
    ranks = {row["targets_key"]: row["r"] for row in rows}
    params = {row["targets_key"]: row["params_lora"] for row in rows}
    head = "| weights | " + " | ".join(f"W{{{t}}}" for t in TABLE5_ORDER) + " |"
    lines = [head, "|---" * (len(TABLE5_ORDER) + 1) + "|"]
    lines.append("| r (ours) | " + " | ".join(str(ranks.get(t, "-")) for t in TABLE5_ORDER) + " |")
    lines.append("| LoRA params (ours) | " + " | ".join(f"{params[t]:,}" if t in params else "-" for t in TABLE5_ORDER) + " |")
    lines.append("| **val acc, MiniLM / Rotten Tomatoes (ours)** | " + " | ".join(f"**{stats[t]}**" if t in stats else "-" for t in TABLE5_ORDER) + " |")
    lines.append("| seeds (ours) | " + " | ".join(str(stats[t].n) if t in stats else "0" for t in TABLE5_ORDER) + " |")
    lines.append("| r (paper) | " + " | ".join(str(TABLE5_PAPER[t][0]) for t in TABLE5_ORDER) + " |")
    lines.append("| WikiSQL (paper, ±0.5) | " + " | ".join(f"{TABLE5_PAPER[t][1]}" for t in TABLE5_ORDER) + " |")
    lines.append("| MultiNLI (paper, ±0.1) | " + " | ".join(f"{TABLE5_PAPER[t][2]}" for t in TABLE5_ORDER) + " |")
    return "\n".join(lines), stats


def table5_findings(stats: dict[str, Stat]) -> str:
    singles = [t for t in ("q", "k", "v", "o") if t in stats]
    lines = ["| paper's claim | ours: difference (pp) ± SE | verdict |", "|---|---|---|"]
    if not singles:
        return "\n".join(lines)
    best_single = max(singles, key=lambda t: stats[t].mean)
    for multi in ("q,v", "q,k,v,o"):
        if multi in stats:
            d, se = diff_of(stats[multi], stats[best_single])
            lines.append(f"| W{{{multi}}} beats the best single type (W{{{best_single}}}) | {d:+.2f} ± {se:.2f} | {verdict(d, se)} |")
    for weak in ("q", "k"):
        others = [t for t in ("v", "o") if t in stats]
        if weak in stats and others:
            ref = min(others, key=lambda t: stats[t].mean)
            d, se = diff_of(stats[ref], stats[weak])
            lines.append(f"| W{{{weak}}} alone is worse than W{{{ref}}} (the weaker of Wv, Wo) | {d:+.2f} ± {se:.2f} | {verdict(d, se)} |")
    return "\n".join(lines)


def table6_markdown(rows: list[dict], ref_rows: list[dict]) -> tuple[str, dict[tuple[str, int], Stat]]:
    stats = {(k[0], k[1]): s for k, s in group(rows, "targets_key", "r").items()}
    lines = ["| weights | " + " | ".join(f"r={r}" for r in TABLE6_RANKS) + " | source |", "|---" * (len(TABLE6_RANKS) + 2) + "|"]
    for t in TABLE6_TARGETS:
        lines.append(f"| **W{{{t}}}** | " + " | ".join(f"**{stats[(t, r)]}**" if (t, r) in stats else "-" for r in TABLE6_RANKS) + " | ours, val acc |")
        lines.append(f"| | " + " | ".join(f"{TABLE6_PAPER[t][r][0]}" for r in TABLE6_RANKS) + " | paper, WikiSQL ±0.5 |")
        lines.append(f"| | " + " | ".join(f"{TABLE6_PAPER[t][r][1]}" for r in TABLE6_RANKS) + " | paper, MultiNLI ±0.1 |")
    if ref_rows:
        ref = {k[0]: s for k, s in group(ref_rows, "method").items()}
        params = {row["method"]: row["params_trainable"] for row in ref_rows}
        lines.append("")
        lines.append("| reference (ours) | val acc | trainable params |")
        lines.append("|---|---|---|")
        for m, label in (("full", "full fine-tuning"), ("head_only", "head only (frozen encoder)")):
            if m in ref:
                lines.append(f"| {label} | {ref[m]} | {params[m]:,} |")
    return "\n".join(lines), stats


def table6_findings(stats: dict[tuple[str, int], Stat]) -> str:
    lines = ["| paper's claim | ours: difference (pp) ± SE | verdict |", "|---|---|---|"]
    if ("q,v", 1) in stats and ("q,v", 64) in stats:
        d, se = diff_of(stats[("q,v", 1)], stats[("q,v", 64)])
        lines.append(f"| r=1 is already competitive for W{{q,v}} (r=1 minus r=64; paper: -0.1 / -0.1) | {d:+.2f} ± {se:.2f} | {'agrees (not 2 SE below r=64)' if d > -2 * se else 'disagrees (more than 2 SE below r=64)'} |")
    if ("q", 1) in stats and ("q", 8) in stats:
        d, se = diff_of(stats[("q", 8)], stats[("q", 1)])
        lines.append(f"| W{{q}} alone gains from a larger r (r=8 minus r=1; paper: +1.6 / 0.0) | {d:+.2f} ± {se:.2f} | {verdict(d, se)} |")
    for t in TABLE6_TARGETS:
        if (t, 8) in stats and (t, 64) in stats:
            d, se = diff_of(stats[(t, 64)], stats[(t, 8)])
            lines.append(f"| little gain past r=8 for W{{{t}}} (r=64 minus r=8) | {d:+.2f} ± {se:.2f} | {'agrees (gain under 2 SE)' if d < 2 * se else 'disagrees (gain over 2 SE)'} |")
    if ("q,v", 8) in stats and ("q", 8) in stats:
        d, se = diff_of(stats[("q,v", 8)], stats[("q", 8)])
        lines.append(f"| W{{q,v}} beats W{{q}} at the same r=8 | {d:+.2f} ± {se:.2f} | {verdict(d, se)} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def plot_table5(rows: list[dict], stats: dict[str, Stat], path: Path) -> Path:
    fig = _figure(7.5, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    present = [t for t in TABLE5_ORDER if t in stats]
    xs = range(len(present))
    ax.bar(xs, [stats[t].mean for t in present], yerr=[0 if math.isnan(stats[t].std) else stats[t].std for t in present], color="#8fb3d9", capsize=4, label="mean ± std over seeds")
    for i, t in enumerate(present):
        seeds = [100 * r[METRIC] for r in rows if r["targets_key"] == t]
        ax.scatter([i] * len(seeds), seeds, color="#1f3b5c", s=12, zorder=3, label="one seed" if i == 0 else None)
    ranks = {row["targets_key"]: row["r"] for row in rows}
    ax.set_xticks(list(xs), [f"W{{{t}}}\nr={ranks[t]}" for t in present])
    lo = min(100 * r[METRIC] for r in rows)
    hi = max(100 * r[METRIC] for r in rows)
    ax.set_ylim(lo - 1.5, hi + 1.0)
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Table 5 at CPU scale: one budget (36,864 LoRA params), different weight types")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    return path


def plot_table6(stats: dict[tuple[str, int], Stat], ref_rows: list[dict], path: Path) -> Path:
    fig = _figure(6.5, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for t, colour in zip(TABLE6_TARGETS, ("#d1495b", "#00798c", "#edae49")):
        rs = [r for r in TABLE6_RANKS if (t, r) in stats]
        if not rs:
            continue
        means = [stats[(t, r)].mean for r in rs]
        errs = [0 if math.isnan(stats[(t, r)].std) else stats[(t, r)].std for r in rs]
        ax.errorbar(rs, means, yerr=errs, marker="o", capsize=3, color=colour, label=f"W{{{t}}}")
    ref = {k[0]: s for k, s in group(ref_rows, "method").items()} if ref_rows else {}
    for m, style, label in (("full", "--", "full fine-tuning"), ("head_only", ":", "head only")):
        if m in ref:
            ax.axhline(ref[m].mean, color="grey", linestyle=style, label=f"{label} ({ref[m]})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(TABLE6_RANKS, [str(r) for r in TABLE6_RANKS])
    ax.set_xlabel("rank r")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Table 6 at CPU scale: accuracy vs rank (mean ± std over seeds)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    return path


# --------------------------------------------------------------------------- variants (issue 8)
VARIANT_ORDER = ["lora", "rslora", "dora", "pissa", "vera", "adalora", "qlora"]


def variants_markdown(rows: list[dict]) -> str:
    """One row per (variant, lr): val acc, adapter parameters, step time, adapter bytes, base bytes."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in rows:
        groups.setdefault((row.get("variant") or "lora", row.get("lr") or math.nan), []).append(row)
    order = sorted(groups, key=lambda k: (VARIANT_ORDER.index(k[0]) if k[0] in VARIANT_ORDER else 99, k[1]))
    lines = [
        "| variant | lr | val acc (mean ± std) | seeds | adapter params | trainable (incl. head) | s / step (median) | adapter file | adapted base weights |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in order:
        g = groups[key]
        stat = Stat.of(r[METRIC] for r in g)
        step = statistics.median(r["fit_seconds"] / r["steps"] for r in g if r.get("steps"))
        base = g[0].get("base_bytes_after")
        before = g[0].get("base_bytes_before")
        base_txt = f"{base / 1e6:.2f} MB (from {before / 1e6:.2f} MB)" if base and before and base != before else "unchanged"
        lines.append(
            f"| {key[0]} | {key[1]:g} | **{stat}** | {stat.n} | {g[0]['params_lora']:,} | {g[0]['params_trainable']:,} "
            f"| {step:.2f} | {g[0].get('adapter_bytes', 0) / 1e6:.2f} MB | {base_txt} |"
        )
    return "\n".join(lines)


def plot_adalora_ranks(rows: list[dict], path: Path) -> Path | None:
    """Final AdaLoRA rank per adapted matrix (one bar group per seed)."""
    runs = [r for r in rows if r.get("adalora_ranks")]
    if not runs:
        return None
    fig = _figure(8.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    names = sorted(runs[0]["adalora_ranks"])
    width = 0.8 / len(runs)
    for i, run in enumerate(sorted(runs, key=lambda r: r.get("seed", 0))):
        ax.bar([j + i * width for j in range(len(names))], [run["adalora_ranks"].get(n, 0) for n in names], width, label=f"seed {run.get('seed')}")
    short = [n.replace("model.bert.encoder.layer.", "L").replace(".attention.self.", ".") for n in names]
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], short, rotation=60, fontsize=7)
    ax.set_ylabel("final rank")
    ax.set_title("AdaLoRA: rank per matrix after budget pruning (start r=8)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    return path


# --------------------------------------------------------------------------- main
def noise_line(rows: list[dict], *keys: str) -> str:
    sd, dof = pooled_std(rows, *keys)
    times = [row["fit_seconds"] for row in rows if row.get("fit_seconds")]
    t = f"; fit time per run median {statistics.median(times):.0f} s" if times else ""
    return f"{len(rows)} runs; seed noise (pooled within-config std) {sd:.2f} pp with {dof} degrees of freedom{t}."


def summarize(runs: Path, out: Path) -> str:
    """Write the tables, CSVs and plots for whatever sweeps exist under ``runs``; return the markdown."""
    parts: list[str] = []
    t5 = [r for r in load_runs(runs / "table5") if r.get("method") == "lora"]
    if t5:
        write_csv(t5, out / "table5_runs.csv")
        md, stats = table5_markdown(t5)
        plot_table5(t5, stats, out / "table5.png")
        parts += ["## Table 5 (ours)", "", md, "", noise_line(t5, "targets_key"), "", table5_findings(stats), "", "![table 5](results/table5.png)", ""]
    t6 = [r for r in load_runs(runs / "table6") if r.get("method") == "lora"]
    ref = [r for r in load_runs(runs / "table6_reference") if r.get("method") in ("full", "head_only")]
    if t6 or ref:
        write_csv(t6 + ref, out / "table6_runs.csv")
        md, stats = table6_markdown(t6, ref)
        plot_table6(stats, ref, out / "table6.png")
        parts += ["## Table 6 (ours)", "", md, "", noise_line(t6, "targets_key", "r") if t6 else "", "", table6_findings(stats), "", "![table 6](results/table6.png)", ""]
    var = [r for r in load_runs(runs / "variants") if r.get("method") == "lora"]
    if var:
        write_csv(var, out / "variants_runs.csv")
        parts += ["## Variants (ours, issue 8)", "", variants_markdown(var), "", noise_line(var, "variant", "lr"), ""]
        if plot_adalora_ranks(var, out / "adalora_ranks.png"):
            parts += ["![AdaLoRA ranks](results/adalora_ranks.png)", ""]
    if not parts:
        raise SystemExit(f"no summary.json under {runs}/table5, {runs}/table6 or {runs}/table6_reference; run the sweeps first")
    text = "\n".join(parts)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tables.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, default=Path("multirun"), help="folder holding table5/, table6/, table6_reference/")
    p.add_argument("--out", type=Path, default=Path("experiments/results"), help="where tables.md, CSVs and PNGs go")
    args = p.parse_args(argv)
    print(summarize(args.runs, args.out))


if __name__ == "__main__":
    main()
