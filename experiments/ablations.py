"""The README's ablation sections: Table 5, Table 6 (with its reference rows), the variants and the convergence
of the Table 6 runs; also ``results/tables.md``. Built from ``records``, ``stats``, ``claims``, ``tables`` and
``plots``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from experiments.claims import ClaimCheck, ablation_checks
from experiments.plots import plot_adalora_ranks, plot_curves, plot_table5, plot_table6
from experiments.records import (
    METRIC,
    METRIC_NAMES,
    load_runs,
    metrics_present,
    of_experiment,
    read_variants_csv,
    relink,
    with_curves,
)
from experiments.stats import ALPHA, MARGIN, convergence_check
from experiments.tables import (
    claims_markdown,
    method_markdown,
    noise_line,
    rank_profile_markdown,
    table5_markdown,
    table6_markdown,
    targets_text,
    variants_markdown,
    write_csv,
)


# --------------------------------------------------------------------------- Table 5, Table 6, variants
@dataclass
class AblationReport:
    """The Table 5 / Table 6 / variants sections (markdown blocks) and every claim check, by metric:
    ``checks[metric]`` is a list of ``(table, check)``, one Holm family per metric."""

    parts: list[str]
    checks: dict[str, list[tuple[str, ClaimCheck]]]
    variants: list[str]
    link: str = "results"

    def family(self, metric: str) -> int:
        checks = self.checks.get(metric, [])
        return checks[0][1].family if checks else 0


def _claims_block(checks: dict[str, list[tuple[str, ClaimCheck]]], table: str) -> str:
    """The claim tables of one table of the paper, one per metric."""
    blocks = []
    for metric, pairs in checks.items():
        mine = [c for t, c in pairs if t == table]
        if mine:
            note = "the paper's metric" if metric == METRIC else "the checkpoint chosen on validation, evaluated once"
            blocks += [
                f"On {METRIC_NAMES[metric]} ({note}; exploratory: the 150-step ablation family of this metric, "
                "Table 5's and Table 6's claims together):",
                "",
                claims_markdown(mine),
                "",
            ]
    return "\n".join(blocks).strip() or "(no claim of the paper can be checked on these runs)"


def ablation_report(
    rows: list[dict],
    out: Path,
    link: str = "results",
    margin: float = MARGIN,
    alpha: float = ALPHA,
    variants_csv: Path | None = None,
) -> AblationReport:
    """Tables 5 and 6 (+ reference rows, + variants) from the runs' summaries: CSVs and PNGs into ``out``
    (linked as ``link/<name>.png``), claims checked on validation and on test accuracy."""
    checks = ablation_checks(rows, margin, alpha)
    parts: list[str] = []
    t5 = of_experiment(rows, "table5", ["lora"])
    if t5:
        write_csv(t5, out / "table5_runs.csv")
        md, stats = table5_markdown(t5)
        plot_table5(t5, stats, out / "table5.png")
        noise = [noise_line(t5, "targets_key", metric=m) for m in metrics_present(t5)]
        parts += [
            "## Table 5 (ours)",
            "",
            md,
            "",
            *noise,
            "",
            _claims_block(checks, "table5"),
            "",
            f"![table 5]({link}/table5.png)",
            "",
        ]
    t6 = of_experiment(rows, "table6", ["lora"])
    ref = of_experiment(rows, "table6_reference", ["full", "head_only"])
    if t6 or ref:
        write_csv(t6 + ref, out / "table6_runs.csv")
        md, stats6 = table6_markdown(t6, ref)
        plot_table6(stats6, ref, out / "table6.png", t6)
        noise = [noise_line(t6, "targets_key", "r", metric=m) for m in metrics_present(t6)] if t6 else []
        profile = [rank_profile_markdown(t6), ""] if t6 else []
        parts += [
            "## Table 6 (ours)",
            "",
            md,
            "",
            *noise,
            "",
            _claims_block(checks, "table6"),
            "",
            *profile,
            f"![table 6]({link}/table6.png)",
            "",
        ]
    variants = variants_section(of_experiment(rows, "variants", ["lora"]), out, link, variants_csv)
    return AblationReport(parts, checks, variants, link)


def variants_section(var: list[dict], out: Path, link: str, variants_csv: Path | None) -> list[str]:
    """The sweep of LoRA variants (rsLoRA, DoRA, PiSSA, VeRA, AdaLoRA, QLoRA): from its runs, or else from a saved
    ``variants_runs.csv`` (earlier scale)."""
    if var:
        write_csv(var, out / "variants_runs.csv")
        lines = ["## Variants (ours)", "", variants_markdown(var), "", noise_line(var, "variant", "lr"), ""]
        if plot_adalora_ranks(var, out / "adalora_ranks.png"):
            lines += [f"![AdaLoRA ranks]({link}/adalora_ranks.png)", ""]
        return lines
    if variants_csv is None or not variants_csv.is_file():
        return []
    rows = read_variants_csv(variants_csv)
    steps = sorted({r["steps"] for r in rows if r.get("steps")})
    lrs = [r["lr"] for r in rows if r.get("lr")]
    base_lr = max(set(lrs), key=lrs.count) if lrs else math.nan
    others = sorted({(r.get("variant"), r["lr"]) for r in rows if r.get("lr") and r["lr"] != base_lr})
    other_txt = "".join(f"; {v} also at lr {lr:g}" for v, lr in others)
    return [
        "## Variants (earlier scale, not re-run)",
        "",
        f"Read from `{variants_csv.name}` (the run folders are gone). These runs used the first ablation scale "
        f"(`conf/experiment/ablation_scale_75steps.yaml`: {', '.join(map(str, steps))} optimizer steps, one epoch, "
        f"Kaiming-uniform A, no per-adapter init stream, seeds that did not vary the batch order), lr {base_lr:g} for "
        f"every variant{other_txt}, r=8 on {{Wq,Wv}}; the size of the QLoRA base was not saved in the CSV. These runs "
        "are not comparable with the tables above and were not repeated at the current scale.",
        "",
        variants_markdown(rows),
        "",
        noise_line(rows, "variant", "lr"),
        "",
    ]


def summarize(
    runs: Path,
    out: Path,
    margin: float = MARGIN,
    alpha: float = ALPHA,
    variants_csv: Path | None = None,
    link: str = "results",
) -> str:
    """Write the tables, CSVs and plots for whatever ablation sweeps exist under ``runs`` (found by the
    summaries' ``experiment`` field) and ``out/tables.md``; return its markdown. The claim checks of
    Table 5 and Table 6 form one Holm family per metric (see ``method_markdown``)."""
    report = ablation_report(load_runs(runs), out, link, margin, alpha, variants_csv)
    if not report.parts and not report.variants:
        raise SystemExit(
            f"no table5, table6, table6_reference or variants summary.json under {runs}; run the sweeps first"
        )
    return write_tables(report, out, margin, alpha)


def write_tables(report: AblationReport, out: Path, margin: float = MARGIN, alpha: float = ALPHA) -> str:
    """``out/tables.md``: the Method paragraph, then the ablation tables and the variants; returns its text."""
    method = method_markdown(margin, alpha)
    text = relink("\n".join([method, "", *report.parts, *report.variants]), report.link)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tables.md").write_text(text)
    return text


# --------------------------------------------------------------------------- convergence of the Table 6 runs
def ablation_curves(rows: list[dict]) -> dict[str, list[dict]]:
    """The curves of the convergence plot: full FT, head only, LoRA at r=8 on each Table 6 set ({q,v} first)."""
    ref = of_experiment(rows, "table6_reference")
    t6 = of_experiment(rows, "table6", ["lora"])
    curves = {
        "full fine-tuning": [r for r in ref if r.get("method") == "full"],
        "head only": [r for r in ref if r.get("method") == "head_only"],
    }
    for key in ("q,v", "q", "q,k,v,o"):
        curves[f"LoRA {targets_text(key)}, r=8"] = [r for r in t6 if r["targets_key"] == key and r.get("r") == 8]
    return with_curves(curves)


def convergence_section(rows: list[dict], out: Path, link: str) -> list[str]:
    curves = ablation_curves(rows)
    if not curves:
        return []
    plot_curves(
        {"Table 6 runs and reference rows: validation accuracy, mean over seeds (band: seed range)": curves},
        out / "convergence.png",
    )
    checks = [c for label, runs in curves.items() if (c := convergence_check(label, runs))]
    return [
        "## Convergence",
        "",
        "Validation accuracy along training (mean over seeds; the band is the range over seeds). The lines below "
        "compare the last two validation points of each mean curve with the seed noise at the last point; they report "
        "the numbers and do not claim convergence.",
        "",
        f"![convergence]({link}/convergence.png)",
        "",
        *(c.line() for c in checks),
        "",
    ]
