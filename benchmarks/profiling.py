"""torch.profiler views of training steps, to explain a missed goal op by op.

For each method, one untimed step, then ``steps`` separately profiled steps; the per-op self
time is the median over those steps (robust to preemption by other processes). ``diff`` lists the ops whose
self time differs most between two methods.
Tables are written to ``<out>/profiles/<model>-<method>.txt``.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.models import ModelSpec, build_model, make_batch, make_trainer, prepare


def profile_methods(
    spec: ModelSpec, methods: list[str], device: str, dtype: str, out_dir: Path, steps: int = 3
) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    per_method: dict[str, dict[str, float]] = {}
    files = {}
    for m in methods:
        model = prepare(build_model(spec, device, dtype), m)
        step, _ = make_trainer(model, make_batch(spec, device))
        step()
        # one profile per step and the per-op median over steps: a preemption by another process
        # lands in one step's numbers only
        per_step: list[dict[str, float]] = []
        for _ in range(steps):
            with profile(activities=activities) as prof:
                step()
                if device == "cuda":
                    torch.cuda.synchronize()
            avgs = prof.key_averages()
            attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
            per_step.append({e.key: getattr(e, attr, 0.0) / 1e3 for e in avgs})  # ms
        sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        path = out_dir / f"{spec.key}-{m}.txt"
        path.write_text(f"last of {steps} profiled steps\n" + avgs.table(sort_by=sort, row_limit=25) + "\n")
        files[m] = str(path)
        ops = set().union(*per_step)
        per_method[m] = {k: statistics.median([d.get(k, 0.0) for d in per_step]) for k in ops}
        del model, step
    return {"ms_per_step_by_op": per_method, "files": files, "steps": steps}


def diff(profiles: dict, a: str, b: str, top: int = 8) -> list[dict]:
    """Ops with the largest self-time difference a - b (ms per step), largest first."""
    pa, pb = profiles["ms_per_step_by_op"].get(a, {}), profiles["ms_per_step_by_op"].get(b, {})
    rows = [
        {"op": k, f"{a}_ms": pa.get(k, 0.0), f"{b}_ms": pb.get(k, 0.0), "diff_ms": pa.get(k, 0.0) - pb.get(k, 0.0)}
        for k in set(pa) | set(pb)
    ]
    rows.sort(key=lambda r: -abs(r["diff_ms"]))
    return rows[:top]


def total_ms(profiles: dict, m: str) -> float:
    return sum(profiles["ms_per_step_by_op"].get(m, {}).values())
