"""The lab's command line: every study of experiments/ is run, collected and reported through it.

    python -m experiments collect                   # multirun/{ablations,recipe,lora_vs_full,smollm2,precision}
                                                    # -> experiments/runs
    python -m experiments recover-logs experiments/logs/*.log   # records of runs whose folders are gone
    python -m experiments ablation-lrs --runs multirun          # '<family> <lr>' per ablation family (ablations.sh)
    python -m experiments ablation-extensions --runs multirun   # the next lr past each family's edge (ablations.sh)
    python -m experiments subspace [--experiment convergence]   # §7.2 / §7.3 -> results/subspace*.md, heatmaps
    python -m experiments report                    # experiments/README.md, results/tables.md, CSVs, plots
    python -m experiments power                     # seeds per arm of the pre-registered study (PREREGISTRATION.md)
    python -m experiments precision                 # results/precision.md (fp32 vs bf16-mixed)
                                                    # from experiments/runs/precision
    python -m experiments decoder                   # results/decoder.md (SmolLM2 on E2E NLG)
                                                    # from experiments/runs/decoder
    python -m experiments.summarize                 # every report: subspace (both), report, decoder, precision
    python -m experiments two-tasks run|one|report  # two task adapters in one fit vs each alone

The generated experiments/README.md has an index: per study, the command that runs it, the command that rebuilds
its report and its result files. Each command imports only what it needs (torch for ``subspace`` and
``two-tasks``, scipy for the reports), so the lr look-ups of the sweep scripts stay fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository
RUNS = Path("experiments/runs")
RESULTS = Path("experiments/results")
MARGIN, RECIPE_MARGIN, ALPHA = (
    1.0,
    1.0,
    0.05,
)  # those of stats and report.write_readme: the pre-registered ±1 point (a test checks they agree)


def _collect(args: argparse.Namespace) -> None:
    from experiments.collect import collect

    copied = collect(args.source, args.runs)
    print(
        f"copied {len(copied)} files ({sum(p.stat().st_size for p in copied) / 1e6:.1f} MB) from {args.source} to "
        f"{args.runs}"
    )


def _recover_logs(args: argparse.Namespace) -> None:
    from experiments import recover
    from experiments.records import load_runs

    rejected: list[str] = []
    written, twins = recover.recover(args.logs, args.runs, load_runs(args.runs), rejected)
    record = recover.write_record(args.runs, args.logs, twins, rejected)
    print(f"recovered {len(written) // 2} runs from {len(args.logs)} logs into {args.runs}; {record}:")
    print("\n".join(recover.twin_checks(twins) + rejected))


def _ablation_lrs(args: argparse.Namespace) -> None:
    from experiments.collect import ablation_lrs, edge_extensions, format_lrs
    from experiments.records import load_runs

    choose = edge_extensions if args.command == "ablation-extensions" else ablation_lrs
    print(format_lrs(choose(load_runs(args.runs))), end="")


def _subspace(args: argparse.Namespace) -> None:
    from experiments.subspace import write_report

    print(write_report(args.runs, args.out, tuple(args.pair), tuple(args.amp_ranks), args.experiment))


def _report(args: argparse.Namespace) -> None:
    from experiments.report import write_readme

    readme = args.readme or args.out.parent / "README.md"
    print(write_readme(args.runs, args.out, readme, args.margin, args.alpha, args.recipe_margin, args.variants_csv))


def _power(args: argparse.Namespace) -> None:
    from experiments.power import planning_report
    from experiments.records import METRIC, TEST_METRIC, load_runs

    print(planning_report(load_runs(args.runs), [TEST_METRIC, METRIC]))


def _precision(args: argparse.Namespace) -> None:
    from experiments.precision import write_report

    print(write_report(args.runs, args.out))


def _lora_fa(args: argparse.Namespace) -> None:
    from experiments.lora_fa import write_report

    print(write_report(args.runs, args.lora_runs, args.out))


def _baselines(args: argparse.Namespace) -> None:
    from experiments.baselines import chosen_lrs, search_rows, write_report

    if args.chosen:
        lrs = chosen_lrs(search_rows(args.runs, args.ablation_search))
        print("".join(f"{arm} {lr!r}\n" for arm, lr in lrs.items()), end="")
        return
    print(write_report(args.runs, args.ablation_search, args.latency, args.out))


def _decoder(args: argparse.Namespace) -> None:
    from experiments.decoder import write_report

    print(write_report(args.runs, args.out))


def _two_tasks(args: argparse.Namespace) -> None:
    from experiments import two_tasks

    if args.step == "run":
        two_tasks.run_all(args.seeds, args.jobs)
    elif args.step == "one":
        print(json.dumps(two_tasks.run_one(args.mode, args.tasks.split(","), args.seed, args.threads)))
    else:
        print(two_tasks.report())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser(
        "collect", help="copy the finished runs under --source to --runs (summaries, configs, the §7.2/§7.3 adapters)"
    )
    c.add_argument(
        "--source", type=Path, default=Path("multirun"), help="the Hydra output folder (default %(default)s)"
    )
    c.add_argument("--runs", type=Path, default=RUNS, help="where the runs are copied to (default %(default)s)")
    c.set_defaults(func=_collect)

    r = sub.add_parser(
        "recover-logs",
        help="rebuild the records of runs whose folders are gone from their console logs (experiments/recover.py)",
    )
    r.add_argument("logs", type=Path, nargs="+", metavar="LOG")
    r.add_argument("--runs", type=Path, default=RUNS, help="where the records are written (default %(default)s)")
    r.set_defaults(func=_recover_logs)

    for name, what in (
        ("ablation-lrs", "print '<family> <lr>' per family, chosen on the search runs under --runs"),
        (
            "ablation-extensions",
            "print '<family> <lr>' for each family whose chosen lr sits on an edge of its "
            "search grid: the next lr past it",
        ),
    ):
        a = sub.add_parser(name, help=what)
        a.add_argument("--runs", type=Path, default=RUNS, help="the runs to read (default %(default)s)")
        a.set_defaults(func=_ablation_lrs)

    s = sub.add_parser("subspace", help="§7.2 (subspace similarity) and §7.3 (ΔW vs W) on the {Wq, Wv} adapters")
    s.add_argument("--runs", type=Path, default=RUNS, help="folder holding the Table 6 runs (searched recursively)")
    s.add_argument("--out", type=Path, default=RESULTS)
    s.add_argument(
        "--pair", type=int, nargs=2, default=(8, 64), metavar=("SMALL_R", "LARGE_R"), help="§7.2 ranks compared"
    )
    s.add_argument("--amp-ranks", type=int, nargs="+", default=(4, 64), help="§7.3 ranks")
    s.add_argument(
        "--experiment",
        default="table6",
        help="whose adapters: table6 (-> subspace.md) or convergence, the 300-step runs (-> subspace_convergence.md)",
    )
    s.set_defaults(func=_subspace)

    m = sub.add_parser(
        "report", help="experiments/README.md, results/tables.md, *_runs.csv and *.png from the runs under --runs"
    )
    m.add_argument("--runs", type=Path, default=RUNS, help="the collected runs (default %(default)s)")
    m.add_argument("--out", type=Path, default=RESULTS, help="where tables.md, CSVs and PNGs go (default %(default)s)")
    m.add_argument("--readme", type=Path, default=None, help="the generated report (default: README.md beside --out)")
    m.add_argument(
        "--variants-csv",
        type=Path,
        default=RESULTS / "variants_runs.csv",
        help="the earlier variants sweep, shown when --runs holds no variants runs",
    )
    m.add_argument(
        "--margin",
        type=float,
        default=MARGIN,
        help="equivalence margin in accuracy points for the TOST checks (default %(default)s)",
    )
    m.add_argument(
        "--recipe-margin",
        type=float,
        default=RECIPE_MARGIN,
        help="equivalence margin of LoRA vs full fine-tuning in the recipe (default %(default)s)",
    )
    m.add_argument(
        "--alpha", type=float, default=ALPHA, help="family-wise error rate of the claim checks (default %(default)s)"
    )
    m.set_defaults(func=_report)

    pw = sub.add_parser(
        "power",
        help="the seeds the pre-registered comparison needs, from the pilot runs (experiments/PREREGISTRATION.md)",
    )
    pw.add_argument("--runs", type=Path, default=RUNS, help="the pilot runs (default %(default)s)")
    pw.set_defaults(func=_power)

    pr = sub.add_parser(
        "precision", help="results/precision.md: the main job in fp32 vs bf16-mixed, from experiments/runs/precision"
    )
    pr.add_argument("--runs", type=Path, default=ROOT / RUNS / "precision", help="the collected precision records")
    pr.add_argument("--out", type=Path, default=ROOT / RESULTS / "precision.md")
    pr.set_defaults(func=_precision)

    fa = sub.add_parser(
        "lora-fa", help="results/lora_fa.md: LoRA-FA vs LoRA in the default recipe, from experiments/runs/lora_fa"
    )
    fa.add_argument("--runs", type=Path, default=ROOT / RUNS / "lora_fa", help="the collected LoRA-FA records")
    fa.add_argument(
        "--lora-runs", type=Path, default=ROOT / RUNS / "recipe" / "final-rotten_tomatoes-lora", help="plain LoRA"
    )
    fa.add_argument("--out", type=Path, default=ROOT / RESULTS / "lora_fa.md")
    fa.set_defaults(func=_lora_fa)

    bl = sub.add_parser(
        "baselines", help="results/baselines.md: LoRA beside adapters, prefix tuning and BitFit (Tables 1-2)"
    )
    bl.add_argument("--runs", type=Path, default=ROOT / RUNS / "baselines", help="the collected baseline records")
    bl.add_argument("--ablation-search", type=Path, default=ROOT / RUNS / "ablations" / "search")
    bl.add_argument("--latency", type=Path, default=ROOT / "benchmarks" / "adapter_latency.json")
    bl.add_argument("--out", type=Path, default=ROOT / RESULTS / "baselines.md")
    bl.add_argument(
        "--chosen", action="store_true", help="print '<arm> <lr>' per arm ready for its seeds (baselines.sh seeds)"
    )
    bl.set_defaults(func=_baselines)

    d = sub.add_parser(
        "decoder",
        help="results/decoder.md: SmolLM2-135M-Instruct on E2E NLG, from experiments/runs/decoder "
        "(runs: bash experiments/decoder.sh, then collect)",
    )
    d.add_argument("--runs", type=Path, default=ROOT / RUNS / "decoder", help="the collected decoder records")
    d.add_argument("--out", type=Path, default=ROOT / RESULTS)
    d.set_defaults(func=_decoder)

    t = sub.add_parser(
        "two-tasks", help="two task adapters trained in one fit vs each alone (experiments/two_tasks.py)"
    )
    steps = t.add_subparsers(dest="step", required=True)
    run = steps.add_parser("run", help="every run not finished yet, each in its own process")
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    run.add_argument("--jobs", type=int, default=2)
    one = steps.add_parser("one", help="one run (what 'run' launches)")
    one.add_argument("mode", choices=["together", "alone"])
    one.add_argument("tasks")
    one.add_argument("seed", type=int)
    one.add_argument("--threads", type=int, default=1)
    steps.add_parser("report", help="results/two_tasks.md from results/two_tasks/*/summary.json")
    t.set_defaults(func=_two_tasks)
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.command == "report" and not (args.margin > 0 and args.recipe_margin > 0 and 0 < args.alpha < 1):
        p.error("--margin and --recipe-margin must be > 0 and --alpha in (0, 1)")
    args.func(args)


if __name__ == "__main__":
    main()
