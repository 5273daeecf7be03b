"""What the base identity costs: SHA-256 of every base tensor (and of its bf16/fp16 casts for an fp32 base)
on the 1.10B-parameter Llama-shaped model of §5, against the rest of ``inject_lora``.

``python -m benchmarks.base_identity`` writes ``benchmarks/base_identity.json``; ``python -m benchmarks.run
--render`` puts it in RESULTS.md. Per dtype (bf16, fp32): the identity alone (``base_identity``, every core:
hashing releases the GIL), ``inject_lora`` (r=8 on q,v; it records the identity), and a load check
(``load_adapter`` of the saved adapter onto a fresh model of the same dtype: plan + identity + copy).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _model(dtype: torch.dtype) -> torch.nn.Module:
    from benchmarks.models import build_llama_meta, llama_1b_config, materialize_bf16

    model = materialize_bf16(build_llama_meta(llama_1b_config()))
    return model if dtype == torch.bfloat16 else model.to(dtype)


def measure(dtype: torch.dtype, repeats: int) -> dict:
    from lora_lightning import LoRAConfig, inject_lora, load_adapter, remove_lora, save_adapter
    from lora_lightning.record import base_identity

    model = _model(dtype)
    n_params = sum(p.numel() for p in model.parameters())
    identity, inject, load = [], [], []
    config = LoRAConfig(r=8, targets=["q", "v"])
    for _ in range(repeats):
        t0 = time.perf_counter()
        ident = base_identity(model)
        identity.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        inject_lora(model, config)
        inject.append(time.perf_counter() - t0)
        with tempfile.TemporaryDirectory() as tmp:
            path = save_adapter(model, Path(tmp) / "a.safetensors")
            remove_lora(model)
            t0 = time.perf_counter()
            load_adapter(model, path)
            load.append(time.perf_counter() - t0)
        remove_lora(model)
    bytes_hashed = sum(
        int(torch.tensor(e["shape"]).prod())
        * sum(torch.empty((), dtype=getattr(torch, name)).element_size() for name in e["sha256"])
        for e in ident.values()
    )
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "params": n_params,
        "tensors": len(ident),
        "bytes_hashed": bytes_hashed,
        "identity_s": statistics.median(identity),
        "inject_s": statistics.median(inject),
        "load_adapter_s": statistics.median(load),
        "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=HERE / "base_identity.json")
    args = p.parse_args(argv)
    from benchmarks.common import write_results

    start = time.time()
    results = []
    for dtype in (torch.bfloat16, torch.float32):
        res = measure(dtype, args.repeats)
        print(json.dumps(res), flush=True)
        results.append(res)
    write_results(
        args.out, {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "results": results}, start
    )
    return 0


def render(path: Path) -> list[str]:
    """The RESULTS.md section for ``base_identity.json`` (empty if the benchmark was not run)."""
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    L = [
        "## 12. Base identity: hashing every base tensor of a 1.10B-parameter Llama-shaped model",
        "",
        f"`python -m benchmarks.base_identity` on {data['date']} ({data['seconds']} s; torch "
        f"{data['software']['torch']}; {data['cores']} cores, hashing in {data['cores']} threads). The model of §5, "
        f"materialised in bf16 (and cast to fp32 for the second row); median of {data['results'][0]['repeats']} "
        "repeats. The identity is a SHA-256 of every base tensor's bytes, plus its bf16 and fp16 casts for an fp32 "
        "base (so the same base cast down still loads); `inject_lora` (r=8 on q,v) records it, and `load_adapter` onto "
        "a fresh model computes it again to compare. (§5's injection times were measured before the identity existed: "
        "injection then hashed nothing.)",
        "",
        "| base dtype | parameters | tensors | bytes hashed | identity s | inject_lora s | load_adapter s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        L.append(
            f"| {r['dtype']} | {r['params'] / 1e9:.2f}B | {r['tensors']} | {r['bytes_hashed'] / 1e9:.2f} GB | "
            f"{r['identity_s']:.2f} | {r['inject_s']:.2f} | {r['load_adapter_s']:.2f} |"
        )
    L.append("")
    return L


if __name__ == "__main__":
    raise SystemExit(main())
