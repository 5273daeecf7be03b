"""LoRA-FA's activation memory and step time beside plain LoRA and the frozen-base limit, in one run.

    python -m benchmarks.lora_fa            # ~10 min on 2 cores, quiet machine
    python -m benchmarks.lora_fa --quick    # tiny model, seconds: a smoke test

The training benchmark's two models (all-MiniLM-L6-v2 pretrained, batch 8 x 128; BERT-large width with 3 layers,
batch 4 x 128; AdamW over the trainable parameters, fp32) and five methods: the frozen-base limit (every weight
frozen, gradients still flow to the embeddings), LoRA r=8 on q,v and on every linear layer, and LoRA-FA
(``variant="lora_fa"``, its projection on) on the same matrices. Per (model, method):

* **saved activations**: the distinct tensors autograd keeps from one forward for the backward, parameters
  excluded (deterministic);
* **training memory**: peak RSS (VmHWM, reset after loading) minus the process with the model loaded, in a fresh
  process per configuration, two steps (activations + gradients + optimizer state + allocator slack);
* **step time**: the methods timed round-robin in random order per round, ratios taken per round.

Writes ``benchmarks/lora_fa.json``; ``python -m benchmarks.run --render`` puts the section into RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.common import load_average, machine_info, paired_ratio, render_json, setup_torch, write_results

HERE = Path(__file__).resolve().parent
METHODS = ["floor", "lora_qv", "lora_fa_qv", "lora_all", "lora_fa_all"]
# what issue 37 asked of LoRA-FA all-linear at BERT-large width, against the frozen-base limit
GOALS = {"saved_activations": 1.05, "training_memory": 1.03}
MiB = 2**20


def main(argv: list[str] | None = None) -> dict:
    from benchmarks import suites as S
    from benchmarks.models import bert_large_width_spec, minilm_spec, tiny_bert_spec

    p = argparse.ArgumentParser(prog="python -m benchmarks.lora_fa", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny BERT, 3 rounds: a smoke test")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=HERE / "lora_fa.json")
    args = p.parse_args(argv)
    start = time.time()
    threads = setup_torch("cpu", args.threads)
    specs = (
        [tiny_bert_spec(batch=2, seq=16)]
        if args.quick
        else [minilm_spec(batch=8, seq=128), bert_large_width_spec(layers=3, batch=4, seq=128)]
    )
    rounds, warmup = (3, 1) if args.quick else (args.rounds, 2)
    models = {}
    for spec in specs:
        print(f"[{time.time() - start:6.0f}s] step time and saved activations: {spec.key}", flush=True)
        speed = S.train_speed(spec, METHODS, "cpu", "fp32", rounds, warmup)
        samples = {m: speed["methods"][m]["samples_s"] for m in METHODS}
        models[spec.key] = {
            "label": spec.label,
            "batch": spec.batch,
            "seq": spec.seq,
            "methods": {
                m: {k: v for k, v in speed["methods"][m].items() if k != "samples_s"} | {"samples_s": samples[m]}
                for m in METHODS
            },
            "ratios": {
                f"{a}/{b}": paired_ratio(samples[a], samples[b])
                for a, b in (
                    ("lora_fa_qv", "floor"),
                    ("lora_fa_all", "floor"),
                    ("lora_qv", "floor"),
                    ("lora_all", "floor"),
                    ("lora_fa_qv", "lora_qv"),
                    ("lora_fa_all", "lora_all"),
                )
            },
        }
    print(f"[{time.time() - start:6.0f}s] training memory: one fresh process per configuration", flush=True)
    memory = S.train_memory(specs, METHODS, "cpu", "fp32", threads, steps=2)
    for spec in specs:
        for m in METHODS:
            models[spec.key]["methods"][m]["memory"] = memory[spec.key][m]
    payload = {
        "command": "python -m benchmarks.lora_fa" + (" --quick" if args.quick else ""),
        "quick": args.quick,
        "rounds": rounds,
        "warmup": warmup,
        "threads": threads,
        "machine": machine_info("cpu", threads),
        "load_average": load_average(),
        "goals": GOALS,
        "models": models,
    }
    write_results(args.out, payload, start)
    data = json.loads(args.out.read_text())
    print("\n".join(render_data(data)))
    return data


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.3f}" if a is not None and b else "—"


def _band(r: dict | None) -> str:
    return f"{r['median']:.3f} [{r['p25']:.3f}-{r['p75']:.3f}]" if r else ""


def _row(model: dict, m: str, r: dict, floor_saved: int, floor_train: int | None) -> str:
    from benchmarks.models import method_label

    train, step = r["memory"].get("training_bytes"), r["step_s"]
    if train is None:
        return f"| {method_label(m)} | {r['trainable_params']:,} | memory worker failed | | | | | | |"
    to_floor = model["ratios"].get(f"{m}/floor")
    to_lora = model["ratios"].get(f"{m}/{m.replace('lora_fa_', 'lora_')}") if m.startswith("lora_fa") else None
    return (
        f"| {method_label(m)} | {r['trainable_params']:,} | {r['saved_activation_bytes'] / MiB:.1f} | "
        f"{_ratio(r['saved_activation_bytes'], floor_saved)} | {train / MiB:.1f} | {_ratio(train, floor_train)} | "
        f"{1000 * step['median']:.0f} [{1000 * step['p25']:.0f}-{1000 * step['p75']:.0f}] | "
        f"{_band(to_floor) if m != 'floor' else '1'} | {_band(to_lora)} |"
    )


def render_data(data: dict) -> list[str]:
    lines = [
        "## 14. LoRA-FA: activation memory and step time beside LoRA and the frozen-base limit",
        "",
        f"`{data['command']}` on {data['date']} ({data['seconds']} s, {data['threads']} threads, load average at the "
        f"end {data['loadavg_at_end']}). AdamW over the trainable parameters, fp32; LoRA and LoRA-FA r=8, alpha 16, "
        "no dropout; LoRA-FA projects ∂B (its default). 'Saved activations': the distinct tensors autograd keeps "
        "from one forward (parameters excluded). 'Training MiB': peak RSS minus the loaded process, a fresh process "
        f"per row, 2 steps. Step time: {data['rounds']} rounds after {data['warmup']}, methods in random order per "
        "round, ratios per round (median [p25, p75]).",
        "",
    ]
    goals_seen = []
    for key, model in data["models"].items():
        meth = model["methods"]
        floor_saved = meth["floor"]["saved_activation_bytes"]
        floor_train = meth["floor"]["memory"].get("training_bytes")
        lines += [
            f"### {model['label']}, batch {model['batch']} x {model['seq']}",
            "",
            "| method | trainable params | saved activations MiB | / limit | training MiB | / limit | step ms "
            "median [p25-p75] | / limit | LoRA-FA / LoRA |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for m, r in meth.items():
            lines.append(_row(model, m, r, floor_saved, floor_train))
        fa, plain = meth["lora_fa_all"], meth["lora_all"]
        if "bert-large" in key and floor_train and fa["memory"].get("training_bytes"):
            saved = fa["saved_activation_bytes"] / floor_saved
            train = fa["memory"]["training_bytes"] / floor_train
            goal_s, goal_t = data["goals"]["saved_activations"], data["goals"]["training_memory"]
            goals_seen.append(
                f"- LoRA-FA all-linear at BERT-large width: saved activations {saved:.3f}x the limit's (goal ≤ "
                f"{goal_s}: {'met' if saved <= goal_s else 'missed'}), training memory {train:.3f}x (goal ≤ {goal_t}: "
                f"{'met' if train <= goal_t else 'missed'}); plain LoRA all-linear "
                f"{plain['saved_activation_bytes'] / floor_saved:.3f}x and "
                f"{plain['memory']['training_bytes'] / floor_train:.3f}x in the same run."
            )
        lines.append("")
    lines += goals_seen
    lines += [
        "- LoRA-FA's saved activations can sit below the limit's: the limit sends gradients down to the embeddings "
        "(its definition: every layer's input gradient), LoRA-FA's backward stops at the first adapted layer, whose "
        "∂B needs only x·Aᵀ.",
        "",
    ]
    return lines


def render(path: Path) -> list[str]:
    """The RESULTS.md section for ``lora_fa.json`` (empty if the benchmark was not run)."""
    return render_json(path, render_data)


if __name__ == "__main__":
    main()
