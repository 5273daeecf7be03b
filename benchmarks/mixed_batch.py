"""Serving many adapters from one base: one forward over a batch whose samples use k different
adapters (``lora_lightning.mixed_batch``) vs k separate merged models (each sample through its own
adapter's merged model) vs PEFT's mixed-batch path (``model(..., adapter_names=[...])``).

    python -m benchmarks.mixed_batch              # k = 1, 4, 16 on all-MiniLM-L6-v2, ~2 min on one core

Model: all-MiniLM-L6-v2 (pretrained, 22.7M) for sequence classification, LoRA r=8 on q+v, k adapters
with random (non-zero) A and B, PEFT's and ours holding the same tensors (imported from PEFT's files).
A batch of 32 sequences x 64 tokens, sample i uses adapter i mod k. Each round times the three paths
back to back (inference, ``torch.no_grad``, one thread); the median over rounds is reported with the
ratios taken within the run. The outputs of the three paths are compared before timing.
Writes ``benchmarks/mixed_batch.json``; ``python -m benchmarks.run --render`` puts the table into
RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
BATCH, SEQ, R, ALPHA = 32, 64, 8, 16


def build(k: int, tmp: Path):
    """(ours, PEFT model, merged models by adapter name, adapter names per sample, inputs)."""
    import peft

    from benchmarks.models import build_model, minilm_spec
    from lora_lightning import import_peft_adapter, merge_and_unload, set_adapter

    spec = minilm_spec(batch=BATCH, seq=SEQ)
    names = [f"task{i}" for i in range(k)]
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["query", "value"], lora_dropout=0.0)
    pm = peft.get_peft_model(build_model(spec), cfg, adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, cfg)
    g = torch.Generator().manual_seed(k)
    with torch.no_grad():
        for pname, p in pm.named_parameters():
            if ".lora_" in pname:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    pm.save_pretrained(str(tmp))
    pm.eval()
    ours = build_model(spec).eval()
    for n in names:
        import_peft_adapter(ours, tmp / n, adapter_name=n)
    merged = {}
    for n in names:
        m = copy.deepcopy(ours)
        set_adapter(m, n)
        merged[n] = merge_and_unload(m).eval()
    per_sample = [names[i % k] for i in range(BATCH)]
    gi = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (BATCH, SEQ), generator=gi)
    mask = torch.ones_like(ids)
    return ours, pm, merged, per_sample, ids, mask


def measure(k: int, rounds: int) -> dict:
    from lora_lightning import mixed_batch

    with tempfile.TemporaryDirectory() as d:
        ours, pm, merged, per_sample, ids, mask = build(k, Path(d))
    rows = {n: torch.tensor([i for i, m in enumerate(per_sample) if m == n]) for n in merged}

    def run_ours():
        with mixed_batch(ours, per_sample):
            return ours(input_ids=ids, attention_mask=mask).logits

    def run_merged():
        out = torch.empty(BATCH, 2)
        for n, idx in rows.items():
            out[idx] = merged[n](input_ids=ids[idx], attention_mask=mask[idx]).logits
        return out

    def run_peft():
        return pm(input_ids=ids, attention_mask=mask, adapter_names=per_sample).logits

    paths = {"lora_lightning mixed_batch": run_ours, "k merged models": run_merged, "PEFT adapter_names": run_peft}
    with torch.no_grad():
        outs = {name: fn() for name, fn in paths.items()}
        ref = outs["k merged models"]
        max_diff = {name: float((o - ref).abs().max()) for name, o in outs.items()}
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(2):  # warm-up
            for fn in paths.values():
                fn()
        for _ in range(rounds):
            for name, fn in paths.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"k": k, "median_s": med, "max_abs_diff_vs_merged": max_diff, "rounds": rounds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", type=Path, default=HERE / "mixed_batch.json")
    args = p.parse_args(argv)
    from benchmarks.common import setup_torch, write_results

    threads = setup_torch("cpu", 1)
    start = time.time()
    results = []
    for k in args.ks:
        res = measure(k, args.rounds)
        print(
            k, {n: round(BATCH / t, 1) for n, t in res["median_s"].items()}, res["max_abs_diff_vs_merged"], flush=True
        )
        results.append(res)
    write_results(
        args.out, {"batch": BATCH, "seq": SEQ, "r": R, "alpha": ALPHA, "threads": threads, "results": results}, start
    )
    return 0


def render(path: Path) -> list[str]:
    """The RESULTS.md section for ``mixed_batch.json`` (empty if the benchmark was not run)."""
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    L = [
        "## 7. Many adapters in one batch: all-MiniLM-L6-v2, inference",
        "",
        f"`python -m benchmarks.mixed_batch` on {data['date']} ({data['seconds']} s; torch "
        f"{data['software']['torch']}, peft {data['software']['peft']}, {data['threads']} thread). One batch of "
        f"{data['batch']} x {data['seq']} tokens, sample i through adapter i mod k (LoRA r={data['r']} on q+v); median "
        f"of {data['results'][0]['rounds']} rounds, the three paths timed back to back in each round. Throughput in "
        "samples/s; ratios against the k merged models (each sample through its own adapter merged into a copy of the "
        "base: the fastest per-sample path, at k times the memory). Max |difference| of the logits against the merged "
        "models in the last column.",
        "",
        "| k adapters | mixed_batch | k merged models | PEFT adapter_names | mixed_batch / merged | mixed_batch / PEFT "
        "| max diff (ours, PEFT) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        t = r["median_s"]
        ours, merged, pe = (
            data["batch"] / t[n] for n in ("lora_lightning mixed_batch", "k merged models", "PEFT adapter_names")
        )
        d = r["max_abs_diff_vs_merged"]
        L.append(
            f"| {r['k']} | {ours:.1f} | {merged:.1f} | {pe:.1f} | {ours / merged:.3f} | {ours / pe:.3f} | "
            f"{d['lora_lightning mixed_batch']:.1e}, {d['PEFT adapter_names']:.1e} |"
        )
    L.append("")
    return L


if __name__ == "__main__":
    raise SystemExit(main())
