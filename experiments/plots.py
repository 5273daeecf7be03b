"""The PNG plots of the reports (matplotlib, Agg canvas): Table 5, Table 6, AdaLoRA's ranks and validation
curves. Imports ``records``, ``stats`` and ``claims``.
"""

from __future__ import annotations

import math
from pathlib import Path

from experiments.claims import TABLE5_ORDER, TABLE6_RANKS, TABLE6_TARGETS, table5_stats, table6_stats
from experiments.records import METRIC, METRIC_NAMES, has_metric, metrics_present
from experiments.stats import Stat, group, mean_curve, t_ppf


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    return path


def plot_table5(rows: list[dict], stats: dict[str, Stat], path: Path) -> Path:
    """Bars (mean ± std over seeds) and one dot per seed, per weight-type set; val and test side by side."""
    metrics = metrics_present(rows)
    fig = _figure(7.5, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    present = [t for t in TABLE5_ORDER if t in stats]
    width = 0.8 / len(metrics)
    colours, dot_colours = ("#8fb3d9", "#e3b778"), ("#1f3b5c", "#7a4f0f")  # enough for two metrics
    for m_i, (metric, colour, dots) in enumerate(zip(metrics, colours, dot_colours, strict=False)):  # one or two
        cells = table5_stats(rows, metric)
        xs = [i + (m_i - (len(metrics) - 1) / 2) * width for i in range(len(present))]
        ax.bar(
            xs,
            [cells[t].mean if t in cells else math.nan for t in present],
            width,
            yerr=[0 if t not in cells or math.isnan(cells[t].std) else cells[t].std for t in present],
            color=colour,
            capsize=3,
            label=f"{METRIC_NAMES[metric]}, mean ± std over seeds",
        )
        for x, t in zip(xs, present, strict=True):
            seeds = [100 * r[metric] for r in rows if r["targets_key"] == t and has_metric(r, metric)]
            ax.scatter([x] * len(seeds), seeds, color=dots, s=10, zorder=3)
    ranks = {row["targets_key"]: row["r"] for row in rows}
    ax.set_xticks(list(range(len(present))), [f"W{{{t}}}\nr={ranks[t]}" for t in present])
    values = [100 * r[m] for r in rows for m in metrics if has_metric(r, m)]
    ax.set_ylim(min(values) - 1.5, max(values) + 1.0)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Table 5 at CPU scale: one LoRA parameter budget, different weight types (dots: seeds)", fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    return _save(fig, path)


def plot_table6(
    stats: dict[tuple[str, int], Stat], ref_rows: list[dict], path: Path, rows: list[dict] | None = None
) -> Path:
    """Accuracy vs r per weight-type set (mean ± std over seeds), reference rows as lines; one panel per metric."""
    metrics = metrics_present((rows or []) + ref_rows)
    fig = _figure(6.5 * len(metrics), 4.0)
    for m_i, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), m_i + 1)
        cells = stats if metric == METRIC or rows is None else table6_stats(rows, metric)
        for t, colour in zip(TABLE6_TARGETS, ("#d1495b", "#00798c", "#edae49"), strict=True):
            rs = [r for r in TABLE6_RANKS if (t, r) in cells]
            if rs:
                errs = [0 if math.isnan(cells[(t, r)].std) else cells[(t, r)].std for r in rs]
                ax.errorbar(
                    rs,
                    [cells[(t, r)].mean for r in rs],
                    yerr=errs,
                    marker="o",
                    capsize=3,
                    color=colour,
                    label=f"W{{{t}}}",
                )
        ref = {k[0]: s for k, s in group(ref_rows, "method", metric=metric).items()} if ref_rows else {}
        for m, style, label in (("full", "--", "full fine-tuning"), ("head_only", ":", "head only")):
            if m in ref:
                ax.axhline(ref[m].mean, color="grey", linestyle=style, label=f"{label} ({ref[m]})")
        ax.set_xscale("log", base=2)
        ax.set_xticks(TABLE6_RANKS, [str(r) for r in TABLE6_RANKS])
        ax.set_xlabel("rank r")
        ax.set_ylabel(f"{METRIC_NAMES[metric]} (%)")
        ax.set_title(f"Table 6 at CPU scale: {METRIC_NAMES[metric]} vs rank (mean ± std over seeds)", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


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
        ax.bar(
            [j + i * width for j in range(len(names))],
            [run["adalora_ranks"].get(n, 0) for n in names],
            width,
            label=f"seed {run.get('seed')}",
        )
    short = [n.replace("model.bert.encoder.layer.", "L").replace(".attention.self.", ".") for n in names]
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], short, rotation=60, fontsize=7)
    ax.set_ylabel("final rank")
    ax.set_title("AdaLoRA: rank per matrix after budget pruning (start r=8)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    return path


def plot_curves(panels: dict[str, dict[str, list[dict]]], path: Path) -> Path:
    """Mean validation curves (and the seed range as a band), one panel per key of ``panels``."""
    fig = _figure(5.2 * len(panels), 3.8)
    for i, (title, curves) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for label, runs in curves.items():
            curve = mean_curve(runs)
            steps = [s for s, _, _ in curve]
            (line,) = ax.plot(
                steps, [m for _, m, _ in curve], marker="o", markersize=3, label=f"{label} (n={len(runs)})"
            )
            ax.fill_between(
                steps, [min(v) for _, _, v in curve], [max(v) for _, _, v in curve], color=line.get_color(), alpha=0.15
            )
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def plot_arms(arms: list[tuple[str, list[float]]], path: Path, title: str) -> Path:
    """One bar per arm, its mean accuracy (%) with the 95% t interval of the mean, and one dot per seed; ``arms``:
    (label, per-seed accuracies in [0, 1])."""
    fig = _figure(8.0, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    stats = [Stat.of(values) for _, values in arms]
    half = [t_ppf(0.975, s.n - 1) * s.sem if s.n > 1 else 0.0 for s in stats]
    xs = list(range(len(arms)))
    ax.bar(xs, [s.mean for s in stats], 0.6, yerr=half, color="#8fb3d9", capsize=3, label="mean, 95% interval")
    for x, (_, values) in zip(xs, arms, strict=True):
        ax.scatter([x] * len(values), [100 * v for v in values], color="#1f3b5c", s=10, zorder=3)
    ax.set_xticks(xs, [label for label, _ in arms], fontsize=7, rotation=20, ha="right")
    points = [100 * v for _, values in arms for v in values]
    ax.set_ylim(min(points) - 2.0, max(points) + 1.5)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    return _save(fig, path)


def plot_sizes(series: list[tuple[str, list[tuple[int, list[float]]]]], path: Path, title: str) -> Path:
    """Accuracy (%, mean ± sd over seeds, dots per seed) against the method's trainable parameters (log axis), one
    line per method; ``series``: (label, [(parameters, per-seed accuracies in [0, 1])])."""
    fig = _figure(6.5, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    for label, points in series:
        xs = [p for p, _ in points]
        stats = [Stat.of(values) for _, values in points]
        sd = [0.0 if math.isnan(s.std) else s.std for s in stats]
        line = ax.errorbar(xs, [s.mean for s in stats], yerr=sd, marker="o", capsize=3, label=label)
        for x, (_, values) in zip(xs, points, strict=True):
            ax.scatter([x] * len(values), [100 * v for v in values], color=line[0].get_color(), s=8, alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("the method's own trainable parameters")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    return _save(fig, path)
