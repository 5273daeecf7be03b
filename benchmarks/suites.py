"""The five measurement suites. Each returns a plain JSON-able dict (see benchmarks/README.md).

1. ``train``: training-step time (in-process, interleaved) and peak memory (one fresh process
   per configuration) of full fine-tuning, LoRA, HF PEFT and the frozen-base limit.
2. (PEFT comparison is part of ``train``: same model, same batch, same run.)
3. ``inference``: base vs merged vs unmerged LoRA forward latency.
4. ``sizes``: adapter / full checkpoint bytes, closed-form prediction, GPT-3 175B recomputed.
5. ``inject_merge``: injection and merge/unmerge time on a ~1B-parameter Llama-shaped model.
7. ``precision``: fp32 vs bf16-mixed vs a bf16 base with fp32 adapters (step time, memory).
8. ``compile``: torch.compile (inductor) vs eager, compile time, recompilations, graph breaks.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import interleaved, meminfo_bytes, paired_ratio, summarize, sync, time_once
from benchmarks.models import (
    LORA_ALPHA,
    LORA_R,
    ModelSpec,
    build_gpt3_meta,
    build_llama_meta,
    build_model,
    llama_1b_config,
    lora_config,
    make_batch,
    make_trainer,
    materialize_bf16,
    prepare,
    randomize_lora_B,
    trainable_params,
)

ROOT = Path(__file__).resolve().parent.parent

# (numerator, denominator) pairs whose per-round ratio is reported
TRAIN_RATIOS = [
    ("lora_qv", "full"),
    ("lora_all", "full"),
    ("lora_qv", "floor"),
    ("lora_all", "floor"),
    ("lora_qv", "peft_qv"),
    ("lora_all", "peft_all"),
    ("peft_qv", "full"),
    ("peft_qv", "floor"),
    ("head_only", "full"),
    ("floor", "full"),
    ("lora_qv", "lora_qv+unfused"),
    ("lora_all", "lora_all+unfused"),
    ("lora_qv+unfused", "floor"),
    ("lora_all+unfused", "floor"),
]


# --------------------------------------------------------------------------- 1 + 2: training
def saved_activation_bytes(model: nn.Module, batch: dict, method: str = "") -> int:
    """Bytes autograd keeps for the backward of one training forward: the distinct storages packed by
    ``saved_tensors_hooks`` (a tensor saved by several nodes counts once), parameters excluded. The
    deterministic part of 'training MiB', per method."""
    from benchmarks.models import split_method

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.device.type != "meta":
            seen[st.data_ptr()] = st.nbytes()
        return t

    mods = split_method(method)[1] if method else ()
    ctx = (
        torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16)
        if "bf16mixed" in mods
        else contextlib.nullcontext()
    )
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        loss = model(**batch).loss
    del loss
    return int(sum(seen.values()))


def train_speed(spec: ModelSpec, methods: list[str], device: str, dtype: str, rounds: int, warmup: int) -> dict:
    """Every method's training step, timed round-robin (random order per round) on the same batch."""
    fns, info = {}, {}
    for m in methods:
        model = prepare(build_model(spec, device, dtype), m)
        step, _ = make_trainer(model, make_batch(spec, device), m)
        trainable, total = trainable_params(model)
        fns[m] = step
        info[m] = {
            "trainable_params": trainable,
            "total_params": total,
            "saved_activation_bytes": saved_activation_bytes(model, make_batch(spec, device), m),
        }
    times = interleaved(fns, rounds=rounds, warmup=warmup, device=device, seed=1)
    out = {"methods": {}, "ratios": {}}
    for m in methods:
        out["methods"][m] = info[m] | {"step_s": summarize(times[m]), "samples_s": times[m]}
    for a, b in TRAIN_RATIOS:
        if a in times and b in times:
            out["ratios"][f"{a}/{b}"] = paired_ratio(times[a], times[b])
    del fns
    gc.collect()
    return out


def train_memory(
    specs: list[ModelSpec], methods: list[str], device: str, dtype: str, threads: int, steps: int = 2
) -> dict:
    """Peak memory per (model, method), each in a fresh forked process: see memory_worker.py.

    Returns ``{model key: {method: result}}``.
    """
    jobs = [
        {"spec": spec.as_dict(), "method": m, "device": device, "dtype": dtype, "threads": threads, "steps": steps}
        for spec in specs
        for m in methods
    ]
    env = os.environ | {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory_worker", json.dumps(jobs)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=3600,
    )
    results: dict = {spec.key: {} for spec in specs}
    lines = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    for job, r in zip(jobs, lines, strict=False):  # fewer lines when the worker failed: handled below
        results[job["spec"]["key"]][job["method"]] = r
    for job in jobs[len(lines) :]:
        results[job["spec"]["key"]][job["method"]] = {
            "method": job["method"],
            "error": f"memory worker failed (rc={proc.returncode}): {proc.stderr[-2000:]}",
        }
    return results


# --------------------------------------------------------------------------- 3: inference
def _inner_count(fn, device: str, target_s: float) -> int:
    fn()  # warm
    t = time_once(fn, device)
    return max(1, math.ceil(target_s / max(t, 1e-6)))


def inference(spec: ModelSpec, device: str, dtype: str, rounds: int, warmup: int, target_sample_s: float) -> dict:
    """Forward latency (eval, inference_mode) of the base model and of LoRA merged / unmerged.

    Every LoRA model gets the same non-zero B (so a merge really changes W). ``merged`` keeps the
    LoRA layers (forward checks ``merged`` and runs only the base matmul); ``merged_unloaded``
    is ``merge_and_unload`` (the base architecture again).
    """
    from lora_lightning import inject_lora, merge_and_unload, merge_lora

    batch = {k: v for k, v in make_batch(spec, device).items() if k != "labels"}

    def lora_model(method: str) -> nn.Module:
        m = build_model(spec, device, dtype)
        inject_lora(m, lora_config(method, head=False))
        randomize_lora_B(m)
        return m.eval()

    models: dict[str, nn.Module] = {"base": build_model(spec, device, dtype).eval()}
    models["merged"] = lora_model("lora_qv")
    merge_lora(models["merged"])
    models["merged_unloaded"] = merge_and_unload(lora_model("lora_qv"))
    models["unmerged_qv"] = lora_model("lora_qv")
    models["unmerged_all"] = lora_model("lora_all")

    def fwd(m: nn.Module):
        def f():
            with torch.inference_mode():
                return m(**batch).logits

        return f

    fns = {k: fwd(m) for k, m in models.items()}
    with torch.inference_mode():
        logits = {k: f().float() for k, f in fns.items()}
    check = {
        "max_abs_diff_merged_vs_unmerged": float((logits["merged"] - logits["unmerged_qv"]).abs().max()),
        "max_abs_diff_unloaded_vs_unmerged": float((logits["merged_unloaded"] - logits["unmerged_qv"]).abs().max()),
        "max_abs_diff_unmerged_vs_base": float((logits["unmerged_qv"] - logits["base"]).abs().max()),
    }
    inner = _inner_count(fns["base"], device, target_sample_s)
    times = interleaved(fns, rounds=rounds, warmup=warmup, device=device, seed=2, inner=inner)
    out = {
        "batch": spec.batch,
        "seq": spec.seq,
        "inner_calls_per_sample": inner,
        "latency_s": {k: summarize(v) for k, v in times.items()},
        "samples_s": times,
        "ratios": {f"{k}/base": paired_ratio(times[k], times["base"]) for k in times if k != "base"},
        "check": check,
    }
    del models, fns
    gc.collect()
    return out


# --------------------------------------------------------------------------- 4: sizes
def _adapter_file_bytes(model: nn.Module, tmp: Path, name: str) -> tuple[int, int, int]:
    """(file bytes, tensor bytes, header+metadata bytes) of save_adapter's safetensors file."""
    from lora_lightning import adapter_state_dict, save_adapter

    path = save_adapter(model, tmp / f"{name}.safetensors")
    file_bytes = path.stat().st_size
    tensor_bytes = sum(t.numel() * t.element_size() for t in adapter_state_dict(model).values())
    return file_bytes, tensor_bytes, file_bytes - tensor_bytes


def sizes(specs: list[ModelSpec], dtype: str, gpt3: bool = True) -> dict:
    """Checkpoint bytes of adapters vs full models, with the closed form beside the measurement."""
    from safetensors.torch import save_file

    from lora_lightning import inject_lora, lora_parameter_count

    out: dict = {"models": {}, "gpt3_175b": None}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for spec in specs:
            base = build_model(spec, "cpu", dtype)
            full_path = tmp / f"{spec.key}-full.safetensors"
            save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(full_path))
            full_bytes = full_path.stat().st_size
            n_params = sum(p.numel() for p in base.parameters())
            elem = base.get_input_embeddings().weight.element_size()
            del base
            entry: dict = {
                "full_checkpoint_bytes": full_bytes,
                "full_params": n_params,
                "bytes_per_element": elem,
                "adapters": {},
            }
            for method in ("lora_qv", "lora_all"):
                for head in (False, True):
                    m = build_model(spec, "cpu", dtype)
                    specs_ = inject_lora(m, lora_config(method, head=head))
                    file_b, tensor_b, header_b = _adapter_file_bytes(m, tmp, f"{spec.key}-{method}-{head}")
                    shapes = sorted({(s.d_in, s.d_out) for s in specs_})
                    closed = lora_parameter_count(specs_) * elem
                    key = method + ("+head" if head else "")
                    entry["adapters"][key] = {
                        "n_matrices": len(specs_),
                        "shapes_d_in_d_out": [list(s) for s in shapes],
                        "closed_form_bytes": closed,
                        "closed_form": (
                            f"{LORA_R}*({shapes[0][0]}+{shapes[0][1]})*{len(specs_)}*{elem}"
                            if len(shapes) == 1
                            else f"sum r*(d_in+d_out)*{elem} over {len(specs_)} matrices"
                        ),
                        "tensor_bytes": tensor_b,
                        "file_bytes": file_b,
                        "header_and_metadata_bytes": header_b,
                        "lora_tensor_bytes_match_closed_form": (tensor_b == closed) if not head else None,
                        "full_over_adapter_file": full_bytes / file_b,
                    }
                    del m
            out["models"][spec.key] = entry
    if gpt3:
        out["gpt3_175b"] = gpt3_sizes()
    return out


def gpt3_sizes() -> dict:
    """GPT-3 175B (Hu et al. §4.2: 350 GB -> 35 MB with r=4 on q,v) from a meta-device skeleton."""
    from lora_lightning import LoRAConfig, inject_lora, lora_parameter_count

    layers, d, r, fp16 = 96, 12288, 4, 2
    t0 = time.perf_counter()
    model = build_gpt3_meta(layers, d)
    n_params = sum(p.numel() for p in model.parameters())
    specs = inject_lora(model, LoRAConfig(r=r, alpha=r, targets=["q", "v"]))
    elapsed = time.perf_counter() - t0
    lora_params = lora_parameter_count(specs)
    arithmetic = r * (d + d) * 2 * layers
    return {
        "layers": layers,
        "d_model": d,
        "r": r,
        "targets": "q,v",
        "n_matrices": len(specs),
        "skeleton_params": n_params,
        "full_fp16_bytes": n_params * fp16,
        "adapter_params_meta": lora_params,
        "adapter_params_closed_form": arithmetic,
        "adapter_fp16_bytes": lora_params * fp16,
        "closed_form": f"{r}*({d}+{d})*{2 * layers}*{fp16}",
        "paper_full_bytes": 350e9,
        "paper_adapter_bytes": 35e6,
        "full_over_adapter": n_params / lora_params,
        "paper_ratio": 350e9 / 35e6,
        "meta_build_and_inject_s": elapsed,
    }


# --------------------------------------------------------------------------- 5: inject / merge
TARGET_SETS = {"q,v": ["q", "v"], "q,k,v,o": ["q", "k", "v", "o"], "all-linear": ["all-linear"]}


def _reference_merge(model: nn.Module, sign: float) -> None:
    """The arithmetic floor of a merge: one fused in-place ``W += sign·s·B@A`` per matrix (addmm_)."""
    from lora_lightning import lora_layers

    with torch.no_grad():
        for layer in lora_layers(model).values():
            w = layer.weight
            w.addmm_(layer.lora_B.to(w.dtype), layer.lora_A.to(w.dtype), alpha=sign * layer.scaling)


def inject_merge(llama_kwargs: dict, device: str, repeats: int) -> dict:
    """Injection (meta and materialised) and merge/unmerge timings on a Llama-shaped model in bf16."""
    from lora_lightning import LoRAConfig, inject_lora, merge_lora, remove_lora, unmerge_lora

    cfg = llama_1b_config(**llama_kwargs)
    out: dict = {"config": llama_kwargs, "dtype": "bf16", "repeats": repeats, "meta": {}, "materialized": {}}

    t0 = time.perf_counter()
    meta_model = build_llama_meta(cfg)
    out["meta_build_s"] = time.perf_counter() - t0
    n_params = sum(p.numel() for p in meta_model.parameters())
    out["params"] = n_params
    for label, targets in TARGET_SETS.items():
        ts = []
        for _ in range(repeats):
            m = build_llama_meta(cfg)
            t0 = time.perf_counter()
            specs = inject_lora(m, LoRAConfig(r=LORA_R, alpha=LORA_ALPHA, targets=targets))
            ts.append(time.perf_counter() - t0)
        out["meta"][label] = {"inject_s": summarize(ts), "n_matrices": len(specs)}
    del meta_model

    need = n_params * 2 * 1.3 + 1.5e9
    avail = meminfo_bytes("MemAvailable") if device == "cpu" else None
    if avail is not None and avail < need:
        out["materialized"] = {"skipped": f"needs ~{need / 1e9:.1f} GB free, {avail / 1e9:.1f} GB available"}
        return out

    t0 = time.perf_counter()
    model = materialize_bf16(build_llama_meta(cfg), device=device)
    sync(device)
    out["materialize_s"] = time.perf_counter() - t0
    for label, targets in TARGET_SETS.items():
        inj, merge, unmerge, ref_merge = [], [], [], []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            specs = inject_lora(model, LoRAConfig(r=LORA_R, alpha=LORA_ALPHA, targets=targets))
            sync(device)
            inj.append(time.perf_counter() - t0)
            remove_lora(model)
        inject_lora(model, LoRAConfig(r=LORA_R, alpha=LORA_ALPHA, targets=targets))
        randomize_lora_B(model, std=0.02)
        snapshot = {s.name: model.get_submodule(s.name).weight.detach().clone() for s in specs[:4]}
        for _ in range(repeats):
            # partial, not a lambda: binds this model object now (the name is deleted at the end)
            merge.append(time_once(functools.partial(merge_lora, model), device))
            unmerge.append(time_once(functools.partial(unmerge_lora, model), device))
            ref_merge.append(time_once(functools.partial(_reference_merge, model, +1.0), device))
            _reference_merge(model, -1.0)
        drift = max(float((model.get_submodule(n).weight.float() - w.float()).abs().max()) for n, w in snapshot.items())
        remove_lora(model)
        adapted_elems = sum(s.d_in * s.d_out for s in specs)
        med_merge = summarize(merge)["median"]
        out["materialized"][label] = {
            "n_matrices": len(specs),
            "adapted_weight_elements": adapted_elems,
            "adapted_fraction_of_model": adapted_elems / n_params,
            "inject_s": summarize(inj),
            "merge_s": summarize(merge),
            "unmerge_s": summarize(unmerge),
            "reference_addmm_merge_s": summarize(ref_merge),
            "merge_ns_per_adapted_element": med_merge / adapted_elems * 1e9,
            "merge_over_reference": med_merge / summarize(ref_merge)["median"],
            "max_abs_weight_drift_after_merge_unmerge_cycles": drift,
        }
        del snapshot
        gc.collect()
    del model
    gc.collect()
    return out


# --------------------------------------------------------------------------- 7: bf16 on the CPU
PRECISION_METHODS = (
    "lora_all",
    "lora_all+bf16mixed",
    "lora_all+bf16base",
    "floor",
    "floor+bf16mixed",
    "full",
    "full+bf16mixed",
)


def precision(spec: ModelSpec, device: str, rounds: int, warmup: int, threads: int, memory: bool = True) -> dict:
    """Training step time and peak memory in fp32, under ``bf16-mixed`` autocast, and with a bf16 base
    holding fp32 adapters (the QLoRA-style layout), round-robin in one process; ratios against fp32."""
    speed = train_speed(spec, list(PRECISION_METHODS), device, "fp32", rounds, warmup)
    for m in PRECISION_METHODS:
        base = m.split("+")[0]
        if m != base:
            speed["ratios"][f"{m}/{base}"] = paired_ratio(
                speed["methods"][m]["samples_s"], speed["methods"][base]["samples_s"]
            )
    mem = train_memory([spec], list(PRECISION_METHODS), device, "fp32", threads)[spec.key] if memory else {}
    return {"label": spec.label, "batch": spec.batch, "seq": spec.seq, "rounds": rounds, "speed": speed, "memory": mem}


# --------------------------------------------------------------------------- 8: torch.compile
def compiled(spec: ModelSpec, device: str, rounds: int, warmup: int, seq_lengths: list[int]) -> dict:
    """``torch.compile`` (inductor) of the LoRA all-linear model vs eager: step time round-robin, compile
    time (first compiled step), recompilations over a run of batches whose length varies as with dynamic
    padding, and dynamo's graph breaks for the adapted model's forward."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    dynamo.reset()
    model = prepare(build_model(spec, device, "fp32"), "lora_all")
    batch = make_batch(spec, device)
    model(**batch)  # learn the shared-input groups (not traced: the tracker is skipped while compiling)
    explain = dynamo.explain(model)(**batch)
    breaks = {
        "graph_break_count": int(explain.graph_break_count),
        "graph_count": int(explain.graph_count),
        "reasons": [str(b.reason)[:200] for b in explain.break_reasons[:5]],
    }
    dynamo.reset()
    eager_step, _ = make_trainer(model, batch, "lora_all")
    twin = prepare(build_model(spec, device, "fp32"), "lora_all")
    twin.train()
    forward = torch.compile(twin)
    opt = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)

    def run(b: dict) -> None:
        opt.zero_grad(set_to_none=True)
        forward(**b).loss.backward()
        opt.step()

    counters.clear()
    t0 = time.perf_counter()
    run(batch)
    compile_s = time.perf_counter() - t0
    first_graphs = int(counters["stats"].get("unique_graphs", 0))
    times = interleaved(
        {"eager": eager_step, "compiled": lambda: run(batch)}, rounds=rounds, warmup=warmup, device=device, seed=4
    )
    recompile_s = []
    for n in seq_lengths:  # a fit with dynamic padding: the length of each batch differs
        b = {k: v[:, :n] if v.dim() == 2 else v for k, v in batch.items()}
        t0 = time.perf_counter()
        run(b)
        recompile_s.append(time.perf_counter() - t0)
    stats = dict(counters["stats"])
    return {
        "label": spec.label,
        "batch": spec.batch,
        "seq": spec.seq,
        "rounds": rounds,
        "graph_breaks": breaks,
        "compile_s": compile_s,
        "step_s": {k: summarize(v) for k, v in times.items()},
        "ratio_compiled_eager": paired_ratio(times["compiled"], times["eager"]),
        "fit_seq_lengths": seq_lengths,
        "fit_step_s": recompile_s,
        "graphs_first_step": first_graphs,
        "graphs_after_fit": int(stats.get("unique_graphs", 0)),  # > graphs_first_step: recompilations
    }
