"""The causal-LM study: SmolLM2-135M-Instruct on E2E NLG, zero-shot vs LoRA vs full fine-tuning, as
experiments/PREREGISTRATION.md (Runs, §4) fixes it, from the committed records.

    bash experiments/decoder.sh                 # the runs (multirun/smollm2/...)
    python -m experiments collect               # -> experiments/runs/decoder/<job path>/
    python -m experiments decoder               # -> experiments/results/decoder.md (+ decoder_runs.csv)

Each run's record under ``experiments/runs/decoder`` is its ``summary.json``, ``resolved_config.yaml``,
``test_predictions.json`` (per test input: the input, the generation, all its references) and
``zero_shot_predictions.json`` (the base model's generations), the files ``lora_lightning/app/generation_job.py``
writes and ``collect`` copies. The report rescores the predictions with BLEU-4 as the E2E challenge scores it
(sacrebleu ``corpus_bleu``: 13a tokenisation, lower-cased, all references of an input) beside the job's own
whitespace-split, case-sensitive BLEU (torchmetrics, the summary's ``test_bleu``); ROUGE-L and the test loss on
answer tokens come from the summaries. The lr of each method is the one with the lowest validation loss among its
seed-0 runs; the finals are the runs at that lr (seeds 0, 1, 2). LoRA − full fine-tuning gets a Welch CI and p
per metric, and the MDE at n per arm from the observed seed sd (no equivalence claim: n = 3). Until runs exist the
report says so: the earlier figures (multirun/smollm2, never committed) cannot be regenerated.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

from experiments.power import mde_unequal
from experiments.records import DECODER_RUNS, REPO, repo_relative
from experiments.stats import ALPHA, Stat, pooled_sd_of, welch
from experiments.tables import p_text

RUNS = REPO / "experiments" / "runs" / DECODER_RUNS
OUT = REPO / "experiments" / "results"
FIELDS = (
    "method",
    "seed",
    "lr",
    "targets",
    "r",
    "epochs",
    "steps",
    "test_bleu_e2e",
    "test_bleu",
    "test_rougeL",
    "zero_shot_bleu_e2e",
    "zero_shot_bleu",
    "zero_shot_rougeL",
    "test_loss",
    "best_val_loss",
    "params_trainable",
    "fit_seconds",
    "train_tokens_per_second",
    "generation_tokens_per_second",
    "peft_max_abs_logit_diff",
    "adapter_bytes",
    "record",
)
METRICS = (  # key, name, scale (to the units shown), decimals
    ("test_bleu_e2e", "BLEU-4, E2E normalisation (sacrebleu 13a, lower-cased, all references)", 100.0, 1),
    ("test_bleu", "BLEU-4 as the job scores it (whitespace tokens, case-sensitive)", 100.0, 1),
    ("test_rougeL", "ROUGE-L F1", 100.0, 1),
    ("test_loss", "test loss on answer tokens", 1.0, 3),
)
NOT_RUN = (
    "Not run yet under the pre-registration (`experiments/PREREGISTRATION.md`, Runs §4): no decoder record is "
    "committed under `experiments/runs/decoder`. The earlier figures (SmolLM2 LoRA vs full fine-tuning, read from the "
    "git-ignored `multirun/smollm2`) cannot be regenerated from the repository, so they are not shown."
)


def e2e_bleu(predictions: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU-4 in [0, 1] as the E2E challenge scores it (mteval-13a tokenisation, case-insensitive, every
    reference of an input; inputs with fewer references padded with None, which sacrebleu skips)."""
    import sacrebleu  # noqa: PLC0415 (only the decoder report needs it)

    most = max((len(r) for r in references), default=0)
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(most)]
    return sacrebleu.corpus_bleu(list(predictions), streams, tokenize="13a", lowercase=True).score / 100.0


def load(root: Path = RUNS) -> list[dict]:
    """Every run record below ``root``: its summary, ``dir``, and the E2E-normalised BLEU of its test predictions
    (and of its zero-shot generations) where those files are kept."""
    rows = []
    for path in sorted(root.rglob("summary.json")) if root.is_dir() else []:
        row = json.loads(path.read_text())
        row["dir"] = path.parent
        row["record"] = repo_relative(path.parent.as_posix())
        preds = path.parent / "test_predictions.json"
        if preds.is_file():
            items = json.loads(preds.read_text())
            row["predictions"] = items
            row["test_bleu_e2e"] = e2e_bleu([p["prediction"] for p in items], [list(p["references"]) for p in items])
            zero = path.parent / "zero_shot_predictions.json"
            if zero.is_file():
                row["zero_shot"] = json.loads(zero.read_text())
                row["zero_shot_bleu_e2e"] = e2e_bleu(row["zero_shot"], [list(p["references"]) for p in items])
        rows.append(row)
    return rows


def main_epochs(rows: list[dict]) -> int | None:
    """The schedule of the study: the number of epochs most of the seed-0 runs trained."""
    epochs = [r.get("epochs") for r in rows if r.get("seed") == 0 and r.get("epochs") is not None]
    return max(set(epochs), key=lambda e: (epochs.count(e), -e)) if epochs else None


def choose(rows: list[dict], method: str, epochs: int | None) -> tuple[float | None, list[dict]]:
    """(the lr with the lowest best validation loss among the method's seed-0 runs at the study's epochs, those
    search runs)."""
    search = [
        r
        for r in rows
        if r.get("method") == method
        and r.get("seed") == 0
        and r.get("epochs") == epochs
        and isinstance(r.get("best_val_loss"), (int, float))
    ]
    if not search:
        return None, []
    best = min(search, key=lambda r: (r["best_val_loss"], r.get("lr") or 0.0))
    return best.get("lr"), search


def _stat(runs: list[dict], key: str, scale: float) -> Stat:
    vals = [scale * r[key] for r in runs if isinstance(r.get(key), (int, float))]
    if not vals:
        return Stat(math.nan, math.nan, 0)
    return Stat(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else math.nan, len(vals))


def _cell(s: Stat, digits: int) -> str:
    if s.n == 0:
        return "-"
    return f"{s.mean:.{digits}f}" + (f" ± {s.std:.{digits}f}" if s.n > 1 else " (n=1)")


def seeds_of(runs: list[dict]) -> str:
    return ", ".join(str(s) for s in sorted({r.get("seed") for r in runs if r.get("seed") is not None})) or "-"


def report(rows: list[dict], alpha: float = ALPHA) -> str:
    """The markdown of results/decoder.md."""
    lines = [
        "# SmolLM2-135M-Instruct on E2E NLG: zero-shot vs LoRA vs full fine-tuning",
        "",
        "<!-- generated by `python -m experiments decoder` from experiments/runs/decoder; do not edit by hand -->",
        "",
    ]
    if not rows:
        return "\n".join(lines + [NOT_RUN, ""])
    epochs = main_epochs(rows)
    first = rows[0]
    lines += [
        "Pre-registered in `experiments/PREREGISTRATION.md` (Runs §4): lr search on seed 0 (LoRA 1e-3, 2e-3, 4e-3; "
        "full fine-tuning 5e-5, 1e-4, 2e-4), chosen on the lowest validation loss; finals at the chosen lr with seeds "
        "0, 1, 2 (the search run is seed 0's final). Data: GEM's cleaned E2E NLG as shipped in `bigbench` "
        f"({first.get('train_examples', '?')} training pairs; {first.get('test_inputs', '?')} held-out meaning "
        "representations, each scored against all its references). Generation is greedy from the merged model (full "
        "fine-tuning: the model itself), at the checkpoint with the lowest validation loss. BLEU-4 is given two ways: "
        "as the E2E challenge scores it (sacrebleu, 13a tokenisation, lower-cased, all references) and as the job "
        "scores it (torchmetrics, whitespace tokens, case-sensitive); scores in points, mean ± sample std over seeds.",
        "",
        "Search (seed 0):",
        "",
        "| method | lr | best validation loss | test BLEU-4 (E2E) | note |",
        "|---|---|---|---|---|",
    ]
    finals: dict[str, list[dict]] = {}
    for method in ("lora", "full"):
        lr, search = choose(rows, method, epochs)
        lrs = sorted({r.get("lr") for r in search})
        for r in sorted(search, key=lambda r: r.get("lr") or 0.0):
            note = []
            if r.get("lr") == lr:
                note.append("chosen")
                if len(lrs) == 1:
                    note.append("the only lr tried")
                elif lr in (lrs[0], lrs[-1]):
                    note.append(f"on the {'lower' if lr == lrs[0] else 'upper'} edge of the grid")
            bleu = r.get("test_bleu_e2e")
            lines.append(
                f"| {method} | {r.get('lr'):g} | {r['best_val_loss']:.4f} | "
                f"{'-' if bleu is None else f'{100 * bleu:.1f}'} | {', '.join(note)} |"
            )
        finals[method] = (
            [r for r in rows if r.get("method") == method and r.get("lr") == lr and r.get("epochs") == epochs]
            if lr is not None
            else []
        )
    lines += [
        "",
        f"Finals ({epochs} epoch{'s' if epochs != 1 else ''}, at each method's chosen lr):",
        "",
        "| method | seeds | lr | trainable params | " + " | ".join(name for _, name, _, _ in METRICS) + " |",
        "|---|---|---|---|" + "---|" * len(METRICS),
    ]
    zero = [r for r in rows if "zero_shot_bleu_e2e" in r or "zero_shot_bleu" in r]
    if zero:
        z = zero[0]
        zb = z.get("zero_shot_bleu_e2e")
        lines.append(
            f"| zero-shot (base, no training) | - | - | 0 | {'-' if zb is None else f'{100 * zb:.1f}'} | "
            f"{100 * z.get('zero_shot_bleu', math.nan):.1f} | {100 * z.get('zero_shot_rougeL', math.nan):.1f} | - |"
        )
    for method, label in (("lora", "LoRA"), ("full", "full fine-tuning")):
        rs = finals.get(method) or []
        if not rs:
            lines.append(f"| {label} | - | - | - |" + " - |" * len(METRICS))
            continue
        desc = f"{label} r={rs[0].get('r')} on {'+'.join(rs[0].get('targets') or [])}" if method == "lora" else label
        lines.append(
            f"| {desc} | {seeds_of(rs)} | {rs[0].get('lr'):g} | {rs[0].get('params_trainable', 0):,} | "
            + " | ".join(_cell(_stat(rs, key, scale), digits) for key, _, scale, digits in METRICS)
            + " |"
        )
    if finals.get("lora") and finals.get("full"):
        lines += [
            "",
            f"LoRA − full fine-tuning (Welch 95% CI and p; MDE: the true difference a two-sided test at {alpha:g} "
            "detects with 80% power at these n per arm, with the two arms' pooled seed sd, in the metric's units):",
            "",
            "| metric | LoRA − full [95% CI] | n (LoRA / full) | p | MDE |",
            "|---|---|---|---|---|",
        ]
        for key, name, scale, digits in METRICS:
            a, b = _stat(finals["lora"], key, scale), _stat(finals["full"], key, scale)
            w = welch(a, b)
            sd = pooled_sd_of([a, b])[0]
            mde = mde_unequal(a.n, b.n, sd, alpha) if min(a.n, b.n) >= 2 and sd > 0 else math.nan
            diff = f"{w.diff:+.{digits}f}" + (
                "" if math.isnan(w.ci[0]) else f" [{w.ci[0]:+.{digits}f}, {w.ci[1]:+.{digits}f}]"
            )
            lines.append(
                f"| {name} | {diff} | {a.n} / {b.n} | {p_text(w.p, alpha)} | "
                f"{'-' if math.isnan(mde) else f'{mde:.{digits}f}'} |"
            )
        lines += [
            "",
            "No equivalence claim is made (n = 3 per arm); a difference smaller than its MDE can go undetected.",
        ]
    others = [
        r
        for r in rows
        if not any(r is f for fs in finals.values() for f in fs)
        and not (r.get("seed") == 0 and r.get("epochs") == epochs)
    ]
    if others:
        lines += ["", "Other runs (not part of the pre-registered comparison):", ""]
        for r in sorted(others, key=lambda r: (r.get("method", ""), r.get("epochs") or 0, r.get("seed") or 0)):
            bleu = r.get("test_bleu_e2e")
            lines.append(
                f"- {r.get('method')}, lr {r.get('lr'):g}, seed {r.get('seed')}, {r.get('epochs')} epochs, "
                f"{r.get('steps')} steps: BLEU-4 (E2E) {'-' if bleu is None else f'{100 * bleu:.1f}'}, ROUGE-L "
                f"{100 * r.get('test_rougeL', math.nan):.1f}, test loss {r.get('test_loss', math.nan):.3f}."
            )
    diffs = [r["peft_max_abs_logit_diff"] for r in finals.get("lora", []) if "peft_max_abs_logit_diff" in r]
    if diffs:
        lines += [
            "",
            "PEFT export of each LoRA final loaded with `peft` on a fresh base: largest logit difference "
            f"{max(diffs):.1e}.",
        ]
    example = next(
        (r for r in sorted(finals.get("lora", []), key=lambda r: r.get("seed") or 0) if r.get("predictions")), None
    )
    if example:
        lines += ["", f"Examples (LoRA, seed {example.get('seed')}, first three test inputs):", ""]
        zero_preds = example.get("zero_shot") or [None] * len(example["predictions"])
        for p, z in list(zip(example["predictions"], zero_preds, strict=True))[:3]:
            lines += (
                [f"- input: `{p['prompt_input']}`"]
                + ([f"  - zero-shot: {z}"] if z is not None else [])
                + [f"  - LoRA (merged): {p['prediction']}", f"  - a reference: {p['references'][0]}"]
            )
    return "\n".join(lines) + "\n"


def write_report(runs: Path = RUNS, out: Path = OUT) -> str:
    """``out/decoder.md`` and ``out/decoder_runs.csv`` (one line per run; removed when there is no run, so no file
    outlives its records) from the records under ``runs``; returns the markdown."""
    rows = load(runs)
    text = report(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decoder.md").write_text(text)
    table = out / "decoder_runs.csv"
    if not rows:
        table.unlink(missing_ok=True)
        return text
    with table.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in sorted(
            rows, key=lambda r: (r.get("method", ""), r.get("lr") or 0.0, r.get("epochs") or 0, r.get("seed") or 0)
        ):
            w.writerow({**r, "targets": "+".join(r["targets"]) if r.get("targets") else ""})
    return text
