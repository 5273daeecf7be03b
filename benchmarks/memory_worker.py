"""Peak memory of training configurations, each measured in a fresh process.

``python -m benchmarks.memory_worker '<json list of jobs>'`` imports torch / transformers / peft
once and then, for every job, ``fork()``s a child that builds the model, applies the method,
records the memory with the model loaded, resets the peak counter, runs a few training steps and
sends back one JSON object. The parent itself never runs a torch operation (so forking is safe:
no OpenMP pool or CUDA context exists yet) and every configuration gets a process of its own, so
one configuration's freed-but-kept heap never hides or inflates another's figure. Forking from a
warm parent only saves the ~5 s import per configuration.

CPU metric: resident set size from /proc (VmRSS, and VmHWM reset through /proc/self/clear_refs
once the model is built). Where clear_refs is unavailable, the child's ``ru_maxrss`` (which then
also counts loading) is reported and marked so. CUDA metric: ``torch.cuda.memory_allocated`` /
``max_memory_allocated`` after ``reset_peak_memory_stats``.

Prints one ``RESULT <json>`` line per job, in order.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import traceback


def measure(job: dict) -> dict:
    """Runs in the forked child."""
    import torch

    from benchmarks.common import current_rss, peak_rss, reset_peak_rss, setup_torch
    from benchmarks.models import ModelSpec, build_model, make_batch, make_trainer, prepare, trainable_params

    device, dtype = job["device"], job["dtype"]
    setup_torch(device, job.get("threads"))
    spec = ModelSpec(**job["spec"])
    rss_before_model = current_rss()
    model = prepare(build_model(spec, device, dtype), job["method"])
    batch = make_batch(spec, device)
    step, _ = make_trainer(model, batch, job["method"])
    trainable, total = trainable_params(model)
    gc.collect()
    out: dict = {
        "method": job["method"],
        "model": spec.key,
        "trainable_params": trainable,
        "total_params": total,
        "steps": job.get("steps", 2),
    }
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        out["loaded_bytes"] = torch.cuda.memory_allocated()
    else:
        out["process_before_model_bytes"] = rss_before_model
        out["loaded_bytes"] = current_rss()
        out["peak_reset"] = reset_peak_rss()
    for _ in range(out["steps"]):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        out["peak_bytes"] = torch.cuda.max_memory_allocated()
        out["metric"] = "torch.cuda.max_memory_allocated"
    else:
        out["peak_bytes"] = peak_rss()
        out["metric"] = "VmHWM (peak RSS, reset after loading)" if out["peak_reset"] else "ru_maxrss (whole process)"
    # what training adds on top of the loaded model: activations, gradients, optimizer state
    out["training_bytes"] = out["peak_bytes"] - out["loaded_bytes"]
    return out


def run_forked(job: dict) -> dict:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            payload = json.dumps(measure(job))
        except BaseException:  # report, never fall through into the parent's loop
            payload = json.dumps({"method": job.get("method"), "error": traceback.format_exc()})
        with os.fdopen(w, "w") as fh:
            fh.write(payload)
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as fh:
        data = fh.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        return {"method": job.get("method"), "error": f"child exited with status {status} and no result"}
    return json.loads(data)


def main(argv: list[str]) -> int:
    jobs = json.loads(argv[0])
    # warm imports in the parent (no torch op is run here)
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from transformers import BertForSequenceClassification  # noqa: F401

    import benchmarks.common  # noqa: F401
    import benchmarks.models  # noqa: F401

    for job in jobs:
        print("RESULT " + json.dumps(run_forked(job)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
