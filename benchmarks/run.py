"""Run every benchmark suite and write ``results.json`` and ``RESULTS.md``.

    python -m benchmarks.run                    # full run (~10 min on one CPU core)
    python -m benchmarks.run --quick            # tiny sizes, seconds: a smoke test
    python -m benchmarks.run --device cuda --dtype bf16
    taskset -c 1 python -m benchmarks.run --threads 1   # pin to one core on a shared machine

See benchmarks/README.md for what every number means.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
import time
from pathlib import Path

from benchmarks.common import load_average, machine_info, setup_torch

HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- plan
def make_plan(args) -> dict:
    from benchmarks.models import TRAIN_METHODS, bert_large_width_spec, minilm_spec, tiny_bert_spec

    if args.quick:
        return {
            "train_specs": [tiny_bert_spec(batch=2, seq=16)],
            "methods": list(TRAIN_METHODS),
            "rounds": 3,
            "warmup": 1,
            "memory_steps": 1,
            "infer_specs": [tiny_bert_spec(batch=1, seq=16)],
            "infer_rounds": 5,
            "infer_warmup": 1,
            "infer_sample_s": 0.005,
            "size_specs": [tiny_bert_spec()],
            "llama": {"layers": 2, "hidden": 256, "ffn": 704, "heads": 4, "kv_heads": 2},
            "merge_repeats": 2,
            "profile_specs": [tiny_bert_spec(batch=2, seq=16)] if args.profile else [],
            "precision_spec": tiny_bert_spec(batch=2, seq=16),
            "compile_spec": tiny_bert_spec(batch=2, seq=16),
            "compile_seq_lengths": [16, 12, 8],
        }
    large = bert_large_width_spec(layers=args.large_layers, batch=4, seq=128)
    return {
        "train_specs": [minilm_spec(batch=8, seq=128), large],
        "methods": list(TRAIN_METHODS),
        "rounds": args.rounds or 10,
        "warmup": 2,
        "memory_steps": 2,
        "infer_specs": [
            minilm_spec(batch=1, seq=128),
            minilm_spec(batch=8, seq=128),
            bert_large_width_spec(args.large_layers, 1, 128),
        ],
        "infer_rounds": 30,
        "infer_warmup": 3,
        "infer_sample_s": 0.1,
        "size_specs": [minilm_spec(), large],
        "llama": {},  # TinyLlama-1.1B shape
        "merge_repeats": 3,
        "profile_specs": [minilm_spec(batch=8, seq=128), large] if args.profile else [],
        "precision_spec": minilm_spec(batch=8, seq=128),
        "compile_spec": minilm_spec(batch=8, seq=128),
        "compile_seq_lengths": [128, 112, 96, 128, 80, 64],  # a few batches of a dynamically padded fit
    }


# --------------------------------------------------------------------------- goals
def _verdict(value: float, lo: float | None, hi: float | None, iqr: tuple[float, float] | None = None) -> str:
    ok = (lo is None or value >= lo) and (hi is None or value <= hi)
    if ok:
        return "PASS"
    if iqr is not None:
        a, b = iqr
        inside = lambda x: (lo is None or x >= lo) and (hi is None or x <= hi)  # noqa: E731
        if inside(a) or inside(b) or (lo is not None and a < lo < b) or (hi is not None and a < hi < b):
            return "MISS (within noise: IQR reaches the goal)"
    return "MISS"


def evaluate_goals(results: dict) -> list[dict]:
    goals = []

    def ratio_goal(gid, text, model, r, lo, hi, target):
        goals.append(
            {
                "id": gid,
                "goal": text,
                "model": model,
                "measured": r["median"],
                "iqr": [r["p25"], r["p75"]],
                "ratio_of_min": r.get("of_min"),
                "target": target,
                "verdict": _verdict(r["median"], lo, hi, (r["p25"], r["p75"])),
            }
        )

    for key, t in results.get("train", {}).items():
        rr = t["speed"]["ratios"]
        for cfg in ("qv", "all"):
            if f"lora_{cfg}/full" in rr:
                ratio_goal(
                    "1a", f"LoRA {cfg} step time / full fine-tuning", key, rr[f"lora_{cfg}/full"], None, 0.75, "<= 0.75"
                )
            if f"lora_{cfg}/floor" in rr:
                hi = 1.00 if cfg == "qv" else 1.02
                ratio_goal(
                    "1b",
                    f"LoRA {cfg} step time / frozen-base limit",
                    key,
                    rr[f"lora_{cfg}/floor"],
                    None,
                    hi,
                    f"<= {hi:.2f}",
                )
            if f"lora_{cfg}/lora_{cfg}+unfused" in rr:
                ratio_goal(
                    "1d",
                    f"LoRA {cfg} step time, shared-input fusion on / off",
                    key,
                    rr[f"lora_{cfg}/lora_{cfg}+unfused"],
                    None,
                    1.0,
                    "<= 1.00",
                )
            if f"lora_{cfg}/peft_{cfg}" in rr:
                ratio_goal(
                    "2", f"LoRA {cfg} step time / HF PEFT", key, rr[f"lora_{cfg}/peft_{cfg}"], None, 1.0, "<= 1.00"
                )
    for key, t in results.get("train", {}).items():
        mem = t.get("memory", {})
        floor = mem.get("floor", {}).get("training_bytes")
        for cfg in ("qv", "all"):
            got = mem.get(f"lora_{cfg}", {}).get("training_bytes")
            if floor and got:
                goals.append(
                    {
                        "id": "1c",
                        "goal": f"LoRA {cfg} training memory / frozen-base limit's",
                        "model": key,
                        "measured": got / floor,
                        "target": "<= 1.03",
                        "verdict": "PASS" if got / floor <= 1.03 else "MISS",
                    }
                )
    for key, inf in results.get("inference", {}).items():
        for variant in ("merged", "merged_unloaded"):
            ratio_goal(
                "3",
                f"inference latency {variant} / base",
                key,
                inf["ratios"][f"{variant}/base"],
                0.98,
                1.02,
                "1.00 +- 0.02",
            )
    im = results.get("inject_merge")
    if im:
        mat = im.get("materialized", {})
        for label, row in mat.items():
            if not isinstance(row, dict):
                continue
            s = row["inject_s"]["median"]
            goals.append(
                {
                    "id": "5a",
                    "goal": f"inject_lora ({label}, {row['n_matrices']} matrices) on {im['params'] / 1e9:.2f}B params",
                    "model": "llama (bf16)",
                    "measured": s,
                    "unit": "s",
                    "target": "< 1 s",
                    "verdict": "PASS" if s < 1.0 else "MISS",
                }
            )
        rates = {k: v["merge_ns_per_adapted_element"] for k, v in mat.items() if isinstance(v, dict)}
        if rates:
            spread = max(rates.values()) / min(rates.values())
            goals.append(
                {
                    "id": "5b",
                    "goal": "merge time proportional to adapted weights: max/min ns per adapted element over "
                    + ", ".join(f"{k} ({mat[k]['n_matrices']})" for k in rates),
                    "model": "llama (bf16)",
                    "measured": spread,
                    "target": "<= 1.5",
                    "verdict": "PASS" if spread <= 1.5 else "MISS",
                }
            )
    sz = results.get("sizes")
    if sz:
        for key, entry in sz["models"].items():
            a = entry["adapters"]["lora_qv"]
            goals.append(
                {
                    "id": "4",
                    "goal": "adapter tensor bytes == closed form r*(d_in+d_out)*n*bytes (q,v)",
                    "model": key,
                    "measured": a["tensor_bytes"] / a["closed_form_bytes"],
                    "target": "== 1",
                    "verdict": "PASS" if a["tensor_bytes"] == a["closed_form_bytes"] else "MISS",
                }
            )
        g = sz.get("gpt3_175b")
        if g:
            goals.append(
                {
                    "id": "4",
                    "goal": "GPT-3 175B r=4 q,v adapter (fp16) vs paper's 35 MB",
                    "model": "gpt3-175b (meta)",
                    "measured": g["adapter_fp16_bytes"] / g["paper_adapter_bytes"],
                    "target": "~1 (paper rounds)",
                    "verdict": "PASS" if abs(g["adapter_fp16_bytes"] / g["paper_adapter_bytes"] - 1) < 0.1 else "MISS",
                }
            )
    return goals


# --------------------------------------------------------------------------- markdown
def _ms(x: float) -> str:
    return f"{x * 1e3:.1f}" if x >= 0.01 else f"{x * 1e3:.2f}"


def _mb(b: float | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:.1f}"


def _ms_iqr(s: dict) -> str:
    """A timing summary (seconds) as ``median [p25-p75]`` in ms."""
    return f"{_ms(s['median'])} [{_ms(s['p25'])}-{_ms(s['p75'])}]"


def _bytes(b: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= div:
            return f"{b / div:.2f} {unit}"
    return f"{int(b)} B"


def _r(r: dict) -> str:
    return f"{r['median']:.3f} [{r['p25']:.3f}-{r['p75']:.3f}]"


def render_markdown(res: dict) -> str:
    from benchmarks.models import method_label

    mi = res["machine"]
    L: list[str] = []
    L.append("# lora-lightning benchmarks: results")
    L.append("")
    L.append(
        f"Generated by `{res['command']}` on {res['started']} "
        f"({'quick smoke run: tiny sizes, numbers are not meaningful' if res['quick'] else 'full run'}), took "
        f"{res['elapsed_s'] / 60:.1f} min. How to read every number: [README.md](README.md)."
    )
    L.append("")
    L.append("## Machine")
    L.append("")
    L.append("| | |")
    L.append("|---|---|")
    L.append(
        f"| CPU | {mi['cpu_model']} ({mi['cpu_family_model']}; flags "
        f"{', '.join(mi['cpu_flags']) or 'none of interest'}) |"
    )
    L.append(f"| logical CPUs / usable by this run | {mi['logical_cpus']} / {mi['usable_cpus']} |")
    L.append(f"| torch threads | {mi['torch_threads']} |")
    L.append(f"| RAM | {_bytes(mi['ram_bytes'] or 0)} |")
    if "gpu" in mi:
        L.append(f"| GPU | {mi['gpu']} ({_bytes(mi['gpu_memory_bytes'])}, CUDA {mi['cuda']}) |")
    L.append(f"| device / dtype | {mi['device']} / {res['dtype']} (inject/merge suite: bf16) |")
    L.append(f"| load average (1, 5, 15 min) at start | {mi['load_average_start']} |")
    L.append(f"| load average at end | {res['load_average_end']} |")
    L.append(f"| software | Python {mi['python']}, " + ", ".join(f"{k} {v}" for k, v in mi["versions"].items()) + " |")
    L.append(f"| platform | {mi['platform']} |")
    L.append("")
    L.append(
        "Timings of different configurations are taken round-robin in the same process (a fresh random "
        "order every round), so load from other processes hits all of them alike; a ratio is the median "
        "of the per-round ratios, [p25-p75] its interquartile range. A load average above the thread "
        "count means other processes competed for the CPU during the run: absolute times are then "
        "inflated, ratios much less so."
    )
    L.append("")

    goals = res.get("goals", [])
    if goals:
        L.append("## Goals")
        L.append("")
        L.append("| # | goal | model | measured | target | verdict |")
        L.append("|---|---|---|---|---|---|")
        for g in goals:
            if g.get("unit") == "s":
                meas = f"{g['measured'] * 1e3:.0f} ms"
            elif "iqr" in g:
                meas = f"{g['measured']:.3f} [{g['iqr'][0]:.3f}-{g['iqr'][1]:.3f}]"
            else:
                meas = f"{g['measured']:.3f}"
            L.append(f"| {g['id']} | {g['goal']} | {g['model']} | {meas} | {g['target']} | {g['verdict']} |")
        L.append("")

    for t in res.get("train", {}).values():
        sp, mem = t["speed"], t["memory"]
        L.append(f"## 1-2. Training step: {t['label']}")
        L.append("")
        L.append(
            f"batch {t['batch']} x seq {t['seq']}, {res['dtype']}, AdamW over the trainable parameters; "
            f"{t['rounds']} timed rounds after {t['warmup']} warm-up rounds. Memory: one fresh process per row, "
            f"{mem[next(iter(mem))].get('metric', '?') if mem else '?'}; 'training' = peak minus the process "
            "with the model loaded (activations + gradients + optimizer state + allocator slack). 'Saved activations': "
            "the distinct tensors autograd keeps from one forward for the backward (parameters excluded; a tensor "
            "several nodes save counts once), the deterministic part of training memory."
        )
        L.append("")
        L.append(
            "| method | trainable params | step ms median [p25-p75] | / full | / frozen-base limit | peak MiB | "
            "training MiB | saved activations MiB |"
        )
        L.append("|---|---|---|---|---|---|---|---|")
        full = sp["methods"].get("full")
        floor = sp["methods"].get("floor")
        for m, row in sp["methods"].items():
            s = row["step_s"]
            rf = sp["ratios"].get(f"{m}/full")
            rl = sp["ratios"].get(f"{m}/floor")
            rf_s = (
                "1"
                if m == "full"
                else (_r(rf) if rf else (f"{s['median'] / full['step_s']['median']:.3f}" if full else ""))
            )
            rl_s = (
                "1"
                if m == "floor"
                else (_r(rl) if rl else (f"{s['median'] / floor['step_s']['median']:.3f}" if floor else ""))
            )
            mm = mem.get(m, {})
            peak = _mb(mm.get("peak_bytes")) if "error" not in mm else "error"
            train_mb = _mb(mm.get("training_bytes")) if "error" not in mm else "error"
            L.append(
                f"| {method_label(m)} | {row['trainable_params']:,} | {_ms_iqr(s)} | {rf_s} | {rl_s} | {peak} | "
                f"{train_mb} | {_mb(row.get('saved_activation_bytes'))} |"
            )
        L.append("")
        for a, b in (("lora_qv", "peft_qv"), ("lora_all", "peft_all")):
            r = sp["ratios"].get(f"{a}/{b}")
            if r:
                L.append(f"- ours / PEFT ({a.split('_')[1]}): {_r(r)} (ratio of fastest repeats {r['of_min']:.3f})")
        for a in ("lora_qv", "lora_all"):
            r = sp["ratios"].get(f"{a}/{a}+unfused")
            if r:
                L.append(
                    f"- shared-input fusion on / off ({a.split('_')[1]}): {_r(r)} (ratio of fastest repeats "
                    f"{r['of_min']:.3f})"
                )
        L.append("")

    for inf in res.get("inference", {}).values():
        L.append(f"## 3. Inference latency: {inf['label']}, batch {inf['batch']} x seq {inf['seq']}")
        L.append("")
        L.append(
            f"eval mode, `torch.inference_mode()`, {inf['inner_calls_per_sample']} forward(s) per timed sample, "
            f"{inf['latency_s']['base']['n']} samples per variant, round-robin."
        )
        L.append("")
        L.append("| variant | latency ms median [p25-p75] | / base |")
        L.append("|---|---|---|")
        names = {
            "base": "base model (no LoRA)",
            "merged": "LoRA q,v merged (LoRA layers kept)",
            "merged_unloaded": "LoRA q,v merge_and_unload",
            "unmerged_qv": "LoRA q,v unmerged",
            "unmerged_all": "LoRA all-linear unmerged",
        }
        for k, s in inf["latency_s"].items():
            r = inf["ratios"].get(f"{k}/base")
            L.append(f"| {names.get(k, k)} | {_ms_iqr(s)} | {'1' if k == 'base' else _r(r)} |")
        c = inf["check"]
        L.append("")
        L.append(
            f"Check: max |logits(merged) - logits(unmerged)| = {c['max_abs_diff_merged_vs_unmerged']:.2e}, "
            f"(unloaded - unmerged) = {c['max_abs_diff_unloaded_vs_unmerged']:.2e}; the adapter is non-zero: "
            f"max |unmerged - base| = {c['max_abs_diff_unmerged_vs_base']:.2e}."
        )
        L.append("")

    sz = res.get("sizes")
    if sz:
        L.append("## 4. Checkpoint sizes")
        L.append("")
        L.append(
            "`save_adapter` (safetensors, tensors + JSON metadata: config, module list, base fingerprint) vs the "
            "full model's state dict written with `safetensors.torch.save_file`. Closed form: "
            "r*(d_in+d_out) per adapted matrix times bytes per element."
        )
        L.append("")
        L.append(
            "| model | adapter | matrices | closed form | closed-form bytes | tensor bytes | file bytes | "
            "header+metadata | full checkpoint | full / adapter file |"
        )
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for key, e in sz["models"].items():
            for name, a in e["adapters"].items():
                L.append(
                    f"| {key} | {name} | {a['n_matrices']} | `{a['closed_form']}` | {a['closed_form_bytes']:,} | "
                    f"{a['tensor_bytes']:,} | {a['file_bytes']:,} | {a['header_and_metadata_bytes']:,} | "
                    f"{_bytes(e['full_checkpoint_bytes'])} | {a['full_over_adapter_file']:,.0f}x |"
                )
        g = sz.get("gpt3_175b")
        if g:
            L.append("")
            L.append(
                f"GPT-3 175B (paper §4.2: 350 GB -> 35 MB, r=4 on q,v): a meta-device skeleton ({g['layers']} layers, "
                f"d_model {g['d_model']}) has {g['skeleton_params'] / 1e9:.1f}B parameters = "
                f"**{_bytes(g['full_fp16_bytes'])}** in fp16; `inject_lora(r=4, q,v)` on it adapts {g['n_matrices']} "
                f"matrices with {g['adapter_params_meta']:,} parameters (closed form `{g['closed_form']}` = "
                f"{g['adapter_params_closed_form'] * 2:,} bytes) = **{_bytes(g['adapter_fp16_bytes'])}** "
                f"({g['adapter_fp16_bytes'] / 2**20:.1f} MiB) in fp16; ratio {g['full_over_adapter']:,.0f}x (paper: "
                f"{g['paper_ratio']:,.0f}x). Built and injected in {g['meta_build_and_inject_s'] * 1e3:.0f} ms."
            )
        L.append("")

    im = res.get("inject_merge")
    if im:
        L.append(f"## 5. Injection and merge on a {im['params'] / 1e9:.2f}B-parameter Llama-shaped model (bf16)")
        L.append("")
        cfg = im["config"] or {"shape": "TinyLlama-1.1B (22 layers, hidden 2048, FFN 5632, 32 heads, 4 KV heads)"}
        L.append(
            f"Config {cfg}; built on the meta device in {im['meta_build_s'] * 1e3:.0f} ms"
            + (f", materialised in bf16 in {im['materialize_s']:.1f} s" if "materialize_s" in im else "")
            + f"; r={8}; median of {im['repeats']} repeats. `reference addmm_` is the arithmetic floor "
            "(one fused in-place `W.addmm_(B, A)` per matrix in the weight dtype)."
        )
        L.append("")
        L.append(
            "| targets | matrices | inject on meta ms | inject (bf16 weights) ms | adapted elements | merge ms | "
            "unmerge ms | ns / adapted element | reference addmm_ ms | merge / reference |"
        )
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        mat = im.get("materialized", {})
        for label, row in im["meta"].items():
            m = mat.get(label) if isinstance(mat.get(label), dict) else None
            if m:
                L.append(
                    f"| {label} | {row['n_matrices']} | {_ms(row['inject_s']['median'])} | "
                    f"{_ms(m['inject_s']['median'])} | {m['adapted_weight_elements'] / 1e6:.1f}M "
                    f"({m['adapted_fraction_of_model']:.0%}) | {_ms(m['merge_s']['median'])} | "
                    f"{_ms(m['unmerge_s']['median'])} | {m['merge_ns_per_adapted_element']:.2f} | "
                    f"{_ms(m['reference_addmm_merge_s']['median'])} | {m['merge_over_reference']:.2f} |"
                )
            else:
                L.append(f"| {label} | {row['n_matrices']} | {_ms(row['inject_s']['median'])} | skipped | | | | | | |")
        if "skipped" in mat:
            L.append("")
            L.append(f"Materialised model skipped: {mat['skipped']}.")
        L.append("")

    L.extend(precision_section(res.get("precision")))
    L.extend(compile_section(res.get("compile")))
    L.extend(main_job_section(HERE / "main_job.json"))
    L.extend(sharded_memory_section(HERE / "sharded_memory.json"))
    from benchmarks.mixed_batch import render as mixed_batch_section

    L.extend(mixed_batch_section(HERE / "mixed_batch.json"))
    from benchmarks.base_identity import render as base_identity_section
    from benchmarks.generation_speed import render as generation_speed_section

    L.extend(generation_speed_section(HERE / "generation_speed.json"))
    L.extend(base_identity_section(HERE / "base_identity.json"))
    from benchmarks.monitor_overhead import render as monitor_overhead_section

    L.extend(monitor_overhead_section(HERE / "monitor_overhead.json"))
    from benchmarks.lora_fa import render as lora_fa_section

    L.extend(lora_fa_section(HERE / "lora_fa.json"))
    from benchmarks.main_job_ratio import render as main_job_ratio_section

    L.extend(main_job_ratio_section(HERE / "main_job_ratio.json"))
    from benchmarks.adapter_latency import render as adapter_latency_section

    L.extend(adapter_latency_section(HERE / "adapter_latency.json"))

    prof = res.get("profile")
    if prof:
        L.append("## Profiles (torch.profiler, self time per step)")
        L.append("")
        for key, p in prof.items():
            L.append(f"### {key}")
            L.append("")
            L.append("total self time per step (ms): " + ", ".join(f"{m} {v:.0f}" for m, v in p["total_ms"].items()))
            L.append("")
            for pair, rows in p["diffs"].items():
                L.append(f"Largest per-op differences {pair} (ms per step):")
                L.append("")
                L.append("| op | a | b | a - b |")
                L.append("|---|---|---|---|")
                for r in rows:
                    vals = [v for k, v in r.items() if k != "op"]
                    L.append(f"| `{r['op']}` | {vals[0]:.1f} | {vals[1]:.1f} | {vals[2]:+.1f} |")
                L.append("")
            L.append("Full tables: " + ", ".join(f"`{Path(f).name}`" for f in p["files"].values()) + " in `profiles/`.")
            L.append("")
    return "\n".join(L) + "\n"


def sharded_memory_section(path: Path) -> list[str]:
    """The table of ``python -m benchmarks.sharded_memory`` (its own run), if it was run."""
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    m = data["model"]
    L = [
        "## 6. Sharded training memory: FSDP2 vs DDP, 2 CPU processes",
        "",
        f"`python -m benchmarks.sharded_memory` on {data['date']} ({data['seconds']} s; torch "
        f"{data['software']['torch']}, lightning {data['software']['lightning']}). Model: {m['layers']} blocks of "
        f"width {m['d_model']} (FFN {m['ffn']}), vocabulary {m['vocab']}, {m['parameters'] / 1e6:.1f}M parameters, "
        f"fp32, AdamW; LoRA r={m['lora']['r']} on {'+'.join(m['lora']['targets'])} through `LoRACallback`; FSDP2 = "
        "Lightning's `ModelParallelStrategy` with `fully_shard` per block. Bytes each rank holds itself after the 2nd "
        "optimizer step (a `DTensor` counts its local shard); both ranks measured, the larger shown. RSS is the whole "
        "process (runtime, activations, DDP's gradient buckets, FSDP2's temporarily unsharded blocks included).",
        "",
        "| configuration | trainable | parameters | gradients | optimizer state | sum per rank | vs DDP full FT | RSS "
        "(peak) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = None
    for row in data["results"]:
        r = max(row["ranks"], key=lambda x: x["params"] + x["grads"] + x["optimizer"])
        total = r["params"] + r["grads"] + r["optimizer"]
        base = base or total
        L.append(
            f"| {row['config']} | {r['trainable'] / 1e6:.2f}M | {_bytes(r['params'])} | {_bytes(r['grads'])} | "
            f"{_bytes(r['optimizer'])} | {_bytes(total)} | {total / base:.3f} | {_bytes(r['rss'])} "
            f"({_bytes(r['peak_rss'])}) |"
        )
    L.append("")
    return L


def precision_section(pr: dict | None) -> list[str]:
    """§9: fp32 vs bf16-mixed vs bf16 base with fp32 adapters."""
    if not pr:
        return []
    from benchmarks.models import method_label

    sp, mem = pr["speed"], pr.get("memory", {})
    L = [
        f"## 9. bf16 on this CPU: {pr['label']}, batch {pr['batch']} x seq {pr['seq']}",
        "",
        "Training step (AdamW) in fp32, under `torch.autocast('cpu', torch.bfloat16)` (what Lightning's "
        "`precision='bf16-mixed'` does), and with the model stored in bf16 while the LoRA adapters stay fp32 "
        f"(`adapter_dtype='float32'`); {pr['rounds']} rounds, round-robin; memory as in §1-2.",
        "",
        "| method | step ms median [p25-p75] | / same method in fp32 | peak MiB | training MiB |",
        "|---|---|---|---|---|",
    ]
    for m, row in sp["methods"].items():
        st = row["step_s"]
        base = m.split("+")[0]
        r = sp["ratios"].get(f"{m}/{base}")
        mm = mem.get(m, {})
        L.append(
            f"| {method_label(m)} | {_ms_iqr(st)} | {_r(r) if r else '1'} | "
            f"{_mb(mm.get('peak_bytes'))} | {_mb(mm.get('training_bytes'))} |"
        )
    L.append("")
    return L


def compile_section(c: dict | None) -> list[str]:
    """§10: torch.compile (inductor) vs eager."""
    if not c:
        return []
    gb = c["graph_breaks"]
    L = [
        f"## 10. torch.compile (inductor, CPU): {c['label']}, LoRA r=8 all-linear, batch {c['batch']} x seq {c['seq']}",
        "",
        "| | value |",
        "|---|---|",
        f"| eager step ms | {_ms_iqr(c['step_s']['eager'])} |",
        f"| compiled step ms | {_ms_iqr(c['step_s']['compiled'])} |",
        f"| compiled / eager (paired) | {_r(c['ratio_compiled_eager'])} |",
        f"| first compiled step (compile time included) | {c['compile_s']:.1f} s |",
        f"| graphs after the first step / after a fit of {len(c['fit_seq_lengths'])} batches of lengths "
        f"{c['fit_seq_lengths']} | {c['graphs_first_step']} / {c['graphs_after_fit']} |",
        f"| step seconds over that fit | {', '.join(f'{t:.2f}' for t in c['fit_step_s'])} |",
        f"| dynamo graph breaks in the adapted model's forward (`torch._dynamo.explain`) | {gb['graph_break_count']} "
        f"({gb['graph_count']} graphs) |",
        "",
    ]
    for reason in gb["reasons"]:
        L.append(f"- break: {reason}")
    if gb["reasons"]:
        L.append("")
    return L


def main_job_section(path: Path) -> list[str]:
    """§11: tokens per second of the main job (benchmarks/main_job.py)."""
    if not path.exists():
        return []
    d = json.loads(path.read_text())
    L = [
        "## 11. Tokens per second of the main job",
        "",
        f"`{d['command']}` on {d['date']}, {d['threads']} threads, load average {d['load_average_start']} -> "
        f"{d['load_average_end']}: the main job's model, data and settings (composed from its Hydra config), the first "
        f"{d['batches']} training batches ({d['samples']} snippets, {d['real_tokens']:,} real tokens, "
        f"{d['padded_tokens']:,} with padding), every method round-robin in one process.",
        "",
        "| method | trainable params | real tokens/s | padded tokens/s | snippets/s | time / full fine-tuning |",
        "|---|---|---|---|---|---|",
    ]
    labels = {
        "lora": "LoRA (the job's default)",
        "full": "full fine-tuning",
        "head_only": "head only",
        "lora+bf16mixed": "LoRA, bf16-mixed",
        "lora+unfused": "LoRA, shared-input fusion off",
    }
    for m, r in d["methods"].items():
        ratio = _r(r["time_vs_full"]) if r["time_vs_full"] else "1"
        L.append(
            f"| {labels.get(m, m)} | {r['trainable_params']:,} | {r['real_tokens_per_s']:.0f} | "
            f"{r['padded_tokens_per_s']:.0f} | {r['samples_per_s']:.1f} | {ratio} |"
        )
    L.append("")
    for name, r in d.get("paired", {}).items():
        L.append(f"- {name}, paired per round: {_r(r)}")
    L.append("")
    return L


# --------------------------------------------------------------------------- main
def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="dtype of the training / inference models"
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes, a few repeats: a smoke test (numbers not meaningful)"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: CPUs usable by this process)"
    )
    p.add_argument("--rounds", type=int, default=None, help="timed rounds of the training suite (default 10)")
    p.add_argument("--large-layers", type=int, default=3, help="layers of the BERT-large-width model (default 3)")
    p.add_argument(
        "--suites",
        default="train,inference,sizes,inject_merge,precision,compile",
        help="comma-separated subset of train,inference,sizes,inject_merge,precision,compile",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory processes")
    p.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.profiler tables (default: on unless --quick)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=HERE,
        help="folder for results.json, RESULTS.md and profiles/ (default: benchmarks/)",
    )
    p.add_argument(
        "--render", action="store_true", help="only re-write RESULTS.md from results.json (and sharded_memory.json)"
    )
    args = p.parse_args(argv)
    if args.render:
        (args.out / "RESULTS.md").write_text(render_markdown(json.loads((args.out / "results.json").read_text())))
        return 0
    if args.profile is None:
        args.profile = not args.quick
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: torch.cuda.is_available() is False")

    t_start = time.perf_counter()
    threads = setup_torch(args.device, args.threads)
    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    plan = make_plan(args)
    res: dict = {
        "command": "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv),
        "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "quick": args.quick,
        "device": args.device,
        "dtype": args.dtype,
        "machine": machine_info(args.device, threads),
        "plan": {
            k: ([s.as_dict() for s in v] if isinstance(v, list) and v and hasattr(v[0], "as_dict") else v)
            for k, v in plan.items()
        },
    }

    from benchmarks import suites as S

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s load {load_average()}] {msg}", flush=True)

    if "train" in suites:
        res["train"] = {}
        for spec in plan["train_specs"]:
            log(f"train speed: {spec.key}")
            speed = S.train_speed(spec, plan["methods"], args.device, args.dtype, plan["rounds"], plan["warmup"])
            res["train"][spec.key] = {
                "label": spec.label,
                "batch": spec.batch,
                "seq": spec.seq,
                "rounds": plan["rounds"],
                "warmup": plan["warmup"],
                "speed": speed,
                "memory": {},
            }
        if not args.no_memory:
            log("train memory: one fresh process per configuration")
            mem = S.train_memory(
                plan["train_specs"], plan["methods"], args.device, args.dtype, threads, plan["memory_steps"]
            )
            for spec in plan["train_specs"]:
                res["train"][spec.key]["memory"] = mem[spec.key]
    if "inference" in suites:
        res["inference"] = {}
        for spec in plan["infer_specs"]:
            log(f"inference: {spec.key} batch {spec.batch}")
            r = S.inference(
                spec, args.device, args.dtype, plan["infer_rounds"], plan["infer_warmup"], plan["infer_sample_s"]
            )
            r["label"] = spec.label
            res["inference"][f"{spec.key}-b{spec.batch}"] = r
    if "sizes" in suites:
        log("sizes")
        res["sizes"] = S.sizes(plan["size_specs"], args.dtype)
    if "inject_merge" in suites:
        log("inject / merge")
        res["inject_merge"] = S.inject_merge(plan["llama"], args.device, plan["merge_repeats"])
    if "precision" in suites:
        log("precision: fp32 / bf16-mixed / bf16 base")
        res["precision"] = S.precision(
            plan["precision_spec"], args.device, plan["rounds"], plan["warmup"], threads, not args.no_memory
        )
    if "compile" in suites and args.device == "cpu":
        log("compile: inductor vs eager")
        res["compile"] = S.compiled(
            plan["compile_spec"], args.device, plan["rounds"], plan["warmup"], plan["compile_seq_lengths"]
        )
    if plan["profile_specs"]:
        from benchmarks import profiling

        res["profile"] = {}
        for spec in plan["profile_specs"]:
            log(f"profile: {spec.key}")
            methods = ["full", "lora_qv", "peft_qv", "lora_all", "peft_all", "floor"]
            pr = profiling.profile_methods(spec, methods, args.device, args.dtype, args.out / "profiles")
            res["profile"][spec.key] = {
                "files": {m: str(Path(f).relative_to(args.out)) for m, f in pr["files"].items()},
                "total_ms": {m: profiling.total_ms(pr, m) for m in methods},
                "diffs": {
                    f"{a} vs {b}": profiling.diff(pr, a, b)
                    for a, b in (
                        ("lora_qv", "floor"),
                        ("lora_all", "floor"),
                        ("lora_qv", "peft_qv"),
                        ("lora_all", "peft_all"),
                        ("lora_qv", "full"),
                    )
                },
            }
    res["goals"] = evaluate_goals(res)
    res["load_average_end"] = load_average()
    res["elapsed_s"] = time.perf_counter() - t_start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    (args.out / "RESULTS.md").write_text(render_markdown(res))
    log(f"wrote {args.out / 'results.json'} and {args.out / 'RESULTS.md'}")
    for g in res["goals"]:
        print(f"  [{g['verdict']}] {g['goal']} ({g['model']}): {g['measured']:.4g} (target {g['target']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
