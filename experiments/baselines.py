"""LoRA beside the earlier methods (experiments/PREREGISTRATION.md, Runs §7-9; issue 38), from the committed records.

    bash experiments/baselines.sh search   # -> multirun/baselines/search/<arm>/lr<lr>/0
    python -m experiments collect          # -> experiments/runs/baselines/...
    python -m experiments baselines        # -> experiments/results/baselines.md

Sections: the paper's Table 1 (inference latency of adapters, from ``benchmarks/adapter_latency.json``) and the
search stage of Table 2 (each arm's best validation accuracy per lr at seed 0, the lr chosen, and whether it sits at
a grid edge, which the pre-registration answers with one more point). Full fine-tuning and head only take their
searches from the committed ablation search (same scale and seed). Then the seeds (section 7: every arm at its chosen
lr, the six "greater" claims under Holm, on the seeds every arm has run), section 8 (prefix length and LoRA rank) and
section 9 (LoRA+PE).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from experiments.plots import plot_arms, plot_sizes
from experiments.power import mde
from experiments.records import REPO, load_runs
from experiments.stats import ALPHA, Stat, example_bootstrap, holm, pooled_sd_of, t_ppf, t_sf, welch
from experiments.tables import p_text

RUNS = REPO / "experiments" / "runs"
BASELINE_RUNS = RUNS / "baselines"
ABLATION_SEARCH = RUNS / "ablations" / "search"
PRIMARY_FULL = RUNS / "lora_vs_full" / "150" / "full"  # section 1's 150-step full fine-tuning runs (seeds 101-117)
LATENCY = REPO / "benchmarks" / "adapter_latency.json"
OUT = REPO / "experiments" / "results" / "baselines.md"
ARMS_PNG = "baselines_table2.png"  # beside OUT
SIZES_PNG = "baselines_sizes.png"
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
LABEL = {arm: label for arm, label, _ in ARMS}
SECTION7 = ("lora_qv", "lora_default", "full", "head_only", "bitfit", "adapter_h", "adapter_l", "prefix", "prompt")
SEEDS = tuple(range(101, 122))  # section 7's seeds, 21 per arm
CLAIMS = (  # section 7's family: "a > b" on test accuracy, Holm over the six
    ("lora_qv", "bitfit"),
    ("lora_qv", "adapter_h"),
    ("lora_qv", "adapter_l"),
    ("lora_qv", "prefix"),
    ("lora_qv", "prompt"),
    ("prefix", "prompt"),
)
METRICS = (("test_acc", "test accuracy (primary)"), ("best_val_acc", "best validation accuracy (secondary)"))
SIZES = (  # section 8: arm, its name there, its size setting, the folder suffix, the sizes, section 7's own size
    ("lora_qv", "LoRA W{q,v}", "r", "r", (1, 4, 8, 64), 8),
    ("prefix", "PreLayer", "tokens", "n", (4, 16, 64, 256), 16),
    ("prompt", "PreEmbed", "tokens", "n", (4, 16, 64, 256), 16),
)
PROBE_SEEDS = (101, 102, 103)  # sections 8 and 9


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


# --------------------------------------------------------------------------- seeds (sections 7-9)
def seed_runs(baseline_root: Path = BASELINE_RUNS, primary_full: Path = PRIMARY_FULL) -> dict[str, dict[int, dict]]:
    """``arm -> {seed: run}``: the seeds stage (``seeds/<arm>/<seed>/0``), the prefix-length and rank probes
    (``length/<arm>_<size>/<seed>/0``, under the arm ``<arm>_<size>``) and section 1's 150-step full fine-tuning runs
    (``primary_full``), which the full arm reuses at seeds 101-117 (the same config and lr)."""
    out: dict[str, dict[int, dict]] = defaultdict(dict)
    for stage in ("seeds", "length"):
        for summary in (
            sorted((baseline_root / stage).rglob("summary.json")) if (baseline_root / stage).is_dir() else []
        ):
            run = json.loads(summary.read_text())
            parts = summary.relative_to(baseline_root / stage).parts
            out[parts[0]][int(run["seed"])] = run
    counted = (check_run(baseline_root) or {}).get("params_method")
    for run in load_runs(primary_full) if primary_full.is_dir() else []:
        if run.get("method") == "full" and run.get("steps") == 150 and int(run["seed"]) in SEEDS[:17]:
            if run.get("params_method") is None and counted is not None:  # section 1 predates the field; the
                run = run | {"params_method": counted}  # retrained check run of the same config counts it
            out["full"].setdefault(int(run["seed"]), run)
    return dict(out)


def check_run(baseline_root: Path = BASELINE_RUNS) -> dict | None:
    """The seeds stage's retraining of section 1's full fine-tuning seed 101 (``check/full/101``), or None."""
    found = sorted((baseline_root / "check" / "full").rglob("summary.json")) if baseline_root.is_dir() else []
    return json.loads(found[0].read_text()) if found else None


def reuse_check(baseline_root: Path = BASELINE_RUNS, primary_full: Path = PRIMARY_FULL) -> str:
    """One line: section 1's full fine-tuning seed 101 retrained by the seeds stage (``check/full/101``) against its
    committed record, the premise of reusing section 1's runs."""
    a = check_run(baseline_root)
    first = [r for r in load_runs(primary_full) if r.get("seed") == 101] if primary_full.is_dir() else []
    if a is None or not first:
        return "- The retraining check of section 1's full fine-tuning seed 101 has not run yet."
    b = first[0]
    same = all(a.get(k) == b.get(k) for k in ("test_acc", "best_val_acc", "test_correct", "val_curve"))
    return (
        f"- Reuse check: section 1's full fine-tuning seed 101 retrained on this stage's code: test accuracy "
        f"{100 * a['test_acc']:.2f} vs the committed {100 * b['test_acc']:.2f}, best validation "
        f"{100 * a['best_val_acc']:.2f} vs {100 * b['best_val_acc']:.2f}; "
        + ("the validation curve and every test prediction equal." if same else "**they differ.**")
    )


def complete_seeds(runs: dict[str, dict[int, dict]], arms: Sequence[str] = SECTION7) -> list[int]:
    """The seeds of ``SEEDS`` every arm has run: the balanced set the confirmatory analysis reads."""
    return [s for s in SEEDS if all(s in runs.get(arm, {}) for arm in arms)]


def mean_ci(stat: Stat, level: float = 0.95) -> str:
    if stat.n < 2:
        return "-"
    half = t_ppf(0.5 + level / 2.0, stat.n - 1) * stat.sem
    return f"[{stat.mean - half:.1f}, {stat.mean + half:.1f}]"


def values(runs: dict[int, dict], seeds: Sequence[int], metric: str) -> list[float]:
    return [float(runs[s][metric]) for s in seeds if runs.get(s, {}).get(metric) is not None]


def own_parameters(runs: dict[int, dict], seeds: Sequence[int]) -> str:
    """The method's own trainable parameters (``params_method``) its runs at ``seeds`` share, or "-"."""
    counts = {runs[s].get("params_method") for s in seeds if s in runs} - {None}
    return f"{counts.pop():,}" if len(counts) == 1 else "-"


def arms_table(runs: dict[str, dict[int, dict]], seeds: Sequence[int], lrs: dict[str, float]) -> list[str]:
    lines = [
        "| arm | lr | its own trainable parameters | seeds | test accuracy | 95% CI | best validation accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in SECTION7:
        by_seed = runs.get(arm, {})
        test = Stat.of(values(by_seed, seeds, "test_acc"))
        val = Stat.of(values(by_seed, seeds, "best_val_acc"))
        count = own_parameters(by_seed, seeds)
        lr = f"{lrs[arm]:g}" if arm in lrs else "-"
        lines.append(f"| {LABEL[arm]} | {lr} | {count} | {test.n} | {test} | {mean_ci(test)} | {val} |")
    return lines + [""]


def claims_table(runs: dict[str, dict[int, dict]], seeds: Sequence[int], metric: str) -> list[str]:
    """The six "greater" checks on ``metric``: Welch difference and 95% CI, one-sided p, Holm over the six, the
    bootstrap over seeds and test examples (test accuracy), the MDE at this n (level 0.05/6, 80% power, the pair's
    pooled sd) and the verdict."""
    rows = []
    for a, b in CLAIMS:
        sa, sb = Stat.of(values(runs[a], seeds, metric)), Stat.of(values(runs[b], seeds, metric))
        w = welch(sa, sb)
        p = t_sf(w.t, w.df) if not math.isnan(w.t) else math.nan  # H1: mean_a > mean_b
        sd, _ = pooled_sd_of([sa, sb])
        rows.append((a, b, sa, sb, w, p, sd))
    adjusted = holm([r[5] for r in rows])
    boot_head = " bootstrap 95% (seeds × examples) |" if metric == "test_acc" else ""
    lines = [
        f"| claim | difference (points) | 95% Welch CI | one-sided p | Holm p |{boot_head} MDE at n={len(seeds)} "
        "| verdict |",
        "|---|---|---|---|---|" + ("---|" if boot_head else "") + "---|---|",
    ]
    level = ALPHA / len(CLAIMS)
    for (a, b, _, _, w, p, sd), hp in zip(rows, adjusted, strict=True):
        boot = ""
        if boot_head:
            ca = [runs[a][s]["test_correct"] for s in seeds if runs[a][s].get("test_correct")]
            cb = [runs[b][s]["test_correct"] for s in seeds if runs[b][s].get("test_correct")]
            boot = " - |"
            if len(ca) == len(seeds) and len(cb) == len(seeds) and seeds:
                _, lo, hi = example_bootstrap(ca, cb)
                boot = f" [{lo:+.2f}, {hi:+.2f}] |"
        m = mde(len(seeds), sd, level) if not math.isnan(sd) else math.inf
        if hp < ALPHA:
            verdict = "holds (reproduces)"
        elif w.ci[1] < 0:
            verdict = f"opposite: {LABEL[b]} is higher (two-sided CI below 0)"
        else:
            verdict = "not shown"
        if len(seeds) < len(SEEDS):
            verdict += f" at n={len(seeds)}, provisional"
        lines.append(
            f"| {LABEL[a]} > {LABEL[b]} | {w.diff:+.2f} | [{w.ci[0]:+.2f}, {w.ci[1]:+.2f}] | {p_text(p)} | "
            f"{p_text(hp)} |{boot} {m:.2f} | {verdict} |"
        )
    return lines + [""]


def seeds_section(runs: dict[str, dict[int, dict]], lrs: dict[str, float], check: str = "") -> list[str]:
    seeds = complete_seeds(runs)
    ran = {arm: len([s for s in runs.get(arm, {}) if s in SEEDS]) for arm in SECTION7}
    lines = [
        "## Table 2 at CPU scale: every arm at its chosen lr (seeds 101-121)",
        "",
        "The ablation task and schedule (MiniLM on Rotten Tomatoes, 150 AdamW steps, test accuracy of the "
        "best-validation checkpoint, 1,270 test snippets). Every arm also trains the new head and BERT's pooler "
        "(148,610 parameters), not counted in its own column. Full fine-tuning reuses section 1's 150-step runs at "
        "seeds 101-117 (the same config and lr). The analysis reads the seeds every arm has run, so the arms stay "
        "balanced.",
        "",
    ] + ([check, ""] if check else [])
    if not seeds:
        runs_line = ", ".join(f"{LABEL[a]} {n}" for a, n in ran.items())
        return lines + [f"No seed has run in every arm yet (runs per arm: {runs_line}).", ""]
    status = (
        f"**Complete: {len(seeds)} of {len(SEEDS)} seeds per arm.**"
        if len(seeds) == len(SEEDS)
        else f"**Provisional: {len(seeds)} of the {len(SEEDS)} pre-registered seeds run in every arm "
        f"({seeds[0]}-{seeds[-1]}); the verdicts below are at this n and its power, and change as seeds are added.**"
    )
    lines += [status, ""]
    lines += arms_table(runs, seeds, lrs)
    lines += [f"![Test accuracy per arm, mean and 95% interval, one dot per seed]({ARMS_PNG})", ""]
    lines += [
        "The paper's orderings these claims test (its Tables 2-4, RoBERTa, DeBERTa, GPT-2 and GPT-3): LoRA at or above "
        "BitFit, Adapter^H, Adapter^L, PreLayer and PreEmbed at comparable trainable-parameter counts, and PreLayer "
        "above PreEmbed. A claim holds when its Holm-adjusted one-sided p is below 0.05.",
        "",
    ]
    for metric, label in METRICS:
        lines += [
            f"### The six claims on {label}",
            "",
            f"Holm over the six at 5% (each check's level 0.05/6 = {ALPHA / len(CLAIMS):.4f} in the MDE); the MDE is "
            "the true difference this n detects with 80% power, from the pair's pooled sd.",
            "",
        ]
        lines += claims_table(runs, seeds, metric)
    return lines


def size_runs(runs: dict[str, dict[int, dict]], arm: str, suffix: str, size: int, own: int) -> dict[int, dict]:
    """Section 8's runs of ``arm`` at ``size`` (section 7's own runs at its own size)."""
    return runs.get(arm if size == own else f"{arm}_{suffix}{size}", {})


def size_series(runs: dict[str, dict[int, dict]]) -> list[tuple[str, list[tuple[int, list[float]]]]]:
    """Per method, its sizes whose three seeds have run: (own trainable parameters, test accuracies)."""
    series = []
    for arm, name, _, suffix, sizes, own in SIZES:
        points = []
        for size in sizes:
            by_seed = size_runs(runs, arm, suffix, size, own)
            accs = values(by_seed, PROBE_SEEDS, "test_acc")
            count = own_parameters(by_seed, PROBE_SEEDS)
            if len(accs) == len(PROBE_SEEDS) and count != "-":
                points.append((int(count.replace(",", "")), accs))
        if points:
            series.append((name, points))
    return series


def sizes_section(runs: dict[str, dict[int, dict]]) -> list[str]:
    lines = [
        "## Section 8: accuracy against the number of prefix tokens, and LoRA against r (seeds 101-103, exploratory)",
        "",
        "Each method at its section 7 lr; mean ± sd over the seeds run. "
        "n = 3 carries no verdict (about 4.4 points is the smallest difference it detects at the section 7 level).",
        "",
        "| method | size | seeds | test accuracy | lowest seed | best validation | trainable (own) |",
        "|---|---|---|---|---|---|---|",
    ]
    shape = []
    for arm, name, unit, suffix, sizes, own in SIZES:
        means = []
        for size in sizes:
            by_seed = size_runs(runs, arm, suffix, size, own)
            test = Stat.of(values(by_seed, PROBE_SEEDS, "test_acc"))
            val = Stat.of(values(by_seed, PROBE_SEEDS, "best_val_acc"))
            count = own_parameters(by_seed, PROBE_SEEDS)
            accs = values(by_seed, PROBE_SEEDS, "test_acc")
            low = f"{100 * min(accs):.1f}" if accs else "-"
            lines.append(f"| {name} | {unit} {size} | {test.n} | {test} | {low} | {val} | {count} |")
            means.append(test if test.n == len(PROBE_SEEDS) else None)
        if all(m is not None for m in means):
            steps = [b.mean - a.mean for a, b in zip(means, means[1:], strict=False)]
            trend = (
                "rises at every step"
                if all(d > 0 for d in steps)
                else "falls at every step"
                if all(d < 0 for d in steps)
                else "is not monotone"
            )
            best = sizes[max(range(len(sizes)), key=lambda i: means[i].mean)]
            sd, _ = pooled_sd_of(means)
            step = max(steps, key=abs)
            shape.append(
                f"- {name}: mean test accuracy {trend} in {unit} ({' → '.join(f'{m.mean:.1f}' for m in means)}), "
                f"highest at {unit} {best}; the largest change between neighbouring sizes is {step:+.1f} points, "
                f"against a seed sd of {sd:.1f} (pooled over its sizes)."
            )
    lines += [""] + (shape or ["- Not every size has its three seeds yet."]) + [""]
    if size_series(runs):
        lines += [f"![Test accuracy against each method's trainable parameters, mean ± sd over seeds]({SIZES_PNG})", ""]
    return lines


def combined_section(runs: dict[str, dict[int, dict]]) -> list[str]:
    lines = [
        "## Section 9: LoRA + prefix embedding (LoRA+PE, seeds 101-103, exploratory)",
        "",
        "`lora=lora_pe`: LoRA W{q,v} r=8 inside PEFT's prompt-tuning wrapper with 16 trained input embeddings, at its "
        "own searched lr, beside both parts alone at the same seeds; 95% Welch intervals, no verdict at n = 3.",
        "",
    ]
    pe = runs.get("lora_pe", {})
    if not pe:
        return lines + ["Not run yet.", ""]
    for metric, label in METRICS:
        a = Stat.of(values(pe, PROBE_SEEDS, metric))
        for other in ("lora_qv", "prompt"):
            b = Stat.of(values(runs.get(other, {}), PROBE_SEEDS, metric))
            w = welch(a, b)
            sd, _ = pooled_sd_of([a, b])
            m = mde(min(a.n, b.n), sd, ALPHA) if not math.isnan(sd) and min(a.n, b.n) > 1 else math.inf
            lines.append(
                f"- {label}: LoRA+PE {a} (n {a.n}) − {LABEL[other]} {b} (n {b.n}) = {w.diff:+.2f} points, 95% Welch "
                f"CI [{w.ci[0]:+.2f}, {w.ci[1]:+.2f}]; MDE at this n {m:.2f} (5% level, 80% power)."
            )
    return lines + [""]


def report(
    rows: dict[str, dict], latency: Path = LATENCY, runs: dict[str, dict[int, dict]] | None = None, check: str = ""
) -> str:
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
    runs = runs or {}
    lines += seeds_section(runs, chosen_lrs(rows), check)
    lines += sizes_section(runs)
    lines += combined_section(runs)
    return "\n".join(lines)


def write_report(
    baseline_root: Path = BASELINE_RUNS,
    ablation_root: Path = ABLATION_SEARCH,
    latency: Path = LATENCY,
    out: Path = OUT,
    primary_full: Path = PRIMARY_FULL,
) -> str:
    """``out`` from the records; returns its text."""
    runs = seed_runs(baseline_root, primary_full)
    text = report(search_rows(baseline_root, ablation_root), latency, runs, reuse_check(baseline_root, primary_full))
    seeds = complete_seeds(runs)
    if seeds:
        arms = [(LABEL[arm].split(" (")[0], values(runs[arm], seeds, "test_acc")) for arm in SECTION7]
        plot_arms(arms, out.parent / ARMS_PNG, f"Table 2 at CPU scale: test accuracy, seeds {seeds[0]}-{seeds[-1]}")
    if series := size_series(runs):
        plot_sizes(series, out.parent / SIZES_PNG, "Section 8: accuracy against trainable parameters (seeds 101-103)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text
