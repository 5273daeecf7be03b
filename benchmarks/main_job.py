"""Tokens per second of the main job (``lora-train`` with its defaults): LoRA vs full fine-tuning vs
head only (and LoRA under bf16-mixed, and with shared-input fusion off), on the job's own model, data and batches,
in one run.

    python -m benchmarks.main_job [--batches 12] [--rounds 5] [--threads 2]

The Hydra config of the main job is composed as ``lora-train`` would (every default, ``logger=none``),
so the model (all-MiniLM-L6-v2 + new head), the data module (Rotten Tomatoes, batch 32, dynamic
padding to the longest snippet, at most 64 tokens) and each method's lr and LoRA options are the
job's. The first ``--batches`` training batches are fixed; every round runs all of them once per
method, in a fresh random order of methods (interleaved, as the other suites). A step is what
Lightning does in ``fit``: zero_grad, forward, cross-entropy, backward, AdamW step (no logging).
Reports real (non-padding) tokens per second, padded tokens per second, samples per second, and
each method's ratio to full fine-tuning taken round by round. Writes ``main_job.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import functools
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import interleaved, load_average, paired_ratio, setup_torch, summarize

HERE = Path(__file__).resolve().parent
METHODS = ("lora", "full", "head_only", "lora+bf16mixed", "lora+unfused")


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_module

    with initialize_config_module("lora_lightning.app.conf", version_base="1.3"):
        return compose("config", overrides=["logger=none", "output_dir=/tmp/lora_lightning_main_job_bench", *overrides])


def job(overrides: list[str]):
    """(config, fitted-up data module, fresh model) of the main job with ``overrides``, the model seeded as the job
    seeds it."""
    from hydra.utils import instantiate

    cfg = _compose(overrides)
    dm = instantiate(cfg.data, _convert_="all")
    dm.prepare_data()
    dm.setup("fit")
    torch.manual_seed(int(cfg.seed))
    model = instantiate(cfg.model, _convert_="all", num_labels=dm.num_labels, label_names=list(dm.label_names))
    return cfg, dm, model


def build(method: str):
    """(model, optimizer, autocast factory) for one method, with the main job's settings."""
    from lora_lightning import inject_lora
    from lora_lightning.app.methods import apply_method
    from lora_lightning.app.train import build_lora_config

    base = method.split("+")[0]
    overrides = [] if base == "lora" else [f"lora={base}"]
    if method.endswith("+unfused"):
        overrides.append("lora.fuse_shared_inputs=false")
    cfg, dm, model = job(overrides)
    if base == "lora":
        inject_lora(model, build_lora_config(cfg, model))
    elif base == "head_only":
        apply_method(model, "head_only", cfg.lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(cfg.model.lr), weight_decay=float(cfg.model.weight_decay))
    autocast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        if method.endswith("+bf16mixed")
        else contextlib.nullcontext
    )
    return model, opt, autocast, dm, sum(p.numel() for p in params)


def train_pass(model, opt, autocast, batches: list[dict]) -> None:
    """What Lightning's fit does per batch, without logging: zero_grad, forward, cross-entropy, backward, step."""
    for b in batches:
        opt.zero_grad(set_to_none=True)
        with autocast():
            logits = model(b["input_ids"], b["attention_mask"])
        F.cross_entropy(logits.float(), b["labels"]).backward()
        opt.step()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.main_job", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=HERE / "main_job.json")
    args = ap.parse_args(argv)
    threads = setup_torch("cpu", args.threads)
    load_start = load_average()
    fns, info, batches = {}, {}, None
    for method in METHODS:
        model, opt, autocast, dm, trainable = build(method)
        if batches is None:
            loader = dm.train_dataloader()
            batches = list(itertools.islice(loader, args.batches))

        fns[method] = functools.partial(train_pass, model, opt, autocast, batches)
        info[method] = {"trainable_params": trainable}
    real = int(sum(int(b["attention_mask"].sum()) for b in batches))
    padded = int(sum(b["input_ids"].numel() for b in batches))
    samples = int(sum(b["input_ids"].shape[0] for b in batches))
    times = interleaved(fns, rounds=args.rounds, warmup=args.warmup, device="cpu", seed=5)
    out = {
        "command": "python -m benchmarks.main_job " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "threads": threads,
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "batches": args.batches,
        "samples": samples,
        "real_tokens": real,
        "padded_tokens": padded,
        "methods": {},
    }
    for m in METHODS:
        s = summarize(times[m])
        out["methods"][m] = info[m] | {
            "seconds_per_pass": s,
            "real_tokens_per_s": real / s["median"],
            "padded_tokens_per_s": padded / s["median"],
            "samples_per_s": samples / s["median"],
            "time_vs_full": paired_ratio(times[m], times["full"]) if m != "full" else None,
        }
    out["paired"] = {
        "lora / lora+unfused (time)": paired_ratio(times["lora"], times["lora+unfused"]),
        "lora+bf16mixed / lora (time)": paired_ratio(times["lora+bf16mixed"], times["lora"]),
    }
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(
        json.dumps(
            {m: {k: v for k, v in r.items() if k.endswith("_per_s")} for m, r in out["methods"].items()}, indent=1
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
