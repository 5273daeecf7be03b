"""What ``LoRAMonitor`` costs: the MiniLM training step with and without the monitor's hooks, timed in the same run.

    taskset -c 1 python -m benchmarks.monitor_overhead            # ~10 min on one core
    python -m benchmarks.monitor_overhead --quick                 # tiny model, seconds: a smoke test

The training benchmark's step (all-MiniLM-L6-v2, pretrained; batch 8 x 128 tokens; LoRA r=8 on every linear layer,
36 matrices, more than the main job's 24; AdamW) runs on two identical copies of the model. One copy calls the
monitor's training hooks around each step exactly where Lightning calls them (``on_before_optimizer_step`` before
``optimizer.step()``, ``on_train_batch_end`` after it) with the step counter a ``Trainer`` keeps, so at the cadence
``every_n_steps`` one step in ``every_n_steps`` copies the adapters, computes the norms, spectra and subspace
similarities and logs them (to an in-memory logger). A timed sample is a block of ``every_n_steps`` consecutive
steps of one copy; the two copies' blocks alternate in a random order per round, and the ratio is taken per round
(paired), so it holds exactly one due step per block and drifts of the machine cancel.

The epoch-end images and the validation-end amplification run once per epoch / validation, not per step: they are
timed on their own (median of a few calls) and amortised over the main job's schedule (its steps, validations and
epochs, read from ``--job-steps``/``--job-validations``/``--job-epochs``) next to the step ratio.
Writes ``benchmarks/monitor_overhead.json``; ``python -m benchmarks.run --render`` puts it into RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from benchmarks.common import interleaved, load_average, machine_info, paired_ratio, render_json, setup_torch, summarize

HERE = Path(__file__).resolve().parent
GOAL = 1.02  # the step-time ratio monitor on / off asked for at the default cadence


class _MemoryLogger:
    """A logger that keeps what it is given (the monitor builds and hands over every value, as with a real one)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append(metrics)


def monitored_step(step, model, optimizer, monitor, every_n_steps: int):
    """``step`` with the monitor's training hooks where Lightning calls them, and a Trainer-like step counter."""
    trainer = SimpleNamespace(
        global_step=0, loggers=[_MemoryLogger()], sanity_checking=False, current_epoch=0, is_global_zero=True
    )
    monitor.on_train_start(trainer, model)
    original_step = optimizer.step

    def hooked_optimizer_step(*args: Any, **kwargs: Any) -> Any:
        monitor.on_before_optimizer_step(trainer, model, optimizer)
        return original_step(*args, **kwargs)

    optimizer.step = hooked_optimizer_step  # type: ignore[method-assign]

    def run() -> None:
        step()
        trainer.global_step += 1
        monitor.on_train_batch_end(trainer, model, None, None, 0)
        if len(trainer.loggers[0].rows) > 2 * every_n_steps:  # keep memory flat over a long run
            trainer.loggers[0].rows.clear()

    return run, trainer


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, few rounds: a smoke test")
    parser.add_argument("--every-n-steps", type=int, default=50, help="the monitor's cadence (the app's default)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--job-steps", type=int, default=282, help="the main job's optimizer steps")
    parser.add_argument("--job-validations", type=int, default=6, help="the main job's validation runs")
    parser.add_argument("--job-epochs", type=int, default=3, help="the main job's epochs (one image set each)")
    parser.add_argument("--out", type=Path, default=HERE / "monitor_overhead.json")
    parser.add_argument("--note", default="", help="conditions of the run, printed with the results")
    args = parser.parse_args(argv)

    threads = setup_torch("cpu", args.threads)
    from benchmarks.models import build_model, make_batch, make_trainer, minilm_spec, prepare, tiny_bert_spec
    from lora_lightning import LoRAMonitor

    spec = tiny_bert_spec(batch=2, seq=16) if args.quick else minilm_spec(batch=8, seq=128)
    every = 2 if args.quick else args.every_n_steps
    rounds = args.rounds or (2 if args.quick else 4)
    started = time.perf_counter()
    batch = make_batch(spec, "cpu")
    plain_model = prepare(build_model(spec), "lora_all")
    watched_model = prepare(build_model(spec), "lora_all")
    plain_step, _ = make_trainer(plain_model, batch, "lora_all")
    watched_raw, optimizer = make_trainer(watched_model, batch, "lora_all")
    with tempfile.TemporaryDirectory() as tmp:
        monitor = LoRAMonitor(every_n_steps=every, out_dir=tmp)
        watched_step, trainer = monitored_step(watched_raw, watched_model, optimizer, monitor, every)

        def block(fn):
            def run() -> None:
                for _ in range(every):
                    fn()

            return run

        times = interleaved(
            {"monitor off": block(plain_step), "monitor on": block(watched_step)},
            rounds=rounds,
            warmup=1,
            device="cpu",
            seed=7,
        )
        logged = len(trainer.loggers[0].rows[-1]) if trainer.loggers[0].rows else 0
        # the monitor's own work on a due step, timed directly: both training hooks around a step whose number is a
        # multiple of the cadence (the gradients of the last step are in place), without the step itself
        hook_s = []
        for i in range(3 if args.quick else 7):
            trainer.global_step = every * (10_000 + i) - 1
            t = time.perf_counter()
            monitor.on_before_optimizer_step(trainer, watched_model, optimizer)
            trainer.global_step += 1
            monitor.on_train_batch_end(trainer, watched_model, None, None, 0)
            hook_s.append(time.perf_counter() - t)
        # the once-per-validation and once-per-epoch work, on the trained adapters
        val_s, img_s = [], []
        for _ in range(2 if args.quick else 3):
            t = time.perf_counter()
            monitor.on_validation_end(trainer, watched_model)
            val_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            monitor.on_train_epoch_end(trainer, watched_model)
            img_s.append(time.perf_counter() - t)
        images = sorted(p.name for p in Path(tmp).glob("*.png"))
    ratio = paired_ratio(times["monitor on"], times["monitor off"])
    step_s = statistics.median(times["monitor off"]) / every
    direct = 1 + statistics.median(hook_s) / (every * step_s)  # on / off from the hooks' own cost
    job_s = args.job_steps * step_s
    job_extra = (
        args.job_steps * statistics.median(hook_s) / every
        + args.job_validations * statistics.median(val_s)
        + args.job_epochs * statistics.median(img_s)
    )
    result = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": round(time.perf_counter() - started, 1),
        "quick": args.quick,
        "model": spec.label,
        "batch": spec.batch,
        "seq": spec.seq,
        "method": "LoRA r=8 on every linear layer of the encoder (all-linear: q, k, v, o and the MLP; AdamW)",
        "every_n_steps": every,
        "rounds": rounds,
        "threads": threads,
        "load_average": load_average(),
        "machine": machine_info("cpu", threads),
        "block_s": {k: summarize(v) for k, v in times.items()},
        "samples_s": times,
        "ratio_on_off": ratio,
        "step_s": step_s,
        "values_per_log": logged,
        "due_step_hooks_s": summarize(hook_s),
        "ratio_from_hooks": direct,
        "validation_end_s": summarize(val_s),
        "epoch_end_images_s": summarize(img_s),
        "images": images,
        "job": {
            "steps": args.job_steps,
            "validations": args.job_validations,
            "epochs": args.job_epochs,
            "training_s_at_this_step_time": job_s,
            "monitor_extra_s": job_extra,
            "ratio": (job_s + job_extra) / job_s,
        },
        "goal": GOAL,
        "note": args.note,
    }
    if not args.quick:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(render_result(result))
    return result


def render_result(data: dict) -> str:
    return "\n".join(render_data(data))


def render_data(data: dict) -> list[str]:
    r, job = data["ratio_on_off"], data["job"]
    direct = data["ratio_from_hooks"]
    verdict = "meets" if direct <= data["goal"] else "misses"
    return [
        f"## 13. LoRAMonitor overhead: {data['model']} training step, monitor on / off",
        "",
        f"`python -m benchmarks.monitor_overhead` on {data['date']} ({data['seconds']} s, {data['threads']} thread, "
        f"load average {data['load_average']}). {data['model']}, batch {data['batch']} x {data['seq']}, "
        f"{data['method']}; the monitor at its default cadence (every {data['every_n_steps']} steps: norms, "
        f"spectra, §7.2 subspace similarity against the start, gradient norms and update ratios, "
        f"{data['values_per_log']} values per log). A timed sample is a block of {data['every_n_steps']} steps "
        f"(one due step in each); the two copies' blocks alternate in random order over {data['rounds']} rounds, "
        "the ratio taken per round." + (f" {data['note']}" if data.get("note") else ""),
        "",
        "| what | value |",
        "|---|---|",
        f"| step time, monitor off (median) | {1000 * data['step_s']:.0f} ms |",
        f"| step-time ratio on / off (median of rounds [p25, p75]; ratio of fastest blocks) | "
        f"**{r['median']:.4f}** [{r['p25']:.4f}, {r['p75']:.4f}]; {r['of_min']:.4f} |",
        f"| the monitor's hooks on a due step, timed alone (median of {data['due_step_hooks_s']['n']}) | "
        f"{1000 * data['due_step_hooks_s']['median']:.0f} ms, once per {data['every_n_steps']} steps: on / off "
        f"= **{direct:.4f}** |",
        f"| goal | ≤ {data['goal']} at the default cadence: {verdict} (from the hooks' own cost; the interleaved "
        "ratio above carries the machine's noise) |",
        f"| validation end (adds §7.3 amplification, one W0·Q product per matrix) | "
        f"{1000 * data['validation_end_s']['median']:.0f} ms per validation |",
        f"| epoch end (heatmap + singular-value PNGs) | "
        f"{1000 * data['epoch_end_images_s']['median']:.0f} ms per epoch |",
        f"| the main job's schedule ({job['steps']} steps, {job['validations']} validations, {job['epochs']} epochs) "
        f"at this step time | +{job['monitor_extra_s']:.1f} s on {job['training_s_at_this_step_time']:.0f} s of "
        f"training steps: {job['ratio']:.4f} |",
        "",
    ]


def render(path: Path) -> list[str]:
    """The RESULTS.md section for ``monitor_overhead.json`` (empty if the benchmark was not run)."""
    return render_json(path, render_data)


if __name__ == "__main__":
    main()
